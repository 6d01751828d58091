/*
 * jinja_value.c — the Jinja interpreter's values: the arena they live in,
 * strings (UTF-8 with untrusted byte ranges), lists, dicts, Python's
 * equality/ordering/truth, str() and repr() as Python writes them,
 * json.dumps (transformers' tojson) and the conversion from JSON input.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "jinja_priv.h"

/* ---- arena ---------------------------------------------------------------- */

struct jj_chunk {
    struct jj_chunk *next;
    size_t cap, off;
    _Alignas(16) unsigned char data[];
};

#define CHUNK 65536

void *jj__alloc(jj_arena *a, size_t n)
{
    n = (n + 15) & ~(size_t)15;
    struct jj_chunk *c = a->head;
    if (!c || c->cap - c->off < n) {
        size_t cap = n > CHUNK / 4 ? n : CHUNK;
        if (a->limit && a->used + cap + sizeof *c > a->limit) a->fail(a->fail_ctx, JJ_ELIMIT);
        c = malloc(sizeof *c + cap);
        if (!c) a->fail(a->fail_ctx, JJ_ENOMEM);
        c->cap = cap;
        c->off = 0;
        a->used += cap + sizeof *c;
        if (cap > CHUNK && a->head) { /* a big block: keep filling the current chunk */
            c->next = a->head->next;
            a->head->next = c;
            memset(c->data, 0, n);
            c->off = n;
            return c->data;
        }
        c->next = a->head;
        a->head = c;
    }
    void *p = c->data + c->off;
    c->off += n;
    memset(p, 0, n);
    return p;
}

char *jj__strndup(jj_arena *a, const char *s, size_t n)
{
    char *p = jj__alloc(a, n + 1);
    memcpy(p, s, n);
    p[n] = 0;
    return p;
}

void jj__arena_free(jj_arena *a)
{
    struct jj_chunk *c = a->head;
    while (c) {
        struct jj_chunk *n = c->next;
        free(c);
        c = n;
    }
    a->head = NULL;
    a->used = 0;
}

/* ---- UTF-8 ------------------------------------------------------------------ */

size_t jj__utf8_dec(const char *s, size_t n, uint32_t *cp)
{
    const unsigned char *u = (const unsigned char *)s;
    if (n == 0) { *cp = 0; return 0; }
    unsigned c = u[0];
    size_t len = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 1;
    if (len > n) len = 1;
    uint32_t v = len == 1 ? c : len == 2 ? c & 0x1f : len == 3 ? c & 0x0f : c & 0x07;
    for (size_t i = 1; i < len; i++) v = v << 6 | (u[i] & 0x3f);
    *cp = v;
    return len;
}

size_t jj__utf8_enc(uint32_t cp, char *o)
{
    if (cp < 0x80) { o[0] = (char)cp; return 1; }
    if (cp < 0x800) { o[0] = (char)(0xC0 | cp >> 6); o[1] = (char)(0x80 | (cp & 0x3f)); return 2; }
    if (cp < 0x10000) {
        o[0] = (char)(0xE0 | cp >> 12); o[1] = (char)(0x80 | ((cp >> 6) & 0x3f)); o[2] = (char)(0x80 | (cp & 0x3f));
        return 3;
    }
    o[0] = (char)(0xF0 | cp >> 18); o[1] = (char)(0x80 | ((cp >> 12) & 0x3f));
    o[2] = (char)(0x80 | ((cp >> 6) & 0x3f)); o[3] = (char)(0x80 | (cp & 0x3f));
    return 4;
}

/* Python's str.isspace(): what strip(), split() and the lexer's \s take. */
size_t jj__space_len(const char *s, size_t n)
{
    const unsigned char *u = (const unsigned char *)s;
    if (n == 0) return 0;
    unsigned c = u[0];
    if ((c >= 9 && c <= 13) || (c >= 0x1C && c <= 0x20)) return 1;
    if (n >= 2 && c == 0xC2 && (u[1] == 0x85 || u[1] == 0xA0)) return 2;
    if (n >= 3 && c == 0xE1 && u[1] == 0x9A && u[2] == 0x80) return 3;                 /* U+1680 */
    if (n >= 3 && c == 0xE2 && u[1] == 0x80 && (u[2] <= 0x8A || u[2] == 0xA8 || u[2] == 0xA9 || u[2] == 0xAF))
        return 3;                                                                        /* U+2000-200A, 2028, 2029, 202F */
    if (n >= 3 && c == 0xE2 && u[1] == 0x81 && u[2] == 0x9F) return 3;                 /* U+205F */
    if (n >= 3 && c == 0xE3 && u[1] == 0x80 && u[2] == 0x80) return 3;                 /* U+3000 */
    return 0;
}

void jj__utf8_trim_cut(char *s)
{
    size_t len = strlen(s), j = len;
    while (j > 0 && ((unsigned char)s[j - 1] & 0xC0) == 0x80) j--;
    if (j == 0) return;
    unsigned char lead = (unsigned char)s[j - 1];
    size_t need = lead < 0x80 ? 1 : (lead >> 5) == 6 ? 2 : (lead >> 4) == 14 ? 3 : (lead >> 3) == 30 ? 4 : 1;
    if (j - 1 + need > len) s[j - 1] = 0;
}

/* ---- strings ---------------------------------------------------------------- */

static size_t count_cp(const char *s, size_t n)
{
    size_t k = 0;
    for (size_t i = 0; i < n; i++) k += ((unsigned char)s[i] & 0xC0) != 0x80;
    return k;
}

jj_str *jj__str_new(jj_arena *a, const char *s, size_t len, int untrusted)
{
    if (len >= UINT32_MAX) a->fail(a->fail_ctx, JJ_ELIMIT);
    jj_str *r = jj__alloc(a, sizeof *r + len + 1);
    memcpy(r->s, s, len);
    r->s[len] = 0;
    r->len = len;
    r->ncp = count_cp(s, len);
    if (untrusted && len) {
        r->taint = jj__alloc(a, sizeof *r->taint);
        r->taint[0] = (jj_taint){ 0, (uint32_t)len };
        r->n_taint = 1;
    }
    return r;
}

jj_str *jj__str_fmt(jj_arena *a, const char *fmt, ...)
{
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    if (n < 0) n = 0;
    if ((size_t)n >= sizeof buf) n = sizeof buf - 1;
    return jj__str_new(a, buf, (size_t)n, 0);
}

jj_val jj__cstr(jj_ev *ev, const char *s)
{
    return jj__strv(jj__str_new(&ev->arena, s, strlen(s), 0));
}

jj_str *jj__str_sub(jj_arena *ar, const jj_str *s, size_t a, size_t b)
{
    jj_str *r = jj__str_new(ar, s->s + a, b - a, 0);
    uint32_t n = 0;
    for (uint32_t i = 0; i < s->n_taint; i++)
        if (s->taint[i].b > a && s->taint[i].a < b) n++;
    if (n) {
        r->taint = jj__alloc(ar, n * sizeof *r->taint);
        for (uint32_t i = 0; i < s->n_taint; i++) {
            if (s->taint[i].b <= a || s->taint[i].a >= b) continue;
            uint32_t x = s->taint[i].a > a ? s->taint[i].a : (uint32_t)a;
            uint32_t y = s->taint[i].b < b ? s->taint[i].b : (uint32_t)b;
            r->taint[r->n_taint++] = (jj_taint){ (uint32_t)(x - a), (uint32_t)(y - a) };
        }
    }
    return r;
}

int jj__str_untrusted(const jj_str *s)
{
    return s->n_taint > 0;
}

size_t jj__str_cp_off(const jj_str *s, size_t i)
{
    if (s->ncp == s->len) return i;
    size_t off = 0, k = 0;
    while (off < s->len && k < i) {
        off++;
        while (off < s->len && ((unsigned char)s->s[off] & 0xC0) == 0x80) off++;
        k++;
    }
    return off;
}

/* ---- string builder ----------------------------------------------------------- */

static void sb_reserve(jj_ev *ev, jj_sb *b, size_t n)
{
    if (b->len + n > ev->lim.max_output)
        jj__fail(ev, JJ_ELIMIT, "the template's output exceeds %zu bytes", ev->lim.max_output);
    if (b->len + n + 1 <= b->cap) return;
    size_t cap = b->cap ? b->cap * 2 : 64;
    while (cap < b->len + n + 1) cap *= 2;
    char *p = jj__alloc(&ev->arena, cap);
    if (b->len) memcpy(p, b->p, b->len);
    b->p = p;
    b->cap = cap;
}

static void sb_mark(jj_ev *ev, jj_sb *b, size_t a, size_t e)
{
    if (a == e) return;
    if (b->nt && b->t[b->nt - 1].b == a) {
        b->t[b->nt - 1].b = (uint32_t)e;
        return;
    }
    if (b->nt == b->capt) {
        uint32_t cap = b->capt ? b->capt * 2 : 8;
        jj_taint *t = jj__alloc(&ev->arena, cap * sizeof *t);
        if (b->nt) memcpy(t, b->t, b->nt * sizeof *t);
        b->t = t;
        b->capt = cap;
    }
    b->t[b->nt++] = (jj_taint){ (uint32_t)a, (uint32_t)e };
}

void jj__sb_put(jj_ev *ev, jj_sb *b, const char *s, size_t n, int untrusted)
{
    if (!n) return;
    sb_reserve(ev, b, n);
    memcpy(b->p + b->len, s, n);
    if (untrusted) sb_mark(ev, b, b->len, b->len + n);
    b->len += n;
    b->p[b->len] = 0;
}

void jj__sb_puts(jj_ev *ev, jj_sb *b, const char *s)
{
    jj__sb_put(ev, b, s, strlen(s), 0);
}

void jj__sb_str(jj_ev *ev, jj_sb *b, const jj_str *s)
{
    size_t base = b->len;
    jj__sb_put(ev, b, s->s, s->len, 0);
    for (uint32_t i = 0; i < s->n_taint; i++) sb_mark(ev, b, base + s->taint[i].a, base + s->taint[i].b);
}

void jj__sb_taint_all(jj_sb *b, jj_ev *ev)
{
    b->nt = 0;
    sb_mark(ev, b, 0, b->len);
}

jj_str *jj__sb_done(jj_ev *ev, jj_sb *b)
{
    jj_str *r = jj__str_new(&ev->arena, b->p ? b->p : "", b->len, 0);
    if (b->nt) {
        r->taint = b->t;
        r->n_taint = b->nt;
    }
    return r;
}

/* ---- lists and dicts ------------------------------------------------------------ */

jj_list *jj__list_new(jj_ev *ev, size_t n)
{
    if (n > ev->lim.max_memory / sizeof(jj_val))
        jj__fail(ev, JJ_ELIMIT, "a list of %zu items exceeds the memory limit", n);
    jj_list *l = jj__alloc(&ev->arena, sizeof *l);
    l->n = n;
    l->v = n ? jj__alloc(&ev->arena, n * sizeof *l->v) : NULL;
    return l;
}

jj_val jj__listv(jj_list *l, int kind)
{
    jj_val v = { .t = JV_LIST, .kind = (uint8_t)kind };
    v.u.l = l;
    return v;
}

jj_dict *jj__dict_new(jj_ev *ev, size_t cap)
{
    jj_dict *d = jj__alloc(&ev->arena, sizeof *d);
    d->cap = cap ? cap : 4;
    d->k = jj__alloc(&ev->arena, d->cap * sizeof *d->k);
    d->v = jj__alloc(&ev->arena, d->cap * sizeof *d->v);
    return d;
}

/* Python: hash-equal keys are the same key (1, 1.0 and True are one key). */
jj_val *jj__dict_find(const jj_dict *d, jj_val key)
{
    for (size_t i = 0; i < d->n; i++)
        if (jj__equal(d->k[i], key)) return &d->v[i];
    return NULL;
}

jj_val *jj__dict_get_cstr(const jj_dict *d, const char *key)
{
    size_t n = strlen(key);
    for (size_t i = 0; i < d->n; i++)
        if (d->k[i].t == JV_STR && d->k[i].u.s->len == n && memcmp(d->k[i].u.s->s, key, n) == 0) return &d->v[i];
    return NULL;
}

void jj__dict_set(jj_ev *ev, jj_dict *d, jj_val key, jj_val v)
{
    jj_val *p = jj__dict_find(d, key);
    if (p) {
        *p = v;
        return;
    }
    if (d->n == d->cap) {
        size_t cap = d->cap * 2;
        jj_val *k = jj__alloc(&ev->arena, cap * sizeof *k), *vv = jj__alloc(&ev->arena, cap * sizeof *vv);
        memcpy(k, d->k, d->n * sizeof *k);
        memcpy(vv, d->v, d->n * sizeof *vv);
        d->k = k;
        d->v = vv;
        d->cap = cap;
    }
    d->k[d->n] = key;
    d->v[d->n] = v;
    d->n++;
}

/* ---- Python semantics ------------------------------------------------------------ */

int jj__truthy(jj_val v)
{
    switch (v.t) {
    case JV_UNDEF: case JV_NONE: return 0;
    case JV_BOOL: return v.u.b;
    case JV_INT: return v.u.i != 0;
    case JV_FLOAT: return v.u.f != 0.0;
    case JV_STR: return v.u.s->len != 0;
    case JV_LIST: return v.kind == JL_GEN || v.u.l->n != 0; /* a generator object is always true */
    case JV_DICT: return v.u.d->n != 0;
    default: return 1;
    }
}

static int is_num(jj_val v)
{
    return v.t == JV_BOOL || v.t == JV_INT || v.t == JV_FLOAT;
}

static double num(jj_val v)
{
    return v.t == JV_FLOAT ? v.u.f : v.t == JV_INT ? (double)v.u.i : (double)v.u.b;
}

static int64_t inum(jj_val v)
{
    return v.t == JV_INT ? v.u.i : v.u.b;
}

static int equal_d(jj_val a, jj_val b, int depth)
{
    if (depth > 200) return 0;
    if (is_num(a) && is_num(b)) {
        if (a.t != JV_FLOAT && b.t != JV_FLOAT) return inum(a) == inum(b);
        return num(a) == num(b);
    }
    if (a.t != b.t) return 0;
    switch (a.t) {
    case JV_UNDEF: case JV_NONE: return 1;
    case JV_STR: return a.u.s->len == b.u.s->len && memcmp(a.u.s->s, b.u.s->s, a.u.s->len) == 0;
    case JV_LIST:
        if (a.kind == JL_GEN || a.kind == JL_ITEMS || a.kind == JL_KEYS || a.kind == JL_VALUES ||
            b.kind == JL_GEN || b.kind == JL_ITEMS || b.kind == JL_KEYS || b.kind == JL_VALUES)
            return a.u.l == b.u.l; /* identity, near enough for templates */
        if (a.kind != b.kind || a.u.l->n != b.u.l->n) return 0;
        for (size_t i = 0; i < a.u.l->n; i++)
            if (!equal_d(a.u.l->v[i], b.u.l->v[i], depth + 1)) return 0;
        return 1;
    case JV_DICT:
        if (a.u.d->n != b.u.d->n) return 0;
        for (size_t i = 0; i < a.u.d->n; i++) {
            jj_val *o = jj__dict_find(b.u.d, a.u.d->k[i]);
            if (!o || !equal_d(a.u.d->v[i], *o, depth + 1)) return 0;
        }
        return 1;
    case JV_NS: return a.u.d == b.u.d;
    case JV_FUNC: return a.u.fn == b.u.fn;
    case JV_LOOP: return a.u.loop == b.u.loop;
    }
    return 0;
}

int jj__equal(jj_val a, jj_val b)
{
    return equal_d(a, b, 0);
}

const char *jj__type_name(jj_val v)
{
    switch (v.t) {
    case JV_UNDEF: return "Undefined";
    case JV_NONE: return "NoneType";
    case JV_BOOL: return "bool";
    case JV_INT: return "int";
    case JV_FLOAT: return "float";
    case JV_STR: return "str";
    case JV_LIST: {
        static const char *const names[] = { "list", "tuple", "generator", "dict_items", "dict_keys",
                                             "dict_values", "range" };
        return names[v.kind];
    }
    case JV_DICT: return "dict";
    case JV_NS: return "Namespace";
    case JV_FUNC: return "function";
    case JV_LOOP: return "LoopContext";
    }
    return "object";
}

int jj__compare(jj_ev *ev, jj_val a, jj_val b)
{
    if (a.t == JV_UNDEF || b.t == JV_UNDEF) {
        jj_str *h = a.t == JV_UNDEF ? a.u.s : b.u.s;
        jj__fail(ev, JJ_ERUNTIME, "%s", h ? h->s : "undefined value in a comparison");
    }
    if (is_num(a) && is_num(b)) {
        if (a.t != JV_FLOAT && b.t != JV_FLOAT) return inum(a) < inum(b) ? -1 : inum(a) > inum(b);
        double x = num(a), y = num(b);
        return x < y ? -1 : x > y;
    }
    if (a.t == JV_STR && b.t == JV_STR) {
        size_t n = a.u.s->len < b.u.s->len ? a.u.s->len : b.u.s->len;
        int c = memcmp(a.u.s->s, b.u.s->s, n); /* UTF-8 byte order is code point order */
        if (c) return c < 0 ? -1 : 1;
        return a.u.s->len < b.u.s->len ? -1 : a.u.s->len > b.u.s->len;
    }
    if (a.t == JV_LIST && b.t == JV_LIST && a.kind == b.kind && (a.kind == JL_LIST || a.kind == JL_TUPLE)) {
        size_t n = a.u.l->n < b.u.l->n ? a.u.l->n : b.u.l->n;
        for (size_t i = 0; i < n; i++) {
            if (jj__equal(a.u.l->v[i], b.u.l->v[i])) continue;
            return jj__compare(ev, a.u.l->v[i], b.u.l->v[i]);
        }
        return a.u.l->n < b.u.l->n ? -1 : a.u.l->n > b.u.l->n;
    }
    jj__fail(ev, JJ_ERUNTIME, "'<' not supported between instances of '%s' and '%s'", jj__type_name(a),
             jj__type_name(b));
}

static int untrusted_d(jj_val v, int depth)
{
    if (depth > 200) return 1;
    switch (v.t) {
    case JV_STR: return v.u.s->n_taint > 0;
    case JV_LIST:
        for (size_t i = 0; i < v.u.l->n; i++)
            if (untrusted_d(v.u.l->v[i], depth + 1)) return 1;
        return 0;
    case JV_DICT: case JV_NS:
        for (size_t i = 0; i < v.u.d->n; i++)
            if (untrusted_d(v.u.d->k[i], depth + 1) || untrusted_d(v.u.d->v[i], depth + 1)) return 1;
        return 0;
    default: return 0;
    }
}

int jj__untrusted_any(jj_val v)
{
    return untrusted_d(v, 0);
}

/* ---- argument checks for builtins ------------------------------------------------ */

_Noreturn void jj__type_error(jj_ev *ev, const char *what, jj_val v)
{
    if (v.t == JV_UNDEF) jj__fail(ev, JJ_ERUNTIME, "%s", v.u.s ? v.u.s->s : "undefined value");
    jj__fail(ev, JJ_ERUNTIME, "%s, not %s", what, jj__type_name(v));
}

const jj_str *jj__need_str(jj_ev *ev, jj_val v, const char *what)
{
    if (v.t != JV_STR) jj__type_error(ev, what, v);
    return v.u.s;
}

int64_t jj__need_int(jj_ev *ev, jj_val v, const char *what)
{
    if (v.t == JV_INT) return v.u.i;
    if (v.t == JV_BOOL) return v.u.b;
    jj__type_error(ev, what, v);
}

jj_val jj__list_of(jj_ev *ev, jj_val *v, size_t n)
{
    jj_list *l = jj__list_new(ev, n);
    if (n) memcpy(l->v, v, n * sizeof *v);
    return jj__listv(l, JL_LIST);
}

/* ---- str() and repr() ---------------------------------------------------------------- */

/* Python's repr(float): the shortest digits that read back the same, fixed
 * notation for exponents in [-4, 16), else d.ddde+XX. */
void jj__fmt_float(double f, char *buf, size_t cap)
{
    if (isnan(f)) { snprintf(buf, cap, "nan"); return; }
    if (isinf(f)) { snprintf(buf, cap, f < 0 ? "-inf" : "inf"); return; }
    char e[40];
    int p;
    for (p = 1; p <= 17; p++) {
        snprintf(e, sizeof e, "%.*e", p - 1, f);
        if (strtod(e, NULL) == f) break;
    }
    /* e = [-]d[.ddd]e[+-]XX */
    char digits[40];
    int nd = 0, neg = e[0] == '-';
    const char *s = e + neg;
    for (; *s && *s != 'e'; s++)
        if (*s >= '0' && *s <= '9') digits[nd++] = *s;
    int exp = atoi(s + 1);
    while (nd > 1 && digits[nd - 1] == '0') nd--;
    digits[nd] = 0;
    char *o = buf;
    size_t left = cap;
#define OUT(...) do { int w_ = snprintf(o, left, __VA_ARGS__); if (w_ < 0 || (size_t)w_ >= left) return; o += w_; left -= (size_t)w_; } while (0)
    if (neg) OUT("-");
    if (exp >= -4 && exp < 16) {
        if (exp < 0) {
            OUT("0.");
            for (int i = 0; i < -exp - 1; i++) OUT("0");
            OUT("%s", digits);
        } else {
            for (int i = 0; i <= exp; i++) OUT("%c", i < nd ? digits[i] : '0');
            OUT(".");
            if (nd > exp + 1) OUT("%s", digits + exp + 1);
            else OUT("0");
        }
    } else {
        OUT("%c", digits[0]);
        if (nd > 1) OUT(".%s", digits + 1);
        OUT("e%c%02d", exp < 0 ? '-' : '+', exp < 0 ? -exp : exp);
    }
#undef OUT
}

/* Characters Python's repr() escapes besides ASCII controls: C1 controls,
 * the non-ASCII spaces and format characters that templates may meet. */
static int py_unprintable(uint32_t c)
{
    return (c >= 0x7F && c <= 0xA0) || c == 0xAD || c == 0x1680 || (c >= 0x2000 && c <= 0x200F) ||
           (c >= 0x2028 && c <= 0x202F) || (c >= 0x205F && c <= 0x2064) || c == 0x3000 || c == 0xFEFF ||
           (c >= 0xFFF9 && c <= 0xFFFB) || (c >= 0xD800 && c <= 0xDFFF);
}

static void repr_str(jj_ev *ev, jj_sb *b, const jj_str *s)
{
    int un = jj__str_untrusted(s);
    char q = memchr(s->s, '\'', s->len) && !memchr(s->s, '"', s->len) ? '"' : '\'';
    jj__sb_put(ev, b, &q, 1, 0);
    for (size_t i = 0; i < s->len;) {
        uint32_t c;
        size_t l = jj__utf8_dec(s->s + i, s->len - i, &c);
        char e[12];
        if (c == (uint32_t)q || c == '\\') { e[0] = '\\'; e[1] = (char)c; jj__sb_put(ev, b, e, 2, un); }
        else if (c == '\n') jj__sb_put(ev, b, "\\n", 2, un);
        else if (c == '\r') jj__sb_put(ev, b, "\\r", 2, un);
        else if (c == '\t') jj__sb_put(ev, b, "\\t", 2, un);
        else if (c < 0x20 || py_unprintable(c)) {
            int n = c < 0x100 ? snprintf(e, sizeof e, "\\x%02x", c) : snprintf(e, sizeof e, "\\u%04x", c);
            jj__sb_put(ev, b, e, (size_t)n, un);
        } else jj__sb_put(ev, b, s->s + i, l, un);
        i += l;
    }
    jj__sb_put(ev, b, &q, 1, 0);
}

static int byte_untrusted(const jj_str *s, size_t i)
{
    for (uint32_t k = 0; k < s->n_taint; k++)
        if (i >= s->taint[k].a && i < s->taint[k].b) return 1;
    return 0;
}

jj_str *jj__escape(jj_ev *ev, const jj_str *s)
{
    jj_sb b = { 0 };
    size_t a = 0;
    for (size_t i = 0; i < s->len; i++) {
        const char *e = NULL;
        switch (s->s[i]) {
        case '&': e = "&amp;"; break;
        case '<': e = "&lt;"; break;
        case '>': e = "&gt;"; break;
        case '"': e = "&#34;"; break;
        case '\'': e = "&#39;"; break;
        }
        if (!e) continue;
        jj__sb_str(ev, &b, jj__str_sub(&ev->arena, s, a, i));
        jj__sb_put(ev, &b, e, strlen(e), byte_untrusted(s, i));
        a = i + 1;
    }
    jj__sb_str(ev, &b, jj__str_sub(&ev->arena, s, a, s->len));
    return jj__sb_done(ev, &b);
}

static void repr_d(jj_ev *ev, jj_sb *b, jj_val v, int depth);

static void str_d(jj_ev *ev, jj_sb *b, jj_val v, int depth)
{
    char buf[64];
    switch (v.t) {
    case JV_UNDEF: return;
    case JV_NONE: jj__sb_puts(ev, b, "None"); return;
    case JV_BOOL: jj__sb_puts(ev, b, v.u.b ? "True" : "False"); return;
    case JV_INT: snprintf(buf, sizeof buf, "%lld", (long long)v.u.i); jj__sb_puts(ev, b, buf); return;
    case JV_FLOAT: jj__fmt_float(v.u.f, buf, sizeof buf); jj__sb_puts(ev, b, buf); return;
    case JV_STR: jj__sb_str(ev, b, v.u.s); return;
    default: repr_d(ev, b, v, depth); return;
    }
}

static void repr_d(jj_ev *ev, jj_sb *b, jj_val v, int depth)
{
    if (depth > 200) jj__fail(ev, JJ_ERUNTIME, "a value nests too deeply to print");
    switch (v.t) {
    case JV_UNDEF: jj__sb_puts(ev, b, "Undefined"); return;
    case JV_STR: repr_str(ev, b, v.u.s); return;
    case JV_LIST: {
        if (v.kind == JL_GEN) { jj__sb_puts(ev, b, "<generator object>"); return; }
        if (v.kind == JL_RANGE) {
            char buf[96];
            jj_list *l = v.u.l;
            long long a = l->n ? (long long)l->v[0].u.i : 0, st = l->n > 1 ? (long long)(l->v[1].u.i - l->v[0].u.i) : 1;
            if (st == 1) snprintf(buf, sizeof buf, "range(%lld, %lld)", a, a + (long long)l->n);
            else snprintf(buf, sizeof buf, "range(%lld, %lld, %lld)", a, a + st * (long long)l->n, st);
            jj__sb_puts(ev, b, buf);
            return;
        }
        int view = v.kind == JL_ITEMS || v.kind == JL_KEYS || v.kind == JL_VALUES;
        if (view) {
            jj__sb_puts(ev, b, jj__type_name(v));
            jj__sb_puts(ev, b, "(");
        }
        jj__sb_puts(ev, b, v.kind == JL_TUPLE ? "(" : "[");
        for (size_t i = 0; i < v.u.l->n; i++) {
            if (i) jj__sb_puts(ev, b, ", ");
            repr_d(ev, b, v.u.l->v[i], depth + 1);
        }
        if (v.kind == JL_TUPLE && v.u.l->n == 1) jj__sb_puts(ev, b, ",");
        jj__sb_puts(ev, b, v.kind == JL_TUPLE ? ")" : "]");
        if (view) jj__sb_puts(ev, b, ")");
        return;
    }
    case JV_NS: jj__sb_puts(ev, b, "<Namespace ");
        /* fall through */
    case JV_DICT:
        jj__sb_puts(ev, b, "{");
        for (size_t i = 0; i < v.u.d->n; i++) {
            if (i) jj__sb_puts(ev, b, ", ");
            repr_d(ev, b, v.u.d->k[i], depth + 1);
            jj__sb_puts(ev, b, ": ");
            repr_d(ev, b, v.u.d->v[i], depth + 1);
        }
        jj__sb_puts(ev, b, v.t == JV_NS ? "}>" : "}");
        return;
    case JV_FUNC: jj__sb_puts(ev, b, "<function>"); return;
    case JV_LOOP: jj__sb_puts(ev, b, "<LoopContext>"); return;
    default: str_d(ev, b, v, depth); return;
    }
}

void jj__str_of(jj_ev *ev, jj_sb *b, jj_val v)
{
    str_d(ev, b, v, 0);
}

void jj__repr_of(jj_ev *ev, jj_sb *b, jj_val v)
{
    repr_d(ev, b, v, 0);
}

jj_str *jj__to_str(jj_ev *ev, jj_val v)
{
    if (v.t == JV_STR) return v.u.s;
    jj_sb b = { 0 };
    jj__str_of(ev, &b, v);
    return jj__sb_done(ev, &b);
}

/* ---- json.dumps ------------------------------------------------------------------------ */

typedef struct json_opts {
    int ascii;
    const char *indent, *item_sep, *key_sep;
    int sort;
} json_opts;

static void json_str(jj_ev *ev, jj_sb *b, const jj_str *s, int ascii, int un)
{
    jj__sb_put(ev, b, "\"", 1, un);
    for (size_t i = 0; i < s->len;) {
        uint32_t c;
        size_t l = jj__utf8_dec(s->s + i, s->len - i, &c);
        char e[16];
        int n = 0;
        switch (c) {
        case '"': n = snprintf(e, sizeof e, "\\\""); break;
        case '\\': n = snprintf(e, sizeof e, "\\\\"); break;
        case '\n': n = snprintf(e, sizeof e, "\\n"); break;
        case '\r': n = snprintf(e, sizeof e, "\\r"); break;
        case '\t': n = snprintf(e, sizeof e, "\\t"); break;
        case '\b': n = snprintf(e, sizeof e, "\\b"); break;
        case '\f': n = snprintf(e, sizeof e, "\\f"); break;
        default:
            if (c < 0x20 || (ascii && c >= 0x80 && c < 0x10000))
                n = snprintf(e, sizeof e, "\\u%04x", c);
            else if (ascii && c >= 0x10000)
                n = snprintf(e, sizeof e, "\\u%04x\\u%04x", 0xD800 + ((c - 0x10000) >> 10),
                             0xDC00 + ((c - 0x10000) & 0x3FF));
        }
        if (n) jj__sb_put(ev, b, e, (size_t)n, un);
        else jj__sb_put(ev, b, s->s + i, l, un);
        i += l;
    }
    jj__sb_put(ev, b, "\"", 1, un);
}

static void json_newline(jj_ev *ev, jj_sb *b, const json_opts *o, int level)
{
    jj__sb_puts(ev, b, "\n");
    for (int i = 0; i < level; i++) jj__sb_puts(ev, b, o->indent);
}

static void json_d(jj_ev *ev, jj_sb *b, jj_val v, const json_opts *o, int level, int un);

/* A dict key as json.dumps writes it (str, or a number/bool/None as text). */
static void json_key(jj_ev *ev, jj_sb *b, jj_val k, const json_opts *o, int un)
{
    char buf[64];
    switch (k.t) {
    case JV_STR: json_str(ev, b, k.u.s, o->ascii, un); return;
    case JV_INT: snprintf(buf, sizeof buf, "\"%lld\"", (long long)k.u.i); break;
    case JV_FLOAT: buf[0] = '"'; jj__fmt_float(k.u.f, buf + 1, sizeof buf - 2); strcat(buf, "\""); break;
    case JV_BOOL: snprintf(buf, sizeof buf, "\"%s\"", k.u.b ? "true" : "false"); break;
    case JV_NONE: snprintf(buf, sizeof buf, "\"null\""); break;
    default: jj__fail(ev, JJ_ERUNTIME, "keys must be str, int, float, bool or None, not %s", jj__type_name(k));
    }
    jj__sb_put(ev, b, buf, strlen(buf), un);
}

static void json_d(jj_ev *ev, jj_sb *b, jj_val v, const json_opts *o, int level, int un)
{
    char buf[64];
    if (level > 200) jj__fail(ev, JJ_ERUNTIME, "a value nests too deeply for tojson");
    jj__step(ev);
    switch (v.t) {
    case JV_NONE: jj__sb_put(ev, b, "null", 4, un); return;
    case JV_BOOL: jj__sb_put(ev, b, v.u.b ? "true" : "false", v.u.b ? 4 : 5, un); return;
    case JV_INT: snprintf(buf, sizeof buf, "%lld", (long long)v.u.i); jj__sb_put(ev, b, buf, strlen(buf), un); return;
    case JV_FLOAT:
        if (isnan(v.u.f)) snprintf(buf, sizeof buf, "NaN");
        else if (isinf(v.u.f)) snprintf(buf, sizeof buf, v.u.f < 0 ? "-Infinity" : "Infinity");
        else jj__fmt_float(v.u.f, buf, sizeof buf);
        jj__sb_put(ev, b, buf, strlen(buf), un);
        return;
    case JV_STR: json_str(ev, b, v.u.s, o->ascii, un); return;
    case JV_LIST:
        if (v.kind != JL_LIST && v.kind != JL_TUPLE) break;
        if (v.u.l->n == 0) { jj__sb_put(ev, b, "[]", 2, un); return; }
        jj__sb_put(ev, b, "[", 1, un);
        if (o->indent) json_newline(ev, b, o, level + 1);
        for (size_t i = 0; i < v.u.l->n; i++) {
            if (i) {
                jj__sb_put(ev, b, o->item_sep, strlen(o->item_sep), un);
                if (o->indent) json_newline(ev, b, o, level + 1);
            }
            json_d(ev, b, v.u.l->v[i], o, level + 1, un);
        }
        if (o->indent) json_newline(ev, b, o, level);
        jj__sb_put(ev, b, "]", 1, un);
        return;
    case JV_DICT: {
        jj_dict *d = v.u.d;
        if (d->n == 0) { jj__sb_put(ev, b, "{}", 2, un); return; }
        size_t *ord = jj__alloc(&ev->arena, d->n * sizeof *ord);
        for (size_t i = 0; i < d->n; i++) ord[i] = i;
        if (o->sort) /* insertion sort: stable, and dicts in templates are small */
            for (size_t i = 1; i < d->n; i++)
                for (size_t j = i; j > 0 && jj__compare(ev, d->k[ord[j - 1]], d->k[ord[j]]) > 0; j--) {
                    size_t t = ord[j]; ord[j] = ord[j - 1]; ord[j - 1] = t;
                }
        jj__sb_put(ev, b, "{", 1, un);
        if (o->indent) json_newline(ev, b, o, level + 1);
        for (size_t i = 0; i < d->n; i++) {
            if (i) {
                jj__sb_put(ev, b, o->item_sep, strlen(o->item_sep), un);
                if (o->indent) json_newline(ev, b, o, level + 1);
            }
            json_key(ev, b, d->k[ord[i]], o, un);
            jj__sb_put(ev, b, o->key_sep, strlen(o->key_sep), un);
            json_d(ev, b, d->v[ord[i]], o, level + 1, un);
        }
        if (o->indent) json_newline(ev, b, o, level);
        jj__sb_put(ev, b, "}", 1, un);
        return;
    }
    default:
        break;
    }
    jj__fail(ev, JJ_ERUNTIME, "Object of type %s is not JSON serializable", jj__type_name(v));
}

jj_str *jj__tojson(jj_ev *ev, jj_val v, int ensure_ascii, const char *indent, const char *item_sep,
                   const char *key_sep, int sort_keys)
{
    json_opts o = { ensure_ascii, indent, item_sep ? item_sep : indent ? "," : ", ", key_sep ? key_sep : ": ",
                    sort_keys };
    jj_sb b = { 0 };
    json_d(ev, &b, v, &o, 0, jj__untrusted_any(v));
    return jj__sb_done(ev, &b);
}

/* ---- JSON input ------------------------------------------------------------------------ */

jj_val jj__from_json(jj_ev *ev, json_t *j, const char *key, jj_trust_fn trust, void *ctx, int depth)
{
    if (depth > 256) jj__fail(ev, JJ_EINVAL, "input data nests more than 256 levels");
    switch (json_typeof(j)) {
    case JSON_NULL: return jj__none();
    case JSON_TRUE: return jj__bool(1);
    case JSON_FALSE: return jj__bool(0);
    case JSON_INTEGER: return jj__int((int64_t)json_integer_value(j));
    case JSON_REAL: return jj__float(json_real_value(j));
    case JSON_STRING: {
        const char *s = json_string_value(j);
        size_t n = json_string_length(j);
        int ok = trust && trust(ctx, key, s, n);
        return jj__strv(jj__str_new(&ev->arena, s, n, !ok));
    }
    case JSON_ARRAY: {
        jj_list *l = jj__list_new(ev, json_array_size(j));
        for (size_t i = 0; i < l->n; i++)
            l->v[i] = jj__from_json(ev, json_array_get(j, i), NULL, trust, ctx, depth + 1);
        return jj__listv(l, 0);
    }
    case JSON_OBJECT: {
        jj_dict *d = jj__dict_new(ev, json_object_size(j));
        const char *k;
        json_t *x;
        json_object_foreach(j, k, x) {
            /* JSON object keys are unique: append without the lookup */
            d->k[d->n] = jj__strv(jj__str_new(&ev->arena, k, strlen(k), 1));
            d->v[d->n++] = jj__from_json(ev, x, k, trust, ctx, depth + 1);
        }
        jj_val v = { .t = JV_DICT };
        v.u.d = d;
        return v;
    }
    }
    return jj__none();
}
