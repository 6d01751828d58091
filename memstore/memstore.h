/*
 * memstore.h — mkad's persistent memory: sessions (token ids, K/V blocks
 * with their EMA checkpoints, the L3 bank) and users' long-term chunks, in
 * RocksDB under the state directory.  Prefix ms_.
 *
 * The memstore knows nothing of HTTP, and of the engine only what its
 * callers hand it: a model fingerprint string and opaque block payloads
 * (engine.h's block export format).  Every call is thread-safe (RocksDB
 * serialises what it must); the server calls them from libuv's thread pool,
 * never from its loop or engine threads.
 *
 * Layout (column families):
 *   meta      "fingerprint" -> the model fingerprint the store was written for,
 *             "format"      -> the store format version
 *   sessions  user \0 session_id -> a session record (ms_session: token ids,
 *             block hashes, L3 bank, times)
 *   blocks    block hash (16 bytes) -> one block's payload (K/V + EMA
 *             checkpoint, as the engine exports it); large values in blob files
 *   longterm  user \0 chunk id (8 bytes, big-endian) -> one long-term chunk
 * Every value is an envelope: magic "MKMS", kind, format version, payload
 * length, and an XXH3-64 checksum of the payload seeded with a hash of the
 * key (a value moved under another key fails too).  A value that fails any
 * check is reported through the log callback, deleted, and treated as
 * missing (MS_ECORRUPT): the caller recomputes; it is never trusted.
 *
 * Blocks are content-addressed: a block's hash chains the hash of the
 * previous block with the block's token ids, starting from a root that binds
 * the model fingerprint, the user and the L3 bank (ms_block_hashes).  Equal
 * prefixes of one user's sessions therefore share blocks.  Blocks are never
 * shared across users: a resume that is faster because another user holds
 * the same prefix would tell a user what others sent (a timing side channel),
 * so the user is part of every block's identity.  A block stays on disk
 * while a session refers to it; ms_gc deletes the rest.
 *
 * Tiers.  The memstore holds the two tiers below the engine's block pool
 * (hot): warm, a byte-budgeted LRU cache of block payloads in host memory,
 * and cold, RocksDB.  Writes go through both (a block written is on disk
 * and in the cache); reads try warm first and fill it from cold.  Dropping a
 * block from warm (LRU, or ms_evict) therefore never loses it.
 *
 * A turn is written as ONE atomic RocksDB write batch (its new blocks and the
 * session record), through the write-ahead log: after a crash a turn is
 * either wholly there or wholly absent.  With sync = 1 the call returns only
 * once the batch is on stable storage (a turn acknowledged as durable).
 */
#ifndef MKAD_MEMSTORE_H
#define MKAD_MEMSTORE_H

#include <stddef.h>
#include <stdint.h>

enum {
    MS_OK = 0,
    MS_EINVAL = -1,    /* bad argument */
    MS_ENOMEM = -2,    /* allocation failed */
    MS_EIO = -3,       /* RocksDB / file system error (message says which) */
    MS_ENOTFOUND = -4, /* no such session / block / chunk */
    MS_ECORRUPT = -5,  /* a stored value failed its checks (reported, dropped) */
    MS_EMISMATCH = -6, /* the store was written for another model */
    MS_ELOCKED = -7,   /* another process holds the store */
};

#define MS_HASH_BYTES 16
#define MS_MAX_NAME 256 /* longest user or session id, bytes */

typedef struct ms_store ms_store;

/* Log callback for what the store reports on its own (corrupt values
 * dropped, recovery); msg is one line without a newline. */
typedef void (*ms_log_fn)(void *ctx, const char *msg);

typedef struct ms_options {
    const char *dir;         /* the state directory (created if missing) */
    const char *fingerprint; /* the model's identity (eng_model_info.fingerprint + shape);
                                a store written for another is refused */
    int block_tokens;        /* tokens per K/V block (part of the identity) */
    size_t warm_bytes;       /* budget of the host-memory tier (0: no warm tier) */
    ms_log_fn log;           /* may be NULL */
    void *log_ctx;
} ms_options;

/* Opens (or creates) the store.  MS_ELOCKED when another process has it
 * open; MS_EMISMATCH when it was written for another fingerprint (err says
 * both and what to do). */
int ms_open(const ms_options *opt, ms_store **out, char *err, size_t errlen);
/* Flushes the write-ahead log to disk and closes.  NULL-safe. */
void ms_close(ms_store *st);

/* ---- block identity ---------------------------------------------------- */

/* The hashes of the n_tokens / block_tokens full blocks of a token sequence
 * of `user` with L3 bank `bank` (n_bank chunk ids, in bank order): out
 * receives n_full * MS_HASH_BYTES bytes.  Returns n_full. */
int ms_block_hashes(const ms_store *st, const char *user, const uint64_t *bank, int n_bank,
                    const int32_t *tokens, int n_tokens, uint8_t *out);

/* ---- sessions ---------------------------------------------------------- */

typedef struct ms_session {
    char *user, *id;
    int32_t *tokens;   /* the session's token ids */
    int n_tokens;
    int n_blocks;      /* full blocks stored (n_tokens / block_tokens at write time) */
    uint8_t *hashes;   /* (n_blocks, MS_HASH_BYTES) */
    uint64_t *bank;    /* L3 bank: chunk ids */
    int n_bank;
    int64_t created_ms, used_ms; /* wall clock, milliseconds since the epoch */
} ms_session;

/* One block to write: its hash and payload. */
typedef struct ms_block {
    const uint8_t *hash; /* MS_HASH_BYTES */
    const void *data;
    size_t len;
} ms_block;

/* Writes a turn: the session record (s->hashes must list all s->n_blocks
 * blocks) and the n new blocks, in one atomic batch.  Blocks already stored
 * may be passed again (they are rewritten with the same bytes).  sync = 1:
 * durable when this returns. */
int ms_session_put(ms_store *st, const ms_session *s, const ms_block *blocks, int n, int sync,
                   char *err, size_t errlen);
/* Reads a session record; *out is freed with ms_session_free. */
int ms_session_get(ms_store *st, const char *user, const char *id, ms_session **out, char *err,
                   size_t errlen);
void ms_session_free(ms_session *s);
/* Deletes a session record (its blocks go at the next ms_gc). */
int ms_session_delete(ms_store *st, const char *user, const char *id, char *err, size_t errlen);
/* Calls fn for each session record of `user` (NULL: every user) in key
 * order, starting after (after_user, after_id) when given (pagination);
 * stops when fn returns nonzero.  The record is borrowed for the call.
 * Corrupt records are reported, dropped and skipped. */
int ms_session_list(ms_store *st, const char *user, const char *after_user, const char *after_id,
                    int (*fn)(void *ctx, const ms_session *s), void *ctx, char *err, size_t errlen);

/* Reads one block's payload into buf (len bytes, which must be its size),
 * from the warm tier when it holds it, else from disk (then kept warm).
 * *tier (may be NULL) receives MS_TIER_WARM or MS_TIER_DISK. */
enum { MS_TIER_WARM = 1, MS_TIER_DISK = 2 };
int ms_block_get(ms_store *st, const uint8_t *hash, void *buf, size_t len, int *tier, char *err,
                 size_t errlen);

/* How many of a session's blocks the warm tier holds now. */
int ms_session_warm_blocks(ms_store *st, const ms_session *s);

/* 1 when the warm tier holds the block now (a hint: it may go at any time). */
int ms_block_is_warm(ms_store *st, const uint8_t *hash);

/* Drops a session from the given tiers (MS_TIER_* bits): warm drops its
 * blocks from the cache (they stay on disk); disk deletes the record (its
 * blocks go at the next ms_gc, unless other sessions share them).
 * MS_ENOTFOUND when there is no such session. */
int ms_evict(ms_store *st, const char *user, const char *id, int tiers, char *err, size_t errlen);

/* Deletes every block no session record refers to; *n_deleted receives how
 * many (may be NULL). */
int ms_gc(ms_store *st, long *n_deleted, char *err, size_t errlen);

/* ---- long-term chunks -------------------------------------------------- */

int ms_chunk_put(ms_store *st, const char *user, uint64_t chunk_id, const void *data, size_t len,
                 int sync, char *err, size_t errlen);
/* *data is malloc'd (caller frees). */
int ms_chunk_get(ms_store *st, const char *user, uint64_t chunk_id, void **data, size_t *len,
                 char *err, size_t errlen);
/* Calls fn for each chunk of `user` in id order; the data is borrowed. */
int ms_chunk_list(ms_store *st, const char *user,
                  int (*fn)(void *ctx, uint64_t chunk_id, const void *data, size_t len), void *ctx,
                  char *err, size_t errlen);
/* Deletes one chunk (written behind: durable at the next sync).  Deleting
 * a chunk that is not there is not an error. */
int ms_chunk_delete(ms_store *st, const char *user, uint64_t chunk_id, char *err, size_t errlen);
/* Deletes all of `user`'s chunks; *n_deleted may be NULL. */
int ms_chunk_delete_user(ms_store *st, const char *user, long *n_deleted, char *err, size_t errlen);

/* ---- totals ------------------------------------------------------------ */

typedef struct ms_stats {
    long sessions, blocks, chunks;        /* exact counts (a scan) */
    uint64_t sessions_bytes, blocks_bytes, chunks_bytes; /* value bytes */
    uint64_t disk_bytes;                  /* SST + blob files on disk */
    uint64_t warm_bytes, warm_budget;     /* payload bytes held warm / allowed */
    long warm_blocks;
    long warm_hits, disk_hits, misses;    /* ms_block_get since open */
    long warm_evictions;                  /* blocks dropped from warm by the budget */
    long corrupt_dropped;                 /* since open */
} ms_stats;
int ms_get_stats(ms_store *st, ms_stats *out, char *err, size_t errlen);
/* Compacts every column family (an admin action; blocks for its duration). */
int ms_compact(ms_store *st, char *err, size_t errlen);

/* Makes every write so far durable: the write-ahead log is fsync'd.  With
 * writes made with sync = 0 this is group commit: one fsync for many. */
int ms_sync(ms_store *st, char *err, size_t errlen);

const char *ms_strerror(int rc);

#endif
