/*
 * backend.cu — the CUDA backend of the engine (eng_backend_cuda): weights on
 * the first GPU in bf16, a paged bf16 K/V pool, per-slot EMA state and L3
 * banks on the device, and the batched FastMKA forward step (FASTMKA.md,
 * "Decoder layer") as one sequence of cuBLAS GEMMs and kernels (kernels.cu)
 * per step on one stream.
 *
 * The engine thread owns the stream and the cuBLAS handle; nothing here is
 * called concurrently.  Everything a step touches is allocated in init and
 * pool_alloc; step allocates nothing.  A CUDA or cuBLAS failure returns
 * ENG_EDEVICE with the failing call, file and line, and leaves the engine
 * unusable (the daemon exits).
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "attn_plan.h"
#include "cuda_priv.h"

int eng__cu_pdl;

#define MIB (1024.0 * 1024.0)
/* Pinned staging for the weight upload: two buffers, so that the host fills
 * one while the other is being copied. */
#define STAGE_BYTES ((size_t)32 << 20)
/* Device memory kept free for the CUDA context, cuBLAS and fragmentation. */
#define RESERVE_BYTES ((size_t)512 << 20)
/* cuBLAS workspace (the size NVIDIA recommends for Hopper). */
#define BLAS_WS_BYTES ((size_t)32 << 20)

/* ---- device detection ------------------------------------------------------ */

extern "C" int eng_cuda_device_present(void)
{
    /* Asked once: a failing driver query is slow and its answer does not
     * change while the process runs.  Callers are on the creating thread. */
    static int present = -1;
    if (present < 0) {
        int n = 0;
        present = cudaGetDeviceCount(&n) == cudaSuccess && n > 0 && cudaSetDevice(0) == cudaSuccess;
        if (!present) (void)cudaGetLastError(); /* do not leave the error for later calls */
    }
    return present;
}

/* ---- arena layout ------------------------------------------------------------ */

/* Places buffers one after another at 256-byte alignment (what cuBLAS and
 * 16-byte vector loads want).  Run once from base 0 to size the arena and
 * once from the real base to hand out the views; the arithmetic is on
 * integers, so the sizing pass dereferences nothing. */
typedef struct bump {
    uintptr_t base;
    size_t off;  /* bytes placed so far, with padding */
    size_t used; /* bytes asked for, without padding */
} bump;

static void *take(bump *b, size_t bytes)
{
    size_t o = (b->off + 255) & ~(size_t)255;
    b->off = o + bytes;
    b->used += bytes;
    return (void *)(b->base + o);
}

static float *take_f32(bump *b, size_t n) { return (float *)take(b, n * sizeof(float)); }
static bf16 *take_bf16(bump *b, size_t n) { return (bf16 *)take(b, n * sizeof(bf16)); }

static void take_linear(bump *b, cu_linear *l, int rows, int cols, int bias)
{
    l->rows = rows;
    l->cols = cols;
    l->w = take_bf16(b, (size_t)rows * cols);
    l->b = bias ? take_f32(b, (size_t)rows) : NULL;
}

/* Tied embeddings: lm_head is the same view as embed. */
static int lm_head_tied(const eng_model *m)
{
    return m->lm_head.w == m->embed.w && m->lm_head.w16 == m->embed.w16;
}

/* Places every weight; returns the arena's bytes (*content: without padding). */
static size_t layout_weights(cuda_state *cs, const eng_engine *e, uintptr_t base, size_t *content)
{
    const eng_model *m = e->m;
    const int D = e->D, F = e->F, qd = e->q_dim, kvd = e->kv_dim;
    bump b = {base, 0, 0};
    cs->embed = take_bf16(&b, (size_t)e->V * D);
    for (int l = 0; l < e->n_layers; l++) {
        const eng_layer *ml = &m->layers[l];
        cu_layer *L = &cs->layers[l];
        L->attn_norm = take_f32(&b, (size_t)D);
        L->mlp_norm = take_f32(&b, (size_t)D);
        take_linear(&b, &L->q, qd, D, ml->q.b != NULL);
        take_linear(&b, &L->kv, 2 * kvd, D, ml->k.b || ml->v.b);
        take_linear(&b, &L->o, D, qd, ml->o.b != NULL);
        if (e->levels > 0) {
            take_linear(&b, &L->r1, D / 2, qd, 1);
            take_linear(&b, &L->r2, e->levels, D / 2, 1);
        }
        take_linear(&b, &L->gu, 2 * F, D, ml->gate.b || ml->up.b);
        take_linear(&b, &L->down, D, F, ml->down.b != NULL);
    }
    cs->final_norm = take_f32(&b, (size_t)D);
    if (lm_head_tied(m)) {
        cs->lm_head.w = cs->embed;
        cs->lm_head.b = NULL;
        cs->lm_head.rows = e->V;
        cs->lm_head.cols = D;
    } else {
        take_linear(&b, &cs->lm_head, e->V, D, 0);
    }
    cs->rope_inv_freq = take_f32(&b, (size_t)(e->hd / 2));
    if (content) *content = b.used;
    return b.off;
}

/* Attention work units of a step of up to T rows: one per row group (at
 * most T groups) and split; splitting adds fewer than att_target units
 * (plan_attention). */
static size_t att_max_units(const cuda_state *cs, const eng_engine *e)
{
    return (size_t)e->prm.max_batch_tokens + (size_t)cs->att_target;
}

/* Ints of the plan for a step of up to T rows and S items: tok, pos, item
 * (T each), items (S cu_item), block tables (S, MB), selected rows (S), and
 * with l3_capture the rows' memory chunks (T), and for the tensor-core
 * attention its units and combine entries (one per row at most). */
static size_t plan_ints(const cuda_state *cs, const eng_engine *e)
{
    size_t T = (size_t)e->prm.max_batch_tokens, S = (size_t)e->prm.max_seqs;
    size_t n = 3 * T + S * (sizeof(cu_item) / sizeof(int)) + S * (size_t)e->max_blocks_per_seq + S;
    if (e->prm.l3_capture) n += T;
    if (!cs->att_simple) n += 3 + att_max_units(cs, e) * CU_ATT_UNIT_INTS + T * CU_ATT_COMB_INTS;
    return n;
}

/* Places the sequence state and step scratch; returns the arena's bytes. */
static size_t layout_work(cuda_state *cs, const eng_engine *e, uintptr_t base)
{
    const size_t T = (size_t)e->prm.max_batch_tokens, S = (size_t)e->prm.max_seqs;
    const size_t D = (size_t)e->D, NL = (size_t)e->n_layers, R = (size_t)e->prm.l3_max_chunks;
    const int l3 = e->levels == 3 && R > 0;
    size_t wide = 2 * (size_t)e->F;
    if (2 * (size_t)e->kv_dim > wide) wide = 2 * (size_t)e->kv_dim;
    if (e->levels > 0 && D / 2 > wide) wide = D / 2;
    bump b = {base, 0, 0};
    cs->ema = take_f32(&b, S * NL * D);
    cs->l3_mu = l3 ? take_f32(&b, S * NL * R * D) : NULL;
    cs->l3_kappa = l3 ? take_f32(&b, S * NL * R * D) : NULL;
    cs->h = take_f32(&b, T * D);
    cs->x = take_f32(&b, T * D);
    cs->xb = take_bf16(&b, T * D);
    cs->q = take_f32(&b, T * e->q_dim);
    cs->qatt = take_bf16(&b, T * e->q_dim);
    cs->lam = take_f32(&b, T * CU_MAX_LEVELS);
    cs->mem = l3 ? take_f32(&b, T * D) : NULL;
    cs->wide = take_f32(&b, T * wide);
    cs->act = take_bf16(&b, T * e->F);
    cs->selb = take_bf16(&b, S * D);
    cs->logits = take_f32(&b, S * e->V);
    cs->argmax = (int *)take(&b, S * sizeof(int));
    cs->argmax_part = (int2 *)take(&b, S * CU_ARGMAX_PARTS * sizeof(int2));
    if (e->prm.l3_capture) {
        cs->chunk_acc = take_f32(&b, S * (NL + 1) * D);
        cs->chunk_out = take_f32(&b, (size_t)e->max_step_chunks * (NL + 1) * D);
    }
    cs->blas_ws_bytes = BLAS_WS_BYTES;
    cs->blas_ws = take(&b, BLAS_WS_BYTES);
    cs->plan_ints = plan_ints(cs, e);
    cs->plan_dev = (int *)take(&b, cs->plan_ints * sizeof(int));
    /* Split-attention partials (f32): outputs, then (max, sum) pairs. */
    const size_t H = (size_t)e->q_dim / (size_t)e->hd;
    cs->att_part_o = cs->att_simple ? NULL : take_f32(&b, (size_t)CU_ATT_PART_ROWS * e->q_dim);
    cs->att_part_ml = cs->att_simple ? NULL : take_f32(&b, (size_t)CU_ATT_PART_ROWS * H * 2);
    return b.off;
}

/* cudaMalloc with the out-of-memory error the operator needs: what, how
 * much, and how much the device had. */
static int dev_alloc(cuda_state *cs, void **p, size_t bytes, const char *what, char *err,
                     size_t errlen)
{
    size_t avail = 0, total = 0;
    CUDA_TRY(cudaMemGetInfo(&avail, &total));
    cudaError_t rc = bytes <= avail ? cudaMalloc(p, bytes) : cudaErrorMemoryAllocation;
    if (rc == cudaErrorMemoryAllocation) {
        (void)cudaGetLastError();
        *p = NULL;
        return eng__errf(err, errlen, ENG_ENOMEM,
                         "cuda: out of device memory: %s need %.0f MiB, %.0f MiB free on %s", what,
                         (double)bytes / MIB, (double)avail / MIB, cs->dev_name);
    }
    CUDA_TRY(rc);
    return ENG_OK;
}

/* ---- weight upload ---------------------------------------------------------- */

/* Streams host tensors into the weight arena through two pinned buffers:
 * the host converts or copies into buffer `cur` and queues its copy; a full
 * buffer is handed to the device (event recorded) and the other one is
 * reused once its own copies are done. */
typedef struct uploader {
    eng_engine *e;
    cudaStream_t stream;
    unsigned char *buf[2]; /* (STAGE_BYTES) pinned */
    cudaEvent_t ev[2];
    int cur;
    size_t fill;            /* bytes of buf[cur] in use */
    size_t done, total;     /* bytes uploaded / to upload */
    size_t next_log;
} uploader;

static void up_log(uploader *u)
{
    if (!u->e->prm.log) return;
    char line[128];
    snprintf(line, sizeof line, "cuda: uploaded %.0f/%.0f MiB of weights", (double)u->done / MIB,
             (double)u->total / MIB);
    u->e->prm.log(u->e->prm.log_ctx, line);
}

static int up_switch(uploader *u, char *err, size_t errlen)
{
    CUDA_TRY(cudaEventRecord(u->ev[u->cur], u->stream));
    u->cur ^= 1;
    CUDA_TRY(cudaEventSynchronize(u->ev[u->cur]));
    u->fill = 0;
    return ENG_OK;
}

/* Uploads n elements from host src to device dst: f32 narrowed to bf16
 * (round to nearest even) when to_bf16, else n bytes copied as they are. */
static int up_put(uploader *u, void *dst, const void *src, size_t n, int to_bf16, char *err,
                  size_t errlen)
{
    const size_t in_sz = to_bf16 ? 4 : 1, out_sz = to_bf16 ? 2 : 1;
    const unsigned char *s = (const unsigned char *)src;
    unsigned char *d = (unsigned char *)dst;
    while (n > 0) {
        if (STAGE_BYTES - u->fill < 64) {
            int rc = up_switch(u, err, errlen);
            if (rc) return rc;
        }
        size_t k = (STAGE_BYTES - u->fill) / out_sz;
        if (k > n) k = n;
        unsigned char *stg = u->buf[u->cur] + u->fill;
        if (to_bf16) {
            const float *sf = (const float *)s;
            uint16_t *sh = (uint16_t *)stg;
            for (size_t i = 0; i < k; i++) sh[i] = eng__f32_to_bf16(sf[i]);
        } else {
            memcpy(stg, s, k);
        }
        CUDA_TRY(cudaMemcpyAsync(d, stg, k * out_sz, cudaMemcpyHostToDevice, u->stream));
        /* Keep every staged piece 16-byte aligned for the next conversion. */
        u->fill += (k * out_sz + 15) & ~(size_t)15;
        s += k * in_sz;
        d += k * out_sz;
        n -= k;
        u->done += k * out_sz;
        if (u->done >= u->next_log) {
            up_log(u);
            while (u->next_log <= u->done) u->next_log += (size_t)1 << 30;
        }
    }
    return ENG_OK;
}

static int up_f32(uploader *u, float *dst, const float *src, size_t n, char *err, size_t errlen)
{
    return up_put(u, dst, src, n * sizeof(float), 0, err, errlen);
}

/* A host matrix (bf16 as is, f32 narrowed) into device bf16 rows. */
static int up_matrix(uploader *u, bf16 *dst, const eng_linear *l, char *err, size_t errlen)
{
    size_t n = (size_t)l->rows * l->cols;
    if (l->w16) return up_put(u, dst, l->w16, n * sizeof(uint16_t), 0, err, errlen);
    return up_put(u, dst, l->w, n, 1, err, errlen);
}

/* A bias into part of a (possibly fused) device bias; zeros when absent. */
static int up_bias(uploader *u, float *dst, const float *b, int n, char *err, size_t errlen)
{
    if (b) return up_f32(u, dst, b, (size_t)n, err, errlen);
    CUDA_TRY(cudaMemsetAsync(dst, 0, (size_t)n * sizeof(float), u->stream));
    return ENG_OK;
}

static int upload_weights(cuda_state *cs, eng_engine *e, size_t content, char *err, size_t errlen)
{
    const eng_model *m = e->m;
    const int D = e->D, F = e->F, kvd = e->kv_dim;
    uploader u;
    memset(&u, 0, sizeof u);
    u.e = e;
    u.stream = cs->stream;
    u.total = content;
    u.next_log = (size_t)1 << 30;
    int rc = ENG_OK;
    for (int i = 0; i < 2 && rc == ENG_OK; i++) {
        void *buf = NULL;
        cudaEvent_t ev = NULL;
        cudaError_t ce = cudaHostAlloc(&buf, STAGE_BYTES, cudaHostAllocDefault);
        if (ce == cudaSuccess) {
            u.buf[i] = (unsigned char *)buf;
            ce = cudaEventCreateWithFlags(&ev, cudaEventDisableTiming);
            if (ce == cudaSuccess) u.ev[i] = ev;
        }
        if (ce != cudaSuccess)
            rc = eng__errf(err, errlen, ENG_EDEVICE,
                           "cuda: pinned staging for the weight upload failed at %s:%d: %s",
                           __FILE__, __LINE__, cudaGetErrorString(ce));
    }

#define UP(call)                                     \
    do {                                             \
        if (rc == ENG_OK) rc = (call);               \
    } while (0)
    UP(up_matrix(&u, cs->embed, &m->embed, err, errlen));
    for (int l = 0; l < e->n_layers && rc == ENG_OK; l++) {
        const eng_layer *ml = &m->layers[l];
        const cu_layer *L = &cs->layers[l];
        UP(up_f32(&u, L->attn_norm, ml->attn_norm, (size_t)D, err, errlen));
        UP(up_f32(&u, L->mlp_norm, ml->mlp_norm, (size_t)D, err, errlen));
        UP(up_matrix(&u, L->q.w, &ml->q, err, errlen));
        if (L->q.b) UP(up_f32(&u, L->q.b, ml->q.b, (size_t)L->q.rows, err, errlen));
        UP(up_matrix(&u, L->kv.w, &ml->k, err, errlen));
        UP(up_matrix(&u, L->kv.w + (size_t)kvd * D, &ml->v, err, errlen));
        if (L->kv.b) {
            UP(up_bias(&u, L->kv.b, ml->k.b, kvd, err, errlen));
            UP(up_bias(&u, L->kv.b + kvd, ml->v.b, kvd, err, errlen));
        }
        UP(up_matrix(&u, L->o.w, &ml->o, err, errlen));
        if (L->o.b) UP(up_f32(&u, L->o.b, ml->o.b, (size_t)L->o.rows, err, errlen));
        if (e->levels > 0) {
            UP(up_matrix(&u, L->r1.w, &ml->router1, err, errlen));
            UP(up_f32(&u, L->r1.b, ml->router1.b, (size_t)L->r1.rows, err, errlen));
            UP(up_matrix(&u, L->r2.w, &ml->router2, err, errlen));
            UP(up_f32(&u, L->r2.b, ml->router2.b, (size_t)L->r2.rows, err, errlen));
        }
        UP(up_matrix(&u, L->gu.w, &ml->gate, err, errlen));
        UP(up_matrix(&u, L->gu.w + (size_t)F * D, &ml->up, err, errlen));
        if (L->gu.b) {
            UP(up_bias(&u, L->gu.b, ml->gate.b, F, err, errlen));
            UP(up_bias(&u, L->gu.b + F, ml->up.b, F, err, errlen));
        }
        UP(up_matrix(&u, L->down.w, &ml->down, err, errlen));
        if (L->down.b) UP(up_f32(&u, L->down.b, ml->down.b, (size_t)D, err, errlen));
    }
    UP(up_f32(&u, cs->final_norm, m->final_norm, (size_t)D, err, errlen));
    if (!lm_head_tied(m)) UP(up_matrix(&u, cs->lm_head.w, &m->lm_head, err, errlen));
    UP(up_f32(&u, cs->rope_inv_freq, m->rope_inv_freq, (size_t)(e->hd / 2), err, errlen));
#undef UP

    /* The staging buffers must outlive every copy queued from them. */
    cudaError_t ce = cudaStreamSynchronize(cs->stream);
    if (rc == ENG_OK && ce != cudaSuccess)
        rc = eng__errf(err, errlen, ENG_EDEVICE, "cuda: cudaStreamSynchronize failed at %s:%d: %s",
                       __FILE__, __LINE__, cudaGetErrorString(ce));
    for (int i = 0; i < 2; i++) {
        if (u.ev[i]) cudaEventDestroy(u.ev[i]);
        if (u.buf[i]) cudaFreeHost(u.buf[i]);
    }
    if (rc == ENG_OK) up_log(&u);
    return rc;
}

/* ---- per-stage profile of decode steps (MKAD_CUDA_PROFILE=1) -----------------
 * An event after every stage of a decode step (one row per sequence);
 * at fini the log gets, per
 * stage, its calls and device time per step, the bytes it must read (weights,
 * or K/V for attention) and the bandwidth that makes, and the step's wall
 * time against the sum of its stages (the rest is launch gaps and the host). */
#define PROF_MAX_MARKS 4096
#define PROF_MAX_STAGES 48
/* Profiled steps: decode steps (one row an item) and prefill steps (the
 * rest), each kind in a table of its own. */
enum { PROF_DECODE = 1, PROF_PREFILL = 2 };
struct cu_prof {
    int active; /* 0, or the kind of this step: it is being profiled */
    int n;      /* marks of this step */
    cudaEvent_t ev[PROF_MAX_MARKS];
    int stage[PROF_MAX_MARKS]; /* stage of the interval that ends at mark i */
    double mbytes[PROF_MAX_MARKS];
    int n_stages;
    const char *name[PROF_MAX_STAGES];
    /* [kind - 1][stage] */
    double ms[2][PROF_MAX_STAGES], bytes[2][PROF_MAX_STAGES];
    long long calls[2][PROF_MAX_STAGES];
    long long steps[2], rows[2];
    double wall_ms[2]; /* host wall time of the profiled steps */
    double att_bytes;  /* K/V bytes one layer's attention reads in this step */
    int step_rows;     /* rows of this step */
};

static int prof_mark(cuda_state *cs, const char *name, double bytes, char *err, size_t errlen)
{
    cu_prof *p = cs->prof;
    if (!p || !p->active || p->n >= PROF_MAX_MARKS) return ENG_OK;
    int k = 0;
    while (k < p->n_stages && p->name[k] != name) k++;
    if (k == p->n_stages) {
        if (k == PROF_MAX_STAGES) return ENG_OK;
        p->name[p->n_stages++] = name;
    }
    p->stage[p->n] = k;
    p->mbytes[p->n] = bytes;
    CUDA_TRY(cudaEventRecord(p->ev[p->n++], cs->stream));
    return ENG_OK;
}
#define PROF(name, bytes)                                                      \
    do {                                                                       \
        int prof_rc_ = prof_mark(cs, (name), (double)(bytes), err, errlen);     \
        if (prof_rc_) return prof_rc_;                                         \
    } while (0)

/* After the step's stream synchronisation. */
static int prof_collect(cuda_state *cs, double wall_ms, char *err, size_t errlen)
{
    cu_prof *p = cs->prof;
    if (!p || !p->active) return ENG_OK;
    const int k = p->active - 1;
    for (int i = 1; i < p->n; i++) {
        float ms = 0.0f;
        CUDA_TRY(cudaEventElapsedTime(&ms, p->ev[i - 1], p->ev[i]));
        p->ms[k][p->stage[i]] += ms;
        p->bytes[k][p->stage[i]] += p->mbytes[i];
        p->calls[k][p->stage[i]]++;
    }
    p->steps[k]++;
    p->rows[k] += p->step_rows;
    p->wall_ms[k] += wall_ms;
    p->active = 0;
    return ENG_OK;
}

/* Decode: time, the bytes a stage must read and its bandwidth per step;
 * prefill: time per step and the projections' TFLOP/s (2 FLOPs per weight
 * per row: bf16 weight bytes times rows). */
static void prof_report(const eng_engine *e, const cuda_state *cs)
{
    const cu_prof *p = cs->prof;
    if (!p) return;
    char line[256];
    for (int kind = 0; kind < 2; kind++) {
        if (p->steps[kind] == 0) continue;
        const int pf = kind == 1;
        double total = 0;
        for (int k = 0; k < p->n_stages; k++) total += p->ms[kind][k];
        const double n = (double)p->steps[kind];
        for (int k = -1; k <= p->n_stages; k++) {
            if (k < 0 && pf)
                snprintf(line, sizeof line,
                         "cuda profile: %lld prefill steps, %.0f rows/step; %-12s %7s %10s %9s",
                         p->steps[kind], p->rows[kind] / n, "stage", "calls", "us/step",
                         "TFLOP/s");
            else if (k < 0)
                snprintf(line, sizeof line,
                         "cuda profile: %lld decode steps; %-12s %7s %10s %10s %9s",
                         p->steps[kind], "stage", "calls", "us/step", "MB/step", "GB/s");
            else if (k == p->n_stages)
                snprintf(line, sizeof line,
                         "cuda profile: stages %.1f us/step on the device, step wall time %.1f "
                         "us (the rest: launch gaps, host work, copies)",
                         1000 * total / n, 1000 * p->wall_ms[kind] / n);
            else if (p->calls[kind][k] == 0)
                continue;
            else if (pf)
                snprintf(line, sizeof line, "cuda profile: %-12s %7.1f %10.1f %9.1f", p->name[k],
                         p->calls[kind][k] / n, 1000 * p->ms[kind][k] / n,
                         p->ms[kind][k] > 0 ? p->bytes[kind][k] * (p->rows[kind] / n) /
                                                  (p->ms[kind][k] / 1000) / 1e12
                                            : 0.0);
            else
                snprintf(line, sizeof line, "cuda profile: %-12s %7.1f %10.1f %10.2f %9.0f",
                         p->name[k], p->calls[kind][k] / n, 1000 * p->ms[kind][k] / n,
                         p->bytes[kind][k] / n / 1e6,
                         p->ms[kind][k] > 0 ? p->bytes[kind][k] / (p->ms[kind][k] / 1000) / 1e9
                                            : 0.0);
            if (e->prm.log)
                e->prm.log(e->prm.log_ctx, line);
            else
                fprintf(stderr, "%s\n", line);
        }
    }
}

/* The decode graphs (cuda_step). */
static void graphs_free(cuda_state *cs)
{
    cudaGraphExec_t *g = &cs->graph[0][0][0][0];
    for (size_t i = 0; i < sizeof cs->graph / sizeof *g; i++)
        if (g[i]) {
            (void)cudaGraphExecDestroy(g[i]);
            g[i] = NULL;
        }
}

/* ---- init / fini ---------------------------------------------------------- */

static void cuda_fini(eng_engine *e)
{
    if (!e || !e->be) return;
    cuda_state *cs = (cuda_state *)e->be;
    /* Errors are ignored here: after a device fault these calls fail too,
     * and there is nothing left to do but release what can be released. */
    if (cs->stream) (void)cudaStreamSynchronize(cs->stream);
    prof_report(e, cs);
    graphs_free(cs);
    if (cs->prof) {
        for (int i = 0; i < PROF_MAX_MARKS; i++)
            if (cs->prof->ev[i]) (void)cudaEventDestroy(cs->prof->ev[i]);
        free(cs->prof);
    }
    if (cs->blas) (void)cublasDestroy(cs->blas);
    (void)cudaFree(cs->pool_arena);
    (void)cudaFree(cs->work_arena);
    (void)cudaFree(cs->w_arena);
    if (cs->plan_host) (void)cudaFreeHost(cs->plan_host);
    if (cs->logits_host) (void)cudaFreeHost(cs->logits_host);
    if (cs->argmax_host) (void)cudaFreeHost(cs->argmax_host);
    if (cs->l3_host) (void)cudaFreeHost(cs->l3_host);
    if (cs->chunk_host) (void)cudaFreeHost(cs->chunk_host);
    if (cs->stream) (void)cudaStreamDestroy(cs->stream);
    (void)cudaGetLastError();
    free(cs->layers);
    free(cs);
    e->be = NULL;
}

/* The model must have every tensor the step reads, in the engine's shapes. */
static int check_linear(const eng_linear *l, int rows, int cols, const char *name, int layer,
                        char *err, size_t errlen)
{
    if ((!l->w && !l->w16) || l->rows != rows || l->cols != cols)
        return eng__errf(err, errlen, ENG_EINVAL,
                         "cuda: layer %d: %s weights missing or not (%d, %d)", layer, name, rows,
                         cols);
    return ENG_OK;
}

static int check_model(const eng_engine *e, char *err, size_t errlen)
{
    const eng_model *m = e->m;
    const int D = e->D, F = e->F, qd = e->q_dim, kvd = e->kv_dim;
    if (e->hd <= 0 || e->hd % 2 != 0 || e->hd > CU_MAX_HEAD_DIM)
        return eng__errf(err, errlen, ENG_EUNSUPPORTED,
                         "cuda: head_dim %d is not supported (even, at most %d)", e->hd,
                         CU_MAX_HEAD_DIM);
    if (m->info.n_kv_heads <= 0 || m->info.n_heads % m->info.n_kv_heads != 0)
        return eng__errf(err, errlen, ENG_EUNSUPPORTED,
                         "cuda: %d query heads are not a multiple of %d key/value heads",
                         m->info.n_heads, m->info.n_kv_heads);
    if (e->levels != 0 && e->levels != 2 && e->levels != 3)
        return eng__errf(err, errlen, ENG_EUNSUPPORTED, "cuda: %d router levels", e->levels);
    if (e->prm.l3_max_chunks > CU_MAX_L3_CHUNKS)
        return eng__errf(err, errlen, ENG_EUNSUPPORTED,
                         "cuda: l3_max_chunks %d > %d is not supported", e->prm.l3_max_chunks,
                         CU_MAX_L3_CHUNKS);
    if (!m->embed.w && !m->embed.w16)
        return eng__errf(err, errlen, ENG_EINVAL, "cuda: no embedding weights");
    int rc = check_linear(&m->lm_head, e->V, D, "lm_head", -1, err, errlen);
    for (int l = 0; rc == ENG_OK && l < e->n_layers; l++) {
        const eng_layer *ml = &m->layers[l];
        if ((rc = check_linear(&ml->q, qd, D, "q_proj", l, err, errlen)) ||
            (rc = check_linear(&ml->k, kvd, D, "k_proj", l, err, errlen)) ||
            (rc = check_linear(&ml->v, kvd, D, "v_proj", l, err, errlen)) ||
            (rc = check_linear(&ml->o, D, qd, "o_proj", l, err, errlen)) ||
            (rc = check_linear(&ml->gate, F, D, "gate_proj", l, err, errlen)) ||
            (rc = check_linear(&ml->up, F, D, "up_proj", l, err, errlen)) ||
            (rc = check_linear(&ml->down, D, F, "down_proj", l, err, errlen)))
            break;
        if (e->levels > 0) {
            if ((rc = check_linear(&ml->router1, D / 2, qd, "router.0", l, err, errlen)) ||
                (rc = check_linear(&ml->router2, e->levels, D / 2, "router.2", l, err, errlen)))
                break;
            if (!ml->router1.b || !ml->router2.b)
                rc = eng__errf(err, errlen, ENG_EINVAL, "cuda: layer %d: router bias missing", l);
        }
    }
    return rc;
}

static int init_state(eng_engine *e, cuda_state *cs, char *err, size_t errlen)
{
    const eng_model *m = e->m;
    int rc;

    CUDA_TRY(cudaSetDevice(0));
    cudaDeviceProp prop;
    CUDA_TRY(cudaGetDeviceProperties(&prop, 0));
    snprintf(cs->dev_name, sizeof cs->dev_name, "%s", prop.name);
    cs->n_sm = prop.multiProcessorCount > 0 ? prop.multiProcessorCount : 1;
    /* Attention: the tensor-core kernels unless MKAD_CUDA_ATTN=simple asks for
     * the simple one (the oracle) or the head size is not theirs. */
    const char *am = getenv("MKAD_CUDA_ATTN");
    if (am && *am && strcmp(am, "simple") != 0 && strcmp(am, "fast") != 0)
        return eng__errf(err, errlen, ENG_EINVAL,
                         "cuda: MKAD_CUDA_ATTN=%s: expected \"fast\" or \"simple\"", am);
    cs->att_simple = (am && !strcmp(am, "simple")) || !eng__cu_attention_fast_hd(e->hd);
    cs->att_target = 2 * cs->n_sm;
    if (!cs->att_simple) {
        int per_sm = 0;
        CUDA_TRY(eng__cu_attention_setup(e->hd, &per_sm));
        if (per_sm > 0) cs->att_target = per_sm * cs->n_sm;
    }
    /* MKAD_CUDA_ATTN_SPLIT=N (tests): split every row group's keys into
     * pieces of N tiles of CU_ATT_KT keys, whatever the load. */
    const char *sp = getenv("MKAD_CUDA_ATTN_SPLIT");
    cs->att_force_tiles = sp && *sp ? atoi(sp) : 0;
    if (cs->att_force_tiles < 0) cs->att_force_tiles = 0;
    cs->att_max_units = att_max_units(cs, e);
    /* MKAD_CUDA_GEMV=cublas: every projection through cuBLAS (to compare). */
    const char *gv = getenv("MKAD_CUDA_GEMV");
    if (gv && *gv && strcmp(gv, "cublas") != 0 && strcmp(gv, "own") != 0)
        return eng__errf(err, errlen, ENG_EINVAL,
                         "cuda: MKAD_CUDA_GEMV=%s: expected \"own\" or \"cublas\"", gv);
    cs->gemv_max_m = gv && !strcmp(gv, "cublas") ? 0 : CU_GEMV_MAX_M;
    /* MKAD_CUDA_GEMV_ROWS=N (1..CU_GEMV_MAX_M): projections of more rows than
     * N take cuBLAS (captured into the decode graphs too). */
    const char *gvr = getenv("MKAD_CUDA_GEMV_ROWS");
    if (gvr && *gvr) {
        const int n = atoi(gvr);
        if (n < 1 || n > CU_GEMV_MAX_M)
            return eng__errf(err, errlen, ENG_EINVAL,
                             "cuda: MKAD_CUDA_GEMV_ROWS=%s: expected 1 to %d", gvr, CU_GEMV_MAX_M);
        if (cs->gemv_max_m > 0) cs->gemv_max_m = n;
    }
    /* MKAD_CUDA_FUSE_ROPE=0: the RoPE kernel after the K/V GEMV too. */
    const char *fro = getenv("MKAD_CUDA_FUSE_ROPE");
    cs->fuse_rope = !(fro && !strcmp(fro, "0"));
    const char *gsp = getenv("MKAD_CUDA_GEMV_SPLIT");
    if (gsp && *gsp) eng__cu_gemv_split = atoi(gsp) > 0 ? atoi(gsp) : 0;
    /* Programmatic dependent launch where the GPU has it (cuda_priv.h,
     * cu_launch); MKAD_CUDA_PDL=0: plain launches. */
    const char *pdl = getenv("MKAD_CUDA_PDL");
    eng__cu_pdl = prop.major >= 9 && !(pdl && !strcmp(pdl, "0"));
    CUDA_TRY(cudaStreamCreateWithFlags(&cs->stream, cudaStreamNonBlocking));
    /* Graphs need the planner's own splits (a forced split has no bound);
     * cuBLAS calls (MKAD_CUDA_GEMV_ROWS) are captured with the rest. */
    const char *gr = getenv("MKAD_CUDA_GRAPH");
    cs->graphs_on = !(gr && !strcmp(gr, "0")) && cs->gemv_max_m > 0 &&
                    !cs->att_simple && cs->att_force_tiles == 0 && e->D % 8 == 0 &&
                    e->q_dim % 8 == 0 && e->F % 8 == 0;
    const char *pf = getenv("MKAD_CUDA_PROFILE");
    if (pf && !strcmp(pf, "1")) {
        if (!(cs->prof = (cu_prof *)calloc(1, sizeof *cs->prof)))
            return eng__errf(err, errlen, ENG_ENOMEM, "cuda: out of host memory");
        for (int i = 0; i < PROF_MAX_MARKS; i++) CUDA_TRY(cudaEventCreate(&cs->prof->ev[i]));
    }
    CUBLAS_TRY(cublasCreate(&cs->blas));
    /* cublasSetStream resets a user workspace, so the workspace comes after. */
    CUBLAS_TRY(cublasSetStream(cs->blas, cs->stream));

    /* Weights. */
    size_t content = 0;
    cs->w_bytes = layout_weights(cs, e, 0, &content);
    if ((rc = dev_alloc(cs, &cs->w_arena, cs->w_bytes, "weights", err, errlen))) return rc;
    layout_weights(cs, e, (uintptr_t)cs->w_arena, NULL);
    if ((rc = upload_weights(cs, e, content, err, errlen))) return rc;

    /* Sequence state and step scratch, all zero (EMA state, L3 banks). */
    cs->work_bytes = layout_work(cs, e, 0);
    if ((rc = dev_alloc(cs, &cs->work_arena, cs->work_bytes, "step buffers and sequence state",
                        err, errlen)))
        return rc;
    layout_work(cs, e, (uintptr_t)cs->work_arena);
    CUDA_TRY(cudaMemsetAsync(cs->work_arena, 0, cs->work_bytes, cs->stream));
    CUBLAS_TRY(cublasSetWorkspace(cs->blas, cs->blas_ws, cs->blas_ws_bytes));

    /* Pinned host buffers for the plan, the logits and an L3 bank. */
    const size_t S = (size_t)e->prm.max_seqs, NL = (size_t)e->n_layers, D = (size_t)e->D;
    const size_t R = (size_t)e->prm.l3_max_chunks;
    CUDA_TRY(cudaHostAlloc((void **)&cs->plan_host, cs->plan_ints * sizeof(int),
                           cudaHostAllocDefault));
    CUDA_TRY(cudaHostAlloc((void **)&cs->logits_host, S * e->V * sizeof(float),
                           cudaHostAllocDefault));
    CUDA_TRY(cudaHostAlloc((void **)&cs->argmax_host, S * sizeof(int), cudaHostAllocDefault));
    if (cs->l3_mu)
        CUDA_TRY(cudaHostAlloc((void **)&cs->l3_host, 2 * NL * R * D * sizeof(float),
                               cudaHostAllocDefault));
    if (cs->chunk_out)
        CUDA_TRY(cudaHostAlloc((void **)&cs->chunk_host,
                               (size_t)e->max_step_chunks * (NL + 1) * D * sizeof(float),
                               cudaHostAllocDefault));

    cu_fwd *f = &cs->fwd;
    memset(f, 0, sizeof *f);
    f->D = e->D;
    f->F = e->F;
    f->q_dim = e->q_dim;
    f->kv_dim = e->kv_dim;
    f->hd = e->hd;
    f->H = m->info.n_heads;
    f->H_kv = m->info.n_kv_heads;
    f->n_layers = e->n_layers;
    f->levels = e->levels;
    f->B = e->B;
    f->MB = e->max_blocks_per_seq;
    f->R = cs->l3_mu ? (int)R : 0;
    f->eps = m->rms_eps;
    f->beta = m->info.ema_beta;
    f->omb = 1.0f - m->info.ema_beta;
    f->att_scale = 1.0f / sqrtf((float)e->hd);
    f->rope_scale = m->rope_attn_scale;
    f->l3_scale = 1.0f / sqrtf((float)e->D);
    f->rope_inv_freq = cs->rope_inv_freq;
    f->ema = cs->ema;
    f->l3_mu = cs->l3_mu;
    f->l3_kappa = cs->l3_kappa;
    f->att_simple = cs->att_simple;
    f->att_part_o = cs->att_part_o;
    f->att_part_ml = cs->att_part_ml;

    CUDA_TRY(cudaStreamSynchronize(cs->stream));
    e->kv_dtype = ENG_KV_BF16;
    cs->blk_bytes = (size_t)e->n_layers * 2 * e->B * e->kv_dim * sizeof(bf16);

    /* What is left for the pool, with a reserve for the context, cuBLAS and
     * fragmentation.  0 would mean "unknown" to the core, so a full device
     * reports 1 byte: the core then knows not even one block fits. */
    size_t avail = 0, total = 0;
    CUDA_TRY(cudaMemGetInfo(&avail, &total));
    e->be_mem_avail = avail > RESERVE_BYTES ? avail - RESERVE_BYTES : 1;
    return ENG_OK;
}

static int cuda_init(eng_engine *e, char *err, size_t errlen)
{
    int rc = check_model(e, err, errlen);
    if (rc) return rc;
    cuda_state *cs = (cuda_state *)calloc(1, sizeof *cs);
    if (!cs) return eng__errf(err, errlen, ENG_ENOMEM, "cuda: out of host memory");
    e->be = cs;
    cs->layers = (cu_layer *)calloc((size_t)(e->n_layers > 0 ? e->n_layers : 1), sizeof(cu_layer));
    if (!cs->layers) rc = eng__errf(err, errlen, ENG_ENOMEM, "cuda: out of host memory");
    if (rc == ENG_OK) rc = init_state(e, cs, err, errlen);
    if (rc) cuda_fini(e);
    return rc;
}

static int cuda_pool_alloc(eng_engine *e, char *err, size_t errlen)
{
    cuda_state *cs = (cuda_state *)e->be;
    if (!cs) return eng__errf(err, errlen, ENG_EINVAL, "cuda: backend not initialised");
    if (e->prm.n_blocks <= 0)
        return eng__errf(err, errlen, ENG_EINVAL, "cuda: pool of %d blocks", e->prm.n_blocks);
    if (e->block_kv_bytes != cs->blk_bytes)
        return eng__errf(err, errlen, ENG_EINVAL,
                         "cuda: block_kv_bytes %zu does not match the pool layout (%zu bytes of "
                         "bf16 K/V per block)",
                         e->block_kv_bytes, cs->blk_bytes);
    if (cs->pool_arena) {
        CUDA_TRY(cudaStreamSynchronize(cs->stream));
        CUDA_TRY(cudaFree(cs->pool_arena));
        cs->pool_arena = NULL;
        cs->kv_pool = NULL;
        cs->ema_ckpt = NULL;
    }
    const size_t nb = (size_t)e->prm.n_blocks;
    bump b = {0, 0, 0};
    take(&b, nb * cs->blk_bytes);
    take_f32(&b, nb * e->n_layers * e->D);
    char what[96];
    snprintf(what, sizeof what, "the K/V pool of %d blocks", e->prm.n_blocks);
    int rc = dev_alloc(cs, &cs->pool_arena, b.off, what, err, errlen);
    if (rc) return rc;
    b = (bump){(uintptr_t)cs->pool_arena, 0, 0};
    cs->kv_pool = (bf16 *)take(&b, nb * cs->blk_bytes);
    cs->ema_ckpt = take_f32(&b, nb * e->n_layers * e->D);
    cs->n_blocks = e->prm.n_blocks;
    cs->fwd.kv_pool = cs->kv_pool;
    cs->fwd.ema_ckpt = cs->ema_ckpt;
    CUDA_TRY(cudaMemsetAsync(cs->pool_arena, 0, b.off, cs->stream));
    CUDA_TRY(cudaStreamSynchronize(cs->stream));
    return ENG_OK;
}

/* ---- the forward step -------------------------------------------------------- */

/* Row-major y (M, W.rows) = x (M, W.cols) . W^T, + beta * y, + bias (when
 * non-NULL); yb = bf16(y) when non-NULL.  A few rows (a decode step) take
 * the GEMV kernel, bias and copy in its epilogue; else cuBLAS, column-major:
 * there the product is y^T = W x^T, with W read transposed. */
static int gemm(cuda_state *cs, const cu_linear *W, const bf16 *x, int M, float *y, float beta,
                const float *bias, bf16 *yb, char *err, size_t errlen)
{
    if (M <= cs->gemv_max_m && eng__cu_gemv_fits(W->w, W->cols, x, M)) {
        CUDA_TRY(eng__cu_gemv(W->w, W->rows, W->cols, x, M, y, beta, bias, yb, NULL, cs->n_sm,
                              cs->stream));
        return ENG_OK;
    }
    const float alpha = 1.0f;
    CUBLAS_TRY(cublasGemmEx(cs->blas, CUBLAS_OP_T, CUBLAS_OP_N, W->rows, M, W->cols, &alpha, W->w,
                            CUDA_R_16BF, W->cols, x, CUDA_R_16BF, W->cols, &beta, y, CUDA_R_32F,
                            W->rows, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    if (yb)
        CUDA_TRY(eng__cu_bias_bf16(y, bias, M, W->rows, yb, cs->stream));
    else if (bias)
        CUDA_TRY(eng__cu_add_bias(y, bias, M, W->rows, cs->stream));
    return ENG_OK;
}
#define WBYTES(l) ((double)(l).rows * (l).cols * sizeof(bf16))

/* One decoder layer over all T rows (FASTMKA.md, "Decoder layer"). */
static int layer_forward(eng_engine *e, cuda_state *cs, const cu_fwd *f, int l, int max_n,
                         char *err, size_t errlen)
{
    const cu_layer *L = &cs->layers[l];
    const cudaStream_t st = cs->stream;
    const int T = f->T, D = e->D;
    const float eps = f->eps;
    int rc;

    /* x = RMSNorm(h); the f32 copy only feeds the EMA, the L3 read and the
     * memory chunks. */
    CUDA_TRY(eng__cu_rmsnorm(cs->h, NULL, T, D, L->attn_norm, eps,
                             e->levels > 0 || f->tok_chunk ? cs->x : NULL, cs->xb, st));
    PROF("rmsnorm", 0);
    if (f->tok_chunk)
        CUDA_TRY(eng__cu_chunk_sums(f, l, e->l3_C, max_n, cs->x, cs->chunk_acc, cs->chunk_out, st));
    /* q (T, q_dim).  With the router, which sees q with its bias before
     * RoPE (in bf16, qatt), the bias is added here; else in the RoPE kernel. */
    const float *bq = e->levels > 0 ? NULL : L->q.b;
    if ((rc = gemm(cs, &L->q, cs->xb, T, cs->q, 0.0f, e->levels > 0 ? L->q.b : NULL,
                   e->levels > 0 ? cs->qatt : NULL, err, errlen)))
        return rc;
    PROF("q", WBYTES(L->q));
    if (e->levels > 0) {
        float *rh = cs->wide; /* (T, D/2) */
        if ((rc = gemm(cs, &L->r1, cs->qatt, T, rh, 0.0f, NULL, NULL, err, errlen))) return rc;
        PROF("router r1", WBYTES(L->r1));
        CUDA_TRY(eng__cu_router(f, rh, L->r1.rows, L->r1.b, L->r2.w, L->r2.b, cs->lam, st));
        PROF("router", 0);
        if (cs->mem && f->any_l3) {
            CUDA_TRY(eng__cu_l3_read(f, l, cs->x, cs->mem, st));
            PROF("l3 read", 0);
        }
        /* The fused f replaces x as the K/V GEMM input in xb. */
        CUDA_TRY(eng__cu_ema_fuse(f, l, max_n, cs->x, cs->lam, cs->mem, cs->xb, st));
        PROF("ema fuse", 0);
    }
    if (cs->fuse_rope && T <= cs->gemv_max_m && eng__cu_gemv_fits(L->kv.w, D, cs->xb, T)) {
        /* RoPE, the K/V write and q's rotation in the GEMV's epilogue. */
        const cu_gemv_epi epi = {NULL, f, l, cs->q, bq};
        CUDA_TRY(eng__cu_gemv(L->kv.w, L->kv.rows, D, cs->xb, T, NULL, 0.0f, L->kv.b, NULL, &epi,
                              cs->n_sm, st));
        PROF("kv rope store", WBYTES(L->kv));
    } else {
        float *kv = cs->wide; /* (T, 2*kv_dim) */
        if ((rc = gemm(cs, &L->kv, cs->xb, T, kv, 0.0f, NULL, NULL, err, errlen))) return rc;
        PROF("kv", WBYTES(L->kv));
        CUDA_TRY(eng__cu_rope_store(f, l, cs->q, bq, kv, L->kv.b, st));
        PROF("rope store", 0);
    }
    CUDA_TRY(eng__cu_attention(f, l, cs->q, cs->qatt, st));
    PROF("attention", cs->prof ? cs->prof->att_bytes : 0);
    /* h += W_o att (+ b_o): beta = 1 adds onto the residual in the GEMM. */
    if ((rc = gemm(cs, &L->o, cs->qatt, T, cs->h, 1.0f, L->o.b, NULL, err, errlen))) return rc;
    PROF("o", WBYTES(L->o));

    /* MLP: h += W_down (silu(W_gate n) * W_up n), n = RMSNorm(h). */
    CUDA_TRY(eng__cu_rmsnorm(cs->h, NULL, T, D, L->mlp_norm, eps, NULL, cs->xb, st));
    PROF("rmsnorm", 0);
    if (T <= cs->gemv_max_m && eng__cu_gemv_fits(L->gu.w, D, cs->xb, T)) {
        /* SwiGLU in the GEMV's epilogue. */
        const cu_gemv_epi epi = {cs->act, NULL, 0, NULL, NULL};
        CUDA_TRY(eng__cu_gemv(L->gu.w, L->gu.rows, D, cs->xb, T, NULL, 0.0f, L->gu.b, NULL, &epi,
                              cs->n_sm, st));
        PROF("gate up swiglu", WBYTES(L->gu));
    } else {
        float *gu = cs->wide; /* (T, 2F) */
        if ((rc = gemm(cs, &L->gu, cs->xb, T, gu, 0.0f, NULL, NULL, err, errlen))) return rc;
        PROF("gate up", WBYTES(L->gu));
        CUDA_TRY(eng__cu_swiglu(gu, L->gu.b, T, e->F, cs->act, st));
        PROF("swiglu", 0);
    }
    if ((rc = gemm(cs, &L->down, cs->act, T, cs->h, 1.0f, L->down.b, NULL, err, errlen)))
        return rc;
    PROF("down", WBYTES(L->down));
    CUDA_TRY(cudaGetLastError());
    return ENG_OK;
}

/* Packs the plan into the pinned int buffer — tok (T), pos (T), item (T),
 * items (n_items), block tables (n_items, MB), selected rows (n_sel) — and
 * points f at their device copies.  Checks what would otherwise make a
 * kernel read or write outside its buffers.  *n_ints: ints to upload;
 * *o_sel: offset of the selected rows. */
static int pack_plan(eng_engine *e, cuda_state *cs, const eng_plan *p, cu_fwd *f, int *max_n,
                     size_t *n_ints, size_t *o_sel, int graph, char *err, size_t errlen)
{
    const int T = p->T, n = p->n_items, MB = e->max_blocks_per_seq;
    int *hp = cs->plan_host;
    size_t o = 0;
    const size_t o_tok = o;
    for (int t = 0; t < T; t++) hp[o++] = p->tok[t];
    const size_t o_pos = o;
    for (int t = 0; t < T; t++) hp[o++] = p->tok_pos[t];
    const size_t o_item = o;
    for (int t = 0; t < T; t++) hp[o++] = p->tok_item[t];
    const size_t o_items = o;
    cu_item *items = (cu_item *)(hp + o);
    o += (size_t)n * (sizeof(cu_item) / sizeof(int));
    const size_t o_bt = o;
    *max_n = 0;
    int rows = 0;
    for (int i = 0; i < n; i++) {
        const int slot = p->items[i].seq;
        if (slot < 0 || slot >= e->prm.max_seqs)
            return eng__errf(err, errlen, ENG_EINVAL, "cuda: step: item %d: bad slot %d", i, slot);
        const eng_seq *sq = &e->seqs[slot];
        cu_item *it = &items[i];
        it->slot = slot;
        it->n_tokens = p->items[i].n_tokens;
        it->start = p->item_start[i];
        it->pos0 = sq->n_tokens;
        it->l3_n = cs->l3_mu ? sq->l3_n : 0;
        if (it->l3_n > 0) f->any_l3 = 1;
        const int need = (it->pos0 + it->n_tokens + e->B - 1) / e->B;
        if (it->n_tokens <= 0 || it->start < 0 || it->start + it->n_tokens > T ||
            need > sq->n_blocks || sq->n_blocks > MB || it->l3_n < 0 || it->l3_n > f->R)
            return eng__errf(err, errlen, ENG_EINVAL,
                             "cuda: step: item %d (slot %d) does not fit its rows, blocks or "
                             "L3 bank",
                             i, slot);
        if (it->n_tokens > *max_n) *max_n = it->n_tokens;
        rows += it->n_tokens;
        /* The EMA kernel walks an item's rows by (start, pos0); RoPE and
         * attention find a row's item and position through tok_item and
         * tok_pos: both views must agree. */
        for (int j = 0; j < it->n_tokens; j++) {
            const int t = it->start + j;
            if (p->tok_item[t] != i || p->tok_pos[t] != it->pos0 + j || p->tok[t] < 0 ||
                p->tok[t] >= e->V)
                return eng__errf(err, errlen, ENG_EINVAL,
                                 "cuda: step: row %d does not match item %d of the plan", t, i);
        }
        int *row = hp + o_bt + (size_t)i * MB;
        for (int b = 0; b < sq->n_blocks; b++) {
            if (sq->blocks[b] < 0 || sq->blocks[b] >= cs->n_blocks)
                return eng__errf(err, errlen, ENG_EINVAL,
                                 "cuda: step: slot %d holds block %d outside the pool", slot,
                                 sq->blocks[b]);
            row[b] = sq->blocks[b];
        }
    }
    if (rows != T)
        return eng__errf(err, errlen, ENG_EINVAL, "cuda: step: items hold %d rows, plan has %d",
                         rows, T);
    o += (size_t)n * MB;
    for (int s = 0; s < p->n_sel; s++)
        if (p->sel_row[s] < 0 || p->sel_row[s] >= T)
            return eng__errf(err, errlen, ENG_EINVAL, "cuda: step: bad selected row %d",
                             p->sel_row[s]);
    *o_sel = o;
    for (int s = 0; s < p->n_sel; s++) hp[o++] = p->sel_row[s];
    const size_t o_chunk = o;
    if (p->tok_chunk) {
        if (!cs->chunk_acc || p->n_chunks < 0 || p->n_chunks > e->max_step_chunks || !p->chunk_out)
            return eng__errf(err, errlen, ENG_EINVAL,
                             "cuda: step: %d memory chunks without room for them", p->n_chunks);
        for (int t = 0; t < T; t++) {
            if (p->tok_chunk[t] < -1 || p->tok_chunk[t] >= p->n_chunks)
                return eng__errf(err, errlen, ENG_EINVAL, "cuda: step: row %d: bad memory chunk %d",
                                 t, p->tok_chunk[t]);
            hp[o++] = p->tok_chunk[t];
        }
    }
    if (!cs->att_simple) {
        /* For a graph: the step's counts at a fixed place, the combine entries
         * after room for the most units a step of this shape can have — at
         * most target / nhb splits in all plus one unit per row group
         * (plan_attention) — and launches sized for those bounds. */
        const int G = f->H / f->H_kv, gb = G < 16 ? G : 16, nhb = f->H_kv * ((G + gb - 1) / gb);
        const long long bound = graph ? cs->att_target / nhb + T : 0;
        const size_t o_count = o;
        if (graph) o += 3;
        const cu_att_limits lim = {cs->att_target, cs->att_force_tiles,
                                   (long long)cs->att_max_units, bound};
        int rc = plan_attention(&lim, items, n, hp, &o, cs->plan_dev, f, err, errlen);
        if (rc) return rc;
        if (graph) {
            hp[o_count] = f->att_n_dec;
            hp[o_count + 1] = f->att_n_pf;
            hp[o_count + 2] = f->att_n_comb;
            f->att_count = cs->plan_dev + o_count;
            f->att_n_dec = (int)bound;
            f->att_n_comb = T;
        }
    }
    *n_ints = o;

    const int *dp = cs->plan_dev;
    f->T = T;
    f->n_items = n;
    f->tok = dp + o_tok;
    f->tok_pos = dp + o_pos;
    f->tok_item = dp + o_item;
    f->items = (const cu_item *)(dp + o_items);
    f->bt = dp + o_bt;
    f->tok_chunk = p->tok_chunk ? dp + o_chunk : NULL;
    return ENG_OK;
}

/* The device work of a step after the plan's upload: embeddings, layers,
 * final norm and LM head of the selected rows (into cs->logits). */
static int forward(eng_engine *e, cuda_state *cs, const cu_fwd *f, const eng_plan *p, int max_n,
                   size_t o_sel, char *err, size_t errlen)
{
    const cudaStream_t st = cs->stream;
    int rc;
    PROF("start", 0);
    CUDA_TRY(eng__cu_embed(f, cs->embed, cs->h, st));
    /* h holds the embeddings until layer 0 adds to it. */
    if (f->tok_chunk)
        CUDA_TRY(eng__cu_chunk_sums(f, e->n_layers, e->l3_C, max_n, cs->h, cs->chunk_acc,
                                    cs->chunk_out, st));
    PROF("embed", 0);
    for (int l = 0; l < e->n_layers; l++)
        if ((rc = layer_forward(e, cs, f, l, max_n, err, errlen))) return rc;

    /* Final norm and LM head only for the rows whose logits are wanted. */
    if (p->n_sel > 0) {
        CUDA_TRY(eng__cu_rmsnorm(cs->h, cs->plan_dev + o_sel, p->n_sel, e->D, cs->final_norm,
                                 f->eps, NULL, cs->selb, st));
        PROF("final norm", 0);
        if ((rc = gemm(cs, &cs->lm_head, cs->selb, p->n_sel, cs->logits, 0.0f, NULL, NULL, err,
                       errlen)))
            return rc;
        /* (in a prefill step's FLOPs, only the selected rows count) */
        PROF("lm head", WBYTES(cs->lm_head) * (cs->prof && cs->prof->active == PROF_PREFILL
                                                   ? (double)p->n_sel / p->T
                                                   : 1.0));
        if (p->argmax) {
            CUDA_TRY(eng__cu_argmax(cs->logits, p->n_sel, e->V, cs->argmax_part, cs->argmax, st));
            PROF("argmax", 0);
        }
    }
    return ENG_OK;
}

/* Captures forward() into *g (the graph of a decode shape).  A capture or
 * instantiation that fails leaves *g NULL and switches graphs off, with a
 * line in the log: the step then runs directly. */
static void capture(eng_engine *e, cuda_state *cs, const cu_fwd *f, const eng_plan *p, int max_n,
                    size_t o_sel, cudaGraphExec_t *g)
{
    char err[256] = "";
    cudaGraph_t graph = NULL;
    cudaError_t ce = cudaStreamBeginCapture(cs->stream, cudaStreamCaptureModeThreadLocal);
    if (ce == cudaSuccess) {
        int rc = forward(e, cs, f, p, max_n, o_sel, err, sizeof err);
        cudaError_t end = cudaStreamEndCapture(cs->stream, &graph);
        if (rc && !err[0]) snprintf(err, sizeof err, "capture failed");
        if (!rc && end != cudaSuccess) ce = end;
        if (!rc && ce == cudaSuccess) ce = cudaGraphInstantiate(g, graph, 0);
        if (rc && ce == cudaSuccess) ce = cudaErrorStreamCaptureInvalidated;
    }
    if (graph) (void)cudaGraphDestroy(graph);
    if (ce == cudaSuccess) return;
    *g = NULL;
    cs->graphs_on = 0;
    (void)cudaGetLastError();
    if (e->prm.log) {
        char line[400];
        snprintf(line, sizeof line, "cuda: decode graphs switched off (%s%s%s)",
                 cudaGetErrorString(ce), err[0] ? ": " : "", err);
        e->prm.log(e->prm.log_ctx, line);
    }
}

static double now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static int cuda_step(eng_engine *e, const eng_plan *p, char *err, size_t errlen)
{
    cuda_state *cs = (cuda_state *)e->be;
    if (!cs) return eng__errf(err, errlen, ENG_EINVAL, "cuda: backend not initialised");
    if (!cs->kv_pool) return eng__errf(err, errlen, ENG_EINVAL, "cuda: step before pool_alloc");
    if (p->T <= 0 || p->T > e->prm.max_batch_tokens || p->n_items <= 0 ||
        p->n_items > e->prm.max_seqs || p->n_sel < 0 || p->n_sel > e->prm.max_seqs ||
        (p->n_sel > 0 && !p->logits))
        return eng__errf(err, errlen, ENG_EINVAL,
                         "cuda: step: %d rows, %d items, %d selected rows out of range", p->T,
                         p->n_items, p->n_sel);
    const double t0 = cs->prof ? now_ms() : 0.0;
    const cudaStream_t st = cs->stream;
    cu_fwd f = cs->fwd;
    int max_n = 0;
    size_t n_ints = 0, o_sel = 0;
    /* A decode step of a few sequences (each one row, each with logits or
     * argmax) replays the graph of its shape. */
    const int graph = cs->graphs_on && !cs->prof && p->T == p->n_items &&
                      p->T <= CU_GRAPH_ROWS && p->n_sel == p->T;
    int rc = pack_plan(e, cs, p, &f, &max_n, &n_ints, &o_sel, graph, err, errlen);
    if (rc) return rc;
    CUDA_TRY(cudaMemcpyAsync(cs->plan_dev, cs->plan_host, n_ints * sizeof(int),
                             cudaMemcpyHostToDevice, st));
    if (cs->prof) {
        cs->prof->active = p->T == p->n_items ? PROF_DECODE : PROF_PREFILL;
        cs->prof->n = 0;
        cs->prof->step_rows = p->T;
        /* Decode: the K/V bytes attention reads; prefill: its FLOPs (4 per
         * query dimension and key) over the rows, so that bytes x rows
         * counts them as prof_report does for a projection. */
        double ctx = 0, keys = 0;
        for (int i = 0; i < p->n_items; i++) {
            const double n0 = e->seqs[p->items[i].seq].n_tokens, n = p->items[i].n_tokens;
            ctx += n0 + n;
            keys += n * n0 + n * (n + 1) / 2;
        }
        cs->prof->att_bytes = cs->prof->active == PROF_DECODE
                                  ? ctx * 2.0 * e->kv_dim * sizeof(bf16)
                                  : 4.0 * e->q_dim * keys / p->T;
    }
    cudaGraphExec_t *g =
        graph ? &cs->graph[p->T][f.any_l3][p->argmax != NULL][f.tok_chunk != NULL] : NULL;
    if (g && !*g) capture(e, cs, &f, p, max_n, o_sel, g);
    if (g && *g)
        CUDA_TRY(cudaGraphLaunch(*g, st));
    else if ((rc = forward(e, cs, &f, p, max_n, o_sel, err, errlen)))
        return rc; /* (after a failed capture the bounded launches run directly) */
    if (p->n_sel > 0 && p->want_logits)
        CUDA_TRY(cudaMemcpyAsync(cs->logits_host, cs->logits,
                                 (size_t)p->n_sel * e->V * sizeof(float), cudaMemcpyDeviceToHost,
                                 st));
    if (p->n_sel > 0 && p->argmax)
        CUDA_TRY(cudaMemcpyAsync(cs->argmax_host, cs->argmax, (size_t)p->n_sel * sizeof(int),
                                 cudaMemcpyDeviceToHost, st));
    const size_t chunk_bytes = (size_t)p->n_chunks * (e->n_layers + 1) * e->D * sizeof(float);
    if (f.tok_chunk && p->n_chunks > 0)
        CUDA_TRY(cudaMemcpyAsync(cs->chunk_host, cs->chunk_out, chunk_bytes, cudaMemcpyDeviceToHost,
                                 st));
    CUDA_TRY(cudaStreamSynchronize(st));
    if (p->n_sel > 0 && p->want_logits)
        memcpy(p->logits, cs->logits_host, (size_t)p->n_sel * e->V * sizeof(float));
    for (int i = 0; p->argmax && i < p->n_sel; i++) p->argmax[i] = cs->argmax_host[i];
    if (f.tok_chunk && p->n_chunks > 0) memcpy(p->chunk_out, cs->chunk_host, chunk_bytes);
    if (cs->prof && (rc = prof_collect(cs, now_ms() - t0, err, errlen))) return rc;
    return ENG_OK;
}

/* ---- sequence state ---------------------------------------------------------- */

static cuda_state *state_of(eng_engine *e, int seq, char *err, size_t errlen, int *rc)
{
    cuda_state *cs = (cuda_state *)e->be;
    *rc = ENG_OK;
    if (!cs) *rc = eng__errf(err, errlen, ENG_EINVAL, "cuda: backend not initialised");
    else if (seq < 0 || seq >= e->prm.max_seqs)
        *rc = eng__errf(err, errlen, ENG_EINVAL, "cuda: sequence slot %d out of range", seq);
    return *rc ? NULL : cs;
}

static int cuda_ema_reset(eng_engine *e, int seq, int block, char *err, size_t errlen)
{
    int rc;
    cuda_state *cs = state_of(e, seq, err, errlen, &rc);
    if (!cs) return rc;
    const size_t ld = (size_t)e->n_layers * e->D;
    float *s = cs->ema + (size_t)seq * ld;
    if (block < 0) {
        CUDA_TRY(cudaMemsetAsync(s, 0, ld * sizeof(float), cs->stream));
    } else {
        if (block >= cs->n_blocks)
            return eng__errf(err, errlen, ENG_EINVAL, "cuda: block %d outside the pool", block);
        CUDA_TRY(cudaMemcpyAsync(s, cs->ema_ckpt + (size_t)block * ld, ld * sizeof(float),
                                 cudaMemcpyDeviceToDevice, cs->stream));
    }
    CUDA_TRY(cudaStreamSynchronize(cs->stream));
    return ENG_OK;
}

static int cuda_ema_get(eng_engine *e, int seq, float *ema, char *err, size_t errlen)
{
    int rc;
    cuda_state *cs = state_of(e, seq, err, errlen, &rc);
    if (!cs) return rc;
    const size_t ld = (size_t)e->n_layers * e->D;
    CUDA_TRY(cudaMemcpyAsync(ema, cs->ema + (size_t)seq * ld, ld * sizeof(float),
                             cudaMemcpyDeviceToHost, cs->stream));
    CUDA_TRY(cudaStreamSynchronize(cs->stream));
    return ENG_OK;
}

static int cuda_ema_set(eng_engine *e, int seq, const float *ema, char *err, size_t errlen)
{
    int rc;
    cuda_state *cs = state_of(e, seq, err, errlen, &rc);
    if (!cs) return rc;
    const size_t ld = (size_t)e->n_layers * e->D;
    CUDA_TRY(cudaMemcpyAsync(cs->ema + (size_t)seq * ld, ema, ld * sizeof(float),
                             cudaMemcpyHostToDevice, cs->stream));
    CUDA_TRY(cudaStreamSynchronize(cs->stream));
    return ENG_OK;
}

/* |mu|^2 summed as eng_cpu_dot sums it (eight lane-wise partial sums, added
 * in a fixed tree, then the tail), so that kappa has the CPU's bits. */
static float sum_sq_like_cpu(const float *a, int n)
{
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int k = 0;
    for (; k + 8 <= n; k += 8)
        for (int i = 0; i < 8; i++) acc[i] += a[k + i] * a[k + i];
    float s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    float t = 0.0f;
    for (; k < n; k++) t += a[k] * a[k];
    return s + t;
}

static int cuda_l3_set(eng_engine *e, int seq, int n, const float *mu, char *err, size_t errlen)
{
    int rc;
    cuda_state *cs = state_of(e, seq, err, errlen, &rc);
    if (!cs) return rc;
    const int R = cs->fwd.R, NL = e->n_layers, D = e->D;
    if (n < 0 || n > R || (n > 0 && !mu))
        return eng__errf(err, errlen, ENG_EINVAL, "cuda: L3 bank of %d chunks (at most %d)", n, R);
    if (R == 0) return ENG_OK; /* no bank exists; n == 0 clears nothing */
    const size_t bank = (size_t)NL * R * D;
    float *dmu = cs->l3_mu + (size_t)seq * bank, *dkap = cs->l3_kappa + (size_t)seq * bank;
    if (n == 0) {
        CUDA_TRY(cudaMemsetAsync(dmu, 0, bank * sizeof(float), cs->stream));
        CUDA_TRY(cudaMemsetAsync(dkap, 0, bank * sizeof(float), cs->stream));
    } else {
        /* (n, n_layers, D) in; (n_layers, R, D) on the device, so that one
         * layer's bank is contiguous for the read. */
        float *hm = cs->l3_host, *hk = cs->l3_host + bank;
        memset(cs->l3_host, 0, 2 * bank * sizeof(float));
        for (int r = 0; r < n; r++)
            for (int l = 0; l < NL; l++) {
                const float *src = mu + ((size_t)r * NL + l) * D;
                float *dm = hm + ((size_t)l * R + r) * D, *dk = hk + ((size_t)l * R + r) * D;
                memcpy(dm, src, (size_t)D * sizeof(float));
                float nrm = sqrtf(sum_sq_like_cpu(src, D));
                for (int i = 0; i < D; i++) dk[i] = nrm > 0.0f ? src[i] / nrm : 0.0f;
            }
        CUDA_TRY(cudaMemcpyAsync(dmu, hm, bank * sizeof(float), cudaMemcpyHostToDevice,
                                 cs->stream));
        CUDA_TRY(cudaMemcpyAsync(dkap, hk, bank * sizeof(float), cudaMemcpyHostToDevice,
                                 cs->stream));
    }
    CUDA_TRY(cudaStreamSynchronize(cs->stream));
    return ENG_OK;
}

static int block_check(eng_engine *e, int block, char *err, size_t errlen)
{
    cuda_state *cs = (cuda_state *)e->be;
    if (!cs || !cs->kv_pool)
        return eng__errf(err, errlen, ENG_EINVAL, "cuda: no K/V pool allocated");
    if (block < 0 || block >= cs->n_blocks)
        return eng__errf(err, errlen, ENG_EINVAL, "cuda: block %d outside the pool of %d", block,
                         cs->n_blocks);
    return ENG_OK;
}

static int cuda_block_get(eng_engine *e, int block, void *kv, float *ema, char *err,
                          size_t errlen)
{
    int rc = block_check(e, block, err, errlen);
    if (rc) return rc;
    cuda_state *cs = (cuda_state *)e->be;
    const size_t ld = (size_t)e->n_layers * e->D;
    if (kv)
        CUDA_TRY(cudaMemcpyAsync(kv, (unsigned char *)cs->kv_pool + (size_t)block * cs->blk_bytes,
                                 cs->blk_bytes, cudaMemcpyDeviceToHost, cs->stream));
    if (ema)
        CUDA_TRY(cudaMemcpyAsync(ema, cs->ema_ckpt + (size_t)block * ld, ld * sizeof(float),
                                 cudaMemcpyDeviceToHost, cs->stream));
    CUDA_TRY(cudaStreamSynchronize(cs->stream));
    return ENG_OK;
}

static int cuda_block_set(eng_engine *e, int block, const void *kv, const float *ema, char *err,
                          size_t errlen)
{
    int rc = block_check(e, block, err, errlen);
    if (rc) return rc;
    cuda_state *cs = (cuda_state *)e->be;
    const size_t ld = (size_t)e->n_layers * e->D;
    if (kv)
        CUDA_TRY(cudaMemcpyAsync((unsigned char *)cs->kv_pool + (size_t)block * cs->blk_bytes, kv,
                                 cs->blk_bytes, cudaMemcpyHostToDevice, cs->stream));
    if (ema)
        CUDA_TRY(cudaMemcpyAsync(cs->ema_ckpt + (size_t)block * ld, ema, ld * sizeof(float),
                                 cudaMemcpyHostToDevice, cs->stream));
    CUDA_TRY(cudaStreamSynchronize(cs->stream));
    return ENG_OK;
}

/* ---- the ops table ---------------------------------------------------------- */

/* Positional, in eng_backend's declaration order (C++ has no designated
 * initialisers for this struct in nvcc's dialect). */
extern "C" const eng_backend eng_backend_cuda = {
    "cuda",
    cuda_init,
    cuda_pool_alloc,
    cuda_fini,
    cuda_step,
    cuda_ema_reset,
    cuda_ema_get,
    cuda_ema_set,
    cuda_l3_set,
    cuda_block_get,
    cuda_block_set,
    1, /* argmax on the device */
};
