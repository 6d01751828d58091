/*
 * jinja_builtins.c — what templates call: jinja2's filters and tests, the
 * str/dict/list methods the sandbox allows, and the globals transformers
 * provides (range, namespace, dict, raise_exception, strftime_now).
 *
 * Each builtin declares its parameters as a string ("width=,first=") so that
 * positional and keyword arguments bind the way Python binds them;
 * jj__apply does the binding.  Results keep the untrusted ranges of their
 * inputs where they are pieces of them (strip, split, slicing, replace,
 * join) and are wholly untrusted where any input was (case mapping, JSON).
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <wctype.h>

#include "jinja_priv.h"

#define A(i) (a->v[i])
#define GIVEN(i) (a->given[i])

static jj_val dictv(jj_dict *d, int ns)
{
    jj_val v = { .t = (uint8_t)(ns ? JV_NS : JV_DICT) };
    v.u.d = d;
    return v;
}

static _Noreturn void type_error(jj_ev *ev, const char *what, jj_val v)
{
    if (v.t == JV_UNDEF) jj__fail(ev, JJ_ERUNTIME, "%s", v.u.s ? v.u.s->s : "undefined value");
    jj__fail(ev, JJ_ERUNTIME, "%s, not %s", what, jj__type_name(v));
}

static const jj_str *need_str(jj_ev *ev, jj_val v, const char *what)
{
    if (v.t != JV_STR) type_error(ev, what, v);
    return v.u.s;
}

static int64_t need_int(jj_ev *ev, jj_val v, const char *what)
{
    if (v.t == JV_INT) return v.u.i;
    if (v.t == JV_BOOL) return v.u.b;
    type_error(ev, what, v);
}

/* str() of v; strings are returned as they are. */
static jj_str *S(jj_ev *ev, jj_val v)
{
    return jj__to_str(ev, v);
}

/* ---- case mapping ------------------------------------------------------------ */

static locale_t ctype(jj_ev *ev)
{
    if (!ev->ctype_tried) {
        ev->ctype_tried = 1;
        ev->ctype = newlocale(LC_CTYPE_MASK, "C.UTF-8", (locale_t)0);
    }
    return ev->ctype;
}

static uint32_t map_cp(jj_ev *ev, uint32_t c, int upper)
{
    if (c < 0x80) return upper ? (c >= 'a' && c <= 'z' ? c - 32 : c) : (c >= 'A' && c <= 'Z' ? c + 32 : c);
    locale_t l = ctype(ev);
    if (!l) return c;
    return (uint32_t)(upper ? towupper_l((wint_t)c, l) : towlower_l((wint_t)c, l));
}

static int is_alpha_cp(jj_ev *ev, uint32_t c)
{
    if (c < 0x80) return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
    locale_t l = ctype(ev);
    return l ? iswalpha_l((wint_t)c, l) != 0 : 0;
}

/* mode: 'u' upper, 'l' lower, 't' str.title(), 'c' capitalize, 'j' jinja's title filter */
static jj_val recase(jj_ev *ev, const jj_str *s, int mode)
{
    jj_sb b = { 0 };
    int prev_cased = 0, first = 1, word_start = 1;
    for (size_t i = 0; i < s->len;) {
        uint32_t c;
        size_t l = jj__utf8_dec(s->s + i, s->len - i, &c);
        uint32_t o = c;
        switch (mode) {
        case 'u': o = map_cp(ev, c, 1); break;
        case 'l': o = map_cp(ev, c, 0); break;
        case 'c': o = map_cp(ev, c, first); break;
        case 't': { /* str.title(): upper after an uncased character, lower after a cased one */
            int alpha = is_alpha_cp(ev, c);
            o = map_cp(ev, c, !prev_cased);
            prev_cased = alpha;
            break;
        }
        case 'j': { /* jinja: split on runs of [-\s({\[<], capitalise every piece */
            int sep = c == '-' || c == '(' || c == '{' || c == '[' || c == '<' || jj__space_len(s->s + i, s->len - i);
            o = sep ? c : map_cp(ev, c, word_start);
            word_start = sep;
            break;
        }
        }
        first = 0;
        char e[4];
        jj__sb_put(ev, &b, e, jj__utf8_enc(o, e), 0);
        i += l;
    }
    if (jj__str_untrusted(s)) jj__sb_taint_all(&b, ev);
    return jj__strv(jj__sb_done(ev, &b));
}

/* ---- whitespace, strip, split ---------------------------------------------------- */

/* Is the character at s[i] one of chars' code points (chars NULL: whitespace)?
 * Returns its length, or 0. */
static size_t strip_hit(const jj_str *s, size_t i, const jj_str *chars)
{
    if (!chars) return jj__space_len(s->s + i, s->len - i);
    uint32_t c, d;
    size_t l = jj__utf8_dec(s->s + i, s->len - i, &c);
    for (size_t k = 0; k < chars->len;) {
        k += jj__utf8_dec(chars->s + k, chars->len - k, &d);
        if (c == d) return l;
    }
    return 0;
}

static size_t prev_char(const jj_str *s, size_t e)
{
    size_t j = e - 1;
    while (j > 0 && ((unsigned char)s->s[j] & 0xC0) == 0x80) j--;
    return j;
}

static jj_val strip(jj_ev *ev, const jj_str *s, const jj_str *chars, int left, int right)
{
    size_t a = 0, b = s->len, l;
    if (left)
        while (a < b && (l = strip_hit(s, a, chars))) a += l;
    if (right)
        while (b > a) {
            size_t j = prev_char(s, b);
            if (strip_hit(s, j, chars) != b - j) break;
            b = j;
        }
    return jj__strv(jj__str_sub(&ev->arena, s, a, b));
}

static void push_val(jj_ev *ev, jj_val **v, size_t *n, size_t *cap, jj_val x)
{
    if (*n == *cap) {
        size_t c = *cap ? *cap * 2 : 8;
        jj_val *p = jj__alloc(&ev->arena, c * sizeof *p);
        if (*n) memcpy(p, *v, *n * sizeof *p);
        *v = p;
        *cap = c;
    }
    (*v)[(*n)++] = x;
}

static jj_val list_of(jj_ev *ev, jj_val *v, size_t n)
{
    jj_list *l = jj__list_new(ev, n);
    if (n) memcpy(l->v, v, n * sizeof *v);
    return jj__listv(l, JL_LIST);
}

/* str.split / str.rsplit */
static jj_val split(jj_ev *ev, const jj_str *s, jj_val sepv, int64_t maxsplit, int from_right)
{
    jj_val *out = NULL;
    size_t n = 0, cap = 0;
    if (sepv.t == JV_NONE || sepv.t == JV_UNDEF) {
        /* runs of whitespace; no empty strings */
        size_t *st = jj__alloc(&ev->arena, (s->len + 1) * 2 * sizeof *st);
        size_t nw = 0, i = 0, l;
        while (i < s->len) {
            while (i < s->len && (l = jj__space_len(s->s + i, s->len - i))) i += l;
            if (i >= s->len) break;
            size_t a = i;
            while (i < s->len && !jj__space_len(s->s + i, s->len - i)) i++;
            st[2 * nw] = a;
            st[2 * nw + 1] = i;
            nw++;
        }
        if (maxsplit < 0 || (size_t)maxsplit >= nw) {
            for (size_t k = 0; k < nw; k++)
                push_val(ev, &out, &n, &cap, jj__strv(jj__str_sub(&ev->arena, s, st[2 * k], st[2 * k + 1])));
        } else if (!from_right) {
            /* maxsplit words, then the rest from the next word on, as it is */
            for (size_t k = 0; k < (size_t)maxsplit; k++)
                push_val(ev, &out, &n, &cap, jj__strv(jj__str_sub(&ev->arena, s, st[2 * k], st[2 * k + 1])));
            push_val(ev, &out, &n, &cap, jj__strv(jj__str_sub(&ev->arena, s, st[2 * maxsplit], s->len)));
        } else {
            size_t first = nw - (size_t)maxsplit;
            push_val(ev, &out, &n, &cap, jj__strv(jj__str_sub(&ev->arena, s, 0, st[2 * (first - 1) + 1])));
            for (size_t k = first; k < nw; k++)
                push_val(ev, &out, &n, &cap, jj__strv(jj__str_sub(&ev->arena, s, st[2 * k], st[2 * k + 1])));
        }
        return list_of(ev, out, n);
    }
    const jj_str *sep = need_str(ev, sepv, "must be str or None");
    if (sep->len == 0) jj__fail(ev, JJ_ERUNTIME, "empty separator");
    /* positions of non-overlapping matches, left to right or right to left */
    size_t *pos = NULL, np = 0, pcap = 0;
    if (!from_right) {
        for (size_t i = 0; i + sep->len <= s->len && (maxsplit < 0 || np < (size_t)maxsplit);) {
            if (memcmp(s->s + i, sep->s, sep->len) == 0) {
                if (np == pcap) {
                    pcap = pcap ? pcap * 2 : 8;
                    size_t *p = jj__alloc(&ev->arena, pcap * sizeof *p);
                    if (np) memcpy(p, pos, np * sizeof *p);
                    pos = p;
                }
                pos[np++] = i;
                i += sep->len;
            } else i++;
        }
    } else {
        size_t i = s->len;
        while (i >= sep->len && (maxsplit < 0 || np < (size_t)maxsplit)) {
            if (memcmp(s->s + i - sep->len, sep->s, sep->len) == 0) {
                if (np == pcap) {
                    pcap = pcap ? pcap * 2 : 8;
                    size_t *p = jj__alloc(&ev->arena, pcap * sizeof *p);
                    if (np) memcpy(p, pos, np * sizeof *p);
                    pos = p;
                }
                pos[np++] = i - sep->len;
                i -= sep->len;
            } else i--;
        }
        for (size_t k = 0; k < np / 2; k++) { size_t t = pos[k]; pos[k] = pos[np - 1 - k]; pos[np - 1 - k] = t; }
    }
    size_t a = 0;
    for (size_t k = 0; k < np; k++) {
        push_val(ev, &out, &n, &cap, jj__strv(jj__str_sub(&ev->arena, s, a, pos[k])));
        a = pos[k] + sep->len;
    }
    push_val(ev, &out, &n, &cap, jj__strv(jj__str_sub(&ev->arena, s, a, s->len)));
    return list_of(ev, out, n);
}

/* str.splitlines() boundaries: \n \r \r\n \v \f \x1c-\x1e \x85 \u2028 \u2029 */
static size_t line_break(const char *s, size_t n, size_t i)
{
    unsigned char c = (unsigned char)s[i];
    if (c == '\r') return i + 1 < n && s[i + 1] == '\n' ? 2 : 1;
    if (c == '\n' || c == 11 || c == 12 || (c >= 0x1C && c <= 0x1E)) return 1;
    if (c == 0xC2 && i + 1 < n && (unsigned char)s[i + 1] == 0x85) return 2;
    if (c == 0xE2 && i + 2 < n && (unsigned char)s[i + 1] == 0x80 &&
        ((unsigned char)s[i + 2] == 0xA8 || (unsigned char)s[i + 2] == 0xA9)) return 3;
    return 0;
}

static jj_val splitlines(jj_ev *ev, const jj_str *s, int keepends)
{
    jj_val *out = NULL;
    size_t n = 0, cap = 0, a = 0;
    for (size_t i = 0; i < s->len;) {
        size_t l = line_break(s->s, s->len, i);
        if (!l) { i++; continue; }
        push_val(ev, &out, &n, &cap, jj__strv(jj__str_sub(&ev->arena, s, a, keepends ? i + l : i)));
        i += l;
        a = i;
    }
    if (a < s->len) push_val(ev, &out, &n, &cap, jj__strv(jj__str_sub(&ev->arena, s, a, s->len)));
    return list_of(ev, out, n);
}

static jj_val replace(jj_ev *ev, const jj_str *s, const jj_str *old, const jj_str *new, int64_t count)
{
    jj_sb b = { 0 };
    size_t a = 0, done = 0;
    if (old->len == 0) { /* Python inserts new between characters */
        for (size_t i = 0; i <= s->len; ) {
            if (count >= 0 && done >= (size_t)count) break;
            jj__sb_str(ev, &b, jj__str_sub(&ev->arena, s, a, i));
            jj__sb_str(ev, &b, new);
            done++;
            a = i;
            if (i == s->len) { a = s->len; break; }
            i++;
            while (i < s->len && ((unsigned char)s->s[i] & 0xC0) == 0x80) i++;
            jj__sb_str(ev, &b, jj__str_sub(&ev->arena, s, a, i));
            a = i;
        }
    } else {
        for (size_t i = 0; i + old->len <= s->len;) {
            if ((count < 0 || done < (size_t)count) && memcmp(s->s + i, old->s, old->len) == 0) {
                jj__sb_str(ev, &b, jj__str_sub(&ev->arena, s, a, i));
                jj__sb_str(ev, &b, new);
                i += old->len;
                a = i;
                done++;
            } else i++;
        }
    }
    jj__sb_str(ev, &b, jj__str_sub(&ev->arena, s, a, s->len));
    return jj__strv(jj__sb_done(ev, &b));
}

static int has_prefix(const jj_str *s, const jj_str *p, int suffix)
{
    if (p->len > s->len) return 0;
    return memcmp(s->s + (suffix ? s->len - p->len : 0), p->s, p->len) == 0;
}

static jj_val starts_ends(jj_ev *ev, const jj_str *s, jj_val arg, int suffix)
{
    if (arg.t == JV_LIST && arg.kind == JL_TUPLE) {
        for (size_t i = 0; i < arg.u.l->n; i++)
            if (has_prefix(s, need_str(ev, arg.u.l->v[i], "tuple for startswith must only contain str"), suffix))
                return jj__bool(1);
        return jj__bool(0);
    }
    return jj__bool(has_prefix(s, need_str(ev, arg, suffix ? "endswith first arg must be str or a tuple of str"
                                                          : "startswith first arg must be str or a tuple of str"), suffix));
}

static int64_t find(const jj_str *s, const jj_str *sub, int last)
{
    if (sub->len > s->len) return -1;
    if (!last) {
        for (size_t i = 0; i + sub->len <= s->len; i++)
            if (memcmp(s->s + i, sub->s, sub->len) == 0) return (int64_t)i;
    } else {
        for (size_t i = s->len - sub->len + 1; i-- > 0;)
            if (memcmp(s->s + i, sub->s, sub->len) == 0) return (int64_t)i;
    }
    return -1;
}

static int64_t byte_to_cp(const jj_str *s, int64_t off)
{
    if (off < 0) return off;
    int64_t k = 0;
    for (int64_t i = 0; i < off; i++) k += ((unsigned char)s->s[i] & 0xC0) != 0x80;
    return k;
}

/* ---- attribute paths (map, selectattr, sort, groupby-like) ------------------------------------ */

/* jinja's make_attrgetter: "a.b.0" looked up part by part with getitem. */
static jj_val attr_path(jj_ev *ev, jj_val v, const jj_str *path, jj_val dflt)
{
    size_t a = 0;
    while (a <= path->len) {
        size_t e = a;
        while (e < path->len && path->s[e] != '.') e++;
        jj_val key;
        int digits = e > a;
        for (size_t i = a; i < e; i++) digits &= path->s[i] >= '0' && path->s[i] <= '9';
        if (digits && e - a < 18) key = jj__int(strtoll(path->s + a, NULL, 10));
        else key = jj__strv(jj__str_new(&ev->arena, path->s + a, e - a, 0));
        if (v.t == JV_UNDEF) return v;
        v = jj__getitem(ev, v, key);
        a = e + 1;
    }
    if (v.t == JV_UNDEF && dflt.t != JV_UNDEF) return dflt;
    return v;
}

/* ---- sorting ---------------------------------------------------------------------------------- */

typedef struct sort_ctx {
    jj_ev *ev;
    int case_sensitive;
    int reverse;
} sort_ctx;

static jj_val fold(jj_ev *ev, jj_val v, int case_sensitive)
{
    if (case_sensitive || v.t != JV_STR) return v;
    return recase(ev, v.u.s, 'l');
}

static void merge_sort(sort_ctx *c, jj_val *keys, jj_val *vals, size_t n, jj_val *tk, jj_val *tv)
{
    if (n < 2) return;
    size_t m = n / 2;
    merge_sort(c, keys, vals, m, tk, tv);
    merge_sort(c, keys + m, vals + m, n - m, tk, tv);
    size_t i = 0, j = m, k = 0;
    while (i < m && j < n) {
        jj__step(c->ev);
        int cmp = jj__compare(c->ev, keys[j], keys[i]);
        if (c->reverse ? cmp > 0 : cmp < 0) { tk[k] = keys[j]; tv[k++] = vals[j++]; }
        else { tk[k] = keys[i]; tv[k++] = vals[i++]; }
    }
    while (i < m) { tk[k] = keys[i]; tv[k++] = vals[i++]; }
    while (j < n) { tk[k] = keys[j]; tv[k++] = vals[j++]; }
    memcpy(keys, tk, n * sizeof *keys);
    memcpy(vals, tv, n * sizeof *vals);
}

/* Sorts items by key(item) (stable; reverse keeps equal items in order, as Python does). */
static jj_list *sort_by(jj_ev *ev, jj_list *items, jj_val *keys, int reverse)
{
    size_t n = items->n;
    jj_list *out = jj__list_new(ev, n);
    if (!n) return out;
    memcpy(out->v, items->v, n * sizeof(jj_val));
    jj_val *tk = jj__alloc(&ev->arena, n * sizeof *tk), *tv = jj__alloc(&ev->arena, n * sizeof *tv);
    sort_ctx c = { ev, 1, reverse };
    merge_sort(&c, keys, out->v, n, tk, tv);
    return out;
}

/* ---- filters ---------------------------------------------------------------------------------- */

static jj_val f_abs(jj_ev *ev, jj_val v, jj_bound *a)
{
    (void)a;
    if (v.t == JV_INT) return jj__int(v.u.i < 0 ? -v.u.i : v.u.i);
    if (v.t == JV_BOOL) return jj__int(v.u.b);
    if (v.t == JV_FLOAT) return jj__float(fabs(v.u.f));
    type_error(ev, "bad operand type for abs()", v);
}

static jj_val f_attr(jj_ev *ev, jj_val v, jj_bound *a)
{
    return jj__getattr(ev, v, S(ev, A(0))->s);
}

static jj_val f_capitalize(jj_ev *ev, jj_val v, jj_bound *a)
{
    (void)a;
    return recase(ev, S(ev, v), 'c');
}

static jj_val f_center(jj_ev *ev, jj_val v, jj_bound *a)
{
    const jj_str *s = S(ev, v);
    int64_t w = GIVEN(0) ? need_int(ev, A(0), "width must be an integer") : 80;
    if (w <= (int64_t)s->ncp) return jj__strv((jj_str *)s);
    if (w > (int64_t)ev->lim.max_output) jj__fail(ev, JJ_ELIMIT, "center width too large");
    size_t pad = (size_t)w - s->ncp, left = pad / 2 + (pad & (size_t)w & 1);
    jj_sb b = { 0 };
    for (size_t i = 0; i < left; i++) jj__sb_put(ev, &b, " ", 1, 0);
    jj__sb_str(ev, &b, s);
    for (size_t i = left; i < pad; i++) jj__sb_put(ev, &b, " ", 1, 0);
    return jj__strv(jj__sb_done(ev, &b));
}

static jj_val f_length(jj_ev *ev, jj_val v, jj_bound *a)
{
    (void)a;
    switch (v.t) {
    case JV_UNDEF: return jj__int(0);
    case JV_STR: return jj__int((int64_t)v.u.s->ncp);
    case JV_LIST:
        if (v.kind == JL_GEN) break;
        return jj__int((int64_t)v.u.l->n);
    case JV_DICT: return jj__int((int64_t)v.u.d->n);
    default: break;
    }
    jj__fail(ev, JJ_ERUNTIME, "object of type '%s' has no len()", jj__type_name(v));
}

static jj_val f_default(jj_ev *ev, jj_val v, jj_bound *a)
{
    (void)ev;
    jj_val d = GIVEN(0) ? A(0) : jj__strv(jj__str_new(&ev->arena, "", 0, 0));
    if (v.t == JV_UNDEF || (GIVEN(1) && jj__truthy(A(1)) && !jj__truthy(v))) return d;
    return v;
}

static jj_val f_dictsort(jj_ev *ev, jj_val v, jj_bound *a)
{
    if (v.t != JV_DICT) type_error(ev, "dictsort needs a mapping", v);
    int cs = GIVEN(0) && jj__truthy(A(0));
    int by_value = 0;
    if (GIVEN(1)) {
        const jj_str *by = need_str(ev, A(1), "dictsort 'by' must be 'key' or 'value'");
        if (!strcmp(by->s, "value")) by_value = 1;
        else if (strcmp(by->s, "key")) jj__fail(ev, JJ_ERUNTIME, "You can only sort by either \"key\" or \"value\"");
    }
    jj_list *items = jj__list_new(ev, v.u.d->n);
    jj_val *keys = jj__alloc(&ev->arena, (v.u.d->n + 1) * sizeof *keys);
    for (size_t i = 0; i < v.u.d->n; i++) {
        jj_list *pair = jj__list_new(ev, 2);
        pair->v[0] = v.u.d->k[i];
        pair->v[1] = v.u.d->v[i];
        items->v[i] = jj__listv(pair, JL_TUPLE);
        keys[i] = fold(ev, by_value ? v.u.d->v[i] : v.u.d->k[i], cs);
    }
    return jj__listv(sort_by(ev, items, keys, GIVEN(2) && jj__truthy(A(2))), JL_LIST);
}

static jj_val markup(jj_str *s)
{
    jj_val v = jj__strv(s);
    v.kind = 1;
    return v;
}

static jj_val f_escape(jj_ev *ev, jj_val v, jj_bound *a)
{
    (void)a;
    if (v.t == JV_STR && v.kind) return v; /* already Markup */
    return markup(jj__escape(ev, S(ev, v)));
}

static jj_val f_first(jj_ev *ev, jj_val v, jj_bound *a)
{
    (void)a;
    jj_list *l = jj__iter(ev, v);
    return l->n ? l->v[0] : jj__undef(jj__str_fmt(&ev->arena, "No first item, sequence was empty."));
}

static jj_val f_last(jj_ev *ev, jj_val v, jj_bound *a)
{
    (void)a;
    if (v.t == JV_LIST && v.kind == JL_GEN) jj__fail(ev, JJ_ERUNTIME, "'generator' object is not reversible");
    jj_list *l = jj__iter(ev, v);
    return l->n ? l->v[l->n - 1] : jj__undef(jj__str_fmt(&ev->arena, "No last item, sequence was empty."));
}

/* Python's float(str): optional spaces, sign, digits/inf/nan, underscores between digits. */
static int parse_float(const jj_str *s, double *out)
{
    char buf[128];
    size_t a = 0, b = s->len, n = 0;
    while (a < b && jj__space_len(s->s + a, b - a)) a++;
    while (b > a && (s->s[b - 1] == ' ' || s->s[b - 1] == '\t' || s->s[b - 1] == '\n' || s->s[b - 1] == '\r')) b--;
    if (b == a || b - a >= sizeof buf) return 0;
    for (size_t i = a; i < b; i++) {
        char c = s->s[i];
        if (c == '_') {
            if (i == a || i + 1 == b || !(s->s[i - 1] >= '0' && s->s[i - 1] <= '9') ||
                !(s->s[i + 1] >= '0' && s->s[i + 1] <= '9')) return 0;
            continue;
        }
        if (!((c >= '0' && c <= '9') || c == '.' || c == 'e' || c == 'E' || c == '+' || c == '-' ||
              (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z'))) return 0;
        buf[n++] = c;
    }
    buf[n] = 0;
    if (!strncmp(buf, "0x", 2) || !strncmp(buf, "0X", 2) || strchr(buf, 'x') || strchr(buf, 'X')) return 0;
    char *end;
    double d = strtod(buf, &end);
    if (*end) return 0;
    /* strtod takes "infinity"/"nan" spellings that Python takes too; refuse "nan(...)" forms by the char check */
    *out = d;
    return 1;
}

static jj_val f_float(jj_ev *ev, jj_val v, jj_bound *a)
{
    jj_val d = GIVEN(0) ? A(0) : jj__float(0.0);
    double x;
    switch (v.t) {
    case JV_FLOAT: return v;
    case JV_INT: return jj__float((double)v.u.i);
    case JV_BOOL: return jj__float(v.u.b);
    case JV_STR: return parse_float(v.u.s, &x) ? jj__float(x) : d;
    default: (void)ev; return d;
    }
}

static int parse_int(const jj_str *s, int base, int64_t *out)
{
    size_t a = 0, b = s->len;
    while (a < b && jj__space_len(s->s + a, b - a)) a++;
    while (b > a && (s->s[b - 1] == ' ' || s->s[b - 1] == '\t' || s->s[b - 1] == '\n' || s->s[b - 1] == '\r')) b--;
    if (a == b) return 0;
    int neg = 0;
    if (s->s[a] == '+' || s->s[a] == '-') neg = s->s[a++] == '-';
    if (base == 16 && b - a > 2 && s->s[a] == '0' && (s->s[a + 1] == 'x' || s->s[a + 1] == 'X')) a += 2;
    if (a == b) return 0;
    int64_t v = 0;
    for (size_t i = a; i < b; i++) {
        char c = s->s[i];
        if (c == '_' && i > a && i + 1 < b && s->s[i - 1] != '_') continue;
        int d = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'z' ? c - 'a' + 10 : c >= 'A' && c <= 'Z' ? c - 'A' + 10 : 99;
        if (d >= base) return 0;
        if (__builtin_mul_overflow(v, base, &v) || __builtin_add_overflow(v, d, &v)) return 0;
    }
    *out = neg ? -v : v;
    return 1;
}

static jj_val f_int(jj_ev *ev, jj_val v, jj_bound *a)
{
    jj_val d = GIVEN(0) ? A(0) : jj__int(0);
    int base = GIVEN(1) ? (int)need_int(ev, A(1), "int base must be an integer") : 10;
    if (base < 2 || base > 36) jj__fail(ev, JJ_ERUNTIME, "int() base must be >= 2 and <= 36");
    int64_t i;
    double x;
    switch (v.t) {
    case JV_INT: return v;
    case JV_BOOL: return jj__int(v.u.b);
    case JV_FLOAT:
        if (!isfinite(v.u.f) || fabs(v.u.f) >= 9.2e18) return d;
        return jj__int((int64_t)v.u.f);
    case JV_STR:
        if (parse_int(v.u.s, base, &i)) return jj__int(i);
        if (parse_float(v.u.s, &x) && isfinite(x) && fabs(x) < 9.2e18) return jj__int((int64_t)x);
        return d;
    default: return d;
    }
}

static jj_val f_items(jj_ev *ev, jj_val v, jj_bound *a)
{
    (void)a;
    if (v.t == JV_UNDEF) return jj__listv(jj__list_new(ev, 0), JL_GEN);
    if (v.t != JV_DICT) type_error(ev, "Can only get item pairs from a mapping", v);
    jj_list *l = jj__list_new(ev, v.u.d->n);
    for (size_t i = 0; i < l->n; i++) {
        jj_list *p = jj__list_new(ev, 2);
        p->v[0] = v.u.d->k[i];
        p->v[1] = v.u.d->v[i];
        l->v[i] = jj__listv(p, JL_TUPLE);
    }
    return jj__listv(l, JL_GEN);
}

static jj_val f_indent(jj_ev *ev, jj_val v, jj_bound *a)
{
    const jj_str *s = S(ev, v);
    jj_str *ind;
    if (GIVEN(0) && A(0).t == JV_STR) ind = A(0).u.s;
    else {
        int64_t w = GIVEN(0) ? need_int(ev, A(0), "indent width must be an integer or a string") : 4;
        if (w < 0) w = 0;
        if (w > 4096) jj__fail(ev, JJ_ERUNTIME, "indent width too large");
        char *sp = jj__alloc(&ev->arena, (size_t)w + 1);
        memset(sp, ' ', (size_t)w);
        ind = jj__str_new(&ev->arena, sp, (size_t)w, 0);
    }
    int first = GIVEN(1) && jj__truthy(A(1)), blank = GIVEN(2) && jj__truthy(A(2));
    /* jinja: s += "\n"; lines = s.splitlines(); indent all but the first (and blank lines unless blank) */
    jj_sb tmp = { 0 };
    jj__sb_str(ev, &tmp, s);
    jj__sb_put(ev, &tmp, "\n", 1, 0);
    jj_list *lines = splitlines(ev, jj__sb_done(ev, &tmp), 0).u.l;
    jj_sb b = { 0 };
    if (first) jj__sb_str(ev, &b, ind);
    for (size_t i = 0; i < lines->n; i++) {
        const jj_str *ln = lines->v[i].u.s;
        if (i) {
            jj__sb_put(ev, &b, "\n", 1, 0);
            if (blank || ln->len) jj__sb_str(ev, &b, ind);
        }
        jj__sb_str(ev, &b, ln);
    }
    return jj__strv(jj__sb_done(ev, &b));
}

static jj_val f_join(jj_ev *ev, jj_val v, jj_bound *a)
{
    jj_list *l = jj__iter(ev, v);
    const jj_str *sep = GIVEN(0) ? S(ev, A(0)) : NULL;
    jj_sb b = { 0 };
    for (size_t i = 0; i < l->n; i++) {
        jj__step(ev);
        if (i && sep) jj__sb_str(ev, &b, sep);
        jj_val x = l->v[i];
        if (GIVEN(1) && A(1).t != JV_NONE) x = attr_path(ev, x, S(ev, A(1)), jj__undef(NULL));
        jj__str_of(ev, &b, x);
    }
    return jj__strv(jj__sb_done(ev, &b));
}

static jj_val f_list(jj_ev *ev, jj_val v, jj_bound *a)
{
    (void)a;
    jj_list *l = jj__iter(ev, v);
    return list_of(ev, l->v, l->n);
}

static jj_val f_lower(jj_ev *ev, jj_val v, jj_bound *a) { (void)a; return recase(ev, S(ev, v), 'l'); }
static jj_val f_upper(jj_ev *ev, jj_val v, jj_bound *a) { (void)a; return recase(ev, S(ev, v), 'u'); }
static jj_val f_title(jj_ev *ev, jj_val v, jj_bound *a) { (void)a; return recase(ev, S(ev, v), 'j'); }

static jj_val f_map(jj_ev *ev, jj_val v, jj_bound *a)
{
    if (!jj__truthy(v)) return jj__listv(jj__list_new(ev, 0), JL_GEN); /* jinja: `if value:` */
    jj_list *l = jj__iter(ev, v), *out = jj__list_new(ev, l->n);
    const jj_str *attr = NULL;
    jj_val dflt = jj__undef(NULL);
    for (size_t i = 0; i < a->nkw; i++) {
        if (!strcmp(a->kwn[i], "attribute")) attr = S(ev, a->kw[i]);
        else if (!strcmp(a->kwn[i], "default")) dflt = a->kw[i];
    }
    if (attr) {
        for (size_t i = 0; i < l->n; i++) out->v[i] = attr_path(ev, l->v[i], attr, dflt);
        return jj__listv(out, JL_GEN);
    }
    if (!a->nrest) jj__fail(ev, JJ_ERUNTIME, "map requires a filter argument");
    const jj_builtin *f = jj__filter_find(need_str(ev, a->rest[0], "map's filter name must be a string")->s);
    if (!f) jj__fail(ev, JJ_ERUNTIME, "No filter named '%s'.", a->rest[0].u.s->s);
    for (size_t i = 0; i < l->n; i++)
        out->v[i] = jj__apply(ev, f, l->v[i], a->rest + 1, a->nrest - 1, a->kwn, a->kw, a->nkw);
    return jj__listv(out, JL_GEN);
}

static jj_val minmax(jj_ev *ev, jj_val v, jj_bound *a, int want_max)
{
    jj_list *l = jj__iter(ev, v);
    if (!l->n) return jj__undef(jj__str_fmt(&ev->arena, "No aggregated item, sequence was empty."));
    int cs = GIVEN(0) && jj__truthy(A(0));
    size_t best = 0;
    jj_val bk = jj__undef(NULL);
    for (size_t i = 0; i < l->n; i++) {
        jj_val x = GIVEN(1) && A(1).t != JV_NONE ? attr_path(ev, l->v[i], S(ev, A(1)), jj__undef(NULL)) : l->v[i];
        x = fold(ev, x, cs);
        if (i == 0 || (want_max ? jj__compare(ev, x, bk) > 0 : jj__compare(ev, x, bk) < 0)) { best = i; bk = x; }
    }
    return l->v[best];
}

static jj_val f_max(jj_ev *ev, jj_val v, jj_bound *a) { return minmax(ev, v, a, 1); }
static jj_val f_min(jj_ev *ev, jj_val v, jj_bound *a) { return minmax(ev, v, a, 0); }

/* select / reject / selectattr / rejectattr */
static jj_val select_common(jj_ev *ev, jj_val v, jj_bound *a, int by_attr, int keep)
{
    if (!jj__truthy(v)) return jj__listv(jj__list_new(ev, 0), JL_GEN); /* jinja: `if value:` */
    jj_list *l = jj__iter(ev, v), *out = jj__list_new(ev, l->n);
    out->n = 0;
    size_t k = 0;
    const jj_str *attr = NULL;
    if (by_attr) {
        if (!a->nrest) jj__fail(ev, JJ_ERUNTIME, "selectattr/rejectattr need an attribute name");
        attr = S(ev, a->rest[k++]);
    }
    const char *test = NULL;
    if (k < a->nrest) test = need_str(ev, a->rest[k++], "a test name must be a string")->s;
    for (size_t i = 0; i < l->n; i++) {
        jj__step(ev);
        jj_val x = attr ? attr_path(ev, l->v[i], attr, jj__undef(NULL)) : l->v[i];
        int r = test ? jj__run_test(ev, test, x, a->rest + k, a->nrest - k) : jj__truthy(x);
        if (r == keep) out->v[out->n++] = l->v[i];
    }
    return jj__listv(out, JL_GEN);
}

static jj_val f_select(jj_ev *ev, jj_val v, jj_bound *a) { return select_common(ev, v, a, 0, 1); }
static jj_val f_reject(jj_ev *ev, jj_val v, jj_bound *a) { return select_common(ev, v, a, 0, 0); }
static jj_val f_selectattr(jj_ev *ev, jj_val v, jj_bound *a) { return select_common(ev, v, a, 1, 1); }
static jj_val f_rejectattr(jj_ev *ev, jj_val v, jj_bound *a) { return select_common(ev, v, a, 1, 0); }

static jj_val f_replace(jj_ev *ev, jj_val v, jj_bound *a)
{
    int64_t count = GIVEN(2) && A(2).t != JV_NONE ? need_int(ev, A(2), "replace count must be an integer") : -1;
    return replace(ev, S(ev, v), S(ev, A(0)), S(ev, A(1)), count);
}

static jj_val f_reverse(jj_ev *ev, jj_val v, jj_bound *a)
{
    (void)a;
    if (v.t == JV_STR) {
        jj_list *chars = jj__iter(ev, v);
        jj_sb b = { 0 };
        for (size_t i = chars->n; i-- > 0;) jj__sb_str(ev, &b, chars->v[i].u.s);
        return jj__strv(jj__sb_done(ev, &b));
    }
    jj_list *l = jj__iter(ev, v), *out = jj__list_new(ev, l->n);
    for (size_t i = 0; i < l->n; i++) out->v[i] = l->v[l->n - 1 - i];
    return jj__listv(out, v.t == JV_LIST && v.kind == JL_GEN ? JL_LIST : JL_GEN);
}

static jj_val f_round(jj_ev *ev, jj_val v, jj_bound *a)
{
    int64_t p = GIVEN(0) ? need_int(ev, A(0), "round precision must be an integer") : 0;
    const char *method = GIVEN(1) ? need_str(ev, A(1), "round method must be a string")->s : "common";
    if (v.t != JV_INT && v.t != JV_FLOAT && v.t != JV_BOOL) type_error(ev, "round needs a number", v);
    double x = v.t == JV_FLOAT ? v.u.f : (double)(v.t == JV_INT ? v.u.i : v.u.b), m = pow(10.0, (double)p), r;
    if (!strcmp(method, "common")) r = nearbyint(x * m) / m; /* Python's round: ties to even */
    else if (!strcmp(method, "ceil")) r = ceil(x * m) / m;
    else if (!strcmp(method, "floor")) r = floor(x * m) / m;
    else jj__fail(ev, JJ_ERUNTIME, "method must be common, ceil or floor");
    return jj__float(r);
}

static jj_val f_safe(jj_ev *ev, jj_val v, jj_bound *a) { (void)a; return markup(S(ev, v)); }
static jj_val f_string(jj_ev *ev, jj_val v, jj_bound *a) { (void)a; return jj__strv(S(ev, v)); }

static jj_val f_sort(jj_ev *ev, jj_val v, jj_bound *a)
{
    jj_list *l = jj__iter(ev, v);
    int cs = GIVEN(1) && jj__truthy(A(1));
    jj_val *keys = jj__alloc(&ev->arena, (l->n + 1) * sizeof *keys);
    for (size_t i = 0; i < l->n; i++) {
        jj_val x = GIVEN(2) && A(2).t != JV_NONE ? attr_path(ev, l->v[i], S(ev, A(2)), jj__undef(NULL)) : l->v[i];
        keys[i] = fold(ev, x, cs);
    }
    return jj__listv(sort_by(ev, l, keys, GIVEN(0) && jj__truthy(A(0))), JL_LIST);
}

static jj_val f_striptags(jj_ev *ev, jj_val v, jj_bound *a)
{
    (void)a;
    const jj_str *s = S(ev, v);
    jj_sb b = { 0 };
    int un = jj__str_untrusted(s), space = 0, any = 0;
    for (size_t i = 0; i < s->len;) {
        if (s->s[i] == '<') {
            const char *e = i + 3 < s->len && !memcmp(s->s + i, "<!--", 4) ? strstr(s->s + i, "-->") : strchr(s->s + i, '>');
            if (e) {
                i = (size_t)(e - s->s) + (e[0] == '-' ? 3 : 1);
                continue;
            }
        }
        size_t l = jj__space_len(s->s + i, s->len - i);
        if (l) { space = 1; i += l; continue; }
        if (space && any) jj__sb_put(ev, &b, " ", 1, un);
        space = 0;
        any = 1;
        static const struct { const char *e, *c; } ent[] = { { "&amp;", "&" }, { "&lt;", "<" }, { "&gt;", ">" },
                                                            { "&#34;", "\"" }, { "&#39;", "'" }, { "&quot;", "\"" } };
        size_t k;
        for (k = 0; k < sizeof ent / sizeof *ent; k++)
            if (!strncmp(s->s + i, ent[k].e, strlen(ent[k].e))) break;
        if (k < sizeof ent / sizeof *ent) {
            jj__sb_put(ev, &b, ent[k].c, 1, un);
            i += strlen(ent[k].e);
        } else {
            jj__sb_put(ev, &b, s->s + i, 1, un);
            i++;
        }
    }
    return jj__strv(jj__sb_done(ev, &b));
}

static jj_val f_sum(jj_ev *ev, jj_val v, jj_bound *a)
{
    jj_list *l = jj__iter(ev, v);
    jj_val acc = GIVEN(1) ? A(1) : jj__int(0);
    for (size_t i = 0; i < l->n; i++) {
        jj_val x = GIVEN(0) && A(0).t != JV_NONE ? attr_path(ev, l->v[i], S(ev, A(0)), jj__undef(NULL)) : l->v[i];
        if ((acc.t == JV_INT || acc.t == JV_BOOL) && (x.t == JV_INT || x.t == JV_BOOL)) {
            int64_t r;
            if (__builtin_add_overflow(need_int(ev, acc, ""), need_int(ev, x, ""), &r))
                jj__fail(ev, JJ_ERUNTIME, "integer overflow in sum");
            acc = jj__int(r);
        } else if ((acc.t == JV_INT || acc.t == JV_FLOAT || acc.t == JV_BOOL) &&
                   (x.t == JV_INT || x.t == JV_FLOAT || x.t == JV_BOOL)) {
            double p = acc.t == JV_FLOAT ? acc.u.f : (double)need_int(ev, acc, "");
            double q = x.t == JV_FLOAT ? x.u.f : (double)need_int(ev, x, "");
            acc = jj__float(p + q);
        } else {
            jj__fail(ev, JJ_ERUNTIME, "unsupported operand type(s) for +: '%s' and '%s'", jj__type_name(acc), jj__type_name(x));
        }
    }
    return acc;
}

/* transformers' tojson: json.dumps(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) */
static jj_val f_tojson(jj_ev *ev, jj_val v, jj_bound *a)
{
    int ascii = GIVEN(0) && jj__truthy(A(0));
    const char *indent = NULL, *isep = NULL, *ksep = NULL;
    if (GIVEN(1) && A(1).t != JV_NONE) {
        if (A(1).t == JV_STR) indent = A(1).u.s->s;
        else {
            int64_t w = need_int(ev, A(1), "tojson indent must be an integer or a string");
            if (w < 0) w = 0;
            if (w > 256) jj__fail(ev, JJ_ERUNTIME, "tojson indent too large");
            char *sp = jj__alloc(&ev->arena, (size_t)w + 1);
            memset(sp, ' ', (size_t)w);
            indent = sp;
        }
    }
    if (GIVEN(2) && A(2).t != JV_NONE) {
        if (A(2).t != JV_LIST || A(2).u.l->n != 2) jj__fail(ev, JJ_ERUNTIME, "tojson separators must be a pair of strings");
        isep = need_str(ev, A(2).u.l->v[0], "tojson separators must be strings")->s;
        ksep = need_str(ev, A(2).u.l->v[1], "tojson separators must be strings")->s;
    }
    return jj__strv(jj__tojson(ev, v, ascii, indent, isep, ksep, GIVEN(3) && jj__truthy(A(3))));
}

static jj_val f_trim(jj_ev *ev, jj_val v, jj_bound *a)
{
    const jj_str *chars = GIVEN(0) && A(0).t != JV_NONE ? S(ev, A(0)) : NULL;
    return strip(ev, S(ev, v), chars, 1, 1);
}

static jj_val f_unique(jj_ev *ev, jj_val v, jj_bound *a)
{
    jj_list *l = jj__iter(ev, v), *out = jj__list_new(ev, l->n);
    jj_val *seen = jj__alloc(&ev->arena, (l->n + 1) * sizeof *seen);
    size_t ns = 0;
    out->n = 0;
    int cs = GIVEN(0) && jj__truthy(A(0));
    for (size_t i = 0; i < l->n; i++) {
        jj_val x = GIVEN(1) && A(1).t != JV_NONE ? attr_path(ev, l->v[i], S(ev, A(1)), jj__undef(NULL)) : l->v[i];
        x = fold(ev, x, cs);
        size_t k;
        for (k = 0; k < ns; k++) {
            jj__step(ev);
            if (jj__equal(seen[k], x)) break;
        }
        if (k < ns) continue;
        seen[ns++] = x;
        out->v[out->n++] = l->v[i];
    }
    return jj__listv(out, JL_GEN);
}

static jj_val f_wordcount(jj_ev *ev, jj_val v, jj_bound *a)
{
    (void)a;
    const jj_str *s = S(ev, v);
    int64_t n = 0;
    int in = 0;
    for (size_t i = 0; i < s->len;) {
        uint32_t c;
        size_t l = jj__utf8_dec(s->s + i, s->len - i, &c);
        int w = c == '_' || (c >= '0' && c <= '9') || is_alpha_cp(ev, c);
        if (w && !in) n++;
        in = w;
        i += l;
    }
    return jj__int(n);
}

/* printf-style: "%s, %d" | format(a, b) and "..." % (a, b) */
static jj_val f_format(jj_ev *ev, jj_val v, jj_bound *a)
{
    const jj_str *f = need_str(ev, v, "format needs a string");
    jj_sb b = { 0 };
    size_t k = 0;
    for (size_t i = 0; i < f->len; i++) {
        if (f->s[i] != '%') {
            jj__sb_str(ev, &b, jj__str_sub(&ev->arena, f, i, i + 1));
            continue;
        }
        if (++i >= f->len) jj__fail(ev, JJ_ERUNTIME, "incomplete format");
        char c = f->s[i];
        if (c == '%') { jj__sb_put(ev, &b, "%", 1, 0); continue; }
        if (k >= a->nrest) jj__fail(ev, JJ_ERUNTIME, "not enough arguments for format string");
        jj_val x = a->rest[k++];
        char buf[64];
        switch (c) {
        case 's': jj__str_of(ev, &b, x); break;
        case 'r': jj__repr_of(ev, &b, x); break;
        case 'd': case 'i':
            if (x.t == JV_FLOAT) x = jj__int((int64_t)x.u.f);
            snprintf(buf, sizeof buf, "%lld", (long long)need_int(ev, x, "%d format: a real number is required"));
            jj__sb_puts(ev, &b, buf);
            break;
        default: jj__fail(ev, JJ_ERUNTIME, "format code '%%%c' is not supported", c);
        }
    }
    if (k < a->nrest) jj__fail(ev, JJ_ERUNTIME, "not all arguments converted during string formatting");
    return jj__strv(jj__sb_done(ev, &b));
}

/* ---- tests ----------------------------------------------------------------------------------------- */

static int is_numeric_t(jj_val v) { return v.t == JV_INT || v.t == JV_FLOAT || v.t == JV_BOOL; }

static jj_val t_defined(jj_ev *ev, jj_val v, jj_bound *a) { (void)ev; (void)a; return jj__bool(v.t != JV_UNDEF); }
static jj_val t_undefined(jj_ev *ev, jj_val v, jj_bound *a) { (void)ev; (void)a; return jj__bool(v.t == JV_UNDEF); }
static jj_val t_none(jj_ev *ev, jj_val v, jj_bound *a) { (void)ev; (void)a; return jj__bool(v.t == JV_NONE); }
static jj_val t_boolean(jj_ev *ev, jj_val v, jj_bound *a) { (void)ev; (void)a; return jj__bool(v.t == JV_BOOL); }
static jj_val t_true(jj_ev *ev, jj_val v, jj_bound *a) { (void)ev; (void)a; return jj__bool(v.t == JV_BOOL && v.u.b); }
static jj_val t_false(jj_ev *ev, jj_val v, jj_bound *a) { (void)ev; (void)a; return jj__bool(v.t == JV_BOOL && !v.u.b); }
static jj_val t_integer(jj_ev *ev, jj_val v, jj_bound *a) { (void)ev; (void)a; return jj__bool(v.t == JV_INT); }
static jj_val t_float(jj_ev *ev, jj_val v, jj_bound *a) { (void)ev; (void)a; return jj__bool(v.t == JV_FLOAT); }
static jj_val t_number(jj_ev *ev, jj_val v, jj_bound *a) { (void)ev; (void)a; return jj__bool(is_numeric_t(v)); }
static jj_val t_string(jj_ev *ev, jj_val v, jj_bound *a) { (void)ev; (void)a; return jj__bool(v.t == JV_STR); }
static jj_val t_mapping(jj_ev *ev, jj_val v, jj_bound *a) { (void)ev; (void)a; return jj__bool(v.t == JV_DICT); }
static jj_val t_iterable(jj_ev *ev, jj_val v, jj_bound *a)
{
    (void)ev; (void)a;
    return jj__bool(v.t == JV_STR || v.t == JV_LIST || v.t == JV_DICT || v.t == JV_UNDEF);
}
static jj_val t_sequence(jj_ev *ev, jj_val v, jj_bound *a)
{
    (void)ev; (void)a;
    return jj__bool(v.t == JV_STR || v.t == JV_DICT ||
                    (v.t == JV_LIST && (v.kind == JL_LIST || v.kind == JL_TUPLE || v.kind == JL_RANGE)));
}
static jj_val t_callable(jj_ev *ev, jj_val v, jj_bound *a) { (void)ev; (void)a; return jj__bool(v.t == JV_FUNC || v.t == JV_LOOP); }
static jj_val t_escaped(jj_ev *ev, jj_val v, jj_bound *a) { (void)ev; (void)a; (void)v; return jj__bool(0); }

static jj_val t_sameas(jj_ev *ev, jj_val v, jj_bound *a)
{
    (void)ev;
    jj_val o = A(0);
    if (v.t != o.t) return jj__bool(0);
    switch (v.t) {
    case JV_NONE: case JV_UNDEF: return jj__bool(1);
    case JV_BOOL: return jj__bool(v.u.b == o.u.b);
    case JV_INT: return jj__bool(v.u.i == o.u.i);
    case JV_STR: return jj__bool(v.u.s == o.u.s);
    case JV_LIST: return jj__bool(v.u.l == o.u.l);
    case JV_DICT: case JV_NS: return jj__bool(v.u.d == o.u.d);
    default: return jj__bool(0);
    }
}

static jj_val t_in(jj_ev *ev, jj_val v, jj_bound *a)
{
    jj_val seq = A(0);
    if (seq.t == JV_STR) {
        const jj_str *x = need_str(ev, v, "'in <string>' requires string as left operand");
        for (size_t i = 0; i + x->len <= seq.u.s->len; i++)
            if (!memcmp(seq.u.s->s + i, x->s, x->len)) return jj__bool(1);
        return jj__bool(0);
    }
    if (seq.t == JV_DICT || seq.t == JV_NS) return jj__bool(jj__dict_find(seq.u.d, v) != NULL);
    jj_list *l = jj__iter(ev, seq);
    for (size_t i = 0; i < l->n; i++)
        if (jj__equal(v, l->v[i])) return jj__bool(1);
    return jj__bool(0);
}

static jj_val t_eq(jj_ev *ev, jj_val v, jj_bound *a) { (void)ev; return jj__bool(jj__equal(v, A(0))); }
static jj_val t_ne(jj_ev *ev, jj_val v, jj_bound *a) { (void)ev; return jj__bool(!jj__equal(v, A(0))); }
static jj_val t_lt(jj_ev *ev, jj_val v, jj_bound *a) { return jj__bool(jj__compare(ev, v, A(0)) < 0); }
static jj_val t_le(jj_ev *ev, jj_val v, jj_bound *a) { return jj__bool(jj__compare(ev, v, A(0)) <= 0); }
static jj_val t_gt(jj_ev *ev, jj_val v, jj_bound *a) { return jj__bool(jj__compare(ev, v, A(0)) > 0); }
static jj_val t_ge(jj_ev *ev, jj_val v, jj_bound *a) { return jj__bool(jj__compare(ev, v, A(0)) >= 0); }

static jj_val t_odd(jj_ev *ev, jj_val v, jj_bound *a) { (void)a; return jj__bool(need_int(ev, v, "odd needs an integer") % 2 != 0); }
static jj_val t_even(jj_ev *ev, jj_val v, jj_bound *a) { (void)a; return jj__bool(need_int(ev, v, "even needs an integer") % 2 == 0); }
static jj_val t_divisibleby(jj_ev *ev, jj_val v, jj_bound *a)
{
    int64_t d = need_int(ev, A(0), "divisibleby needs an integer");
    if (!d) jj__fail(ev, JJ_ERUNTIME, "integer division or modulo by zero");
    return jj__bool(need_int(ev, v, "divisibleby needs an integer") % d == 0);
}

static jj_val t_lower(jj_ev *ev, jj_val v, jj_bound *a)
{
    (void)a;
    const jj_str *s = S(ev, v);
    int cased = 0;
    for (size_t i = 0; i < s->len; i++) {
        if (s->s[i] >= 'A' && s->s[i] <= 'Z') return jj__bool(0);
        cased |= s->s[i] >= 'a' && s->s[i] <= 'z';
    }
    return jj__bool(cased);
}

static jj_val t_upper(jj_ev *ev, jj_val v, jj_bound *a)
{
    (void)a;
    const jj_str *s = S(ev, v);
    int cased = 0;
    for (size_t i = 0; i < s->len; i++) {
        if (s->s[i] >= 'a' && s->s[i] <= 'z') return jj__bool(0);
        cased |= s->s[i] >= 'A' && s->s[i] <= 'Z';
    }
    return jj__bool(cased);
}

static jj_val t_filter(jj_ev *ev, jj_val v, jj_bound *a) { (void)ev; (void)a; return jj__bool(v.t == JV_STR && jj__filter_find(v.u.s->s)); }
static jj_val t_test(jj_ev *ev, jj_val v, jj_bound *a) { (void)ev; (void)a; return jj__bool(v.t == JV_STR && jj__test_find(v.u.s->s)); }

/* ---- str, dict and list methods ---------------------------------------------------------------------- */

#define SELF_S (self.u.s)

static jj_val m_startswith(jj_ev *ev, jj_val self, jj_bound *a) { return starts_ends(ev, SELF_S, A(0), 0); }
static jj_val m_endswith(jj_ev *ev, jj_val self, jj_bound *a) { return starts_ends(ev, SELF_S, A(0), 1); }

static jj_val m_split(jj_ev *ev, jj_val self, jj_bound *a)
{
    int64_t max = GIVEN(1) ? need_int(ev, A(1), "maxsplit must be an integer") : -1;
    return split(ev, SELF_S, GIVEN(0) ? A(0) : jj__none(), max, 0);
}

static jj_val m_rsplit(jj_ev *ev, jj_val self, jj_bound *a)
{
    int64_t max = GIVEN(1) ? need_int(ev, A(1), "maxsplit must be an integer") : -1;
    return split(ev, SELF_S, GIVEN(0) ? A(0) : jj__none(), max, 1);
}

static const jj_str *chars_arg(jj_ev *ev, jj_bound *a)
{
    return GIVEN(0) && A(0).t != JV_NONE ? need_str(ev, A(0), "strip arg must be None or str") : NULL;
}

static jj_val m_strip(jj_ev *ev, jj_val self, jj_bound *a) { return strip(ev, SELF_S, chars_arg(ev, a), 1, 1); }
static jj_val m_lstrip(jj_ev *ev, jj_val self, jj_bound *a) { return strip(ev, SELF_S, chars_arg(ev, a), 1, 0); }
static jj_val m_rstrip(jj_ev *ev, jj_val self, jj_bound *a) { return strip(ev, SELF_S, chars_arg(ev, a), 0, 1); }

static jj_val m_replace(jj_ev *ev, jj_val self, jj_bound *a)
{
    int64_t count = GIVEN(2) ? need_int(ev, A(2), "replace count must be an integer") : -1;
    return replace(ev, SELF_S, need_str(ev, A(0), "replace() argument 1 must be str"),
                   need_str(ev, A(1), "replace() argument 2 must be str"), count);
}

static jj_val m_upper(jj_ev *ev, jj_val self, jj_bound *a) { (void)a; return recase(ev, SELF_S, 'u'); }
static jj_val m_lower(jj_ev *ev, jj_val self, jj_bound *a) { (void)a; return recase(ev, SELF_S, 'l'); }
static jj_val m_title(jj_ev *ev, jj_val self, jj_bound *a) { (void)a; return recase(ev, SELF_S, 't'); }
static jj_val m_capitalize(jj_ev *ev, jj_val self, jj_bound *a) { (void)a; return recase(ev, SELF_S, 'c'); }

static jj_val m_find(jj_ev *ev, jj_val self, jj_bound *a)
{
    return jj__int(byte_to_cp(SELF_S, find(SELF_S, need_str(ev, A(0), "must be str"), 0)));
}

static jj_val m_rfind(jj_ev *ev, jj_val self, jj_bound *a)
{
    return jj__int(byte_to_cp(SELF_S, find(SELF_S, need_str(ev, A(0), "must be str"), 1)));
}

static jj_val m_count(jj_ev *ev, jj_val self, jj_bound *a)
{
    if (self.t == JV_LIST) {
        int64_t n = 0;
        for (size_t i = 0; i < self.u.l->n; i++) n += jj__equal(self.u.l->v[i], A(0));
        return jj__int(n);
    }
    const jj_str *sub = need_str(ev, A(0), "must be str");
    if (!sub->len) return jj__int((int64_t)SELF_S->ncp + 1);
    int64_t n = 0;
    for (size_t i = 0; i + sub->len <= SELF_S->len;)
        if (!memcmp(SELF_S->s + i, sub->s, sub->len)) { n++; i += sub->len; }
        else i++;
    return jj__int(n);
}

static jj_val m_index(jj_ev *ev, jj_val self, jj_bound *a)
{
    if (self.t == JV_LIST) {
        for (size_t i = 0; i < self.u.l->n; i++)
            if (jj__equal(self.u.l->v[i], A(0))) return jj__int((int64_t)i);
        jj__fail(ev, JJ_ERUNTIME, "list.index(x): x not in list");
    }
    int64_t r = find(SELF_S, need_str(ev, A(0), "must be str"), 0);
    if (r < 0) jj__fail(ev, JJ_ERUNTIME, "substring not found");
    return jj__int(byte_to_cp(SELF_S, r));
}

static jj_val m_splitlines(jj_ev *ev, jj_val self, jj_bound *a)
{
    return splitlines(ev, SELF_S, GIVEN(0) && jj__truthy(A(0)));
}

static jj_val m_join(jj_ev *ev, jj_val self, jj_bound *a)
{
    jj_list *l = jj__iter(ev, A(0));
    jj_sb b = { 0 };
    for (size_t i = 0; i < l->n; i++) {
        if (i) jj__sb_str(ev, &b, SELF_S);
        jj__sb_str(ev, &b, need_str(ev, l->v[i], "sequence item: expected str instance"));
    }
    return jj__strv(jj__sb_done(ev, &b));
}

static jj_val m_removeprefix(jj_ev *ev, jj_val self, jj_bound *a)
{
    const jj_str *p = need_str(ev, A(0), "removeprefix() argument must be str");
    if (!has_prefix(SELF_S, p, 0)) return self;
    return jj__strv(jj__str_sub(&ev->arena, SELF_S, p->len, SELF_S->len));
}

static jj_val m_removesuffix(jj_ev *ev, jj_val self, jj_bound *a)
{
    const jj_str *p = need_str(ev, A(0), "removesuffix() argument must be str");
    if (!p->len || !has_prefix(SELF_S, p, 1)) return self;
    return jj__strv(jj__str_sub(&ev->arena, SELF_S, 0, SELF_S->len - p->len));
}

static jj_val str_class(jj_ev *ev, jj_val self, int cls)
{
    const jj_str *s = SELF_S;
    if (!s->len) return jj__bool(0);
    for (size_t i = 0; i < s->len;) {
        uint32_t c;
        size_t l = jj__utf8_dec(s->s + i, s->len - i, &c);
        int ok = cls == 'd' ? (c >= '0' && c <= '9')
               : cls == 'a' ? is_alpha_cp(ev, c)
               : cls == 'n' ? (c >= '0' && c <= '9') || is_alpha_cp(ev, c)
               : jj__space_len(s->s + i, s->len - i) > 0;
        if (!ok) return jj__bool(0);
        i += l;
    }
    return jj__bool(1);
}

static jj_val m_isdigit(jj_ev *ev, jj_val self, jj_bound *a) { (void)a; return str_class(ev, self, 'd'); }
static jj_val m_isalpha(jj_ev *ev, jj_val self, jj_bound *a) { (void)a; return str_class(ev, self, 'a'); }
static jj_val m_isalnum(jj_ev *ev, jj_val self, jj_bound *a) { (void)a; return str_class(ev, self, 'n'); }
static jj_val m_isspace(jj_ev *ev, jj_val self, jj_bound *a) { (void)a; return str_class(ev, self, 's'); }
static jj_val m_islower(jj_ev *ev, jj_val self, jj_bound *a) { return t_lower(ev, self, a); }
static jj_val m_isupper(jj_ev *ev, jj_val self, jj_bound *a) { return t_upper(ev, self, a); }

/* str.format: {} {0} {name} {{ }} and !r/!s conversions; no format specs. */
static jj_val m_format(jj_ev *ev, jj_val self, jj_bound *a)
{
    const jj_str *f = SELF_S;
    jj_sb b = { 0 };
    size_t auto_i = 0;
    for (size_t i = 0; i < f->len; i++) {
        char c = f->s[i];
        if (c == '}' && i + 1 < f->len && f->s[i + 1] == '}') { jj__sb_put(ev, &b, "}", 1, 0); i++; continue; }
        if (c != '{') { jj__sb_str(ev, &b, jj__str_sub(&ev->arena, f, i, i + 1)); continue; }
        if (i + 1 < f->len && f->s[i + 1] == '{') { jj__sb_put(ev, &b, "{", 1, 0); i++; continue; }
        const char *end = memchr(f->s + i, '}', f->len - i);
        if (!end) jj__fail(ev, JJ_ERUNTIME, "Single '{' encountered in format string");
        size_t a0 = i + 1, e = (size_t)(end - f->s), fe = e;
        int conv = 0;
        const char *bang = memchr(f->s + a0, '!', e - a0);
        if (memchr(f->s + a0, ':', e - a0)) jj__fail(ev, JJ_ERUNTIME, "format specs in str.format are not supported");
        if (bang) { fe = (size_t)(bang - f->s); conv = bang[1]; }
        jj_val x;
        if (fe == a0) {
            if (auto_i >= a->nrest) jj__fail(ev, JJ_ERUNTIME, "Replacement index %zu out of range for positional args tuple", auto_i);
            x = a->rest[auto_i++];
        } else if (f->s[a0] >= '0' && f->s[a0] <= '9') {
            size_t k = (size_t)strtoul(f->s + a0, NULL, 10);
            if (k >= a->nrest) jj__fail(ev, JJ_ERUNTIME, "Replacement index %zu out of range for positional args tuple", k);
            x = a->rest[k];
        } else {
            size_t k;
            for (k = 0; k < a->nkw; k++)
                if (strlen(a->kwn[k]) == fe - a0 && !memcmp(a->kwn[k], f->s + a0, fe - a0)) break;
            if (k == a->nkw) jj__fail(ev, JJ_ERUNTIME, "KeyError in str.format: '%.*s'", (int)(fe - a0), f->s + a0);
            x = a->kw[k];
        }
        if (conv == 'r') jj__repr_of(ev, &b, x);
        else jj__str_of(ev, &b, x);
        i = e;
    }
    return jj__strv(jj__sb_done(ev, &b));
}

static jj_val m_get(jj_ev *ev, jj_val self, jj_bound *a)
{
    (void)ev;
    jj_val *v = jj__dict_find(self.u.d, A(0));
    return v ? *v : GIVEN(1) ? A(1) : jj__none();
}

static jj_val view(jj_val list, int kind)
{
    list.kind = (uint8_t)kind;
    return list;
}

static jj_val m_items(jj_ev *ev, jj_val self, jj_bound *a) { return view(f_items(ev, self, a), JL_ITEMS); }
static jj_val m_keys(jj_ev *ev, jj_val self, jj_bound *a) { (void)a; return view(list_of(ev, self.u.d->k, self.u.d->n), JL_KEYS); }
static jj_val m_values(jj_ev *ev, jj_val self, jj_bound *a) { (void)a; return view(list_of(ev, self.u.d->v, self.u.d->n), JL_VALUES); }

/* ---- globals ---------------------------------------------------------------------------------------------- */

static jj_val g_range(jj_ev *ev, jj_val self, jj_bound *a)
{
    (void)self;
    int64_t start = 0, stop, step = 1;
    if (GIVEN(1)) {
        start = need_int(ev, A(0), "range() arguments must be integers");
        stop = need_int(ev, A(1), "range() arguments must be integers");
    } else {
        stop = need_int(ev, A(0), "range() arguments must be integers");
    }
    if (GIVEN(2)) step = need_int(ev, A(2), "range() arguments must be integers");
    if (step == 0) jj__fail(ev, JJ_ERUNTIME, "range() arg 3 must not be zero");
    int64_t n = 0;
    if (step > 0 && stop > start) n = (stop - start - 1) / step + 1;
    if (step < 0 && start > stop) n = (start - stop - 1) / (-step) + 1;
    if (n > 100000)
        jj__fail(ev, JJ_ERUNTIME, "Range too big. The sandbox blocks ranges larger than MAX_RANGE (100000).");
    jj_list *l = jj__list_new(ev, (size_t)n);
    for (int64_t i = 0; i < n; i++) l->v[i] = jj__int(start + i * step);
    return jj__listv(l, JL_RANGE);
}

/* dict(mapping or pairs, **kw) and namespace(...): a fresh mapping. */
static jj_val make_mapping(jj_ev *ev, jj_bound *a, int ns)
{
    jj_dict *d = jj__dict_new(ev, 4);
    if (a->nrest > 1) jj__fail(ev, JJ_ERUNTIME, "%s expected at most 1 argument, got %zu", ns ? "namespace" : "dict", a->nrest);
    if (a->nrest == 1) {
        jj_val src = a->rest[0];
        if (src.t == JV_DICT || src.t == JV_NS) {
            for (size_t i = 0; i < src.u.d->n; i++) jj__dict_set(ev, d, src.u.d->k[i], src.u.d->v[i]);
        } else {
            jj_list *l = jj__iter(ev, src);
            for (size_t i = 0; i < l->n; i++) {
                jj_list *p = jj__iter(ev, l->v[i]);
                if (p->n != 2) jj__fail(ev, JJ_ERUNTIME, "dictionary update sequence element #%zu has length %zu; 2 is required", i, p->n);
                jj__dict_set(ev, d, p->v[0], p->v[1]);
            }
        }
    }
    for (size_t i = 0; i < a->nkw; i++) jj__dict_set(ev, d, jj__cstr(ev, a->kwn[i]), a->kw[i]);
    if (ns)
        for (size_t i = 0; i < d->n; i++)
            if (d->k[i].t == JV_STR && d->k[i].u.s->s[0] == '_')
                jj__fail(ev, JJ_ERUNTIME, "Chat templates cannot store underscore-prefixed attributes on a namespace, but got '%s'",
                         d->k[i].u.s->s);
    return dictv(d, ns);
}

static jj_val g_namespace(jj_ev *ev, jj_val self, jj_bound *a) { (void)self; return make_mapping(ev, a, 1); }
static jj_val g_dict(jj_ev *ev, jj_val self, jj_bound *a) { (void)self; return make_mapping(ev, a, 0); }

static jj_val g_raise(jj_ev *ev, jj_val self, jj_bound *a)
{
    (void)self;
    jj__fail(ev, JJ_ERAISE, "%s", S(ev, A(0))->s);
}

/* transformers: datetime.now().strftime(format) */
static jj_val g_strftime_now(jj_ev *ev, jj_val self, jj_bound *a)
{
    (void)self;
    const jj_str *f = need_str(ev, A(0), "strftime() argument 1 must be str");
    time_t t = (time_t)ev->now;
    struct tm tm;
    if (!localtime_r(&t, &tm)) jj__fail(ev, JJ_ERUNTIME, "strftime_now: the clock is out of range");
    char buf[512];
    size_t n = f->len ? strftime(buf, sizeof buf, f->s, &tm) : 0;
    if (f->len && n == 0) jj__fail(ev, JJ_ERUNTIME, "strftime_now: the formatted date is empty or too long");
    return jj__strv(jj__str_new(&ev->arena, buf, n, 0));
}

/* ---- tables ------------------------------------------------------------------------------------------------ */

static const jj_builtin FILTERS[] = {
    { "abs", "", f_abs },
    { "attr", "name", f_attr },
    { "capitalize", "", f_capitalize },
    { "center", "width=", f_center },
    { "count", "", f_length },
    { "d", "default_value=,boolean=", f_default },
    { "default", "default_value=,boolean=", f_default },
    { "dictsort", "case_sensitive=,by=,reverse=", f_dictsort },
    { "e", "", f_escape },
    { "escape", "", f_escape },
    { "first", "", f_first },
    { "float", "default=", f_float },
    { "format", "*,**", f_format },
    { "indent", "width=,first=,blank=", f_indent },
    { "int", "default=,base=", f_int },
    { "items", "", f_items },
    { "join", "d=,attribute=", f_join },
    { "last", "", f_last },
    { "length", "", f_length },
    { "list", "", f_list },
    { "lower", "", f_lower },
    { "map", "*,**", f_map },
    { "max", "case_sensitive=,attribute=", f_max },
    { "min", "case_sensitive=,attribute=", f_min },
    { "reject", "*", f_reject },
    { "rejectattr", "*", f_rejectattr },
    { "replace", "old,new,count=", f_replace },
    { "reverse", "", f_reverse },
    { "round", "precision=,method=", f_round },
    { "safe", "", f_safe },
    { "select", "*", f_select },
    { "selectattr", "*", f_selectattr },
    { "sort", "reverse=,case_sensitive=,attribute=", f_sort },
    { "string", "", f_string },
    { "striptags", "", f_striptags },
    { "sum", "attribute=,start=", f_sum },
    { "title", "", f_title },
    { "tojson", "ensure_ascii=,indent=,separators=,sort_keys=", f_tojson },
    { "trim", "chars=", f_trim },
    { "unique", "case_sensitive=,attribute=", f_unique },
    { "upper", "", f_upper },
    { "wordcount", "", f_wordcount },
};

static const jj_builtin TESTS[] = {
    { "boolean", "", t_boolean },
    { "callable", "", t_callable },
    { "defined", "", t_defined },
    { "divisibleby", "num", t_divisibleby },
    { "eq", "other", t_eq },
    { "equalto", "other", t_eq },
    { "==", "other", t_eq },
    { "escaped", "", t_escaped },
    { "even", "", t_even },
    { "false", "", t_false },
    { "filter", "", t_filter },
    { "float", "", t_float },
    { "ge", "other", t_ge },
    { ">=", "other", t_ge },
    { "gt", "other", t_gt },
    { "greaterthan", "other", t_gt },
    { ">", "other", t_gt },
    { "in", "seq", t_in },
    { "integer", "", t_integer },
    { "iterable", "", t_iterable },
    { "le", "other", t_le },
    { "<=", "other", t_le },
    { "lower", "", t_lower },
    { "lt", "other", t_lt },
    { "lessthan", "other", t_lt },
    { "<", "other", t_lt },
    { "mapping", "", t_mapping },
    { "ne", "other", t_ne },
    { "!=", "other", t_ne },
    { "none", "", t_none },
    { "number", "", t_number },
    { "odd", "", t_odd },
    { "sameas", "other", t_sameas },
    { "sequence", "", t_sequence },
    { "string", "", t_string },
    { "test", "", t_test },
    { "true", "", t_true },
    { "undefined", "", t_undefined },
    { "upper", "", t_upper },
};

static const jj_builtin STR_METHODS[] = {
    { "capitalize", "", m_capitalize },
    { "count", "x", m_count },
    { "endswith", "suffix", m_endswith },
    { "find", "sub", m_find },
    { "format", "*,**", m_format },
    { "index", "x", m_index },
    { "isalnum", "", m_isalnum },
    { "isalpha", "", m_isalpha },
    { "isdigit", "", m_isdigit },
    { "islower", "", m_islower },
    { "isnumeric", "", m_isdigit },
    { "isspace", "", m_isspace },
    { "isupper", "", m_isupper },
    { "join", "iterable", m_join },
    { "lower", "", m_lower },
    { "lstrip", "chars=", m_lstrip },
    { "removeprefix", "prefix", m_removeprefix },
    { "removesuffix", "suffix", m_removesuffix },
    { "replace", "old,new,count=", m_replace },
    { "rfind", "sub", m_rfind },
    { "rsplit", "sep=,maxsplit=", m_rsplit },
    { "rstrip", "chars=", m_rstrip },
    { "split", "sep=,maxsplit=", m_split },
    { "splitlines", "keepends=", m_splitlines },
    { "startswith", "prefix", m_startswith },
    { "strip", "chars=", m_strip },
    { "title", "", m_title },
    { "upper", "", m_upper },
};

static const jj_builtin DICT_METHODS[] = {
    { "get", "key,default=", m_get },
    { "items", "", m_items },
    { "keys", "", m_keys },
    { "values", "", m_values },
};

static const jj_builtin LIST_METHODS[] = {
    { "count", "x", m_count },
    { "index", "x", m_index },
};

static const jj_builtin GLOBALS[] = {
    { "dict", "*,**", g_dict },
    { "namespace", "*,**", g_namespace },
    { "raise_exception", "message", g_raise },
    { "range", "start,stop=,step=", g_range },
    { "strftime_now", "format", g_strftime_now },
};

#define FIND(table, name)                                                   \
    do {                                                                    \
        for (size_t i_ = 0; i_ < sizeof table / sizeof *table; i_++)        \
            if (!strcmp(table[i_].name, name)) return &table[i_];           \
        return NULL;                                                        \
    } while (0)

const jj_builtin *jj__filter_find(const char *name) { FIND(FILTERS, name); }
const jj_builtin *jj__test_find(const char *name) { FIND(TESTS, name); }
const jj_builtin *jj__global_find(const char *name) { FIND(GLOBALS, name); }

const jj_builtin *jj__method_find(jj_val self, const char *name)
{
    if (self.t == JV_STR) FIND(STR_METHODS, name);
    if (self.t == JV_DICT) FIND(DICT_METHODS, name);
    if (self.t == JV_LIST) FIND(LIST_METHODS, name);
    return NULL;
}

int jj__method_unsafe(jj_val self, const char *name)
{
    static const char *const list_m[] = { "append", "extend", "insert", "pop", "remove", "reverse", "sort", "clear", NULL };
    static const char *const dict_m[] = { "pop", "popitem", "setdefault", "update", "clear", NULL };
    const char *const *m = self.t == JV_LIST ? list_m : self.t == JV_DICT ? dict_m : NULL;
    for (; m && *m; m++)
        if (!strcmp(*m, name)) return 1;
    return 0;
}

/* ---- binding ------------------------------------------------------------------------------------------------ */

jj_val jj__apply(jj_ev *ev, const jj_builtin *b, jj_val self, jj_val *pos, size_t npos, const char **kwn, jj_val *kw,
                 size_t nkw)
{
    jj_bound a;
    memset(&a, 0, sizeof a);
    const char *names[8];
    size_t nlen[8];
    int optional[8], star = 0, dstar = 0;
    size_t np = 0;
    for (const char *p = b->params; *p;) {
        const char *e = strchr(p, ',');
        size_t l = e ? (size_t)(e - p) : strlen(p);
        if (l == 1 && *p == '*') star = 1;
        else if (l == 2 && p[0] == '*' && p[1] == '*') dstar = 1;
        else if (np < 8) {
            optional[np] = p[l - 1] == '=';
            names[np] = p;
            nlen[np] = optional[np] ? l - 1 : l;
            np++;
        }
        p += l + (e ? 1 : 0);
    }
    for (size_t i = 0; i < npos; i++) {
        if (i < np) {
            a.v[i] = pos[i];
            a.given[i] = 1;
        } else if (star) {
            a.rest = pos + i;
            a.nrest = npos - i;
            break;
        } else {
            jj__fail(ev, JJ_ERUNTIME, "%s() takes at most %zu argument%s (%zu given)", b->name, np, np == 1 ? "" : "s", npos);
        }
    }
    const char **xk = nkw ? jj__alloc(&ev->arena, nkw * sizeof *xk) : NULL;
    jj_val *xv = nkw ? jj__alloc(&ev->arena, nkw * sizeof *xv) : NULL;
    for (size_t i = 0; i < nkw; i++) {
        size_t k;
        for (k = 0; k < np; k++)
            if (strlen(kwn[i]) == nlen[k] && !memcmp(kwn[i], names[k], nlen[k])) break;
        if (k < np) {
            if (a.given[k]) jj__fail(ev, JJ_ERUNTIME, "%s() got multiple values for argument '%s'", b->name, kwn[i]);
            a.v[k] = kw[i];
            a.given[k] = 1;
        } else if (dstar) {
            xk[a.nkw] = kwn[i];
            xv[a.nkw++] = kw[i];
        } else {
            jj__fail(ev, JJ_ERUNTIME, "%s() got an unexpected keyword argument '%s'", b->name, kwn[i]);
        }
    }
    a.kwn = xk;
    a.kw = xv;
    for (size_t k = 0; k < np; k++)
        if (!optional[k] && !a.given[k])
            jj__fail(ev, JJ_ERUNTIME, "%s() missing required argument '%.*s'", b->name, (int)nlen[k], names[k]);
    jj__step(ev);
    return b->fn(ev, self, &a);
}

int jj__run_test(jj_ev *ev, const char *name, jj_val v, jj_val *args, size_t nargs)
{
    const jj_builtin *t = jj__test_find(name);
    if (!t) jj__fail(ev, JJ_ERUNTIME, "No test named '%s'.", name);
    return jj__truthy(jj__apply(ev, t, v, args, nargs, NULL, NULL, 0));
}
