/*
 * test_cuda.c — the CUDA backend against the CPU reference backend.
 *
 * Exits 77 (skip) when the CUDA backend cannot run here: built without
 * --with-cuda, or no GPU answers (eng_backend_available).  `test_cuda
 * --available` only answers that question (exit 0 or 77), for the scripts.
 *
 * For every model shape below (random models made by this build's
 * mkad-genmodel, and the bundled trained model) one CPU engine and one CUDA
 * engine get the same prompts (random ids; real text for the trained model;
 * 65..160 tokens, so more than two 32-token K/V blocks each) and:
 *   (a) prefill   logits after a one-shot prefill, relative error
 *                 max|gpu - cpu| / max|cpu| (worst prompt) within TOL;
 *   (b) decode    64 greedy decode steps, all prompts in one batch, both
 *                 engines fed the CPU's tokens (teacher forcing) so that
 *                 every step's logits can be compared (within TOL).  A prompt
 *                 counts as "greedy equal" when the GPU's argmax equalled the
 *                 CPU's at every step, i.e. free-running greedy decoding
 *                 would give identical tokens on both.  Where they differ the
 *                 CPU's own logits must show a near tie: cpu[a_cpu] -
 *                 cpu[a_gpu] <= 2 * TOL * max|cpu| (an error within TOL can
 *                 flip only such a tie; a larger gap is a GPU bug).
 *   (c) chunked   chunked prefill (odd chunk sizes, 1-token chunks) vs the
 *                 one-shot prefill, and a ragged batch (one sequence
 *                 decoding, one prefilling a chunk, two starting) vs each
 *                 sequence alone, all on CUDA (within TOL);
 *   (d) truncate  on CUDA: a different history, cut back to a block boundary
 *                 (eng_seq_truncate), the real prompt replayed -> vs the CPU
 *                 one-shot (within TOL);
 *   (e) export    export on CUDA -> import on CPU -> continue, and CPU ->
 *                 CUDA -> continue, vs the CPU-only run (within TOL);
 *   (f) blocks    the first full blocks exported on CUDA, imported into a
 *                 fresh CUDA sequence (and a CPU one where the block formats
 *                 agree: bf16 models), the rest prefilled; forks on CUDA at
 *                 a block boundary and at the whole length (a partial block
 *                 copied), source and forks continuing; vs the CPU one-shot
 *                 (within TOL), and a fork takes at most one new block.
 *   (g) chunks    both engines capture L3 memory chunks (l3_capture): every
 *                 chunk the GPU emits in (a) one-shot prefill, (b) decode
 *                 (chunks begun in the prefill, finished by decode steps),
 *                 (c) chunked / one-token prefill and the ragged batch, and
 *                 (d) truncate + replay is compared with the CPU's chunk of
 *                 the same prompt and index (the CPU's are the same bits
 *                 however they were stepped): per vector (each layer's mean
 *                 x, the mean embedding) max|gpu - cpu| / max|cpu| within
 *                 TOL; and the GPU emits exactly the chunks the CPU does.
 * One summary line per shape: its rel. errors and greedy equal n/m.
 * Then, per shape, the tensor-core attention against the simple kernel on
 * the same device (fast_vs_simple below): 5000-token contexts, ragged
 * batches, forced key splits.
 *
 * TOL = 2e-2 (CUDA_TOL in the environment overrides it).  Why: the CUDA
 * backend feeds bf16 activations into its GEMMs (8-bit significand, relative
 * rounding 2^-9 ~ 2e-3 per element, accumulated in f32 over dot products of
 * hundreds of terms and over the layers) and keeps K/V in bf16 even for f32
 * models, while the CPU reference computes in f32 (K/V in bf16 only for bf16
 * models).  On these shapes that gives errors of a few 1e-3 relative to the
 * largest logit; 2e-2 leaves headroom without hiding a real bug (a wrong
 * mask, head mapping, RoPE or EMA carry gives errors of 1e-1 and more).
 *
 * Greedy: whether two correct backends decode the same tokens depends on how
 * close the greedy path comes to a tie.  Measured on the CPU (the summary
 * prints the median over prompts of the smallest top-2 gap along the path,
 * relative to max|logit|): untied random models and even the trained
 * mkad-tiny come within ~1e-3 of a tie in 65 steps, which a 3e-3 error flips
 * (a simulation with such noise gave 1/6 .. 6/6 equal prompts), while the
 * tied random models stay ~0.7 away (the current token dominates).  So a
 * majority of equal prompts is required on the tied random models only;
 * everywhere a divergence must be a near tie (gap <= 2 * TOL, which an error
 * within TOL can flip) and n/m is printed.
 *
 * Check runs without fork here (CK_NOFORK): a CUDA context does not survive
 * fork().  TEST_CUDA_ONLY=substring limits the run to matching shapes.
 */
#include <check.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "engine.h"
#include "testutil.h"

#define NPROMPT 6
#define NDECODE 64
#define MAX_CTX 512
#define MAX_LEN 160

typedef struct shape {
    const char *name;
    const char *args; /* mkad-genmodel arguments; NULL: the bundled model (models/mkad-tiny) */
    int bank;         /* L3 bank chunks (levels 3 only; capped at the model's l3_top_r) */
    int majority;     /* require a majority of greedy-equal prompts (tied random
                         models: their greedy choices are far from ties) */
} shape;

/* Odd head counts, GQA 7 (7:1 and 14:2), head_dim 64 and 128 (also != D/H),
 * levels 0/2/3, bf16 and f32 storage, qwen2 (q/k/v bias) and llama (with and
 * without attention bias, tied and untied). */
static const shape SHAPES[] = {
    { "qwen2 H7:1 d64 L3 bf16",
      "--arch qwen2 --hidden 448 --layers 2 --heads 7 --kv-heads 1 --ffn 1024 --vocab 1000 "
      "--levels 3 --dtype bf16 --seed 31", 6, 0 },
    { "llama H14:2 d128 L2 bf16 tied",
      "--arch llama --hidden 512 --layers 2 --heads 14 --kv-heads 2 --head-dim 128 --ffn 1024 "
      "--vocab 777 --levels 2 --dtype bf16 --tied 1 --seed 32", 0, 1 },
    { "qwen2 H5:5 d64 L0 f32",
      "--arch qwen2 --hidden 320 --layers 2 --heads 5 --kv-heads 5 --ffn 640 --vocab 513 "
      "--levels 0 --dtype f32 --seed 33", 0, 0 },
    { "llama H3:1 d128 L3 f32 bias",
      "--arch llama --hidden 384 --layers 3 --heads 3 --kv-heads 1 --ffn 768 --vocab 600 "
      "--levels 3 --dtype f32 --attn-bias 1 --rope-theta 500000 --seed 34", 4, 0 },
    { "llama H7:1 d128 L0 bf16",
      "--arch llama --hidden 896 --layers 2 --heads 7 --kv-heads 1 --ffn 1536 --vocab 1024 "
      "--levels 0 --dtype bf16 --seed 36", 0, 0 },
    { "qwen2.5-0.5b 2 layers L3 bf16",
      "--preset qwen2.5-0.5b --layers 2 --vocab 4096 --max-pos 4096 --levels 3 --dtype bf16 --seed 35", 8, 1 },
    { "mkad-tiny (trained) L3 bf16", NULL, 8, 0 },
};
#define NSHAPES ((int)(sizeof SHAPES / sizeof SHAPES[0]))

static const int PROMPT_LEN[NPROMPT] = { 65, 96, 131, 160, 77, 100 };

/* Prompts for the trained model: real text (Pride and Prejudice, chapter 1;
 * public domain), so that its predictions are as peaked as in use. */
static const char *PASSAGE =
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    "must be in want of a wife. However little known the feelings or views of such a man may be on "
    "his first entering a neighbourhood, this truth is so well fixed in the minds of the surrounding "
    "families, that he is considered the rightful property of some one or other of their daughters. "
    "\"My dear Mr. Bennet,\" said his lady to him one day, \"have you heard that Netherfield Park is "
    "let at last?\" Mr. Bennet replied that he had not. \"But it is,\" returned she; \"for Mrs. Long "
    "has just been here, and she told me all about it.\" Mr. Bennet made no answer. \"Do you not want "
    "to know who has taken it?\" cried his wife impatiently. \"You want to tell me, and I have no "
    "objection to hearing it.\" This was invitation enough. \"Why, my dear, you must know, Mrs. Long "
    "says that Netherfield is taken by a young man of large fortune from the north of England; that "
    "he came down on Monday in a chaise and four to see the place, and was so much delighted with it, "
    "that he agreed with Mr. Morris immediately; that he is to take possession before Michaelmas, and "
    "some of his servants are to be in the house by the end of next week.\" \"What is his name?\" "
    "\"Bingley.\" \"Is he married or single?\" \"Oh! Single, my dear, to be sure! A single man of "
    "large fortune; four or five thousand a year. What a fine thing for our girls!\"";

static double g_tol = 2e-2;
static int g_shapes_run, g_shapes_failed;

/* ---- helpers ----------------------------------------------------------------- */

static uint64_t rng_next(uint64_t *s)
{
    uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static float rng_uniform(uint64_t *s) /* [-1, 1) */
{
    return (float)((double)(rng_next(s) >> 11) * 0x1.0p-53 * 2.0 - 1.0);
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

static double rel_err(const float *got, const float *ref, int n)
{
    double scale = 0, d = 0;
    for (int i = 0; i < n; i++) {
        double a = fabs((double)ref[i]);
        if (a > scale) scale = a;
        double x = fabs((double)got[i] - (double)ref[i]);
        if (isnan(x)) return INFINITY; /* a NaN fails every check (and survives fmax) */
        if (x > d) d = x;
    }
    return d / (scale > 0 ? scale : 1.0);
}

static double max_abs(const float *x, int n)
{
    double m = 0;
    for (int i = 0; i < n; i++) m = fmax(m, fabs((double)x[i]));
    return m;
}

static int argmax(const float *x, int n)
{
    int b = 0;
    for (int i = 1; i < n; i++)
        if (x[i] > x[b]) b = i;
    return b;
}

/* (top-1 - top-2) / max|x|: how far the argmax is from a tie. */
static double top2_gap(const float *x, int n)
{
    int a = argmax(x, n), b = a == 0 ? 1 : 0;
    for (int i = 0; i < n; i++)
        if (i != a && x[i] > x[b]) b = i;
    return ((double)x[a] - (double)x[b]) / fmax(max_abs(x, n), 1e-30);
}

static eng_engine *mk(const eng_model *m, int backend, int max_seqs, int capture)
{
    eng_params p = eng_default_params();
    p.backend = backend;
    p.l3_capture = capture;
    p.max_seqs = max_seqs;
    p.max_ctx = MAX_CTX;
    p.max_batch_tokens = 512;
    p.kv_mem_mb = 1024;
    eng_engine *e = NULL;
    char err[512];
    int rc = eng_create(m, &p, &e, err, sizeof err);
    ck_assert_msg(rc == ENG_OK, "eng_create(%s): %s (%s)", backend == ENG_BACKEND_CUDA ? "cuda" : "cpu",
                  err, eng_strerror(rc));
    return e;
}

static void step1(eng_engine *e, int seq, const int32_t *toks, int n, float *out)
{
    char err[512];
    eng_batch_item it = { seq, toks, n, out };
    int rc = eng_step(e, &it, 1, err, sizeof err);
    ck_assert_msg(rc == ENG_OK, "eng_step(%s, %d tokens): %s", eng_backend_name(e), n, err);
}

/* Feeds n tokens in chunks (sizes cycled); logits after the last into out. */
static void feed(eng_engine *e, int seq, const int32_t *toks, int n, const int *chunks, int n_chunks,
                 float *out)
{
    for (int off = 0, c = 0; off < n; c++) {
        int len = chunks[c % n_chunks];
        if (len > n - off) len = n - off;
        step1(e, seq, toks + off, len, off + len == n ? out : NULL);
        off += len;
    }
}

static int new_seq(eng_engine *e, int bank_n, const float *bank)
{
    int s;
    ck_assert_int_eq(eng_seq_create(e, &s), ENG_OK);
    if (bank_n > 0) ck_assert_int_eq(eng_seq_set_l3_bank(e, s, bank_n, bank), ENG_OK);
    return s;
}

/* A fresh sequence, n tokens in one step: its logits into out. */
static void alone(eng_engine *e, const int32_t *toks, int n, int bank_n, const float *bank, float *out)
{
    int s = new_seq(e, bank_n, bank);
    step1(e, s, toks, n, out);
    eng_seq_free(e, s);
}

/* Moves the state of seq in `from` into a new sequence of `to`. */
static int transfer(eng_engine *from, int seq, eng_engine *to)
{
    size_t n = eng_seq_export_size(from, seq);
    ck_assert_msg(n > 0, "eng_seq_export_size(%s) = 0", eng_backend_name(from));
    void *buf = malloc(n);
    ck_assert_ptr_nonnull(buf);
    int rc = eng_seq_export(from, seq, buf, n);
    ck_assert_msg(rc == ENG_OK, "eng_seq_export(%s): %s", eng_backend_name(from), eng_strerror(rc));
    int s;
    char err[512];
    ck_assert_int_eq(eng_seq_create(to, &s), ENG_OK);
    rc = eng_seq_import(to, s, buf, n, err, sizeof err);
    ck_assert_msg(rc == ENG_OK, "eng_seq_import %s -> %s: %s", eng_backend_name(from), eng_backend_name(to), err);
    ck_assert_int_eq(eng_seq_len(to, s), eng_seq_len(from, seq));
    ck_assert_int_eq(memcmp(eng_seq_tokens(to, s), eng_seq_tokens(from, seq),
                            (size_t)eng_seq_len(from, seq) * sizeof(int32_t)), 0);
    free(buf);
    return s;
}

/* Collects failed checks of one shape; they are reported together at the end
 * so that the summary line shows every number. */
typedef struct verdict {
    char msg[4096];
    size_t len;
} verdict;

static void expect(verdict *v, int ok, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void expect(verdict *v, int ok, const char *fmt, ...)
{
    if (ok || v->len >= sizeof v->msg - 1) return;
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(v->msg + v->len, sizeof v->msg - v->len, fmt, ap);
    va_end(ap);
    if (n > 0) v->len += (size_t)n;
    if (v->len >= sizeof v->msg) v->len = sizeof v->msg - 1;
    if (v->len < sizeof v->msg - 2) {
        v->msg[v->len++] = ';';
        v->msg[v->len++] = ' ';
        v->msg[v->len] = '\0';
    }
}

/* ---- L3 memory chunks ---------------------------------------------------------
 * The CPU's chunks of one prompt, by index: ref (n_ref, n_layers + 1, D),
 * each the per-layer means of x, then the mean embedding. */
typedef struct chunk_ref {
    float *v;
    int n_ref, L, D;
    int *have; /* (n_ref) 1 once chunk k was saved */
} chunk_ref;

/* Chunks a sequence emits while eng_step computes its positions [from, to)
 * (every earlier position restored or cut): those wholly inside, starting
 * at a multiple of C at or after from. */
static int chunks_within(int from, int to, int C)
{
    int k0 = (from + C - 1) / C, k1 = to / C;
    return k1 > k0 ? k1 - k0 : 0;
}

/* Saves the chunks of sequence seq from e's last step into r. */
static void chunks_save(const eng_engine *e, int seq, chunk_ref *r)
{
    const eng_chunk *ch;
    int n = eng_step_chunks(e, &ch);
    const size_t per = (size_t)(r->L + 1) * r->D;
    for (int i = 0; i < n; i++) {
        if (ch[i].seq != seq) continue;
        ck_assert_msg(ch[i].index >= 0 && ch[i].index < r->n_ref, "cpu chunk %d outside 0..%d", ch[i].index,
                      r->n_ref - 1);
        float *dst = r->v + (size_t)ch[i].index * per;
        memcpy(dst, ch[i].mu, (size_t)r->L * r->D * sizeof(float));
        memcpy(dst + (size_t)r->L * r->D, ch[i].emb, (size_t)r->D * sizeof(float));
        r->have[ch[i].index] = 1;
    }
}

/* What a check of GPU chunks found: chunks seen, the worst rel. error. */
typedef struct chunk_tally {
    int seen;
    double err;
    verdict *v;
    const char *what;
} chunk_tally;

/* Compares the chunks of sequence seq from e's last step (the GPU) with the
 * CPU's chunks r of the same indices: per vector max|gpu - cpu| / max|cpu|. */
static void chunks_check(const eng_engine *e, int seq, const chunk_ref *r, chunk_tally *t)
{
    const eng_chunk *ch;
    int n = eng_step_chunks(e, &ch);
    for (int i = 0; i < n; i++) {
        if (ch[i].seq != seq) continue;
        t->seen++;
        const int k = ch[i].index;
        if (k < 0 || k >= r->n_ref || !r->have[k]) {
            expect(t->v, 0, "(g) %s: cuda emitted chunk %d, the cpu did not", t->what, k);
            continue;
        }
        const float *c = r->v + (size_t)k * (r->L + 1) * r->D;
        for (int l = 0; l <= r->L; l++)
            t->err = fmax(t->err, rel_err(l < r->L ? ch[i].mu + (size_t)l * r->D : ch[i].emb,
                                          c + (size_t)l * r->D, r->D));
    }
}

/* feed(), checking the GPU chunks of every step against r. */
static void feed_chk(eng_engine *e, int seq, const int32_t *toks, int n, const int *chunks, int n_chunks,
                     float *out, const chunk_ref *r, chunk_tally *t)
{
    for (int off = 0, c = 0; off < n; c++) {
        int len = chunks[c % n_chunks];
        if (len > n - off) len = n - off;
        step1(e, seq, toks + off, len, off + len == n ? out : NULL);
        chunks_check(e, seq, r, t);
        off += len;
    }
}

static eng_model *load_shape(const shape *sh, int idx)
{
    char dir[4096], err[512];
    if (sh->args) {
        char name[64];
        snprintf(name, sizeof name, "cuda_shape%d", idx);
        ck_assert_msg(tu_genmodel(name, sh->args, dir, sizeof dir) == 0, "mkad-genmodel %s failed", sh->args);
    } else {
        const char *src = getenv("top_srcdir");
        snprintf(dir, sizeof dir, "%s/models/mkad-tiny", src ? src : ".");
    }
    eng_model *m = NULL;
    int rc = eng_model_load(dir, &m, err, sizeof err);
    ck_assert_msg(rc == ENG_OK, "load %s: %s", dir, err);
    return m;
}

/* ---- the test, once per shape -------------------------------------------------- */

START_TEST(cuda_vs_cpu)
{
    const shape *sh = &SHAPES[_i];
    const char *only = getenv("TEST_CUDA_ONLY");
    if (only && *only && !strstr(sh->name, only)) return;
    double t0 = now_s();
    g_shapes_run++;
    g_shapes_failed++; /* undone at the end when every check passed */

    eng_model *m = load_shape(sh, _i);
    const eng_model_info *mi = eng_model_get_info(m);
    const int V = mi->vocab_size, L = mi->n_layers, D = mi->d_model;
    const double tol = g_tol;
    uint64_t rs = 0x5eed0000ull + (uint64_t)_i;
    verdict v = { .msg = "", .len = 0 };
    char err[512];

    /* Prompts, and one L3 bank per prompt (levels 3). */
    int bank_n = 0;
    if (mi->mka_levels == 3) bank_n = sh->bank < mi->l3_top_r ? sh->bank : mi->l3_top_r;
    int32_t *prompt[NPROMPT];
    float *bank[NPROMPT];
    int32_t *text_ids = NULL;
    size_t n_text = 0;
    if (!sh->args) { /* the trained model: prompts from its tokenizer */
        eng_tok *tok = NULL;
        const char *src = getenv("top_srcdir");
        char dir[4096];
        snprintf(dir, sizeof dir, "%s/models/mkad-tiny", src ? src : ".");
        ck_assert_msg(eng_tok_load(dir, &tok, err, sizeof err) == ENG_OK, "tokenizer: %s", err);
        ck_assert_int_eq(eng_tok_encode(tok, PASSAGE, strlen(PASSAGE), 0, &text_ids, &n_text, err, sizeof err),
                         ENG_OK);
        ck_assert_msg(n_text >= 64, "the passage gave only %zu tokens", n_text);
        eng_tok_free(tok);
    }
    for (int p = 0; p < NPROMPT; p++) {
        prompt[p] = malloc(MAX_LEN * sizeof(int32_t));
        ck_assert_ptr_nonnull(prompt[p]);
        for (int i = 0; i < MAX_LEN; i++)
            prompt[p][i] = text_ids ? text_ids[((size_t)p * 13 + (size_t)i) % n_text]
                                    : (int32_t)(rng_next(&rs) % (uint64_t)V);
        bank[p] = NULL;
        if (bank_n > 0) {
            size_t n = (size_t)bank_n * L * D;
            bank[p] = malloc(n * sizeof(float));
            ck_assert_ptr_nonnull(bank[p]);
            for (size_t i = 0; i < n; i++) bank[p][i] = rng_uniform(&rs);
        }
    }

    eng_engine *cpu = mk(m, ENG_BACKEND_CPU, NPROMPT + 4, 1);
    eng_engine *gpu = mk(m, ENG_BACKEND_CUDA, NPROMPT + 4, 1);
    ck_assert_str_eq(eng_backend_name(cpu), "cpu");
    ck_assert_str_eq(eng_backend_name(gpu), "cuda");
    ck_assert_int_eq(eng_get_params(gpu)->backend, ENG_BACKEND_CUDA);
    eng_stats st;
    eng_get_stats(gpu, &st);
    ck_assert_msg(st.kv_dtype && !strcmp(st.kv_dtype, "bf16"), "CUDA kv_dtype %s, expected bf16",
                  st.kv_dtype ? st.kv_dtype : "(null)");

    float *lc = malloc((size_t)NPROMPT * V * sizeof(float)); /* CPU logits, per prompt */
    float *lg = malloc((size_t)NPROMPT * V * sizeof(float)); /* GPU logits */
    float *cpu_one = malloc((size_t)NPROMPT * V * sizeof(float)); /* CPU one-shot prefill logits */
    float *gpu_one = malloc((size_t)NPROMPT * V * sizeof(float)); /* GPU one-shot prefill logits */
    float *tmp = malloc((size_t)V * sizeof(float));
    float *tmp2 = malloc((size_t)V * sizeof(float));
    ck_assert(lc && lg && cpu_one && gpu_one && tmp && tmp2);

    /* (g) The CPU's memory chunks of each prompt, saved as the CPU emits
     * them (prefill, then decode), and the tallies of the GPU's. */
    const int C = mi->l3_chunk_tokens;
    chunk_ref cref[NPROMPT];
    int cpu_chunks_want = 0, gpu_chunks_want = 0;
    for (int p = 0; p < NPROMPT; p++) {
        cref[p].L = L;
        cref[p].D = D;
        cref[p].n_ref = (PROMPT_LEN[p] + NDECODE) / C;
        cref[p].v = calloc((size_t)(cref[p].n_ref + 1) * (L + 1) * D, sizeof(float));
        cref[p].have = calloc((size_t)cref[p].n_ref + 1, sizeof(int));
        ck_assert(cref[p].v && cref[p].have);
        cpu_chunks_want += cref[p].n_ref;
    }
    chunk_tally tg1 = { 0, 0.0, &v, "prefill and decode" }, tg2 = { 0, 0.0, &v, "chunked, ragged, truncate" };

    /* (a) one-shot prefill. */
    int sc[NPROMPT], sg[NPROMPT];
    double err_a = 0;
    for (int p = 0; p < NPROMPT; p++) {
        sc[p] = new_seq(cpu, bank_n, bank[p]);
        sg[p] = new_seq(gpu, bank_n, bank[p]);
        step1(cpu, sc[p], prompt[p], PROMPT_LEN[p], cpu_one + (size_t)p * V);
        step1(gpu, sg[p], prompt[p], PROMPT_LEN[p], gpu_one + (size_t)p * V);
        chunks_save(cpu, sc[p], &cref[p]);
        chunks_check(gpu, sg[p], &cref[p], &tg1);
        err_a = fmax(err_a, rel_err(gpu_one + (size_t)p * V, cpu_one + (size_t)p * V, V));
    }
    expect(&v, err_a <= tol, "(a) prefill rel err %.3e > %.0e", err_a, tol);

    /* (b) 64 decode steps, all prompts in one batch, teacher-forced by the CPU. */
    double err_b = 0, worst_gap = 0, min_gap[NPROMPT];
    int equal = 0, diverged[NPROMPT] = { 0 }, bad_flip = 0;
    for (int p = 0; p < NPROMPT; p++) min_gap[p] = INFINITY;
    memcpy(lc, cpu_one, (size_t)NPROMPT * V * sizeof(float));
    memcpy(lg, gpu_one, (size_t)NPROMPT * V * sizeof(float));
    int32_t next[NPROMPT], amc[NPROMPT], amg[NPROMPT];
    int am_bad = 0;
    eng_batch_item ic[NPROMPT], ig[NPROMPT];
    for (int t = 0; t <= NDECODE; t++) {
        for (int p = 0; p < NPROMPT; p++) {
            const float *c = lc + (size_t)p * V, *g = lg + (size_t)p * V;
            int ac = argmax(c, V), ag = argmax(g, V);
            if (t > 0) err_b = fmax(err_b, rel_err(g, c, V));
            if (!diverged[p]) min_gap[p] = fmin(min_gap[p], top2_gap(c, V));
            if (ac != ag && !diverged[p]) {
                diverged[p] = t + 1;
                double gap = ((double)c[ac] - (double)c[ag]) / fmax(max_abs(c, V), 1e-30);
                worst_gap = fmax(worst_gap, gap);
                if (gap > 2 * tol) bad_flip++;
            }
            next[p] = ac;
        }
        if (t == NDECODE) break;
        for (int p = 0; p < NPROMPT; p++) {
            ic[p] = (eng_batch_item){ sc[p], &next[p], 1, lc + (size_t)p * V, &amc[p] };
            ig[p] = (eng_batch_item){ sg[p], &next[p], 1, lg + (size_t)p * V, &amg[p] };
        }
        ck_assert_msg(eng_step(cpu, ic, NPROMPT, err, sizeof err) == ENG_OK, "cpu decode: %s", err);
        ck_assert_msg(eng_step(gpu, ig, NPROMPT, err, sizeof err) == ENG_OK, "cuda decode: %s", err);
        /* The argmax each backend returns is the greedy pick of the logits it
         * returns (the CUDA one computed on the device). */
        for (int p = 0; p < NPROMPT; p++)
            am_bad += amc[p] != argmax(lc + (size_t)p * V, V) || amg[p] != argmax(lg + (size_t)p * V, V);
        for (int p = 0; p < NPROMPT; p++) {
            chunks_save(cpu, sc[p], &cref[p]);
            chunks_check(gpu, sg[p], &cref[p], &tg1);
        }
    }
    expect(&v, am_bad == 0, "(b) %d argmax ids differ from the argmax of the returned logits", am_bad);
    /* One more step asking the GPU for the ids alone (no logits copied out):
     * the CPU's pick, except where the CPU's top-2 gap is a near tie. */
    for (int p = 0; p < NPROMPT; p++) {
        ic[p] = (eng_batch_item){ sc[p], &next[p], 1, lc + (size_t)p * V, &amc[p] };
        ig[p] = (eng_batch_item){ .seq = sg[p], .tokens = &next[p], .n_tokens = 1, .argmax = &amg[p] };
    }
    ck_assert_msg(eng_step(cpu, ic, NPROMPT, err, sizeof err) == ENG_OK, "cpu decode: %s", err);
    ck_assert_msg(eng_step(gpu, ig, NPROMPT, err, sizeof err) == ENG_OK, "cuda decode: %s", err);
    int am_far = 0;
    for (int p = 0; p < NPROMPT; p++)
        am_far += !diverged[p] && amg[p] != amc[p] && top2_gap(lc + (size_t)p * V, V) > 2 * tol;
    expect(&v, am_far == 0, "(b) %d ids-only argmax(es) differ from the CPU's away from a near tie", am_far);
    int cpu_chunks = 0;
    for (int p = 0; p < NPROMPT; p++)
        for (int k = 0; k < cref[p].n_ref; k++) cpu_chunks += cref[p].have[k];
    expect(&v, cpu_chunks == cpu_chunks_want, "(g) the cpu emitted %d memory chunks in prefill and decode, "
           "%d expected", cpu_chunks, cpu_chunks_want);
    expect(&v, tg1.seen == cpu_chunks, "(g) cuda emitted %d memory chunks in prefill and decode, the cpu %d",
           tg1.seen, cpu_chunks);
    /* The smallest top-2 gap along each prompt's greedy path (up to its
     * divergence): below the error a backend may make, a flip is expected. */
    int sorted_gap_n = 0;
    double gaps[NPROMPT];
    for (int p = 0; p < NPROMPT; p++) {
        equal += !diverged[p];
        gaps[sorted_gap_n++] = min_gap[p];
    }
    for (int i = 1; i < sorted_gap_n; i++)
        for (int j = i; j > 0 && gaps[j] < gaps[j - 1]; j--) {
            double x = gaps[j]; gaps[j] = gaps[j - 1]; gaps[j - 1] = x;
        }
    double median_gap = gaps[sorted_gap_n / 2];
    expect(&v, err_b <= tol, "(b) decode rel err %.3e > %.0e", err_b, tol);
    expect(&v, bad_flip == 0, "(b) %d greedy divergence(s) where the CPU's top-2 gap was %.3e of max|logit| "
           "(> 2*tol: not a near tie)", bad_flip, worst_gap);
    if (sh->majority)
        expect(&v, 2 * equal > NPROMPT, "(b) greedy equal on only %d of %d prompts", equal, NPROMPT);
    for (int p = 0; p < NPROMPT; p++) {
        eng_seq_free(cpu, sc[p]);
        eng_seq_free(gpu, sg[p]);
    }

    /* (c) chunked prefill vs one-shot, on CUDA. */
    double err_c = 0;
    {
        const int pats[][5] = { { 7, 32, 61, 1, 3 }, { 31, 33, 5, 64, 2 }, { 1, 1, 1, 1, 1 } };
        for (int k = 0; k < 3; k++) {
            int p = k % NPROMPT;
            int s = new_seq(gpu, bank_n, bank[p]);
            feed_chk(gpu, s, prompt[p], PROMPT_LEN[p], pats[k], 5, tmp, &cref[p], &tg2);
            gpu_chunks_want += chunks_within(0, PROMPT_LEN[p], C);
            ck_assert_int_eq(eng_seq_len(gpu, s), PROMPT_LEN[p]);
            err_c = fmax(err_c, rel_err(tmp, gpu_one + (size_t)p * V, V));
            eng_seq_free(gpu, s);
        }
    }
    expect(&v, err_c <= tol, "(c) chunked vs one-shot (cuda) rel err %.3e > %.0e", err_c, tol);

    /* (c) ragged batch vs each alone, on CUDA: s0 decodes one token, s1
     * prefills a 25-token chunk, s2 starts a 7-token prompt, s3 a 70-token one. */
    double err_r = 0;
    {
        int s0 = new_seq(gpu, bank_n, bank[0]), s1 = new_seq(gpu, bank_n, bank[1]);
        int s2 = new_seq(gpu, 0, NULL), s3 = new_seq(gpu, bank_n, bank[3]);
        int c40[] = { 40 }, c10[] = { 10 };
        feed(gpu, s0, prompt[0], 40, c40, 1, NULL);
        feed(gpu, s1, prompt[1], 10, c10, 1, NULL);
        float *o = malloc((size_t)4 * V * sizeof(float));
        ck_assert_ptr_nonnull(o);
        eng_batch_item items[4] = {
            { s0, prompt[0] + 40, 1, o },
            { s1, prompt[1] + 10, 25, o + V },
            { s2, prompt[2], 7, o + 2 * (size_t)V },
            { s3, prompt[3], 70, o + 3 * (size_t)V },
        };
        ck_assert_msg(eng_step(gpu, items, 4, err, sizeof err) == ENG_OK, "ragged step: %s", err);
        chunks_check(gpu, s3, &cref[3], &tg2);
        gpu_chunks_want += chunks_within(0, 70, C);
        alone(gpu, prompt[0], 41, bank_n, bank[0], tmp);
        err_r = fmax(err_r, rel_err(o, tmp, V));
        alone(gpu, prompt[1], 35, bank_n, bank[1], tmp);
        err_r = fmax(err_r, rel_err(o + V, tmp, V));
        alone(gpu, prompt[2], 7, 0, NULL, tmp);
        err_r = fmax(err_r, rel_err(o + 2 * (size_t)V, tmp, V));
        alone(gpu, prompt[3], 70, bank_n, bank[3], tmp);
        err_r = fmax(err_r, rel_err(o + 3 * (size_t)V, tmp, V));
        /* and the same batch against the CPU, each alone */
        alone(cpu, prompt[3], 70, bank_n, bank[3], tmp2);
        err_r = fmax(err_r, rel_err(o + 3 * (size_t)V, tmp2, V));
        free(o);
        eng_seq_free(gpu, s0);
        eng_seq_free(gpu, s1);
        eng_seq_free(gpu, s2);
        eng_seq_free(gpu, s3);
    }
    expect(&v, err_r <= tol, "(c) ragged batch vs each alone rel err %.3e > %.0e", err_r, tol);

    /* (d) truncate: another history after position 64, cut back to 64 (a block
     * boundary), the real prompt replayed; vs the CPU one-shot. */
    double err_d = 0;
    {
        int p = 3, n = PROMPT_LEN[p]; /* 160 */
        int32_t other[MAX_LEN];
        memcpy(other, prompt[p], sizeof other);
        for (int i = 64; i < 100; i++) other[i] = (other[i] + 7) % V;
        int s = new_seq(gpu, bank_n, bank[p]);
        int c100[] = { 100 }, rest[] = { 50, 46 };
        feed(gpu, s, other, 100, c100, 1, NULL);
        ck_assert_int_eq(eng_seq_truncate(gpu, s, 50), ENG_EINVAL); /* not a block boundary */
        ck_assert_int_eq(eng_seq_truncate(gpu, s, 64), ENG_OK);
        ck_assert_int_eq(eng_seq_len(gpu, s), 64);
        feed_chk(gpu, s, prompt[p] + 64, n - 64, rest, 2, tmp, &cref[p], &tg2);
        gpu_chunks_want += chunks_within(64, n, C);
        err_d = rel_err(tmp, cpu_one + (size_t)p * V, V);
        /* once more: cut back to 32 and replay in one step */
        ck_assert_int_eq(eng_seq_truncate(gpu, s, 32), ENG_OK);
        step1(gpu, s, prompt[p] + 32, n - 32, tmp);
        chunks_check(gpu, s, &cref[p], &tg2);
        gpu_chunks_want += chunks_within(32, n, C);
        err_d = fmax(err_d, rel_err(tmp, cpu_one + (size_t)p * V, V));
        eng_seq_free(gpu, s);
    }
    expect(&v, err_d <= tol, "(d) truncate + replay (cuda) vs cpu rel err %.3e > %.0e", err_d, tol);
    const double err_g = fmax(tg1.err, tg2.err);
    expect(&v, err_g <= tol, "(g) memory chunks (cuda) vs cpu rel err %.3e > %.0e", err_g, tol);
    expect(&v, tg2.seen == gpu_chunks_want, "(g) cuda emitted %d memory chunks in chunked, ragged and "
           "truncated runs, %d expected", tg2.seen, gpu_chunks_want);

    /* (e) export on CUDA -> import on CPU -> continue, and CPU -> CUDA. */
    double err_e1, err_e2;
    {
        int p = 2, n = PROMPT_LEN[p], cut = 70; /* 131 tokens: 2 full blocks + a partial one at the cut */
        int s = new_seq(gpu, bank_n, bank[p]);
        int cc[] = { cut };
        feed(gpu, s, prompt[p], cut, cc, 1, NULL);
        int t = transfer(gpu, s, cpu);
        eng_seq_free(gpu, s);
        int rest[] = { 17, 44 };
        feed(cpu, t, prompt[p] + cut, n - cut, rest, 2, tmp);
        err_e1 = rel_err(tmp, cpu_one + (size_t)p * V, V);
        eng_seq_free(cpu, t);

        s = new_seq(cpu, bank_n, bank[p]);
        feed(cpu, s, prompt[p], cut, cc, 1, NULL);
        t = transfer(cpu, s, gpu);
        eng_seq_free(cpu, s);
        feed(gpu, t, prompt[p] + cut, n - cut, rest, 2, tmp);
        err_e2 = rel_err(tmp, cpu_one + (size_t)p * V, V);
        eng_seq_free(gpu, t);
    }
    expect(&v, err_e1 <= tol, "(e) export cuda -> import cpu -> continue rel err %.3e > %.0e", err_e1, tol);
    expect(&v, err_e2 <= tol, "(e) export cpu -> import cuda -> continue rel err %.3e > %.0e", err_e2, tol);

    /* (f) blocks import and forks. */
    double err_f = 0;
    {
        int p = 2, n = PROMPT_LEN[p], cut = 70; /* 2 full blocks + a partial one */
        int cc[] = { cut }, rest[] = { 17, 44 };
        eng_block_format fg, fc;
        eng_get_block_format(gpu, &fg);
        eng_get_block_format(cpu, &fc);
        int s = new_seq(gpu, bank_n, bank[p]), nb = cut / fg.block_tokens, at_block = nb * fg.block_tokens;
        feed(gpu, s, prompt[p], cut, cc, 1, NULL);
        ck_assert_int_eq(eng_seq_n_full_blocks(gpu, s), nb);
        size_t len = (size_t)nb * fg.block_bytes;
        unsigned char *buf = malloc(len);
        ck_assert_ptr_nonnull(buf);
        ck_assert_int_eq(eng_seq_blocks_export(gpu, s, 0, nb, buf, len), ENG_OK);
        eng_engine *to[2] = { gpu, cpu };
        for (int k = 0; k < 2; k++) {
            if (k == 1 && fc.kv_dtype != fg.kv_dtype) continue; /* f32 K/V on the CPU: another format */
            int t = new_seq(to[k], bank_n, bank[p]);
            int rc = eng_seq_blocks_import(to[k], t, prompt[p], nb, buf, len, err, sizeof err);
            ck_assert_msg(rc == ENG_OK, "blocks import cuda -> %s: %s", eng_backend_name(to[k]), err);
            feed(to[k], t, prompt[p] + at_block, n - at_block, rest, 2, tmp);
            err_f = fmax(err_f, rel_err(tmp, cpu_one + (size_t)p * V, V));
            eng_seq_free(to[k], t);
        }
        if (nb >= 2) { /* a "both" resume: block 0 prefilled, blocks [1, nb) imported after it */
            int t = new_seq(gpu, bank_n, bank[p]), fb[] = { fg.block_tokens };
            feed(gpu, t, prompt[p], fg.block_tokens, fb, 1, NULL);
            int rc = eng_seq_blocks_import(gpu, t, prompt[p] + fg.block_tokens, nb - 1, buf + fg.block_bytes,
                                           len - fg.block_bytes, err, sizeof err);
            ck_assert_msg(rc == ENG_OK, "blocks import after a prefill (cuda): %s", err);
            ck_assert_int_eq(eng_seq_len(gpu, t), at_block);
            feed(gpu, t, prompt[p] + at_block, n - at_block, rest, 2, tmp);
            err_f = fmax(err_f, rel_err(tmp, cpu_one + (size_t)p * V, V));
            eng_seq_free(gpu, t);
        }
        free(buf);
        const int at[2] = { at_block, cut };
        for (int k = 0; k < 2; k++) {
            int f;
            ck_assert_int_eq(eng_seq_create(gpu, &f), ENG_OK);
            eng_get_stats(gpu, &st);
            int used = st.blocks_used;
            ck_assert_int_eq(eng_seq_fork(gpu, s, f, at[k]), ENG_OK);
            eng_get_stats(gpu, &st);
            ck_assert_int_eq(st.blocks_used, used + (at[k] % fg.block_tokens != 0));
            feed(gpu, f, prompt[p] + at[k], n - at[k], rest, 2, tmp);
            err_f = fmax(err_f, rel_err(tmp, cpu_one + (size_t)p * V, V));
            eng_seq_free(gpu, f);
        }
        feed(gpu, s, prompt[p] + cut, n - cut, rest, 2, tmp);
        err_f = fmax(err_f, rel_err(tmp, cpu_one + (size_t)p * V, V));
        eng_seq_free(gpu, s);
    }
    expect(&v, err_f <= tol, "(f) blocks import / fork + continue (cuda) vs cpu rel err %.3e > %.0e", err_f, tol);

    eng_get_stats(gpu, &st);
    ck_assert_int_eq(st.blocks_used, 0);
    ck_assert_int_eq(st.seqs_active, 0);

    printf("cuda %-31s prefill %.2e decode %.2e greedy equal %d/%d (median min top-2 gap %.1e) "
           "chunked %.2e ragged %.2e truncate %.2e export cuda->cpu %.2e cpu->cuda %.2e blocks/fork %.2e "
           "memory chunks %.2e (%d)  %s (%.1fs)\n",
           sh->name, err_a, err_b, equal, NPROMPT, median_gap, err_c, err_r, err_d, err_e1, err_e2, err_f,
           err_g, tg1.seen + tg2.seen, v.len ? "FAIL" : "ok", now_s() - t0);
    fflush(stdout);

    eng_free(cpu);
    eng_free(gpu);
    for (int p = 0; p < NPROMPT; p++) {
        free(prompt[p]);
        free(bank[p]);
    }
    free(lc); free(lg); free(cpu_one); free(gpu_one); free(tmp); free(tmp2);
    for (int p = 0; p < NPROMPT; p++) {
        free(cref[p].v);
        free(cref[p].have);
    }
    free(text_ids);
    eng_model_free(m);
    ck_assert_msg(v.len == 0, "%s: %s", sh->name, v.msg);
    g_shapes_failed--;
}
END_TEST

/* ---- the tensor-core attention against the simple kernel ------------------------
 *
 * On the same device: an engine with the simple attention kernel (the
 * oracle, MKAD_CUDA_ATTN=simple), one with the tensor-core kernels and their
 * automatic key splits, and one that splits every row group's keys into
 * single 64-key tiles (MKAD_CUDA_ATTN_SPLIT=1, so that the combine runs for
 * prefill tiles and multi-row decode groups too) get the same work:
 *   a 5000-token prompt in chunks of 2048, 1500, 1452 rows (prefill kernel,
 *   contexts up to 5000);
 *   one ragged step: that sequence decodes a token, a 100-token one takes a
 *   37-row chunk (decode kernel, groups of several rows), a new one a
 *   130-row prompt (prefill kernel, a partial last tile), a 64-token one a
 *   3-row chunk;
 *   8 decode steps of the long and the 100-token sequence together.
 * Every logits row of the fast engines must match the simple one within TOL. */
#define LONG_LEN 5000
#define LONG_CTX 6144

/* Restores an environment variable saved as a copy (NULL: was unset). */
static void env_restore(const char *name, char *saved)
{
    if (saved) setenv(name, saved, 1);
    else unsetenv(name);
    free(saved);
}

static char *env_save(const char *name)
{
    const char *v = getenv(name);
    return v ? strdup(v) : NULL;
}

static eng_engine *mk_long(const eng_model *m, const char *attn, const char *split)
{
    char *old_attn = env_save("MKAD_CUDA_ATTN"), *old_split = env_save("MKAD_CUDA_ATTN_SPLIT");
    setenv("MKAD_CUDA_ATTN", attn, 1);
    if (split) setenv("MKAD_CUDA_ATTN_SPLIT", split, 1);
    else unsetenv("MKAD_CUDA_ATTN_SPLIT");
    eng_params p = eng_default_params();
    p.backend = ENG_BACKEND_CUDA;
    p.max_seqs = 4;
    p.max_ctx = LONG_CTX;
    p.max_batch_tokens = 2048;
    p.kv_mem_mb = 1024;
    eng_engine *e = NULL;
    char err[512];
    int rc = eng_create(m, &p, &e, err, sizeof err);
    env_restore("MKAD_CUDA_ATTN", old_attn);
    env_restore("MKAD_CUDA_ATTN_SPLIT", old_split);
    ck_assert_msg(rc == ENG_OK, "eng_create(cuda, MKAD_CUDA_ATTN=%s): %s", attn, err);
    return e;
}

START_TEST(fast_vs_simple)
{
    const shape *sh = &SHAPES[_i];
    const char *only = getenv("TEST_CUDA_ONLY");
    if (only && *only && !strstr(sh->name, only)) return;
    double t0 = now_s();
    eng_model *m = load_shape(sh, _i);
    const eng_model_info *mi = eng_model_get_info(m);
    const int V = mi->vocab_size, L = mi->n_layers, D = mi->d_model;
    uint64_t rs = 0xa77e0000ull + (uint64_t)_i;
    char err[512];

    int bank_n = 0;
    if (mi->mka_levels == 3) bank_n = sh->bank < mi->l3_top_r ? sh->bank : mi->l3_top_r;
    float *bank = NULL;
    if (bank_n > 0) {
        size_t n = (size_t)bank_n * L * D;
        bank = malloc(n * sizeof(float));
        ck_assert_ptr_nonnull(bank);
        for (size_t i = 0; i < n; i++) bank[i] = rng_uniform(&rs);
    }
    const int n_tok = LONG_LEN + 400;
    int32_t *tk = malloc((size_t)n_tok * sizeof(int32_t));
    ck_assert_ptr_nonnull(tk);
    for (int i = 0; i < n_tok; i++) tk[i] = (int32_t)(rng_next(&rs) % (uint64_t)V);
    const int32_t *t_long = tk, *t_b = tk + LONG_LEN, *t_c = tk + LONG_LEN + 150,
                  *t_d = tk + LONG_LEN + 290;

    enum { NE = 3, NOUT = 4 };
    const char *name[NE] = { "simple", "fast", "fast split 1" };
    eng_engine *en[NE] = { mk_long(m, "simple", NULL), mk_long(m, "fast", NULL),
                           mk_long(m, "fast", "1") };
    float *out[NE];
    for (int k = 0; k < NE; k++) {
        out[k] = malloc((size_t)NOUT * V * sizeof(float));
        ck_assert_ptr_nonnull(out[k]);
    }
    double err_p[NE] = { 0 }, err_r[NE] = { 0 }, err_d[NE] = { 0 };
    int sa[NE], sb[NE];
    /* The long prefill. */
    const int chunks[] = { 2048, 1500, 1452 };
    for (int k = 0; k < NE; k++) {
        sa[k] = new_seq(en[k], bank_n, bank);
        feed(en[k], sa[k], t_long, LONG_LEN, chunks, 3, out[k]);
        if (k > 0) err_p[k] = rel_err(out[k], out[0], V);
    }
    /* The ragged step. */
    for (int k = 0; k < NE; k++) {
        eng_engine *e = en[k];
        sb[k] = new_seq(e, bank_n, bank);
        int sc = new_seq(e, 0, NULL), sd = new_seq(e, bank_n, bank);
        const int c100[] = { 100 }, c64[] = { 64 };
        feed(e, sb[k], t_b, 100, c100, 1, NULL);
        feed(e, sd, t_d, 64, c64, 1, NULL);
        eng_batch_item items[NOUT] = {
            { sa[k], t_long + LONG_LEN - 1, 1, out[k] }, /* any token: the same on every engine */
            { sb[k], t_b + 100, 37, out[k] + V },
            { sc, t_c, 130, out[k] + 2 * (size_t)V },
            { sd, t_d + 64, 3, out[k] + 3 * (size_t)V },
        };
        ck_assert_msg(eng_step(e, items, NOUT, err, sizeof err) == ENG_OK, "ragged step (%s): %s",
                      name[k], err);
        eng_seq_free(e, sc);
        eng_seq_free(e, sd);
    }
    for (int k = 1; k < NE; k++)
        for (int i = 0; i < NOUT; i++)
            err_r[k] = fmax(err_r[k], rel_err(out[k] + (size_t)i * V, out[0] + (size_t)i * V, V));
    /* Decode steps, both sequences in one batch, fed the simple engine's argmax. */
    for (int step = 0; step < 8; step++) {
        int32_t nx[2] = { argmax(out[0], V), argmax(out[0] + V, V) };
        for (int k = 0; k < NE; k++) {
            eng_batch_item items[2] = { { sa[k], &nx[0], 1, out[k] }, { sb[k], &nx[1], 1, out[k] + V } };
            ck_assert_msg(eng_step(en[k], items, 2, err, sizeof err) == ENG_OK, "decode (%s): %s",
                          name[k], err);
        }
        for (int k = 1; k < NE; k++)
            for (int i = 0; i < 2; i++)
                err_d[k] = fmax(err_d[k], rel_err(out[k] + (size_t)i * V, out[0] + (size_t)i * V, V));
    }
    int ok = 1;
    for (int k = 1; k < NE; k++) ok &= err_p[k] <= g_tol && err_r[k] <= g_tol && err_d[k] <= g_tol;
    printf("attn %-31s vs simple: fast prefill %.2e ragged %.2e decode %.2e; split-1 prefill %.2e "
           "ragged %.2e decode %.2e  %s (%.1fs)\n",
           sh->name, err_p[1], err_r[1], err_d[1], err_p[2], err_r[2], err_d[2], ok ? "ok" : "FAIL",
           now_s() - t0);
    fflush(stdout);
    for (int k = 0; k < NE; k++) {
        eng_seq_free(en[k], sa[k]);
        eng_seq_free(en[k], sb[k]);
        eng_free(en[k]);
        free(out[k]);
    }
    free(tk);
    free(bank);
    eng_model_free(m);
    ck_assert_msg(ok, "%s: tensor-core attention differs from the simple kernel by more than %.0e "
                  "(see the line above)", sh->name, g_tol);
}
END_TEST

/* AUTO picks CUDA when it is available; the names and kv dtype are right. */
START_TEST(auto_picks_cuda)
{
    char dir[4096], err[512];
    ck_assert_int_eq(tu_genmodel("cuda_auto", "--preset tiny --levels 2 --dtype f32 --seed 5", dir, sizeof dir), 0);
    eng_model *m = NULL;
    ck_assert_msg(eng_model_load(dir, &m, err, sizeof err) == ENG_OK, "%s", err);
    int b = -1;
    ck_assert_int_eq(eng_backend_parse("cuda", &b), ENG_OK);
    ck_assert_int_eq(b, ENG_BACKEND_CUDA);
    ck_assert_int_eq(eng_backend_parse("auto", &b), ENG_OK);
    ck_assert_int_eq(b, ENG_BACKEND_AUTO);
    ck_assert_int_eq(eng_backend_parse("gpu", &b), ENG_EINVAL);
    eng_engine *e = mk(m, ENG_BACKEND_AUTO, 2, 0);
    ck_assert_str_eq(eng_backend_name(e), "cuda");
    ck_assert_int_eq(eng_get_params(e)->backend, ENG_BACKEND_CUDA);
    eng_stats st;
    eng_get_stats(e, &st);
    ck_assert_str_eq(st.kv_dtype, "bf16");
    eng_free(e);
    e = mk(m, ENG_BACKEND_CPU, 2, 0);
    eng_get_stats(e, &st);
    ck_assert_str_eq(eng_backend_name(e), "cpu");
    ck_assert_str_eq(st.kv_dtype, "f32"); /* an f32 model on the CPU keeps f32 K/V */
    eng_free(e);
    eng_model_free(m);
}
END_TEST

int main(int argc, char **argv)
{
    int avail = eng_backend_available(ENG_BACKEND_CUDA);
    if (argc > 1 && !strcmp(argv[1], "--available")) return avail ? 0 : 77;
    if (!avail) {
        printf("test_cuda: SKIP: the CUDA backend is not available here (not built with "
               "--with-cuda, or no GPU)\n");
        return 77;
    }
    const char *t = getenv("CUDA_TOL");
    if (t && *t) g_tol = atof(t);
    printf("test_cuda: tolerance %.1e (max|gpu-cpu|/max|cpu|), %d prompts of 65..160 tokens, "
           "%d decode steps\n", g_tol, NPROMPT, NDECODE);
    fflush(stdout);
    Suite *s = suite_create("cuda");
    TCase *tc = tcase_create("cuda_vs_cpu");
    tcase_add_test(tc, auto_picks_cuda);
    tcase_add_loop_test(tc, cuda_vs_cpu, 0, NSHAPES);
    tcase_add_loop_test(tc, fast_vs_simple, 0, NSHAPES);
    suite_add_tcase(s, tc);
    SRunner *sr = srunner_create(s);
    srunner_set_fork_status(sr, CK_NOFORK); /* a CUDA context does not survive fork() */
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    printf("test_cuda: %d shape(s) run, %d failed\n", g_shapes_run, g_shapes_failed);
    return failed ? 1 : 0;
}
