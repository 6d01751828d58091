/*
 * jinja_lex.c — Jinja template text -> tokens.
 *
 * jinja2's (3.1) lexer rules with the environment transformers uses:
 * newlines normalised to \n and one trailing newline dropped
 * (keep_trailing_newline=False); `{%-`/`-%}` strip all whitespace (Python's
 * str.isspace) before/after a tag; trim_blocks drops the first newline after
 * a block or comment tag; lstrip_blocks strips the spaces before a block or
 * comment tag that starts a line; `+` on a tag disables both.  Inside tags:
 * names, Python string literals (unicode-escape rules), integers, floats and
 * operators, with brackets balanced so that `}}` inside a dict literal does
 * not end a print tag.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "jinja_priv.h"

void jj__parse_fail(jj_parser *P, int line, const char *fmt, ...)
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

static jj_tok *push(jj_parser *P, int type, int line)
{
    if (P->nt == P->cap) {
        size_t cap = P->cap ? P->cap * 2 : 256;
        jj_tok *t = jj__alloc(P->a, cap * sizeof *t);
        if (P->nt) memcpy(t, P->t, P->nt * sizeof *t);
        P->t = t;
        P->cap = cap;
    }
    jj_tok *t = &P->t[P->nt++];
    memset(t, 0, sizeof *t);
    t->type = type;
    t->line = line;
    return t;
}

/* ---- lexer ------------------------------------------------------------------- */

typedef struct lexer {
    jj_parser *P;
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
    jj_tok *t = push(L->P, T_DATA, line);
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
    jj_parser *P = L->P;
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
        if (i >= L->n) jj__parse_fail(P, line, "unexpected end of string literal");
        char c = L->s[i];
        if (c == q) break;
        if (c == '\n') L->line++;
        if (c != '\\') {
            o[w++] = c;
            i++;
            continue;
        }
        if (i + 1 >= L->n) jj__parse_fail(P, line, "unexpected end of string literal");
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
        case 'N': jj__parse_fail(P, line, "\\N{...} escapes in string literals are not supported");
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
            if (h < 0) jj__parse_fail(P, line, "truncated \\%c escape in a string literal", e);
            cp = cp * 16 + (uint32_t)h;
            i++;
        }
        if (cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))
            jj__parse_fail(P, line, "a string literal escapes an invalid character (U+%04X)", cp);
        w += jj__utf8_enc(cp, o + w);
    }
    jj_tok *t = push(P, T_STRING, line);
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
    jj_parser *P = L->P;
    char stack[64];
    int depth = 0;
    const char *s = L->s;
    size_t n = L->n;
    while (1) {
        size_t p = L->pos;
        if (p >= n) jj__parse_fail(P, L->line, "unexpected end of template: a %s tag is not closed", is_var ? "{{" : "{%");
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
                jj_tok *t = push(P, T_FLOAT, L->line);
                t->f = strtod(buf, NULL);
                L->pos = k;
                continue;
            }
            /* integers: decimal (0x/0o/0b are rare in templates and refused) */
            if (j < n && (s[j] == 'x' || s[j] == 'o' || s[j] == 'b' || s[j] == 'X' || s[j] == 'O' || s[j] == 'B') &&
                c == '0')
                jj__parse_fail(P, L->line, "hexadecimal, octal and binary literals are not supported");
            if (c == '0' && bl > 1) {
                size_t z = 1;
                while (z < bl && buf[z] == '0') z++;
                if (z < bl) jj__parse_fail(P, L->line, "leading zeros in a decimal integer literal are not permitted");
            }
            if (bl > 18) jj__parse_fail(P, L->line, "integer literal %s is too large", buf);
            jj_tok *t = push(P, T_INT, L->line);
            t->i = strtoll(buf, NULL, 10);
            L->pos = j;
            continue;
        }
        if (is_ident0(c)) {
            size_t j = p;
            while (j < n && is_ident(s[j])) j++;
            jj_tok *t = push(P, T_NAME, L->line);
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
            if ((unsigned char)c >= 0x80) jj__parse_fail(P, L->line, "unexpected character in a tag (identifiers must be ASCII)");
            jj__parse_fail(P, L->line, "unexpected char '%c'", c);
        }
        if (ol == 1 && (c == '(' || c == '[' || c == '{')) {
            if (depth == (int)sizeof stack) jj__parse_fail(P, L->line, "brackets nest too deeply");
            stack[depth++] = c == '(' ? ')' : c == '[' ? ']' : '}';
        } else if (ol == 1 && (c == ')' || c == ']' || c == '}')) {
            if (depth == 0) jj__parse_fail(P, L->line, "unexpected '%c'", c);
            if (stack[depth - 1] != c) jj__parse_fail(P, L->line, "unexpected '%c', expected '%c'", c, stack[depth - 1]);
            depth--;
        }
        jj_tok *t = push(P, T_OP, L->line);
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

void jj__lex(jj_parser *P, const char *src, size_t len)
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
            if (!tag_end) jj__parse_fail(P, line0, "missing end of raw directive");
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
            if (e + 1 >= n) jj__parse_fail(P, L.line, "missing end of comment tag");
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
