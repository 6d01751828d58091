/*
 * test_cpukern.c — the CPU backend's kernels keep the exactness contract
 * (engine/cpu/linear.c, attn.c):
 *  - eng_cpu_linear gives every element the bits of the contract written out
 *    in portable C (eng_cpu_dot16_ref + bias), whatever M (1, 7, 1000: decode,
 *    a chunk, a prefill — different tiles, the widened-panel path or not),
 *    the thread count (1, 2, 3) and the instruction-set path, for bf16 and f32
 *    weights and K with and without a tail;
 *  - the contract is close to a double-precision product (so a wrong kernel
 *    that is merely consistent fails);
 *  - eng_cpu_attention is bit-identical across paths, does not depend on the
 *    block table's order in memory, and matches a double-precision softmax;
 *  - cpu_math fast (where the CPU has AVX512-BF16): the bf16 dot-product
 *    kernels are batch- and thread-invariant too, really round the
 *    activations (they differ from the exact path), and stay within the
 *    bound of that rounding of a double-precision product; an engine in that
 *    mode still gives chunked prefill the bits of a one-shot prefill, and its
 *    logits stay close to the exact engine's; eng_create rejects an unknown
 *    cpu_math and reports exact where fast cannot run (an f32 model).
 */
#include <check.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "engine_priv.h"
#include "testutil.h"

static uint32_t rng = 1;
static float frand(void)
{
    rng = rng * 1664525u + 1013904223u;
    return (float)(rng >> 8) / 16777216.0f - 0.5f;
}

/* The ISA paths this CPU has, widest last. */
static int n_isas(void)
{
    eng_cpu_isa_set(ENG_ISA_AVX512);
    return eng_cpu_isa() + 1;
}

static void linear_case(int W16, int K, int N, int with_bias)
{
    const int M = 1000;
    float *x = malloc(sizeof(float) * M * K), *ref = malloc(sizeof(float) * M * N);
    float *y = malloc(sizeof(float) * M * N), *wf = malloc(sizeof(float) * N * K), *b = malloc(sizeof(float) * N);
    uint16_t *wh = malloc(sizeof(uint16_t) * N * K);
    ck_assert(x && ref && y && wf && wh && b);
    for (int i = 0; i < M * K; i++) x[i] = frand();
    for (int i = 0; i < N * K; i++) { wh[i] = eng__f32_to_bf16(frand() * 0.2f); wf[i] = frand() * 0.2f; }
    for (int i = 0; i < N; i++) b[i] = frand();
    eng_linear l = { W16 ? NULL : wf, W16 ? wh : NULL, with_bias ? b : NULL, N, K };
    const void *w = W16 ? (const void *)wh : (const void *)wf;

    double maxerr = 0.0, maxref = 0.0;
    for (int m = 0; m < M; m++)
        for (int n = 0; n < N; n++) {
            const void *wr = W16 ? (const void *)(wh + (size_t)n * K) : (const void *)(wf + (size_t)n * K);
            float s = eng_cpu_dot16_ref(x + (size_t)m * K, wr, W16, K);
            ref[(size_t)m * N + n] = with_bias ? s + b[n] : s;
            double d = with_bias ? b[n] : 0.0;
            for (int k = 0; k < K; k++)
                d += (double)x[(size_t)m * K + k] *
                     (W16 ? eng__bf16_to_f32(wh[(size_t)n * K + k]) : wf[(size_t)n * K + k]);
            double e = fabs(d - ref[(size_t)m * N + n]);
            maxerr = e > maxerr ? e : maxerr;
            maxref = fabs(d) > maxref ? fabs(d) : maxref;
        }
    (void)w;
    ck_assert_msg(maxerr <= 1e-5 * maxref + 1e-6, "contract vs double: %g (max %g)", maxerr, maxref);

    for (int isa = 0; isa < n_isas(); isa++) {
        ck_assert_int_eq(eng_cpu_isa_set(isa), ENG_OK);
        for (int th = 1; th <= 3; th++) {
            eng_pool *p;
            ck_assert_int_eq(eng_pool_create(th, &p), ENG_OK);
            /* one shot, M = 1000 */
            memset(y, 0xff, sizeof(float) * M * N);
            eng_cpu_linear(p, &l, x, M, y, ENG_CPU_MATH_EXACT);
            ck_assert_msg(memcmp(y, ref, sizeof(float) * M * N) == 0, "isa %d threads %d W16 %d K %d: M=1000",
                          isa, th, W16, K);
            /* chunks of 7 and single rows (decode) */
            memset(y, 0xff, sizeof(float) * M * N);
            for (int m = 0; m < M;) {
                int c = (m / 7) % 2 ? 1 : 7;
                c = m + c <= M ? c : M - m;
                eng_cpu_linear(p, &l, x + (size_t)m * K, c, y + (size_t)m * N, ENG_CPU_MATH_EXACT);
                m += c;
            }
            ck_assert_msg(memcmp(y, ref, sizeof(float) * M * N) == 0, "isa %d threads %d W16 %d K %d: chunks",
                          isa, th, W16, K);
            eng_pool_free(p);
        }
    }
    eng_cpu_isa_set(ENG_ISA_AVX512);
    free(x); free(ref); free(y); free(wf); free(wh); free(b);
}

START_TEST(linear_bf16_is_batch_thread_and_isa_invariant)
{
    linear_case(1, 896, 70, 1);  /* K a multiple of 16; N not of 4 or 32 */
    linear_case(1, 100, 37, 0);  /* a K tail */
    linear_case(1, 50, 17, 1);   /* the decode path's 32-, 16-wide steps and a tail */
}
END_TEST

START_TEST(linear_f32_is_batch_thread_and_isa_invariant)
{
    linear_case(0, 64, 45, 1);
    linear_case(0, 23, 9, 0);    /* shorter than one 16-lane step */
}
END_TEST

/* Attention over n positions of a shuffled block table; K/V bf16 or f32. */
static void attn_case(int bf16, int G, int hd, int n, int B)
{
    int nb = (n + B - 1) / B, kvd = 2 * hd; /* two K/V heads; we use the second */
    size_t es = bf16 ? 2 : 4, block_bytes = 2 * (size_t)B * kvd * es;
    unsigned char *kv = malloc(block_bytes * nb);
    int *blocks = malloc(sizeof(int) * nb);
    float *q = malloc(sizeof(float) * G * hd), *sc = malloc(sizeof(float) * ENG_CPU_ATTN_SCRATCH(G, n, hd));
    float *out = malloc(sizeof(float) * G * hd), *out0 = malloc(sizeof(float) * G * hd);
    ck_assert(kv && blocks && q && sc && out && out0);
    for (size_t i = 0; i < block_bytes * nb / es; i++) {
        float v = frand() * 4.0f;
        if (bf16) ((uint16_t *)(void *)kv)[i] = eng__f32_to_bf16(v);
        else ((float *)(void *)kv)[i] = v;
    }
    for (int i = 0; i < nb; i++) blocks[i] = nb - 1 - i; /* positions in reverse block order */
    for (int i = 0; i < G * hd; i++) q[i] = frand() * 2.0f;
    eng_cpu_attn a = { q, out, sc, G, hd, n, B, bf16, blocks, kv, block_bytes,
                       (size_t)hd * es, ((size_t)B * kvd + hd) * es, (size_t)kvd * es, 1.0f / sqrtf((float)hd),
                       ENG_CPU_MATH_EXACT };
    for (int isa = 0; isa < n_isas(); isa++) {
        ck_assert_int_eq(eng_cpu_isa_set(isa), ENG_OK);
        memset(out, 0xff, sizeof(float) * G * hd);
        eng_cpu_attention(&a);
        if (isa == 0) memcpy(out0, out, sizeof(float) * G * hd);
        else ck_assert_msg(memcmp(out, out0, sizeof(float) * G * hd) == 0, "attention isa %d differs", isa);
    }
    eng_cpu_isa_set(ENG_ISA_AVX512);
    /* double-precision reference */
    double *s = malloc(sizeof(double) * n), *ref = malloc(sizeof(double) * G * hd);
    ck_assert(s && ref);
    for (int g = 0; g < G; g++) {
        double mx = -INFINITY, sum = 0.0;
        for (int j = 0; j < n; j++) {
            const unsigned char *k = kv + (size_t)blocks[j / B] * block_bytes + a.k_off + (size_t)(j % B) * a.row_bytes;
            double d = 0.0;
            for (int i = 0; i < hd; i++)
                d += (double)q[g * hd + i] * (bf16 ? eng__bf16_to_f32(((const uint16_t *)(const void *)k)[i])
                                                    : ((const float *)(const void *)k)[i]);
            s[j] = d / sqrt((double)hd);
            mx = s[j] > mx ? s[j] : mx;
        }
        for (int j = 0; j < n; j++) { s[j] = exp(s[j] - mx); sum += s[j]; }
        for (int i = 0; i < hd; i++) {
            double o = 0.0;
            for (int j = 0; j < n; j++) {
                const unsigned char *v = kv + (size_t)blocks[j / B] * block_bytes + a.v_off + (size_t)(j % B) * a.row_bytes;
                o += s[j] / sum * (bf16 ? eng__bf16_to_f32(((const uint16_t *)(const void *)v)[i])
                                        : ((const float *)(const void *)v)[i]);
            }
            ck_assert_msg(fabs(o - out0[g * hd + i]) <= 2e-5 * 4.0, "head %d dim %d: %g vs %g", g, i, o,
                          out0[g * hd + i]);
            ref[g * hd + i] = o;
        }
    }
    /* cpu_math fast (bf16 K/V, hd % 32 == 0, even B): q and p rounded to
     * bf16; the same bits twice, not the exact bits, within 0.05 of the
     * double result (|v| <= 2, scores up to about 4: the rounding of q moves a
     * score by up to about 2^-8 of its terms' magnitude) */
    if (bf16 && hd % 32 == 0 && B % 2 == 0 && eng_cpu_math_available(ENG_CPU_MATH_FAST)) {
        float *fo = malloc(sizeof(float) * G * hd);
        ck_assert(fo);
        a.math = ENG_CPU_MATH_FAST;
        a.out = fo;
        eng_cpu_attention(&a);
        memcpy(out, fo, sizeof(float) * G * hd);
        memset(fo, 0xff, sizeof(float) * G * hd);
        eng_cpu_attention(&a);
        ck_assert_msg(memcmp(out, fo, sizeof(float) * G * hd) == 0, "fast attention is not deterministic");
        int same = 0;
        for (int i = 0; i < G * hd; i++) {
            ck_assert_msg(fabs(ref[i] - fo[i]) <= 0.05, "fast attention, element %d: %g vs %g", i, (double)fo[i],
                          ref[i]);
            same += fo[i] == out0[i];
        }
        free(fo);
        ck_assert_msg(n == 1 || same < G * hd / 2, "fast attention equals the exact result in %d of %d", same,
                      G * hd);
    }
    free(s); free(ref); free(kv); free(blocks); free(q); free(sc); free(out); free(out0);
}

START_TEST(attention_is_isa_invariant_and_exact_enough)
{
    attn_case(1, 7, 64, 1, 16);
    attn_case(1, 7, 64, 333, 16);   /* a partial last block, a softmax tail */
    attn_case(0, 2, 128, 100, 32);
    attn_case(1, 1, 40, 77, 16);    /* a head size the vector path does not take */
    attn_case(1, 7, 64, 95, 32);    /* fast: an odd n (a padded pair) */
    attn_case(1, 3, 128, 70, 6);    /* fast: blocks of 6, four 32-element steps */
}
END_TEST

/* cpu_math fast on bf16 weights: invariant over M, chunks and threads; close
 * to the double-precision product of the unrounded x by the bound of bf16
 * rounding of x (2^-9 relative per element); not the exact contract. */
static void linear_fast_case(int K, int N, int with_bias)
{
    const int M = 300;
    float *x = malloc(sizeof(float) * M * K), *ref = malloc(sizeof(float) * M * N);
    float *y = malloc(sizeof(float) * M * N), *ex = malloc(sizeof(float) * M * N), *b = malloc(sizeof(float) * N);
    uint16_t *wh = malloc(sizeof(uint16_t) * N * K);
    ck_assert(x && ref && y && ex && wh && b);
    for (int i = 0; i < M * K; i++) x[i] = frand();
    for (int i = 0; i < N * K; i++) wh[i] = eng__f32_to_bf16(frand() * 0.2f);
    for (int i = 0; i < N; i++) b[i] = frand();
    eng_linear l = { NULL, wh, with_bias ? b : NULL, N, K };
    eng_pool *p1;
    ck_assert_int_eq(eng_pool_create(1, &p1), ENG_OK);
    eng_cpu_linear(p1, &l, x, M, ref, ENG_CPU_MATH_FAST);
    eng_cpu_linear(p1, &l, x, M, ex, ENG_CPU_MATH_EXACT);
    eng_pool_free(p1);
    int differ = 0;
    for (int m = 0; m < M; m++)
        for (int n = 0; n < N; n++) {
            double d = with_bias ? b[n] : 0.0, mag = 0.0;
            for (int k = 0; k < K; k++) {
                double t = (double)x[(size_t)m * K + k] * eng__bf16_to_f32(wh[(size_t)n * K + k]);
                d += t;
                mag += fabs(t);
            }
            float v = ref[(size_t)m * N + n];
            ck_assert_msg(fabs(v - d) <= mag * 0x1p-8 + 1e-5, "fast vs double at (%d, %d): %g vs %g (mag %g)", m, n,
                          (double)v, d, mag);
            differ += v != ex[(size_t)m * N + n];
        }
    ck_assert_msg(differ > M * N / 10, "fast equals exact in %d of %d elements: not the bf16 path", M * N - differ,
                  M * N);
    for (int th = 1; th <= 3; th++) {
        eng_pool *p;
        ck_assert_int_eq(eng_pool_create(th, &p), ENG_OK);
        memset(y, 0xff, sizeof(float) * M * N);
        eng_cpu_linear(p, &l, x, M, y, ENG_CPU_MATH_FAST);
        ck_assert_msg(memcmp(y, ref, sizeof(float) * M * N) == 0, "fast, threads %d K %d: one shot", th, K);
        memset(y, 0xff, sizeof(float) * M * N);
        for (int m = 0; m < M;) {
            int c = (m / 7) % 2 ? 1 : 7 + m % 5;
            c = m + c <= M ? c : M - m;
            eng_cpu_linear(p, &l, x + (size_t)m * K, c, y + (size_t)m * N, ENG_CPU_MATH_FAST);
            m += c;
        }
        ck_assert_msg(memcmp(y, ref, sizeof(float) * M * N) == 0, "fast, threads %d K %d: chunks", th, K);
        eng_pool_free(p);
    }
    free(x); free(ref); free(y); free(ex); free(b); free(wh);
}

START_TEST(linear_fast_is_batch_and_thread_invariant_and_close)
{
    if (!eng_cpu_math_available(ENG_CPU_MATH_FAST)) {
        fprintf(stderr, "cpukern: no AVX512-BF16 here, cpu_math fast not tested\n");
        return;
    }
    linear_fast_case(896, 70, 1);
    linear_fast_case(100, 37, 0); /* a K tail of 4 past three 32-wide steps */
    linear_fast_case(45, 17, 1);  /* one odd masked step after one full step */
}
END_TEST

/* An engine in cpu_math fast: the logits after a 40-token prompt fed in one
 * shot and in chunks of 7 and 1 are bit-identical; against the exact engine
 * they differ, but not by much. */
static float *fast_logits(const eng_model *m, int math, int chunk, const int32_t *toks, int n)
{
    eng_params prm = eng_default_params();
    prm.backend = ENG_BACKEND_CPU;
    prm.cpu_math = math;
    prm.n_threads = 2;
    prm.max_seqs = 1;
    prm.max_ctx = 64;
    prm.max_batch_tokens = 64;
    eng_engine *e;
    char err[256];
    ck_assert_msg(eng_create(m, &prm, &e, err, sizeof err) == ENG_OK, "%s", err);
    ck_assert_int_eq(eng_get_params(e)->cpu_math, math);
    int V = eng_model_get_info(m)->vocab_size, seq;
    float *out = malloc(sizeof(float) * V);
    ck_assert_int_eq(eng_seq_create(e, &seq), ENG_OK);
    for (int off = 0, c = 0; off < n; c++) {
        int len = chunk ? (c % 2 ? 1 : chunk) : n;
        len = len < n - off ? len : n - off;
        eng_batch_item it = { seq, toks + off, len, off + len == n ? out : NULL };
        ck_assert_msg(eng_step(e, &it, 1, err, sizeof err) == ENG_OK, "%s", err);
        off += len;
    }
    eng_free(e);
    return out;
}

START_TEST(engine_fast_math_is_chunk_invariant_and_close)
{
    if (!eng_cpu_math_available(ENG_CPU_MATH_FAST)) return;
    char dir[4096], err[512];
    ck_assert_int_eq(tu_genmodel("cpukern_fast", "--preset tiny --arch qwen2 --levels 3 --dtype bf16 --seed 21", dir,
                                 sizeof dir), 0);
    eng_model *m;
    ck_assert_msg(eng_model_load(dir, &m, err, sizeof err) == ENG_OK, "%s", err);
    int V = eng_model_get_info(m)->vocab_size;
    int32_t toks[40];
    for (int i = 0; i < 40; i++) toks[i] = (i * 37 + 11) % V;
    float *one = fast_logits(m, ENG_CPU_MATH_FAST, 0, toks, 40), *chunked = fast_logits(m, ENG_CPU_MATH_FAST, 7, toks, 40);
    float *exact = fast_logits(m, ENG_CPU_MATH_EXACT, 0, toks, 40);
    ck_assert_msg(memcmp(one, chunked, sizeof(float) * V) == 0, "fast: chunked prefill differs from one shot");
    double maxd = 0.0, maxa = 0.0;
    int differ = 0;
    for (int i = 0; i < V; i++) {
        double d = fabs((double)one[i] - exact[i]);
        maxd = d > maxd ? d : maxd;
        maxa = fabs(exact[i]) > maxa ? fabs(exact[i]) : maxa;
        differ += one[i] != exact[i];
    }
    ck_assert_msg(differ > 0, "fast logits equal the exact ones: the mode did not take effect");
    ck_assert_msg(maxd <= 0.05 * maxa, "fast vs exact logits: max difference %g of max %g", maxd, maxa);
    free(one); free(chunked); free(exact);
    eng_model_free(m);
}
END_TEST

/* The mode in force: an unknown cpu_math is an error; fast resolves to exact
 * for an f32 model and where the CPU lacks AVX512-BF16. */
static int math_in_force(const char *name, const char *args, int math, int *rc)
{
    char dir[4096], err[512];
    ck_assert_int_eq(tu_genmodel(name, args, dir, sizeof dir), 0);
    eng_model *m;
    ck_assert_msg(eng_model_load(dir, &m, err, sizeof err) == ENG_OK, "%s", err);
    eng_params prm = eng_default_params();
    prm.backend = ENG_BACKEND_CPU;
    prm.cpu_math = math;
    prm.max_seqs = 1;
    prm.max_ctx = 16;
    eng_engine *e = NULL;
    *rc = eng_create(m, &prm, &e, err, sizeof err);
    int got = e ? eng_get_params(e)->cpu_math : -1;
    eng_free(e);
    eng_model_free(m);
    return got;
}

START_TEST(engine_cpu_math_in_force)
{
    int rc, v;
    ck_assert_int_eq(eng_cpu_math_parse("fast", &v), ENG_OK);
    ck_assert_int_eq(v, ENG_CPU_MATH_FAST);
    ck_assert_int_eq(eng_cpu_math_parse("exact", &v), ENG_OK);
    ck_assert_int_eq(v, ENG_CPU_MATH_EXACT);
    ck_assert_int_eq(eng_cpu_math_parse("Fast", &v), ENG_EINVAL);
    const char *bf = "--preset tiny --dtype bf16 --seed 22", *f32 = "--preset tiny --dtype f32 --seed 22";
    ck_assert_int_eq(math_in_force("cpukern_m1", bf, 7, &rc), -1);
    ck_assert_int_eq(rc, ENG_EINVAL);
    ck_assert_int_eq(math_in_force("cpukern_m2", f32, ENG_CPU_MATH_FAST, &rc), ENG_CPU_MATH_EXACT);
    ck_assert_int_eq(math_in_force("cpukern_m1", bf, ENG_CPU_MATH_FAST, &rc),
                     eng_cpu_math_available(ENG_CPU_MATH_FAST) ? ENG_CPU_MATH_FAST : ENG_CPU_MATH_EXACT);
    ck_assert_int_eq(math_in_force("cpukern_m1", bf, ENG_CPU_MATH_EXACT, &rc), ENG_CPU_MATH_EXACT);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("cpukern");
    TCase *tc = tcase_create("core");
    tcase_set_timeout(tc, 300);
    tcase_add_test(tc, linear_bf16_is_batch_thread_and_isa_invariant);
    tcase_add_test(tc, linear_f32_is_batch_thread_and_isa_invariant);
    tcase_add_test(tc, attention_is_isa_invariant_and_exact_enough);
    tcase_add_test(tc, linear_fast_is_batch_and_thread_invariant_and_close);
    tcase_add_test(tc, engine_fast_math_is_chunk_invariant_and_close);
    tcase_add_test(tc, engine_cpu_math_in_force);
    suite_add_tcase(s, tc);
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
