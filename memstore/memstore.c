/*
 * memstore.c — the RocksDB store behind memstore.h (the layout and the
 * guarantees are documented there).
 *
 * Values are written little-endian as the host lays them out (mkad builds
 * for x86-64 and arm64 only); the envelope's checksum would catch a store
 * carried to a big-endian host.
 */
#include "memstore.h"

#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include <rocksdb/c.h>
#define XXH_INLINE_ALL
#include <xxhash.h>

#define MS_FORMAT 1
#define ENV_MAGIC "MKMS"
#define ENV_BYTES 24 /* magic[4], kind u16, version u16, len u64, sum u64 */

enum { CF_DEFAULT, CF_META, CF_SESSIONS, CF_BLOCKS, CF_LONGTERM, N_CF };
static const char *const cf_names[N_CF] = { "default", "meta", "sessions", "blocks", "longterm" };
/* The envelope kind of each family's values. */
enum { KIND_META = 1, KIND_SESSION = 2, KIND_BLOCK = 3, KIND_CHUNK = 4 };
static const uint16_t cf_kind[N_CF] = { 0, KIND_META, KIND_SESSION, KIND_BLOCK, KIND_CHUNK };

struct ms_store {
    rocksdb_t *db;
    rocksdb_options_t *opt;
    rocksdb_options_t *cf_opt[N_CF];
    rocksdb_column_family_handle_t *cf[N_CF];
    rocksdb_writeoptions_t *w_sync, *w_async;
    rocksdb_readoptions_t *r;
    char *identity;          /* fingerprint + block size: what the store is bound to */
    char *dir;
    int block_tokens;
    ms_log_fn log;
    void *log_ctx;
    pthread_rwlock_t gc_lock; /* writers of blocks: read side; ms_gc: write side */
    long corrupt_dropped;     /* atomically updated, as the counters below */
    long disk_hits, misses;
    struct warm *warm;        /* NULL: no warm tier */
};

const char *ms_strerror(int rc)
{
    switch (rc) {
    case MS_OK: return "ok";
    case MS_EINVAL: return "invalid argument";
    case MS_ENOMEM: return "out of memory";
    case MS_EIO: return "I/O error";
    case MS_ENOTFOUND: return "not found";
    case MS_ECORRUPT: return "corrupt value";
    case MS_EMISMATCH: return "store written for another model";
    case MS_ELOCKED: return "store in use by another process";
    default: return "unknown error";
    }
}

static int errf(char *err, size_t errlen, int rc, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static int errf(char *err, size_t errlen, int rc, const char *fmt, ...)
{
    if (err && errlen) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, errlen, fmt, ap);
        va_end(ap);
    }
    return rc;
}

static void logf_(ms_store *st, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void logf_(ms_store *st, const char *fmt, ...)
{
    if (!st->log) return;
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    st->log(st->log_ctx, buf);
}

/* Turns a RocksDB error string (freed here) into MS_EIO with context. */
static int rdb_err(char **e, char *err, size_t errlen, const char *what)
{
    int rc = errf(err, errlen, MS_EIO, "memstore: %s: %s", what, *e);
    rocksdb_free(*e);
    *e = NULL;
    return rc;
}

static int name_ok(const char *s)
{
    size_t n = s ? strlen(s) : 0;
    return n > 0 && n <= MS_MAX_NAME;
}

/* ---- envelope ------------------------------------------------------------ */

static uint64_t env_sum(const void *key, size_t klen, const void *p, size_t n)
{
    return XXH3_64bits_withSeed(p, n, XXH3_64bits(key, klen));
}

/* A malloc'd envelope around payload p (n bytes) for key. */
static char *env_wrap(int kind, const void *key, size_t klen, const void *p, size_t n, size_t *out_len)
{
    char *v = malloc(ENV_BYTES + n);
    if (!v) return NULL;
    uint16_t k = (uint16_t)kind, ver = MS_FORMAT;
    uint64_t len = n, sum = env_sum(key, klen, p, n);
    memcpy(v, ENV_MAGIC, 4);
    memcpy(v + 4, &k, 2);
    memcpy(v + 6, &ver, 2);
    memcpy(v + 8, &len, 8);
    memcpy(v + 16, &sum, 8);
    if (n) memcpy(v + ENV_BYTES, p, n);
    *out_len = ENV_BYTES + n;
    return v;
}

static void key_text(const char *key, size_t klen, char *out, size_t outlen)
{
    size_t o = 0;
    for (size_t i = 0; i < klen && o + 5 < outlen; i++) {
        unsigned char c = (unsigned char)key[i];
        o += (size_t)snprintf(out + o, outlen - o, c >= 0x20 && c < 0x7f && c != '\\' ? "%c" : "\\x%02x", c);
    }
    out[o] = '\0';
}

/* Checks value v (vlen bytes) stored under key in family cf.  Returns the
 * payload (inside v) and its length, or NULL after reporting the value and,
 * when it is damaged (not merely from a newer format), deleting it. */
static const char *env_open(ms_store *st, int cf, const char *key, size_t klen, const char *v, size_t vlen,
                            size_t *plen)
{
    const char *why = NULL;
    uint16_t kind = 0, ver = 0;
    uint64_t len = 0, sum = 0;
    if (vlen < ENV_BYTES || memcmp(v, ENV_MAGIC, 4) != 0) {
        why = "no envelope (truncated or foreign value)";
    } else {
        memcpy(&kind, v + 4, 2);
        memcpy(&ver, v + 6, 2);
        memcpy(&len, v + 8, 8);
        memcpy(&sum, v + 16, 8);
        if (ver != MS_FORMAT) {
            char kt[128];
            key_text(key, klen, kt, sizeof kt);
            logf_(st, "event=memstore_skip cf=%s key=\"%s\" reason=\"format version %u, this mkad reads %d\"",
                  cf_names[cf], kt, ver, MS_FORMAT);
            return NULL;
        }
        if (kind != cf_kind[cf]) why = "wrong kind";
        else if (len != vlen - ENV_BYTES) why = "length mismatch (truncated)";
        else if (env_sum(key, klen, v + ENV_BYTES, (size_t)len) != sum) why = "checksum mismatch";
    }
    if (!why) {
        *plen = (size_t)len;
        return v + ENV_BYTES;
    }
    char kt[128];
    key_text(key, klen, kt, sizeof kt);
    char *e = NULL;
    rocksdb_delete_cf(st->db, st->w_async, st->cf[cf], key, klen, &e);
    logf_(st, "event=memstore_corrupt cf=%s key=\"%s\" reason=\"%s\" action=%s", cf_names[cf], kt, why,
          e ? "delete_failed" : "dropped");
    rocksdb_free(e);
    __atomic_add_fetch(&st->corrupt_dropped, 1, __ATOMIC_RELAXED);
    return NULL;
}

/* Gets and checks one value: MS_OK with *val (free with rocksdb_free) and
 * the payload span, MS_ENOTFOUND, MS_ECORRUPT or MS_EIO. */
static int get_value(ms_store *st, int cf, const char *key, size_t klen, char **val, const char **payload,
                     size_t *plen, char *err, size_t errlen)
{
    char *e = NULL;
    size_t vlen = 0;
    char *v = rocksdb_get_cf(st->db, st->r, st->cf[cf], key, klen, &vlen, &e);
    if (e) return rdb_err(&e, err, errlen, "read");
    if (!v) return errf(err, errlen, MS_ENOTFOUND, "memstore: not found");
    const char *p = env_open(st, cf, key, klen, v, vlen, plen);
    if (!p) {
        rocksdb_free(v);
        return errf(err, errlen, MS_ECORRUPT, "memstore: stored %s value failed its checks (dropped)",
                    cf_names[cf]);
    }
    *val = v;
    *payload = p;
    return MS_OK;
}

/* ---- warm tier: block payloads in host memory, LRU under a byte budget ---- */

typedef struct warm_ent {
    uint8_t h[MS_HASH_BYTES];
    size_t len;
    struct warm_ent *hnext;      /* bucket chain */
    struct warm_ent *prev, *next; /* LRU list: head.next is the most recent */
    unsigned char data[];
} warm_ent;

typedef struct warm {
    pthread_mutex_t mu;
    warm_ent **tab;
    size_t cap, n;     /* buckets (a power of two), entries */
    warm_ent head;     /* LRU sentinel */
    size_t bytes, budget;
    long hits, evictions;
} warm;

static size_t warm_bucket(const warm *w, const uint8_t *h)
{
    uint64_t x;
    memcpy(&x, h, 8); /* block hashes are uniform already */
    return (size_t)x & (w->cap - 1);
}

static warm *warm_new(size_t budget)
{
    warm *w = calloc(1, sizeof *w);
    if (!w) return NULL;
    w->cap = 1024;
    w->tab = calloc(w->cap, sizeof *w->tab);
    if (!w->tab) {
        free(w);
        return NULL;
    }
    pthread_mutex_init(&w->mu, NULL);
    w->head.prev = w->head.next = &w->head;
    w->budget = budget;
    return w;
}

static void warm_free(warm *w)
{
    if (!w) return;
    for (warm_ent *e = w->head.next, *nx; e != &w->head; e = nx) {
        nx = e->next;
        free(e);
    }
    pthread_mutex_destroy(&w->mu);
    free(w->tab);
    free(w);
}

/* The entry for h and the link that points at it, or NULL. */
static warm_ent *warm_find(warm *w, const uint8_t *h, warm_ent ***link)
{
    warm_ent **l = &w->tab[warm_bucket(w, h)];
    for (; *l; l = &(*l)->hnext)
        if (memcmp((*l)->h, h, MS_HASH_BYTES) == 0) break;
    if (link) *link = l;
    return *l;
}

static void lru_unlink(warm_ent *e)
{
    e->prev->next = e->next;
    e->next->prev = e->prev;
}

static void lru_front(warm *w, warm_ent *e)
{
    e->next = w->head.next;
    e->prev = &w->head;
    w->head.next->prev = e;
    w->head.next = e;
}

static void warm_remove(warm *w, warm_ent *e)
{
    warm_ent **l;
    warm_find(w, e->h, &l);
    *l = e->hnext;
    lru_unlink(e);
    w->bytes -= e->len;
    w->n--;
    free(e);
}

/* Copies h's payload into buf when held warm with exactly len bytes. */
static int warm_get(warm *w, const uint8_t *h, void *buf, size_t len)
{
    pthread_mutex_lock(&w->mu);
    warm_ent *e = warm_find(w, h, NULL);
    int hit = e && e->len == len;
    if (hit) {
        memcpy(buf, e->data, len);
        lru_unlink(e);
        lru_front(w, e);
        w->hits++;
    }
    pthread_mutex_unlock(&w->mu);
    return hit;
}

/* Keeps a copy of a payload (best effort: skipped when it cannot fit or on
 * allocation failure; the block is on disk regardless). */
static void warm_put(warm *w, const uint8_t *h, const void *data, size_t len)
{
    if (len > w->budget) return;
    warm_ent *ne = malloc(sizeof *ne + len);
    if (!ne) return;
    memcpy(ne->h, h, MS_HASH_BYTES);
    ne->len = len;
    memcpy(ne->data, data, len);
    pthread_mutex_lock(&w->mu);
    warm_ent *old = warm_find(w, h, NULL);
    if (old) warm_remove(w, old);
    while (w->bytes + len > w->budget && w->head.prev != &w->head) {
        warm_remove(w, w->head.prev);
        w->evictions++;
    }
    if (w->n >= w->cap) { /* grow to keep chains short */
        warm_ent **nt = calloc(w->cap * 2, sizeof *nt);
        if (nt) {
            free(w->tab);
            w->tab = nt;
            w->cap *= 2;
            for (warm_ent *e = w->head.next; e != &w->head; e = e->next) {
                size_t b = warm_bucket(w, e->h);
                e->hnext = w->tab[b];
                w->tab[b] = e;
            }
        }
    }
    size_t b = warm_bucket(w, h);
    ne->hnext = w->tab[b];
    w->tab[b] = ne;
    lru_front(w, ne);
    w->bytes += len;
    w->n++;
    pthread_mutex_unlock(&w->mu);
}

static void warm_drop(warm *w, const uint8_t *h)
{
    pthread_mutex_lock(&w->mu);
    warm_ent *e = warm_find(w, h, NULL);
    if (e) warm_remove(w, e);
    pthread_mutex_unlock(&w->mu);
}

/* ---- open / close -------------------------------------------------------- */

static char *xstrdup(const char *s)
{
    size_t n = strlen(s) + 1;
    char *d = malloc(n);
    if (d) memcpy(d, s, n);
    return d;
}

void ms_close(ms_store *st)
{
    if (!st) return;
    if (st->db) {
        char *e = NULL;
        rocksdb_flush_wal(st->db, 1, &e);
        rocksdb_free(e);
        for (int i = 0; i < N_CF; i++)
            if (st->cf[i]) rocksdb_column_family_handle_destroy(st->cf[i]);
        rocksdb_close(st->db);
    }
    for (int i = 0; i < N_CF; i++)
        if (st->cf_opt[i]) rocksdb_options_destroy(st->cf_opt[i]);
    if (st->opt) rocksdb_options_destroy(st->opt);
    if (st->w_sync) rocksdb_writeoptions_destroy(st->w_sync);
    if (st->w_async) rocksdb_writeoptions_destroy(st->w_async);
    if (st->r) rocksdb_readoptions_destroy(st->r);
    pthread_rwlock_destroy(&st->gc_lock);
    warm_free(st->warm);
    free(st->identity);
    free(st->dir);
    free(st);
}

/* Binds a new store to the identity, or checks an existing one against it. */
static int check_identity(ms_store *st, char *err, size_t errlen)
{
    static const char key[] = "fingerprint";
    char *v = NULL;
    const char *p;
    size_t n;
    int rc = get_value(st, CF_META, key, sizeof key - 1, &v, &p, &n, err, errlen);
    if (rc == MS_OK) {
        int same = n == strlen(st->identity) && memcmp(p, st->identity, n) == 0;
        if (!same)
            rc = errf(err, errlen, MS_EMISMATCH,
                      "state directory %s was written for another model (%.*s; this one is %s): its sessions "
                      "cannot be reused. Point --state-dir at another directory, or remove %s to start empty",
                      st->dir, (int)(n > 200 ? 200 : n), p, st->identity, st->dir);
        rocksdb_free(v);
        return rc;
    }
    if (rc != MS_ENOTFOUND) return rc;
    /* A store without its fingerprint must be a new one: refuse to adopt
     * sessions of unknown origin. */
    rocksdb_iterator_t *it = rocksdb_create_iterator_cf(st->db, st->r, st->cf[CF_SESSIONS]);
    rocksdb_iter_seek_to_first(it);
    int has_sessions = rocksdb_iter_valid(it);
    rocksdb_iter_destroy(it);
    if (has_sessions)
        return errf(err, errlen, MS_EMISMATCH,
                    "state directory %s holds sessions but no model fingerprint (damaged store): remove %s "
                    "to start empty", st->dir, st->dir);
    size_t vl;
    char *val = env_wrap(KIND_META, key, sizeof key - 1, st->identity, strlen(st->identity), &vl);
    if (!val) return errf(err, errlen, MS_ENOMEM, "memstore: out of memory");
    char *e = NULL;
    rocksdb_put_cf(st->db, st->w_sync, st->cf[CF_META], key, sizeof key - 1, val, vl, &e);
    free(val);
    if (e) return rdb_err(&e, err, errlen, "writing the fingerprint");
    logf_(st, "event=memstore_created dir=%s identity=\"%s\"", st->dir, st->identity);
    return MS_OK;
}

int ms_open(const ms_options *o, ms_store **out, char *err, size_t errlen)
{
    *out = NULL;
    if (!o || !o->dir || !*o->dir || !o->fingerprint || !*o->fingerprint || o->block_tokens <= 0)
        return errf(err, errlen, MS_EINVAL, "memstore: a directory, a fingerprint and a block size are required");
    if (mkdir(o->dir, 0700) != 0 && errno != EEXIST)
        return errf(err, errlen, MS_EIO, "memstore: cannot create %s: %s", o->dir, strerror(errno));
    ms_store *st = calloc(1, sizeof *st);
    if (!st) return errf(err, errlen, MS_ENOMEM, "memstore: out of memory");
    pthread_rwlock_init(&st->gc_lock, NULL);
    st->log = o->log;
    st->log_ctx = o->log_ctx;
    st->block_tokens = o->block_tokens;
    if (o->warm_bytes && !(st->warm = warm_new(o->warm_bytes))) {
        ms_close(st);
        return errf(err, errlen, MS_ENOMEM, "memstore: out of memory");
    }
    size_t il = strlen(o->fingerprint) + 64;
    st->identity = malloc(il);
    st->dir = xstrdup(o->dir);
    st->opt = rocksdb_options_create();
    st->w_sync = rocksdb_writeoptions_create();
    st->w_async = rocksdb_writeoptions_create();
    st->r = rocksdb_readoptions_create();
    if (!st->identity || !st->dir || !st->opt || !st->w_sync || !st->w_async || !st->r) {
        ms_close(st);
        return errf(err, errlen, MS_ENOMEM, "memstore: out of memory");
    }
    snprintf(st->identity, il, "%s block_tokens=%d format=%d", o->fingerprint, o->block_tokens, MS_FORMAT);
    rocksdb_writeoptions_set_sync(st->w_sync, 1);
    rocksdb_readoptions_set_verify_checksums(st->r, 1);

    rocksdb_options_set_create_if_missing(st->opt, 1);
    rocksdb_options_set_create_missing_column_families(st->opt, 1);
    rocksdb_options_set_keep_log_file_num(st->opt, 4);
    rocksdb_options_set_max_open_files(st->opt, 512);
    for (int i = 0; i < N_CF; i++) {
        rocksdb_options_t *c = st->cf_opt[i] = rocksdb_options_create();
        if (!c) {
            ms_close(st);
            return errf(err, errlen, MS_ENOMEM, "memstore: out of memory");
        }
        rocksdb_options_set_compression(c, rocksdb_lz4_compression);
        if (i == CF_BLOCKS) {
            /* K/V blocks are large (tens of KB to MBs): keep them out of the
             * LSM tree in blob files, so compaction does not rewrite them. */
            rocksdb_options_set_enable_blob_files(c, 1);
            rocksdb_options_set_min_blob_size(c, 4096);
            rocksdb_options_set_blob_compression_type(c, rocksdb_lz4_compression);
            rocksdb_options_set_enable_blob_gc(c, 1);
        }
    }
    char *e = NULL;
    st->db = rocksdb_open_column_families(st->opt, o->dir, N_CF, cf_names,
                                          (const rocksdb_options_t *const *)st->cf_opt, st->cf, &e);
    if (e) {
        int locked = strstr(e, "lock") != NULL || strstr(e, "LOCK") != NULL;
        int rc = locked ? errf(err, errlen, MS_ELOCKED,
                               "state directory %s is in use by another process (%s): stop the other mkad or "
                               "give this one another --state-dir", o->dir, e)
                        : errf(err, errlen, MS_EIO, "memstore: cannot open %s: %s", o->dir, e);
        rocksdb_free(e);
        st->db = NULL;
        memset(st->cf, 0, sizeof st->cf);
        ms_close(st);
        return rc;
    }
    int rc = check_identity(st, err, errlen);
    if (rc != MS_OK) {
        ms_close(st);
        return rc;
    }
    *out = st;
    return MS_OK;
}

/* ---- keys ---------------------------------------------------------------- */

/* user \0 rest[rn] into buf (MS_MAX_NAME*2+2 bytes); returns its length. */
static size_t make_key(char *buf, const char *user, const void *rest, size_t rn)
{
    size_t un = strlen(user);
    memcpy(buf, user, un);
    buf[un] = '\0';
    memcpy(buf + un + 1, rest, rn);
    return un + 1 + rn;
}

static void be64(uint64_t x, unsigned char *o)
{
    for (int i = 7; i >= 0; i--, x >>= 8) o[i] = (unsigned char)x;
}

static uint64_t from_be64(const unsigned char *p)
{
    uint64_t x = 0;
    for (int i = 0; i < 8; i++) x = x << 8 | p[i];
    return x;
}

/* ---- block identity ------------------------------------------------------ */

int ms_block_hashes(const ms_store *st, const char *user, const uint64_t *bank, int n_bank,
                    const int32_t *tokens, int n_tokens, uint8_t *out)
{
    XXH3_state_t s;
    XXH128_canonical_t c;
    XXH3_128bits_reset(&s);
    XXH3_128bits_update(&s, st->identity, strlen(st->identity) + 1);
    XXH3_128bits_update(&s, user, strlen(user) + 1);
    XXH3_128bits_update(&s, &n_bank, sizeof n_bank);
    if (n_bank > 0) XXH3_128bits_update(&s, bank, (size_t)n_bank * sizeof *bank);
    XXH128_canonicalFromHash(&c, XXH3_128bits_digest(&s));
    const int B = st->block_tokens, n = n_tokens / B;
    for (int i = 0; i < n; i++) {
        XXH3_128bits_reset(&s);
        XXH3_128bits_update(&s, c.digest, sizeof c.digest);
        XXH3_128bits_update(&s, tokens + (size_t)i * B, (size_t)B * sizeof *tokens);
        XXH128_canonicalFromHash(&c, XXH3_128bits_digest(&s));
        memcpy(out + (size_t)i * MS_HASH_BYTES, c.digest, MS_HASH_BYTES);
    }
    return n;
}

/* ---- sessions ------------------------------------------------------------ */

/* Session record payload: u32 n_tokens, n_blocks, n_bank, user_len, id_len;
 * i64 created_ms, used_ms; user; id; tokens (i32); hashes; bank (u64). */
#define REC_HDR (5 * 4 + 2 * 8)

static char *session_encode(const ms_session *s, size_t *len)
{
    uint32_t h[5] = { (uint32_t)s->n_tokens, (uint32_t)s->n_blocks, (uint32_t)s->n_bank,
                      (uint32_t)strlen(s->user), (uint32_t)strlen(s->id) };
    size_t n = REC_HDR + h[3] + h[4] + (size_t)s->n_tokens * 4 + (size_t)s->n_blocks * MS_HASH_BYTES +
               (size_t)s->n_bank * 8;
    char *p = malloc(n), *q = p;
    if (!p) return NULL;
#define PUT(src, sz) ((sz) != 0 ? (memcpy(q, (src), (sz)), q += (sz)) : q)
    PUT(h, sizeof h);
    PUT(&s->created_ms, 8);
    PUT(&s->used_ms, 8);
    PUT(s->user, h[3]);
    PUT(s->id, h[4]);
    PUT(s->tokens, (size_t)s->n_tokens * 4);
    PUT(s->hashes, (size_t)s->n_blocks * MS_HASH_BYTES);
    PUT(s->bank, (size_t)s->n_bank * 8);
#undef PUT
    *len = n;
    return p;
}

void ms_session_free(ms_session *s)
{
    if (!s) return;
    free(s->user);
    free(s->id);
    free(s->tokens);
    free(s->hashes);
    free(s->bank);
    free(s);
}

/* Decodes a record; NULL when malformed (*oom set when allocation failed). */
static ms_session *session_decode(const char *p, size_t n, int *oom)
{
    *oom = 0;
    uint32_t h[5];
    if (n < REC_HDR) return NULL;
    memcpy(h, p, sizeof h);
    if (h[3] == 0 || h[3] > MS_MAX_NAME || h[4] == 0 || h[4] > MS_MAX_NAME || h[0] > (1u << 30) ||
        h[1] > h[0] || h[2] > (1u << 20))
        return NULL;
    size_t need = REC_HDR + h[3] + h[4] + (size_t)h[0] * 4 + (size_t)h[1] * MS_HASH_BYTES + (size_t)h[2] * 8;
    if (need != n) return NULL;
    ms_session *s = calloc(1, sizeof *s);
    if (!s) goto oom;
    s->n_tokens = (int)h[0];
    s->n_blocks = (int)h[1];
    s->n_bank = (int)h[2];
    const char *q = p + sizeof h;
    memcpy(&s->created_ms, q, 8);
    memcpy(&s->used_ms, q + 8, 8);
    q += 16;
    s->user = calloc(h[3] + 1, 1);
    s->id = calloc(h[4] + 1, 1);
    s->tokens = malloc((size_t)h[0] * 4 + 4);
    s->hashes = malloc((size_t)h[1] * MS_HASH_BYTES + 1);
    s->bank = malloc((size_t)h[2] * 8 + 8);
    if (!s->user || !s->id || !s->tokens || !s->hashes || !s->bank) goto oom;
    memcpy(s->user, q, h[3]);
    q += h[3];
    memcpy(s->id, q, h[4]);
    q += h[4];
    memcpy(s->tokens, q, (size_t)h[0] * 4);
    q += (size_t)h[0] * 4;
    memcpy(s->hashes, q, (size_t)h[1] * MS_HASH_BYTES);
    q += (size_t)h[1] * MS_HASH_BYTES;
    memcpy(s->bank, q, (size_t)h[2] * 8);
    return s;
oom:
    ms_session_free(s);
    *oom = 1;
    return NULL;
}

int ms_session_put(ms_store *st, const ms_session *s, const ms_block *blocks, int n, int sync, char *err,
                   size_t errlen)
{
    if (!s || !name_ok(s->user) || !name_ok(s->id) || s->n_tokens < 0 || s->n_blocks < 0 ||
        (long)s->n_blocks * st->block_tokens > s->n_tokens || s->n_bank < 0 || n < 0 ||
        (s->n_tokens && !s->tokens) || (s->n_blocks && !s->hashes) || (s->n_bank && !s->bank))
        return errf(err, errlen, MS_EINVAL, "memstore: invalid session record");
    char key[2 * MS_MAX_NAME + 2];
    size_t kl = make_key(key, s->user, s->id, strlen(s->id));
    size_t pl, vl;
    char *payload = session_encode(s, &pl);
    char *val = payload ? env_wrap(KIND_SESSION, key, kl, payload, pl, &vl) : NULL;
    free(payload);
    rocksdb_writebatch_t *wb = val ? rocksdb_writebatch_create() : NULL;
    if (!wb) {
        free(val);
        return errf(err, errlen, MS_ENOMEM, "memstore: out of memory");
    }
    int rc = MS_OK;
    for (int i = 0; i < n && rc == MS_OK; i++) {
        size_t bl;
        char *bv = env_wrap(KIND_BLOCK, (const char *)blocks[i].hash, MS_HASH_BYTES, blocks[i].data,
                            blocks[i].len, &bl);
        if (!bv) {
            rc = errf(err, errlen, MS_ENOMEM, "memstore: out of memory");
            break;
        }
        rocksdb_writebatch_put_cf(wb, st->cf[CF_BLOCKS], (const char *)blocks[i].hash, MS_HASH_BYTES, bv, bl);
        free(bv);
    }
    if (rc == MS_OK) {
        rocksdb_writebatch_put_cf(wb, st->cf[CF_SESSIONS], key, kl, val, vl);
        char *e = NULL;
        pthread_rwlock_rdlock(&st->gc_lock);
        rocksdb_write(st->db, sync ? st->w_sync : st->w_async, wb, &e);
        pthread_rwlock_unlock(&st->gc_lock);
        if (e) rc = rdb_err(&e, err, errlen, "writing a session");
    }
    if (rc == MS_OK && st->warm)
        for (int i = 0; i < n; i++) warm_put(st->warm, blocks[i].hash, blocks[i].data, blocks[i].len);
    rocksdb_writebatch_destroy(wb);
    free(val);
    return rc;
}

int ms_session_get(ms_store *st, const char *user, const char *id, ms_session **out, char *err, size_t errlen)
{
    *out = NULL;
    if (!name_ok(user) || !name_ok(id)) return errf(err, errlen, MS_EINVAL, "memstore: invalid user or session id");
    char key[2 * MS_MAX_NAME + 2];
    size_t kl = make_key(key, user, id, strlen(id)), n;
    char *v;
    const char *p;
    int rc = get_value(st, CF_SESSIONS, key, kl, &v, &p, &n, err, errlen);
    if (rc != MS_OK) return rc;
    int oom;
    ms_session *s = session_decode(p, n, &oom);
    rocksdb_free(v);
    if (!s && oom) return errf(err, errlen, MS_ENOMEM, "memstore: out of memory");
    if (!s || strcmp(s->user, user) != 0 || strcmp(s->id, id) != 0) {
        ms_session_free(s);
        /* The checksum held, so the writer wrote it so: still never trusted. */
        logf_(st, "event=memstore_corrupt cf=sessions reason=\"malformed record\" action=ignored");
        __atomic_add_fetch(&st->corrupt_dropped, 1, __ATOMIC_RELAXED);
        return errf(err, errlen, MS_ECORRUPT, "memstore: malformed session record");
    }
    *out = s;
    return MS_OK;
}

int ms_session_delete(ms_store *st, const char *user, const char *id, char *err, size_t errlen)
{
    if (!name_ok(user) || !name_ok(id)) return errf(err, errlen, MS_EINVAL, "memstore: invalid user or session id");
    char key[2 * MS_MAX_NAME + 2];
    size_t kl = make_key(key, user, id, strlen(id));
    char *e = NULL;
    rocksdb_delete_cf(st->db, st->w_sync, st->cf[CF_SESSIONS], key, kl, &e);
    return e ? rdb_err(&e, err, errlen, "deleting a session") : MS_OK;
}

/* An iterator over family cf from `start` (klen bytes; NULL: the first key)
 * to just before `upper` (NULL: the end).  The bound is copied into *ub
 * (freed by the caller after the iterator), as RocksDB needs it to live on. */
typedef struct scan {
    rocksdb_iterator_t *it;
    rocksdb_readoptions_t *ro;
} scan;

static int scan_open(ms_store *st, int cf, const char *start, size_t sl, const char *upper, size_t ul, scan *sc)
{
    sc->ro = rocksdb_readoptions_create();
    if (!sc->ro) return MS_ENOMEM;
    rocksdb_readoptions_set_verify_checksums(sc->ro, 1);
    if (upper) rocksdb_readoptions_set_iterate_upper_bound(sc->ro, upper, ul);
    sc->it = rocksdb_create_iterator_cf(st->db, sc->ro, st->cf[cf]);
    if (!sc->it) {
        rocksdb_readoptions_destroy(sc->ro);
        return MS_ENOMEM;
    }
    if (start) rocksdb_iter_seek(sc->it, start, sl);
    else rocksdb_iter_seek_to_first(sc->it);
    return MS_OK;
}

static int scan_close(scan *sc, char *err, size_t errlen)
{
    char *e = NULL;
    rocksdb_iter_get_error(sc->it, &e);
    rocksdb_iter_destroy(sc->it);
    rocksdb_readoptions_destroy(sc->ro);
    return e ? rdb_err(&e, err, errlen, "scan") : MS_OK;
}

int ms_session_list(ms_store *st, const char *user, const char *after_user, const char *after_id,
                    int (*fn)(void *ctx, const ms_session *s), void *ctx, char *err, size_t errlen)
{
    if ((user && !name_ok(user)) || (after_user && !name_ok(after_user)) || (after_id && !name_ok(after_id)) ||
        (!after_user != !after_id) || (user && after_user && strcmp(user, after_user) != 0))
        return errf(err, errlen, MS_EINVAL, "memstore: invalid listing filter");
    char lo[2 * MS_MAX_NAME + 3], hi[MS_MAX_NAME + 2];
    size_t ll = 0, hl = 0;
    if (after_user) {
        ll = make_key(lo, after_user, after_id, strlen(after_id));
        lo[ll++] = '\0'; /* the next key after (after_user, after_id) */
    } else if (user) {
        ll = make_key(lo, user, "", 0);
    }
    if (user) {
        hl = make_key(hi, user, "", 0);
        hi[hl - 1] = '\1';
    }
    scan sc;
    if (scan_open(st, CF_SESSIONS, ll ? lo : NULL, ll, user ? hi : NULL, hl, &sc) != MS_OK)
        return errf(err, errlen, MS_ENOMEM, "memstore: out of memory");
    int rc = MS_OK;
    for (; rocksdb_iter_valid(sc.it); rocksdb_iter_next(sc.it)) {
        size_t kl, vl, pl;
        const char *k = rocksdb_iter_key(sc.it, &kl), *v = rocksdb_iter_value(sc.it, &vl);
        const char *p = env_open(st, CF_SESSIONS, k, kl, v, vl, &pl);
        if (!p) continue;
        int oom;
        ms_session *s = session_decode(p, pl, &oom);
        if (!s) {
            if (oom) {
                rc = errf(err, errlen, MS_ENOMEM, "memstore: out of memory");
                break;
            }
            continue;
        }
        int stop = fn(ctx, s);
        ms_session_free(s);
        if (stop) break;
    }
    int rc2 = scan_close(&sc, err, errlen);
    return rc != MS_OK ? rc : rc2;
}

/* ---- blocks -------------------------------------------------------------- */

int ms_block_get(ms_store *st, const uint8_t *hash, void *buf, size_t len, int *tier, char *err,
                 size_t errlen)
{
    if (tier) *tier = 0;
    if (st->warm && warm_get(st->warm, hash, buf, len)) {
        if (tier) *tier = MS_TIER_WARM;
        return MS_OK;
    }
    char *v;
    const char *p;
    size_t n;
    int rc = get_value(st, CF_BLOCKS, (const char *)hash, MS_HASH_BYTES, &v, &p, &n, err, errlen);
    if (rc == MS_OK && n != len) {
        rocksdb_free(v);
        rc = errf(err, errlen, MS_ECORRUPT, "memstore: stored block has %zu bytes, expected %zu", n, len);
    }
    if (rc != MS_OK) {
        __atomic_add_fetch(&st->misses, 1, __ATOMIC_RELAXED);
        return rc;
    }
    memcpy(buf, p, n);
    rocksdb_free(v);
    __atomic_add_fetch(&st->disk_hits, 1, __ATOMIC_RELAXED);
    if (st->warm) warm_put(st->warm, hash, buf, n);
    if (tier) *tier = MS_TIER_DISK;
    return MS_OK;
}

int ms_session_warm_blocks(ms_store *st, const ms_session *s)
{
    if (!st->warm) return 0;
    int n = 0;
    pthread_mutex_lock(&st->warm->mu);
    for (int i = 0; i < s->n_blocks; i++) n += warm_find(st->warm, s->hashes + (size_t)i * MS_HASH_BYTES, NULL) != NULL;
    pthread_mutex_unlock(&st->warm->mu);
    return n;
}

int ms_block_is_warm(ms_store *st, const uint8_t *hash)
{
    if (!st->warm) return 0;
    pthread_mutex_lock(&st->warm->mu);
    int in = warm_find(st->warm, hash, NULL) != NULL;
    pthread_mutex_unlock(&st->warm->mu);
    return in;
}

int ms_evict(ms_store *st, const char *user, const char *id, int tiers, char *err, size_t errlen)
{
    ms_session *s = NULL;
    int rc = ms_session_get(st, user, id, &s, err, errlen);
    if (rc != MS_OK) return rc;
    if ((tiers & MS_TIER_WARM) && st->warm)
        for (int i = 0; i < s->n_blocks; i++) warm_drop(st->warm, s->hashes + (size_t)i * MS_HASH_BYTES);
    ms_session_free(s);
    return (tiers & MS_TIER_DISK) ? ms_session_delete(st, user, id, err, errlen) : MS_OK;
}

static int cmp_hash(const void *a, const void *b)
{
    return memcmp(a, b, MS_HASH_BYTES);
}

typedef struct live_set {
    uint8_t *h;
    size_t n, cap;
    int oom;
} live_set;

static int collect_live(void *ctx, const ms_session *s)
{
    live_set *ls = ctx;
    if (ls->n + (size_t)s->n_blocks > ls->cap) {
        size_t cap = (ls->n + (size_t)s->n_blocks) * 2 + 64;
        uint8_t *h = realloc(ls->h, cap * MS_HASH_BYTES);
        if (!h) {
            ls->oom = 1;
            return 1;
        }
        ls->h = h;
        ls->cap = cap;
    }
    memcpy(ls->h + ls->n * MS_HASH_BYTES, s->hashes, (size_t)s->n_blocks * MS_HASH_BYTES);
    ls->n += (size_t)s->n_blocks;
    return 0;
}

int ms_gc(ms_store *st, long *n_deleted, char *err, size_t errlen)
{
    if (n_deleted) *n_deleted = 0;
    /* No block writer runs while the live set is taken and the rest deleted. */
    pthread_rwlock_wrlock(&st->gc_lock);
    live_set ls = { 0 };
    int rc = ms_session_list(st, NULL, NULL, NULL, collect_live, &ls, err, errlen);
    if (rc == MS_OK && ls.oom) rc = errf(err, errlen, MS_ENOMEM, "memstore: out of memory");
    long del = 0;
    if (rc == MS_OK) {
        if (ls.n) qsort(ls.h, ls.n, MS_HASH_BYTES, cmp_hash);
        scan sc;
        rocksdb_writebatch_t *wb = rocksdb_writebatch_create();
        if (!wb || scan_open(st, CF_BLOCKS, NULL, 0, NULL, 0, &sc) != MS_OK) {
            rc = errf(err, errlen, MS_ENOMEM, "memstore: out of memory");
        } else {
            for (; rocksdb_iter_valid(sc.it); rocksdb_iter_next(sc.it)) {
                size_t kl;
                const char *k = rocksdb_iter_key(sc.it, &kl);
                if (kl == MS_HASH_BYTES && ls.n && bsearch(k, ls.h, ls.n, MS_HASH_BYTES, cmp_hash)) continue;
                rocksdb_writebatch_delete_cf(wb, st->cf[CF_BLOCKS], k, kl);
                if (st->warm && kl == MS_HASH_BYTES) warm_drop(st->warm, (const uint8_t *)k);
                del++;
            }
            rc = scan_close(&sc, err, errlen);
            if (rc == MS_OK && del) {
                char *e = NULL;
                rocksdb_write(st->db, st->w_sync, wb, &e);
                if (e) rc = rdb_err(&e, err, errlen, "deleting unreferenced blocks");
            }
        }
        if (wb) rocksdb_writebatch_destroy(wb);
    }
    pthread_rwlock_unlock(&st->gc_lock);
    free(ls.h);
    if (rc == MS_OK && n_deleted) *n_deleted = del;
    return rc;
}

/* ---- long-term chunks ---------------------------------------------------- */

static size_t chunk_key(char *buf, const char *user, uint64_t id)
{
    unsigned char b[8];
    be64(id, b);
    return make_key(buf, user, b, 8);
}

int ms_chunk_put(ms_store *st, const char *user, uint64_t chunk_id, const void *data, size_t len, int sync,
                 char *err, size_t errlen)
{
    if (!name_ok(user) || (!data && len)) return errf(err, errlen, MS_EINVAL, "memstore: invalid chunk");
    char key[MS_MAX_NAME + 10];
    size_t kl = chunk_key(key, user, chunk_id), vl;
    char *v = env_wrap(KIND_CHUNK, key, kl, data, len, &vl);
    if (!v) return errf(err, errlen, MS_ENOMEM, "memstore: out of memory");
    char *e = NULL;
    rocksdb_put_cf(st->db, sync ? st->w_sync : st->w_async, st->cf[CF_LONGTERM], key, kl, v, vl, &e);
    free(v);
    return e ? rdb_err(&e, err, errlen, "writing a chunk") : MS_OK;
}

int ms_chunk_get(ms_store *st, const char *user, uint64_t chunk_id, void **data, size_t *len, char *err,
                 size_t errlen)
{
    *data = NULL;
    *len = 0;
    if (!name_ok(user)) return errf(err, errlen, MS_EINVAL, "memstore: invalid user");
    char key[MS_MAX_NAME + 10];
    size_t kl = chunk_key(key, user, chunk_id), n;
    char *v;
    const char *p;
    int rc = get_value(st, CF_LONGTERM, key, kl, &v, &p, &n, err, errlen);
    if (rc != MS_OK) return rc;
    void *d = malloc(n ? n : 1);
    if (d) memcpy(d, p, n);
    rocksdb_free(v);
    if (!d) return errf(err, errlen, MS_ENOMEM, "memstore: out of memory");
    *data = d;
    *len = n;
    return MS_OK;
}

/* Scans user's chunks; with fn, calls it per chunk; with wb, adds deletes. */
static int chunk_scan(ms_store *st, const char *user,
                      int (*fn)(void *ctx, uint64_t chunk_id, const void *data, size_t len), void *ctx,
                      rocksdb_writebatch_t *wb, long *count, char *err, size_t errlen)
{
    if (!name_ok(user)) return errf(err, errlen, MS_EINVAL, "memstore: invalid user");
    char lo[MS_MAX_NAME + 2], hi[MS_MAX_NAME + 2];
    size_t ll = make_key(lo, user, "", 0), hl = make_key(hi, user, "", 0);
    hi[hl - 1] = '\1';
    scan sc;
    if (scan_open(st, CF_LONGTERM, lo, ll, hi, hl, &sc) != MS_OK)
        return errf(err, errlen, MS_ENOMEM, "memstore: out of memory");
    long c = 0;
    for (; rocksdb_iter_valid(sc.it); rocksdb_iter_next(sc.it)) {
        size_t kl, vl, pl;
        const char *k = rocksdb_iter_key(sc.it, &kl);
        if (wb) {
            rocksdb_writebatch_delete_cf(wb, st->cf[CF_LONGTERM], k, kl);
            c++;
            continue;
        }
        const char *v = rocksdb_iter_value(sc.it, &vl);
        const char *p = env_open(st, CF_LONGTERM, k, kl, v, vl, &pl);
        if (!p || kl != ll + 8) continue;
        c++;
        if (fn(ctx, from_be64((const unsigned char *)k + ll), p, pl)) break;
    }
    if (count) *count = c;
    return scan_close(&sc, err, errlen);
}

int ms_chunk_list(ms_store *st, const char *user,
                  int (*fn)(void *ctx, uint64_t chunk_id, const void *data, size_t len), void *ctx, char *err,
                  size_t errlen)
{
    return chunk_scan(st, user, fn, ctx, NULL, NULL, err, errlen);
}

int ms_chunk_delete_user(ms_store *st, const char *user, long *n_deleted, char *err, size_t errlen)
{
    long n = 0;
    rocksdb_writebatch_t *wb = rocksdb_writebatch_create();
    if (!wb) return errf(err, errlen, MS_ENOMEM, "memstore: out of memory");
    int rc = chunk_scan(st, user, NULL, NULL, wb, &n, err, errlen);
    if (rc == MS_OK && n) {
        char *e = NULL;
        rocksdb_write(st->db, st->w_sync, wb, &e);
        if (e) rc = rdb_err(&e, err, errlen, "deleting chunks");
    }
    rocksdb_writebatch_destroy(wb);
    if (n_deleted) *n_deleted = rc == MS_OK ? n : 0;
    return rc;
}

int ms_chunk_delete(ms_store *st, const char *user, uint64_t chunk_id, char *err, size_t errlen)
{
    if (!name_ok(user)) return errf(err, errlen, MS_EINVAL, "memstore: invalid user");
    char key[MS_MAX_NAME + 10];
    size_t kl = chunk_key(key, user, chunk_id);
    char *e = NULL;
    rocksdb_delete_cf(st->db, st->w_async, st->cf[CF_LONGTERM], key, kl, &e);
    return e ? rdb_err(&e, err, errlen, "deleting a chunk") : MS_OK;
}

int ms_sync(ms_store *st, char *err, size_t errlen)
{
    char *e = NULL;
    rocksdb_flush_wal(st->db, 1, &e);
    return e ? rdb_err(&e, err, errlen, "syncing the write-ahead log") : MS_OK;
}

/* ---- totals -------------------------------------------------------------- */

static uint64_t prop_u64(ms_store *st, int cf, const char *name)
{
    char *v = rocksdb_property_value_cf(st->db, st->cf[cf], name);
    uint64_t x = v ? strtoull(v, NULL, 10) : 0;
    rocksdb_free(v);
    return x;
}

int ms_get_stats(ms_store *st, ms_stats *out, char *err, size_t errlen)
{
    memset(out, 0, sizeof *out);
    static const int fams[3] = { CF_SESSIONS, CF_BLOCKS, CF_LONGTERM };
    long *counts[3] = { &out->sessions, &out->blocks, &out->chunks };
    uint64_t *bytes[3] = { &out->sessions_bytes, &out->blocks_bytes, &out->chunks_bytes };
    for (int f = 0; f < 3; f++) {
        scan sc;
        if (scan_open(st, fams[f], NULL, 0, NULL, 0, &sc) != MS_OK)
            return errf(err, errlen, MS_ENOMEM, "memstore: out of memory");
        for (; rocksdb_iter_valid(sc.it); rocksdb_iter_next(sc.it)) {
            size_t vl;
            rocksdb_iter_value(sc.it, &vl);
            (*counts[f])++;
            *bytes[f] += vl;
        }
        int rc = scan_close(&sc, err, errlen);
        if (rc != MS_OK) return rc;
    }
    for (int i = 0; i < N_CF; i++)
        out->disk_bytes += prop_u64(st, i, "rocksdb.total-sst-files-size") +
                           prop_u64(st, i, "rocksdb.total-blob-file-size");
    out->corrupt_dropped = __atomic_load_n(&st->corrupt_dropped, __ATOMIC_RELAXED);
    out->disk_hits = __atomic_load_n(&st->disk_hits, __ATOMIC_RELAXED);
    out->misses = __atomic_load_n(&st->misses, __ATOMIC_RELAXED);
    if (st->warm) {
        pthread_mutex_lock(&st->warm->mu);
        out->warm_bytes = st->warm->bytes;
        out->warm_budget = st->warm->budget;
        out->warm_blocks = (long)st->warm->n;
        out->warm_hits = st->warm->hits;
        out->warm_evictions = st->warm->evictions;
        pthread_mutex_unlock(&st->warm->mu);
    }
    return MS_OK;
}

int ms_compact(ms_store *st, char *err, size_t errlen)
{
    (void)err;
    (void)errlen;
    for (int i = 0; i < N_CF; i++) rocksdb_compact_range_cf(st->db, st->cf[i], NULL, 0, NULL, 0);
    return MS_OK;
}
