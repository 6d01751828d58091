/*
 * jinja_parse.c — tokens (jinja_lex.c) -> AST.
 *
 * jinja2's recursive descent (same precedence, same tuple and test rules),
 * building the nodes of jinja_priv.h; a construct we do not implement is a
 * syntax error naming its line, never a silently different template.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "jinja_priv.h"

static void arena_fail(void *ctx, int status)
{
    jj_parser *P = ctx;
    if (P->err && P->errlen) snprintf(P->err, P->errlen, "out of memory while parsing the template");
    P->status = status;
    longjmp(P->jb, 1);
}

/* ---- parser helpers ------------------------------------------------------------ */

static jj_tok *cur(jj_parser *P) { return &P->t[P->i]; }
static jj_tok *peek(jj_parser *P, size_t k) { return P->i + k < P->nt ? &P->t[P->i + k] : &P->t[P->nt - 1]; }
static void adv(jj_parser *P) { if (P->t[P->i].type != T_EOF) P->i++; }

static int is_op(const jj_tok *t, const char *op)
{
    return t->type == T_OP && t->len == strlen(op) && memcmp(t->s, op, t->len) == 0;
}

static int is_name(const jj_tok *t, const char *name)
{
    return t->type == T_NAME && strcmp(t->s, name) == 0;
}

static const char *describe(const jj_tok *t)
{
    switch (t->type) {
    case T_EOF: return "end of template";
    case T_DATA: return "template data";
    case T_VAR_BEGIN: return "begin of print statement";
    case T_VAR_END: return "end of print statement";
    case T_BLOCK_BEGIN: return "begin of statement block";
    case T_BLOCK_END: return "end of statement block";
    case T_NAME: return t->s;
    case T_STRING: return "string";
    case T_INT: return "integer";
    case T_FLOAT: return "float";
    default: return t->s;
    }
}

static void expect_op(jj_parser *P, const char *op)
{
    if (!is_op(cur(P), op)) jj__parse_fail(P, cur(P)->line, "expected '%s', got '%s'", op, describe(cur(P)));
    adv(P);
}

static const char *expect_name(jj_parser *P)
{
    if (cur(P)->type != T_NAME) jj__parse_fail(P, cur(P)->line, "expected a name, got '%s'", describe(cur(P)));
    const char *s = cur(P)->s;
    adv(P);
    return s;
}

static void expect_type(jj_parser *P, int type, const char *what)
{
    if (cur(P)->type != type) jj__parse_fail(P, cur(P)->line, "expected %s, got '%s'", what, describe(cur(P)));
    adv(P);
}

static jj_node *node(jj_parser *P, int kind, int line)
{
    jj_node *n = jj__alloc(P->a, sizeof *n);
    n->kind = (uint16_t)kind;
    n->line = line;
    return n;
}

/* A growable node list. */
typedef struct nlist {
    jj_node **v;
    size_t n, cap;
} nlist;

static void nl_add(jj_parser *P, nlist *l, jj_node *x)
{
    if (l->n == l->cap) {
        size_t cap = l->cap ? l->cap * 2 : 4;
        jj_node **v = jj__alloc(P->a, cap * sizeof *v);
        if (l->n) memcpy(v, l->v, l->n * sizeof *v);
        l->v = v;
        l->cap = cap;
    }
    l->v[l->n++] = x;
}

static jj_nodes nl_done(nlist *l)
{
    return (jj_nodes){ l->n, l->v };
}

static void enter(jj_parser *P)
{
    if (++P->depth > 200) jj__parse_fail(P, cur(P)->line, "the template nests expressions or blocks too deeply");
}

/* ---- expressions ---------------------------------------------------------------- */

static jj_node *parse_expression(jj_parser *P, int with_condexpr);
static jj_node *parse_unary(jj_parser *P, int with_filter);
static jj_node *parse_primary(jj_parser *P);
static jj_node *parse_postfix(jj_parser *P, jj_node *n);
static jj_node *parse_tuple(jj_parser *P, int simplified, int with_condexpr, const char *extra_end, int explicit_parens);

static void parse_call_args(jj_parser *P, jj_args *out)
{
    int line = cur(P)->line;
    expect_op(P, "(");
    nlist pos = { 0 }, kw = { 0 };
    const char **names = NULL;
    size_t ncap = 0;
    int need_comma = 0;
    while (!is_op(cur(P), ")")) {
        if (need_comma) {
            expect_op(P, ",");
            if (is_op(cur(P), ")")) break;
        }
        if (is_op(cur(P), "*") || is_op(cur(P), "**"))
            jj__parse_fail(P, line, "*args and **kwargs in calls are not supported");
        if (cur(P)->type == T_NAME && is_op(peek(P, 1), "=")) {
            const char *k = cur(P)->s;
            adv(P);
            adv(P);
            if (kw.n == ncap) {
                size_t cap = ncap ? ncap * 2 : 4;
                const char **nn = jj__alloc(P->a, cap * sizeof *nn);
                if (kw.n) memcpy(nn, names, kw.n * sizeof *nn);
                names = nn;
                ncap = cap;
            }
            names[kw.n] = k;
            nl_add(P, &kw, parse_expression(P, 1));
        } else {
            if (kw.n) jj__parse_fail(P, line, "invalid syntax for function call expression (a positional argument after a keyword)");
            nl_add(P, &pos, parse_expression(P, 1));
        }
        need_comma = 1;
    }
    expect_op(P, ")");
    out->pos = nl_done(&pos);
    out->kw = nl_done(&kw);
    out->names = names;
}

/* name(.name)* as filter and test names are written */
static const char *dotted_name(jj_parser *P)
{
    const char *name = expect_name(P);
    while (is_op(cur(P), ".")) {
        adv(P);
        const char *more = expect_name(P);
        size_t a = strlen(name), b = strlen(more);
        char *s = jj__alloc(P->a, a + b + 2);
        memcpy(s, name, a);
        s[a] = '.';
        memcpy(s + a + 1, more, b + 1);
        name = s;
    }
    return name;
}

/* One or more filters: input | f(args) | g ...; start_inline: the first
 * filter's '|' was already consumed (filter blocks). */
static jj_node *parse_filter(jj_parser *P, jj_node *in, int start_inline)
{
    while (is_op(cur(P), "|") || start_inline) {
        if (!start_inline) adv(P);
        int line = cur(P)->line;
        const char *name = dotted_name(P);
        jj_node *f = node(P, N_FILTER, line);
        f->name = name;
        f->a = in;
        f->fn = jj__filter_find(name); /* unknown: checked by check_builtins */
        if (is_op(cur(P), "(")) parse_call_args(P, &f->args);
        in = f;
        start_inline = 0;
    }
    return in;
}

static jj_node *parse_test(jj_parser *P, jj_node *in)
{
    int line = cur(P)->line;
    adv(P); /* is */
    int neg = 0;
    if (is_name(cur(P), "not")) {
        adv(P);
        neg = 1;
    }
    const char *name = dotted_name(P);
    jj_node *t = node(P, N_TEST, line);
    t->name = name;
    t->a = in;
    t->fn = jj__test_find(name); /* unknown: checked by check_builtins */
    jj_tok *c = cur(P);
    if (is_op(c, "(")) {
        parse_call_args(P, &t->args);
    } else if ((c->type == T_NAME || c->type == T_STRING || c->type == T_INT || c->type == T_FLOAT || is_op(c, "[") ||
                is_op(c, "{")) &&
               !is_name(c, "else") && !is_name(c, "or") && !is_name(c, "and")) {
        if (is_name(c, "is")) jj__parse_fail(P, line, "You cannot chain multiple tests with is");
        jj_node *arg = parse_postfix(P, parse_primary(P));
        nlist l = { 0 };
        nl_add(P, &l, arg);
        t->args.pos = nl_done(&l);
    }
    if (neg) {
        jj_node *n = node(P, N_NOT, line);
        n->a = t;
        return n;
    }
    return t;
}

static jj_node *parse_filter_expr(jj_parser *P, jj_node *n)
{
    while (1) {
        if (is_op(cur(P), "|")) n = parse_filter(P, n, 0);
        else if (is_name(cur(P), "is")) n = parse_test(P, n);
        else if (is_op(cur(P), "(")) {
            jj_node *c = node(P, N_CALL, cur(P)->line);
            c->a = n;
            parse_call_args(P, &c->args);
            n = c;
        } else break;
    }
    return n;
}

static jj_node *parse_subscribed(jj_parser *P)
{
    int line = cur(P)->line;
    jj_node *a = NULL, *b = NULL, *c = NULL;
    if (is_op(cur(P), ":")) {
        adv(P);
    } else {
        a = parse_expression(P, 1);
        if (!is_op(cur(P), ":")) return a;
        adv(P);
    }
    if (!is_op(cur(P), ":") && !is_op(cur(P), "]") && !is_op(cur(P), ",")) b = parse_expression(P, 1);
    if (is_op(cur(P), ":")) {
        adv(P);
        if (!is_op(cur(P), "]") && !is_op(cur(P), ",")) c = parse_expression(P, 1);
    }
    jj_node *s = node(P, N_SLICE, line);
    s->a = a;
    s->b = b;
    s->c = c;
    return s;
}

static jj_node *parse_postfix(jj_parser *P, jj_node *n)
{
    while (1) {
        jj_tok *t = cur(P);
        if (is_op(t, ".")) {
            adv(P);
            jj_tok *a = cur(P);
            if (a->type == T_NAME) {
                jj_node *g = node(P, N_GETATTR, t->line);
                g->a = n;
                g->name = a->s;
                adv(P);
                n = g;
            } else if (a->type == T_INT) {
                jj_node *g = node(P, N_GETITEM, t->line), *k = node(P, N_CONST, a->line);
                k->value = jj__int(a->i);
                g->a = n;
                g->b = k;
                adv(P);
                n = g;
            } else {
                jj__parse_fail(P, a->line, "expected name or number");
            }
        } else if (is_op(t, "[")) {
            adv(P);
            nlist l = { 0 };
            while (!is_op(cur(P), "]")) {
                if (l.n) expect_op(P, ",");
                nl_add(P, &l, parse_subscribed(P));
            }
            expect_op(P, "]");
            if (l.n == 0) jj__parse_fail(P, t->line, "expected an expression in []");
            jj_node *g = node(P, N_GETITEM, t->line);
            g->a = n;
            if (l.n == 1) {
                g->b = l.v[0];
            } else {
                jj_node *tu = node(P, N_TUPLE, t->line);
                tu->list = nl_done(&l);
                g->b = tu;
            }
            n = g;
        } else if (is_op(t, "(")) {
            jj_node *c = node(P, N_CALL, t->line);
            c->a = n;
            parse_call_args(P, &c->args);
            n = c;
        } else {
            return n;
        }
    }
}

static jj_node *parse_primary(jj_parser *P)
{
    jj_tok *t = cur(P);
    jj_node *n;
    enter(P);
    if (t->type == T_NAME) {
        n = node(P, N_CONST, t->line);
        if (!strcmp(t->s, "true") || !strcmp(t->s, "True")) n->value = jj__bool(1);
        else if (!strcmp(t->s, "false") || !strcmp(t->s, "False")) n->value = jj__bool(0);
        else if (!strcmp(t->s, "none") || !strcmp(t->s, "None")) n->value = jj__none();
        else {
            n->kind = N_NAME;
            n->name = t->s;
        }
        adv(P);
    } else if (t->type == T_STRING) {
        size_t len = 0, k = P->i;
        while (P->t[k].type == T_STRING) len += P->t[k++].len;
        char *buf = jj__alloc(P->a, len + 1);
        size_t w = 0;
        while (cur(P)->type == T_STRING) {
            memcpy(buf + w, cur(P)->s, cur(P)->len);
            w += cur(P)->len;
            adv(P);
        }
        n = node(P, N_CONST, t->line);
        n->value = jj__strv(jj__str_new(P->a, buf, w, 0));
    } else if (t->type == T_INT || t->type == T_FLOAT) {
        n = node(P, N_CONST, t->line);
        n->value = t->type == T_INT ? jj__int(t->i) : jj__float(t->f);
        adv(P);
    } else if (is_op(t, "(")) {
        adv(P);
        n = parse_tuple(P, 0, 1, NULL, 1);
        expect_op(P, ")");
    } else if (is_op(t, "[")) {
        adv(P);
        nlist l = { 0 };
        while (!is_op(cur(P), "]")) {
            if (l.n) expect_op(P, ",");
            if (is_op(cur(P), "]")) break;
            nl_add(P, &l, parse_expression(P, 1));
        }
        expect_op(P, "]");
        n = node(P, N_LIST, t->line);
        n->list = nl_done(&l);
    } else if (is_op(t, "{")) {
        adv(P);
        nlist l = { 0 };
        while (!is_op(cur(P), "}")) {
            if (l.n) expect_op(P, ",");
            if (is_op(cur(P), "}")) break;
            nl_add(P, &l, parse_expression(P, 1));
            expect_op(P, ":");
            nl_add(P, &l, parse_expression(P, 1));
        }
        expect_op(P, "}");
        n = node(P, N_DICT, t->line);
        n->list = nl_done(&l);
    } else {
        jj__parse_fail(P, t->line, "unexpected '%s'", describe(t));
    }
    P->depth--;
    return n;
}

static jj_node *parse_unary(jj_parser *P, int with_filter)
{
    jj_tok *t = cur(P);
    jj_node *n;
    enter(P);
    if (is_op(t, "-") || is_op(t, "+")) {
        adv(P);
        n = node(P, is_op(t, "-") ? N_NEG : N_POS, t->line);
        n->a = parse_unary(P, 0);
    } else {
        n = parse_primary(P);
    }
    n = parse_postfix(P, n);
    if (with_filter) n = parse_filter_expr(P, n);
    P->depth--;
    return n;
}

static jj_node *bin(jj_parser *P, int op, int line, jj_node *a, jj_node *b)
{
    jj_node *n = node(P, N_BIN, line);
    n->op = (uint16_t)op;
    n->a = a;
    n->b = b;
    return n;
}

static jj_node *parse_pow(jj_parser *P)
{
    jj_node *l = parse_unary(P, 1);
    while (is_op(cur(P), "**")) {
        int line = cur(P)->line;
        adv(P);
        l = bin(P, OP_POW, line, l, parse_unary(P, 1));
    }
    return l;
}

static jj_node *parse_math2(jj_parser *P)
{
    jj_node *l = parse_pow(P);
    while (1) {
        jj_tok *t = cur(P);
        int op = is_op(t, "*") ? OP_MUL : is_op(t, "/") ? OP_DIV : is_op(t, "//") ? OP_FLOORDIV : is_op(t, "%") ? OP_MOD : -1;
        if (op < 0) return l;
        adv(P);
        l = bin(P, op, t->line, l, parse_pow(P));
    }
}

static jj_node *parse_concat(jj_parser *P)
{
    jj_node *l = parse_math2(P);
    while (is_op(cur(P), "~")) {
        int line = cur(P)->line;
        adv(P);
        l = bin(P, OP_CONCAT, line, l, parse_math2(P));
    }
    return l;
}

static jj_node *parse_math1(jj_parser *P)
{
    jj_node *l = parse_concat(P);
    while (is_op(cur(P), "+") || is_op(cur(P), "-")) {
        jj_tok *t = cur(P);
        adv(P);
        l = bin(P, is_op(t, "+") ? OP_ADD : OP_SUB, t->line, l, parse_concat(P));
    }
    return l;
}

static jj_node *parse_compare(jj_parser *P)
{
    int line = cur(P)->line;
    jj_node *first = parse_math1(P);
    nlist ops = { 0 };
    uint8_t kinds[64];
    while (1) {
        jj_tok *t = cur(P);
        int k = is_op(t, "==") ? CMP_EQ : is_op(t, "!=") ? CMP_NE : is_op(t, "<") ? CMP_LT : is_op(t, "<=") ? CMP_LE
              : is_op(t, ">") ? CMP_GT : is_op(t, ">=") ? CMP_GE : is_name(t, "in") ? CMP_IN : -1;
        if (k >= 0) adv(P);
        else if (is_name(t, "not") && is_name(peek(P, 1), "in")) {
            adv(P);
            adv(P);
            k = CMP_NOTIN;
        } else break;
        if (ops.n == sizeof kinds) jj__parse_fail(P, t->line, "comparison chain too long");
        kinds[ops.n] = (uint8_t)k;
        nl_add(P, &ops, parse_math1(P));
    }
    if (!ops.n) return first;
    jj_node *n = node(P, N_COMPARE, line);
    n->a = first;
    n->list = nl_done(&ops);
    n->ops = jj__alloc(P->a, ops.n);
    memcpy(n->ops, kinds, ops.n);
    return n;
}

static jj_node *parse_not(jj_parser *P)
{
    if (is_name(cur(P), "not")) {
        int line = cur(P)->line;
        adv(P);
        enter(P);
        jj_node *n = node(P, N_NOT, line);
        n->a = parse_not(P);
        P->depth--;
        return n;
    }
    return parse_compare(P);
}

static jj_node *parse_and(jj_parser *P)
{
    jj_node *l = parse_not(P);
    while (is_name(cur(P), "and")) {
        jj_node *n = node(P, N_AND, cur(P)->line);
        adv(P);
        n->a = l;
        n->b = parse_not(P);
        l = n;
    }
    return l;
}

static jj_node *parse_or(jj_parser *P)
{
    jj_node *l = parse_and(P);
    while (is_name(cur(P), "or")) {
        jj_node *n = node(P, N_OR, cur(P)->line);
        adv(P);
        n->a = l;
        n->b = parse_and(P);
        l = n;
    }
    return l;
}

static jj_node *parse_condexpr(jj_parser *P)
{
    jj_node *e1 = parse_or(P);
    while (is_name(cur(P), "if")) {
        jj_node *n = node(P, N_COND, cur(P)->line);
        adv(P);
        n->a = parse_or(P);
        n->b = e1;
        if (is_name(cur(P), "else")) {
            adv(P);
            enter(P);
            n->c = parse_condexpr(P);
            P->depth--;
        }
        e1 = n;
    }
    return e1;
}

static jj_node *parse_expression(jj_parser *P, int with_condexpr)
{
    enter(P);
    jj_node *n = with_condexpr ? parse_condexpr(P) : parse_or(P);
    P->depth--;
    return n;
}

static int tuple_end(jj_parser *P, const char *extra_end)
{
    jj_tok *t = cur(P);
    return t->type == T_VAR_END || t->type == T_BLOCK_END || t->type == T_EOF || is_op(t, ")") ||
           (extra_end && is_name(t, extra_end));
}

static jj_node *parse_tuple(jj_parser *P, int simplified, int with_condexpr, const char *extra_end, int explicit_parens)
{
    int line = cur(P)->line;
    nlist l = { 0 };
    int is_tuple = 0;
    while (1) {
        if (l.n) expect_op(P, ",");
        if (tuple_end(P, extra_end)) break;
        nl_add(P, &l, simplified ? parse_primary(P) : parse_expression(P, with_condexpr));
        if (is_op(cur(P), ",")) is_tuple = 1;
        else break;
    }
    if (!is_tuple) {
        if (l.n) return l.v[0];
        if (!explicit_parens) jj__parse_fail(P, line, "Expected an expression, got '%s'", describe(cur(P)));
    }
    jj_node *n = node(P, N_TUPLE, line);
    n->list = nl_done(&l);
    return n;
}

/* ---- statements ------------------------------------------------------------------- */

static jj_nodes subparse(jj_parser *P, const char *const *ends, const char **found);

/* Names to assign: `a`, `a, b`, `(a, b)`. */
static void parse_targets(jj_parser *P, jj_node *n, const char *extra_end)
{
    int line = cur(P)->line;
    jj_node *t = parse_tuple(P, 1, 0, extra_end, 0);
    if (t->kind == N_NAME) {
        n->targets = jj__alloc(P->a, sizeof *n->targets);
        n->targets[0] = t->name;
        n->n_targets = 1;
        return;
    }
    if (t->kind != N_TUPLE) jj__parse_fail(P, line, "can't assign to %s", t->kind == N_CONST ? "a constant" : "an expression");
    n->targets = jj__alloc(P->a, (t->list.n ? t->list.n : 1) * sizeof *n->targets);
    for (size_t i = 0; i < t->list.n; i++) {
        if (t->list.v[i]->kind != N_NAME) jj__parse_fail(P, line, "only names can be unpacked into");
        n->targets[i] = t->list.v[i]->name;
    }
    n->n_targets = t->list.n;
    n->target_tuple = 1;
}

static void end_block(jj_parser *P)
{
    expect_type(P, T_BLOCK_END, "end of statement block");
}

/* Parses statements up to one of ends, consumes the end tag
 * ({% endX %}) when drop_end and returns the body. */
static jj_nodes body_until(jj_parser *P, const char *const *ends, const char **found, int drop_end)
{
    end_block(P);
    jj_nodes b = subparse(P, ends, found);
    if (drop_end) {
        adv(P); /* the end name */
        end_block(P);
    }
    return b;
}

/* A macro's or call block's parameters: (a, b=1, ...). */
static void parse_signature(jj_parser *P, jj_node *n)
{
    expect_op(P, "(");
    nlist defs = { 0 };
    const char **names = NULL;
    size_t cap = 0, k = 0;
    while (!is_op(cur(P), ")")) {
        if (k) expect_op(P, ",");
        if (is_op(cur(P), ")")) break;
        const char *name = expect_name(P);
        jj_node *d = NULL;
        if (is_op(cur(P), "=")) {
            adv(P);
            d = parse_expression(P, 1);
        } else if (defs.n && defs.v[defs.n - 1]) {
            jj__parse_fail(P, cur(P)->line, "non-default argument follows default argument");
        }
        if (k == cap) {
            cap = cap ? cap * 2 : 4;
            const char **nn = jj__alloc(P->a, cap * sizeof *nn);
            if (k) memcpy(nn, names, k * sizeof *nn);
            names = nn;
        }
        names[k++] = name;
        nl_add(P, &defs, d);
    }
    expect_op(P, ")");
    n->targets = names;
    n->n_targets = k;
    n->list = nl_done(&defs);
}

static int is_content_access(const jj_node *e)
{
    if (e->kind == N_GETATTR) return strcmp(e->name, "content") == 0;
    if (e->kind == N_GETITEM && e->b->kind == N_CONST && e->b->value.t == JV_STR)
        return strcmp(e->b->value.u.s->s, "content") == 0;
    return 0;
}

static jj_node *parse_statement(jj_parser *P)
{
    jj_tok *t = cur(P);
    int line = t->line;
    if (t->type != T_NAME) jj__parse_fail(P, line, "tag name expected");
    const char *kw = t->s;
    adv(P);
    enter(P);
    jj_node *n;
    const char *found;
    if (!strcmp(kw, "if")) {
        n = node(P, N_IF, line);
        nlist tests = { 0 }, bodies = { 0 };
        static const char *const ends[] = { "elif", "else", "endif", NULL };
        while (1) {
            nl_add(P, &tests, parse_tuple(P, 0, 0, NULL, 0));
            jj_node *b = node(P, N_BODY, line);
            b->body = body_until(P, ends, &found, 0);
            nl_add(P, &bodies, b);
            adv(P);
            if (!strcmp(found, "elif")) continue;
            if (!strcmp(found, "else")) {
                static const char *const e2[] = { "endif", NULL };
                n->orelse = body_until(P, e2, &found, 1);
            } else {
                end_block(P);
            }
            break;
        }
        n->list = nl_done(&tests);
        n->body = nl_done(&bodies);
    } else if (!strcmp(kw, "for")) {
        n = node(P, N_FOR, line);
        parse_targets(P, n, "in");
        if (!is_name(cur(P), "in")) jj__parse_fail(P, cur(P)->line, "expected 'in', got '%s'", describe(cur(P)));
        adv(P);
        n->a = parse_tuple(P, 0, 0, "recursive", 0);
        if (is_content_access(n->a)) P->iterates_content = 1;
        if (is_name(cur(P), "if")) {
            adv(P);
            n->b = parse_expression(P, 1);
        }
        if (is_name(cur(P), "recursive")) {
            adv(P);
            n->op = 1;
        }
        static const char *const ends[] = { "endfor", "else", NULL };
        P->loops++;
        n->body = body_until(P, ends, &found, 0);
        P->loops--;
        adv(P);
        if (!strcmp(found, "else")) {
            static const char *const e2[] = { "endfor", NULL };
            n->orelse = body_until(P, e2, &found, 1);
        } else {
            end_block(P);
        }
    } else if (!strcmp(kw, "set")) {
        if (cur(P)->type == T_NAME && is_op(peek(P, 1), ".")) {
            n = node(P, N_SETATTR, line);
            n->targets = jj__alloc(P->a, sizeof *n->targets);
            n->targets[0] = expect_name(P);
            n->n_targets = 1;
            adv(P);
            n->name = expect_name(P);
            expect_op(P, "=");
            n->a = parse_tuple(P, 0, 1, NULL, 0);
            end_block(P);
        } else {
            n = node(P, N_SET, line);
            parse_targets(P, n, NULL);
            if (is_op(cur(P), "=")) {
                adv(P);
                n->a = parse_tuple(P, 0, 1, NULL, 0);
                end_block(P);
            } else {
                if (n->n_targets != 1 || n->target_tuple) jj__parse_fail(P, line, "a block set assigns one name");
                n->kind = N_SETBLOCK;
                if (is_op(cur(P), "|")) n->a = parse_filter(P, NULL, 0);
                static const char *const ends[] = { "endset", NULL };
                n->body = body_until(P, ends, &found, 1);
            }
        }
    } else if (!strcmp(kw, "macro")) {
        n = node(P, N_MACRO, line);
        n->name = expect_name(P);
        parse_signature(P, n);
        static const char *const ends[] = { "endmacro", NULL };
        int loops = P->loops;
        P->loops = 0;
        n->body = body_until(P, ends, &found, 1);
        P->loops = loops;
    } else if (!strcmp(kw, "call")) {
        n = node(P, N_CALLBLOCK, line);
        if (is_op(cur(P), "(")) parse_signature(P, n);
        n->a = parse_expression(P, 1);
        if (n->a->kind != N_CALL) jj__parse_fail(P, line, "expected a call expression after {%% call %%}");
        static const char *const ends[] = { "endcall", NULL };
        n->body = body_until(P, ends, &found, 1);
    } else if (!strcmp(kw, "filter")) {
        n = node(P, N_FILTERBLOCK, line);
        n->a = parse_filter(P, NULL, 1);
        static const char *const ends[] = { "endfilter", NULL };
        n->body = body_until(P, ends, &found, 1);
    } else if (!strcmp(kw, "with")) {
        n = node(P, N_WITH, line);
        nlist vals = { 0 };
        const char **names = NULL;
        size_t k = 0, cap = 0;
        while (cur(P)->type != T_BLOCK_END) {
            if (k) expect_op(P, ",");
            const char *name = expect_name(P);
            expect_op(P, "=");
            if (k == cap) {
                cap = cap ? cap * 2 : 4;
                const char **nn = jj__alloc(P->a, cap * sizeof *nn);
                if (k) memcpy(nn, names, k * sizeof *nn);
                names = nn;
            }
            names[k++] = name;
            nl_add(P, &vals, parse_expression(P, 1));
        }
        n->targets = names;
        n->n_targets = k;
        n->list = nl_done(&vals);
        static const char *const ends[] = { "endwith", NULL };
        n->body = body_until(P, ends, &found, 1);
    } else if (!strcmp(kw, "break") || !strcmp(kw, "continue")) {
        if (!P->loops) jj__parse_fail(P, line, "'%s' outside of a loop", kw);
        n = node(P, kw[0] == 'b' ? N_BREAK : N_CONTINUE, line);
        end_block(P);
    } else if (!strcmp(kw, "generation")) {
        /* transformers' AssistantTracker: renders its body */
        n = node(P, N_BODY, line);
        static const char *const ends[] = { "endgeneration", NULL };
        n->body = body_until(P, ends, &found, 1);
    } else if (!strcmp(kw, "print")) {
        n = node(P, N_OUTPUT, line);
        n->a = parse_tuple(P, 0, 1, NULL, 0);
        end_block(P);
    } else if (!strcmp(kw, "include") || !strcmp(kw, "extends") || !strcmp(kw, "import") || !strcmp(kw, "from") ||
               !strcmp(kw, "block") || !strcmp(kw, "autoescape") || !strcmp(kw, "trans")) {
        jj__parse_fail(P, line, "'{%% %s %%}' is not supported in chat templates", kw);
    } else {
        jj__parse_fail(P, line, "Encountered unknown tag '%s'", kw);
    }
    P->depth--;
    return n;
}

static jj_nodes subparse(jj_parser *P, const char *const *ends, const char **found)
{
    nlist body = { 0 };
    while (1) {
        jj_tok *t = cur(P);
        if (t->type == T_EOF) {
            if (ends) {
                char want[128] = "";
                for (int i = 0; ends[i]; i++) {
                    size_t l = strlen(want);
                    snprintf(want + l, sizeof want - l, "%s'%s'", i ? " or " : "", ends[i]);
                }
                jj__parse_fail(P, t->line, "Unexpected end of template. Jinja was looking for the following tags: %s", want);
            }
            break;
        }
        if (t->type == T_DATA) {
            jj_node *n = node(P, N_DATA, t->line);
            n->value = jj__strv(jj__str_new(P->a, t->s, t->len, 0));
            nl_add(P, &body, n);
            adv(P);
        } else if (t->type == T_VAR_BEGIN) {
            adv(P);
            jj_node *n = node(P, N_OUTPUT, t->line);
            n->a = parse_tuple(P, 0, 1, NULL, 0);
            expect_type(P, T_VAR_END, "end of print statement");
            nl_add(P, &body, n);
        } else if (t->type == T_BLOCK_BEGIN) {
            adv(P);
            jj_tok *name = cur(P);
            if (ends && name->type == T_NAME)
                for (int i = 0; ends[i]; i++)
                    if (!strcmp(name->s, ends[i])) {
                        *found = ends[i];
                        return nl_done(&body);
                    }
            if (name->type == T_NAME && (!strncmp(name->s, "end", 3) || !strcmp(name->s, "elif") ||
                                         !strcmp(name->s, "else")))
                jj__parse_fail(P, name->line, "Encountered unknown tag '%s'.%s", name->s,
                      ends ? " Jinja was looking for another end tag here" : "");
            nl_add(P, &body, parse_statement(P));
        } else {
            jj__parse_fail(P, t->line, "unexpected '%s'", describe(t));
        }
    }
    return nl_done(&body);
}

/* An unknown filter or test is a syntax error, except where jinja2 defers
 * it to run time: inside an if statement (its tests and branches) or an
 * inline if expression of the same frame; loops, macros, block sets, with,
 * call and filter blocks open a new frame where the check applies again. */
static void check_builtins(jj_parser *P, const jj_node *n, int soft);

static void check_list(jj_parser *P, const jj_nodes *l, int soft)
{
    for (size_t i = 0; i < l->n; i++)
        if (l->v[i]) check_builtins(P, l->v[i], soft);
}

static void check_builtins(jj_parser *P, const jj_node *n, int soft)
{
    if (!n) return;
    if ((n->kind == N_FILTER || n->kind == N_TEST) && !n->fn && !soft)
        jj__parse_fail(P, n->line, "No %s named '%s'.", n->kind == N_FILTER ? "filter" : "test", n->name);
    int inner = soft;
    switch (n->kind) {
    case N_IF: case N_COND: soft = inner = 1; break;
    case N_FOR: case N_MACRO: case N_SETBLOCK: case N_FILTERBLOCK: case N_CALLBLOCK: case N_WITH: inner = 0; break;
    default: break;
    }
    if (n->kind == N_FOR) {
        check_builtins(P, n->a, soft);
        check_builtins(P, n->b, 0);
        check_list(P, &n->body, 0);
        check_list(P, &n->orelse, soft);
        return;
    }
    if (n->kind == N_SETBLOCK || n->kind == N_FILTERBLOCK) {
        check_builtins(P, n->a, 0);
    } else {
        check_builtins(P, n->a, soft);
    }
    check_builtins(P, n->b, soft);
    check_builtins(P, n->c, soft);
    check_list(P, &n->list, n->kind == N_WITH || n->kind == N_MACRO || n->kind == N_CALLBLOCK ? soft : inner);
    check_list(P, &n->args.pos, soft);
    check_list(P, &n->args.kw, soft);
    check_list(P, &n->body, inner);
    check_list(P, &n->orelse, inner);
}

/* ---- entry points --------------------------------------------------------------------- */

/* The part of jj_parse that errors longjmp out of; its only state is *P. */
static int parse_run(jj_parser *P)
{
    if (setjmp(P->jb)) return P->status;
    jj__lex(P, P->src, P->src_len);
    P->tpl->body = subparse(P, NULL, NULL);
    check_list(P, &P->tpl->body, 0);
    P->tpl->iterates_content = P->iterates_content;
    return JJ_OK;
}

int jj_parse(const char *src, size_t len, jj_template **out, char *err, size_t errlen)
{
    if (!out || (!src && len)) return JJ_EINVAL;
    *out = NULL;
    if (err && errlen) err[0] = 0;
    jj_template *t = calloc(1, sizeof *t);
    jj_parser *P = calloc(1, sizeof *P);
    if (!t || !P) {
        free(t);
        free(P);
        if (err && errlen) snprintf(err, errlen, "out of memory");
        return JJ_ENOMEM;
    }
    P->a = &t->arena;
    P->err = err;
    P->errlen = errlen;
    P->tpl = t;
    P->src = src ? src : "";
    P->src_len = len;
    t->arena.fail = arena_fail;
    t->arena.fail_ctx = P;
    t->arena.limit = (size_t)256 << 20;
    int rc = parse_run(P);
    free(P);
    if (rc) {
        jj_template_free(t);
        return rc;
    }
    t->arena.fail = NULL; /* nothing allocates in it after parsing */
    *out = t;
    return JJ_OK;
}

void jj_template_free(jj_template *t)
{
    if (!t) return;
    jj__arena_free(&t->arena);
    free(t);
}

int jj_template_iterates_content(const jj_template *t)
{
    return t ? t->iterates_content : 0;
}
