/*
 * engine.c — the CPU reference FastMKA engine: K/V block pool, sequence
 * slots and the batched forward step (FASTMKA.md, "Decoder layer").
 *
 * One step packs the tokens of every batch item into rows of (T, ·) buffers
 * and runs the decoder layer by layer over all of them at once.  Per-token
 * work (norms, projections, RoPE, attention over the sequence's own blocks)
 * does not look at other rows, so a ragged batch gives each sequence the same
 * bits as running it alone.  Everything the step touches is allocated in
 * eng_create; the token loop allocates nothing.
 */
#include <limits.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "engine_priv.h"

#define MAX_LEVELS 3

eng_params eng_default_params(void)
{
    eng_params p = {0};
    p.n_threads = 0;
    p.block_size = 32;
    p.n_blocks = 0;
    p.kv_mem_mb = 1024;
    p.max_seqs = 16;
    p.max_ctx = 0;
    p.max_batch_tokens = 512;
    p.l3_max_chunks = 0;
    return p;
}

static void *xcalloc(size_t n, size_t sz, int *fail)
{
    if (n == 0) n = 1;
    void *p = calloc(n, sz);
    if (!p) *fail = 1;
    return p;
}

int eng_create(const eng_model *m, const eng_params *params, eng_engine **out, char *err,
               size_t errlen)
{
    *out = NULL;
    if (!m) return eng__errf(err, errlen, ENG_EINVAL, "eng_create: no model");
    eng_params p = params ? *params : eng_default_params();
    const eng_model_info *mi = &m->info;

    if (p.n_threads <= 0) {
        long n = sysconf(_SC_NPROCESSORS_ONLN);
        p.n_threads = n > 0 ? (int)n : 1;
    }
    if (p.block_size <= 0) p.block_size = 32;
    if (p.max_seqs <= 0) p.max_seqs = 16;
    if (p.max_ctx <= 0) p.max_ctx = mi->max_position < 8192 ? mi->max_position : 8192;
    if (p.max_batch_tokens <= 0) p.max_batch_tokens = 512;
    if (p.kv_mem_mb <= 0) p.kv_mem_mb = 1024;
    if (p.l3_max_chunks <= 0) p.l3_max_chunks = mi->mka_levels == 3 ? mi->l3_top_r : 0;
    if (mi->mka_levels != 3) p.l3_max_chunks = 0;
    if (p.n_threads > 256 || p.block_size > 4096 || p.max_seqs > 65536 || p.max_ctx > (1 << 24) ||
        p.max_batch_tokens > (1 << 20))
        return eng__errf(err, errlen, ENG_EINVAL,
                         "engine: parameters out of range (n_threads <= 256, block_size <= 4096, "
                         "max_seqs <= 65536, max_ctx <= 2^24, max_batch_tokens <= 2^20)");

    eng_engine *e = calloc(1, sizeof *e);
    if (!e) return ENG_ENOMEM;
    e->m = m;
    e->D = mi->d_model;
    e->F = mi->ffn_dim;
    e->V = mi->vocab_size;
    e->hd = mi->head_dim;
    e->q_dim = mi->n_heads * mi->head_dim;
    e->kv_dim = mi->n_kv_heads * mi->head_dim;
    e->n_layers = mi->n_layers;
    e->levels = mi->mka_levels;
    e->B = p.block_size;
    e->max_blocks_per_seq = (p.max_ctx + e->B - 1) / e->B;
    e->block_floats = (size_t)e->n_layers * 2 * e->B * e->kv_dim;

    if (p.n_blocks <= 0) {
        size_t want = (size_t)p.max_seqs * e->max_blocks_per_seq;
        size_t cap = ((size_t)p.kv_mem_mb << 20) / (e->block_floats * sizeof(float) +
                                                   (size_t)e->n_layers * e->D * sizeof(float));
        if (cap < 1) cap = 1;
        size_t n = want < cap ? want : cap;
        p.n_blocks = n < (size_t)INT_MAX ? (int)n : INT_MAX;
    }
    e->prm = p;

    int fail = 0;
    if (eng_pool_create(p.n_threads, &e->pool) != ENG_OK) fail = 1;
    e->kv = xcalloc((size_t)p.n_blocks * e->block_floats, sizeof(float), &fail);
    e->ema_ckpt = xcalloc((size_t)p.n_blocks * e->n_layers * e->D, sizeof(float), &fail);
    e->free_blocks = xcalloc((size_t)p.n_blocks, sizeof(int), &fail);
    e->seqs = xcalloc((size_t)p.max_seqs, sizeof(eng_seq), &fail);
    for (int s = 0; !fail && s < p.max_seqs; s++) {
        eng_seq *sq = &e->seqs[s];
        sq->tokens = xcalloc((size_t)p.max_ctx, sizeof(int32_t), &fail);
        sq->blocks = xcalloc((size_t)e->max_blocks_per_seq, sizeof(int), &fail);
        sq->ema = xcalloc((size_t)e->n_layers * e->D, sizeof(float), &fail);
        if (p.l3_max_chunks > 0) {
            size_t n = (size_t)e->n_layers * p.l3_max_chunks * e->D;
            sq->l3_mu = xcalloc(n, sizeof(float), &fail);
            sq->l3_kappa = xcalloc(n, sizeof(float), &fail);
        }
    }
    size_t T = (size_t)p.max_batch_tokens;
    size_t wide = (size_t)(e->q_dim > e->D ? e->q_dim : e->D);
    e->h = xcalloc(T * e->D, sizeof(float), &fail);
    e->x = xcalloc(T * e->D, sizeof(float), &fail);
    e->f = xcalloc(T * e->D, sizeof(float), &fail);
    e->mem = xcalloc(T * e->D, sizeof(float), &fail);
    e->q = xcalloc(T * e->q_dim, sizeof(float), &fail);
    e->k = xcalloc(T * e->kv_dim, sizeof(float), &fail);
    e->v = xcalloc(T * e->kv_dim, sizeof(float), &fail);
    e->att = xcalloc(T * e->q_dim, sizeof(float), &fail);
    e->tmp = xcalloc(T * wide, sizeof(float), &fail);
    e->gate = xcalloc(T * e->F, sizeof(float), &fail);
    e->up = xcalloc(T * e->F, sizeof(float), &fail);
    e->rh = xcalloc(T * (e->D / 2 > 0 ? e->D / 2 : 1), sizeof(float), &fail);
    e->lam = xcalloc(T * MAX_LEVELS, sizeof(float), &fail);
    e->tok_item = xcalloc(T, sizeof(int), &fail);
    e->tok_pos = xcalloc(T, sizeof(int), &fail);
    e->item_start = xcalloc((size_t)p.max_seqs, sizeof(int), &fail);
    e->sel_x = xcalloc((size_t)p.max_seqs * e->D, sizeof(float), &fail);
    e->sel_logits = xcalloc((size_t)p.max_seqs * e->V, sizeof(float), &fail);
    e->scores = xcalloc((size_t)p.n_threads * (p.max_ctx > p.l3_max_chunks ? p.max_ctx : p.l3_max_chunks),
                        sizeof(float), &fail);
    e->seen_seq = xcalloc((size_t)p.max_seqs, sizeof(unsigned char), &fail);
    if (fail) {
        eng_free(e);
        return eng__errf(err, errlen, ENG_ENOMEM,
                         "engine: cannot allocate %d K/V blocks (%zu MiB) and step buffers for "
                         "%d tokens", p.n_blocks,
                         (size_t)p.n_blocks * e->block_floats * sizeof(float) >> 20,
                         p.max_batch_tokens);
    }
    for (int b = 0; b < p.n_blocks; b++) e->free_blocks[b] = p.n_blocks - 1 - b;
    e->n_free = p.n_blocks;
    *out = e;
    return ENG_OK;
}

void eng_free(eng_engine *e)
{
    if (!e) return;
    eng_pool_free(e->pool);
    if (e->seqs) {
        for (int s = 0; s < e->prm.max_seqs; s++) {
            free(e->seqs[s].tokens);
            free(e->seqs[s].blocks);
            free(e->seqs[s].ema);
            free(e->seqs[s].l3_mu);
            free(e->seqs[s].l3_kappa);
        }
    }
    free(e->seqs);
    free(e->kv);
    free(e->ema_ckpt);
    free(e->free_blocks);
    free(e->h); free(e->x); free(e->f); free(e->mem); free(e->q); free(e->k); free(e->v);
    free(e->att); free(e->tmp); free(e->gate); free(e->up); free(e->rh); free(e->lam);
    free(e->tok_item); free(e->tok_pos); free(e->item_start); free(e->sel_x);
    free(e->sel_logits); free(e->scores); free(e->seen_seq);
    free(e);
}

const eng_params *eng_get_params(const eng_engine *e) { return &e->prm; }
const eng_model *eng_get_model(const eng_engine *e) { return e->m; }

void eng_get_stats(const eng_engine *e, eng_stats *out)
{
    out->blocks_total = e->prm.n_blocks;
    out->blocks_used = e->prm.n_blocks - e->n_free;
    out->seqs_active = 0;
    for (int s = 0; s < e->prm.max_seqs; s++) out->seqs_active += e->seqs[s].in_use;
}

/* ---- sequences ----------------------------------------------------------- */

eng_seq *eng__seq(const eng_engine *e, int seq)
{
    if (seq < 0 || seq >= e->prm.max_seqs || !e->seqs[seq].in_use) return NULL;
    return &e->seqs[seq];
}

int eng_seq_create(eng_engine *e, int *seq)
{
    for (int s = 0; s < e->prm.max_seqs; s++) {
        eng_seq *sq = &e->seqs[s];
        if (sq->in_use) continue;
        sq->in_use = 1;
        sq->n_tokens = 0;
        sq->n_blocks = 0;
        sq->l3_n = 0;
        memset(sq->ema, 0, (size_t)e->n_layers * e->D * sizeof(float));
        *seq = s;
        return ENG_OK;
    }
    return ENG_ENOSPC;
}

static void release_blocks(eng_engine *e, eng_seq *sq, int keep)
{
    while (sq->n_blocks > keep) e->free_blocks[e->n_free++] = sq->blocks[--sq->n_blocks];
}

void eng_seq_free(eng_engine *e, int seq)
{
    eng_seq *sq = eng__seq(e, seq);
    if (!sq) return;
    release_blocks(e, sq, 0);
    sq->in_use = 0;
    sq->n_tokens = 0;
    sq->l3_n = 0;
}

int eng_seq_len(const eng_engine *e, int seq)
{
    const eng_seq *sq = eng__seq(e, seq);
    return sq ? sq->n_tokens : ENG_EINVAL;
}

const int32_t *eng_seq_tokens(const eng_engine *e, int seq)
{
    const eng_seq *sq = eng__seq(e, seq);
    return sq ? sq->tokens : NULL;
}

int eng_seq_truncate(eng_engine *e, int seq, int n)
{
    eng_seq *sq = eng__seq(e, seq);
    if (!sq || n < 0 || n > sq->n_tokens) return ENG_EINVAL;
    if (n == sq->n_tokens) return ENG_OK;
    if (n % e->B != 0) return ENG_EINVAL;
    size_t ld = (size_t)e->n_layers * e->D;
    if (n == 0)
        memset(sq->ema, 0, ld * sizeof(float));
    else
        memcpy(sq->ema, e->ema_ckpt + (size_t)sq->blocks[n / e->B - 1] * ld, ld * sizeof(float));
    release_blocks(e, sq, n / e->B);
    sq->n_tokens = n;
    return ENG_OK;
}

int eng_seq_set_l3_bank(eng_engine *e, int seq, int n_chunks, const float *mu)
{
    eng_seq *sq = eng__seq(e, seq);
    if (!sq || sq->n_tokens != 0 || n_chunks < 0) return ENG_EINVAL;
    if (n_chunks > 0 && (e->levels != 3 || !mu)) return ENG_EINVAL;
    if (n_chunks > e->prm.l3_max_chunks) return ENG_ERANGE;
    for (int r = 0; r < n_chunks; r++)
        for (int l = 0; l < e->n_layers; l++)
            eng__l3_store(e, sq, r, l, mu + ((size_t)r * e->n_layers + l) * e->D);
    sq->l3_n = n_chunks;
    return ENG_OK;
}

void eng__l3_store(const eng_engine *e, eng_seq *sq, int r, int l, const float *mu)
{
    /* Stored per layer as (R, D) so that one layer's bank is contiguous for
     * the read; the key is mu / |mu| (zero for a zero chunk). */
    int D = e->D;
    size_t off = ((size_t)l * e->prm.l3_max_chunks + r) * D;
    float *dm = sq->l3_mu + off, *dk = sq->l3_kappa + off;
    memcpy(dm, mu, (size_t)D * sizeof(float));
    float nrm = sqrtf(eng_cpu_dot(mu, mu, D));
    for (int i = 0; i < D; i++) dk[i] = nrm > 0.0f ? mu[i] / nrm : 0.0f;
}

/* ---- the forward step ------------------------------------------------------ */

typedef struct step_ctx {
    eng_engine *e;
    const eng_batch_item *items;
    int n_items;
    int T;
    int layer;
    const float *norm_w; /* RMSNorm weight for norm_task */
} step_ctx;

static inline float silu(float v) { return v / (1.0f + expf(-v)); }

/* Router: lam (T, L) = softmax(W2 silu(W1 q + b1) + b2), in place on lam. */
static void router_softmax(eng_engine *e, int T)
{
    int L = e->levels;
    for (int t = 0; t < T; t++) {
        float *r = e->lam + (size_t)t * MAX_LEVELS;
        float mx = r[0];
        for (int i = 1; i < L; i++) mx = r[i] > mx ? r[i] : mx;
        float sum = 0.0f;
        for (int i = 0; i < L; i++) { r[i] = expf(r[i] - mx); sum += r[i]; }
        for (int i = 0; i < L; i++) r[i] /= sum;
    }
}

/* L3 read for token t: mem[t] = sum_r softmax_r(x_t . kappa_r / sqrt(D)) mu_r. */
static void l3_task(void *vctx, int t, int thread)
{
    step_ctx *c = vctx;
    eng_engine *e = c->e;
    const eng_seq *sq = &e->seqs[c->items[e->tok_item[t]].seq];
    int D = e->D, R = e->prm.l3_max_chunks, n = sq->l3_n;
    float *mem = e->mem + (size_t)t * D;
    if (n == 0) { memset(mem, 0, (size_t)D * sizeof(float)); return; }
    const float *x = e->x + (size_t)t * D;
    const float *mu = sq->l3_mu + (size_t)c->layer * R * D;
    const float *kap = sq->l3_kappa + (size_t)c->layer * R * D;
    float *sc = e->scores + (size_t)thread * (e->prm.max_ctx > R ? e->prm.max_ctx : R);
    float inv = 1.0f / sqrtf((float)D), mx = -INFINITY, sum = 0.0f;
    for (int r = 0; r < n; r++) {
        sc[r] = eng_cpu_dot(x, kap + (size_t)r * D, D) * inv;
        mx = sc[r] > mx ? sc[r] : mx;
    }
    for (int r = 0; r < n; r++) { sc[r] = expf(sc[r] - mx); sum += sc[r]; }
    memset(mem, 0, (size_t)D * sizeof(float));
    for (int r = 0; r < n; r++) {
        float pr = sc[r] / sum;
        const float *m = mu + (size_t)r * D;
        for (int i = 0; i < D; i++) mem[i] += pr * m[i];
    }
}

#define EMA_DCHUNK 256

/* EMA + route fusion for one batch item over a slice of the D dimensions:
 * s_t = beta s_{t-1} + (1 - beta) x_t carried from the sequence's state,
 * f_t = lam0 x_t + lam1 s_t (+ lam2 m_t); s is checkpointed at every block
 * boundary.  The recurrence is sequential in t but independent per
 * dimension, so the tasks split D. */
static void ema_task(void *vctx, int task, int thread)
{
    (void)thread;
    step_ctx *c = vctx;
    eng_engine *e = c->e;
    int n_dc = (e->D + EMA_DCHUNK - 1) / EMA_DCHUNK;
    int it = task / n_dc, d0 = (task % n_dc) * EMA_DCHUNK;
    int d1 = d0 + EMA_DCHUNK < e->D ? d0 + EMA_DCHUNK : e->D;
    const eng_batch_item *item = &c->items[it];
    eng_seq *sq = &e->seqs[item->seq];
    int D = e->D, l = c->layer, use_mem = e->levels == 3 && sq->l3_n > 0;
    float beta = e->m->info.ema_beta, omb = 1.0f - beta;
    float *s = sq->ema + (size_t)l * D;
    int t0 = e->item_start[it];
    for (int j = 0; j < item->n_tokens; j++) {
        int t = t0 + j, pos = sq->n_tokens + j;
        const float *x = e->x + (size_t)t * D;
        const float *lam = e->lam + (size_t)t * MAX_LEVELS;
        float *f = e->f + (size_t)t * D;
        for (int i = d0; i < d1; i++) {
            s[i] = beta * s[i] + omb * x[i];
            f[i] = lam[0] * x[i] + lam[1] * s[i];
        }
        if (use_mem) {
            const float *mem = e->mem + (size_t)t * D;
            for (int i = d0; i < d1; i++) f[i] += lam[2] * mem[i];
        }
        if ((pos + 1) % e->B == 0) {
            float *ck = e->ema_ckpt + ((size_t)sq->blocks[pos / e->B] * e->n_layers + l) * D;
            memcpy(ck + d0, s + d0, (size_t)(d1 - d0) * sizeof(float));
        }
    }
}

/* RoPE (rotate-half convention) on q and k of token t, and the K/V write into
 * the sequence's block for that position. */
static void rope_store_task(void *vctx, int t, int thread)
{
    (void)thread;
    step_ctx *c = vctx;
    eng_engine *e = c->e;
    const eng_model *m = e->m;
    const eng_batch_item *item = &c->items[e->tok_item[t]];
    eng_seq *sq = &e->seqs[item->seq];
    int hd = e->hd, half = hd / 2, pos = e->tok_pos[t];
    float *q = e->q + (size_t)t * e->q_dim, *k = e->k + (size_t)t * e->kv_dim;
    for (int i = 0; i < half; i++) {
        float ang = (float)pos * m->rope_inv_freq[i];
        float cs = cosf(ang) * m->rope_attn_scale, sn = sinf(ang) * m->rope_attn_scale;
        for (int h = 0; h < m->info.n_heads; h++) {
            float *v = q + (size_t)h * hd;
            float a = v[i], b = v[i + half];
            v[i] = a * cs - b * sn;
            v[i + half] = b * cs + a * sn;
        }
        for (int h = 0; h < m->info.n_kv_heads; h++) {
            float *v = k + (size_t)h * hd;
            float a = v[i], b = v[i + half];
            v[i] = a * cs - b * sn;
            v[i + half] = b * cs + a * sn;
        }
    }
    float *kb = eng__kv_ptr(e, sq->blocks[pos / e->B], c->layer, 0, pos % e->B);
    float *vb = eng__kv_ptr(e, sq->blocks[pos / e->B], c->layer, 1, pos % e->B);
    memcpy(kb, k, (size_t)e->kv_dim * sizeof(float));
    memcpy(vb, e->v + (size_t)t * e->kv_dim, (size_t)e->kv_dim * sizeof(float));
}

/* Causal GQA attention of token t, head h over positions 0..pos of its
 * sequence, reading K/V through the block table. */
static void attn_task(void *vctx, int task, int thread)
{
    step_ctx *c = vctx;
    eng_engine *e = c->e;
    int H = e->m->info.n_heads, group = H / e->m->info.n_kv_heads;
    int t = task / H, h = task % H, kvh = h / group, hd = e->hd;
    const eng_seq *sq = &e->seqs[c->items[e->tok_item[t]].seq];
    int pos = e->tok_pos[t];
    const float *q = e->q + (size_t)t * e->q_dim + (size_t)h * hd;
    float *out = e->att + (size_t)t * e->q_dim + (size_t)h * hd;
    float *sc = e->scores + (size_t)thread * (e->prm.max_ctx > e->prm.l3_max_chunks
                                                  ? e->prm.max_ctx : e->prm.l3_max_chunks);
    float scale = 1.0f / sqrtf((float)hd), mx = -INFINITY, sum = 0.0f;
    for (int j = 0; j <= pos; j++) {
        const float *kj = eng__kv_ptr(e, sq->blocks[j / e->B], c->layer, 0, j % e->B) + kvh * hd;
        sc[j] = eng_cpu_dot(q, kj, hd) * scale;
        mx = sc[j] > mx ? sc[j] : mx;
    }
    for (int j = 0; j <= pos; j++) { sc[j] = expf(sc[j] - mx); sum += sc[j]; }
    float inv = 1.0f / sum;
    memset(out, 0, (size_t)hd * sizeof(float));
    for (int j = 0; j <= pos; j++) {
        const float *vj = eng__kv_ptr(e, sq->blocks[j / e->B], c->layer, 1, j % e->B) + kvh * hd;
        float pj = sc[j] * inv;
        for (int i = 0; i < hd; i++) out[i] += pj * vj[i];
    }
}

static void norm_task(void *vctx, int t, int thread)
{
    (void)thread;
    step_ctx *c = vctx;
    eng_engine *e = c->e;
    eng_cpu_rmsnorm(e->h + (size_t)t * e->D, c->norm_w, 1, e->D,
                    e->m->rms_eps, e->x + (size_t)t * e->D);
}

static void swiglu(eng_engine *e, int T)
{
    size_t n = (size_t)T * e->F;
    for (size_t i = 0; i < n; i++) e->gate[i] = silu(e->gate[i]) * e->up[i];
}

static void add_into(float *dst, const float *src, size_t n)
{
    for (size_t i = 0; i < n; i++) dst[i] += src[i];
}

static void layer_forward(step_ctx *c, int l)
{
    eng_engine *e = c->e;
    const eng_layer *L = &e->m->layers[l];
    int T = c->T, D = e->D;
    c->layer = l;

    c->norm_w = L->attn_norm;
    eng_pool_run(e->pool, T, norm_task, c);                    /* x = RMSNorm(h) */
    eng_cpu_linear(e->pool, &L->q, e->x, T, e->q);             /* q (T, H*d) */
    const float *fused = e->x;
    if (e->levels > 0) {
        eng_cpu_linear(e->pool, &L->router1, e->q, T, e->rh);  /* (T, D/2) */
        for (size_t i = 0; i < (size_t)T * L->router1.rows; i++) e->rh[i] = silu(e->rh[i]);
        eng_cpu_linear(e->pool, &L->router2, e->rh, T, e->tmp); /* (T, L) */
        for (int t = 0; t < T; t++)
            memcpy(e->lam + (size_t)t * MAX_LEVELS, e->tmp + (size_t)t * e->levels,
                   (size_t)e->levels * sizeof(float));
        router_softmax(e, T);
        if (e->levels == 3) eng_pool_run(e->pool, T, l3_task, c);
        int n_dc = (D + EMA_DCHUNK - 1) / EMA_DCHUNK;
        eng_pool_run(e->pool, c->n_items * n_dc, ema_task, c);
        fused = e->f;
    }
    eng_cpu_linear(e->pool, &L->k, fused, T, e->k);
    eng_cpu_linear(e->pool, &L->v, fused, T, e->v);
    eng_pool_run(e->pool, T, rope_store_task, c);
    eng_pool_run(e->pool, T * e->m->info.n_heads, attn_task, c);
    eng_cpu_linear(e->pool, &L->o, e->att, T, e->tmp);
    add_into(e->h, e->tmp, (size_t)T * D);

    c->norm_w = L->mlp_norm;
    eng_pool_run(e->pool, T, norm_task, c);
    eng_cpu_linear(e->pool, &L->gate, e->x, T, e->gate);
    eng_cpu_linear(e->pool, &L->up, e->x, T, e->up);
    swiglu(e, T);
    eng_cpu_linear(e->pool, &L->down, e->gate, T, e->tmp);
    add_into(e->h, e->tmp, (size_t)T * D);
}

static int validate_step(eng_engine *e, const eng_batch_item *items, int n_items, char *err,
                         size_t errlen)
{
    if (n_items <= 0 || !items) return eng__errf(err, errlen, ENG_EINVAL, "step: empty batch");
    if (n_items > e->prm.max_seqs)
        return eng__errf(err, errlen, ENG_ERANGE, "step: %d items > max_seqs %d", n_items,
                         e->prm.max_seqs);
    int total = 0, blocks_needed = 0, rc = ENG_OK;
    memset(e->seen_seq, 0, (size_t)e->prm.max_seqs);
    for (int i = 0; i < n_items && rc == ENG_OK; i++) {
        const eng_batch_item *it = &items[i];
        eng_seq *sq = eng__seq(e, it->seq);
        if (!sq) { rc = eng__errf(err, errlen, ENG_EINVAL, "step: item %d: sequence %d is not in use", i, it->seq); break; }
        if (e->seen_seq[it->seq]) { rc = eng__errf(err, errlen, ENG_EINVAL, "step: sequence %d appears twice", it->seq); break; }
        e->seen_seq[it->seq] = 1;
        if (it->n_tokens <= 0 || !it->tokens) { rc = eng__errf(err, errlen, ENG_EINVAL, "step: item %d has no tokens", i); break; }
        if (sq->n_tokens + it->n_tokens > e->prm.max_ctx) {
            rc = eng__errf(err, errlen, ENG_ERANGE, "step: sequence %d would hold %d tokens > max_ctx %d",
                           it->seq, sq->n_tokens + it->n_tokens, e->prm.max_ctx);
            break;
        }
        for (int j = 0; j < it->n_tokens; j++) {
            if (it->tokens[j] < 0 || it->tokens[j] >= e->V) {
                rc = eng__errf(err, errlen, ENG_EINVAL, "step: token id %d out of range [0, %d)",
                               (int)it->tokens[j], e->V);
                break;
            }
        }
        total += it->n_tokens;
        blocks_needed += (sq->n_tokens + it->n_tokens + e->B - 1) / e->B - sq->n_blocks;
    }
    if (rc != ENG_OK) return rc;
    if (total > e->prm.max_batch_tokens)
        return eng__errf(err, errlen, ENG_ERANGE, "step: %d tokens > max_batch_tokens %d", total,
                         e->prm.max_batch_tokens);
    if (blocks_needed > e->n_free)
        return eng__errf(err, errlen, ENG_ENOSPC, "step: needs %d K/V blocks, %d free",
                         blocks_needed, e->n_free);
    return ENG_OK;
}

int eng_step(eng_engine *e, const eng_batch_item *items, int n_items, char *err, size_t errlen)
{
    int rc = validate_step(e, items, n_items, err, errlen);
    if (rc != ENG_OK) return rc;

    /* Pack the tokens, take the blocks the new positions need, embed. */
    int T = 0, D = e->D;
    for (int i = 0; i < n_items; i++) {
        const eng_batch_item *it = &items[i];
        eng_seq *sq = &e->seqs[it->seq];
        e->item_start[i] = T;
        int need = (sq->n_tokens + it->n_tokens + e->B - 1) / e->B;
        while (sq->n_blocks < need) sq->blocks[sq->n_blocks++] = e->free_blocks[--e->n_free];
        for (int j = 0; j < it->n_tokens; j++, T++) {
            e->tok_item[T] = i;
            e->tok_pos[T] = sq->n_tokens + j;
            eng__linear_row(&e->m->embed, it->tokens[j], e->h + (size_t)T * D);
        }
    }
    step_ctx c = { e, items, n_items, T, 0, NULL };
    for (int l = 0; l < e->n_layers; l++) layer_forward(&c, l);

    /* Commit the tokens to their sequences. */
    for (int i = 0; i < n_items; i++) {
        eng_seq *sq = &e->seqs[items[i].seq];
        memcpy(sq->tokens + sq->n_tokens, items[i].tokens, (size_t)items[i].n_tokens * sizeof(int32_t));
        sq->n_tokens += items[i].n_tokens;
    }

    /* Final norm and LM head, only for the rows whose logits were asked for. */
    int n_sel = 0;
    for (int i = 0; i < n_items; i++) {
        if (!items[i].logits) continue;
        int t = e->item_start[i] + items[i].n_tokens - 1;
        eng_cpu_rmsnorm(e->h + (size_t)t * D, e->m->final_norm, 1, D, e->m->rms_eps,
                        e->sel_x + (size_t)n_sel * D);
        n_sel++;
    }
    if (n_sel > 0) {
        eng_cpu_linear(e->pool, &e->m->lm_head, e->sel_x, n_sel, e->sel_logits);
        for (int i = 0, r = 0; i < n_items; i++) {
            if (!items[i].logits) continue;
            memcpy(items[i].logits, e->sel_logits + (size_t)r * e->V, (size_t)e->V * sizeof(float));
            r++;
        }
    }
    return ENG_OK;
}
