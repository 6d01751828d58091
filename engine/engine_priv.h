/*
 * engine_priv.h — the engine core and the backend interface.
 *
 * The core (engine.c, state.c) is backend-neutral: it owns the sequence
 * slots, their token ids and block tables, the free-block list and the
 * blocks' reference counts, step validation and batch packing, and the state
 * layouts.  Everything that holds numbers the forward pass computes —
 * weights in the backend's form, the K/V pool, the EMA checkpoints, each
 * sequence's running EMA state and L3 bank, step scratch — belongs to the
 * backend, reached only through the ops table below (engine/cpu/ is the reference, engine/cuda/ the GPU twin).  Data
 * moves between core and backend as host buffers in the layouts documented
 * here, so state can move between backends and memory tiers unchanged.
 */
#ifndef MKAD_ENGINE_PRIV_H
#define MKAD_ENGINE_PRIV_H

#include "internal.h"

/* ENG_KV_F32 / ENG_KV_BF16 (engine.h) name e->kv_dtype. */

typedef struct eng_seq {
    int in_use;
    int n_tokens;     /* positions whose K/V are in the blocks */
    int32_t *tokens;  /* (max_ctx) */
    int *blocks;      /* (max_blocks_per_seq) row of e->block_table: block i holds
                         positions [i*B, (i+1)*B); full blocks may be shared with
                         other sequences (e->block_ref), the partial last one never */
    int n_blocks;
    int l3_n;         /* chunks in the L3 bank */
    float *l3_mu;     /* (l3_max_chunks, n_layers, D) host copy of the bank's values,
                         as given to eng_seq_set_l3_bank (for export) */
    int chunk_from;   /* a multiple of C: the first position at which an L3 memory chunk
                         may start and be emitted, since every position from there on was
                         computed by eng_step (eng__chunks_restart) */
} eng_seq;

/* One planned step as the backend sees it: the tokens of every item packed
 * into rows 0..T-1 (item i owns rows item_start[i] .. item_start[i] +
 * items[i].n_tokens - 1).  The core has already appended to each sequence's
 * block table the blocks the new positions need; sequence lengths
 * (e->seqs[s].n_tokens) still hold the length before the step. */
typedef struct eng_plan {
    const eng_batch_item *items; /* (n_items) */
    int n_items;
    int T;                       /* packed rows */
    const int32_t *tok;          /* (T) token ids */
    const int *tok_item;         /* (T) item of each row */
    const int *tok_pos;          /* (T) position of each row in its sequence */
    const int *item_start;       /* (n_items) first row of each item */
    int n_sel;                   /* rows whose logits are wanted */
    const int *sel_row;          /* (n_sel) those rows, in item order */
    float *logits;               /* (n_sel, V) host: receives their logits */
    int want_logits;             /* 0: no item wants the logits themselves, only their
                                    argmax; a backend with .argmax may leave logits unwritten */
    int32_t *argmax;             /* (n_sel) host, or NULL: a backend with .argmax writes each
                                    selected row's argmax here (eng__argmax's rule) */
    /* L3 memory chunks (engine.h), only with l3_capture; else tok_chunk is
     * NULL and the backend does no chunk work. */
    const int *tok_chunk;        /* (T) the chunk row t completes, 0..n_chunks-1, or -1 */
    int n_chunks;                /* chunks the step completes and emits */
    float *chunk_out;            /* (n_chunks, n_layers + 1, D) host: receives chunk c's mean x
                                    per layer, then its mean embedding */
} eng_plan;

/* A backend.  Every op returns 0 or a negative ENG_E* status and fills
 * (err, errlen) on failure.  Host buffers are borrowed for the call.
 *
 * Block layout (host side of block_get/block_set; engine.h documents the
 * same layout as the public block payload):
 *   kv   (n_layers, 2, B, kv_dim) in e->kv_dtype: fused K (after RoPE), then V
 *   ema  (n_layers, D) f32: the EMA state after the block's last position
 *
 * A step writes K/V only at positions >= the sequence's length, and a
 * checkpoint only when a position closes a block, so it never touches a full
 * block: that is what lets the core share full blocks between sequences.
 */
typedef struct eng_backend {
    const char *name; /* "cpu", "cuda" */
    /* Loads the weights into the backend's form and allocates everything the
     * step needs except the K/V pool; sets e->be, e->kv_dtype and
     * e->be_mem_avail (bytes the K/V pool may take, 0 = no limit known). */
    int (*init)(eng_engine *e, char *err, size_t errlen);
    /* Allocates the pool of e->prm.n_blocks blocks (+ EMA checkpoints). */
    int (*pool_alloc)(eng_engine *e, char *err, size_t errlen);
    void (*fini)(eng_engine *e); /* frees e->be and all it owns; NULL-safe */
    /* One forward step over the plan: updates the EMA state of every item's
     * sequence, writes K/V (and EMA checkpoints at block ends) into the
     * sequences' blocks, and the logits of the selected rows.
     * With p->tok_chunk (l3_capture) it also keeps, per slot, the running f32
     * sums of the current memory chunk: the embedding rows and every layer's
     * x rows, added in position order, restarted from zero at every position
     * that is a multiple of e->l3_C; at a row with tok_chunk[t] = c it writes
     * those sums / C to chunk c of p->chunk_out.  The core decides which
     * chunks are emitted (eng_seq.chunk_from), so the backend needs no reset
     * when a sequence is imported, forked or truncated: a sum that mixes in
     * positions not computed here belongs to a chunk that is never emitted. */
    int (*step)(eng_engine *e, const eng_plan *p, char *err, size_t errlen);
    /* The running EMA state of a sequence: set to zeros (block < 0) or to
     * block's checkpoint. */
    int (*ema_reset)(eng_engine *e, int seq, int block, char *err, size_t errlen);
    int (*ema_get)(eng_engine *e, int seq, float *ema, char *err, size_t errlen);       /* (n_layers, D) */
    int (*ema_set)(eng_engine *e, int seq, const float *ema, char *err, size_t errlen); /* (n_layers, D) */
    /* Binds the L3 bank: n chunks, mu (n, n_layers, D) (keys are mu/|mu|). */
    int (*l3_set)(eng_engine *e, int seq, int n, const float *mu, char *err, size_t errlen);
    /* Copies a whole block out of / into the pool (layouts above). */
    int (*block_get)(eng_engine *e, int block, void *kv, float *ema, char *err, size_t errlen);
    int (*block_set)(eng_engine *e, int block, const void *kv, const float *ema, char *err, size_t errlen);
    int argmax; /* 1: step computes p->argmax itself (on the device); 0: the core does it */
} eng_backend;

extern const eng_backend eng_backend_cpu;
#ifdef HAVE_CUDA
extern const eng_backend eng_backend_cuda;
/* 1 when a CUDA device can be used (checked once). */
int eng_cuda_device_present(void);
#endif

struct eng_engine {
    const eng_model *m;
    const eng_backend *ops;
    void *be;               /* the backend's private state */
    eng_params prm;
    int D, F, V, hd, q_dim, kv_dim, n_layers, levels;
    int B;                  /* tokens per block */
    int max_blocks_per_seq;
    int kv_dtype;           /* ENG_KV_* */
    size_t block_kv_bytes;  /* n_layers * 2 * B * kv_dim * element size */
    size_t be_mem_avail;    /* set by init: bytes the pool may take, 0 = unknown */

    int *block_table;       /* (max_seqs, max_blocks_per_seq) */
    int *block_ref;         /* (n_blocks) sequences whose table holds the block; 0: free */
    int *free_blocks;       /* stack of free block ids */
    int n_free;
    eng_seq *seqs;          /* (max_seqs) */

    /* Planning scratch; T = max_batch_tokens. */
    int32_t *tok;           /* (T) */
    int *tok_item, *tok_pos;/* (T) */
    int *item_start;        /* (max_seqs) */
    int *sel_row;           /* (max_seqs) */
    float *sel_logits;      /* (max_seqs, V) */
    int32_t *sel_argmax;    /* (max_seqs) */
    unsigned char *seen_seq;/* (max_seqs) */
    /* L3 memory chunks: l3_C always, the rest only with l3_capture (else NULL, 0). */
    int l3_C;               /* tokens per chunk: the model's l3_chunk_tokens */
    int max_step_chunks;    /* chunks one step can complete: min(T / C + max_seqs, T) */
    int *tok_chunk;         /* (T) plan.tok_chunk */
    float *chunk_vals;      /* (max_step_chunks, n_layers + 1, D) plan.chunk_out */
    eng_chunk *chunks;      /* (max_step_chunks) what eng_step_chunks hands out */
    int n_chunks;           /* chunks the last step completed */
    /* Export/import staging: one block. */
    unsigned char *stage_kv;/* (block_kv_bytes) */
    float *stage_ema;       /* (n_layers, D) */
};

/* The sequence in slot `seq`, or NULL when out of range or free. */
eng_seq *eng__seq(const eng_engine *e, int seq);
/* Appends a free block (reference count 1) to sq's table; the caller has
 * checked e->n_free.  Returns the block id. */
int eng__block_push(eng_engine *e, eng_seq *sq);
/* Drops sq's blocks past the first `keep`; each goes back to the free stack
 * when no other sequence holds it. */
void eng__blocks_release(eng_engine *e, eng_seq *sq, int keep);

/* The sequence's positions did not all come from eng_step (an import or a
 * fork), or it was cut (truncate): its next memory chunk that may be
 * emitted starts at the first multiple of C at or after its length. */
static inline void eng__chunks_restart(const eng_engine *e, eng_seq *sq)
{
    int64_t C = e->l3_C, n = sq->n_tokens, from = (n + C - 1) / C * C;
    sq->chunk_from = from < INT32_MAX ? (int)from : INT32_MAX;
}

/* bf16 <-> f32.  Narrowing rounds to nearest even (NaN stays NaN). */
static inline uint16_t eng__f32_to_bf16(float f)
{
    union { float f; uint32_t u; } v = { f };
    if ((v.u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((v.u >> 16) | 0x40);
    v.u += 0x7fffu + ((v.u >> 16) & 1u);
    return (uint16_t)(v.u >> 16);
}

#endif
