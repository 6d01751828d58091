/*
 * bench_compress — which RocksDB compression pays for the session store's
 * blocks column family?  Real K/V blocks: the model prefills the given text
 * files (one sequence each, encoded with the model's tokenizer.json) and
 * exports its full blocks exactly as the session store writes them
 * (eng_seq_blocks_export: K/V in the pool's dtype, bf16 for a bf16 model,
 * plus the EMA checkpoint).  Each compression then gets a fresh RocksDB
 * configured as memstore's blocks column family (blob files, min blob size
 * 4096): all blocks are written (write batches of 16 blocks, WAL on, no
 * fsync, then a flush, as the store's write-behind does), the blob bytes on
 * disk are summed, and every block is read back by key (the OS page cache
 * holds the files: this is the decompression + lookup cost, not the disk's).
 *
 *   mkad-bench-compress --model DIR [--repeat N] [--rounds R] FILE...
 *
 * --repeat writes the blocks N times (more data, same content); --rounds
 * measures every compression R times, interleaved (the spread shows the
 * noise of a shared machine).
 *
 * Prints one line per compression: ratio (raw / on disk), write MB/s, read
 * MB/s.  Not installed (a measurement for docs/performance.md).
 */
#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <rocksdb/c.h>

#include "engine.h"

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static char *read_file(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *b = n >= 0 ? malloc((size_t)n + 1) : NULL;
    if (b && fread(b, 1, (size_t)n, f) != (size_t)n) {
        free(b);
        b = NULL;
    }
    fclose(f);
    if (b) *len = (size_t)n;
    return b;
}

/* Bytes of the files in dir whose name ends with suffix ("" = all). */
static unsigned long long dir_bytes(const char *dir, const char *suffix)
{
    unsigned long long t = 0;
    DIR *d = opendir(dir);
    if (!d) return 0;
    struct dirent *e;
    size_t sl = strlen(suffix);
    while ((e = readdir(d))) {
        size_t nl = strlen(e->d_name);
        if (nl < sl || strcmp(e->d_name + nl - sl, suffix) != 0) continue;
        char p[4096];
        struct stat st;
        snprintf(p, sizeof p, "%s/%s", dir, e->d_name);
        if (stat(p, &st) == 0 && S_ISREG(st.st_mode)) t += (unsigned long long)st.st_size;
    }
    closedir(d);
    return t;
}

static void rm_dir(const char *dir)
{
    DIR *d = opendir(dir);
    if (!d) return;
    struct dirent *e;
    while ((e = readdir(d))) {
        if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0) continue;
        char p[4096];
        snprintf(p, sizeof p, "%s/%s", dir, e->d_name);
        unlink(p);
    }
    closedir(d);
    rmdir(dir);
}

typedef struct blocks {
    char *data; /* n records of len bytes */
    size_t len;
    long n, cap;
} blocks;

/* Prefills the text's tokens in one sequence and appends its full blocks. */
static int collect(eng_engine *e, const eng_tok *tok, const char *path, blocks *out, int max_ctx)
{
    size_t len, n_ids;
    char err[512];
    char *text = read_file(path, &len);
    int32_t *ids;
    if (!text) {
        fprintf(stderr, "bench_compress: cannot read %s\n", path);
        return -1;
    }
    if (eng_tok_encode(tok, text, len, 0, &ids, &n_ids, err, sizeof err) != 0) {
        fprintf(stderr, "bench_compress: %s: %s\n", path, err);
        free(text);
        return -1;
    }
    free(text);
    if ((int)n_ids > max_ctx) n_ids = (size_t)max_ctx;
    int seq, rc = eng_seq_create(e, &seq);
    for (size_t p = 0; rc == ENG_OK && p < n_ids; p += 256) {
        eng_batch_item it = { .seq = seq, .tokens = ids + p, .n_tokens = (int)(n_ids - p < 256 ? n_ids - p : 256) };
        rc = eng_step(e, &it, 1, err, sizeof err);
    }
    free(ids);
    int nb = rc == ENG_OK ? eng_seq_n_full_blocks(e, seq) : 0;
    if (rc == ENG_OK && nb > 0) {
        if (out->n + nb > out->cap) {
            long cap = (out->n + nb) * 2;
            char *d = realloc(out->data, (size_t)cap * out->len);
            if (!d) rc = ENG_ENOMEM;
            else {
                out->data = d;
                out->cap = cap;
            }
        }
        if (rc == ENG_OK)
            rc = eng_seq_blocks_export(e, seq, 0, nb, out->data + (size_t)out->n * out->len, (size_t)nb * out->len);
        if (rc == ENG_OK) out->n += nb;
    }
    eng_seq_free(e, seq);
    if (rc != ENG_OK) fprintf(stderr, "bench_compress: %s: %s\n", path, eng_strerror(rc));
    else fprintf(stderr, "bench_compress: %s: %zu tokens, %d blocks\n", path, n_ids, nb);
    return rc == ENG_OK ? 0 : -1;
}

static int run(const char *name, int type, const blocks *b, int repeat)
{
    char dir[] = "/tmp/mkad-compress-XXXXXX";
    if (!mkdtemp(dir)) return -1;
    rocksdb_options_t *o = rocksdb_options_create();
    rocksdb_options_set_create_if_missing(o, 1);
    rocksdb_options_set_compression(o, type);
    rocksdb_options_set_enable_blob_files(o, 1);
    rocksdb_options_set_min_blob_size(o, 4096);
    rocksdb_options_set_blob_compression_type(o, type);
    char *e = NULL;
    rocksdb_t *db = rocksdb_open(o, dir, &e);
    if (e) {
        printf("%-6s unavailable: %s\n", name, e);
        rocksdb_free(e);
        rocksdb_options_destroy(o);
        rm_dir(dir);
        return 0;
    }
    rocksdb_writeoptions_t *w = rocksdb_writeoptions_create();
    rocksdb_readoptions_t *r = rocksdb_readoptions_create();
    rocksdb_readoptions_set_verify_checksums(r, 1);
    long total = b->n * repeat;
    double t0 = now_s();
    rocksdb_writebatch_t *wb = rocksdb_writebatch_create();
    for (long i = 0; i < total && !e; i++) {
        unsigned char key[16] = { 0 };
        memcpy(key, &i, sizeof i);
        rocksdb_writebatch_put(wb, (const char *)key, sizeof key, b->data + (size_t)(i % b->n) * b->len, b->len);
        if (rocksdb_writebatch_count(wb) == 16 || i == total - 1) {
            rocksdb_write(db, w, wb, &e);
            rocksdb_writebatch_clear(wb);
        }
    }
    rocksdb_flushoptions_t *fo = rocksdb_flushoptions_create();
    rocksdb_flushoptions_set_wait(fo, 1);
    if (!e) rocksdb_flush(db, fo, &e);
    double t_write = now_s() - t0;
    rocksdb_flushoptions_destroy(fo);
    rocksdb_writebatch_destroy(wb);
    unsigned long long blob = dir_bytes(dir, ".blob"), sst = dir_bytes(dir, ".sst");
    double t1 = now_s();
    size_t got = 0;
    for (long i = 0; i < total && !e; i++) {
        unsigned char key[16] = { 0 };
        memcpy(key, &i, sizeof i);
        size_t vl;
        char *v = rocksdb_get(db, r, (const char *)key, sizeof key, &vl, &e);
        if (v && vl == b->len && memcmp(v, b->data + (size_t)(i % b->n) * b->len, vl) == 0) got++;
        rocksdb_free(v);
    }
    double t_read = now_s() - t1;
    double raw = (double)total * b->len;
    if (e) {
        printf("%-6s error: %s\n", name, e);
        rocksdb_free(e);
    } else {
        printf("%-6s blocks=%ld raw_mb=%.1f disk_mb=%.2f ratio=%.3f write_mb_s=%.0f read_mb_s=%.0f verified=%zu\n",
               name, total, raw / 1e6, (blob + sst) / 1e6, raw / (double)(blob + sst), raw / 1e6 / t_write,
               raw / 1e6 / t_read, got);
    }
    rocksdb_writeoptions_destroy(w);
    rocksdb_readoptions_destroy(r);
    rocksdb_close(db);
    rocksdb_options_destroy(o);
    rm_dir(dir);
    return 0;
}

int main(int argc, char **argv)
{
    const char *model_dir = NULL;
    int repeat = 1, rounds = 1, first = 1;
    for (; first < argc && strncmp(argv[first], "--", 2) == 0; first++) {
        if (strcmp(argv[first], "--model") == 0 && first + 1 < argc) model_dir = argv[++first];
        else if (strcmp(argv[first], "--repeat") == 0 && first + 1 < argc) repeat = atoi(argv[++first]);
        else if (strcmp(argv[first], "--rounds") == 0 && first + 1 < argc) rounds = atoi(argv[++first]);
        else break;
    }
    if (!model_dir || first >= argc || repeat < 1 || rounds < 1) {
        fprintf(stderr, "usage: mkad-bench-compress --model DIR [--repeat N] [--rounds R] FILE...\n");
        return 2;
    }
    char err[512], path[4096];
    eng_model *m;
    eng_tok *tok;
    eng_engine *e;
    if (eng_model_load(model_dir, &m, err, sizeof err) != ENG_OK) {
        fprintf(stderr, "bench_compress: %s\n", err);
        return 1;
    }
    snprintf(path, sizeof path, "%s/tokenizer.json", model_dir);
    if (eng_tok_load(path, &tok, err, sizeof err) != 0) {
        fprintf(stderr, "bench_compress: %s\n", err);
        return 1;
    }
    eng_params p = eng_default_params();
    p.backend = ENG_BACKEND_CPU;
    p.max_seqs = 1;
    if (eng_create(m, &p, &e, err, sizeof err) != ENG_OK) {
        fprintf(stderr, "bench_compress: %s\n", err);
        return 1;
    }
    eng_block_format bf;
    eng_get_block_format(e, &bf);
    blocks b = { .len = bf.block_bytes };
    int max_ctx = eng_get_params(e)->max_ctx;
    if (max_ctx <= 0) max_ctx = 4096;
    for (int i = first; i < argc; i++)
        if (collect(e, tok, argv[i], &b, max_ctx) != 0) return 1;
    if (b.n == 0) {
        fprintf(stderr, "bench_compress: no full block (the texts are shorter than %d tokens)\n", bf.block_tokens);
        return 1;
    }
    printf("model=%s kv_dtype=%s block_tokens=%d block_bytes=%zu (kv %zu + ema %zu) blocks=%ld repeat=%d\n",
           model_dir, bf.kv_dtype == ENG_KV_BF16 ? "bf16" : "f32", bf.block_tokens, bf.block_bytes, bf.kv_bytes,
           bf.ema_bytes, b.n, repeat);
    static const struct { const char *name; int type; } kinds[] = {
        { "none", rocksdb_no_compression }, { "lz4", rocksdb_lz4_compression },
        { "zstd", rocksdb_zstd_compression }, { "snappy", rocksdb_snappy_compression },
    };
    for (int round = 0; round < rounds; round++)
        for (size_t k = 0; k < sizeof kinds / sizeof *kinds; k++) run(kinds[k].name, kinds[k].type, &b, repeat);
    free(b.data);
    eng_free(e);
    eng_tok_free(tok);
    eng_model_free(m);
    return 0;
}
