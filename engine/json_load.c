/*
 * json_load.c — reading the JSON files of a model directory (config.json,
 * generation_config.json, tokenizer_config.json, ...) the way Python's json
 * module reads them.
 *
 * Python integers have no size limit, and transformers writes some that do
 * not fit 64 bits (tokenizer_config.json's "model_max_length":
 * 1000000000000000019884624838656, its VERY_LARGE_INTEGER).  jansson refuses
 * such a file as a whole ("too big integer"); here an integer literal that
 * does not fit int64 is read as a real instead (the text is rewritten to
 * end in ".0" before parsing), so the file loads and the reader of that key
 * decides what the value means.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "internal.h"
#include "safetensors.h"

/* 1 when the integer literal s[0..n) (optional '-', digits) is outside int64. */
static int int_overflows(const char *s, size_t n)
{
    int neg = n && s[0] == '-';
    const char *d = s + neg;
    size_t nd = n - (size_t)neg;
    while (nd > 1 && d[0] == '0') { d++; nd--; }
    if (nd != 19) return nd > 19;
    return memcmp(d, neg ? "9223372036854775808" : "9223372036854775807", 19) > 0;
}

/* The text with every out-of-range integer literal outside strings turned
 * into a real; NULL (and *changed 0) when none needs it. */
static char *widen_big_ints(const char *buf, size_t len, size_t *out_len, int *changed)
{
    *changed = 0;
    size_t extra = 0;
    for (int pass = 0; pass < 2; pass++) {
        char *o = NULL;
        size_t w = 0;
        if (pass == 1) {
            if (!extra) return NULL;
            if (!(o = malloc(len + extra + 1))) return NULL;
        }
        int in_str = 0;
        for (size_t i = 0; i < len;) {
            char c = buf[i];
            if (in_str) {
                if (c == '\\' && i + 1 < len) {
                    if (o) { o[w++] = c; o[w++] = buf[i + 1]; }
                    i += 2;
                    continue;
                }
                if (c == '"') in_str = 0;
            } else if (c == '"') {
                in_str = 1;
            } else if (c == '-' || (c >= '0' && c <= '9')) {
                size_t j = i + (c == '-');
                while (j < len && buf[j] >= '0' && buf[j] <= '9') j++;
                int is_int = !(j < len && (buf[j] == '.' || buf[j] == 'e' || buf[j] == 'E'));
                int big = is_int && j > i + (c == '-') && int_overflows(buf + i, j - i);
                if (o) {
                    memcpy(o + w, buf + i, j - i);
                    w += j - i;
                    if (big) { o[w++] = '.'; o[w++] = '0'; }
                } else if (big) {
                    extra += 2;
                }
                i = j;
                continue;
            }
            if (o) o[w++] = c;
            i++;
        }
        if (pass == 1) {
            o[w] = 0;
            *out_len = w;
            *changed = 1;
            return o;
        }
    }
    return NULL;
}

int eng__json_loadb(const char *buf, size_t len, const char *name, json_t **out, char *err, size_t errlen)
{
    *out = NULL;
    size_t wl = 0;
    int changed;
    char *wide = widen_big_ints(buf, len, &wl, &changed);
    json_error_t je;
    json_t *root = changed ? json_loadb(wide, wl, 0, &je) : json_loadb(buf, len, 0, &je);
    free(wide);
    if (!root)
        return eng__errf(err, errlen, ENG_EFORMAT, "%s: invalid JSON at line %d column %d: %s", name, je.line,
                         je.column, je.text);
    *out = root;
    return ENG_OK;
}

int eng__json_load_file(const char *path, const char *name, json_t **out, char *err, size_t errlen)
{
    *out = NULL;
    char *buf = NULL;
    size_t len = 0;
    int rc = eng_st_read_file(path, name, (size_t)1 << 30, &buf, &len, err, errlen);
    if (rc) return rc;
    rc = eng__json_loadb(buf, len, name, out, err, errlen);
    free(buf);
    return rc;
}
