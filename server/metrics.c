/*
 * metrics.c — the daemon's counters, gauges and histograms, and their
 * Prometheus text exposition (GET /metrics).  Updated from the loop thread
 * (requests, latencies) and the engine thread (steps, pool state), so one
 * mutex guards everything; each update is a handful of additions.
 */
#include "config.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "srv_internal.h"

#define MAX_BUCKETS 16

typedef struct histo {
    int n;
    double le[MAX_BUCKETS];
    unsigned long count[MAX_BUCKETS]; /* per bucket, not cumulative */
    unsigned long total;
    double sum;
} histo;

struct srv_metrics {
    pthread_mutex_t mu;
    unsigned long requests[SRV_ROUTE_COUNT][600]; /* by route and HTTP status */
    unsigned long prompt_tokens, generated_tokens, cached_tokens;
    unsigned long cancelled[5];
    unsigned long steps, step_tokens;
    histo ttft, itl, batch_tokens, batch_seqs, step_seconds;
    int running, waiting, blocks_used, blocks_total, sessions;
    unsigned long preemptions;
    unsigned long prefix_hits, prefix_tokens, pc_evicted; /* hot-tier prefix sharing */
    int pc_entries, pc_blocks;
    unsigned long read_timeouts;
    char backend[8], kv_dtype[8]; /* "" until the engine exists */
    size_t kv_bytes;
    int have_store;
    srv_store_stats store;
};

static void histo_init(histo *h, const double *le, int n)
{
    h->n = n;
    memcpy(h->le, le, (size_t)n * sizeof *le);
}

static void histo_add(histo *h, double v)
{
    for (int i = 0; i < h->n; i++)
        if (v <= h->le[i]) { h->count[i]++; break; }
    h->total++;
    h->sum += v;
}

srv_metrics *srv_metrics_create(void)
{
    srv_metrics *m = calloc(1, sizeof *m);
    if (!m) return NULL;
    pthread_mutex_init(&m->mu, NULL);
    static const double lat[] = { 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10 };
    static const double sizes[] = { 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048 };
    histo_init(&m->ttft, lat, 13);
    histo_init(&m->itl, lat, 13);
    histo_init(&m->step_seconds, lat, 13);
    histo_init(&m->batch_tokens, sizes, 12);
    histo_init(&m->batch_seqs, sizes, 12);
    return m;
}

void srv_metrics_free(srv_metrics *m)
{
    if (!m) return;
    pthread_mutex_destroy(&m->mu);
    free(m);
}

const char *srv_route_name(int route)
{
    static const char *const names[SRV_ROUTE_COUNT] = {
        "/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics", "/tokenize",
        "/detokenize", "/admin", "other"
    };
    return route >= 0 && route < SRV_ROUTE_COUNT ? names[route] : "other";
}

void srv_metrics_request(srv_metrics *m, int route, int status)
{
    if (route < 0 || route >= SRV_ROUTE_COUNT) route = SRV_ROUTE_OTHER;
    if (status < 0 || status >= 600) status = 0;
    pthread_mutex_lock(&m->mu);
    m->requests[route][status]++;
    pthread_mutex_unlock(&m->mu);
}

void srv_metrics_tokens(srv_metrics *m, long prompt, long generated, long cached)
{
    pthread_mutex_lock(&m->mu);
    m->prompt_tokens += (unsigned long)prompt;
    m->generated_tokens += (unsigned long)generated;
    m->cached_tokens += (unsigned long)cached;
    pthread_mutex_unlock(&m->mu);
}

void srv_metrics_ttft(srv_metrics *m, double s)
{
    pthread_mutex_lock(&m->mu);
    histo_add(&m->ttft, s);
    pthread_mutex_unlock(&m->mu);
}

void srv_metrics_itl(srv_metrics *m, double s)
{
    pthread_mutex_lock(&m->mu);
    histo_add(&m->itl, s);
    pthread_mutex_unlock(&m->mu);
}

void srv_metrics_step(srv_metrics *m, int n_seqs, int n_tokens, double step_s)
{
    pthread_mutex_lock(&m->mu);
    m->steps++;
    m->step_tokens += (unsigned long)n_tokens;
    histo_add(&m->batch_seqs, n_seqs);
    histo_add(&m->batch_tokens, n_tokens);
    histo_add(&m->step_seconds, step_s);
    pthread_mutex_unlock(&m->mu);
}

void srv_metrics_preempted(srv_metrics *m)
{
    pthread_mutex_lock(&m->mu);
    m->preemptions++;
    pthread_mutex_unlock(&m->mu);
}

void srv_metrics_read_timeout(srv_metrics *m)
{
    pthread_mutex_lock(&m->mu);
    m->read_timeouts++;
    pthread_mutex_unlock(&m->mu);
}

void srv_metrics_prefix_shared(srv_metrics *m, int tokens)
{
    pthread_mutex_lock(&m->mu);
    m->prefix_hits++;
    m->prefix_tokens += (unsigned long)tokens;
    pthread_mutex_unlock(&m->mu);
}

void srv_metrics_prefix_evicted(srv_metrics *m)
{
    pthread_mutex_lock(&m->mu);
    m->pc_evicted++;
    pthread_mutex_unlock(&m->mu);
}

void srv_metrics_prefix_cache(srv_metrics *m, int entries, int blocks)
{
    pthread_mutex_lock(&m->mu);
    m->pc_entries = entries;
    m->pc_blocks = blocks;
    pthread_mutex_unlock(&m->mu);
}

void srv_metrics_state(srv_metrics *m, int running, int waiting, int blocks_used, int blocks_total,
                       int sessions)
{
    pthread_mutex_lock(&m->mu);
    m->running = running;
    m->waiting = waiting;
    m->blocks_used = blocks_used;
    m->blocks_total = blocks_total;
    m->sessions = sessions;
    pthread_mutex_unlock(&m->mu);
}

void srv_metrics_engine(srv_metrics *m, const char *backend, const char *kv_dtype, size_t kv_bytes)
{
    pthread_mutex_lock(&m->mu);
    snprintf(m->backend, sizeof m->backend, "%s", backend ? backend : "");
    snprintf(m->kv_dtype, sizeof m->kv_dtype, "%s", kv_dtype ? kv_dtype : "");
    m->kv_bytes = kv_bytes;
    pthread_mutex_unlock(&m->mu);
}

void srv_metrics_store(srv_metrics *m, const srv_store_stats *st)
{
    pthread_mutex_lock(&m->mu);
    m->have_store = 1;
    m->store = *st;
    pthread_mutex_unlock(&m->mu);
}

void srv_metrics_cancelled(srv_metrics *m, int reason)
{
    if (reason < 0 || reason >= 5) return;
    pthread_mutex_lock(&m->mu);
    m->cancelled[reason]++;
    pthread_mutex_unlock(&m->mu);
}

static void render_histo(srv_buf *o, const char *name, const char *help, const histo *h)
{
    srv_buf_printf(o, "# HELP %s %s\n# TYPE %s histogram\n", name, help, name);
    unsigned long cum = 0;
    for (int i = 0; i < h->n; i++) {
        cum += h->count[i];
        srv_buf_printf(o, "%s_bucket{le=\"%g\"} %lu\n", name, h->le[i], cum);
    }
    srv_buf_printf(o, "%s_bucket{le=\"+Inf\"} %lu\n%s_sum %.6f\n%s_count %lu\n", name, h->total,
                   name, h->sum, name, h->total);
}

static void counter(srv_buf *o, const char *name, const char *help, unsigned long v)
{
    srv_buf_printf(o, "# HELP %s %s\n# TYPE %s counter\n%s %lu\n", name, help, name, name, v);
}

static void gauge(srv_buf *o, const char *name, const char *help, long v)
{
    srv_buf_printf(o, "# HELP %s %s\n# TYPE %s gauge\n%s %ld\n", name, help, name, name, v);
}

int srv_metrics_render(srv_metrics *m, srv_buf *o)
{
    static const char *const reasons[5] = { "none", "client", "stop", "timeout", "shutdown" };
    pthread_mutex_lock(&m->mu);
    srv_buf_puts(o, "# HELP mkad_http_requests_total HTTP requests by route and status.\n"
                    "# TYPE mkad_http_requests_total counter\n");
    for (int r = 0; r < SRV_ROUTE_COUNT; r++)
        for (int s = 0; s < 600; s++)
            if (m->requests[r][s])
                srv_buf_printf(o, "mkad_http_requests_total{route=\"%s\",status=\"%d\"} %lu\n",
                               srv_route_name(r), s, m->requests[r][s]);
    counter(o, "mkad_prompt_tokens_total", "Prompt tokens of finished requests.", m->prompt_tokens);
    counter(o, "mkad_generation_tokens_total", "Generated tokens.", m->generated_tokens);
    counter(o, "mkad_cached_tokens_total", "Prompt tokens reused from a session (resident, or loaded from the session store).",
            m->cached_tokens);
    srv_buf_puts(o, "# HELP mkad_requests_cancelled_total Sequences cancelled before they finished, by reason.\n"
                    "# TYPE mkad_requests_cancelled_total counter\n");
    for (int i = 1; i < 5; i++)
        if (i != SRV_CANCEL_STOP)
            srv_buf_printf(o, "mkad_requests_cancelled_total{reason=\"%s\"} %lu\n", reasons[i],
                           m->cancelled[i]);
    counter(o, "mkad_engine_steps_total", "Batched forward steps.", m->steps);
    render_histo(o, "mkad_time_to_first_token_seconds", "Request arrival to first token.", &m->ttft);
    render_histo(o, "mkad_inter_token_latency_seconds", "Gap between consecutive tokens of a request.",
                 &m->itl);
    render_histo(o, "mkad_batch_tokens", "Tokens per engine step.", &m->batch_tokens);
    render_histo(o, "mkad_batch_sequences", "Sequences per engine step.", &m->batch_seqs);
    render_histo(o, "mkad_step_seconds", "Duration of one engine step.", &m->step_seconds);
    gauge(o, "mkad_sequences_running", "Sequences admitted to the engine.", m->running);
    gauge(o, "mkad_sequences_waiting", "Requests waiting for admission.", m->waiting);
    gauge(o, "mkad_kv_blocks_used", "K/V blocks in use (running sequences and resident sessions).",
          m->blocks_used);
    gauge(o, "mkad_kv_blocks_total", "K/V blocks in the pool.", m->blocks_total);
    srv_buf_printf(o, "# HELP mkad_kv_pool_bytes Bytes of the K/V block pool (K/V and EMA checkpoints; "
                      "GPU memory on cuda).\n# TYPE mkad_kv_pool_bytes gauge\nmkad_kv_pool_bytes %zu\n",
                   m->kv_bytes);
    /* An info metric: the labels carry the facts, the value is always 1;
     * absent until the engine exists (the backend is not known before). */
    if (m->backend[0])
        srv_buf_printf(o, "# HELP mkad_backend_info The engine's backend and K/V element type.\n"
                          "# TYPE mkad_backend_info gauge\n"
                          "mkad_backend_info{backend=\"%s\",kv_dtype=\"%s\"} 1\n",
                       m->backend, m->kv_dtype);
    counter(o, "mkad_http_read_timeouts_total",
            "Connections closed because a request did not arrive whole within request_read_timeout.",
            m->read_timeouts);
    counter(o, "mkad_preemptions_total",
            "Running sequences preempted (K/V pool full) and later resumed by recomputation.",
            m->preemptions);
    gauge(o, "mkad_sessions_resident", "Sessions whose state is resident in the engine.", m->sessions);
    counter(o, "mkad_prefix_shared_total",
            "Requests that forked a prompt prefix from a resident sequence of the same user.",
            m->prefix_hits);
    counter(o, "mkad_prefix_shared_tokens_total",
            "Prompt tokens forked from a resident sequence of the same user instead of prefilled "
            "(also counted in mkad_cached_tokens_total).", m->prefix_tokens);
    gauge(o, "mkad_prefix_cache_sequences",
          "Finished plain requests kept resident for prefix sharing (prefix_cache).", m->pc_entries);
    counter(o, "mkad_prefix_cache_evicted_total",
            "Prefix-cache sequences evicted to make room (blocks a fork still holds stay with it).",
            m->pc_evicted);
    gauge(o, "mkad_prefix_cache_blocks",
          "K/V blocks in the tables of prefix-cache sequences (a block shared by several counts once per table).",
          m->pc_blocks);
    if (m->have_store) { /* only with a state directory */
        const srv_store_stats *st = &m->store;
        counter(o, "mkad_session_writes_total", "Session turns written to the session store.",
                (unsigned long)st->writes);
        counter(o, "mkad_session_write_failures_total",
                "Session turns whose write failed (logged as session_write_failed).",
                (unsigned long)st->write_failures);
        counter(o, "mkad_session_blocks_written_total", "K/V blocks written to the session store.",
                (unsigned long)st->blocks_written);
        counter(o, "mkad_session_lookups_total", "Requests on a non-resident session looked up in the store.",
                (unsigned long)st->lookups);
        srv_buf_puts(o, "# HELP mkad_session_blocks_loaded_total K/V blocks loaded for resumed sessions, by tier.\n"
                        "# TYPE mkad_session_blocks_loaded_total counter\n");
        srv_buf_printf(o, "mkad_session_blocks_loaded_total{tier=\"host\"} %ld\n"
                          "mkad_session_blocks_loaded_total{tier=\"disk\"} %ld\n",
                       st->loaded_blocks_warm, st->loaded_blocks_disk);
        counter(o, "mkad_longterm_chunks_written_total", "L3 memory chunks stored as users' long-term memory.",
                (unsigned long)st->chunks_written);
        gauge(o, "mkad_session_write_queue", "Session store tasks queued (write-behind and lookups).",
              st->queue_depth);
        srv_buf_puts(o, "# HELP mkad_session_deleted_total Stored sessions deleted, by reason.\n"
                        "# TYPE mkad_session_deleted_total counter\n");
        srv_buf_printf(o, "mkad_session_deleted_total{reason=\"ttl\"} %ld\n"
                          "mkad_session_deleted_total{reason=\"disk_budget\"} %ld\n"
                          "mkad_session_deleted_total{reason=\"user_quota\"} %ld\n",
                       st->expired, st->evicted, st->quota_sessions);
        counter(o, "mkad_longterm_chunks_deleted_quota_total",
                "Long-term memory chunks deleted because their user was over user_chunks_max.",
                (unsigned long)st->quota_chunks);
        srv_buf_puts(o, "# HELP mkad_session_resumes_total Stored sessions resumed, by the way their history "
                        "came back (resume_policy).\n# TYPE mkad_session_resumes_total counter\n");
        for (int p = 0; p < SRV_PATH_COUNT; p++)
            srv_buf_printf(o, "mkad_session_resumes_total{path=\"%s\"} %ld\n", srv_resume_path_name(p),
                           st->resumes[p]);
        counter(o, "mkad_session_group_commits_total",
                "fsyncs of the session store's group commit (session_sync_ms), each for one or more turns.",
                (unsigned long)st->group_commits);
    }
    pthread_mutex_unlock(&m->mu);
    return o->failed ? -1 : 0;
}
