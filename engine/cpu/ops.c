/*
 * ops.c — dense kernels of the CPU reference backend.
 *
 * K/V rows are f32 or bf16 (widened exactly to f32 in registers, by a
 * 16-bit shift); activations and accumulation are f32.  (The projections,
 * eng_cpu_linear, are in linear.c.)
 *
 * Batch invariance: every result is computed as eight lane-wise partial sums
 * (stride 8), summed in one fixed order, plus a scalar tail — the same
 * operations whatever the caller's batch.  With -ffp-contract=off
 * (Makefile.am) the compiler may not fuse them differently per call site.
 */
#include <math.h>
#include <string.h>

#include "../internal.h"

/* The v8 helpers are static inline and never cross an ABI boundary. */
#pragma GCC diagnostic ignored "-Wpsabi"

typedef float v8 __attribute__((vector_size(32)));

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define ENG_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define ENG_CLONES
#endif

static inline v8 load8(const float *p)
{
    v8 v;
    memcpy(&v, p, sizeof v);
    return v;
}

typedef uint16_t u16x8 __attribute__((vector_size(16)));
typedef uint32_t u32x8 __attribute__((vector_size(32)));

/* Eight bf16 values widened exactly to f32 (the bits move up 16 places). */
static inline v8 load8_bf16(const uint16_t *p)
{
    u16x8 h;
    memcpy(&h, p, sizeof h);
    u32x8 w = __builtin_convertvector(h, u32x8) << 16;
    v8 v;
    memcpy(&v, &w, sizeof v);
    return v;
}

/* By pointer: a v8 passed by value draws a -Wpsabi note from gcc. */
static inline float hsum8(const v8 *v)
{
    const v8 a = *v;
    return ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]));
}

ENG_CLONES float eng_cpu_dot(const float *a, const float *b, int n)
{
    v8 acc = {0};
    int k = 0;
    for (; k + 8 <= n; k += 8) acc += load8(a + k) * load8(b + k);
    float s = hsum8(&acc), t = 0.0f;
    for (; k < n; k++) t += a[k] * b[k];
    return s + t;
}

ENG_CLONES float eng_cpu_dot_bf16(const float *a, const uint16_t *b, int n)
{
    v8 acc = {0};
    int k = 0;
    for (; k + 8 <= n; k += 8) acc += load8(a + k) * load8_bf16(b + k);
    float s = hsum8(&acc), t = 0.0f;
    for (; k < n; k++) t += a[k] * eng__bf16_to_f32(b[k]);
    return s + t;
}

/* y += a * x element by element: no reduction, so the order of lanes cannot
 * change a result. */
ENG_CLONES void eng_cpu_axpy(float *y, float a, const float *x, int n)
{
    for (int i = 0; i < n; i++) y[i] += a * x[i];
}

ENG_CLONES void eng_cpu_axpy_bf16(float *y, float a, const uint16_t *x, int n)
{
    for (int i = 0; i < n; i++) y[i] += a * eng__bf16_to_f32(x[i]);
}

void eng_cpu_rmsnorm(const float *x, const float *w, int M, int D, float eps, float *y)
{
    for (int m = 0; m < M; m++) {
        const float *xr = x + (size_t)m * D;
        float *yr = y + (size_t)m * D;
        float ss = eng_cpu_dot(xr, xr, D);
        float r = 1.0f / sqrtf(ss / (float)D + eps);
        for (int i = 0; i < D; i++) yr[i] = w[i] * (xr[i] * r);
    }
}
