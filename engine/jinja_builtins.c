/*
 * jinja_builtins.c — jinja2's tests, the str/dict/list methods the
 * immutable sandbox allows, the globals transformers provides (range,
 * namespace, dict, raise_exception, strftime_now), and jj__apply, which
 * binds positional and keyword arguments to a builtin's declared parameters
 * the way Python binds them.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "jinja_priv.h"

#define A(i) (a->v[i])
#define GIVEN(i) (a->given[i])

static jj_val dictv(jj_dict *d, int ns)
{
    jj_val v = { .t = (uint8_t)(ns ? JV_NS : JV_DICT) };
    v.u.d = d;
    return v;
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
        const jj_str *x = jj__need_str(ev, v, "'in <string>' requires string as left operand");
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

static jj_val t_odd(jj_ev *ev, jj_val v, jj_bound *a) { (void)a; return jj__bool(jj__need_int(ev, v, "odd needs an integer") % 2 != 0); }
static jj_val t_even(jj_ev *ev, jj_val v, jj_bound *a) { (void)a; return jj__bool(jj__need_int(ev, v, "even needs an integer") % 2 == 0); }
static jj_val t_divisibleby(jj_ev *ev, jj_val v, jj_bound *a)
{
    int64_t d = jj__need_int(ev, A(0), "divisibleby needs an integer");
    if (!d) jj__fail(ev, JJ_ERUNTIME, "integer division or modulo by zero");
    return jj__bool(jj__need_int(ev, v, "divisibleby needs an integer") % d == 0);
}

static jj_val t_lower(jj_ev *ev, jj_val v, jj_bound *a)
{
    (void)a;
    const jj_str *s = jj__to_str(ev, v);
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
    const jj_str *s = jj__to_str(ev, v);
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

static jj_val m_startswith(jj_ev *ev, jj_val self, jj_bound *a) { return jj__starts_ends(ev, SELF_S, A(0), 0); }
static jj_val m_endswith(jj_ev *ev, jj_val self, jj_bound *a) { return jj__starts_ends(ev, SELF_S, A(0), 1); }

static jj_val m_split(jj_ev *ev, jj_val self, jj_bound *a)
{
    int64_t max = GIVEN(1) ? jj__need_int(ev, A(1), "maxsplit must be an integer") : -1;
    return jj__split(ev, SELF_S, GIVEN(0) ? A(0) : jj__none(), max, 0);
}

static jj_val m_rsplit(jj_ev *ev, jj_val self, jj_bound *a)
{
    int64_t max = GIVEN(1) ? jj__need_int(ev, A(1), "maxsplit must be an integer") : -1;
    return jj__split(ev, SELF_S, GIVEN(0) ? A(0) : jj__none(), max, 1);
}

static const jj_str *chars_arg(jj_ev *ev, jj_bound *a)
{
    return GIVEN(0) && A(0).t != JV_NONE ? jj__need_str(ev, A(0), "strip arg must be None or str") : NULL;
}

static jj_val m_strip(jj_ev *ev, jj_val self, jj_bound *a) { return jj__strip(ev, SELF_S, chars_arg(ev, a), 1, 1); }
static jj_val m_lstrip(jj_ev *ev, jj_val self, jj_bound *a) { return jj__strip(ev, SELF_S, chars_arg(ev, a), 1, 0); }
static jj_val m_rstrip(jj_ev *ev, jj_val self, jj_bound *a) { return jj__strip(ev, SELF_S, chars_arg(ev, a), 0, 1); }

static jj_val m_replace(jj_ev *ev, jj_val self, jj_bound *a)
{
    int64_t count = GIVEN(2) ? jj__need_int(ev, A(2), "replace count must be an integer") : -1;
    return jj__replace(ev, SELF_S, jj__need_str(ev, A(0), "replace() argument 1 must be str"),
                   jj__need_str(ev, A(1), "replace() argument 2 must be str"), count);
}

static jj_val m_upper(jj_ev *ev, jj_val self, jj_bound *a) { (void)a; return jj__recase(ev, SELF_S, 'u'); }
static jj_val m_lower(jj_ev *ev, jj_val self, jj_bound *a) { (void)a; return jj__recase(ev, SELF_S, 'l'); }
static jj_val m_title(jj_ev *ev, jj_val self, jj_bound *a) { (void)a; return jj__recase(ev, SELF_S, 't'); }
static jj_val m_capitalize(jj_ev *ev, jj_val self, jj_bound *a) { (void)a; return jj__recase(ev, SELF_S, 'c'); }

static jj_val m_find(jj_ev *ev, jj_val self, jj_bound *a)
{
    return jj__int(jj__byte_to_cp(SELF_S, jj__find(SELF_S, jj__need_str(ev, A(0), "must be str"), 0)));
}

static jj_val m_rfind(jj_ev *ev, jj_val self, jj_bound *a)
{
    return jj__int(jj__byte_to_cp(SELF_S, jj__find(SELF_S, jj__need_str(ev, A(0), "must be str"), 1)));
}

static jj_val m_count(jj_ev *ev, jj_val self, jj_bound *a)
{
    if (self.t == JV_LIST) {
        int64_t n = 0;
        for (size_t i = 0; i < self.u.l->n; i++) n += jj__equal(self.u.l->v[i], A(0));
        return jj__int(n);
    }
    const jj_str *sub = jj__need_str(ev, A(0), "must be str");
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
    int64_t r = jj__find(SELF_S, jj__need_str(ev, A(0), "must be str"), 0);
    if (r < 0) jj__fail(ev, JJ_ERUNTIME, "substring not found");
    return jj__int(jj__byte_to_cp(SELF_S, r));
}

static jj_val m_splitlines(jj_ev *ev, jj_val self, jj_bound *a)
{
    return jj__splitlines(ev, SELF_S, GIVEN(0) && jj__truthy(A(0)));
}

static jj_val m_join(jj_ev *ev, jj_val self, jj_bound *a)
{
    jj_list *l = jj__iter(ev, A(0));
    jj_sb b = { 0 };
    for (size_t i = 0; i < l->n; i++) {
        if (i) jj__sb_str(ev, &b, SELF_S);
        jj__sb_str(ev, &b, jj__need_str(ev, l->v[i], "sequence item: expected str instance"));
    }
    return jj__strv(jj__sb_done(ev, &b));
}

static jj_val m_removeprefix(jj_ev *ev, jj_val self, jj_bound *a)
{
    const jj_str *p = jj__need_str(ev, A(0), "removeprefix() argument must be str");
    if (!jj__has_prefix(SELF_S, p, 0)) return self;
    return jj__strv(jj__str_sub(&ev->arena, SELF_S, p->len, SELF_S->len));
}

static jj_val m_removesuffix(jj_ev *ev, jj_val self, jj_bound *a)
{
    const jj_str *p = jj__need_str(ev, A(0), "removesuffix() argument must be str");
    if (!p->len || !jj__has_prefix(SELF_S, p, 1)) return self;
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
               : cls == 'a' ? jj__is_alpha_cp(ev, c)
               : cls == 'n' ? (c >= '0' && c <= '9') || jj__is_alpha_cp(ev, c)
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

static jj_val m_items(jj_ev *ev, jj_val self, jj_bound *a) { return view(jj__items(ev, self, a), JL_ITEMS); }
static jj_val m_keys(jj_ev *ev, jj_val self, jj_bound *a) { (void)a; return view(jj__list_of(ev, self.u.d->k, self.u.d->n), JL_KEYS); }
static jj_val m_values(jj_ev *ev, jj_val self, jj_bound *a) { (void)a; return view(jj__list_of(ev, self.u.d->v, self.u.d->n), JL_VALUES); }

/* ---- globals ---------------------------------------------------------------------------------------------- */

static jj_val g_range(jj_ev *ev, jj_val self, jj_bound *a)
{
    (void)self;
    int64_t start = 0, stop, step = 1;
    if (GIVEN(1)) {
        start = jj__need_int(ev, A(0), "range() arguments must be integers");
        stop = jj__need_int(ev, A(1), "range() arguments must be integers");
    } else {
        stop = jj__need_int(ev, A(0), "range() arguments must be integers");
    }
    if (GIVEN(2)) step = jj__need_int(ev, A(2), "range() arguments must be integers");
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
    jj__fail(ev, JJ_ERAISE, "%s", jj__to_str(ev, A(0))->s);
}

/* transformers: datetime.now().strftime(format) */
static jj_val g_strftime_now(jj_ev *ev, jj_val self, jj_bound *a)
{
    (void)self;
    const jj_str *f = jj__need_str(ev, A(0), "strftime() argument 1 must be str");
    time_t t = (time_t)ev->now;
    struct tm tm;
    if (!localtime_r(&t, &tm)) jj__fail(ev, JJ_ERUNTIME, "strftime_now: the clock is out of range");
    char buf[512];
    size_t n = f->len ? strftime(buf, sizeof buf, f->s, &tm) : 0;
    if (f->len && n == 0) jj__fail(ev, JJ_ERUNTIME, "strftime_now: the formatted date is empty or too long");
    return jj__strv(jj__str_new(&ev->arena, buf, n, 0));
}

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
