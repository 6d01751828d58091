/*
 * tok_decode.c — the tokenizer's output side: the post-processor (the
 * template tokens TemplateProcessing adds around a sequence), the ByteLevel
 * decoder, ids -> text with invalid UTF-8 replaced as Rust's
 * from_utf8_lossy does, and the streaming decoder that holds an incomplete
 * trailing character until its bytes arrive.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "tok_priv.h"

int tok__load_decoder(json_t *d, char *err, size_t errlen)
{
    const char *type = d ? tok_jstr(d, "type") : NULL;
    if (type && strcmp(type, "ByteLevel") == 0) return 0;
    if (type && strcmp(type, "Sequence") == 0) {
        json_t *arr = json_object_get(d, "decoders");
        if (json_is_array(arr) && json_array_size(arr) == 1) return tok__load_decoder(json_array_get(arr, 0), err, errlen);
    }
    return eng__errf(err, errlen, ENG_EUNSUPPORTED,
                     "tokenizer.json: decoder \"%s\" is not supported (only ByteLevel)", type ? type : "null");
}

static int load_template_ids(eng_tok *t, json_t *items, json_t *specials, int32_t **pre, int *npre,
                             int32_t **post, int *npost, char *err, size_t errlen)
{
    size_t i;
    json_t *it;
    int seen_seq = 0;
    tok_ivec a = { 0 }, b = { 0 };
    json_array_foreach(items, i, it) {
        json_t *sp = json_object_get(it, "SpecialToken"), *sq = json_object_get(it, "Sequence");
        if (sq) {
            const char *id = tok_jstr(sq, "id");
            if (!id || strcmp(id, "A") != 0 || seen_seq) {
                free(a.p); free(b.p);
                return eng__errf(err, errlen, ENG_EUNSUPPORTED, "tokenizer.json: post_processor.single: only one Sequence A is supported");
            }
            seen_seq = 1;
            continue;
        }
        const char *name = sp ? tok_jstr(sp, "id") : NULL;
        json_t *st = name ? json_object_get(specials, name) : NULL;
        json_t *ids = json_object_get(st, "ids");
        if (!json_is_array(ids)) {
            free(a.p); free(b.p);
            return eng__errf(err, errlen, ENG_EFORMAT, "tokenizer.json: post_processor: special token \"%s\" has no ids",
                             name ? name : "?");
        }
        size_t k;
        json_t *x;
        json_array_foreach(ids, k, x) {
            json_int_t v = json_integer_value(x);
            if (!json_is_integer(x) || v < 0 || v >= t->n_ids || tok_ivec_push(seen_seq ? &b : &a, (int32_t)v)) {
                free(a.p); free(b.p);
                return eng__errf(err, errlen, ENG_EFORMAT, "tokenizer.json: post_processor: bad id for \"%s\"", name);
            }
        }
    }
    *pre = a.p; *npre = (int)a.n;
    *post = b.p; *npost = (int)b.n;
    return 0;
}

int tok__load_post(eng_tok *t, json_t *p, char *err, size_t errlen)
{
    if (!p || json_is_null(p)) return 0;
    const char *type = tok_jstr(p, "type");
    if (!type) return eng__errf(err, errlen, ENG_EFORMAT, "tokenizer.json: post_processor without \"type\"");
    if (strcmp(type, "ByteLevel") == 0) return 0; /* offsets only */
    if (strcmp(type, "Sequence") == 0) {
        json_t *arr = json_object_get(p, "processors"), *x;
        size_t i;
        json_array_foreach(arr, i, x) {
            int rc = tok__load_post(t, x, err, errlen);
            if (rc) return rc;
        }
        return 0;
    }
    if (strcmp(type, "TemplateProcessing") == 0) {
        if (t->post_pre || t->post_post)
            return eng__errf(err, errlen, ENG_EUNSUPPORTED, "tokenizer.json: post_processor: two TemplateProcessing steps");
        return load_template_ids(t, json_object_get(p, "single"), json_object_get(p, "special_tokens"),
                                 &t->post_pre, &t->n_post_pre, &t->post_post, &t->n_post_post, err, errlen);
    }
    return eng__errf(err, errlen, ENG_EUNSUPPORTED,
                     "tokenizer.json: post_processor type \"%s\" is not supported (ByteLevel, TemplateProcessing)", type);
}

/* ---- decoding --------------------------------------------------------------- */

static int skip_id(const eng_tok *t, int32_t id, unsigned flags)
{
    if (id < 0 || id >= t->n_ids || !(t->flags[id] & TF_EXISTS)) return 1; /* unknown ids are skipped, as tokenizers does */
    return (flags & ENG_TOK_SKIP_SPECIAL) && (t->flags[id] & TF_SPECIAL);
}

int eng_tok_decode(const eng_tok *t, const int32_t *ids, size_t n, unsigned flags, char **text, size_t *len,
                   char *err, size_t errlen)
{
    if (!t || !text || !len || (!ids && n)) return eng__errf(err, errlen, ENG_EINVAL, "eng_tok_decode: NULL argument");
    *text = NULL;
    *len = 0;
    tok_buf raw = { 0 }, out = { 0 };
    for (size_t i = 0; i < n; i++) {
        if (skip_id(t, ids[i], flags)) continue;
        size_t l;
        const char *p = tok_piece(t, ids[i], &l);
        if (tok_buf_put(&raw, p, l)) goto oom;
    }
    if (tok__utf8_lossy(&out, (const unsigned char *)raw.p, raw.n, 1, NULL) || tok_buf_put(&out, "", 0)) goto oom;
    free(raw.p);
    *text = out.p;
    *len = out.n;
    return 0;
oom:
    free(raw.p);
    free(out.p);
    return eng__errf(err, errlen, ENG_ENOMEM, "tokenizer: out of memory");
}

struct eng_tok_stream {
    const eng_tok *t;
    unsigned flags;
    unsigned char held[4];
    size_t n_held;
    tok_buf work, out;
};

int eng_tok_stream_create(const eng_tok *t, unsigned flags, eng_tok_stream **out)
{
    if (!t || !out) return ENG_EINVAL;
    eng_tok_stream *s = calloc(1, sizeof *s);
    if (!s) return ENG_ENOMEM;
    s->t = t;
    s->flags = flags;
    *out = s;
    return 0;
}

void eng_tok_stream_free(eng_tok_stream *s)
{
    if (!s) return;
    free(s->work.p);
    free(s->out.p);
    free(s);
}

void eng_tok_stream_reset(eng_tok_stream *s)
{
    if (s) s->n_held = 0;
}

int eng_tok_stream_push(eng_tok_stream *s, int32_t id, const char **text, size_t *len)
{
    if (!s || !text || !len) return ENG_EINVAL;
    *text = "";
    *len = 0;
    s->out.n = 0;
    if (skip_id(s->t, id, s->flags)) return 0;
    size_t l;
    const char *p = tok_piece(s->t, id, &l);
    s->work.n = 0;
    if (tok_buf_put(&s->work, s->held, s->n_held) || tok_buf_put(&s->work, p, l)) return ENG_ENOMEM;
    size_t held = 0;
    if (tok__utf8_lossy(&s->out, (const unsigned char *)s->work.p, s->work.n, 0, &held) || tok_buf_put(&s->out, "", 0))
        return ENG_ENOMEM;
    /* at most 3 bytes are ever an incomplete prefix */
    memcpy(s->held, s->work.p + s->work.n - held, held);
    s->n_held = held;
    *text = s->out.p;
    *len = s->out.n;
    return 0;
}

int eng_tok_stream_flush(eng_tok_stream *s, const char **text, size_t *len)
{
    if (!s || !text || !len) return ENG_EINVAL;
    s->out.n = 0;
    if (tok__utf8_lossy(&s->out, s->held, s->n_held, 1, NULL) || tok_buf_put(&s->out, "", 0)) return ENG_ENOMEM;
    s->n_held = 0;
    *text = s->out.p;
    *len = s->out.n;
    return 0;
}
