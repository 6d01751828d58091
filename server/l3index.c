/*
 * l3index.c — the retrieval index of users' long-term (L3) chunks: per user,
 * an in-memory packed matrix of the chunks' retrieval keys e (D floats
 * each, contiguous) with their ids, source session ids and |e|^2, loaded
 * from the store on the user's first retrieval and kept in sync by the
 * store's writes and deletes.  A retrieval then reads n*D floats from
 * memory instead of scanning n chunk values (each n_layers*D floats and an
 * envelope checksum) out of RocksDB.
 *
 * Exact: the score of a chunk is computed with the same operations in the
 * same order as the scan it replaces (double sums of e*q and e*e over d,
 * then dot / sqrt(|e|^2 |q|^2)), and ties go to the smaller chunk id, which
 * is the order the scan visits them in; so the top R are the same chunks in
 * the same order (tests/l3_index.sh checks it against the scan).
 *
 * Memory: users' matrices share a byte budget; beyond it the least recently
 * used user's index is dropped (it is rebuilt by a scan when needed).
 * Thread-safe (one mutex): the store's thread uses it, the admin routes
 * drop a user whose memory they deleted.
 */
#include "config.h"

#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "srv_internal.h"

typedef struct uidx {
    char user[SRV_USER_MAX + 1];
    int n, cap;
    float *e;         /* (cap, D) */
    double *en;       /* (cap) |e|^2 */
    uint64_t *ids;    /* (cap) */
    char **sid;       /* (cap) the chunk's session id (owned) */
    int *slot;        /* (nslot) open addressing: entry index + 1, 0 empty, -1 deleted */
    int nslot;
    uint64_t used;    /* LRU clock */
    struct uidx *next;
} uidx;

struct srv_l3index {
    pthread_mutex_t mu;
    int d;
    size_t budget, bytes;
    uint64_t clock;
    uidx *users;
};

static size_t entry_bytes(int d)
{
    return (size_t)d * sizeof(float) + sizeof(double) + sizeof(uint64_t) + sizeof(char *) + 2 * sizeof(int);
}

srv_l3index *srv_l3index_new(int d_model, size_t budget)
{
    srv_l3index *ix = calloc(1, sizeof *ix);
    if (!ix) return NULL;
    pthread_mutex_init(&ix->mu, NULL);
    ix->d = d_model;
    ix->budget = budget;
    return ix;
}

static void uidx_free(uidx *u)
{
    for (int i = 0; i < u->n; i++) free(u->sid[i]);
    free(u->e);
    free(u->en);
    free(u->ids);
    free(u->sid);
    free(u->slot);
    free(u);
}

static uint64_t mix(uint64_t x)
{
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    return x;
}

/* The slot of id (or where it would go, with *found = 0). */
static int slot_of(const uidx *u, uint64_t id, int *found)
{
    int mask = u->nslot - 1, tomb = -1;
    for (int s = (int)(mix(id) & (uint64_t)mask);; s = (s + 1) & mask) {
        int v = u->slot[s];
        if (v == 0) {
            *found = 0;
            return tomb >= 0 ? tomb : s;
        }
        if (v < 0) {
            if (tomb < 0) tomb = s;
        } else if (u->ids[v - 1] == id) {
            *found = 1;
            return s;
        }
    }
}

static int rehash(uidx *u, int nslot)
{
    int *ns = calloc((size_t)nslot, sizeof *ns);
    if (!ns) return -1;
    free(u->slot);
    u->slot = ns;
    u->nslot = nslot;
    for (int i = 0; i < u->n; i++) {
        int f, s = slot_of(u, u->ids[i], &f);
        u->slot[s] = i + 1;
    }
    return 0;
}

static int grow(srv_l3index *ix, uidx *u)
{
    if (u->n < u->cap) return 0;
    int cap = u->cap ? u->cap * 2 : 64;
    float *e = realloc(u->e, (size_t)cap * ix->d * sizeof *e);
    if (e) u->e = e;
    double *en = realloc(u->en, (size_t)cap * sizeof *en);
    if (en) u->en = en;
    uint64_t *ids = realloc(u->ids, (size_t)cap * sizeof *ids);
    if (ids) u->ids = ids;
    char **sid = realloc(u->sid, (size_t)cap * sizeof *sid);
    if (sid) u->sid = sid;
    if (!e || !en || !ids || !sid) return -1;
    ix->bytes += (size_t)(cap - u->cap) * entry_bytes(ix->d);
    u->cap = cap;
    return rehash(u, cap * 2);
}

static uidx *find(srv_l3index *ix, const char *user)
{
    for (uidx *u = ix->users; u; u = u->next)
        if (strcmp(u->user, user) == 0) return u;
    return NULL;
}

static void unlink_user(srv_l3index *ix, uidx *u)
{
    for (uidx **l = &ix->users; *l; l = &(*l)->next)
        if (*l == u) {
            *l = u->next;
            break;
        }
    ix->bytes -= (size_t)u->cap * entry_bytes(ix->d);
    uidx_free(u);
}

/* Drops least recently used users (other than keep) while over budget. */
static void trim(srv_l3index *ix, const uidx *keep)
{
    while (ix->bytes > ix->budget) {
        uidx *old = NULL;
        for (uidx *u = ix->users; u; u = u->next)
            if (u != keep && (!old || u->used < old->used)) old = u;
        if (!old) return;
        unlink_user(ix, old);
    }
}

/* Adds or replaces one entry (mu held). */
static int put_locked(srv_l3index *ix, uidx *u, uint64_t id, const char *sid, size_t sid_len, const float *e)
{
    int f, s = slot_of(u, id, &f), i;
    char *sc = malloc(sid_len + 1);
    if (!sc) return -1;
    memcpy(sc, sid, sid_len);
    sc[sid_len] = '\0';
    if (f) {
        i = u->slot[s] - 1;
        free(u->sid[i]);
    } else {
        if (grow(ix, u) != 0) {
            free(sc);
            return -1;
        }
        s = slot_of(u, id, &f); /* the table may have been rebuilt */
        i = u->n++;
        u->slot[s] = i + 1;
        u->ids[i] = id;
    }
    u->sid[i] = sc;
    float *row = u->e + (size_t)i * ix->d;
    memcpy(row, e, (size_t)ix->d * sizeof *row);
    double en = 0;
    for (int d = 0; d < ix->d; d++) en += (double)row[d] * row[d];
    u->en[i] = en;
    return 0;
}

int srv_l3index_loaded(srv_l3index *ix, const char *user)
{
    pthread_mutex_lock(&ix->mu);
    int r = find(ix, user) != NULL;
    pthread_mutex_unlock(&ix->mu);
    return r;
}

int srv_l3index_begin(srv_l3index *ix, const char *user)
{
    pthread_mutex_lock(&ix->mu);
    uidx *u = find(ix, user);
    if (u) unlink_user(ix, u);
    u = calloc(1, sizeof *u);
    if (u) {
        snprintf(u->user, sizeof u->user, "%s", user);
        u->used = ++ix->clock;
        u->next = ix->users;
        ix->users = u;
        if (rehash(u, 16) != 0) {
            unlink_user(ix, u);
            u = NULL;
        }
    }
    pthread_mutex_unlock(&ix->mu);
    return u ? 0 : -1;
}

int srv_l3index_put(srv_l3index *ix, const char *user, uint64_t id, const char *sid, size_t sid_len,
                    const float *e)
{
    pthread_mutex_lock(&ix->mu);
    uidx *u = find(ix, user);
    int rc = 0;
    if (u && put_locked(ix, u, id, sid, sid_len, e) != 0) {
        unlink_user(ix, u); /* incomplete: rebuilt by a scan when needed */
        rc = -1;
    }
    if (u && rc == 0) trim(ix, u);
    pthread_mutex_unlock(&ix->mu);
    return rc;
}

void srv_l3index_del(srv_l3index *ix, const char *user, uint64_t id)
{
    pthread_mutex_lock(&ix->mu);
    uidx *u = find(ix, user);
    int f, s = u ? slot_of(u, id, &f) : 0;
    if (u && f) {
        int i = u->slot[s] - 1, last = u->n - 1;
        u->slot[s] = -1;
        free(u->sid[i]);
        if (i != last) { /* the last entry moves into the hole */
            int fl, sl = slot_of(u, u->ids[last], &fl);
            u->slot[sl] = i + 1;
            memcpy(u->e + (size_t)i * ix->d, u->e + (size_t)last * ix->d, (size_t)ix->d * sizeof *u->e);
            u->en[i] = u->en[last];
            u->ids[i] = u->ids[last];
            u->sid[i] = u->sid[last];
        }
        u->n--;
    }
    pthread_mutex_unlock(&ix->mu);
}

void srv_l3index_drop(srv_l3index *ix, const char *user)
{
    if (!ix) return;
    pthread_mutex_lock(&ix->mu);
    uidx *u = find(ix, user);
    if (u) unlink_user(ix, u);
    pthread_mutex_unlock(&ix->mu);
}

int srv_l3index_count(srv_l3index *ix, const char *user)
{
    pthread_mutex_lock(&ix->mu);
    uidx *u = find(ix, user);
    int n = u ? u->n : -1;
    pthread_mutex_unlock(&ix->mu);
    return n;
}

int srv_l3index_top(srv_l3index *ix, const char *user, const char *exclude_sid, const float *q, int r,
                    uint64_t *ids, double *scores)
{
    pthread_mutex_lock(&ix->mu);
    uidx *u = find(ix, user);
    if (!u) {
        pthread_mutex_unlock(&ix->mu);
        return -1;
    }
    u->used = ++ix->clock;
    double qn = 0;
    for (int d = 0; d < ix->d; d++) qn += (double)q[d] * q[d];
    int n = 0, D = ix->d;
    double dots[4];
    for (int i = 0; i < u->n; i++) {
        if (i % 4 == 0) {
            /* four rows at once: four independent sums (each in d order, as
             * the scan's), so the CPU overlaps their latencies */
            const float *e0 = u->e + (size_t)i * D;
            if (i + 4 <= u->n) {
                double a0 = 0, a1 = 0, a2 = 0, a3 = 0;
                for (int d = 0; d < D; d++) {
                    double qd = q[d];
                    a0 += (double)e0[d] * qd;
                    a1 += (double)e0[D + d] * qd;
                    a2 += (double)e0[2 * D + d] * qd;
                    a3 += (double)e0[3 * D + d] * qd;
                }
                dots[0] = a0, dots[1] = a1, dots[2] = a2, dots[3] = a3;
            } else {
                for (int k = 0; i + k < u->n; k++) {
                    double a = 0;
                    for (int d = 0; d < D; d++) a += (double)e0[(size_t)k * D + d] * q[d];
                    dots[k] = a;
                }
            }
        }
        if (exclude_sid && strcmp(u->sid[i], exclude_sid) == 0) continue;
        double dot = dots[i % 4];
        double en = u->en[i];
        double sc = en > 0 && qn > 0 ? dot / sqrt(en * qn) : -2.0;
        uint64_t id = u->ids[i];
        /* keep (score desc, id asc): the scan's order */
        if (n == r && (sc < scores[n - 1] || (sc == scores[n - 1] && id > ids[n - 1]))) continue;
        int k = n < r ? n++ : r - 1;
        while (k > 0 && (scores[k - 1] < sc || (scores[k - 1] == sc && ids[k - 1] > id))) {
            scores[k] = scores[k - 1];
            ids[k] = ids[k - 1];
            k--;
        }
        scores[k] = sc;
        ids[k] = id;
    }
    pthread_mutex_unlock(&ix->mu);
    return n;
}

void srv_l3index_free(srv_l3index *ix)
{
    if (!ix) return;
    while (ix->users) unlink_user(ix, ix->users);
    pthread_mutex_destroy(&ix->mu);
    free(ix);
}
