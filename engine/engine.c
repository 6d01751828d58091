/*
 * engine.c — the backend-neutral engine core: parameters, sequence slots,
 * block tables, the free-block list and block sharing (fork), step validation
 * and batch packing.
 * The numbers (weights in the backend's form, the K/V pool, EMA state, the
 * forward pass) live behind e->ops (engine_priv.h): engine/cpu/backend.c, the
 * reference, or engine/cuda/ when built with CUDA and chosen at run time.
 */
#include "config.h"

#include <assert.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "engine_priv.h"

eng_params eng_default_params(void)
{
    eng_params p = {0};
    p.backend = ENG_BACKEND_AUTO;
    p.n_threads = 0;
    p.block_size = 32;
    p.n_blocks = 0;
    p.kv_mem_mb = 0;
    p.max_seqs = 16;
    p.max_ctx = 0;
    p.max_batch_tokens = 512;
    p.l3_max_chunks = 0;
    p.l3_capture = 0;
    return p;
}

int eng_backend_parse(const char *name, int *backend)
{
    if (!name) return ENG_EINVAL;
    if (!strcmp(name, "auto")) *backend = ENG_BACKEND_AUTO;
    else if (!strcmp(name, "cpu")) *backend = ENG_BACKEND_CPU;
    else if (!strcmp(name, "cuda")) *backend = ENG_BACKEND_CUDA;
    else return ENG_EINVAL;
    return ENG_OK;
}

int eng_cpu_math_parse(const char *name, int *math)
{
    if (!name) return ENG_EINVAL;
    if (!strcmp(name, "exact")) *math = ENG_CPU_MATH_EXACT;
    else if (!strcmp(name, "fast")) *math = ENG_CPU_MATH_FAST;
    else return ENG_EINVAL;
    return ENG_OK;
}

int eng_backend_available(int backend)
{
    switch (backend) {
    case ENG_BACKEND_AUTO:
    case ENG_BACKEND_CPU: return 1;
#ifdef HAVE_CUDA
    case ENG_BACKEND_CUDA: return eng_cuda_device_present();
#endif
    default: return 0;
    }
}

const char *eng_backend_name(const eng_engine *e) { return e->ops->name; }

static void *xcalloc(size_t n, size_t sz, int *fail)
{
    if (n == 0) n = 1;
    void *p = calloc(n, sz);
    if (!p) *fail = 1;
    return p;
}

static const eng_backend *pick_backend(int want, char *err, size_t errlen, int *rc)
{
    *rc = ENG_OK;
#ifdef HAVE_CUDA
    if (want == ENG_BACKEND_CUDA || want == ENG_BACKEND_AUTO) {
        if (eng_cuda_device_present()) return &eng_backend_cuda;
        if (want == ENG_BACKEND_CUDA) {
            *rc = eng__errf(err, errlen, ENG_EUNSUPPORTED,
                            "engine: backend cuda asked for, but no CUDA device answers "
                            "(check nvidia-smi and the device permissions)");
            return NULL;
        }
    }
#else
    if (want == ENG_BACKEND_CUDA) {
        *rc = eng__errf(err, errlen, ENG_EUNSUPPORTED,
                        "engine: backend cuda asked for, but this build has no CUDA backend "
                        "(configure --with-cuda=yes on a machine with the CUDA toolkit)");
        return NULL;
    }
#endif
    if (want != ENG_BACKEND_AUTO && want != ENG_BACKEND_CPU && want != ENG_BACKEND_CUDA) {
        *rc = eng__errf(err, errlen, ENG_EINVAL, "engine: unknown backend %d", want);
        return NULL;
    }
    return &eng_backend_cpu;
}

int eng_create(const eng_model *m, const eng_params *params, eng_engine **out, char *err,
               size_t errlen)
{
    *out = NULL;
    if (!m) return eng__errf(err, errlen, ENG_EINVAL, "eng_create: no model");
    eng_params p = params ? *params : eng_default_params();
    const eng_model_info *mi = &m->info;
    int rc;
    const eng_backend *ops = pick_backend(p.backend, err, errlen, &rc);
    if (!ops) return rc;
    p.backend = ops == &eng_backend_cpu ? ENG_BACKEND_CPU : ENG_BACKEND_CUDA;

    if (p.n_threads <= 0) {
        long n = sysconf(_SC_NPROCESSORS_ONLN);
        p.n_threads = n > 0 ? (int)n : 1;
    }
    if (p.block_size <= 0) p.block_size = 32;
    if (p.max_seqs <= 0) p.max_seqs = 16;
    if (p.max_ctx <= 0) p.max_ctx = mi->max_position < 8192 ? mi->max_position : 8192;
    if (p.max_batch_tokens <= 0) p.max_batch_tokens = 512;
    if (p.kv_mem_mb < 0) p.kv_mem_mb = 0;
    if (p.l3_max_chunks <= 0) p.l3_max_chunks = mi->mka_levels == 3 ? mi->l3_top_r : 0;
    if (mi->mka_levels != 3) p.l3_max_chunks = 0;
    p.l3_capture = p.l3_capture != 0;
    if (p.n_threads > 256 || p.block_size > 4096 || p.max_seqs > 65536 || p.max_ctx > (1 << 24) ||
        p.max_batch_tokens > (1 << 20))
        return eng__errf(err, errlen, ENG_EINVAL,
                         "engine: parameters out of range (n_threads <= 256, block_size <= 4096, "
                         "max_seqs <= 65536, max_ctx <= 2^24, max_batch_tokens <= 2^20)");
    if (p.cpu_math != ENG_CPU_MATH_EXACT && p.cpu_math != ENG_CPU_MATH_FAST)
        return eng__errf(err, errlen, ENG_EINVAL, "engine: unknown cpu_math %d", p.cpu_math);
    /* fast needs bf16 weights (f32 ones take the exact kernels anyway) */
    if (p.backend != ENG_BACKEND_CPU || !eng_cpu_math_available(p.cpu_math) || strcmp(mi->dtype, "bf16") != 0)
        p.cpu_math = ENG_CPU_MATH_EXACT;

    eng_engine *e = calloc(1, sizeof *e);
    if (!e) return ENG_ENOMEM;
    e->m = m;
    e->ops = ops;
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
    e->l3_C = mi->l3_chunk_tokens > 0 ? mi->l3_chunk_tokens : 64;
    /* An item of n tokens completes at most n / C + 1 chunks, and at most
     * one per token. */
    if (p.l3_capture) {
        int most = p.max_batch_tokens / e->l3_C + p.max_seqs;
        e->max_step_chunks = most < p.max_batch_tokens ? most : p.max_batch_tokens;
    }
    e->prm = p;

    /* The backend first: it says how K/V are stored and how much memory the
     * pool may take (free device memory after the weights on CUDA). */
    if ((rc = ops->init(e, err, errlen)) != ENG_OK) {
        eng_free(e);
        return rc;
    }
    size_t elem = e->kv_dtype == ENG_KV_BF16 ? 2 : 4;
    e->block_kv_bytes = (size_t)e->n_layers * 2 * e->B * e->kv_dim * elem;
    size_t per_block = e->block_kv_bytes + (size_t)e->n_layers * e->D * sizeof(float);
    if (p.n_blocks <= 0) {
        size_t want = (size_t)p.max_seqs * e->max_blocks_per_seq;
        size_t budget;
        if (p.kv_mem_mb > 0) budget = (size_t)p.kv_mem_mb << 20;
        else if (e->be_mem_avail > 0) budget = e->be_mem_avail / 10 * 9;
        else budget = (size_t)1024 << 20;
        if (e->be_mem_avail > 0 && budget > e->be_mem_avail) budget = e->be_mem_avail;
        size_t cap = budget / per_block;
        if (cap < 1) cap = 1;
        size_t n = want < cap ? want : cap;
        p.n_blocks = n < (size_t)INT_MAX ? (int)n : INT_MAX;
    }
    p.kv_mem_mb = (int)(((size_t)p.n_blocks * per_block + (1u << 20) - 1) >> 20);
    e->prm = p;

    int fail = 0;
    e->block_table = xcalloc((size_t)p.max_seqs * e->max_blocks_per_seq, sizeof(int), &fail);
    e->free_blocks = xcalloc((size_t)p.n_blocks, sizeof(int), &fail);
    e->block_ref = xcalloc((size_t)p.n_blocks, sizeof(int), &fail);
    e->seqs = xcalloc((size_t)p.max_seqs, sizeof(eng_seq), &fail);
    for (int s = 0; !fail && s < p.max_seqs; s++) {
        eng_seq *sq = &e->seqs[s];
        sq->tokens = xcalloc((size_t)p.max_ctx, sizeof(int32_t), &fail);
        sq->blocks = e->block_table + (size_t)s * e->max_blocks_per_seq;
        if (p.l3_max_chunks > 0)
            sq->l3_mu = xcalloc((size_t)p.l3_max_chunks * e->n_layers * e->D, sizeof(float), &fail);
    }
    size_t T = (size_t)p.max_batch_tokens;
    e->tok = xcalloc(T, sizeof(int32_t), &fail);
    e->tok_item = xcalloc(T, sizeof(int), &fail);
    e->tok_pos = xcalloc(T, sizeof(int), &fail);
    e->item_start = xcalloc((size_t)p.max_seqs, sizeof(int), &fail);
    e->sel_row = xcalloc((size_t)p.max_seqs, sizeof(int), &fail);
    e->sel_logits = xcalloc((size_t)p.max_seqs * e->V, sizeof(float), &fail);
    e->sel_argmax = xcalloc((size_t)p.max_seqs, sizeof(int32_t), &fail);
    e->seen_seq = xcalloc((size_t)p.max_seqs, sizeof(unsigned char), &fail);
    e->stage_kv = xcalloc(e->block_kv_bytes, 1, &fail);
    e->stage_ema = xcalloc((size_t)e->n_layers * e->D, sizeof(float), &fail);
    if (p.l3_capture) {
        size_t per = (size_t)(e->n_layers + 1) * e->D;
        e->tok_chunk = xcalloc(T, sizeof(int), &fail);
        e->chunk_vals = xcalloc((size_t)e->max_step_chunks * per, sizeof(float), &fail);
        e->chunks = xcalloc((size_t)e->max_step_chunks, sizeof(eng_chunk), &fail);
        for (int c = 0; !fail && c < e->max_step_chunks; c++) {
            e->chunks[c].mu = e->chunk_vals + (size_t)c * per;
            e->chunks[c].emb = e->chunks[c].mu + (size_t)e->n_layers * e->D;
        }
    }
    if (fail) {
        eng_free(e);
        return eng__errf(err, errlen, ENG_ENOMEM, "engine: cannot allocate sequence tables for %d slots",
                         p.max_seqs);
    }
    if ((rc = ops->pool_alloc(e, err, errlen)) != ENG_OK) {
        eng_free(e);
        return rc;
    }
    for (int b = 0; b < p.n_blocks; b++) e->free_blocks[b] = p.n_blocks - 1 - b;
    e->n_free = p.n_blocks;
    *out = e;
    return ENG_OK;
}

void eng_free(eng_engine *e)
{
    if (!e) return;
    if (e->ops && e->ops->fini) e->ops->fini(e);
    if (e->seqs) {
        for (int s = 0; s < e->prm.max_seqs; s++) {
            free(e->seqs[s].tokens);
            free(e->seqs[s].l3_mu);
        }
    }
    free(e->seqs);
    free(e->block_table);
    free(e->free_blocks);
    free(e->block_ref);
    free(e->tok); free(e->tok_item); free(e->tok_pos); free(e->item_start); free(e->sel_row);
    free(e->sel_logits); free(e->sel_argmax); free(e->seen_seq); free(e->stage_kv); free(e->stage_ema);
    free(e->tok_chunk); free(e->chunk_vals); free(e->chunks);
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
    out->kv_bytes = (size_t)e->prm.n_blocks * (e->block_kv_bytes + (size_t)e->n_layers * e->D * sizeof(float));
    out->kv_dtype = e->kv_dtype == ENG_KV_BF16 ? "bf16" : "f32";
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
        int rc = e->ops->ema_reset(e, s, -1, NULL, 0);
        if (rc != ENG_OK) return rc;
        sq->in_use = 1;
        sq->n_tokens = 0;
        sq->n_blocks = 0;
        sq->l3_n = 0;
        sq->chunk_from = 0;
        *seq = s;
        return ENG_OK;
    }
    return ENG_ENOSPC;
}

int eng__block_push(eng_engine *e, eng_seq *sq)
{
    int b = e->free_blocks[--e->n_free];
    e->block_ref[b] = 1;
    sq->blocks[sq->n_blocks++] = b;
    return b;
}

void eng__blocks_release(eng_engine *e, eng_seq *sq, int keep)
{
    while (sq->n_blocks > keep) {
        int b = sq->blocks[--sq->n_blocks];
        if (--e->block_ref[b] == 0) e->free_blocks[e->n_free++] = b;
    }
}

void eng_seq_free(eng_engine *e, int seq)
{
    eng_seq *sq = eng__seq(e, seq);
    if (!sq) return;
    eng__blocks_release(e, sq, 0);
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
    int rc = e->ops->ema_reset(e, seq, n == 0 ? -1 : sq->blocks[n / e->B - 1], NULL, 0);
    if (rc != ENG_OK) return rc;
    eng__blocks_release(e, sq, n / e->B);
    sq->n_tokens = n;
    eng__chunks_restart(e, sq);
    return ENG_OK;
}

int eng_seq_fork(eng_engine *e, int src, int dst, int n_tokens)
{
    eng_seq *s = eng__seq(e, src), *d = eng__seq(e, dst);
    if (!s || !d || src == dst || d->n_tokens != 0 || n_tokens < 0 || n_tokens > s->n_tokens)
        return ENG_EINVAL;
    int n_full = n_tokens / e->B, tail = n_tokens % e->B != 0;
    if (tail && n_tokens != s->n_tokens) return ENG_EINVAL; /* no EMA state to start from */
    if (tail && e->n_free < 1) return ENG_ENOSPC;
    int rc = e->ops->l3_set(e, dst, s->l3_n, s->l3_mu, NULL, 0);
    if (rc != ENG_OK) return rc;
    /* Full blocks are shared; a partial last block is copied, since dst will
     * write into it. */
    for (int i = 0; i < n_full; i++) {
        d->blocks[d->n_blocks++] = s->blocks[i];
        e->block_ref[s->blocks[i]]++;
    }
    if (tail) {
        int b = eng__block_push(e, d);
        if ((rc = e->ops->block_get(e, s->blocks[n_full], e->stage_kv, NULL, NULL, 0)) != ENG_OK ||
            (rc = e->ops->block_set(e, b, e->stage_kv, NULL, NULL, 0)) != ENG_OK ||
            (rc = e->ops->ema_get(e, src, e->stage_ema, NULL, 0)) != ENG_OK ||
            (rc = e->ops->ema_set(e, dst, e->stage_ema, NULL, 0)) != ENG_OK)
            goto fail;
    } else if ((rc = e->ops->ema_reset(e, dst, n_full > 0 ? s->blocks[n_full - 1] : -1, NULL, 0)) != ENG_OK) {
        goto fail;
    }
    memcpy(d->tokens, s->tokens, (size_t)n_tokens * sizeof(int32_t));
    if (s->l3_n > 0) memcpy(d->l3_mu, s->l3_mu, (size_t)s->l3_n * e->n_layers * e->D * sizeof(float));
    d->l3_n = s->l3_n;
    d->n_tokens = n_tokens;
    eng__chunks_restart(e, d);
    return ENG_OK;
fail: /* back to an empty dst with its own bank */
    eng__blocks_release(e, d, 0);
    e->ops->ema_reset(e, dst, -1, NULL, 0);
    e->ops->l3_set(e, dst, d->l3_n, d->l3_mu, NULL, 0);
    return rc;
}

int eng_seq_set_l3_bank(eng_engine *e, int seq, int n_chunks, const float *mu)
{
    eng_seq *sq = eng__seq(e, seq);
    if (!sq || sq->n_tokens != 0 || n_chunks < 0) return ENG_EINVAL;
    if (n_chunks > 0 && (e->levels != 3 || !mu)) return ENG_EINVAL;
    if (n_chunks > e->prm.l3_max_chunks) return ENG_ERANGE;
    int rc = e->ops->l3_set(e, seq, n_chunks, mu, NULL, 0);
    if (rc != ENG_OK) return rc;
    if (n_chunks > 0)
        memcpy(sq->l3_mu, mu, (size_t)n_chunks * e->n_layers * e->D * sizeof(float));
    sq->l3_n = n_chunks;
    return ENG_OK;
}

/* ---- the forward step ------------------------------------------------------ */

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

/* Marks the rows of item `it` (sequence sq, first row t0) that complete an
 * L3 memory chunk to be emitted: the chunk's last position is among them
 * and its first is at or after sq->chunk_from.  Chunks are numbered on
 * from n_chunks; returns the new count. */
static int plan_chunks(eng_engine *e, const eng_seq *sq, const eng_batch_item *it, int t0, int n_chunks)
{
    const int C = e->l3_C;
    for (int j = 0; j < it->n_tokens; j++) {
        int pos = sq->n_tokens + j;
        e->tok_chunk[t0 + j] = -1;
        if ((pos + 1) % C != 0 || pos + 1 - C < sq->chunk_from) continue;
        assert(n_chunks < e->max_step_chunks);
        e->chunks[n_chunks].seq = it->seq;
        e->chunks[n_chunks].index = pos / C;
        e->tok_chunk[t0 + j] = n_chunks++;
    }
    return n_chunks;
}

int eng_step_chunks(const eng_engine *e, const eng_chunk **out)
{
    if (out) *out = e->n_chunks > 0 ? e->chunks : NULL;
    return e->n_chunks;
}

int eng_step(eng_engine *e, const eng_batch_item *items, int n_items, char *err, size_t errlen)
{
    e->n_chunks = 0;
    int rc = validate_step(e, items, n_items, err, errlen);
    if (rc != ENG_OK) return rc;

    /* Pack the tokens and take the blocks the new positions need. */
    int T = 0, n_sel = 0, n_chunks = 0, want_logits = 0, want_argmax = 0;
    for (int i = 0; i < n_items; i++) {
        const eng_batch_item *it = &items[i];
        eng_seq *sq = &e->seqs[it->seq];
        e->item_start[i] = T;
        int need = (sq->n_tokens + it->n_tokens + e->B - 1) / e->B;
        /* The block the first new position lands in must be this sequence's
         * alone: only full blocks are ever shared. */
        assert(sq->n_tokens % e->B == 0 || e->block_ref[sq->blocks[sq->n_tokens / e->B]] == 1);
        while (sq->n_blocks < need) eng__block_push(e, sq);
        for (int j = 0; j < it->n_tokens; j++, T++) {
            e->tok[T] = it->tokens[j];
            e->tok_item[T] = i;
            e->tok_pos[T] = sq->n_tokens + j;
        }
        if (it->logits || it->argmax) e->sel_row[n_sel++] = T - 1;
        want_logits |= it->logits != NULL;
        want_argmax |= it->argmax != NULL;
        if (e->tok_chunk) n_chunks = plan_chunks(e, sq, it, e->item_start[i], n_chunks);
    }
    /* A backend without its own argmax hands the logits to the core, which
     * takes the argmax from them. */
    const int be_argmax = want_argmax && e->ops->argmax;
    eng_plan plan = { items, n_items, T, e->tok, e->tok_item, e->tok_pos, e->item_start,
                      n_sel, e->sel_row, e->sel_logits, want_logits || !be_argmax,
                      be_argmax ? e->sel_argmax : NULL, e->tok_chunk, n_chunks, e->chunk_vals };
    if ((rc = e->ops->step(e, &plan, err, errlen)) != ENG_OK) {
        /* Give back the blocks taken for positions that were not computed. */
        for (int i = 0; i < n_items; i++) {
            eng_seq *sq = &e->seqs[items[i].seq];
            eng__blocks_release(e, sq, (sq->n_tokens + e->B - 1) / e->B);
        }
        return rc;
    }

    /* Commit the tokens to their sequences; hand out the logits. */
    e->n_chunks = n_chunks;
    for (int i = 0, r = 0; i < n_items; i++) {
        eng_seq *sq = &e->seqs[items[i].seq];
        memcpy(sq->tokens + sq->n_tokens, items[i].tokens, (size_t)items[i].n_tokens * sizeof(int32_t));
        sq->n_tokens += items[i].n_tokens;
        if (!items[i].logits && !items[i].argmax) continue;
        const float *row = e->sel_logits + (size_t)r * e->V;
        if (items[i].logits) memcpy(items[i].logits, row, (size_t)e->V * sizeof(float));
        if (items[i].argmax) *items[i].argmax = be_argmax ? e->sel_argmax[r] : eng__argmax(row, e->V);
        r++;
    }
    return ENG_OK;
}
