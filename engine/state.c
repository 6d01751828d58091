/*
 * state.c — a sequence's complete state as one host buffer, for the memstore
 * (FASTMKA.md, "What a session must persist to resume exactly").
 *
 * Layout, version 1, little-endian, no padding between fields:
 *
 *   header (72 bytes)
 *     char     magic[4]        "MKAS"
 *     uint32   version         1
 *     uint32   header_bytes    72
 *     uint32   n_layers, d_model, kv_dim, block_size
 *     uint32   n_tokens, l3_n, levels
 *     char     fingerprint[16] the model's fingerprint (hex, not terminated)
 *     uint64   payload_bytes
 *     uint64   checksum        FNV-1a 64 over the payload
 *   payload
 *     int32    tokens[n_tokens]
 *     float    ema[n_layers][d_model]               state after the last token
 *     float    l3_mu[l3_n][n_layers][d_model]       the L3 bank's chunk values
 *     per block b = 0 .. ceil(n_tokens / block_size) - 1, with n_b positions:
 *       float  kv[n_layers][2][n_b][kv_dim]         fused K then V
 *       float  ema_ckpt[n_layers][d_model]          only when n_b == block_size
 *
 * A reader checks magic, version, header size, dimensions, model
 * fingerprint, that the payload size follows from the header, and the
 * checksum, before it touches the sequence.
 */
#include <string.h>

#include "engine_priv.h"

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the sequence state layout is little-endian; add byte swapping for this host"
#endif

#define STATE_MAGIC "MKAS"
#define STATE_VERSION 1u
#define HEADER_BYTES 72u

typedef struct state_header {
    char magic[4];
    uint32_t version, header_bytes;
    uint32_t n_layers, d_model, kv_dim, block_size;
    uint32_t n_tokens, l3_n, levels;
    char fingerprint[16];
    uint64_t payload_bytes;
    uint64_t checksum;
} state_header;

_Static_assert(sizeof(state_header) == HEADER_BYTES, "state header must be 72 bytes");

static size_t payload_bytes(const eng_engine *e, int n_tokens, int l3_n)
{
    size_t ld = (size_t)e->n_layers * e->D * sizeof(float);
    size_t n = (size_t)n_tokens * sizeof(int32_t) + ld + (size_t)l3_n * ld;
    for (int b = 0; b * e->B < n_tokens; b++) {
        int nb = n_tokens - b * e->B < e->B ? n_tokens - b * e->B : e->B;
        n += (size_t)e->n_layers * 2 * nb * e->kv_dim * sizeof(float);
        if (nb == e->B) n += ld;
    }
    return n;
}

size_t eng_seq_export_size(const eng_engine *e, int seq)
{
    const eng_seq *sq = eng__seq(e, seq);
    return sq ? HEADER_BYTES + payload_bytes(e, sq->n_tokens, sq->l3_n) : 0;
}

static unsigned char *put(unsigned char *p, const void *src, size_t n)
{
    memcpy(p, src, n);
    return p + n;
}

int eng_seq_export(const eng_engine *e, int seq, void *buf, size_t len)
{
    const eng_seq *sq = eng__seq(e, seq);
    if (!sq || !buf) return ENG_EINVAL;
    size_t pl = payload_bytes(e, sq->n_tokens, sq->l3_n);
    if (len < HEADER_BYTES + pl) return ENG_ERANGE;
    int D = e->D, R = e->prm.l3_max_chunks;
    size_t ld = (size_t)e->n_layers * D;
    unsigned char *p = (unsigned char *)buf + HEADER_BYTES;
    p = put(p, sq->tokens, (size_t)sq->n_tokens * sizeof(int32_t));
    p = put(p, sq->ema, ld * sizeof(float));
    for (int r = 0; r < sq->l3_n; r++)
        for (int l = 0; l < e->n_layers; l++)
            p = put(p, sq->l3_mu + ((size_t)l * R + r) * D, (size_t)D * sizeof(float));
    for (int b = 0; b < sq->n_blocks; b++) {
        int nb = sq->n_tokens - b * e->B < e->B ? sq->n_tokens - b * e->B : e->B;
        for (int l = 0; l < e->n_layers; l++)
            for (int kind = 0; kind < 2; kind++)
                p = put(p, eng__kv_ptr(e, sq->blocks[b], l, kind, 0),
                        (size_t)nb * e->kv_dim * sizeof(float));
        if (nb == e->B) p = put(p, e->ema_ckpt + (size_t)sq->blocks[b] * ld, ld * sizeof(float));
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
    memcpy(h.fingerprint, e->m->info.fingerprint, 16);
    h.payload_bytes = pl;
    h.checksum = eng__fnv1a64(ENG_FNV_INIT, (unsigned char *)buf + HEADER_BYTES, pl);
    memcpy(buf, &h, sizeof h);
    return ENG_OK;
}

static const unsigned char *get(const unsigned char *p, void *dst, size_t n)
{
    memcpy(dst, p, n);
    return p + n;
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
    if (h.n_tokens > (uint32_t)e->prm.max_ctx)
        return eng__errf(err, errlen, ENG_ERANGE, "state import: %u tokens > max_ctx %d", h.n_tokens,
                         e->prm.max_ctx);
    if (h.l3_n > (uint32_t)e->prm.l3_max_chunks)
        return eng__errf(err, errlen, ENG_ERANGE, "state import: L3 bank of %u chunks > %d", h.l3_n,
                         e->prm.l3_max_chunks);
    int n_tokens = (int)h.n_tokens;
    size_t pl = payload_bytes(e, n_tokens, (int)h.l3_n);
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

    int D = e->D;
    size_t ld = (size_t)e->n_layers * D;
    p = get(p, sq->tokens, (size_t)n_tokens * sizeof(int32_t));
    p = get(p, sq->ema, ld * sizeof(float));
    for (int r = 0; r < (int)h.l3_n; r++) {
        for (int l = 0; l < e->n_layers; l++, p += (size_t)D * sizeof(float)) {
            memcpy(e->tmp, p, (size_t)D * sizeof(float)); /* p may be unaligned */
            eng__l3_store(e, sq, r, l, e->tmp);
        }
    }
    sq->l3_n = (int)h.l3_n;
    for (int b = 0; b < n_blocks; b++) {
        int blk = e->free_blocks[--e->n_free];
        sq->blocks[sq->n_blocks++] = blk;
        int nb = n_tokens - b * e->B < e->B ? n_tokens - b * e->B : e->B;
        for (int l = 0; l < e->n_layers; l++)
            for (int kind = 0; kind < 2; kind++)
                p = get(p, eng__kv_ptr(e, blk, l, kind, 0), (size_t)nb * e->kv_dim * sizeof(float));
        if (nb == e->B) p = get(p, e->ema_ckpt + (size_t)blk * ld, ld * sizeof(float));
    }
    sq->n_tokens = n_tokens;
    return ENG_OK;
}
