/*
 * internal.h — private declarations shared by the engine's source files.
 * Nothing outside engine/ (and its unit tests) includes this header.
 */
#ifndef MKAD_ENGINE_INTERNAL_H
#define MKAD_ENGINE_INTERNAL_H

#include <stdarg.h>
#include <stdint.h>
#include <stddef.h>

#include "engine.h"

/* Writes a formatted message to (err, errlen) when err is non-NULL; returns
 * `status` so that callers can `return eng__errf(...)`. */
int eng__errf(char *err, size_t errlen, int status, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

/* A linear layer y = W x + b.  W is row-major (rows = out, cols = in), held
 * either as f32 (w) or, when the checkpoint stores it so, as bf16 bits (w16;
 * then w is NULL): bf16 weights stay bf16 in memory, which halves the bytes a
 * decode step reads, and widen exactly to f32 in the kernels.  b is NULL when
 * the checkpoint has no bias.  All are views into the model arena. */
typedef struct eng_linear {
    const float *w;      /* (rows, cols) f32, or NULL */
    const uint16_t *w16; /* (rows, cols) bf16, or NULL */
    const float *b;      /* (rows) or NULL */
    int rows, cols;
} eng_linear;

static inline float eng__bf16_to_f32(uint16_t h)
{
    union { uint32_t u; float f; } v = { (uint32_t)h << 16 };
    return v.f;
}

/* Row r of a matrix (as a linear's weight) widened to f32 into dst (cols). */
/* The id of the largest of x[0..n-1]: lowest id on ties, NaN never chosen
 * (n - 1 when all are NaN).  The greedy pick of eng_sampler and of
 * eng_batch_item.argmax; the CUDA argmax kernel follows the same rule. */
static inline int eng__argmax(const float *x, int n)
{
    int best = 0;
    while (best < n - 1 && x[best] != x[best]) best++;
    float bv = x[best]; /* in a register: the scan has no load that waits on `best` */
    for (int i = best + 1; i < n; i++)
        if (x[i] > bv) {
            best = i;
            bv = x[i];
        }
    return best;
}

static inline void eng__linear_row(const eng_linear *l, int r, float *dst)
{
    if (l->w16) {
        const uint16_t *s = l->w16 + (size_t)r * l->cols;
        for (int i = 0; i < l->cols; i++) dst[i] = eng__bf16_to_f32(s[i]);
    } else {
        const float *s = l->w + (size_t)r * l->cols;
        for (int i = 0; i < l->cols; i++) dst[i] = s[i];
    }
}

typedef struct eng_layer {
    const float *attn_norm; /* (D) input_layernorm */
    eng_linear q;           /* (H*d, D) */
    eng_linear k;           /* (H_kv*d, D) */
    eng_linear v;           /* (H_kv*d, D) */
    eng_linear o;           /* (D, H*d) */
    eng_linear router1;     /* (D/2, H*d); w == NULL when the model has no router */
    eng_linear router2;     /* (L, D/2) */
    const float *mlp_norm;  /* (D) post_attention_layernorm */
    eng_linear gate;        /* (F, D) */
    eng_linear up;          /* (F, D) */
    eng_linear down;        /* (D, F) */
} eng_layer;

struct eng_model {
    eng_model_info info;
    float rms_eps;
    /* RoPE: inv_freq (head_dim/2) already includes linear/llama3/yarn
     * scaling; rope_attn_scale multiplies cos and sin (yarn mscale, else 1). */
    float *rope_inv_freq;
    float rope_attn_scale;

    unsigned char *arena;    /* every weight, one allocation: matrices stored as
                                bf16 stay bf16, everything else is f32 */
    size_t arena_bytes;
    eng_linear embed;        /* (V, D) token embeddings, read row by row */
    const float *final_norm; /* (D) */
    eng_linear lm_head;      /* (V, D); the same view as embed when tied */
    eng_layer *layers;       /* (n_layers) */
};

/* ---- CPU threads (engine/cpu/pool.c) ---------------------------------- */

typedef struct eng_pool eng_pool;
/* fn(ctx, task, thread) is called once for every task in [0, n_tasks),
 * spread over the pool's threads; returns when all are done. */
typedef void (*eng_pool_fn)(void *ctx, int task, int thread);
int eng_pool_create(int n_threads, eng_pool **out);
void eng_pool_free(eng_pool *p);
int eng_pool_threads(const eng_pool *p);
void eng_pool_run(eng_pool *p, int n_tasks, eng_pool_fn fn, void *ctx);
/* Thread `thread`'s scratch of at least `bytes` (64-byte aligned), owned by
 * the pool and kept between runs; NULL when memory runs out.  Only that
 * thread's tasks may use it. */
void *eng_pool_scratch(eng_pool *p, int thread, size_t bytes);
/* The caller's scratch of at least `bytes` (64-byte aligned), kept between
 * runs: filled before eng_pool_run, read by every task of it.  NULL when
 * memory runs out. */
void *eng_pool_shared(eng_pool *p, size_t bytes);

/* ---- CPU kernels (engine/cpu/ops.c) --------------------------------------
 * Every kernel computes each output element with the same sequence of float
 * operations whatever the batch size or thread count, so results are
 * bit-identical between a one-shot prefill, chunked prefill, decode and any
 * ragged batch (batch invariance). */

/* y (M, rows) = x (M, cols) . W^T + b, spread over the pool by output rows
 * and input rows, never over cols; one contract for every element whatever
 * M, the thread or the instruction set (linear.c says which).  math:
 * ENG_CPU_MATH_EXACT, or ENG_CPU_MATH_FAST (bf16 weights on a CPU with
 * AVX512-BF16: activations rounded to bf16, linear.c's second contract;
 * otherwise the exact one). */
void eng_cpu_linear(eng_pool *p, const eng_linear *l, const float *x, int M, float *y, int math);
/* One element of that contract, written out in portable C: x (K) . w (K),
 * w bf16 when W16 (no bias).  The reference the vector paths must match. */
float eng_cpu_dot16_ref(const float *x, const void *w, int W16, int K);
/* Instruction-set paths of the CPU kernels, in order of width. */
enum { ENG_ISA_PORTABLE = 0, ENG_ISA_AVX2 = 1, ENG_ISA_AVX512 = 2 };
/* The path in use: the widest the CPU has, capped by MKAD_CPU_ISA
 * (portable | avx2 | avx512) when set. */
int eng_cpu_isa(void);
/* Caps the path at `level` (tests); ENG_EINVAL when the CPU lacks it (the
 * widest it has below is used then). */
int eng_cpu_isa_set(int level);
const char *eng_cpu_isa_name(int level);
/* 1 when eng_cpu_linear can run `math` (ENG_CPU_MATH_*) here: EXACT always,
 * FAST on the AVX-512 path of a CPU with AVX512-BF16. */
int eng_cpu_math_available(int math);
/* Causal attention of one token (attn.c): the G query heads q (G, hd) that
 * share one K/V head, over positions 0..n-1 of a sequence whose K/V rows
 * live in a paged pool: position j's K row is at kv + blocks[j / B] *
 * block_bytes + k_off + (j % B) * row_bytes (V: v_off), hd elements, bf16
 * when bf16 else f32.  out (G, hd) = softmax(q k^T * scale) v; sc: scratch
 * of ENG_CPU_ATTN_SCRATCH(G, n, hd) floats.  The same bits for a token
 * whatever the batch or path. */
#define ENG_CPU_ATTN_SCRATCH(G, n, hd) ((size_t)(G) * (n) + 16 * (size_t)(hd))
typedef struct eng_cpu_attn {
    const float *q;
    float *out, *sc;
    int G, hd, n, B, bf16;
    const int *blocks;
    const unsigned char *kv;
    size_t block_bytes, k_off, v_off, row_bytes;
    float scale;
    int math; /* ENG_CPU_MATH_*: fast takes bf16 dot products (attn.c) where it can */
} eng_cpu_attn;
void eng_cpu_attention(const eng_cpu_attn *a);
/* y (M, D) = RMSNorm(x) * w */
void eng_cpu_rmsnorm(const float *x, const float *w, int M, int D, float eps, float *y);
float eng_cpu_dot(const float *a, const float *b, int n);
float eng_cpu_dot_bf16(const float *a, const uint16_t *b, int n); /* b widened from bf16 */
/* y (n) += a * x (n) */
void eng_cpu_axpy(float *y, float a, const float *x, int n);
void eng_cpu_axpy_bf16(float *y, float a, const uint16_t *x, int n);

/* ---- JSON files of a model directory (engine/json_load.c) ---------------
 * Like jansson's loaders, except that an integer literal outside int64 (as
 * Python writes them) is read as a real instead of failing the file.  name
 * is how messages call the file.  *out: a new reference. */
struct json_t;
int eng__json_loadb(const char *buf, size_t len, const char *name, struct json_t **out, char *err, size_t errlen);
int eng__json_load_file(const char *path, const char *name, struct json_t **out, char *err, size_t errlen);

/* ---- chat templates (engine/chat.c) --------------------------------------- */
typedef struct eng_chat eng_chat;
/* Reads the chat template(s) of model directory dir (chat_template.jinja,
 * additional_chat_templates/, tokenizer_config.json's chat_template given as
 * cfg, or chat_template.json) and parses them.  A missing or unparsable
 * template is recorded, not an error: the tokenizer still loads and chat
 * calls report it.  Fails only when memory runs out. */
int eng__chat_load(const eng_tok *tok, const char *dir, const struct json_t *cfg, eng_chat **out, char *err,
                   size_t errlen);
void eng__chat_free(eng_chat *c);
/* The tokenizer's chat state (tokenizer.c); borrowed. */
eng_chat *eng__tok_chat(const eng_tok *tok);

/* ---- 64-bit hashing (engine/util.c) ------------------------------------- */
uint64_t eng__fnv1a64(uint64_t h, const void *data, size_t n);
#define ENG_FNV_INIT 0xcbf29ce484222325ULL

#endif /* MKAD_ENGINE_INTERNAL_H */
