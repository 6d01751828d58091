/*
 * test_engine.c — the CPU engine's invariants a server relies on:
 * chunked prefill + decode == one-shot prefill (bit-identical, with f32 and
 * with bf16 K/V), a ragged batch == each sequence alone, export -> import ->
 * continue == an uninterrupted run (whole state and block by block),
 * truncation to a block boundary, forks that share blocks, thread-count
 * independence, and clean refusals (no K/V space, bad ids, corrupt state).
 */
#include <check.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "engine.h"
#include "testutil.h"

#define NPROMPT 100

static eng_model *g_mka3;   /* qwen2, L = 3 router, f32 */
static eng_model *g_mka3h;  /* the same shape in bf16: K/V kept in bf16 */
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
    g_mka3h = load("eng_mka3h", "--preset tiny --arch qwen2 --levels 3 --dtype bf16 --seed 14");
    if (!g_mka3 || !g_plain || !g_mka2 || !g_mka3h) abort();
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
    p.backend = ENG_BACKEND_CPU; /* the reference, also on a machine with a GPU */
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

/* bf16 K/V: a chunk's attention reads its own K/V rounded, as later steps do. */
START_TEST(chunked_equals_one_shot_bf16_kv)
{
    check_chunked(g_mka3h, 1);
    check_chunked(g_mka3h, 0);
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
    const eng_model *m = _i ? g_mka3h : g_mka3; /* f32, bf16 K/V */
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
    const eng_model *m = _i ? g_mka3h : g_mka3;
    int V = eng_model_get_info(m)->vocab_size;
    float *ref = run_alone(m, g_prompt, 60, 1);
    eng_engine *e = mk_engine(m, 1, 1, 0);
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

/* ---- K/V dtype, block records, forks -------------------------------------- */

static int used_blocks(const eng_engine *e)
{
    eng_stats st;
    eng_get_stats(e, &st);
    return st.blocks_used;
}

/* Blocks [first, first + n) of seq as a new buffer of *len bytes. */
static unsigned char *blocks_out(const eng_engine *e, int seq, int first, int n, size_t *len)
{
    eng_block_format f;
    eng_get_block_format(e, &f);
    *len = (size_t)n * f.block_bytes;
    unsigned char *buf = malloc(*len + 1);
    ck_assert_int_eq(eng_seq_blocks_export(e, seq, first, n, buf, *len), ENG_OK);
    return buf;
}

/* A new sequence (with the test bank when asked) holding the first n prompt
 * tokens. */
static int seq_with_prompt(eng_engine *e, int n, int with_bank)
{
    int seq, all[] = { n };
    ck_assert_int_eq(eng_seq_create(e, &seq), ENG_OK);
    if (with_bank) ck_assert_int_eq(eng_seq_set_l3_bank(e, seq, g_bank_n, g_bank), ENG_OK);
    if (n > 0) feed(e, seq, g_prompt, n, all, 1, NULL);
    return seq;
}

static double max_diff(const float *a, const float *b, int n)
{
    double d = 0;
    for (int i = 0; i < n; i++) d = fmax(d, fabs((double)a[i] - b[i]));
    return d;
}

/* A bf16 checkpoint keeps K/V in bf16: half the K/V bytes per block, so about
 * twice the blocks under the same memory cap. */
START_TEST(kv_dtype_and_pool_bytes)
{
    const eng_model_info *mi = eng_model_get_info(g_mka3);
    eng_engine *f = mk_engine(g_mka3, 1, 1, 10), *h = mk_engine(g_mka3h, 1, 1, 10);
    eng_block_format ff, fh;
    eng_stats sf, sh;
    eng_get_block_format(f, &ff);
    eng_get_block_format(h, &fh);
    eng_get_stats(f, &sf);
    eng_get_stats(h, &sh);
    ck_assert_str_eq(sf.kv_dtype, "f32");
    ck_assert_str_eq(sh.kv_dtype, "bf16");
    ck_assert_int_eq(ff.kv_dtype, ENG_KV_F32);
    ck_assert_int_eq(fh.kv_dtype, ENG_KV_BF16);
    ck_assert_int_eq(fh.block_tokens, 32);
    ck_assert_int_eq(fh.kv_dim, mi->n_kv_heads * mi->head_dim);
    size_t kv32 = (size_t)mi->n_layers * 2 * 32 * mi->n_kv_heads * mi->head_dim * 4;
    ck_assert_uint_eq(ff.kv_bytes, kv32);
    ck_assert_uint_eq(fh.kv_bytes, kv32 / 2);
    ck_assert_uint_eq(fh.ema_bytes, (size_t)mi->n_layers * mi->d_model * 4);
    ck_assert_uint_eq(fh.block_bytes, fh.kv_bytes + fh.ema_bytes);
    ck_assert_uint_eq(sf.kv_bytes, 10 * ff.block_bytes);
    ck_assert_uint_eq(sh.kv_bytes, 10 * fh.block_bytes);
    eng_free(f);
    eng_free(h);

    eng_params p = eng_default_params();
    p.backend = ENG_BACKEND_CPU;
    p.n_threads = 1;
    p.max_seqs = 64;
    p.max_ctx = 256;
    p.kv_mem_mb = 1;
    char err[256];
    ck_assert_msg(eng_create(g_mka3, &p, &f, err, sizeof err) == ENG_OK, "%s", err);
    ck_assert_msg(eng_create(g_mka3h, &p, &h, err, sizeof err) == ENG_OK, "%s", err);
    eng_get_stats(f, &sf);
    eng_get_stats(h, &sh);
    ck_assert_int_eq(sf.blocks_total, (int)((1u << 20) / ff.block_bytes));
    ck_assert_int_eq(sh.blocks_total, (int)((1u << 20) / fh.block_bytes));
    ck_assert_int_gt(sh.blocks_total, sf.blocks_total * 3 / 2);
    eng_free(f);
    eng_free(h);
}
END_TEST

/* A turn writes only its new full blocks: the records of the blocks that
 * turn 1 filled do not change in turn 2, and are the whole state's blocks. */
START_TEST(blocks_export_is_incremental)
{
    const eng_model *m = _i ? g_mka3h : g_mka3;
    eng_engine *e = mk_engine(m, 2, 1, 0);
    int a = seq_with_prompt(e, 70, 1), c30[] = { 30 };
    ck_assert_int_eq(eng_seq_n_full_blocks(e, a), 2);
    size_t n1, n2, n3;
    unsigned char *turn1 = blocks_out(e, a, 0, 2, &n1);
    feed(e, a, g_prompt + 70, 30, c30, 1, NULL);
    ck_assert_int_eq(eng_seq_n_full_blocks(e, a), 3);
    unsigned char *turn2 = blocks_out(e, a, 0, 3, &n2);
    unsigned char *fresh = blocks_out(e, a, 2, 1, &n3);
    ck_assert_uint_eq(n2, n1 + n3);
    ck_assert_msg(memcmp(turn1, turn2, n1) == 0, "turn 2 changed the records of turn 1's blocks");
    ck_assert_msg(memcmp(fresh, turn2 + n1, n3) == 0, "block 2 alone differs from block 2 of 0..2");
    ck_assert_msg(memcmp(turn1, fresh, n3) != 0, "blocks 0 and 2 have the same record");

    /* The whole state carries the same records after tokens, EMA and bank. */
    const eng_model_info *mi = eng_model_get_info(m);
    size_t ld = (size_t)mi->n_layers * mi->d_model * sizeof(float);
    size_t n = eng_seq_export_size(e, a);
    unsigned char *whole = malloc(n);
    ck_assert_int_eq(eng_seq_export(e, a, whole, n), ENG_OK);
    ck_assert_msg(memcmp(whole + 80 + 100 * sizeof(int32_t) + ld + (size_t)g_bank_n * ld, turn2, n2) == 0,
                  "the whole state's full blocks are not the block records");

    ck_assert_int_eq(eng_seq_blocks_export(e, a, 2, 2, turn2, n2 + n3), ENG_EINVAL);
    ck_assert_int_eq(eng_seq_blocks_export(e, a, -1, 1, turn2, n2), ENG_EINVAL);
    ck_assert_int_eq(eng_seq_blocks_export(e, a, 0, 3, turn2, n2 - 1), ENG_ERANGE);
    ck_assert_int_eq(eng_seq_blocks_export(e, a + 1, 0, 0, turn2, n2), ENG_EINVAL);
    ck_assert_int_eq(eng_seq_blocks_export(e, a, 3, 0, NULL, 0), ENG_OK);
    free(turn1); free(turn2); free(fresh); free(whole);
    eng_free(e);
}
END_TEST

/* Resume: import the first k blocks of a stored session, prefill the rest;
 * the logits are those of the uninterrupted sequence, bit for bit. */
START_TEST(blocks_import_then_prefill_the_rest)
{
    const eng_model *m = _i ? g_mka3h : g_mka3;
    int V = eng_model_get_info(m)->vocab_size;
    float *ref = run_alone(m, g_prompt, NPROMPT, 1), *out = malloc((size_t)V * 4);
    char err[256];
    eng_engine *e = mk_engine(m, 2, 2, 0);
    int a = seq_with_prompt(e, 70, 1), rest[] = { 5, 31 }, one[] = { 36 };
    size_t len, rec;
    unsigned char *buf = blocks_out(e, a, 0, 2, &len);
    rec = len / 2;

    /* Into a fresh sequence of the same engine. */
    int b = seq_with_prompt(e, 0, 1);
    ck_assert_msg(eng_seq_blocks_import(e, b, g_prompt, 2, buf, len, err, sizeof err) == ENG_OK, "%s", err);
    ck_assert_int_eq(eng_seq_len(e, b), 64);
    ck_assert_int_eq(eng_seq_n_full_blocks(e, b), 2);
    ck_assert_int_eq(memcmp(eng_seq_tokens(e, b), g_prompt, 64 * sizeof(int32_t)), 0);
    feed(e, b, g_prompt + 64, 36, rest, 2, out);
    assert_same(out, ref, V, "blocks import + prefill (same engine)");

    /* Into a new engine with another thread count, as after a restart. */
    eng_engine *e2 = mk_engine(m, 1, 1, 0);
    int c = seq_with_prompt(e2, 0, 1);
    ck_assert_msg(eng_seq_blocks_import(e2, c, g_prompt, 2, buf, len, err, sizeof err) == ENG_OK, "%s", err);
    feed(e2, c, g_prompt + 64, 36, one, 1, out);
    assert_same(out, ref, V, "blocks import + prefill (new engine)");
    eng_free(e2);

    /* One block at a time: an import appends to a sequence ending on a block. */
    e2 = mk_engine(m, 2, 1, 0);
    c = seq_with_prompt(e2, 0, 1);
    ck_assert_msg(eng_seq_blocks_import(e2, c, g_prompt, 1, buf, rec, err, sizeof err) == ENG_OK, "%s", err);
    ck_assert_msg(eng_seq_blocks_import(e2, c, g_prompt + 32, 1, buf + rec, rec, err, sizeof err) == ENG_OK,
                  "%s", err);
    ck_assert_int_eq(eng_seq_len(e2, c), 64);
    feed(e2, c, g_prompt + 64, 36, one, 1, out);
    assert_same(out, ref, V, "two single-block imports + prefill");
    eng_free(e2);
    free(buf); free(out); free(ref);
    eng_free(e);
}
END_TEST

/* The L3 bank is bound by the caller, and it matters. */
START_TEST(blocks_import_needs_the_same_bank)
{
    const eng_model *m = g_mka3;
    int V = eng_model_get_info(m)->vocab_size, one[] = { 36 };
    float *ref = run_alone(m, g_prompt, NPROMPT, 1), *out = malloc((size_t)V * 4);
    char err[256];
    eng_engine *e = mk_engine(m, 2, 3, 0);
    int a = seq_with_prompt(e, 70, 1);
    size_t len;
    unsigned char *buf = blocks_out(e, a, 0, 2, &len);
    int b = seq_with_prompt(e, 0, 0), c = seq_with_prompt(e, 0, 0);
    ck_assert_int_eq(eng_seq_set_l3_bank(e, c, 2, g_bank + 64), ENG_OK); /* another bank */
    ck_assert_msg(eng_seq_blocks_import(e, b, g_prompt, 2, buf, len, err, sizeof err) == ENG_OK, "%s", err);
    ck_assert_msg(eng_seq_blocks_import(e, c, g_prompt, 2, buf, len, err, sizeof err) == ENG_OK, "%s", err);
    feed(e, b, g_prompt + 64, 36, one, 1, out);
    ck_assert_msg(max_diff(out, ref, V) > 1e-3, "no bank: logits within %g of the banked run",
                  max_diff(out, ref, V));
    feed(e, c, g_prompt + 64, 36, one, 1, out);
    ck_assert_msg(max_diff(out, ref, V) > 1e-3, "another bank: logits within %g of the banked run",
                  max_diff(out, ref, V));
    free(buf); free(out); free(ref);
    eng_free(e);
}
END_TEST

START_TEST(blocks_import_refusals)
{
    const eng_model *m = g_mka3;
    int V = eng_model_get_info(m)->vocab_size;
    char err[256];
    eng_engine *e = mk_engine(m, 1, 3, 4); /* 4 blocks */
    int a = seq_with_prompt(e, 70, 0);     /* takes 3 */
    size_t len;
    unsigned char *buf = blocks_out(e, a, 0, 2, &len);
    int b = seq_with_prompt(e, 0, 0);

    err[0] = 0;
    ck_assert_int_eq(eng_seq_blocks_import(e, b, g_prompt, 2, buf, len, err, sizeof err), ENG_ENOSPC);
    ck_assert_msg(strstr(err, "free") != NULL, "%s", err);
    ck_assert_int_eq(eng_seq_blocks_import(e, b, g_prompt, 2, buf, len - 1, err, sizeof err), ENG_EINVAL);
    ck_assert_msg(strstr(err, "bytes") != NULL, "%s", err);
    ck_assert_int_eq(eng_seq_blocks_import(e, b, g_prompt, 1, buf, len, err, sizeof err), ENG_EINVAL);
    ck_assert_int_eq(eng_seq_blocks_import(e, b, NULL, 1, buf, len / 2, err, sizeof err), ENG_EINVAL);
    int32_t bad[32];
    memcpy(bad, g_prompt, sizeof bad);
    bad[17] = V;
    ck_assert_int_eq(eng_seq_blocks_import(e, b, bad, 1, buf, len / 2, err, sizeof err), ENG_EINVAL);
    ck_assert_msg(strstr(err, "out of range") != NULL, "%s", err);
    ck_assert_int_eq(eng_seq_blocks_import(e, a, g_prompt, 1, buf, len / 2, err, sizeof err), ENG_EINVAL);
    ck_assert_msg(strstr(err, "multiple") != NULL, "%s", err);
    ck_assert_int_eq(eng_seq_blocks_import(e, 2, g_prompt, 1, buf, len / 2, err, sizeof err), ENG_EINVAL);
    /* Past max_ctx (256 = 8 blocks), refused before the records are read. */
    size_t big = 9 * (len / 2);
    unsigned char *zeros = calloc(big, 1);
    int32_t *ids = calloc(9 * 32, sizeof(int32_t));
    ck_assert_int_eq(eng_seq_blocks_import(e, b, ids, 9, zeros, big, err, sizeof err), ENG_ERANGE);
    ck_assert_int_eq(eng_seq_len(e, b), 0);
    ck_assert_int_eq(eng_seq_len(e, a), 70);
    ck_assert_int_eq(used_blocks(e), 3);

    /* With room, the same call works, and n_blocks == 0 changes nothing. */
    eng_seq_free(e, a);
    ck_assert_int_eq(eng_seq_blocks_import(e, b, g_prompt, 0, NULL, 0, err, sizeof err), ENG_OK);
    ck_assert_int_eq(used_blocks(e), 0);
    ck_assert_msg(eng_seq_blocks_import(e, b, g_prompt, 2, buf, len, err, sizeof err) == ENG_OK, "%s", err);
    ck_assert_int_eq(used_blocks(e), 2);
    free(buf); free(zeros); free(ids);
    eng_free(e);
}
END_TEST

/* n choices over one prompt: the fork shares the full blocks (the pool grows
 * by the copied partial block at most), takes the bank, and both sequences
 * continue bit-identical to unforked runs, in one ragged step. */
START_TEST(fork_shares_blocks)
{
    const eng_model *m = g_mka3h;
    int V = eng_model_get_info(m)->vocab_size, nf = _i ? 64 : 70;
    eng_engine *e = mk_engine(m, 2, 2, 0);
    int a = seq_with_prompt(e, 70, 1), b;
    ck_assert_int_eq(eng_seq_create(e, &b), ENG_OK); /* no bank of its own */
    int before = used_blocks(e);
    ck_assert_int_eq(eng_seq_fork(e, a, b, nf), ENG_OK);
    ck_assert_int_eq(used_blocks(e), before + (nf % 32 != 0));
    ck_assert_int_eq(eng_seq_len(e, b), nf);
    ck_assert_int_eq(memcmp(eng_seq_tokens(e, b), g_prompt, (size_t)nf * sizeof(int32_t)), 0);

    int32_t alt[NPROMPT];
    memcpy(alt, g_prompt, sizeof alt);
    for (int i = nf; i < NPROMPT; i++) alt[i] = (alt[i] * 7 + 3) % V;
    float *oa = malloc((size_t)V * 4), *ob = malloc((size_t)V * 4);
    eng_batch_item items[2] = { { a, g_prompt + 70, 30, oa }, { b, alt + nf, 30, ob } };
    char err[256];
    ck_assert_msg(eng_step(e, items, 2, err, sizeof err) == ENG_OK, "%s", err);
    float *ra = run_alone(m, g_prompt, 100, 1), *rb = run_alone(m, alt, nf + 30, 1);
    assert_same(oa, ra, V, "forked-from sequence");
    assert_same(ob, rb, V, "forked sequence");
    eng_seq_free(e, a);
    eng_seq_free(e, b);
    ck_assert_int_eq(used_blocks(e), 0);
    free(oa); free(ob); free(ra); free(rb);
    eng_free(e);
}
END_TEST

/* Free and truncate give a shared block back only when its last holder lets
 * go: the survivors continue exactly even after other sequences have reused
 * every block that was given back. */
START_TEST(shared_blocks_outlive_their_first_holder)
{
    const eng_model *m = g_mka3;
    int V = eng_model_get_info(m)->vocab_size;
    eng_engine *e = mk_engine(m, 2, 4, 8);
    int a = seq_with_prompt(e, 96, 1), b, c, d;
    ck_assert_int_eq(eng_seq_create(e, &b), ENG_OK);
    ck_assert_int_eq(eng_seq_create(e, &c), ENG_OK);
    ck_assert_int_eq(eng_seq_fork(e, a, b, 96), ENG_OK);
    ck_assert_int_eq(eng_seq_fork(e, a, c, 64), ENG_OK);
    ck_assert_int_eq(used_blocks(e), 3);
    eng_seq_free(e, a);
    ck_assert_int_eq(used_blocks(e), 3); /* blocks 0, 1: b and c; block 2: b */
    ck_assert_int_eq(eng_seq_truncate(e, b, 32), ENG_OK);
    ck_assert_int_eq(used_blocks(e), 2); /* block 0: b and c; block 1: c */

    /* Scribble over every free block. */
    int32_t junk[128];
    for (int i = 0; i < 128; i++) junk[i] = (g_prompt[i % NPROMPT] + 11) % V;
    int j128[] = { 128 }, c36[] = { 36 }, c18[] = { 18 };
    d = seq_with_prompt(e, 0, 0);
    feed(e, d, junk, 128, j128, 1, NULL);
    ck_assert_int_eq(used_blocks(e), 6);

    float *out = malloc((size_t)V * 4), *ref = run_alone(m, g_prompt, 100, 1);
    feed(e, c, g_prompt + 64, 36, c36, 1, out);
    assert_same(out, ref, V, "fork at 64 after its source was freed");
    ck_assert_int_eq(used_blocks(e), 8);
    eng_seq_free(e, d);
    ck_assert_int_eq(used_blocks(e), 4);
    free(ref);
    ref = run_alone(m, g_prompt, 50, 1);
    feed(e, b, g_prompt + 32, 18, c18, 1, out);
    assert_same(out, ref, V, "fork truncated to 32");
    ck_assert_int_eq(used_blocks(e), 5);
    eng_seq_free(e, b);
    ck_assert_int_eq(used_blocks(e), 4); /* block 0 stays with c */
    eng_seq_free(e, c);
    ck_assert_int_eq(used_blocks(e), 0);
    free(out); free(ref);
    eng_free(e);
}
END_TEST

START_TEST(fork_refusals)
{
    const eng_model *m = g_mka3;
    int V = eng_model_get_info(m)->vocab_size;
    eng_engine *e = mk_engine(m, 1, 3, 3); /* 3 blocks */
    int a = seq_with_prompt(e, 70, 0), b = seq_with_prompt(e, 0, 0);
    ck_assert_int_eq(used_blocks(e), 3);
    ck_assert_int_eq(eng_seq_fork(e, a, b, 70), ENG_ENOSPC); /* the partial block needs one */
    ck_assert_int_eq(eng_seq_fork(e, a, b, 50), ENG_EINVAL); /* no EMA checkpoint at 50 */
    ck_assert_int_eq(eng_seq_fork(e, a, b, 71), ENG_EINVAL);
    ck_assert_int_eq(eng_seq_fork(e, a, a, 64), ENG_EINVAL);
    ck_assert_int_eq(eng_seq_fork(e, a, 2, 64), ENG_EINVAL); /* slot 2 not in use */
    ck_assert_int_eq(eng_seq_len(e, b), 0);
    ck_assert_int_eq(used_blocks(e), 3);
    ck_assert_int_eq(eng_seq_fork(e, a, b, 64), ENG_OK);
    ck_assert_int_eq(eng_seq_fork(e, a, b, 64), ENG_EINVAL); /* b is not empty now */
    ck_assert_int_eq(used_blocks(e), 3);
    /* a still writes into its own partial block. */
    float *out = malloc((size_t)V * 4), *ref = run_alone(m, g_prompt, 71, 0);
    int one[] = { 1 };
    feed(e, a, g_prompt + 70, 1, one, 1, out);
    assert_same(out, ref, V, "source after refused and accepted forks");
    free(out); free(ref);
    eng_free(e);
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
    tcase_add_test(tc, chunked_equals_one_shot_bf16_kv);
    tcase_add_test(tc, l3_bank_changes_the_output);
    tcase_add_loop_test(tc, ragged_batch_equals_alone, 0, 2);
    tcase_add_loop_test(tc, thread_count_does_not_change_results, 0, 2);
    tcase_add_test(tc, kv_dtype_and_pool_bytes);
    tcase_add_loop_test(tc, blocks_export_is_incremental, 0, 2);
    tcase_add_loop_test(tc, blocks_import_then_prefill_the_rest, 0, 2);
    tcase_add_test(tc, blocks_import_needs_the_same_bank);
    tcase_add_test(tc, blocks_import_refusals);
    tcase_add_loop_test(tc, fork_shares_blocks, 0, 2);
    tcase_add_test(tc, shared_blocks_outlive_their_first_holder);
    tcase_add_test(tc, fork_refusals);
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
    eng_model_free(g_mka3h);
    free(g_bank);
    return failed ? 1 : 0;
}
