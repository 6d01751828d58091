/*
 * test_memstore.c — what the server relies on from memstore/: sessions and
 * blocks survive a close and reopen; a store of another model or block size
 * is refused; a second opener is refused; damaged values are reported,
 * dropped and never returned; block identity chains the prefix, the user and
 * the L3 bank; listing is per user and pages; GC keeps shared blocks; a
 * process killed with SIGKILL in the middle of synced writes loses no
 * acknowledged turn and tears none.
 */
#include <check.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <rocksdb/c.h>

#include "memstore.h"
#include "testutil.h"

#define B 4         /* tokens per block */
#define BLOCK 256   /* payload bytes per block */

typedef struct logbuf {
    int n;
    char last[512];
} logbuf;

static void log_cb(void *ctx, const char *msg)
{
    logbuf *lb = ctx;
    lb->n++;
    snprintf(lb->last, sizeof lb->last, "%s", msg);
}

static char g_dir[4096];
static logbuf g_log;
static size_t g_warm; /* warm tier budget of the next open */

static void fresh_dir(const char *name)
{
    snprintf(g_dir, sizeof g_dir, "%s/ms_%s_%d", tu_tmpdir(), name, (int)getpid());
    char cmd[4200];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", g_dir);
    ck_assert_int_eq(system(cmd), 0);
    memset(&g_log, 0, sizeof g_log);
    g_warm = 0;
}

static int open_fp(const char *fp, int bt, ms_store **st, char *err, size_t errlen)
{
    ms_options o = { .dir = g_dir, .fingerprint = fp, .block_tokens = bt, .warm_bytes = g_warm,
                     .log = log_cb, .log_ctx = &g_log };
    return ms_open(&o, st, err, errlen);
}

static ms_store *open_ok(void)
{
    ms_store *st = NULL;
    char err[512] = "";
    int rc = open_fp("model-A", B, &st, err, sizeof err);
    ck_assert_msg(rc == MS_OK, "ms_open: %s", err);
    return st;
}

static void fill_block(unsigned char *p, int seed)
{
    for (int i = 0; i < BLOCK; i++) p[i] = (unsigned char)(seed * 31 + i * 7);
}

/* Writes session (user, id) with tokens 0..n-1 offset by `salt`, all its
 * full blocks included. */
static void put_session(ms_store *st, const char *user, const char *id, int n, int salt, int sync)
{
    int32_t tok[64];
    uint8_t h[16 * MS_HASH_BYTES];
    unsigned char data[16][BLOCK];
    ms_block blk[16];
    ck_assert(n <= 64);
    for (int i = 0; i < n; i++) tok[i] = i + salt;
    int nb = ms_block_hashes(st, user, NULL, 0, tok, n, h);
    for (int i = 0; i < nb; i++) {
        fill_block(data[i], tok[i * B] + 1000 * i);
        blk[i] = (ms_block){ h + i * MS_HASH_BYTES, data[i], BLOCK };
    }
    ms_session s = { .user = (char *)user, .id = (char *)id, .tokens = tok, .n_tokens = n,
                     .n_blocks = nb, .hashes = h, .created_ms = 1, .used_ms = 2 };
    char err[512] = "";
    ck_assert_msg(ms_session_put(st, &s, blk, nb, sync, err, sizeof err) == MS_OK, "put: %s", err);
}

/* Checks that session (user, id) holds what put_session wrote. */
static void check_session(ms_store *st, const char *user, const char *id, int n, int salt)
{
    ms_session *s = NULL;
    char err[512] = "";
    ck_assert_msg(ms_session_get(st, user, id, &s, err, sizeof err) == MS_OK, "get %s/%s: %s", user, id, err);
    ck_assert_str_eq(s->user, user);
    ck_assert_str_eq(s->id, id);
    ck_assert_int_eq(s->n_tokens, n);
    ck_assert_int_eq(s->n_blocks, n / B);
    for (int i = 0; i < n; i++) ck_assert_int_eq(s->tokens[i], i + salt);
    for (int i = 0; i < s->n_blocks; i++) {
        unsigned char got[BLOCK], want[BLOCK];
        fill_block(want, s->tokens[i * B] + 1000 * i);
        ck_assert_msg(ms_block_get(st, s->hashes + i * MS_HASH_BYTES, got, BLOCK, NULL, err, sizeof err) == MS_OK,
                      "block %d: %s", i, err);
        ck_assert(memcmp(got, want, BLOCK) == 0);
    }
    ms_session_free(s);
}

START_TEST(survives_reopen)
{
    fresh_dir("reopen");
    ms_store *st = open_ok();
    put_session(st, "alice", "s1", 10, 0, 1);
    put_session(st, "alice", "s2", 13, 5, 0);
    ms_close(st);
    st = open_ok();
    check_session(st, "alice", "s1", 10, 0);
    check_session(st, "alice", "s2", 13, 5);
    ms_session *s = NULL;
    char err[256];
    ck_assert_int_eq(ms_session_get(st, "bob", "s1", &s, err, sizeof err), MS_ENOTFOUND);
    ck_assert_int_eq(ms_session_delete(st, "alice", "s1", err, sizeof err), MS_OK);
    ck_assert_int_eq(ms_session_get(st, "alice", "s1", &s, err, sizeof err), MS_ENOTFOUND);
    ms_close(st);
}
END_TEST

START_TEST(other_model_or_block_size_refused)
{
    fresh_dir("mismatch");
    ms_store *st = open_ok();
    put_session(st, "alice", "s1", 8, 0, 1);
    ms_close(st);
    char err[1024] = "";
    st = NULL;
    ck_assert_int_eq(open_fp("model-B", B, &st, err, sizeof err), MS_EMISMATCH);
    ck_assert_ptr_null(st);
    ck_assert_msg(strstr(err, "another model") && strstr(err, "model-A") && strstr(err, "model-B") &&
                  strstr(err, g_dir), "message: %s", err);
    ck_assert_int_eq(open_fp("model-A", B * 2, &st, err, sizeof err), MS_EMISMATCH);
    /* The refused opens changed nothing. */
    st = open_ok();
    check_session(st, "alice", "s1", 8, 0);
    ms_close(st);
}
END_TEST

START_TEST(second_opener_refused)
{
    fresh_dir("lock");
    ms_store *st = open_ok(), *st2 = NULL;
    char err[1024] = "";
    ck_assert_int_eq(open_fp("model-A", B, &st2, err, sizeof err), MS_ELOCKED);
    ck_assert_msg(strstr(err, "in use by another process"), "message: %s", err);
    pid_t pid = fork();
    if (pid == 0) {
        ms_store *c = NULL;
        _exit(open_fp("model-A", B, &c, err, sizeof err) == MS_ELOCKED ? 0 : 1);
    }
    int status;
    ck_assert_int_eq(waitpid(pid, &status, 0), pid);
    ck_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    ms_close(st);
    st = open_ok(); /* released on close */
    ms_close(st);
}
END_TEST

/* Rewrites one raw value in family cf of the closed store at g_dir. */
static void damage(const char *cf, const char *key, size_t klen, int truncate)
{
    const char *names[] = { "default", "meta", "sessions", "blocks", "longterm" };
    rocksdb_options_t *o = rocksdb_options_create();
    const rocksdb_options_t *os[5] = { o, o, o, o, o };
    rocksdb_column_family_handle_t *h[5];
    char *e = NULL;
    rocksdb_t *db = rocksdb_open_column_families(o, g_dir, 5, names, os, h, &e);
    ck_assert_msg(!e, "raw open: %s", e);
    int i = 0;
    while (strcmp(names[i], cf)) i++;
    rocksdb_readoptions_t *ro = rocksdb_readoptions_create();
    rocksdb_writeoptions_t *wo = rocksdb_writeoptions_create();
    size_t vl = 0;
    char *v = rocksdb_get_cf(db, ro, h[i], key, klen, &vl, &e);
    ck_assert(!e && v && vl > 30);
    if (truncate) vl -= 7;
    else v[vl - 3] ^= 0x40;
    rocksdb_put_cf(db, wo, h[i], key, klen, v, vl, &e);
    ck_assert(!e);
    rocksdb_free(v);
    for (int j = 0; j < 5; j++) rocksdb_column_family_handle_destroy(h[j]);
    rocksdb_close(db);
    rocksdb_readoptions_destroy(ro);
    rocksdb_writeoptions_destroy(wo);
    rocksdb_options_destroy(o);
}

START_TEST(damaged_values_dropped_never_trusted)
{
    fresh_dir("corrupt");
    ms_store *st = open_ok();
    put_session(st, "alice", "s1", 8, 0, 1);
    put_session(st, "alice", "s2", 8, 100, 1);
    ms_session *s = NULL;
    char err[512];
    ck_assert_int_eq(ms_session_get(st, "alice", "s1", &s, err, sizeof err), MS_OK);
    uint8_t h0[MS_HASH_BYTES];
    memcpy(h0, s->hashes, MS_HASH_BYTES);
    ms_session_free(s);
    ms_close(st);

    damage("blocks", (const char *)h0, MS_HASH_BYTES, 0);           /* a flipped bit */
    damage("sessions", "alice\0s2", 8, 1);                           /* a truncated record */
    st = open_ok();
    unsigned char buf[BLOCK];
    ck_assert_int_eq(ms_block_get(st, h0, buf, BLOCK, NULL, err, sizeof err), MS_ECORRUPT);
    ck_assert_msg(strstr(g_log.last, "memstore_corrupt") && strstr(g_log.last, "checksum"), "log: %s", g_log.last);
    ck_assert_int_eq(ms_block_get(st, h0, buf, BLOCK, NULL, err, sizeof err), MS_ENOTFOUND); /* dropped */
    ck_assert_int_eq(ms_session_get(st, "alice", "s2", &s, err, sizeof err), MS_ECORRUPT);
    ck_assert_ptr_null(s);
    ck_assert_msg(strstr(g_log.last, "truncated"), "log: %s", g_log.last);
    /* The rest still reads. */
    ck_assert_int_eq(ms_session_get(st, "alice", "s1", &s, err, sizeof err), MS_OK);
    ck_assert_int_eq(ms_block_get(st, s->hashes + MS_HASH_BYTES, buf, BLOCK, NULL, err, sizeof err), MS_OK);
    ms_session_free(s);
    ms_stats stt;
    ck_assert_int_eq(ms_get_stats(st, &stt, err, sizeof err), MS_OK);
    ck_assert_int_eq(stt.corrupt_dropped, 2);
    ck_assert_int_eq(stt.sessions, 1);
    ms_close(st);
}
END_TEST

START_TEST(block_identity)
{
    fresh_dir("hash");
    ms_store *st = open_ok();
    int32_t a[12], b[12];
    for (int i = 0; i < 12; i++) a[i] = b[i] = i;
    b[9] = 99; /* differs in block 2 only */
    uint8_t ha[3 * MS_HASH_BYTES], hb[3 * MS_HASH_BYTES], hc[3 * MS_HASH_BYTES], hd[3 * MS_HASH_BYTES];
    ck_assert_int_eq(ms_block_hashes(st, "alice", NULL, 0, a, 12, ha), 3);
    ck_assert_int_eq(ms_block_hashes(st, "alice", NULL, 0, b, 11, hb), 2); /* partial block not counted */
    ck_assert(memcmp(ha, hb, 2 * MS_HASH_BYTES) == 0);                     /* shared prefix */
    ck_assert_int_eq(ms_block_hashes(st, "alice", NULL, 0, b, 12, hb), 3);
    ck_assert(memcmp(ha + 2 * MS_HASH_BYTES, hb + 2 * MS_HASH_BYTES, MS_HASH_BYTES) != 0);
    b[9] = 9;
    b[0] = 7; /* an early change moves every later block */
    ck_assert_int_eq(ms_block_hashes(st, "alice", NULL, 0, b, 12, hb), 3);
    for (int i = 0; i < 3; i++) ck_assert(memcmp(ha + i * MS_HASH_BYTES, hb + i * MS_HASH_BYTES, MS_HASH_BYTES) != 0);
    ms_block_hashes(st, "bob", NULL, 0, a, 12, hc); /* users never share */
    ck_assert(memcmp(ha, hc, MS_HASH_BYTES) != 0);
    uint64_t bank[2] = { 5, 6 };
    ms_block_hashes(st, "alice", bank, 2, a, 12, hd); /* nor do banks */
    ck_assert(memcmp(ha, hd, MS_HASH_BYTES) != 0);
    ms_close(st);
}
END_TEST

START_TEST(warm_tier_lru_and_eviction)
{
    fresh_dir("warm");
    g_warm = 3 * BLOCK; /* room for three blocks */
    ms_store *st = open_ok();
    put_session(st, "alice", "s1", 20, 0, 0); /* 5 blocks: the last 3 stay warm */
    char err[256];
    ms_stats t;
    ck_assert_int_eq(ms_get_stats(st, &t, err, sizeof err), MS_OK);
    ck_assert_int_eq(t.warm_blocks, 3);
    ck_assert_int_eq(t.warm_bytes, 3 * BLOCK);
    ck_assert_int_eq(t.warm_evictions, 2);
    ms_session *s = NULL;
    ck_assert_int_eq(ms_session_get(st, "alice", "s1", &s, err, sizeof err), MS_OK);
    unsigned char buf[BLOCK], want[BLOCK];
    int tier;
    ck_assert_int_eq(ms_block_is_warm(st, s->hashes + 4 * MS_HASH_BYTES), 1);
    ck_assert_int_eq(ms_block_is_warm(st, s->hashes), 0);
    ck_assert_int_eq(ms_block_get(st, s->hashes + 4 * MS_HASH_BYTES, buf, BLOCK, &tier, err, sizeof err), MS_OK);
    ck_assert_int_eq(tier, MS_TIER_WARM);
    ck_assert_int_eq(ms_block_get(st, s->hashes, buf, BLOCK, &tier, err, sizeof err), MS_OK);
    ck_assert_int_eq(tier, MS_TIER_DISK); /* evicted from warm, read from disk ... */
    fill_block(want, 0);
    ck_assert(memcmp(buf, want, BLOCK) == 0);
    ck_assert_int_eq(ms_block_get(st, s->hashes, buf, BLOCK, &tier, err, sizeof err), MS_OK);
    ck_assert_int_eq(tier, MS_TIER_WARM); /* ... and kept warm again */
    ck_assert(memcmp(buf, want, BLOCK) == 0);
    /* Evicting from warm keeps the session on disk, whole. */
    ck_assert_int_eq(ms_evict(st, "alice", "s1", MS_TIER_WARM, err, sizeof err), MS_OK);
    ck_assert_int_eq(ms_get_stats(st, &t, err, sizeof err), MS_OK);
    ck_assert_int_eq(t.warm_blocks, 0);
    ck_assert_int_eq(t.warm_hits, 2);
    ck_assert_int_eq(t.disk_hits, 1);
    check_session(st, "alice", "s1", 20, 0);
    ck_assert_int_eq(ms_evict(st, "alice", "s1", MS_TIER_WARM | MS_TIER_DISK, err, sizeof err), MS_OK);
    ck_assert_int_eq(ms_evict(st, "alice", "s1", MS_TIER_DISK, err, sizeof err), MS_ENOTFOUND);
    ms_session_free(s);
    ms_close(st);
}
END_TEST

typedef struct seen {
    int n;
    char ids[16][32];
} seen;

static int list_cb(void *ctx, const ms_session *s)
{
    seen *sn = ctx;
    snprintf(sn->ids[sn->n++], 32, "%s/%s", s->user, s->id);
    return sn->n == 2; /* pages of two */
}

START_TEST(listing_per_user_and_paged)
{
    fresh_dir("list");
    ms_store *st = open_ok();
    put_session(st, "alice", "a1", 4, 0, 0);
    put_session(st, "alice", "a2", 4, 1, 0);
    put_session(st, "alice", "a3", 4, 2, 0);
    put_session(st, "alicex", "z", 4, 3, 0); /* a user whose name extends another's */
    put_session(st, "bob", "b1", 4, 4, 0);
    char err[256];
    seen sn = { 0 };
    ck_assert_int_eq(ms_session_list(st, "alice", NULL, NULL, list_cb, &sn, err, sizeof err), MS_OK);
    ck_assert_int_eq(sn.n, 2);
    ck_assert_str_eq(sn.ids[0], "alice/a1");
    ck_assert_str_eq(sn.ids[1], "alice/a2");
    ck_assert_int_eq(ms_session_list(st, "alice", "alice", "a2", list_cb, &sn, err, sizeof err), MS_OK);
    ck_assert_int_eq(sn.n, 3); /* the next page holds only a3 */
    ck_assert_str_eq(sn.ids[2], "alice/a3");
    ck_assert_int_eq(ms_session_list(st, "alice", "bob", "b1", list_cb, &sn, err, sizeof err), MS_EINVAL);
    seen all = { 0 };
    ck_assert_int_eq(ms_session_list(st, NULL, "alice", "a3", list_cb, &all, err, sizeof err), MS_OK);
    ck_assert_str_eq(all.ids[0], "alicex/z");
    ck_assert_str_eq(all.ids[1], "bob/b1");
    ms_close(st);
}
END_TEST

START_TEST(gc_keeps_shared_blocks)
{
    fresh_dir("gc");
    ms_store *st = open_ok();
    put_session(st, "alice", "s1", 12, 0, 0); /* 3 blocks */
    put_session(st, "alice", "s2", 8, 0, 0);  /* its 2 blocks are s1's first 2 */
    put_session(st, "alice", "s3", 8, 50, 0); /* 2 blocks of its own */
    char err[256];
    ms_stats stt;
    ck_assert_int_eq(ms_get_stats(st, &stt, err, sizeof err), MS_OK);
    ck_assert_int_eq(stt.blocks, 5);
    long del = -1;
    ck_assert_int_eq(ms_gc(st, &del, err, sizeof err), MS_OK);
    ck_assert_int_eq(del, 0);
    ck_assert_int_eq(ms_session_delete(st, "alice", "s1", err, sizeof err), MS_OK);
    ck_assert_int_eq(ms_session_delete(st, "alice", "s3", err, sizeof err), MS_OK);
    ck_assert_int_eq(ms_gc(st, &del, err, sizeof err), MS_OK);
    ck_assert_int_eq(del, 3); /* s1's third block and s3's two */
    check_session(st, "alice", "s2", 8, 0);
    ms_close(st);
}
END_TEST

typedef struct chunks_seen {
    int n;
    uint64_t ids[8];
} chunks_seen;

static int chunk_cb(void *ctx, uint64_t id, const void *data, size_t len)
{
    chunks_seen *c = ctx;
    ck_assert_int_eq(len, 3);
    ck_assert_int_eq(((const unsigned char *)data)[0], (unsigned char)id);
    c->ids[c->n++] = id;
    return 0;
}

START_TEST(longterm_chunks_per_user)
{
    fresh_dir("chunks");
    ms_store *st = open_ok();
    char err[256];
    uint64_t ids[] = { 300, 2, 1ull << 40 };
    for (int i = 0; i < 3; i++) {
        unsigned char d[3] = { (unsigned char)ids[i], 1, 2 };
        ck_assert_int_eq(ms_chunk_put(st, "alice", ids[i], d, 3, 0, err, sizeof err), MS_OK);
    }
    unsigned char d[3] = { 9, 1, 2 };
    ck_assert_int_eq(ms_chunk_put(st, "alice2", 9, d, 3, 0, err, sizeof err), MS_OK);
    chunks_seen c = { 0 };
    ck_assert_int_eq(ms_chunk_list(st, "alice", chunk_cb, &c, err, sizeof err), MS_OK);
    ck_assert_int_eq(c.n, 3);
    ck_assert(c.ids[0] == 2 && c.ids[1] == 300 && c.ids[2] == 1ull << 40); /* id order */
    void *got;
    size_t gl;
    ck_assert_int_eq(ms_chunk_get(st, "alice", 300, &got, &gl, err, sizeof err), MS_OK);
    ck_assert(gl == 3 && ((unsigned char *)got)[0] == (unsigned char)300);
    free(got);
    /* one chunk, and only that user's */
    ck_assert_int_eq(ms_chunk_delete(st, "alice", 2, err, sizeof err), MS_OK);
    ck_assert_int_eq(ms_chunk_delete(st, "alice", 2, err, sizeof err), MS_OK); /* not there: fine */
    ck_assert_int_eq(ms_chunk_delete(st, "alice", 9, err, sizeof err), MS_OK); /* alice2's id */
    ck_assert_int_eq(ms_chunk_get(st, "alice", 2, &got, &gl, err, sizeof err), MS_ENOTFOUND);
    ck_assert_int_eq(ms_chunk_delete(st, "", 2, err, sizeof err), MS_EINVAL);
    ck_assert_int_eq(ms_sync(st, err, sizeof err), MS_OK);
    long n;
    ck_assert_int_eq(ms_chunk_delete_user(st, "alice", &n, err, sizeof err), MS_OK);
    ck_assert_int_eq(n, 2);
    ck_assert_int_eq(ms_chunk_get(st, "alice", 300, &got, &gl, err, sizeof err), MS_ENOTFOUND);
    ck_assert_int_eq(ms_chunk_get(st, "alice2", 9, &got, &gl, err, sizeof err), MS_OK); /* untouched */
    free(got);
    ms_close(st);
}
END_TEST

/* A child writes synced turns and reports each acknowledged one through a
 * pipe; it is killed with SIGKILL at a random moment.  Every acknowledged
 * turn must be there after reopening, whole. */
START_TEST(sigkill_loses_no_acknowledged_turn)
{
    fresh_dir("kill");
    ms_store *st = open_ok();
    ms_close(st);
    memset(&g_log, 0, sizeof g_log); /* from here on, nothing may be reported */
    srand((unsigned)time(NULL));
    int total_acked = 0;
    for (int iter = 0; iter < 8; iter++) {
        int fd[2];
        ck_assert_int_eq(pipe(fd), 0);
        pid_t pid = fork();
        if (pid == 0) {
            close(fd[0]);
            ms_store *c = open_ok();
            for (int t = 0;; t++) {
                char id[32];
                snprintf(id, sizeof id, "i%d-t%d", iter, t);
                put_session(c, "alice", id, 4 + (t % 40), t, 1);
                if (write(fd[1], &t, sizeof t) != sizeof t) _exit(1);
            }
        }
        close(fd[1]);
        usleep(20000 + rand() % 150000);
        kill(pid, SIGKILL);
        int acked = -1, t;
        while (read(fd[0], &t, sizeof t) == sizeof t) acked = t;
        close(fd[0]);
        waitpid(pid, NULL, 0);
        st = open_ok();
        for (int i = 0; i <= acked; i++) {
            char id[32];
            snprintf(id, sizeof id, "i%d-t%d", iter, i);
            check_session(st, "alice", id, 4 + (i % 40), i);
        }
        ms_close(st);
        total_acked += acked + 1;
    }
    ck_assert_msg(total_acked > 8, "only %d turns were acknowledged: the test did not exercise writes", total_acked);
    ck_assert_int_eq(g_log.n, 0); /* nothing corrupt, nothing dropped */
}
END_TEST

int main(void)
{
    Suite *s = suite_create("memstore");
    TCase *tc = tcase_create("store");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, survives_reopen);
    tcase_add_test(tc, other_model_or_block_size_refused);
    tcase_add_test(tc, second_opener_refused);
    tcase_add_test(tc, damaged_values_dropped_never_trusted);
    tcase_add_test(tc, block_identity);
    tcase_add_test(tc, warm_tier_lru_and_eviction);
    tcase_add_test(tc, listing_per_user_and_paged);
    tcase_add_test(tc, gc_keeps_shared_blocks);
    tcase_add_test(tc, longterm_chunks_per_user);
    tcase_add_test(tc, sigkill_loses_no_acknowledged_turn);
    suite_add_tcase(s, tc);
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
