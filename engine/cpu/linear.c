/*
 * linear.c — y = x W^T + b for the CPU reference backend: one GEMM/GEMV
 * contract, three instruction-set paths chosen at run time.
 *
 * The contract (what makes the backend batch- and thread-invariant, and every
 * path bit-identical to every other): an output element y[m][n] is
 *
 *   a[l] = 0 for l in 0..15;
 *   for k = 0, 16, 32, ... while k + 16 <= K:  a[l] = fma(x[m][k+l], w[n][k+l], a[l])
 *   s = ((a0+a8)+(a4+a12)) + ((a2+a10)+(a6+a14))  ... the fixed tree of reduce16()
 *   for the K % 16 tail, in order:               s = fma(x[m][k], w[n][k], s)
 *   y = s + b[n]  (when there is a bias)
 *
 * with bf16 weights widened exactly to f32.  Every fma is a single rounding
 * (vfmadd in the vector paths, C99 fmaf in the portable one), each lane is an
 * independent chain, and the tree is the same in every path, so the bits of
 * an element depend neither on the tile shape that computed it (M: prefill,
 * chunk or decode), nor on the thread or task, nor on the path (AVX-512,
 * AVX2+FMA, portable).  Work is split over output columns and input rows,
 * never over K.
 *
 * The vector paths are compiled with function target attributes (never
 * -march): the binary runs anywhere and picks the widest path the CPU has
 * (eng_cpu_isa); MKAD_CPU_ISA=portable|avx2|avx512 caps it.
 */
#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "../internal.h"

#include "simd.h"

/* ---- instruction-set selection ------------------------------------------ */

static _Atomic int isa_level = -1;
static int isa_hw = -1; /* in use; the widest the CPU (and MKAD_CPU_ISA) allow */
static int has_bf16dot; /* AVX512-BF16 (vdpbf16ps), for cpu_math fast */
static pthread_once_t isa_once = PTHREAD_ONCE_INIT;

static void isa_detect(void)
{
    int lv = ENG_ISA_PORTABLE;
#ifdef ENG_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) lv = ENG_ISA_AVX2;
    if (lv == ENG_ISA_AVX2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl"))
        lv = ENG_ISA_AVX512;
    has_bf16dot = lv == ENG_ISA_AVX512 && __builtin_cpu_supports("avx512bw") &&
                  __builtin_cpu_supports("avx512bf16");
#endif
    const char *cap = getenv("MKAD_CPU_ISA");
    if (cap) {
        int c = strcmp(cap, "portable") == 0 ? ENG_ISA_PORTABLE
              : strcmp(cap, "avx2") == 0     ? ENG_ISA_AVX2
              : strcmp(cap, "avx512") == 0   ? ENG_ISA_AVX512 : lv;
        if (c < lv) lv = c;
    }
    isa_level = isa_hw = lv;
}

int eng_cpu_isa(void)
{
    pthread_once(&isa_once, isa_detect);
    return isa_level;
}

int eng_cpu_isa_set(int level)
{
    eng_cpu_isa();
    if (level < ENG_ISA_PORTABLE || level > ENG_ISA_AVX512) return ENG_EINVAL;
    isa_level = level < isa_hw ? level : isa_hw;
    return isa_level == level ? ENG_OK : ENG_EINVAL;
}

int eng_cpu_math_available(int math)
{
    eng_cpu_isa();
    return math == ENG_CPU_MATH_EXACT || (math == ENG_CPU_MATH_FAST && has_bf16dot && isa_level == ENG_ISA_AVX512);
}

const char *eng_cpu_isa_name(int level)
{
    return level == ENG_ISA_AVX512 ? "avx512" : level == ENG_ISA_AVX2 ? "avx2" : "portable";
}

/* ---- portable path: the contract written out ---------------------------- */

static inline float wval(const void *w, int W16, size_t i)
{
    return W16 ? eng__bf16_to_f32(((const uint16_t *)w)[i]) : ((const float *)w)[i];
}

/* The reduction tree of the contract, on the 16 lane sums. */
static inline float reduce16_c(const float *a)
{
    float s8[8], s4[4], s2[2];
    for (int l = 0; l < 8; l++) s8[l] = a[l] + a[l + 8];
    for (int l = 0; l < 4; l++) s4[l] = s8[l] + s8[l + 4];
    for (int l = 0; l < 2; l++) s2[l] = s4[l] + s4[l + 2];
    return s2[0] + s2[1];
}

float eng_cpu_dot16_ref(const float *x, const void *w, int W16, int K)
{
    float a[16] = {0};
    int k = 0;
    for (; k + 16 <= K; k += 16)
        for (int l = 0; l < 16; l++) a[l] = fmaf(x[k + l], wval(w, W16, (size_t)k + l), a[l]);
    float s = reduce16_c(a);
    for (; k < K; k++) s = fmaf(x[k], wval(w, W16, (size_t)k), s);
    return s;
}

/* w points at weight row n0 (as in every block function) */
static void block_portable(int W16, const float *x, const void *w, const float *b, int K, int N,
                           float *y, int m0, int m1, int n0, int n1)
{
    for (int m = m0; m < m1; m++)
        for (int n = n0; n < n1; n++) {
            const void *wr = W16 ? (const void *)((const uint16_t *)w + (size_t)(n - n0) * K)
                                 : (const void *)((const float *)w + (size_t)(n - n0) * K);
            float s = eng_cpu_dot16_ref(x + (size_t)m * K, wr, W16, K);
            y[(size_t)m * N + n] = b ? s + b[n] : s;
        }
}

#ifdef ENG_X86
/* ---- AVX-512 path: 16 lanes in one register ----------------------------- */

T512 static INL __m512 ld16(const void *w, int W16, size_t i)
{
    if (W16) {
        __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)w + i));
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    return _mm512_loadu_ps((const float *)w + i);
}

/* acc[i][j] = 0 over an MR x NR tile of accumulators, unrolled. */
#define ZERO_TILE(acc, MR, NR)                                                          \
    _Pragma("GCC unroll 4") for (int i_ = 0; i_ < (MR); i_++)                           \
        _Pragma("GCC unroll 8") for (int j_ = 0; j_ < (NR); j_++) (acc)[i_][j_] = _mm512_setzero_ps()

/* An MR x NR tile of outputs; MR, NR, W16 are constants after inlining. */
T512 static INL void tile512(int MR, int NR, int W16, const float *x, int K, const void *w,
                             const float *b, float *y, int ldy)
{
    __m512 acc[4][8];
    ZERO_TILE(acc, MR, NR);
    int k = 0;
    for (; k + 16 <= K; k += 16) {
        __m512 xv[4];
#pragma GCC unroll 4
        for (int i = 0; i < MR; i++) xv[i] = _mm512_loadu_ps(x + (size_t)i * K + k);
#pragma GCC unroll 8
        for (int j = 0; j < NR; j++) {
            __m512 wv = ld16(w, W16, (size_t)j * K + k);
#pragma GCC unroll 4
            for (int i = 0; i < MR; i++) acc[i][j] = _mm512_fmadd_ps(xv[i], wv, acc[i][j]);
        }
    }
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < NR; j++) {
            float s = reduce16_512(acc[i][j]);
            for (int kk = k; kk < K; kk++)
                s = fmaf(x[(size_t)i * K + kk], wval(w, W16, (size_t)j * K + kk), s);
            y[(size_t)i * ldy + j] = b ? s + b[j] : s;
        }
}

/* w points at weight row n0 */
/* Decode: one x row against eight bf16 weight rows, a whole 64-byte line of
 * each per step (two 16-lane FMAs into the same accumulator, in k order: the
 * contract's operations exactly), the next rows prefetched. */
T512 static INL void gemv8_512(const float *x, int K, const uint16_t *w, const float *b, float *y)
{
    __m512 acc[8];
#pragma GCC unroll 8
    for (int j = 0; j < 8; j++) acc[j] = _mm512_setzero_ps();
    int k = 0;
    for (; k + 32 <= K; k += 32) {
        __m512 x0 = _mm512_loadu_ps(x + k), x1 = _mm512_loadu_ps(x + k + 16);
#pragma GCC unroll 8
        for (int j = 0; j < 8; j++) {
            const uint16_t *r = w + (size_t)j * K + k;
            _mm_prefetch((const char *)(r + 8 * (size_t)K), _MM_HINT_T0);
            __m512i h = _mm512_loadu_si512((const void *)r);
            __m512 w0 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(h)), 16));
            __m512 w1 = _mm512_castsi512_ps(_mm512_slli_epi32(
                _mm512_cvtepu16_epi32(_mm256_castpd_si256(_mm512_extractf64x4_pd(_mm512_castsi512_pd(h), 1))), 16));
            acc[j] = _mm512_fmadd_ps(x0, w0, acc[j]);
            acc[j] = _mm512_fmadd_ps(x1, w1, acc[j]);
        }
    }
    for (; k + 16 <= K; k += 16) {
        __m512 x0 = _mm512_loadu_ps(x + k);
#pragma GCC unroll 8
        for (int j = 0; j < 8; j++) acc[j] = _mm512_fmadd_ps(x0, ld16(w, 1, (size_t)j * K + k), acc[j]);
    }
    for (int j = 0; j < 8; j++) {
        float s = reduce16_512(acc[j]);
        for (int kk = k; kk < K; kk++) s = fmaf(x[kk], eng__bf16_to_f32(w[(size_t)j * K + kk]), s);
        y[j] = b ? s + b[j] : s;
    }
}

#define WROW(n) (W16 ? (const void *)((const uint16_t *)w + (size_t)((n) - n0) * K) \
                     : (const void *)((const float *)w + (size_t)((n) - n0) * K))
#define TILE(F, MR, NR, m, n) \
    F(MR, NR, W16, x + (size_t)(m) * K, K, WROW(n), b ? b + (n) : NULL, y + (size_t)(m) * N + (n), N)

T512 static INL void block512(int W16, const float *x, const void *w, const float *b, int K, int N,
                              float *y, int m0, int m1, int n0, int n1)
{
    /* n outer, m inner: the NR weight rows stay in L1 while the x rows stream */
    int n = n0;
    if (m1 - m0 < 4) /* decode: eight weight rows streamed at once */
        for (; n + 8 <= n1; n += 8)
            for (int m = m0; m < m1; m++) {
                if (W16)
                    gemv8_512(x + (size_t)m * K, K, (const uint16_t *)WROW(n), b ? b + n : NULL,
                              y + (size_t)m * N + n);
                else
                    TILE(tile512, 1, 8, m, n);
            }
    for (; n + 4 <= n1; n += 4) {
        int m = m0;
        for (; m + 4 <= m1; m += 4) TILE(tile512, 4, 4, m, n);
        for (; m < m1; m++) TILE(tile512, 1, 4, m, n);
    }
    for (; n < n1; n++) {
        int m = m0;
        for (; m + 4 <= m1; m += 4) TILE(tile512, 4, 1, m, n);
        for (; m < m1; m++) TILE(tile512, 1, 1, m, n);
    }
}

T512 static void block512_bf16(const float *x, const void *w, const float *b, int K, int N, float *y,
                               int m0, int m1, int n0, int n1)
{
    block512(1, x, w, b, K, N, y, m0, m1, n0, n1);
}

T512 static void block512_f32(const float *x, const void *w, const float *b, int K, int N, float *y,
                              int m0, int m1, int n0, int n1)
{
    block512(0, x, w, b, K, N, y, m0, m1, n0, n1);
}

/* ---- AVX2 path: the 16 lanes as two 8-lane registers -------------------- */

T256 static INL __m256 ld8(const void *w, int W16, size_t i)
{
    if (W16) {
        __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)w + i));
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
    return _mm256_loadu_ps((const float *)w + i);
}

/* lo holds lanes 0..7, hi lanes 8..15: the same tree as reduce16_c. */
T256 static INL float reduce16_256(__m256 lo, __m256 hi)
{
    __m256 s8 = _mm256_add_ps(lo, hi);
    __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
    __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    __m128 s1 = _mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1));
    return _mm_cvtss_f32(s1);
}

T256 static INL void tile256(int MR, int NR, int W16, const float *x, int K, const void *w,
                             const float *b, float *y, int ldy)
{
    __m256 lo[2][2], hi[2][2];
#pragma GCC unroll 2
    for (int i = 0; i < MR; i++)
#pragma GCC unroll 2
        for (int j = 0; j < NR; j++) lo[i][j] = hi[i][j] = _mm256_setzero_ps();
    int k = 0;
    for (; k + 16 <= K; k += 16) {
        __m256 xl[2], xh[2];
#pragma GCC unroll 2
        for (int i = 0; i < MR; i++) {
            xl[i] = _mm256_loadu_ps(x + (size_t)i * K + k);
            xh[i] = _mm256_loadu_ps(x + (size_t)i * K + k + 8);
        }
#pragma GCC unroll 2
        for (int j = 0; j < NR; j++) {
            __m256 wl = ld8(w, W16, (size_t)j * K + k), wh = ld8(w, W16, (size_t)j * K + k + 8);
#pragma GCC unroll 2
            for (int i = 0; i < MR; i++) {
                lo[i][j] = _mm256_fmadd_ps(xl[i], wl, lo[i][j]);
                hi[i][j] = _mm256_fmadd_ps(xh[i], wh, hi[i][j]);
            }
        }
    }
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < NR; j++) {
            float s = reduce16_256(lo[i][j], hi[i][j]);
            for (int kk = k; kk < K; kk++)
                s = fmaf(x[(size_t)i * K + kk], wval(w, W16, (size_t)j * K + kk), s);
            y[(size_t)i * ldy + j] = b ? s + b[j] : s;
        }
}

T256 static INL void block256(int W16, const float *x, const void *w, const float *b, int K, int N,
                              float *y, int m0, int m1, int n0, int n1)
{
    int n = n0;
    for (; n + 2 <= n1; n += 2) {
        int m = m0;
        for (; m + 2 <= m1; m += 2) TILE(tile256, 2, 2, m, n);
        for (; m < m1; m++) TILE(tile256, 1, 2, m, n);
    }
    for (; n < n1; n++) {
        int m = m0;
        for (; m + 2 <= m1; m += 2) TILE(tile256, 2, 1, m, n);
        for (; m < m1; m++) TILE(tile256, 1, 1, m, n);
    }
}

T256 static void block256_bf16(const float *x, const void *w, const float *b, int K, int N, float *y,
                               int m0, int m1, int n0, int n1)
{
    block256(1, x, w, b, K, N, y, m0, m1, n0, n1);
}

T256 static void block256_f32(const float *x, const void *w, const float *b, int K, int N, float *y,
                              int m0, int m1, int n0, int n1)
{
    block256(0, x, w, b, K, N, y, m0, m1, n0, n1);
}
#undef TILE
#undef WROW

/* ---- cpu_math fast: bf16 dot products (AVX512-BF16) ---------------------
 *
 * Not the reference: activations are rounded to bf16 (nearest even) and
 * multiplied with the bf16 weights by vdpbf16ps, which adds two products
 * into each f32 lane per instruction (twice the multiply-adds of an f32
 * FMA, no widening of the weights).  Its own fixed contract per element:
 *
 *   xb = bf16(x) (vcvtneps2bf16)
 *   a[l] = 0; for k = 0, 32, 64, ...: a[l] = vdpbf16ps(a[l], xb[k+2l, k+2l+1], w[k+2l, k+2l+1])
 *            (the last step with the elements past K zero)
 *   y = reduce16 tree (the exact contract's) + b[n]
 *
 * The same instructions for an element whatever M, the tile or the thread,
 * so this mode is still deterministic and batch-invariant; it differs from
 * the exact path by the rounding of the activations (docs/performance.md
 * has the measured difference).  Only for bf16 weights on a CPU with
 * AVX512-BF16; f32 weights take the exact kernels. */

/* xb (M, K) = bf16(x), rounded to nearest even by the hardware. */
TBF16 static void to_bf16(const float *x, size_t n, uint16_t *xb)
{
    size_t i = 0;
    for (; i + 16 <= n; i += 16)
        _mm256_storeu_si256((__m256i *)(void *)(xb + i), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(x + i)));
    if (i < n) {
        __mmask16 m = (__mmask16)((1u << (n - i)) - 1);
        __m256i h = (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, x + i));
        _mm256_mask_storeu_epi16(xb + i, m, h);
    }
}

/* 32 bf16 of row r from k; with a mask (the last step) the lanes past K are zero. */
TBF16 static INL __m512bh ldbh(const uint16_t *r, int k, __mmask32 tail)
{
    if (!tail) return (__m512bh)_mm512_loadu_si512((const void *)(r + k));
    return (__m512bh)_mm512_maskz_loadu_epi16(tail, r + k);
}

/* One k step of 32 for an MR x NR tile. */
TBF16 static INL void stepbh(int MR, int NR, const uint16_t *xb, int K, const uint16_t *w, int k, __mmask32 tail,
                             __m512 acc[4][8])
{
    __m512bh xv[4];
#pragma GCC unroll 4
    for (int i = 0; i < MR; i++) xv[i] = ldbh(xb + (size_t)i * K, k, tail);
#pragma GCC unroll 8
    for (int j = 0; j < NR; j++) {
        if (NR == 8) _mm_prefetch((const char *)(w + (size_t)(j + 8) * K + k), _MM_HINT_T0);
        __m512bh wv = ldbh(w + (size_t)j * K, k, tail);
#pragma GCC unroll 4
        for (int i = 0; i < MR; i++) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], xv[i], wv);
    }
}

/* An MR x NR tile: x rows (bf16) against weight rows (bf16). */
TBF16 static INL void tilebh(int MR, int NR, const uint16_t *xb, int K, const uint16_t *w, const float *b,
                             float *y, int ldy)
{
    __m512 acc[4][8];
    ZERO_TILE(acc, MR, NR);
    int k = 0;
    for (; k + 32 <= K; k += 32) stepbh(MR, NR, xb, K, w, k, 0, acc);
    if (k < K) stepbh(MR, NR, xb, K, w, k, (__mmask32)((1ull << (K - k)) - 1), acc);
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < NR; j++) {
            float s = reduce16_512(acc[i][j]);
            y[(size_t)i * ldy + j] = b ? s + b[j] : s;
        }
}

#define BTILE(MR, NR, m, n) \
    tilebh(MR, NR, xb + (size_t)(m) * K, K, w + (size_t)((n) - n0) * K, b ? b + (n) : NULL, y + (size_t)(m) * N + (n), N)

/* w points at weight row n0 */
TBF16 static void blockbh(const uint16_t *xb, const uint16_t *w, const float *b, int K, int N, float *y,
                          int m0, int m1, int n0, int n1)
{
    int n = n0;
    if (m1 - m0 < 4) /* decode: eight weight rows streamed at once, the next eight prefetched */
        for (; n + 8 <= n1; n += 8)
            for (int m = m0; m < m1; m++) BTILE(1, 8, m, n);
    for (; n + 4 <= n1; n += 4) {
        int m = m0;
        for (; m + 4 <= m1; m += 4) BTILE(4, 4, m, n);
        for (; m < m1; m++) BTILE(1, 4, m, n);
    }
    for (; n < n1; n++) {
        int m = m0;
        for (; m + 4 <= m1; m += 4) BTILE(4, 1, m, n);
        for (; m < m1; m++) BTILE(1, 1, m, n);
    }
}
#undef BTILE
#endif /* ENG_X86 */

/* ---- the parallel driver ------------------------------------------------ */

#define LIN_NB 32 /* output columns (weight rows) per task */
#define LIN_MB 64 /* input rows per task */

typedef struct lin_ctx {
    eng_pool *pool;
    const eng_linear *l;
    const float *x;
    const uint16_t *xb; /* cpu_math fast: x rounded to bf16, else NULL */
    float *y;
    int M, n_nb, isa;
    int m_group; /* input rows per task: a multiple of LIN_MB */
} lin_ctx;

#define PANEL_MIN_M 8 /* rows from which widening the weight panel once pays */

#ifdef ENG_X86
/* Widens rows [n0, n1) of a bf16 weight to f32 (exact) into panel. */
T512 static void widen_512(const uint16_t *w, size_t n, float *panel)
{
    size_t i = 0;
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(panel + i, ld16(w, 1, i));
    for (; i < n; i++) panel[i] = eng__bf16_to_f32(w[i]);
}
#endif

static void linear_task(void *vctx, int task, int thread)
{
    const lin_ctx *c = vctx;
    const eng_linear *l = c->l;
    int nb = task % c->n_nb, mg = task / c->n_nb, K = l->cols;
    int n0 = nb * LIN_NB, n1 = n0 + LIN_NB < l->rows ? n0 + LIN_NB : l->rows;
    int g0 = mg * c->m_group, g1 = g0 + c->m_group < c->M ? g0 + c->m_group : c->M;
    int W16 = l->w16 != NULL;
    const void *w = W16 ? (const void *)(l->w16 + (size_t)n0 * K) : (const void *)(l->w + (size_t)n0 * K);
#ifdef ENG_X86
    if (c->xb) {
        for (int m0 = g0; m0 < g1; m0 += LIN_MB)
            blockbh(c->xb, l->w16 + (size_t)n0 * K, l->b, K, l->rows, c->y, m0, m0 + LIN_MB < g1 ? m0 + LIN_MB : g1,
                    n0, n1);
        return;
    }
    if (c->isa == ENG_ISA_AVX512) {
        /* Many rows: widen the task's weight panel once (exact), so that the
         * tiles stream f32 without a conversion per use.  Same bits. */
        float *panel = W16 && g1 - g0 >= PANEL_MIN_M
                       ? eng_pool_scratch(c->pool, thread, (size_t)(n1 - n0) * K * sizeof(float)) : NULL;
        if (panel) widen_512(w, (size_t)(n1 - n0) * K, panel);
        /* row blocks of LIN_MB: their x rows stay in L2 while the panel's
         * columns go by */
        for (int m0 = g0; m0 < g1; m0 += LIN_MB) {
            int m1 = m0 + LIN_MB < g1 ? m0 + LIN_MB : g1;
            if (panel) block512_f32(c->x, panel, l->b, K, l->rows, c->y, m0, m1, n0, n1);
            else (W16 ? block512_bf16 : block512_f32)(c->x, w, l->b, K, l->rows, c->y, m0, m1, n0, n1);
        }
        return;
    }
    if (c->isa == ENG_ISA_AVX2) {
        (W16 ? block256_bf16 : block256_f32)(c->x, w, l->b, K, l->rows, c->y, g0, g1, n0, n1);
        return;
    }
#else
    (void)thread;
#endif
    block_portable(W16, c->x, w, l->b, K, l->rows, c->y, g0, g1, n0, n1);
}

void eng_cpu_linear(eng_pool *p, const eng_linear *l, const float *x, int M, float *y, int math)
{
    if (M <= 0) return;
    lin_ctx c = { p, l, x, NULL, y, M, (l->rows + LIN_NB - 1) / LIN_NB, eng_cpu_isa(), LIN_MB };
#ifdef ENG_X86
    if (math == ENG_CPU_MATH_FAST && l->w16 && eng_cpu_math_available(ENG_CPU_MATH_FAST)) {
        uint16_t *xb = eng_pool_shared(p, (size_t)M * l->cols * sizeof(uint16_t));
        if (xb) { /* else (out of memory) the exact path */
            to_bf16(x, (size_t)M * l->cols, xb);
            c.xb = xb;
        }
    }
#else
    (void)math;
#endif
    /* Rows per task: as many LIN_MB blocks as keep at least 4 tasks per
     * thread (fewer panel widenings); the split never touches an element's
     * order of operations. */
    int want = 4 * eng_pool_threads(p), n_mb = (M + LIN_MB - 1) / LIN_MB;
    int per = n_mb * c.n_nb / want;
    per = per < 1 ? 1 : per > n_mb ? n_mb : per;
    c.m_group = per * LIN_MB;
    int n_mg = (M + c.m_group - 1) / c.m_group;
    eng_pool_run(p, c.n_nb * n_mg, linear_task, &c);
}
