/*
 * http.c — the loop thread: one libuv loop drives libmicrohttpd in external
 * event-loop mode (MHD's epoll fd under a uv_poll_t, its timeout under a
 * uv_timer_t re-armed after every MHD_run), routes requests, accumulates
 * bodies with a limit, hands generation jobs to the engine thread and turns
 * the engine's token events back into responses.
 *
 * Rules from shared/STACK-NOTES.md that this file relies on:
 *   - MHD_resume_connection only on this thread, exactly once per suspend;
 *     engine events arrive through uv_async_send and the async callback
 *     resumes;
 *   - while a connection is suspended its fd is watched with
 *     uv_poll(UV_DISCONNECT), the only timely way to see a client leave;
 *   - anything but MHD_REQUEST_TERMINATED_COMPLETED_OK means "cancelled";
 *   - suspended connections never time out in MHD: the sweep timer enforces
 *     request_timeout; every suspended connection is resumed before
 *     MHD_stop_daemon.
 * Measured here too: a response queued on the access handler's first call
 * is "early" and MHD 0.9.75 then closes the connection (no keep-alive), so
 * body-less requests are answered on the second call; bodies over 16 KiB
 * are parsed and tokenized on the libuv thread pool (tens of ms for MBs).
 *
 * Ownership: a srv_conn lives from the first access-handler call to MHD's
 * completed callback.  A srv_job is referenced by its connection and by the
 * engine (until the engine's FINAL event); both references are dropped on
 * this thread, so the count needs no atomics.
 */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <microhttpd.h>
#include <uv.h>
#ifdef HAVE_SYSTEMD
#include <systemd/sd-daemon.h>
#endif

#include "srv_internal.h"

typedef struct srv_server srv_server;

typedef struct watch {
    uv_poll_t h;
    struct srv_conn *c; /* NULL once the connection stopped watching */
} watch;

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
    watch *w;
    srv_job *job;
    struct tok_work *tok; /* tokenization in flight on the thread pool */
    int status;           /* status of the queued response, 0 = none yet */
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
    char backend[8];      /* the engine's backend, once ready */
    char *keys_buf;       /* all keys, NUL-separated */
    const char **keys;
    int n_keys;
    pthread_mutex_t out_mu;
    srv_event *out, *out2;  /* engine -> loop events; out2 is the loop's swap buffer */
    int n_out, cap_out, cap_out2;
    srv_job *jobs;        /* in flight in the engine */
    int n_inflight;
    int n_tok;            /* parse/tokenize work items on the thread pool */
    srv_conn *conns;      /* every live connection context */
    uint64_t rng, next_id;
    long created_at;
};

/* ---- small helpers -------------------------------------------------------------- */

static uint64_t splitmix(uint64_t *x)
{
    uint64_t z = (*x += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static void http_run(srv_server *s);
static void reload_keys(srv_server *s);

static void notify(const char *what)
{
#ifdef HAVE_SYSTEMD
    sd_notify(0, what);
#else
    (void)what;
#endif
}

static void watch_closed(uv_handle_t *h)
{
    free(h->data);
}

static void watch_stop(srv_conn *c)
{
    if (!c->w) return;
    uv_poll_stop(&c->w->h);
    c->w->c = NULL;
    uv_close((uv_handle_t *)&c->w->h, watch_closed);
    c->w = NULL;
}

static void on_watch(uv_poll_t *h, int status, int events);

static void conn_suspend(srv_conn *c)
{
    if (c->suspended) return;
    MHD_suspend_connection(c->mc);
    c->suspended = 1;
    const union MHD_ConnectionInfo *ci = MHD_get_connection_info(c->mc, MHD_CONNECTION_INFO_CONNECTION_FD);
    if (!ci) return;
    watch *w = calloc(1, sizeof *w);
    if (!w) return;
    if (uv_poll_init(c->s->loop, &w->h, ci->connect_fd) != 0) {
        free(w);
        return;
    }
    w->h.data = w;
    w->c = c;
    c->w = w;
    uv_poll_start(&w->h, UV_DISCONNECT, on_watch);
}

static void conn_resume(srv_conn *c)
{
    if (!c->suspended) return;
    watch_stop(c);
    c->suspended = 0;
    MHD_resume_connection(c->mc);
}

/* The client closed the connection (or it failed) while suspended. */
static void on_watch(uv_poll_t *h, int status, int events)
{
    watch *w = h->data;
    srv_conn *c = w->c;
    if (!c) return;
    srv_job *j = c->job;
    if (j && !j->finished) {
        int expect = SRV_CANCEL_NONE;
        atomic_compare_exchange_strong(&j->cancel, &expect, SRV_CANCEL_CLIENT);
        srv_engine_wake(c->s->eng);
    }
    srv_server *s = c->s;
    conn_resume(c); /* MHD reads the EOF and ends the connection */
    http_run(s);
}

static void job_unref(srv_job *j)
{
    if (--j->refs > 0) return;
    srv_genreq_free(j->req);
    srv_buf_free(&j->text);
    srv_buf_free(&j->sse);
    free(j->ids);
    free(j->lps);
    free(j->body);
    free(j);
}

/* ---- responses ---------------------------------------------------------------- */

static enum MHD_Result queue_buf(srv_conn *c, int status, const char *ctype, char *data, size_t len,
                                 int retry_after, const char *allow)
{
    struct MHD_Response *r = MHD_create_response_from_buffer(len, data, MHD_RESPMEM_MUST_FREE);
    if (!r) {
        free(data);
        return MHD_NO;
    }
    MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, ctype);
    if (retry_after > 0) {
        char ra[16];
        snprintf(ra, sizeof ra, "%d", retry_after);
        MHD_add_response_header(r, MHD_HTTP_HEADER_RETRY_AFTER, ra);
    }
    if (allow) MHD_add_response_header(r, MHD_HTTP_HEADER_ALLOW, allow);
    if (status == 401) MHD_add_response_header(r, MHD_HTTP_HEADER_WWW_AUTHENTICATE, "Bearer");
    enum MHD_Result rc = MHD_queue_response(c->mc, (unsigned)status, r);
    MHD_destroy_response(r);
    if (rc == MHD_YES) c->status = status;
    return rc;
}

static enum MHD_Result queue_json(srv_conn *c, int status, char *json)
{
    if (!json) return MHD_NO;
    return queue_buf(c, status, "application/json", json, strlen(json), 0, NULL);
}

static enum MHD_Result queue_error(srv_conn *c, const srv_error *e, int retry_after, const char *allow)
{
    char *js = srv_error_json(e);
    if (!js) return MHD_NO;
    return queue_buf(c, e->status, "application/json", js, strlen(js), retry_after, allow);
}

static enum MHD_Result fail(srv_conn *c, int status, const char *type, const char *code,
                            const char *msg, int retry_after, const char *allow)
{
    srv_error e;
    srv_error_set(&e, status, type, NULL, code, "%s", msg);
    return queue_error(c, &e, retry_after, allow);
}

/* ---- job events (loop thread) ------------------------------------------------- */

static const char *finish_name(int f)
{
    return f == SRV_FINISH_LENGTH ? "length" : "stop";
}

/* The job's text is complete: emit what is left and the end of the stream,
 * or build the full body; then wake the connection. */
static void job_finish(srv_server *s, srv_job *j, int finish)
{
    if (j->finished) return;
    j->finished = 1;
    j->finish = finish;
    const srv_genreq *r = j->req;
    if (finish == SRV_FINISH_CANCELLED) {
        int why = atomic_load(&j->cancel);
        if (why == SRV_CANCEL_TIMEOUT)
            srv_error_set(&j->error, 503, "timeout", NULL, "timeout",
                          "the request did not finish within request_timeout (%d s)",
                          s->cfg->request_timeout_s);
        else if (why == SRV_CANCEL_CLIENT)
            srv_error_set(&j->error, 499, "invalid_request_error", NULL, "client_closed",
                          "the client closed the connection");
        else
            srv_error_set(&j->error, 503, "server_error", NULL, "shutting_down",
                          "the server is shutting down");
    }
    int err = finish == SRV_FINISH_ERROR || finish == SRV_FINISH_CANCELLED;
    if (r->stream) {
        if (!err) {
            size_t rest = j->text.len - j->emitted;
            if (rest)
                srv_sse_chunk(&j->sse, r, j->cid, j->created, j->text.data + j->emitted, rest,
                              NULL, 0, NULL, 0, NULL, !j->first_chunk_sent);
            j->emitted = j->text.len;
            srv_sse_chunk(&j->sse, r, j->cid, j->created, "", 0, NULL, 0, NULL, 0,
                          finish_name(finish), !j->first_chunk_sent);
            j->first_chunk_sent = 1;
            if (r->include_usage) srv_sse_usage(&j->sse, r, j->cid, j->created, &j->usage);
            srv_sse_done(&j->sse);
        } else {
            srv_sse_error(&j->sse, &j->error);
        }
    } else if (!err) {
        j->body = srv_build_completion(r, j->cid, j->created, j->text.data, j->text.len, j->ids,
                                       j->n_ids, j->lps, j->n_lps, finish_name(finish), &j->usage);
        if (!j->body) {
            srv_error_set(&j->error, 500, "server_error", NULL, NULL, "out of memory");
            j->finish = SRV_FINISH_ERROR;
        }
    }
    if (j->conn) conn_resume(j->conn);
}

static void job_token(srv_server *s, srv_job *j, const srv_event *ev)
{
    if (j->finished) {
        free(ev->lp);
        return;
    }
    double now = srv_now();
    if (j->n_ids == 0) {
        j->t_first = now;
        srv_metrics_ttft(s->met, now - j->t_arrival);
    } else {
        srv_metrics_itl(s->met, now - j->t_last);
    }
    j->t_last = now;
    if (j->n_ids == j->cap_ids) {
        int cap = j->cap_ids ? j->cap_ids * 2 : 32;
        int32_t *ids = realloc(j->ids, (size_t)cap * sizeof *ids);
        if (!ids) goto oom;
        j->ids = ids;
        j->cap_ids = cap;
    }
    j->ids[j->n_ids++] = ev->token;
    srv_logprob *lp = NULL;
    if (ev->lp) {
        if (j->n_lps == j->cap_lps) {
            int cap = j->cap_lps ? j->cap_lps * 2 : 32;
            srv_logprob *l = realloc(j->lps, (size_t)cap * sizeof *l);
            if (!l) goto oom;
            j->lps = l;
            j->cap_lps = cap;
        }
        lp = &j->lps[j->n_lps++];
        *lp = *ev->lp;
        free(ev->lp);
    }
    char piece[SRV_PIECE_MAX];
    size_t n = srv_token_piece(j->req->codec, ev->token, j->n_ids == 1, piece);
    if (srv_buf_append(&j->text, piece, n) != 0) goto oom2;
    int stopped = 0;
    size_t end = srv_stop_scan(j->text.data, j->text.len, j->emitted, j->req->stop, j->req->n_stop,
                               &stopped);
    if (j->req->stream && (end > j->emitted || lp || j->req->return_token_ids)) {
        srv_sse_chunk(&j->sse, j->req, j->cid, j->created, j->text.data + j->emitted,
                      end - j->emitted, &ev->token, 1, lp, lp ? 1 : 0, NULL, !j->first_chunk_sent);
        j->first_chunk_sent = 1;
        j->emitted = end;
    }
    if (stopped) {
        j->text.len = end;
        j->text.data[end] = '\0';
        j->emitted = end;
        j->usage.completion_tokens = j->n_ids;
        atomic_store(&j->cancel, SRV_CANCEL_STOP);
        srv_engine_wake(s->eng);
        job_finish(s, j, SRV_FINISH_STOP);
        return;
    }
    if (j->req->stream && j->conn) conn_resume(j->conn);
    return;
oom:
    free(ev->lp);
oom2:
    srv_error_set(&j->error, 500, "server_error", NULL, NULL, "out of memory");
    atomic_store(&j->cancel, SRV_CANCEL_STOP);
    srv_engine_wake(s->eng);
    job_finish(s, j, SRV_FINISH_ERROR);
}

static void job_final(srv_server *s, srv_job *j, const srv_event *ev)
{
    j->engine_done = 1;
    srv_metrics_tokens(s->met, ev->usage.prompt_tokens, ev->usage.completion_tokens,
                       ev->usage.cached_tokens);
    if (!j->finished) {
        j->usage.prompt_tokens = ev->usage.prompt_tokens;
        j->usage.completion_tokens = ev->usage.completion_tokens;
        j->usage.cached_tokens = ev->usage.cached_tokens;
        if (ev->finish == SRV_FINISH_ERROR)
            srv_error_set(&j->error, ev->status ? ev->status : 500,
                          ev->status == 400 ? "invalid_request_error" : "server_error", NULL, ev->code,
                          "%s", ev->msg[0] ? ev->msg : "generation failed");
        job_finish(s, j, ev->finish);
    }
    if (j->prev) j->prev->next = j->next;
    else s->jobs = j->next;
    if (j->next) j->next->prev = j->prev;
    s->n_inflight--;
    job_unref(j);
}

static void begin_shutdown(srv_server *s, const char *why, int deadline_s);

static void on_ready(srv_server *s)
{
    const srv_engine_info *info = srv_engine_get_info(s->eng);
    s->md.vocab_size = info->mi.vocab_size;
    s->md.max_ctx = info->max_ctx;
    s->md.codec = info->codec;
    snprintf(s->backend, sizeof s->backend, "%s", info->backend);
    s->ready = 1;
    uv_timer_stop(&s->progress);
    srv_log("info", "ready", " model=%s backend=%s kv_pool_mib=%.1f kv_dtype=%s load_s=%.3f", s->model_name,
            info->backend, (double)info->kv_bytes / (1024.0 * 1024.0), info->kv_dtype,
            srv_now() - s->t_start);
    char st[512];
    snprintf(st, sizeof st, "READY=1\nSTATUS=serving %s", s->model_name);
    notify(st);
}

/* Exit status after a device fault: non-zero, so that systemd's
 * Restart=on-failure starts a fresh process (and a fresh CUDA context). */
#define SRV_EXIT_DEVICE 3

/* The engine's device failed (engine thread's DEVICE_FAILED).  The engine
 * thread answers every job it holds, and any still to come, with 503; here
 * the daemon stops accepting and exits as soon as those answers are out
 * (at most ~2 s for slow readers), never waiting out shutdown_timeout. */
static void on_device_failed(srv_server *s, const char *msg)
{
    s->exit_code = SRV_EXIT_DEVICE;
    begin_shutdown(s, "device_failed", 0);
    s->drain_deadline = srv_now(); /* also when a SIGTERM drain was already running */
    char st[256];
    snprintf(st, sizeof st, "STATUS=device failed, exiting: %.200s", msg);
    notify(st);
}

static void on_async(uv_async_t *h)
{
    srv_server *s = h->data;
    pthread_mutex_lock(&s->out_mu);
    srv_event *evs = s->out;
    int n = s->n_out;
    s->out = s->out2;
    int cap = s->cap_out;
    s->cap_out = s->cap_out2;
    s->out2 = evs;
    s->cap_out2 = cap;
    s->n_out = 0;
    pthread_mutex_unlock(&s->out_mu);
    for (int i = 0; i < n; i++) {
        srv_event *ev = &evs[i];
        switch (ev->type) {
        case SRV_EV_READY:
            on_ready(s);
            break;
        case SRV_EV_LOAD_FAILED:
            s->exit_code = 1;
            begin_shutdown(s, "model_load_failed", s->cfg->shutdown_timeout_s);
            break;
        case SRV_EV_DEVICE_FAILED:
            on_device_failed(s, ev->msg);
            break;
        case SRV_EV_START:
            ev->job->usage.cached_tokens = ev->usage.cached_tokens;
            ev->job->usage.prompt_tokens = ev->usage.prompt_tokens;
            break;
        case SRV_EV_TOKEN:
            job_token(s, ev->job, ev);
            break;
        case SRV_EV_FINAL:
            job_final(s, ev->job, ev);
            break;
        }
    }
    http_run(s);
}

/* Engine thread: append events, wake the loop. */
static void post_events(const srv_event *ev, int n, void *arg)
{
    srv_server *s = arg;
    pthread_mutex_lock(&s->out_mu);
    if (s->n_out + n > s->cap_out) {
        int cap = s->cap_out ? s->cap_out : 256;
        while (cap < s->n_out + n) cap *= 2;
        srv_event *o = realloc(s->out, (size_t)cap * sizeof *o);
        while (!o) { /* the loop frees the job only on FINAL: never drop one */
            pthread_mutex_unlock(&s->out_mu);
            uv_async_send(&s->async);
            usleep(1000);
            pthread_mutex_lock(&s->out_mu);
            o = realloc(s->out, (size_t)cap * sizeof *o);
        }
        s->out = o;
        s->cap_out = cap;
    }
    memcpy(s->out + s->n_out, ev, (size_t)n * sizeof *ev);
    s->n_out += n;
    pthread_mutex_unlock(&s->out_mu);
    uv_async_send(&s->async);
}

/* ---- request handling ------------------------------------------------------------ */

static int route_of(const char *url)
{
    if (strcmp(url, "/v1/completions") == 0) return SRV_ROUTE_COMPLETIONS;
    if (strcmp(url, "/v1/chat/completions") == 0) return SRV_ROUTE_CHAT;
    if (strcmp(url, "/v1/models") == 0 || strncmp(url, "/v1/models/", 11) == 0) return SRV_ROUTE_MODELS;
    if (strcmp(url, "/health") == 0) return SRV_ROUTE_HEALTH;
    if (strcmp(url, "/metrics") == 0) return SRV_ROUTE_METRICS;
    return SRV_ROUTE_OTHER;
}

static int authorized(srv_server *s, struct MHD_Connection *mc)
{
    if (s->n_keys == 0) return 1;
    const char *h = MHD_lookup_connection_value(mc, MHD_HEADER_KIND, MHD_HTTP_HEADER_AUTHORIZATION);
    if (!h || strncasecmp(h, "Bearer ", 7) != 0) return 0;
    h += 7;
    while (*h == ' ') h++;
    size_t hl = strlen(h);
    int ok = 0;
    for (int i = 0; i < s->n_keys; i++) {
        size_t kl = strlen(s->keys[i]);
        unsigned char diff = (unsigned char)(kl != hl);
        for (size_t k = 0; k < kl; k++) diff |= (unsigned char)(s->keys[i][k] ^ (k < hl ? h[k] : 0));
        ok |= diff == 0;
    }
    return ok;
}

static enum MHD_Result handle_get(srv_conn *c, const char *url)
{
    srv_server *s = c->s;
    srv_buf b = { 0 };
    switch (c->route) {
    case SRV_ROUTE_HEALTH: {
        const char *st = s->draining ? "draining" : s->ready ? "ok" : "loading";
        srv_buf_printf(&b, "{\"status\":\"%s\"}", st);
        return queue_buf(c, s->ready && !s->draining ? 200 : 503, "application/json", b.data,
                         b.len, s->ready ? 0 : 5, NULL);
    }
    case SRV_ROUTE_METRICS:
        srv_metrics_render(s->met, &b);
        srv_buf_printf(&b, "# HELP mkad_http_inflight_requests Generation requests in the engine.\n"
                           "# TYPE mkad_http_inflight_requests gauge\nmkad_http_inflight_requests %d\n"
                           "# HELP mkad_ready 1 once the model is loaded.\n# TYPE mkad_ready gauge\n"
                           "mkad_ready %d\n", s->n_inflight, s->ready);
        if (!b.data) return MHD_NO;
        return queue_buf(c, 200, "text/plain; version=0.0.4", b.data, b.len, 0, NULL);
    case SRV_ROUTE_MODELS: {
        json_t *m = json_pack("{s:s, s:s, s:I, s:s, s:i}", "id", s->model_name, "object", "model",
                              "created", (json_int_t)s->created_at, "owned_by", "mkad",
                              "max_model_len", s->ready ? s->md.max_ctx : 0);
        /* extension: where the model runs ("cpu"/"cuda"), once it is loaded */
        if (m && s->ready) json_object_set_new(m, "backend", json_string(s->backend));
        json_t *o;
        if (strcmp(url, "/v1/models") == 0) {
            o = json_pack("{s:s, s:[o]}", "object", "list", "data", m);
        } else if (strcmp(url + 11, s->model_name) == 0) {
            o = m;
        } else {
            json_decref(m);
            srv_error e;
            srv_error_set(&e, 404, "invalid_request_error", "model", "model_not_found",
                          "The model '%.64s' does not exist", url + 11);
            return queue_error(c, &e, 0, NULL);
        }
        char *js = o ? json_dumps(o, JSON_COMPACT) : NULL;
        json_decref(o);
        return queue_json(c, 200, js);
    }
    default:
        return MHD_NO;
    }
}

static enum MHD_Result respond_job(srv_conn *c);
static ssize_t sse_reader(void *cls, uint64_t pos, char *buf, size_t max);

/* Request bodies above this size are parsed and tokenized on the libuv
 * thread pool (a 2 MB body takes tens of milliseconds to parse). */
#define SRV_PARSE_INLINE_MAX 16384

typedef struct tok_work {
    uv_work_t work;
    srv_conn *c;          /* NULL once the connection is gone */
    srv_server *s;
    srv_buf body;         /* the request body, moved from the connection */
    int chat;
    char sid[1024];       /* X-Session-Id (validated by the parser) */
    int has_sid;
    srv_model_desc md;    /* a copy: the pool thread reads it */
    srv_genreq *r;        /* the result */
    srv_error err;
    int rc, done;
} tok_work;

static void tok_work_run(uv_work_t *req);
static void tok_work_done(uv_work_t *req, int status);
static enum MHD_Result submit_job(srv_conn *c, srv_genreq *r);

static enum MHD_Result handle_generate(srv_conn *c)
{
    srv_server *s = c->s;
    if (c->too_big) {
        char msg[128];
        snprintf(msg, sizeof msg, "the request body exceeds max_body_kb (%d KiB)", s->cfg->max_body_kb);
        return fail(c, 413, "invalid_request_error", "request_too_large", msg, 0, NULL);
    }
    if (s->draining) return fail(c, 503, "server_error", "shutting_down", "the server is shutting down", 5, NULL);
    if (!s->ready) return fail(c, 503, "server_error", "model_loading", "the model is still loading", 5, NULL);
    const char *sid = MHD_lookup_connection_value(c->mc, MHD_HEADER_KIND, "X-Session-Id");
    srv_genreq *r = NULL;
    srv_error e;
    if (c->body.len > SRV_PARSE_INLINE_MAX) {
        /* A big body: JSON parsing and tokenization go to the thread pool so
         * that they never stall the streams this loop serves. */
        tok_work *w = calloc(1, sizeof *w);
        if (!w) return fail(c, 500, "server_error", NULL, "out of memory", 0, NULL);
        w->c = c;
        w->s = s;
        w->body = c->body; /* moved */
        memset(&c->body, 0, sizeof c->body);
        w->chat = c->route == SRV_ROUTE_CHAT;
        snprintf(w->sid, sizeof w->sid, "%s", sid ? sid : "");
        w->has_sid = sid != NULL;
        w->md = s->md;
        w->work.data = w;
        if (uv_queue_work(s->loop, &w->work, tok_work_run, tok_work_done) != 0) {
            srv_buf_free(&w->body);
            free(w);
            return fail(c, 500, "server_error", NULL, "cannot queue the request", 0, NULL);
        }
        c->tok = w;
        s->n_tok++;
        conn_suspend(c);
        return MHD_YES;
    }
    if (srv_genreq_parse(c->body.data, c->body.len, c->route == SRV_ROUTE_CHAT, &s->md, sid, &r, &e) != 0)
        return queue_error(c, &e, 0, NULL);
    srv_buf_free(&c->body);
    return submit_job(c, r);
}

/* Parsing on the thread pool: only the work item and the read-only codec
 * (through the copied model description) are touched there. */
static void tok_work_run(uv_work_t *req)
{
    tok_work *w = req->data;
    w->rc = srv_genreq_parse(w->body.data, w->body.len, w->chat, &w->md,
                             w->has_sid ? w->sid : NULL, &w->r, &w->err);
}

static void tok_work_done(uv_work_t *req, int status)
{
    tok_work *w = req->data;
    w->done = 1;
    w->s->n_tok--;
    if (status != 0 && w->rc == 0) {
        w->rc = -1;
        srv_error_set(&w->err, 503, "server_error", NULL, "shutting_down", "request parsing was cancelled");
    }
    srv_buf_free(&w->body);
    if (!w->c) { /* the connection went away meanwhile */
        srv_genreq_free(w->r);
        free(w);
        return;
    }
    srv_server *s = w->c->s;
    conn_resume(w->c); /* the access handler continues (tok_continue) */
    http_run(s);
}

/* The access handler after the tokenization finished. */
static enum MHD_Result tok_continue(srv_conn *c)
{
    tok_work *w = c->tok;
    if (!w->done) {
        /* resumed by the disconnect watch: the client left */
        return MHD_NO;
    }
    c->tok = NULL;
    srv_genreq *r = w->r;
    int rc = w->rc;
    srv_error e = w->err;
    free(w);
    if (rc != 0) {
        srv_genreq_free(r); /* NULL after a failed parse */
        return queue_error(c, &e, 0, NULL);
    }
    if (c->s->draining) {
        srv_genreq_free(r);
        return fail(c, 503, "server_error", "shutting_down", "the server is shutting down", 5, NULL);
    }
    return submit_job(c, r);
}

/* Queues a validated, tokenized request: takes ownership of r. */
static enum MHD_Result submit_job(srv_conn *c, srv_genreq *r)
{
    srv_server *s = c->s;
    if (s->n_inflight >= s->cfg->max_seqs + s->cfg->max_queue) {
        srv_genreq_free(r);
        return fail(c, 429, "rate_limit_exceeded", "queue_full",
                    "the request queue is full; retry later", 1, NULL);
    }
    if (!r->has_seed) r->sp.seed = splitmix(&s->rng);
    srv_job *j = calloc(1, sizeof *j);
    if (!j) {
        srv_genreq_free(r);
        return fail(c, 500, "server_error", NULL, "out of memory", 0, NULL);
    }
    j->id = ++s->next_id;
    j->req = r;
    j->t_arrival = c->t0;
    atomic_init(&j->cancel, SRV_CANCEL_NONE);
    j->refs = 2;
    j->conn = c;
    j->created = (long)time(NULL);
    snprintf(j->cid, sizeof j->cid, "%s-%016llx%06llx", r->chat ? "chatcmpl" : "cmpl",
             (unsigned long long)splitmix(&s->rng), (unsigned long long)(j->id & 0xffffff));
    j->next = s->jobs;
    if (s->jobs) s->jobs->prev = j;
    s->jobs = j;
    s->n_inflight++;
    c->job = j;
    srv_engine_submit(s->eng, j);
    if (r->stream) {
        struct MHD_Response *resp =
            MHD_create_response_from_callback(MHD_SIZE_UNKNOWN, 16384, sse_reader, c, NULL);
        if (!resp) return MHD_NO;
        MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, "text/event-stream");
        MHD_add_response_header(resp, MHD_HTTP_HEADER_CACHE_CONTROL, "no-cache");
        MHD_add_response_header(resp, "X-Request-Id", j->cid);
        enum MHD_Result rc = MHD_queue_response(c->mc, 200, resp);
        MHD_destroy_response(resp);
        if (rc == MHD_YES) c->status = 200;
        return rc;
    }
    conn_suspend(c);
    return MHD_YES;
}

/* A non-streaming job's connection was resumed. */
static enum MHD_Result respond_job(srv_conn *c)
{
    srv_job *j = c->job;
    if (!j->finished) {
        if (atomic_load(&j->cancel) == SRV_CANCEL_CLIENT) return MHD_NO;
        conn_suspend(c); /* spurious wake-up */
        return MHD_YES;
    }
    if (j->finish == SRV_FINISH_ERROR || j->finish == SRV_FINISH_CANCELLED)
        return queue_error(c, &j->error, 0, NULL);
    char *body = j->body;
    j->body = NULL;
    return queue_json(c, 200, body);
}

static ssize_t sse_reader(void *cls, uint64_t pos, char *buf, size_t max)
{
    srv_conn *c = cls;
    srv_job *j = c->job;
    if (!j) return MHD_CONTENT_READER_END_WITH_ERROR;
    size_t avail = j->sse.len - j->sse_off;
    if (avail) {
        size_t n = avail < max ? avail : max;
        memcpy(buf, j->sse.data + j->sse_off, n);
        j->sse_off += n;
        if (j->sse_off == j->sse.len) {
            srv_buf_reset(&j->sse);
            j->sse_off = 0;
        }
        return (ssize_t)n;
    }
    if (j->finished) return MHD_CONTENT_READER_END_OF_STREAM;
    if (atomic_load(&j->cancel) == SRV_CANCEL_CLIENT) return MHD_CONTENT_READER_END_WITH_ERROR;
    conn_suspend(c);
    return 0;
}

static int content_type_json(struct MHD_Connection *mc)
{
    const char *ct = MHD_lookup_connection_value(mc, MHD_HEADER_KIND, MHD_HTTP_HEADER_CONTENT_TYPE);
    if (!ct) return 0;
    size_t n = strcspn(ct, ";");
    while (n && ct[n - 1] == ' ') n--;
    return n == 16 && strncasecmp(ct, "application/json", 16) == 0;
}

static enum MHD_Result ahc(void *cls, struct MHD_Connection *mc, const char *url, const char *method,
                           const char *version, const char *upload_data, size_t *upload_data_size,
                           void **con_cls)
{
    srv_server *s = cls;
    srv_conn *c = *con_cls;
    int gen;
    if (!c) {
        if (!(c = calloc(1, sizeof *c))) return MHD_NO;
        c->mc = mc;
        c->s = s;
        c->t0 = srv_now();
        c->route = route_of(url);
        snprintf(c->method, sizeof c->method, "%s", method);
        snprintf(c->path, sizeof c->path, "%s", url);
        c->next = s->conns;
        if (s->conns) s->conns->prev = c;
        s->conns = c;
        *con_cls = c;
        c->is_post = strcmp(method, "POST") == 0 || strcmp(method, "PUT") == 0 ||
                     strcmp(method, "PATCH") == 0;
        /* Without a body, answer on the second call: a response queued on the
         * first call is "early" and MHD then closes the connection instead
         * of keeping it alive. */
        if (!c->is_post) return MHD_YES;
        /* With a body, refuse early what the body cannot change; MHD then
         * closes the connection without reading the body, which is right. */
        gen = c->route == SRV_ROUTE_COMPLETIONS || c->route == SRV_ROUTE_CHAT;
        if (c->route == SRV_ROUTE_OTHER)
            return fail(c, 404, "invalid_request_error", "not_found", "no such route", 0, NULL);
        if (!gen || strcmp(method, "POST") != 0)
            return fail(c, 405, "invalid_request_error", "method_not_allowed",
                        gen ? "use POST" : "use GET", 0, gen ? "POST" : "GET, HEAD");
        if (!authorized(s, mc))
            return fail(c, 401, "invalid_request_error", "invalid_api_key",
                        "missing or invalid API key (Authorization: Bearer ...)", 0, NULL);
        if (!content_type_json(mc))
            return fail(c, 415, "invalid_request_error", "unsupported_media_type",
                        "Content-Type must be application/json", 0, NULL);
        const char *cl = MHD_lookup_connection_value(mc, MHD_HEADER_KIND, MHD_HTTP_HEADER_CONTENT_LENGTH);
        if (cl && strtoull(cl, NULL, 10) > (unsigned long long)s->cfg->max_body_kb * 1024) {
            c->too_big = 1;
            return handle_generate(c);
        }
        return MHD_YES;
    }
    if (c->status) return MHD_YES; /* a response is already queued */
    if (!c->is_post) {
        if (*upload_data_size) { /* a body on GET/HEAD/DELETE...: ignore it */
            *upload_data_size = 0;
            return MHD_YES;
        }
        gen = c->route == SRV_ROUTE_COMPLETIONS || c->route == SRV_ROUTE_CHAT;
        if (c->route == SRV_ROUTE_OTHER)
            return fail(c, 404, "invalid_request_error", "not_found", "no such route", 0, NULL);
        if (gen)
            return fail(c, 405, "invalid_request_error", "method_not_allowed", "use POST", 0, "POST");
        if (strcmp(method, "GET") != 0 && strcmp(method, "HEAD") != 0)
            return fail(c, 405, "invalid_request_error", "method_not_allowed", "use GET", 0, "GET, HEAD");
        if (c->route == SRV_ROUTE_MODELS && !authorized(s, mc))
            return fail(c, 401, "invalid_request_error", "invalid_api_key",
                        "missing or invalid API key (Authorization: Bearer ...)", 0, NULL);
        return handle_get(c, url);
    }
    if (c->job) return respond_job(c);
    if (c->tok) return tok_continue(c);
    if (*upload_data_size) {
        if (!c->too_big) {
            if (c->body.len + *upload_data_size > (size_t)s->cfg->max_body_kb * 1024) {
                c->too_big = 1;
                srv_buf_free(&c->body);
            } else if (srv_buf_append(&c->body, upload_data, *upload_data_size) != 0) {
                return MHD_NO;
            }
        }
        *upload_data_size = 0;
        return MHD_YES;
    }
    return handle_generate(c);
}

static void on_completed(void *cls, struct MHD_Connection *mc, void **con_cls,
                         enum MHD_RequestTerminationCode toe)
{
    srv_server *s = cls;
    srv_conn *c = *con_cls;
    if (!c) return;
    watch_stop(c);
    srv_job *j = c->job;
    int status = c->status;
    if (toe != MHD_REQUEST_TERMINATED_COMPLETED_OK && (!j || !j->finished || j->sse.len > j->sse_off))
        status = 499; /* client closed (nginx's convention) */
    srv_metrics_request(s->met, c->route, status);
    if (s->cfg->log_requests) {
        char extra[256] = "";
        if (j)
            snprintf(extra, sizeof extra, " id=%s prompt_tokens=%d completion_tokens=%d "
                     "cached_tokens=%d stream=%d ttft_ms=%.2f", j->cid, j->usage.prompt_tokens,
                     j->usage.completion_tokens, j->usage.cached_tokens, j->req->stream,
                     j->t_first > 0 ? (j->t_first - j->t_arrival) * 1e3 : -1.0);
        char q[80];
        srv_log("info", "request", " method=%s path=%s status=%d dur_ms=%.2f%s", c->method,
                srv_log_quote(c->path, q, sizeof q), status, (srv_now() - c->t0) * 1e3, extra);
    }
    if (c->tok) {
        if (c->tok->done) { /* finished but never picked up */
            srv_genreq_free(c->tok->r);
            free(c->tok);
        } else {
            c->tok->c = NULL; /* tok_work_done frees it */
        }
        c->tok = NULL;
    }
    if (j) {
        j->conn = NULL;
        if (!j->finished) {
            int expect = SRV_CANCEL_NONE;
            atomic_compare_exchange_strong(&j->cancel, &expect, SRV_CANCEL_CLIENT);
            srv_engine_wake(s->eng);
        }
        job_unref(j);
    }
    if (c->prev) c->prev->next = c->next;
    else s->conns = c->next;
    if (c->next) c->next->prev = c->prev;
    srv_buf_free(&c->body);
    free(c);
    *con_cls = NULL;
}

/* ---- MHD under libuv -------------------------------------------------------------- */

static void on_mhd_timer(uv_timer_t *t)
{
    http_run(t->data);
}

static void http_run(srv_server *s)
{
    if (!s->d || s->in_mhd) return;
    s->in_mhd = 1;
    MHD_run(s->d);
    s->in_mhd = 0;
    MHD_UNSIGNED_LONG_LONG to;
    if (MHD_get_timeout(s->d, &to) == MHD_YES)
        uv_timer_start(&s->mhd_timer, on_mhd_timer, to, 0);
    else
        uv_timer_stop(&s->mhd_timer);
}

static void on_mhd_poll(uv_poll_t *h, int status, int events)
{
    http_run(h->data);
}

static void mhd_log(void *cls, const char *fmt, va_list ap)
{
    char msg[512];
    vsnprintf(msg, sizeof msg, fmt, ap);
    size_t n = strlen(msg);
    while (n && (msg[n - 1] == '\n' || msg[n - 1] == '\r')) msg[--n] = '\0';
    char q[600];
    srv_log("warn", "mhd", " msg=%s", srv_log_quote(msg, q, sizeof q));
}

/* ---- lifecycle ---------------------------------------------------------------- */

static void close_cb(uv_handle_t *h)
{
    (void)h;
}

static void finish_shutdown(srv_server *s)
{
    if (s->stopping) return;
    s->stopping = 1;
    for (srv_conn *c = s->conns; c; c = c->next) conn_resume(c);
    if (s->d) {
        http_run(s);
        uv_poll_stop(&s->mhd_poll);
        MHD_stop_daemon(s->d); /* calls on_completed for every connection left */
        s->d = NULL;
    }
    /* The engine thread must be gone before the async handle closes. */
    srv_engine_stop(s->eng);
    s->eng = NULL;
    srv_log("info", "shutdown", " exit_code=%d", s->exit_code);
    uv_close((uv_handle_t *)&s->mhd_poll, close_cb);
    uv_close((uv_handle_t *)&s->mhd_timer, close_cb);
    uv_close((uv_handle_t *)&s->sweep, close_cb);
    uv_close((uv_handle_t *)&s->progress, close_cb);
    uv_close((uv_handle_t *)&s->watchdog, close_cb);
    uv_close((uv_handle_t *)&s->sigterm, close_cb);
    uv_close((uv_handle_t *)&s->sigint, close_cb);
    uv_close((uv_handle_t *)&s->sigpipe, close_cb);
    uv_close((uv_handle_t *)&s->sighup, close_cb);
    uv_close((uv_handle_t *)&s->async, close_cb);
}

/* Stops accepting; running requests get deadline_s seconds to finish. */
static void begin_shutdown(srv_server *s, const char *why, int deadline_s)
{
    if (s->draining) return;
    s->draining = 1;
    s->drain_deadline = srv_now() + deadline_s;
    notify("STOPPING=1\nSTATUS=draining");
    srv_log("info", "draining", " reason=%s inflight=%d deadline_s=%d", why, s->n_inflight, deadline_s);
    if (s->d) {
        MHD_socket fd = MHD_quiesce_daemon(s->d);
        if (fd != MHD_INVALID_SOCKET) close(fd);
    }
    uv_timer_set_repeat(&s->sweep, 50);
    uv_timer_again(&s->sweep);
}

static void on_signal(uv_signal_t *h, int signum)
{
    srv_server *s = h->data;
    if (signum == SIGPIPE) return;
    if (signum == SIGHUP) {
        reload_keys(s);
        return;
    }
    if (s->draining) {
        srv_log("warn", "signal", " signal=%d action=cancel_all", signum);
        s->drain_deadline = 0;
        return;
    }
    begin_shutdown(s, signum == SIGTERM ? "SIGTERM" : "SIGINT", s->cfg->shutdown_timeout_s);
}

static void on_sweep(uv_timer_t *t)
{
    srv_server *s = t->data;
    double now = srv_now();
    for (srv_job *j = s->jobs; j; j = j->next) {
        if (j->finished) continue;
        int reason = SRV_CANCEL_NONE;
        if (s->draining && now >= s->drain_deadline) reason = SRV_CANCEL_SHUTDOWN;
        else if (now - j->t_arrival > s->cfg->request_timeout_s) reason = SRV_CANCEL_TIMEOUT;
        if (reason) {
            int expect = SRV_CANCEL_NONE;
            if (atomic_compare_exchange_strong(&j->cancel, &expect, reason)) srv_engine_wake(s->eng);
        }
    }
    if (s->draining && s->n_inflight == 0 && s->n_tok == 0) {
        /* let the last bytes of finished streams go out first */
        int pending = 0;
        for (srv_conn *c = s->conns; c; c = c->next)
            if (c->job && c->job->sse.len > c->job->sse_off) pending = 1;
        if (!pending || now >= s->drain_deadline + 2) finish_shutdown(s);
    }
}

static void on_progress(uv_timer_t *t)
{
    srv_server *s = t->data;
    srv_log("info", "model_loading", " dir=%s elapsed_s=%.1f", s->cfg->model, srv_now() - s->t_start);
}

#ifdef HAVE_SYSTEMD
static void on_watchdog(uv_timer_t *t)
{
    (void)t;
    sd_notify(0, "WATCHDOG=1");
}
#endif

/* Creates the listening socket ourselves: full control over the address
 * family and errors, and the bound port for --port 0. */
static int listen_on(const char *host, int port, int *out_port, int *v6)
{
    struct addrinfo hints = { 0 }, *ai = NULL;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
    char ps[16];
    snprintf(ps, sizeof ps, "%d", port);
    int rc = getaddrinfo(host, ps, &hints, &ai);
    if (rc != 0) {
        srv_log("error", "listen_failed", " host=%s port=%d error=\"%s\"", host, port, gai_strerror(rc));
        return -1;
    }
    int fd = -1, err = 0;
    for (struct addrinfo *a = ai; a; a = a->ai_next) {
        fd = socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK, a->ai_protocol);
        if (fd < 0) { err = errno; continue; }
        int one = 1;
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        if (bind(fd, a->ai_addr, a->ai_addrlen) == 0 && listen(fd, 1024) == 0) {
            *v6 = a->ai_family == AF_INET6;
            break;
        }
        err = errno;
        close(fd);
        fd = -1;
    }
    freeaddrinfo(ai);
    if (fd < 0) {
        srv_log("error", "listen_failed", " host=%s port=%d error=\"%s\"", host, port, strerror(err));
        return -1;
    }
    struct sockaddr_storage ss;
    socklen_t sl = sizeof ss;
    *out_port = port;
    if (getsockname(fd, (struct sockaddr *)&ss, &sl) == 0) {
        if (ss.ss_family == AF_INET) *out_port = ntohs(((struct sockaddr_in *)&ss)->sin_port);
        else if (ss.ss_family == AF_INET6) *out_port = ntohs(((struct sockaddr_in6 *)&ss)->sin6_port);
    }
    return fd;
}

static int load_keys(srv_server *s);

/* SIGHUP: re-read the keys; on failure the old keys stay in force. */
static void reload_keys(srv_server *s)
{
    const char **keys = s->keys;
    char *buf = s->keys_buf;
    int n = s->n_keys;
    s->keys = NULL;
    s->keys_buf = NULL;
    s->n_keys = 0;
    if (load_keys(s) != 0) {
        free(s->keys);
        free(s->keys_buf);
        s->keys = keys;
        s->keys_buf = buf;
        s->n_keys = n;
        srv_log("error", "keys_reload_failed", " keys=%d", n);
        return;
    }
    free(keys);
    free(buf);
    srv_log("info", "keys_reloaded", " keys=%d", s->n_keys);
}

static int load_keys(srv_server *s)
{
    srv_buf b = { 0 };
    if (s->cfg->api_keys && *s->cfg->api_keys) {
        srv_buf_puts(&b, s->cfg->api_keys);
        srv_buf_puts(&b, "\n");
    }
    if (s->cfg->api_keys_file && *s->cfg->api_keys_file) {
        FILE *f = fopen(s->cfg->api_keys_file, "r");
        if (!f) {
            srv_log("error", "config", " option=api_keys_file path=%s error=\"%s\"",
                    s->cfg->api_keys_file, strerror(errno));
            srv_buf_free(&b);
            return -1;
        }
        /* One key per line (or several, split as below); '#' starts a
         * comment anywhere on a line.  getline: a long line stays one line. */
        char *line = NULL;
        size_t cap_line = 0;
        ssize_t n;
        while ((n = getline(&line, &cap_line, f)) >= 0) {
            char *hash = memchr(line, '#', (size_t)n);
            if (hash) *hash = '\0';
            srv_buf_puts(&b, line);
            srv_buf_puts(&b, "\n");
        }
        free(line);
        fclose(f);
    }
    /* split on commas, whitespace and newlines */
    int cap = 0;
    for (size_t i = 0; i < b.len; i++) cap += strchr(", \t\r\n", b.data[i]) != NULL;
    s->keys = calloc((size_t)cap + 1, sizeof *s->keys);
    s->keys_buf = b.data;
    if (!s->keys) return -1;
    char *save = NULL;
    for (char *t = b.data ? strtok_r(b.data, ", \t\r\n", &save) : NULL; t;
         t = strtok_r(NULL, ", \t\r\n", &save))
        s->keys[s->n_keys++] = t;
    /* A keys file that yields no key must not turn authentication off (an
     * empty file mid-rotation, say): refuse it, so that startup fails or a
     * reload keeps the old keys. */
    if (s->n_keys == 0 && s->cfg->api_keys_file && *s->cfg->api_keys_file) {
        srv_log("error", "config", " option=api_keys_file path=%s error=\"the file holds no key\"",
                s->cfg->api_keys_file);
        return -1;
    }
    return 0;
}

int srv_run(const srv_config *cfg)
{
    srv_server srv, *s = &srv;
    memset(s, 0, sizeof *s);
    s->cfg = cfg;
    s->t_start = srv_now();
    s->created_at = (long)time(NULL);
    pthread_mutex_init(&s->out_mu, NULL);
    {
        FILE *f = fopen("/dev/urandom", "rb");
        if (!f || fread(&s->rng, sizeof s->rng, 1, f) != 1) s->rng = (uint64_t)time(NULL) ^ (uint64_t)getpid();
        if (f) fclose(f);
    }
    if (cfg->model_name && *cfg->model_name) {
        snprintf(s->model_name, sizeof s->model_name, "%s", cfg->model_name);
    } else {
        size_t n = strlen(cfg->model);
        while (n > 1 && cfg->model[n - 1] == '/') n--;
        size_t b = n;
        while (b > 0 && cfg->model[b - 1] != '/') b--;
        snprintf(s->model_name, sizeof s->model_name, "%.*s", (int)(n - b), cfg->model + b);
    }
    s->md.name = s->model_name;
    s->md.codec = NULL; /* set from the engine's tokenizer when the model is ready */
    s->md.default_max_tokens = cfg->default_max_tokens;
    /* The backend: a CUDA request on a host where CUDA cannot run is refused
     * here, before the port is bound and the model read, with a message
     * that says where to look.  (eng_create would refuse it too.) */
    int backend;
    const char *bname = cfg->backend && *cfg->backend ? cfg->backend : "auto";
    if (srv_config_backend(cfg, &backend) != ENG_OK) {
        srv_log("error", "config", " option=backend value=%s error=\"unknown backend (auto, cpu, cuda)\"",
                bname);
        return 2;
    }
    if (!eng_backend_available(backend)) {
        srv_log("error", "config", " option=backend value=%s error=\"no usable CUDA device: this mkad "
                "was built without CUDA, or no GPU answers (driver loaded? /dev/nvidia* present and "
                "allowed to the service?); use backend = auto or cpu to run on the CPU\"", bname);
        return 1;
    }
    if (load_keys(s) != 0) return 1;
    if (cfg->state_dir && *cfg->state_dir) {
        if (mkdir(cfg->state_dir, 0750) != 0 && errno != EEXIST) {
            srv_log("error", "config", " option=state_dir path=%s error=\"%s\"", cfg->state_dir,
                    strerror(errno));
            return 1;
        }
        if (access(cfg->state_dir, W_OK) != 0) {
            srv_log("error", "config", " option=state_dir path=%s error=\"not writable\"", cfg->state_dir);
            return 1;
        }
    }
    if (!(s->met = srv_metrics_create())) return 1;

    int port = 0, v6 = 0;
    int lfd = listen_on(cfg->host, cfg->port, &port, &v6);
    if (lfd < 0) {
        srv_metrics_free(s->met);
        return 1;
    }
    unsigned flags = MHD_USE_EPOLL | MHD_ALLOW_SUSPEND_RESUME | MHD_USE_ERROR_LOG;
    if (v6) flags |= MHD_USE_IPv6;
    s->d = MHD_start_daemon(flags, 0, NULL, NULL, ahc, s,
                            MHD_OPTION_EXTERNAL_LOGGER, mhd_log, s,
                            MHD_OPTION_LISTEN_SOCKET, (MHD_socket)lfd,
                            MHD_OPTION_NOTIFY_COMPLETED, on_completed, s,
                            MHD_OPTION_CONNECTION_TIMEOUT, (unsigned int)cfg->http_timeout_s,
                            MHD_OPTION_CONNECTION_LIMIT, (unsigned int)cfg->max_connections,
                            MHD_OPTION_END);
    if (!s->d) {
        srv_log("error", "listen_failed", " host=%s port=%d error=\"MHD_start_daemon failed\"", cfg->host, port);
        close(lfd);
        srv_metrics_free(s->met);
        return 1;
    }
    const union MHD_DaemonInfo *di = MHD_get_daemon_info(s->d, MHD_DAEMON_INFO_EPOLL_FD);

    s->loop = uv_default_loop();
    uv_poll_init(s->loop, &s->mhd_poll, di->epoll_fd);
    s->mhd_poll.data = s;
    uv_poll_start(&s->mhd_poll, UV_READABLE, on_mhd_poll);
    uv_timer_init(s->loop, &s->mhd_timer);
    s->mhd_timer.data = s;
    uv_timer_init(s->loop, &s->sweep);
    s->sweep.data = s;
    uv_timer_start(&s->sweep, on_sweep, 1000, 1000);
    uv_timer_init(s->loop, &s->progress);
    s->progress.data = s;
    uv_timer_start(&s->progress, on_progress, 1000, 1000);
    uv_timer_init(s->loop, &s->watchdog);
    s->watchdog.data = s;
#ifdef HAVE_SYSTEMD
    uint64_t wd_usec = 0;
    if (sd_watchdog_enabled(0, &wd_usec) > 0 && wd_usec > 0)
        uv_timer_start(&s->watchdog, on_watchdog, wd_usec / 2000, wd_usec / 2000);
#endif
    uv_async_init(s->loop, &s->async, on_async);
    s->async.data = s;
    uv_signal_init(s->loop, &s->sigterm);
    s->sigterm.data = s;
    uv_signal_start(&s->sigterm, on_signal, SIGTERM);
    uv_signal_init(s->loop, &s->sigint);
    s->sigint.data = s;
    uv_signal_start(&s->sigint, on_signal, SIGINT);
    uv_signal_init(s->loop, &s->sigpipe);
    s->sigpipe.data = s;
    uv_signal_start(&s->sigpipe, on_signal, SIGPIPE);
    uv_signal_init(s->loop, &s->sighup);
    s->sighup.data = s;
    uv_signal_start(&s->sighup, on_signal, SIGHUP);

    srv_log("info", "listening", " host=%s port=%d model=%s keys=%d", cfg->host, port,
            s->model_name, s->n_keys);
    notify("STATUS=loading model");
    if (srv_engine_start(cfg, s->met, post_events, s, &s->eng) != 0) {
        srv_log("error", "engine_start_failed", "%s", "");
        s->exit_code = 1;
        begin_shutdown(s, "engine_start_failed", s->cfg->shutdown_timeout_s);
        finish_shutdown(s);
    }
    http_run(s);
    uv_run(s->loop, UV_RUN_DEFAULT);

    srv_engine_stop(s->eng);
    /* Jobs the engine never answered (only after a failed start). */
    while (s->jobs) {
        srv_job *j = s->jobs;
        s->jobs = j->next;
        j->refs = 1;
        job_unref(j);
    }
    uv_loop_close(s->loop);
    for (int i = 0; i < s->n_out; i++) free(s->out[i].lp);
    free(s->out);
    free(s->out2);
    free(s->keys);
    free(s->keys_buf);
    srv_metrics_free(s->met);
    pthread_mutex_destroy(&s->out_mu);
    return s->exit_code;
}
