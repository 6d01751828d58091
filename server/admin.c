/*
 * admin.c — the /admin routes: inspect and evict the memory tiers.
 *
 *   GET    /admin/memory                       totals per tier
 *   GET    /admin/sessions?user=&after=&limit= stored sessions, paginated
 *   GET    /admin/sessions/{id}?user=          one session: tokens, blocks per tier
 *   DELETE /admin/sessions/{id}?user=&tier=    evict from hbm|host|disk, or all (default)
 *   GET    /admin/users/{user}/longterm        a user's long-term chunks
 *   DELETE /admin/users/{user}/longterm        delete them
 *   POST   /admin/compact                      collect unreferenced blocks, compact RocksDB
 *
 * srv_admin_run runs on libuv's thread pool (RocksDB reads block; the
 * engine thread's answers about resident sessions are waited for), never on
 * the loop.  Access control (an admin key, or loopback without keys) is the
 * caller's (http.c).  Tiers are named as the design names them: hbm (the
 * engine's block pool, GPU or host memory), host (the warm tier), disk.
 */
#include "config.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "memstore.h"
#include "srv_internal.h"

#define LIST_MAX 1000 /* sessions per page at most */

static int bad(srv_error *e, int status, const char *code, const char *msg)
{
    srv_error_set(e, status, status == 404 ? "not_found_error" : "invalid_request_error", NULL, code, "%s", msg);
    return -1;
}

static int store_err(srv_error *e, int rc, const char *err)
{
    if (rc == MS_ENOTFOUND) return bad(e, 404, "not_found", "no such session");
    srv_error_set(e, rc == MS_ENOMEM ? 503 : 500, "server_error", NULL, NULL, "session store: %s", err);
    return -1;
}

/* The JSON text of v (taken over), or an error. */
static int emit(json_t *v, char **out, srv_error *e)
{
    *out = v ? json_dumps(v, JSON_COMPACT) : NULL;
    json_decref(v);
    if (!*out) {
        srv_error_set(e, 503, "server_error", NULL, NULL, "out of memory");
        return -1;
    }
    return 0;
}

static int memory(const srv_admin_req *q, ms_store *ms, char **out, srv_error *e)
{
    srv_sess_op op = { .op = SRV_SESS_INFO };
    srv_engine_session_op(q->eng, &op);
    json_t *hbm = json_pack("{s:i,s:i,s:i}", "sessions", op.n_resident, "blocks_used", op.blocks_used,
                            "blocks_total", op.blocks_total);
    json_t *root = json_pack("{s:{s:o*}}", "tiers", "hbm", hbm);
    if (ms) {
        char err[256];
        ms_stats st;
        int rc = ms_get_stats(ms, &st, err, sizeof err);
        if (rc != MS_OK) {
            json_decref(root);
            return store_err(e, rc, err);
        }
        long reads = st.warm_hits + st.disk_hits + st.misses;
        json_t *tiers = json_object_get(root, "tiers");
        if (tiers) {
            json_object_set_new(tiers, "host",
                                json_pack("{s:I,s:I,s:I,s:I,s:I}", "bytes", (json_int_t)st.warm_bytes,
                                          "budget_bytes", (json_int_t)st.warm_budget, "blocks",
                                          (json_int_t)st.warm_blocks, "hits", (json_int_t)st.warm_hits,
                                          "evictions", (json_int_t)st.warm_evictions));
            json_object_set_new(tiers, "disk",
                                json_pack("{s:I,s:I,s:I,s:I,s:I,s:I,s:I}", "sessions", (json_int_t)st.sessions,
                                          "blocks", (json_int_t)st.blocks, "bytes",
                                          (json_int_t)(st.sessions_bytes + st.blocks_bytes),
                                          "disk_bytes", (json_int_t)st.disk_bytes, "hits",
                                          (json_int_t)st.disk_hits, "misses", (json_int_t)st.misses,
                                          "longterm_chunks", (json_int_t)st.chunks));
        }
        json_object_set_new(root, "hit_rate",
                            reads ? json_real((double)(st.warm_hits + st.disk_hits) / (double)reads) : json_null());
        json_object_set_new(root, "corrupt_values_dropped", json_integer(st.corrupt_dropped));
    }
    return emit(root, out, e);
}

static json_t *session_json(const ms_session *s)
{
    return json_pack("{s:s,s:s,s:i,s:i,s:I,s:I}", "user", s->user, "id", s->id, "tokens", s->n_tokens,
                     "blocks", s->n_blocks, "created_ms", (json_int_t)s->created_ms, "last_used_ms",
                     (json_int_t)s->used_ms);
}

typedef struct page {
    json_t *data;
    int limit, more;
    char last_user[MS_MAX_NAME + 1], last_id[SRV_SESSION_ID_MAX + 1];
} page;

static int page_add(void *ctx, const ms_session *s)
{
    page *p = ctx;
    if ((int)json_array_size(p->data) == p->limit) {
        p->more = 1;
        return 1;
    }
    json_array_append_new(p->data, session_json(s));
    snprintf(p->last_user, sizeof p->last_user, "%s", s->user);
    snprintf(p->last_id, sizeof p->last_id, "%s", s->id);
    return 0;
}

static int list_sessions(const srv_admin_req *q, ms_store *ms, char **out, srv_error *e)
{
    if (!ms) return bad(e, 404, "no_session_store", "sessions are not stored: mkad runs without a state_dir");
    page p = { .data = json_array(), .limit = q->limit > 0 && q->limit <= LIST_MAX ? q->limit : 100 };
    if (!p.data) return emit(NULL, out, e);
    const char *user = q->user[0] ? q->user : NULL;
    const char *au = q->after[0] ? (q->after_user[0] ? q->after_user : user) : NULL;
    if (q->after[0] && !au) {
        json_decref(p.data);
        return bad(e, 400, "invalid_parameter", "'after' needs 'user' or 'after_user'");
    }
    char err[256];
    int rc = ms_session_list(ms, user, au, q->after[0] ? q->after : NULL, page_add, &p, err, sizeof err);
    if (rc != MS_OK) {
        json_decref(p.data);
        return rc == MS_EINVAL ? bad(e, 400, "invalid_parameter", "invalid user or pagination cursor")
                               : store_err(e, rc, err);
    }
    json_t *root = json_pack("{s:s,s:o,s:b}", "object", "list", "data", p.data, "has_more", p.more);
    if (root && p.more) {
        json_object_set_new(root, "next_after_user", json_string(p.last_user));
        json_object_set_new(root, "next_after", json_string(p.last_id));
    }
    return emit(root, out, e);
}

static int session_detail(const srv_admin_req *q, ms_store *ms, const char *id, char **out, srv_error *e)
{
    srv_sess_op op = { .op = SRV_SESS_INFO, .user = q->user, .id = id };
    srv_engine_session_op(q->eng, &op);
    ms_session *s = NULL;
    char err[256];
    int rc = ms ? ms_session_get(ms, q->user, id, &s, err, sizeof err) : MS_ENOTFOUND;
    if (rc != MS_OK && rc != MS_ENOTFOUND) return store_err(e, rc, err);
    if (!s && !op.found) return bad(e, 404, "not_found", "no such session");
    json_t *root = s ? session_json(s) : json_pack("{s:s,s:s}", "user", q->user, "id", id);
    json_t *tiers = json_object();
    if (root && tiers) {
        json_object_set_new(tiers, "hbm", op.found ? json_pack("{s:i,s:b}", "tokens", op.tokens, "busy", op.busy)
                                                   : json_null());
        json_object_set_new(tiers, "host", s ? json_pack("{s:i}", "blocks", ms_session_warm_blocks(ms, s))
                                              : json_null());
        json_object_set_new(tiers, "disk", s ? json_pack("{s:i,s:i}", "blocks", s->n_blocks, "tokens", s->n_tokens)
                                              : json_null());
        if (s) {
            json_t *bank = json_array();
            for (int i = 0; bank && i < s->n_bank; i++) { /* chunk ids as hex: they use all 64 bits */
                char hex[17];
                snprintf(hex, sizeof hex, "%016" PRIx64, s->bank[i]);
                json_array_append_new(bank, json_string(hex));
            }
            json_object_set_new(root, "l3_bank", bank);
        }
    }
    json_object_set_new(root, "tiers", tiers);
    ms_session_free(s);
    return emit(root, out, e);
}

static int session_delete(const srv_admin_req *q, ms_store *ms, const char *id, char **out, srv_error *e)
{
    int tiers = 0; /* 1 hbm, 2 host, 4 disk */
    if (!q->tier[0] || !strcmp(q->tier, "all")) tiers = 7;
    else if (!strcmp(q->tier, "hbm")) tiers = 1;
    else if (!strcmp(q->tier, "host")) tiers = 2;
    else if (!strcmp(q->tier, "disk")) tiers = 4;
    else return bad(e, 400, "invalid_parameter", "'tier' must be hbm, host, disk or all");
    json_t *done = json_array();
    int found = 0;
    if (tiers & 1) {
        srv_sess_op op = { .op = SRV_SESS_DROP, .user = q->user, .id = id };
        if (srv_engine_session_op(q->eng, &op)) {
            if (op.busy) {
                json_decref(done);
                return bad(e, 409, "session_busy", "the session is generating now; retry when its request ends");
            }
            found = 1;
            json_array_append_new(done, json_string("hbm"));
        }
    }
    if ((tiers & 6) && ms) {
        char err[256];
        int rc = ms_evict(ms, q->user, id, ((tiers & 2) ? MS_TIER_WARM : 0) | ((tiers & 4) ? MS_TIER_DISK : 0),
                          err, sizeof err);
        if (rc == MS_OK) {
            found = 1;
            if (tiers & 2) json_array_append_new(done, json_string("host"));
            if (tiers & 4) {
                json_array_append_new(done, json_string("disk"));
                long n;
                ms_gc(ms, &n, err, sizeof err); /* its blocks no other session shares */
            }
        } else if (rc != MS_ENOTFOUND) {
            json_decref(done);
            return store_err(e, rc, err);
        }
    }
    if (!found) {
        json_decref(done);
        return bad(e, 404, "not_found", "no such session");
    }
    srv_log("info", "admin_session_evicted", " user=%s session=%s tier=%s", q->user, id, q->tier[0] ? q->tier : "all");
    return emit(json_pack("{s:s,s:s,s:o}", "user", q->user, "id", id, "evicted", done), out, e);
}

typedef struct chunk_sum {
    long n;
    uint64_t bytes;
} chunk_sum;

static int chunk_add(void *ctx, uint64_t id, const void *data, size_t len)
{
    (void)id;
    (void)data;
    chunk_sum *c = ctx;
    c->n++;
    c->bytes += len;
    return 0;
}

static int longterm(const srv_admin_req *q, ms_store *ms, const char *user, char **out, srv_error *e)
{
    if (!srv_user_name_ok(user, strlen(user))) return bad(e, 400, "invalid_parameter", "invalid user name");
    if (!ms) return bad(e, 404, "no_session_store", "memory is not stored: mkad runs without a state_dir");
    char err[256];
    if (!strcmp(q->method, "DELETE")) {
        long n = 0;
        int rc = ms_chunk_delete_user(ms, user, &n, err, sizeof err);
        srv_store_longterm_deleted(srv_engine_store(q->eng), user);
        if (rc != MS_OK) return store_err(e, rc, err);
        srv_log("info", "admin_longterm_deleted", " user=%s chunks=%ld", user, n);
        return emit(json_pack("{s:s,s:I}", "user", user, "deleted_chunks", (json_int_t)n), out, e);
    }
    chunk_sum c = { 0 };
    int rc = ms_chunk_list(ms, user, chunk_add, &c, err, sizeof err);
    if (rc != MS_OK) return store_err(e, rc, err);
    return emit(json_pack("{s:s,s:I,s:I}", "user", user, "chunks", (json_int_t)c.n, "bytes", (json_int_t)c.bytes),
                out, e);
}

int srv_admin_run(const srv_admin_req *q, char **out, srv_error *e)
{
    *out = NULL;
    ms_store *ms = srv_store_ms(srv_engine_store(q->eng));
    const char *p = q->path + strlen("/admin/");
    const char *m = q->method;
    if (!strcmp(p, "memory")) {
        if (strcmp(m, "GET")) return bad(e, 405, "method_not_allowed", "use GET");
        return memory(q, ms, out, e);
    }
    if (!strcmp(p, "sessions")) {
        if (strcmp(m, "GET")) return bad(e, 405, "method_not_allowed", "use GET");
        return list_sessions(q, ms, out, e);
    }
    if (!strncmp(p, "sessions/", 9)) {
        const char *id = p + 9;
        if (!srv_session_id_ok(id, strlen(id))) return bad(e, 400, "invalid_parameter", "invalid session id");
        if (!q->user[0]) return bad(e, 400, "invalid_parameter", "'user' is required (the session's owner)");
        if (!strcmp(m, "GET")) return session_detail(q, ms, id, out, e);
        if (!strcmp(m, "DELETE")) return session_delete(q, ms, id, out, e);
        return bad(e, 405, "method_not_allowed", "use GET or DELETE");
    }
    if (!strncmp(p, "users/", 6)) {
        const char *u = p + 6, *slash = strchr(u, '/');
        if (slash && !strcmp(slash, "/longterm") && (!strcmp(m, "GET") || !strcmp(m, "DELETE"))) {
            char user[SRV_USER_MAX + 2];
            size_t n = (size_t)(slash - u);
            if (n >= sizeof user) return bad(e, 400, "invalid_parameter", "invalid user name");
            memcpy(user, u, n);
            user[n] = '\0';
            return longterm(q, ms, user, out, e);
        }
        return bad(e, 404, "not_found", "no such route (GET or DELETE /admin/users/{user}/longterm)");
    }
    if (!strcmp(p, "compact")) {
        if (strcmp(m, "POST")) return bad(e, 405, "method_not_allowed", "use POST");
        if (!ms) return bad(e, 404, "no_session_store", "mkad runs without a state_dir");
        char err[256];
        long n = 0;
        int rc = ms_gc(ms, &n, err, sizeof err);
        if (rc == MS_OK) rc = ms_compact(ms, err, sizeof err);
        if (rc != MS_OK) return store_err(e, rc, err);
        return emit(json_pack("{s:I}", "blocks_deleted", (json_int_t)n), out, e);
    }
    return bad(e, 404, "not_found", "no such admin route");
}
