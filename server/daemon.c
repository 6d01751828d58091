/*
 * daemon.c — srv_run: the daemon's life on the loop thread.  Startup (the
 * listening socket, MHD, timers, signals, the engine thread), the engine's
 * events (model ready or failed, tokens, final answers) brought to this
 * thread, SIGHUP key reloads, the sweep timer (request deadlines, drain),
 * SIGTERM drain and exit, and systemd notifications.
 */
#include "config.h"

#include <errno.h>
#include <netdb.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#ifdef HAVE_SYSTEMD
#include <systemd/sd-daemon.h>
#endif

#include "srv_internal.h"

static void notify(const char *what)
{
#ifdef HAVE_SYSTEMD
    sd_notify(0, what);
#else
    (void)what;
#endif
}

static void begin_shutdown(srv_server *s, const char *why, int deadline_s);

static void on_ready(srv_server *s)
{
    const srv_engine_info *info = srv_engine_get_info(s->eng);
    s->md.vocab_size = info->mi.vocab_size;
    s->md.max_ctx = info->max_ctx;
    s->md.codec = info->codec;
    snprintf(s->backend, sizeof s->backend, "%s", info->backend);
    s->ready = 1;
    uv_timer_stop(&s->progress);
    srv_log("info", "ready", " model=%s backend=%s kv_pool_mib=%.1f kv_dtype=%s load_s=%.3f", s->model_name,
            info->backend, (double)info->kv_bytes / (1024.0 * 1024.0), info->kv_dtype,
            srv_now() - s->t_start);
    char st[512];
    snprintf(st, sizeof st, "READY=1\nSTATUS=serving %s", s->model_name);
    notify(st);
}

/* Exit status after a device fault: non-zero, so that systemd's
 * Restart=on-failure starts a fresh process (and a fresh CUDA context). */
#define SRV_EXIT_DEVICE 3

/* The engine's device failed (engine thread's DEVICE_FAILED).  The engine
 * thread answers every job it holds, and any still to come, with 503; here
 * the daemon stops accepting and exits as soon as those answers are out
 * (at most ~2 s for slow readers), never waiting out shutdown_timeout. */
static void on_device_failed(srv_server *s, const char *msg)
{
    s->exit_code = SRV_EXIT_DEVICE;
    begin_shutdown(s, "device_failed", 0);
    s->drain_deadline = srv_now(); /* also when a SIGTERM drain was already running */
    char st[256];
    snprintf(st, sizeof st, "STATUS=device failed, exiting: %.200s", msg);
    notify(st);
}

static void on_async(uv_async_t *h)
{
    srv_server *s = h->data;
    pthread_mutex_lock(&s->out_mu);
    srv_event *evs = s->out;
    int n = s->n_out;
    s->out = s->out2;
    int cap = s->cap_out;
    s->cap_out = s->cap_out2;
    s->out2 = evs;
    s->cap_out2 = cap;
    s->n_out = 0;
    pthread_mutex_unlock(&s->out_mu);
    for (int i = 0; i < n; i++) {
        srv_event *ev = &evs[i];
        switch (ev->type) {
        case SRV_EV_READY:
            on_ready(s);
            break;
        case SRV_EV_LOAD_FAILED:
            s->exit_code = 1;
            begin_shutdown(s, "model_load_failed", s->cfg->shutdown_timeout_s);
            break;
        case SRV_EV_DEVICE_FAILED:
            on_device_failed(s, ev->msg);
            break;
        case SRV_EV_START:
            srv_job_started(s, ev->job, ev);
            break;
        case SRV_EV_PROMPT_LOGPROBS:
            srv_job_prompt_logprobs(s, ev->job, ev);
            break;
        case SRV_EV_TOKEN:
            srv_job_token(s, ev->job, ev);
            break;
        case SRV_EV_CHOICE_END:
            srv_job_choice_end(s, ev->job, ev);
            break;
        case SRV_EV_FINAL:
            srv_job_final(s, ev->job, ev);
            break;
        }
    }
    srv_http_run(s);
}

/* Engine thread: append events, wake the loop. */
static void post_events(const srv_event *ev, int n, void *arg)
{
    srv_server *s = arg;
    pthread_mutex_lock(&s->out_mu);
    if (s->n_out + n > s->cap_out) {
        int cap = s->cap_out ? s->cap_out : 256;
        while (cap < s->n_out + n) cap *= 2;
        srv_event *o = realloc(s->out, (size_t)cap * sizeof *o);
        while (!o) { /* the loop frees the job only on FINAL: never drop one */
            pthread_mutex_unlock(&s->out_mu);
            uv_async_send(&s->async);
            usleep(1000);
            pthread_mutex_lock(&s->out_mu);
            o = realloc(s->out, (size_t)cap * sizeof *o);
        }
        s->out = o;
        s->cap_out = cap;
    }
    memcpy(s->out + s->n_out, ev, (size_t)n * sizeof *ev);
    s->n_out += n;
    pthread_mutex_unlock(&s->out_mu);
    uv_async_send(&s->async);
}

static void close_cb(uv_handle_t *h)
{
    (void)h;
}

static void finish_shutdown(srv_server *s)
{
    if (s->stopping) return;
    s->stopping = 1;
    srv_http_stop(s);
    /* The engine thread must be gone before the async handle closes. */
    srv_engine_stop(s->eng);
    s->eng = NULL;
    srv_log("info", "shutdown", " exit_code=%d", s->exit_code);
    uv_close((uv_handle_t *)&s->sweep, close_cb);
    uv_close((uv_handle_t *)&s->progress, close_cb);
    uv_close((uv_handle_t *)&s->watchdog, close_cb);
    uv_close((uv_handle_t *)&s->sigterm, close_cb);
    uv_close((uv_handle_t *)&s->sigint, close_cb);
    uv_close((uv_handle_t *)&s->sigpipe, close_cb);
    uv_close((uv_handle_t *)&s->sighup, close_cb);
    uv_close((uv_handle_t *)&s->async, close_cb);
}

/* Stops accepting; running requests get deadline_s seconds to finish. */
static void begin_shutdown(srv_server *s, const char *why, int deadline_s)
{
    if (s->draining) return;
    s->draining = 1;
    s->drain_deadline = srv_now() + deadline_s;
    notify("STOPPING=1\nSTATUS=draining");
    srv_log("info", "draining", " reason=%s inflight=%d deadline_s=%d", why, s->n_inflight, deadline_s);
    srv_http_quiesce(s);
    uv_timer_set_repeat(&s->sweep, 50);
    uv_timer_again(&s->sweep);
}

/* SIGHUP: re-read the keys; on failure the old keys stay in force. */
static void reload_keys(srv_server *s)
{
    srv_auth *a;
    if (srv_auth_load(s->cfg, &a) != 0) {
        srv_log("error", "keys_reload_failed", " keys=%d", srv_auth_count(s->auth));
        return;
    }
    srv_auth_free(s->auth);
    s->auth = a;
    srv_log("info", "keys_reloaded", " keys=%d", srv_auth_count(a));
}

static void on_signal(uv_signal_t *h, int signum)
{
    srv_server *s = h->data;
    if (signum == SIGPIPE) return;
    if (signum == SIGHUP) {
        reload_keys(s);
        return;
    }
    if (s->draining) {
        srv_log("warn", "signal", " signal=%d action=cancel_all", signum);
        s->drain_deadline = 0;
        return;
    }
    begin_shutdown(s, signum == SIGTERM ? "SIGTERM" : "SIGINT", s->cfg->shutdown_timeout_s);
}

static void on_sweep(uv_timer_t *t)
{
    srv_server *s = t->data;
    double now = srv_now();
    srv_http_sweep(s);
    for (srv_job *j = s->jobs; j; j = j->next) {
        if (j->finished) continue;
        if (s->draining && now >= s->drain_deadline) srv_job_cancel(s, j, SRV_CANCEL_SHUTDOWN);
        else if (now - j->t_arrival > s->cfg->request_timeout_s) srv_job_cancel(s, j, SRV_CANCEL_TIMEOUT);
    }
    if (s->draining && s->n_inflight == 0 && s->n_parse == 0) {
        /* let the last bytes of finished streams go out first */
        int pending = 0;
        for (srv_conn *c = s->conns; c; c = c->next)
            if (c->job && c->job->sse.len > c->job->sse_off) pending = 1;
        if (!pending || now >= s->drain_deadline + 2) finish_shutdown(s);
    }
}

static void on_progress(uv_timer_t *t)
{
    srv_server *s = t->data;
    srv_log("info", "model_loading", " dir=%s elapsed_s=%.1f", s->cfg->model, srv_now() - s->t_start);
}

#ifdef HAVE_SYSTEMD
static void on_watchdog(uv_timer_t *t)
{
    (void)t;
    sd_notify(0, "WATCHDOG=1");
}
#endif

/* Every connection is a file descriptor: raise the soft limit to what
 * max_connections needs (plus room for the model's files, the loop and the
 * engine), as far as the hard limit allows, and say so when it does not. */
static void raise_fd_limit(const srv_config *cfg)
{
    struct rlimit rl;
    rlim_t need = (rlim_t)cfg->max_connections + 64;
    if (getrlimit(RLIMIT_NOFILE, &rl) != 0 || rl.rlim_cur >= need) return;
    rlim_t want = rl.rlim_max != RLIM_INFINITY && rl.rlim_max < need ? rl.rlim_max : need;
    if (want > rl.rlim_cur) {
        rl.rlim_cur = want;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    if (want < need)
        srv_log("warn", "config", " option=max_connections value=%d open_files_limit=%llu "
                "error=\"the hard limit on open files is below max_connections + 64: raise it "
                "(LimitNOFILE=) or lower max_connections\"", cfg->max_connections,
                (unsigned long long)want);
}

/* Creates the listening socket ourselves: full control over the address
 * family and errors, and the bound port for --port 0. */
static int listen_on(const char *host, int port, int *out_port, int *v6)
{
    struct addrinfo hints = { 0 }, *ai = NULL;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
    char ps[16];
    snprintf(ps, sizeof ps, "%d", port);
    int rc = getaddrinfo(host, ps, &hints, &ai);
    if (rc != 0) {
        srv_log("error", "listen_failed", " host=%s port=%d error=\"%s\"", host, port, gai_strerror(rc));
        return -1;
    }
    int fd = -1, err = 0;
    for (struct addrinfo *a = ai; a; a = a->ai_next) {
        fd = socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK, a->ai_protocol);
        if (fd < 0) { err = errno; continue; }
        int one = 1;
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        if (bind(fd, a->ai_addr, a->ai_addrlen) == 0 && listen(fd, 1024) == 0) {
            *v6 = a->ai_family == AF_INET6;
            break;
        }
        err = errno;
        close(fd);
        fd = -1;
    }
    freeaddrinfo(ai);
    if (fd < 0) {
        srv_log("error", "listen_failed", " host=%s port=%d error=\"%s\"", host, port, strerror(err));
        return -1;
    }
    struct sockaddr_storage ss;
    socklen_t sl = sizeof ss;
    *out_port = port;
    if (getsockname(fd, (struct sockaddr *)&ss, &sl) == 0) {
        if (ss.ss_family == AF_INET) *out_port = ntohs(((struct sockaddr_in *)&ss)->sin_port);
        else if (ss.ss_family == AF_INET6) *out_port = ntohs(((struct sockaddr_in6 *)&ss)->sin6_port);
    }
    return fd;
}


int srv_run(const srv_config *cfg)
{
    srv_server srv, *s = &srv;
    memset(s, 0, sizeof *s);
    s->cfg = cfg;
    s->t_start = srv_now();
    s->created_at = (long)time(NULL);
    pthread_mutex_init(&s->out_mu, NULL);
    {
        FILE *f = fopen("/dev/urandom", "rb");
        if (!f || fread(&s->rng, sizeof s->rng, 1, f) != 1) s->rng = (uint64_t)time(NULL) ^ (uint64_t)getpid();
        if (f) fclose(f);
    }
    if (cfg->model_name && *cfg->model_name) {
        snprintf(s->model_name, sizeof s->model_name, "%s", cfg->model_name);
    } else {
        size_t n = strlen(cfg->model);
        while (n > 1 && cfg->model[n - 1] == '/') n--;
        size_t b = n;
        while (b > 0 && cfg->model[b - 1] != '/') b--;
        snprintf(s->model_name, sizeof s->model_name, "%.*s", (int)(n - b), cfg->model + b);
    }
    json_t *name_ok = json_string(s->model_name); /* NULL: not valid UTF-8 */
    if (!name_ok) {
        srv_log("error", "config", " option=model_name error=\"the model id must be valid UTF-8\"");
        return 2;
    }
    json_decref(name_ok);
    s->md.name = s->model_name;
    s->md.codec = NULL; /* set from the engine's tokenizer when the model is ready */
    s->md.default_max_tokens = cfg->default_max_tokens;
    /* The backend: a CUDA request on a host where CUDA cannot run is refused
     * here, before the port is bound and the model read, with a message
     * that says where to look.  (eng_create would refuse it too.) */
    int backend;
    const char *bname = cfg->backend && *cfg->backend ? cfg->backend : "auto";
    if (srv_config_backend(cfg, &backend) != ENG_OK) {
        srv_log("error", "config", " option=backend value=%s error=\"unknown backend (auto, cpu, cuda)\"",
                bname);
        return 2;
    }
    if (!eng_backend_available(backend)) {
        srv_log("error", "config", " option=backend value=%s error=\"no usable CUDA device: this mkad "
                "was built without CUDA, or no GPU answers (driver loaded? /dev/nvidia* present and "
                "allowed to the service?); use backend = auto or cpu to run on the CPU\"", bname);
        return 1;
    }
    if (srv_auth_load(cfg, &s->auth) != 0) return 1;
    if (cfg->state_dir && *cfg->state_dir) {
        if (mkdir(cfg->state_dir, 0750) != 0 && errno != EEXIST) {
            srv_log("error", "config", " option=state_dir path=%s error=\"%s\"", cfg->state_dir,
                    strerror(errno));
            return 1;
        }
        if (access(cfg->state_dir, W_OK) != 0) {
            srv_log("error", "config", " option=state_dir path=%s error=\"not writable\"", cfg->state_dir);
            return 1;
        }
    }
    if (!(s->met = srv_metrics_create())) {
        srv_auth_free(s->auth);
        return 1;
    }

    raise_fd_limit(cfg);
    int port = 0, v6 = 0;
    int lfd = listen_on(cfg->host, cfg->port, &port, &v6);
    if (lfd < 0) {
        srv_auth_free(s->auth);
        srv_metrics_free(s->met);
        return 1;
    }
    s->loop = uv_default_loop();
    if (srv_http_start(s, lfd, v6) != 0) {
        srv_log("error", "listen_failed", " host=%s port=%d error=\"MHD_start_daemon failed\"", cfg->host, port);
        srv_auth_free(s->auth);
        srv_metrics_free(s->met);
        return 1;
    }
    uv_timer_init(s->loop, &s->sweep);
    s->sweep.data = s;
    uv_timer_start(&s->sweep, on_sweep, 1000, 1000);
    uv_timer_init(s->loop, &s->progress);
    s->progress.data = s;
    uv_timer_start(&s->progress, on_progress, 1000, 1000);
    uv_timer_init(s->loop, &s->watchdog);
    s->watchdog.data = s;
#ifdef HAVE_SYSTEMD
    uint64_t wd_usec = 0;
    if (sd_watchdog_enabled(0, &wd_usec) > 0 && wd_usec > 0)
        uv_timer_start(&s->watchdog, on_watchdog, wd_usec / 2000, wd_usec / 2000);
#endif
    uv_async_init(s->loop, &s->async, on_async);
    s->async.data = s;
    uv_signal_init(s->loop, &s->sigterm);
    s->sigterm.data = s;
    uv_signal_start(&s->sigterm, on_signal, SIGTERM);
    uv_signal_init(s->loop, &s->sigint);
    s->sigint.data = s;
    uv_signal_start(&s->sigint, on_signal, SIGINT);
    uv_signal_init(s->loop, &s->sigpipe);
    s->sigpipe.data = s;
    uv_signal_start(&s->sigpipe, on_signal, SIGPIPE);
    uv_signal_init(s->loop, &s->sighup);
    s->sighup.data = s;
    uv_signal_start(&s->sighup, on_signal, SIGHUP);

    srv_log("info", "listening", " host=%s port=%d model=%s keys=%d", cfg->host, port,
            s->model_name, srv_auth_count(s->auth));
    if (srv_auth_count(s->auth) == 0)
        srv_log("info", "auth_off", " users=local admin=loopback msg=\"no API keys: every request is the "
                "user 'local'; /admin answers loopback clients only\"");
    notify("STATUS=loading model");
    if (srv_engine_start(cfg, s->met, post_events, s, &s->eng) != 0) {
        srv_log("error", "engine_start_failed", "%s", "");
        s->exit_code = 1;
        begin_shutdown(s, "engine_start_failed", s->cfg->shutdown_timeout_s);
        finish_shutdown(s);
    }
    srv_http_run(s);
    uv_run(s->loop, UV_RUN_DEFAULT);

    srv_engine_stop(s->eng);
    /* Jobs the engine never answered (only after a failed start). */
    while (s->jobs) {
        srv_job *j = s->jobs;
        s->jobs = j->next;
        j->refs = 1;
        srv_job_unref(j);
    }
    uv_loop_close(s->loop);
    for (int i = 0; i < s->n_out; i++) free(s->out[i].lp);
    free(s->out);
    free(s->out2);
    srv_auth_free(s->auth);
    srv_metrics_free(s->met);
    pthread_mutex_destroy(&s->out_mu);
    return s->exit_code;
}
