/*
 * backend.c — the CPU reference backend: FastMKA forward step over a paged
 * K/V pool in host memory (FASTMKA.md, "Decoder layer"), behind the ops
 * table of engine_priv.h.
 *
 * One step runs the decoder layer by layer over the packed rows of every
 * batch item.  Per-token work (norms, projections, RoPE, attention over the
 * sequence's own blocks) does not look at other rows, so a ragged batch gives
 * each sequence the same bits as running it alone.  Everything the step
 * touches is allocated in init/pool_alloc; the token loop allocates nothing.
 *
 * K/V are kept in the model's dtype: bf16 for a bf16 checkpoint (rounded to
 * nearest even when written, half the bytes per token), f32 otherwise.  The
 * attention of a prefill chunk reads its own K/V back from the pool, rounded,
 * exactly as a later decode step will, so chunking never changes a bit.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "../engine_priv.h"

#define MAX_LEVELS 3

typedef struct cpu_be {
    eng_pool *pool;
    unsigned char *kv;      /* (n_blocks, n_layers, 2, B, kv_dim) fused K and V, in e->kv_dtype */
    size_t kv_elem;         /* bytes per K/V element: 2 (bf16) or 4 (f32) */
    float *ema_ckpt;        /* (n_blocks, n_layers, D) EMA after the block's last position */
    float *ema;             /* (max_seqs, n_layers, D) running EMA state per slot */
    float *l3_mu;           /* (max_seqs, n_layers, R, D) L3 chunk values, R = l3_max_chunks */
    float *l3_kappa;        /* (max_seqs, n_layers, R, D) keys mu/|mu| */
    float *chunk_acc;       /* (max_seqs, n_layers + 1, D) running sums of each slot's current
                               L3 memory chunk: x of every layer, then the embeddings
                               (l3_capture only) */
    /* Step scratch; T = max_batch_tokens. */
    float *h, *x, *f, *mem; /* (T, D) residual, normed input, fused input, L3 read */
    float *q, *att;         /* (T, H*d) */
    float *k, *v;           /* (T, H_kv*d) */
    float *tmp;             /* (T, max(D, H*d)) */
    float *gate, *up;       /* (T, F) */
    float *rh;              /* (T, D/2) router hidden */
    float *lam;             /* (T, 3) route weights */
    float *sel_x;           /* (max_seqs, D) final-normed rows for the LM head */
    float *scores;          /* (n_threads, scores_per_thread) attention and L3 scratch */
    size_t scores_per_thread; /* max(ENG_CPU_ATTN_SCRATCH(group, max_ctx, hd), l3_max_chunks) */
} cpu_be;

#define CB(e) ((cpu_be *)(e)->be)

/* K (kind 0) or V (kind 1) row of layer l at offset off of block b: (kv_dim)
 * elements of e->kv_dtype. */
static inline unsigned char *kv_row(const eng_engine *e, int b, int l, int kind, int off)
{
    return CB(e)->kv + (size_t)b * e->block_kv_bytes +
           (((size_t)l * 2 + kind) * e->B + off) * e->kv_dim * CB(e)->kv_elem;
}

/* Writes one K or V row (kv_dim) into the pool, narrowing to bf16 if that is
 * what the pool keeps. */
static void kv_store(const eng_engine *e, unsigned char *dst, const float *src)
{
    if (e->kv_dtype == ENG_KV_BF16) {
        uint16_t *d = (uint16_t *)(void *)dst;
        for (int i = 0; i < e->kv_dim; i++) d[i] = eng__f32_to_bf16(src[i]);
    } else {
        memcpy(dst, src, (size_t)e->kv_dim * sizeof(float));
    }
}

/* ---- the forward step ------------------------------------------------------ */

typedef struct step_ctx {
    eng_engine *e;
    const eng_plan *p;
    const eng_batch_item *items;
    int n_items;
    int T;
    int layer;
    const float *norm_w; /* RMSNorm weight for norm_task */
    const float *chunk_src; /* (T, D) rows chunk_task adds: x, or the embeddings */
    int chunk_l;            /* their place among the chunk sums: layer, or n_layers */
} step_ctx;

/* y (M, rows) = x l^T + b in the engine's cpu_math (linear.c). */
static void proj(eng_engine *e, const eng_linear *l, const float *x, int M, float *y)
{
    eng_cpu_linear(CB(e)->pool, l, x, M, y, e->prm.cpu_math);
}

static inline float silu(float v) { return v / (1.0f + expf(-v)); }

/* Router: lam (T, L) = softmax(W2 silu(W1 q + b1) + b2), in place on lam. */
static void router_softmax(eng_engine *e, int T)
{
    int L = e->levels;
    for (int t = 0; t < T; t++) {
        float *r = CB(e)->lam + (size_t)t * MAX_LEVELS;
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
    int slot = c->items[c->p->tok_item[t]].seq;
    const eng_seq *sq = &e->seqs[slot];
    int D = e->D, R = e->prm.l3_max_chunks, n = sq->l3_n;
    float *mem = CB(e)->mem + (size_t)t * D;
    if (n == 0) { memset(mem, 0, (size_t)D * sizeof(float)); return; }
    const float *x = CB(e)->x + (size_t)t * D;
    const float *mu = CB(e)->l3_mu + ((size_t)slot * e->n_layers + c->layer) * R * D;
    const float *kap = CB(e)->l3_kappa + ((size_t)slot * e->n_layers + c->layer) * R * D;
    float *sc = CB(e)->scores + (size_t)thread * CB(e)->scores_per_thread;
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
    float *s = CB(e)->ema + ((size_t)item->seq * e->n_layers + l) * D;
    int t0 = c->p->item_start[it];
    for (int j = 0; j < item->n_tokens; j++) {
        int t = t0 + j, pos = sq->n_tokens + j;
        const float *x = CB(e)->x + (size_t)t * D;
        const float *lam = CB(e)->lam + (size_t)t * MAX_LEVELS;
        float *f = CB(e)->f + (size_t)t * D;
        for (int i = d0; i < d1; i++) {
            s[i] = beta * s[i] + omb * x[i];
            f[i] = lam[0] * x[i] + lam[1] * s[i];
        }
        if (use_mem) {
            const float *mem = CB(e)->mem + (size_t)t * D;
            for (int i = d0; i < d1; i++) f[i] += lam[2] * mem[i];
        }
        if ((pos + 1) % e->B == 0) {
            float *ck = CB(e)->ema_ckpt + ((size_t)sq->blocks[pos / e->B] * e->n_layers + l) * D;
            memcpy(ck + d0, s + d0, (size_t)(d1 - d0) * sizeof(float));
        }
    }
}

/* L3 memory chunks (engine_priv.h, the step op): for one batch item and a
 * slice of the D dimensions, adds the item's rows of chunk_src to the slot's
 * running sums in position order, from zero at every multiple of C, and
 * writes sum / C where a row completes an emitted chunk.  One fixed order of
 * f32 additions per element, whatever the batch or the step boundaries, so
 * a chunk's bits do not depend on how its positions were stepped. */
static void chunk_task(void *vctx, int task, int thread)
{
    (void)thread;
    step_ctx *c = vctx;
    eng_engine *e = c->e;
    const int D = e->D, W = e->n_layers + 1, C = e->l3_C;
    int n_dc = (D + EMA_DCHUNK - 1) / EMA_DCHUNK;
    int it = task / n_dc, d0 = (task % n_dc) * EMA_DCHUNK;
    int d1 = d0 + EMA_DCHUNK < D ? d0 + EMA_DCHUNK : D;
    const eng_batch_item *item = &c->items[it];
    int pos0 = e->seqs[item->seq].n_tokens, t0 = c->p->item_start[it];
    float *acc = CB(e)->chunk_acc + ((size_t)item->seq * W + c->chunk_l) * D;
    for (int j = 0; j < item->n_tokens; j++) {
        int t = t0 + j, k = c->p->tok_chunk[t];
        const float *src = c->chunk_src + (size_t)t * D;
        if ((pos0 + j) % C == 0) memset(acc + d0, 0, (size_t)(d1 - d0) * sizeof(float));
        for (int i = d0; i < d1; i++) acc[i] += src[i];
        if (k >= 0) {
            float *out = c->p->chunk_out + ((size_t)k * W + c->chunk_l) * D;
            for (int i = d0; i < d1; i++) out[i] = acc[i] / (float)C;
        }
    }
}

/* Adds src (T, D) into the chunk sums at place l (a layer, or n_layers for
 * the embeddings), when the step captures chunks. */
static void chunk_sums(step_ctx *c, const float *src, int l)
{
    if (!c->p->tok_chunk) return;
    c->chunk_src = src;
    c->chunk_l = l;
    eng_pool_run(CB(c->e)->pool, c->n_items * ((c->e->D + EMA_DCHUNK - 1) / EMA_DCHUNK), chunk_task, c);
}

/* RoPE (rotate-half convention) on q and k of token t, and the K/V write into
 * the sequence's block for that position. */
static void rope_store_task(void *vctx, int t, int thread)
{
    (void)thread;
    step_ctx *c = vctx;
    eng_engine *e = c->e;
    const eng_model *m = e->m;
    const eng_batch_item *item = &c->items[c->p->tok_item[t]];
    eng_seq *sq = &e->seqs[item->seq];
    int hd = e->hd, half = hd / 2, pos = c->p->tok_pos[t];
    float *q = CB(e)->q + (size_t)t * e->q_dim, *k = CB(e)->k + (size_t)t * e->kv_dim;
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
    int blk = sq->blocks[pos / e->B];
    kv_store(e, kv_row(e, blk, c->layer, 0, pos % e->B), k);
    kv_store(e, kv_row(e, blk, c->layer, 1, pos % e->B), CB(e)->v + (size_t)t * e->kv_dim);
}

/* Causal GQA attention of token t over positions 0..pos of its sequence, for
 * the query heads of K/V head kvh (task = t * H_kv + kvh), reading K/V (the
 * stored, possibly rounded values) through the block table (attn.c). */
static void attn_task(void *vctx, int task, int thread)
{
    step_ctx *c = vctx;
    eng_engine *e = c->e;
    int Hkv = e->m->info.n_kv_heads, group = e->m->info.n_heads / Hkv;
    int t = task / Hkv, kvh = task % Hkv, hd = e->hd;
    size_t es = CB(e)->kv_elem;
    const eng_seq *sq = &e->seqs[c->items[c->p->tok_item[t]].seq];
    eng_cpu_attn a = {
        .q = CB(e)->q + (size_t)t * e->q_dim + (size_t)kvh * group * hd,
        .out = CB(e)->att + (size_t)t * e->q_dim + (size_t)kvh * group * hd,
        .sc = CB(e)->scores + (size_t)thread * CB(e)->scores_per_thread,
        .G = group, .hd = hd, .n = c->p->tok_pos[t] + 1, .B = e->B,
        .bf16 = e->kv_dtype == ENG_KV_BF16,
        .blocks = sq->blocks,
        .kv = CB(e)->kv,
        .block_bytes = e->block_kv_bytes,
        .k_off = ((size_t)c->layer * 2 * e->B * e->kv_dim + (size_t)kvh * hd) * es,
        .v_off = (((size_t)c->layer * 2 + 1) * e->B * e->kv_dim + (size_t)kvh * hd) * es,
        .row_bytes = (size_t)e->kv_dim * es,
        .scale = 1.0f / sqrtf((float)hd),
        .math = e->prm.cpu_math,
    };
    eng_cpu_attention(&a);
}

static void norm_task(void *vctx, int t, int thread)
{
    (void)thread;
    step_ctx *c = vctx;
    eng_engine *e = c->e;
    eng_cpu_rmsnorm(CB(e)->h + (size_t)t * e->D, c->norm_w, 1, e->D,
                    e->m->rms_eps, CB(e)->x + (size_t)t * e->D);
}

/* Element-wise work over T rows, split by rows over the pool (no reduction:
 * the split cannot change a bit). */
#define EW_ROWS 8
typedef struct ew_ctx {
    eng_engine *e;
    int T, op;      /* EW_SWIGLU: gate = silu(gate) * up; EW_ADD: h += tmp */
} ew_ctx;
enum { EW_SWIGLU, EW_ADD };

static void ew_task(void *vctx, int task, int thread)
{
    (void)thread;
    const ew_ctx *c = vctx;
    cpu_be *cb = CB(c->e);
    int t0 = task * EW_ROWS, t1 = t0 + EW_ROWS < c->T ? t0 + EW_ROWS : c->T;
    if (c->op == EW_SWIGLU) {
        size_t F = (size_t)c->e->F;
        for (size_t i = (size_t)t0 * F; i < (size_t)t1 * F; i++) cb->gate[i] = silu(cb->gate[i]) * cb->up[i];
    } else {
        size_t D = (size_t)c->e->D;
        for (size_t i = (size_t)t0 * D; i < (size_t)t1 * D; i++) cb->h[i] += cb->tmp[i];
    }
}

static void elementwise(eng_engine *e, int T, int op)
{
    ew_ctx c = { e, T, op };
    eng_pool_run(CB(e)->pool, (T + EW_ROWS - 1) / EW_ROWS, ew_task, &c);
}

static void layer_forward(step_ctx *c, int l)
{
    eng_engine *e = c->e;
    const eng_layer *L = &e->m->layers[l];
    int T = c->T, D = e->D;
    c->layer = l;

    c->norm_w = L->attn_norm;
    eng_pool_run(CB(e)->pool, T, norm_task, c);                    /* x = RMSNorm(h) */
    chunk_sums(c, CB(e)->x, l);
    proj(e, &L->q, CB(e)->x, T, CB(e)->q);             /* q (T, H*d) */
    const float *fused = CB(e)->x;
    if (e->levels > 0) {
        proj(e, &L->router1, CB(e)->q, T, CB(e)->rh);  /* (T, D/2) */
        for (size_t i = 0; i < (size_t)T * L->router1.rows; i++) CB(e)->rh[i] = silu(CB(e)->rh[i]);
        proj(e, &L->router2, CB(e)->rh, T, CB(e)->tmp); /* (T, L) */
        for (int t = 0; t < T; t++)
            memcpy(CB(e)->lam + (size_t)t * MAX_LEVELS, CB(e)->tmp + (size_t)t * e->levels,
                   (size_t)e->levels * sizeof(float));
        router_softmax(e, T);
        if (e->levels == 3) eng_pool_run(CB(e)->pool, T, l3_task, c);
        int n_dc = (D + EMA_DCHUNK - 1) / EMA_DCHUNK;
        eng_pool_run(CB(e)->pool, c->n_items * n_dc, ema_task, c);
        fused = CB(e)->f;
    }
    proj(e, &L->k, fused, T, CB(e)->k);
    proj(e, &L->v, fused, T, CB(e)->v);
    eng_pool_run(CB(e)->pool, T, rope_store_task, c);
    eng_pool_run(CB(e)->pool, T * e->m->info.n_kv_heads, attn_task, c);
    proj(e, &L->o, CB(e)->att, T, CB(e)->tmp);
    elementwise(e, T, EW_ADD);                                       /* h += o */

    c->norm_w = L->mlp_norm;
    eng_pool_run(CB(e)->pool, T, norm_task, c);
    proj(e, &L->gate, CB(e)->x, T, CB(e)->gate);
    proj(e, &L->up, CB(e)->x, T, CB(e)->up);
    elementwise(e, T, EW_SWIGLU);
    proj(e, &L->down, CB(e)->gate, T, CB(e)->tmp);
    elementwise(e, T, EW_ADD);
}

static int cpu_step(eng_engine *e, const eng_plan *p, char *err, size_t errlen)
{
    (void)err; (void)errlen;
    cpu_be *cb = CB(e);
    int T = p->T, D = e->D;
    for (int t = 0; t < T; t++) eng__linear_row(&e->m->embed, p->tok[t], cb->h + (size_t)t * D);
    step_ctx c = { e, p, p->items, p->n_items, T, 0, NULL, NULL, 0 };
    chunk_sums(&c, cb->h, e->n_layers); /* h holds the embeddings until layer 0 adds to it */
    for (int l = 0; l < e->n_layers; l++) layer_forward(&c, l);
    /* Final norm and LM head, only for the rows whose logits were asked for. */
    for (int i = 0; i < p->n_sel; i++)
        eng_cpu_rmsnorm(cb->h + (size_t)p->sel_row[i] * D, e->m->final_norm, 1, D, e->m->rms_eps,
                        cb->sel_x + (size_t)i * D);
    if (p->n_sel > 0) proj(e, &e->m->lm_head, cb->sel_x, p->n_sel, p->logits);
    return ENG_OK;
}

static void *xcalloc(size_t n, size_t sz, int *fail)
{
    if (n == 0) n = 1;
    void *p = calloc(n, sz);
    if (!p) *fail = 1;
    return p;
}

static void cpu_fini(eng_engine *e)
{
    cpu_be *cb = CB(e);
    if (!cb) return;
    eng_pool_free(cb->pool);
    free(cb->kv); free(cb->ema_ckpt); free(cb->ema); free(cb->l3_mu); free(cb->l3_kappa); free(cb->chunk_acc);
    free(cb->h); free(cb->x); free(cb->f); free(cb->mem); free(cb->q); free(cb->k); free(cb->v);
    free(cb->att); free(cb->tmp); free(cb->gate); free(cb->up); free(cb->rh); free(cb->lam);
    free(cb->sel_x); free(cb->scores);
    free(cb);
    e->be = NULL;
}

static int cpu_init(eng_engine *e, char *err, size_t errlen)
{
    const eng_params *p = &e->prm;
    cpu_be *cb = calloc(1, sizeof *cb);
    if (!cb) return ENG_ENOMEM;
    e->be = cb;
    /* K/V in the model's dtype: bf16 for a bf16 checkpoint, else f32 (an
     * f16 checkpoint's K/V would lose bits in bf16 and there is no f16 pool). */
    e->kv_dtype = strcmp(e->m->info.dtype, "bf16") == 0 ? ENG_KV_BF16 : ENG_KV_F32;
    cb->kv_elem = e->kv_dtype == ENG_KV_BF16 ? 2 : 4;
    e->be_mem_avail = 0;
    int fail = 0;
    if (eng_pool_create(p->n_threads, &cb->pool) != ENG_OK) fail = 1;
    size_t ld = (size_t)e->n_layers * e->D;
    cb->ema = xcalloc((size_t)p->max_seqs * ld, sizeof(float), &fail);
    if (p->l3_max_chunks > 0) {
        cb->l3_mu = xcalloc((size_t)p->max_seqs * ld * p->l3_max_chunks, sizeof(float), &fail);
        cb->l3_kappa = xcalloc((size_t)p->max_seqs * ld * p->l3_max_chunks, sizeof(float), &fail);
    }
    if (p->l3_capture)
        cb->chunk_acc = xcalloc((size_t)p->max_seqs * (e->n_layers + 1) * e->D, sizeof(float), &fail);
    size_t T = (size_t)p->max_batch_tokens;
    size_t wide = (size_t)(e->q_dim > e->D ? e->q_dim : e->D);
    cb->h = xcalloc(T * e->D, sizeof(float), &fail);
    cb->x = xcalloc(T * e->D, sizeof(float), &fail);
    cb->f = xcalloc(T * e->D, sizeof(float), &fail);
    cb->mem = xcalloc(T * e->D, sizeof(float), &fail);
    cb->q = xcalloc(T * e->q_dim, sizeof(float), &fail);
    cb->k = xcalloc(T * e->kv_dim, sizeof(float), &fail);
    cb->v = xcalloc(T * e->kv_dim, sizeof(float), &fail);
    cb->att = xcalloc(T * e->q_dim, sizeof(float), &fail);
    cb->tmp = xcalloc(T * wide, sizeof(float), &fail);
    cb->gate = xcalloc(T * e->F, sizeof(float), &fail);
    cb->up = xcalloc(T * e->F, sizeof(float), &fail);
    cb->rh = xcalloc(T * (e->D / 2 > 0 ? e->D / 2 : 1), sizeof(float), &fail);
    cb->lam = xcalloc(T * MAX_LEVELS, sizeof(float), &fail);
    cb->sel_x = xcalloc((size_t)p->max_seqs * e->D, sizeof(float), &fail);
    size_t att = ENG_CPU_ATTN_SCRATCH(e->m->info.n_heads / e->m->info.n_kv_heads, p->max_ctx, e->hd);
    cb->scores_per_thread = att > (size_t)p->l3_max_chunks ? att : (size_t)p->l3_max_chunks;
    cb->scores = xcalloc((size_t)p->n_threads * cb->scores_per_thread, sizeof(float), &fail);
    if (fail) {
        cpu_fini(e);
        return eng__errf(err, errlen, ENG_ENOMEM, "engine: cannot allocate step buffers for %d tokens",
                         p->max_batch_tokens);
    }
    return ENG_OK;
}

static int cpu_pool_alloc(eng_engine *e, char *err, size_t errlen)
{
    cpu_be *cb = CB(e);
    int fail = 0;
    cb->kv = xcalloc((size_t)e->prm.n_blocks, e->block_kv_bytes, &fail);
    cb->ema_ckpt = xcalloc((size_t)e->prm.n_blocks * e->n_layers * e->D, sizeof(float), &fail);
    if (fail)
        return eng__errf(err, errlen, ENG_ENOMEM, "engine: cannot allocate %d K/V blocks (%zu MiB)",
                         e->prm.n_blocks, (size_t)e->prm.n_blocks * e->block_kv_bytes >> 20);
    return ENG_OK;
}

static int cpu_ema_reset(eng_engine *e, int seq, int block, char *err, size_t errlen)
{
    (void)err; (void)errlen;
    size_t ld = (size_t)e->n_layers * e->D;
    float *s = CB(e)->ema + (size_t)seq * ld;
    if (block < 0)
        memset(s, 0, ld * sizeof(float));
    else
        memcpy(s, CB(e)->ema_ckpt + (size_t)block * ld, ld * sizeof(float));
    return ENG_OK;
}

static int cpu_ema_get(eng_engine *e, int seq, float *ema, char *err, size_t errlen)
{
    (void)err; (void)errlen;
    size_t ld = (size_t)e->n_layers * e->D;
    memcpy(ema, CB(e)->ema + (size_t)seq * ld, ld * sizeof(float));
    return ENG_OK;
}

static int cpu_ema_set(eng_engine *e, int seq, const float *ema, char *err, size_t errlen)
{
    (void)err; (void)errlen;
    size_t ld = (size_t)e->n_layers * e->D;
    memcpy(CB(e)->ema + (size_t)seq * ld, ema, ld * sizeof(float));
    return ENG_OK;
}

static int cpu_l3_set(eng_engine *e, int seq, int n, const float *mu, char *err, size_t errlen)
{
    (void)err; (void)errlen;
    /* Stored per layer as (R, D) so that one layer's bank is contiguous for
     * the read; the key is mu / |mu| (zero for a zero chunk). */
    int D = e->D, R = e->prm.l3_max_chunks;
    for (int r = 0; r < n; r++) {
        for (int l = 0; l < e->n_layers; l++) {
            const float *src = mu + ((size_t)r * e->n_layers + l) * D;
            size_t off = (((size_t)seq * e->n_layers + l) * R + r) * D;
            float *dm = CB(e)->l3_mu + off, *dk = CB(e)->l3_kappa + off;
            memcpy(dm, src, (size_t)D * sizeof(float));
            float nrm = sqrtf(eng_cpu_dot(dm, dm, D));
            for (int i = 0; i < D; i++) dk[i] = nrm > 0.0f ? dm[i] / nrm : 0.0f;
        }
    }
    return ENG_OK;
}

static int cpu_block_get(eng_engine *e, int block, void *kv, float *ema, char *err, size_t errlen)
{
    (void)err; (void)errlen;
    size_t ld = (size_t)e->n_layers * e->D;
    if (kv) memcpy(kv, kv_row(e, block, 0, 0, 0), e->block_kv_bytes);
    if (ema) memcpy(ema, CB(e)->ema_ckpt + (size_t)block * ld, ld * sizeof(float));
    return ENG_OK;
}

static int cpu_block_set(eng_engine *e, int block, const void *kv, const float *ema, char *err, size_t errlen)
{
    (void)err; (void)errlen;
    size_t ld = (size_t)e->n_layers * e->D;
    if (kv) memcpy(kv_row(e, block, 0, 0, 0), kv, e->block_kv_bytes);
    if (ema) memcpy(CB(e)->ema_ckpt + (size_t)block * ld, ema, ld * sizeof(float));
    return ENG_OK;
}

const eng_backend eng_backend_cpu = {
    .name = "cpu",
    .init = cpu_init,
    .pool_alloc = cpu_pool_alloc,
    .fini = cpu_fini,
    .step = cpu_step,
    .ema_reset = cpu_ema_reset,
    .ema_get = cpu_ema_get,
    .ema_set = cpu_ema_set,
    .l3_set = cpu_l3_set,
    .block_get = cpu_block_get,
    .block_set = cpu_block_set,
};
