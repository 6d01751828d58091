/*
 * chat.c — chat templates: messages -> prompt text and token ids.
 *
 * The model directory's Jinja template is found as transformers finds it,
 * parsed once when the tokenizer loads (engine/jinja_parse.c) and rendered
 * per request (engine/jinja_eval.c) with the variables apply_chat_template
 * passes: messages, tools, documents, add_generation_prompt, the special
 * tokens of tokenizer_config.json, and the caller's extra kwargs.
 *
 * Before rendering, messages get what an OpenAI-compatible server must do
 * for a Hugging Face template (as vLLM does): a null or absent content is
 * empty, other keys whose value is null are dropped and reasoning fields
 * aliased (transformers 5), tool call arguments sent as JSON text become
 * objects, text parts of a list content are joined when the template
 * expects a string, and the developer role reads as system for templates
 * that do not know it.
 *
 * Every byte of the rendered text knows whether it came from the template
 * (with the special-token variables and validated role names) or from the
 * caller's data; eng_tok_chat_encode reads special tokens only from the
 * former, so a user cannot inject <|im_end|>.
 */
#include "config.h" /* _GNU_SOURCE: memmem */

#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include <jansson.h>

#include "internal.h"
#include "jinja.h"
#include "safetensors.h"

enum { TPL_DEFAULT, TPL_TOOL_USE, N_TPL };

typedef struct chat_tpl {
    char *src;           /* NULL: none */
    size_t len;
    char *origin;        /* where it came from, for messages */
    jj_template *t;      /* NULL when it does not parse (err says why) */
    char err[512];
    int developer;       /* the template mentions the developer role itself */
} chat_tpl;

static const char *const SPECIAL_KEYS[] = { "bos_token", "eos_token", "unk_token", "sep_token",
                                            "pad_token", "cls_token", "mask_token" };
#define N_SPECIAL (sizeof SPECIAL_KEYS / sizeof *SPECIAL_KEYS)

struct eng_chat {
    chat_tpl tpl[N_TPL];
    char no_tpl_err[512]; /* why there is no template at all */
    char *special[N_SPECIAL];
    int32_t stop[8];
    int n_stop;
};

/* Bounds for one render: far above what a real template needs for a
 * request that fits a context, far below what would hurt the daemon. */
static jj_render_params render_params(int64_t now)
{
    jj_render_params p = jj_default_render_params();
    p.limits.max_output = (size_t)32 << 20;
    p.limits.max_memory = (size_t)256 << 20;
    p.limits.max_steps = 20000000;
    p.now = now;
    return p;
}

/* ---- loading ------------------------------------------------------------------ */

static int valid_utf8(const char *s, size_t n, size_t *bad)
{
    const unsigned char *u = (const unsigned char *)s;
    for (size_t i = 0; i < n;) {
        unsigned c = u[i];
        size_t l = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
        if (!l || i + l > n || c == 0xC0 || c == 0xC1 || c > 0xF4) { *bad = i; return 0; }
        for (size_t k = 1; k < l; k++)
            if ((u[i + k] & 0xC0) != 0x80) { *bad = i; return 0; }
        if (l == 3 && ((c == 0xE0 && u[i + 1] < 0xA0) || (c == 0xED && u[i + 1] >= 0xA0))) { *bad = i; return 0; }
        if (l == 4 && ((c == 0xF0 && u[i + 1] < 0x90) || (c == 0xF4 && u[i + 1] >= 0x90))) { *bad = i; return 0; }
        i += l;
    }
    return 1;
}

static void tpl_free(chat_tpl *t)
{
    jj_template_free(t->t);
    free(t->src);
    free(t->origin);
    memset(t, 0, sizeof *t);
}

/* Takes ownership of src (malloc'd); parses it into slot t. */
static int tpl_set(chat_tpl *t, char *src, size_t len, const char *origin)
{
    tpl_free(t);
    t->src = src;
    t->len = len;
    t->origin = strdup(origin);
    if (!t->origin) return ENG_ENOMEM;
    size_t bad;
    if (!valid_utf8(src, len, &bad)) {
        eng__errf(t->err, sizeof t->err, 0, "the chat template in %s is not valid UTF-8 (byte %zu)", origin, bad);
        return ENG_EUNSUPPORTED;
    }
    if (memchr(src, 0, len)) {
        eng__errf(t->err, sizeof t->err, 0, "the chat template in %s contains a NUL byte", origin);
        return ENG_EUNSUPPORTED;
    }
    char jerr[400];
    int rc = jj_parse(src, len, &t->t, jerr, sizeof jerr);
    if (rc == JJ_ENOMEM) return ENG_ENOMEM;
    if (rc) {
        eng__errf(t->err, sizeof t->err, 0, "the chat template in %s cannot be used: %s", origin, jerr);
        return ENG_EUNSUPPORTED;
    }
    t->developer = strstr(src, "developer") != NULL;
    return ENG_OK;
}

static int tpl_from_string(chat_tpl *t, const char *s, size_t len, const char *origin)
{
    char *copy = malloc(len + 1);
    if (!copy) return ENG_ENOMEM;
    memcpy(copy, s, len);
    copy[len] = 0;
    int rc = tpl_set(t, copy, len, origin);
    return rc == ENG_ENOMEM ? rc : ENG_OK; /* a bad template is recorded, not fatal */
}

static int tpl_from_file(chat_tpl *t, const char *path)
{
    char *src = NULL, err[512];
    size_t len = 0;
    int rc = eng_st_read_file(path, "chat template", (size_t)16 << 20, &src, &len, err, sizeof err);
    if (rc == ENG_ENOMEM) return rc;
    if (rc) { /* recorded like a template that does not parse */
        tpl_free(t);
        if (!(t->origin = strdup(path))) return ENG_ENOMEM;
        eng__errf(t->err, sizeof t->err, 0, "%s", err);
        return ENG_OK;
    }
    rc = tpl_set(t, src, len, path);
    return rc == ENG_ENOMEM ? rc : ENG_OK;
}

static int exists(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0 && S_ISREG(st.st_mode);
}

/* chat_template.jinja and additional_chat_templates/{default,tool_use}.jinja;
 * *found says whether any file was there (then they win over the config). */
static int load_template_files(eng_chat *c, const char *dir, int *found)
{
    char path[4200];
    int rc;
    *found = 0;
    snprintf(path, sizeof path, "%s/chat_template.jinja", dir);
    if (exists(path)) {
        *found = 1;
        if ((rc = tpl_from_file(&c->tpl[TPL_DEFAULT], path))) return rc;
    }
    static const char *const names[N_TPL] = { "default", "tool_use" };
    for (int k = 0; k < N_TPL; k++) {
        if (k == TPL_DEFAULT && c->tpl[k].origin) continue;
        snprintf(path, sizeof path, "%s/additional_chat_templates/%s.jinja", dir, names[k]);
        if (!exists(path)) continue;
        *found = 1;
        if ((rc = tpl_from_file(&c->tpl[k], path))) return rc;
    }
    if (!*found) {
        /* other names in additional_chat_templates/ cannot be chosen: say so */
        snprintf(path, sizeof path, "%s/additional_chat_templates", dir);
        DIR *d = opendir(path);
        if (d) {
            struct dirent *e;
            while ((e = readdir(d)))
                if (strstr(e->d_name, ".jinja")) *found = 1;
            closedir(d);
            if (*found)
                eng__errf(c->no_tpl_err, sizeof c->no_tpl_err, 0,
                          "%s holds chat templates but none named default.jinja or tool_use.jinja, and there is "
                          "no chat_template.jinja; give one with --chat-template FILE", path);
        }
    }
    return ENG_OK;
}

static int load_template_config(eng_chat *c, const char *dir, const json_t *cfg)
{
    char origin[4200];
    snprintf(origin, sizeof origin, "%s/tokenizer_config.json", dir);
    json_t *ct = json_object_get(cfg, "chat_template");
    if (json_is_string(ct))
        return tpl_from_string(&c->tpl[TPL_DEFAULT], json_string_value(ct), json_string_length(ct), origin);
    if (json_is_array(ct)) { /* [{"name": "default", "template": ...}, ...] */
        size_t i;
        json_t *x;
        char names[256] = "";
        json_array_foreach(ct, i, x) {
            json_t *name = json_object_get(x, "name"), *tpl = json_object_get(x, "template");
            if (!json_is_string(name) || !json_is_string(tpl)) {
                eng__errf(c->no_tpl_err, sizeof c->no_tpl_err, 0,
                          "%s: chat_template[%zu] is not {\"name\": string, \"template\": string}", origin, i);
                return ENG_OK;
            }
            const char *n = json_string_value(name);
            size_t l = strlen(names);
            snprintf(names + l, sizeof names - l, "%s%s", l ? ", " : "", n);
            int k = !strcmp(n, "default") ? TPL_DEFAULT : !strcmp(n, "tool_use") ? TPL_TOOL_USE : -1;
            if (k < 0) continue;
            char o[4300];
            snprintf(o, sizeof o, "%s (chat_template \"%s\")", origin, n);
            int rc = tpl_from_string(&c->tpl[k], json_string_value(tpl), json_string_length(tpl), o);
            if (rc) return rc;
        }
        if (!c->tpl[TPL_DEFAULT].origin && json_array_size(ct))
            eng__errf(c->no_tpl_err, sizeof c->no_tpl_err, 0,
                      "%s: chat_template lists templates (%s) but none named \"default\"; give one with "
                      "--chat-template FILE", origin, names);
        return ENG_OK;
    }
    if (ct && !json_is_null(ct))
        eng__errf(c->no_tpl_err, sizeof c->no_tpl_err, 0,
                  "%s: chat_template must be a string or a list of {\"name\", \"template\"}", origin);
    return ENG_OK;
}

/* transformers' special_tokens_map: a string or an AddedToken {"content": ...}. */
static int load_special(eng_chat *c, const json_t *cfg)
{
    for (size_t i = 0; i < N_SPECIAL; i++) {
        json_t *v = json_object_get(cfg, SPECIAL_KEYS[i]);
        if (json_is_object(v)) v = json_object_get(v, "content");
        if (!json_is_string(v)) continue;
        if (!(c->special[i] = strdup(json_string_value(v)))) return ENG_ENOMEM;
    }
    return ENG_OK;
}

static void add_stop(eng_chat *c, int32_t id)
{
    if (id < 0) return;
    for (int i = 0; i < c->n_stop; i++)
        if (c->stop[i] == id) return;
    if (c->n_stop < (int)(sizeof c->stop / sizeof *c->stop)) c->stop[c->n_stop++] = id;
}

/* End-of-turn tokens of the families we know (llama.cpp keeps a similar list):
 * a stop id when the vocabulary has it as a special token. */
static const char *const END_OF_TURN[] = {
    "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
    "<|end_of_text|>", "<|return|>", "<\xef\xbd\x9c" "end\xe2\x96\x81of\xe2\x96\x81sentence\xef\xbd\x9c>", /* <｜end▁of▁sentence｜> */
};

static int load_stop_ids(eng_chat *c, const eng_tok *tok, const char *dir, char *err, size_t errlen)
{
    add_stop(c, eng_tok_get_info(tok)->eos_id);
    char path[4200];
    snprintf(path, sizeof path, "%s/generation_config.json", dir);
    if (exists(path)) {
        json_t *g;
        int rc = eng__json_load_file(path, path, &g, err, errlen);
        if (rc) return rc;
        json_t *e = json_object_get(g, "eos_token_id");
        json_t *one[1] = { e };
        size_t n = json_is_array(e) ? json_array_size(e) : e && !json_is_null(e) ? 1 : 0;
        for (size_t i = 0; i < n; i++) {
            json_t *x = json_is_array(e) ? json_array_get(e, i) : one[0];
            if (!json_is_integer(x) || json_integer_value(x) < 0 || json_integer_value(x) > INT32_MAX) {
                json_decref(g);
                return eng__errf(err, errlen, ENG_EFORMAT,
                                 "%s: eos_token_id must be a token id, a list of token ids or null", path);
            }
            add_stop(c, (int32_t)json_integer_value(x));
        }
        json_decref(g);
    }
    for (size_t i = 0; i < sizeof END_OF_TURN / sizeof *END_OF_TURN; i++) {
        int32_t id = eng_tok_token_id(tok, END_OF_TURN[i]);
        if (id >= 0 && eng_tok_is_special(tok, id)) add_stop(c, id);
    }
    return ENG_OK;
}

void eng__chat_free(eng_chat *c)
{
    if (!c) return;
    for (int k = 0; k < N_TPL; k++) tpl_free(&c->tpl[k]);
    for (size_t i = 0; i < N_SPECIAL; i++) free(c->special[i]);
    free(c);
}

int eng__chat_load(const eng_tok *tok, const char *dir, const json_t *cfg, eng_chat **out, char *err, size_t errlen)
{
    *out = NULL;
    eng_chat *c = calloc(1, sizeof *c);
    if (!c) return eng__errf(err, errlen, ENG_ENOMEM, "chat template: out of memory");
    int found = 0, rc;
    if ((rc = load_template_files(c, dir, &found)) ||
        (!found && cfg && (rc = load_template_config(c, dir, cfg))) ||
        (cfg && (rc = load_special(c, cfg))))
        goto fail;
    if (!found && !c->tpl[TPL_DEFAULT].origin && !c->no_tpl_err[0]) {
        /* processors of older transformers keep it in chat_template.json */
        char path[4200];
        snprintf(path, sizeof path, "%s/chat_template.json", dir);
        json_t *j;
        if (exists(path) && eng__json_load_file(path, path, &j, NULL, 0) == ENG_OK) {
            json_t *ct = json_object_get(j, "chat_template");
            if (json_is_string(ct))
                rc = tpl_from_string(&c->tpl[TPL_DEFAULT], json_string_value(ct), json_string_length(ct), path);
            json_decref(j);
            if (rc) goto fail;
        }
    }
    if (!c->tpl[TPL_DEFAULT].origin && !c->no_tpl_err[0])
        eng__errf(c->no_tpl_err, sizeof c->no_tpl_err, 0,
                  "the model directory %s has no chat template (chat_template.jinja, or chat_template in "
                  "tokenizer_config.json); give one with --chat-template FILE", dir);
    if ((rc = load_stop_ids(c, tok, dir, err, errlen))) goto fail;
    *out = c;
    return ENG_OK;
fail:
    eng__chat_free(c);
    if (rc == ENG_ENOMEM) return eng__errf(err, errlen, rc, "chat template: out of memory");
    return rc;
}

/* ---- public: template state ------------------------------------------------------ */

const char *eng_tok_chat_template_source(const eng_tok *tok)
{
    eng_chat *c = tok ? eng__tok_chat(tok) : NULL;
    return c ? c->tpl[TPL_DEFAULT].src : NULL;
}

/* The template for a request, or an error. */
static int pick(const eng_chat *c, int with_tools, const chat_tpl **t, char *err, size_t errlen)
{
    if (!c) return eng__errf(err, errlen, ENG_EUNSUPPORTED, "the tokenizer has no chat template");
    const chat_tpl *x = with_tools && c->tpl[TPL_TOOL_USE].origin ? &c->tpl[TPL_TOOL_USE] : &c->tpl[TPL_DEFAULT];
    if (!x->origin) return eng__errf(err, errlen, ENG_EUNSUPPORTED, "%s", c->no_tpl_err);
    if (!x->t) return eng__errf(err, errlen, ENG_EUNSUPPORTED, "%s", x->err);
    *t = x;
    return ENG_OK;
}

int eng_tok_chat_template_check(const eng_tok *tok, char *err, size_t errlen)
{
    if (!tok) return eng__errf(err, errlen, ENG_EINVAL, "eng_tok_chat_template_check: NULL argument");
    const eng_chat *c = eng__tok_chat(tok);
    const chat_tpl *t = NULL;
    int rc = pick(c, 0, &t, err, errlen);
    if (rc) return rc;
    if (c->tpl[TPL_TOOL_USE].origin && !c->tpl[TPL_TOOL_USE].t)
        return eng__errf(err, errlen, ENG_EUNSUPPORTED, "%s", c->tpl[TPL_TOOL_USE].err);
    return ENG_OK;
}

int eng_tok_set_chat_template(eng_tok *tok, const char *text, size_t len, const char *origin, char *err,
                              size_t errlen)
{
    eng_chat *c = tok ? eng__tok_chat(tok) : NULL;
    if (!c || (!text && len)) return eng__errf(err, errlen, ENG_EINVAL, "eng_tok_set_chat_template: NULL argument");
    tpl_free(&c->tpl[TPL_TOOL_USE]);
    int rc = tpl_from_string(&c->tpl[TPL_DEFAULT], text ? text : "", len, origin ? origin : "the given template");
    if (rc) return eng__errf(err, errlen, rc, "chat template: out of memory");
    if (!c->tpl[TPL_DEFAULT].t) return eng__errf(err, errlen, ENG_EUNSUPPORTED, "%s", c->tpl[TPL_DEFAULT].err);
    return ENG_OK;
}

int eng_tok_chat_stop_ids(const eng_tok *tok, int32_t *out, int max)
{
    if (!tok || (!out && max > 0)) return ENG_EINVAL;
    const eng_chat *c = eng__tok_chat(tok);
    int n = 0;
    for (int i = 0; c && i < c->n_stop && n < max; i++) out[n++] = c->stop[i];
    return n;
}

/* ---- messages ----------------------------------------------------------------------- */

#define CONTINUE_TAG "CONTINUE_FINAL_MESSAGE_TAG "

/* Role names are validated words, so templates may build special tokens
 * from them (Phi-3 writes '<|' + role + '|>'); every other string of the
 * caller's data is untrusted. */
static int trust_role(void *ctx, const char *key, const char *s, size_t n)
{
    (void)ctx;
    static const char *const roles[] = { "system", "developer", "user", "assistant", "tool", "ipython", "function" };
    if (!key || strcmp(key, "role") != 0) return 0;
    for (size_t i = 0; i < sizeof roles / sizeof *roles; i++)
        if (strlen(roles[i]) == n && memcmp(roles[i], s, n) == 0) return 1;
    return 0;
}

/* message content given as parts, for a template that wants a string: the
 * text parts joined with "\n" (vLLM's rule); other parts cannot be shown. */
static json_t *join_parts(json_t *parts, size_t mi, char *err, size_t errlen, int *rc)
{
    size_t total = 0, i;
    json_t *p;
    json_array_foreach(parts, i, p) {
        json_t *type = json_object_get(p, "type"), *text = json_object_get(p, "text");
        if (!json_is_object(p) || !json_is_string(text) || (type && (!json_is_string(type) ||
                                                                     strcmp(json_string_value(type), "text")))) {
            *rc = eng__errf(err, errlen, ENG_EINVAL,
                            "messages[%zu].content[%zu]: only text parts ({\"type\": \"text\", \"text\": ...}) can be "
                            "rendered by this model's chat template", mi, i);
            return NULL;
        }
        total += json_string_length(text) + 1;
    }
    char *buf = malloc(total + 1);
    if (!buf) { *rc = ENG_ENOMEM; return NULL; }
    size_t w = 0;
    json_array_foreach(parts, i, p) {
        json_t *text = json_object_get(p, "text");
        if (i) buf[w++] = '\n';
        memcpy(buf + w, json_string_value(text), json_string_length(text));
        w += json_string_length(text);
    }
    json_t *s = json_stringn(buf, w);
    free(buf);
    if (!s) *rc = ENG_ENOMEM;
    return s;
}

/* tool_calls[].function.arguments sent as JSON text (as OpenAI clients do)
 * become the object templates expect (vLLM does the same). */
static json_t *normalize_tool_calls(json_t *calls, int *rc)
{
    json_t *out = json_deep_copy(calls);
    if (!out) { *rc = ENG_ENOMEM; return NULL; }
    size_t i;
    json_t *call;
    json_array_foreach(out, i, call) {
        json_t *fn = json_object_get(call, "function");
        json_t *args = json_object_get(fn, "arguments");
        if (!json_is_string(args)) continue;
        json_t *obj = json_loadb(json_string_value(args), json_string_length(args), 0, NULL);
        if (json_is_object(obj)) json_object_set_new(fn, "arguments", obj);
        else json_decref(obj);
    }
    return out;
}

/* OpenAI's null or absent content, as vLLM passes it: no text, or no parts
 * for a template that loops over parts (transformers would drop the key,
 * and templates that read message.content would fail on a tool call turn). */
static json_t *empty_content(int parts)
{
    return parts ? json_array() : json_string("");
}

/* The messages as the template sees them (a new array). */
static json_t *normalize_messages(const chat_tpl *t, const eng_chat_params *p, char *err, size_t errlen, int *rc)
{
    static const char *const reasoning_keys[] = { "reasoning_content", "thinking", "reasoning" };
    json_t *msgs = p->messages;
    *rc = ENG_OK;
    if (!json_is_array(msgs) || json_array_size(msgs) == 0) {
        *rc = eng__errf(err, errlen, ENG_EINVAL, "chat: messages must be a non-empty array");
        return NULL;
    }
    json_t *out = json_array();
    if (!out) { *rc = ENG_ENOMEM; return NULL; }
    int iterates = jj_template_iterates_content(t->t);
    size_t mi;
    json_t *m;
    json_array_foreach(msgs, mi, m) {
        if (!json_is_object(m)) {
            *rc = eng__errf(err, errlen, ENG_EINVAL, "chat: messages[%zu] must be an object", mi);
            goto fail;
        }
        json_t *reason = NULL;
        for (size_t k = 0; k < 3 && !reason; k++) {
            json_t *r = json_object_get(m, reasoning_keys[k]);
            if (r && !json_is_null(r)) reason = r;
        }
        json_t *o = json_object();
        if (!o || json_array_append_new(out, o)) { *rc = ENG_ENOMEM; goto fail; }
        /* transformers 5: {"thinking": r, **message, "reasoning_content": r} */
        if (reason && json_object_set(o, "thinking", reason)) { *rc = ENG_ENOMEM; goto fail; }
        const char *key;
        json_t *v;
        json_object_foreach(m, key, v) {
            int is_content = !strcmp(key, "content");
            if (json_is_null(v) && !is_content) continue; /* transformers drops keys whose value is None */
            json_t *nv;
            if (is_content && json_is_null(v)) {
                nv = empty_content(iterates);
            } else if (is_content && json_is_array(v) && !iterates) {
                if (!(nv = join_parts(v, mi, err, errlen, rc))) goto fail;
            } else if (!strcmp(key, "role") && json_is_string(v) && !strcmp(json_string_value(v), "developer") &&
                       !t->developer) {
                nv = json_string("system");
            } else if (!strcmp(key, "tool_calls") && json_is_array(v)) {
                if (!(nv = normalize_tool_calls(v, rc))) goto fail;
            } else {
                nv = json_incref(v);
            }
            if (!nv || json_object_set_new(o, key, nv)) { *rc = ENG_ENOMEM; goto fail; }
        }
        if (!json_object_get(o, "content") && json_object_set_new(o, "content", empty_content(iterates))) {
            *rc = ENG_ENOMEM;
            goto fail;
        }
        if (reason && json_object_set(o, "reasoning_content", reason)) { *rc = ENG_ENOMEM; goto fail; }
    }
    if (p->continue_final_message) {
        /* transformers: tag the final text, render, cut the prompt at the tag */
        json_t *last = json_array_get(out, json_array_size(out) - 1), *c = json_object_get(last, "content");
        json_t *target = NULL;
        if (json_is_string(c)) target = last;
        for (size_t k = json_array_size(c); json_is_array(c) && k-- > 0 && !target;)
            if (json_is_string(json_object_get(json_array_get(c, k), "text"))) target = json_array_get(c, k);
        if (!target) {
            *rc = eng__errf(err, errlen, ENG_EINVAL,
                            "continue_final_message: the final message has no text content to continue");
            goto fail;
        }
        const char *field = target == last ? "content" : "text";
        json_t *s = json_object_get(target, field);
        size_t l = json_string_length(s);
        char *buf = malloc(l + sizeof CONTINUE_TAG);
        if (!buf) { *rc = ENG_ENOMEM; goto fail; }
        memcpy(buf, json_string_value(s), l);
        memcpy(buf + l, CONTINUE_TAG, sizeof CONTINUE_TAG);
        int bad = json_object_set_new(target, field, json_stringn(buf, l + sizeof CONTINUE_TAG - 1));
        free(buf);
        if (bad) { *rc = ENG_ENOMEM; goto fail; }
    }
    return out;
fail:
    json_decref(out);
    return NULL;
}

/* ---- rendering ------------------------------------------------------------------------- */

void eng_chat_params_from_json(eng_chat_params *p, json_t *req)
{
    json_t *agp = json_object_get(req, "add_generation_prompt");
    memset(p, 0, sizeof *p);
    p->messages = json_object_get(req, "messages");
    p->tools = json_object_get(req, "tools");
    p->documents = json_object_get(req, "documents");
    p->kwargs = json_object_get(req, "chat_template_kwargs");
    p->continue_final_message = json_is_true(json_object_get(req, "continue_final_message"));
    p->add_generation_prompt = agp ? json_is_true(agp) : !p->continue_final_message;
}

static int set_var(jj_vars *v, const char *name, json_t *value)
{
    return jj_vars_set_json(v, name, value, NULL, NULL);
}

/* Cuts the rendered prompt at the continue tag (transformers'
 * continue_final_message). */
static int cut_at_tag(jj_result *r, char *err, size_t errlen)
{
    static const char tag[] = CONTINUE_TAG;
    const size_t tl = sizeof tag - 2; /* without the space */
    char *at = NULL;
    /* the last occurrence; by length, as the text may hold NUL bytes (a
     * \u0000 in a message is text) */
    for (char *p = r->text, *end = r->text + r->len; (p = memmem(p, (size_t)(end - p), tag, tl)); p++) at = p;
    if (!at) {
        return eng__errf(err, errlen, ENG_EINVAL,
                         "continue_final_message: the final message does not appear in the rendered chat (the "
                         "chat template changes or drops it)");
    }
    size_t cut = (size_t)(at - r->text);
    if ((size_t)(r->text + r->len - at) <= tl || at[tl] != ' ')
        while (cut > 0 && (r->text[cut - 1] == ' ' || r->text[cut - 1] == '\t' || r->text[cut - 1] == '\n' ||
                           r->text[cut - 1] == '\r' || r->text[cut - 1] == '\v' || r->text[cut - 1] == '\f'))
            cut--;
    r->text[cut] = 0;
    r->len = cut;
    size_t k = 0;
    for (size_t i = 0; i < r->n_untrusted; i++) {
        if (r->untrusted[i].start >= cut) break;
        r->untrusted[k] = r->untrusted[i];
        if (r->untrusted[k].end > cut) r->untrusted[k].end = cut;
        k++;
    }
    r->n_untrusted = k;
    return ENG_OK;
}

static int chat_render(const eng_tok *tok, const eng_chat_params *p, jj_result *res, char *err, size_t errlen)
{
    memset(res, 0, sizeof *res);
    if (!tok || !p) return eng__errf(err, errlen, ENG_EINVAL, "chat: NULL argument");
    const eng_chat *c = eng__tok_chat(tok);
    int with_tools = p->tools && !json_is_null(p->tools);
    const chat_tpl *t = NULL;
    int rc = pick(c, with_tools, &t, err, errlen);
    if (rc) return rc;
    if (p->continue_final_message && p->add_generation_prompt)
        return eng__errf(err, errlen, ENG_EINVAL,
                         "continue_final_message and add_generation_prompt cannot both be true");
    if (p->kwargs && !json_is_null(p->kwargs) && !json_is_object(p->kwargs))
        return eng__errf(err, errlen, ENG_EINVAL, "chat_template_kwargs must be an object");
    json_t *msgs = normalize_messages(t, p, err, errlen, &rc);
    if (!msgs) return rc == ENG_ENOMEM ? eng__errf(err, errlen, rc, "chat: out of memory") : rc;
    jj_vars *v = NULL;
    json_t *none = json_null(), *gen = json_boolean(p->add_generation_prompt);
    rc = ENG_ENOMEM;
    if (jj_vars_create(&v)) goto done;
    if (jj_vars_set_json(v, "messages", msgs, trust_role, NULL) ||
        set_var(v, "tools", with_tools ? p->tools : none) ||
        set_var(v, "documents", p->documents ? p->documents : none) || set_var(v, "add_generation_prompt", gen))
        goto done;
    for (size_t i = 0; i < N_SPECIAL; i++)
        if (c->special[i] && jj_vars_set_string(v, SPECIAL_KEYS[i], c->special[i], strlen(c->special[i]), 1))
            goto done;
    if (p->kwargs && json_is_object(p->kwargs)) {
        const char *key;
        json_t *x;
        json_object_foreach(p->kwargs, key, x) {
            if (!strcmp(key, "messages") || !strcmp(key, "tools") || !strcmp(key, "documents") ||
                !strcmp(key, "add_generation_prompt")) {
                rc = eng__errf(err, errlen, ENG_EINVAL,
                               "chat_template_kwargs may not set '%s' (the request's own field sets it)", key);
                goto done;
            }
            if (set_var(v, key, x)) goto done;
        }
    }
    jj_render_params rp = render_params(p->now);
    char jerr[400];
    int jr = jj_render(t->t, v, &rp, res, jerr, sizeof jerr);
    switch (jr) {
    case JJ_OK: rc = p->continue_final_message ? cut_at_tag(res, err, errlen) : ENG_OK; break;
    case JJ_ERAISE: rc = eng__errf(err, errlen, ENG_EINVAL, "the chat template refused the messages: %s", jerr); break;
    case JJ_ELIMIT: rc = eng__errf(err, errlen, ENG_ERANGE, "chat template (%s): %s", t->origin, jerr); break;
    case JJ_ENOMEM: rc = eng__errf(err, errlen, ENG_ENOMEM, "chat: out of memory"); break;
    default: rc = eng__errf(err, errlen, ENG_EINVAL, "chat template (%s): %s", t->origin, jerr); break;
    }
    if (rc) jj_result_free(res);
done:
    if (rc == ENG_ENOMEM && err && errlen && !err[0]) eng__errf(err, errlen, rc, "chat: out of memory");
    jj_vars_free(v);
    json_decref(msgs);
    json_decref(gen);
    return rc;
}

int eng_tok_chat_apply(const eng_tok *tok, const eng_chat_params *p, char **text, size_t *len, char *err,
                       size_t errlen)
{
    if (!text || !len) return eng__errf(err, errlen, ENG_EINVAL, "eng_tok_chat_apply: NULL argument");
    *text = NULL;
    *len = 0;
    jj_result r;
    int rc = chat_render(tok, p, &r, err, errlen);
    if (rc) return rc;
    *text = r.text;
    *len = r.len;
    r.text = NULL;
    jj_result_free(&r);
    return ENG_OK;
}

int eng_tok_chat_encode(const eng_tok *tok, const eng_chat_params *p, int32_t **ids, size_t *n_ids, char *err,
                        size_t errlen)
{
    if (!ids || !n_ids) return eng__errf(err, errlen, ENG_EINVAL, "eng_tok_chat_encode: NULL argument");
    *ids = NULL;
    *n_ids = 0;
    jj_result r;
    int rc = chat_render(tok, p, &r, err, errlen);
    if (rc) return rc;
    /* trusted and untrusted stretches alternate */
    eng_tok_segment *seg = malloc((2 * r.n_untrusted + 1) * sizeof *seg);
    size_t n = 0, at = 0;
    if (!seg) {
        jj_result_free(&r);
        return eng__errf(err, errlen, ENG_ENOMEM, "chat: out of memory");
    }
    for (size_t i = 0; i < r.n_untrusted; i++) {
        if (r.untrusted[i].start > at) seg[n++] = (eng_tok_segment){ r.text + at, r.untrusted[i].start - at, 1 };
        seg[n++] = (eng_tok_segment){ r.text + r.untrusted[i].start, r.untrusted[i].end - r.untrusted[i].start, 0 };
        at = r.untrusted[i].end;
    }
    if (r.len > at) seg[n++] = (eng_tok_segment){ r.text + at, r.len - at, 1 };
    rc = eng_tok_encode_segments(tok, seg, n, 0, ids, n_ids, err, errlen);
    free(seg);
    jj_result_free(&r);
    return rc;
}
