/*
 * server.h — the public face of the server module (prefix srv_): the daemon's
 * configuration and the function that runs it.  main.c fills an srv_config
 * from its option table (INI file + flags) and calls srv_run.  Everything
 * else in server/ is private (srv_internal.h).
 */
#ifndef MKAD_SERVER_H
#define MKAD_SERVER_H

#include <stddef.h>

/* Every tunable of the daemon.  main.c fills it from its option table (the
 * one place that names, bounds and documents each field) and owns the
 * strings; srv_run only borrows the config. */
typedef struct srv_config {
    /* model and engine */
    char *model;            /* model directory (required) */
    char *model_name;       /* id served in /v1/models; NULL: the directory's basename */
    char *chat_template;    /* --chat-template: a Jinja file (or text) replacing the model's
                               chat template; NULL/"": the model directory's */
    char *backend;          /* "auto", "cpu" or "cuda" (main.c checks the spelling);
                               NULL = "auto" */
    int threads;            /* engine CPU threads, 0 = all online CPUs */
    char *cpu_math;         /* "exact" (NULL) or "fast": eng_params.cpu_math (main.c checks) */
    int max_seqs;           /* engine sequence slots (running requests + resident sessions) */
    int max_ctx;            /* tokens per sequence, 0 = model max_position (capped 8192) */
    int max_batch_tokens;   /* per-step token budget */
    int prefill_chunk;      /* max prompt tokens one sequence prefills in one step */
    int step_target_ms;     /* step latency target while sequences decode: prompt tokens per
                               step are cut to what fits (measured costs); 0 = tokens only */
    int block_size;         /* K/V block size in tokens */
    int kv_mem_mb;          /* K/V pool size cap in MiB, 0 = the engine's default for the
                               backend (cpu: 1024; cuda: 90% of the free GPU memory) */
    /* http */
    char *host;
    int port;               /* 0 = an ephemeral port (logged as event=listening) */
    int max_connections;
    int max_connections_per_ip; /* 0 = no per-address limit */
    int max_body_kb;        /* request body limit (413 above it) */
    int http_timeout_s;     /* idle connection timeout (slow clients) */
    int request_read_timeout_s; /* a whole request (headers + body) must arrive within this */
    int request_timeout_s;  /* whole-request deadline, then cancelled */
    int shutdown_timeout_s; /* SIGTERM: running requests get this long to finish */
    /* scheduling */
    int max_queue;          /* admitted-but-waiting requests beyond max_seqs; then 429 */
    int max_sessions;       /* idle sessions kept resident */
    int prefix_sharing;     /* 1: a prompt forks the blocks of a resident sequence of the same user
                               with the same prefix instead of prefilling them */
    int prefix_cache;       /* finished plain requests kept resident for prefix sharing */
    int default_max_tokens; /* /v1/completions without max_tokens (OpenAI: 16) */
    /* auth and state */
    char *api_keys;         /* comma-separated bearer keys; empty = no auth */
    char *api_keys_file;    /* one key per line ('#' comments); merged with api_keys */
    char *admin_users;      /* users (from USER:KEY keys) allowed on /admin; comma-separated */
    char *state_dir;        /* directory for persistent state (created if missing); empty = sessions
                               are kept only while resident */
    int session_warm_mb;    /* host-memory tier of the session store, MiB */
    int session_sync;       /* 1: a turn is durable (fsync'd) when its write completes */
    int session_ttl_s;      /* stored sessions idle this long are deleted, 0 = never */
    int session_disk_mb;    /* stored sessions beyond this many MiB: least recently used deleted, 0 = no cap */
    int session_sync_ms;    /* group commit every N ms (with session_sync off); 0 = off */
    char *resume_policy;    /* "auto", "load", "recompute" or "both" (resume.c) */
    int user_session_mb;    /* per-user quota on stored session bytes, MiB; 0 = none */
    int user_chunks_max;    /* per-user quota on long-term chunks; 0 = none */
    int longterm_index_mb;  /* in-memory retrieval index of long-term chunks, MiB; 0 = scan */
    int log_requests;       /* one access line per request */
} srv_config;

/* Runs the daemon until SIGTERM/SIGINT.  Returns the process exit status
 * (0 after a clean shutdown).  The config is borrowed for the call. */
int srv_run(const srv_config *cfg);

#endif /* MKAD_SERVER_H */
