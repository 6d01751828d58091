/*
 * http.c — libmicrohttpd under libuv, on the loop thread: MHD runs in
 * external event-loop mode (its epoll fd under a uv_poll_t, its timeout
 * under a uv_timer_t re-armed after every MHD_run).  Here: request
 * contexts, routing, body limits, the responses of every route, streaming
 * (SSE reader), suspending and resuming connections.
 *
 * Rules from shared/STACK-NOTES.md that this file relies on:
 *   - MHD_resume_connection only on this thread, exactly once per suspend;
 *     engine events arrive through uv_async_send and the async callback
 *     resumes;
 *   - while a connection is suspended its fd is watched with
 *     uv_poll(UV_DISCONNECT), the only timely way to see a client leave;
 *   - anything but MHD_REQUEST_TERMINATED_COMPLETED_OK means "cancelled";
 *   - suspended connections never time out in MHD: daemon.c's sweep timer
 *     enforces request_timeout; every suspended connection is resumed
 *     before MHD_stop_daemon.
 * Measured here too: a response queued on the access handler's first call
 * is "early" and MHD 0.9.75 then closes the connection (no keep-alive), so
 * body-less requests are answered on the second call; bodies over 16 KiB
 * are parsed and tokenized on the libuv thread pool (tens of ms for MBs).
 *
 * Ownership: a srv_conn lives from the first access-handler call to MHD's
 * completed callback.
 */
#include "config.h"

#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include "srv_internal.h"

/* ---- suspend, resume, the disconnect watch ------------------------------------ */

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
    srv_watch *w = calloc(1, sizeof *w);
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

void srv_conn_resume(srv_conn *c)
{
    if (!c->suspended) return;
    watch_stop(c);
    c->suspended = 0;
    MHD_resume_connection(c->mc);
}

/* The client closed the connection (or it failed) while suspended. */
static void on_watch(uv_poll_t *h, int status, int events)
{
    srv_watch *w = h->data;
    srv_conn *c = w->c;
    if (!c) return;
    srv_server *s = c->s;
    if (c->job && !c->job->finished) srv_job_cancel(s, c->job, SRV_CANCEL_CLIENT);
    srv_conn_resume(c); /* MHD reads the EOF and ends the connection */
    srv_http_run(s);
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
    if (c->close) MHD_add_response_header(r, MHD_HTTP_HEADER_CONNECTION, "close");
    enum MHD_Result rc = MHD_queue_response(c->mc, (unsigned)status, r);
    MHD_destroy_response(r);
    if (rc == MHD_YES) c->status = status;
    if (c->sock) c->sock->receiving = 0; /* answered: what else arrives is not waited for */
    return rc;
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

/* json: a body the caller built (taken over); NULL when building it ran out
 * of memory. */
static enum MHD_Result queue_json(srv_conn *c, int status, char *json)
{
    if (!json) return fail(c, 500, "server_error", NULL, "out of memory", 0, NULL);
    return queue_buf(c, status, "application/json", json, strlen(json), 0, NULL);
}

/* ---- request handling ------------------------------------------------------------ */

static int route_of(const char *url)
{
    if (strcmp(url, "/v1/completions") == 0) return SRV_ROUTE_COMPLETIONS;
    if (strcmp(url, "/v1/chat/completions") == 0) return SRV_ROUTE_CHAT;
    if (strcmp(url, "/v1/models") == 0 || strncmp(url, "/v1/models/", 11) == 0) return SRV_ROUTE_MODELS;
    if (strcmp(url, "/health") == 0) return SRV_ROUTE_HEALTH;
    if (strcmp(url, "/metrics") == 0) return SRV_ROUTE_METRICS;
    if (strcmp(url, "/tokenize") == 0) return SRV_ROUTE_TOKENIZE;
    if (strcmp(url, "/detokenize") == 0) return SRV_ROUTE_DETOKENIZE;
    if (strncmp(url, "/admin/", 7) == 0) return SRV_ROUTE_ADMIN;
    return SRV_ROUTE_OTHER;
}

static int is_post_route(int route)
{
    return route == SRV_ROUTE_COMPLETIONS || route == SRV_ROUTE_CHAT || route == SRV_ROUTE_TOKENIZE ||
           route == SRV_ROUTE_DETOKENIZE;
}

/* Is the peer on this host (127.0.0.0/8, ::1)? */
static int peer_loopback(struct MHD_Connection *mc)
{
    const union MHD_ConnectionInfo *ci = MHD_get_connection_info(mc, MHD_CONNECTION_INFO_CLIENT_ADDRESS);
    const struct sockaddr *sa = ci ? ci->client_addr : NULL;
    if (!sa) return 0;
    if (sa->sa_family == AF_INET)
        return (ntohl(((const struct sockaddr_in *)sa)->sin_addr.s_addr) >> 24) == 127;
    if (sa->sa_family == AF_INET6) {
        const struct in6_addr *a6 = &((const struct sockaddr_in6 *)sa)->sin6_addr;
        return IN6_IS_ADDR_LOOPBACK(a6) ||
               (IN6_IS_ADDR_V4MAPPED(a6) && a6->s6_addr[12] == 127);
    }
    return 0;
}

/* Checks the request's key and records who sent it in c->who. */
static int authorized(srv_conn *c)
{
    return srv_auth_check(c->s->auth,
                          MHD_lookup_connection_value(c->mc, MHD_HEADER_KIND, MHD_HTTP_HEADER_AUTHORIZATION),
                          peer_loopback(c->mc), &c->who);
}

static enum MHD_Result handle_get(srv_conn *c, const char *url)
{
    srv_server *s = c->s;
    srv_buf b = { 0 };
    switch (c->route) {
    case SRV_ROUTE_HEALTH: {
        const char *st = s->draining ? "draining" : s->ready ? "ok" : "loading";
        if (srv_buf_printf(&b, "{\"status\":\"%s\"}", st) != 0) break;
        return queue_buf(c, s->ready && !s->draining ? 200 : 503, "application/json", b.data,
                         b.len, s->ready ? 0 : 5, NULL);
    }
    case SRV_ROUTE_METRICS:
        srv_metrics_render(s->met, &b);
        srv_buf_printf(&b, "# HELP mkad_http_inflight_requests Generation requests in the engine.\n"
                           "# TYPE mkad_http_inflight_requests gauge\nmkad_http_inflight_requests %d\n"
                           "# HELP mkad_ready 1 once the model is loaded.\n# TYPE mkad_ready gauge\n"
                           "mkad_ready %d\n", s->n_inflight, s->ready);
        if (b.failed) break; /* never a partial scrape */
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
            char q[80];
            srv_utf8_clip(q, sizeof q, url + 11, strlen(url + 11));
            srv_error e;
            srv_error_set(&e, 404, "invalid_request_error", "model", "model_not_found",
                          "The model '%s' does not exist", q);
            return queue_error(c, &e, 0, NULL);
        }
        char *js = o ? json_dumps(o, JSON_COMPACT) : NULL;
        json_decref(o);
        return queue_json(c, 200, js);
    }
    default:
        return MHD_NO;
    }
    srv_buf_free(&b);
    return fail(c, 500, "server_error", NULL, "out of memory", 0, NULL);
}

static enum MHD_Result respond_job(srv_conn *c);
static ssize_t sse_reader(void *cls, uint64_t pos, char *buf, size_t max);

/* Request bodies above this size are parsed and tokenized on the libuv
 * thread pool (a 2 MB body takes tens of milliseconds to parse). */
#define SRV_PARSE_INLINE_MAX 16384

struct srv_parse_work {
    uv_work_t work;
    srv_admin_req *admin; /* an admin request instead of a body to parse */
    srv_conn *c;          /* NULL once the connection is gone */
    srv_server *s;
    srv_buf body;         /* the request body, moved from the connection */
    int route;
    char sid[1024];       /* X-Session-Id (validated by the parser) */
    int has_sid;
    srv_model_desc md;    /* a copy: the pool thread reads it */
    srv_genreq *r;        /* the result: a generation request, */
    char *out;            /* or a /tokenize, /detokenize body */
    srv_error err;
    int rc, done;
};

static void parse_work_run(uv_work_t *req);
static void parse_work_done(uv_work_t *req, int status);

/* Hands w to the thread pool (parse_work_run there, parse_work_done back on
 * the loop) with c suspended until then.  0, or -1 when libuv refuses: w and
 * what it owns are still the caller's. */
static int queue_parse_work(srv_server *s, srv_conn *c, srv_parse_work *w)
{
    w->c = c;
    w->s = s;
    w->work.data = w;
    if (uv_queue_work(s->loop, &w->work, parse_work_run, parse_work_done) != 0) return -1;
    c->parse = w;
    s->n_parse++;
    conn_suspend(c);
    return 0;
}
static enum MHD_Result parsed(srv_conn *c, int rc, srv_genreq *r, char *out, const srv_error *e);

/* The request body as a generation request (*r) or, for /tokenize and
 * /detokenize, the response body (*out).  Pure: runs inline or on the
 * thread pool. */
static int parse_body(int route, const char *body, size_t len, const srv_model_desc *md,
                      const char *sid, srv_genreq **r, char **out, srv_error *e)
{
    if (route == SRV_ROUTE_TOKENIZE || route == SRV_ROUTE_DETOKENIZE) {
        *out = route == SRV_ROUTE_TOKENIZE ? srv_tokenize(body, len, md, e)
                                           : srv_detokenize(body, len, md, e);
        return *out ? 0 : -1;
    }
    return srv_genreq_parse(body, len, route == SRV_ROUTE_CHAT, md, sid, r, e);
}

/* A POST route's body has fully arrived. */
static enum MHD_Result handle_post(srv_conn *c)
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
        srv_parse_work *w = calloc(1, sizeof *w);
        if (!w) return fail(c, 500, "server_error", NULL, "out of memory", 0, NULL);
        w->body = c->body; /* moved */
        memset(&c->body, 0, sizeof c->body);
        w->route = c->route;
        snprintf(w->sid, sizeof w->sid, "%s", sid ? sid : "");
        w->has_sid = sid != NULL;
        w->md = s->md;
        if (queue_parse_work(s, c, w) != 0) {
            srv_buf_free(&w->body);
            free(w);
            return fail(c, 500, "server_error", NULL, "cannot queue the request", 0, NULL);
        }
        return MHD_YES;
    }
    char *out = NULL;
    int rc = parse_body(c->route, c->body.data, c->body.len, &s->md, sid, &r, &out, &e);
    srv_buf_free(&c->body);
    return parsed(c, rc, r, out, &e);
}

/* Parsing on the thread pool: only the work item and the read-only codec
 * (through the copied model description) are touched there. */
static void parse_work_run(uv_work_t *req)
{
    srv_parse_work *w = req->data;
    if (w->admin) {
        w->rc = srv_admin_run(w->admin, &w->out, &w->err);
        return;
    }
    w->rc = parse_body(w->route, w->body.data, w->body.len, &w->md, w->has_sid ? w->sid : NULL,
                       &w->r, &w->out, &w->err);
}

static void parse_work_done(uv_work_t *req, int status)
{
    srv_parse_work *w = req->data;
    w->done = 1;
    w->s->n_parse--;
    if (status != 0 && w->rc == 0) {
        w->rc = -1;
        srv_error_set(&w->err, 503, "server_error", NULL, "shutting_down", "request parsing was cancelled");
    }
    srv_buf_free(&w->body);
    if (!w->c) { /* the connection went away meanwhile */
        srv_genreq_free(w->r);
        free(w->out);
        free(w->admin);
        free(w);
        return;
    }
    srv_server *s = w->c->s;
    srv_conn_resume(w->c); /* the access handler continues (parse_continue) */
    srv_http_run(s);
}

/* The access handler after the tokenization finished. */
static enum MHD_Result parse_continue(srv_conn *c)
{
    srv_parse_work *w = c->parse;
    if (!w->done) {
        /* resumed by the disconnect watch: the client left */
        return MHD_NO;
    }
    c->parse = NULL;
    enum MHD_Result res = parsed(c, w->rc, w->r, w->out, &w->err);
    free(w->admin);
    free(w);
    return res;
}

/* An /admin request: an admin key (or, without keys, a loopback client),
 * then the work on the thread pool (admin.c); the answer comes back
 * through parse_continue like a parsed body. */
static enum MHD_Result handle_admin(srv_conn *c, const char *url, const char *method)
{
    srv_server *s = c->s;
    if (!authorized(c))
        return fail(c, 401, "invalid_request_error", "invalid_api_key",
                    "missing or invalid API key (Authorization: Bearer ...)", 0, NULL);
    if (!c->who.admin)
        return fail(c, 403, "permission_error", "admin_required",
                    srv_auth_count(s->auth) ? "the admin routes need a key of a user in admin_users"
                                            : "without API keys the admin routes answer loopback clients only",
                    0, NULL);
    if (!s->ready) return fail(c, 503, "server_error", "model_loading", "the model is still loading", 5, NULL);
    if (strlen(url) >= sizeof ((srv_admin_req *)0)->path)
        return fail(c, 414, "invalid_request_error", "uri_too_long", "the admin path is too long", 0, NULL);
    srv_parse_work *w = calloc(1, sizeof *w);
    srv_admin_req *q = w ? calloc(1, sizeof *q) : NULL;
    if (!q) {
        free(w);
        return fail(c, 503, "server_error", NULL, "out of memory", 0, NULL);
    }
    snprintf(q->method, sizeof q->method, "%s", method);
    snprintf(q->path, sizeof q->path, "%s", url);
    static const struct { const char *name; size_t off, len; } args[] = {
        { "user", offsetof(srv_admin_req, user), sizeof q->user },
        { "tier", offsetof(srv_admin_req, tier), sizeof q->tier },
        { "after_user", offsetof(srv_admin_req, after_user), sizeof q->after_user },
        { "after", offsetof(srv_admin_req, after), sizeof q->after },
    };
    for (size_t i = 0; i < sizeof args / sizeof *args; i++) {
        const char *v = MHD_lookup_connection_value(c->mc, MHD_GET_ARGUMENT_KIND, args[i].name);
        if (v && strlen(v) >= args[i].len) {
            free(q);
            free(w);
            char msg[96];
            snprintf(msg, sizeof msg, "the '%s' parameter is too long", args[i].name);
            return fail(c, 400, "invalid_request_error", "invalid_parameter", msg, 0, NULL);
        }
        if (v) snprintf((char *)q + args[i].off, args[i].len, "%s", v);
    }
    const char *lim = MHD_lookup_connection_value(c->mc, MHD_GET_ARGUMENT_KIND, "limit");
    if (lim) {
        char *end;
        long v = strtol(lim, &end, 10);
        if (!*lim || *end || v < 1 || v > 1000) {
            free(q);
            free(w);
            return fail(c, 400, "invalid_request_error", "invalid_parameter",
                        "'limit' must be an integer in [1, 1000]", 0, NULL);
        }
        q->limit = (int)v;
    }
    q->eng = s->eng;
    w->admin = q;
    if (queue_parse_work(s, c, w) != 0) {
        free(q);
        free(w);
        return fail(c, 500, "server_error", NULL, "cannot queue the request", 0, NULL);
    }
    return MHD_YES;
}

static enum MHD_Result submit_job(srv_conn *c, srv_genreq *r);

/* Answers a parsed body: an error, a /tokenize or /detokenize body, or a
 * generation request for the engine.  Takes ownership of r and out. */
static enum MHD_Result parsed(srv_conn *c, int rc, srv_genreq *r, char *out, const srv_error *e)
{
    if (rc != 0) {
        srv_genreq_free(r); /* NULL after a failed parse */
        return queue_error(c, e, 0, NULL);
    }
    if (out) return queue_json(c, 200, out);
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
    srv_job *j = srv_job_start(s, c, r);
    if (!j) return fail(c, 500, "server_error", NULL, "out of memory", 0, NULL);
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
    if (j->sse_broken) return MHD_CONTENT_READER_END_WITH_ERROR;
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

/* ---- request framing (RFC 9112 §6.3) ----------------------------------------------- */

typedef struct framing {
    const char *cl, *te;   /* the first Content-Length, the last Transfer-Encoding */
    int cl_conflict, n_te, n_host;
} framing;

static enum MHD_Result scan_header(void *cls, enum MHD_ValueKind kind, const char *key,
                                   const char *value)
{
    framing *f = cls;
    if (!value) value = "";
    if (strcasecmp(key, MHD_HTTP_HEADER_CONTENT_LENGTH) == 0) {
        if (f->cl && strcmp(f->cl, value) != 0) f->cl_conflict = 1;
        f->cl = value;
    } else if (strcasecmp(key, MHD_HTTP_HEADER_TRANSFER_ENCODING) == 0) {
        f->te = value;
        f->n_te++;
    } else if (strcasecmp(key, MHD_HTTP_HEADER_HOST) == 0) {
        f->n_host++;
    }
    return MHD_YES;
}

/* 1 when [s, s+n) is "chunked" (ASCII case-insensitively) up to blanks. */
static int is_chunked(const char *s, size_t n)
{
    while (n && (*s == ' ' || *s == '\t')) { s++; n--; }
    while (n && (s[n - 1] == ' ' || s[n - 1] == '\t')) n--;
    return n == 7 && strncasecmp(s, "chunked", 7) == 0;
}

/* Checks how the request delimits its body before anything reads it.  A
 * request whose length a proxy in front could read differently (RFC 9112
 * §6.3: conflicting Content-Lengths, Transfer-Encoding with Content-Length,
 * a last transfer coding that is not chunked) could smuggle a second
 * request; it is answered 400 (501 for a coding we do not know before
 * "chunked") and the connection closed.  HTTP/1.1 needs exactly one Host
 * (RFC 9112 §3.2).  Returns 0 when the framing is sound. */
static int check_framing(struct MHD_Connection *mc, const char *version, srv_error *e)
{
    framing f = { 0 };
    MHD_get_connection_values(mc, MHD_HEADER_KIND, scan_header, &f);
    if (f.cl_conflict) {
        srv_error_set(e, 400, "invalid_request_error", NULL, "bad_framing",
                      "conflicting Content-Length headers");
    } else if (f.te && f.cl) {
        srv_error_set(e, 400, "invalid_request_error", NULL, "bad_framing",
                      "a request may not carry both Transfer-Encoding and Content-Length");
    } else if (f.te) {
        const char *last = strrchr(f.te, ',');
        last = last ? last + 1 : f.te;
        if (!is_chunked(last, strlen(last)))
            srv_error_set(e, 400, "invalid_request_error", NULL, "bad_framing",
                          "the last Transfer-Encoding must be chunked");
        else if (f.n_te > 1 || !is_chunked(f.te, strlen(f.te)))
            srv_error_set(e, 501, "invalid_request_error", NULL, "unsupported_transfer_coding",
                          "only the chunked transfer coding is supported");
        else
            return 0;
    } else if (strcmp(version, MHD_HTTP_VERSION_1_1) == 0 && f.n_host != 1) {
        srv_error_set(e, 400, "invalid_request_error", NULL, "bad_host",
                      "an HTTP/1.1 request needs exactly one Host header");
    } else {
        return 0;
    }
    return e->status;
}

static enum MHD_Result ahc(void *cls, struct MHD_Connection *mc, const char *url, const char *method,
                           const char *version, const char *upload_data, size_t *upload_data_size,
                           void **con_cls)
{
    srv_server *s = cls;
    srv_conn *c = *con_cls;
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
        const union MHD_ConnectionInfo *ci = MHD_get_connection_info(mc, MHD_CONNECTION_INFO_SOCKET_CONTEXT);
        if (ci && ci->socket_context) {
            c->sock = ci->socket_context;
            c->sock->in_request = 1;
        }
        srv_error fe;
        if (check_framing(mc, version, &fe) != 0) {
            /* answered before the body is read: MHD then closes the connection */
            c->close = 1;
            return queue_error(c, &fe, 0, NULL);
        }
        /* Without a body, answer on the second call: a response queued on the
         * first call is "early" and MHD then closes the connection instead
         * of keeping it alive.  Admin routes take no body (one sent is
         * read and ignored). */
        if (c->route == SRV_ROUTE_ADMIN) c->is_post = 0;
        if (!c->is_post) return MHD_YES;
        /* With a body, refuse early what the body cannot change; MHD then
         * closes the connection without reading the body, which is right. */
        int post_route = is_post_route(c->route);
        if (c->route == SRV_ROUTE_OTHER)
            return fail(c, 404, "invalid_request_error", "not_found", "no such route", 0, NULL);
        if (!post_route || strcmp(method, "POST") != 0)
            return fail(c, 405, "invalid_request_error", "method_not_allowed",
                        post_route ? "use POST" : "use GET", 0, post_route ? "POST" : "GET, HEAD");
        if (!authorized(c))
            return fail(c, 401, "invalid_request_error", "invalid_api_key",
                        "missing or invalid API key (Authorization: Bearer ...)", 0, NULL);
        if (!content_type_json(mc))
            return fail(c, 415, "invalid_request_error", "unsupported_media_type",
                        "Content-Type must be application/json", 0, NULL);
        const char *cl = MHD_lookup_connection_value(mc, MHD_HEADER_KIND, MHD_HTTP_HEADER_CONTENT_LENGTH);
        if (cl && strtoull(cl, NULL, 10) > (unsigned long long)s->cfg->max_body_kb * 1024) {
            c->too_big = 1;
            return handle_post(c);
        }
        return MHD_YES;
    }
    if (c->status) return MHD_YES; /* a response is already queued */
    if (*upload_data_size == 0 && c->sock) c->sock->receiving = 0; /* the whole request is here */
    if (c->parse) return parse_continue(c); /* a body parsed or an admin request run on the pool */
    if (!c->is_post) {
        if (*upload_data_size) { /* a body on GET/HEAD/DELETE...: ignore it */
            *upload_data_size = 0;
            return MHD_YES;
        }
        if (c->route == SRV_ROUTE_OTHER)
            return fail(c, 404, "invalid_request_error", "not_found", "no such route", 0, NULL);
        if (c->route == SRV_ROUTE_ADMIN) return handle_admin(c, url, method);
        if (is_post_route(c->route))
            return fail(c, 405, "invalid_request_error", "method_not_allowed", "use POST", 0, "POST");
        if (strcmp(method, "GET") != 0 && strcmp(method, "HEAD") != 0)
            return fail(c, 405, "invalid_request_error", "method_not_allowed", "use GET", 0, "GET, HEAD");
        if (c->route == SRV_ROUTE_MODELS && !authorized(c))
            return fail(c, 401, "invalid_request_error", "invalid_api_key",
                        "missing or invalid API key (Authorization: Bearer ...)", 0, NULL);
        return handle_get(c, url);
    }
    if (c->job) return respond_job(c);
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
    return handle_post(c);
}

static void on_completed(void *cls, struct MHD_Connection *mc, void **con_cls,
                         enum MHD_RequestTerminationCode toe)
{
    srv_server *s = cls;
    srv_conn *c = *con_cls;
    if (!c) return;
    if (c->sock) { /* a keep-alive connection now awaits its next request */
        c->sock->receiving = 1;
        c->sock->in_request = 0;
        c->sock->t_wait = srv_now();
    }
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
    if (c->parse) {
        if (c->parse->done) { /* finished but never picked up */
            srv_genreq_free(c->parse->r);
            free(c->parse);
        } else {
            c->parse->c = NULL; /* parse_work_done frees it */
        }
        c->parse = NULL;
    }
    if (j) {
        j->conn = NULL;
        if (!j->finished) srv_job_cancel(s, j, SRV_CANCEL_CLIENT);
        srv_job_unref(j);
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
    srv_http_run(t->data);
}

void srv_http_run(srv_server *s)
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
    srv_http_run(h->data);
}

/* libmicrohttpd 0.9.75 answers a Content-Length it cannot parse ("abc",
 * "-1", "69 ", more than 64 bits) itself, with an HTML page whose status
 * line and headers it sends twice (a bug fixed in 0.9.76), and never calls
 * the access handler for it.  It logs the failure while it parses the
 * headers, before it queues that answer, and at that moment the connection
 * is the only one with its headers received, no response queued and no
 * access-handler call: we write our JSON error to it and shut down its
 * sending side, so that MHD's answer fails to go out and MHD closes the
 * connection.  Should the message or the moment differ (another MHD), this
 * finds no connection and does nothing. */
static void answer_bad_content_length(srv_server *s, int status)
{
    srv_sock *hit = NULL;
    int n = 0;
    for (srv_sock *k = s->socks; k; k = k->next) {
        if (k->in_request || !MHD_get_connection_info(k->mc, MHD_CONNECTION_INFO_REQUEST_HEADER_SIZE) ||
            MHD_get_connection_info(k->mc, MHD_CONNECTION_INFO_HTTP_STATUS))
            continue;
        hit = k;
        n++;
    }
    const union MHD_ConnectionInfo *ci =
        n == 1 ? MHD_get_connection_info(hit->mc, MHD_CONNECTION_INFO_CONNECTION_FD) : NULL;
    if (!ci) return;
    srv_error e;
    srv_error_set(&e, status, "invalid_request_error", NULL, "bad_framing",
                  status == 413 ? "the Content-Length value is too large"
                                : "the Content-Length value is not a decimal number");
    char *js = srv_error_json(&e);
    srv_buf b = { 0 };
    if (js && srv_buf_printf(&b, "HTTP/1.1 %d %s\r\nContent-Type: application/json\r\n"
                             "Content-Length: %zu\r\nConnection: close\r\n\r\n%s", status,
                             status == 413 ? "Content Too Large" : "Bad Request", strlen(js), js) == 0) {
        ssize_t w = send(ci->connect_fd, b.data, b.len, MSG_NOSIGNAL);
        (void)w; /* a few hundred bytes into an idle socket; a short write only cuts the body */
    }
    shutdown(ci->connect_fd, SHUT_WR);
    free(js);
    srv_buf_free(&b);
    srv_metrics_request(s->met, SRV_ROUTE_OTHER, status);
}

/* Flushes the count of collapsed repeats of MHD's last message. */
static void mhd_log_flush(srv_server *s)
{
    if (s->mhd_repeats == 0) return;
    char q[300];
    srv_log("warn", "mhd", " msg=%s repeated=%d", srv_log_quote(s->mhd_last, q, sizeof q),
            s->mhd_repeats);
    s->mhd_repeats = 0;
}

/* MHD's messages as log lines; one message repeated within a second (1,000
 * connections refused by a limit) is collapsed into a count. */
static void mhd_log(void *cls, const char *fmt, va_list ap)
{
    srv_server *s = cls;
    char msg[512];
    vsnprintf(msg, sizeof msg, fmt, ap);
    size_t n = strlen(msg);
    while (n && (msg[n - 1] == '\n' || msg[n - 1] == '\r')) msg[--n] = '\0';
    if (strncmp(msg, "Failed to parse `Content-Length' header", 39) == 0)
        answer_bad_content_length(s, 400);
    else if (strncmp(msg, "Too large value of 'Content-Length' header", 42) == 0)
        answer_bad_content_length(s, 413);
    double now = srv_now();
    if (strncmp(msg, s->mhd_last, sizeof s->mhd_last - 1) == 0 && now - s->mhd_last_t < 1.0) {
        s->mhd_repeats++;
        return;
    }
    mhd_log_flush(s);
    snprintf(s->mhd_last, sizeof s->mhd_last, "%s", msg);
    s->mhd_last_t = now;
    char q[600];
    srv_log("warn", "mhd", " msg=%s", srv_log_quote(msg, q, sizeof q));
}

/* MHD_OPTION_NOTIFY_CONNECTION: every connection is tracked from accept to
 * close (the request_read_timeout deadline; answer_bad_content_length). */
static void on_connection(void *cls, struct MHD_Connection *mc, void **socket_context,
                          enum MHD_ConnectionNotificationCode toe)
{
    srv_server *s = cls;
    srv_sock *k = *socket_context;
    if (toe == MHD_CONNECTION_NOTIFY_STARTED) {
        if (!(k = calloc(1, sizeof *k))) return; /* untracked: only the idle timeout applies */
        k->mc = mc;
        k->t_wait = srv_now();
        k->receiving = 1;
        k->next = s->socks;
        if (s->socks) s->socks->prev = k;
        s->socks = k;
        *socket_context = k;
    } else if (k) {
        if (k->prev) k->prev->next = k->next;
        else s->socks = k->next;
        if (k->next) k->next->prev = k->prev;
        free(k);
        *socket_context = NULL;
    }
}

void srv_http_sweep(srv_server *s)
{
    double now = srv_now();
    int cut = 0;
    for (srv_sock *k = s->socks; k; k = k->next) {
        if (!k->receiving || now - k->t_wait <= s->cfg->request_read_timeout_s) continue;
        const union MHD_ConnectionInfo *ci = MHD_get_connection_info(k->mc, MHD_CONNECTION_INFO_CONNECTION_FD);
        /* MHD sees the end of the stream at its next read and closes the connection */
        if (ci) shutdown(ci->connect_fd, SHUT_RDWR);
        k->receiving = 0;
        srv_metrics_read_timeout(s->met);
        cut++;
    }
    if (cut) {
        srv_log("info", "request_read_timeout", " closed=%d timeout_s=%d", cut,
                s->cfg->request_read_timeout_s);
        srv_http_run(s);
    }
    if (s->mhd_repeats && now - s->mhd_last_t >= 1.0) mhd_log_flush(s);
}

/* ---- lifecycle (daemon.c calls these) ---------------------------------------- */

int srv_http_start(srv_server *s, int lfd, int v6)
{
    const srv_config *cfg = s->cfg;
    unsigned flags = MHD_USE_EPOLL | MHD_ALLOW_SUSPEND_RESUME | MHD_USE_ERROR_LOG;
    if (v6) flags |= MHD_USE_IPv6;
    s->d = MHD_start_daemon(flags, 0, NULL, NULL, ahc, s,
                            MHD_OPTION_EXTERNAL_LOGGER, mhd_log, s,
                            MHD_OPTION_LISTEN_SOCKET, (MHD_socket)lfd,
                            MHD_OPTION_NOTIFY_COMPLETED, on_completed, s,
                            MHD_OPTION_NOTIFY_CONNECTION, on_connection, s,
                            MHD_OPTION_CONNECTION_TIMEOUT, (unsigned int)cfg->http_timeout_s,
                            MHD_OPTION_CONNECTION_LIMIT, (unsigned int)cfg->max_connections,
                            MHD_OPTION_PER_IP_CONNECTION_LIMIT,
                            (unsigned int)cfg->max_connections_per_ip,
                            MHD_OPTION_END);
    if (!s->d) {
        close(lfd);
        return -1;
    }
    const union MHD_DaemonInfo *di = MHD_get_daemon_info(s->d, MHD_DAEMON_INFO_EPOLL_FD);
    uv_poll_init(s->loop, &s->mhd_poll, di->epoll_fd);
    s->mhd_poll.data = s;
    uv_poll_start(&s->mhd_poll, UV_READABLE, on_mhd_poll);
    uv_timer_init(s->loop, &s->mhd_timer);
    s->mhd_timer.data = s;
    return 0;
}

void srv_http_quiesce(srv_server *s)
{
    if (!s->d) return;
    MHD_socket fd = MHD_quiesce_daemon(s->d);
    if (fd != MHD_INVALID_SOCKET) close(fd);
}

static void close_cb(uv_handle_t *h)
{
    (void)h;
}

void srv_http_stop(srv_server *s)
{
    for (srv_conn *c = s->conns; c; c = c->next) srv_conn_resume(c);
    if (s->d) {
        srv_http_run(s);
        uv_poll_stop(&s->mhd_poll);
        MHD_stop_daemon(s->d); /* calls on_completed for every connection left */
        s->d = NULL;
    }
    uv_close((uv_handle_t *)&s->mhd_poll, close_cb);
    uv_close((uv_handle_t *)&s->mhd_timer, close_cb);
}
