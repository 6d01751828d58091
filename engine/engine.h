/*
 * engine.h — the whole public API of the mkad engine (prefix eng_).
 *
 * The engine loads a Hugging Face model directory, owns a paged K/V block
 * pool and a table of sequence slots, runs batched FastMKA forward steps over
 * ragged batches (some sequences prefilling a chunk, others decoding one
 * token), samples tokens, shares full K/V blocks between sequences with a
 * common prefix, and exports/imports a sequence's state for the memstore,
 * block by block or whole.  It knows nothing about HTTP or RocksDB.  FASTMKA.md (shared/) defines the math; docs/model-format.md the
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
    ENG_EMISMATCH = -8,    /* state written for another model/engine layout */
    ENG_EDEVICE = -9       /* the device failed (CUDA error): the engine is unusable */
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
/* out (d_model) = the mean of the token embeddings of tokens[0..n) — the
 * L3 retrieval key of a prompt (FASTMKA.md "L3"), the same quantity as
 * eng_chunk.emb.  Thread-safe (reads the weights only).  ENG_EINVAL for an
 * id out of range or n <= 0. */
int eng_model_embed_mean(const eng_model *m, const int32_t *tokens, int n, float *out);

/* splitmix64 (Steele, Lea and Flood 2014): advances *state by one step and
 * returns the next 64-bit value of its stream.  The sampler seeds its
 * generator with it; the server draws default seeds and response ids from it. */
uint64_t eng_splitmix64(uint64_t *state);

/* ---- engine ----------------------------------------------------------- */

typedef struct eng_engine eng_engine;

/* Backends: where the forward pass runs.  The CPU backend is the reference;
 * the CUDA backend (built with --with-cuda) runs on the first GPU. */
enum {
    ENG_BACKEND_AUTO = 0, /* CUDA when compiled in and a device is present, else CPU */
    ENG_BACKEND_CPU = 1,
    ENG_BACKEND_CUDA = 2
};

/* "auto", "cpu" or "cuda" -> ENG_BACKEND_*; ENG_EINVAL for anything else. */
int eng_backend_parse(const char *name, int *backend);
/* 1 when the backend can run here: CPU always; CUDA when compiled in and a
 * device answers.  AUTO: always 1. */
int eng_backend_available(int backend);

/* Arithmetic of the CPU backend's projections. */
enum {
    ENG_CPU_MATH_EXACT = 0, /* the reference (default): f32 FMA, bf16 weights widened exactly */
    ENG_CPU_MATH_FAST = 1   /* bf16 weights: activations rounded to bf16, AVX512-BF16 dot
                               products; deterministic and batch-invariant, not the
                               reference (docs/performance.md: the cost).  Where the CPU
                               lacks AVX512-BF16 the exact kernels run */
};
/* "exact" or "fast" -> ENG_CPU_MATH_*; ENG_EINVAL for anything else. */
int eng_cpu_math_parse(const char *name, int *math);

typedef struct eng_params {
    int backend;          /* ENG_BACKEND_* (default AUTO) */
    int n_threads;        /* CPU worker threads, 0 = number of online CPUs */
    int cpu_math;         /* ENG_CPU_MATH_* (default EXACT); eng_get_params: the one in
                             force (EXACT where FAST cannot run: not the CPU backend, no
                             AVX512-BF16, or not a bf16 model) */
    int block_size;       /* tokens per K/V block (default 32) */
    int n_blocks;         /* K/V blocks in the pool, 0 = enough for max_seqs full contexts,
                             capped by kv_mem_mb */
    int kv_mem_mb;        /* cap for the automatic pool size; 0 = default: 1024 on the
                             CPU, 90% of the device memory left after weights and step
                             buffers on CUDA */
    int max_seqs;         /* sequence slots (default 16) */
    int max_ctx;          /* max tokens per sequence, 0 = model max_position (capped 8192) */
    int max_batch_tokens; /* max tokens in one step over all sequences (default 512) */
    int l3_max_chunks;    /* max L3 bank size per sequence, 0 = model l3_top_r */
    int l3_capture;       /* 1: eng_step also computes L3 memory chunks (eng_step_chunks);
                             0 (default): no chunk buffers, no extra work */
    /* Optional progress lines for long work in eng_create (e.g. uploading a
     * large model to the GPU); called on the creating thread. */
    void (*log)(void *log_ctx, const char *line);
    void *log_ctx;
} eng_params;

eng_params eng_default_params(void);

/* Creates an engine over `model` (borrowed; must outlive the engine).  All
 * memory the token loop needs is allocated here. */
int eng_create(const eng_model *model, const eng_params *params, eng_engine **out,
               char *err, size_t errlen);
void eng_free(eng_engine *e);
/* The parameters in force after defaults were resolved (backend is CPU or
 * CUDA, never AUTO; kv_mem_mb is the pool's size in MiB). */
const eng_params *eng_get_params(const eng_engine *e);
const eng_model *eng_get_model(const eng_engine *e);
/* "cpu" or "cuda" (static string). */
const char *eng_backend_name(const eng_engine *e);

/* K/V pool occupancy. */
typedef struct eng_stats {
    int blocks_total;
    int blocks_used;
    int seqs_active;
    size_t kv_bytes;      /* bytes of the K/V pool (K/V + EMA checkpoints) */
    const char *kv_dtype; /* "f32" or "bf16": the CPU keeps K/V in bf16 for a bf16
                             checkpoint, else f32; CUDA always in bf16 */
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
 * block boundaries).  Lets go of the blocks past n (a block shared with
 * another sequence stays with it). */
int eng_seq_truncate(eng_engine *e, int seq, int n);
/* Makes the empty sequence dst start as the first n_tokens tokens of src:
 * the same token ids, L3 bank, K/V and EMA state, so that both continue
 * exactly as src alone would (n `choices`, a common prefix).  src's full
 * blocks among them are shared, not copied: a full block is never written
 * again, and returns to the pool when the last sequence holding it lets go.
 * n_tokens must be a multiple of block_size (the EMA state is checkpointed
 * only at block ends) or src's whole length; then a partial last block is
 * copied into a fresh block and src's running EMA state taken.  ENG_EINVAL
 * for anything else (dst not empty, dst == src, a slot not in use);
 * ENG_ENOSPC when the partial block finds no free block.  On error dst is
 * unchanged. */
int eng_seq_fork(eng_engine *e, int src, int dst, int n_tokens);
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
    int32_t *argmax;       /* NULL, or receives the id of the largest of those
                              logits (lowest id on ties, NaN never chosen:
                              eng_sampler's greedy pick without penalties or
                              bias).  Asked without logits, the logits need not
                              leave the device: greedy decoding copies one id
                              per sequence instead of vocab_size floats */
} eng_batch_item;

/* Runs one batched forward step: every item appends its tokens to its
 * sequence (a prefill chunk or one decode token).  Items must name distinct
 * sequences; the total token count must not exceed max_batch_tokens.  On
 * error no sequence is changed.  With l3_capture, eng_step_chunks then gives
 * the memory chunks the step completed. */
int eng_step(eng_engine *e, const eng_batch_item *items, int n_items, char *err, size_t errlen);

/* ---- L3 memory chunks ---------------------------------------------------- */

/* A memory chunk (FASTMKA.md, "L3 — long-term memory") summarises
 * C = eng_model_info.l3_chunk_tokens consecutive positions of a sequence;
 * chunk k covers positions [k*C, (k+1)*C).  With eng_params.l3_capture set,
 * eng_step computes the chunks during the forward pass (no extra pass over
 * the history):
 *   mu   (n_layers, D)  per layer, the mean over the chunk of that layer's
 *                       attention input x_t = RMSNorm(h_t), f32: the chunk's
 *                       values as eng_seq_set_l3_bank takes them (keys are
 *                       mu / |mu|, derived there)
 *   emb  (D)            the mean of the chunk's token embeddings (the input
 *                       of layer 0): the retrieval key e
 * for any model (plain attention included; only mka_levels 3 reads a bank).
 *
 * A chunk is emitted by the step that computes its last position, and only
 * when this engine computed all C of its positions with eng_step since the
 * sequence last changed otherwise.  Positions restored by
 * eng_seq_blocks_import, eng_seq_import or eng_seq_fork were not computed
 * here, and eng_seq_truncate to a length that is not a multiple of C cuts
 * the chunk it falls in: such chunks are never emitted, not even in part;
 * after any of these calls the sequence's next chunk starts at the first
 * multiple of C at or after its length.  So a resumed session gives the
 * chunks from there on, and a chunk seen once is never emitted again unless
 * its positions are truncated away and computed anew.
 *
 * A mean is an f32 sum of the C rows in position order, divided by C: on
 * the CPU a chunk has the same bits whether its positions came in one
 * prefill step, in several chunks or one decode step each, alone or in a
 * ragged batch.  The CUDA backend agrees within bf16 tolerance
 * (tests/test_cuda.c).
 *
 * Why per step rather than a per-sequence "take": a chunk is a product of
 * the step that completes it, like the logits; one buffer sized at
 * eng_create (at most max_batch_tokens / C + max_seqs chunks complete in
 * one step) holds any step's chunks, nothing is kept per sequence between
 * steps, and the caller, which handles every step's output anyway, reads
 * them in one loop. */
typedef struct eng_chunk {
    int seq;          /* sequence slot */
    int index;        /* k: the chunk covers positions [k*C, (k+1)*C) */
    const float *mu;  /* (n_layers, D) per-layer means of x */
    const float *emb; /* (D) mean token embedding */
} eng_chunk;

/* The chunks completed by the last eng_step, for every sequence in it: in
 * the order of the step's items, and by position within an item.  Returns
 * their count: 0 without l3_capture, before the first step and after a
 * failed one.  *out (out may be NULL) receives an array owned by the
 * engine; it and the vectors it points to are borrowed until the next
 * eng_step or eng_free (eng_seq_free and the other sequence calls leave
 * them alone). */
int eng_step_chunks(const eng_engine *e, const eng_chunk **out);

/* ---- sequence state by blocks ------------------------------------------- */

/* A sequence's K/V live in blocks of B = block_size positions.  A full block
 * never changes once its last position is written; it is the unit a turn
 * persists (only the blocks that turn filled) and a resume loads (the first
 * k blocks of a stored session; the rest is prefilled).
 *
 * One block's record, as eng_seq_blocks_export writes it and
 * eng_seq_blocks_import reads it (little-endian, no padding, no header):
 *   kv   [n_layers][2][B][kv_dim] in kv_dtype   fused K (after RoPE), then V
 *   ema  [n_layers][d_model] float               EMA state after the block's
 *                                                last position (the checkpoint)
 * kv_bytes + ema_bytes = block_bytes; n blocks are n records back to back.
 * A record has no identity of its own: its K/V and EMA depend on the model,
 * the sequence's L3 bank and every token id up to the block's end, so the
 * caller keys and checks it by all three (and by this format). */
enum { ENG_KV_F32 = 0, ENG_KV_BF16 = 1 }; /* element type of K/V */

typedef struct eng_block_format {
    int block_tokens;   /* B */
    int n_layers;
    int kv_dim;         /* n_kv_heads * head_dim */
    int d_model;        /* D */
    int kv_dtype;       /* ENG_KV_*: bf16 on CUDA and for bf16 checkpoints, else f32 */
    size_t kv_bytes;    /* n_layers * 2 * B * kv_dim * (4 for f32, 2 for bf16) */
    size_t ema_bytes;   /* n_layers * d_model * 4 */
    size_t block_bytes; /* kv_bytes + ema_bytes: one record */
} eng_block_format;

void eng_get_block_format(const eng_engine *e, eng_block_format *out);
/* Full blocks of the sequence (its length / B); ENG_EINVAL for a free slot. */
int eng_seq_n_full_blocks(const eng_engine *e, int seq);
/* Writes full blocks [first, first + n) of the sequence to buf as n records.
 * A block's bytes never change, so what an earlier call wrote for it stays
 * valid.  ENG_EINVAL unless 0 <= first and first + n <= the full blocks;
 * ENG_ERANGE when len < n * block_bytes. */
int eng_seq_blocks_export(const eng_engine *e, int seq, int first, int n, void *buf, size_t len);
/* Appends n_blocks full blocks to the sequence seq, whose length must be a
 * multiple of B (0 for a new one): tokens (n_blocks * B ids, borrowed) are
 * the positions they hold, buf (len == n_blocks * block_bytes, borrowed) the
 * records eng_seq_blocks_export wrote for the same model and block format.
 * The sequence's EMA state becomes the last record's checkpoint, so the next
 * eng_step continues exactly as if those tokens had been prefilled.
 * The L3 bank is not part of a record: bind the session's bank with
 * eng_seq_set_l3_bank on the empty sequence first; records computed under
 * another bank import without complaint and continue wrongly.
 * Errors, with a message: ENG_EINVAL (slot not in use, length not a multiple
 * of B, len not n_blocks records, a token id out of range), ENG_ERANGE (past
 * max_ctx), ENG_ENOSPC (fewer than n_blocks free blocks).  On error the
 * sequence is unchanged. */
int eng_seq_blocks_import(eng_engine *e, int seq, const int32_t *tokens, int n_blocks, const void *buf,
                          size_t len, char *err, size_t errlen);

/* ---- whole sequence state export / import ------------------------------- */

/* Bytes eng_seq_export needs for the sequence in its current state. */
size_t eng_seq_export_size(const eng_engine *e, int seq);
/* Writes the sequence's complete state (token ids, fused K/V of every
 * position, the EMA state at every block boundary and at the end, the L3
 * bank, the model fingerprint) to buf in the versioned, checksummed layout of
 * docs/model-format.md ("Sequence state"); its full blocks are the records
 * above. */
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
    float presence_penalty;   /* 0 = off; [-2, 2]; OpenAI semantics over the tokens this
                                 sampler has returned (see eng_sampler_sample) */
    float frequency_penalty;  /* 0 = off; [-2, 2]; likewise */
} eng_sampler_params;

eng_sampler_params eng_sampler_default_params(void);
/* Checks ranges; returns ENG_EINVAL with a message naming the field. */
int eng_sampler_params_validate(const eng_sampler_params *p, char *err, size_t errlen);
/* Allocates the sampler's scratch (vocab-sized) once. */
int eng_sampler_create(int vocab_size, const eng_sampler_params *p, eng_sampler **out);
void eng_sampler_free(eng_sampler *s);
/* OpenAI's logit_bias: bias[i] (in [-100, 100]) is added to the logit of
 * ids[i] before every sample; -100 all but bans a token, 100 all but forces
 * it.  Replaces any earlier bias (n = 0 clears it); the arrays are copied.
 * ENG_EINVAL (nothing changed) for an id outside the vocabulary, a bias out
 * of range, or a repeated id. */
int eng_sampler_set_logit_bias(eng_sampler *s, const int32_t *ids, const float *bias, int n);
/* Picks the next token from logits (vocab_size, modified in place).
 * history (n_history ids, may be NULL) feeds the repetition penalty.  In
 * order: logit bias; repetition penalty; presence and frequency penalties
 * (logit[t] -= frequency_penalty * c[t] + presence_penalty * (c[t] > 0),
 * c[t] = how many times this sampler has returned t: the completion so far,
 * as OpenAI counts); then temperature, top-k, top-p, min-p. */
int32_t eng_sampler_sample(eng_sampler *s, float *logits, const int32_t *history, int n_history);

/* ---- tokenizer ---------------------------------------------------------- */

/* A Hugging Face tokenizer.json byte-level BPE (Qwen2/Qwen2.5/Llama-3 style),
 * ids equal to those of the `tokenizers` library (docs/tokenizer.md lists the
 * supported subset; anything else is refused at load, naming the field).
 * A loaded eng_tok is read-only: any number of threads may encode and decode
 * with it at once.  Text is UTF-8; invalid sequences in input are replaced by
 * U+FFFD (one per maximal invalid subpart) before encoding. */
typedef struct eng_tok eng_tok;

typedef struct eng_tok_info {
    int vocab_size;   /* largest id + 1 over the vocabulary and added tokens */
    int n_merges;
    int n_added;      /* added tokens (special or not) */
    int32_t bos_id;   /* from tokenizer_config.json bos_token/eos_token/pad_token; -1 when absent */
    int32_t eos_id;
    int32_t pad_id;
    int64_t model_max_length; /* tokenizer_config.json; 0 when absent, null or no limit (transformers
                                 writes 1e30 for that); the context is the model's, never more */
} eng_tok_info;

/* Flags for encode and decode. */
enum {
    ENG_TOK_ALLOW_SPECIAL = 1, /* encode: special added tokens written in the text become their
                                  ids; without it "<|im_end|>" in a user's text is plain text */
    ENG_TOK_ADD_SPECIAL = 2,   /* encode: apply the post-processor (e.g. Llama-3's BOS) */
    ENG_TOK_SKIP_SPECIAL = 4   /* decode: leave special tokens out */
};

/* Loads `path`: a model directory (tokenizer.json, plus tokenizer_config.json,
 * generation_config.json and the chat template files when present) or a
 * tokenizer.json file (its directory is searched for the others).  *out
 * owns the tokenizer; free it with eng_tok_free. */
int eng_tok_load(const char *path, eng_tok **out, char *err, size_t errlen);
void eng_tok_free(eng_tok *tok);
/* Borrowed; valid until eng_tok_free. */
const eng_tok_info *eng_tok_get_info(const eng_tok *tok);
/* Id of an added token with exactly this content, else of the vocabulary
 * token whose bytes are exactly `text`; -1 when none. */
int32_t eng_tok_token_id(const eng_tok *tok, const char *text);
/* 1 when id is a special added token. */
int eng_tok_is_special(const eng_tok *tok, int32_t id);
/* The bytes an id decodes to (borrowed until eng_tok_free; may be part of a
 * UTF-8 character).  ENG_EINVAL for an unknown id. */
int eng_tok_id_to_bytes(const eng_tok *tok, int32_t id, const char **bytes, size_t *len);
/* "bos", "eos" or "pad" token text from tokenizer_config.json; borrowed, NULL when absent. */
const char *eng_tok_special_text(const eng_tok *tok, const char *which);

/* Encodes len bytes of text.  *ids (caller frees with free()) receives
 * *n_ids ids. */
int eng_tok_encode(const eng_tok *tok, const char *text, size_t len, unsigned flags,
                   int32_t **ids, size_t *n_ids, char *err, size_t errlen);

/* Encodes the concatenation of segments as one text (pre-tokenization runs
 * across segment borders exactly as over the joined string); special tokens
 * are recognised only inside segments with allow_special set (or everywhere
 * with ENG_TOK_ALLOW_SPECIAL).  The joined text must be valid UTF-8. */
typedef struct eng_tok_segment {
    const char *text;
    size_t len;
    int allow_special;
} eng_tok_segment;
int eng_tok_encode_segments(const eng_tok *tok, const eng_tok_segment *segs, size_t n_segs, unsigned flags,
                            int32_t **ids, size_t *n_ids, char *err, size_t errlen);

/* The tokenizer's normalizer (NFC for Qwen2) over text, after U+FFFD
 * replacement of invalid UTF-8.  *out (NUL-terminated, caller frees) */
int eng_tok_normalize(const eng_tok *tok, const char *text, size_t len, char **out, size_t *out_len);

/* Decodes ids to UTF-8 text (invalid byte sequences become U+FFFD, as in
 * tokenizers).  Unknown ids are skipped.  *text is NUL-terminated; caller
 * frees it with free(). */
int eng_tok_decode(const eng_tok *tok, const int32_t *ids, size_t n, unsigned flags,
                   char **text, size_t *len, char *err, size_t errlen);

/* Incremental decoder for streaming: push ids one at a time; each call gives
 * the text that became complete (never half a UTF-8 character: a token that
 * ends inside a character is held until the rest arrives).  The pieces of
 * all pushes plus the flush equal eng_tok_decode of the same ids.  `tok` is
 * borrowed and must outlive the stream; one stream per sequence. */
typedef struct eng_tok_stream eng_tok_stream;
int eng_tok_stream_create(const eng_tok *tok, unsigned flags, eng_tok_stream **out);
void eng_tok_stream_free(eng_tok_stream *s);
/* *text is borrowed until the next call on this stream (may be empty). */
int eng_tok_stream_push(eng_tok_stream *s, int32_t id, const char **text, size_t *len);
/* Ends the stream: held bytes of an unfinished character come out as U+FFFD. */
int eng_tok_stream_flush(eng_tok_stream *s, const char **text, size_t *len);
/* Drops held bytes and starts over. */
void eng_tok_stream_reset(eng_tok_stream *s);

/* ---- chat templates (engine/chat.c, interpreted by engine/jinja*.c) ------
 *
 * A model directory's chat template is Jinja2 text, rendered here the way
 * transformers' apply_chat_template renders it (docs/tokenizer.md).  It is
 * read when the tokenizer loads: chat_template.jinja (plus
 * additional_chat_templates/NAME.jinja), else tokenizer_config.json's
 * chat_template (a string, or a list of {name, template}), else
 * chat_template.json.  Of several named templates, "tool_use" serves
 * requests with tools when there is one, "default" the others.  A template
 * that is missing or does not parse does not stop the tokenizer from
 * loading; eng_tok_chat_template_check reports it and every chat call fails
 * with it (ENG_EUNSUPPORTED), naming the file and the template line. */

struct json_t; /* jansson */

/* The default template's text; borrowed, NULL when there is none. */
const char *eng_tok_chat_template_source(const eng_tok *tok);
/* 0 when chat calls can render; else ENG_EUNSUPPORTED with err saying why
 * (no template, or which file and line does not parse). */
int eng_tok_chat_template_check(const eng_tok *tok, char *err, size_t errlen);
/* Replaces the directory's template(s) with `text` (len bytes): the
 * --chat-template override.  origin names it in messages (e.g. the file).
 * Call before the tokenizer is shared between threads.  A template that
 * does not parse is ENG_EUNSUPPORTED (err: "origin: line N: ...") and is
 * kept as the template, so chat calls fail rather than fall back. */
int eng_tok_set_chat_template(eng_tok *tok, const char *text, size_t len, const char *origin, char *err,
                              size_t errlen);

typedef struct eng_chat_params {
    /* Borrowed JSON values (jansson).  messages: an array of objects in
     * OpenAI's shape (role, content as a string or a list of parts,
     * tool_calls, tool_call_id, name, reasoning_content, ...).  tools and
     * documents: arrays or NULL.  kwargs: an object of extra template
     * variables (chat_template_kwargs, e.g. {"enable_thinking": false}) or
     * NULL; it may override the special tokens but not messages, tools,
     * documents or add_generation_prompt. */
    struct json_t *messages, *tools, *documents, *kwargs;
    int add_generation_prompt;
    int continue_final_message; /* end the prompt inside the last message (which must have
                                   text content), as transformers does */
    int64_t now;                /* the clock of strftime_now (seconds since the epoch, local
                                   time); 0: the current time */
} eng_chat_params;

/* Fills *p from an object shaped like a /v1/chat/completions body:
 * "messages", "tools", "documents", "chat_template_kwargs" (borrowed from
 * req), "add_generation_prompt" (default true, false when
 * "continue_final_message" is true and it is not given). */
void eng_chat_params_from_json(eng_chat_params *p, struct json_t *req);

/* Renders the messages as the template does (what apply_chat_template(
 * tokenize=False) gives).  *text: NUL-terminated, caller frees.  Errors:
 * ENG_EUNSUPPORTED (no usable template), ENG_EINVAL (messages the template
 * refuses: its raise_exception message, or an error while rendering that
 * names the template line), ENG_ERANGE (the render hit a size, time or
 * depth bound), ENG_ENOMEM. */
int eng_tok_chat_apply(const eng_tok *tok, const eng_chat_params *p, char **text, size_t *len, char *err,
                       size_t errlen);
/* Renders and encodes: special tokens are read only from the template's own
 * text and the special-token variables, never from the caller's data
 * (message contents, tools, kwargs), so a user who writes "<|im_end|>" gets
 * that text, not the token.  Equal to apply_chat_template(tokenize=True)
 * whenever the data holds no special token's text. */
int eng_tok_chat_encode(const eng_tok *tok, const eng_chat_params *p, int32_t **ids, size_t *n_ids, char *err,
                        size_t errlen);
/* The ids that end an assistant turn: the tokenizer's eos, the eos ids of
 * generation_config.json, and the end-of-turn special tokens the vocabulary
 * has (<|im_end|>, <|eot_id|>, <|eom_id|>, <|end|>, <end_of_turn>,
 * <|endoftext|>, ...).  Up to max ids into out; returns the count. */
int eng_tok_chat_stop_ids(const eng_tok *tok, int32_t *out, int max);

#ifdef __cplusplus
}
#endif
#endif /* MKAD_ENGINE_H */
