/*
 * main.c — mkad's entry point: the option table, the INI file (inih) and the
 * command line, then srv_run.
 *
 * Every option is one row of `options` below: its INI section and key, its
 * type, default, bounds and help.  The --help text, the flag parser, the INI
 * parser and validation are all driven by that table, so an option exists in
 * all three or in none.  Precedence: built-in default < INI file < flag.
 */
#include "config.h"

#include <errno.h>
#include <limits.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <ini.h>

#include "server.h"

#ifdef HAVE_CUDA
#define HAVE_CUDA_BACKEND 1
#else
#define HAVE_CUDA_BACKEND 0
#endif

/* OPT_ENUM: a string that must be one of `choices` ("a|b|c"); stored as the
 * canonical (table) spelling, so that what reads it compares exact strings. */
enum opt_type { OPT_STR, OPT_INT, OPT_BOOL, OPT_ENUM };

typedef struct option_def {
    const char *section;
    const char *name;     /* INI key; the flag is --name with '_' -> '-' */
    enum opt_type type;
    size_t offset;        /* into srv_config */
    const char *def;      /* default, as text */
    long lo, hi;          /* bounds for OPT_INT */
    const char *help;
    const char *choices;  /* OPT_ENUM: the accepted values, '|'-separated */
} option_def;

#define O(f) offsetof(srv_config, f)

/* Rows name `choices` only for OPT_ENUM; elsewhere it is left out (NULL). */
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmissing-field-initializers"
static const option_def options[] = {
    { "model", "model", OPT_STR, O(model), NULL, 0, 0,
      "model directory (config.json, model.safetensors, tokenizer.json); required" },
    { "model", "model_name", OPT_STR, O(model_name), "", 0, 0,
      "model id served in /v1/models and expected in requests (default: the directory name)" },
    { "model", "chat_template", OPT_STR, O(chat_template), "", 0, 0,
      "a Jinja chat template file (or the template text) used instead of the model's own "
      "(tokenizer_config.json / chat_template.jinja)" },
    { "engine", "backend", OPT_ENUM, O(backend), "auto", 0, 0,
      "where the forward pass runs: cuda (the first GPU), cpu, or auto (cuda when mkad was built "
      "with CUDA and a GPU answers, else cpu)", "auto|cpu|cuda" },
    { "engine", "threads", OPT_INT, O(threads), "0", 0, 256, "CPU threads of the engine, 0 = all online CPUs" },
    { "engine", "cpu_math", OPT_ENUM, O(cpu_math), "exact", 0, 0,
      "CPU backend arithmetic: exact (the reference) or fast (bf16 weights on a CPU with AVX512-BF16: "
      "activations rounded to bf16, about 1.8x the exact prefill; not bit-identical to exact)", "exact|fast" },
    { "engine", "max_seqs", OPT_INT, O(max_seqs), "64", 1, 4096,
      "sequence slots: running requests plus resident sessions" },
    { "engine", "max_ctx", OPT_INT, O(max_ctx), "0", 0, 1 << 20,
      "max tokens per sequence (prompt + completion), 0 = the model's max_position (capped 8192)" },
    { "engine", "max_batch_tokens", OPT_INT, O(max_batch_tokens), "512", 16, 1 << 16,
      "token budget of one engine step (decodes + prefill chunks)" },
    { "engine", "prefill_chunk", OPT_INT, O(prefill_chunk), "256", 1, 1 << 16,
      "max prompt tokens one sequence prefills per step" },
    { "engine", "step_target_ms", OPT_INT, O(step_target_ms), "50", 0, 60000,
      "step latency target while streams decode: each step's prompt tokens are cut to what fits "
      "after the decodes, from step costs measured on the fly (a step may still take twice its "
      "decodes' time, so prompts keep moving); 0 = off (token budget only)" },
    { "engine", "block_size", OPT_INT, O(block_size), "32", 1, 4096, "K/V block size in tokens" },
    { "engine", "kv_mem_mb", OPT_INT, O(kv_mem_mb), "0", 0, 1 << 22,
      "cap on the K/V pool size in MiB, 0 = auto (cpu: 1024; cuda: 90% of the GPU memory "
      "left after the weights)" },
    { "http", "host", OPT_STR, O(host), "127.0.0.1", 0, 0, "address to listen on" },
    { "http", "port", OPT_INT, O(port), "8080", 0, 65535, "TCP port, 0 = an ephemeral port (logged)" },
    { "http", "max_connections", OPT_INT, O(max_connections), "1024", 1, 1 << 20,
      "simultaneous HTTP connections (more are closed at once)" },
    { "http", "max_connections_per_ip", OPT_INT, O(max_connections_per_ip), "256", 0, 1 << 20,
      "simultaneous connections from one client address, 0 = no limit (behind a reverse proxy: "
      "0, or at least max_connections)" },
    { "http", "max_body_kb", OPT_INT, O(max_body_kb), "4096", 1, 1 << 20,
      "request body limit in KiB (413 above it)" },
    { "http", "http_timeout", OPT_INT, O(http_timeout_s), "30", 1, 86400,
      "seconds a connection may stay idle (no byte received or sent)" },
    { "http", "request_read_timeout", OPT_INT, O(request_read_timeout_s), "30", 1, 86400,
      "seconds a client has to send one whole request, headers and body, counted from the "
      "connection's start or the end of its previous response; then the connection is closed" },
    { "http", "request_timeout", OPT_INT, O(request_timeout_s), "600", 1, 86400,
      "seconds one generation request may take before it is cancelled" },
    { "http", "shutdown_timeout", OPT_INT, O(shutdown_timeout_s), "30", 0, 3600,
      "after SIGTERM, seconds running requests get to finish" },
    { "http", "log_requests", OPT_BOOL, O(log_requests), "true", 0, 1, "log one line per request" },
    { "scheduler", "max_queue", OPT_INT, O(max_queue), "256", 0, 1 << 20,
      "requests that may wait beyond max_seqs; more get 429" },
    { "scheduler", "max_sessions", OPT_INT, O(max_sessions), "32", 0, 4096,
      "sessions kept resident between requests (LRU-evicted when slots or blocks run short)" },
    { "scheduler", "prefix_sharing", OPT_BOOL, O(prefix_sharing), "true", 0, 1,
      "a prompt starts from the K/V blocks of a resident sequence (running request, session, or "
      "prefix-cache entry) of the same user and L3 bank that holds the same block-aligned prefix, "
      "instead of prefilling it; never across users" },
    { "scheduler", "prefix_cache", OPT_INT, O(prefix_cache), "16", 0, 4096,
      "finished requests without a session kept resident (full blocks) for prefix sharing; "
      "LRU-evicted first when slots or blocks run short; 0 = none" },
    { "scheduler", "default_max_tokens", OPT_INT, O(default_max_tokens), "16", 0, 1 << 20,
      "max_tokens of /v1/completions when the request has none (OpenAI: 16; 0 = until the context is full)" },
    { "auth", "api_keys", OPT_STR, O(api_keys), "", 0, 0,
      "comma-separated bearer keys; empty (and no keys file) = no authentication" },
    { "auth", "admin_users", OPT_STR, O(admin_users), "", 0, 0,
      "users (the USER of USER:KEY keys) allowed on the /admin routes, comma-separated; without keys, "
      "/admin is open to loopback clients only" },
    { "auth", "api_keys_file", OPT_STR, O(api_keys_file), "", 0, 0,
      "file of API keys (one per line, '#' starts a comment); a file with no key is refused" },
    { "state", "state_dir", OPT_STR, O(state_dir), "", 0, 0,
      "directory for persistent state (created if missing; systemd: /var/lib/mkad): sessions persist "
      "in <dir>/sessions (RocksDB) across restarts; empty = sessions live only while resident" },
    { "state", "session_warm_mb", OPT_INT, O(session_warm_mb), "1024", 0, 1 << 24,
      "host-memory tier of the session store in MiB (K/V blocks of idle sessions; 0 = disk only)" },
    { "state", "session_sync", OPT_BOOL, O(session_sync), "true", 0, 1,
      "fsync every turn's write (true: an answered turn survives a power loss; false: the OS "
      "flushes it later, a crash of mkad alone still loses nothing)" },
    { "state", "session_ttl", OPT_INT, O(session_ttl_s), "2592000", 0, 1 << 30,
      "seconds after its last turn a stored session is deleted (default 30 days; 0 = never)" },
    { "state", "session_disk_mb", OPT_INT, O(session_disk_mb), "0", 0, 1 << 30,
      "cap on stored sessions in MiB: the least recently used go first (0 = no cap)" },
    { "state", "session_sync_ms", OPT_INT, O(session_sync_ms), "0", 0, 60000,
      "group commit: with session_sync = false, fsync the turns written in the last N ms together; "
      "a turn's response completes once its group is on disk (0 = off)" },
    { "state", "resume_policy", OPT_ENUM, O(resume_policy), "auto", 0, 0,
      "a stored session's history: load it from the store, recompute it (prefill), both at once "
      "(prefill from the start while the last blocks load, split where both end together), or auto: "
      "the cost model picks per resume from measured read bandwidth and prefill rate",
      "auto|load|recompute|both" },
    { "state", "user_session_mb", OPT_INT, O(user_session_mb), "0", 0, 1 << 30,
      "per-user quota on stored sessions in MiB: over it, the user's own least recently used idle "
      "sessions are deleted (0 = no quota)" },
    { "state", "longterm_index_mb", OPT_INT, O(longterm_index_mb), "256", 0, 1 << 20,
      "memory for the retrieval index of users' long-term chunks (their keys, in RAM, exact: the same "
      "top R as a scan); beyond it the least recently used users' indexes go and are rebuilt when needed "
      "(0 = no index: every new session scans its user's chunks in the store)" },
    { "state", "user_chunks_max", OPT_INT, O(user_chunks_max), "0", 0, 1 << 30,
      "per-user quota on long-term memory chunks: over it, the user's least recently used chunks "
      "are deleted (0 = no quota)" },
};
#pragma GCC diagnostic pop
#define N_OPTIONS (sizeof options / sizeof *options)

static char **str_field(srv_config *c, const option_def *o)
{
    return (char **)((char *)c + o->offset);
}

static int *int_field(srv_config *c, const option_def *o)
{
    return (int *)((char *)c + o->offset);
}

static int is_string(const option_def *o)
{
    return o->type == OPT_STR || o->type == OPT_ENUM;
}

/* Finds val among o->choices (ASCII case-insensitively): 1 and the table's
 * spelling in (*at, *len), else 0. */
static int enum_find(const option_def *o, const char *val, const char **at, size_t *len)
{
    size_t n = strlen(val);
    for (const char *p = o->choices; *p;) {
        size_t k = strcspn(p, "|");
        if (k == n && strncasecmp(p, val, n) == 0) {
            *at = p;
            *len = k;
            return 1;
        }
        p += k;
        if (*p == '|') p++;
    }
    return 0;
}

/* Sets one option from text; `where` names the source for messages. */
static int set_option(srv_config *c, const option_def *o, const char *val, const char *where)
{
    if (is_string(o)) {
        const char *at = val;
        size_t len = strlen(val);
        if (o->type == OPT_ENUM && !enum_find(o, val, &at, &len)) {
            char list[128];
            size_t k = 0;
            for (const char *p = o->choices; *p && k + 3 < sizeof list; p++) {
                if (*p == '|') { list[k++] = ','; list[k++] = ' '; }
                else list[k++] = *p;
            }
            list[k] = '\0';
            fprintf(stderr, "mkad: %s%s: '%s' is not one of %s\n", where, o->name, val, list);
            return -1;
        }
        char *d = strndup(at, len);
        if (!d) return -1;
        free(*str_field(c, o));
        *str_field(c, o) = d;
        return 0;
    }
    if (o->type == OPT_BOOL) {
        if (!strcasecmp(val, "true") || !strcasecmp(val, "yes") || !strcasecmp(val, "on") || !strcmp(val, "1"))
            *int_field(c, o) = 1;
        else if (!strcasecmp(val, "false") || !strcasecmp(val, "no") || !strcasecmp(val, "off") || !strcmp(val, "0"))
            *int_field(c, o) = 0;
        else {
            fprintf(stderr, "mkad: %s%s: '%s' is not a boolean (true/false)\n", where, o->name, val);
            return -1;
        }
        return 0;
    }
    char *end;
    errno = 0;
    long v = strtol(val, &end, 10);
    if (errno || end == val || *end) {
        fprintf(stderr, "mkad: %s%s: '%s' is not an integer\n", where, o->name, val);
        return -1;
    }
    if (v < o->lo || v > o->hi) {
        fprintf(stderr, "mkad: %s%s: %ld is out of range [%ld, %ld]\n", where, o->name, v, o->lo, o->hi);
        return -1;
    }
    *int_field(c, o) = (int)v;
    return 0;
}

static const option_def *find_flag(const char *name, size_t n)
{
    for (size_t i = 0; i < N_OPTIONS; i++) {
        const char *k = options[i].name;
        if (strlen(k) != n) continue;
        size_t j = 0;
        for (; j < n; j++) {
            char a = k[j] == '_' ? '-' : k[j];
            char b = name[j] == '_' ? '-' : name[j];
            if (a != b) break;
        }
        if (j == n) return &options[i];
    }
    return NULL;
}

static void usage(FILE *f)
{
    fprintf(f, "usage: mkad [--config FILE] [--OPTION VALUE ...]\n\n"
               "mkad serves a FastMKA model over an OpenAI-compatible HTTP API.\n"
               "Options come from built-in defaults, then the INI file, then flags.\n\n"
               "  --config FILE            INI file (sections and keys as below)\n"
               "  --print-config           print the effective configuration as INI and exit\n"
               "  --version                the version and the compiled-in backends, then exit\n"
               "  --help                   this text\n");
    const char *sec = NULL;
    for (size_t i = 0; i < N_OPTIONS; i++) {
        const option_def *o = &options[i];
        if (!sec || strcmp(sec, o->section) != 0) {
            sec = o->section;
            fprintf(f, "\n[%s]\n", sec);
        }
        char flag[64];
        int n = snprintf(flag, sizeof flag, "--%s", o->name);
        for (int k = 2; k < n; k++) if (flag[k] == '_') flag[k] = '-';
        const char *arg = o->type == OPT_INT ? " N" : o->type == OPT_BOOL ? "[=BOOL]" : " VALUE";
        char lhs[96];
        if (o->type == OPT_ENUM) snprintf(lhs, sizeof lhs, "%s %s", flag, o->choices);
        else snprintf(lhs, sizeof lhs, "%s%s", flag, arg);
        fprintf(f, "  %-24s %s", lhs, o->help);
        if (o->type == OPT_INT) fprintf(f, " [%ld..%ld, default %s]", o->lo, o->hi, o->def);
        else if (o->def && *o->def) fprintf(f, " [default %s]", o->def);
        fputc('\n', f);
    }
}

typedef struct ini_ctx {
    srv_config *c;
    const char *path;
    FILE *f;
    int lineno;           /* lines read so far: the handler's line */
    int bad;
} ini_ctx;

/* ini_parse_stream reader that counts lines, so that messages can name them
 * (Debian's inih is built without INI_HANDLER_LINENO). */
static char *conf_reader(char *str, int num, void *stream)
{
    ini_ctx *x = stream;
    char *r = fgets(str, num, x->f);
    if (r) x->lineno++;
    return r;
}

static int ini_cb(void *user, const char *section, const char *name, const char *value)
{
    ini_ctx *x = user;
    int lineno = x->lineno;
    char where[512];
    snprintf(where, sizeof where, "%s:%d: ", x->path, lineno);
    for (size_t i = 0; i < N_OPTIONS; i++) {
        if (strcmp(options[i].name, name) != 0) continue;
        if (strcmp(options[i].section, section) != 0) {
            fprintf(stderr, "mkad: %s'%s' belongs in section [%s], not [%s]\n", where, name,
                    options[i].section, section);
            x->bad = 1;
            return 1;
        }
        if (set_option(x->c, &options[i], value, where) != 0) x->bad = 1;
        return 1;
    }
    fprintf(stderr, "mkad: %sunknown option '%s' in [%s] (see mkad --help)\n", where, name, section);
    x->bad = 1;
    return 1; /* keep going: report every bad line at once */
}

static void config_free(srv_config *c)
{
    for (size_t i = 0; i < N_OPTIONS; i++)
        if (is_string(&options[i])) free(*str_field(c, &options[i]));
}

static void print_config(srv_config *c)
{
    const char *sec = NULL;
    for (size_t i = 0; i < N_OPTIONS; i++) {
        const option_def *o = &options[i];
        if (!sec || strcmp(sec, o->section) != 0) {
            printf("%s[%s]\n", sec ? "\n" : "", o->section);
            sec = o->section;
        }
        if (is_string(o)) printf("%s = %s\n", o->name, *str_field(c, o) ? *str_field(c, o) : "");
        else if (o->type == OPT_BOOL) printf("%s = %s\n", o->name, *int_field(c, o) ? "true" : "false");
        else printf("%s = %d\n", o->name, *int_field(c, o));
    }
}

int main(int argc, char **argv)
{
    srv_config cfg;
    memset(&cfg, 0, sizeof cfg);
    int status = 2, print = 0;
    for (size_t i = 0; i < N_OPTIONS; i++)
        if (options[i].def && set_option(&cfg, &options[i], options[i].def, "default ") != 0) goto out;

    /* Pass 1: --help, --config, --print-config. */
    const char *conf = NULL;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            usage(stdout);
            status = 0;
            goto out;
        }
        if (!strcmp(argv[i], "--version")) {
            printf("mkad %s (backends: cpu%s)\n", PACKAGE_VERSION, HAVE_CUDA_BACKEND ? ", cuda" : "");
            status = 0;
            goto out;
        }
        if (!strcmp(argv[i], "--print-config")) print = 1;
        if (!strcmp(argv[i], "--config")) {
            if (i + 1 >= argc) {
                fprintf(stderr, "mkad: --config needs a file name\n");
                goto out;
            }
            conf = argv[++i];
        } else if (!strncmp(argv[i], "--config=", 9)) {
            conf = argv[i] + 9;
        }
    }
    if (conf) {
        ini_ctx x = { &cfg, conf, fopen(conf, "r"), 0, 0 };
        if (!x.f) {
            fprintf(stderr, "mkad: --config: cannot read %s: %s\n", conf, strerror(errno));
            goto out;
        }
        int rc = ini_parse_stream(conf_reader, &x, ini_cb, &x);
        fclose(x.f);
        if (rc > 0) {
            fprintf(stderr, "mkad: %s:%d: syntax error (expected [section] or key = value)\n", conf, rc);
            goto out;
        }
        if (x.bad) goto out;
    }
    /* Pass 2: every other flag, in order (later wins). */
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--print-config")) continue;
        if (!strcmp(a, "--config")) { i++; continue; }
        if (!strncmp(a, "--config=", 9)) continue;
        if (strncmp(a, "--", 2) != 0) {
            fprintf(stderr, "mkad: unexpected argument '%s' (options start with --; see --help)\n", a);
            goto out;
        }
        const char *name = a + 2, *eq = strchr(name, '=');
        size_t n = eq ? (size_t)(eq - name) : strlen(name);
        const option_def *o = find_flag(name, n);
        if (!o) {
            fprintf(stderr, "mkad: unknown option '--%.*s' (see mkad --help)\n", (int)n, name);
            goto out;
        }
        const char *val = eq ? eq + 1 : NULL;
        if (!val && o->type == OPT_BOOL) val = "true";
        if (!val) {
            if (i + 1 >= argc) {
                fprintf(stderr, "mkad: --%.*s needs a value\n", (int)n, name);
                goto out;
            }
            val = argv[++i];
        }
        char where[80];
        snprintf(where, sizeof where, "--");
        if (set_option(&cfg, o, val, where) != 0) goto out;
    }
    if (print) {
        print_config(&cfg);
        status = 0;
        goto out;
    }
    if (!cfg.model || !*cfg.model) {
        fprintf(stderr, "mkad: model: no model directory given (--model DIR or [model] model = DIR)\n");
        goto out;
    }
    if (!cfg.host || !*cfg.host) {
        fprintf(stderr, "mkad: host: must not be empty\n");
        goto out;
    }
    status = srv_run(&cfg);
out:
    config_free(&cfg);
    return status;
}
