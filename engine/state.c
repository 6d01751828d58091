/*
 * state.c — a sequence's complete state as one host buffer, for the memstore
 * (FASTMKA.md, "What a session must persist to resume exactly").  Backend
 * neutral: blocks and EMA state move through the backend's ops, so a state
 * exported by one backend imports into another.
 *
 * Layout, version 2, little-endian, no padding between fields:
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
 * A reader checks magic, version, header size, dimensions, model
 * fingerprint, that the payload size follows from the header, and the
 * checksum, before it touches the sequence.  K/V written in another dtype
 * than the engine keeps are converted (bf16 widens exactly; f32 narrows to
 * bf16 rounding to nearest even).
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

static size_t payload_bytes(const eng_engine *e, int n_tokens, int l3_n, int kv_dtype)
{
    size_t ld = (size_t)e->n_layers * e->D * sizeof(float);
    size_t n = (size_t)n_tokens * sizeof(int32_t) + ld + (size_t)l3_n * ld;
    for (int b = 0; b * e->B < n_tokens; b++) {
        int nb = n_tokens - b * e->B < e->B ? n_tokens - b * e->B : e->B;
        n += (size_t)e->n_layers * 2 * nb * e->kv_dim * kv_elem(kv_dtype);
        if (nb == e->B) n += ld;
    }
    return n;
}

size_t eng_seq_export_size(const eng_engine *e, int seq)
{
    const eng_seq *sq = eng__seq(e, seq);
    return sq ? HEADER_BYTES + payload_bytes(e, sq->n_tokens, sq->l3_n, e->kv_dtype) : 0;
}

static unsigned char *put(unsigned char *p, const void *src, size_t n)
{
    memcpy(p, src, n);
    return p + n;
}

int eng_seq_export(const eng_engine *ce, int seq, void *buf, size_t len)
{
    /* Exporting changes no state, but reads through the backend and uses
     * the engine's staging buffers. */
    eng_engine *e = (eng_engine *)ce;
    const eng_seq *sq = eng__seq(e, seq);
    if (!sq || !buf) return ENG_EINVAL;
    size_t pl = payload_bytes(e, sq->n_tokens, sq->l3_n, e->kv_dtype);
    if (len < HEADER_BYTES + pl) return ENG_ERANGE;
    int D = e->D, rc;
    size_t ld = (size_t)e->n_layers * D, row = (size_t)e->kv_dim * kv_elem(e->kv_dtype);
    unsigned char *p = (unsigned char *)buf + HEADER_BYTES;
    p = put(p, sq->tokens, (size_t)sq->n_tokens * sizeof(int32_t));
    if ((rc = e->ops->ema_get(e, seq, e->stage_ema, NULL, 0)) != ENG_OK) return rc;
    p = put(p, e->stage_ema, ld * sizeof(float));
    p = put(p, sq->l3_mu, (size_t)sq->l3_n * ld * sizeof(float));
    for (int b = 0; b < sq->n_blocks; b++) {
        int nb = sq->n_tokens - b * e->B < e->B ? sq->n_tokens - b * e->B : e->B;
        if ((rc = e->ops->block_get(e, sq->blocks[b], e->stage_kv, e->stage_ema, NULL, 0)) != ENG_OK)
            return rc;
        for (int lk = 0; lk < e->n_layers * 2; lk++)
            p = put(p, e->stage_kv + (size_t)lk * e->B * row, (size_t)nb * row);
        if (nb == e->B) p = put(p, e->stage_ema, ld * sizeof(float));
    }
    state_header h;
    memset(&h, 0, sizeof h);
    memcpy(h.magic, STATE_MAGIC, 4);
    h.version = STATE_VERSION;
    h.header_bytes = HEADER_BYTES;
    h.n_layers = (uint32_t)e->n_layers;
    h.d_model = (uint32_t)D;
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
    const int32_t *toks = (const int32_t *)p;
    for (int i = 0; i < n_tokens; i++) {
        int32_t t;
        memcpy(&t, toks + i, sizeof t);
        if (t < 0 || t >= e->V)
            return eng__errf(err, errlen, ENG_EFORMAT, "state import: token id %d out of range", (int)t);
    }

    int rc;
    size_t ld = (size_t)e->n_layers * e->D;
    size_t row_in = (size_t)e->kv_dim * kv_elem(kvt), row = (size_t)e->kv_dim * kv_elem(e->kv_dtype);
    memcpy(sq->tokens, p, (size_t)n_tokens * sizeof(int32_t));
    p += (size_t)n_tokens * sizeof(int32_t);
    const unsigned char *ema_end = p;
    p += ld * sizeof(float);
    if (h.l3_n > 0) {
        memcpy(sq->l3_mu, p, (size_t)h.l3_n * ld * sizeof(float));
        p += (size_t)h.l3_n * ld * sizeof(float);
        if ((rc = e->ops->l3_set(e, seq, (int)h.l3_n, sq->l3_mu, err, errlen)) != ENG_OK) return rc;
    }
    sq->l3_n = (int)h.l3_n;
    for (int b = 0; b < n_blocks; b++) {
        int blk = e->free_blocks[--e->n_free];
        sq->blocks[sq->n_blocks++] = blk;
        int nb = n_tokens - b * e->B < e->B ? n_tokens - b * e->B : e->B;
        memset(e->stage_kv, 0, e->block_kv_bytes);
        for (int lk = 0; lk < e->n_layers * 2; lk++, p += (size_t)nb * row_in)
            kv_convert(e->stage_kv + (size_t)lk * e->B * row, e->kv_dtype, p, kvt, (size_t)nb * e->kv_dim);
        const float *ck = NULL;
        if (nb == e->B) {
            memcpy(e->stage_ema, p, ld * sizeof(float));
            p += ld * sizeof(float);
            ck = e->stage_ema;
        }
        if ((rc = e->ops->block_set(e, blk, e->stage_kv, ck, err, errlen)) != ENG_OK) goto fail;
    }
    memcpy(e->stage_ema, ema_end, ld * sizeof(float));
    if ((rc = e->ops->ema_set(e, seq, e->stage_ema, err, errlen)) != ENG_OK) goto fail;
    sq->n_tokens = n_tokens;
    return ENG_OK;
fail:
    while (sq->n_blocks > 0) e->free_blocks[e->n_free++] = sq->blocks[--sq->n_blocks];
    sq->l3_n = 0;
    return rc;
}
