/*
 * tokenizer.c — Hugging Face tokenizer.json byte-level BPE, exact against the
 * `tokenizers` library, for Qwen2/Qwen2.5/Llama-3/DeepSeek-V3 style model
 * directories: loading, the encode pipeline and the public eng_tok_* calls.
 *
 * Encoding follows the library's pipeline step by step:
 *   1. added tokens are cut out of the raw text (leftmost-longest; special
 *      ones only where the caller allows them) — here;
 *   2. each remaining piece is normalised (NFC when the file asks for it,
 *      tok_normalize.c) and cut again on "normalized" added tokens — here;
 *   3. the pre-tokenizers split it (tok_pretok.c): the Split regexes (PCRE2,
 *      the pattern translated so that it means what Oniguruma's means, on the
 *      Unicode version tokenizers uses), then ByteLevel;
 *   4. every pre-token ("word") goes through BPE over raw bytes (tok_bpe.c);
 *   5. the post-processor adds its template tokens when asked (tok_decode.c
 *      loads them).
 * Decoding and the stream decoder are in tok_decode.c.  tok_priv.h lists
 * the files and their shared declarations.
 *
 * A loaded eng_tok is read-only; every encode call keeps its scratch on its
 * own, so one tokenizer serves many threads.  docs/tokenizer.md describes
 * the supported subset.
 */
#include <errno.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "tok_priv.h"

/* ---- loading ---------------------------------------------------------------- */

static char *read_whole(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    char *buf = NULL;
    size_t cap = 0, n = 0;
    for (;;) {
        if (n + 65536 + 1 > cap) {
            size_t nc = cap ? cap * 2 : 1 << 20;
            char *p = realloc(buf, nc);
            if (!p) { free(buf); fclose(f); return NULL; }
            buf = p;
            cap = nc;
        }
        size_t r = fread(buf + n, 1, cap - n - 1, f);
        n += r;
        if (r == 0) break;
    }
    int bad = ferror(f);
    fclose(f);
    if (bad) { free(buf); return NULL; }
    buf[n] = 0;
    *len = n;
    return buf;
}

/* ---- loading ------------------------------------------------------------------- */

static int32_t added_id_of(const eng_tok *t, const char *s)
{
    for (int i = 0; i < t->n_added; i++)
        if (strcmp(t->added[i].content, s) == 0) return t->added[i].id;
    return -1;
}

/* Reads "bos_token" etc. from tokenizer_config.json: a string or an
 * AddedToken object {"content": ...}. */
static char *config_token(json_t *cfg, const char *key)
{
    json_t *v = json_object_get(cfg, key);
    if (json_is_object(v)) v = json_object_get(v, "content");
    return json_is_string(v) ? strdup(json_string_value(v)) : NULL;
}

static int32_t token_id_of(const eng_tok *t, const char *s)
{
    if (!s) return -1;
    int32_t id = added_id_of(t, s);
    if (id >= 0) return id;
    return tok__vocab_find(t, s, strlen(s));
}

/* model_max_length: transformers writes 1000000000000000019884624838656
 * (VERY_LARGE_INTEGER) when a tokenizer has no limit; anything that is not
 * a usable positive length reads as none (0). */
static int64_t config_max_length(json_t *cfg)
{
    json_t *v = json_object_get(cfg, "model_max_length");
    double x = json_is_integer(v) ? (double)json_integer_value(v) : json_is_real(v) ? json_real_value(v) : 0;
    return x >= 1 && x <= INT32_MAX ? (int64_t)x : 0;
}

static int load_config(eng_tok *t, const char *dir, char *err, size_t errlen)
{
    char path[4200];
    snprintf(path, sizeof path, "%s/tokenizer_config.json", dir);
    json_t *cfg = NULL;
    struct stat st;
    int rc;
    if (stat(path, &st) == 0) {
        if ((rc = eng__json_load_file(path, path, &cfg, err, errlen))) return rc;
        t->bos_token = config_token(cfg, "bos_token");
        t->eos_token = config_token(cfg, "eos_token");
        t->pad_token = config_token(cfg, "pad_token");
        t->info.model_max_length = config_max_length(cfg);
    }
    t->info.bos_id = token_id_of(t, t->bos_token);
    t->info.eos_id = token_id_of(t, t->eos_token);
    t->info.pad_id = token_id_of(t, t->pad_token);
    rc = eng__chat_load(t, dir, cfg, &t->chat, err, errlen);
    json_decref(cfg);
    return rc;
}

eng_chat *eng__tok_chat(const eng_tok *t)
{
    return t->chat;
}

void eng_tok_free(eng_tok *t)
{
    if (!t) return;
    free(t->flags);
    free(t->piece_off);
    free(t->pieces);
    free(t->vmap);
    free(t->mkey);
    free(t->mrank);
    free(t->mnew);
    for (int i = 0; i < t->n_added; i++) free(t->added[i].content);
    free(t->added);
    for (int i = 0; i < t->n_re; i++) pcre2_code_free(t->re[i].re);
    free(t->post_pre);
    free(t->post_post);
    eng__chat_free(t->chat);
    free(t->bos_token);
    free(t->eos_token);
    free(t->pad_token);
    free(t);
}

/* Added tokens sorted so that the longest content comes first among those
 * sharing a start: the first match at a position is the longest. */
static int cmp_added(const void *x, const void *y)
{
    const tok_added *a = x, *b = y;
    unsigned ca = (unsigned char)a->content[0], cb = (unsigned char)b->content[0];
    if (ca != cb) return ca < cb ? -1 : 1;
    if (a->len != b->len) return a->len > b->len ? -1 : 1;
    return 0;
}

int eng_tok_load(const char *path, eng_tok **out, char *err, size_t errlen)
{
    if (!out || !path) return eng__errf(err, errlen, ENG_EINVAL, "eng_tok_load: NULL argument");
    *out = NULL;
    char file[4096], dir[4096];
    struct stat st;
    if (strlen(path) > 4000) return eng__errf(err, errlen, ENG_EINVAL, "eng_tok_load: path too long");
    if (stat(path, &st) != 0) return eng__errf(err, errlen, ENG_EIO, "%s: %s", path, strerror(errno));
    if (S_ISDIR(st.st_mode)) {
        snprintf(dir, sizeof dir, "%s", path);
        snprintf(file, sizeof file, "%s/tokenizer.json", path);
    } else {
        snprintf(file, sizeof file, "%s", path);
        snprintf(dir, sizeof dir, "%s", path);
        char *slash = strrchr(dir, '/');
        if (slash) *slash = 0;
        else snprintf(dir, sizeof dir, ".");
    }
    size_t len;
    char *text = read_whole(file, &len);
    if (!text) return eng__errf(err, errlen, ENG_EIO, "%s: %s", file, strerror(errno ? errno : EIO));
    json_error_t je;
    json_t *root = json_loadb(text, len, 0, &je);
    free(text);
    if (!root) return eng__errf(err, errlen, ENG_EFORMAT, "%s: line %d: %s", file, je.line, je.text);
    eng_tok *t = calloc(1, sizeof *t);
    int rc = ENG_ENOMEM;
    if (!t) goto fail;
    t->bl_stage = -1;
    json_t *added = json_object_get(root, "added_tokens");
    if (added && !json_is_array(added)) {
        rc = eng__errf(err, errlen, ENG_EFORMAT, "%s: added_tokens is not an array", file);
        goto fail;
    }
    json_t *none = json_array();
    if ((rc = tok__load_model(t, json_object_get(root, "model"), added ? added : none, err, errlen)) ||
        (rc = tok__load_normalizer(t, json_object_get(root, "normalizer"), err, errlen)) ||
        (rc = tok__load_pretok(t, json_object_get(root, "pre_tokenizer"), err, errlen)) ||
        (rc = tok__load_post(t, json_object_get(root, "post_processor"), err, errlen)) ||
        (rc = tok__load_decoder(json_object_get(root, "decoder"), err, errlen))) {
        json_decref(none);
        goto fail;
    }
    json_decref(none);
    if (t->n_added > 65535) {
        rc = eng__errf(err, errlen, ENG_EUNSUPPORTED, "%s: more than 65535 added_tokens", file);
        goto fail;
    }
    qsort(t->added, (size_t)t->n_added, sizeof *t->added, cmp_added);
    for (int i = t->n_added - 1; i >= 0; i--) {
        unsigned char c = (unsigned char)t->added[i].content[0];
        if (!t->added_to[c]) t->added_to[c] = (uint16_t)(i + 1);
        t->added_from[c] = (uint16_t)i;
        if (t->added[i].normalized) t->added_first_norm[c] = 1;
        else t->added_first[c] = 1;
    }
    t->info.vocab_size = t->n_ids;
    t->info.n_merges = (int)t->n_merges;
    t->info.n_added = t->n_added;
    if ((rc = load_config(t, dir, err, errlen))) goto fail;
    json_decref(root);
    *out = t;
    return 0;
fail:
    json_decref(root);
    eng_tok_free(t);
    if (rc == ENG_ENOMEM && err && errlen && !err[0]) eng__errf(err, errlen, rc, "%s: out of memory", file);
    return rc;
}

const eng_tok_info *eng_tok_get_info(const eng_tok *t)
{
    return &t->info;
}

const char *eng_tok_special_text(const eng_tok *t, const char *which)
{
    if (!which) return NULL;
    if (strcmp(which, "bos") == 0) return t->bos_token;
    if (strcmp(which, "eos") == 0) return t->eos_token;
    if (strcmp(which, "pad") == 0) return t->pad_token;
    return NULL;
}

int32_t eng_tok_token_id(const eng_tok *t, const char *text)
{
    return t && text ? token_id_of(t, text) : -1;
}

int eng_tok_is_special(const eng_tok *t, int32_t id)
{
    return id >= 0 && id < t->n_ids && (t->flags[id] & TF_SPECIAL);
}

int eng_tok_id_to_bytes(const eng_tok *t, int32_t id, const char **bytes, size_t *len)
{
    if (id < 0 || id >= t->n_ids || !(t->flags[id] & TF_EXISTS)) return ENG_EINVAL;
    *bytes = tok_piece(t, id, len);
    return 0;
}

/* ---- encoding -------------------------------------------------------------------- */

/* Spans of the text where special tokens may be matched. */
typedef struct span {
    size_t a, b;
} span;

typedef struct allow {
    int all;
    const span *spans; /* sorted, disjoint */
    size_t n;
} allow;

static int allowed_at(const allow *al, size_t a, size_t b)
{
    if (al->all) return 1;
    size_t lo = 0, hi = al->n; /* first span that ends after a */
    while (lo < hi) {
        size_t m = lo + (hi - lo) / 2;
        if (al->spans[m].b <= a) lo = m + 1;
        else hi = m;
    }
    return lo < al->n && al->spans[lo].a <= a && b <= al->spans[lo].b;
}

static int is_word_char(uint32_t c)
{
    if (c < 0x80) return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_';
    return !tok__is_white_space(c) && c > 0xBF; /* letters, marks, digits: approximated */
}

static uint32_t last_char(const unsigned char *s, size_t n)
{
    size_t i = n - 1;
    while (i > 0 && (s[i] & 0xC0) == 0x80) i--;
    int l;
    return tok_utf8_get(s + i, &l);
}

/* Finds the next added token match in s[from, n) of the given kind (raw or
 * normalized).  Returns 1 and sets [*ma, *mb), *tok; 0 when none. */
static int added_next(const eng_tok *t, const unsigned char *s, size_t n, size_t from, int norm,
                      size_t *ma, size_t *mb, const tok_added **tok)
{
    const uint8_t *first = norm ? t->added_first_norm : t->added_first;
    for (size_t i = from; i < n; i++) {
        if (!first[s[i]]) continue;
        /* tokens are sorted by first byte, then longest first */
        for (int k = t->added_from[s[i]]; k < t->added_to[s[i]]; k++) {
            const tok_added *a = &t->added[k];
            if (a->normalized != norm) continue;
            if (a->len <= n - i && memcmp(a->content, s + i, a->len) == 0) {
                *ma = i;
                *mb = i + a->len;
                *tok = a;
                return 1;
            }
        }
    }
    return 0;
}

/* Encodes a normalised piece: normalized added tokens, then pre-tokenizer. */
static int encode_normalized(tok_enc *c, const char *s, size_t n, const allow *al, size_t base)
{
    const eng_tok *t = c->t;
    if (!t->n_added_norm) return tok__pretok(c, s, n, 0);
    const unsigned char *u = (const unsigned char *)s;
    size_t start = 0, from = 0, ma, mb;
    const tok_added *a;
    int rc;
    while (added_next(t, u, n, from, 1, &ma, &mb, &a)) {
        from = mb;
        /* positions inside a normalised piece map to the piece's raw span */
        if (a->special && !allowed_at(al, base, base + n)) continue;
        if ((rc = tok__pretok(c, s + start, ma - start, 0))) return rc;
        if ((rc = tok_ivec_push(c->out, a->id))) return rc;
        start = mb;
    }
    return tok__pretok(c, s + start, n - start, 0);
}

static int encode_piece(tok_enc *c, const char *s, size_t n, const allow *al, size_t base)
{
    if (n == 0) return 0;
    if (c->t->nfc) {
        int r = tok__nfc_apply(s, n, &c->norm);
        if (r < 0) return r;
        if (r == 1) {
            /* the piece's normal form gets its own copy: nested calls reuse c->norm */
            char *copy = malloc(c->norm.n + 1);
            if (!copy) return ENG_ENOMEM;
            memcpy(copy, c->norm.p, c->norm.n);
            int rc = encode_normalized(c, copy, c->norm.n, al, base);
            free(copy);
            return rc;
        }
    }
    return encode_normalized(c, s, n, al, base);
}

static int encode_impl(const eng_tok *t, const char *text, size_t len, const allow *al, int add_special,
                       tok_ivec *out, char *err, size_t errlen)
{
    if (!t || (!text && len)) return eng__errf(err, errlen, ENG_EINVAL, "eng_tok_encode: NULL argument");
    tok_enc c = { 0 };
    c.t = t;
    c.out = out;
    c.err = err;
    c.errlen = errlen;
    int rc = ENG_ENOMEM;
    tok_buf clean = { 0 };
    const unsigned char *s = (const unsigned char *)text;
    if (!tok__utf8_valid(s, len)) {
        if (tok__utf8_lossy(&clean, s, len, 1, NULL)) goto done;
        s = (const unsigned char *)clean.p;
        len = clean.n;
    }
    if (len >= WC_MIN_TEXT) {
        c.wc_slots = 256;
        while (c.wc_slots < WC_MAX_SLOTS && c.wc_slots < len / 8) c.wc_slots *= 2;
    }
    c.md = pcre2_match_data_create(1, NULL);
    if (!c.md) goto done;
    if (add_special && (rc = tok_ivec_append(out, t->post_pre, (size_t)t->n_post_pre))) goto done;

    /* added tokens over the raw text, tokenizers' find_matches */
    size_t start = 0, from = 0, ma, mb;
    const tok_added *a;
    while (added_next(t, s, len, from, 0, &ma, &mb, &a)) {
        from = mb;
        if (a->special && !allowed_at(al, ma, mb)) continue;
        if (a->single_word) {
            int lw = ma > 0 && is_word_char(last_char(s, ma));
            int l2;
            int rw = mb < len && is_word_char(tok_utf8_get(s + mb, &l2));
            if (lw || rw) continue;
        }
        if (a->lstrip) {
            size_t k = ma;
            while (k > start) {
                size_t j = k - 1;
                while (j > start && (s[j] & 0xC0) == 0x80) j--;
                int l;
                if (!tok__is_white_space(tok_utf8_get(s + j, &l))) break;
                k = j;
            }
            ma = k;
        }
        if (a->rstrip) {
            while (mb < len) {
                int l;
                if (!tok__is_white_space(tok_utf8_get(s + mb, &l))) break;
                mb += (size_t)l;
            }
            from = mb;
        }
        if ((rc = encode_piece(&c, (const char *)s + start, ma - start, al, start))) goto done;
        if ((rc = tok_ivec_push(out, a->id))) goto done;
        start = mb;
    }
    if ((rc = encode_piece(&c, (const char *)s + start, len - start, al, start))) goto done;
    if (add_special && (rc = tok_ivec_append(out, t->post_post, (size_t)t->n_post_post))) goto done;
    rc = 0;
done:
    if (rc == ENG_ENOMEM) eng__errf(err, errlen, rc, "tokenizer: out of memory");
    pcre2_match_data_free(c.md);
    free(clean.p);
    free(c.syms);
    free(c.heap);
    free(c.norm.p);
    free(c.wc);
    free(c.wbytes.p);
    free(c.wids.p);
    return rc;
}

int eng_tok_encode(const eng_tok *t, const char *text, size_t len, unsigned flags, int32_t **ids, size_t *n_ids,
                   char *err, size_t errlen)
{
    if (!ids || !n_ids) return eng__errf(err, errlen, ENG_EINVAL, "eng_tok_encode: NULL output");
    *ids = NULL;
    *n_ids = 0;
    tok_ivec out = { 0 };
    allow al = { (flags & ENG_TOK_ALLOW_SPECIAL) != 0, NULL, 0 };
    int rc = encode_impl(t, text, len, &al, (flags & ENG_TOK_ADD_SPECIAL) != 0, &out, err, errlen);
    if (rc) {
        free(out.p);
        return rc;
    }
    if (!out.p && !(out.p = malloc(sizeof *out.p))) return eng__errf(err, errlen, ENG_ENOMEM, "tokenizer: out of memory");
    *ids = out.p;
    *n_ids = out.n;
    return 0;
}

int eng_tok_encode_segments(const eng_tok *t, const eng_tok_segment *segs, size_t n_segs, unsigned flags,
                            int32_t **ids, size_t *n_ids, char *err, size_t errlen)
{
    if (!ids || !n_ids || (!segs && n_segs)) return eng__errf(err, errlen, ENG_EINVAL, "eng_tok_encode_segments: NULL argument");
    *ids = NULL;
    *n_ids = 0;
    tok_buf text = { 0 };
    span *sp = calloc(n_segs + 1, sizeof *sp);
    size_t nsp = 0;
    int rc = ENG_ENOMEM;
    if (!sp) goto done;
    for (size_t i = 0; i < n_segs; i++) {
        if (!segs[i].text && segs[i].len) { rc = eng__errf(err, errlen, ENG_EINVAL, "eng_tok_encode_segments: segment %zu has no text", i); goto done; }
        size_t a = text.n;
        if (tok_buf_put(&text, segs[i].text, segs[i].len)) goto done;
        if (!segs[i].allow_special || segs[i].len == 0) continue;
        if (nsp && sp[nsp - 1].b == a) sp[nsp - 1].b = text.n; /* adjacent template parts form one span */
        else sp[nsp++] = (span){ a, text.n };
    }
    /* invalid UTF-8 would be replaced and shift the spans: refuse it here */
    if (!tok__utf8_valid((const unsigned char *)text.p, text.n)) {
        rc = eng__errf(err, errlen, ENG_EINVAL, "eng_tok_encode_segments: text is not valid UTF-8");
        goto done;
    }
    tok_ivec out = { 0 };
    allow al = { (flags & ENG_TOK_ALLOW_SPECIAL) != 0, sp, nsp };
    rc = encode_impl(t, text.p ? text.p : "", text.n, &al, (flags & ENG_TOK_ADD_SPECIAL) != 0, &out, err, errlen);
    if (rc) {
        free(out.p);
        goto done;
    }
    if (!out.p && !(out.p = malloc(sizeof *out.p))) { rc = eng__errf(err, errlen, ENG_ENOMEM, "tokenizer: out of memory"); goto done; }
    *ids = out.p;
    *n_ids = out.n;
done:
    if (rc == ENG_ENOMEM && err && errlen && !err[0]) eng__errf(err, errlen, rc, "tokenizer: out of memory");
    free(text.p);
    free(sp);
    return rc;
}

int tok__pretokenize(const eng_tok *t, const char *text, size_t len, tok_ivec *spans, char *err, size_t errlen)
{
    if (t->add_prefix_space && t->bl_stage >= 0)
        return eng__errf(err, errlen, ENG_EINVAL, "tok__pretokenize: ByteLevel add_prefix_space is set");
    if (len > INT32_MAX || !tok__utf8_valid((const unsigned char *)text, len))
        return eng__errf(err, errlen, ENG_EINVAL, "tok__pretokenize: text is not valid UTF-8 below 2 GiB");
    tok_enc c = { 0 };
    c.t = t;
    c.words_only = 1;
    c.words_base = text;
    c.words = spans;
    c.err = err;
    c.errlen = errlen;
    c.md = pcre2_match_data_create(1, NULL);
    if (!c.md) return eng__errf(err, errlen, ENG_ENOMEM, "tokenizer: out of memory");
    int rc = tok__pretok(&c, text, len, 0);
    pcre2_match_data_free(c.md);
    return rc;
}

int eng_tok_normalize(const eng_tok *t, const char *text, size_t len, char **out, size_t *out_len)
{
    if (!t || !out || !out_len || (!text && len)) return ENG_EINVAL;
    tok_buf clean = { 0 }, norm = { 0 };
    const char *s = text ? text : "";
    if (!tok__utf8_valid((const unsigned char *)s, len)) {
        if (tok__utf8_lossy(&clean, (const unsigned char *)s, len, 1, NULL)) return ENG_ENOMEM;
        s = clean.p;
        len = clean.n;
    }
    int r = t->nfc ? tok__nfc_apply(s, len, &norm) : 0;
    if (r < 0) { free(clean.p); return r; }
    if (r == 0) {
        norm.n = 0;
        if (tok_buf_put(&norm, s, len)) { free(clean.p); free(norm.p); return ENG_ENOMEM; }
    }
    free(clean.p);
    *out = norm.p;
    *out_len = norm.n;
    return 0;
}
