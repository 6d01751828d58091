/*
 * test_engine.c — the CPU engine's invariants a server relies on:
 * chunked prefill + decode == one-shot prefill (bit-identical), a ragged
 * batch == each sequence alone, export -> import -> continue == an
 * uninterrupted run, truncation to a block boundary, thread-count
 * independence, and clean refusals (no K/V space, bad ids, corrupt state).
 */
#include <check.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "engine.h"
#include "testutil.h"

#define NPROMPT 100

static eng_model *g_mka3;   /* qwen2, L = 3 router */
static eng_model *g_plain;  /* llama, no router */
static eng_model *g_mka2;   /* llama, L = 2 router, GQA */
static int32_t g_prompt[NPROMPT];
static float *g_bank;       /* (R, n_layers, D) */
static int g_bank_n = 5;

static eng_model *load(const char *name, const char *args)
{
    char dir[4096], err[512];
    if (tu_genmodel(name, args, dir, sizeof dir) != 0) return NULL;
    eng_model *m = NULL;
    if (eng_model_load(dir, &m, err, sizeof err) != ENG_OK) {
        fprintf(stderr, "load %s: %s\n", dir, err);
        return NULL;
    }
    return m;
}

static void setup(void)
{
    if (g_mka3) return;
    g_mka3 = load("eng_mka3", "--preset tiny --arch qwen2 --levels 3 --dtype f32 --seed 11");
    g_plain = load("eng_plain", "--preset tiny --arch llama --levels 0 --dtype bf16 --seed 12");
    g_mka2 = load("eng_mka2", "--preset tiny --arch llama --heads 8 --kv-heads 2 --levels 2 --dtype f16 --seed 13");
    if (!g_mka3 || !g_plain || !g_mka2) abort();
    const eng_model_info *mi = eng_model_get_info(g_mka3);
    srand(1234);
    for (int i = 0; i < NPROMPT; i++) g_prompt[i] = rand() % mi->vocab_size;
    size_t n = (size_t)g_bank_n * mi->n_layers * mi->d_model;
    g_bank = malloc(n * sizeof(float));
    for (size_t i = 0; i < n; i++) g_bank[i] = (float)rand() / RAND_MAX * 2.0f - 1.0f;
}

static eng_engine *mk_engine(const eng_model *m, int threads, int max_seqs, int n_blocks)
{
    eng_params p = eng_default_params();
    p.n_threads = threads;
    p.max_seqs = max_seqs;
    p.max_ctx = 256;
    p.max_batch_tokens = 256;
    p.n_blocks = n_blocks;
    eng_engine *e = NULL;
    char err[256];
    ck_assert_msg(eng_create(m, &p, &e, err, sizeof err) == ENG_OK, "%s", err);
    return e;
}

/* Feeds tokens to seq in chunks of the given sizes (cycled); returns logits
 * after the last token in out. */
static void feed(eng_engine *e, int seq, const int32_t *toks, int n, const int *chunks,
                 int n_chunks, float *out)
{
    char err[256];
    for (int off = 0, c = 0; off < n; c++) {
        int len = chunks[c % n_chunks];
        if (len > n - off) len = n - off;
        eng_batch_item it = { seq, toks + off, len, off + len == n ? out : NULL };
        ck_assert_msg(eng_step(e, &it, 1, err, sizeof err) == ENG_OK, "%s", err);
        off += len;
    }
}

static float *run_alone(const eng_model *m, const int32_t *toks, int n, int with_bank)
{
    int V = eng_model_get_info(m)->vocab_size;
    float *out = malloc((size_t)V * sizeof(float));
    eng_engine *e = mk_engine(m, 2, 1, 0);
    int seq;
    ck_assert_int_eq(eng_seq_create(e, &seq), ENG_OK);
    if (with_bank) ck_assert_int_eq(eng_seq_set_l3_bank(e, seq, g_bank_n, g_bank), ENG_OK);
    int one_shot[] = { n };
    feed(e, seq, toks, n, one_shot, 1, out);
    eng_free(e);
    return out;
}

static void assert_same(const float *a, const float *b, int n, const char *what)
{
    int diff = 0;
    for (int i = 0; i < n; i++) diff += a[i] != b[i];
    ck_assert_msg(diff == 0, "%s: %d of %d logits differ (first pair %g vs %g)", what, diff, n,
                  (double)a[0], (double)b[0]);
}

static void check_chunked(const eng_model *m, int with_bank)
{
    int V = eng_model_get_info(m)->vocab_size;
    float *ref = run_alone(m, g_prompt, NPROMPT, with_bank);
    const int patterns[][4] = { { 7, 32, 61, 1 }, { 1, 1, 1, 1 }, { 31, 33, 5, 64 } };
    for (int p = 0; p < 3; p++) {
        eng_engine *e = mk_engine(m, 2, 1, 0);
        int seq;
        ck_assert_int_eq(eng_seq_create(e, &seq), ENG_OK);
        if (with_bank) ck_assert_int_eq(eng_seq_set_l3_bank(e, seq, g_bank_n, g_bank), ENG_OK);
        float *out = malloc((size_t)V * sizeof(float));
        feed(e, seq, g_prompt, NPROMPT, patterns[p], 4, out);
        assert_same(out, ref, V, "chunked vs one-shot");
        ck_assert_int_eq(eng_seq_len(e, seq), NPROMPT);
        free(out);
        eng_free(e);
    }
    free(ref);
}

START_TEST(chunked_equals_one_shot_mka3)
{
    check_chunked(g_mka3, 1);
    check_chunked(g_mka3, 0);
}
END_TEST

START_TEST(chunked_equals_one_shot_mka2_and_plain)
{
    check_chunked(g_mka2, 0);
    check_chunked(g_plain, 0);
}
END_TEST

START_TEST(l3_bank_changes_the_output)
{
    int V = eng_model_get_info(g_mka3)->vocab_size;
    float *a = run_alone(g_mka3, g_prompt, 20, 1), *b = run_alone(g_mka3, g_prompt, 20, 0);
    double d = 0;
    for (int i = 0; i < V; i++) d = fmax(d, fabs(a[i] - b[i]));
    ck_assert_msg(d > 1e-3, "the L3 bank had no effect (max diff %g)", d);
    free(a);
    free(b);
}
END_TEST

START_TEST(ragged_batch_equals_alone)
{
    const eng_model *m = g_mka3;
    int V = eng_model_get_info(m)->vocab_size;
    eng_engine *e = mk_engine(m, 2, 4, 0);
    int s0, s1, s2;
    ck_assert_int_eq(eng_seq_create(e, &s0), ENG_OK);
    ck_assert_int_eq(eng_seq_create(e, &s1), ENG_OK);
    ck_assert_int_eq(eng_seq_create(e, &s2), ENG_OK);
    ck_assert_int_eq(eng_seq_set_l3_bank(e, s1, g_bank_n, g_bank), ENG_OK);
    int c40[] = { 40 }, c10[] = { 10 };
    feed(e, s0, g_prompt, 40, c40, 1, NULL);
    feed(e, s1, g_prompt + 3, 10, c10, 1, NULL);
    float *o0 = malloc((size_t)V * 4), *o1 = malloc((size_t)V * 4), *o2 = malloc((size_t)V * 4);
    /* s0 decodes one token, s1 prefills a 25-token chunk, s2 starts a prompt. */
    eng_batch_item items[3] = {
        { s0, g_prompt + 40, 1, o0 },
        { s1, g_prompt + 13, 25, o1 },
        { s2, g_prompt + 50, 7, o2 },
    };
    char err[256];
    ck_assert_msg(eng_step(e, items, 3, err, sizeof err) == ENG_OK, "%s", err);
    float *r0 = run_alone(m, g_prompt, 41, 0);
    float *r2 = run_alone(m, g_prompt + 50, 7, 0);
    /* s1 alone: prompt[3 .. 38) with the bank. */
    float *r1 = run_alone(m, g_prompt + 3, 35, 1);
    assert_same(o0, r0, V, "decoding sequence in a ragged batch");
    assert_same(o1, r1, V, "prefilling sequence in a ragged batch");
    assert_same(o2, r2, V, "new sequence in a ragged batch");
    free(o0); free(o1); free(o2); free(r0); free(r1); free(r2);
    eng_free(e);
}
END_TEST

START_TEST(thread_count_does_not_change_results)
{
    int V = eng_model_get_info(g_mka3)->vocab_size;
    float *ref = run_alone(g_mka3, g_prompt, 60, 1);
    eng_engine *e = mk_engine(g_mka3, 1, 1, 0);
    int seq, all[] = { 60 };
    ck_assert_int_eq(eng_seq_create(e, &seq), ENG_OK);
    ck_assert_int_eq(eng_seq_set_l3_bank(e, seq, g_bank_n, g_bank), ENG_OK);
    float *out = malloc((size_t)V * 4);
    feed(e, seq, g_prompt, 60, all, 1, out);
    assert_same(out, ref, V, "1 thread vs 2 threads");
    free(out); free(ref);
    eng_free(e);
}
END_TEST

START_TEST(export_import_continue)
{
    const eng_model *m = g_mka3;
    int V = eng_model_get_info(m)->vocab_size;
    float *ref = run_alone(m, g_prompt, NPROMPT, 1);
    eng_engine *e = mk_engine(m, 2, 2, 0);
    int a, b, c70[] = { 70 }, c30[] = { 13, 17 };
    ck_assert_int_eq(eng_seq_create(e, &a), ENG_OK);
    ck_assert_int_eq(eng_seq_set_l3_bank(e, a, g_bank_n, g_bank), ENG_OK);
    feed(e, a, g_prompt, 70, c70, 1, NULL);
    size_t n = eng_seq_export_size(e, a);
    ck_assert(n > 0);
    unsigned char *buf = malloc(n);
    ck_assert_int_eq(eng_seq_export(e, a, buf, n), ENG_OK);
    ck_assert_int_eq(eng_seq_export(e, a, buf, n - 1), ENG_ERANGE);
    eng_seq_free(e, a);

    /* Into a different engine, as after a restart. */
    eng_engine *e2 = mk_engine(m, 2, 2, 0);
    char err[256];
    ck_assert_int_eq(eng_seq_create(e2, &b), ENG_OK);
    ck_assert_msg(eng_seq_import(e2, b, buf, n, err, sizeof err) == ENG_OK, "%s", err);
    ck_assert_int_eq(eng_seq_len(e2, b), 70);
    ck_assert_int_eq(memcmp(eng_seq_tokens(e2, b), g_prompt, 70 * sizeof(int32_t)), 0);
    float *out = malloc((size_t)V * 4);
    feed(e2, b, g_prompt + 70, 30, c30, 2, out);
    assert_same(out, ref, V, "export/import/continue vs uninterrupted");

    /* Corrupt, truncated and foreign states are refused and leave the slot empty. */
    int s;
    ck_assert_int_eq(eng_seq_create(e2, &s), ENG_OK);
    buf[n / 2] ^= 0x40;
    ck_assert_int_eq(eng_seq_import(e2, s, buf, n, err, sizeof err), ENG_EFORMAT);
    ck_assert_msg(strstr(err, "checksum") != NULL, "%s", err);
    buf[n / 2] ^= 0x40;
    ck_assert_int_eq(eng_seq_import(e2, s, buf, n - 4, err, sizeof err), ENG_EFORMAT);
    ck_assert_int_eq(eng_seq_import(e2, s, buf, 10, err, sizeof err), ENG_EFORMAT);
    ck_assert_int_eq(eng_seq_len(e2, s), 0);
    eng_engine *e3 = mk_engine(g_mka2, 1, 1, 0);
    int t;
    ck_assert_int_eq(eng_seq_create(e3, &t), ENG_OK);
    ck_assert_int_eq(eng_seq_import(e3, t, buf, n, err, sizeof err), ENG_EMISMATCH);
    ck_assert_int_eq(eng_seq_len(e3, t), 0);
    free(buf); free(out); free(ref);
    eng_free(e); eng_free(e2); eng_free(e3);
}
END_TEST

START_TEST(truncate_to_block_boundary)
{
    const eng_model *m = g_mka3;
    int V = eng_model_get_info(m)->vocab_size;
    float *ref = run_alone(m, g_prompt, NPROMPT, 0);
    eng_engine *e = mk_engine(m, 2, 1, 0);
    int seq, c[] = { 90 }, rest[] = { 36 };
    ck_assert_int_eq(eng_seq_create(e, &seq), ENG_OK);
    /* A different history after position 64, then cut back to 64. */
    int32_t other[90];
    memcpy(other, g_prompt, sizeof other);
    for (int i = 64; i < 90; i++) other[i] = (other[i] + 7) % V;
    feed(e, seq, other, 90, c, 1, NULL);
    eng_stats st;
    eng_get_stats(e, &st);
    ck_assert_int_eq(st.blocks_used, 3);
    ck_assert_int_eq(eng_seq_truncate(e, seq, 50), ENG_EINVAL); /* not a block boundary */
    ck_assert_int_eq(eng_seq_truncate(e, seq, 64), ENG_OK);
    eng_get_stats(e, &st);
    ck_assert_int_eq(st.blocks_used, 2);
    float *out = malloc((size_t)V * 4);
    feed(e, seq, g_prompt + 64, 36, rest, 1, out);
    assert_same(out, ref, V, "truncate + continue vs uninterrupted");
    free(out); free(ref);
    eng_free(e);
}
END_TEST

START_TEST(refusals_change_nothing)
{
    const eng_model *m = g_mka3;
    int V = eng_model_get_info(m)->vocab_size;
    eng_engine *e = mk_engine(m, 1, 2, 3); /* 3 blocks of 32 */
    int a, b, c[] = { 64 };
    char err[256];
    ck_assert_int_eq(eng_seq_create(e, &a), ENG_OK);
    ck_assert_int_eq(eng_seq_create(e, &b), ENG_OK);
    int x;
    ck_assert_int_eq(eng_seq_create(e, &x), ENG_ENOSPC);
    feed(e, a, g_prompt, 64, c, 1, NULL);
    eng_batch_item big = { b, g_prompt, 40, NULL }; /* needs 2 blocks, 1 free */
    ck_assert_int_eq(eng_step(e, &big, 1, err, sizeof err), ENG_ENOSPC);
    ck_assert_int_eq(eng_seq_len(e, b), 0);
    int32_t bad = V;
    eng_batch_item badid = { b, &bad, 1, NULL };
    ck_assert_int_eq(eng_step(e, &badid, 1, err, sizeof err), ENG_EINVAL);
    ck_assert_msg(strstr(err, "out of range") != NULL, "%s", err);
    eng_batch_item twice[2] = { { a, g_prompt, 1, NULL }, { a, g_prompt, 1, NULL } };
    ck_assert_int_eq(eng_step(e, twice, 2, err, sizeof err), ENG_EINVAL);
    ck_assert_int_eq(eng_seq_len(e, a), 64);
    ck_assert_int_eq(eng_seq_set_l3_bank(e, a, 1, g_bank), ENG_EINVAL); /* not empty */
    eng_seq_free(e, a);
    eng_stats st;
    eng_get_stats(e, &st);
    ck_assert_int_eq(st.blocks_used, 0);
    ck_assert_int_eq(st.seqs_active, 1);
    eng_free(e);
    /* A plain model has no L3 bank. */
    eng_engine *p = mk_engine(g_plain, 1, 1, 0);
    ck_assert_int_eq(eng_seq_create(p, &a), ENG_OK);
    ck_assert_int_eq(eng_seq_set_l3_bank(p, a, 1, g_bank), ENG_EINVAL);
    eng_free(p);
}
END_TEST

int main(void)
{
    setup();
    Suite *s = suite_create("engine");
    TCase *tc = tcase_create("cpu");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, chunked_equals_one_shot_mka3);
    tcase_add_test(tc, chunked_equals_one_shot_mka2_and_plain);
    tcase_add_test(tc, l3_bank_changes_the_output);
    tcase_add_test(tc, ragged_batch_equals_alone);
    tcase_add_test(tc, thread_count_does_not_change_results);
    tcase_add_test(tc, export_import_continue);
    tcase_add_test(tc, truncate_to_block_boundary);
    tcase_add_test(tc, refusals_change_nothing);
    suite_add_tcase(s, tc);
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    eng_model_free(g_mka3);
    eng_model_free(g_plain);
    eng_model_free(g_mka2);
    free(g_bank);
    return failed ? 1 : 0;
}
