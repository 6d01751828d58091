/*
 * bench_l3 — retrieval of a new session's L3 bank from a user with many
 * long-term chunks: the in-memory index (server/l3index.c) against the scan
 * of the user's chunks in RocksDB, through the session store itself
 * (srv_store_lookup of a new session, which picks the bank).  Checks that
 * both pick the same chunks in the same order for every query; exits 1 when
 * they do not (tests/l3_index.sh runs it small under make check).
 *
 *   mkad-bench-l3 --model DIR [--chunks N] [--queries Q]
 *
 * The chunks' keys are random (seeded), every 10th a copy of an earlier
 * one (equal scores: the tie order is checked too); 100 chunks per source
 * session.  Prints the median lookup time per mode; the index's first
 * lookup (which builds it by one scan) is reported apart.
 */
#include "config.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "srv_internal.h"

typedef struct answer {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    srv_loaded *res;
} answer;

static void on_loaded(void *ctx, srv_loaded *res)
{
    answer *a = ctx;
    pthread_mutex_lock(&a->mu);
    a->res = res;
    pthread_cond_signal(&a->cv);
    pthread_mutex_unlock(&a->mu);
}

static uint64_t rng = 0x9e3779b97f4a7c15ULL;
static double urand(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (double)(rng >> 11) / 9007199254740992.0;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static srv_store *open_store(const char *dir, const eng_model *m, size_t index_bytes, answer *a)
{
    char err[512];
    srv_store_params p = { .dir = dir, .identity = "bench-l3", .block_tokens = 32, .block_bytes = 64,
                           .loaded = on_loaded, .loaded_ctx = a, .model = m, .l3_index_bytes = index_bytes,
                           .maint_interval_s = 3600 };
    srv_store *st;
    if (srv_store_open(&p, &st, err, sizeof err) != 0) {
        fprintf(stderr, "bench_l3: %s\n", err);
        exit(1);
    }
    return st;
}

/* One new-session lookup: the bank ids (n), the store's lookup seconds. */
static double lookup(srv_store *st, answer *a, uint64_t id, const int32_t *prompt, int n_prompt, uint64_t *bank,
                     int *n_bank)
{
    char sid[32];
    snprintf(sid, sizeof sid, "new-%llu", (unsigned long long)id);
    if (srv_store_lookup(st, id, "u", sid, prompt, n_prompt) != 0) exit(1);
    pthread_mutex_lock(&a->mu);
    while (!a->res) pthread_cond_wait(&a->cv, &a->mu);
    srv_loaded *r = a->res;
    a->res = NULL;
    pthread_mutex_unlock(&a->mu);
    *n_bank = r->n_bank;
    memcpy(bank, r->bank_ids, (size_t)r->n_bank * sizeof *bank);
    double t = r->load_s;
    srv_loaded_free(r);
    return t;
}

static void drain(srv_store *st)
{
    srv_store_stats s;
    do {
        usleep(20000);
        srv_store_get_stats(st, &s);
    } while (s.queue_depth > 0);
}

int main(int argc, char **argv)
{
    const char *model_dir = NULL;
    int n_chunks = 10000, n_q = 20;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--model") && i + 1 < argc) model_dir = argv[++i];
        else if (!strcmp(argv[i], "--chunks") && i + 1 < argc) n_chunks = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--queries") && i + 1 < argc) n_q = atoi(argv[++i]);
        else model_dir = NULL, i = argc;
    }
    if (!model_dir || n_chunks < 1 || n_q < 2) {
        fprintf(stderr, "usage: mkad-bench-l3 --model DIR [--chunks N] [--queries Q]\n");
        return 2;
    }
    char err[512];
    eng_model *m;
    if (eng_model_load(model_dir, &m, err, sizeof err) != ENG_OK) {
        fprintf(stderr, "bench_l3: %s\n", err);
        return 1;
    }
    const eng_model_info *mi = eng_model_get_info(m);
    int D = mi->d_model, L = mi->n_layers, V = mi->vocab_size;
    char dir[] = "/tmp/mkad-bench-l3-XXXXXX";
    if (!mkdtemp(dir)) return 1;
    answer a = { .res = NULL };
    pthread_mutex_init(&a.mu, NULL);
    pthread_cond_init(&a.cv, NULL);

    /* the chunks; the queries' keys are the prompts' mean embeddings, so the
     * chunk keys are drawn around the embedding scale: real token embeddings
     * averaged over random tokens */
    srv_store *st = open_store(dir, m, 0, &a);
    float *emb = malloc((size_t)D * sizeof *emb), *mu = calloc((size_t)L * D, sizeof *mu);
    float *keep = malloc((size_t)D * 64 * sizeof *keep);
    int32_t toks[16];
    for (int i = 0; i < n_chunks; i++) {
        if (i % 10 == 9) {
            memcpy(emb, keep + (size_t)(i / 10 % 64) * D, (size_t)D * sizeof *emb); /* a tie */
        } else {
            for (int k = 0; k < 16; k++) toks[k] = (int32_t)(urand() * V);
            eng_model_embed_mean(m, toks, 16, emb);
            if (i % 10 == 0) memcpy(keep + (size_t)(i / 10 % 64) * D, emb, (size_t)D * sizeof *emb);
        }
        for (int k = 0; k < L * D; k += 97) mu[k] = (float)urand();
        char sid[32];
        snprintf(sid, sizeof sid, "s%d", i / 100);
        if (srv_store_chunk(st, "u", sid, i % 100, emb, mu) != 0) return 1;
        if (i % 4096 == 4095) drain(st);
    }
    drain(st);
    srv_store_close(st);

    int32_t *prompts = malloc((size_t)n_q * 64 * sizeof *prompts);
    for (int q = 0; q < n_q * 64; q++) prompts[q] = (int32_t)(urand() * V);
    uint64_t (*banks)[SRV_MAX_BANK] = calloc((size_t)n_q, sizeof *banks);
    int *nb = calloc((size_t)n_q, sizeof *nb);
    double *t = calloc((size_t)n_q, sizeof *t), t_first = 0, med[2];
    int mismatch = 0, r_max = 0;
    for (int mode = 0; mode < 2; mode++) { /* 0: scan, 1: index */
        st = open_store(dir, m, mode ? (size_t)1 << 30 : 0, &a);
        for (int q = 0; q < n_q; q++) {
            uint64_t bank[SRV_MAX_BANK];
            int n;
            t[q] = lookup(st, &a, (uint64_t)q, prompts + (size_t)q * 64, 64, bank, &n);
            if (mode == 0) {
                memcpy(banks[q], bank, sizeof bank);
                nb[q] = n;
                if (n > r_max) r_max = n;
            } else if (n != nb[q] || memcmp(bank, banks[q], (size_t)n * sizeof *bank) != 0) {
                mismatch++;
                fprintf(stderr, "bench_l3: query %d: the index picked other chunks than the scan\n", q);
            }
        }
        srv_store_close(st);
        if (mode == 1) t_first = t[0];
        qsort(t + mode, (size_t)(n_q - mode), sizeof *t, cmp_double); /* the index's first one built it */
        med[mode] = t[mode + (n_q - mode) / 2];
    }
    printf("chunks=%d d_model=%d top_r=%d queries=%d scan_ms=%.3f index_ms=%.3f index_build_ms=%.1f speedup=%.1fx "
           "same_top_r=%s\n", n_chunks, D, r_max, n_q, med[0] * 1e3, med[1] * 1e3, t_first * 1e3, med[0] / med[1],
           mismatch ? "NO" : "yes");
    char cmd[256];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    if (system(cmd) != 0) fprintf(stderr, "bench_l3: could not remove %s\n", dir);
    free(emb);
    free(mu);
    free(keep);
    free(prompts);
    free(banks);
    free(nb);
    free(t);
    eng_model_free(m);
    return mismatch ? 1 : 0;
}
