/*
 * engine_priv.h — the engine object and sequence slots, shared by engine.c
 * (forward step, pool, sequences) and state.c (export/import).
 */
#ifndef MKAD_ENGINE_PRIV_H
#define MKAD_ENGINE_PRIV_H

#include "internal.h"

typedef struct eng_seq {
    int in_use;
    int n_tokens;     /* positions whose K/V are in the blocks */
    int32_t *tokens;  /* (max_ctx) */
    int *blocks;      /* (max_blocks_per_seq) pool block ids, block i holds positions [i*B, (i+1)*B) */
    int n_blocks;
    float *ema;       /* (n_layers, D) EMA state s after the last token */
    int l3_n;         /* chunks in the L3 bank */
    float *l3_mu;     /* (n_layers, l3_max_chunks, D) chunk values */
    float *l3_kappa;  /* (n_layers, l3_max_chunks, D) keys mu/|mu| */
} eng_seq;

struct eng_engine {
    const eng_model *m;
    eng_params prm;
    eng_pool *pool;
    int D, F, V, hd, q_dim, kv_dim, n_layers, levels;
    int B;                  /* tokens per block */
    int max_blocks_per_seq;
    size_t block_floats;    /* n_layers * 2 * B * kv_dim */

    float *kv;              /* (n_blocks, n_layers, 2, B, kv_dim) fused K and V */
    float *ema_ckpt;        /* (n_blocks, n_layers, D) EMA after the block's last position */
    int *free_blocks;       /* stack of free block ids */
    int n_free;
    eng_seq *seqs;          /* (max_seqs) */

    /* Step scratch; T = max_batch_tokens. */
    float *h, *x, *f, *mem; /* (T, D) residual, normed input, fused input, L3 read */
    float *q, *att;         /* (T, H*d) */
    float *k, *v;           /* (T, H_kv*d) */
    float *tmp;             /* (T, max(D, H*d)) */
    float *gate, *up;       /* (T, F) */
    float *rh;              /* (T, D/2) router hidden */
    float *lam;             /* (T, 3) route weights */
    int *tok_item, *tok_pos;/* (T) batch item and position of each packed row */
    int *item_start;        /* (max_seqs) first packed row of each item */
    float *sel_x;           /* (max_seqs, D) final-normed rows for the LM head */
    float *sel_logits;      /* (max_seqs, V) */
    float *scores;          /* (n_threads, max(max_ctx, l3_max_chunks)) attention scratch */
    unsigned char *seen_seq;/* (max_seqs) */
};

/* The sequence in slot `seq`, or NULL when out of range or free. */
eng_seq *eng__seq(const eng_engine *e, int seq);

/* Stores chunk r's value mu (D) for layer l in the sequence's L3 bank and
 * derives its key. */
void eng__l3_store(const eng_engine *e, eng_seq *sq, int r, int l, const float *mu);

/* K (kind 0) or V (kind 1) row of layer l at offset off of block b: (kv_dim). */
static inline float *eng__kv_ptr(const eng_engine *e, int b, int l, int kind, int off)
{
    return e->kv + (size_t)b * e->block_floats +
           (((size_t)l * 2 + kind) * e->B + off) * e->kv_dim;
}

#endif
