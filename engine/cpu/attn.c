/*
 * attn.c — causal attention of one token for the CPU reference backend: the
 * G query heads that share one K/V head (GQA), over the sequence's positions
 * 0..n-1 read through its block table, so every K/V row is widened once per
 * group instead of once per query head.
 *
 * The contract, the same in every instruction-set path (linear.c explains
 * the paths) and for every batch shape, since a token's attention reads only
 * its own sequence:
 *   s[g][j] = dot16(q_g, k_j) * scale         (linear.c's per-element contract)
 *   e[g][j] = exp16(s[g][j] - max_j s[g][j])   (exp16 below: +, -, * only)
 *   sum[g]  = 16 lane sums over j (stride 16) folded by the reduce16 tree,
 *             then the tail in order
 *   out[g][d] = fma(e[g][j] * (1 / sum[g]), v_j[d], out[g][d]) for j = 0, 1, ...
 */
#include <math.h>
#include <string.h>

#include "../internal.h"

#pragma GCC diagnostic ignored "-Wpsabi"

typedef float f16v __attribute__((vector_size(64)));
typedef int32_t i16v __attribute__((vector_size(64)));

/* exp(x) for x <= 0 on 16 lanes (Cephes expf: range reduction by ln 2 in two
 * parts and a degree-5 polynomial; about 2 ulp), inputs below -87 give
 * exp(-87).  Only +, -, *, compares and integer bit operations, in one fixed
 * order (-ffp-contract=off), so every target the compiler builds it for
 * gives the same bits.  Defined once per target by EXP16. */
#define EXP16(NAME, ATTR)                                                               \
    ATTR static inline f16v NAME(f16v x)                                                \
    {                                                                                   \
        const f16v lo = (f16v){0} - 87.0f;                                              \
        i16v below = x < lo, xi, li;                                                    \
        memcpy(&xi, &x, sizeof xi);                                                     \
        memcpy(&li, &lo, sizeof li);                                                    \
        xi = (below & li) | (~below & xi);                                              \
        memcpy(&x, &xi, sizeof x);                                                      \
        f16v t = x * 1.44269504088896341f + 0.5f;                                       \
        i16v n = __builtin_convertvector(t, i16v);                                      \
        f16v fn = __builtin_convertvector(n, f16v);                                     \
        /* truncation toward zero -> floor */                                            \
        i16v adj = fn > t;                                                              \
        n = n + adj;                                                                    \
        fn = __builtin_convertvector(n, f16v);                                          \
        x = x - fn * 0.693359375f;                                                      \
        x = x - fn * -2.12194440e-4f;                                                   \
        f16v z = x * x;                                                                 \
        f16v y = x * 1.9875691500E-4f + 1.3981999507E-3f;                               \
        y = y * x + 8.3334519073E-3f;                                                   \
        y = y * x + 4.1665795894E-2f;                                                   \
        y = y * x + 1.6666665459E-1f;                                                   \
        y = y * x + 5.0000001201E-1f;                                                   \
        y = y * z + x + 1.0f;                                                           \
        i16v e = (n + 127) << 23;                                                       \
        f16v p;                                                                         \
        memcpy(&p, &e, sizeof p);                                                       \
        return y * p;                                                                   \
    }

/* The reduce16 tree of linear.c on a vector. */
static inline float reduce16v(const f16v *a)
{
    float s8[8], s4[4], s2[2];
    for (int l = 0; l < 8; l++) s8[l] = (*a)[l] + (*a)[l + 8];
    for (int l = 0; l < 4; l++) s4[l] = s8[l] + s8[l + 4];
    for (int l = 0; l < 2; l++) s2[l] = s4[l] + s4[l + 2];
    return s2[0] + s2[1];
}

static inline const unsigned char *kv_at(const eng_cpu_attn *a, int j, size_t off)
{
    return a->kv + (size_t)a->blocks[j / a->B] * a->block_bytes + off + (size_t)(j % a->B) * a->row_bytes;
}

/* Softmax over each head's n scores in place, leaving e * (1 / sum): the
 * contract's e and sum, shared by all paths (f16v code, built per target). */
#define SOFTMAX(NAME, EXPF, ATTR)                                                       \
    ATTR static void NAME(float *sc, int n)                                             \
    {                                                                                   \
        float mx = -INFINITY;                                                           \
        for (int j = 0; j < n; j++) mx = sc[j] > mx ? sc[j] : mx;                       \
        f16v acc = {0};                                                                 \
        int j = 0;                                                                      \
        for (; j + 16 <= n; j += 16) {                                                  \
            f16v v;                                                                     \
            memcpy(&v, sc + j, sizeof v);                                               \
            v = EXPF(v - mx);                                                           \
            memcpy(sc + j, &v, sizeof v);                                               \
            acc += v;                                                                   \
        }                                                                               \
        float sum = reduce16v(&acc);                                                    \
        if (j < n) {                                                                    \
            f16v v = (f16v){0} - 87.0f;                                                 \
            memcpy(&v, sc + j, (size_t)(n - j) * sizeof(float));                        \
            v = EXPF(v - mx);                                                           \
            for (int r = 0; j + r < n; r++) { sc[j + r] = v[r]; sum += v[r]; }          \
        }                                                                               \
        float inv = 1.0f / sum;                                                         \
        for (int r = 0; r < n; r++) sc[r] *= inv;                                       \
    }

/* ---- portable path ------------------------------------------------------- */

EXP16(exp16_c, )
SOFTMAX(softmax_c, exp16_c, )

static void attention_portable(const eng_cpu_attn *a)
{
    int G = a->G, hd = a->hd, n = a->n;
    for (int j = 0; j < n; j++) {
        const void *k = kv_at(a, j, a->k_off);
        for (int g = 0; g < G; g++)
            a->sc[(size_t)g * n + j] = eng_cpu_dot16_ref(a->q + (size_t)g * hd, k, a->bf16, hd) * a->scale;
    }
    for (int g = 0; g < G; g++) softmax_c(a->sc + (size_t)g * n, n);
    memset(a->out, 0, (size_t)G * hd * sizeof(float));
    for (int j = 0; j < n; j++) {
        const unsigned char *v = kv_at(a, j, a->v_off);
        for (int g = 0; g < G; g++) {
            float p = a->sc[(size_t)g * n + j], *o = a->out + (size_t)g * hd;
            for (int d = 0; d < hd; d++)
                o[d] = fmaf(p, a->bf16 ? eng__bf16_to_f32(((const uint16_t *)(const void *)v)[d])
                                       : ((const float *)(const void *)v)[d], o[d]);
        }
    }
}

#include "simd.h"
#ifdef ENG_X86

EXP16(exp16_512, T512 __attribute__((always_inline)))
SOFTMAX(softmax_512, exp16_512, T512)

T512 static inline __m512 ld16(const unsigned char *p, int bf16, int d)
{
    if (bf16) {
        __m256i h = _mm256_loadu_si256((const __m256i *)(const void *)((const uint16_t *)(const void *)p + d));
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    return _mm512_loadu_ps((const float *)(const void *)p + d);
}

#define MAX_HD16 16 /* head sizes up to 256 */
#define PV_G 8       /* query heads whose output chunk stays in registers at once */

/* F(NG, a, g0, c) for every 16-wide chunk c of the head size and every group
 * of up to PV_G heads from g0, NG a constant (the accumulators' count). */
#define PV_ALL(F, a)                                                                    \
    for (int g0 = 0; g0 < (a)->G; g0 += PV_G) {                                         \
        int ng = (a)->G - g0 < PV_G ? (a)->G - g0 : PV_G;                               \
        for (int c = 0; c < (a)->hd / 16; c++) switch (ng) {                            \
            case 8: F(8, a, g0, c); break;                                              \
            case 7: F(7, a, g0, c); break;                                              \
            case 6: F(6, a, g0, c); break;                                              \
            case 5: F(5, a, g0, c); break;                                              \
            case 4: F(4, a, g0, c); break;                                              \
            case 3: F(3, a, g0, c); break;                                              \
            case 2: F(2, a, g0, c); break;                                              \
            default: F(1, a, g0, c); break;                                             \
            }                                                                           \
    }

/* The reduce16 tree of 16 vectors at once: lane o of the result is the tree
 * sum of a[4 * (o % 4) + o / 4] (the same additions as reduce16_512, in
 * shuffled lanes: halves, then quarters, pairs, neighbours). */
T512 static INL __m512 reduce16x16(const __m512 *a)
{
    __m512 c[8], d[4], e[2];
    for (int p = 0; p < 8; p++)
        c[p] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * p], a[2 * p + 1], 0x44),
                             _mm512_shuffle_f32x4(a[2 * p], a[2 * p + 1], 0xee));
    for (int p = 0; p < 4; p++)
        d[p] = _mm512_add_ps(_mm512_shuffle_f32x4(c[2 * p], c[2 * p + 1], 0x88),
                             _mm512_shuffle_f32x4(c[2 * p], c[2 * p + 1], 0xdd));
    for (int p = 0; p < 2; p++)
        e[p] = _mm512_add_ps(_mm512_shuffle_ps(d[2 * p], d[2 * p + 1], 0x44),
                             _mm512_shuffle_ps(d[2 * p], d[2 * p + 1], 0xee));
    return _mm512_add_ps(_mm512_shuffle_ps(e[0], e[1], 0x88), _mm512_shuffle_ps(e[0], e[1], 0xdd));
}

/* Scores of G heads against 16 positions j0..j0+15: the K rows widened
 * once into kf (16, hd) f32, each head's 16 dot products reduced together. */
T512 static void scores16_512(const eng_cpu_attn *a, int j0, float *kf)
{
    int hd = a->hd, nc = hd / 16;
    for (int i = 0; i < 16; i++) {
        /* slot i holds position j0 + 4 * (i % 4) + i / 4 (reduce16x16's order) */
        const unsigned char *k = kv_at(a, j0 + 4 * (i % 4) + i / 4, a->k_off);
        for (int c = 0; c < nc; c++) _mm512_storeu_ps(kf + (size_t)i * hd + c * 16, ld16(k, a->bf16, c * 16));
    }
    __m512 scale = _mm512_set1_ps(a->scale);
    for (int g = 0; g < a->G; g++) {
        const float *q = a->q + (size_t)g * hd;
        __m512 acc[16];
        for (int i = 0; i < 16; i++) acc[i] = _mm512_setzero_ps();
        for (int c = 0; c < nc; c++) {
            __m512 qv = _mm512_loadu_ps(q + c * 16);
            for (int i = 0; i < 16; i++)
                acc[i] = _mm512_fmadd_ps(qv, _mm512_loadu_ps(kf + (size_t)i * hd + c * 16), acc[i]);
        }
        _mm512_storeu_ps(a->sc + (size_t)g * a->n + j0, _mm512_mul_ps(reduce16x16(acc), scale));
    }
}

/* out[g][d] = fma(p[g][j], v_j[d], out[g][d]) in j order for NG heads from
 * g0 and the 16-wide chunk c of d, the NG accumulators in registers. */
T512 static INL void pv_512(int NG, const eng_cpu_attn *a, int g0, int c)
{
    __m512 acc[PV_G];
#pragma GCC unroll 8
    for (int g = 0; g < NG; g++) acc[g] = _mm512_setzero_ps();
    const float *p = a->sc + (size_t)g0 * a->n;
    for (int j0 = 0; j0 < a->n; j0 += a->B) {
        const unsigned char *v = kv_at(a, j0, a->v_off);
        int rows = a->n - j0 < a->B ? a->n - j0 : a->B;
        for (int r = 0; r < rows; r++, v += a->row_bytes) {
            __m512 vv = ld16(v, a->bf16, c * 16);
#pragma GCC unroll 8
            for (int g = 0; g < NG; g++)
                acc[g] = _mm512_fmadd_ps(_mm512_set1_ps(p[(size_t)g * a->n + j0 + r]), vv, acc[g]);
        }
    }
#pragma GCC unroll 8
    for (int g = 0; g < NG; g++) _mm512_storeu_ps(a->out + (size_t)(g0 + g) * a->hd + c * 16, acc[g]);
}

/* Head sizes that are a multiple of 16 (every common model); others take the
 * portable path.  a->sc must have room for 16 * hd floats past G * n (the
 * widened K rows). */
T512 static void attention_512(const eng_cpu_attn *a)
{
    int G = a->G, hd = a->hd, n = a->n, nc = hd / 16;
    float *kf = a->sc + (size_t)G * n;
    int j = 0;
    for (; j + 16 <= n; j += 16) scores16_512(a, j, kf);
    for (; j < n; j++) {
        const unsigned char *k = kv_at(a, j, a->k_off);
        __m512 kv[MAX_HD16];
        for (int c = 0; c < nc; c++) kv[c] = ld16(k, a->bf16, c * 16);
        for (int g = 0; g < G; g++) {
            const float *q = a->q + (size_t)g * hd;
            __m512 acc = _mm512_setzero_ps();
            for (int c = 0; c < nc; c++) acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + c * 16), kv[c], acc);
            a->sc[(size_t)g * n + j] = reduce16_512(acc) * a->scale;
        }
    }
    for (int g = 0; g < G; g++) softmax_512(a->sc + (size_t)g * n, n);
    PV_ALL(pv_512, a);
}

/* ---- cpu_math fast: bf16 dot products (AVX512-BF16) ----------------------
 *
 * Not the reference (linear.c's fast mode, for attention): q and the softmax
 * weights are rounded to bf16 and multiplied with the bf16 K/V rows by
 * vdpbf16ps, two products per f32 lane, no widening.  Its own fixed
 * contract per token, the same whatever the batch:
 *   qb = bf16(q_g);  s[g][j] = reduce16(sum over 32-element steps of
 *                    vdpbf16ps(qb, k_j)) * scale
 *   p[g][j] = the exact contract's softmax of s;  pb = bf16(p)
 *   out[g][d] = vdpbf16ps over position pairs (j, j+1) in order, lane d:
 *               + pb[g][j+1] v_{j+1}[d] + pb[g][j] v_j[d]  (past n: zero)
 * For bf16 K/V, head sizes a multiple of 32 (up to 256) and an even block
 * size (the pairs never straddle a block); otherwise the exact kernel. */

#define MAX_HD32 8

/* Scores of G heads against 16 positions j0..j0+15, slot order of
 * reduce16x16; qb: (G, hd) bf16. */
TBF16 static void scores16_bh(const eng_cpu_attn *a, int j0, const uint16_t *qb)
{
    int hd = a->hd, nc = hd / 32;
    const unsigned char *k[16];
    for (int i = 0; i < 16; i++) k[i] = kv_at(a, j0 + 4 * (i % 4) + i / 4, a->k_off);
    __m512 scale = _mm512_set1_ps(a->scale);
    for (int g = 0; g < a->G; g++) {
        __m512 acc[16];
        for (int i = 0; i < 16; i++) acc[i] = _mm512_setzero_ps();
        for (int c = 0; c < nc; c++) {
            __m512bh qv = (__m512bh)_mm512_loadu_si512((const void *)(qb + (size_t)g * hd + c * 32));
            for (int i = 0; i < 16; i++)
                acc[i] = _mm512_dpbf16_ps(acc[i], qv, (__m512bh)_mm512_loadu_si512((const void *)(k[i] + c * 64)));
        }
        _mm512_storeu_ps(a->sc + (size_t)g * a->n + j0, _mm512_mul_ps(reduce16x16(acc), scale));
    }
}

/* out chunk c of NG heads from g0: pairs of V rows interleaved (v_j[d],
 * v_{j+1}[d]) against the pair (pb[j], pb[j+1]) broadcast. */
TBF16 static INL void pv_bh(int NG, const eng_cpu_attn *a, int g0, int c)
{
    __m512 acc[PV_G];
#pragma GCC unroll 8
    for (int g = 0; g < NG; g++) acc[g] = _mm512_setzero_ps();
    /* element 2d from the first row's d, 2d + 1 from the second's */
    const __m512i idx = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8,
                                         39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
    int n = a->n;
    for (int j0 = 0; j0 < n; j0 += a->B) {
        const unsigned char *v = kv_at(a, j0, a->v_off) + c * 32;
        int rows = n - j0 < a->B ? n - j0 : a->B;
        for (int r = 0; r < rows; r += 2, v += 2 * a->row_bytes) {
            __m256i r0 = _mm256_loadu_si256((const __m256i *)(const void *)v);
            __m256i r1 = r + 1 < rows ? _mm256_loadu_si256((const __m256i *)(const void *)(v + a->row_bytes))
                                      : _mm256_setzero_si256();
            __m512bh vv = (__m512bh)_mm512_permutex2var_epi16(_mm512_castsi256_si512(r0), idx,
                                                               _mm512_castsi256_si512(r1));
#pragma GCC unroll 8
            for (int g = 0; g < NG; g++) {
                uint32_t pp;
                memcpy(&pp, (const uint16_t *)(const void *)(a->sc + (size_t)(g0 + g) * n) + j0 + r, sizeof pp);
                acc[g] = _mm512_dpbf16_ps(acc[g], (__m512bh)_mm512_set1_epi32((int)pp), vv);
            }
        }
    }
#pragma GCC unroll 8
    for (int g = 0; g < NG; g++) _mm512_storeu_ps(a->out + (size_t)(g0 + g) * a->hd + c * 16, acc[g]);
}

/* n floats to bf16 in place (bf16 element i over the bytes of float i / 2,
 * already read), then a zero at n: the pairs' padding. */
TBF16 static void p_to_bf16(float *r, int n)
{
    uint16_t *o = (uint16_t *)(void *)r;
    int i = 0;
    for (; i + 16 <= n; i += 16)
        _mm256_storeu_si256((__m256i *)(void *)(o + i), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(r + i)));
    if (i < n) {
        __mmask16 m = (__mmask16)((1u << (n - i)) - 1);
        _mm256_mask_storeu_epi16(o + i, m, (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, r + i)));
    }
    o[n] = 0;
}

TBF16 static void attention_bh(const eng_cpu_attn *a)
{
    int G = a->G, hd = a->hd, n = a->n, nc = hd / 32;
    uint16_t *qb = (uint16_t *)(void *)(a->sc + (size_t)G * n);
    for (int i = 0; i < G * hd; i += 16)
        _mm256_storeu_si256((__m256i *)(void *)(qb + i), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(a->q + i)));
    int j = 0;
    for (; j + 16 <= n; j += 16) scores16_bh(a, j, qb);
    for (; j < n; j++) {
        const unsigned char *k = kv_at(a, j, a->k_off);
        for (int g = 0; g < G; g++) {
            __m512 acc = _mm512_setzero_ps();
            for (int c = 0; c < nc; c++)
                acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512((const void *)(qb + (size_t)g * hd + c * 32)),
                                       (__m512bh)_mm512_loadu_si512((const void *)(k + c * 64)));
            a->sc[(size_t)g * n + j] = reduce16_512(acc) * a->scale;
        }
    }
    for (int g = 0; g < G; g++) {
        softmax_512(a->sc + (size_t)g * n, n);
        p_to_bf16(a->sc + (size_t)g * n, n);
    }
    PV_ALL(pv_bh, a);
}
#endif

void eng_cpu_attention(const eng_cpu_attn *a)
{
#ifdef ENG_X86
    if (a->math == ENG_CPU_MATH_FAST && a->bf16 && a->hd % 32 == 0 && a->hd / 32 <= MAX_HD32 && a->B % 2 == 0 &&
        eng_cpu_math_available(ENG_CPU_MATH_FAST)) {
        attention_bh(a);
        return;
    }
    if (eng_cpu_isa() == ENG_ISA_AVX512 && a->hd % 16 == 0 && a->hd / 16 <= MAX_HD16) {
        attention_512(a);
        return;
    }
#endif
    attention_portable(a);
}
