/*
 * chat.c — chat templates: messages -> prompt text and token ids.
 *
 * We do not interpret Jinja.  A model directory's chat_template is
 * recognised by a fingerprint (FNV-1a 64 of the text without whitespace;
 * tests/ref/tok_templates.py holds the texts) and rendered by the C
 * function for that family, which tests compare with transformers'
 * apply_chat_template.  An unknown template is an error that names the
 * ways out (a template name in the configuration), never a guess.
 *
 * The prompt is built as segments: template text, which may contain
 * special tokens, and caller text (roles, contents, the date), which never
 * does, so eng_tok_chat_encode cannot be steered by a user who writes
 * "<|im_end|>" into a message.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "internal.h"

typedef enum { T_CHATML, T_QWEN2, T_QWEN25, T_LLAMA3, T_LLAMA31, T_LLAMA32 } tkind;

static const struct {
    const char *name;
    tkind kind;
} NAMES[] = {
    { "chatml", T_CHATML }, { "qwen2", T_QWEN2 },       { "qwen2.5", T_QWEN25 },
    { "llama3", T_LLAMA3 }, { "llama3.1", T_LLAMA31 }, { "llama3.2", T_LLAMA32 },
};

/* python3 tests/ref/tok_templates.py prints this table. */
static const struct {
    uint64_t fp;
    const char *name;
} KNOWN[] = {
    { 0xad70d358c7c293caULL, "chatml" },
    { 0x9f6d9b9336d278a1ULL, "qwen2" },
    { 0x1a283b297d5bfbd3ULL, "qwen2.5" },
    { 0xa56bba665e41750cULL, "llama3" },
    { 0xb5432f062fe16f14ULL, "llama3.1" },
    { 0x5f98ab0df2fd8306ULL, "llama3.2" },
};

static uint64_t fingerprint(const char *s)
{
    uint64_t h = 0xcbf29ce484222325ULL;
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        if (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r' || *p == '\v' || *p == '\f') continue;
        if (*p == '\\' && p[1] == 'n') {
            p++;
            continue;
        }
        h ^= *p;
        h *= 0x100000001b3ULL;
    }
    return h;
}

static int resolve(const eng_tok *tok, const eng_tok_chat_params *p, tkind *kind, const char **name,
                   char *err, size_t errlen)
{
    const char *want = p ? p->template_name : NULL;
    if (want && *want) {
        for (size_t i = 0; i < sizeof NAMES / sizeof NAMES[0]; i++)
            if (strcmp(NAMES[i].name, want) == 0) {
                *kind = NAMES[i].kind;
                *name = NAMES[i].name;
                return 0;
            }
        return eng__errf(err, errlen, ENG_EUNSUPPORTED,
                         "chat template \"%s\" is not supported (chatml, qwen2, qwen2.5, llama3, llama3.1, llama3.2)", want);
    }
    const char *src = eng_tok_chat_template_source(tok);
    if (!src)
        return eng__errf(err, errlen, ENG_EUNSUPPORTED,
                         "the model directory has no chat_template (tokenizer_config.json or chat_template.jinja); "
                         "name one in the configuration (chatml, qwen2, qwen2.5, llama3, llama3.1, llama3.2)");
    uint64_t fp = fingerprint(src);
    for (size_t i = 0; i < sizeof KNOWN / sizeof KNOWN[0]; i++)
        if (KNOWN[i].fp == fp) return resolve(tok, &(eng_tok_chat_params){ KNOWN[i].name, NULL }, kind, name, err, errlen);
    return eng__errf(err, errlen, ENG_EUNSUPPORTED,
                     "tokenizer_config.json: chat_template is not one we recognise (fingerprint %016llx, %zu bytes); "
                     "name the family in the configuration if it is one of chatml, qwen2, qwen2.5, llama3, llama3.1, llama3.2",
                     (unsigned long long)fp, strlen(src));
}

int eng_tok_chat_template_name(const eng_tok *tok, const eng_tok_chat_params *p, const char **name,
                               char *err, size_t errlen)
{
    tkind k;
    if (!tok || !name) return eng__errf(err, errlen, ENG_EINVAL, "eng_tok_chat_template_name: NULL argument");
    return resolve(tok, p, &k, name, err, errlen);
}

/* ---- the prompt as segments --------------------------------------------- */

typedef struct prompt {
    eng_tok_segment *seg;
    size_t n, cap;
    char **owned; /* strings the segments point into (trimmed, JSON-quoted, dates) */
    size_t n_owned, cap_owned;
    int oom;
} prompt;

static void put(prompt *pr, const char *s, size_t len, int tmpl)
{
    if (pr->oom || len == 0) return;
    if (pr->n == pr->cap) {
        size_t cap = pr->cap ? pr->cap * 2 : 32;
        eng_tok_segment *p = realloc(pr->seg, cap * sizeof *p);
        if (!p) { pr->oom = 1; return; }
        pr->seg = p;
        pr->cap = cap;
    }
    pr->seg[pr->n++] = (eng_tok_segment){ s, len, tmpl };
}

static void T(prompt *pr, const char *s) { put(pr, s, strlen(s), 1); }
static void C(prompt *pr, const char *s, size_t len) { put(pr, s, len, 0); }

static char *own(prompt *pr, char *s)
{
    if (!s) { pr->oom = 1; return NULL; }
    if (pr->n_owned == pr->cap_owned) {
        size_t cap = pr->cap_owned ? pr->cap_owned * 2 : 8;
        char **p = realloc(pr->owned, cap * sizeof *p);
        if (!p) { free(s); pr->oom = 1; return NULL; }
        pr->owned = p;
        pr->cap_owned = cap;
    }
    pr->owned[pr->n_owned++] = s;
    return s;
}

static void prompt_free(prompt *pr)
{
    for (size_t i = 0; i < pr->n_owned; i++) free(pr->owned[i]);
    free(pr->owned);
    free(pr->seg);
}

/* Python's str.isspace(), which Jinja's trim filter strips. */
static size_t space_len(const unsigned char *s, size_t n)
{
    if (n == 0) return 0;
    unsigned c = s[0];
    if ((c >= 9 && c <= 13) || (c >= 0x1C && c <= 0x20)) return 1;
    if (n >= 2 && c == 0xC2 && (s[1] == 0x85 || s[1] == 0xA0)) return 2;
    if (n >= 3 && c == 0xE1 && s[1] == 0x9A && s[2] == 0x80) return 3;                   /* U+1680 */
    if (n >= 3 && c == 0xE2 && s[1] == 0x80 && (s[2] <= 0x8A || s[2] == 0xA8 || s[2] == 0xA9 || s[2] == 0xAF))
        return 3;                                                                          /* U+2000-200A, 2028, 2029, 202F */
    if (n >= 3 && c == 0xE2 && s[1] == 0x81 && s[2] == 0x9F) return 3;                   /* U+205F */
    if (n >= 3 && c == 0xE3 && s[1] == 0x80 && s[2] == 0x80) return 3;                   /* U+3000 */
    return 0;
}

static void trim(const char *s, size_t n, const char **out, size_t *out_len)
{
    const unsigned char *u = (const unsigned char *)s;
    size_t a = 0, b = n, l;
    while (a < b && (l = space_len(u + a, b - a))) a += l;
    /* from the right: find the start of the last character and test it */
    while (b > a) {
        size_t j = b - 1;
        while (j > a && (u[j] & 0xC0) == 0x80) j--;
        if (space_len(u + j, b - j) != b - j) break;
        b = j;
    }
    *out = s + a;
    *out_len = b - a;
}

/* json.dumps(s, ensure_ascii=False): transformers' tojson filter. */
static char *json_quote(const char *s, size_t n, size_t *len)
{
    char *o = malloc(n * 6 + 3), *w = o;
    if (!o) return NULL;
    *w++ = '"';
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        switch (c) {
        case '"': *w++ = '\\'; *w++ = '"'; break;
        case '\\': *w++ = '\\'; *w++ = '\\'; break;
        case '\n': *w++ = '\\'; *w++ = 'n'; break;
        case '\r': *w++ = '\\'; *w++ = 'r'; break;
        case '\t': *w++ = '\\'; *w++ = 't'; break;
        case '\b': *w++ = '\\'; *w++ = 'b'; break;
        case '\f': *w++ = '\\'; *w++ = 'f'; break;
        default:
            if (c < 0x20) w += sprintf(w, "\\u%04x", c);
            else *w++ = (char)c;
        }
    }
    *w++ = '"';
    *w = 0;
    *len = (size_t)(w - o);
    return o;
}

static int is_role(const eng_tok_message *m, const char *r)
{
    return strcmp(m->role, r) == 0;
}

static int render(const eng_tok *tok, tkind k, const eng_tok_message *msgs, size_t n, int gen,
                  const eng_tok_chat_params *p, prompt *pr, char *err, size_t errlen)
{
    if (n == 0) return eng__errf(err, errlen, ENG_EINVAL, "chat: no messages");
    for (size_t i = 0; i < n; i++) {
        if (!msgs[i].role || !*msgs[i].role)
            return eng__errf(err, errlen, ENG_EINVAL, "chat: messages[%zu] has no role", i);
        if (!msgs[i].content && msgs[i].content_len)
            return eng__errf(err, errlen, ENG_EINVAL, "chat: messages[%zu] has no content", i);
    }
#define ROLE(m) C(pr, (m)->role, strlen((m)->role))
#define CONTENT(m) C(pr, (m)->content, (m)->content_len)
    const char *bos = eng_tok_special_text(tok, "bos");
    switch (k) {
    case T_CHATML:
    case T_QWEN2:
        for (size_t i = 0; i < n; i++) {
            if (i == 0 && k == T_QWEN2 && !is_role(&msgs[0], "system"))
                T(pr, "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n");
            T(pr, "<|im_start|>");
            ROLE(&msgs[i]);
            T(pr, "\n");
            CONTENT(&msgs[i]);
            T(pr, "<|im_end|>\n");
        }
        if (gen) T(pr, "<|im_start|>assistant\n");
        break;
    case T_QWEN25:
        if (is_role(&msgs[0], "system")) {
            T(pr, "<|im_start|>system\n");
            CONTENT(&msgs[0]);
            T(pr, "<|im_end|>\n");
        } else {
            T(pr, "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n");
        }
        for (size_t i = 0; i < n; i++) {
            const eng_tok_message *m = &msgs[i];
            if (is_role(m, "user") || is_role(m, "assistant") || (is_role(m, "system") && i > 0)) {
                T(pr, "<|im_start|>");
                ROLE(m);
                T(pr, "\n");
                CONTENT(m);
                T(pr, "<|im_end|>\n");
            } else if (is_role(m, "tool")) {
                if (i == 0 || !is_role(&msgs[i - 1], "tool")) T(pr, "<|im_start|>user");
                T(pr, "\n<tool_response>\n");
                CONTENT(m);
                T(pr, "\n</tool_response>");
                if (i + 1 == n || !is_role(&msgs[i + 1], "tool")) T(pr, "<|im_end|>\n");
            } else if (!is_role(m, "system")) {
                /* the template would silently drop it: refuse instead */
                return eng__errf(err, errlen, ENG_EINVAL,
                                 "chat: messages[%zu]: role \"%.32s\" is not supported by the qwen2.5 template "
                                 "(system, user, assistant, tool)", i, m->role);
            }
        }
        if (gen) T(pr, "<|im_start|>assistant\n");
        break;
    case T_LLAMA3:
        for (size_t i = 0; i < n; i++) {
            const char *c;
            size_t cl;
            if (i == 0 && bos) T(pr, bos);
            T(pr, "<|start_header_id|>");
            ROLE(&msgs[i]);
            T(pr, "<|end_header_id|>\n\n");
            trim(msgs[i].content ? msgs[i].content : "", msgs[i].content_len, &c, &cl);
            C(pr, c, cl);
            T(pr, "<|eot_id|>");
        }
        if (gen) T(pr, "<|start_header_id|>assistant<|end_header_id|>\n\n");
        break;
    case T_LLAMA31:
    case T_LLAMA32: {
        const char *date = p ? p->date_string : NULL;
        if (!date && k == T_LLAMA31) date = "26 Jul 2024";
        if (!date) { /* transformers' strftime_now("%d %b %Y"), local time */
            static const char *mon[] = { "Jan", "Feb", "Mar", "Apr", "May", "Jun",
                                         "Jul", "Aug", "Sep", "Oct", "Nov", "Dec" };
            time_t now = time(NULL);
            struct tm tm;
            char *d = malloc(32);
            if (d && localtime_r(&now, &tm)) snprintf(d, 32, "%02d %s %d", tm.tm_mday, mon[tm.tm_mon % 12], tm.tm_year + 1900);
            else if (d) snprintf(d, 32, "26 Jul 2024");
            date = own(pr, d);
            if (!date) break;
        }
        size_t first = 0;
        const char *sys = "";
        size_t sysl = 0;
        if (is_role(&msgs[0], "system")) {
            trim(msgs[0].content ? msgs[0].content : "", msgs[0].content_len, &sys, &sysl);
            first = 1;
        }
        if (bos) T(pr, bos);
        T(pr, "<|start_header_id|>system<|end_header_id|>\n\n");
        T(pr, "Cutting Knowledge Date: December 2023\n");
        T(pr, "Today Date: ");
        C(pr, date, strlen(date));
        T(pr, "\n\n");
        C(pr, sys, sysl);
        T(pr, "<|eot_id|>");
        for (size_t i = first; i < n; i++) {
            const eng_tok_message *m = &msgs[i];
            if (is_role(m, "tool") || is_role(m, "ipython")) {
                size_t ql = 0;
                char *q = own(pr, json_quote(m->content ? m->content : "", m->content_len, &ql));
                if (!q) break;
                T(pr, "<|start_header_id|>ipython<|end_header_id|>\n\n");
                C(pr, q, ql);
                T(pr, "<|eot_id|>");
            } else {
                const char *c;
                size_t cl;
                T(pr, "<|start_header_id|>");
                ROLE(m);
                T(pr, "<|end_header_id|>\n\n");
                trim(m->content ? m->content : "", m->content_len, &c, &cl);
                C(pr, c, cl);
                T(pr, "<|eot_id|>");
            }
        }
        if (gen) T(pr, "<|start_header_id|>assistant<|end_header_id|>\n\n");
        break;
    }
    }
#undef ROLE
#undef CONTENT
    if (pr->oom) return eng__errf(err, errlen, ENG_ENOMEM, "chat: out of memory");
    return 0;
}

int eng_tok_chat_apply(const eng_tok *tok, const eng_tok_message *msgs, size_t n, int add_generation_prompt,
                       const eng_tok_chat_params *p, char **text, size_t *len, char *err, size_t errlen)
{
    if (!tok || !text || !len || (!msgs && n)) return eng__errf(err, errlen, ENG_EINVAL, "eng_tok_chat_apply: NULL argument");
    *text = NULL;
    *len = 0;
    tkind k;
    const char *name;
    int rc = resolve(tok, p, &k, &name, err, errlen);
    if (rc) return rc;
    prompt pr = { 0 };
    if ((rc = render(tok, k, msgs, n, add_generation_prompt, p, &pr, err, errlen))) goto done;
    size_t total = 0;
    for (size_t i = 0; i < pr.n; i++) total += pr.seg[i].len;
    char *o = malloc(total + 1);
    if (!o) { rc = eng__errf(err, errlen, ENG_ENOMEM, "chat: out of memory"); goto done; }
    size_t w = 0;
    for (size_t i = 0; i < pr.n; i++) {
        memcpy(o + w, pr.seg[i].text, pr.seg[i].len);
        w += pr.seg[i].len;
    }
    o[w] = 0;
    *text = o;
    *len = w;
done:
    prompt_free(&pr);
    return rc;
}

int eng_tok_chat_encode(const eng_tok *tok, const eng_tok_message *msgs, size_t n, int add_generation_prompt,
                        const eng_tok_chat_params *p, int32_t **ids, size_t *n_ids, char *err, size_t errlen)
{
    if (!tok || !ids || !n_ids || (!msgs && n)) return eng__errf(err, errlen, ENG_EINVAL, "eng_tok_chat_encode: NULL argument");
    *ids = NULL;
    *n_ids = 0;
    tkind k;
    const char *name;
    int rc = resolve(tok, p, &k, &name, err, errlen);
    if (rc) return rc;
    prompt pr = { 0 };
    if ((rc = render(tok, k, msgs, n, add_generation_prompt, p, &pr, err, errlen)) == 0)
        rc = eng_tok_encode_segments(tok, pr.seg, pr.n, 0, ids, n_ids, err, errlen);
    prompt_free(&pr);
    return rc;
}

int eng_tok_chat_stop_ids(const eng_tok *tok, const eng_tok_chat_params *p, int32_t *out, int max)
{
    tkind k;
    const char *name;
    if (!tok || (!out && max > 0)) return ENG_EINVAL;
    int rc = resolve(tok, p, &k, &name, NULL, 0);
    if (rc) return rc;
    static const char *chatml[] = { "<|im_end|>", "<|endoftext|>", NULL };
    static const char *llama[] = { "<|eot_id|>", "<|end_of_text|>", "<|eom_id|>", NULL };
    const char **names = (k == T_CHATML || k == T_QWEN2 || k == T_QWEN25) ? chatml : llama;
    int cnt = 0;
    int32_t cand[8];
    int nc = 0;
    for (int i = 0; names[i]; i++) cand[nc++] = eng_tok_token_id(tok, names[i]);
    cand[nc++] = eng_tok_get_info(tok)->eos_id;
    for (int i = 0; i < nc; i++) {
        if (cand[i] < 0) continue;
        int dup = 0;
        for (int j = 0; j < cnt && j < max; j++) dup |= out[j] == cand[i];
        if (dup) continue;
        if (cnt < max) out[cnt] = cand[i];
        cnt++;
    }
    return cnt < max ? cnt : max;
}
