/*
 * text.c — the server's tokenizer adapter: an srv_codec over the engine's
 * eng_tok (tokenizer.json + chat template of the model directory).
 *
 *   /v1/completions text prompt  -> eng_tok_encode with special tokens
 *   (and /tokenize)                 recognised and the post-processor applied
 *                                   (what `tokenizer(text)` does in HF)
 *   /v1/chat/completions         -> eng_tok_chat_encode: the model's Jinja
 *   (and /tokenize)                 chat template (or --chat-template)
 *                                   over messages, tools, documents and
 *                                   chat_template_kwargs; special tokens
 *                                   come only from the template, never
 *                                   from the request's data
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

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "srv_internal.h"

typedef struct text_ctx {
    eng_tok *tok;
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

static int t_chat(void *ctx, json_t *req, int32_t **ids, int *n, char *err, size_t errlen)
{
    text_ctx *t = ctx;
    eng_chat_params p;
    eng_chat_params_from_json(&p, req);
    size_t nn = 0;
    int rc = eng_tok_chat_encode(t->tok, &p, ids, &nn, err, errlen);
    if (rc != ENG_OK) return rc;
    if (nn > (1u << 24)) {
        free(*ids);
        *ids = NULL;
        snprintf(err, errlen, "too many tokens");
        return ENG_ERANGE;
    }
    *n = (int)nn;
    return 0;
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
    if (chat) {
        n = eng_tok_chat_stop_ids(t->tok, out, max);
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

/* --chat-template: a file, or (as vLLM takes it) the template text itself. */
static int load_override(eng_tok *tok, const char *arg, char *err, size_t errlen)
{
    FILE *f = fopen(arg, "rb");
    if (!f) {
        if (!strstr(arg, "{{") && !strstr(arg, "{%")) {
            snprintf(err, errlen, "--chat-template %s: %s", arg, strerror(errno));
            return -1;
        }
        return eng_tok_set_chat_template(tok, arg, strlen(arg), "--chat-template", err, errlen) ? -1 : 0;
    }
    srv_buf b = { 0 };
    char chunk[65536];
    size_t n;
    int bad = 0;
    while ((n = fread(chunk, 1, sizeof chunk, f)) > 0) bad |= srv_buf_append(&b, chunk, n) != 0;
    bad |= ferror(f);
    fclose(f);
    if (bad) {
        srv_buf_free(&b);
        snprintf(err, errlen, "--chat-template %s: cannot read the file", arg);
        return -1;
    }
    int rc = eng_tok_set_chat_template(tok, b.data ? b.data : "", b.len, arg, err, errlen);
    srv_buf_free(&b);
    return rc ? -1 : 0;
}

int srv_text_load(const char *model_dir, const char *chat_template, srv_codec **out, char *info,
                  size_t infolen, char *err, size_t errlen)
{
    *out = NULL;
    snprintf(info, infolen, "none");
    char path[4096];
    snprintf(path, sizeof path, "%s/tokenizer.json", model_dir);
    struct stat st;
    if (stat(path, &st) != 0) { /* no tokenizer: token-id prompts only */
        if (chat_template && *chat_template) {
            snprintf(err, errlen, "--chat-template needs a tokenizer, but %s has no tokenizer.json", model_dir);
            return -1;
        }
        return 0;
    }
    text_ctx *t = calloc(1, sizeof *t);
    srv_codec *c = calloc(1, sizeof *c);
    if (!t || !c) {
        free(t);
        free(c);
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    if (eng_tok_load(model_dir, &t->tok, err, errlen) != ENG_OK ||
        (chat_template && *chat_template && load_override(t->tok, chat_template, err, errlen) != 0)) {
        eng_tok_free(t->tok);
        free(t);
        free(c);
        return -1;
    }
    char terr[1024];
    if (eng_tok_chat_template_check(t->tok, terr, sizeof terr) != ENG_OK) {
        char q[1100];
        /* the daemon serves completions; chat requests get this message as a 400 */
        srv_log("warn", "chat_template_unusable", " error=%s", srv_log_quote(terr, q, sizeof q));
    }
    c->ctx = t;
    c->encode = t_encode;
    c->chat = t_chat;
    c->decode = t_decode;
    c->token_bytes = t_bytes;
    c->stop_ids = t_stop_ids;
    const eng_tok_info *ti = eng_tok_get_info(t->tok);
    snprintf(info, infolen, "vocab=%d chat_template=%s eos=%d", ti->vocab_size,
             eng_tok_chat_template_check(t->tok, NULL, 0) == ENG_OK ? "ok" : "unusable", (int)ti->eos_id);
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
