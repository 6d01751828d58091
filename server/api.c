/*
 * api.c — the OpenAI-compatible request and response shapes.
 *
 * srv_genreq_parse turns a JSON body into a validated srv_genreq or an
 * srv_error naming the offending field; the builders produce the JSON bodies
 * and the Server-Sent Events of /v1/completions and /v1/chat/completions.
 * Everything here is a pure function of its arguments (no I/O, no globals),
 * so tests/test_server.c exercises it directly.
 */
#include "config.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "srv_internal.h"

/* ---- errors --------------------------------------------------------------- */

void srv_error_set(srv_error *e, int status, const char *type, const char *param,
                   const char *code, const char *fmt, ...)
{
    e->status = status;
    e->type = type;
    e->code = code;
    snprintf(e->param, sizeof e->param, "%s", param ? param : "");
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(e->message, sizeof e->message, fmt, ap);
    va_end(ap);
    if (n >= (int)sizeof e->message) {
        /* cut to the buffer: drop a character the cut split */
        size_t len = strlen(e->message), p = len;
        while (p > 0 && len - p < 4 && ((unsigned char)e->message[p - 1] & 0xc0) == 0x80) p--;
        if (p > 0 && (unsigned char)e->message[p - 1] >= 0xc0 &&
            srv_utf8_char_len(e->message + p - 1, len - p + 1) == 0)
            e->message[p - 1] = '\0';
    }
}

/* A JSON string from arbitrary bytes: invalid UTF-8 becomes U+FFFD (one
 * per invalid byte).  NULL only when memory runs out. */
static json_t *json_text(const char *s, size_t n)
{
    json_t *j = json_stringn(s ? s : "", s ? n : 0);
    if (j) return j;
    srv_buf b = { 0 };
    for (size_t i = 0; i < n;) {
        size_t len = srv_utf8_char_len(s + i, n - i);
        if (len == 0 ? srv_buf_append(&b, "\xef\xbf\xbd", 3) : srv_buf_append(&b, s + i, len)) {
            srv_buf_free(&b);
            return NULL;
        }
        i += len ? len : 1;
    }
    j = json_stringn(b.data ? b.data : "", b.len);
    srv_buf_free(&b);
    return j;
}

char *srv_error_json(const srv_error *e)
{
    json_t *o = json_pack("{s:{s:o, s:s, s:o, s:o}}", "error", "message",
                          json_text(e->message, strlen(e->message)), "type",
                          e->type ? e->type : "invalid_request_error", "param",
                          e->param[0] ? json_text(e->param, strlen(e->param)) : json_null(), "code",
                          e->code ? json_string(e->code) : json_null());
    char *s = o ? json_dumps(o, JSON_COMPACT) : NULL;
    json_decref(o);
    return s;
}

/* ---- request parsing -------------------------------------------------------- */

#define BAD(param, ...) \
    do { srv_error_set(err, 400, "invalid_request_error", param, NULL, __VA_ARGS__); goto fail; } while (0)
#define BADC(code, param, ...) \
    do { srv_error_set(err, 400, "invalid_request_error", param, code, __VA_ARGS__); goto fail; } while (0)

/* Field getters: absent and null mean "not given" (return 0); a present
 * field of the wrong type or range fills err and returns -1; 1 = got it. */
static int get_int(json_t *o, const char *k, long long lo, long long hi, long long *out,
                   srv_error *err)
{
    json_t *v = json_object_get(o, k);
    if (!v || json_is_null(v)) return 0;
    if (!json_is_integer(v)) {
        srv_error_set(err, 400, "invalid_request_error", k, NULL,
                      "'%s' must be an integer", k);
        return -1;
    }
    long long x = json_integer_value(v);
    if (x < lo || x > hi) {
        srv_error_set(err, 400, "invalid_request_error", k, NULL,
                      "'%s' must be between %lld and %lld, got %lld", k, lo, hi, x);
        return -1;
    }
    *out = x;
    return 1;
}

static int get_num(json_t *o, const char *k, double lo, double hi, int lo_open, double *out,
                   srv_error *err)
{
    json_t *v = json_object_get(o, k);
    if (!v || json_is_null(v)) return 0;
    if (!json_is_number(v)) {
        srv_error_set(err, 400, "invalid_request_error", k, NULL, "'%s' must be a number", k);
        return -1;
    }
    double x = json_number_value(v);
    if (!isfinite(x) || x < lo || x > hi || (lo_open && x <= lo)) {
        srv_error_set(err, 400, "invalid_request_error", k, NULL,
                      "'%s' must be in %s%g, %g], got %g", k, lo_open ? "(" : "[", lo, hi, x);
        return -1;
    }
    *out = x;
    return 1;
}

static int get_bool(json_t *o, const char *k, int *out, srv_error *err)
{
    json_t *v = json_object_get(o, k);
    if (!v || json_is_null(v)) return 0;
    if (!json_is_boolean(v)) {
        srv_error_set(err, 400, "invalid_request_error", k, NULL, "'%s' must be a boolean", k);
        return -1;
    }
    *out = json_is_true(v);
    return 1;
}

/* Token ids from a JSON array of integers.  Returns a new array or NULL with
 * err filled. */
static int32_t *parse_ids(json_t *a, const char *param, int vocab, int *n_out, srv_error *err)
{
    size_t n = json_array_size(a);
    if (n == 0) {
        srv_error_set(err, 400, "invalid_request_error", param, NULL, "'%s' must not be empty", param);
        return NULL;
    }
    if (n > (1u << 24)) {
        srv_error_set(err, 400, "invalid_request_error", param, "context_length_exceeded",
                      "'%s' has too many tokens (%zu)", param, n);
        return NULL;
    }
    int32_t *ids = malloc(n * sizeof *ids);
    if (!ids) {
        srv_error_set(err, 500, "server_error", NULL, NULL, "out of memory");
        return NULL;
    }
    for (size_t i = 0; i < n; i++) {
        json_t *v = json_array_get(a, i);
        if (!json_is_integer(v) || json_integer_value(v) < 0 || json_integer_value(v) >= vocab) {
            srv_error_set(err, 400, "invalid_request_error", param, NULL,
                          "'%s'[%zu] must be a token id in [0, %d)", param, i, vocab);
            free(ids);
            return NULL;
        }
        ids[i] = (int32_t)json_integer_value(v);
    }
    *n_out = (int)n;
    return ids;
}

/* Ids from a tokenizer must still be in the model's vocabulary. */
static int check_ids(const srv_genreq *r, const srv_model_desc *md, const char *param, srv_error *err)
{
    for (int i = 0; i < r->n_prompt; i++)
        if (r->prompt[i] < 0 || r->prompt[i] >= md->vocab_size) {
            srv_error_set(err, 500, "server_error", param, NULL,
                          "the tokenizer produced id %d outside the model's vocabulary (%d)",
                          (int)r->prompt[i], md->vocab_size);
            return -1;
        }
    return 0;
}

static const char *no_tokenizer_msg =
    "this model directory has no tokenizer.json, so text prompts cannot be tokenized; send "
    "'prompt' as an array of token ids (/v1/completions) or 'prompt_token_ids' "
    "(/v1/chat/completions)";

/* The completions 'prompt': token ids, [[ids]] or a single string. */
static int parse_prompt(json_t *root, srv_genreq *r, const srv_model_desc *md, srv_error *err)
{
    json_t *p = json_object_get(root, "prompt");
    if (!p || json_is_null(p)) BAD("prompt", "'prompt' is required");
    if (json_is_array(p) && json_array_size(p) > 0) {
        json_t *first = json_array_get(p, 0);
        if (json_is_array(first) || json_is_string(first)) {
            if (json_array_size(p) > 1)
                BAD("prompt", "batched prompts (a list of %zu prompts) are not supported; send "
                    "one prompt per request", json_array_size(p));
            p = first;
        }
    }
    if (json_is_string(p)) {
        if (!md->codec) {
            srv_error_set(err, 400, "invalid_request_error", "prompt", "no_tokenizer", "%s",
                          no_tokenizer_msg);
            return -1;
        }
        if (json_string_length(p) == 0) BAD("prompt", "'prompt' must not be empty");
        r->pending = json_incref(p); /* tokenized by srv_genreq_tokenize */
        return 0;
    }
    if (!json_is_array(p))
        BAD("prompt", "'prompt' must be a string or an array of token ids");
    r->prompt = parse_ids(p, "prompt", md->vocab_size, &r->n_prompt, err);
    return r->prompt ? 0 : -1;
fail:
    return -1;
}

/* OpenAI's message shapes, checked before the template sees them: roles,
 * content as a string or a list of text parts (null or absent for an
 * assistant turn), an assistant's tool_calls, a tool turn's tool_call_id. */
static int check_message(json_t *m, const char *param, srv_error *err)
{
    static const char *const roles[] = { "system", "developer", "user", "assistant", "tool" };
    if (!json_is_object(m)) BAD(param, "'%s' must be an object", param);
    json_t *role = json_object_get(m, "role");
    if (!json_is_string(role)) BAD(param, "'%s.role' must be a string", param);
    const char *rs = json_string_value(role);
    int ok = 0; /* by length: "user\u0000..." is no role */
    for (size_t k = 0; k < sizeof roles / sizeof *roles; k++)
        ok |= json_string_length(role) == strlen(roles[k]) && strcmp(rs, roles[k]) == 0;
    if (!ok) BAD(param, "'%s.role' must be one of system, developer, user, assistant, tool", param);
    int assistant = strcmp(rs, "assistant") == 0;
    json_t *c = json_object_get(m, "content");
    if (json_is_array(c)) {
        for (size_t k = 0; k < json_array_size(c); k++) {
            json_t *part = json_array_get(c, k);
            json_t *type = json_object_get(part, "type");
            if (!json_is_object(part) || !json_is_string(type) ||
                strcmp(json_string_value(type), "text") != 0 ||
                !json_is_string(json_object_get(part, "text")))
                BAD(param, "'%s.content' parts must be {\"type\": \"text\", \"text\": ...} (this server "
                    "serves text models)", param);
        }
    } else if (!json_is_string(c) && !((!c || json_is_null(c)) && assistant)) {
        BAD(param, "'%s.content' must be a string or an array of text parts", param);
    }
    json_t *calls = json_object_get(m, "tool_calls");
    if (calls && !json_is_null(calls)) {
        if (!assistant) BAD(param, "'%s.tool_calls' is only allowed in an assistant message", param);
        if (!json_is_array(calls)) BAD(param, "'%s.tool_calls' must be an array", param);
        for (size_t k = 0; k < json_array_size(calls); k++) {
            json_t *fn = json_object_get(json_array_get(calls, k), "function");
            json_t *args = json_object_get(fn, "arguments");
            if (!json_is_string(json_object_get(fn, "name")) ||
                !(json_is_string(args) || json_is_object(args)))
                BAD(param, "'%s.tool_calls[%zu]' must be {\"type\": \"function\", \"function\": "
                    "{\"name\": string, \"arguments\": string}}", param, k);
        }
    }
    static const char *const strs[] = { "name", "tool_call_id", "reasoning_content", "reasoning" };
    for (size_t k = 0; k < sizeof strs / sizeof *strs; k++) {
        json_t *v = json_object_get(m, strs[k]);
        if (v && !json_is_null(v) && !json_is_string(v)) BAD(param, "'%s.%s' must be a string", param, strs[k]);
    }
    return 0;
fail:
    return -1;
}

/* Chat: validates 'messages' and the fields the chat template sees; the
 * prompt comes from the tokenizer's chat template or, as an extension,
 * from 'prompt_token_ids'. */
static int parse_messages(json_t *root, srv_genreq *r, const srv_model_desc *md, srv_error *err)
{
    json_t *msgs = json_object_get(root, "messages");
    if (!msgs || json_is_null(msgs)) BAD("messages", "'messages' is required");
    if (!json_is_array(msgs) || json_array_size(msgs) == 0)
        BAD("messages", "'messages' must be a non-empty array");
    for (size_t i = 0; i < json_array_size(msgs); i++) {
        char param[48];
        snprintf(param, sizeof param, "messages[%zu]", i);
        if (check_message(json_array_get(msgs, i), param, err) < 0) return -1;
    }
    json_t *tools = json_object_get(root, "tools");
    if (tools && !json_is_null(tools)) {
        if (!json_is_array(tools)) BAD("tools", "'tools' must be an array");
        for (size_t i = 0; i < json_array_size(tools); i++) {
            json_t *t = json_array_get(tools, i), *fn = json_object_get(t, "function");
            if (!json_is_object(t) || !json_is_string(json_object_get(fn, "name")))
                BAD("tools", "'tools[%zu]' must be {\"type\": \"function\", \"function\": {\"name\": ...}}", i);
        }
    }
    json_t *docs = json_object_get(root, "documents");
    if (docs && !json_is_null(docs) && !json_is_array(docs)) BAD("documents", "'documents' must be an array");
    json_t *kw = json_object_get(root, "chat_template_kwargs");
    if (kw && !json_is_null(kw) && !json_is_object(kw))
        BAD("chat_template_kwargs", "'chat_template_kwargs' must be an object");
    json_t *ct = json_object_get(root, "chat_template");
    if (ct && !json_is_null(ct))
        BAD("chat_template", "a chat template per request is not supported; start mkad with --chat-template FILE");
    int agp = 1, cfm = 0;
    if (get_bool(root, "add_generation_prompt", &agp, err) < 0 ||
        get_bool(root, "continue_final_message", &cfm, err) < 0)
        return -1;
    if (agp && cfm && json_is_true(json_object_get(root, "add_generation_prompt")))
        BAD("continue_final_message", "'continue_final_message' and 'add_generation_prompt' cannot both be true");
    if (cfm) agp = 0; /* vLLM: continuing the last message means no new assistant turn */
    json_t *ids = json_object_get(root, "prompt_token_ids");
    if (ids && !json_is_null(ids)) {
        if (!json_is_array(ids)) BAD("prompt_token_ids", "'prompt_token_ids' must be an array of token ids");
        r->prompt = parse_ids(ids, "prompt_token_ids", md->vocab_size, &r->n_prompt, err);
        return r->prompt ? 0 : -1;
    }
    if (!md->codec) {
        srv_error_set(err, 400, "invalid_request_error", "messages", "no_tokenizer", "%s",
                      no_tokenizer_msg);
        return -1;
    }
    /* rendered by finish_request */
    r->pending = json_pack("{s:O, s:b, s:b}", "messages", msgs, "add_generation_prompt", agp,
                           "continue_final_message", cfm);
    if (!r->pending ||
        (tools && !json_is_null(tools) && json_object_set(r->pending, "tools", tools)) ||
        (docs && !json_is_null(docs) && json_object_set(r->pending, "documents", docs)) ||
        (kw && !json_is_null(kw) && json_object_set(r->pending, "chat_template_kwargs", kw))) {
        srv_error_set(err, 500, "server_error", NULL, NULL, "out of memory");
        return -1;
    }
    return 0;
fail:
    return -1;
}

static int parse_stop(json_t *root, srv_genreq *r, srv_error *err)
{
    json_t *s = json_object_get(root, "stop");
    if (!s || json_is_null(s)) return 0;
    json_t *one[1] = { s };
    json_t **items = one;
    size_t n = 1;
    json_t *arr[SRV_MAX_STOP];
    if (json_is_array(s)) {
        n = json_array_size(s);
        if (n > SRV_MAX_STOP) BAD("stop", "'stop' may hold at most %d strings", SRV_MAX_STOP);
        for (size_t i = 0; i < n; i++) arr[i] = json_array_get(s, i);
        items = arr;
    }
    for (size_t i = 0; i < n; i++) {
        if (!json_is_string(items[i])) BAD("stop", "'stop' must be a string or an array of strings");
        size_t len = json_string_length(items[i]);
        if (len > SRV_MAX_STOP_LEN) BAD("stop", "stop strings may be at most %d bytes", SRV_MAX_STOP_LEN);
        if (len == 0) continue;
        if (!(r->stop[r->n_stop] = malloc(len))) {
            srv_error_set(err, 500, "server_error", NULL, NULL, "out of memory");
            return -1;
        }
        memcpy(r->stop[r->n_stop], json_string_value(items[i]), len);
        r->stop_len[r->n_stop++] = len;
    }
    return 0;
fail:
    return -1;
}

/* logit_bias: {"<token id>": bias in [-100, 100], ...} (OpenAI).  Ids are
 * written in plain decimal, so that two keys never name one token. */
static int parse_logit_bias(json_t *root, srv_genreq *r, int vocab, srv_error *err)
{
    json_t *v = json_object_get(root, "logit_bias");
    if (!v || json_is_null(v)) return 0;
    if (!json_is_object(v)) BAD("logit_bias", "'logit_bias' must be an object of token id -> bias");
    size_t n = json_object_size(v);
    if (n == 0) return 0;
    r->bias_ids = malloc(n * sizeof *r->bias_ids);
    r->bias = malloc(n * sizeof *r->bias);
    if (!r->bias_ids || !r->bias) {
        srv_error_set(err, 500, "server_error", NULL, NULL, "out of memory");
        return -1;
    }
    const char *key;
    size_t key_len;
    json_t *val;
    json_object_keylen_foreach(v, key, key_len, val) {
        char q[32];
        srv_utf8_clip(q, sizeof q, key, key_len);
        long long id = -1;
        size_t digits = strspn(key, "0123456789");
        if (digits > 0 && digits <= 9 && digits == key_len && (key[0] != '0' || digits == 1))
            id = strtoll(key, NULL, 10);
        if (id < 0 || id >= vocab)
            BAD("logit_bias", "'logit_bias' key '%s' is not a token id in [0, %d)", q, vocab);
        double b = json_number_value(val);
        if (!json_is_number(val) || !(b >= -100 && b <= 100))
            BAD("logit_bias", "'logit_bias' value for token %lld must be a number in [-100, 100]", id);
        r->bias_ids[r->n_bias] = (int32_t)id;
        r->bias[r->n_bias++] = (float)b;
    }
    return 0;
fail:
    return -1;
}

int srv_session_id_ok(const char *s, size_t n)
{
    if (n == 0 || n > SRV_SESSION_ID_MAX) return 0;
    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              c == '-' || c == '_' || c == '.' || c == ':'))
            return 0;
    }
    return 1;
}

static int finish_request(srv_genreq *r, const srv_model_desc *md, srv_error *err);

/* The JSON object of a request body, or NULL with err filled. */
static json_t *load_object(const char *body, size_t len, srv_error *err)
{
    /* Raw NUL bytes are never valid JSON, but jansson's lexer skips some. */
    if (body && memchr(body, 0, len)) {
        srv_error_set(err, 400, "invalid_request_error", NULL, "invalid_json",
                      "the request body contains a NUL byte");
        return NULL;
    }
    /* JSON_ALLOW_NUL: "\u0000" is valid JSON and valid text (Python clients
     * send it); every string is then handled with its length. */
    json_error_t jerr;
    json_t *root = json_loadb(body ? body : "", len, JSON_REJECT_DUPLICATES | JSON_ALLOW_NUL, &jerr);
    if (!root) {
        srv_error_set(err, 400, "invalid_request_error", NULL, "invalid_json",
                      "We could not parse the JSON body of your request: %s (line %d, column %d)",
                      jerr.text, jerr.line, jerr.column);
        return NULL;
    }
    if (!json_is_object(root)) {
        json_decref(root);
        srv_error_set(err, 400, "invalid_request_error", NULL, "invalid_json",
                      "the request body must be a JSON object");
        return NULL;
    }
    return root;
}

/* 'model' must name the served model (404 otherwise); when optional, it
 * may be absent. */
static int check_model(json_t *root, const srv_model_desc *md, int optional, srv_error *err)
{
    json_t *model = json_object_get(root, "model");
    if (!model || json_is_null(model)) {
        if (optional) return 0;
        BAD("model", "'model' is required");
    }
    if (!json_is_string(model)) BAD("model", "'model' must be a string");
    if (json_string_length(model) != strlen(md->name) ||
        memcmp(json_string_value(model), md->name, strlen(md->name)) != 0) {
        char q[80];
        srv_utf8_clip(q, sizeof q, json_string_value(model), json_string_length(model));
        srv_error_set(err, 404, "invalid_request_error", "model", "model_not_found",
                      "The model '%s' does not exist; this server serves '%s'", q, md->name);
        return -1;
    }
    return 0;
fail:
    return -1;
}

int srv_genreq_parse(const char *body, size_t len, int chat, const srv_model_desc *md,
                     const char *session_hdr, srv_genreq **out, srv_error *err)
{
    *out = NULL;
    json_t *root = load_object(body, len, err);
    if (!root) return -1;
    srv_genreq *r = calloc(1, sizeof *r);
    long long iv;
    double dv;
    int bv, got;
    if (!r) {
        json_decref(root);
        srv_error_set(err, 500, "server_error", NULL, NULL, "out of memory");
        return -1;
    }
    r->chat = chat;
    if (check_model(root, md, 0, err) != 0) goto fail;
    if (!(r->model = strdup(md->name))) {
        srv_error_set(err, 500, "server_error", NULL, NULL, "out of memory");
        goto fail;
    }

    /* Sampling.  OpenAI's defaults: temperature 1, top_p 1. */
    r->sp = eng_sampler_default_params();
    r->sp.temperature = 1.0f;
    if ((got = get_num(root, "temperature", 0, 2, 0, &dv, err)) < 0) goto fail;
    if (got) r->sp.temperature = (float)dv;
    if ((got = get_num(root, "top_p", 0, 1, 1, &dv, err)) < 0) goto fail;
    if (got) r->sp.top_p = (float)dv;
    if ((got = get_int(root, "top_k", -1, 1 << 30, &iv, err)) < 0) goto fail;
    if (got) r->sp.top_k = iv < 0 ? 0 : (int)iv;
    if ((got = get_num(root, "min_p", 0, 1, 0, &dv, err)) < 0) goto fail;
    if (got) r->sp.min_p = (float)dv;
    if ((got = get_num(root, "repetition_penalty", 0, 10, 1, &dv, err)) < 0) goto fail;
    if (got) r->sp.repetition_penalty = (float)dv;
    if ((got = get_num(root, "presence_penalty", -2, 2, 0, &dv, err)) < 0) goto fail;
    if (got) r->sp.presence_penalty = (float)dv;
    if ((got = get_num(root, "frequency_penalty", -2, 2, 0, &dv, err)) < 0) goto fail;
    if (got) r->sp.frequency_penalty = (float)dv;
    if ((got = get_int(root, "seed", INT64_MIN, INT64_MAX, &iv, err)) < 0) goto fail;
    if (got) {
        r->sp.seed = (uint64_t)iv;
        r->has_seed = 1;
    }
    char emsg[256];
    if (eng_sampler_params_validate(&r->sp, emsg, sizeof emsg) != ENG_OK) BAD(NULL, "%s", emsg);

    /* Unsupported features: refuse non-default values rather than ignore them. */
    /* n choices share the prompt's K/V blocks (sched.c forks them); the
     * scheduler refuses an n that can never fit the slots or the pool */
    r->n = 1;
    if ((got = get_int(root, "n", 1, 128, &iv, err)) < 0) goto fail;
    if (got) r->n = (int)iv;
    /* best_of = n returns every candidate, which is what n alone does;
     * ranking more candidates than are returned is not implemented */
    if ((got = get_int(root, "best_of", 1, 128, &iv, err)) < 0) goto fail;
    if (got && iv < r->n) BAD("best_of", "'best_of' (%lld) must be at least 'n' (%d)", iv, r->n);
    if (got && iv > r->n)
        BAD("best_of", "'best_of' greater than 'n' is not supported; ask for n=%lld choices and rank "
            "them by their logprobs", iv);
    if (get_bool(root, "echo", &r->echo, err) < 0) goto fail;
    if (r->echo && chat) BAD("echo", "'echo' is only supported on /v1/completions");
    json_t *v = json_object_get(root, "suffix");
    if (v && !json_is_null(v)) BAD("suffix", "'suffix' is not supported");
    if (parse_logit_bias(root, r, md->vocab_size, err) < 0) goto fail;
    /* chat: tools go to the chat template (parse_messages); the model's
     * calls come back as text in the content (no tool-call parser) */
    v = json_object_get(root, "tools");
    if (!chat && v && !json_is_null(v) && !(json_is_array(v) && json_array_size(v) == 0))
        BAD("tools", "'tools' is only accepted by /v1/chat/completions");
    v = json_object_get(root, "tool_choice");
    if (v && !json_is_null(v) && !(json_is_string(v) && (!strcmp(json_string_value(v), "auto") ||
                                                         !strcmp(json_string_value(v), "none"))))
        BAD("tool_choice", "only tool_choice \"auto\" and \"none\" are supported (the model decides; nothing "
            "constrains its output)");
    v = json_object_get(root, "functions");
    if (v && !json_is_null(v)) BAD("functions", "'functions' is not supported");
    v = json_object_get(root, "response_format");
    if (v && !json_is_null(v)) {
        json_t *t = json_object_get(v, "type");
        if (!json_is_object(v) || !json_is_string(t) || strcmp(json_string_value(t), "text") != 0)
            BAD("response_format", "only response_format {\"type\": \"text\"} is supported");
    }
    v = json_object_get(root, "user");
    if (v && !json_is_null(v) && !json_is_string(v)) BAD("user", "'user' must be a string");

    /* Streaming. */
    if (get_bool(root, "stream", &r->stream, err) < 0) goto fail;
    v = json_object_get(root, "stream_options");
    if (v && !json_is_null(v)) {
        if (!json_is_object(v)) BAD("stream_options", "'stream_options' must be an object");
        if (!r->stream)
            BAD("stream_options", "'stream_options' is only allowed when 'stream' is true");
        json_t *iu = json_object_get(v, "include_usage");
        if (iu && !json_is_null(iu)) {
            if (!json_is_boolean(iu))
                BAD("stream_options.include_usage", "'stream_options.include_usage' must be a boolean");
            r->include_usage = json_is_true(iu);
        }
    }

    /* Log-probabilities. */
    if (chat) {
        if (get_bool(root, "logprobs", &r->logprobs, err) < 0) goto fail;
        if ((got = get_int(root, "top_logprobs", 0, SRV_MAX_TOP_LOGPROBS, &iv, err)) < 0) goto fail;
        if (got) {
            if (!r->logprobs) BAD("top_logprobs", "'top_logprobs' requires 'logprobs': true");
            r->top_logprobs = (int)iv;
        }
    } else {
        json_t *lp = json_object_get(root, "logprobs");
        if (json_is_boolean(lp)) {
            r->logprobs = json_is_true(lp);
        } else {
            if ((got = get_int(root, "logprobs", 0, 5, &iv, err)) < 0) goto fail;
            if (got) {
                r->logprobs = 1;
                r->top_logprobs = (int)iv;
            }
        }
    }

    /* Extensions. */
    if (get_bool(root, "ignore_eos", &r->ignore_eos, err) < 0) goto fail;
    r->codec = md->codec;
    r->return_token_ids = md->codec == NULL;
    if ((got = get_bool(root, "return_token_ids", &bv, err)) < 0) goto fail;
    if (got) r->return_token_ids = bv;
    v = json_object_get(root, "session_id");
    if (v && !json_is_null(v)) {
        if (!json_is_string(v) || !srv_session_id_ok(json_string_value(v), json_string_length(v)))
            BAD("session_id", "'session_id' must be 1-%d characters of [A-Za-z0-9._:-]",
                SRV_SESSION_ID_MAX);
        strcpy(r->session_id, json_string_value(v));
    } else if (session_hdr && *session_hdr) {
        if (!srv_session_id_ok(session_hdr, strlen(session_hdr)))
            BAD("X-Session-Id", "the X-Session-Id header must be 1-%d characters of [A-Za-z0-9._:-]",
                SRV_SESSION_ID_MAX);
        strcpy(r->session_id, session_hdr);
    }
    if (r->session_id[0] && r->n > 1)
        BAD("n", "'n' > 1 cannot be used with a session: only one choice could continue the session; "
            "send n=1 with the session, or n>1 without one");

    if (parse_stop(root, r, err) < 0) goto fail;
    if ((chat ? parse_messages(root, r, md, err) : parse_prompt(root, r, md, err)) < 0) goto fail;

    if (md->codec && md->codec->stop_ids)
        r->n_stop_ids = md->codec->stop_ids(md->codec->ctx, chat, r->stop_ids, 8);

    r->max_tokens_req = -1;
    /* max_tokens 0 with echo: only the prompt (and its logprobs) comes back */
    if ((got = get_int(root, "max_tokens", r->echo ? 0 : 1, 1 << 30, &iv, err)) < 0) goto fail;
    if (got) r->max_tokens_req = iv;
    if (chat) {
        if ((got = get_int(root, "max_completion_tokens", 1, 1 << 30, &iv, err)) < 0) goto fail;
        if (got) {
            r->max_tokens_req = iv;
            r->max_tokens_is_mct = 1;
        }
    }
    json_decref(root);
    root = NULL;
    if (finish_request(r, md, err) != 0) goto fail;
    *out = r;
    return 0;
fail:
    json_decref(root);
    srv_genreq_free(r);
    return -1;
}

/* echo: the prompt as text: the string as sent, or the token ids decoded
 * (without a tokenizer, the ids in decimal, as generated tokens show). */
static int echo_text(srv_genreq *r, const srv_model_desc *md, srv_error *err)
{
    srv_buf b = { 0 };
    char msg[160] = "";
    if (r->pending) {
        srv_buf_append(&b, json_string_value(r->pending), json_string_length(r->pending));
    } else if (md->codec) {
        if (md->codec->decode(md->codec->ctx, r->prompt, r->n_prompt, &r->echo_text, &r->echo_len, msg,
                              sizeof msg) != 0) {
            srv_error_set(err, 500, "server_error", "prompt", NULL, "the prompt cannot be decoded: %s",
                          msg);
            return -1;
        }
        return 0;
    } else {
        for (int i = 0; i < r->n_prompt; i++) srv_buf_printf(&b, i ? " %d" : "%d", (int)r->prompt[i]);
    }
    if (srv_buf_append(&b, "", 0) != 0 || b.failed) {
        srv_buf_free(&b);
        srv_error_set(err, 500, "server_error", NULL, NULL, "out of memory");
        return -1;
    }
    r->echo_text = b.data;
    r->echo_len = b.len;
    return 0;
}

/* A chat codec's failure as the request's error: the template's own
 * refusal ("roles must alternate", ...) and a template that cannot render
 * are the request's 400; a model without a usable template says so (see
 * docs/api.md). */
static void chat_error(int rc, const char *msg, srv_error *err)
{
    if (rc == ENG_ENOMEM)
        srv_error_set(err, 500, "server_error", NULL, NULL, "out of memory");
    else if (rc == ENG_EUNSUPPORTED)
        srv_error_set(err, 400, "invalid_request_error", "messages", "chat_template_unavailable",
                      "this model has no usable chat template: %s", msg);
    else
        srv_error_set(err, 400, "invalid_request_error", "messages", "chat_template_error", "%s", msg);
}

/* Tokenizes the text prompt or renders the messages (r->pending), then
 * checks the lengths against the context. */
static int finish_request(srv_genreq *r, const srv_model_desc *md, srv_error *err)
{
    int chat = r->chat;
    if (r->echo && echo_text(r, md, err) != 0) return -1;
    r->prompt_logprobs = r->echo && r->logprobs;
    if (r->pending) {
        char msg[512] = "";
        const char *param = chat ? "messages" : "prompt";
        int rc = chat ? md->codec->chat(md->codec->ctx, r->pending, &r->prompt, &r->n_prompt, msg,
                                        sizeof msg)
                      : md->codec->encode(md->codec->ctx, json_string_value(r->pending),
                                          json_string_length(r->pending), 1, &r->prompt,
                                          &r->n_prompt, msg, sizeof msg);
        json_decref(r->pending);
        r->pending = NULL;
        if (rc != 0 && chat) {
            chat_error(rc, msg, err);
            return -1;
        }
        if (rc != 0) {
            srv_error_set(err, 400, "invalid_request_error", param, NULL, "'prompt' cannot be tokenized: %s", msg);
            return -1;
        }
        if (r->n_prompt == 0) {
            srv_error_set(err, 400, "invalid_request_error", param, NULL, "'%s' gave no tokens", param);
            return -1;
        }
        if (check_ids(r, md, param, err) != 0) return -1;
    }
    /* Lengths: prompt + completion must fit the context. */
    long long max_tokens = r->max_tokens_req;
    const char *mt_name = r->max_tokens_is_mct ? "max_completion_tokens" : "max_tokens";
    if (r->n_prompt >= md->max_ctx)
        BADC("context_length_exceeded", chat ? "messages" : "prompt",
             "This model's maximum context length is %d tokens, but the prompt has %d tokens",
             md->max_ctx, r->n_prompt);
    if (max_tokens < 0) {
        int room = md->max_ctx - r->n_prompt;
        r->max_tokens_auto = chat || md->default_max_tokens <= 0;
        max_tokens = r->max_tokens_auto ? room
                     : (md->default_max_tokens < room ? md->default_max_tokens : room);
    } else if (r->n_prompt + max_tokens > md->max_ctx) {
        BADC("context_length_exceeded", mt_name,
             "This model's maximum context length is %d tokens. However, you requested %lld "
             "tokens (%d in the prompt, %lld for the completion)", md->max_ctx,
             r->n_prompt + max_tokens, r->n_prompt, max_tokens);
    }
    r->max_tokens = (int)max_tokens;
    return 0;
fail:
    return -1;
}

void srv_genreq_free(srv_genreq *r)
{
    if (!r) return;
    free(r->model);
    free(r->prompt);
    free(r->bias_ids);
    free(r->bias);
    free(r->echo_text);
    json_decref(r->pending);
    for (int i = 0; i < r->n_stop; i++) free(r->stop[i]);
    free(r);
}

/* ---- /tokenize and /detokenize (vLLM's shapes) ------------------------------- */

static json_t *ids_json(const int32_t *ids, int n);
static json_t *json_text(const char *s, size_t n);
static char *dump_free(json_t *o);

char *srv_tokenize(const char *body, size_t len, const srv_model_desc *md, srv_error *err)
{
    json_t *root = load_object(body, len, err);
    if (!root) return NULL;
    srv_genreq tmp = { 0 }; /* parse_messages' result: the chat request for the codec */
    int32_t *ids = NULL;
    int n = 0, b, rc = 0;
    char msg[512] = "";
    char *out = NULL;
    if (check_model(root, md, 1, err) != 0) goto fail;
    if (!md->codec) {
        srv_error_set(err, 400, "invalid_request_error", NULL, "no_tokenizer",
                      "this model directory has no tokenizer.json");
        goto fail;
    }
    if ((rc = get_bool(root, "return_token_strs", &b, err)) < 0) goto fail;
    if (rc && b) BAD("return_token_strs", "'return_token_strs' is not supported");
    json_t *msgs = json_object_get(root, "messages");
    if (msgs && !json_is_null(msgs)) {
        int add_special = 0;
        if (get_bool(root, "add_special_tokens", &add_special, err) < 0) goto fail;
        if (add_special)
            BAD("add_special_tokens", "'add_special_tokens' with 'messages' is not supported: the "
                "chat template writes the special tokens");
        /* the same validation, template fields (add_generation_prompt,
         * continue_final_message, tools, documents, chat_template_kwargs)
         * and template as /v1/chat/completions */
        if (parse_messages(root, &tmp, md, err) < 0) goto fail;
        if (tmp.pending) {
            rc = md->codec->chat(md->codec->ctx, tmp.pending, &ids, &n, msg, sizeof msg);
            if (rc != 0) {
                chat_error(rc, msg, err);
                goto fail;
            }
        } else { /* the prompt_token_ids extension */
            ids = tmp.prompt;
            n = tmp.n_prompt;
            tmp.prompt = NULL;
        }
    } else {
        json_t *p = json_object_get(root, "prompt");
        if (!json_is_string(p)) BAD("prompt", "'prompt' (a string) or 'messages' is required");
        int add_special = 1;
        if (get_bool(root, "add_special_tokens", &add_special, err) < 0) goto fail;
        if (md->codec->encode(md->codec->ctx, json_string_value(p), json_string_length(p), add_special,
                              &ids, &n, msg, sizeof msg) != 0)
            BAD("prompt", "'prompt' cannot be tokenized: %s", msg);
    }
    out = dump_free(json_pack("{s:i, s:i, s:o, s:n}", "count", n, "max_model_len", md->max_ctx,
                              "tokens", ids_json(ids, n), "token_strs"));
    if (!out) srv_error_set(err, 500, "server_error", NULL, NULL, "out of memory");
fail:
    free(ids);
    free(tmp.prompt);
    json_decref(tmp.pending);
    json_decref(root);
    return out;
}

char *srv_detokenize(const char *body, size_t len, const srv_model_desc *md, srv_error *err)
{
    json_t *root = load_object(body, len, err);
    if (!root) return NULL;
    int32_t *ids = NULL;
    int n = 0;
    char *text = NULL, *out = NULL;
    size_t tlen = 0;
    char msg[256] = "";
    if (check_model(root, md, 1, err) != 0) goto fail;
    if (!md->codec) {
        srv_error_set(err, 400, "invalid_request_error", NULL, "no_tokenizer",
                      "this model directory has no tokenizer.json");
        goto fail;
    }
    json_t *t = json_object_get(root, "tokens");
    if (!json_is_array(t)) BAD("tokens", "'tokens' (an array of token ids) is required");
    if (json_array_size(t) > 0 && !(ids = parse_ids(t, "tokens", md->vocab_size, &n, err))) goto fail;
    if (md->codec->decode(md->codec->ctx, ids, n, &text, &tlen, msg, sizeof msg) != 0) {
        srv_error_set(err, 500, "server_error", "tokens", NULL, "the tokens cannot be decoded: %s", msg);
        goto fail;
    }
    out = dump_free(json_pack("{s:o}", "prompt", json_text(text, tlen)));
    if (!out) srv_error_set(err, 500, "server_error", NULL, NULL, "out of memory");
fail:
    free(ids);
    free(text);
    json_decref(root);
    return out;
}

/* ---- text ------------------------------------------------------------------- */

size_t srv_token_piece(const srv_codec *c, int32_t tok, int first, char *buf)
{
    if (c) {
        int n = c->token_bytes(c->ctx, tok, buf, SRV_PIECE_MAX);
        return n < 0 ? 0 : (size_t)n;
    }
    int n = snprintf(buf, SRV_PIECE_MAX, first ? "%d" : " %d", (int)tok);
    return n < 0 ? 0 : (size_t)n;
}

/* Backs `end` up so that text[0, end) does not end inside a UTF-8 sequence
 * (the rest follows with the next token). */
static size_t utf8_boundary(const char *t, size_t len, size_t end)
{
    if (end > len) end = len;
    size_t p = end;
    while (p > 0 && end - p < 4 && ((unsigned char)t[p - 1] & 0xc0) == 0x80) p--;
    if (p == 0) return end;
    unsigned char lead = (unsigned char)t[p - 1];
    size_t need = lead < 0x80 ? 1 : (lead >> 5) == 6 ? 2 : (lead >> 4) == 14 ? 3 : (lead >> 3) == 30 ? 4 : 1;
    return (p - 1) + need > end ? p - 1 : end;
}

size_t srv_stop_scan(const char *text, size_t len, size_t emitted, char *const *stop,
                     const size_t *stop_len, int n_stop, int *stopped)
{
    *stopped = 0;
    if (n_stop == 0) return utf8_boundary(text, len, len);
    size_t maxlen = 0;
    for (int i = 0; i < n_stop; i++)
        if (stop_len[i] > maxlen) maxlen = stop_len[i];
    /* A match must end after `emitted` (earlier text was checked before). */
    size_t from = emitted >= maxlen ? emitted - maxlen + 1 : 0;
    size_t best = (size_t)-1;
    for (int i = 0; i < n_stop; i++) {
        size_t sl = stop_len[i];
        for (size_t p = from; p + sl <= len; p++) {
            if (memcmp(text + p, stop[i], sl) == 0) {
                if (p < best) best = p;
                break;
            }
        }
    }
    if (best != (size_t)-1) {
        *stopped = 1;
        return best < emitted ? emitted : best;
    }
    /* Hold back the longest tail that is a proper prefix of a stop string. */
    size_t hold = 0;
    for (int i = 0; i < n_stop; i++) {
        size_t sl = stop_len[i];
        for (size_t k = sl - 1; k > hold; k--) {
            if (k <= len && memcmp(text + len - k, stop[i], k) == 0) {
                hold = k;
                break;
            }
        }
    }
    size_t end = len - hold;
    if (end < emitted) end = emitted;
    return utf8_boundary(text, len, end);
}

/* ---- responses ---------------------------------------------------------------- */

static json_t *usage_json(const srv_usage *u)
{
    return json_pack("{s:i, s:i, s:i, s:{s:i}}", "prompt_tokens", u->prompt_tokens,
                     "completion_tokens", u->completion_tokens, "total_tokens",
                     u->prompt_tokens + u->completion_tokens, "prompt_tokens_details",
                     "cached_tokens", u->cached_tokens);
}

static json_t *ids_json(const int32_t *ids, int n)
{
    json_t *a = json_array();
    for (int i = 0; a && i < n; i++) json_array_append_new(a, json_integer(ids[i]));
    return a;
}

/* A logprobs entry's token text (as the lone token: no separator). */
static json_t *tok_str(const srv_codec *c, int32_t tok)
{
    char b[SRV_PIECE_MAX];
    size_t n = srv_token_piece(c, tok, 1, b);
    return json_text(b, n);
}

static json_t *bytes_json(const srv_codec *c, int32_t tok)
{
    char b[SRV_PIECE_MAX];
    size_t n = srv_token_piece(c, tok, 1, b);
    json_t *a = json_array();
    for (size_t i = 0; a && i < n; i++) json_array_append_new(a, json_integer((unsigned char)b[i]));
    return a;
}

/* logprobs object: chat {"content": [...]}, completions {tokens,
 * token_logprobs, top_logprobs, text_offset} over the prompt's positions
 * (plp, n_plp: echo; an entry with n_top < 0, the first prompt token, has
 * null for its logprob and alternatives) and then the generated ones (lp,
 * n).  text_base: byte offset of the first token's text. */
static json_t *logprobs_json(const srv_genreq *r, const srv_logprob *plp, int n_plp,
                             const srv_logprob *lp, int n, size_t text_base)
{
    if (!r->logprobs || n + n_plp == 0) return json_null();
    if (r->chat) {
        json_t *content = json_array();
        for (int i = 0; content && i < n; i++) {
            json_t *top = json_array();
            for (int k = 0; top && k < lp[i].n_top; k++)
                json_array_append_new(top, json_pack("{s:o, s:f, s:o}", "token",
                                                     tok_str(r->codec, lp[i].top_tokens[k]), "logprob",
                                                     (double)lp[i].top_logprobs[k], "bytes",
                                                     bytes_json(r->codec, lp[i].top_tokens[k])));
            json_array_append_new(content, json_pack("{s:o, s:f, s:o, s:o}", "token",
                                                     tok_str(r->codec, lp[i].token), "logprob",
                                                     (double)lp[i].logprob, "bytes",
                                                     bytes_json(r->codec, lp[i].token), "top_logprobs", top));
        }
        return json_pack("{s:o}", "content", content);
    }
    json_t *tokens = json_array(), *tlp = json_array(), *top = json_array(), *off = json_array();
    size_t pos = text_base;
    for (int i = 0; i < n_plp + n; i++) {
        const srv_logprob *e = i < n_plp ? &plp[i] : &lp[i - n_plp];
        char piece[SRV_PIECE_MAX];
        size_t pl = srv_token_piece(r->codec, e->token, pos == 0, piece);
        json_array_append_new(tokens, json_text(piece, pl));
        json_array_append_new(off, json_integer((json_int_t)pos));
        pos += pl;
        if (e->n_top < 0) {
            json_array_append_new(tlp, json_null());
            json_array_append_new(top, json_null());
            continue;
        }
        json_array_append_new(tlp, json_real(e->logprob));
        json_t *alt = json_object();
        for (int k = 0; alt && k < e->n_top; k++) {
            json_t *key = tok_str(r->codec, e->top_tokens[k]);
            if (key) json_object_set_new(alt, json_string_value(key), json_real(e->top_logprobs[k]));
            json_decref(key);
        }
        json_array_append_new(top, alt);
    }
    return json_pack("{s:o, s:o, s:o, s:o}", "tokens", tokens, "token_logprobs", tlp,
                     "top_logprobs", top, "text_offset", off);
}

static char *dump_free(json_t *o)
{
    char *s = o ? json_dumps(o, JSON_COMPACT) : NULL;
    json_decref(o);
    return s;
}

char *srv_build_completion(const srv_genreq *r, const char *id, long created, const srv_choice_out *ch,
                           int n_ch, const srv_logprob *plp, int n_plp, const srv_usage *u)
{
    json_t *choices = json_array();
    for (int i = 0; choices && i < n_ch; i++) {
        const srv_choice_out *c = &ch[i];
        json_t *choice;
        if (r->chat) {
            choice = json_pack("{s:i, s:{s:s, s:o}, s:o, s:s}", "index", i, "message", "role",
                               "assistant", "content", json_text(c->text, c->text_len), "logprobs",
                               logprobs_json(r, NULL, 0, c->lp, c->n_lp, 0), "finish_reason", c->finish);
        } else {
            json_t *t;
            if (r->echo) { /* the prompt, then the completion */
                srv_buf b = { 0 };
                srv_buf_append(&b, r->echo_text, r->echo_len);
                srv_buf_append(&b, c->text, c->text_len);
                t = b.failed ? NULL : json_text(b.data, b.len);
                srv_buf_free(&b);
            } else {
                t = json_text(c->text, c->text_len);
            }
            choice = json_pack("{s:i, s:o, s:o, s:s}", "index", i, "text", t, "logprobs",
                               logprobs_json(r, plp, n_plp, c->lp, c->n_lp, 0), "finish_reason", c->finish);
        }
        if (choice && r->return_token_ids) json_object_set_new(choice, "token_ids", ids_json(c->ids, c->n_ids));
        if (!choice || json_array_append_new(choices, choice) != 0) {
            json_decref(choices);
            choices = NULL;
        }
    }
    json_t *o = json_pack("{s:s, s:s, s:I, s:s, s:o, s:o}", "id", id, "object",
                          r->chat ? "chat.completion" : "text_completion", "created",
                          (json_int_t)created, "model", r->model, "choices", choices, "usage",
                          usage_json(u));
    return dump_free(o);
}

/* One event in one append: on failure `out` holds no partial event. */
static int sse_data(srv_buf *out, json_t *o)
{
    char *s = dump_free(o);
    if (!s) return -1;
    int rc = srv_buf_printf(out, "data: %s\n\n", s);
    free(s);
    return rc;
}

int srv_sse_chunk(srv_buf *out, const srv_genreq *r, const char *id, long created, int index,
                  const char *text, size_t text_len, const int32_t *ids, int n_ids,
                  const srv_logprob *lp, int n_lp, const char *finish, int first)
{
    json_t *choice;
    json_t *fin = finish ? json_string(finish) : json_null();
    if (r->chat) {
        json_t *delta = json_object();
        if (first) json_object_set_new(delta, "role", json_string("assistant"));
        /* a token's chunk always has "content" ("" while text is held
         * back); the final chunk only when held-back text ends there */
        if (text_len || !finish) json_object_set_new(delta, "content", json_text(text, text_len));
        choice = json_pack("{s:i, s:o, s:o, s:o}", "index", index, "delta", delta, "logprobs",
                           logprobs_json(r, NULL, 0, lp, n_lp, 0), "finish_reason", fin);
    } else {
        choice = json_pack("{s:i, s:o, s:o, s:o}", "index", index, "text", json_text(text, text_len),
                           "logprobs", logprobs_json(r, NULL, 0, lp, n_lp, 0), "finish_reason", fin);
    }
    if (choice && r->return_token_ids) json_object_set_new(choice, "token_ids", ids_json(ids, n_ids));
    json_t *o = json_pack("{s:s, s:s, s:I, s:s, s:[o]}", "id", id, "object",
                          r->chat ? "chat.completion.chunk" : "text_completion", "created",
                          (json_int_t)created, "model", r->model, "choices", choice);
    if (o && r->include_usage) json_object_set_new(o, "usage", json_null());
    return sse_data(out, o);
}

int srv_sse_echo(srv_buf *out, const srv_genreq *r, const char *id, long created, int index,
                 const srv_logprob *plp, int n_plp)
{
    json_t *choice = json_pack("{s:i, s:o, s:o, s:n}", "index", index, "text",
                               json_text(r->echo_text, r->echo_len), "logprobs",
                               logprobs_json(r, plp, n_plp, NULL, 0, 0), "finish_reason");
    if (choice && r->return_token_ids) json_object_set_new(choice, "token_ids", json_array());
    json_t *o = json_pack("{s:s, s:s, s:I, s:s, s:[o]}", "id", id, "object", "text_completion",
                          "created", (json_int_t)created, "model", r->model, "choices", choice);
    if (o && r->include_usage) json_object_set_new(o, "usage", json_null());
    return sse_data(out, o);
}

int srv_sse_usage(srv_buf *out, const srv_genreq *r, const char *id, long created,
                  const srv_usage *u)
{
    json_t *o = json_pack("{s:s, s:s, s:I, s:s, s:[], s:o}", "id", id, "object",
                          r->chat ? "chat.completion.chunk" : "text_completion", "created",
                          (json_int_t)created, "model", r->model, "choices", "usage", usage_json(u));
    return sse_data(out, o);
}

int srv_sse_error(srv_buf *out, const srv_error *e)
{
    char *s = srv_error_json(e);
    if (!s) return -1;
    int rc = srv_buf_printf(out, "event: error\ndata: %s\n\n", s);
    free(s);
    return rc;
}

int srv_sse_done(srv_buf *out)
{
    return srv_buf_puts(out, "data: [DONE]\n\n");
}
