/*
 * store.c — the session tier behind the scheduler: memstore/ (RocksDB + the
 * warm host-memory tier) driven by one worker thread, so that neither the
 * loop thread nor the engine thread ever waits for a disk.
 *
 * The engine thread hands it two kinds of work, served in FIFO order (so a
 * lookup always sees the writes queued before it):
 *   write   after a session's turn: the session record (all token ids) and
 *           the blocks that became full since the last write, exported by
 *           the engine thread into a host buffer that the task owns.  Written
 *           as one atomic batch.  With session_sync the batch is fsync'd and
 *           the job's FINAL event travels with the task: the response
 *           completes only once its turn is on stable storage, so a client
 *           never holds an answer whose session a crash could lose.
 *   lookup  a request on a session that is not resident: the stored record,
 *           the longest block-aligned common prefix with the prompt, and
 *           those blocks read from the fastest tier that holds them (warm,
 *           else disk).  The result goes back through the `loaded` callback
 *           (the engine's inbox).  A block that is missing or fails its
 *           checks ends the prefix there: the rest is recomputed.
 */
#include "config.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <time.h>

#include "memstore.h"
#include "srv_internal.h"

#define XXH_INLINE_ALL
#include <xxhash.h>

typedef struct task {
    int kind; /* TASK_WRITE, TASK_LOOKUP, TASK_CHUNK */
    char user[MS_MAX_NAME + 1], id[SRV_SESSION_ID_MAX + 1];
    int32_t *tokens; /* owned: the session's (write) or the prompt (lookup) */
    int n_tokens;
    int n_full;      /* write: full blocks the session holds */
    int first;       /* write: the first block in buf */
    void *buf;       /* write: blocks [first, n_full), owned */
    srv_loaded *res; /* lookup: the answer, allocated up front (job_id set) */
    srv_event final; /* write: the job's FINAL event, posted once the write is done */
    int has_final;
    uint64_t bank[SRV_MAX_BANK]; /* write: the session's L3 bank (chunk ids) */
    int n_bank;
    int chunk_index; /* chunk: its index in the session; buf holds emb (D) then mu (L, D) */
    struct task *next;
} task;

enum { TASK_WRITE, TASK_LOOKUP, TASK_CHUNK };

/* A long-term chunk as stored (memstore's envelope around it carries the
 * checksum): a header, the source session's id, e (D) and mu (L, D) f32. */
typedef struct chunk_hdr {
    uint32_t magic; /* CHUNK_MAGIC (v1) or CHUNK_MAGIC2 */
    uint32_t n_layers, d_model, index, sid_len;
} chunk_hdr;
#define CHUNK_MAGIC 0x314b4333u  /* "3CK1": chunk_hdr, then the rest */
#define CHUNK_MAGIC2 0x324b4333u /* "3CK2": chunk_hdr, then used_ms (int64, 8 bytes), then the rest */
#define CHUNK_HDR2 (sizeof(chunk_hdr) + sizeof(int64_t))

/* An in-flight session (srv_store_busy). */
typedef struct busy_ent {
    char user[MS_MAX_NAME + 1], id[SRV_SESSION_ID_MAX + 1];
    int n; /* admissions not yet ended */
    struct busy_ent *next;
} busy_ent;

/* A new session's L3 bank, chosen by a lookup, until the session's first
 * write stores it in its record: the chunk quota treats its chunks as bound
 * meanwhile.  Worker thread only. */
typedef struct bank_pin {
    char user[MS_MAX_NAME + 1], id[SRV_SESSION_ID_MAX + 1];
    uint64_t ids[SRV_MAX_BANK];
    int n;
    struct bank_pin *next;
} bank_pin;
#define MAX_PINS 1024 /* a session that never writes (cancelled) leaves its pin: the oldest go */

/* A user's long-term chunk count as last seen (user_chunks_max). */
typedef struct chunk_count {
    char user[MS_MAX_NAME + 1];
    long n;
    struct chunk_count *next;
} chunk_count;

struct srv_store {
    ms_store *ms;
    int block_tokens;
    size_t block_bytes;
    int sync;
    srv_store_loaded_fn loaded;
    void *loaded_ctx;
    srv_metrics *met;
    srv_post_fn post;
    void *post_arg;
    void (*forgot)(void *ctx, const char *user, const char *id);
    void *forgot_ctx;
    int ttl_s;                /* 0: sessions never expire */
    uint64_t disk_budget;     /* bytes, 0: no budget */
    double maint_interval_s;
    const eng_model *model;   /* for the prompt's retrieval key; NULL: no L3 */
    int n_layers, d_model, top_r;
    pthread_t th;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    task *head, *tail; /* guarded by mu */
    int depth;         /* queued tasks, guarded by mu */
    int stop;          /* guarded by mu */
    /* counters (atomic) */
    long writes, write_failures, blocks_written, lookups, loaded_blocks_warm, loaded_blocks_disk;
    long expired, evicted, chunks_written;
    long quota_sessions, quota_chunks, resumes[SRV_PATH_COUNT], group_commits;
    /* resume_policy and the rates it weighs (under rates_mu) */
    int resume_policy;
    pthread_mutex_t rates_mu;
    srv_resume_rates rates;
    /* group commit (worker thread only) */
    int sync_ms;
    srv_event *pending;       /* FINAL events of turns written but not yet fsync'd */
    int n_pending, cap_pending;
    double commit_at;         /* when the pending group must be fsync'd */
    /* quotas */
    uint64_t user_bytes;
    long user_chunks;
    busy_ent *busy;           /* guarded by mu */
    chunk_count *counts;      /* worker thread only */
    bank_pin *pins;           /* worker thread only, newest first */
    srv_l3index *l3ix;        /* retrieval index of long-term chunks, or NULL: scan */
};

/* memstore reports "event=NAME k=v ...": logged as that event, a warning
 * when it found a damaged or unreadable value. */
static void memstore_log(void *ctx, const char *msg)
{
    (void)ctx;
    char ev[64] = "memstore";
    const char *rest = msg;
    if (strncmp(msg, "event=", 6) == 0) {
        size_t n = strcspn(msg + 6, " ");
        snprintf(ev, sizeof ev, "%.*s", (int)(n < sizeof ev ? n : sizeof ev - 1), msg + 6);
        rest = msg + 6 + n;
    }
    int bad = strstr(ev, "corrupt") || strstr(ev, "skip");
    srv_log(bad ? "warn" : "info", ev, "%s%s", *rest == ' ' || !*rest ? "" : " ", rest);
}

static void task_free(task *t)
{
    if (!t) return;
    free(t->tokens);
    free(t->buf);
    srv_loaded_free(t->res);
    free(t);
}

static void do_write(srv_store *st, task *t)
{
    char err[512];
    int nb = t->n_full, n_new = nb - t->first;
    uint8_t *h = malloc((size_t)(nb > 0 ? nb : 1) * MS_HASH_BYTES);
    ms_block *blk = malloc((size_t)(n_new > 0 ? n_new : 1) * sizeof *blk);
    int rc;
    if (!h || !blk) {
        snprintf(err, sizeof err, "out of memory");
        rc = MS_ENOMEM;
    } else {
        ms_block_hashes(st->ms, t->user, t->bank, t->n_bank, t->tokens, nb * st->block_tokens, h);
        for (int i = 0; i < n_new; i++)
            blk[i] = (ms_block){ h + (size_t)(t->first + i) * MS_HASH_BYTES,
                                 (const char *)t->buf + (size_t)i * st->block_bytes, st->block_bytes };
        int64_t now = (int64_t)time(NULL) * 1000;
        ms_session s = { .user = t->user, .id = t->id, .tokens = t->tokens, .n_tokens = t->n_tokens,
                         .n_blocks = nb, .hashes = h, .bank = t->bank, .n_bank = t->n_bank,
                         .created_ms = now, .used_ms = now };
        /* Keep the creation time of an existing record. */
        ms_session *old = NULL;
        if (ms_session_get(st->ms, t->user, t->id, &old, err, sizeof err) == MS_OK) s.created_ms = old->created_ms;
        ms_session_free(old);
        rc = ms_session_put(st->ms, &s, blk, n_new, st->sync && st->sync_ms <= 0, err, sizeof err);
    }
    free(h);
    free(blk);
    if (rc == MS_OK) {
        __atomic_add_fetch(&st->writes, 1, __ATOMIC_RELAXED);
        __atomic_add_fetch(&st->blocks_written, n_new, __ATOMIC_RELAXED);
    } else {
        char q[600];
        __atomic_add_fetch(&st->write_failures, 1, __ATOMIC_RELAXED);
        srv_log("error", "session_write_failed", " session=%s tokens=%d new_blocks=%d error=%s", t->id,
                t->n_tokens, n_new, srv_log_quote(err, q, sizeof q));
    }
}

/* The chunk id of (user, session, index): stable, so a rewrite replaces. */
static uint64_t chunk_id(const char *user, const char *sid, int index)
{
    XXH3_state_t hs;
    XXH3_64bits_reset(&hs);
    XXH3_64bits_update(&hs, user, strlen(user) + 1);
    XXH3_64bits_update(&hs, sid, strlen(sid) + 1);
    XXH3_64bits_update(&hs, &index, sizeof index);
    return XXH3_64bits_digest(&hs);
}

/* A stored chunk's parts, or 0 when it is not one of ours for this model.
 * emb and mu point at f32 vectors that may be unaligned (values come from
 * RocksDB buffers): read them with memcpy. */
static int chunk_parts(const srv_store *st, const void *data, size_t len, const char **sid, size_t *sid_len,
                       const char **emb, const char **mu, int64_t *used_ms)
{
    chunk_hdr h;
    if (len < sizeof h) return 0;
    memcpy(&h, data, sizeof h);
    size_t vec = (size_t)st->d_model * sizeof(float);
    size_t hl = h.magic == CHUNK_MAGIC2 ? CHUNK_HDR2 : sizeof h;
    if ((h.magic != CHUNK_MAGIC && h.magic != CHUNK_MAGIC2) || (int)h.n_layers != st->n_layers ||
        (int)h.d_model != st->d_model || h.sid_len > SRV_SESSION_ID_MAX ||
        len != hl + h.sid_len + vec * (1 + (size_t)st->n_layers))
        return 0;
    if (used_ms) {
        *used_ms = 0; /* a v1 chunk: never used, as far as anyone knows */
        if (h.magic == CHUNK_MAGIC2) memcpy(used_ms, (const char *)data + sizeof h, sizeof *used_ms);
    }
    *sid = (const char *)data + hl;
    *sid_len = h.sid_len;
    *emb = *sid + h.sid_len;
    *mu = *emb + vec;
    return 1;
}

typedef struct pick {
    const srv_store *st;
    const char *sid;       /* the session being started: its own chunks are not memories of it */
    const float *q;        /* the prompt's retrieval key */
    float *e;              /* (d_model) scratch: a chunk's key, aligned */
    double qn;
    int r, n;              /* wanted, held */
    uint64_t ids[SRV_MAX_BANK];
    double score[SRV_MAX_BANK];
} pick;

/* Keeps the top r chunks by cosine similarity of e to the query. */
static int pick_chunk(void *ctx, uint64_t id, const void *data, size_t len)
{
    pick *p = ctx;
    const char *sid, *eb, *mu;
    size_t sl;
    if (!chunk_parts(p->st, data, len, &sid, &sl, &eb, &mu, NULL)) return 0;
    if (sl == strlen(p->sid) && memcmp(sid, p->sid, sl) == 0) return 0;
    const float *e = p->e;
    memcpy(p->e, eb, (size_t)p->st->d_model * sizeof *p->e);
    double dot = 0, en = 0;
    for (int d = 0; d < p->st->d_model; d++) {
        dot += (double)e[d] * p->q[d];
        en += (double)e[d] * e[d];
    }
    double sc = en > 0 && p->qn > 0 ? dot / sqrt(en * p->qn) : -2.0;
    if (p->n == p->r && sc <= p->score[p->n - 1]) return 0; /* no better than the worst kept */
    int i = p->n < p->r ? p->n++ : p->r - 1;               /* the slot: a new one, or the worst's */
    while (i > 0 && p->score[i - 1] < sc) {                /* keep them sorted, best first */
        p->score[i] = p->score[i - 1];
        p->ids[i] = p->ids[i - 1];
        i--;
    }
    p->score[i] = sc;
    p->ids[i] = id;
    return 0;
}

/* A chunk bound into a new session's bank was used now: its used_ms (the
 * quota's LRU order) is rewritten, in the v2 layout. */
static void touch_chunk(srv_store *st, const char *user, uint64_t id, const void *data, size_t len)
{
    if (st->user_chunks <= 0) return; /* only the quota reads it */
    chunk_hdr h;
    memcpy(&h, data, sizeof h);
    size_t hl = h.magic == CHUNK_MAGIC2 ? CHUNK_HDR2 : sizeof h, nl = CHUNK_HDR2 + (len - hl);
    char *v = malloc(nl);
    if (!v) return;
    h.magic = CHUNK_MAGIC2;
    int64_t now = (int64_t)time(NULL) * 1000;
    memcpy(v, &h, sizeof h);
    memcpy(v + sizeof h, &now, sizeof now);
    memcpy(v + CHUNK_HDR2, (const char *)data + hl, len - hl);
    char err[256];
    ms_chunk_put(st->ms, user, id, v, nl, 0, err, sizeof err);
    free(v);
}

/* Loads the chunks ids[0..n) as a bank (res->bank_mu, res->bank_ids);
 * returns how many loaded (stops at the first missing one).  touch: they
 * were chosen for a new session (used now). */
static int load_bank(srv_store *st, const char *user, const uint64_t *ids, int n, srv_loaded *res, int touch)
{
    size_t per = (size_t)st->n_layers * st->d_model;
    res->bank_mu = n > 0 ? malloc((size_t)n * per * sizeof(float)) : NULL;
    if (n > 0 && !res->bank_mu) return 0;
    int k = 0;
    for (; k < n; k++) {
        void *data;
        size_t len;
        char err[256];
        const char *sid, *e, *mu;
        size_t sl;
        if (ms_chunk_get(st->ms, user, ids[k], &data, &len, err, sizeof err) != MS_OK) break;
        int ok = chunk_parts(st, data, len, &sid, &sl, &e, &mu, NULL);
        if (ok) memcpy(res->bank_mu + (size_t)k * per, mu, per * sizeof(float));
        if (ok && touch) touch_chunk(st, user, ids[k], data, len);
        free(data);
        if (!ok) break;
        res->bank_ids[k] = ids[k];
    }
    res->n_bank = k;
    return k;
}

static void unpin_bank(srv_store *st, const char *user, const char *id)
{
    for (bank_pin **l = &st->pins; *l; l = &(*l)->next)
        if (strcmp((*l)->user, user) == 0 && strcmp((*l)->id, id) == 0) {
            bank_pin *p = *l;
            *l = p->next;
            free(p);
            return;
        }
}

static void pin_bank(srv_store *st, const char *user, const char *id, const uint64_t *ids, int n)
{
    unpin_bank(st, user, id);
    bank_pin *p = calloc(1, sizeof *p);
    if (!p) return;
    snprintf(p->user, sizeof p->user, "%s", user);
    snprintf(p->id, sizeof p->id, "%s", id);
    p->n = n < SRV_MAX_BANK ? n : SRV_MAX_BANK;
    memcpy(p->ids, ids, (size_t)p->n * sizeof *ids);
    p->next = st->pins;
    st->pins = p;
    int k = 0;
    for (bank_pin **l = &st->pins; *l; l = &(*l)->next)
        if (++k > MAX_PINS) {
            while (*l) {
                bank_pin *q = *l;
                *l = q->next;
                free(q);
            }
            break;
        }
}

/* Fills the user's retrieval index with one scan of the user's chunks. */
typedef struct ix_fill {
    srv_store *st;
    const char *user;
    float *e; /* (d_model) aligned copy */
    int failed;
} ix_fill;

static int ix_add(void *ctx, uint64_t id, const void *data, size_t len)
{
    ix_fill *f = ctx;
    const char *sid, *eb, *mu;
    size_t sl;
    if (!chunk_parts(f->st, data, len, &sid, &sl, &eb, &mu, NULL)) return 0; /* the scan skips it too */
    memcpy(f->e, eb, (size_t)f->st->d_model * sizeof *f->e);
    if (srv_l3index_put(f->st->l3ix, f->user, id, sid, sl, f->e) != 0) {
        f->failed = 1;
        return 1;
    }
    return 0;
}

static int index_user(srv_store *st, const char *user)
{
    char err[256];
    double t0 = srv_now();
    ix_fill f = { st, user, malloc((size_t)st->d_model * sizeof(float)), 0 };
    if (!f.e || srv_l3index_begin(st->l3ix, user) != 0) {
        free(f.e);
        return -1;
    }
    int rc = ms_chunk_list(st->ms, user, ix_add, &f, err, sizeof err);
    free(f.e);
    if (rc != MS_OK || f.failed) {
        srv_l3index_drop(st->l3ix, user);
        return -1;
    }
    srv_log("debug", "longterm_indexed", " user=%s chunks=%d index_s=%.3f", user, srv_l3index_count(st->l3ix, user),
            srv_now() - t0);
    return 0;
}

/* A new session's L3 bank: the user's top R chunks of other sessions by
 * similarity to the prompt's mean token embedding: from the retrieval index
 * (l3index.c; the same chunks the scan would pick), else by a scan. */
static void choose_bank(srv_store *st, task *t, srv_loaded *res)
{
    if (!st->model || st->top_r <= 0 || t->n_tokens <= 0) return;
    pick p = { .st = st, .sid = t->id, .r = st->top_r < SRV_MAX_BANK ? st->top_r : SRV_MAX_BANK };
    float *q = malloc((size_t)st->d_model * sizeof *q);
    p.e = malloc((size_t)st->d_model * sizeof *p.e);
    if (!q || !p.e) {
        free(q);
        free(p.e);
        return;
    }
    if (eng_model_embed_mean(st->model, t->tokens, t->n_tokens, q) == ENG_OK) {
        p.q = q;
        for (int d = 0; d < st->d_model; d++) p.qn += (double)q[d] * q[d];
        char err[256];
        for (int attempt = 0; st->l3ix && attempt < 2; attempt++) {
            if (!srv_l3index_loaded(st->l3ix, t->user) && index_user(st, t->user) != 0) break;
            p.n = srv_l3index_top(st->l3ix, t->user, t->id, q, p.r, p.ids, p.score);
            if (p.n < 0) break; /* dropped meanwhile (budget, admin): scan */
            if (p.n == 0 || load_bank(st, t->user, p.ids, p.n, res, 1) == p.n) goto done;
            /* a chunk it named is gone (deleted behind its back): rebuild once */
            free(res->bank_mu);
            res->bank_mu = NULL;
            res->n_bank = 0;
            srv_l3index_drop(st->l3ix, t->user);
        }
        p.n = 0;
        if (ms_chunk_list(st->ms, t->user, pick_chunk, &p, err, sizeof err) == MS_OK && p.n > 0)
            load_bank(st, t->user, p.ids, p.n, res, 1);
    }
done:
    if (res->n_bank > 0 && st->user_chunks > 0) pin_bank(st, t->user, t->id, res->bank_ids, res->n_bank);
    free(q);
    free(p.e);
}

/* Reads blocks [from, n) of s into res->buf (res->first = from), timing
 * each read for the tier's bandwidth; a block that is missing or fails its
 * checks ends the run there (the rest is recomputed). */
static void read_blocks(srv_store *st, const task *t, const ms_session *s, int from, int n, srv_loaded *res)
{
    char err[512];
    res->first = from;
    res->buf = n > from ? malloc((size_t)(n - from) * st->block_bytes) : NULL;
    if (n > from && !res->buf) n = from;
    double t_tier[3] = { 0, 0, 0 };
    int k = 0;
    for (int i = from; i < n; i++, k++) {
        int tier = 0;
        double t0 = srv_now();
        int rc = ms_block_get(st->ms, s->hashes + (size_t)i * MS_HASH_BYTES,
                              (char *)res->buf + (size_t)k * st->block_bytes, st->block_bytes, &tier, err,
                              sizeof err);
        if (rc != MS_OK) {
            char q[600];
            srv_log("warn", "session_block_unavailable", " session=%s block=%d status=%s error=%s", t->id, i,
                    ms_strerror(rc), srv_log_quote(err, q, sizeof q));
            break;
        }
        t_tier[tier == MS_TIER_WARM ? 1 : 2] += srv_now() - t0;
        if (tier == MS_TIER_WARM) res->blocks_warm++;
        else res->blocks_disk++;
    }
    res->n_blocks = k;
    /* the cost model's bandwidths: an EWMA of this lookup's bytes/s per tier */
    pthread_mutex_lock(&st->rates_mu);
    if (res->blocks_warm > 0 && t_tier[1] > 0)
        srv_rate_ewma(&st->rates.warm_bps, (double)res->blocks_warm * st->block_bytes / t_tier[1]);
    if (res->blocks_disk > 0 && t_tier[2] > 0)
        srv_rate_ewma(&st->rates.disk_bps, (double)res->blocks_disk * st->block_bytes / t_tier[2]);
    pthread_mutex_unlock(&st->rates_mu);
}

/* resume_policy for n stored blocks: the cost model's split. */
static void plan_resume(srv_store *st, const ms_session *s, int n, srv_loaded *res)
{
    unsigned char *warm = n > 0 ? malloc((size_t)n) : NULL;
    for (int i = 0; warm && i < n; i++) warm[i] = (unsigned char)ms_block_is_warm(st->ms, s->hashes + (size_t)i * MS_HASH_BYTES);
    srv_resume_rates r;
    pthread_mutex_lock(&st->rates_mu);
    r = st->rates;
    pthread_mutex_unlock(&st->rates_mu);
    srv_resume_in in = { .policy = st->resume_policy, .n_blocks = n, .block_tokens = st->block_tokens,
                         .block_bytes = st->block_bytes, .warm = warm, .rates = &r };
    srv_resume_plan pl;
    srv_resume_choose(&in, &pl);
    free(warm);
    res->n_stored = n;
    res->split = pl.split;
    res->path = pl.path;
    res->t_est = pl.t_est;
}

static void do_lookup(srv_store *st, task *t)
{
    srv_loaded *res = t->res;
    t->res = NULL; /* handed to the receiver below */
    char err[512];
    double t0 = srv_now();
    ms_session *s = NULL;
    int rc = ms_session_get(st->ms, t->user, t->id, &s, err, sizeof err);
    if (rc == MS_OK && s->n_bank > 0 && (s->n_bank > SRV_MAX_BANK || !st->model ||
                                         load_bank(st, t->user, s->bank, s->n_bank, res, 0) != s->n_bank)) {
        /* its K/V were computed under a bank that is gone: recompute all */
        srv_log("warn", "session_bank_unavailable", " session=%s bank=%d", t->id, s->n_bank);
        free(res->bank_mu);
        res->bank_mu = NULL;
        res->n_bank = 0;
        ms_session_free(s);
        s = NULL;
        rc = MS_ENOTFOUND;
    }
    if (rc == MS_OK) {
        res->found = 1;
        int keep = srv_reuse_len(s->tokens, s->n_blocks * st->block_tokens, t->tokens, t->n_tokens,
                                 st->block_tokens);
        int n = keep / st->block_tokens;
        plan_resume(st, s, n, res);
        srv_loaded *tail = NULL;
        if (res->path == SRV_PATH_BOTH && (tail = calloc(1, sizeof *tail))) {
            /* both at once: the engine prefills [0, split) now, while the
             * blocks [split, n) are read here and follow in a second answer */
            tail->job_id = res->job_id;
            tail->found = 1;
            tail->tail = 1;
            tail->path = res->path;
            tail->split = res->split;
            tail->n_stored = n;
            res->more = 1;
            res->first = res->split;
            res->load_s = srv_now() - t0;
            st->loaded(st->loaded_ctx, res);
            res = tail;
        } else if (res->path == SRV_PATH_BOTH) {
            res->path = SRV_PATH_LOAD; /* out of memory for the second answer: load all */
            res->split = 0;
        }
        read_blocks(st, t, s, res->split, n, res);
        ms_session_free(s);
        __atomic_add_fetch(&st->resumes[res->path], 1, __ATOMIC_RELAXED);
    } else if (rc != MS_ENOTFOUND) {
        char q[600];
        srv_log("warn", "session_lookup_failed", " session=%s status=%s error=%s", t->id, ms_strerror(rc),
                srv_log_quote(err, q, sizeof q));
    }
    if (!res->found) choose_bank(st, t, res); /* a new session: memories of the user's others */
    res->load_s = srv_now() - t0;
    __atomic_add_fetch(&st->lookups, 1, __ATOMIC_RELAXED);
    __atomic_add_fetch(&st->loaded_blocks_warm, res->blocks_warm, __ATOMIC_RELAXED);
    __atomic_add_fetch(&st->loaded_blocks_disk, res->blocks_disk, __ATOMIC_RELAXED);
    st->loaded(st->loaded_ctx, res);
}

/* ---- per-user quotas ------------------------------------------------------ */

static int is_busy(srv_store *st, const char *user, const char *id)
{
    pthread_mutex_lock(&st->mu);
    busy_ent *b = st->busy;
    while (b && (strcmp(b->user, user) != 0 || strcmp(b->id, id) != 0)) b = b->next;
    pthread_mutex_unlock(&st->mu);
    return b != NULL;
}

void srv_store_busy(srv_store *st, const char *user, const char *id, int busy)
{
    if (!st) return;
    pthread_mutex_lock(&st->mu);
    busy_ent **l = &st->busy;
    while (*l && (strcmp((*l)->user, user) != 0 || strcmp((*l)->id, id) != 0)) l = &(*l)->next;
    if (busy) {
        if (!*l && (*l = calloc(1, sizeof **l))) {
            snprintf((*l)->user, sizeof (*l)->user, "%s", user);
            snprintf((*l)->id, sizeof (*l)->id, "%s", id);
        }
        if (*l) (*l)->n++;
        /* out of memory: the session is not protected from quota eviction
         * for this turn; its next write stores it again */
    } else if (*l && --(*l)->n <= 0) {
        busy_ent *b = *l;
        *l = b->next;
        free(b);
    }
    pthread_mutex_unlock(&st->mu);
}

typedef struct chunk_age {
    uint64_t id;
    int64_t used_ms;
    int bound; /* in the L3 bank of one of the user's stored sessions */
} chunk_age;

typedef struct age_list {
    const srv_store *st;
    chunk_age *v;
    size_t n, cap;
    int oom;
} age_list;

static int collect_chunk(void *ctx, uint64_t id, const void *data, size_t len)
{
    age_list *l = ctx;
    const char *sid, *e, *mu;
    size_t sl;
    int64_t used = 0;
    if (!chunk_parts(l->st, data, len, &sid, &sl, &e, &mu, &used)) used = 0; /* not usable: first to go */
    if (l->n == l->cap) {
        size_t cap = l->cap ? l->cap * 2 : 256;
        chunk_age *v = realloc(l->v, cap * sizeof *v);
        if (!v) {
            l->oom = 1;
            return 1;
        }
        l->v = v;
        l->cap = cap;
    }
    l->v[l->n++] = (chunk_age){ id, used, 0 };
    return 0;
}

static int by_id(const void *a, const void *b)
{
    const chunk_age *x = a, *y = b;
    return (x->id > y->id) - (x->id < y->id);
}

/* Marks the chunks a stored session's bank names (l sorted by id). */
static int mark_bound(void *ctx, const ms_session *s)
{
    age_list *l = ctx;
    for (int k = 0; k < s->n_bank; k++) {
        chunk_age key = { .id = s->bank[k] };
        chunk_age *c = bsearch(&key, l->v, l->n, sizeof *l->v, by_id);
        if (c) c->bound = 1;
    }
    return 0;
}

/* Deletion order: chunks no stored session's bank names first, then by
 * last use, then by id. */
static int by_age(const void *a, const void *b)
{
    const chunk_age *x = a, *y = b;
    if (x->bound != y->bound) return x->bound - y->bound;
    if (x->used_ms != y->used_ms) return (x->used_ms > y->used_ms) - (x->used_ms < y->used_ms);
    return (x->id > y->id) - (x->id < y->id);
}

/* user_chunks_max: after a chunk of `user` was written.  The user's count
 * is kept in memory (counted once by a scan); over the quota, a scan lists
 * the user's chunks and deletes down to the quota: first those no stored
 * session's L3 bank names, least recently used (written, or bound into a new
 * session's bank) first; then, if still over, bound ones.  Only this user's
 * chunks are ever looked at. */
static void chunk_quota(srv_store *st, const char *user)
{
    chunk_count *c = st->counts;
    while (c && strcmp(c->user, user) != 0) c = c->next;
    if (!c && (c = calloc(1, sizeof *c))) {
        snprintf(c->user, sizeof c->user, "%s", user);
        c->n = -1; /* not counted yet */
        c->next = st->counts;
        st->counts = c;
    }
    if (c && c->n >= 0 && ++c->n <= st->user_chunks) return;
    char err[256];
    age_list l = { .st = st };
    if (ms_chunk_list(st->ms, user, collect_chunk, &l, err, sizeof err) != MS_OK || l.oom) {
        srv_log("warn", "longterm_quota_failed", " user=%s error=\"%s\"", user, l.oom ? "out of memory" : err);
        free(l.v);
        return;
    }
    long deleted = 0, over = (long)l.n - st->user_chunks;
    if (over > 0) {
        /* a chunk bound in a stored session's bank goes last: that session
         * resumes only with its whole bank (else it is recomputed) */
        qsort(l.v, l.n, sizeof *l.v, by_id);
        ms_session_list(st->ms, user, NULL, NULL, mark_bound, &l, err, sizeof err);
        for (bank_pin *p = st->pins; p; p = p->next) {
            if (strcmp(p->user, user) != 0) continue;
            ms_session s = { .bank = p->ids, .n_bank = p->n };
            mark_bound(&l, &s);
        }
        qsort(l.v, l.n, sizeof *l.v, by_age);
        for (size_t i = 0; i < l.n && deleted < over; i++)
            if (ms_chunk_delete(st->ms, user, l.v[i].id, err, sizeof err) == MS_OK) {
                if (st->l3ix) srv_l3index_del(st->l3ix, user, l.v[i].id);
                deleted++;
            }
        __atomic_add_fetch(&st->quota_chunks, deleted, __ATOMIC_RELAXED);
        srv_log("info", "longterm_quota_evicted", " user=%s chunks=%zu deleted=%ld quota=%ld", user, l.n, deleted,
                st->user_chunks);
    }
    if (c) c->n = (long)l.n - deleted;
    free(l.v);
}

static void do_chunk(srv_store *st, task *t)
{
    char err[256];
    size_t vec = (size_t)st->d_model * sizeof(float), sl = strlen(t->id);
    size_t len = CHUNK_HDR2 + sl + vec * (1 + (size_t)st->n_layers);
    char *v = malloc(len);
    if (!v) return;
    chunk_hdr h = { CHUNK_MAGIC2, (uint32_t)st->n_layers, (uint32_t)st->d_model, (uint32_t)t->chunk_index,
                    (uint32_t)sl };
    int64_t now = (int64_t)time(NULL) * 1000;
    memcpy(v, &h, sizeof h);
    memcpy(v + sizeof h, &now, sizeof now);
    memcpy(v + CHUNK_HDR2, t->id, sl);
    memcpy(v + CHUNK_HDR2 + sl, t->buf, vec * (1 + (size_t)st->n_layers));
    uint64_t cid = chunk_id(t->user, t->id, t->chunk_index);
    /* a rewrite of a chunk already there does not add one (its count
     * would drift upwards; the quota's scan corrects it anyway) */
    void *old = NULL;
    size_t old_len = 0;
    int existed = st->user_chunks > 0 && ms_chunk_get(st->ms, t->user, cid, &old, &old_len, err, sizeof err) == MS_OK;
    free(old);
    int rc = ms_chunk_put(st->ms, t->user, cid, v, len, 0, err, sizeof err);
    free(v);
    if (rc == MS_OK && st->l3ix) srv_l3index_put(st->l3ix, t->user, cid, t->id, sl, (const float *)t->buf);
    if (rc == MS_OK) __atomic_add_fetch(&st->chunks_written, 1, __ATOMIC_RELAXED);
    else srv_log("warn", "longterm_write_failed", " session=%s chunk=%d error=\"%s\"", t->id, t->chunk_index, err);
    if (rc == MS_OK && !existed && st->user_chunks > 0) chunk_quota(st, t->user);
}

static void publish(srv_store *st)
{
    if (!st->met) return;
    srv_store_stats ss;
    srv_store_get_stats(st, &ss);
    srv_metrics_store(st->met, &ss);
}

/* ---- maintenance: expiry, the disk budget, garbage collection ------------ */

typedef struct sess_ref {
    char user[MS_MAX_NAME + 1], id[SRV_SESSION_ID_MAX + 1];
    int64_t used_ms;
    uint64_t bytes; /* its blocks (shared ones counted in each session) + record */
    int gone;       /* deleted by this pass */
} sess_ref;

typedef struct sess_list {
    sess_ref *v;
    size_t n, cap;
    size_t block_bytes;
    int oom;
} sess_list;

static int collect(void *ctx, const ms_session *s)
{
    sess_list *l = ctx;
    if (l->n == l->cap) {
        size_t cap = l->cap ? l->cap * 2 : 256;
        sess_ref *v = realloc(l->v, cap * sizeof *v);
        if (!v) {
            l->oom = 1;
            return 1;
        }
        l->v = v;
        l->cap = cap;
    }
    sess_ref *r = &l->v[l->n++];
    snprintf(r->user, sizeof r->user, "%s", s->user);
    snprintf(r->id, sizeof r->id, "%s", s->id);
    r->used_ms = s->used_ms;
    r->gone = 0;
    r->bytes = (uint64_t)s->n_blocks * l->block_bytes + (uint64_t)s->n_tokens * 4;
    return 0;
}

static int by_use(const void *a, const void *b)
{
    const sess_ref *x = a, *y = b;
    return (x->used_ms > y->used_ms) - (x->used_ms < y->used_ms);
}

static int by_user_use(const void *a, const void *b)
{
    int c = strcmp(((const sess_ref *)a)->user, ((const sess_ref *)b)->user);
    return c ? c : by_use(a, b);
}

/* user_session_mb: per user, the least recently used of the user's own
 * sessions go while the user's stored bytes exceed the quota; a session in
 * flight (srv_store_busy) is never touched.  Sorts l by user, then last use
 * (one pass per user: O(n log n) for the whole store's sessions).
 * Returns how many went. */
static long user_quota(srv_store *st, sess_list *l, int64_t now, const char *spare)
{
    if (st->user_bytes == 0) return 0;
    if (l->n) qsort(l->v, l->n, sizeof *l->v, by_user_use);
    long n = 0;
    char err[512];
    for (size_t u = 0, end; u < l->n; u = end) {
        const char *user = l->v[u].user;
        uint64_t total = 0;
        for (end = u; end < l->n && strcmp(l->v[end].user, user) == 0; end++)
            if (!l->v[end].gone) total += l->v[end].bytes;
        for (size_t i = u; i < end && total > st->user_bytes; i++) {
            sess_ref *r = &l->v[i];
            if (r->gone || is_busy(st, r->user, r->id) ||
                (spare && strcmp(r->id, spare) == 0))
                continue;
            if (ms_session_delete(st->ms, r->user, r->id, err, sizeof err) != MS_OK) continue;
            total -= r->bytes;
            r->gone = 1;
            n++;
            if (st->forgot) st->forgot(st->forgot_ctx, r->user, r->id);
            srv_log("info", "session_evicted_quota", " user=%s session=%s bytes=%llu idle_s=%lld user_bytes=%llu "
                    "quota=%llu", r->user, r->id, (unsigned long long)r->bytes, (long long)((now - r->used_ms) / 1000),
                    (unsigned long long)total, (unsigned long long)st->user_bytes);
        }
    }
    __atomic_add_fetch(&st->quota_sessions, n, __ATOMIC_RELAXED);
    return n;
}

/* Deletes sessions idle longer than the TTL, then the least recently used
 * ones while the stored bytes exceed the disk budget, then per user those
 * over the user's quota, then every block no session refers to.  Sessions
 * in flight are left alone.  Runs on the worker between tasks. */
static void maintain(srv_store *st)
{
    char err[512];
    sess_list l = { .block_bytes = st->block_bytes };
    if (ms_session_list(st->ms, NULL, NULL, NULL, collect, &l, err, sizeof err) != MS_OK || l.oom) {
        srv_log("warn", "session_maintenance_failed", " error=\"%s\"", l.oom ? "out of memory" : err);
        free(l.v);
        return;
    }
    int64_t now = (int64_t)time(NULL) * 1000;
    long expired = 0, evicted = 0;
    uint64_t total = 0;
    if (l.n) qsort(l.v, l.n, sizeof *l.v, by_use);
    for (size_t i = 0; i < l.n; i++) total += l.v[i].bytes;
    for (size_t i = 0; i < l.n; i++) {
        sess_ref *r = &l.v[i];
        int old = st->ttl_s > 0 && now - r->used_ms > (int64_t)st->ttl_s * 1000;
        int over = st->disk_budget > 0 && total > st->disk_budget;
        if (!old && !over) break; /* sorted by last use: the rest are newer */
        if (is_busy(st, r->user, r->id)) continue;
        if (ms_session_delete(st->ms, r->user, r->id, err, sizeof err) != MS_OK) continue;
        r->gone = 1;
        total -= r->bytes;
        if (st->forgot) st->forgot(st->forgot_ctx, r->user, r->id);
        if (old) expired++;
        else evicted++;
        srv_log("info", old ? "session_expired" : "session_evicted_disk", " session=%s idle_s=%lld", r->id,
                (long long)((now - r->used_ms) / 1000));
    }
    long quota = user_quota(st, &l, now, NULL);
    free(l.v);
    long gc = 0;
    if (expired + evicted + quota > 0 && ms_gc(st->ms, &gc, err, sizeof err) != MS_OK)
        srv_log("warn", "session_gc_failed", " error=\"%s\"", err);
    __atomic_add_fetch(&st->expired, expired, __ATOMIC_RELAXED);
    __atomic_add_fetch(&st->evicted, evicted, __ATOMIC_RELAXED);
    if (expired + evicted + quota + gc > 0)
        srv_log("info", "session_maintenance", " expired=%ld evicted=%ld quota_evicted=%ld blocks_deleted=%ld "
                "stored_bytes=%llu", expired, evicted, quota, gc, (unsigned long long)total);
}

/* Group commit (session_sync_ms): one fsync of the write-ahead log makes
 * every turn written since the last one durable; then their FINAL events
 * go out.  A failed fsync is logged and counted like a failed write: the
 * turns are in the log but may not survive a power loss. */
static void commit_group(srv_store *st)
{
    if (st->n_pending == 0) return;
    char err[512];
    if (ms_sync(st->ms, err, sizeof err) != MS_OK) {
        char q[600];
        __atomic_add_fetch(&st->write_failures, st->n_pending, __ATOMIC_RELAXED);
        srv_log("error", "session_sync_failed", " turns=%d error=%s", st->n_pending, srv_log_quote(err, q, sizeof q));
    }
    __atomic_add_fetch(&st->group_commits, 1, __ATOMIC_RELAXED);
    publish(st);
    st->post(st->pending, st->n_pending, st->post_arg);
    st->n_pending = 0;
}

/* Holds a turn's FINAL event until its group is on disk; posts it at once
 * when it cannot be held (out of memory: after an fsync of its own). */
static void hold_final(srv_store *st, const srv_event *ev)
{
    if (st->n_pending == st->cap_pending) {
        int cap = st->cap_pending ? st->cap_pending * 2 : 32;
        srv_event *v = realloc(st->pending, (size_t)cap * sizeof *v);
        if (!v) {
            commit_group(st);
            char err[256];
            ms_sync(st->ms, err, sizeof err);
            st->post(ev, 1, st->post_arg);
            return;
        }
        st->pending = v;
        st->cap_pending = cap;
    }
    if (st->n_pending == 0) st->commit_at = srv_now() + st->sync_ms / 1000.0;
    st->pending[st->n_pending++] = *ev;
}

/* user_session_mb after a write of (user, spare): the user's other idle
 * sessions go, least recently used first, while the user is over quota.
 * The session just written is spared (the user is working in it). */
static void quota_after_write(srv_store *st, const char *user, const char *spare)
{
    if (st->user_bytes == 0) return;
    char err[512];
    sess_list l = { .block_bytes = st->block_bytes };
    if (ms_session_list(st->ms, user, NULL, NULL, collect, &l, err, sizeof err) != MS_OK || l.oom) {
        srv_log("warn", "session_quota_failed", " user=%s error=\"%s\"", user, l.oom ? "out of memory" : err);
        free(l.v);
        return;
    }
    long n = user_quota(st, &l, (int64_t)time(NULL) * 1000, spare);
    free(l.v);
    long gc = 0;
    if (n > 0 && ms_gc(st->ms, &gc, err, sizeof err) != MS_OK) srv_log("warn", "session_gc_failed", " error=\"%s\"", err);
}

static void *worker(void *arg)
{
    srv_store *st = arg;
    double next_maint = srv_now() + 1.0; /* soon after start: expire what aged while down */
    for (;;) {
        pthread_mutex_lock(&st->mu);
        while (!st->head && !st->stop && srv_now() < next_maint &&
               !(st->n_pending && srv_now() >= st->commit_at)) {
            /* wake at least every second for the maintenance clock, and at
             * the group commit's deadline */
            double wait = 1.0;
            if (st->n_pending && st->commit_at - srv_now() < wait) wait = st->commit_at - srv_now();
            if (wait < 0.0005) wait = 0.0005;
            struct timespec ts;
            clock_gettime(CLOCK_REALTIME, &ts);
            long ns = ts.tv_nsec + (long)(wait * 1e9);
            ts.tv_sec += ns / 1000000000L;
            ts.tv_nsec = ns % 1000000000L;
            pthread_cond_timedwait(&st->cv, &st->mu, &ts);
        }
        task *t = st->head;
        if (st->n_pending && (srv_now() >= st->commit_at || (!t && st->stop))) {
            pthread_mutex_unlock(&st->mu);
            commit_group(st);
            continue;
        }
        if (!t && !st->stop && srv_now() < next_maint) { /* woken for nothing */
            pthread_mutex_unlock(&st->mu);
            continue;
        }
        if (!t && !st->stop) {
            pthread_mutex_unlock(&st->mu);
            maintain(st);
            next_maint = srv_now() + st->maint_interval_s;
            publish(st);
            continue;
        }
        if (!t) { /* stop, and the queue is drained */
            pthread_mutex_unlock(&st->mu);
            return NULL;
        }
        st->head = t->next;
        if (!st->head) st->tail = NULL;
        pthread_mutex_unlock(&st->mu);
        if (t->kind == TASK_WRITE) {
            do_write(st, t);
            unpin_bank(st, t->user, t->id); /* its record names its bank now */
            quota_after_write(st, t->user, t->id);
            /* the turn is acknowledged only now (durable when sync), or
             * with group commit once its group's fsync is done */
            if (t->has_final && st->sync_ms > 0) hold_final(st, &t->final);
            else if (t->has_final) st->post(&t->final, 1, st->post_arg);
        } else if (t->kind == TASK_LOOKUP) {
            do_lookup(st, t);
        } else {
            do_chunk(st, t);
        }
        task_free(t);
        pthread_mutex_lock(&st->mu);
        st->depth--;
        pthread_cond_broadcast(&st->cv);
        pthread_mutex_unlock(&st->mu);
        publish(st);
    }
}

static void enqueue(srv_store *st, task *t)
{
    pthread_mutex_lock(&st->mu);
    if (st->tail) st->tail->next = t;
    else st->head = t;
    st->tail = t;
    st->depth++;
    pthread_cond_broadcast(&st->cv);
    pthread_mutex_unlock(&st->mu);
    publish(st);
}

static task *task_new(int kind, const char *user, const char *id, const int32_t *tokens, int n)
{
    task *t = calloc(1, sizeof *t);
    if (!t) return NULL;
    t->kind = kind;
    snprintf(t->user, sizeof t->user, "%s", user);
    snprintf(t->id, sizeof t->id, "%s", id);
    t->tokens = malloc((size_t)(n > 0 ? n : 1) * sizeof *tokens);
    if (!t->tokens) {
        free(t);
        return NULL;
    }
    if (n > 0) memcpy(t->tokens, tokens, (size_t)n * sizeof *tokens);
    t->n_tokens = n;
    return t;
}

int srv_store_open(const srv_store_params *p, srv_store **out, char *err, size_t errlen)
{
    *out = NULL;
    srv_store *st = calloc(1, sizeof *st);
    if (!st) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    ms_options o = { .dir = p->dir, .fingerprint = p->identity, .block_tokens = p->block_tokens,
                     .warm_bytes = p->warm_bytes, .log = memstore_log };
    int rc = ms_open(&o, &st->ms, err, errlen);
    if (rc != MS_OK) {
        free(st);
        return -1;
    }
    st->block_tokens = p->block_tokens;
    st->block_bytes = p->block_bytes;
    st->sync = p->sync;
    st->loaded = p->loaded;
    st->loaded_ctx = p->loaded_ctx;
    st->met = p->met;
    st->post = p->post;
    st->post_arg = p->post_arg;
    st->forgot = p->forgot;
    st->forgot_ctx = p->forgot_ctx;
    st->ttl_s = p->ttl_s;
    st->disk_budget = p->disk_budget;
    st->maint_interval_s = p->maint_interval_s > 0 ? p->maint_interval_s : 60.0;
    st->sync_ms = p->sync_ms;
    st->resume_policy = p->resume_policy;
    st->user_bytes = p->user_bytes;
    st->user_chunks = p->user_chunks;
    pthread_mutex_init(&st->rates_mu, NULL);
    st->model = p->model;
    if (p->model) {
        const eng_model_info *mi = eng_model_get_info(p->model);
        st->n_layers = mi->n_layers;
        st->d_model = mi->d_model;
        st->top_r = mi->l3_top_r;
        if (p->l3_index_bytes > 0 && !(st->l3ix = srv_l3index_new(st->d_model, p->l3_index_bytes))) {
            ms_close(st->ms);
            free(st);
            snprintf(err, errlen, "out of memory");
            return -1;
        }
    }
    pthread_mutex_init(&st->mu, NULL);
    pthread_cond_init(&st->cv, NULL);
    if (pthread_create(&st->th, NULL, worker, st) != 0) {
        ms_close(st->ms);
        srv_l3index_free(st->l3ix);
        pthread_mutex_destroy(&st->mu);
        pthread_cond_destroy(&st->cv);
        pthread_mutex_destroy(&st->rates_mu);
        free(st);
        snprintf(err, errlen, "cannot start the session store's thread");
        return -1;
    }
    publish(st);
    *out = st;
    return 0;
}

int srv_store_write(srv_store *st, const char *user, const char *id, const int32_t *tokens, int n_tokens,
                    int n_full, int first, void *buf, const uint64_t *bank, int n_bank, const srv_event *final)
{
    task *t = task_new(TASK_WRITE, user, id, tokens, n_tokens);
    if (!t) {
        free(buf);
        __atomic_add_fetch(&st->write_failures, 1, __ATOMIC_RELAXED);
        srv_log("error", "session_write_failed", " session=%s error=\"out of memory\"", id);
        return -1;
    }
    t->n_full = n_full;
    t->first = first;
    t->buf = buf;
    t->n_bank = n_bank < SRV_MAX_BANK ? n_bank : SRV_MAX_BANK;
    if (t->n_bank > 0) memcpy(t->bank, bank, (size_t)t->n_bank * sizeof *bank);
    if (final && st->post) {
        t->final = *final;
        t->has_final = 1;
    }
    enqueue(st, t);
    return 0;
}

int srv_store_chunk(srv_store *st, const char *user, const char *id, int index, const float *emb,
                    const float *mu)
{
    task *t = task_new(TASK_CHUNK, user, id, NULL, 0);
    size_t vec = (size_t)st->d_model;
    if (t) t->buf = malloc(vec * (1 + (size_t)st->n_layers) * sizeof(float));
    if (!t || !t->buf) {
        task_free(t);
        return -1;
    }
    memcpy(t->buf, emb, vec * sizeof(float));
    memcpy((float *)t->buf + vec, mu, vec * (size_t)st->n_layers * sizeof(float));
    t->chunk_index = index;
    enqueue(st, t);
    return 0;
}

int srv_store_lookup(srv_store *st, uint64_t job_id, const char *user, const char *id, const int32_t *prompt,
                     int n_prompt)
{
    task *t = task_new(TASK_LOOKUP, user, id, prompt, n_prompt);
    if (!t || !(t->res = calloc(1, sizeof *t->res))) {
        task_free(t);
        return -1;
    }
    t->res->job_id = job_id;
    enqueue(st, t);
    return 0;
}

ms_store *srv_store_ms(srv_store *st)
{
    return st ? st->ms : NULL;
}

void srv_loaded_free(srv_loaded *r)
{
    if (!r) return;
    free(r->buf);
    free(r->bank_mu);
    free(r);
}

void srv_store_get_stats(srv_store *st, srv_store_stats *out)
{
    memset(out, 0, sizeof *out);
    if (!st) return;
    pthread_mutex_lock(&st->mu);
    out->queue_depth = st->depth;
    pthread_mutex_unlock(&st->mu);
    out->writes = __atomic_load_n(&st->writes, __ATOMIC_RELAXED);
    out->write_failures = __atomic_load_n(&st->write_failures, __ATOMIC_RELAXED);
    out->blocks_written = __atomic_load_n(&st->blocks_written, __ATOMIC_RELAXED);
    out->lookups = __atomic_load_n(&st->lookups, __ATOMIC_RELAXED);
    out->loaded_blocks_warm = __atomic_load_n(&st->loaded_blocks_warm, __ATOMIC_RELAXED);
    out->loaded_blocks_disk = __atomic_load_n(&st->loaded_blocks_disk, __ATOMIC_RELAXED);
    out->expired = __atomic_load_n(&st->expired, __ATOMIC_RELAXED);
    out->evicted = __atomic_load_n(&st->evicted, __ATOMIC_RELAXED);
    out->chunks_written = __atomic_load_n(&st->chunks_written, __ATOMIC_RELAXED);
    out->quota_sessions = __atomic_load_n(&st->quota_sessions, __ATOMIC_RELAXED);
    out->quota_chunks = __atomic_load_n(&st->quota_chunks, __ATOMIC_RELAXED);
    out->group_commits = __atomic_load_n(&st->group_commits, __ATOMIC_RELAXED);
    for (int p = 0; p < SRV_PATH_COUNT; p++) out->resumes[p] = __atomic_load_n(&st->resumes[p], __ATOMIC_RELAXED);
}

void srv_store_note_prefill(srv_store *st, int pos_end, int n, double dt)
{
    if (!st || n <= 0 || dt <= 0) return;
    int b = srv_rate_bucket(pos_end - n / 2);
    pthread_mutex_lock(&st->rates_mu);
    srv_rate_ewma(&st->rates.prefill_tps[b], n / dt);
    pthread_mutex_unlock(&st->rates_mu);
}

void srv_store_close(srv_store *st)
{
    if (!st) return;
    double t0 = srv_now();
    pthread_mutex_lock(&st->mu);
    int depth = st->depth;
    st->stop = 1;
    pthread_cond_broadcast(&st->cv);
    pthread_mutex_unlock(&st->mu);
    pthread_join(st->th, NULL); /* the worker drains the queue first */
    ms_close(st->ms);
    srv_log("info", "session_store_closed", " flushed_tasks=%d writes=%ld write_failures=%ld flush_s=%.3f", depth,
            st->writes, st->write_failures, srv_now() - t0);
    pthread_mutex_destroy(&st->mu);
    pthread_cond_destroy(&st->cv);
    pthread_mutex_destroy(&st->rates_mu);
    while (st->busy) {
        busy_ent *b = st->busy->next;
        free(st->busy);
        st->busy = b;
    }
    while (st->pins) {
        bank_pin *p = st->pins->next;
        free(st->pins);
        st->pins = p;
    }
    while (st->counts) {
        chunk_count *c = st->counts->next;
        free(st->counts);
        st->counts = c;
    }
    free(st->pending);
    srv_l3index_free(st->l3ix);
    free(st);
}

void srv_store_longterm_deleted(srv_store *st, const char *user)
{
    if (st) srv_l3index_drop(st->l3ix, user);
}
