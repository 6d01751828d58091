/*
 * test_engine.c — the CPU engine's invariants a server relies on:
 * chunked prefill + decode == one-shot prefill (bit-identical, with f32 and
 * with bf16 K/V), a ragged batch == each sequence alone, export -> import ->
 * continue == an uninterrupted run (whole state and block by block),
 * truncation to a block boundary, forks that share blocks, thread-count
 * independence, the same bits from every CPU instruction-set path, clean refusals (no K/V space, bad ids, corrupt state), and
 * L3 memory chunks (eng_step_chunks): layer 0's mean x and the mean
 * embedding against a double-precision recomputation from the weights,
 * bit-identical chunks however the positions were stepped, none for
 * positions restored by import/fork or cut by truncate, the count bound.
 * The other layers' means are checked against the numpy reference by
 * tests/parity_mka.sh.
 */
#include <check.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "engine.h"
#include "internal.h" /* the model's weights, for the independent chunk check */
#include "testutil.h"

#define NPROMPT 100

static eng_model *g_mka3;   /* qwen2, L = 3 router, f32 */
static eng_model *g_mka3h;  /* the same shape in bf16: K/V kept in bf16 */
static eng_model *g_plain;  /* llama, no router */
static eng_model *g_mka2;   /* llama, L = 2 router, GQA */
static eng_model *g_c24;    /* llama, L = 3, bf16, L3 chunks of 24 tokens (64 elsewhere) */
static int32_t g_prompt[NPROMPT];
#define NLONG 250           /* 3 chunks of 64, 10 of 24 */
static int32_t g_long[NLONG], g_long2[NLONG];
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
    g_c24 = load("eng_c24", "--preset tiny --arch llama --levels 3 --dtype bf16 --l3-chunk-tokens 24 --seed 15");
    if (!g_mka3 || !g_plain || !g_mka2 || !g_mka3h || !g_c24) abort();
    const eng_model_info *mi = eng_model_get_info(g_mka3);
    srand(1234);
    for (int i = 0; i < NPROMPT; i++) g_prompt[i] = rand() % mi->vocab_size;
    for (int i = 0; i < NLONG; i++) g_long[i] = rand() % mi->vocab_size;
    for (int i = 0; i < NLONG; i++) g_long2[i] = rand() % mi->vocab_size;
    size_t n = (size_t)g_bank_n * mi->n_layers * mi->d_model;
    g_bank = malloc(n * sizeof(float));
    for (size_t i = 0; i < n; i++) g_bank[i] = (float)rand() / RAND_MAX * 2.0f - 1.0f;
}

static eng_engine *mk_engine_c(const eng_model *m, int threads, int max_seqs, int n_blocks, int capture)
{
    eng_params p = eng_default_params();
    p.backend = ENG_BACKEND_CPU; /* the reference, also on a machine with a GPU */
    p.l3_capture = capture;
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

static eng_engine *mk_engine(const eng_model *m, int threads, int max_seqs, int n_blocks)
{
    return mk_engine_c(m, threads, max_seqs, n_blocks, 0);
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

/* An item may ask for the argmax of its logits instead of (or with) them:
 * the id is the sampler's greedy pick from the same logits, and a sequence
 * that asks for the id alone ends the step in the same state. */
START_TEST(argmax_is_the_greedy_pick)
{
    const eng_model *m = _i ? g_mka3h : g_mka3;
    int V = eng_model_get_info(m)->vocab_size;
    eng_engine *e = mk_engine(m, 2, 2, 0);
    int s0, s1, c40[] = { 40 };
    ck_assert_int_eq(eng_seq_create(e, &s0), ENG_OK);
    ck_assert_int_eq(eng_seq_create(e, &s1), ENG_OK);
    feed(e, s0, g_prompt, 40, c40, 1, NULL);
    feed(e, s1, g_prompt, 40, c40, 1, NULL);
    eng_sampler_params sp = eng_sampler_default_params();
    sp.temperature = 0.0f;
    eng_sampler *smp = NULL;
    ck_assert_int_eq(eng_sampler_create(V, &sp, &smp), ENG_OK);
    float *o0 = malloc((size_t)V * 4), *o1 = malloc((size_t)V * 4);
    int32_t t0 = g_prompt[40], t1 = g_prompt[40], a0 = -1, a1 = -1;
    char err[256];
    for (int step = 0; step < 8; step++) {
        eng_batch_item items[2] = {
            { .seq = s0, .tokens = &t0, .n_tokens = 1, .logits = o0, .argmax = &a0 },
            { .seq = s1, .tokens = &t1, .n_tokens = 1, .argmax = &a1 },
        };
        ck_assert_msg(eng_step(e, items, 2, err, sizeof err) == ENG_OK, "%s", err);
        memcpy(o1, o0, (size_t)V * 4);
        int32_t pick = eng_sampler_sample(smp, o1, NULL, 0);
        ck_assert_int_eq(a0, pick);
        ck_assert_int_eq(a1, pick);
        t0 = t1 = pick;
    }
    ck_assert_int_eq(eng_seq_len(e, s0), 48);
    ck_assert_int_eq(eng_seq_len(e, s1), 48);
    eng_sampler_free(smp);
    free(o0); free(o1);
    eng_free(e);
}
END_TEST

/* The AVX-512, AVX2+FMA and portable kernels (engine/cpu/linear.c, attn.c)
 * give a whole forward pass the same bits: bf16 plain GQA, bf16 L = 3 with
 * a bank, f16 L = 2 GQA. */
START_TEST(isa_paths_give_the_same_logits)
{
    const eng_model *ms[] = { g_plain, g_mka3h, g_mka2 };
    const eng_model *m = ms[_i];
    int V = eng_model_get_info(m)->vocab_size, bank = m == g_mka3h;
    eng_cpu_isa_set(ENG_ISA_AVX512);
    int top = eng_cpu_isa();
    float *ref = run_alone(m, g_prompt, 60, bank);
    for (int isa = ENG_ISA_PORTABLE; isa < top; isa++) {
        ck_assert_int_eq(eng_cpu_isa_set(isa), ENG_OK);
        float *out = run_alone(m, g_prompt, 60, bank);
        assert_same(out, ref, V, eng_cpu_isa_name(isa));
        free(out);
    }
    eng_cpu_isa_set(ENG_ISA_AVX512);
    free(ref);
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

    /* Prefill the first block, import the second ("both" resume: the start
     * recomputed while the end loads), prefill the rest. */
    e2 = mk_engine(m, 2, 1, 0);
    c = seq_with_prompt(e2, 32, 1);
    ck_assert_msg(eng_seq_blocks_import(e2, c, g_prompt + 32, 1, buf + rec, rec, err, sizeof err) == ENG_OK,
                  "%s", err);
    ck_assert_int_eq(eng_seq_len(e2, c), 64);
    feed(e2, c, g_prompt + 64, 36, one, 1, out);
    assert_same(out, ref, V, "prefill a block, import the next + prefill");
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

/* ---- L3 memory chunks ------------------------------------------------------- */

#define MAX_LOG 32

/* The chunks of every step of one engine, copied out as eng_step_chunks
 * gave them (each valid only until the next step). */
typedef struct chunk_log {
    int n, nl, D;
    int seq[MAX_LOG], index[MAX_LOG];
    float *mu;  /* (MAX_LOG, nl, D) */
    float *emb; /* (MAX_LOG, D) */
} chunk_log;

static void log_init(chunk_log *g, const eng_model *m)
{
    const eng_model_info *mi = eng_model_get_info(m);
    g->n = 0;
    g->nl = mi->n_layers;
    g->D = mi->d_model;
    g->mu = malloc((size_t)MAX_LOG * g->nl * g->D * sizeof(float));
    g->emb = malloc((size_t)MAX_LOG * g->D * sizeof(float));
    ck_assert(g->mu && g->emb);
}

static void log_free(chunk_log *g)
{
    free(g->mu);
    free(g->emb);
}

static const float *log_mu(const chunk_log *g, int i) { return g->mu + (size_t)i * g->nl * g->D; }
static const float *log_emb(const chunk_log *g, int i) { return g->emb + (size_t)i * g->D; }

/* Appends the chunks of e's last step. */
static void log_step(chunk_log *g, const eng_engine *e)
{
    const eng_chunk *ch = NULL;
    int n = eng_step_chunks(e, &ch);
    ck_assert_int_ge(n, 0);
    ck_assert(n == 0 ? ch == NULL : ch != NULL);
    for (int i = 0; i < n; i++, g->n++) {
        ck_assert_int_lt(g->n, MAX_LOG);
        g->seq[g->n] = ch[i].seq;
        g->index[g->n] = ch[i].index;
        memcpy(g->mu + (size_t)g->n * g->nl * g->D, ch[i].mu, (size_t)g->nl * g->D * sizeof(float));
        memcpy(g->emb + (size_t)g->n * g->D, ch[i].emb, (size_t)g->D * sizeof(float));
    }
}

/* feed() that logs the chunks of every step. */
static void feed_log(eng_engine *e, int seq, const int32_t *toks, int n, const int *chunks, int n_chunks,
                     chunk_log *g)
{
    char err[256];
    for (int off = 0, c = 0; off < n; c++) {
        int len = chunks[c % n_chunks];
        if (len > n - off) len = n - off;
        eng_batch_item it = { seq, toks + off, len, NULL };
        ck_assert_msg(eng_step(e, &it, 1, err, sizeof err) == ENG_OK, "%s", err);
        log_step(g, e);
        off += len;
    }
}

/* Chunk i of g is, bit for bit, chunk j of ref (same index, mu and emb). */
static int chunk_same(const chunk_log *g, int i, const chunk_log *ref, int j)
{
    return g->index[i] == ref->index[j] &&
           memcmp(log_mu(g, i), log_mu(ref, j), (size_t)g->nl * g->D * sizeof(float)) == 0 &&
           memcmp(log_emb(g, i), log_emb(ref, j), (size_t)g->D * sizeof(float)) == 0;
}

/* g holds exactly the chunks first..last of sequence seq, in order, each
 * bit-identical to ref's chunk of the same index (ref: chunks 0.. of one
 * uninterrupted run). */
static void expect_chunks(const chunk_log *g, int seq, int first, int last, const chunk_log *ref,
                          const char *what)
{
    int k = first;
    for (int i = 0; i < g->n; i++) {
        if (g->seq[i] != seq) continue;
        ck_assert_msg(k <= last, "%s: chunk %d emitted, expected %d..%d", what, g->index[i], first, last);
        ck_assert_msg(g->index[i] == k, "%s: chunk %d emitted where %d was due", what, g->index[i], k);
        ck_assert_int_lt(k, ref->n);
        ck_assert_msg(chunk_same(g, i, ref, k), "%s: chunk %d differs from the uninterrupted run", what, k);
        k++;
    }
    ck_assert_msg(k == last + 1, "%s: chunks %d..%d expected, got up to %d", what, first, last, k - 1);
}

/* Chunks 0.. of one one-shot prefill of toks[0..n) (the reference run). */
static void chunks_one_shot(const eng_model *m, const int32_t *toks, int n, int with_bank, chunk_log *ref)
{
    eng_engine *e = mk_engine_c(m, 2, 1, 0, 1);
    int seq, all[] = { n };
    ck_assert_int_eq(eng_seq_create(e, &seq), ENG_OK);
    if (with_bank) ck_assert_int_eq(eng_seq_set_l3_bank(e, seq, g_bank_n, g_bank), ENG_OK);
    log_init(ref, m);
    feed_log(e, seq, toks, n, all, 1, ref);
    int C = eng_model_get_info(m)->l3_chunk_tokens;
    ck_assert_int_eq(ref->n, n / C);
    for (int i = 0; i < ref->n; i++) {
        ck_assert_int_eq(ref->seq[i], seq);
        ck_assert_int_eq(ref->index[i], i);
    }
    eng_free(e);
}

/* Layer 0's x_t = RMSNorm(embedding of token t) depends on the token alone,
 * so a chunk's mu[0] and emb can be recomputed from the weights (in double,
 * with an RMSNorm written here): means of the right rows, over the right
 * positions, divided by C.  A mean of another tensor (h, the fused input,
 * the MLP's norm), another span or another divisor misses by far more than
 * f32 rounding (1e-5 relative). */
START_TEST(chunk_values_layer0_and_embedding)
{
    const eng_model *m = _i ? g_c24 : g_mka3; /* bf16 / f32 embeddings; C = 24 / 64 */
    const eng_model_info *mi = eng_model_get_info(m);
    const int D = mi->d_model, C = mi->l3_chunk_tokens;
    chunk_log ref;
    chunks_one_shot(m, g_long, NLONG, 1, &ref);
    ck_assert_int_ge(ref.n, 3);
    float *row = malloc((size_t)D * sizeof(float));
    double *want_x = malloc((size_t)D * sizeof(double)), *want_e = malloc((size_t)D * sizeof(double));
    for (int k = 0; k < ref.n; k++) {
        memset(want_x, 0, (size_t)D * sizeof(double));
        memset(want_e, 0, (size_t)D * sizeof(double));
        for (int t = k * C; t < (k + 1) * C; t++) {
            eng__linear_row(&m->embed, g_long[t], row);
            double ss = 0;
            for (int i = 0; i < D; i++) ss += (double)row[i] * row[i];
            double inv = 1.0 / sqrt(ss / D + m->rms_eps);
            for (int i = 0; i < D; i++) {
                want_e[i] += row[i] / (double)C;
                want_x[i] += m->layers[0].attn_norm[i] * (row[i] * inv) / (double)C;
            }
        }
        double dx = 0, de = 0, sx = 0, se = 0;
        for (int i = 0; i < D; i++) {
            dx = fmax(dx, fabs(log_mu(&ref, k)[i] - want_x[i]));
            de = fmax(de, fabs(log_emb(&ref, k)[i] - want_e[i]));
            sx = fmax(sx, fabs(want_x[i]));
            se = fmax(se, fabs(want_e[i]));
        }
        ck_assert_msg(dx <= 1e-5 * sx, "chunk %d: mu[0] off by %g (max |x| %g)", k, dx, sx);
        ck_assert_msg(de <= 1e-5 * se, "chunk %d: emb off by %g (max |e| %g)", k, de, se);
        /* The deeper layers see context: their means are not layer 0's. */
        for (int l = 1; l < mi->n_layers; l++)
            ck_assert_msg(max_diff(log_mu(&ref, k) + (size_t)l * D, log_mu(&ref, k), D) > 1e-3,
                          "chunk %d: layer %d's mean equals layer 0's", k, l);
    }
    free(row); free(want_x); free(want_e);
    log_free(&ref);
}
END_TEST

/* A chunk has the same bits whether its positions came in one step, in
 * chunks of odd sizes, one token per step, or in ragged batches beside
 * other sequences; the capture does not change a logit. */
START_TEST(chunks_do_not_depend_on_stepping)
{
    const eng_model *models[] = { g_mka3, g_mka3h, g_c24, g_plain };
    const eng_model *m = models[_i];
    const int bank = eng_model_get_info(m)->mka_levels == 3;
    const int V = eng_model_get_info(m)->vocab_size, C = eng_model_get_info(m)->l3_chunk_tokens;
    chunk_log ref, ref2;
    chunks_one_shot(m, g_long, NLONG, bank, &ref);
    chunks_one_shot(m, g_long2, 200, 0, &ref2);
    const int patterns[][4] = { { 7, 32, 61, 1 }, { 1, 1, 1, 1 }, { 31, 33, 5, 64 } };
    for (int p = 0; p < 3; p++) {
        eng_engine *e = mk_engine_c(m, 2, 1, 0, 1);
        int seq;
        ck_assert_int_eq(eng_seq_create(e, &seq), ENG_OK);
        if (bank) ck_assert_int_eq(eng_seq_set_l3_bank(e, seq, g_bank_n, g_bank), ENG_OK);
        chunk_log g;
        log_init(&g, m);
        feed_log(e, seq, g_long, NLONG, patterns[p], 4, &g);
        expect_chunks(&g, seq, 0, NLONG / C - 1, &ref, p == 1 ? "one token per step" : "chunked prefill");
        log_free(&g);
        eng_free(e);
    }

    /* Ragged: s0 takes g_long 50 tokens a step, s1 g_long2 40 a step, s2
     * decodes beside them; every step's chunks come in item order. */
    eng_engine *e = mk_engine_c(m, 2, 3, 0, 1);
    int s0, s1, s2;
    ck_assert_int_eq(eng_seq_create(e, &s0), ENG_OK);
    ck_assert_int_eq(eng_seq_create(e, &s1), ENG_OK);
    ck_assert_int_eq(eng_seq_create(e, &s2), ENG_OK);
    if (bank) ck_assert_int_eq(eng_seq_set_l3_bank(e, s0, g_bank_n, g_bank), ENG_OK);
    chunk_log g;
    log_init(&g, m);
    float *o0 = malloc((size_t)V * 4);
    char err[256];
    for (int step = 0; step < 5; step++) {
        eng_batch_item items[3] = {
            { s1, g_long2 + 40 * step, 40, NULL },
            { s0, g_long + 50 * step, 50, step == 4 ? o0 : NULL },
            { s2, g_long2 + step, 1, NULL },
        };
        ck_assert_msg(eng_step(e, items, 3, err, sizeof err) == ENG_OK, "%s", err);
        const eng_chunk *ch;
        int n = eng_step_chunks(e, &ch);
        for (int i = 1; i < n; i++) /* item order: s1's chunks, then s0's */
            ck_assert(!(ch[i - 1].seq == s0 && ch[i].seq == s1));
        log_step(&g, e);
    }
    expect_chunks(&g, s0, 0, NLONG / C - 1, &ref, "ragged batch, s0");
    expect_chunks(&g, s1, 0, 200 / C - 1, &ref2, "ragged batch, s1");
    float *r0 = run_alone(m, g_long, NLONG, bank);
    assert_same(o0, r0, V, "logits with capture vs without");
    free(o0); free(r0);
    log_free(&g);
    eng_free(e);
    log_free(&ref);
    log_free(&ref2);
}
END_TEST

/* Only chunks whose every position this engine computed since the sequence
 * last changed otherwise: C = 24, blocks of 32. */
START_TEST(chunks_only_from_computed_positions)
{
    const eng_model *m = g_c24;
    const int C = 24, last = NLONG / C - 1; /* chunks 0..9 */
    int rest[] = { 5, 31 }, c70[] = { 70 };
    char err[256];
    chunk_log ref;
    chunks_one_shot(m, g_long, NLONG, 1, &ref);
    eng_engine *e = mk_engine_c(m, 2, 4, 0, 1);
    chunk_log g;
    log_init(&g, m);

    /* a: 70 tokens (chunks 0, 1 done; 2 = [48, 72) under way). */
    int a;
    ck_assert_int_eq(eng_seq_create(e, &a), ENG_OK);
    ck_assert_int_eq(eng_seq_set_l3_bank(e, a, g_bank_n, g_bank), ENG_OK);
    feed_log(e, a, g_long, 70, c70, 1, &g);
    expect_chunks(&g, a, 0, 1, &ref, "a, first 70");

    /* Blocks import of positions [0, 64): chunk 2 has imported positions,
     * the next starts at 72. */
    size_t len;
    unsigned char *buf = blocks_out(e, a, 0, 2, &len);
    int b = seq_with_prompt(e, 0, 1);
    g.n = 0;
    ck_assert_msg(eng_seq_blocks_import(e, b, g_long, 2, buf, len, err, sizeof err) == ENG_OK, "%s", err);
    feed_log(e, b, g_long + 64, NLONG - 64, rest, 2, &g);
    expect_chunks(&g, b, 3, last, &ref, "after a blocks import of 64");
    eng_seq_free(e, b);
    free(buf);

    /* Whole state at 70, into another engine. */
    size_t n = eng_seq_export_size(e, a);
    buf = malloc(n);
    ck_assert_int_eq(eng_seq_export(e, a, buf, n), ENG_OK);
    eng_engine *e2 = mk_engine_c(m, 1, 1, 0, 1);
    int c;
    ck_assert_int_eq(eng_seq_create(e2, &c), ENG_OK);
    ck_assert_msg(eng_seq_import(e2, c, buf, n, err, sizeof err) == ENG_OK, "%s", err);
    g.n = 0;
    feed_log(e2, c, g_long + 70, NLONG - 70, rest, 2, &g);
    expect_chunks(&g, c, 3, last, &ref, "after a whole import of 70");
    eng_free(e2);
    free(buf);

    /* Forks at a block boundary (64) and at the whole length (70) start at
     * 72; the source, whose positions were all computed, still completes
     * chunk 2.  One ragged step takes all three to the end. */
    int f64, f70;
    ck_assert_int_eq(eng_seq_create(e, &f64), ENG_OK);
    ck_assert_int_eq(eng_seq_create(e, &f70), ENG_OK);
    ck_assert_int_eq(eng_seq_fork(e, a, f64, 64), ENG_OK);
    ck_assert_int_eq(eng_seq_fork(e, a, f70, 70), ENG_OK);
    eng_batch_item items[3] = {
        { a, g_long + 70, NLONG - 70, NULL },
        { f64, g_long + 64, 6, NULL },
        { f70, g_long + 70, 50, NULL },
    };
    ck_assert_msg(eng_step(e, items, 3, err, sizeof err) == ENG_OK, "%s", err);
    g.n = 0;
    log_step(&g, e);
    expect_chunks(&g, a, 2, last, &ref, "fork source");
    expect_chunks(&g, f64, 0, -1, &ref, "fork at 64 after 6 tokens");
    expect_chunks(&g, f70, 3, 4, &ref, "fork at 70");
    eng_seq_free(e, f64);
    eng_seq_free(e, f70);
    eng_seq_free(e, a);

    /* Truncate: another history from 64 on, cut back to 64 (chunk 2 is cut:
     * its first 16 positions stay, their sum is gone), to 96 = 4 C (the
     * next chunk starts right there), to 32 and to 0. */
    int32_t other[NLONG];
    memcpy(other, g_long, sizeof other);
    for (int i = 64; i < NLONG; i++) other[i] = (other[i] + 7) % eng_model_get_info(m)->vocab_size;
    int t, c90[] = { 90 };
    ck_assert_int_eq(eng_seq_create(e, &t), ENG_OK);
    ck_assert_int_eq(eng_seq_set_l3_bank(e, t, g_bank_n, g_bank), ENG_OK);
    g.n = 0;
    feed_log(e, t, other, 90, c90, 1, &g);
    ck_assert_int_eq(g.n, 3);
    ck_assert_msg(chunk_same(&g, 1, &ref, 1) && !chunk_same(&g, 2, &ref, 2),
                  "chunk 2 of the other history should differ from the real one, chunk 1 not");
    const int cuts[][2] = { { 64, 3 }, { 96, 4 }, { 32, 2 }, { 0, 0 } }; /* length, first chunk */
    for (int k = 0; k < 4; k++) {
        ck_assert_int_eq(eng_seq_truncate(e, t, cuts[k][0]), ENG_OK);
        g.n = 0;
        feed_log(e, t, g_long + cuts[k][0], NLONG - cuts[k][0], rest, 2, &g);
        expect_chunks(&g, t, cuts[k][1], last, &ref, "truncate and replay");
    }
    /* Truncating to the current length changes nothing. */
    ck_assert_int_eq(eng_seq_truncate(e, t, 32), ENG_OK);
    int c20[] = { 20 }, c4[] = { 4 };
    g.n = 0;
    feed_log(e, t, g_long + 32, 20, c20, 1, &g);
    ck_assert_int_eq(eng_seq_truncate(e, t, 52), ENG_OK);
    feed_log(e, t, g_long + 52, 20, c4, 1, &g);
    expect_chunks(&g, t, 2, 2, &ref, "truncate to the current length");
    log_free(&g);
    log_free(&ref);
    eng_free(e);
}
END_TEST

/* One step can complete max_batch_tokens / C + max_seqs chunks (the bound
 * the buffer is sized by): four sequences at position 23 (C = 24), 256
 * tokens between them, each completing n / C + 1. */
START_TEST(chunk_count_bound)
{
    const eng_model *m = g_c24;
    chunk_log ref, g;
    chunks_one_shot(m, g_long, NLONG, 0, &ref);
    eng_engine *e = mk_engine_c(m, 2, 4, 0, 1);
    const int n[4] = { 49, 109, 49, 49 }, want[4] = { 3, 5, 3, 3 };
    int s[4], c23[] = { 23 };
    eng_batch_item items[4];
    log_init(&g, m);
    for (int i = 0; i < 4; i++) {
        ck_assert_int_eq(eng_seq_create(e, &s[i]), ENG_OK);
        feed_log(e, s[i], g_long, 23, c23, 1, &g);
        items[i] = (eng_batch_item){ s[i], g_long + 23, n[i], NULL };
    }
    ck_assert_int_eq(g.n, 0);
    char err[256];
    ck_assert_msg(eng_step(e, items, 4, err, sizeof err) == ENG_OK, "%s", err);
    log_step(&g, e);
    ck_assert_int_eq(g.n, 256 / 24 + 4);
    for (int i = 0, k = 0; i < 4; i++)
        for (int j = 0; j < want[i]; j++, k++) {
            ck_assert_int_eq(g.seq[k], s[i]);
            ck_assert(chunk_same(&g, k, &ref, j));
        }
    /* A refused step leaves no chunks behind. */
    int32_t bad = eng_model_get_info(m)->vocab_size;
    eng_batch_item bi = { s[0], &bad, 1, NULL };
    ck_assert_int_eq(eng_step(e, &bi, 1, err, sizeof err), ENG_EINVAL);
    ck_assert_int_eq(eng_step_chunks(e, NULL), 0);
    log_free(&g);
    log_free(&ref);
    eng_free(e);
}
END_TEST

/* Without l3_capture (the default) nothing is emitted. */
START_TEST(chunks_off_by_default)
{
    eng_params p = eng_default_params();
    ck_assert_int_eq(p.l3_capture, 0);
    eng_engine *e = mk_engine(g_c24, 1, 1, 0);
    ck_assert_int_eq(eng_get_params(e)->l3_capture, 0);
    const eng_chunk *ch = (const eng_chunk *)&p;
    ck_assert_int_eq(eng_step_chunks(e, &ch), 0);
    ck_assert_ptr_null(ch);
    int seq, all[] = { 200 }, one[] = { 1 };
    ck_assert_int_eq(eng_seq_create(e, &seq), ENG_OK);
    chunk_log g;
    log_init(&g, g_c24);
    feed_log(e, seq, g_long, 200, all, 1, &g);
    feed_log(e, seq, g_long + 200, 50, one, 1, &g);
    ck_assert_int_eq(g.n, 0);
    log_free(&g);
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
    tcase_add_loop_test(tc, isa_paths_give_the_same_logits, 0, 3);
    tcase_add_loop_test(tc, argmax_is_the_greedy_pick, 0, 2);
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
    tcase_add_loop_test(tc, chunk_values_layer0_and_embedding, 0, 2);
    tcase_add_loop_test(tc, chunks_do_not_depend_on_stepping, 0, 4);
    tcase_add_test(tc, chunks_only_from_computed_positions);
    tcase_add_test(tc, chunk_count_bound);
    tcase_add_test(tc, chunks_off_by_default);
    suite_add_tcase(s, tc);
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    eng_model_free(g_mka3);
    eng_model_free(g_plain);
    eng_model_free(g_mka2);
    eng_model_free(g_mka3h);
    eng_model_free(g_c24);
    free(g_bank);
    return failed ? 1 : 0;
}
