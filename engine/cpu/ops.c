/*
 * ops.c — dense kernels of the CPU reference backend.
 *
 * Weights and K/V rows are f32 or bf16 (widened exactly to f32 in registers,
 * by a 16-bit shift); activations and accumulation are f32.
 *
 * Batch invariance: every output element of eng_cpu_linear is computed as
 * eight lane-wise partial sums over k (stride 8), summed in one fixed order,
 * plus a scalar tail, plus the bias — the same operations whichever tile shape
 * or thread computes it.  With -ffp-contract=off (Makefile.am) the compiler
 * may not fuse them differently per tile, so a token's results do not depend
 * on what else is in the batch.  That is what makes chunked prefill, decode
 * and ragged batches bit-identical to a one-shot prefill.
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

/* out[i][j] = x_i . w_j (+ b_j) for an MR x NR tile; MR, NR and W16 (weights
 * are bf16) are constants after inlining, so each specialisation keeps its
 * accumulators in registers.  w points at row 0 of the tile (float or uint16). */
static inline __attribute__((always_inline)) void
tile(int MR, int NR, int W16, const float *x, int ldx, const void *w, const float *b, int K,
     float *y, int ldy)
{
    const float *wf = w;
    const uint16_t *wh = w;
    /* Fully unrolled so that the accumulators live in registers. */
    v8 acc[4][4];
#pragma GCC unroll 4
    for (int i = 0; i < MR; i++)
#pragma GCC unroll 4
        for (int j = 0; j < NR; j++) acc[i][j] = (v8){0};
    int k = 0;
    for (; k + 8 <= K; k += 8) {
        v8 xv[4];
#pragma GCC unroll 4
        for (int i = 0; i < MR; i++) xv[i] = load8(x + (size_t)i * ldx + k);
#pragma GCC unroll 4
        for (int j = 0; j < NR; j++) {
            v8 wv = W16 ? load8_bf16(wh + (size_t)j * K + k) : load8(wf + (size_t)j * K + k);
#pragma GCC unroll 4
            for (int i = 0; i < MR; i++) acc[i][j] += xv[i] * wv;
        }
    }
    for (int i = 0; i < MR; i++) {
        for (int j = 0; j < NR; j++) {
            float s = hsum8(&acc[i][j]);
            float t = 0.0f;
            for (int kk = k; kk < K; kk++)
                t += x[(size_t)i * ldx + kk] *
                     (W16 ? eng__bf16_to_f32(wh[(size_t)j * K + kk]) : wf[(size_t)j * K + kk]);
            s += t;
            if (b) s += b[j];
            y[(size_t)i * ldy + j] = s;
        }
    }
}

/* y (M, N) = x (M, K) . w (N, K)^T + b, for rows [m0, m1) and columns [n0, n1);
 * W16: w holds bf16. */
#define WROW(n) (W16 ? (const void *)((const uint16_t *)w + (size_t)(n) * K) \
                     : (const void *)((const float *)w + (size_t)(n) * K))
static inline __attribute__((always_inline)) void
linear_block(int W16, const float *x, const void *w, const float *b, int K, int N, float *y,
             int m0, int m1, int n0, int n1)
{
    int m = m0;
    for (; m + 4 <= m1; m += 4) {
        int n = n0;
        for (; n + 2 <= n1; n += 2)
            tile(4, 2, W16, x + (size_t)m * K, K, WROW(n), b ? b + n : NULL, K, y + (size_t)m * N + n, N);
        for (; n < n1; n++)
            tile(4, 1, W16, x + (size_t)m * K, K, WROW(n), b ? b + n : NULL, K, y + (size_t)m * N + n, N);
    }
    for (; m < m1; m++) {
        int n = n0;
        for (; n + 4 <= n1; n += 4)
            tile(1, 4, W16, x + (size_t)m * K, K, WROW(n), b ? b + n : NULL, K, y + (size_t)m * N + n, N);
        for (; n < n1; n++)
            tile(1, 1, W16, x + (size_t)m * K, K, WROW(n), b ? b + n : NULL, K, y + (size_t)m * N + n, N);
    }
}
#undef WROW

ENG_CLONES static void linear_block_f32(const float *x, const float *w, const float *b, int K,
                                        int N, float *y, int m0, int m1, int n0, int n1)
{
    linear_block(0, x, w, b, K, N, y, m0, m1, n0, n1);
}

ENG_CLONES static void linear_block_bf16(const float *x, const uint16_t *w, const float *b, int K,
                                         int N, float *y, int m0, int m1, int n0, int n1)
{
    linear_block(1, x, w, b, K, N, y, m0, m1, n0, n1);
}

#define LIN_NB 32 /* output columns (weight rows) per task */
#define LIN_MB 64 /* input rows per task */

typedef struct lin_ctx {
    const eng_linear *l;
    const float *x;
    float *y;
    int M, n_nb;
} lin_ctx;

static void linear_task(void *vctx, int task, int thread)
{
    (void)thread;
    const lin_ctx *c = vctx;
    int nb = task % c->n_nb, mb = task / c->n_nb;
    int n0 = nb * LIN_NB, n1 = n0 + LIN_NB < c->l->rows ? n0 + LIN_NB : c->l->rows;
    int m0 = mb * LIN_MB, m1 = m0 + LIN_MB < c->M ? m0 + LIN_MB : c->M;
    if (c->l->w16)
        linear_block_bf16(c->x, c->l->w16, c->l->b, c->l->cols, c->l->rows, c->y, m0, m1, n0, n1);
    else
        linear_block_f32(c->x, c->l->w, c->l->b, c->l->cols, c->l->rows, c->y, m0, m1, n0, n1);
}

void eng_cpu_linear(eng_pool *p, const eng_linear *l, const float *x, int M, float *y)
{
    if (M <= 0) return;
    lin_ctx c = { l, x, y, M, (l->rows + LIN_NB - 1) / LIN_NB };
    int n_mb = (M + LIN_MB - 1) / LIN_MB;
    eng_pool_run(p, c.n_nb * n_mb, linear_task, &c);
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
