/*
 * tok_pretok.c — the tokenizer's pre-tokenizer: loading the "pre_tokenizer"
 * steps of tokenizer.json (Split with a regex or a string, behaviour
 * Isolated; ByteLevel with or without GPT-2's regex), translating each
 * Oniguruma pattern into a PCRE2 pattern with the same meaning, and
 * splitting text with them.
 *
 * Why a translation: tokenizers compiles the pattern with Oniguruma (crate
 * onig), whose Unicode is 16.0.0 and whose syntax differs from PCRE2's in
 * places; mkad keeps PCRE2 (JIT) as the engine.  So that every code point
 * splits as in tokenizers:
 *   - \p{..} / \P{..} / \p{^..} with a General_Category name (short or long,
 *     any case, '_' '-' ' ' ignored; L, Lu, Letter, Cased_Letter, P, Po, ...)
 *     and Any / Assigned become classes built from tok_unicode_tables.c:
 *     PCRE2's own \p{..} plus the code points whose category changed since
 *     PCRE2's Unicode version when it is the tables' base (14.0.0), PCRE2's
 *     \p{..} alone when it is the tables' version, and explicit code point
 *     ranges when it is neither or when a category lost code points (Cn, Mn);
 *   - \p{..} with a script (Script, not Script_Extensions, as Oniguruma:
 *     Han, Latin, Hira, Zyyy, Unknown, ...) or a binary property that the
 *     tables have (Alphabetic, White_Space, Emoji, ...: those on which
 *     Oniguruma and the regex package's Unicode 16 agree) becomes explicit
 *     ranges;
 *   - \d \D are \p{Nd} \P{Nd}; \s \S are White_Space; \h \H an ASCII hex
 *     digit or not; \v is U+000B; \uHHHH is \x{HHHH};
 *   - '.' matches a newline, '^' and '$' are line anchors, {,n} is {0,n},
 *     as in Oniguruma's syntax;
 *   - constructs whose meaning differs and that real tokenizers do not use
 *     (\w \b: Oniguruma's Word is neither Unicode's nor PCRE2's; POSIX
 *     brackets, nested classes, &&, inline options other than i and x, a
 *     property under (?i)) are refused at load with the construct named,
 *     never translated into something that splits otherwise.
 * tests/tokenizer_unicode.sh checks all 1,114,112 code points in context
 * against tokenizers for each pattern style the loader is known to meet.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tok_priv.h"

/* ---- General_Category sets --------------------------------------------------- */

#define GC(x) (1u << TOK_GC_##x)
#define GC_L (GC(LU) | GC(LL) | GC(LT) | GC(LM) | GC(LO))
#define GC_LC (GC(LU) | GC(LL) | GC(LT))
#define GC_M (GC(MN) | GC(MC) | GC(ME))
#define GC_N (GC(ND) | GC(NL) | GC(NO))
#define GC_P (GC(PC) | GC(PD) | GC(PS) | GC(PE) | GC(PI) | GC(PF) | GC(PO))
#define GC_S (GC(SM) | GC(SC) | GC(SK) | GC(SO))
#define GC_Z (GC(ZS) | GC(ZL) | GC(ZP))
#define GC_C (GC(CC) | GC(CF) | GC(CS) | GC(CO) | GC(CN))
#define GC_ALL ((1u << TOK_GC_COUNT) - 1)

/* PCRE2's names of the categories, in TOK_GC_* order. */
static const char gc_name[TOK_GC_COUNT][3] = {
    "Lu", "Ll", "Lt", "Lm", "Lo", "Mn", "Mc", "Me", "Nd", "Nl", "No", "Pc", "Pd", "Ps", "Pe",
    "Pi", "Pf", "Po", "Sm", "Sc", "Sk", "So", "Zs", "Zl", "Zp", "Cc", "Cf", "Cs", "Co", "Cn",
};

/* The property names Oniguruma accepts for these sets, as compared: lower
 * case, without '_', '-' and ' ' (PropertyValueAliases.txt, gc). */
static const struct { const char *name; uint32_t set; } gc_props[] = {
    { "l", GC_L }, { "letter", GC_L }, { "lc", GC_LC }, { "casedletter", GC_LC },
    { "lu", GC(LU) }, { "uppercaseletter", GC(LU) }, { "ll", GC(LL) }, { "lowercaseletter", GC(LL) },
    { "lt", GC(LT) }, { "titlecaseletter", GC(LT) }, { "lm", GC(LM) }, { "modifierletter", GC(LM) },
    { "lo", GC(LO) }, { "otherletter", GC(LO) },
    { "m", GC_M }, { "mark", GC_M }, { "combiningmark", GC_M }, { "mn", GC(MN) }, { "nonspacingmark", GC(MN) },
    { "mc", GC(MC) }, { "spacingmark", GC(MC) }, { "me", GC(ME) }, { "enclosingmark", GC(ME) },
    { "n", GC_N }, { "number", GC_N }, { "nd", GC(ND) }, { "decimalnumber", GC(ND) },
    { "nl", GC(NL) }, { "letternumber", GC(NL) }, { "no", GC(NO) }, { "othernumber", GC(NO) },
    { "p", GC_P }, { "punctuation", GC_P }, { "pc", GC(PC) }, { "connectorpunctuation", GC(PC) },
    { "pd", GC(PD) }, { "dashpunctuation", GC(PD) }, { "ps", GC(PS) }, { "openpunctuation", GC(PS) },
    { "pe", GC(PE) }, { "closepunctuation", GC(PE) }, { "pi", GC(PI) }, { "initialpunctuation", GC(PI) },
    { "pf", GC(PF) }, { "finalpunctuation", GC(PF) }, { "po", GC(PO) }, { "otherpunctuation", GC(PO) },
    { "s", GC_S }, { "symbol", GC_S }, { "sm", GC(SM) }, { "mathsymbol", GC(SM) },
    { "sc", GC(SC) }, { "currencysymbol", GC(SC) }, { "sk", GC(SK) }, { "modifiersymbol", GC(SK) },
    { "so", GC(SO) }, { "othersymbol", GC(SO) },
    { "z", GC_Z }, { "separator", GC_Z }, { "zs", GC(ZS) }, { "spaceseparator", GC(ZS) },
    { "zl", GC(ZL) }, { "lineseparator", GC(ZL) }, { "zp", GC(ZP) }, { "paragraphseparator", GC(ZP) },
    { "c", GC_C }, { "other", GC_C }, { "cc", GC(CC) }, { "control", GC(CC) }, { "cf", GC(CF) }, { "format", GC(CF) },
    { "cs", GC(CS) }, { "surrogate", GC(CS) }, { "co", GC(CO) }, { "privateuse", GC(CO) },
    { "cn", GC(CN) }, { "unassigned", GC(CN) },
    { "any", GC_ALL }, { "assigned", GC_ALL & ~GC(CN) },
};

/* PCRE2's group names, tried before single categories. */
static const struct { const char *name; uint32_t set; } gc_groups[] = {
    { "L", GC_L }, { "M", GC_M }, { "N", GC_N }, { "P", GC_P }, { "S", GC_S }, { "Z", GC_Z }, { "C", GC_C },
};

/* How category sets reach PCRE2, from the Unicode version it was built with. */
enum { UC_NATIVE, UC_PATCH, UC_EXPLICIT };
int tok__uc_mode_override = -1;

static int uc_mode(void)
{
    if (tok__uc_mode_override >= 0) return tok__uc_mode_override;
    char ver[32] = "";
    if (pcre2_config(PCRE2_CONFIG_UNICODE_VERSION, ver) < 0) return UC_EXPLICIT;
    if (strcmp(ver, tok_uc_version) == 0) return UC_NATIVE;
    if (strcmp(ver, tok_uc_base_version) == 0) return UC_PATCH;
    return UC_EXPLICIT;
}

static int put_cp(tok_buf *o, uint32_t c)
{
    char b[16];
    int l = snprintf(b, sizeof b, "\\x{%X}", (unsigned)c);
    return tok_buf_put(o, b, (size_t)l);
}

/* Appends "lo-hi" (or "lo") to a class body, leaving out surrogates, which
 * PCRE2 refuses in a UTF pattern and valid text never holds. */
static int put_range(tok_buf *o, uint32_t lo, uint32_t hi)
{
    if (lo <= 0xDFFF && hi >= 0xD800) {
        int rc = 0;
        if (lo < 0xD800) rc = put_range(o, lo, 0xD7FF);
        if (!rc && hi > 0xDFFF) rc = put_range(o, 0xE000, hi);
        return rc;
    }
    if (put_cp(o, lo)) return ENG_ENOMEM;
    if (hi == lo) return 0;
    return tok_buf_put(o, "-", 1) || put_cp(o, hi) ? ENG_ENOMEM : 0;
}

static int in_set(uint32_t set, uint32_t gc)
{
    return (set >> gc) & 1u;
}

/* The code points of set as explicit ranges (Unicode 16 categories). */
static int put_set_ranges(tok_buf *o, uint32_t set)
{
    int have = 0, cn = in_set(set, TOK_GC_CN);
    uint32_t lo = 0, hi = 0, next = 0; /* next: first code point not yet classified */
    for (size_t i = 0; i <= tok_uc_n_gc; i++) {
        uint32_t a = i < tok_uc_n_gc ? tok_uc_gc[i][0] : 0x110000, b = i < tok_uc_n_gc ? tok_uc_gc[i][1] : 0;
        /* the unassigned gap [next, a) then the run [a, b] */
        for (int part = 0; part < 2; part++) {
            uint32_t x, y;
            int take;
            if (part == 0) { if (a <= next) continue; x = next; y = a - 1; take = cn; }
            else { if (i == tok_uc_n_gc) break; x = a; y = b; take = in_set(set, tok_uc_gc[i][2]); }
            if (!take) continue;
            if (have && x == hi + 1) { hi = y; continue; }
            if (have && put_range(o, lo, hi)) return ENG_ENOMEM;
            lo = x; hi = y; have = 1;
        }
        if (i < tok_uc_n_gc) next = b + 1;
    }
    if (have && put_range(o, lo, hi)) return ENG_ENOMEM;
    /* \p{Cs} matches nothing in valid text: it keeps a class that would
     * otherwise be empty ("[]" means something else to PCRE2) valid */
    return tok_buf_put(o, "\\p{Cs}", 6);
}

/* Appends the items of a class body that matches exactly the code points
 * whose Unicode 16 General_Category is in set. */
static int put_set(tok_buf *o, uint32_t set)
{
    int mode = uc_mode();
    if (mode == UC_PATCH)
        for (size_t i = 0; i < tok_uc_n_gc_changes; i++)
            if (in_set(set, tok_uc_gc_changes[i][2]) && !in_set(set, tok_uc_gc_changes[i][3])) mode = UC_EXPLICIT;
    if (mode == UC_EXPLICIT) return put_set_ranges(o, set);
    uint32_t left = set;
    char item[8];
    for (size_t g = 0; g < sizeof gc_groups / sizeof gc_groups[0]; g++) {
        if ((left & gc_groups[g].set) != gc_groups[g].set) continue;
        int l = snprintf(item, sizeof item, "\\p{%s}", gc_groups[g].name);
        if (tok_buf_put(o, item, (size_t)l)) return ENG_ENOMEM;
        left &= ~gc_groups[g].set;
    }
    for (int k = 0; k < TOK_GC_COUNT; k++) {
        if (!in_set(left, (uint32_t)k)) continue;
        int l = snprintf(item, sizeof item, "\\p{%s}", gc_name[k]);
        if (tok_buf_put(o, item, (size_t)l)) return ENG_ENOMEM;
    }
    if (mode != UC_PATCH) return 0;
    /* what was Cn (or another category) in PCRE2's Unicode, adjacent runs
     * merged: PCRE2 tries a class's ranges one by one for every character
     * that its \p{..} items refuse, so fewer ranges match faster */
    uint32_t lo = 0, hi = 0;
    int have = 0;
    for (size_t i = 0; i < tok_uc_n_gc_changes; i++) {
        if (!in_set(set, tok_uc_gc_changes[i][3]) || in_set(set, tok_uc_gc_changes[i][2])) continue;
        uint32_t a = tok_uc_gc_changes[i][0], b = tok_uc_gc_changes[i][1];
        if (have && a == hi + 1) { hi = b; continue; }
        if (have && put_range(o, lo, hi)) return ENG_ENOMEM;
        lo = a; hi = b; have = 1;
    }
    return have && put_range(o, lo, hi) ? ENG_ENOMEM : 0;
}

/* Unicode White_Space (Oniguruma's \s), as ranges. */
static const uint32_t ws_ranges[][2] = {
    { 0x09, 0x0D }, { 0x20, 0x20 }, { 0x85, 0x85 }, { 0xA0, 0xA0 }, { 0x1680, 0x1680 }, { 0x2000, 0x200A },
    { 0x2028, 0x2029 }, { 0x202F, 0x202F }, { 0x205F, 0x205F }, { 0x3000, 0x3000 },
};
#define N_WS (sizeof ws_ranges / sizeof ws_ranges[0])

static int put_space(tok_buf *o, int negate)
{
    uint32_t next = 0;
    for (size_t i = 0; i < N_WS; i++) {
        if (!negate && put_range(o, ws_ranges[i][0], ws_ranges[i][1])) return ENG_ENOMEM;
        if (negate && ws_ranges[i][0] > next && put_range(o, next, ws_ranges[i][0] - 1)) return ENG_ENOMEM;
        next = ws_ranges[i][1] + 1;
    }
    return negate ? put_range(o, next, 0x10FFFF) : 0;
}

/* ---- the translation ----------------------------------------------------------- */

#define XL_MAX_DEPTH 64

typedef struct xl {
    const char *pat;
    size_t n, i;
    tok_buf *o;
    char *err;
    size_t errlen;
    /* case-insensitive matching in force, per open group: Oniguruma does
     * not fold \p{..} under (?i) and PCRE2 folds explicit ranges, so a
     * property there is refused rather than translated */
    int depth;
    unsigned char ci[XL_MAX_DEPTH + 1];
} xl;

static int xl_refuse(xl *x, size_t at, size_t len, const char *why)
{
    return eng__errf(x->err, x->errlen, ENG_EUNSUPPORTED,
                     "tokenizer.json: pre_tokenizer Split pattern: \"%.*s\" at byte %zu is not supported (%s); pattern: %.80s",
                     (int)(len > 24 ? 24 : len), x->pat + at, at, why, x->pat);
}

/* A property: a General_Category set (script and binary -1), a script (its
 * index; -2: Unknown, the code points of no script) or a binary property
 * (its index), negated or not. */
typedef struct prop {
    uint32_t set;
    int script, binary;
    int neg;
} prop;

/* Appends the ranges of the runs of index k in a run table sorted by code
 * point within each index (k == -2: of every index) or, with complement,
 * the code points outside them; then \p{Cs} (see put_set_ranges). */
static int put_runs(tok_buf *o, const uint32_t (*runs)[3], size_t n, int k, int complement)
{
    uint32_t lo = 0, hi = 0, next = 0;
    int have = 0;
    for (size_t i = 0; i <= n; i++) {
        int end = i == n;
        if (!end && k != -2 && (int)runs[i][2] != k) continue;
        uint32_t a = end ? 0x110000 : runs[i][0], b = end ? 0x110000 : runs[i][1];
        if (!end && have && a == hi + 1) { hi = b; continue; }
        if (have) { /* flush [lo, hi] */
            if (complement ? lo > next && put_range(o, next, lo - 1) : put_range(o, lo, hi)) return ENG_ENOMEM;
            next = hi + 1;
        }
        if (end) break;
        lo = a; hi = b; have = 1;
    }
    if (complement && next <= 0x10FFFF && put_range(o, next, 0x10FFFF)) return ENG_ENOMEM;
    return tok_buf_put(o, "\\p{Cs}", 6);
}

static int find_name(const tok_uc_name *names, size_t n, const char *key)
{
    for (size_t i = 0; i < n; i++)
        if (strcmp(key, names[i].name) == 0) return names[i].idx;
    return -1;
}

/* The class body of a property inside a class (complements included). */
static int put_prop(tok_buf *o, const prop *p)
{
    if (p->binary >= 0) return put_runs(o, tok_uc_binary, tok_uc_n_binary, p->binary, p->neg);
    if (p->script == -1) return put_set(o, p->neg ? GC_ALL & ~p->set : p->set);
    return put_runs(o, tok_uc_script, tok_uc_n_script, p->script, p->script == -2 ? !p->neg : p->neg);
}

/* Reads a property name after "\p{" / "\P{" at x->i into *pr: a
 * General_Category (or Any, Assigned), a script or a binary property,
 * negated for \P and \p{^..}. */
static int xl_prop(xl *x, int upper, prop *pr)
{
    size_t at = x->i, j = x->i + 3;
    if (x->ci[x->depth]) return xl_refuse(x, at, 3, "a property under the case-insensitive option (?i)");
    const char *end = memchr(x->pat + j, '}', x->n - j);
    if (!end) return xl_refuse(x, at, x->n - at, "unterminated property");
    size_t stop = (size_t)(end - x->pat);
    int neg = upper;
    if (j < stop && x->pat[j] == '^') { neg = !neg; j++; }
    char key[40];
    size_t k = 0;
    for (; j < stop; j++) {
        char c = x->pat[j];
        if (c == '_' || c == '-' || c == ' ') continue;
        if (k + 1 >= sizeof key) break;
        key[k++] = (char)(c >= 'A' && c <= 'Z' ? c - 'A' + 'a' : c);
    }
    key[k] = 0;
    pr->neg = neg;
    pr->script = pr->binary = -1;
    x->i = stop + 1;
    for (size_t p = 0; p < sizeof gc_props / sizeof gc_props[0]; p++) {
        if (strcmp(key, gc_props[p].name) != 0) continue;
        pr->set = gc_props[p].set;
        return 0;
    }
    if (strcmp(key, "unknown") == 0 || strcmp(key, "zzzz") == 0) {
        pr->script = -2;
        return 0;
    }
    if ((pr->script = find_name(tok_uc_script_names, tok_uc_n_script_names, key)) >= 0) return 0;
    if ((pr->binary = find_name(tok_uc_binary_names, tok_uc_n_binary_names, key)) >= 0) return 0;
    return xl_refuse(x, at, stop + 1 - at,
                     "not a General_Category, script or binary property that mkad's tables and Oniguruma "
                     "agree on (engine/tok_unicode_tables.c lists them)");
}

static int hexval(char c)
{
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

/* An escape other than \p \P \s \S \d \D at x->i (a backslash): copies what
 * means the same in PCRE2, rewrites \v and \uHHHH, refuses the rest. */
static int xl_escape(xl *x, int in_class)
{
    size_t at = x->i;
    if (at + 1 >= x->n) return xl_refuse(x, at, 1, "a trailing backslash");
    char e = x->pat[at + 1];
    unsigned char u = (unsigned char)e;
    if (u >= 0x80) { /* an escaped non-ASCII character is that character */
        size_t l = u >= 0xF0 ? 4 : u >= 0xE0 ? 3 : 2;
        if (at + 1 + l > x->n) l = x->n - at - 1;
        x->i = at + 1 + l;
        return tok_buf_put(x->o, x->pat + at, 1 + l);
    }
    if (e == 'v') { x->i = at + 2; return tok_buf_put(x->o, "\\x{B}", 5); }
    if (e == 'u') {
        uint32_t v = 0;
        for (int d = 0; d < 4; d++) {
            int h = at + 2 + (size_t)d < x->n ? hexval(x->pat[at + 2 + d]) : -1;
            if (h < 0) return xl_refuse(x, at, 2, "\\u needs four hex digits");
            v = v << 4 | (uint32_t)h;
        }
        x->i = at + 6;
        if (v >= 0xD800 && v <= 0xDFFF) return xl_refuse(x, at, 6, "a surrogate");
        return put_cp(x->o, v);
    }
    if (e == 'x') { /* \xHH or \x{H...}: the same in PCRE2 */
        size_t j = at + 2;
        if (j < x->n && x->pat[j] == '{') {
            const char *end = memchr(x->pat + j, '}', x->n - j);
            if (!end) return xl_refuse(x, at, x->n - at, "unterminated \\x{");
            j = (size_t)(end - x->pat) + 1;
        } else {
            while (j < x->n && j < at + 4 && hexval(x->pat[j]) >= 0) j++;
        }
        x->i = j;
        return tok_buf_put(x->o, x->pat + at, j - at);
    }
    int same = strchr("tnrfae", e) != NULL || (!in_class && strchr("AzZ", e) != NULL) ||
               (e >= '0' && e <= '9') || !((e >= 'a' && e <= 'z') || (e >= 'A' && e <= 'Z'));
    if (!same)
        return xl_refuse(x, at, 2, in_class && strchr("AzZ", e) ? "an anchor inside a class"
                                                                : "its meaning differs between Oniguruma and PCRE2");
    x->i = at + 2;
    return tok_buf_put(x->o, x->pat + at, 2);
}

/* Inside a class: one item.  Returns 1 when the class ended. */
static int xl_class_item(xl *x)
{
    const char *p = x->pat;
    size_t i = x->i;
    char c = p[i];
    if (c == ']') { x->i++; return tok_buf_put(x->o, "]", 1) ? ENG_ENOMEM : 1; }
    if (c == '[') return xl_refuse(x, i, 2, p[i + 1] == ':' ? "POSIX bracket classes differ between the engines"
                                                            : "nested character classes");
    if (c == '&' && i + 1 < x->n && p[i + 1] == '&') return xl_refuse(x, i, 2, "class intersection");
    if (c == '\\' && i + 1 < x->n) {
        char e = p[i + 1];
        prop pr;
        int rc;
        if ((e == 'p' || e == 'P') && i + 2 < x->n && p[i + 2] == '{') {
            if ((rc = xl_prop(x, e == 'P', &pr))) return rc;
            return put_prop(x->o, &pr);
        }
        if (e == 'd' || e == 'D') {
            if (x->ci[x->depth]) return xl_refuse(x, i, 2, "\\d under the case-insensitive option (?i)");
            x->i += 2;
            return put_set(x->o, e == 'd' ? GC(ND) : GC_ALL & ~GC(ND));
        }
        if (e == 's' || e == 'S') { x->i += 2; return put_space(x->o, e == 'S'); }
        if (e == 'h') { x->i += 2; return tok_buf_put(x->o, "0-9A-Fa-f", 9); } /* Oniguruma: a hex digit */
        if (e == 'H') {
            x->i += 2;
            return put_range(x->o, 0, 0x2F) || put_range(x->o, 0x3A, 0x40) || put_range(x->o, 0x47, 0x60) ||
                   put_range(x->o, 0x67, 0x10FFFF) ? ENG_ENOMEM : 0;
        }
        return xl_escape(x, 1);
    }
    x->i++;
    return tok_buf_put(x->o, &c, 1);
}

int tok__translate_regex(const char *pat, size_t n, tok_buf *o, char *err, size_t errlen)
{
    xl x = { .pat = pat, .n = n, .o = o, .err = err, .errlen = errlen };
    int rc = 0;
    while (x.i < n && !rc) {
        size_t i = x.i;
        char c = pat[i];
        if (c == '[') {
            rc = tok_buf_put(o, "[", 1);
            x.i++;
            /* a ']' right after '[' or '[^' is a literal */
            if (x.i < n && pat[x.i] == '^') { rc = rc || tok_buf_put(o, "^", 1); x.i++; }
            if (x.i < n && pat[x.i] == ']') { rc = rc || tok_buf_put(o, "\\]", 2); x.i++; }
            int end = 0;
            while (!rc && !end) {
                if (x.i >= n) return xl_refuse(&x, i, n - i, "unterminated class");
                int r = xl_class_item(&x);
                if (r < 0) return r;
                end = r == 1;
            }
            continue;
        }
        if (c == '\\' && i + 1 < n) {
            char e = pat[i + 1];
            prop pr = { 0, -1, -1, 0 };
            if ((e == 'p' || e == 'P') && i + 2 < n && pat[i + 2] == '{') {
                if ((rc = xl_prop(&x, e == 'P', &pr))) return rc;
                if (pr.script != -1 || pr.binary != -1) {
                    rc = tok_buf_put(o, "[", 1) || put_prop(o, &pr) || tok_buf_put(o, "]", 1);
                    continue;
                }
            } else if (e == 'h' || e == 'H') {
                x.i += 2;
                rc = tok_buf_put(o, e == 'h' ? "[0-9A-Fa-f]" : "[^0-9A-Fa-f]", e == 'h' ? 11 : 12);
                continue;
            } else if (e == 'd' || e == 'D') {
                if (x.ci[x.depth]) return xl_refuse(&x, i, 2, "\\d under the case-insensitive option (?i)");
                pr.set = GC(ND);
                pr.neg = e == 'D';
                x.i += 2;
            } else if (e == 's' || e == 'S') {
                x.i += 2;
                rc = tok_buf_put(o, e == 's' ? "[" : "[^", e == 's' ? 1 : 2) || put_space(o, 0) || tok_buf_put(o, "]", 1);
                continue;
            } else {
                rc = xl_escape(&x, 0);
                continue;
            }
            rc = tok_buf_put(o, pr.neg ? "[^" : "[", pr.neg ? 2 : 1) || put_set(o, pr.set) || tok_buf_put(o, "]", 1);
            continue;
        }
        if (c == '.') { x.i++; rc = tok_buf_put(o, "(?s:.)", 6); continue; }
        if (c == '^') { x.i++; rc = tok_buf_put(o, "(?m:^)", 6); continue; }
        if (c == '$') { x.i++; rc = tok_buf_put(o, "(?m:$)", 6); continue; }
        if (c == '{' && i + 1 < n && pat[i + 1] == ',') { x.i += 2; rc = tok_buf_put(o, "{0,", 3); continue; }
        if (c == '(') {
            /* inline options: i and x mean the same in both engines, m and s do not */
            size_t j = i + 2;
            int opts = 0, ci = x.ci[x.depth];
            if (i + 1 < n && pat[i + 1] == '?') {
                while (j < n && (pat[j] == '-' || (pat[j] >= 'a' && pat[j] <= 'z') || (pat[j] >= 'A' && pat[j] <= 'Z'))) j++;
                opts = j > i + 2 && j < n && (pat[j] == ')' || pat[j] == ':');
            }
            if (opts) {
                int on = 1;
                for (size_t k = i + 2; k < j; k++) {
                    if (pat[k] == '-') on = 0;
                    else if (pat[k] == 'i') ci = on;
                    else if (pat[k] != 'x') return xl_refuse(&x, i, j + 1 - i, "inline options other than i and x");
                }
            }
            if (opts && pat[j] == ')') {
                x.ci[x.depth] = (unsigned char)ci; /* for the rest of the enclosing group */
            } else {
                if (x.depth == XL_MAX_DEPTH) return xl_refuse(&x, i, 1, "groups nested deeper than 64");
                x.ci[++x.depth] = (unsigned char)ci;
            }
            if (opts) { /* "(?i)" or "(?i:" as it is */
                x.i = j + 1;
                rc = tok_buf_put(o, pat + i, j + 1 - i);
                continue;
            }
        }
        if (c == ')' && x.depth > 0) x.depth--;
        x.i++;
        rc = tok_buf_put(o, &c, 1);
    }
    if (rc < 0 && rc != ENG_ENOMEM) return rc;
    return rc ? eng__errf(err, errlen, ENG_ENOMEM, "tokenizer.json: out of memory") : 0;
}

/* ---- loading ------------------------------------------------------------------- */

static int compile_re(tok_re *r, const char *pat, size_t n, int literal, char *err, size_t errlen)
{
    tok_buf t = { 0 };
    int rc = literal ? tok_buf_put(&t, pat, n) : tok__translate_regex(pat, n, &t, err, errlen);
    if (rc == ENG_ENOMEM) eng__errf(err, errlen, rc, "tokenizer.json: out of memory");
    if (rc) {
        free(t.p);
        return rc;
    }
    int ec;
    PCRE2_SIZE eo;
    r->re = pcre2_compile((PCRE2_SPTR)t.p, t.n, PCRE2_UTF | PCRE2_UCP | (literal ? PCRE2_LITERAL : 0), &ec, &eo, NULL);
    free(t.p);
    if (!r->re) {
        PCRE2_UCHAR msg[256];
        pcre2_get_error_message(ec, msg, sizeof msg);
        return eng__errf(err, errlen, ENG_EUNSUPPORTED,
                         "tokenizer.json: pre_tokenizer Split pattern does not compile with PCRE2 (%s at %zu): %.80s",
                         (char *)msg, (size_t)eo, pat);
    }
    r->jit = pcre2_jit_compile(r->re, PCRE2_JIT_COMPLETE) == 0;
    return 0;
}

static int add_pretok_regex(eng_tok *t, const char *pat, size_t n, int literal, char *err, size_t errlen)
{
    if (t->n_re >= 4)
        return eng__errf(err, errlen, ENG_EUNSUPPORTED, "tokenizer.json: pre_tokenizer: more than 3 Split steps");
    int rc = compile_re(&t->re[t->n_re], pat, n, literal, err, errlen);
    if (rc == 0) t->n_re++;
    return rc;
}

/* GPT-2's pattern, used by ByteLevel when use_regex is true. */
static const char GPT2_RE[] = "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";

static int load_pretok_one(eng_tok *t, json_t *p, int *seen_bl, char *err, size_t errlen)
{
    const char *type = tok_jstr(p, "type");
    if (!type) return eng__errf(err, errlen, ENG_EFORMAT, "tokenizer.json: pre_tokenizer without \"type\"");
    if (*seen_bl)
        return eng__errf(err, errlen, ENG_EUNSUPPORTED,
                         "tokenizer.json: pre_tokenizer: \"%s\" after ByteLevel is not supported", type);
    if (strcmp(type, "Split") == 0) {
        const char *beh = tok_jstr(p, "behavior");
        if (!beh || strcmp(beh, "Isolated") != 0)
            return eng__errf(err, errlen, ENG_EUNSUPPORTED,
                             "tokenizer.json: pre_tokenizer Split behavior \"%s\" is not supported (only Isolated)",
                             beh ? beh : "(missing)");
        if (tok_jbool(p, "invert", 0))
            return eng__errf(err, errlen, ENG_EUNSUPPORTED, "tokenizer.json: pre_tokenizer Split invert=true is not supported");
        json_t *pat = json_object_get(p, "pattern");
        json_t *rx = json_object_get(pat, "Regex"), *st = json_object_get(pat, "String");
        if (json_is_string(rx))
            return add_pretok_regex(t, json_string_value(rx), json_string_length(rx), 0, err, errlen);
        if (json_is_string(st))
            return add_pretok_regex(t, json_string_value(st), json_string_length(st), 1, err, errlen);
        return eng__errf(err, errlen, ENG_EFORMAT, "tokenizer.json: pre_tokenizer Split: pattern.Regex or pattern.String expected");
    }
    if (strcmp(type, "ByteLevel") == 0) {
        *seen_bl = 1;
        t->add_prefix_space = tok_jbool(p, "add_prefix_space", 1);
        t->bl_stage = t->n_re;
        if (tok_jbool(p, "use_regex", 1)) return add_pretok_regex(t, GPT2_RE, strlen(GPT2_RE), 0, err, errlen);
        return 0;
    }
    return eng__errf(err, errlen, ENG_EUNSUPPORTED,
                     "tokenizer.json: pre_tokenizer type \"%s\" is not supported (Split, ByteLevel)", type);
}

int tok__load_pretok(eng_tok *t, json_t *p, char *err, size_t errlen)
{
    int seen_bl = 0, rc = 0;
    if (!json_is_object(p))
        return eng__errf(err, errlen, ENG_EUNSUPPORTED,
                         "tokenizer.json: pre_tokenizer is missing; only byte-level BPE (ByteLevel) is supported");
    const char *type = tok_jstr(p, "type");
    if (type && strcmp(type, "Sequence") == 0) {
        json_t *arr = json_object_get(p, "pretokenizers");
        size_t i;
        json_t *x;
        if (!json_is_array(arr)) return eng__errf(err, errlen, ENG_EFORMAT, "tokenizer.json: pre_tokenizer.pretokenizers is not an array");
        json_array_foreach(arr, i, x) if ((rc = load_pretok_one(t, x, &seen_bl, err, errlen))) return rc;
    } else if ((rc = load_pretok_one(t, p, &seen_bl, err, errlen))) {
        return rc;
    }
    if (!seen_bl)
        return eng__errf(err, errlen, ENG_EUNSUPPORTED,
                         "tokenizer.json: pre_tokenizer has no ByteLevel step; only byte-level BPE is supported");
    return 0;
}

/* ---- splitting ------------------------------------------------------------------ */

/* Splits s with regex stage k (behaviour Isolated: matches and the gaps
 * between them are pieces) and hands every piece to stage k + 1. */
static int pretok_split(tok_enc *c, const char *s, size_t n, int k)
{
    const eng_tok *t = c->t;
    if (k >= t->n_re) {
        if (!c->words_only) return tok__encode_word(c, (const unsigned char *)s, n);
        int32_t a = (int32_t)(s - c->words_base);
        return tok_ivec_push(c->words, a) || tok_ivec_push(c->words, a + (int32_t)n) ? ENG_ENOMEM : 0;
    }
    const tok_re *r = &t->re[k];
    size_t pos = 0, gap = 0;
    while (pos <= n) {
        int m = pcre2_match(r->re, (PCRE2_SPTR)s, n, pos, PCRE2_NO_UTF_CHECK, c->md, NULL);
        if (m == PCRE2_ERROR_NOMATCH) break;
        if (m < 0) {
            PCRE2_UCHAR msg[128];
            pcre2_get_error_message(m, msg, sizeof msg);
            return eng__errf(c->err, c->errlen, ENG_ERANGE, "tokenizer: pre-tokenizer regex failed: %s", (char *)msg);
        }
        PCRE2_SIZE *ov = pcre2_get_ovector_pointer(c->md);
        size_t a = ov[0], b = ov[1];
        if (b == a) { /* an empty match is no piece: step over one character */
            if (a >= n) break;
            pos = a + 1;
            while (pos < n && ((unsigned char)s[pos] & 0xC0) == 0x80) pos++;
            continue;
        }
        int rc;
        if (a > gap && (rc = tok__pretok(c, s + gap, a - gap, k + 1))) return rc;
        if ((rc = tok__pretok(c, s + a, b - a, k + 1))) return rc;
        gap = pos = b;
    }
    return gap < n ? tok__pretok(c, s + gap, n - gap, k + 1) : 0;
}

/* Pre-tokenizer stage k over s: the Split regexes in order; at the ByteLevel
 * stage a piece that does not start with a space gets one first (tokenizers
 * does this per piece), then ByteLevel's own regex when it has one; the
 * words reach BPE. */
int tok__pretok(tok_enc *c, const char *s, size_t n, int k)
{
    const eng_tok *t = c->t;
    if (n == 0) return 0;
    if (k == t->bl_stage && t->add_prefix_space && s[0] != ' ') {
        char *copy = malloc(n + 1);
        if (!copy) return ENG_ENOMEM;
        copy[0] = ' ';
        memcpy(copy + 1, s, n);
        int rc = pretok_split(c, copy, n + 1, k);
        free(copy);
        return rc;
    }
    return pretok_split(c, s, n, k);
}
