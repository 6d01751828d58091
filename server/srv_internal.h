/*
 * srv_internal.h — private declarations shared by the files of server/.
 *
 *   util.c     growable byte buffer, key=value logging, clocks
 *   api.c      OpenAI request parsing/validation and JSON/SSE building
 *              (pure functions: no I/O, no threads; unit-tested)
 *   sched.c    the step planner (pure; unit-tested) and the engine thread
 *   metrics.c  counters/histograms and the Prometheus text exposition
 *   http.c     libuv loop + libmicrohttpd (external epoll), routing, streaming
 *
 * Threads: the loop thread owns every srv_job field marked "loop"; the engine
 * thread reads the fields marked "immutable" (set before submission) and the
 * atomic cancel flag.  Token events travel engine -> loop through a locked
 * vector and uv_async_send; jobs and cancels travel loop -> engine through a
 * locked inbox and a condition variable.
 */
#ifndef MKAD_SRV_INTERNAL_H
#define MKAD_SRV_INTERNAL_H

#include <stdarg.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#include <jansson.h>

#include "engine.h"
#include "server.h"

typedef struct srv_metrics srv_metrics;

/* ---- util.c ------------------------------------------------------------- */

typedef struct srv_buf {
    char *data;
    size_t len, cap;
} srv_buf;

/* All return 0, or -1 when memory runs out (the buffer is unchanged). */
int srv_buf_append(srv_buf *b, const void *p, size_t n);
int srv_buf_puts(srv_buf *b, const char *s);
int srv_buf_printf(srv_buf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void srv_buf_free(srv_buf *b);
void srv_buf_reset(srv_buf *b);

/* One log line "ts=... level=L event=E <fields>" written with one write(2).
 * fields is a printf format producing " k=v k=v" pairs (or "").  Values that
 * may contain spaces go through srv_log_quote. */
void srv_log(const char *level, const char *event, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* Quotes s for a key=value log line into buf (truncating); returns buf. */
const char *srv_log_quote(const char *s, char *buf, size_t len);
double srv_now(void); /* monotonic seconds */

/* ---- api.c: requests ------------------------------------------------------ */

enum srv_route {
    SRV_ROUTE_COMPLETIONS,
    SRV_ROUTE_CHAT,
    SRV_ROUTE_MODELS,
    SRV_ROUTE_HEALTH,
    SRV_ROUTE_METRICS,
    SRV_ROUTE_OTHER,
    SRV_ROUTE_COUNT
};

#define SRV_MAX_STOP 4
#define SRV_MAX_STOP_LEN 256
#define SRV_MAX_TOP_LOGPROBS 20
#define SRV_SESSION_ID_MAX 128

/* A tokenizer as the server uses it (an adapter over the engine's
 * tokenizer; tests plug in a fake).  Every function must be callable from
 * several threads at once.  Results are new arrays the caller frees. */
typedef struct srv_codec {
    void *ctx;
    /* text -> token ids; 0, or -1 with a message in err */
    int (*encode)(void *ctx, const char *text, size_t len, int32_t **ids, int *n, char *err,
                  size_t errlen);
    /* a chat request -> ids of the chat template.  req is an object with
     * "messages" (validated OpenAI messages) and optionally "tools",
     * "documents", "chat_template_kwargs", "add_generation_prompt" (default
     * true), "continue_final_message".  Returns 0, or a negative ENG_*
     * status with a message in err (ENG_ENOMEM: ours; others: the request's
     * or the template's) */
    int (*chat)(void *ctx, json_t *req, int32_t **ids, int *n, char *err, size_t errlen);
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
    int max_tokens;            /* >= 1; -1: until the context is full */
    eng_sampler_params sp;
    int has_seed;              /* else the caller picks a random seed */
    int ignore_eos;            /* extension */
    char *stop[SRV_MAX_STOP];  /* NUL-terminated, non-empty */
    int n_stop;
    int stream;
    int include_usage;         /* stream_options.include_usage */
    int logprobs;              /* 0: off; 1: on */
    int top_logprobs;          /* 0..20 alternatives per position */
    char session_id[SRV_SESSION_ID_MAX + 1]; /* "" = none */
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

void srv_error_set(srv_error *e, int status, const char *type, const char *param,
                   const char *code, const char *fmt, ...) __attribute__((format(printf, 6, 7)));
/* {"error":{...}} as a new string; caller frees. */
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

/* ---- api.c: responses ----------------------------------------------------- */

typedef struct srv_usage {
    int prompt_tokens, completion_tokens, cached_tokens;
} srv_usage;

/* One generated position's log-probabilities. */
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
size_t srv_stop_scan(const char *text, size_t len, size_t emitted, char *const *stop, int n_stop,
                     int *stopped);

/* Full (non-streaming) response bodies; new strings, caller frees. */
char *srv_build_completion(const srv_genreq *r, const char *id, long created, const char *text,
                           size_t text_len, const int32_t *ids, int n_ids, const srv_logprob *lp,
                           int n_lp, const char *finish, const srv_usage *u);

/* SSE framing.  Each appends one complete event ("data: ...\n\n") to out;
 * 0 or -1 (out of memory). */
int srv_sse_chunk(srv_buf *out, const srv_genreq *r, const char *id, long created,
                  const char *text, size_t text_len, const int32_t *ids, int n_ids,
                  const srv_logprob *lp, int n_lp, const char *finish, int first);
int srv_sse_usage(srv_buf *out, const srv_genreq *r, const char *id, long created,
                  const srv_usage *u);
int srv_sse_error(srv_buf *out, const srv_error *e);
int srv_sse_done(srv_buf *out);

/* ---- sched.c: the planner (pure) ------------------------------------------ */

/* A running sequence as the planner sees it. */
typedef struct srv_plan_seq {
    int prefill_left;   /* prompt tokens not yet in the engine; 0 = decoding */
    uint64_t order;     /* arrival order (smaller = older) */
    int last_step;      /* step index of the sequence's last turn (fairness) */
} srv_plan_seq;

typedef struct srv_plan_item {
    int idx;            /* index into the seqs array */
    int n_tokens;
} srv_plan_item;

/* Plans one step: every decoding sequence gets one token (the oldest turns
 * first if there are more decoders than budget), then prefilling sequences
 * in arrival order get chunks of at most `chunk` tokens from what is left
 * of `budget`.  Returns the number of items written to out (capacity
 * n_seqs).  Pure: no engine, no threads. */
int srv_plan_step(const srv_plan_seq *seqs, int n_seqs, int budget, int chunk,
                  srv_plan_item *out);

/* Session prefix reuse: how many of a resident sequence's `have` tokens to
 * keep for a new prompt.  The result is the longest common prefix, capped so
 * that at least one prompt token remains to prefill, and rounded down to a
 * multiple of block_size unless it equals n_have (eng_seq_truncate's rule). */
int srv_reuse_len(const int32_t *have, int n_have, const int32_t *prompt, int n_prompt,
                  int block_size);

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

typedef struct srv_job {
    /* immutable once submitted (read by the engine thread) */
    uint64_t id;
    srv_genreq *req;
    double t_arrival;
    /* shared */
    atomic_int cancel;          /* enum srv_cancel */
    /* loop only */
    int refs;                   /* 2 at submit: the engine's final event, the connection */
    struct srv_conn *conn;      /* NULL once the connection is gone */
    struct srv_job *prev, *next;/* in-flight list */
    char cid[40];               /* "cmpl-..." / "chatcmpl-..." */
    long created;
    srv_buf text;               /* all generated text */
    size_t emitted;             /* text released to the client */
    int32_t *ids;               /* generated ids (capacity cap_ids) */
    int n_ids, cap_ids;
    srv_logprob *lps;           /* per generated token when logprobs */
    int n_lps, cap_lps;
    srv_buf sse;                /* SSE bytes not yet taken by MHD */
    size_t sse_off;
    int first_chunk_sent;
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
    SRV_EV_TOKEN,
    SRV_EV_FINAL       /* engine is done with the job; last event for it */
};

typedef struct srv_event {
    int type;
    srv_job *job;
    int32_t token;
    int finish;            /* FINAL: enum srv_finish */
    int status;            /* FINAL with SRV_FINISH_ERROR: HTTP status */
    const char *code;      /* FINAL with SRV_FINISH_ERROR: OpenAI error code (static) or NULL */
    srv_usage usage;       /* START / FINAL */
    srv_logprob *lp;       /* TOKEN with logprobs; the loop frees it */
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
void srv_metrics_state(srv_metrics *m, int running, int waiting, int blocks_used, int blocks_total,
                       int sessions);
void srv_metrics_preempted(srv_metrics *m);
/* Once the engine exists: its backend ("cpu"/"cuda"), K/V dtype and pool size
 * (the strings are copied). */
void srv_metrics_engine(srv_metrics *m, const char *backend, const char *kv_dtype, size_t kv_bytes);
void srv_metrics_cancelled(srv_metrics *m, int reason);
/* The Prometheus text exposition; appends to out. */
int srv_metrics_render(srv_metrics *m, srv_buf *out);
const char *srv_route_name(int route);

#endif /* MKAD_SRV_INTERNAL_H */
