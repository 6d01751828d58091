/*
 * jinja_eval.c — renders a parsed template: scopes, statements, expressions,
 * attribute and item lookup with the sandbox's rules, calls, and the entry
 * point jj_render.
 *
 * Semantics follow jinja2 3.1 as transformers configures it: an undefined
 * name or attribute is an Undefined value (empty when printed, false, empty
 * when iterated, an error when its attributes are read or it takes part in
 * arithmetic); a for loop's body gets a fresh scope on every iteration, so a
 * {% set %} inside it does not outlive the iteration (namespace() objects
 * carry state out); macros see the template's top-level variables; for-else
 * runs when the loop ran no iteration.
 *
 * Errors unwind with longjmp to jj_render: everything a render allocates is
 * in its arena, so nothing leaks on that path.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "jinja_priv.h"

struct jj_scope {
    jj_scope *parent;
    const char **names;
    jj_val *vals;
    size_t n, cap;
};

/* ---- variables given by the caller ------------------------------------------- */

typedef struct jj_var {
    char *name;
    json_t *json;        /* or */
    char *str;
    size_t len;
    int trusted;
    jj_trust_fn trust;
    void *trust_ctx;
} jj_var;

struct jj_vars {
    jj_var *v;
    size_t n, cap;
};

int jj_vars_create(jj_vars **out)
{
    *out = calloc(1, sizeof **out);
    return *out ? JJ_OK : JJ_ENOMEM;
}

void jj_vars_free(jj_vars *v)
{
    if (!v) return;
    for (size_t i = 0; i < v->n; i++) {
        free(v->v[i].name);
        json_decref(v->v[i].json);
        free(v->v[i].str);
    }
    free(v->v);
    free(v);
}

static jj_var *var_slot(jj_vars *v, const char *name)
{
    for (size_t i = 0; i < v->n; i++)
        if (strcmp(v->v[i].name, name) == 0) {
            json_decref(v->v[i].json);
            free(v->v[i].str);
            char *keep = v->v[i].name;
            memset(&v->v[i], 0, sizeof v->v[i]);
            v->v[i].name = keep;
            return &v->v[i];
        }
    if (v->n == v->cap) {
        size_t cap = v->cap ? v->cap * 2 : 8;
        jj_var *p = realloc(v->v, cap * sizeof *p);
        if (!p) return NULL;
        v->v = p;
        v->cap = cap;
    }
    jj_var *s = &v->v[v->n];
    memset(s, 0, sizeof *s);
    if (!(s->name = strdup(name))) return NULL;
    v->n++;
    return s;
}

int jj_vars_set_json(jj_vars *v, const char *name, json_t *value, jj_trust_fn trust, void *trust_ctx)
{
    if (!v || !name || !value) return JJ_EINVAL;
    jj_var *s = var_slot(v, name);
    if (!s) return JJ_ENOMEM;
    s->json = json_incref(value);
    s->trust = trust;
    s->trust_ctx = trust_ctx;
    return JJ_OK;
}

int jj_vars_set_string(jj_vars *v, const char *name, const char *str, size_t len, int trusted)
{
    if (!v || !name || (!str && len)) return JJ_EINVAL;
    jj_var *s = var_slot(v, name);
    if (!s) return JJ_ENOMEM;
    if (!(s->str = malloc(len + 1))) return JJ_ENOMEM;
    if (len) memcpy(s->str, str, len);
    s->str[len] = 0;
    s->len = len;
    s->trusted = trusted;
    return JJ_OK;
}

/* ---- failure and limits ---------------------------------------------------------- */

void jj__fail(jj_ev *ev, int status, const char *fmt, ...)
{
    if (ev->err && ev->errlen) {
        int n = 0;
        if (status == JJ_ERUNTIME || status == JJ_ELIMIT) n = snprintf(ev->err, ev->errlen, "line %d: ", ev->line);
        if (n < 0 || (size_t)n >= ev->errlen) n = 0;
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(ev->err + n, ev->errlen - (size_t)n, fmt, ap);
        va_end(ap);
        jj__utf8_trim_cut(ev->err);
    }
    ev->status = status;
    longjmp(ev->fail, 1);
}

static void arena_fail(void *ctx, int status)
{
    jj_ev *ev = ctx;
    if (status == JJ_ELIMIT) jj__fail(ev, JJ_ELIMIT, "the template needs more than %zu bytes of memory", ev->lim.max_memory);
    jj__fail(ev, JJ_ENOMEM, "out of memory while rendering the template");
}

void jj__step(jj_ev *ev)
{
    if (++ev->steps > ev->lim.max_steps)
        jj__fail(ev, JJ_ELIMIT, "the template ran more than %llu evaluation steps", (unsigned long long)ev->lim.max_steps);
}

static _Noreturn void fail_undef(jj_ev *ev, jj_val u)
{
    jj__fail(ev, JJ_ERUNTIME, "%s", u.u.s ? u.u.s->s : "undefined value");
}

/* ---- scopes ------------------------------------------------------------------------ */

static jj_scope *scope_new(jj_ev *ev, jj_scope *parent)
{
    jj_scope *s = jj__alloc(&ev->arena, sizeof *s);
    s->parent = parent;
    return s;
}

static void scope_set(jj_ev *ev, jj_scope *s, const char *name, jj_val v)
{
    for (size_t i = 0; i < s->n; i++)
        if (strcmp(s->names[i], name) == 0) {
            s->vals[i] = v;
            return;
        }
    if (s->n == s->cap) {
        size_t cap = s->cap ? s->cap * 2 : 4;
        const char **nn = jj__alloc(&ev->arena, cap * sizeof *nn);
        jj_val *vv = jj__alloc(&ev->arena, cap * sizeof *vv);
        if (s->n) {
            memcpy(nn, s->names, s->n * sizeof *nn);
            memcpy(vv, s->vals, s->n * sizeof *vv);
        }
        s->names = nn;
        s->vals = vv;
        s->cap = cap;
    }
    s->names[s->n] = name;
    s->vals[s->n] = v;
    s->n++;
}

static jj_val lookup(jj_ev *ev, jj_scope *s, const char *name)
{
    for (; s; s = s->parent)
        for (size_t i = 0; i < s->n; i++)
            if (strcmp(s->names[i], name) == 0) return s->vals[i];
    const jj_builtin *g = jj__global_find(name);
    if (g) {
        jj_func *f = jj__alloc(&ev->arena, sizeof *f);
        f->kind = FN_BUILTIN;
        f->b = g;
        jj_val v = { .t = JV_FUNC };
        v.u.fn = f;
        return v;
    }
    return jj__undef(jj__str_fmt(&ev->arena, "'%s' is undefined", name));
}

/* ---- output ---------------------------------------------------------------------------- */

static int exec_body(jj_ev *ev, const jj_nodes *body, jj_scope *s);

/* Runs body with its output captured into a new string. */
static jj_str *capture(jj_ev *ev, const jj_nodes *body, jj_scope *s)
{
    jj_sb b = { 0 }, *saved = ev->out;
    ev->out = &b;
    exec_body(ev, body, s);
    ev->out = saved;
    return jj__sb_done(ev, &b);
}

/* ---- attribute and item access ------------------------------------------------------------ */

static const char *type_repr(jj_val v)
{
    switch (v.t) {
    case JV_NONE: return "None";
    case JV_DICT: return "dict object";
    case JV_NS: return "jinja2.utils.Namespace object";
    case JV_STR: return "str object";
    case JV_LIST: return v.kind == JL_TUPLE ? "tuple object" : "list object";
    case JV_INT: return "int object";
    case JV_FLOAT: return "float object";
    case JV_BOOL: return "bool object";
    default: return "object";
    }
}

static jj_val no_attr(jj_ev *ev, jj_val obj, const char *name)
{
    return jj__undef(jj__str_fmt(&ev->arena, "'%s' has no attribute '%s'", type_repr(obj), name));
}

static jj_val func_val(jj_ev *ev, int kind, const jj_builtin *b, jj_val self)
{
    jj_func *f = jj__alloc(&ev->arena, sizeof *f);
    f->kind = kind;
    f->b = b;
    f->self = self;
    jj_val v = { .t = JV_FUNC };
    v.u.fn = f;
    return v;
}

static jj_val loop_attr(jj_ev *ev, jj_val obj, const char *name)
{
    jj_loop *l = obj.u.loop;
    size_t n = l->items->n, i = l->i;
    if (!strcmp(name, "index")) return jj__int((int64_t)i + 1);
    if (!strcmp(name, "index0")) return jj__int((int64_t)i);
    if (!strcmp(name, "revindex")) return jj__int((int64_t)(n - i));
    if (!strcmp(name, "revindex0")) return jj__int((int64_t)(n - i - 1));
    if (!strcmp(name, "first")) return jj__bool(i == 0);
    if (!strcmp(name, "last")) return jj__bool(i + 1 == n);
    if (!strcmp(name, "length")) return jj__int((int64_t)n);
    if (!strcmp(name, "depth")) return jj__int(l->depth);
    if (!strcmp(name, "depth0")) return jj__int(l->depth - 1);
    if (!strcmp(name, "previtem"))
        return i > 0 ? l->items->v[i - 1] : jj__undef(jj__str_fmt(&ev->arena, "there is no previous item"));
    if (!strcmp(name, "nextitem"))
        return i + 1 < n ? l->items->v[i + 1] : jj__undef(jj__str_fmt(&ev->arena, "there is no next item"));
    if (!strcmp(name, "cycle") || !strcmp(name, "changed")) {
        jj_func *f = jj__alloc(&ev->arena, sizeof *f);
        f->kind = name[1] == 'y' ? FN_LOOP_CYCLE : FN_LOOP_CHANGED;
        f->loop = l;
        jj_val v = { .t = JV_FUNC };
        v.u.fn = f;
        return v;
    }
    return no_attr(ev, obj, name);
}

jj_val jj__getattr(jj_ev *ev, jj_val obj, const char *name)
{
    switch (obj.t) {
    case JV_UNDEF: fail_undef(ev, obj);
    case JV_LOOP: return loop_attr(ev, obj, name);
    case JV_NS: {
        jj_val *v = jj__dict_get_cstr(obj.u.d, name);
        return v ? *v : no_attr(ev, obj, name);
    }
    case JV_DICT: {
        const jj_builtin *m = jj__method_find(obj, name);
        if (m) return func_val(ev, FN_BUILTIN, m, obj);
        if (jj__method_unsafe(obj, name)) break;
        ev->steps += obj.u.d->n / 32;
        jj_val *v = jj__dict_get_cstr(obj.u.d, name);
        return v ? *v : no_attr(ev, obj, name);
    }
    default: {
        const jj_builtin *m = jj__method_find(obj, name);
        if (m) return func_val(ev, FN_BUILTIN, m, obj);
        if (jj__method_unsafe(obj, name)) break;
        return no_attr(ev, obj, name);
    }
    }
    return jj__undef(jj__str_fmt(&ev->arena, "access to attribute '%s' of '%s' object is unsafe.", name, jj__type_name(obj)));
}

static int64_t as_index(jj_ev *ev, jj_val k, const char *what)
{
    if (k.t == JV_INT) return k.u.i;
    if (k.t == JV_BOOL) return k.u.b;
    jj__fail(ev, JJ_ERUNTIME, "%s indices must be integers, not %s", what, jj__type_name(k));
}

jj_val jj__getitem(jj_ev *ev, jj_val obj, jj_val key)
{
    switch (obj.t) {
    case JV_UNDEF: fail_undef(ev, obj);
    case JV_DICT: case JV_NS: {
        ev->steps += obj.u.d->n / 32;
        jj_val *v = jj__dict_find(obj.u.d, key);
        if (v) return *v;
        if (key.t == JV_STR) return jj__getattr(ev, obj, key.u.s->s);
        break;
    }
    case JV_LIST:
        if (obj.kind != JL_LIST && obj.kind != JL_TUPLE && obj.kind != JL_RANGE)
            jj__fail(ev, JJ_ERUNTIME, "'%s' object is not subscriptable", jj__type_name(obj));
        if (key.t == JV_INT || key.t == JV_BOOL) {
            int64_t i = as_index(ev, key, "list"), n = (int64_t)obj.u.l->n;
            if (i < 0) i += n;
            if (i >= 0 && i < n) return obj.u.l->v[i];
            return jj__undef(jj__str_fmt(&ev->arena, "%s has no element %lld", type_repr(obj), (long long)as_index(ev, key, "list")));
        }
        if (key.t == JV_STR) return jj__getattr(ev, obj, key.u.s->s);
        break;
    case JV_STR:
        if (key.t == JV_INT || key.t == JV_BOOL) {
            int64_t i = as_index(ev, key, "string"), n = (int64_t)obj.u.s->ncp;
            if (i < 0) i += n;
            if (i >= 0 && i < n) {
                size_t a = jj__str_cp_off(obj.u.s, (size_t)i), b = jj__str_cp_off(obj.u.s, (size_t)i + 1);
                return jj__strv(jj__str_sub(&ev->arena, obj.u.s, a, b));
            }
            return jj__undef(jj__str_fmt(&ev->arena, "str object has no element %lld", (long long)as_index(ev, key, "string")));
        }
        if (key.t == JV_STR) return jj__getattr(ev, obj, key.u.s->s);
        break;
    case JV_LOOP:
        if (key.t == JV_STR) return loop_attr(ev, obj, key.u.s->s);
        break;
    default: break;
    }
    jj_sb b = { 0 };
    jj__repr_of(ev, &b, key);
    return jj__undef(jj__str_fmt(&ev->arena, "'%s' has no attribute %s", type_repr(obj), b.p ? b.p : ""));
}

/* Python's slice index adjustment (PySlice_AdjustIndices) for one bound. */
static int64_t slice_bound(jj_val v, int64_t n, int64_t step, int is_start)
{
    if (v.t == JV_NONE) return is_start ? (step < 0 ? n - 1 : 0) : (step < 0 ? -1 : n);
    int64_t i = v.u.i;
    if (i < 0) {
        i += n;
        if (i < 0) i = step < 0 ? -1 : 0;
    } else if (i >= n) {
        i = step < 0 ? n - 1 : n;
    }
    return i;
}

static jj_val do_slice(jj_ev *ev, jj_val obj, jj_val av, jj_val bv, jj_val cv)
{
    jj_val *parts[3] = { &av, &bv, &cv };
    for (int i = 0; i < 3; i++) {
        if (parts[i]->t == JV_BOOL) *parts[i] = jj__int(parts[i]->u.b);
        if (parts[i]->t != JV_NONE && parts[i]->t != JV_INT)
            jj__fail(ev, JJ_ERUNTIME, "slice indices must be integers or None");
    }
    if (obj.t == JV_UNDEF) fail_undef(ev, obj);
    int64_t step = cv.t == JV_INT ? cv.u.i : 1;
    if (step == 0) jj__fail(ev, JJ_ERUNTIME, "slice step cannot be zero");
    if (step == INT64_MIN) step = -INT64_MAX;
    int64_t n;
    if (obj.t == JV_LIST && obj.kind != JL_LIST && obj.kind != JL_TUPLE && obj.kind != JL_RANGE)
        jj__fail(ev, JJ_ERUNTIME, "'%s' object is not subscriptable", jj__type_name(obj));
    if (obj.t == JV_LIST) n = (int64_t)obj.u.l->n;
    else if (obj.t == JV_STR) n = (int64_t)obj.u.s->ncp;
    else jj__fail(ev, JJ_ERUNTIME, "'%s' object is not subscriptable", jj__type_name(obj));
    int64_t start = slice_bound(av, n, step, 1), stop = slice_bound(bv, n, step, 0);
    /* indices to take */
    size_t cnt = 0;
    if (step > 0 && stop > start) cnt = (size_t)((stop - start - 1) / step + 1);
    if (step < 0 && start > stop) cnt = (size_t)((start - stop - 1) / (-step) + 1);
    if (obj.t == JV_LIST) {
        jj_list *l = jj__list_new(ev, cnt);
        for (size_t k = 0; k < cnt; k++) l->v[k] = obj.u.l->v[start + (int64_t)k * step];
        return jj__listv(l, obj.kind == JL_TUPLE ? JL_TUPLE : JL_LIST);
    }
    const jj_str *s = obj.u.s;
    if (step == 1) {
        size_t a = jj__str_cp_off(s, (size_t)start), b = jj__str_cp_off(s, (size_t)(start + (int64_t)cnt));
        return jj__strv(jj__str_sub(&ev->arena, s, a, b));
    }
    /* other steps: character by character (offsets of every code point first) */
    size_t *off = jj__alloc(&ev->arena, ((size_t)n + 1) * sizeof *off);
    for (size_t i = 0, k = 0; k <= (size_t)n; k++) {
        off[k] = i;
        if (i < s->len) {
            i++;
            while (i < s->len && ((unsigned char)s->s[i] & 0xC0) == 0x80) i++;
        }
    }
    jj_sb b = { 0 };
    for (size_t k = 0; k < cnt; k++) {
        int64_t i = start + (int64_t)k * step;
        jj__sb_str(ev, &b, jj__str_sub(&ev->arena, s, off[i], off[i + 1]));
    }
    return jj__strv(jj__sb_done(ev, &b));
}

jj_list *jj__iter(jj_ev *ev, jj_val v)
{
    switch (v.t) {
    case JV_LIST: return v.u.l;
    case JV_UNDEF: return jj__list_new(ev, 0);
    case JV_DICT: {
        jj_list *l = jj__list_new(ev, v.u.d->n);
        for (size_t i = 0; i < l->n; i++) l->v[i] = v.u.d->k[i];
        return l;
    }
    case JV_STR: {
        jj_list *l = jj__list_new(ev, v.u.s->ncp);
        size_t off = 0;
        for (size_t i = 0; i < l->n; i++) {
            size_t e = off + 1;
            while (e < v.u.s->len && ((unsigned char)v.u.s->s[e] & 0xC0) == 0x80) e++;
            l->v[i] = jj__strv(jj__str_sub(&ev->arena, v.u.s, off, e));
            off = e;
        }
        return l;
    }
    default:
        jj__fail(ev, JJ_ERUNTIME, "'%s' object is not iterable", jj__type_name(v));
    }
}

/* ---- operators ---------------------------------------------------------------------------- */

static int is_num(jj_val v) { return v.t == JV_INT || v.t == JV_FLOAT || v.t == JV_BOOL; }
static double fnum(jj_val v) { return v.t == JV_FLOAT ? v.u.f : v.t == JV_INT ? (double)v.u.i : (double)v.u.b; }
static int64_t inum(jj_val v) { return v.t == JV_INT ? v.u.i : v.u.b; }

static const char *op_sym(int op)
{
    static const char *s[] = { "+", "-", "*", "/", "//", "%", "**", "~" };
    return s[op];
}

static jj_val repeat(jj_ev *ev, jj_val seq, int64_t k)
{
    if (k < 0) k = 0;
    if (seq.t == JV_STR) {
        if (k && seq.u.s->len > ev->lim.max_output / (uint64_t)k)
            jj__fail(ev, JJ_ELIMIT, "a repeated string exceeds %zu bytes", ev->lim.max_output);
        jj_sb b = { 0 };
        for (int64_t i = 0; i < k; i++) jj__sb_str(ev, &b, seq.u.s);
        return jj__strv(jj__sb_done(ev, &b));
    }
    if (k && seq.u.l->n > (ev->lim.max_memory / sizeof(jj_val)) / (uint64_t)k)
        jj__fail(ev, JJ_ELIMIT, "a repeated list exceeds the memory limit");
    jj_list *l = jj__list_new(ev, seq.u.l->n * (size_t)k);
    for (int64_t i = 0; i < k; i++)
        if (seq.u.l->n) memcpy(l->v + (size_t)i * seq.u.l->n, seq.u.l->v, seq.u.l->n * sizeof(jj_val));
    return jj__listv(l, seq.kind);
}

static jj_val binop(jj_ev *ev, int op, jj_val a, jj_val b)
{
    if (op == OP_CONCAT) {
        jj_sb s = { 0 };
        jj__str_of(ev, &s, a);
        jj__str_of(ev, &s, b);
        return jj__strv(jj__sb_done(ev, &s));
    }
    if (a.t == JV_UNDEF) fail_undef(ev, a);
    if (b.t == JV_UNDEF) fail_undef(ev, b);
    if (is_num(a) && is_num(b)) {
        int ints = a.t != JV_FLOAT && b.t != JV_FLOAT;
        int64_t x = inum(a), y = inum(b), r;
        double fx = fnum(a), fy = fnum(b);
        switch (op) {
        case OP_ADD:
            if (!ints) return jj__float(fx + fy);
            if (__builtin_add_overflow(x, y, &r)) break;
            return jj__int(r);
        case OP_SUB:
            if (!ints) return jj__float(fx - fy);
            if (__builtin_sub_overflow(x, y, &r)) break;
            return jj__int(r);
        case OP_MUL:
            if (!ints) return jj__float(fx * fy);
            if (__builtin_mul_overflow(x, y, &r)) break;
            return jj__int(r);
        case OP_DIV:
            if (fy == 0) jj__fail(ev, JJ_ERUNTIME, "division by zero");
            return jj__float(fx / fy);
        case OP_FLOORDIV:
        case OP_MOD:
            if (ints) {
                if (y == 0) jj__fail(ev, JJ_ERUNTIME, "integer division or modulo by zero");
                if (x == INT64_MIN && y == -1) break;
                int64_t q = x / y, m = x % y;
                if (m != 0 && ((m < 0) != (y < 0))) { q--; m += y; }
                return jj__int(op == OP_MOD ? m : q);
            } else { /* Python's float_divmod */
                if (fy == 0) jj__fail(ev, JJ_ERUNTIME, "float division by zero");
                double m = fmod(fx, fy), d = (fx - m) / fy, fd;
                if (m != 0) {
                    if ((fy < 0) != (m < 0)) { m += fy; d -= 1.0; }
                } else {
                    m = copysign(0.0, fy);
                }
                if (d != 0) {
                    fd = floor(d);
                    if (d - fd > 0.5) fd += 1.0;
                } else {
                    fd = copysign(0.0, fx / fy);
                }
                return jj__float(op == OP_MOD ? m : fd);
            }
        case OP_POW:
            if (ints && y >= 0) {
                int64_t acc = 1, base = x;
                for (int64_t e = y; e > 0; e >>= 1) {
                    if (e & 1 && __builtin_mul_overflow(acc, base, &acc)) goto overflow;
                    if (e > 1 && __builtin_mul_overflow(base, base, &base)) goto overflow;
                }
                return jj__int(acc);
            }
            if (fx == 0 && fy < 0) jj__fail(ev, JJ_ERUNTIME, "0.0 cannot be raised to a negative power");
            return jj__float(pow(fx, fy));
        }
    overflow:
        jj__fail(ev, JJ_ERUNTIME, "integer overflow in '%s'", op_sym(op));
    }
    if (op == OP_ADD && a.t == JV_STR && b.t == JV_STR) {
        /* Markup + str escapes the str (markupsafe), whichever side it is on */
        int markup = a.kind || b.kind;
        jj_sb s = { 0 };
        jj__sb_str(ev, &s, markup && !a.kind ? jj__escape(ev, a.u.s) : a.u.s);
        jj__sb_str(ev, &s, markup && !b.kind ? jj__escape(ev, b.u.s) : b.u.s);
        jj_val r = jj__strv(jj__sb_done(ev, &s));
        r.kind = (uint8_t)markup;
        return r;
    }
    if (op == OP_ADD && a.t == JV_LIST && b.t == JV_LIST && a.kind == b.kind && a.kind <= JL_TUPLE) {
        jj_list *l = jj__list_new(ev, a.u.l->n + b.u.l->n);
        if (a.u.l->n) memcpy(l->v, a.u.l->v, a.u.l->n * sizeof(jj_val));
        if (b.u.l->n) memcpy(l->v + a.u.l->n, b.u.l->v, b.u.l->n * sizeof(jj_val));
        return jj__listv(l, a.kind);
    }
    if (op == OP_MUL && (a.t == JV_STR || (a.t == JV_LIST && a.kind <= JL_TUPLE)) && (b.t == JV_INT || b.t == JV_BOOL))
        return repeat(ev, a, inum(b));
    if (op == OP_MUL && (b.t == JV_STR || (b.t == JV_LIST && b.kind <= JL_TUPLE)) && (a.t == JV_INT || a.t == JV_BOOL))
        return repeat(ev, b, inum(a));
    if (op == OP_MOD && a.t == JV_STR) {
        const jj_builtin *f = jj__filter_find("format");
        jj_list *args = b.t == JV_LIST && b.kind == JL_TUPLE ? b.u.l : NULL;
        return jj__apply(ev, f, a, args ? args->v : &b, args ? args->n : 1, NULL, NULL, 0);
    }
    if (op == OP_ADD && a.t == JV_STR)
        jj__fail(ev, JJ_ERUNTIME, "can only concatenate str (not \"%s\") to str", jj__type_name(b));
    jj__fail(ev, JJ_ERUNTIME, "unsupported operand type(s) for %s: '%s' and '%s'", op_sym(op), jj__type_name(a),
             jj__type_name(b));
}

static int contains(jj_ev *ev, jj_val item, jj_val seq)
{
    switch (seq.t) {
    case JV_STR:
        if (item.t != JV_STR)
            jj__fail(ev, JJ_ERUNTIME, "'in <string>' requires string as left operand, not %s", jj__type_name(item));
        if (item.u.s->len == 0) return 1;
        if (item.u.s->len > seq.u.s->len) return 0;
        for (size_t i = 0; i + item.u.s->len <= seq.u.s->len; i++)
            if (memcmp(seq.u.s->s + i, item.u.s->s, item.u.s->len) == 0) return 1;
        return 0;
    case JV_LIST:
        for (size_t i = 0; i < seq.u.l->n; i++)
            if (jj__equal(item, seq.u.l->v[i])) return 1;
        return 0;
    case JV_DICT: case JV_NS:
        return jj__dict_find(seq.u.d, item) != NULL;
    case JV_UNDEF:
        return 0;
    default:
        jj__fail(ev, JJ_ERUNTIME, "argument of type '%s' is not iterable", jj__type_name(seq));
    }
}

static int compare_op(jj_ev *ev, int op, jj_val a, jj_val b)
{
    switch (op) {
    case CMP_EQ: return jj__equal(a, b);
    case CMP_NE: return !jj__equal(a, b);
    case CMP_LT: return jj__compare(ev, a, b) < 0;
    case CMP_LE: return jj__compare(ev, a, b) <= 0;
    case CMP_GT: return jj__compare(ev, a, b) > 0;
    case CMP_GE: return jj__compare(ev, a, b) >= 0;
    case CMP_IN: return contains(ev, a, b);
    default: return !contains(ev, a, b);
    }
}

/* ---- calls ------------------------------------------------------------------------------------- */

static jj_val eval_in(jj_ev *ev, const jj_node *n, jj_scope *s);

/* Binds a macro's or caller's parameters in scope s. */
static void bind_params(jj_ev *ev, const jj_node *def, jj_scope *s, jj_val *pos, size_t npos, const char **kwn,
                        jj_val *kw, size_t nkw, const char *what)
{
    if (npos > def->n_targets)
        jj__fail(ev, JJ_ERUNTIME, "%s '%s' takes not more than %zu argument(s)", what, def->name ? def->name : "caller",
                 def->n_targets);
    for (size_t i = 0; i < nkw; i++) {
        size_t k;
        for (k = 0; k < def->n_targets; k++)
            if (!strcmp(kwn[i], def->targets[k])) break;
        if (k == def->n_targets && strcmp(kwn[i], "caller") != 0)
            jj__fail(ev, JJ_ERUNTIME, "%s '%s' takes no keyword argument '%s'", what, def->name ? def->name : "caller", kwn[i]);
        if (k < npos) jj__fail(ev, JJ_ERUNTIME, "%s '%s' got multiple values for argument '%s'", what, def->name ? def->name : "caller", kwn[i]);
    }
    for (size_t k = 0; k < def->n_targets; k++) {
        jj_val v;
        int have = 0;
        if (k < npos) { v = pos[k]; have = 1; }
        for (size_t i = 0; !have && i < nkw; i++)
            if (!strcmp(kwn[i], def->targets[k])) { v = kw[i]; have = 1; }
        if (!have) v = def->list.v[k] ? eval_in(ev, def->list.v[k], s)
                                      : jj__undef(jj__str_fmt(&ev->arena, "parameter '%s' was not provided", def->targets[k]));
        scope_set(ev, s, def->targets[k], v);
    }
}

static jj_val run_loop(jj_ev *ev, const jj_node *n, jj_scope *s, jj_val iterable, int depth, int capture_out);

jj_val jj__call(jj_ev *ev, jj_val fv, jj_val *pos, size_t npos, const char **kwn, jj_val *kw, size_t nkw)
{
    if (fv.t == JV_UNDEF) fail_undef(ev, fv);
    if (fv.t == JV_LOOP) {
        jj_loop *l = fv.u.loop;
        if (!l->node->op) jj__fail(ev, JJ_ERUNTIME, "the loop is not recursive ({%% for ... recursive %%})");
        if (npos != 1 || nkw) jj__fail(ev, JJ_ERUNTIME, "loop() takes exactly one argument");
        return run_loop(ev, l->node, l->scope, pos[0], l->depth + 1, 1);
    }
    if (fv.t != JV_FUNC) jj__fail(ev, JJ_ERUNTIME, "'%s' object is not callable", jj__type_name(fv));
    jj_func *f = fv.u.fn;
    switch (f->kind) {
    case FN_BUILTIN:
        return jj__apply(ev, f->b, f->self, pos, npos, kwn, kw, nkw);
    case FN_LOOP_CYCLE:
        if (nkw || !npos) jj__fail(ev, JJ_ERUNTIME, "no items for cycling given");
        return pos[f->loop->i % npos];
    case FN_LOOP_CHANGED: {
        jj_list *l = jj__list_new(ev, npos);
        if (npos) memcpy(l->v, pos, npos * sizeof *pos);
        jj_val now = jj__listv(l, JL_TUPLE);
        int changed = !f->loop->changed_init || !jj__equal(now, f->loop->last_changed);
        f->loop->changed_init = 1;
        f->loop->last_changed = now;
        return jj__bool(changed);
    }
    case FN_MACRO:
    case FN_CALLER: {
        if (++ev->depth > ev->lim.max_depth)
            jj__fail(ev, JJ_ELIMIT, "macro calls nest more than %d deep", ev->lim.max_depth);
        const jj_node *def = f->kind == FN_MACRO ? f->macro : f->callbody;
        jj_scope *s = scope_new(ev, f->kind == FN_MACRO ? ev->root : f->scope);
        bind_params(ev, def, s, pos, npos, kwn, kw, nkw, f->kind == FN_MACRO ? "macro" : "call block");
        jj_val caller = f->caller;
        for (size_t i = 0; i < nkw; i++)
            if (!strcmp(kwn[i], "caller")) caller = kw[i];
        if (f->kind == FN_MACRO && caller.t == JV_FUNC) scope_set(ev, s, "caller", caller);
        jj_str *r = capture(ev, &def->body, s);
        ev->depth--;
        return jj__strv(r);
    }
    }
    jj__fail(ev, JJ_ERUNTIME, "object is not callable");
}

static jj_val eval_call(jj_ev *ev, const jj_node *n, jj_scope *s, jj_val extra_caller)
{
    jj_val fv = eval_in(ev, n->a, s);
    size_t np = n->args.pos.n, nk = n->args.kw.n;
    jj_val *pos = jj__alloc(&ev->arena, (np + 1) * sizeof *pos), *kw = jj__alloc(&ev->arena, (nk + 2) * sizeof *kw);
    const char **kwn = jj__alloc(&ev->arena, (nk + 2) * sizeof *kwn);
    for (size_t i = 0; i < np; i++) pos[i] = eval_in(ev, n->args.pos.v[i], s);
    for (size_t i = 0; i < nk; i++) {
        kw[i] = eval_in(ev, n->args.kw.v[i], s);
        kwn[i] = n->args.names[i];
    }
    if (extra_caller.t == JV_FUNC) {
        kwn[nk] = "caller";
        kw[nk++] = extra_caller;
        if (fv.t != JV_FUNC || fv.u.fn->kind != FN_MACRO)
            jj__fail(ev, JJ_ERUNTIME, "{%% call %%} needs a macro");
    }
    ev->line = n->line;
    return jj__call(ev, fv, pos, np, kwn, kw, nk);
}

static jj_val eval_builtin(jj_ev *ev, const jj_node *n, jj_scope *s, jj_val in)
{
    if (!n->fn) jj__fail(ev, JJ_ERUNTIME, "No %s named '%s' found.", n->kind == N_FILTER ? "filter" : "test", n->name);
    size_t np = n->args.pos.n, nk = n->args.kw.n;
    jj_val *pos = jj__alloc(&ev->arena, (np + 1) * sizeof *pos), *kw = jj__alloc(&ev->arena, (nk + 1) * sizeof *kw);
    for (size_t i = 0; i < np; i++) pos[i] = eval_in(ev, n->args.pos.v[i], s);
    for (size_t i = 0; i < nk; i++) kw[i] = eval_in(ev, n->args.kw.v[i], s);
    ev->line = n->line;
    return jj__apply(ev, n->fn, in, pos, np, n->args.names, kw, nk);
}

/* A filter chain (N_FILTER nodes whose innermost operand is NULL) over in. */
static jj_val apply_chain(jj_ev *ev, const jj_node *f, jj_scope *s, jj_val in)
{
    if (!f) return in;
    jj_val x = f->a ? apply_chain(ev, f->a, s, in) : in;
    return eval_builtin(ev, f, s, x);
}

/* ---- expressions ------------------------------------------------------------------------------------ */

static jj_val eval_in(jj_ev *ev, const jj_node *n, jj_scope *s)
{
    jj__step(ev);
    ev->line = n->line;
    switch (n->kind) {
    case N_CONST: return n->value;
    case N_NAME: return lookup(ev, s, n->name);
    case N_GETATTR: {
        jj_val o = eval_in(ev, n->a, s);
        ev->line = n->line;
        return jj__getattr(ev, o, n->name);
    }
    case N_GETITEM: {
        jj_val o = eval_in(ev, n->a, s);
        if (n->b->kind == N_SLICE) {
            const jj_node *sl = n->b;
            jj_val a = sl->a ? eval_in(ev, sl->a, s) : jj__none(), b = sl->b ? eval_in(ev, sl->b, s) : jj__none();
            jj_val c = sl->c ? eval_in(ev, sl->c, s) : jj__none();
            ev->line = n->line;
            return do_slice(ev, o, a, b, c);
        }
        jj_val k = eval_in(ev, n->b, s);
        ev->line = n->line;
        return jj__getitem(ev, o, k);
    }
    case N_CALL: return eval_call(ev, n, s, jj__undef(NULL));
    case N_FILTER: return eval_builtin(ev, n, s, eval_in(ev, n->a, s));
    case N_TEST: return eval_builtin(ev, n, s, eval_in(ev, n->a, s));
    case N_NOT: return jj__bool(!jj__truthy(eval_in(ev, n->a, s)));
    case N_NEG:
    case N_POS: {
        jj_val v = eval_in(ev, n->a, s);
        ev->line = n->line;
        if (v.t == JV_UNDEF) fail_undef(ev, v);
        if (!is_num(v)) jj__fail(ev, JJ_ERUNTIME, "bad operand type for unary %s: '%s'", n->kind == N_NEG ? "-" : "+", jj__type_name(v));
        if (n->kind == N_POS) return v.t == JV_BOOL ? jj__int(v.u.b) : v;
        if (v.t == JV_FLOAT) return jj__float(-v.u.f);
        if (inum(v) == INT64_MIN) jj__fail(ev, JJ_ERUNTIME, "integer overflow in '-'");
        return jj__int(-inum(v));
    }
    case N_BIN: {
        jj_val a = eval_in(ev, n->a, s), b = eval_in(ev, n->b, s);
        ev->line = n->line;
        return binop(ev, n->op, a, b);
    }
    case N_AND: {
        jj_val a = eval_in(ev, n->a, s);
        return jj__truthy(a) ? eval_in(ev, n->b, s) : a;
    }
    case N_OR: {
        jj_val a = eval_in(ev, n->a, s);
        return jj__truthy(a) ? a : eval_in(ev, n->b, s);
    }
    case N_COMPARE: {
        jj_val l = eval_in(ev, n->a, s);
        for (size_t i = 0; i < n->list.n; i++) {
            jj_val r = eval_in(ev, n->list.v[i], s);
            ev->line = n->line;
            if (!compare_op(ev, n->ops[i], l, r)) return jj__bool(0);
            l = r;
        }
        return jj__bool(1);
    }
    case N_COND:
        if (jj__truthy(eval_in(ev, n->a, s))) return eval_in(ev, n->b, s);
        return n->c ? eval_in(ev, n->c, s) : jj__undef(jj__str_fmt(&ev->arena, "the inline if expression on line %d evaluated to false and no else section was defined", n->line));
    case N_LIST:
    case N_TUPLE: {
        jj_list *l = jj__list_new(ev, n->list.n);
        for (size_t i = 0; i < n->list.n; i++) l->v[i] = eval_in(ev, n->list.v[i], s);
        return jj__listv(l, n->kind == N_TUPLE ? JL_TUPLE : JL_LIST);
    }
    case N_DICT: {
        jj_dict *d = jj__dict_new(ev, n->list.n / 2);
        for (size_t i = 0; i + 1 < n->list.n; i += 2) {
            jj_val k = eval_in(ev, n->list.v[i], s), v = eval_in(ev, n->list.v[i + 1], s);
            jj__dict_set(ev, d, k, v);
        }
        jj_val v = { .t = JV_DICT };
        v.u.d = d;
        return v;
    }
    }
    jj__fail(ev, JJ_ERUNTIME, "internal error: node %d is not an expression", n->kind);
}

/* ---- statements -------------------------------------------------------------------------------------- */

enum { FLOW_NEXT, FLOW_BREAK, FLOW_CONTINUE };

static void assign(jj_ev *ev, jj_scope *s, const jj_node *n, jj_val v)
{
    if (n->n_targets == 1 && !n->target_tuple) {
        scope_set(ev, s, n->targets[0], v);
        return;
    }
    jj_list *items = jj__iter(ev, v);
    if (items->n != n->n_targets)
        jj__fail(ev, JJ_ERUNTIME, "%s values to unpack (expected %zu, got %zu)",
                 items->n > n->n_targets ? "too many" : "not enough", n->n_targets, items->n);
    for (size_t i = 0; i < n->n_targets; i++) scope_set(ev, s, n->targets[i], items->v[i]);
}

static jj_val run_loop(jj_ev *ev, const jj_node *n, jj_scope *s, jj_val iterable, int depth, int capture_out)
{
    if (depth > ev->lim.max_depth) jj__fail(ev, JJ_ELIMIT, "recursive loops nest more than %d deep", ev->lim.max_depth);
    jj_sb cap = { 0 }, *saved = ev->out;
    if (capture_out) ev->out = &cap;
    jj_list *items = jj__iter(ev, iterable);
    if (n->b) { /* {% for x in xs if cond %}: filter before counting */
        jj_list *kept = jj__list_new(ev, items->n);
        kept->n = 0;
        for (size_t i = 0; i < items->n; i++) {
            jj_scope *t = scope_new(ev, s);
            assign(ev, t, n, items->v[i]);
            if (jj__truthy(eval_in(ev, n->b, t))) kept->v[kept->n++] = items->v[i];
        }
        items = kept;
    }
    if (items->n == 0) {
        exec_body(ev, &n->orelse, s);
    } else {
        jj_loop *l = jj__alloc(&ev->arena, sizeof *l);
        l->node = n;
        l->scope = s;
        l->items = items;
        l->depth = depth;
        jj_val lv = { .t = JV_LOOP };
        lv.u.loop = l;
        for (size_t i = 0; i < items->n; i++) {
            jj__step(ev);
            l->i = i;
            jj_scope *it = scope_new(ev, s);
            assign(ev, it, n, items->v[i]);
            scope_set(ev, it, "loop", lv);
            if (exec_body(ev, &n->body, it) == FLOW_BREAK) break;
        }
    }
    ev->out = saved;
    return capture_out ? jj__strv(jj__sb_done(ev, &cap)) : jj__none();
}

static jj_val make_func(jj_ev *ev, int kind, const jj_node *def, jj_scope *s)
{
    jj_func *f = jj__alloc(&ev->arena, sizeof *f);
    f->kind = kind;
    if (kind == FN_MACRO) f->macro = def;
    else f->callbody = def;
    f->scope = s;
    f->caller = jj__undef(NULL);
    jj_val v = { .t = JV_FUNC };
    v.u.fn = f;
    return v;
}

static int exec_node(jj_ev *ev, const jj_node *n, jj_scope *s)
{
    jj__step(ev);
    ev->line = n->line;
    switch (n->kind) {
    case N_DATA:
        jj__sb_str(ev, ev->out, n->value.u.s);
        return FLOW_NEXT;
    case N_OUTPUT: {
        jj_val v = eval_in(ev, n->a, s);
        jj__str_of(ev, ev->out, v);
        return FLOW_NEXT;
    }
    case N_IF:
        for (size_t i = 0; i < n->list.n; i++)
            if (jj__truthy(eval_in(ev, n->list.v[i], s))) return exec_body(ev, &n->body.v[i]->body, s);
        return exec_body(ev, &n->orelse, s);
    case N_FOR:
        run_loop(ev, n, s, eval_in(ev, n->a, s), 1, 0);
        return FLOW_NEXT;
    case N_SET:
        assign(ev, s, n, eval_in(ev, n->a, s));
        return FLOW_NEXT;
    case N_SETATTR: {
        jj_val ns = lookup(ev, s, n->targets[0]);
        jj_val v = eval_in(ev, n->a, s);
        ev->line = n->line;
        if (ns.t != JV_NS) jj__fail(ev, JJ_ERUNTIME, "Cannot assign attribute on non-namespace object");
        if (n->name[0] == '_')
            jj__fail(ev, JJ_ERUNTIME, "Chat templates cannot store underscore-prefixed attributes on a namespace, but got '%s'", n->name);
        jj__dict_set(ev, ns.u.d, jj__cstr(ev, n->name), v);
        return FLOW_NEXT;
    }
    case N_SETBLOCK: {
        jj_str *body = capture(ev, &n->body, s);
        scope_set(ev, s, n->targets[0], apply_chain(ev, n->a, s, jj__strv(body)));
        return FLOW_NEXT;
    }
    case N_MACRO:
        scope_set(ev, s, n->name, make_func(ev, FN_MACRO, n, s));
        return FLOW_NEXT;
    case N_CALLBLOCK: {
        jj_val caller = make_func(ev, FN_CALLER, n, s);
        jj_val r = eval_call(ev, n->a, s, caller);
        jj__str_of(ev, ev->out, r);
        return FLOW_NEXT;
    }
    case N_FILTERBLOCK: {
        jj_str *body = capture(ev, &n->body, s);
        jj__str_of(ev, ev->out, apply_chain(ev, n->a, s, jj__strv(body)));
        return FLOW_NEXT;
    }
    case N_WITH: {
        jj_scope *w = scope_new(ev, s);
        for (size_t i = 0; i < n->n_targets; i++) scope_set(ev, w, n->targets[i], eval_in(ev, n->list.v[i], s));
        return exec_body(ev, &n->body, w);
    }
    case N_BREAK: return FLOW_BREAK;
    case N_CONTINUE: return FLOW_CONTINUE;
    case N_BODY: return exec_body(ev, &n->body, s);
    }
    jj__fail(ev, JJ_ERUNTIME, "internal error: node %d is not a statement", n->kind);
}

static int exec_body(jj_ev *ev, const jj_nodes *body, jj_scope *s)
{
    for (size_t i = 0; i < body->n; i++) {
        int r = exec_node(ev, body->v[i], s);
        if (r != FLOW_NEXT) return r;
    }
    return FLOW_NEXT;
}

/* ---- entry point ------------------------------------------------------------------------------------- */

jj_render_params jj_default_render_params(void)
{
    jj_render_params p;
    memset(&p, 0, sizeof p);
    p.limits.max_output = (size_t)64 << 20;
    p.limits.max_memory = (size_t)512 << 20;
    p.limits.max_steps = 50000000;
    p.limits.max_depth = 64;
    return p;
}

/* The part of jj_render that errors longjmp out of; its only state is *ev. */
static int render_run(jj_ev *ev)
{
    if (setjmp(ev->fail)) return ev->status;
    const jj_vars *v = ev->vars;
    jj_result *out = ev->result;
    ev->root = scope_new(ev, NULL);
    for (size_t i = 0; v && i < v->n; i++) {
        const jj_var *x = &v->v[i];
        jj_val val = x->json ? jj__from_json(ev, x->json, NULL, x->trust, x->trust_ctx, 0)
                             : jj__strv(jj__str_new(&ev->arena, x->str, x->len, !x->trusted));
        scope_set(ev, ev->root, x->name, val);
    }
    jj_sb top = { 0 };
    ev->out = &top;
    exec_body(ev, &ev->tpl->body, ev->root);
    out->text = malloc(top.len + 1);
    out->untrusted = top.nt ? malloc(top.nt * sizeof *out->untrusted) : NULL;
    if (!out->text || (top.nt && !out->untrusted)) {
        jj_result_free(out);
        return JJ_ENOMEM;
    }
    if (top.len) memcpy(out->text, top.p, top.len);
    out->text[top.len] = 0;
    out->len = top.len;
    for (uint32_t i = 0; i < top.nt; i++) out->untrusted[i] = (jj_span){ top.t[i].a, top.t[i].b };
    out->n_untrusted = top.nt;
    return JJ_OK;
}

static void ev_free(jj_ev *ev)
{
    if (ev->ctype) freelocale(ev->ctype);
    jj__arena_free(&ev->arena);
    free(ev);
}

int jj_render(const jj_template *t, const jj_vars *v, const jj_render_params *p, jj_result *out, char *err,
              size_t errlen)
{
    if (!out) return JJ_EINVAL;
    memset(out, 0, sizeof *out);
    if (err && errlen) err[0] = 0;
    if (!t) return JJ_EINVAL;
    jj_render_params dp = jj_default_render_params();
    if (!p) p = &dp;
    jj_ev *ev = calloc(1, sizeof *ev);
    if (!ev) {
        if (err && errlen) snprintf(err, errlen, "out of memory");
        return JJ_ENOMEM;
    }
    ev->err = err;
    ev->errlen = errlen;
    ev->lim = p->limits;
    if (!ev->lim.max_output) ev->lim.max_output = dp.limits.max_output;
    if (!ev->lim.max_memory) ev->lim.max_memory = dp.limits.max_memory;
    if (!ev->lim.max_steps) ev->lim.max_steps = dp.limits.max_steps;
    if (ev->lim.max_depth <= 0) ev->lim.max_depth = dp.limits.max_depth;
    ev->now = p->now ? p->now : (int64_t)time(NULL);
    ev->arena.limit = ev->lim.max_memory;
    ev->arena.fail = arena_fail;
    ev->arena.fail_ctx = ev;
    ev->vars = v;
    ev->tpl = t;
    ev->result = out;
    int rc = render_run(ev);
    ev_free(ev);
    if (rc == JJ_ENOMEM && err && errlen && !err[0]) snprintf(err, errlen, "out of memory");
    return rc;
}

void jj_result_free(jj_result *r)
{
    if (!r) return;
    free(r->text);
    free(r->untrusted);
    memset(r, 0, sizeof *r);
}
