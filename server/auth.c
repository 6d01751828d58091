/*
 * auth.c — API keys: the table built from `api_keys` and `api_keys_file`,
 * and the bearer-token check of a request.
 *
 * A table is immutable once built; SIGHUP builds a new one and swaps it in
 * (daemon.c), keeping the old one when the new one cannot be built.
 */
#include "config.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "srv_internal.h"

struct srv_auth {
    char *buf;            /* all keys, NUL-separated */
    const char **keys;
    int n_keys;
};

void srv_auth_free(srv_auth *a)
{
    if (!a) return;
    free(a->keys);
    free(a->buf);
    free(a);
}

int srv_auth_count(const srv_auth *a)
{
    return a ? a->n_keys : 0;
}

int srv_auth_load(const srv_config *cfg, srv_auth **out)
{
    *out = NULL;
    srv_auth *a = calloc(1, sizeof *a);
    if (!a) return -1;
    srv_buf b = { 0 };
    if (cfg->api_keys && *cfg->api_keys) {
        srv_buf_puts(&b, cfg->api_keys);
        srv_buf_puts(&b, "\n");
    }
    if (cfg->api_keys_file && *cfg->api_keys_file) {
        FILE *f = fopen(cfg->api_keys_file, "r");
        if (!f) {
            srv_log("error", "config", " option=api_keys_file path=%s error=\"%s\"",
                    cfg->api_keys_file, strerror(errno));
            srv_buf_free(&b);
            srv_auth_free(a);
            return -1;
        }
        /* One key per line (or several, split as below); '#' starts a
         * comment anywhere on a line.  getline: a long line stays one line. */
        char *line = NULL;
        size_t cap_line = 0;
        ssize_t n;
        while ((n = getline(&line, &cap_line, f)) >= 0) {
            char *hash = memchr(line, '#', (size_t)n);
            if (hash) *hash = '\0';
            srv_buf_puts(&b, line);
            srv_buf_puts(&b, "\n");
        }
        free(line);
        fclose(f);
    }
    /* split on commas, whitespace and newlines */
    int cap = 0;
    for (size_t i = 0; i < b.len; i++) cap += strchr(", \t\r\n", b.data[i]) != NULL;
    a->keys = calloc((size_t)cap + 1, sizeof *a->keys);
    a->buf = b.data;
    if (!a->keys) {
        srv_auth_free(a);
        return -1;
    }
    char *save = NULL;
    for (char *t = b.data ? strtok_r(b.data, ", \t\r\n", &save) : NULL; t;
         t = strtok_r(NULL, ", \t\r\n", &save))
        a->keys[a->n_keys++] = t;
    /* A keys file that yields no key must not turn authentication off (an
     * empty file mid-rotation, say): refuse it, so that startup fails or a
     * reload keeps the old keys. */
    if (a->n_keys == 0 && cfg->api_keys_file && *cfg->api_keys_file) {
        srv_log("error", "config", " option=api_keys_file path=%s error=\"the file holds no key\"",
                cfg->api_keys_file);
        srv_auth_free(a);
        return -1;
    }
    *out = a;
    return 0;
}

int srv_auth_check(const srv_auth *a, const char *h)
{
    if (a->n_keys == 0) return 1;
    if (!h || strncasecmp(h, "Bearer ", 7) != 0) return 0;
    h += 7;
    while (*h == ' ') h++;
    size_t hl = strlen(h);
    int ok = 0;
    /* every key is compared in full, whatever matched: constant time */
    for (int i = 0; i < a->n_keys; i++) {
        size_t kl = strlen(a->keys[i]);
        unsigned char diff = (unsigned char)(kl != hl);
        for (size_t k = 0; k < kl; k++) diff |= (unsigned char)(a->keys[i][k] ^ (k < hl ? h[k] : 0));
        ok |= diff == 0;
    }
    return ok;
}
