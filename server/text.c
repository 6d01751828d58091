/*
 * text.c — the server's tokenizer adapter: an srv_codec over the engine's
 * eng_tok (tokenizer.json + chat template of the model directory).
 *
 *   /v1/completions text prompt  -> eng_tok_encode with special tokens
 *   (and /tokenize)                 recognised and the post-processor applied
 *                                   (what `tokenizer(text)` does in HF)
 *   /v1/chat/completions         -> eng_tok_chat_encode (special tokens come
 *   (and /tokenize)                 only from the template, never from
 *                                   message content)
 *   /detokenize                  -> eng_tok_decode, special tokens included
 *   generated token -> text      -> the token's bytes; special tokens give no
 *                                   text (skip_special_tokens); UTF-8
 *                                   characters split across tokens are held
 *                                   back by srv_stop_scan until complete
 *   stop ids                     -> the template's end-of-turn ids for chat,
 *                                   the tokenizer's eos for completions
 *
 * eng_tok is read-only once loaded, so the loop thread and the thread pool
 * may use one codec at once.
 */
#include "config.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "srv_internal.h"

typedef struct text_ctx {
    eng_tok *tok;
    const char *template_name; /* NULL: no usable chat template */
    char template_err[256];
} text_ctx;

static int t_encode(void *ctx, const char *text, size_t len, int add_special, int32_t **ids, int *n,
                    char *err, size_t errlen)
{
    text_ctx *t = ctx;
    size_t nn = 0;
    int rc = eng_tok_encode(t->tok, text, len,
                            ENG_TOK_ALLOW_SPECIAL | (add_special ? ENG_TOK_ADD_SPECIAL : 0), ids, &nn,
                            err, errlen);
    if (rc != ENG_OK) return -1;
    if (nn > (1u << 24)) {
        free(*ids);
        *ids = NULL;
        snprintf(err, errlen, "too many tokens");
        return -1;
    }
    *n = (int)nn;
    return 0;
}

static int t_chat(void *ctx, json_t *msgs, int add_generation_prompt, int32_t **ids, int *n,
                  char *err, size_t errlen)
{
    text_ctx *t = ctx;
    if (!t->template_name) {
        snprintf(err, errlen, "%s", t->template_err);
        return -1;
    }
    size_t nm = json_array_size(msgs);
    eng_tok_message *m = calloc(nm ? nm : 1, sizeof *m);
    srv_buf *joined = calloc(nm ? nm : 1, sizeof *joined);
    int rc = -1;
    if (!m || !joined) {
        snprintf(err, errlen, "out of memory");
        goto out;
    }
    for (size_t i = 0; i < nm; i++) {
        json_t *msg = json_array_get(msgs, i);
        const char *role = json_string_value(json_object_get(msg, "role"));
        m[i].role = strcmp(role, "developer") == 0 ? "system" : role;
        json_t *c = json_object_get(msg, "content");
        if (json_is_string(c)) {
            m[i].content = json_string_value(c);
            m[i].content_len = json_string_length(c);
        } else if (json_is_array(c)) {
            /* text parts are joined, as OpenAI does for a plain-text model */
            for (size_t k = 0; k < json_array_size(c); k++) {
                json_t *tx = json_object_get(json_array_get(c, k), "text");
                if (srv_buf_append(&joined[i], json_string_value(tx), json_string_length(tx)) != 0) {
                    snprintf(err, errlen, "out of memory");
                    goto out;
                }
            }
            m[i].content = joined[i].data ? joined[i].data : "";
            m[i].content_len = joined[i].len;
        } else {
            m[i].content = "";
            m[i].content_len = 0;
        }
    }
    size_t nn = 0;
    if (eng_tok_chat_encode(t->tok, m, nm, add_generation_prompt, NULL, ids, &nn, err, errlen) != ENG_OK)
        goto out;
    *n = (int)nn;
    rc = 0;
out:
    for (size_t i = 0; joined && i < nm; i++) srv_buf_free(&joined[i]);
    free(joined);
    free(m);
    return rc;
}

static int t_decode(void *ctx, const int32_t *ids, int n, char **text, size_t *len, char *err,
                    size_t errlen)
{
    text_ctx *t = ctx;
    return eng_tok_decode(t->tok, ids, (size_t)n, 0, text, len, err, errlen) == ENG_OK ? 0 : -1;
}

static int t_bytes(void *ctx, int32_t tok, char *buf, size_t cap)
{
    text_ctx *t = ctx;
    if (eng_tok_is_special(t->tok, tok)) return 0;
    const char *b;
    size_t len;
    if (eng_tok_id_to_bytes(t->tok, tok, &b, &len) != ENG_OK) return 0;
    if (len > cap) len = cap;
    memcpy(buf, b, len);
    return (int)len;
}

static int t_stop_ids(void *ctx, int chat, int32_t *out, int max)
{
    text_ctx *t = ctx;
    int n = 0;
    if (chat && t->template_name) {
        n = eng_tok_chat_stop_ids(t->tok, NULL, out, max);
        if (n < 0) n = 0;
    }
    int32_t eos = eng_tok_get_info(t->tok)->eos_id;
    if (eos >= 0 && n < max) {
        int dup = 0;
        for (int i = 0; i < n; i++) dup |= out[i] == eos;
        if (!dup) out[n++] = eos;
    }
    return n;
}

int srv_text_load(const char *model_dir, srv_codec **out, char *info, size_t infolen, char *err,
                  size_t errlen)
{
    *out = NULL;
    snprintf(info, infolen, "none");
    char path[4096];
    snprintf(path, sizeof path, "%s/tokenizer.json", model_dir);
    struct stat st;
    if (stat(path, &st) != 0) return 0; /* no tokenizer: token-id prompts only */
    text_ctx *t = calloc(1, sizeof *t);
    srv_codec *c = calloc(1, sizeof *c);
    if (!t || !c) {
        free(t);
        free(c);
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    if (eng_tok_load(model_dir, &t->tok, err, errlen) != ENG_OK) {
        free(t);
        free(c);
        return -1;
    }
    char terr[160] = "";
    if (eng_tok_chat_template_name(t->tok, NULL, &t->template_name, terr, sizeof terr) != ENG_OK) {
        t->template_name = NULL;
        snprintf(t->template_err, sizeof t->template_err, "the model has no usable chat template: %s",
                 terr[0] ? terr : "none found");
    }
    c->ctx = t;
    c->encode = t_encode;
    c->chat = t_chat;
    c->decode = t_decode;
    c->token_bytes = t_bytes;
    c->stop_ids = t_stop_ids;
    const eng_tok_info *ti = eng_tok_get_info(t->tok);
    snprintf(info, infolen, "vocab=%d chat_template=%s eos=%d", ti->vocab_size,
             t->template_name ? t->template_name : "none", (int)ti->eos_id);
    *out = c;
    return 0;
}

void srv_text_free(srv_codec *c)
{
    if (!c) return;
    text_ctx *t = c->ctx;
    if (t) eng_tok_free(t->tok);
    free(t);
    free(c);
}
