/*
 * state.c — a sequence's state as host buffers, for the memstore (FASTMKA.md,
 * "What a session must persist to resume exactly"): block by block
 * (eng_seq_blocks_export/import: raw K/V + EMA checkpoint records, engine.h
 * documents the layout) and whole (eng_seq_export/import: one versioned,
 * checksummed buffer).  Backend neutral: blocks and EMA state move through
 * the backend's ops, so a state exported by one backend imports into another.
 *
 * Whole-sequence layout, version 2, little-endian, no padding between fields:
 *
 *   header (80 bytes)
 *     char     magic[4]        "MKAS"
 *     uint32   version         2
 *     uint32   header_bytes    80
 *     uint32   n_layers, d_model, kv_dim, block_size
 *     uint32   n_tokens, l3_n, levels
 *     uint32   kv_dtype        0: f32, 1: bf16 (the element type of kv below)
 *     uint32   reserved        0
 *     char     fingerprint[16] the model's fingerprint (hex, not terminated)
 *     uint64   payload_bytes
 *     uint64   checksum        FNV-1a 64 over the payload
 *   payload
 *     int32    tokens[n_tokens]
 *     float    ema[n_layers][d_model]               state after the last token
 *     float    l3_mu[l3_n][n_layers][d_model]       the L3 bank's chunk values
 *     per block b = 0 .. ceil(n_tokens / block_size) - 1, with n_b positions:
 *       kv     kv[n_layers][2][n_b][kv_dim]         fused K then V, in kv_dtype
 *       float  ema_ckpt[n_layers][d_model]          only when n_b == block_size
 *
 * So the full blocks of a whole state are, byte for byte, the records that
 * eng_seq_blocks_export writes (when kv_dtype is the engine's).  A reader
 * checks magic, version, header size, dimensions, model fingerprint, that the
 * payload size follows from the header, and the checksum, before it touches
 * the sequence.  K/V written in another dtype than the engine keeps are
 * converted (bf16 widens exactly; f32 narrows to bf16 rounding to nearest
 * even).  Block records carry no header: the caller checks their identity.
 */
#include <string.h>

#include "engine_priv.h"

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the sequence state layout is little-endian; add byte swapping for this host"
#endif

#define STATE_MAGIC "MKAS"
#define STATE_VERSION 2u
#define HEADER_BYTES 80u

typedef struct state_header {
    char magic[4];
    uint32_t version, header_bytes;
    uint32_t n_layers, d_model, kv_dim, block_size;
    uint32_t n_tokens, l3_n, levels;
    uint32_t kv_dtype, reserved;
    char fingerprint[16];
    uint64_t payload_bytes;
    uint64_t checksum;
} state_header;

_Static_assert(sizeof(state_header) == HEADER_BYTES, "state header must be 80 bytes");

static size_t kv_elem(int dtype) { return dtype == ENG_KV_BF16 ? 2 : 4; }

static size_t ema_bytes(const eng_engine *e) { return (size_t)e->n_layers * e->D * sizeof(float); }

/* Tokens, the running EMA state, the bank, then the block records: K/V rows
 * of every position and the EMA checkpoint of every full block. */
static size_t payload_bytes(const eng_engine *e, int n_tokens, int l3_n, int kv_dtype)
{
    size_t kv_per_pos = (size_t)e->n_layers * 2 * e->kv_dim * kv_elem(kv_dtype);
    return (size_t)n_tokens * (sizeof(int32_t) + kv_per_pos) +
           (size_t)(1 + l3_n + n_tokens / e->B) * ema_bytes(e);
}

/* ---- block records ------------------------------------------------------- */

static unsigned char *put(unsigned char *p, const void *src, size_t n)
{
    memcpy(p, src, n);
    return p + n;
}

/* n K/V elements from src (in dtype `from`, possibly unaligned) into dst (in
 * the engine's dtype). */
static void kv_convert(void *dst, int to, const unsigned char *src, int from, size_t n)
{
    if (from == to) {
        memcpy(dst, src, n * kv_elem(to));
    } else if (from == ENG_KV_BF16) { /* to f32: exact */
        float *d = dst;
        for (size_t i = 0; i < n; i++) {
            uint16_t h;
            memcpy(&h, src + 2 * i, 2);
            d[i] = eng__bf16_to_f32(h);
        }
    } else { /* f32 to bf16 */
        uint16_t *d = dst;
        for (size_t i = 0; i < n; i++) {
            float f;
            memcpy(&f, src + 4 * i, 4);
            d[i] = eng__f32_to_bf16(f);
        }
    }
}

/* Writes the records of sq's positions [first * B, first * B + n_tokens) to
 * *p (advanced): per block its K/V rows, then its EMA checkpoint when full. */
static int export_blocks(eng_engine *e, const eng_seq *sq, int first, int n_tokens, unsigned char **p)
{
    size_t row = (size_t)e->kv_dim * kv_elem(e->kv_dtype);
    for (int b = first, off = 0; off < n_tokens; b++, off += e->B) {
        int rows = n_tokens - off < e->B ? n_tokens - off : e->B;
        int rc = e->ops->block_get(e, sq->blocks[b], e->stage_kv, rows == e->B ? e->stage_ema : NULL,
                                   NULL, 0);
        if (rc != ENG_OK) return rc;
        for (int lk = 0; lk < e->n_layers * 2; lk++)
            *p = put(*p, e->stage_kv + (size_t)lk * e->B * row, (size_t)rows * row);
        if (rows == e->B) *p = put(*p, e->stage_ema, ema_bytes(e));
    }
    return ENG_OK;
}

/* The reverse: appends to sq blocks for n_tokens positions read from *p
 * (advanced), K/V in dtype kvt.  The caller has checked that enough blocks
 * are free; on failure the blocks taken are given back. */
static int import_blocks(eng_engine *e, eng_seq *sq, int n_tokens, const unsigned char **p, int kvt,
                         char *err, size_t errlen)
{
    int keep = sq->n_blocks;
    size_t row = (size_t)e->kv_dim * kv_elem(e->kv_dtype), row_in = (size_t)e->kv_dim * kv_elem(kvt);
    for (int off = 0; off < n_tokens; off += e->B) {
        int rows = n_tokens - off < e->B ? n_tokens - off : e->B, blk = eng__block_push(e, sq);
        if (rows < e->B) memset(e->stage_kv, 0, e->block_kv_bytes);
        for (int lk = 0; lk < e->n_layers * 2; lk++, *p += (size_t)rows * row_in)
            kv_convert(e->stage_kv + (size_t)lk * e->B * row, e->kv_dtype, *p, kvt, (size_t)rows * e->kv_dim);
        const float *ck = NULL;
        if (rows == e->B) {
            memcpy(e->stage_ema, *p, ema_bytes(e));
            *p += ema_bytes(e);
            ck = e->stage_ema;
        }
        int rc = e->ops->block_set(e, blk, e->stage_kv, ck, err, errlen);
        if (rc != ENG_OK) {
            eng__blocks_release(e, sq, keep);
            return rc;
        }
    }
    return ENG_OK;
}

/* 1 when a token id among toks (n, possibly unaligned) is outside [0, V);
 * *bad receives it. */
static int bad_token(const eng_engine *e, const void *toks, int n, int32_t *bad)
{
    for (int i = 0; i < n; i++) {
        memcpy(bad, (const unsigned char *)toks + (size_t)i * sizeof *bad, sizeof *bad);
        if (*bad < 0 || *bad >= e->V) return 1;
    }
    return 0;
}

/* ---- by blocks -------------------------------------------------------------- */

void eng_get_block_format(const eng_engine *e, eng_block_format *f)
{
    f->block_tokens = e->B;
    f->n_layers = e->n_layers;
    f->kv_dim = e->kv_dim;
    f->d_model = e->D;
    f->kv_dtype = e->kv_dtype;
    f->kv_bytes = e->block_kv_bytes;
    f->ema_bytes = ema_bytes(e);
    f->block_bytes = f->kv_bytes + f->ema_bytes;
}

int eng_seq_n_full_blocks(const eng_engine *e, int seq)
{
    const eng_seq *sq = eng__seq(e, seq);
    return sq ? sq->n_tokens / e->B : ENG_EINVAL;
}

int eng_seq_blocks_export(const eng_engine *ce, int seq, int first, int n, void *buf, size_t len)
{
    /* Exporting changes no state, but reads through the backend and uses
     * the engine's staging buffers. */
    eng_engine *e = (eng_engine *)ce;
    const eng_seq *sq = eng__seq(e, seq);
    if (!sq || first < 0 || n < 0 || first > sq->n_tokens / e->B - n || (n > 0 && !buf))
        return ENG_EINVAL;
    if (len < (size_t)n * (e->block_kv_bytes + ema_bytes(e))) return ENG_ERANGE;
    unsigned char *p = buf;
    return export_blocks(e, sq, first, n * e->B, &p);
}

int eng_seq_blocks_import(eng_engine *e, int seq, const int32_t *tokens, int n_blocks, const void *buf,
                          size_t len, char *err, size_t errlen)
{
    eng_seq *sq = eng__seq(e, seq);
    if (!sq) return eng__errf(err, errlen, ENG_EINVAL, "blocks import: sequence %d is not in use", seq);
    if (sq->n_tokens % e->B != 0)
        return eng__errf(err, errlen, ENG_EINVAL,
                         "blocks import: sequence %d holds %d tokens, not a multiple of the block size %d",
                         seq, sq->n_tokens, e->B);
    if (n_blocks < 0 || (n_blocks > 0 && (!tokens || !buf)))
        return eng__errf(err, errlen, ENG_EINVAL, "blocks import: %d blocks, tokens %s, buffer %s", n_blocks,
                         tokens ? "given" : "NULL", buf ? "given" : "NULL");
    size_t rec = e->block_kv_bytes + ema_bytes(e);
    if (len / rec != (size_t)n_blocks || len % rec != 0)
        return eng__errf(err, errlen, ENG_EINVAL,
                         "blocks import: %zu bytes for %d blocks of %zu bytes (another block format?)", len,
                         n_blocks, rec);
    if (n_blocks > (e->prm.max_ctx - sq->n_tokens) / e->B)
        return eng__errf(err, errlen, ENG_ERANGE, "blocks import: %d + %d x %d tokens > max_ctx %d",
                         sq->n_tokens, n_blocks, e->B, e->prm.max_ctx);
    int n_tokens = n_blocks * e->B;
    int32_t bad;
    if (bad_token(e, tokens, n_tokens, &bad))
        return eng__errf(err, errlen, ENG_EINVAL, "blocks import: token id %d out of range [0, %d)",
                         (int)bad, e->V);
    if (n_blocks > e->n_free)
        return eng__errf(err, errlen, ENG_ENOSPC, "blocks import: needs %d K/V blocks, %d free", n_blocks,
                         e->n_free);
    if (n_blocks == 0) return ENG_OK;
    const unsigned char *p = buf;
    int keep = sq->n_blocks;
    int rc = import_blocks(e, sq, n_tokens, &p, e->kv_dtype, err, errlen);
    if (rc == ENG_OK) rc = e->ops->ema_reset(e, seq, sq->blocks[sq->n_blocks - 1], err, errlen);
    if (rc != ENG_OK) {
        eng__blocks_release(e, sq, keep);
        return rc;
    }
    memcpy(sq->tokens + sq->n_tokens, tokens, (size_t)n_tokens * sizeof(int32_t));
    sq->n_tokens += n_tokens;
    return ENG_OK;
}

/* ---- whole sequence ----------------------------------------------------------- */

size_t eng_seq_export_size(const eng_engine *e, int seq)
{
    const eng_seq *sq = eng__seq(e, seq);
    return sq ? HEADER_BYTES + payload_bytes(e, sq->n_tokens, sq->l3_n, e->kv_dtype) : 0;
}

int eng_seq_export(const eng_engine *ce, int seq, void *buf, size_t len)
{
    eng_engine *e = (eng_engine *)ce; /* see eng_seq_blocks_export */
    const eng_seq *sq = eng__seq(e, seq);
    if (!sq || !buf) return ENG_EINVAL;
    size_t pl = payload_bytes(e, sq->n_tokens, sq->l3_n, e->kv_dtype);
    if (len < HEADER_BYTES + pl) return ENG_ERANGE;
    int rc;
    unsigned char *p = (unsigned char *)buf + HEADER_BYTES;
    p = put(p, sq->tokens, (size_t)sq->n_tokens * sizeof(int32_t));
    if ((rc = e->ops->ema_get(e, seq, e->stage_ema, NULL, 0)) != ENG_OK) return rc;
    p = put(p, e->stage_ema, ema_bytes(e));
    p = put(p, sq->l3_mu, (size_t)sq->l3_n * ema_bytes(e));
    if ((rc = export_blocks(e, sq, 0, sq->n_tokens, &p)) != ENG_OK) return rc;
    state_header h;
    memset(&h, 0, sizeof h);
    memcpy(h.magic, STATE_MAGIC, 4);
    h.version = STATE_VERSION;
    h.header_bytes = HEADER_BYTES;
    h.n_layers = (uint32_t)e->n_layers;
    h.d_model = (uint32_t)e->D;
    h.kv_dim = (uint32_t)e->kv_dim;
    h.block_size = (uint32_t)e->B;
    h.n_tokens = (uint32_t)sq->n_tokens;
    h.l3_n = (uint32_t)sq->l3_n;
    h.levels = (uint32_t)e->levels;
    h.kv_dtype = (uint32_t)e->kv_dtype;
    memcpy(h.fingerprint, e->m->info.fingerprint, 16);
    h.payload_bytes = pl;
    h.checksum = eng__fnv1a64(ENG_FNV_INIT, (unsigned char *)buf + HEADER_BYTES, pl);
    memcpy(buf, &h, sizeof h);
    return ENG_OK;
}

int eng_seq_import(eng_engine *e, int seq, const void *buf, size_t len, char *err, size_t errlen)
{
    eng_seq *sq = eng__seq(e, seq);
    if (!sq || sq->n_tokens != 0)
        return eng__errf(err, errlen, ENG_EINVAL, "state import: sequence %d is not an empty sequence", seq);
    if (!buf || len < HEADER_BYTES)
        return eng__errf(err, errlen, ENG_EFORMAT, "state import: %zu bytes is shorter than the header", len);
    state_header h;
    memcpy(&h, buf, sizeof h);
    if (memcmp(h.magic, STATE_MAGIC, 4) != 0)
        return eng__errf(err, errlen, ENG_EFORMAT, "state import: bad magic (not a sequence state)");
    if (h.version != STATE_VERSION || h.header_bytes != HEADER_BYTES)
        return eng__errf(err, errlen, ENG_EFORMAT, "state import: unsupported version %u (this build reads %u)",
                         h.version, STATE_VERSION);
    if (memcmp(h.fingerprint, e->m->info.fingerprint, 16) != 0)
        return eng__errf(err, errlen, ENG_EMISMATCH,
                         "state import: written for model %.16s, this model is %.16s", h.fingerprint,
                         e->m->info.fingerprint);
    if (h.n_layers != (uint32_t)e->n_layers || h.d_model != (uint32_t)e->D ||
        h.kv_dim != (uint32_t)e->kv_dim || h.levels != (uint32_t)e->levels)
        return eng__errf(err, errlen, ENG_EMISMATCH, "state import: model dimensions differ");
    if (h.block_size != (uint32_t)e->B)
        return eng__errf(err, errlen, ENG_EMISMATCH, "state import: block size %u, engine uses %d",
                         h.block_size, e->B);
    if (h.kv_dtype != ENG_KV_F32 && h.kv_dtype != ENG_KV_BF16)
        return eng__errf(err, errlen, ENG_EFORMAT, "state import: unknown K/V dtype %u", h.kv_dtype);
    if (h.n_tokens > (uint32_t)e->prm.max_ctx)
        return eng__errf(err, errlen, ENG_ERANGE, "state import: %u tokens > max_ctx %d", h.n_tokens,
                         e->prm.max_ctx);
    if (h.l3_n > (uint32_t)e->prm.l3_max_chunks)
        return eng__errf(err, errlen, ENG_ERANGE, "state import: L3 bank of %u chunks > %d", h.l3_n,
                         e->prm.l3_max_chunks);
    int n_tokens = (int)h.n_tokens, kvt = (int)h.kv_dtype;
    size_t pl = payload_bytes(e, n_tokens, (int)h.l3_n, kvt);
    if (h.payload_bytes != pl || len != HEADER_BYTES + pl)
        return eng__errf(err, errlen, ENG_EFORMAT,
                         "state import: size %zu does not match the header (expected %zu)", len,
                         (size_t)HEADER_BYTES + pl);
    const unsigned char *p = (const unsigned char *)buf + HEADER_BYTES;
    if (eng__fnv1a64(ENG_FNV_INIT, p, pl) != h.checksum)
        return eng__errf(err, errlen, ENG_EFORMAT, "state import: checksum mismatch (corrupt state)");
    int n_blocks = (n_tokens + e->B - 1) / e->B;
    if (n_blocks > e->n_free)
        return eng__errf(err, errlen, ENG_ENOSPC, "state import: needs %d K/V blocks, %d free", n_blocks,
                         e->n_free);
    int32_t bad;
    if (bad_token(e, p, n_tokens, &bad))
        return eng__errf(err, errlen, ENG_EFORMAT, "state import: token id %d out of range", (int)bad);

    int rc;
    memcpy(sq->tokens, p, (size_t)n_tokens * sizeof(int32_t));
    p += (size_t)n_tokens * sizeof(int32_t);
    const unsigned char *ema_end = p;
    p += ema_bytes(e);
    if (h.l3_n > 0) {
        memcpy(sq->l3_mu, p, (size_t)h.l3_n * ema_bytes(e));
        p += (size_t)h.l3_n * ema_bytes(e);
        if ((rc = e->ops->l3_set(e, seq, (int)h.l3_n, sq->l3_mu, err, errlen)) != ENG_OK) return rc;
    }
    sq->l3_n = (int)h.l3_n;
    if ((rc = import_blocks(e, sq, n_tokens, &p, kvt, err, errlen)) != ENG_OK) goto fail;
    memcpy(e->stage_ema, ema_end, ema_bytes(e));
    if ((rc = e->ops->ema_set(e, seq, e->stage_ema, err, errlen)) != ENG_OK) goto fail;
    sq->n_tokens = n_tokens;
    return ENG_OK;
fail:
    eng__blocks_release(e, sq, 0);
    sq->l3_n = 0;
    return rc;
}
