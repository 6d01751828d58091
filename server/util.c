/*
 * util.c — small helpers for the server: a growable byte buffer and arrays, one-line
 * key=value logging to stderr, the monotonic clock.
 */
#include "config.h"

#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "srv_internal.h"

static int buf_reserve(srv_buf *b, size_t extra)
{
    if (extra > SIZE_MAX / 2 - b->len) return -1;
    size_t need = b->len + extra + 1; /* keep room for a NUL */
    if (need <= b->cap) return 0;
    size_t cap = b->cap ? b->cap : 256;
    while (cap < need) cap *= 2;
    char *d = realloc(b->data, cap);
    if (!d) return -1;
    b->data = d;
    b->cap = cap;
    return 0;
}

int srv_array_grow(void *items, int *cap, int n, size_t elem, int first)
{
    if (n < *cap) return 0;
    if (*cap > INT_MAX / 2) return -1;
    int c = *cap ? *cap * 2 : first;
    if ((size_t)c > SIZE_MAX / elem) return -1;
    void *p;
    memcpy(&p, items, sizeof p); /* items may point at any T *; no aliasing */
    p = realloc(p, (size_t)c * elem);
    if (!p) return -1;
    memcpy(items, &p, sizeof p);
    *cap = c;
    return 0;
}

int srv_buf_append(srv_buf *b, const void *p, size_t n)
{
    if (buf_reserve(b, n) != 0) {
        b->failed = 1;
        return -1;
    }
    if (n) memcpy(b->data + b->len, p, n);
    b->len += n;
    b->data[b->len] = '\0';
    return 0;
}

int srv_buf_puts(srv_buf *b, const char *s)
{
    return srv_buf_append(b, s, strlen(s));
}

int srv_buf_printf(srv_buf *b, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    char tmp[256];
    int n = vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    if (n < 0) {
        b->failed = 1;
        return -1;
    }
    if ((size_t)n < sizeof tmp) return srv_buf_append(b, tmp, (size_t)n);
    if (buf_reserve(b, (size_t)n) != 0) {
        b->failed = 1;
        return -1;
    }
    va_start(ap, fmt);
    vsnprintf(b->data + b->len, (size_t)n + 1, fmt, ap);
    va_end(ap);
    b->len += (size_t)n;
    return 0;
}

void srv_buf_reset(srv_buf *b)
{
    b->len = 0;
    b->failed = 0;
    if (b->data) b->data[0] = '\0';
}

void srv_buf_free(srv_buf *b)
{
    free(b->data);
    b->data = NULL;
    b->len = b->cap = 0;
    b->failed = 0;
}

/* Length of the valid UTF-8 character at s[0, n), or 0 when the bytes there
 * are not one (bad lead, missing continuation, overlong, surrogate, > U+10FFFF). */
size_t srv_utf8_char_len(const char *s, size_t n)
{
    const unsigned char *u = (const unsigned char *)s;
    if (n == 0) return 0;
    if (u[0] < 0x80) return 1;
    size_t len = (u[0] >> 5) == 6 ? 2 : (u[0] >> 4) == 14 ? 3 : (u[0] >> 3) == 30 ? 4 : 0;
    if (len == 0 || len > n) return 0;
    for (size_t k = 1; k < len; k++)
        if ((u[k] >> 6) != 2) return 0;
    uint32_t cp = len == 2 ? (uint32_t)(u[0] & 0x1f) << 6 | (u[1] & 0x3f)
                : len == 3 ? (uint32_t)(u[0] & 0x0f) << 12 | (uint32_t)(u[1] & 0x3f) << 6 | (u[2] & 0x3f)
                : (uint32_t)(u[0] & 0x07) << 18 | (uint32_t)(u[1] & 0x3f) << 12 |
                  (uint32_t)(u[2] & 0x3f) << 6 | (u[3] & 0x3f);
    static const uint32_t min[5] = { 0, 0, 0x80, 0x800, 0x10000 };
    if (cp < min[len] || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) return 0;
    return len;
}

void srv_utf8_clip(char *dst, size_t cap, const char *s, size_t n)
{
    if (cap == 0) return;
    size_t o = 0;
    for (size_t i = 0; i < n && s[i];) {
        size_t len = srv_utf8_char_len(s + i, n - i);
        if (len == 0) len = 1; /* an invalid byte: copied, the JSON builder replaces it */
        int last = i + len >= n || !s[i + len];
        /* room for this character, and for "..." unless it is the last */
        if (o + len + (last ? 0 : 3) > cap - 1) {
            size_t room = cap - 1 - o;
            memcpy(dst + o, "...", room < 3 ? room : 3);
            o += room < 3 ? room : 3;
            break;
        }
        memcpy(dst + o, s + i, len);
        o += len;
        i += len;
    }
    dst[o] = '\0';
}

double srv_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

const char *srv_log_quote(const char *s, char *buf, size_t len)
{
    size_t o = 0;
    if (len < 3) { if (len) buf[0] = '\0'; return buf; }
    buf[o++] = '"';
    for (; s && *s && o + 3 < len; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\') {
            if (o + 4 >= len) break;
            buf[o++] = '\\';
            buf[o++] = (char)c;
        } else if (c < 0x20 || c == 0x7f) {
            buf[o++] = '?';
        } else {
            buf[o++] = (char)c;
        }
    }
    buf[o++] = '"';
    buf[o] = '\0';
    return buf;
}

void srv_log(const char *level, const char *event, const char *fmt, ...)
{
    char line[2048];
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    struct tm tm;
    gmtime_r(&ts.tv_sec, &tm);
    int n = snprintf(line, sizeof line, "ts=%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ level=%s event=%s",
                     tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min,
                     tm.tm_sec, ts.tv_nsec / 1000000, level, event);
    if (n < 0) return;
    if ((size_t)n < sizeof line - 2) {
        va_list ap;
        va_start(ap, fmt);
        int m = vsnprintf(line + n, sizeof line - 1 - (size_t)n, fmt, ap);
        va_end(ap);
        if (m > 0) n += m;
    }
    if ((size_t)n > sizeof line - 2) n = (int)sizeof line - 2;
    line[n++] = '\n';
    /* One write(2) per line so that lines from two threads never interleave. */
    ssize_t w = write(STDERR_FILENO, line, (size_t)n);
    (void)w;
}
