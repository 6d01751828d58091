/*
 * jinja_strings.c — Python's str operations for the Jinja interpreter's
 * strings: case mapping, strip, split/rsplit/splitlines, replace,
 * startswith/endswith, find.  Strings are UTF-8 and indexed by code point
 * as Python indexes them; results that are pieces of their input (strip,
 * split, replace, ...) keep its untrusted ranges, case mapping marks the
 * whole result when any input byte was untrusted.
 */
#include <stdlib.h>
#include <string.h>
#include <wctype.h>

#include "jinja_priv.h"

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

int jj__is_alpha_cp(jj_ev *ev, uint32_t c)
{
    if (c < 0x80) return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
    locale_t l = ctype(ev);
    return l ? iswalpha_l((wint_t)c, l) != 0 : 0;
}

/* mode: 'u' upper, 'l' lower, 't' str.title(), 'c' capitalize, 'j' jinja's title filter */
jj_val jj__recase(jj_ev *ev, const jj_str *s, int mode)
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
            int alpha = jj__is_alpha_cp(ev, c);
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

jj_val jj__strip(jj_ev *ev, const jj_str *s, const jj_str *chars, int left, int right)
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

/* str.split / str.rsplit */
jj_val jj__split(jj_ev *ev, const jj_str *s, jj_val sepv, int64_t maxsplit, int from_right)
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
        return jj__list_of(ev, out, n);
    }
    const jj_str *sep = jj__need_str(ev, sepv, "must be str or None");
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
    return jj__list_of(ev, out, n);
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

jj_val jj__splitlines(jj_ev *ev, const jj_str *s, int keepends)
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
    return jj__list_of(ev, out, n);
}

jj_val jj__replace(jj_ev *ev, const jj_str *s, const jj_str *old, const jj_str *new, int64_t count)
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

int jj__has_prefix(const jj_str *s, const jj_str *p, int suffix)
{
    if (p->len > s->len) return 0;
    return memcmp(s->s + (suffix ? s->len - p->len : 0), p->s, p->len) == 0;
}

jj_val jj__starts_ends(jj_ev *ev, const jj_str *s, jj_val arg, int suffix)
{
    if (arg.t == JV_LIST && arg.kind == JL_TUPLE) {
        for (size_t i = 0; i < arg.u.l->n; i++)
            if (jj__has_prefix(s, jj__need_str(ev, arg.u.l->v[i], "tuple for startswith must only contain str"), suffix))
                return jj__bool(1);
        return jj__bool(0);
    }
    return jj__bool(jj__has_prefix(s, jj__need_str(ev, arg, suffix ? "endswith first arg must be str or a tuple of str"
                                                          : "startswith first arg must be str or a tuple of str"), suffix));
}

int64_t jj__find(const jj_str *s, const jj_str *sub, int last)
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

int64_t jj__byte_to_cp(const jj_str *s, int64_t off)
{
    if (off < 0) return off;
    int64_t k = 0;
    for (int64_t i = 0; i < off; i++) k += ((unsigned char)s->s[i] & 0xC0) != 0x80;
    return k;
}
