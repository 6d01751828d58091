/*
 * jinja_parse.c — Jinja template text -> AST.
 *
 * The lexer follows jinja2's (3.1) rules with the environment transformers
 * uses: newlines normalised to \n and one trailing newline dropped
 * (keep_trailing_newline=False); `{%-`/`-%}` strip all whitespace (Python's
 * str.isspace) before/after a tag; trim_blocks drops the first newline after
 * a block or comment tag; lstrip_blocks strips the spaces before a block or
 * comment tag that starts a line; `+` on a tag disables both.  The parser is
 * jinja2's recursive descent (same precedence, same tuple and test rules),
 * building the nodes of jinja_priv.h; a construct we do not implement is a
 * syntax error naming its line, never a silently different template.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "jinja_priv.h"

/* ---- tokens ----------------------------------------------------------------- */

enum { T_EOF, T_DATA, T_VAR_BEGIN, T_VAR_END, T_BLOCK_BEGIN, T_BLOCK_END, T_NAME, T_STRING, T_INT, T_FLOAT, T_OP };

typedef struct tok {
    int type;
    int line;
    const char *s; /* T_DATA, T_NAME, T_STRING (decoded), T_OP: text */
    size_t len;
    int64_t i;
    double f;
} tok;

typedef struct parser {
    jj_arena *a;
    jmp_buf jb;
    int status;
    char *err;
    size_t errlen;
    tok *t;
    size_t nt, cap, i;
    int depth;      /* expression / statement nesting */
    int loops;      /* enclosing for loops (break/continue) */
    int iterates_content;
    jj_template *tpl;
    const char *src;
    size_t src_len;
} parser;

_Noreturn static void pfail(parser *P, int line, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void pfail(parser *P, int line, const char *fmt, ...)
{
    if (P->err && P->errlen) {
        int n = snprintf(P->err, P->errlen, "line %d: ", line);
        if (n >= 0 && (size_t)n < P->errlen) {
            va_list ap;
            va_start(ap, fmt);
            vsnprintf(P->err + n, P->errlen - (size_t)n, fmt, ap);
            va_end(ap);
            jj__utf8_trim_cut(P->err);
        }
    }
    P->status = JJ_ESYNTAX;
    longjmp(P->jb, 1);
}

static void arena_fail(void *ctx, int status)
{
    parser *P = ctx;
    if (P->err && P->errlen) snprintf(P->err, P->errlen, "out of memory while parsing the template");
    P->status = status;
    longjmp(P->jb, 1);
}

static tok *push(parser *P, int type, int line)
{
    if (P->nt == P->cap) {
        size_t cap = P->cap ? P->cap * 2 : 256;
        tok *t = jj__alloc(P->a, cap * sizeof *t);
        if (P->nt) memcpy(t, P->t, P->nt * sizeof *t);
        P->t = t;
        P->cap = cap;
    }
    tok *t = &P->t[P->nt++];
    memset(t, 0, sizeof *t);
    t->type = type;
    t->line = line;
    return t;
}

/* ---- lexer ------------------------------------------------------------------- */

typedef struct lexer {
    parser *P;
    const char *s;
    size_t n, pos;
    int line;
} lexer;

static int count_nl(const char *s, size_t n)
{
    int k = 0;
    for (size_t i = 0; i < n; i++) k += s[i] == '\n';
    return k;
}

/* Length of the run of whitespace at s[i..n). */
static size_t ws_run(const char *s, size_t i, size_t n)
{
    size_t j = i, l;
    while (j < n && (l = jj__space_len(s + j, n - j))) j += l;
    return j - i;
}

/* text with trailing whitespace removed (str.rstrip()). */
static size_t rstrip_len(const char *s, size_t n)
{
    while (n > 0) {
        size_t j = n - 1;
        while (j > 0 && ((unsigned char)s[j] & 0xC0) == 0x80) j--;
        if (jj__space_len(s + j, n - j) != n - j) break;
        n = j;
    }
    return n;
}

static void emit_data(lexer *L, const char *s, size_t n, int line)
{
    if (!n) return;
    tok *t = push(L->P, T_DATA, line);
    t->s = s;
    t->len = n;
}

/* Whitespace control for the text before a tag (jinja2's OptionalLStrip):
 * sign '-' strips all trailing whitespace; otherwise, for block and comment
 * tags without '+', lstrip_blocks removes the line's leading whitespace when
 * nothing else precedes the tag on its line. */
static size_t strip_before(const char *text, size_t n, char sign, int is_var, int line_starting)
{
    if (sign == '-') return rstrip_len(text, n);
    if (sign == '+' || is_var) return n;
    size_t l = n;
    while (l > 0 && text[l - 1] != '\n') l--;
    if ((l > 0 || line_starting) && n > l && ws_run(text, l, n) == n - l) return l;
    return n;
}

static int is_digit(char c) { return c >= '0' && c <= '9'; }
static int is_ident0(char c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_'; }
static int is_ident(char c) { return is_ident0(c) || is_digit(c); }

static int hexval(char c)
{
    return c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
}

/* A string literal's body with Python's unicode-escape rules. */
static void lex_string(lexer *L, size_t start, char q)
{
    parser *P = L->P;
    size_t i = start + 1;
    int line = L->line;
    size_t cap = 0;
    for (size_t j = i; j < L->n && L->s[j] != q; j++) {
        if (L->s[j] == '\\') j++;
        cap = j;
    }
    char *o = jj__alloc(P->a, (cap > i ? cap - i : 0) + 8);
    size_t w = 0;
    while (1) {
        if (i >= L->n) pfail(P, line, "unexpected end of string literal");
        char c = L->s[i];
        if (c == q) break;
        if (c == '\n') L->line++;
        if (c != '\\') {
            o[w++] = c;
            i++;
            continue;
        }
        if (i + 1 >= L->n) pfail(P, line, "unexpected end of string literal");
        char e = L->s[i + 1];
        i += 2;
        uint32_t cp;
        int nd = 0;
        switch (e) {
        case '\n': L->line++; continue;
        case '\\': o[w++] = '\\'; continue;
        case '\'': o[w++] = '\''; continue;
        case '"': o[w++] = '"'; continue;
        case 'a': o[w++] = 7; continue;
        case 'b': o[w++] = 8; continue;
        case 'f': o[w++] = 12; continue;
        case 'n': o[w++] = '\n'; continue;
        case 'r': o[w++] = '\r'; continue;
        case 't': o[w++] = '\t'; continue;
        case 'v': o[w++] = 11; continue;
        case 'x': nd = 2; break;
        case 'u': nd = 4; break;
        case 'U': nd = 8; break;
        case 'N': pfail(P, line, "\\N{...} escapes in string literals are not supported");
        default:
            if (e >= '0' && e <= '7') {
                cp = (uint32_t)(e - '0');
                for (int k = 0; k < 2 && i < L->n && L->s[i] >= '0' && L->s[i] <= '7'; k++)
                    cp = cp * 8 + (uint32_t)(L->s[i++] - '0');
                w += jj__utf8_enc(cp, o + w);
                continue;
            }
            o[w++] = '\\'; /* unknown escapes stay as written */
            i--;
            continue;
        }
        cp = 0;
        for (int k = 0; k < nd; k++) {
            int h = i < L->n ? hexval(L->s[i]) : -1;
            if (h < 0) pfail(P, line, "truncated \\%c escape in a string literal", e);
            cp = cp * 16 + (uint32_t)h;
            i++;
        }
        if (cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))
            pfail(P, line, "a string literal escapes an invalid character (U+%04X)", cp);
        w += jj__utf8_enc(cp, o + w);
    }
    tok *t = push(P, T_STRING, line);
    t->s = o;
    t->len = w;
    L->pos = i + 1;
}

static const char *const OPS2[] = { "//", "**", "==", "!=", ">=", "<=" };
static const char OPS1[] = "+-/*%~[](){}<>=.:|,;";

/* Tokens inside {{ }} or {% %} up to the closing delimiter; is_var picks
 * which.  Returns with L->pos after the delimiter (and what it strips). */
static void lex_tag(lexer *L, int is_var, int *line_starting)
{
    parser *P = L->P;
    char stack[64];
    int depth = 0;
    const char *s = L->s;
    size_t n = L->n;
    while (1) {
        size_t p = L->pos;
        if (p >= n) pfail(P, L->line, "unexpected end of template: a %s tag is not closed", is_var ? "{{" : "{%");
        if (depth == 0) {
            size_t end = 0, after = 0;
            if (!is_var && n - p >= 3 && s[p] == '+' && s[p + 1] == '%' && s[p + 2] == '}') end = after = p + 3;
            else if (n - p >= 3 && s[p] == '-' && s[p + 1] == (is_var ? '}' : '%') && s[p + 2] == '}') {
                end = p + 3;
                after = end + ws_run(s, end, n);
            } else if (n - p >= 2 && s[p] == (is_var ? '}' : '%') && s[p + 1] == '}') {
                end = after = p + 2;
                if (!is_var && after < n && s[after] == '\n') after++; /* trim_blocks */
            }
            if (end) {
                push(P, is_var ? T_VAR_END : T_BLOCK_END, L->line);
                L->line += count_nl(s + p, after - p);
                *line_starting = s[after - 1] == '\n';
                L->pos = after;
                return;
            }
        }
        size_t w = ws_run(s, p, n);
        if (w) {
            L->line += count_nl(s + p, w);
            L->pos = p + w;
            continue;
        }
        char c = s[p];
        if (is_digit(c)) {
            /* float: digits[.digits][e[+-]digits] with a fraction or an
             * exponent, not right after a '.' (foo.0.1 is two lookups) */
            size_t j = p;
            char buf[128];
            size_t bl = 0;
            while (j < n && (is_digit(s[j]) || (s[j] == '_' && j + 1 < n && is_digit(s[j + 1])))) {
                if (s[j] != '_' && bl < sizeof buf - 1) buf[bl++] = s[j];
                j++;
            }
            int isf = 0;
            size_t k = j;
            if (p == 0 || s[p - 1] != '.') {
                if (k + 1 < n && s[k] == '.' && is_digit(s[k + 1])) {
                    if (bl < sizeof buf - 1) buf[bl++] = '.';
                    k++;
                    while (k < n && (is_digit(s[k]) || (s[k] == '_' && k + 1 < n && is_digit(s[k + 1])))) {
                        if (s[k] != '_' && bl < sizeof buf - 1) buf[bl++] = s[k];
                        k++;
                    }
                    isf = 1;
                }
                if (k < n && (s[k] == 'e' || s[k] == 'E')) {
                    size_t m = k + 1;
                    if (m < n && (s[m] == '+' || s[m] == '-')) m++;
                    if (m < n && is_digit(s[m])) {
                        for (size_t q = k; q < m; q++) if (bl < sizeof buf - 1) buf[bl++] = s[q];
                        while (m < n && (is_digit(s[m]) || (s[m] == '_' && m + 1 < n && is_digit(s[m + 1])))) {
                            if (s[m] != '_' && bl < sizeof buf - 1) buf[bl++] = s[m];
                            m++;
                        }
                        k = m;
                        isf = 1;
                    }
                }
            }
            buf[bl] = 0;
            if (isf) {
                tok *t = push(P, T_FLOAT, L->line);
                t->f = strtod(buf, NULL);
                L->pos = k;
                continue;
            }
            /* integers: decimal (0x/0o/0b are rare in templates and refused) */
            if (j < n && (s[j] == 'x' || s[j] == 'o' || s[j] == 'b' || s[j] == 'X' || s[j] == 'O' || s[j] == 'B') &&
                c == '0')
                pfail(P, L->line, "hexadecimal, octal and binary literals are not supported");
            if (c == '0' && bl > 1) {
                size_t z = 1;
                while (z < bl && buf[z] == '0') z++;
                if (z < bl) pfail(P, L->line, "leading zeros in a decimal integer literal are not permitted");
            }
            if (bl > 18) pfail(P, L->line, "integer literal %s is too large", buf);
            tok *t = push(P, T_INT, L->line);
            t->i = strtoll(buf, NULL, 10);
            L->pos = j;
            continue;
        }
        if (is_ident0(c)) {
            size_t j = p;
            while (j < n && is_ident(s[j])) j++;
            tok *t = push(P, T_NAME, L->line);
            t->s = jj__strndup(P->a, s + p, j - p);
            t->len = j - p;
            L->pos = j;
            continue;
        }
        if (c == '\'' || c == '"') {
            lex_string(L, p, c);
            continue;
        }
        size_t ol = 0;
        for (size_t k = 0; k < sizeof OPS2 / sizeof *OPS2; k++)
            if (n - p >= 2 && s[p] == OPS2[k][0] && s[p + 1] == OPS2[k][1]) ol = 2;
        if (!ol && strchr(OPS1, c) && c) ol = 1;
        if (!ol) {
            if ((unsigned char)c >= 0x80) pfail(P, L->line, "unexpected character in a tag (identifiers must be ASCII)");
            pfail(P, L->line, "unexpected char '%c'", c);
        }
        if (ol == 1 && (c == '(' || c == '[' || c == '{')) {
            if (depth == (int)sizeof stack) pfail(P, L->line, "brackets nest too deeply");
            stack[depth++] = c == '(' ? ')' : c == '[' ? ']' : '}';
        } else if (ol == 1 && (c == ')' || c == ']' || c == '}')) {
            if (depth == 0) pfail(P, L->line, "unexpected '%c'", c);
            if (stack[depth - 1] != c) pfail(P, L->line, "unexpected '%c', expected '%c'", c, stack[depth - 1]);
            depth--;
        }
        tok *t = push(P, T_OP, L->line);
        t->s = jj__strndup(P->a, s + p, ol);
        t->len = ol;
        L->pos = p + ol;
    }
}

/* `{% raw %}` at s[p] (after "{%" and its sign): the length of the whole
 * opening tag, or 0 when this is not a raw tag. */
static size_t raw_open(const char *s, size_t p, size_t n)
{
    size_t j = p + ws_run(s, p, n);
    if (n - j < 3 || memcmp(s + j, "raw", 3) != 0) return 0;
    j += 3;
    j += ws_run(s, j, n);
    if (n - j >= 3 && s[j] == '-' && s[j + 1] == '%' && s[j + 2] == '}') return j + 3 + ws_run(s, j + 3, n) - p;
    if (n - j >= 2 && s[j] == '%' && s[j + 1] == '}') return j + 2 - p;
    return 0;
}

static void lex(parser *P, const char *src, size_t len)
{
    /* newlines -> \n, one trailing newline dropped */
    char *s = jj__alloc(P->a, len + 1);
    size_t n = 0;
    for (size_t i = 0; i < len; i++) {
        if (src[i] == '\r') {
            s[n++] = '\n';
            if (i + 1 < len && src[i + 1] == '\n') i++;
        } else {
            s[n++] = src[i];
        }
    }
    if (n && s[n - 1] == '\n') n--;
    s[n] = 0;
    lexer L = { P, s, n, 0, 1 };
    int line_starting = 1;
    while (L.pos < n) {
        size_t p = L.pos, t = p;
        int kind = 0;
        while (t + 1 < n) {
            if (s[t] == '{' && (s[t + 1] == '{' || s[t + 1] == '%' || s[t + 1] == '#')) {
                kind = s[t + 1];
                break;
            }
            t++;
        }
        if (!kind) {
            emit_data(&L, s + p, n - p, L.line);
            break;
        }
        char sign = t + 2 < n && (s[t + 2] == '-' || s[t + 2] == '+') ? s[t + 2] : 0;
        size_t body = t + 2 + (sign ? 1 : 0);
        size_t rawlen = kind == '%' ? raw_open(s, body, n) : 0;
        size_t keep = strip_before(s + p, t - p, sign, kind == '{', line_starting);
        emit_data(&L, s + p, keep, L.line);
        L.line += count_nl(s + p, t - p);
        if (rawlen) {
            /* raw: everything up to {% endraw %} is data */
            int line0 = L.line;
            size_t q = body + rawlen;
            L.line += count_nl(s + t, q - t);
            int ls = s[q - 1] == '\n';
            size_t e = q;
            size_t tag_end = 0;
            char esign = 0;
            for (; e + 1 < n; e++) {
                if (s[e] != '{' || s[e + 1] != '%') continue;
                size_t j = e + 2;
                esign = j < n && (s[j] == '-' || s[j] == '+') ? s[j] : 0;
                if (esign) j++;
                j += ws_run(s, j, n);
                if (n - j < 6 || memcmp(s + j, "endraw", 6) != 0) continue;
                j += 6;
                j += ws_run(s, j, n);
                if (n - j >= 3 && s[j] == '+' && s[j + 1] == '%' && s[j + 2] == '}') tag_end = j + 3;
                else if (n - j >= 3 && s[j] == '-' && s[j + 1] == '%' && s[j + 2] == '}')
                    tag_end = j + 3 + ws_run(s, j + 3, n);
                else if (n - j >= 2 && s[j] == '%' && s[j + 1] == '}')
                    tag_end = j + 2 + (j + 2 < n && s[j + 2] == '\n');
                if (tag_end) break;
            }
            if (!tag_end) pfail(P, line0, "missing end of raw directive");
            size_t k = strip_before(s + q, e - q, esign, 0, ls);
            emit_data(&L, s + q, k, L.line);
            L.line += count_nl(s + q, tag_end - q);
            line_starting = s[tag_end - 1] == '\n';
            L.pos = tag_end;
            continue;
        }
        if (kind == '#') {
            size_t e = body;
            while (e + 1 < n && !(s[e] == '#' && s[e + 1] == '}')) e++;
            if (e + 1 >= n) pfail(P, L.line, "missing end of comment tag");
            size_t after = e + 2;
            if (e > body && s[e - 1] == '-') after += ws_run(s, after, n);
            else if (!(e > body && s[e - 1] == '+') && after < n && s[after] == '\n') after++;
            L.line += count_nl(s + t, after - t);
            line_starting = s[after - 1] == '\n';
            L.pos = after;
            continue;
        }
        push(P, kind == '{' ? T_VAR_BEGIN : T_BLOCK_BEGIN, L.line);
        L.pos = body;
        lex_tag(&L, kind == '{', &line_starting);
    }
    push(P, T_EOF, L.line);
}

/* ---- parser helpers ------------------------------------------------------------ */

static tok *cur(parser *P) { return &P->t[P->i]; }
static tok *peek(parser *P, size_t k) { return P->i + k < P->nt ? &P->t[P->i + k] : &P->t[P->nt - 1]; }
static void adv(parser *P) { if (P->t[P->i].type != T_EOF) P->i++; }

static int is_op(const tok *t, const char *op)
{
    return t->type == T_OP && t->len == strlen(op) && memcmp(t->s, op, t->len) == 0;
}

static int is_name(const tok *t, const char *name)
{
    return t->type == T_NAME && strcmp(t->s, name) == 0;
}

static const char *describe(const tok *t)
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

static void expect_op(parser *P, const char *op)
{
    if (!is_op(cur(P), op)) pfail(P, cur(P)->line, "expected '%s', got '%s'", op, describe(cur(P)));
    adv(P);
}

static const char *expect_name(parser *P)
{
    if (cur(P)->type != T_NAME) pfail(P, cur(P)->line, "expected a name, got '%s'", describe(cur(P)));
    const char *s = cur(P)->s;
    adv(P);
    return s;
}

static void expect_type(parser *P, int type, const char *what)
{
    if (cur(P)->type != type) pfail(P, cur(P)->line, "expected %s, got '%s'", what, describe(cur(P)));
    adv(P);
}

static jj_node *node(parser *P, int kind, int line)
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

static void nl_add(parser *P, nlist *l, jj_node *x)
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

static void enter(parser *P)
{
    if (++P->depth > 200) pfail(P, cur(P)->line, "the template nests expressions or blocks too deeply");
}

/* ---- expressions ---------------------------------------------------------------- */

static jj_node *parse_expression(parser *P, int with_condexpr);
static jj_node *parse_unary(parser *P, int with_filter);
static jj_node *parse_primary(parser *P);
static jj_node *parse_postfix(parser *P, jj_node *n);
static jj_node *parse_tuple(parser *P, int simplified, int with_condexpr, const char *extra_end, int explicit_parens);

static void parse_call_args(parser *P, jj_args *out)
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
            pfail(P, line, "*args and **kwargs in calls are not supported");
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
            if (kw.n) pfail(P, line, "invalid syntax for function call expression (a positional argument after a keyword)");
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
static const char *dotted_name(parser *P)
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
static jj_node *parse_filter(parser *P, jj_node *in, int start_inline)
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

static jj_node *parse_test(parser *P, jj_node *in)
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
    tok *c = cur(P);
    if (is_op(c, "(")) {
        parse_call_args(P, &t->args);
    } else if ((c->type == T_NAME || c->type == T_STRING || c->type == T_INT || c->type == T_FLOAT || is_op(c, "[") ||
                is_op(c, "{")) &&
               !is_name(c, "else") && !is_name(c, "or") && !is_name(c, "and")) {
        if (is_name(c, "is")) pfail(P, line, "You cannot chain multiple tests with is");
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

static jj_node *parse_filter_expr(parser *P, jj_node *n)
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

static jj_node *parse_subscribed(parser *P)
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

static jj_node *parse_postfix(parser *P, jj_node *n)
{
    while (1) {
        tok *t = cur(P);
        if (is_op(t, ".")) {
            adv(P);
            tok *a = cur(P);
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
                pfail(P, a->line, "expected name or number");
            }
        } else if (is_op(t, "[")) {
            adv(P);
            nlist l = { 0 };
            while (!is_op(cur(P), "]")) {
                if (l.n) expect_op(P, ",");
                nl_add(P, &l, parse_subscribed(P));
            }
            expect_op(P, "]");
            if (l.n == 0) pfail(P, t->line, "expected an expression in []");
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

static jj_node *parse_primary(parser *P)
{
    tok *t = cur(P);
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
        pfail(P, t->line, "unexpected '%s'", describe(t));
    }
    P->depth--;
    return n;
}

static jj_node *parse_unary(parser *P, int with_filter)
{
    tok *t = cur(P);
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

static jj_node *bin(parser *P, int op, int line, jj_node *a, jj_node *b)
{
    jj_node *n = node(P, N_BIN, line);
    n->op = (uint16_t)op;
    n->a = a;
    n->b = b;
    return n;
}

static jj_node *parse_pow(parser *P)
{
    jj_node *l = parse_unary(P, 1);
    while (is_op(cur(P), "**")) {
        int line = cur(P)->line;
        adv(P);
        l = bin(P, OP_POW, line, l, parse_unary(P, 1));
    }
    return l;
}

static jj_node *parse_math2(parser *P)
{
    jj_node *l = parse_pow(P);
    while (1) {
        tok *t = cur(P);
        int op = is_op(t, "*") ? OP_MUL : is_op(t, "/") ? OP_DIV : is_op(t, "//") ? OP_FLOORDIV : is_op(t, "%") ? OP_MOD : -1;
        if (op < 0) return l;
        adv(P);
        l = bin(P, op, t->line, l, parse_pow(P));
    }
}

static jj_node *parse_concat(parser *P)
{
    jj_node *l = parse_math2(P);
    while (is_op(cur(P), "~")) {
        int line = cur(P)->line;
        adv(P);
        l = bin(P, OP_CONCAT, line, l, parse_math2(P));
    }
    return l;
}

static jj_node *parse_math1(parser *P)
{
    jj_node *l = parse_concat(P);
    while (is_op(cur(P), "+") || is_op(cur(P), "-")) {
        tok *t = cur(P);
        adv(P);
        l = bin(P, is_op(t, "+") ? OP_ADD : OP_SUB, t->line, l, parse_concat(P));
    }
    return l;
}

static jj_node *parse_compare(parser *P)
{
    int line = cur(P)->line;
    jj_node *first = parse_math1(P);
    nlist ops = { 0 };
    uint8_t kinds[64];
    while (1) {
        tok *t = cur(P);
        int k = is_op(t, "==") ? CMP_EQ : is_op(t, "!=") ? CMP_NE : is_op(t, "<") ? CMP_LT : is_op(t, "<=") ? CMP_LE
              : is_op(t, ">") ? CMP_GT : is_op(t, ">=") ? CMP_GE : is_name(t, "in") ? CMP_IN : -1;
        if (k >= 0) adv(P);
        else if (is_name(t, "not") && is_name(peek(P, 1), "in")) {
            adv(P);
            adv(P);
            k = CMP_NOTIN;
        } else break;
        if (ops.n == sizeof kinds) pfail(P, t->line, "comparison chain too long");
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

static jj_node *parse_not(parser *P)
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

static jj_node *parse_and(parser *P)
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

static jj_node *parse_or(parser *P)
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

static jj_node *parse_condexpr(parser *P)
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

static jj_node *parse_expression(parser *P, int with_condexpr)
{
    enter(P);
    jj_node *n = with_condexpr ? parse_condexpr(P) : parse_or(P);
    P->depth--;
    return n;
}

static int tuple_end(parser *P, const char *extra_end)
{
    tok *t = cur(P);
    return t->type == T_VAR_END || t->type == T_BLOCK_END || t->type == T_EOF || is_op(t, ")") ||
           (extra_end && is_name(t, extra_end));
}

static jj_node *parse_tuple(parser *P, int simplified, int with_condexpr, const char *extra_end, int explicit_parens)
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
        if (!explicit_parens) pfail(P, line, "Expected an expression, got '%s'", describe(cur(P)));
    }
    jj_node *n = node(P, N_TUPLE, line);
    n->list = nl_done(&l);
    return n;
}

/* ---- statements ------------------------------------------------------------------- */

static jj_nodes subparse(parser *P, const char *const *ends, const char **found);

/* Names to assign: `a`, `a, b`, `(a, b)`. */
static void parse_targets(parser *P, jj_node *n, const char *extra_end)
{
    int line = cur(P)->line;
    jj_node *t = parse_tuple(P, 1, 0, extra_end, 0);
    if (t->kind == N_NAME) {
        n->targets = jj__alloc(P->a, sizeof *n->targets);
        n->targets[0] = t->name;
        n->n_targets = 1;
        return;
    }
    if (t->kind != N_TUPLE) pfail(P, line, "can't assign to %s", t->kind == N_CONST ? "a constant" : "an expression");
    n->targets = jj__alloc(P->a, (t->list.n ? t->list.n : 1) * sizeof *n->targets);
    for (size_t i = 0; i < t->list.n; i++) {
        if (t->list.v[i]->kind != N_NAME) pfail(P, line, "only names can be unpacked into");
        n->targets[i] = t->list.v[i]->name;
    }
    n->n_targets = t->list.n;
    n->target_tuple = 1;
}

static void end_block(parser *P)
{
    expect_type(P, T_BLOCK_END, "end of statement block");
}

/* Parses statements up to one of ends, consumes the end tag
 * ({% endX %}) when drop_end and returns the body. */
static jj_nodes body_until(parser *P, const char *const *ends, const char **found, int drop_end)
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
static void parse_signature(parser *P, jj_node *n)
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
            pfail(P, cur(P)->line, "non-default argument follows default argument");
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

static jj_node *parse_statement(parser *P)
{
    tok *t = cur(P);
    int line = t->line;
    if (t->type != T_NAME) pfail(P, line, "tag name expected");
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
        if (!is_name(cur(P), "in")) pfail(P, cur(P)->line, "expected 'in', got '%s'", describe(cur(P)));
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
                if (n->n_targets != 1 || n->target_tuple) pfail(P, line, "a block set assigns one name");
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
        if (n->a->kind != N_CALL) pfail(P, line, "expected a call expression after {%% call %%}");
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
        if (!P->loops) pfail(P, line, "'%s' outside of a loop", kw);
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
        pfail(P, line, "'{%% %s %%}' is not supported in chat templates", kw);
    } else {
        pfail(P, line, "Encountered unknown tag '%s'", kw);
    }
    P->depth--;
    return n;
}

static jj_nodes subparse(parser *P, const char *const *ends, const char **found)
{
    nlist body = { 0 };
    while (1) {
        tok *t = cur(P);
        if (t->type == T_EOF) {
            if (ends) {
                char want[128] = "";
                for (int i = 0; ends[i]; i++) {
                    size_t l = strlen(want);
                    snprintf(want + l, sizeof want - l, "%s'%s'", i ? " or " : "", ends[i]);
                }
                pfail(P, t->line, "Unexpected end of template. Jinja was looking for the following tags: %s", want);
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
            tok *name = cur(P);
            if (ends && name->type == T_NAME)
                for (int i = 0; ends[i]; i++)
                    if (!strcmp(name->s, ends[i])) {
                        *found = ends[i];
                        return nl_done(&body);
                    }
            if (name->type == T_NAME && (!strncmp(name->s, "end", 3) || !strcmp(name->s, "elif") ||
                                         !strcmp(name->s, "else")))
                pfail(P, name->line, "Encountered unknown tag '%s'.%s", name->s,
                      ends ? " Jinja was looking for another end tag here" : "");
            nl_add(P, &body, parse_statement(P));
        } else {
            pfail(P, t->line, "unexpected '%s'", describe(t));
        }
    }
    return nl_done(&body);
}

/* An unknown filter or test is a syntax error, except where jinja2 defers
 * it to run time: inside an if statement (its tests and branches) or an
 * inline if expression of the same frame; loops, macros, block sets, with,
 * call and filter blocks open a new frame where the check applies again. */
static void check_builtins(parser *P, const jj_node *n, int soft);

static void check_list(parser *P, const jj_nodes *l, int soft)
{
    for (size_t i = 0; i < l->n; i++)
        if (l->v[i]) check_builtins(P, l->v[i], soft);
}

static void check_builtins(parser *P, const jj_node *n, int soft)
{
    if (!n) return;
    if ((n->kind == N_FILTER || n->kind == N_TEST) && !n->fn && !soft)
        pfail(P, n->line, "No %s named '%s'.", n->kind == N_FILTER ? "filter" : "test", n->name);
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
static int parse_run(parser *P)
{
    if (setjmp(P->jb)) return P->status;
    lex(P, P->src, P->src_len);
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
    parser *P = calloc(1, sizeof *P);
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
