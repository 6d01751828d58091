/*
 * tok_normalize.c — the tokenizer's text handling below the regex: UTF-8
 * (decoding, validation, lossy repair as Rust's from_utf8_lossy), Unicode
 * White_Space, and the NFC normalizer over the combining classes and
 * decompositions of tok_unicode_tables.c (what the tokenizers library's NFC
 * knows), with the "normalizer" loader.
 */
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "tok_priv.h"

/* ---- UTF-8 ------------------------------------------------------------- */

static const char REPLACEMENT[3] = { (char)0xEF, (char)0xBF, (char)0xBD }; /* U+FFFD */

/* Reads one character at p (n > 0 bytes available).  Returns its length
 * (1..4) and sets *cp; or returns 0 for an invalid sequence and sets *bad to
 * the length of its maximal subpart (the bytes that one U+FFFD replaces, as
 * in Unicode's "substitution of maximal subparts", Python's 'replace' and
 * Rust's from_utf8_lossy); or returns -1 when the bytes are a valid but
 * incomplete prefix cut by the end of the buffer. */
static int utf8_next(const unsigned char *p, size_t n, uint32_t *cp, size_t *bad)
{
    unsigned c = p[0];
    if (c < 0x80) {
        *cp = c;
        return 1;
    }
    int need;
    uint32_t v;
    unsigned lo = 0x80, hi = 0xBF;
    if (c >= 0xC2 && c <= 0xDF) {
        need = 1;
        v = c & 0x1F;
    } else if (c >= 0xE0 && c <= 0xEF) {
        need = 2;
        v = c & 0x0F;
        if (c == 0xE0) lo = 0xA0;
        else if (c == 0xED) hi = 0x9F;
    } else if (c >= 0xF0 && c <= 0xF4) {
        need = 3;
        v = c & 0x07;
        if (c == 0xF0) lo = 0x90;
        else if (c == 0xF4) hi = 0x8F;
    } else {
        *bad = 1;
        return 0;
    }
    for (int i = 1; i <= need; i++) {
        if ((size_t)i >= n) return -1;
        unsigned b = p[i];
        if (b < lo || b > hi) {
            *bad = (size_t)i;
            return 0;
        }
        lo = 0x80;
        hi = 0xBF;
        v = (v << 6) | (b & 0x3F);
    }
    *cp = v;
    return need + 1;
}

static int utf8_put(char *o, uint32_t c)
{
    if (c < 0x80) { o[0] = (char)c; return 1; }
    if (c < 0x800) { o[0] = (char)(0xC0 | c >> 6); o[1] = (char)(0x80 | (c & 63)); return 2; }
    if (c < 0x10000) {
        o[0] = (char)(0xE0 | c >> 12); o[1] = (char)(0x80 | ((c >> 6) & 63));
        o[2] = (char)(0x80 | (c & 63));
        return 3;
    }
    o[0] = (char)(0xF0 | c >> 18); o[1] = (char)(0x80 | ((c >> 12) & 63));
    o[2] = (char)(0x80 | ((c >> 6) & 63)); o[3] = (char)(0x80 | (c & 63));
    return 4;
}

/* Appends s to out with every invalid sequence replaced by U+FFFD.  An
 * incomplete sequence at the very end is replaced too (final == 1) or left
 * out and its length returned in *held (final == 0). */
int tok__utf8_lossy(tok_buf *out, const unsigned char *s, size_t n, int final, size_t *held)
{
    size_t i = 0, run = 0; /* run: start of the pending valid stretch */
    if (held) *held = 0;
    while (i < n) {
        if (s[i] < 0x80) { i++; continue; }
        uint32_t cp;
        size_t bad = 1;
        int l = utf8_next(s + i, n - i, &cp, &bad);
        if (l > 0) { i += (size_t)l; continue; }
        if (tok_buf_put(out, s + run, i - run)) return ENG_ENOMEM;
        if (l < 0) { /* incomplete at the end */
            if (!final) {
                if (held) *held = n - i;
                return 0;
            }
            if (tok_buf_put(out, REPLACEMENT, 3)) return ENG_ENOMEM;
            return 0;
        }
        if (tok_buf_put(out, REPLACEMENT, 3)) return ENG_ENOMEM;
        i += bad;
        run = i;
    }
    return tok_buf_put(out, s + run, n - run);
}

/* 1 when the n bytes at s are valid UTF-8. */
int tok__utf8_valid(const unsigned char *s, size_t n)
{
    size_t i = 0;
    while (i < n) {
        if (s[i] < 0x80) { i++; continue; }
        uint32_t cp;
        size_t bad;
        int l = utf8_next(s + i, n - i, &cp, &bad);
        if (l <= 0) return 0;
        i += (size_t)l;
    }
    return 1;
}

/* Unicode White_Space (Rust char::is_whitespace, Oniguruma \s). */
int tok__is_white_space(uint32_t c)
{
    return (c >= 9 && c <= 13) || c == 32 || c == 0x85 || c == 0xA0 || c == 0x1680 ||
           (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F ||
           c == 0x205F || c == 0x3000;
}

/* ---- NFC ------------------------------------------------------------------ */

enum { QC_YES = 0, QC_MAYBE = 1, QC_NO = 2 };

typedef struct comp_pair {
    uint32_t a, b, c;
} comp_pair;

static struct {
    comp_pair *comp;       /* primary composites sorted by (a, b) */
    size_t n_comp;
    uint32_t *maybe;       /* second parts of primary composites, sorted */
    size_t n_maybe;
    uint8_t bmp[0x10000 / 8]; /* BMP code points that need a closer look */
    int ok;
} nfc_tab;
static pthread_once_t nfc_once = PTHREAD_ONCE_INIT;

static int cmp_pair(const void *x, const void *y)
{
    const comp_pair *a = x, *b = y;
    if (a->a != b->a) return a->a < b->a ? -1 : 1;
    if (a->b != b->b) return a->b < b->b ? -1 : 1;
    return 0;
}

static int cmp_u32(const void *x, const void *y)
{
    uint32_t a = *(const uint32_t *)x, b = *(const uint32_t *)y;
    return a < b ? -1 : a > b;
}

static int cmp_u64(const void *x, const void *y)
{
    uint64_t a = *(const uint64_t *)x, b = *(const uint64_t *)y;
    return a < b ? -1 : a > b;
}

static void nfc_mark(uint32_t c)
{
    if (c < 0x10000) nfc_tab.bmp[c >> 3] |= (uint8_t)(1u << (c & 7));
}

static void nfc_init(void)
{
    size_t np = 0;
    for (size_t i = 0; i < tok_uc_n_decomp; i++) np += tok_uc_decomp[i][3] != 0;
    nfc_tab.comp = malloc((np ? np : 1) * sizeof *nfc_tab.comp);
    nfc_tab.maybe = malloc((np ? np : 1) * sizeof *nfc_tab.maybe);
    if (!nfc_tab.comp || !nfc_tab.maybe) return;
    for (size_t i = 0; i < tok_uc_n_decomp; i++) {
        nfc_mark(tok_uc_decomp[i][0]);
        if (!tok_uc_decomp[i][3]) continue;
        comp_pair p = { tok_uc_decomp[i][1], tok_uc_decomp[i][2], tok_uc_decomp[i][0] };
        nfc_tab.comp[nfc_tab.n_comp++] = p;
        nfc_tab.maybe[nfc_tab.n_maybe++] = p.b;
        nfc_mark(p.b);
    }
    qsort(nfc_tab.comp, nfc_tab.n_comp, sizeof *nfc_tab.comp, cmp_pair);
    qsort(nfc_tab.maybe, nfc_tab.n_maybe, sizeof *nfc_tab.maybe, cmp_u32);
    size_t k = 0;
    for (size_t i = 0; i < nfc_tab.n_maybe; i++)
        if (k == 0 || nfc_tab.maybe[k - 1] != nfc_tab.maybe[i]) nfc_tab.maybe[k++] = nfc_tab.maybe[i];
    nfc_tab.n_maybe = k;
    for (size_t i = 0; i < tok_uc_n_ccc; i++)
        for (uint32_t c = tok_uc_ccc[i][0]; c <= tok_uc_ccc[i][1] && c < 0x10000; c++) nfc_mark(c);
    for (uint32_t c = 0x1100; c < 0x1200; c++) nfc_mark(c); /* Hangul jamo */
    nfc_tab.ok = 1;
}

static int ccc_of(uint32_t c)
{
    if (c < 0x300) return 0;
    size_t lo = 0, hi = tok_uc_n_ccc;
    while (lo < hi) {
        size_t m = (lo + hi) / 2;
        if (c < tok_uc_ccc[m][0]) hi = m;
        else if (c > tok_uc_ccc[m][1]) lo = m + 1;
        else return (int)tok_uc_ccc[m][2];
    }
    return 0;
}

static const uint32_t *decomp_of(uint32_t c)
{
    size_t lo = 0, hi = tok_uc_n_decomp;
    while (lo < hi) {
        size_t m = (lo + hi) / 2;
        if (c < tok_uc_decomp[m][0]) hi = m;
        else if (c > tok_uc_decomp[m][0]) lo = m + 1;
        else return tok_uc_decomp[m];
    }
    return NULL;
}

/* Hangul syllable constants (Unicode 3.12). */
enum { SBASE = 0xAC00, LBASE = 0x1100, VBASE = 0x1161, TBASE = 0x11A7,
       LCOUNT = 19, VCOUNT = 21, TCOUNT = 28, NCOUNT = VCOUNT * TCOUNT, SCOUNT = LCOUNT * NCOUNT };

static int qc_of(uint32_t c)
{
    if (c < 0x10000 && !(nfc_tab.bmp[c >> 3] & (1u << (c & 7)))) return QC_YES;
    if (c >= VBASE && c < VBASE + VCOUNT) return QC_MAYBE;
    if (c > TBASE && c < TBASE + TCOUNT) return QC_MAYBE;
    const uint32_t *d = decomp_of(c);
    if (d && !d[3]) return QC_NO;
    if (bsearch(&c, nfc_tab.maybe, nfc_tab.n_maybe, sizeof c, cmp_u32)) return QC_MAYBE;
    return QC_YES;
}

static uint32_t compose_pair(uint32_t a, uint32_t b)
{
    if (a >= LBASE && a < LBASE + LCOUNT && b >= VBASE && b < VBASE + VCOUNT)
        return SBASE + ((a - LBASE) * VCOUNT + (b - VBASE)) * TCOUNT;
    if (a >= SBASE && a < SBASE + SCOUNT && (a - SBASE) % TCOUNT == 0 && b > TBASE && b < TBASE + TCOUNT)
        return a + (b - TBASE);
    comp_pair key = { a, b, 0 };
    const comp_pair *p = bsearch(&key, nfc_tab.comp, nfc_tab.n_comp, sizeof key, cmp_pair);
    return p ? p->c : 0;
}

typedef struct u32vec {
    uint32_t *p;
    size_t n, cap;
} u32vec;

static int u32_push(u32vec *v, uint32_t x)
{
    if (v->n == v->cap) {
        size_t cap = v->cap ? v->cap * 2 : 64;
        uint32_t *p = realloc(v->p, cap * sizeof *p);
        if (!p) return ENG_ENOMEM;
        v->p = p;
        v->cap = cap;
    }
    v->p[v->n++] = x;
    return 0;
}

static int decompose(u32vec *v, uint32_t c)
{
    if (c >= SBASE && c < SBASE + SCOUNT) {
        uint32_t s = c - SBASE;
        if (u32_push(v, LBASE + s / NCOUNT) || u32_push(v, VBASE + (s % NCOUNT) / TCOUNT)) return ENG_ENOMEM;
        if (s % TCOUNT && u32_push(v, TBASE + s % TCOUNT)) return ENG_ENOMEM;
        return 0;
    }
    const uint32_t *d = c >= 0xC0 ? decomp_of(c) : NULL;
    if (!d) return u32_push(v, c);
    if (decompose(v, d[1])) return ENG_ENOMEM;
    return d[2] ? decompose(v, d[2]) : 0;
}

/* NFC of the valid UTF-8 s.  Returns 0 when s is already NFC (out
 * untouched), 1 when out holds the normalised text, or ENG_ENOMEM. */
int tok__nfc_apply(const char *s, size_t n, tok_buf *out)
{
    pthread_once(&nfc_once, nfc_init);
    if (!nfc_tab.ok) return ENG_ENOMEM;
    const unsigned char *u = (const unsigned char *)s;
    /* quick check (UAX #15): YES for every character and classes in order */
    int last = 0, need = 0;
    for (size_t i = 0; i < n;) {
        if (u[i] < 0xCC) { /* below U+0300: class 0, quick check YES */
            i += u[i] < 0x80 ? 1 : 2;
            last = 0;
            continue;
        }
        int l;
        uint32_t c = tok_utf8_get(u + i, &l);
        i += (size_t)l;
        int k = ccc_of(c);
        if ((k && last > k) || qc_of(c) != QC_YES) { need = 1; break; }
        last = k;
    }
    if (!need) return 0;

    u32vec v = { 0 };
    int rc = ENG_ENOMEM;
    for (size_t i = 0; i < n;) {
        int l;
        uint32_t c = tok_utf8_get(u + i, &l);
        i += (size_t)l;
        if (decompose(&v, c)) goto done;
    }
    /* canonical ordering: stable sort of each run of non-starters by class;
     * key = class << 56 | index << 21 | code point keeps qsort stable */
    for (size_t i = 0; i < v.n;) {
        if (!ccc_of(v.p[i])) { i++; continue; }
        size_t j = i + 1;
        while (j < v.n && ccc_of(v.p[j])) j++;
        if (j - i > 1) {
            uint64_t *key = malloc((j - i) * sizeof *key);
            if (!key) goto done;
            for (size_t x = i; x < j; x++)
                key[x - i] = (uint64_t)ccc_of(v.p[x]) << 56 | (uint64_t)(x - i) << 21 | v.p[x];
            qsort(key, j - i, sizeof *key, cmp_u64);
            for (size_t x = i; x < j; x++) v.p[x] = (uint32_t)(key[x - i] & 0x1FFFFFu);
            free(key);
        }
        i = j;
    }
    /* canonical composition */
    if (v.n) {
        size_t starter = 0, w = 1;
        int lastc = ccc_of(v.p[0]) ? 256 : 0;
        for (size_t i = 1; i < v.n; i++) {
            uint32_t c = v.p[i];
            int k = ccc_of(c);
            uint32_t comp = compose_pair(v.p[starter], c);
            if (comp && (lastc < k || lastc == 0)) {
                v.p[starter] = comp;
                continue;
            }
            if (k == 0) starter = w;
            lastc = k;
            v.p[w++] = c;
        }
        v.n = w;
    }
    out->n = 0;
    if (tok_buf_reserve(out, v.n * 4 + 1)) goto done;
    for (size_t i = 0; i < v.n; i++) out->n += (size_t)utf8_put(out->p + out->n, v.p[i]);
    out->p[out->n] = 0;
    rc = 1;
done:
    free(v.p);
    return rc;
}

int tok__load_normalizer(eng_tok *t, json_t *n, char *err, size_t errlen)
{
    if (!n || json_is_null(n)) return 0;
    const char *type = tok_jstr(n, "type");
    if (!type) return eng__errf(err, errlen, ENG_EFORMAT, "tokenizer.json: normalizer without \"type\"");
    if (strcmp(type, "NFC") == 0) {
        t->nfc = 1;
        return 0;
    }
    if (strcmp(type, "Sequence") == 0) {
        json_t *arr = json_object_get(n, "normalizers"), *x;
        size_t i;
        if (!json_is_array(arr)) return eng__errf(err, errlen, ENG_EFORMAT, "tokenizer.json: normalizer.normalizers is not an array");
        json_array_foreach(arr, i, x) {
            int rc = tok__load_normalizer(t, x, err, errlen);
            if (rc) return rc;
        }
        return 0;
    }
    return eng__errf(err, errlen, ENG_EUNSUPPORTED,
                     "tokenizer.json: normalizer type \"%s\" is not supported (NFC, Sequence of NFC)", type);
}
