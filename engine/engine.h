/*
 * engine.h — the whole public API of the mkad engine (prefix eng_).
 *
 * The engine loads a Hugging Face model directory, owns a paged K/V block
 * pool and a table of sequence slots, runs batched FastMKA forward steps over
 * ragged batches (some sequences prefilling a chunk, others decoding one
 * token), samples tokens, and exports/imports a sequence's whole state as one
 * versioned host buffer for the memstore.  It knows nothing about HTTP or
 * RocksDB.  FASTMKA.md (shared/) defines the math; docs/model-format.md the
 * accepted model directories.
 *
 * Status codes: 0 is success, negative values are errors (ENG_E*).  Functions
 * that can fail on input take an optional (err, errlen) buffer that receives
 * one human-readable line naming the file and field at fault.
 *
 * Threads: an eng_engine is owned by one thread (the engine thread); none of
 * its functions may be called concurrently on the same engine.  A loaded
 * eng_model is read-only and may be shared.
 */
#ifndef MKAD_ENGINE_H
#define MKAD_ENGINE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum {
    ENG_OK = 0,
    ENG_EINVAL = -1,       /* bad argument from the caller */
    ENG_ENOMEM = -2,       /* allocation failed */
    ENG_EIO = -3,          /* file could not be opened/read/mapped */
    ENG_EFORMAT = -4,      /* malformed file content (JSON, safetensors, state) */
    ENG_EUNSUPPORTED = -5, /* well-formed but not supported (architecture, dtype, rope) */
    ENG_ENOSPC = -6,       /* no free K/V block or sequence slot */
    ENG_ERANGE = -7,       /* context or batch limit exceeded */
    ENG_EMISMATCH = -8     /* state written for another model/engine layout */
};

/* A static string for a status code. */
const char *eng_strerror(int status);

/* ---- model ------------------------------------------------------------ */

typedef struct eng_model eng_model;

typedef struct eng_model_info {
    char arch[32];        /* "qwen2" or "llama" */
    int n_layers;
    int d_model;          /* D */
    int n_heads;          /* H */
    int n_kv_heads;       /* H_kv */
    int head_dim;         /* d */
    int ffn_dim;          /* SwiGLU intermediate size */
    int vocab_size;
    int max_position;     /* max_position_embeddings */
    int mka_levels;       /* 0: no router weights (plain attention), else 2 or 3 */
    float ema_beta;       /* mka.ema_beta (0.9 when absent) */
    int l3_chunk_tokens;  /* mka.l3_chunk_tokens, C (64 when absent) */
    int l3_top_r;         /* mka.l3_top_r, R (8 when absent) */
    int tied_embeddings;  /* lm_head shares the embedding matrix */
    int bos_token_id;     /* -1 when absent */
    int eos_token_id;     /* first eos id, -1 when absent */
    char dtype[8];        /* storage dtype of the weights on disk: f32, f16, bf16 */
    char fingerprint[17]; /* hex of a 64-bit hash over config and tensor bytes */
} eng_model_info;

/* Loads the model directory `dir` (config.json + model.safetensors or shards
 * with model.safetensors.index.json).  On success *out owns the model; free
 * it with eng_model_free.  On failure returns a negative status, *out is NULL
 * and err holds one line naming the file and field. */
int eng_model_load(const char *dir, eng_model **out, char *err, size_t errlen);
void eng_model_free(eng_model *m);
/* Borrowed; valid until eng_model_free. */
const eng_model_info *eng_model_get_info(const eng_model *m);

/* ---- engine ----------------------------------------------------------- */

typedef struct eng_engine eng_engine;

typedef struct eng_params {
    int n_threads;        /* CPU worker threads, 0 = number of online CPUs */
    int block_size;       /* tokens per K/V block (default 32) */
    int n_blocks;         /* K/V blocks in the pool, 0 = enough for max_seqs full contexts,
                             capped by kv_mem_mb */
    int kv_mem_mb;        /* cap for the automatic pool size (default 1024) */
    int max_seqs;         /* sequence slots (default 16) */
    int max_ctx;          /* max tokens per sequence, 0 = model max_position (capped 8192) */
    int max_batch_tokens; /* max tokens in one step over all sequences (default 512) */
    int l3_max_chunks;    /* max L3 bank size per sequence, 0 = model l3_top_r */
} eng_params;

eng_params eng_default_params(void);

/* Creates an engine over `model` (borrowed; must outlive the engine).  All
 * memory the token loop needs is allocated here. */
int eng_create(const eng_model *model, const eng_params *params, eng_engine **out,
               char *err, size_t errlen);
void eng_free(eng_engine *e);
/* The parameters in force after defaults were resolved. */
const eng_params *eng_get_params(const eng_engine *e);
const eng_model *eng_get_model(const eng_engine *e);

/* K/V pool occupancy. */
typedef struct eng_stats {
    int blocks_total;
    int blocks_used;
    int seqs_active;
} eng_stats;
void eng_get_stats(const eng_engine *e, eng_stats *out);

/* ---- sequences ---------------------------------------------------------- */

/* Takes a free sequence slot: *seq receives its id (0..max_seqs-1).
 * ENG_ENOSPC when all slots are in use. */
int eng_seq_create(eng_engine *e, int *seq);
/* Releases the slot and its K/V blocks.  Ignores an id that is not in use. */
void eng_seq_free(eng_engine *e, int seq);
/* Number of tokens whose K/V the sequence holds. */
int eng_seq_len(const eng_engine *e, int seq);
/* The sequence's token ids; borrowed, valid until the next call that changes
 * the sequence. */
const int32_t *eng_seq_tokens(const eng_engine *e, int seq);
/* Cuts the sequence back to its first n tokens.  n must be 0, the current
 * length, or a multiple of block_size (the EMA state is checkpointed only at
 * block boundaries).  Frees the blocks past n. */
int eng_seq_truncate(eng_engine *e, int seq, int n);
/* Installs the sequence's L3 bank: n_chunks memory chunks, chunk r's per-layer
 * value vectors mu (n_chunks, n_layers, D) (copied; keys are mu/|mu|).  Only
 * on an empty sequence (length 0) and only for mka_levels == 3; n_chunks == 0
 * clears the bank. */
int eng_seq_set_l3_bank(eng_engine *e, int seq, int n_chunks, const float *mu);

/* ---- forward step ------------------------------------------------------- */

typedef struct eng_batch_item {
    int seq;               /* sequence slot */
    const int32_t *tokens; /* borrowed for the call: the tokens to append */
    int n_tokens;          /* >= 1 */
    float *logits;         /* NULL, or (vocab_size): receives the logits after
                              the item's last token */
} eng_batch_item;

/* Runs one batched forward step: every item appends its tokens to its
 * sequence (a prefill chunk or one decode token).  Items must name distinct
 * sequences; the total token count must not exceed max_batch_tokens.  On
 * error no sequence is changed. */
int eng_step(eng_engine *e, const eng_batch_item *items, int n_items, char *err, size_t errlen);

/* ---- sequence state export / import ------------------------------------ */

/* Bytes eng_seq_export needs for the sequence in its current state. */
size_t eng_seq_export_size(const eng_engine *e, int seq);
/* Writes the sequence's complete state (token ids, fused K/V of every
 * position, the EMA state at every block boundary and at the end, the L3
 * bank, the model fingerprint) to buf in the versioned layout of
 * docs/model-format.md ("Sequence state"). */
int eng_seq_export(const eng_engine *e, int seq, void *buf, size_t len);
/* Loads a state written by eng_seq_export into the empty sequence `seq`.
 * Checks magic, version, sizes, checksum and model fingerprint; on any
 * failure the sequence stays empty and err says why. */
int eng_seq_import(eng_engine *e, int seq, const void *buf, size_t len, char *err, size_t errlen);

/* ---- sampling ----------------------------------------------------------- */

typedef struct eng_sampler eng_sampler;

typedef struct eng_sampler_params {
    float temperature;        /* 0 = greedy (argmax) */
    int top_k;                /* 0 = off */
    float top_p;              /* 1 = off; (0, 1] */
    float min_p;              /* 0 = off */
    float repetition_penalty; /* 1 = off; HF semantics over the history */
    uint64_t seed;            /* same seed, same logits => same tokens */
} eng_sampler_params;

eng_sampler_params eng_sampler_default_params(void);
/* Checks ranges; returns ENG_EINVAL with a message naming the field. */
int eng_sampler_params_validate(const eng_sampler_params *p, char *err, size_t errlen);
/* Allocates the sampler's scratch (vocab-sized) once. */
int eng_sampler_create(int vocab_size, const eng_sampler_params *p, eng_sampler **out);
void eng_sampler_free(eng_sampler *s);
/* Picks the next token from logits (vocab_size, modified in place).
 * history (n_history ids, may be NULL) feeds the repetition penalty. */
int32_t eng_sampler_sample(eng_sampler *s, float *logits, const int32_t *history, int n_history);

#ifdef __cplusplus
}
#endif
#endif /* MKAD_ENGINE_H */
