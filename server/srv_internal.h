/*
 * srv_internal.h — private declarations shared by the files of server/.
 *
 *   util.c     growable byte buffer, key=value logging, clocks
 *   api.c      OpenAI request parsing/validation and JSON/SSE building
 *              (pure functions: no I/O, no threads; unit-tested)
 *   plan.c     the step planner and its cost model (pure; unit-tested)
 *   sched.c    the engine thread
 *   metrics.c  counters/histograms and the Prometheus text exposition
 *   text.c     the tokenizer adapter (srv_codec over eng_tok)
 *   auth.c     API keys: the table and the bearer-token check
 *   daemon.c   srv_run: startup, engine events, signals, timers, drain, exit
 *   http.c     libmicrohttpd under libuv: connections, routing, responses
 *   job.c      a generation job on the loop: engine tokens -> text, stop
 *              strings, SSE chunks or the JSON body
 *
 * Names: whatever more than one file uses carries the srv_ prefix and is
 * declared here; names private to one file (static) carry none.
 *
 * Threads: the loop thread owns every srv_job field marked "loop"; the engine
 * thread reads the fields marked "immutable" (set before submission) and the
 * atomic cancel flag.  Token events travel engine -> loop through a locked
 * vector and uv_async_send; jobs and cancels travel loop -> engine through a
 * locked inbox and a condition variable.
 */
#ifndef MKAD_SRV_INTERNAL_H
#define MKAD_SRV_INTERNAL_H

#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#include <jansson.h>
#include <microhttpd.h>
#include <uv.h>

#include "engine.h"
#include "server.h"

typedef struct srv_metrics srv_metrics;

/* ---- util.c ------------------------------------------------------------- */

typedef struct srv_buf {
    char *data;
    size_t len, cap;
    int failed;           /* an append failed since the last reset: a builder of
                             many pieces checks this once at the end */
} srv_buf;

/* All return 0, or -1 when memory runs out (the buffer is unchanged but
 * `failed` is set). */
int srv_buf_append(srv_buf *b, const void *p, size_t n);
int srv_buf_puts(srv_buf *b, const char *s);
int srv_buf_printf(srv_buf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void srv_buf_free(srv_buf *b);
void srv_buf_reset(srv_buf *b);

/* Room for one more element in a growable array: *items (a pointer to the
 * array's pointer, e.g. &j->ids) holds *cap elements of elem bytes, n of them
 * used; when n == *cap the array is reallocated to twice the capacity (first
 * `first`).  0, or -1 when memory runs out (array and *cap unchanged). */
int srv_array_grow(void *items, int *cap, int n, size_t elem, int first);

/* One log line "ts=... level=L event=E <fields>" written with one write(2).
 * fields is a printf format producing " k=v k=v" pairs (or "").  Values that
 * may contain spaces go through srv_log_quote. */
void srv_log(const char *level, const char *event, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* Quotes s for a key=value log line into buf (truncating); returns buf. */
const char *srv_log_quote(const char *s, char *buf, size_t len);
double srv_now(void); /* monotonic seconds */
/* Length of the valid UTF-8 character at s[0, n) (1-4), or 0 if invalid. */
size_t srv_utf8_char_len(const char *s, size_t n);
/* Copies at most n bytes of s (up to a NUL) into dst (cap bytes, always
 * NUL-terminated), never cutting a UTF-8 character; a cut shows as "...".
 * For quoting a client's string in a message. */
void srv_utf8_clip(char *dst, size_t cap, const char *s, size_t n);

/* ---- api.c: requests ------------------------------------------------------ */

enum srv_route {
    SRV_ROUTE_COMPLETIONS,
    SRV_ROUTE_CHAT,
    SRV_ROUTE_MODELS,
    SRV_ROUTE_HEALTH,
    SRV_ROUTE_METRICS,
    SRV_ROUTE_TOKENIZE,
    SRV_ROUTE_DETOKENIZE,
    SRV_ROUTE_ADMIN,      /* /admin/... (admin.c) */
    SRV_ROUTE_OTHER,
    SRV_ROUTE_COUNT
};

#define SRV_MAX_STOP 4
#define SRV_MAX_STOP_LEN 256
#define SRV_MAX_TOP_LOGPROBS 20
#define SRV_SESSION_ID_MAX 128
#define SRV_USER_MAX 64

/* A tokenizer as the server uses it (an adapter over the engine's
 * tokenizer; tests plug in a fake).  Every function must be callable from
 * several threads at once.  Results are new arrays the caller frees. */
typedef struct srv_codec {
    void *ctx;
    /* text -> token ids (special tokens written in the text are recognised;
     * add_special: the post-processor runs, e.g. Llama-3's BOS); 0, or -1
     * with a message in err */
    int (*encode)(void *ctx, const char *text, size_t len, int add_special, int32_t **ids, int *n,
                  char *err, size_t errlen);
    /* a chat request -> ids of the chat template.  req is an object with
     * "messages" (validated OpenAI messages) and optionally "tools",
     * "documents", "chat_template_kwargs", "add_generation_prompt" (default
     * true: the prompt ends with the assistant turn's prefix),
     * "continue_final_message".  Returns 0, or a negative ENG_* status with
     * a message in err (ENG_ENOMEM: ours; others: the request's or the
     * template's) */
    int (*chat)(void *ctx, json_t *req, int32_t **ids, int *n, char *err, size_t errlen);
    /* ids -> text (special tokens included, invalid UTF-8 as U+FFFD); *text
     * is NUL-terminated, caller frees; 0 or -1 */
    int (*decode)(void *ctx, const int32_t *ids, int n, char **text, size_t *len, char *err,
                  size_t errlen);
    /* the raw bytes of one token (possibly part of a UTF-8 character);
     * returns the count (<= cap), or -1 */
    int (*token_bytes)(void *ctx, int32_t tok, char *buf, size_t cap);
    /* ids that end a completion besides the model's eos (chat: the
     * template's end-of-turn ids); may be NULL; returns the count */
    int (*stop_ids)(void *ctx, int chat, int32_t *out, int max);
} srv_codec;

/* text.c: the codec over the model directory's tokenizer.json.  *out is
 * NULL (and 0 returned) when the directory has no tokenizer.json; info
 * receives a short key=value description for the log.  chat_template
 * (NULL or "": the directory's) is --chat-template, a file or the template
 * text; one that cannot be read or parsed fails the load.  A directory
 * template that does not parse is logged and answered per chat request.
 * Free with srv_text_free. */
int srv_text_load(const char *model_dir, const char *chat_template, srv_codec **out, char *info,
                  size_t infolen, char *err, size_t errlen);
void srv_text_free(srv_codec *c);

/* A validated generation request.  Owned by its srv_job; srv_genreq_free. */
typedef struct srv_genreq {
    int chat;                  /* /v1/chat/completions */
    char *model;               /* as the client named it */
    int32_t *prompt;           /* token ids (n_prompt) */
    int n_prompt;
    int max_tokens;            /* >= 1 (0 with echo: the prompt only); the room left in the
                                  context when max_tokens_auto */
    int max_tokens_auto;       /* not given: until the context or the K/V pool is full */
    int n;                     /* choices (1..128): one prefill, n-1 forks of it (sched.c) */
    eng_sampler_params sp;
    int32_t *bias_ids;         /* logit_bias: n_bias distinct ids and their biases */
    float *bias;
    int n_bias;
    int has_seed;              /* else the caller picks a random seed */
    int ignore_eos;            /* extension */
    char *stop[SRV_MAX_STOP];  /* non-empty; may hold NULs (\u0000), hence stop_len */
    size_t stop_len[SRV_MAX_STOP];
    int n_stop;
    int stream;
    int include_usage;         /* stream_options.include_usage */
    int logprobs;              /* 0: off; 1: on */
    int top_logprobs;          /* 0..20 alternatives per position */
    int echo;                  /* completions: the prompt comes back before the completion */
    char *echo_text;           /* echo: the prompt as text (echo_len bytes) */
    size_t echo_len;
    int prompt_logprobs;       /* echo + logprobs: log-probabilities of the prompt tokens */
    char session_id[SRV_SESSION_ID_MAX + 1]; /* "" = none */
    char user[SRV_USER_MAX + 1]; /* who sent it (auth.c); sessions are per user */
    int return_token_ids;      /* extension: choices[].token_ids */
    const srv_codec *codec;    /* borrowed from the model description */
    int32_t stop_ids[8];       /* end the completion (unless ignore_eos), besides the model eos */
    int n_stop_ids;
    /* parsing only: the prompt string or messages array awaiting the
     * tokenizer (a reference owned here); NULL in a parsed request */
    json_t *pending;
    long long max_tokens_req;  /* -1: not given */
    int max_tokens_is_mct;     /* it came from max_completion_tokens */
} srv_genreq;

/* What parsing needs to know about the served model. */
typedef struct srv_model_desc {
    const char *name;
    int vocab_size;
    int max_ctx;               /* engine max tokens per sequence */
    const srv_codec *codec;    /* NULL: no tokenizer.json */
    int default_max_tokens;    /* completions without max_tokens */
} srv_model_desc;

/* An API error: HTTP status and the OpenAI error object's fields. */
typedef struct srv_error {
    int status;
    const char *type;          /* "invalid_request_error", ... (static) */
    char param[64];            /* "" = null */
    const char *code;          /* static or NULL */
    char message[512];
} srv_error;

/* The message is cut to its buffer on a character boundary; invalid bytes
 * in it (from a client's string) become U+FFFD in the JSON. */
void srv_error_set(srv_error *e, int status, const char *type, const char *param,
                   const char *code, const char *fmt, ...) __attribute__((format(printf, 6, 7)));
/* {"error":{...}} as a new string; caller frees.  NULL only when memory
 * runs out. */
char *srv_error_json(const srv_error *e);

/* Parses and validates a request body, tokenizing a text prompt or chat
 * messages with md->codec.  On success returns 0 and *out owns a new
 * srv_genreq; otherwise fills err (status 400/404/...) and returns -1.
 * session_hdr (may be NULL) is the X-Session-Id header; the body wins.
 * Pure apart from the read-only codec: safe on a thread-pool thread, which
 * is where http.c runs it for big bodies. */
int srv_genreq_parse(const char *body, size_t len, int chat, const srv_model_desc *md,
                     const char *session_hdr, srv_genreq **out, srv_error *err);
void srv_genreq_free(srv_genreq *r);

/* POST /tokenize and /detokenize with vLLM's shapes: {"prompt": text,
 * "add_special_tokens"} or {"messages", "add_generation_prompt"} ->
 * {"count", "max_model_len", "tokens", "token_strs": null}; {"tokens"} ->
 * {"prompt": text}.  The 200 body as a new string, or NULL with err
 * filled.  Pure apart from the read-only codec, like srv_genreq_parse. */
char *srv_tokenize(const char *body, size_t len, const srv_model_desc *md, srv_error *err);
char *srv_detokenize(const char *body, size_t len, const srv_model_desc *md, srv_error *err);

/* ---- api.c: responses ----------------------------------------------------- */

typedef struct srv_usage {
    int prompt_tokens, completion_tokens, cached_tokens;
} srv_usage;

/* One position's log-probabilities: of a generated token, or with echo of
 * a prompt token (the first prompt token has no distribution: n_top = -1). */
typedef struct srv_logprob {
    int32_t token;
    float logprob;
    int n_top;
    int32_t top_tokens[SRV_MAX_TOP_LOGPROBS];
    float top_logprobs[SRV_MAX_TOP_LOGPROBS];
} srv_logprob;

#define SRV_PIECE_MAX 256
/* The output text of one generated token into buf (SRV_PIECE_MAX bytes):
 * the codec's bytes, or without a codec the id in decimal, with a space
 * before every token but the first. */
size_t srv_token_piece(const srv_codec *c, int32_t tok, int first, char *buf);

/* Stop-string matcher over the growing output text.  text holds everything
 * generated so far; emitted is how much has been released to the client.
 * Returns the new releasable end: the whole text when no stop string can
 * still begin in the tail, less a tail that is a proper prefix of a stop
 * string.  When a stop string occurs, *stopped = 1 and the returned end is
 * where it starts (the stop string is not part of the output). */
size_t srv_stop_scan(const char *text, size_t len, size_t emitted, char *const *stop,
                     const size_t *stop_len, int n_stop, int *stopped);

/* One choice of a full response (borrowed for the call). */
typedef struct srv_choice_out {
    const char *text;
    size_t text_len;
    const int32_t *ids;
    int n_ids;
    const srv_logprob *lp;
    int n_lp;
    const char *finish;
} srv_choice_out;

/* Full (non-streaming) response bodies; new strings, caller frees.  Choice
 * i of ch (n_ch) gets "index": i.  With echo every choice's text starts
 * with the prompt's, and plp (n_plp: one per prompt token, or 0 without
 * logprobs) come before its generated lp. */
char *srv_build_completion(const srv_genreq *r, const char *id, long created, const srv_choice_out *ch,
                           int n_ch, const srv_logprob *plp, int n_plp, const srv_usage *u);

/* SSE framing.  Each appends one complete event ("data: ...\n\n") to out;
 * 0, or -1 when memory runs out (out then holds no part of the event).
 * index: the choice the chunk belongs to (0..n-1), as OpenAI and vLLM
 * stream n > 1 choices interleaved. */
int srv_sse_chunk(srv_buf *out, const srv_genreq *r, const char *id, long created, int index,
                  const char *text, size_t text_len, const int32_t *ids, int n_ids,
                  const srv_logprob *lp, int n_lp, const char *finish, int first);
/* echo: the chunk with the prompt's text (and its logprobs), first in the stream. */
int srv_sse_echo(srv_buf *out, const srv_genreq *r, const char *id, long created, int index,
                 const srv_logprob *plp, int n_plp);
int srv_sse_usage(srv_buf *out, const srv_genreq *r, const char *id, long created,
                  const srv_usage *u);
int srv_sse_error(srv_buf *out, const srv_error *e);
int srv_sse_done(srv_buf *out);

/* ---- plan.c: the step planner and its cost model (pure) -------------------- */

/* A running sequence as the planner sees it. */
typedef struct srv_plan_seq {
    int prefill_left;   /* prompt tokens not yet in the engine; 0 = decoding */
    uint64_t order;     /* arrival order (smaller = older) */
    int last_step;      /* step index of the sequence's last turn (fairness) */
    int chunk;          /* cap on this sequence's prefill chunk, 0 = the step's */
} srv_plan_seq;

typedef struct srv_plan_item {
    int idx;            /* index into the seqs array */
    int n_tokens;
} srv_plan_item;

/* What an engine step costs, learnt from the steps that ran (zero = nothing
 * measured yet).  Fields are the model's state; read it through
 * srv_cost_tok and srv_cost_decode. */
typedef struct srv_step_cost {
    double dec_s, dec_n;   /* EWMA of decode-only steps: seconds, decoders */
    double pre_s, pre_n;   /* EWMA of mixed steps: prefill seconds, prefill tokens */
    int n_dec_obs, n_pre_obs;
} srv_step_cost;

/* A step may take this many times its decoders' time when that is longer
 * than the step target, so that slow decoders do not stop the prompts. */
#define SRV_PLAN_DECODE_FACTOR 2.0

/* Adds one step that ran n_dec decode tokens and n_pre prompt tokens in dt
 * seconds. */
void srv_cost_note(srv_step_cost *c, int n_dec, int n_pre, double dt);
/* Seconds per prompt token; 0 until a step with prompt tokens ran. */
double srv_cost_tok(const srv_step_cost *c);
/* Predicted seconds of a step of n_dec decode tokens alone (0 for none). */
double srv_cost_decode(const srv_step_cost *c, int n_dec);
/* The time budget's prompt tokens for a step with n_dec decoders: as many
 * as fit max(target_s, SRV_PLAN_DECODE_FACTOR x the decoders' time) after
 * the decoders, at least 1; -1 = no time limit (target_s <= 0, no cost model,
 * no decoder to protect, or no prompt token measured yet). */
int srv_plan_prefill_time(double target_s, const srv_step_cost *cost, int n_dec);

/* Plans one step: every decoding sequence gets one token (the oldest turns
 * first if there are more decoders than budget), then prefilling sequences
 * in arrival order get chunks of at most `chunk` tokens (or their own
 * smaller cap) from what is left of `budget` and of the time budget
 * (srv_plan_prefill_time; target_s 0 or cost NULL: tokens only).  Returns
 * the number of items written to out (capacity n_seqs).  Pure: no engine,
 * no threads. */
int srv_plan_step(const srv_plan_seq *seqs, int n_seqs, int budget, int chunk, double target_s,
                  const srv_step_cost *cost, srv_plan_item *out);

/* Session prefix reuse: how many of a resident sequence's `have` tokens to
 * keep for a new prompt.  The result is the longest common prefix, capped so
 * that at least one prompt token remains to prefill, and rounded down to a
 * multiple of block_size unless it equals n_have (eng_seq_truncate's rule). */
int srv_reuse_len(const int32_t *have, int n_have, const int32_t *prompt, int n_prompt,
                  int block_size);

/* ---- resume.c: load or recompute a stored history (pure) ------------------ */

enum { SRV_RESUME_AUTO, SRV_RESUME_LOAD, SRV_RESUME_RECOMPUTE, SRV_RESUME_BOTH }; /* policy */
enum { SRV_PATH_LOAD, SRV_PATH_RECOMPUTE, SRV_PATH_BOTH, SRV_PATH_COUNT };        /* what was done */
#define SRV_RATE_BUCKETS 12 /* prefill rate by position: [0,256), [256,512), ... doubling */

/* Measured rates; 0 = not measured yet. */
typedef struct srv_resume_rates {
    double warm_bps, disk_bps;              /* block reads from the store, bytes/s */
    double prefill_tps[SRV_RATE_BUCKETS];   /* prefill tokens/s at positions of each bucket */
} srv_resume_rates;

typedef struct srv_resume_in {
    int policy;                 /* SRV_RESUME_* */
    int n_blocks;               /* reusable stored blocks */
    int block_tokens;
    size_t block_bytes;
    const unsigned char *warm;  /* (n_blocks) 1: block i is in the warm tier; NULL: all on disk */
    const srv_resume_rates *rates;
} srv_resume_in;

typedef struct srv_resume_plan {
    int split;        /* blocks [0, split) are prefilled, [split, n_blocks) loaded */
    int path;         /* SRV_PATH_*: LOAD (split 0), RECOMPUTE (split n), BOTH */
    double t_load, t_prefill, t_est; /* predicted seconds: load all, prefill all, the choice (-1/0: unknown) */
} srv_resume_plan;

/* Chooses the split that makes both halves end together (the least
 * max(prefill, load)); load when the rates are not known yet. */
void srv_resume_choose(const srv_resume_in *in, srv_resume_plan *out);
/* Predicted seconds to prefill positions [from, to); -1 when no rate is known. */
double srv_resume_prefill_s(const srv_resume_rates *r, int from, int to);
/* The bucket of a position (0..SRV_RATE_BUCKETS-1). */
int srv_rate_bucket(int pos);
/* rate <- EWMA with a new sample (ignored unless finite and > 0). */
void srv_rate_ewma(double *rate, double sample);
const char *srv_resume_path_name(int path);
/* "auto" (or NULL/""), "load", "recompute", "both" -> SRV_RESUME_*; -1 otherwise. */
int srv_resume_policy_parse(const char *s);

/* ---- l3index.c: the retrieval index of users' long-term chunks -------------- */

typedef struct srv_l3index srv_l3index;
/* An empty index for retrieval keys of d_model floats; users' matrices
 * together stay under budget bytes (the least recently used user's goes). */
srv_l3index *srv_l3index_new(int d_model, size_t budget);
void srv_l3index_free(srv_l3index *ix);
/* 1 when the user's chunks are indexed (after srv_l3index_begin). */
int srv_l3index_loaded(srv_l3index *ix, const char *user);
/* Starts the user's index empty (replacing any); fill it with _put.  -1: out of memory. */
int srv_l3index_begin(srv_l3index *ix, const char *user);
/* Adds or replaces a chunk of an indexed user (e: d_model floats, copied);
 * nothing for a user not indexed.  -1: out of memory (the user's index is dropped). */
int srv_l3index_put(srv_l3index *ix, const char *user, uint64_t id, const char *sid, size_t sid_len,
                    const float *e);
void srv_l3index_del(srv_l3index *ix, const char *user, uint64_t id);
/* Forgets the user's index (rebuilt on the next retrieval).  NULL-safe. */
void srv_l3index_drop(srv_l3index *ix, const char *user);
/* Chunks indexed for the user, -1 when not indexed. */
int srv_l3index_count(srv_l3index *ix, const char *user);
/* The top r chunks by cosine similarity of their key to q, not of session
 * exclude_sid, best first (ties: smaller id first): ids and scores (r
 * each).  Returns how many, or -1 when the user is not indexed. */
int srv_l3index_top(srv_l3index *ix, const char *user, const char *exclude_sid, const float *q, int r,
                    uint64_t *ids, double *scores);

/* ---- sched.c: the engine thread ------------------------------------------- */

enum srv_cancel {
    SRV_CANCEL_NONE = 0,
    SRV_CANCEL_CLIENT,    /* disconnect */
    SRV_CANCEL_STOP,      /* a stop string matched on the loop */
    SRV_CANCEL_TIMEOUT,
    SRV_CANCEL_SHUTDOWN
};

enum srv_finish {
    SRV_FINISH_NONE = 0,
    SRV_FINISH_STOP,      /* eos or stop string */
    SRV_FINISH_LENGTH,
    SRV_FINISH_CANCELLED,
    SRV_FINISH_ERROR
};

struct srv_conn;

/* ---- store.c: the session tier (memstore/ on a worker thread) ------------ */

typedef struct srv_store srv_store;
struct srv_event;
#define SRV_MAX_BANK 64 /* chunks in one session's L3 bank at most */

/* What a lookup found: the blocks of the longest block-aligned prefix the
 * stored session shares with the prompt, ready for eng_seq_blocks_import. */
typedef struct srv_loaded {
    uint64_t job_id;  /* the job that asked */
    int found;        /* the session has a stored record */
    int n_blocks;     /* blocks in buf */
    void *buf;        /* (n_blocks, block_bytes) */
    int blocks_warm, blocks_disk; /* where they came from */
    double load_s;
    /* resume_policy: the stored prefix is n_stored blocks; [0, split) are
     * prefilled, [split, n_stored) loaded.  The blocks in buf start at block
     * `first`.  more: the blocks come in a second answer (tail = 1) while the
     * engine prefills [0, split) ("both"). */
    int path, split, n_stored, first, more, tail;
    double t_est;     /* the cost model's predicted seconds for its choice (0: unknown) */
    float *bank_mu;   /* (n_bank, n_layers, d_model): the L3 bank to bind before importing */
    uint64_t bank_ids[SRV_MAX_BANK];
    int n_bank;
    struct srv_loaded *next; /* free for the receiver's list */
} srv_loaded;
void srv_loaded_free(srv_loaded *r);

/* Called on the store's thread when a lookup ends; the receiver owns res. */
typedef void (*srv_store_loaded_fn)(void *ctx, srv_loaded *res);

typedef struct srv_store_params {
    const char *dir;      /* the state directory */
    const char *identity; /* model fingerprint + block format: a store of another is refused */
    int block_tokens;
    size_t block_bytes;   /* eng_block_format.block_bytes */
    size_t warm_bytes;    /* host-memory tier budget */
    int sync;             /* 1: a turn is durable (fsync) when its write completes */
    srv_store_loaded_fn loaded;
    void *loaded_ctx;
    struct srv_metrics *met; /* counters published after every task; may be NULL */
    /* A stored session was deleted by the store itself (TTL, disk budget,
     * quota): a resident copy must write all its blocks again at its next
     * turn.  Called on the store's thread; may be NULL. */
    void (*forgot)(void *ctx, const char *user, const char *id);
    void *forgot_ctx;
    void (*post)(const struct srv_event *ev, int n, void *arg); /* posts deferred FINAL events */
    void *post_arg;
    int ttl_s;               /* delete sessions idle this long (0: never) */
    uint64_t disk_budget;    /* stored session bytes beyond which the least recently used go (0: none) */
    double maint_interval_s; /* how often expiry and the budget are applied (0: 60 s) */
    int sync_ms;             /* group commit every sync_ms (sync must be 0); 0: off */
    int resume_policy;       /* SRV_RESUME_* */
    uint64_t user_bytes;     /* per-user quota on stored session bytes (0: none) */
    long user_chunks;        /* per-user quota on long-term chunks (0: none) */
    size_t l3_index_bytes;   /* budget of the in-memory retrieval index (0: none, every
                                retrieval scans the user's chunks in RocksDB) */
    const eng_model *model;  /* L3: the prompt's retrieval key; NULL: no long-term memory */
} srv_store_params;

typedef struct srv_store_stats {
    int queue_depth;
    long writes, write_failures, blocks_written;
    long lookups, loaded_blocks_warm, loaded_blocks_disk;
    long expired, evicted;   /* sessions deleted by the TTL / the disk budget */
    long chunks_written;     /* long-term memory chunks stored */
    long quota_sessions, quota_chunks; /* deleted because their user was over a quota */
    long resumes[SRV_PATH_COUNT]; /* stored sessions resumed, by path (SRV_PATH_*) */
    long group_commits;      /* session_sync_ms fsyncs */
} srv_store_stats;

int srv_store_open(const srv_store_params *p, srv_store **out, char *err, size_t errlen);
/* Queues a turn's write: the session's token ids (copied) and the blocks
 * [first, n_full) in buf (taken over, freed by the store).  With final, that
 * event is posted (params.post) after the write: the caller must not post
 * it.  Returns -1 (nothing queued, buf freed) when memory runs out. */
int srv_store_write(srv_store *st, const char *user, const char *id, const int32_t *tokens, int n_tokens,
                    int n_full, int first, void *buf, const uint64_t *bank, int n_bank,
                    const struct srv_event *final);
/* Queues a long-term memory chunk of a session (the engine's eng_chunk:
 * emb (D), mu (n_layers, D), copied) as its user's memory. */
int srv_store_chunk(srv_store *st, const char *user, const char *id, int index, const float *emb,
                    const float *mu);
/* Queues a lookup for a job's prompt; the answer comes through the callback
 * with the same job id.  A stored session comes with the blocks of the common
 * prefix and its L3 bank; a new one (with a model given) with a bank chosen
 * from the user's long-term chunks of other sessions. */
int srv_store_lookup(srv_store *st, uint64_t job_id, const char *user, const char *id,
                     const int32_t *prompt, int n_prompt);
void srv_store_get_stats(srv_store *st, srv_store_stats *out);
/* The engine thread's prefill measurement for the cost model: n tokens
 * ending at position pos_end took dt seconds. */
void srv_store_note_prefill(srv_store *st, int pos_end, int n, double dt);
/* A session is in flight (busy = 1, from admission to the end of its turn):
 * quota eviction leaves it alone. */
void srv_store_busy(srv_store *st, const char *user, const char *id, int busy);
/* The user's long-term memory was deleted behind the store's back (admin):
 * forget its index.  NULL-safe. */
void srv_store_longterm_deleted(srv_store *st, const char *user);
/* The memstore under it, for the admin routes (thread-safe calls). */
struct ms_store *srv_store_ms(srv_store *st);
/* Finishes every queued task (writes are never dropped), then closes. */
void srv_store_close(srv_store *st);

/* One choice of a job on the loop thread (job.c). */
typedef struct srv_choice {
    srv_buf text;               /* all generated text */
    size_t emitted;             /* text released to the client */
    int32_t *ids;               /* generated ids (capacity cap_ids) */
    int n_ids, cap_ids;
    srv_logprob *lps;           /* per generated token when logprobs */
    int n_lps, cap_lps;
    int first_chunk_sent;
    int finished;               /* its text is complete */
    int finish;                 /* enum srv_finish, once finished */
    int n_tokens;               /* completion tokens, once finished */
} srv_choice;

typedef struct srv_job {
    /* immutable once submitted (read by the engine thread) */
    uint64_t id;
    srv_genreq *req;
    double t_arrival;
    /* shared */
    atomic_int cancel;          /* enum srv_cancel: the whole job */
    atomic_int *choice_stop;    /* (req->n) 1: that choice ended on the loop (a stop string) */
    /* engine thread only */
    int store_state;            /* STORE_*: the session lookup of a non-resident session */
    srv_loaded *loaded;         /* its result, until admitted */
    srv_loaded *tail;           /* "both": the loaded second half, until admitted */
    int store_busy;             /* marked in flight with srv_store_busy */
    int eng_live;               /* its sequences in the engine (running or preempted) */
    int eng_gen;                /* tokens generated by its choices that ended */
    int eng_err_status;         /* != 0: one choice failed, the others end with this error */
    const char *eng_err_code;
    char eng_err_msg[160];
    /* loop only */
    int refs;                   /* 2 at submit: the engine's final event, the connection */
    struct srv_conn *conn;      /* NULL once the connection is gone */
    struct srv_job *prev, *next;/* in-flight list */
    char cid[40];               /* "cmpl-..." / "chatcmpl-..." */
    long created;
    srv_choice *ch;             /* (req->n) */
    int n_open;                 /* choices not finished */
    int n_gen_seen;             /* TOKEN events so far, over all choices */
    srv_logprob *plps;          /* echo + logprobs: per prompt token (n_plps) */
    int n_plps;
    srv_buf sse;                /* SSE bytes not yet taken by MHD */
    size_t sse_off;
    int sse_broken;             /* an event could not be appended: cut the stream */
    int finished;               /* the response is complete (text-wise) */
    int finish;                 /* enum srv_finish */
    srv_error error;            /* when finish == SRV_FINISH_ERROR */
    srv_usage usage;
    int engine_done;            /* the engine's final event arrived */
    double t_first, t_last;     /* token arrival times (loop clock) */
    char *body;                 /* non-stream response once finished */
} srv_job;

enum srv_event_type {
    SRV_EV_READY,      /* model loaded (job NULL) */
    SRV_EV_LOAD_FAILED,
    SRV_EV_DEVICE_FAILED, /* an engine call returned ENG_EDEVICE (job NULL; msg says what):
                             every job gets a 503 FINAL, the daemon must exit non-zero */
    SRV_EV_START,      /* admitted: usage.cached_tokens known */
    SRV_EV_PROMPT_LOGPROBS, /* echo + logprobs: the prompt's, before the first TOKEN */
    SRV_EV_TOKEN,
    SRV_EV_CHOICE_END, /* n > 1: one choice ended (finish, n_gen), others go on */
    SRV_EV_FINAL       /* engine is done with the job; last event for it (and the end of
                          its last choice: choice, n_gen) */
};

typedef struct srv_event {
    int type;
    srv_job *job;
    int32_t token;
    int choice;            /* TOKEN, CHOICE_END, FINAL: the choice (0..n-1) */
    int n_gen;             /* CHOICE_END, FINAL: tokens that choice generated */
    int finish;            /* CHOICE_END, FINAL: enum srv_finish */
    int status;            /* FINAL with SRV_FINISH_ERROR: HTTP status */
    const char *code;      /* FINAL with SRV_FINISH_ERROR: OpenAI error code (static) or NULL */
    srv_usage usage;       /* START / FINAL */
    srv_logprob *lp;       /* TOKEN with logprobs (one), PROMPT_LOGPROBS (n_lp, one per prompt
                              token); the loop frees it */
    int n_lp;
    char msg[160];         /* FINAL error / LOAD_FAILED */
} srv_event;

typedef struct srv_engine srv_engine;

/* Model/engine facts the loop may read once READY arrived. */
typedef struct srv_engine_info {
    eng_model_info mi;
    int max_ctx, block_size, n_blocks, max_seqs, max_batch_tokens;
    char backend[8];           /* "cpu" or "cuda": what auto resolved to */
    char kv_dtype[8];          /* element type of the K/V pool: "f32" or "bf16" */
    size_t kv_bytes;           /* size of the K/V pool */
    const srv_codec *codec;    /* NULL: no tokenizer; owned by the engine */
} srv_engine_info;

/* cfg->backend as ENG_BACKEND_* (NULL or "" = auto); ENG_EINVAL for a name
 * the engine does not know. */
int srv_config_backend(const srv_config *cfg, int *backend);

/* post(ev, n, arg): called on the engine thread with a batch of events; must
 * copy them and return quickly. */
typedef void (*srv_post_fn)(const srv_event *ev, int n, void *arg);

/* A question about a resident session (hot tier), answered by the engine
 * thread: INFO fills the fields, DROP also evicts it from the engine when it
 * is idle (busy: left alone).  srv_engine_session_op blocks until answered
 * (at once when the engine has stopped): call it from the thread pool,
 * never from the loop.  Returns found. */
enum { SRV_SESS_INFO, SRV_SESS_DROP };
typedef struct srv_sess_op {
    int op;
    const char *user, *id;
    int found, busy, tokens, persisted_blocks;
    int n_resident, blocks_used, blocks_total; /* the hot tier's totals (always filled) */
    int done;
    struct srv_sess_op *next;
} srv_sess_op;
int srv_engine_session_op(srv_engine *se, srv_sess_op *op);
/* The session store, or NULL (no state directory); valid after READY. */
srv_store *srv_engine_store(srv_engine *se);

/* Starts the engine thread; it loads the model, then posts READY or
 * LOAD_FAILED.  cfg is borrowed until srv_engine_stop. */
int srv_engine_start(const srv_config *cfg, srv_metrics *m, srv_post_fn post, void *arg,
                     srv_engine **out);
/* Valid after READY. */
const srv_engine_info *srv_engine_get_info(const srv_engine *se);
/* Hands a job to the engine (loop thread). */
void srv_engine_submit(srv_engine *se, srv_job *job);
/* Wakes the engine thread after a job's cancel flag was set. */
void srv_engine_wake(srv_engine *se);
/* Stops the thread (running jobs are dropped without events) and frees it. */
void srv_engine_stop(srv_engine *se);

/* ---- metrics.c ------------------------------------------------------------ */

srv_metrics *srv_metrics_create(void);
void srv_metrics_free(srv_metrics *m);
void srv_metrics_request(srv_metrics *m, int route, int status);
void srv_metrics_tokens(srv_metrics *m, long prompt, long generated, long cached);
void srv_metrics_ttft(srv_metrics *m, double s);
void srv_metrics_itl(srv_metrics *m, double s);
/* From the engine thread after each step. */
void srv_metrics_step(srv_metrics *m, int n_seqs, int n_tokens, double step_s);
void srv_metrics_store(srv_metrics *m, const srv_store_stats *st);
void srv_metrics_state(srv_metrics *m, int running, int waiting, int blocks_used, int blocks_total,
                       int sessions);
void srv_metrics_preempted(srv_metrics *m);
/* A request forked `tokens` prompt tokens from a resident sequence. */
void srv_metrics_prefix_shared(srv_metrics *m, int tokens);
/* A prefix-cache entry was evicted for room. */
void srv_metrics_prefix_evicted(srv_metrics *m);
/* The prefix cache now: entries and the blocks in their tables. */
void srv_metrics_prefix_cache(srv_metrics *m, int entries, int blocks);
void srv_metrics_read_timeout(srv_metrics *m);
/* Once the engine exists: its backend ("cpu"/"cuda"), K/V dtype and pool size
 * (the strings are copied). */
void srv_metrics_engine(srv_metrics *m, const char *backend, const char *kv_dtype, size_t kv_bytes);
void srv_metrics_cancelled(srv_metrics *m, int reason);
/* The Prometheus text exposition; appends to out.  0, or -1 when memory
 * ran out (out is incomplete). */
int srv_metrics_render(srv_metrics *m, srv_buf *out);
const char *srv_route_name(int route);

/* ---- admin.c: the /admin routes (on the thread pool) ------------------------ */

/* A valid session id: 1-SRV_SESSION_ID_MAX of [A-Za-z0-9._:-] (api.c). */
int srv_session_id_ok(const char *s, size_t n);

typedef struct srv_admin_req {
    char method[8];
    char path[512];                          /* /admin/... */
    char user[SRV_USER_MAX + 1];             /* ?user= (a session's owner; list filter) */
    char tier[8];                            /* ?tier= hbm|host|disk|all */
    char after_user[SRV_USER_MAX + 1], after[SRV_SESSION_ID_MAX + 1]; /* ?after_user=, ?after= */
    int limit;                               /* ?limit= */
    srv_engine *eng;
} srv_admin_req;
/* Runs one admin request: 0 and a JSON body in *out (caller frees), or -1
 * and the error in *e.  Blocks (RocksDB, the engine thread's answers): run
 * it on the thread pool. */
int srv_admin_run(const srv_admin_req *q, char **out, srv_error *e);

/* ---- the loop thread: auth.c -------------------------------------------- */

typedef struct srv_auth srv_auth;

/* Builds the key table from cfg->api_keys and cfg->api_keys_file.  0 and a
 * new table in *out, or -1 (logged) when it cannot be built (a source
 * unreadable or naming no key, memory exhausted); the caller then refuses
 * to start or, on SIGHUP, keeps the old table.  With neither source set
 * the table admits every request. */
int srv_auth_load(const srv_config *cfg, srv_auth **out);
void srv_auth_free(srv_auth *a);
/* Keys in force; 0 = authentication is off. */
int srv_auth_count(const srv_auth *a);
/* Who a request is. */
typedef struct srv_identity {
    char user[SRV_USER_MAX + 1];
    int admin; /* may use /admin */
} srv_identity;
/* 1 when a request with this Authorization header (may be NULL) may pass,
 * with *who filled; a NULL table admits nobody.  Without keys: user
 * "local", admin when the peer is on loopback. */
int srv_auth_check(const srv_auth *a, const char *authorization, int loopback, srv_identity *who);
/* A valid user name: 1-SRV_USER_MAX of [A-Za-z0-9._-]. */
int srv_user_name_ok(const char *s, size_t n);

/* ---- the loop thread: daemon.c, http.c, job.c ------------------------------ */

typedef struct srv_server srv_server;

/* A connection that stopped watching its fd drops the pointer (c = NULL);
 * the handle is freed when libuv has closed it. */
typedef struct srv_watch {
    uv_poll_t h;
    struct srv_conn *c;
} srv_watch;

typedef struct srv_parse_work srv_parse_work; /* http.c */

/* One TCP connection, from accept to close (MHD_OPTION_NOTIFY_CONNECTION),
 * across its keep-alive requests; for the request_read_timeout deadline. */
typedef struct srv_sock {
    struct MHD_Connection *mc;
    double t_wait;           /* the current request began to be awaited: the
                                connection's start or the end of the previous response */
    int receiving;           /* the current request has not fully arrived */
    int in_request;          /* the access handler has seen the current request */
    struct srv_sock *prev, *next;
} srv_sock;

/* One HTTP request, from the access handler's first call to MHD's
 * completed callback (loop thread only). */
typedef struct srv_conn {
    struct MHD_Connection *mc;
    srv_server *s;
    int route;
    int is_post;
    char method[8];
    char path[64];
    srv_buf body;
    int too_big;
    int suspended;
    srv_watch *w;            /* the disconnect watch while suspended */
    srv_job *job;
    srv_parse_work *parse;   /* body parsing in flight on the thread pool */
    srv_sock *sock;          /* its connection (NULL if it could not be tracked) */
    int close;               /* answer with Connection: close */
    int status;              /* status of the queued response, 0 = none yet */
    srv_identity who;        /* set once the key was checked */
    double t0;
    struct srv_conn *prev, *next;
} srv_conn;

struct srv_server {
    const srv_config *cfg;
    uv_loop_t *loop;
    struct MHD_Daemon *d;
    uv_poll_t mhd_poll;
    uv_timer_t mhd_timer, sweep, progress, watchdog;
    uv_async_t async;
    uv_signal_t sigterm, sigint, sigpipe, sighup;
    int in_mhd;
    srv_engine *eng;
    srv_metrics *met;
    int ready, draining, stopping, exit_code;
    double drain_deadline, t_start;
    srv_model_desc md;
    char model_name[256];
    char backend[8];         /* the engine's backend, once ready */
    srv_auth *auth;
    pthread_mutex_t out_mu;
    srv_event *out, *out2;   /* engine -> loop events; out2 is the loop's swap buffer */
    int n_out, cap_out, cap_out2;
    srv_job *jobs;           /* in flight in the engine */
    int n_inflight;
    int n_parse;             /* parse/tokenize work items on the thread pool */
    srv_conn *conns;         /* every live request context */
    srv_sock *socks;         /* every open connection */
    char mhd_last[256];      /* MHD's last log message, for collapsing repeats */
    double mhd_last_t;
    int mhd_repeats;
    uint64_t rng, next_id;
    long created_at;
};

/* http.c */
/* Starts MHD on the listening socket lfd (taken over) under s->loop. */
int srv_http_start(srv_server *s, int lfd, int v6);
/* Runs MHD once and re-arms its timer; call after anything that may have
 * given MHD work (a resume, a queued response). */
void srv_http_run(srv_server *s);
/* Every second (daemon.c's sweep): closes connections whose request has
 * not fully arrived within request_read_timeout; flushes collapsed MHD log
 * lines. */
void srv_http_sweep(srv_server *s);
/* Stops accepting: closes the listening socket. */
void srv_http_quiesce(srv_server *s);
/* Resumes every suspended connection, then stops MHD (its completed
 * callback runs for each connection left). */
void srv_http_stop(srv_server *s);
void srv_conn_resume(srv_conn *c);

/* job.c */
/* A validated request becomes a job: linked in flight, handed to the
 * engine (takes ownership of r).  NULL when memory runs out. */
srv_job *srv_job_start(srv_server *s, srv_conn *c, srv_genreq *r);
void srv_job_unref(srv_job *j);
/* Sets the job's cancel reason unless it has one, and wakes the engine. */
void srv_job_cancel(srv_server *s, srv_job *j, int reason);
void srv_job_started(srv_server *s, srv_job *j, const srv_event *ev);
void srv_job_prompt_logprobs(srv_server *s, srv_job *j, const srv_event *ev);
void srv_job_token(srv_server *s, srv_job *j, const srv_event *ev);
void srv_job_choice_end(srv_server *s, srv_job *j, const srv_event *ev);
void srv_job_final(srv_server *s, srv_job *j, const srv_event *ev);

#endif /* MKAD_SRV_INTERNAL_H */
