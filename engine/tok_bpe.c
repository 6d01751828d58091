/*
 * tok_bpe.c — the tokenizer's BPE model: loading model.vocab, model.merges
 * and the added tokens' ids from tokenizer.json; the byte-level alphabet
 * (vocabulary strings become raw bytes at load); and the merge loop over one
 * pre-token, a min-heap of adjacent pairs ordered by (merge rank, position)
 * over a linked list of symbols, O(n log n) per word, with a per-call cache
 * of words.  Same algorithm and tie-breaking as tokenizers' Word::merge_all.
 */
#include <limits.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "tok_priv.h"

/* ---- hashing ------------------------------------------------------------ */

static uint64_t hash_bytes(const void *d, size_t n)
{
    const unsigned char *p = d;
    uint64_t h = 0x9E3779B97F4A7C15ULL ^ (n * 0xC2B2AE3D27D4EB4FULL);
    while (n >= 8) {
        uint64_t x;
        memcpy(&x, p, 8);
        h = (h ^ (x * 0xBF58476D1CE4E5B9ULL)) * 0x94D049BB133111EBULL;
        h ^= h >> 29;
        p += 8;
        n -= 8;
    }
    uint64_t x = 0;
    memcpy(&x, p, n);
    h = (h ^ (x * 0xBF58476D1CE4E5B9ULL)) * 0x94D049BB133111EBULL;
    return h ^ (h >> 31);
}

static inline uint64_t hash_u64(uint64_t x)
{
    x ^= x >> 33;
    x *= 0xFF51AFD7ED558CCDULL;
    x ^= x >> 33;
    return x;
}

/* Vocabulary id of the byte string s, or -1. */
int32_t tok__vocab_find(const eng_tok *t, const char *s, size_t n)
{
    size_t i = hash_bytes(s, n) & t->vmap_mask;
    for (;;) {
        uint32_t v = t->vmap[i];
        if (!v) return -1;
        size_t l;
        const char *p = tok_piece(t, (int32_t)(v - 1), &l);
        if (l == n && memcmp(p, s, n) == 0) return (int32_t)(v - 1);
        i = (i + 1) & t->vmap_mask;
    }
}

static int merge_find(const eng_tok *t, int32_t a, int32_t b, uint32_t *rank, int32_t *nid)
{
    uint64_t k = (uint64_t)(uint32_t)a << 32 | (uint32_t)b;
    size_t i = hash_u64(k) & t->mmask;
    for (;;) {
        if (t->mnew[i] < 0) return 0;
        if (t->mkey[i] == k) {
            *rank = t->mrank[i];
            *nid = t->mnew[i];
            return 1;
        }
        i = (i + 1) & t->mmask;
    }
}

/* ---- byte-level alphabet ------------------------------------------------ */

/* GPT-2's bytes_to_unicode: byte b is written as code point byte_cp[b]. */
static uint16_t byte_cp[256];
static int16_t cp_byte[324]; /* inverse for code points < 324, -1 elsewhere */
static pthread_once_t bl_once = PTHREAD_ONCE_INIT;

static void bl_init(void)
{
    int n = 0;
    for (int i = 0; i < 324; i++) cp_byte[i] = -1;
    for (int b = 0; b < 256; b++) {
        int keep = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
        byte_cp[b] = (uint16_t)(keep ? b : 256 + n++);
        cp_byte[byte_cp[b]] = (int16_t)b;
    }
}

/* Decoded bytes of a token string: the byte-level mapping when every
 * character belongs to the alphabet, else the UTF-8 text itself (what the
 * ByteLevel decoder does).  Returns 1 when the mapping applied. */
static int bl_decode(const char *s, size_t n, tok_buf *out)
{
    const unsigned char *u = (const unsigned char *)s;
    size_t start = out->n;
    for (size_t i = 0; i < n;) {
        int l;
        uint32_t c = tok_utf8_get(u + i, &l);
        i += (size_t)l;
        if (c >= 324 || cp_byte[c] < 0) {
            out->n = start;
            return tok_buf_put(out, s, n) ? ENG_ENOMEM : 0;
        }
        char b = (char)cp_byte[c];
        if (tok_buf_put(out, &b, 1)) return ENG_ENOMEM;
    }
    return 1;
}

static size_t pow2_at_least(size_t n)
{
    size_t c = 16;
    while (c < n) c *= 2;
    return c;
}

/* Looks up a merge part in the model vocabulary (its string form). */
static int32_t vocab_id_str(json_t *vocab, const char *s)
{
    json_t *v = json_object_get(vocab, s);
    return json_is_integer(v) ? (int32_t)json_integer_value(v) : -1;
}

int tok__load_model(eng_tok *t, json_t *m, json_t *added, char *err, size_t errlen)
{
    if (!json_is_object(m)) return eng__errf(err, errlen, ENG_EFORMAT, "tokenizer.json: \"model\" is missing");
    const char *type = tok_jstr(m, "type");
    if (type && strcmp(type, "BPE") != 0)
        return eng__errf(err, errlen, ENG_EUNSUPPORTED,
                         "tokenizer.json: model.type \"%s\" is not supported (only byte-level BPE)", type);
    if (!tok_jempty(json_object_get(m, "dropout")))
        return eng__errf(err, errlen, ENG_EUNSUPPORTED, "tokenizer.json: model.dropout is set; BPE dropout is not supported");
    if (tok_jbool(m, "byte_fallback", 0))
        return eng__errf(err, errlen, ENG_EUNSUPPORTED,
                         "tokenizer.json: model.byte_fallback=true (SentencePiece-style BPE) is not supported");
    if (!tok_jempty(json_object_get(m, "continuing_subword_prefix")))
        return eng__errf(err, errlen, ENG_EUNSUPPORTED, "tokenizer.json: model.continuing_subword_prefix is not supported");
    if (!tok_jempty(json_object_get(m, "end_of_word_suffix")))
        return eng__errf(err, errlen, ENG_EUNSUPPORTED, "tokenizer.json: model.end_of_word_suffix is not supported");
    t->fuse_unk = tok_jbool(m, "fuse_unk", 0);
    t->ignore_merges = tok_jbool(m, "ignore_merges", 0);
    json_t *vocab = json_object_get(m, "vocab"), *merges = json_object_get(m, "merges");
    if (!json_is_object(vocab)) return eng__errf(err, errlen, ENG_EFORMAT, "tokenizer.json: model.vocab is not an object");
    if (!json_is_array(merges)) return eng__errf(err, errlen, ENG_EFORMAT, "tokenizer.json: model.merges is not an array");

    /* ids: the vocabulary and the added tokens */
    int64_t max_id = -1;
    const char *key;
    json_t *val;
    json_object_foreach(vocab, key, val) {
        json_int_t v = json_integer_value(val);
        if (!json_is_integer(val) || v < 0 || v >= INT32_MAX / 2)
            return eng__errf(err, errlen, ENG_EFORMAT, "tokenizer.json: model.vocab[\"%.40s\"] is not a valid id", key);
        if (v > max_id) max_id = v;
    }
    size_t i;
    json_t *x;
    json_array_foreach(added, i, x) {
        json_t *idv = json_object_get(x, "id");
        json_int_t v = json_integer_value(idv);
        if (!json_is_integer(idv) || v < 0 || v >= INT32_MAX / 2 || !json_is_string(json_object_get(x, "content")))
            return eng__errf(err, errlen, ENG_EFORMAT, "tokenizer.json: added_tokens[%zu]: bad id or content", i);
        if (v > max_id) max_id = v;
    }
    if (max_id < 0) return eng__errf(err, errlen, ENG_EFORMAT, "tokenizer.json: model.vocab is empty");
    /* Tables are sized by the largest id: refuse an id space that is mostly
     * holes, so a few bytes of JSON cannot ask for gigabytes. */
    if (max_id >= (int64_t)(json_object_size(vocab) + json_array_size(added)) * 2 + 4096)
        return eng__errf(err, errlen, ENG_EFORMAT,
                         "tokenizer.json: ids go up to %lld for %zu tokens (model.vocab and added_tokens "
                         "must number the tokens without large gaps)",
                         (long long)max_id, json_object_size(vocab) + json_array_size(added));
    t->n_ids = (int32_t)(max_id + 1);
    t->flags = calloc((size_t)t->n_ids, 1);
    t->piece_off = calloc((size_t)t->n_ids + 1, sizeof *t->piece_off);
    char **strs = calloc((size_t)t->n_ids, sizeof *strs);  /* token string of each id, borrowed */
    size_t *slen = calloc((size_t)t->n_ids, sizeof *slen);
    int rc = 0;
    if (!t->flags || !t->piece_off || !strs || !slen) { rc = ENG_ENOMEM; goto out; }
    json_object_foreach(vocab, key, val) {
        int32_t id = (int32_t)json_integer_value(val);
        strs[id] = (char *)key;
        slen[id] = strlen(key);
        t->flags[id] = TF_EXISTS;
    }

    /* added tokens: content replaces a vocabulary string with the same id */
    t->added = calloc(json_array_size(added) + 1, sizeof *t->added);
    if (!t->added) { rc = ENG_ENOMEM; goto out; }
    json_array_foreach(added, i, x) {
        tok_added *a = &t->added[t->n_added];
        json_t *c = json_object_get(x, "content");
        a->len = json_string_length(c);
        if (a->len == 0) continue; /* an empty token never matches */
        a->content = malloc(a->len + 1);
        if (!a->content) { rc = ENG_ENOMEM; goto out; }
        memcpy(a->content, json_string_value(c), a->len + 1);
        a->id = (int32_t)json_integer_value(json_object_get(x, "id"));
        a->special = (uint8_t)tok_jbool(x, "special", 0);
        a->normalized = (uint8_t)tok_jbool(x, "normalized", !a->special);
        a->lstrip = (uint8_t)tok_jbool(x, "lstrip", 0);
        a->rstrip = (uint8_t)tok_jbool(x, "rstrip", 0);
        a->single_word = (uint8_t)tok_jbool(x, "single_word", 0);
        if (!(t->flags[a->id] & TF_EXISTS) || !(t->flags[a->id] & TF_ADDED)) {
            strs[a->id] = a->content;
            slen[a->id] = a->len;
        }
        t->flags[a->id] |= TF_EXISTS | TF_ADDED | (a->special ? TF_SPECIAL : 0);
        if (a->normalized) t->n_added_norm++;
        t->n_added++;
    }

    /* decoded bytes of every id */
    pthread_once(&bl_once, bl_init);
    tok_buf pb = { 0 };
    int *mapped = calloc((size_t)t->n_ids, sizeof *mapped);
    if (!mapped) { rc = ENG_ENOMEM; goto out; }
    for (int32_t id = 0; id < t->n_ids; id++) {
        t->piece_off[id] = (uint32_t)pb.n;
        if (!strs[id]) continue;
        int r = bl_decode(strs[id], slen[id], &pb);
        if (r < 0 || pb.n > UINT32_MAX / 2) { free(pb.p); free(mapped); rc = ENG_ENOMEM; goto out; }
        mapped[id] = r;
    }
    t->piece_off[t->n_ids] = (uint32_t)pb.n;
    t->pieces = pb.p ? pb.p : calloc(1, 1);

    /* bytes -> id for the model vocabulary (tokens written in the byte-level alphabet) */
    size_t nv = json_object_size(vocab);
    size_t cap = pow2_at_least(nv * 2 + 2);
    t->vmap = calloc(cap, sizeof *t->vmap);
    t->vmap_mask = cap - 1;
    if (!t->vmap || !t->pieces) { free(mapped); rc = ENG_ENOMEM; goto out; }
    for (int b = 0; b < 256; b++) t->byte_id[b] = -1;
    json_object_foreach(vocab, key, val) {
        int32_t id = (int32_t)json_integer_value(val);
        if (!mapped[id] || strs[id] != key) continue;
        size_t l;
        const char *p = tok_piece(t, id, &l);
        if (tok__vocab_find(t, p, l) >= 0) continue;
        size_t h = hash_bytes(p, l) & t->vmap_mask;
        while (t->vmap[h]) h = (h + 1) & t->vmap_mask;
        t->vmap[h] = (uint32_t)id + 1;
        if (l == 1) t->byte_id[(unsigned char)p[0]] = id;
    }
    free(mapped);

    t->unk_id = -1;
    const char *unk = tok_jstr(m, "unk_token");
    if (unk) {
        t->unk_id = vocab_id_str(vocab, unk);
        if (t->unk_id < 0)
            return free(strs), free(slen),
                   eng__errf(err, errlen, ENG_EFORMAT, "tokenizer.json: model.unk_token \"%.40s\" is not in the vocabulary", unk);
    }

    /* merges: "a b" strings or ["a", "b"] pairs; rank = position, later duplicates win */
    size_t nm = json_array_size(merges);
    cap = pow2_at_least(nm * 2 + 2);
    t->mkey = malloc(cap * sizeof *t->mkey);
    t->mrank = malloc(cap * sizeof *t->mrank);
    t->mnew = malloc(cap * sizeof *t->mnew);
    t->mmask = cap - 1;
    if (!t->mkey || !t->mrank || !t->mnew) { rc = ENG_ENOMEM; goto out; }
    for (size_t k = 0; k < cap; k++) t->mnew[k] = -1;
    tok_buf cat = { 0 };
    json_array_foreach(merges, i, x) {
        const char *a = NULL, *b = NULL;
        char *own = NULL;
        if (json_is_string(x)) {
            const char *s = json_string_value(x);
            const char *sp = strchr(s, ' ');
            if (!sp || strchr(sp + 1, ' ')) {
                free(cat.p);
                rc = eng__errf(err, errlen, ENG_EFORMAT, "tokenizer.json: model.merges[%zu] \"%.40s\" is not two tokens", i, s);
                goto out;
            }
            own = strdup(s);
            if (!own) { free(cat.p); rc = ENG_ENOMEM; goto out; }
            own[sp - s] = 0;
            a = own;
            b = own + (sp - s) + 1;
        } else if (json_is_array(x) && json_array_size(x) == 2 && json_is_string(json_array_get(x, 0)) &&
                   json_is_string(json_array_get(x, 1))) {
            a = json_string_value(json_array_get(x, 0));
            b = json_string_value(json_array_get(x, 1));
        } else {
            free(cat.p);
            rc = eng__errf(err, errlen, ENG_EFORMAT, "tokenizer.json: model.merges[%zu] is neither \"a b\" nor [\"a\", \"b\"]", i);
            goto out;
        }
        int32_t ia = vocab_id_str(vocab, a), ib = vocab_id_str(vocab, b);
        cat.n = 0;
        int32_t in = -1;
        if (tok_buf_put(&cat, a, strlen(a)) == 0 && tok_buf_put(&cat, b, strlen(b)) == 0) in = vocab_id_str(vocab, cat.p);
        if (ia < 0 || ib < 0 || in < 0) {
            rc = eng__errf(err, errlen, ENG_EFORMAT, "tokenizer.json: model.merges[%zu] (\"%.30s\" \"%.30s\"): %s is not in the vocabulary",
                           i, a, b, ia < 0 ? "the first part" : ib < 0 ? "the second part" : "the merged token");
            free(own);
            free(cat.p);
            goto out;
        }
        free(own);
        uint64_t k = (uint64_t)(uint32_t)ia << 32 | (uint32_t)ib;
        size_t h = hash_u64(k) & t->mmask;
        while (t->mnew[h] >= 0 && t->mkey[h] != k) h = (h + 1) & t->mmask;
        if (t->mnew[h] < 0) t->n_merges++;
        t->mkey[h] = k;
        t->mrank[h] = (uint32_t)i;
        t->mnew[h] = in;
    }
    free(cat.p);
out:
    free(strs);
    free(slen);
    if (rc == ENG_ENOMEM) return eng__errf(err, errlen, rc, "tokenizer.json: out of memory");
    return rc;
}

/* ---- BPE of one word ------------------------------------------------------------ */

static inline int hent_less(const tok_hent *a, const tok_hent *b)
{
    return a->rank != b->rank ? a->rank < b->rank : a->pos < b->pos;
}

static int heap_push(tok_enc *c, tok_hent e)
{
    if (c->heap_n == c->heap_cap) {
        size_t cap = c->heap_cap ? c->heap_cap * 2 : 256;
        tok_hent *p = realloc(c->heap, cap * sizeof *p);
        if (!p) return ENG_ENOMEM;
        c->heap = p;
        c->heap_cap = cap;
    }
    size_t i = c->heap_n++;
    while (i > 0) {
        size_t par = (i - 1) / 2;
        if (!hent_less(&e, &c->heap[par])) break;
        c->heap[i] = c->heap[par];
        i = par;
    }
    c->heap[i] = e;
    return 0;
}

static tok_hent heap_pop(tok_enc *c)
{
    tok_hent top = c->heap[0], last = c->heap[--c->heap_n];
    size_t i = 0, n = c->heap_n;
    for (;;) {
        size_t l = 2 * i + 1;
        if (l >= n) break;
        size_t m = l + 1 < n && hent_less(&c->heap[l + 1], &c->heap[l]) ? l + 1 : l;
        if (!hent_less(&c->heap[m], &last)) break;
        c->heap[i] = c->heap[m];
        i = m;
    }
    if (n) c->heap[i] = last;
    return top;
}

/* BPE of one word (raw bytes) appended to c->out; the same algorithm and
 * tie-breaking as tokenizers' Word::merge_all. */
static int bpe_word(tok_enc *c, const unsigned char *w, size_t n)
{
    const eng_tok *t = c->t;
    if (n == 1 && t->byte_id[w[0]] >= 0) return tok_ivec_push(c->out, t->byte_id[w[0]]);
    if (t->ignore_merges) {
        int32_t id = tok__vocab_find(t, (const char *)w, n);
        if (id >= 0) return tok_ivec_push(c->out, id);
    }
    if (n > (size_t)INT32_MAX) return eng__errf(c->err, c->errlen, ENG_ERANGE, "tokenizer: pre-token longer than 2 GiB");
    if (n > c->syms_cap) {
        size_t cap = n < 64 ? 64 : n;
        tok_sym *s = realloc(c->syms, cap * sizeof *s);
        if (!s) return ENG_ENOMEM;
        c->syms = s;
        c->syms_cap = cap;
    }
    /* initial symbols: one per byte; missing bytes become unk or vanish */
    tok_sym *s = c->syms;
    int32_t ns = 0;
    int32_t unk_pending = -1; /* length of a pending unk run, fused or not */
    for (size_t i = 0; i < n; i++) {
        int32_t id = t->byte_id[w[i]];
        if (id >= 0) {
            if (unk_pending >= 0) {
                s[ns] = (tok_sym){ t->unk_id, ns - 1, ns + 1, (uint32_t)unk_pending };
                ns++;
                unk_pending = -1;
            }
            s[ns] = (tok_sym){ id, ns - 1, ns + 1, 1 };
            ns++;
        } else if (t->unk_id >= 0) {
            if (unk_pending >= 0 && !t->fuse_unk) {
                s[ns] = (tok_sym){ t->unk_id, ns - 1, ns + 1, (uint32_t)unk_pending };
                ns++;
                unk_pending = 1;
            } else {
                unk_pending = unk_pending >= 0 ? unk_pending + 1 : 1;
            }
        }
    }
    if (unk_pending >= 0) {
        s[ns] = (tok_sym){ t->unk_id, ns - 1, ns + 1, (uint32_t)unk_pending };
        ns++;
    }
    if (ns == 0) return 0;
    s[ns - 1].next = -1;

    c->heap_n = 0;
    for (int32_t i = 0; i + 1 < ns; i++) {
        uint32_t r;
        int32_t nid;
        if (merge_find(t, s[i].id, s[i + 1].id, &r, &nid) && heap_push(c, (tok_hent){ r, i, nid })) return ENG_ENOMEM;
    }
    while (c->heap_n) {
        tok_hent top = heap_pop(c);
        tok_sym *a = &s[top.pos];
        if (a->len == 0 || a->next < 0) continue;
        tok_sym *b = &s[a->next];
        uint32_t r;
        int32_t nid;
        if (!merge_find(t, a->id, b->id, &r, &nid) || nid != top.nid) continue; /* stale */
        a->id = top.nid;
        a->len += b->len;
        b->len = 0;
        a->next = b->next;
        if (a->next >= 0) s[a->next].prev = top.pos;
        if (a->prev >= 0 && merge_find(t, s[a->prev].id, a->id, &r, &nid) &&
            heap_push(c, (tok_hent){ r, a->prev, nid }))
            return ENG_ENOMEM;
        if (a->next >= 0 && merge_find(t, a->id, s[a->next].id, &r, &nid) && heap_push(c, (tok_hent){ r, top.pos, nid }))
            return ENG_ENOMEM;
    }
    for (int32_t i = 0; i >= 0; i = s[i].next)
        if (tok_ivec_push(c->out, s[i].id)) return ENG_ENOMEM;
    return 0;
}

/* bpe_word through the per-call cache. */
int tok__encode_word(tok_enc *c, const unsigned char *w, size_t n)
{
    if (n <= 1 || n > WC_MAX_WORD || !c->wc_slots) return bpe_word(c, w, n);
    if (!c->wc) {
        c->wc = calloc(c->wc_slots, sizeof *c->wc);
        if (!c->wc) {
            c->wc_slots = 0;
            return bpe_word(c, w, n);
        }
    }
    size_t mask = c->wc_slots - 1;
    uint64_t h = hash_bytes(w, n) | 1;
    size_t i = h & mask;
    for (;;) {
        tok_wc_slot *e = &c->wc[i];
        if (!e->h) break;
        if (e->h == h && e->wlen == n && memcmp(c->wbytes.p + e->woff, w, n) == 0)
            return tok_ivec_append(c->out, c->wids.p + e->ioff, e->ilen);
        i = (i + 1) & mask;
    }
    size_t before = c->out->n;
    int rc = bpe_word(c, w, n);
    if (rc || c->wc_used >= c->wc_slots / 2 || c->wbytes.n > UINT32_MAX / 2 || c->wids.n > UINT32_MAX / 2) return rc;
    tok_wc_slot e = { h, (uint32_t)c->wbytes.n, (uint32_t)n, (uint32_t)c->wids.n, (uint32_t)(c->out->n - before) };
    if (tok_buf_put(&c->wbytes, w, n) || tok_ivec_append(&c->wids, c->out->p + before, c->out->n - before)) return 0;
    c->wc[i] = e;
    c->wc_used++;
    return 0;
}
