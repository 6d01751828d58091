/*
 * auth.c — API keys: the table built from `api_keys` and `api_keys_file`,
 * and the bearer-token check of a request, which also says who the caller
 * is.  A key is written `USER:KEY` (USER: 1-64 of [A-Za-z0-9._-]) or bare;
 * a bare key is its own user, named "key-" + 16 hex digits of its XXH3
 * hash (stable, and naming no part of the key).  Sessions and long-term
 * memory belong to users; users listed in `admin_users` may use /admin.
 * Without keys every request is the one user "local", admin from loopback.
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
#include <ctype.h>

#include "srv_internal.h"

#define XXH_INLINE_ALL
#include <xxhash.h>

struct srv_auth {
    int required;         /* a key source is configured: requests need a key */
    char *buf;            /* all keys, NUL-separated */
    const char **keys;
    char (*users)[SRV_USER_MAX + 1]; /* the user of keys[i] */
    int *admin;           /* keys[i]'s user is in admin_users */
    int n_keys;
};

void srv_auth_free(srv_auth *a)
{
    if (!a) return;
    free(a->keys);
    free(a->users);
    free(a->admin);
    free(a->buf);
    free(a);
}

int srv_user_name_ok(const char *s, size_t n)
{
    if (n == 0 || n > SRV_USER_MAX) return 0;
    for (size_t i = 0; i < n; i++)
        if (!(isalnum((unsigned char)s[i]) || s[i] == '.' || s[i] == '_' || s[i] == '-')) return 0;
    return 1;
}

/* Is user (n bytes) one of the comma/space-separated names in list? */
static int in_list(const char *list, const char *user)
{
    size_t n = strlen(user);
    for (const char *p = list ? list : ""; *p;) {
        size_t k = strcspn(p, ", \t");
        if (k == n && strncmp(p, user, n) == 0) return 1;
        p += k;
        p += strspn(p, ", \t");
    }
    return 0;
}

int srv_auth_count(const srv_auth *a)
{
    return a ? a->n_keys : 0;
}

/* Appends s and a newline; -1 when memory runs out. */
static int add_line(srv_buf *b, const char *s)
{
    return srv_buf_puts(b, s) != 0 || srv_buf_puts(b, "\n") != 0 ? -1 : 0;
}

/* Fails closed: any source that cannot be read, an allocation that fails,
 * or configured sources that yield no key make the build fail, so that
 * startup stops or a reload keeps the old table; never a table that lets
 * requests through because keys went missing. */
int srv_auth_load(const srv_config *cfg, srv_auth **out)
{
    *out = NULL;
    int has_keys = cfg->api_keys && *cfg->api_keys;
    int has_file = cfg->api_keys_file && *cfg->api_keys_file;
    srv_auth *a = calloc(1, sizeof *a);
    srv_buf b = { 0 };
    if (!a) goto oom;
    a->required = has_keys || has_file;
    if (has_keys && add_line(&b, cfg->api_keys) != 0) goto oom;
    if (has_file) {
        FILE *f = fopen(cfg->api_keys_file, "r");
        if (!f) {
            srv_log("error", "config", " option=api_keys_file path=%s error=\"%s\"",
                    cfg->api_keys_file, strerror(errno));
            goto fail;
        }
        /* One key per line (or several, split as below); '#' starts a
         * comment anywhere on a line.  getline: a long line stays one line. */
        char *line = NULL;
        size_t cap_line = 0;
        ssize_t n;
        int rc = 0;
        errno = 0;
        while (rc == 0 && (n = getline(&line, &cap_line, f)) >= 0) {
            char *hash = memchr(line, '#', (size_t)n);
            if (hash) *hash = '\0';
            rc = add_line(&b, line);
        }
        int read_err = rc == 0 && (ferror(f) || errno == ENOMEM);
        free(line);
        fclose(f);
        if (rc != 0) goto oom;
        if (read_err) {
            srv_log("error", "config", " option=api_keys_file path=%s error=\"read failed\"",
                    cfg->api_keys_file);
            goto fail;
        }
    }
    /* split on commas, whitespace and newlines */
    int cap = 0;
    for (size_t i = 0; i < b.len; i++) cap += strchr(", \t\r\n", b.data[i]) != NULL;
    if (!(a->keys = calloc((size_t)cap + 1, sizeof *a->keys))) goto oom;
    a->buf = b.data;
    b.data = NULL;
    char *save = NULL;
    if (!(a->users = calloc((size_t)cap + 1, sizeof *a->users)) ||
        !(a->admin = calloc((size_t)cap + 1, sizeof *a->admin)))
        goto oom;
    for (char *t = a->buf ? strtok_r(a->buf, ", \t\r\n", &save) : NULL; t;
         t = strtok_r(NULL, ", \t\r\n", &save)) {
        int i = a->n_keys;
        char *colon = strchr(t, ':');
        if (colon && colon[1]) { /* USER:KEY */
            if (!srv_user_name_ok(t, (size_t)(colon - t))) {
                srv_log("error", "config", " option=api_keys error=\"a user name before ':' must be 1-%d of "
                        "[A-Za-z0-9._-]\"", SRV_USER_MAX);
                goto fail;
            }
            memcpy(a->users[i], t, (size_t)(colon - t));
            t = colon + 1;
        } else {
            snprintf(a->users[i], sizeof a->users[i], "key-%016llx",
                     (unsigned long long)XXH3_64bits(t, strlen(t)));
        }
        a->admin[i] = in_list(cfg->admin_users, a->users[i]);
        a->keys[a->n_keys++] = t;
    }
    /* Keys configured but none found (an empty file mid-rotation, a stray
     * comma) must not turn authentication off. */
    if (a->required && a->n_keys == 0) {
        srv_log("error", "config", " option=%s error=\"%s\"", has_file ? "api_keys_file" : "api_keys",
                has_file ? "the file holds no key" : "no key in the value");
        goto fail;
    }
    *out = a;
    return 0;
oom:
    srv_log("error", "config", " option=api_keys error=\"out of memory building the key table\"");
fail:
    srv_buf_free(&b);
    srv_auth_free(a);
    return -1;
}

int srv_auth_check(const srv_auth *a, const char *h, int loopback, srv_identity *who)
{
    memset(who, 0, sizeof *who);
    if (!a) return 0;
    if (!a->required) {
        snprintf(who->user, sizeof who->user, "local");
        who->admin = loopback;
        return 1;
    }
    if (!h || strncasecmp(h, "Bearer ", 7) != 0) return 0;
    h += 7;
    while (*h == ' ') h++;
    size_t hl = strlen(h);
    int found = -1;
    /* every key is compared in full, whatever matched: constant time */
    for (int i = 0; i < a->n_keys; i++) {
        size_t kl = strlen(a->keys[i]);
        unsigned char diff = (unsigned char)(kl != hl);
        for (size_t k = 0; k < kl; k++) diff |= (unsigned char)(a->keys[i][k] ^ (k < hl ? h[k] : 0));
        if (diff == 0 && found < 0) found = i;
    }
    if (found < 0) return 0;
    snprintf(who->user, sizeof who->user, "%s", a->users[found]);
    who->admin = a->admin[found];
    return 1;
}
