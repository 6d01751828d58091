/*
 * jinja_filters.c — jinja2's filters as transformers' environment has them
 * (its own tojson included): each declares its parameters as a string
 * ("width=,first=") that jj__apply binds arguments to, Python-style.
 * map, select, reject, selectattr, rejectattr, unique and items give
 * generators, as jinja2's do (see JL_GEN).
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "jinja_priv.h"

#define A(i) (a->v[i])
#define GIVEN(i) (a->given[i])

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
    return jj__recase(ev, v.u.s, 'l');
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
    jj__type_error(ev, "bad operand type for abs()", v);
}

static jj_val f_attr(jj_ev *ev, jj_val v, jj_bound *a)
{
    return jj__getattr(ev, v, jj__to_str(ev, A(0))->s);
}

static jj_val f_capitalize(jj_ev *ev, jj_val v, jj_bound *a)
{
    (void)a;
    return jj__recase(ev, jj__to_str(ev, v), 'c');
}

static jj_val f_center(jj_ev *ev, jj_val v, jj_bound *a)
{
    const jj_str *s = jj__to_str(ev, v);
    int64_t w = GIVEN(0) ? jj__need_int(ev, A(0), "width must be an integer") : 80;
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
    if (v.t != JV_DICT) jj__type_error(ev, "dictsort needs a mapping", v);
    int cs = GIVEN(0) && jj__truthy(A(0));
    int by_value = 0;
    if (GIVEN(1)) {
        const jj_str *by = jj__need_str(ev, A(1), "dictsort 'by' must be 'key' or 'value'");
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
    return markup(jj__escape(ev, jj__to_str(ev, v)));
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
    int base = GIVEN(1) ? (int)jj__need_int(ev, A(1), "int base must be an integer") : 10;
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

jj_val jj__items(jj_ev *ev, jj_val v, jj_bound *a)
{
    (void)a;
    if (v.t == JV_UNDEF) return jj__listv(jj__list_new(ev, 0), JL_GEN);
    if (v.t != JV_DICT) jj__type_error(ev, "Can only get item pairs from a mapping", v);
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
    const jj_str *s = jj__to_str(ev, v);
    jj_str *ind;
    if (GIVEN(0) && A(0).t == JV_STR) ind = A(0).u.s;
    else {
        int64_t w = GIVEN(0) ? jj__need_int(ev, A(0), "indent width must be an integer or a string") : 4;
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
    jj_list *lines = jj__splitlines(ev, jj__sb_done(ev, &tmp), 0).u.l;
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
    const jj_str *sep = GIVEN(0) ? jj__to_str(ev, A(0)) : NULL;
    jj_sb b = { 0 };
    for (size_t i = 0; i < l->n; i++) {
        jj__step(ev);
        if (i && sep) jj__sb_str(ev, &b, sep);
        jj_val x = l->v[i];
        if (GIVEN(1) && A(1).t != JV_NONE) x = attr_path(ev, x, jj__to_str(ev, A(1)), jj__undef(NULL));
        jj__str_of(ev, &b, x);
    }
    return jj__strv(jj__sb_done(ev, &b));
}

static jj_val f_list(jj_ev *ev, jj_val v, jj_bound *a)
{
    (void)a;
    jj_list *l = jj__iter(ev, v);
    return jj__list_of(ev, l->v, l->n);
}

static jj_val f_lower(jj_ev *ev, jj_val v, jj_bound *a) { (void)a; return jj__recase(ev, jj__to_str(ev, v), 'l'); }
static jj_val f_upper(jj_ev *ev, jj_val v, jj_bound *a) { (void)a; return jj__recase(ev, jj__to_str(ev, v), 'u'); }
static jj_val f_title(jj_ev *ev, jj_val v, jj_bound *a) { (void)a; return jj__recase(ev, jj__to_str(ev, v), 'j'); }

static jj_val f_map(jj_ev *ev, jj_val v, jj_bound *a)
{
    if (!jj__truthy(v)) return jj__listv(jj__list_new(ev, 0), JL_GEN); /* jinja: `if value:` */
    jj_list *l = jj__iter(ev, v), *out = jj__list_new(ev, l->n);
    const jj_str *attr = NULL;
    jj_val dflt = jj__undef(NULL);
    for (size_t i = 0; i < a->nkw; i++) {
        if (!strcmp(a->kwn[i], "attribute")) attr = jj__to_str(ev, a->kw[i]);
        else if (!strcmp(a->kwn[i], "default")) dflt = a->kw[i];
    }
    if (attr) {
        for (size_t i = 0; i < l->n; i++) out->v[i] = attr_path(ev, l->v[i], attr, dflt);
        return jj__listv(out, JL_GEN);
    }
    if (!a->nrest) jj__fail(ev, JJ_ERUNTIME, "map requires a filter argument");
    const jj_builtin *f = jj__filter_find(jj__need_str(ev, a->rest[0], "map's filter name must be a string")->s);
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
        jj_val x = GIVEN(1) && A(1).t != JV_NONE ? attr_path(ev, l->v[i], jj__to_str(ev, A(1)), jj__undef(NULL)) : l->v[i];
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
        attr = jj__to_str(ev, a->rest[k++]);
    }
    const char *test = NULL;
    if (k < a->nrest) test = jj__need_str(ev, a->rest[k++], "a test name must be a string")->s;
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
    int64_t count = GIVEN(2) && A(2).t != JV_NONE ? jj__need_int(ev, A(2), "replace count must be an integer") : -1;
    return jj__replace(ev, jj__to_str(ev, v), jj__to_str(ev, A(0)), jj__to_str(ev, A(1)), count);
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
    int64_t p = GIVEN(0) ? jj__need_int(ev, A(0), "round precision must be an integer") : 0;
    const char *method = GIVEN(1) ? jj__need_str(ev, A(1), "round method must be a string")->s : "common";
    if (v.t != JV_INT && v.t != JV_FLOAT && v.t != JV_BOOL) jj__type_error(ev, "round needs a number", v);
    double x = v.t == JV_FLOAT ? v.u.f : (double)(v.t == JV_INT ? v.u.i : v.u.b), m = pow(10.0, (double)p), r;
    if (!strcmp(method, "common")) r = nearbyint(x * m) / m; /* Python's round: ties to even */
    else if (!strcmp(method, "ceil")) r = ceil(x * m) / m;
    else if (!strcmp(method, "floor")) r = floor(x * m) / m;
    else jj__fail(ev, JJ_ERUNTIME, "method must be common, ceil or floor");
    return jj__float(r);
}

static jj_val f_safe(jj_ev *ev, jj_val v, jj_bound *a) { (void)a; return markup(jj__to_str(ev, v)); }
static jj_val f_string(jj_ev *ev, jj_val v, jj_bound *a) { (void)a; return jj__strv(jj__to_str(ev, v)); }

static jj_val f_sort(jj_ev *ev, jj_val v, jj_bound *a)
{
    jj_list *l = jj__iter(ev, v);
    int cs = GIVEN(1) && jj__truthy(A(1));
    jj_val *keys = jj__alloc(&ev->arena, (l->n + 1) * sizeof *keys);
    for (size_t i = 0; i < l->n; i++) {
        jj_val x = GIVEN(2) && A(2).t != JV_NONE ? attr_path(ev, l->v[i], jj__to_str(ev, A(2)), jj__undef(NULL)) : l->v[i];
        keys[i] = fold(ev, x, cs);
    }
    return jj__listv(sort_by(ev, l, keys, GIVEN(0) && jj__truthy(A(0))), JL_LIST);
}

static jj_val f_striptags(jj_ev *ev, jj_val v, jj_bound *a)
{
    (void)a;
    const jj_str *s = jj__to_str(ev, v);
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
        jj_val x = GIVEN(0) && A(0).t != JV_NONE ? attr_path(ev, l->v[i], jj__to_str(ev, A(0)), jj__undef(NULL)) : l->v[i];
        if ((acc.t == JV_INT || acc.t == JV_BOOL) && (x.t == JV_INT || x.t == JV_BOOL)) {
            int64_t r;
            if (__builtin_add_overflow(jj__need_int(ev, acc, ""), jj__need_int(ev, x, ""), &r))
                jj__fail(ev, JJ_ERUNTIME, "integer overflow in sum");
            acc = jj__int(r);
        } else if ((acc.t == JV_INT || acc.t == JV_FLOAT || acc.t == JV_BOOL) &&
                   (x.t == JV_INT || x.t == JV_FLOAT || x.t == JV_BOOL)) {
            double p = acc.t == JV_FLOAT ? acc.u.f : (double)jj__need_int(ev, acc, "");
            double q = x.t == JV_FLOAT ? x.u.f : (double)jj__need_int(ev, x, "");
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
            int64_t w = jj__need_int(ev, A(1), "tojson indent must be an integer or a string");
            if (w < 0) w = 0;
            if (w > 256) jj__fail(ev, JJ_ERUNTIME, "tojson indent too large");
            char *sp = jj__alloc(&ev->arena, (size_t)w + 1);
            memset(sp, ' ', (size_t)w);
            indent = sp;
        }
    }
    if (GIVEN(2) && A(2).t != JV_NONE) {
        if (A(2).t != JV_LIST || A(2).u.l->n != 2) jj__fail(ev, JJ_ERUNTIME, "tojson separators must be a pair of strings");
        isep = jj__need_str(ev, A(2).u.l->v[0], "tojson separators must be strings")->s;
        ksep = jj__need_str(ev, A(2).u.l->v[1], "tojson separators must be strings")->s;
    }
    return jj__strv(jj__tojson(ev, v, ascii, indent, isep, ksep, GIVEN(3) && jj__truthy(A(3))));
}

static jj_val f_trim(jj_ev *ev, jj_val v, jj_bound *a)
{
    const jj_str *chars = GIVEN(0) && A(0).t != JV_NONE ? jj__to_str(ev, A(0)) : NULL;
    return jj__strip(ev, jj__to_str(ev, v), chars, 1, 1);
}

static jj_val f_unique(jj_ev *ev, jj_val v, jj_bound *a)
{
    jj_list *l = jj__iter(ev, v), *out = jj__list_new(ev, l->n);
    jj_val *seen = jj__alloc(&ev->arena, (l->n + 1) * sizeof *seen);
    size_t ns = 0;
    out->n = 0;
    int cs = GIVEN(0) && jj__truthy(A(0));
    for (size_t i = 0; i < l->n; i++) {
        jj_val x = GIVEN(1) && A(1).t != JV_NONE ? attr_path(ev, l->v[i], jj__to_str(ev, A(1)), jj__undef(NULL)) : l->v[i];
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
    const jj_str *s = jj__to_str(ev, v);
    int64_t n = 0;
    int in = 0;
    for (size_t i = 0; i < s->len;) {
        uint32_t c;
        size_t l = jj__utf8_dec(s->s + i, s->len - i, &c);
        int w = c == '_' || (c >= '0' && c <= '9') || jj__is_alpha_cp(ev, c);
        if (w && !in) n++;
        in = w;
        i += l;
    }
    return jj__int(n);
}

/* printf-style: "%s, %d" | format(a, b) and "..." % (a, b) */
static jj_val f_format(jj_ev *ev, jj_val v, jj_bound *a)
{
    const jj_str *f = jj__need_str(ev, v, "format needs a string");
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
            snprintf(buf, sizeof buf, "%lld", (long long)jj__need_int(ev, x, "%d format: a real number is required"));
            jj__sb_puts(ev, &b, buf);
            break;
        default: jj__fail(ev, JJ_ERUNTIME, "format code '%%%c' is not supported", c);
        }
    }
    if (k < a->nrest) jj__fail(ev, JJ_ERUNTIME, "not all arguments converted during string formatting");
    return jj__strv(jj__sb_done(ev, &b));
}

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
    { "items", "", jj__items },
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

const jj_builtin *jj__filter_find(const char *name)
{
    for (size_t i = 0; i < sizeof FILTERS / sizeof *FILTERS; i++)
        if (!strcmp(FILTERS[i].name, name)) return &FILTERS[i];
    return NULL;
}
