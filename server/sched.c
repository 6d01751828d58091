/*
 * sched.c — continuous batching.
 *
 * The engine thread, the only thread that touches the eng_engine.  Its step
 * planner and the planner's cost model are pure functions in plan.c.
 *
 *   loop:  take new jobs from the inbox (loop thread -> here, under mu/cv)
 *          drop cancelled jobs (client gone, stop string, timeout, shutdown)
 *          admit preempted sequences, then waiting jobs FIFO, while a
 *          sequence slot and the K/V blocks for the prompt are free (idle
 *          sessions are evicted LRU to make room); resolve the job's session
 *          plan a step (plan.c): every decoder one token, prefills chunked
 *          into what is left of the token budget and, with step_target_ms,
 *          of the time budget the measured step costs leave; if the
 *          step's new blocks do not fit, evict idle sessions, hold
 *          prefills back, then preempt the youngest sequence (it resumes
 *          later by recomputation, output unchanged);
 *          eng_step (its time goes to the cost model); sample per sequence
 *          post START/TOKEN/FINAL events to the loop (post callback)
 *
 * Device faults: an engine call that returns ENG_EDEVICE (a sticky CUDA
 * error, a GPU gone from the bus) leaves the engine unusable.  The thread
 * logs it once, posts DEVICE_FAILED, and from then on never calls the engine
 * again: every job it holds or later receives gets a 503 FINAL, and the loop
 * shuts the daemon down with a non-zero status so that systemd restarts it.
 *
 * Sessions: a session id maps to an engine sequence that stays resident
 * after its request ends (hot).  A new request on the session keeps the
 * longest common token prefix (block-aligned) and prefills the rest.  With a
 * state directory, every finished turn also goes to the session store
 * (store.c: the blocks that became full since the last write, exported here
 * and written behind on the store's thread).  A request on a session that is
 * not resident — evicted, or from before a restart — waits in the queue
 * while the store looks it up (STORE_LOADING); when the answer comes back
 * through the inbox, admit imports the stored blocks of the common prefix
 * (eng_seq_blocks_import) and prefills only the rest.  Sessions are keyed
 * by (user, id): the user comes from the request's API key (auth.c), so one
 * user's session id never reaches another user's state.
 */
#include "config.h"

#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "srv_internal.h"

/* srv_job.store_state */
enum { STORE_NONE = 0, STORE_LOADING, STORE_READY };

/* ---- the engine thread -------------------------------------------------------- */

typedef struct session {
    char user[SRV_USER_MAX + 1];
    char id[SRV_SESSION_ID_MAX + 1];
    int seq;              /* resident engine sequence */
    int busy;             /* a running job uses it */
    uint64_t last_used;
    int persisted;        /* full blocks already in the session store */
    uint64_t bank[SRV_MAX_BANK]; /* its L3 bank (long-term chunk ids), fixed for its lifetime */
    int n_bank;
} session;

typedef struct eseq {
    srv_job *job;         /* borrowed until its FINAL event */
    int seq;              /* engine slot; -1 while preempted */
    const int32_t *src;   /* what is prefilled: the prompt, or after a preemption the replay */
    int n_src;
    int n_past;           /* tokens of src in the engine; n_past == n_src: decoding */
    int32_t *replay;      /* owned: prompt + fed generated tokens of a preempted sequence */
    int resuming;         /* prefilling the replay: its last chunk needs no sampling */
    int n_gen;            /* tokens sampled */
    int max_gen;          /* the request's max_tokens, or for max_tokens_auto what the pool holds */
    int32_t next_tok;     /* sampled, fed in the next step */
    int32_t argmax_tok;   /* a greedy decode step's pick, from the engine (ids_only) */
    srv_logprob *plp;     /* (n_src) echo + logprobs: the prompt's log-probabilities, collected
                             one prefill token per step (the engine returns the logits after
                             an item's last token only); NULL once posted to the loop */
    int cached;
    eng_sampler *smp;     /* kept across a preemption: the RNG continues exactly */
    uint64_t order;       /* admission order (older = smaller) */
    int last_step;
    session *sess;
    int choice;           /* which of the request's n choices (0..n-1) */
    int *forks;           /* (n_forks) choice 0 before its first token: empty slots reserved for
                             choices 1..n-1, forked from it once the prompt is in (-1 while
                             preempted); NULL afterwards */
    int n_forks;
    int gate;             /* "both" resume: the prefill stops at this many tokens until the
                             loaded second half (tail) is imported there; 0 = none */
    srv_loaded *tail;     /* that second half, once the store sent it */
} eseq;

/* A finished plain request's sequence kept resident (its full blocks) so that
 * a later prompt of the same user with the same prefix forks them. */
typedef struct pcache {
    char user[SRV_USER_MAX + 1];
    int seq;
    uint64_t last_used;
} pcache;

/* Frees what a sequence owns besides its engine slot. */
static void eseq_release(eseq *es)
{
    eng_sampler_free(es->smp);
    free(es->replay);
    free(es->plp);
    free(es->forks);
    srv_loaded_free(es->tail);
    es->tail = NULL;
    es->gate = 0;
    es->smp = NULL;
    es->replay = NULL;
    es->plp = NULL;
    es->forks = NULL;
    es->n_forks = 0;
}

struct srv_engine {
    const srv_config *cfg;
    srv_metrics *met;
    srv_post_fn post;
    void *post_arg;
    pthread_t th;
    int started;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    srv_job **inbox;      /* guarded by mu */
    int n_inbox, cap_inbox;
    int stop;             /* guarded by mu */
    srv_engine_info info;
    srv_codec *codec;     /* the tokenizer, or NULL */
    /* engine thread only */
    eng_model *model;
    eng_engine *eng;
    eseq *run;            /* (max_seqs) */
    int n_run;
    srv_job **wait;       /* FIFO */
    int n_wait, cap_wait;
    eseq *pre;            /* preempted, waiting to be resumed (before any new job) */
    int n_pre, cap_pre;
    session *sess;        /* (max_sessions) */
    int n_sess;
    pcache *pc;           /* (cfg->prefix_cache) finished plain requests kept for prefix sharing */
    int n_pc;
    float *fork_lg;       /* (vocab) a copy of the logits each forked choice samples from */
    float *logits;        /* (max_seqs, vocab) */
    float *scratch;       /* (vocab) raw logits for logprobs */
    eng_batch_item *items;
    srv_plan_seq *pseqs;
    srv_plan_item *plan;
    srv_event *evs;
    int n_evs, cap_evs;
    int step_no;
    srv_step_cost cost;   /* what steps cost, measured (plan.c) */
    uint64_t order, clock;
    int dead;             /* an engine call returned ENG_EDEVICE: never call it again */
    srv_store *store;     /* the session store, or NULL (no state directory) */
    eng_block_format bf;
    srv_loaded *loaded;   /* lookups the store's thread answered, guarded by mu */
    struct forgot *forgot;/* sessions the store deleted, guarded by mu */
    srv_sess_op *ops;     /* admin questions about resident sessions, guarded by mu */
    pthread_cond_t ops_cv;/* signalled when ops were answered */
    int ops_closed;       /* guarded by mu: the thread has ended, ops are answered at once */
};

int srv_config_backend(const srv_config *cfg, int *backend)
{
    const char *name = cfg->backend && *cfg->backend ? cfg->backend : "auto";
    return eng_backend_parse(name, backend);
}

static srv_event *ev_new(srv_engine *se, int type, srv_job *job)
{
    if (se->n_evs == se->cap_evs) {
        int cap = se->cap_evs ? se->cap_evs * 2 : 64;
        srv_event *e = realloc(se->evs, (size_t)cap * sizeof *e);
        if (!e) return NULL;
        se->evs = e;
        se->cap_evs = cap;
    }
    srv_event *e = &se->evs[se->n_evs++];
    memset(e, 0, sizeof *e);
    e->type = type;
    e->job = job;
    return e;
}

static void flush_events(srv_engine *se)
{
    if (se->n_evs) se->post(se->evs, se->n_evs, se->post_arg);
    se->n_evs = 0;
}

/* A FINAL event must never be lost (the loop frees the job on it): when the
 * event vector cannot grow, flush what is there and retry. */
/* The job's session is no longer in flight (quota eviction may take it);
 * what the store sent for the job and nobody took is freed. */
static void job_done(srv_engine *se, srv_job *job)
{
    if (job->store_busy) srv_store_busy(se->store, job->req->user, job->req->session_id, 0);
    job->store_busy = 0;
    srv_loaded_free(job->loaded);
    srv_loaded_free(job->tail);
    job->loaded = job->tail = NULL;
}

static void post_end(srv_engine *se, int type, srv_job *job, int finish, int status, const char *code,
                     const char *msg, const srv_usage *u, int choice, int n_gen)
{
    srv_event tmp = { .type = type, .job = job };
    if (type == SRV_EV_FINAL) job_done(se, job);
    srv_event *e = ev_new(se, type, job);
    if (!e) {
        flush_events(se);
        e = ev_new(se, type, job);
    }
    if (!e) e = &tmp;
    e->finish = finish;
    e->status = status;
    e->code = code;
    e->choice = choice;
    e->n_gen = n_gen;
    if (u) e->usage = *u;
    if (msg) snprintf(e->msg, sizeof e->msg, "%s", msg);
    if (e == &tmp) se->post(e, 1, se->post_arg);
}

static void post_final_code(srv_engine *se, srv_job *job, int finish, int status, const char *code,
                            const char *msg, const srv_usage *u)
{
    post_end(se, SRV_EV_FINAL, job, finish, status, code, msg, u, 0, u ? u->completion_tokens : 0);
}

static void post_final(srv_engine *se, srv_job *job, int finish, int status, const char *msg,
                       const srv_usage *u)
{
    post_final_code(se, job, finish, status, NULL, msg, u);
}

/* One of a job's sequences (a choice) ended; the engine no longer holds it.
 * A job's last sequence posts its FINAL (usage: the sum over its choices);
 * one that ends while others go on posts CHOICE_END.  An error in one
 * choice is the job's: the others end with it at the next drop_cancelled,
 * and the last one posts it. */
static void eseq_end(srv_engine *se, const eseq *es, int finish, int status, const char *code, const char *msg)
{
    srv_job *job = es->job;
    job->eng_live--;
    job->eng_gen += es->n_gen;
    if (finish == SRV_FINISH_ERROR && !job->eng_err_status) {
        job->eng_err_status = status ? status : 500;
        job->eng_err_code = code;
        snprintf(job->eng_err_msg, sizeof job->eng_err_msg, "%s", msg ? msg : "");
    }
    if (job->eng_live > 0) {
        if (!job->eng_err_status && finish != SRV_FINISH_CANCELLED)
            post_end(se, SRV_EV_CHOICE_END, job, finish, 0, NULL, NULL, NULL, es->choice, es->n_gen);
        return;
    }
    srv_usage u = { job->req->n_prompt, job->eng_gen, es->cached };
    if (job->eng_err_status)
        post_end(se, SRV_EV_FINAL, job, SRV_FINISH_ERROR, job->eng_err_status, job->eng_err_code,
                 job->eng_err_msg, &u, es->choice, es->n_gen);
    else
        post_end(se, SRV_EV_FINAL, job, finish, status, code, msg, &u, es->choice, es->n_gen);
}

/* Lets go of the slots choice 0 holds for its forks (before it forked). */
static void forks_release(srv_engine *se, eseq *es)
{
    for (int i = 0; i < es->n_forks; i++) {
        if (es->forks[i] >= 0 && !se->dead) eng_seq_free(se->eng, es->forks[i]);
        es->forks[i] = -1;
    }
}

/* ---- device faults ---------------------------------------------------------------- */

#define DEVICE_FAILED_MSG "the inference device failed; the server is restarting"

/* An engine call returned ENG_EDEVICE: logs it and tells the loop, once.  The
 * caller stops using the engine; the main loop then fails every job
 * (fail_all_dead).  DEVICE_FAILED is posted like a FINAL: never lost. */
static void device_fault(srv_engine *se, const char *call, int rc, const char *err)
{
    if (se->dead) return;
    se->dead = 1;
    char q[300];
    const char *why = err && *err ? err : eng_strerror(rc);
    srv_log("error", "device_failed", " call=%s status=%d backend=%s running=%d waiting=%d error=%s",
            call, rc, se->info.backend, se->n_run, se->n_wait + se->n_pre,
            srv_log_quote(why, q, sizeof q));
    srv_event *e = ev_new(se, SRV_EV_DEVICE_FAILED, NULL);
    if (!e) {
        flush_events(se);
        e = ev_new(se, SRV_EV_DEVICE_FAILED, NULL);
    }
    if (e) {
        snprintf(e->msg, sizeof e->msg, "%s: %s", call, why);
    } else {
        srv_event tmp = { .type = SRV_EV_DEVICE_FAILED };
        snprintf(tmp.msg, sizeof tmp.msg, "%s: %s", call, why);
        se->post(&tmp, 1, se->post_arg);
    }
}

/* After a device fault: answers every job the thread holds with 503
 * (streams get an SSE error event) without touching the engine; the
 * sessions' state died with it. */
static void fail_all_dead(srv_engine *se)
{
    for (int r = 0; r < se->n_run; r++) {
        eseq *es = &se->run[r];
        eseq_release(es);
        eseq_end(se, es, SRV_FINISH_ERROR, 503, "device_error", DEVICE_FAILED_MSG);
    }
    se->n_run = 0;
    for (int k = 0; k < se->n_pre; k++) {
        eseq *p = &se->pre[k];
        eseq_release(p);
        eseq_end(se, p, SRV_FINISH_ERROR, 503, "device_error", DEVICE_FAILED_MSG);
    }
    se->n_pre = 0;
    se->n_pc = 0;
    for (int i = 0; i < se->n_wait; i++) {
        srv_usage u = { se->wait[i]->req->n_prompt, 0, 0 };
        post_final_code(se, se->wait[i], SRV_FINISH_ERROR, 503, "device_error", DEVICE_FAILED_MSG, &u);
    }
    se->n_wait = 0;
    se->n_sess = 0;
}

static int blocks_for(const srv_engine *se, int tokens)
{
    return (tokens + se->info.block_size - 1) / se->info.block_size;
}

static void session_drop(srv_engine *se, session *s)
{
    eng_seq_free(se->eng, s->seq);
    int i = (int)(s - se->sess);
    /* keep the array dense; fix the eseq pointers into it */
    if (i != se->n_sess - 1) {
        session *last = &se->sess[se->n_sess - 1];
        for (int r = 0; r < se->n_run; r++)
            if (se->run[r].sess == last) se->run[r].sess = s;
        *s = *last;
    }
    se->n_sess--;
}

/* Drops prefix-cache entry i (its blocks stay with any sequence that forked them). */
static void pcache_drop(srv_engine *se, int i)
{
    eng_seq_free(se->eng, se->pc[i].seq);
    se->pc[i] = se->pc[--se->n_pc];
}

/* Evicts the least recently used prefix-cache entry, else the least recently
 * used idle session other than `except`; 0 if none.  A block shared with a
 * sequence that stays goes back to the pool only when that one lets go. */
static int evict_lru(srv_engine *se, const session *except)
{
    if (se->n_pc > 0) {
        int old = 0;
        for (int i = 1; i < se->n_pc; i++)
            if (se->pc[i].last_used < se->pc[old].last_used) old = i;
        srv_log("debug", "prefix_cache_evicted", " user=%s tokens=%d", se->pc[old].user,
                eng_seq_len(se->eng, se->pc[old].seq));
        pcache_drop(se, old);
        srv_metrics_prefix_evicted(se->met);
        return 1;
    }
    session *best = NULL;
    for (int i = 0; i < se->n_sess; i++) {
        session *s = &se->sess[i];
        if (s->busy || s == except) continue;
        if (!best || s->last_used < best->last_used) best = s;
    }
    if (!best) return 0;
    srv_log("debug", "session_evicted", " session=%s tokens=%d", best->id,
            eng_seq_len(se->eng, best->seq));
    session_drop(se, best);
    return 1;
}

static session *session_find(srv_engine *se, const char *user, const char *id)
{
    for (int i = 0; i < se->n_sess; i++)
        if (strcmp(se->sess[i].id, id) == 0 && strcmp(se->sess[i].user, user) == 0) return &se->sess[i];
    return NULL;
}

/* Writes a session's turn behind: the blocks that became full since the
 * last write (exported here, on the engine thread) and all its token ids.
 * With final, the store posts that event after the write; returns 0 when it
 * took it, -1 when the caller must post it. */
static int persist(srv_engine *se, session *s, const srv_event *final)
{
    if (!se->store) return -1;
    int n_full = eng_seq_n_full_blocks(se->eng, s->seq);
    int first = s->persisted < n_full ? s->persisted : n_full;
    size_t len = (size_t)(n_full - first) * se->bf.block_bytes;
    void *buf = malloc(len ? len : 1);
    int rc = buf ? eng_seq_blocks_export(se->eng, s->seq, first, n_full - first, buf, len) : ENG_ENOMEM;
    if (rc != ENG_OK) {
        free(buf);
        if (rc == ENG_EDEVICE) device_fault(se, "eng_seq_blocks_export", rc, NULL);
        srv_log("error", "session_write_failed", " session=%s error=\"export: %s\"", s->id, eng_strerror(rc));
        return -1;
    }
    if (final) flush_events(se); /* the job's tokens go out before its deferred FINAL */
    if (srv_store_write(se->store, s->user, s->id, eng_seq_tokens(se->eng, s->seq), eng_seq_len(se->eng, s->seq),
                        n_full, first, buf, s->bank, s->n_bank, final) != 0)
        return -1;
    s->persisted = n_full;
    return final ? 0 : -1;
}

/* A finished plain request's sequence: kept (its full blocks) as a
 * prefix-cache entry of its user, or freed. */
static void pcache_keep(srv_engine *se, const eseq *es)
{
    int B = se->info.block_size;
    int n_full = eng_seq_len(se->eng, es->seq) / B;
    if (!se->cfg->prefix_sharing || se->cfg->prefix_cache <= 0 || n_full == 0 ||
        eng_seq_truncate(se->eng, es->seq, n_full * B) != ENG_OK) {
        eng_seq_free(se->eng, es->seq);
        return;
    }
    /* entries of this user that the new one covers add nothing */
    int len = n_full * B;
    const int32_t *t = eng_seq_tokens(se->eng, es->seq);
    for (int i = se->n_pc - 1; i >= 0; i--) {
        int l = eng_seq_len(se->eng, se->pc[i].seq);
        if (l <= len && strcmp(se->pc[i].user, es->job->req->user) == 0 &&
            memcmp(eng_seq_tokens(se->eng, se->pc[i].seq), t, (size_t)l * sizeof *t) == 0)
            pcache_drop(se, i);
    }
    if (se->n_pc == se->cfg->prefix_cache) {
        int old = 0;
        for (int i = 1; i < se->n_pc; i++)
            if (se->pc[i].last_used < se->pc[old].last_used) old = i;
        pcache_drop(se, old);
    }
    pcache *p = &se->pc[se->n_pc++];
    snprintf(p->user, sizeof p->user, "%s", es->job->req->user);
    p->seq = es->seq;
    p->last_used = ++se->clock;
}

static void finish_seq(srv_engine *se, int r, int finish, int status, const char *msg)
{
    eseq *es = &se->run[r];
    int posted = 0;
    forks_release(se, es);
    /* The session stays marked in flight until its turn's write is queued;
     * the job itself must not be touched once persist handed its FINAL to
     * the store (the loop may free it then): copy what the unmarking needs. */
    char bu[SRV_USER_MAX + 1] = "", bi[SRV_SESSION_ID_MAX + 1] = "";
    if (es->job->store_busy) {
        snprintf(bu, sizeof bu, "%s", es->job->req->user);
        snprintf(bi, sizeof bi, "%s", es->job->req->session_id);
        es->job->store_busy = 0;
    }
    job_done(se, es->job);
    if (es->sess && finish != SRV_FINISH_ERROR) {
        /* sessions have one choice: this is the job's FINAL */
        srv_usage u = { es->job->req->n_prompt, es->n_gen, es->cached };
        es->sess->busy = 0;
        es->sess->last_used = ++se->clock;
        /* session_sync: the response completes once the turn is durable */
        srv_event fin = { .type = SRV_EV_FINAL, .job = es->job, .finish = finish, .status = status,
                          .usage = u, .choice = es->choice, .n_gen = es->n_gen };
        if (msg) snprintf(fin.msg, sizeof fin.msg, "%s", msg);
        /* once posted the job is the loop's: not touched again (eng_live
         * of a session's one choice needs no update) */
        posted = persist(se, es->sess, se->cfg->session_sync || se->cfg->session_sync_ms > 0 ? &fin : NULL) == 0;
    } else if (es->sess) {
        es->sess->busy = 0;
        session_drop(se, es->sess); /* frees the sequence */
        es = &se->run[r];
    } else if (es->choice == 0 && (finish == SRV_FINISH_STOP || finish == SRV_FINISH_LENGTH)) {
        pcache_keep(se, es);
    } else {
        eng_seq_free(se->eng, es->seq);
    }
    eseq_release(es);
    if (!posted) eseq_end(se, es, finish, status, NULL, msg);
    if (bu[0]) srv_store_busy(se->store, bu, bi, 0);
    se->run[r] = se->run[--se->n_run];
}

static int free_blocks(const srv_engine *se)
{
    eng_stats st;
    eng_get_stats(se->eng, &st);
    return st.blocks_total - st.blocks_used;
}

/* Takes a slot, evicting idle sessions (except `keep`) while none is free. */
static int take_slot(srv_engine *se, int *seq)
{
    int rc;
    while ((rc = eng_seq_create(se->eng, seq)) == ENG_ENOSPC && evict_lru(se, NULL)) {}
    if (rc == ENG_EDEVICE) device_fault(se, "eng_seq_create", rc, NULL);
    return rc;
}

/* Preemption by recomputation: the sequence's blocks are freed and it goes
 * back to the front of the queue with its tokens so far (prompt + fed
 * generated tokens) as a "replay" prompt and its sampler intact.  When it
 * is readmitted the replay is prefilled and decoding continues with the
 * token it had already sampled; the engine is exact whatever the chunking,
 * so the output is what it would have been without the interruption.  A
 * preempted session job loses the session's resident state. */
static void preempt(srv_engine *se, int r)
{
    eseq es = se->run[r];
    if (se->n_pre == se->cap_pre) {
        int cap = se->cap_pre ? se->cap_pre * 2 : 16;
        eseq *p = realloc(se->pre, (size_t)cap * sizeof *p);
        if (!p) { /* cannot park it: fail it rather than lose it */
            finish_seq(se, r, SRV_FINISH_ERROR, 503, "out of memory while preempting");
            return;
        }
        se->pre = p;
        se->cap_pre = cap;
    }
    int len = eng_seq_len(se->eng, es.seq);
    if (es.n_past >= es.n_src) { /* decoding: replay everything it holds */
        int32_t *rp = malloc((size_t)(len > 0 ? len : 1) * sizeof *rp);
        if (!rp) {
            finish_seq(se, r, SRV_FINISH_ERROR, 503, "out of memory while preempting");
            return;
        }
        memcpy(rp, eng_seq_tokens(se->eng, es.seq), (size_t)len * sizeof *rp);
        free(es.replay);
        es.replay = rp;
        es.src = rp;
        es.n_src = len;
        es.resuming = 1;
    }
    es.n_past = 0; /* a prefilling sequence simply starts its prefill again */
    forks_release(se, &es); /* taken again when it is readmitted */
    if (es.gate) { /* a "both" resume: its loaded half is of no use now, all is recomputed */
        srv_loaded_free(es.tail);
        es.tail = NULL;
        es.gate = 0;
        es.cached = 0;
    }
    if (es.sess) {
        session *s = es.sess;
        es.sess = NULL;
        se->run[r].sess = NULL;
        s->busy = 0;
        session_drop(se, s); /* frees the sequence */
    } else {
        eng_seq_free(se->eng, es.seq);
    }
    es.seq = -1;
    se->run[r] = se->run[--se->n_run];
    se->pre[se->n_pre++] = es;
    srv_metrics_preempted(se->met);
    srv_log("debug", "preempted", " tokens=%d generated=%d running=%d free_blocks=%d", len, es.n_gen,
            se->n_run, free_blocks(se));
}

static void fail_job(srv_engine *se, srv_job *job, int status, const char *msg)
{
    srv_usage u = { job->req->n_prompt, 0, 0 };
    post_final(se, job, SRV_FINISH_ERROR, status, msg, &u);
}

/* Session resolution: attaches the session's resident sequence to es,
 * keeping the reusable prefix.  Returns 1 = ready, 0 = not now (the job stays
 * waiting).  Today state is resident or absent, so the answer is always 1; a
 * slower tier (host RAM, RocksDB) answers 0 while it loads the state on the
 * thread pool and hands it over through the inbox (eng_seq_import). */
static int session_resolve(srv_engine *se, eseq *es, session *s)
{
    const srv_genreq *rq = es->job->req;
    es->seq = s->seq;
    int have = eng_seq_len(se->eng, s->seq);
    /* prompt logprobs need the logits of every prompt position: no reuse */
    int keep = rq->prompt_logprobs ? 0
               : srv_reuse_len(eng_seq_tokens(se->eng, s->seq), have, rq->prompt, rq->n_prompt,
                               se->info.block_size);
    if (keep != have) {
        int rc = eng_seq_truncate(se->eng, s->seq, keep);
        if (rc != ENG_OK && rc != ENG_EDEVICE) {
            rc = eng_seq_truncate(se->eng, s->seq, 0); /* 0 is always allowed */
            keep = 0;
        }
        if (rc == ENG_EDEVICE) device_fault(se, "eng_seq_truncate", rc, NULL);
        /* blocks past the cut were persisted for the old history: the
         * next write covers the new ones (their identities differ) */
        if (s->persisted > keep / se->info.block_size) s->persisted = keep / se->info.block_size;
    }
    es->cached = keep;
    es->n_past = keep;
    s->busy = 1;
    s->last_used = ++se->clock;
    es->sess = s;
    return 1;
}

/* Imports the blocks a store lookup found into the empty sequence seq;
 * returns how many (0: recompute everything). */
static int import_loaded(srv_engine *se, srv_job *job, int seq)
{
    srv_loaded *ld = job->loaded;
    const char *sid = job->req->session_id;
    char err[256] = "";
    if (ld->n_bank > 0) { /* the session's L3 bank, bound before any K/V is made or imported */
        int rc = eng_seq_set_l3_bank(se->eng, seq, ld->n_bank, ld->bank_mu);
        if (rc != ENG_OK) {
            srv_log("warn", "l3_bank_refused", " session=%s chunks=%d status=%s", sid, ld->n_bank, eng_strerror(rc));
            ld->n_bank = 0;
            ld->n_blocks = 0; /* stored K/V were made under that bank */
        }
    }
    if (!ld->found) {
        srv_log("info", "session_new", " session=%s user=%s l3_bank=%d", sid, job->req->user, ld->n_bank);
        return 0;
    }
    if (ld->more) { /* "both": prefill [0, split) now; the rest is imported when it arrives */
        srv_log("info", "session_resume_split", " session=%s path=both stored_blocks=%d prefill_blocks=%d "
                "load_blocks=%d est_ms=%.2f", sid, ld->n_stored, ld->split, ld->n_stored - ld->split,
                ld->t_est * 1000.0);
        return 0;
    }
    int rc = ld->n_blocks > 0 ? eng_seq_blocks_import(se->eng, seq, job->req->prompt, ld->n_blocks, ld->buf,
                                                      (size_t)ld->n_blocks * se->bf.block_bytes, err, sizeof err)
                              : ENG_OK;
    if (rc == ENG_EDEVICE) device_fault(se, "eng_seq_blocks_import", rc, err);
    int n = rc == ENG_OK ? ld->n_blocks : 0;
    char q[300];
    srv_log("info", "session_resumed", " session=%s path=%s tokens=%d stored_blocks=%d l3_bank=%d blocks_warm=%d "
            "blocks_disk=%d load_ms=%.2f est_ms=%.2f prefill_tokens=%d%s%s", sid, srv_resume_path_name(ld->path),
            n * se->info.block_size, ld->n_stored, ld->n_bank, ld->blocks_warm, ld->blocks_disk, ld->load_s * 1000.0,
            ld->t_est * 1000.0, job->req->n_prompt - n * se->info.block_size, rc == ENG_OK ? "" : " error=",
            rc == ENG_OK ? "" : srv_log_quote(err, q, sizeof q));
    return n;
}

/* "both" resumes whose prefill reached the split: the loaded second half
 * is imported there (exactly where its first block begins; the records'
 * EMA checkpoints make the sequence continue as if prefilled) and the
 * prefill goes on after it.  A half that failed to load (fewer blocks, or
 * an import error) is recomputed instead. */
static void land_tails(srv_engine *se)
{
    for (int r = 0; r < se->n_run; r++) {
        eseq *es = &se->run[r];
        if (!es->gate || !es->tail || es->n_past != es->gate) continue;
        srv_loaded *ld = es->tail;
        const char *sid = es->job->req->session_id;
        char err[256] = "", q[300];
        int rc = ENG_OK, n = 0;
        if (ld->n_blocks > 0 && ld->first * se->info.block_size == es->n_past) {
            rc = eng_seq_blocks_import(se->eng, es->seq, es->src + es->n_past, ld->n_blocks, ld->buf,
                                       (size_t)ld->n_blocks * se->bf.block_bytes, err, sizeof err);
            if (rc == ENG_EDEVICE) device_fault(se, "eng_seq_blocks_import", rc, err);
            if (rc == ENG_OK) n = ld->n_blocks;
        }
        es->n_past += n * se->info.block_size;
        es->cached += n * se->info.block_size;
        srv_log("info", "session_resumed", " session=%s path=both tokens=%d stored_blocks=%d prefilled_blocks=%d "
                "blocks_warm=%d blocks_disk=%d load_ms=%.2f est_ms=%.2f prefill_tokens=%d%s%s", sid,
                n * se->info.block_size, ld->n_stored, ld->split, ld->blocks_warm, ld->blocks_disk,
                ld->load_s * 1000.0, ld->t_est * 1000.0, es->n_src - n * se->info.block_size,
                rc == ENG_OK ? "" : " error=", rc == ENG_OK ? "" : srv_log_quote(err, q, sizeof q));
        srv_loaded_free(ld);
        es->tail = NULL;
        es->gate = 0;
        if (se->dead) return;
    }
}

/* Sequences that cannot move until their loaded half arrives. */
static int n_stalled(const srv_engine *se)
{
    int n = 0;
    for (int r = 0; r < se->n_run; r++) n += se->run[r].gate && se->run[r].n_past == se->run[r].gate && !se->run[r].tail;
    return n;
}

/* Hands the store's answers to their waiting jobs; an answer for a job that
 * is gone (cancelled meanwhile) is dropped. */
static void take_loaded(srv_engine *se)
{
    pthread_mutex_lock(&se->mu);
    srv_loaded *l = se->loaded, *fifo = NULL;
    se->loaded = NULL;
    pthread_mutex_unlock(&se->mu);
    while (l) { /* the list is newest first: a "both" answer's halves must go in order */
        srv_loaded *next = l->next;
        l->next = fifo;
        fifo = l;
        l = next;
    }
    l = fifo;
    while (l) {
        srv_loaded *next = l->next;
        l->next = NULL;
        if (l->tail) { /* a "both" resume's loaded half: for the waiting job, or the running sequence */
            srv_job *job = NULL;
            for (int i = 0; i < se->n_wait && !job; i++)
                if (se->wait[i]->id == l->job_id && se->wait[i]->loaded && se->wait[i]->loaded->more) job = se->wait[i];
            eseq *es = NULL;
            for (int r = 0; r < se->n_run && !job && !es; r++)
                if (se->run[r].job->id == l->job_id && se->run[r].gate && !se->run[r].tail) es = &se->run[r];
            if (job) job->tail = l;
            else if (es) es->tail = l;
            else srv_loaded_free(l); /* cancelled, preempted or failed meanwhile */
            l = next;
            continue;
        }
        srv_job *job = NULL;
        for (int i = 0; i < se->n_wait && !job; i++)
            if (se->wait[i]->id == l->job_id && se->wait[i]->store_state == STORE_LOADING) job = se->wait[i];
        if (job) {
            job->store_state = STORE_READY;
            job->loaded = l;
        } else {
            srv_loaded_free(l);
        }
        l = next;
    }
}

/* A session the store deleted (TTL, disk budget, quota) while it may be
 * resident: its next turn writes all its blocks again. */
typedef struct forgot {
    char user[SRV_USER_MAX + 1], id[SRV_SESSION_ID_MAX + 1];
    struct forgot *next;
} forgot;

static void store_forgot(void *ctx, const char *user, const char *id)
{
    srv_engine *se = ctx;
    forgot *f = calloc(1, sizeof *f);
    if (!f) return; /* its next write references blocks that are gone: a later resume recomputes them */
    snprintf(f->user, sizeof f->user, "%s", user);
    snprintf(f->id, sizeof f->id, "%s", id);
    pthread_mutex_lock(&se->mu);
    f->next = se->forgot;
    se->forgot = f;
    pthread_mutex_unlock(&se->mu);
}

static void take_forgotten(srv_engine *se)
{
    pthread_mutex_lock(&se->mu);
    forgot *f = se->forgot;
    se->forgot = NULL;
    pthread_mutex_unlock(&se->mu);
    while (f) {
        forgot *next = f->next;
        session *s = session_find(se, f->user, f->id);
        if (s) s->persisted = 0;
        free(f);
        f = next;
    }
}

/* The store's callback (on its thread). */
static void store_loaded(void *ctx, srv_loaded *res)
{
    srv_engine *se = ctx;
    pthread_mutex_lock(&se->mu);
    res->next = se->loaded;
    se->loaded = res;
    pthread_cond_signal(&se->cv);
    pthread_mutex_unlock(&se->mu);
}

/* Answers the admin questions about resident sessions (under mu). */
static void answer_ops(srv_engine *se)
{
    eng_stats st = { 0 };
    if (!se->dead) eng_get_stats(se->eng, &st);
    for (srv_sess_op *op = se->ops; op; op = op->next) {
        session *s = se->dead || !op->id ? NULL : session_find(se, op->user, op->id);
        op->found = s != NULL;
        op->n_resident = se->n_sess;
        op->blocks_used = st.blocks_used;
        op->blocks_total = st.blocks_total;
        if (s) {
            op->busy = s->busy;
            op->tokens = eng_seq_len(se->eng, s->seq);
            op->persisted_blocks = s->persisted;
            if (op->op == SRV_SESS_DROP && !s->busy) {
                srv_log("info", "session_evicted", " session=%s user=%s reason=admin", s->id, s->user);
                session_drop(se, s);
            }
        }
        op->done = 1;
    }
    se->ops = NULL;
    pthread_cond_broadcast(&se->ops_cv);
}

int srv_engine_session_op(srv_engine *se, srv_sess_op *op)
{
    pthread_mutex_lock(&se->mu);
    op->done = 0;
    if (se->ops_closed || se->stop) {
        op->found = 0;
        op->done = 1;
    } else {
        op->next = se->ops;
        se->ops = op;
        pthread_cond_signal(&se->cv);
        while (!op->done) pthread_cond_wait(&se->ops_cv, &se->mu);
    }
    pthread_mutex_unlock(&se->mu);
    return op->found;
}

/* The step's completed L3 memory chunks of session sequences become their
 * users' long-term memory (written behind by the store). */
static void keep_chunks(srv_engine *se)
{
    const eng_chunk *ch;
    int n = se->store ? eng_step_chunks(se->eng, &ch) : 0;
    for (int i = 0; i < n; i++)
        for (int r = 0; r < se->n_run; r++) {
            const eseq *es = &se->run[r];
            if (es->seq != ch[i].seq) continue;
            if (es->sess) srv_store_chunk(se->store, es->sess->user, es->sess->id, ch[i].index, ch[i].emb, ch[i].mu);
            break;
        }
}

/* Waiting jobs whose session lookup is still running. */
static int n_loading(const srv_engine *se)
{
    int n = 0;
    for (int i = 0; i < se->n_wait; i++) n += se->wait[i]->store_state == STORE_LOADING;
    return n;
}

static int free_slots(const srv_engine *se)
{
    eng_stats st;
    eng_get_stats(se->eng, &st);
    return se->info.max_seqs - st.seqs_active;
}

/* Tokens of the prompt that sequence src can give by eng_seq_fork: the
 * common prefix, at least one prompt token left to prefill (its logits),
 * cut to whole blocks (a fork shares full blocks and starts from the EMA
 * checkpoint at a block end). */
static int share_len(const srv_engine *se, int src, const int32_t *prompt, int n_prompt)
{
    int len = eng_seq_len(se->eng, src);
    const int32_t *t = eng_seq_tokens(se->eng, src);
    int k = 0, max = len < n_prompt - 1 ? len : n_prompt - 1;
    while (k < max && t[k] == prompt[k]) k++;
    return k / se->info.block_size * se->info.block_size;
}

/* Hot-tier prefix sharing: the empty sequence seq (bound to the job's L3
 * bank, if any) starts as the longest block-aligned prefix of the prompt
 * that a resident sequence holds -- a running request, a resident session,
 * or a prefix-cache entry -- by forking its blocks instead of prefilling
 * them.  Only sequences of the same user with the same L3 bank qualify:
 * K/V depend on the bank (FASTMKA.md), and sharing across users would let
 * one user learn from the time to first token whether another sent a
 * prompt (docs/architecture.md).  Exact: a fork continues bit for bit as
 * the prefill would have on the CPU backend.  Returns the tokens shared. */
/* The best source for share_prefix: its tokens (0: none), *src its engine
 * sequence, *pc its prefix-cache index or -1, *ss its session or NULL. */
static int share_find(srv_engine *se, const srv_job *job, int seq, int *src, int *pc, session **ss_out)
{
    const srv_genreq *rq = job->req;
    *src = -1;
    *pc = -1;
    *ss_out = NULL;
    if (!se->cfg->prefix_sharing || rq->n_prompt <= se->info.block_size || rq->prompt_logprobs) return 0;
    const uint64_t *bank = job->loaded ? job->loaded->bank_ids : NULL;
    int n_bank = job->loaded ? job->loaded->n_bank : 0;
    int best_k = 0;
    for (int r = 0; r < se->n_run; r++) { /* running plain requests (no bank) */
        const eseq *es = &se->run[r];
        if (es->seq < 0 || es->sess || n_bank != 0 || strcmp(es->job->req->user, rq->user) != 0) continue;
        int k = share_len(se, es->seq, rq->prompt, rq->n_prompt);
        if (k > best_k) { *src = es->seq; best_k = k; *pc = -1; *ss_out = NULL; }
    }
    for (int i = 0; i < se->n_sess; i++) { /* sessions, busy or idle */
        session *ss = &se->sess[i];
        if (ss->seq == seq || strcmp(ss->user, rq->user) != 0 || ss->n_bank != n_bank ||
            (n_bank && memcmp(ss->bank, bank, (size_t)n_bank * sizeof *bank) != 0))
            continue;
        int k = share_len(se, ss->seq, rq->prompt, rq->n_prompt);
        if (k > best_k) { *src = ss->seq; best_k = k; *pc = -1; *ss_out = ss; }
    }
    for (int i = 0; i < se->n_pc && n_bank == 0; i++) { /* finished plain requests */
        if (strcmp(se->pc[i].user, rq->user) != 0) continue;
        int k = share_len(se, se->pc[i].seq, rq->prompt, rq->n_prompt);
        if (k > best_k) { *src = se->pc[i].seq; best_k = k; *pc = i; *ss_out = NULL; }
    }
    return best_k;
}

/* Before admission makes room: the tokens share_prefix would fork, its
 * source made the most recently used so that the evictions that make room
 * for the rest of the prompt take it last. */
static int share_plan(srv_engine *se, const srv_job *job)
{
    int src, pc;
    session *ss;
    int k = share_find(se, job, -1, &src, &pc, &ss);
    if (k > 0 && pc >= 0) se->pc[pc].last_used = ++se->clock;
    if (k > 0 && ss) ss->last_used = ++se->clock;
    return k;
}

static int share_prefix(srv_engine *se, const srv_job *job, int seq)
{
    int best, best_pc;
    session *ss;
    int best_k = share_find(se, job, seq, &best, &best_pc, &ss);
    if (best_k == 0) return 0;
    int rc = eng_seq_fork(se->eng, best, seq, best_k);
    if (rc != ENG_OK) {
        if (rc == ENG_EDEVICE) device_fault(se, "eng_seq_fork", rc, NULL);
        srv_log("warn", "prefix_share_failed", " tokens=%d status=%s", best_k, eng_strerror(rc));
        return 0;
    }
    if (best_pc >= 0) se->pc[best_pc].last_used = ++se->clock;
    srv_metrics_prefix_shared(se->met, best_k);
    return best_k;
}

/* Admits preempted sequences (oldest first), then waiting jobs FIFO, while
 * a slot and the blocks for the prompt are free, keeping one block of
 * headroom per running sequence so that admission does not immediately
 * force a preemption.  Growth beyond the prompt is not reserved: when the
 * pool runs dry, run_step preempts the youngest sequence. */
static void admit(srv_engine *se)
{
    int max_seqs = se->info.max_seqs;
    while (!se->dead && se->n_pre > 0 && se->n_run < max_seqs) {
        int oldest = 0;
        for (int k = 1; k < se->n_pre; k++)
            if (se->pre[k].order < se->pre[oldest].order) oldest = k;
        eseq *p = &se->pre[oldest];
        int need = blocks_for(se, p->n_src + 1) + se->n_run + p->n_forks;
        while (free_blocks(se) < need && evict_lru(se, NULL)) {}
        if (free_blocks(se) < need && se->n_run > 0) return; /* preempted ones go first */
        int seq;
        if (take_slot(se, &seq) != ENG_OK) return;
        /* choice 0 before its forks: their slots again */
        int got = 0;
        while (got < p->n_forks && take_slot(se, &p->forks[got]) == ENG_OK) got++;
        if (got < p->n_forks) {
            forks_release(se, p);
            eng_seq_free(se->eng, seq);
            return;
        }
        p->seq = seq;
        p->n_past = 0;
        p->last_step = se->step_no;
        se->run[se->n_run++] = *p;
        se->pre[oldest] = se->pre[--se->n_pre];
    }
    if (se->n_pre > 0 || se->dead) return;
    int i = 0;
    while (!se->dead && i < se->n_wait && se->n_run < max_seqs) {
        srv_job *job = se->wait[i];
        const srv_genreq *rq = job->req;
        session *s = rq->session_id[0] ? session_find(se, rq->user, rq->session_id) : NULL;
        if (s && s->busy) { i++; continue; } /* same session in flight: let others pass */
        if (!s && rq->session_id[0] && se->store && !rq->prompt_logprobs && job->store_state != STORE_READY) {
            /* not resident: ask the store first (the job waits meanwhile) */
            if (job->store_state == STORE_NONE) {
                if (srv_store_lookup(se->store, job->id, rq->user, rq->session_id, rq->prompt,
                                     rq->n_prompt) == 0)
                    job->store_state = STORE_LOADING;
                else
                    job->store_state = STORE_READY; /* out of memory: recompute */
            }
            if (job->store_state == STORE_LOADING) { i++; continue; }
        }
        /* Without max_tokens a request runs until the context or the pool
         * is full: it may grow to the whole pool (others are preempted).
         * n choices share the prompt's full blocks; each needs the rest. */
        int n_ch = rq->n, B = se->info.block_size, F = rq->n_prompt / B;
        int max_gen = rq->max_tokens;
        int pool_room = (se->info.n_blocks - F) / n_ch * B - (rq->n_prompt - F * B);
        if (rq->max_tokens_auto && max_gen > pool_room) max_gen = pool_room;
        int need = F + n_ch * (blocks_for(se, rq->n_prompt + (max_gen > 1 ? max_gen : 1)) - F);
        if (need > se->info.n_blocks || n_ch > max_seqs) {
            char msg[160];
            if (n_ch > max_seqs)
                snprintf(msg, sizeof msg, "n = %d choices need %d sequence slots; this server has %d "
                         "(max_seqs)", n_ch, n_ch, max_seqs);
            else if (rq->max_tokens_auto)
                snprintf(msg, sizeof msg, "the prompt needs more K/V memory than the pool holds "
                         "(%d blocks of %d tokens)%s", se->info.n_blocks, se->info.block_size,
                         n_ch > 1 ? " for n choices; lower n" : "");
            else
                snprintf(msg, sizeof msg, "the request needs %d K/V blocks but the pool has %d; "
                         "lower max_tokens%s", need, se->info.n_blocks, n_ch > 1 ? " or n" : "");
            fail_job(se, job, 400, msg);
            memmove(&se->wait[i], &se->wait[i + 1], (size_t)(se->n_wait - i - 1) * sizeof *se->wait);
            se->n_wait--;
            continue;
        }
        /* blocks for the prompt (a resident session already holds some) */
        int held = s ? blocks_for(se, eng_seq_len(se->eng, s->seq)) : 0;
        if (!s && !(job->loaded && job->loaded->found && job->loaded->n_blocks > 0))
            held = share_plan(se, job) / B; /* blocks it will fork, not take */
        int want = blocks_for(se, rq->n_prompt + 1) - held;
        if (want < 0) want = 0;
        want += se->n_run + (n_ch - 1); /* the forks' copies of a partial last block */
        while (free_blocks(se) < want && evict_lru(se, s))
            s = rq->session_id[0] ? session_find(se, rq->user, rq->session_id) : NULL;
        if (free_blocks(se) < want && se->n_run > 0) break;
        if (n_ch > 1) { /* every choice's slot now: choice 0 forks the others into them */
            while (free_slots(se) < n_ch && evict_lru(se, NULL)) {}
            if (free_slots(se) < n_ch) break;
        }
        eseq es = { .job = job, .seq = -1, .src = rq->prompt, .n_src = rq->n_prompt,
                    .max_gen = max_gen, .order = ++se->order, .last_step = se->step_no };
        if (s) {
            if (session_resolve(se, &es, s) != 1) { i++; continue; }
        } else {
            int seq;
            if (take_slot(se, &seq) != ENG_OK) break;
            es.seq = seq;
            int imported = job->loaded ? import_loaded(se, job, seq) : 0;
            es.cached = es.n_past = imported * se->info.block_size;
            if (job->loaded && job->loaded->more) { /* "both": the prefill stops at the split */
                es.gate = job->loaded->split * se->info.block_size;
                es.tail = job->tail;
                job->tail = NULL;
            }
            if (imported == 0 && !rq->prompt_logprobs)
                es.cached = es.n_past = share_prefix(se, job, seq);
            if (rq->session_id[0]) {
                if (se->n_sess == se->cfg->max_sessions) evict_lru(se, NULL);
                if (se->n_sess < se->cfg->max_sessions) {
                    session *ns = &se->sess[se->n_sess++];
                    snprintf(ns->id, sizeof ns->id, "%s", rq->session_id);
                    snprintf(ns->user, sizeof ns->user, "%s", rq->user);
                    ns->seq = seq;
                    ns->busy = 1;
                    ns->last_used = ++se->clock;
                    ns->persisted = imported;
                    ns->n_bank = job->loaded ? job->loaded->n_bank : 0;
                    if (ns->n_bank > 0) memcpy(ns->bank, job->loaded->bank_ids, (size_t)ns->n_bank * sizeof *ns->bank);
                    es.sess = ns;
                }
            }
        }
        srv_loaded_free(job->loaded);
        job->loaded = NULL;
        if (rq->session_id[0] && se->store) {
            srv_store_busy(se->store, rq->user, rq->session_id, 1);
            job->store_busy = 1;
        }
        if (rq->prompt_logprobs && (es.plp = calloc((size_t)rq->n_prompt, sizeof *es.plp))) {
            es.plp[0].token = rq->prompt[0];
            es.plp[0].n_top = -1; /* the first token has no distribution */
        }
        if (n_ch > 1 && (es.forks = malloc((size_t)(n_ch - 1) * sizeof *es.forks))) {
            for (es.n_forks = 0; es.n_forks < n_ch - 1; es.n_forks++)
                if (eng_seq_create(se->eng, &es.forks[es.n_forks]) != ENG_OK) break; /* slots were counted */
        }
        if ((rq->prompt_logprobs && !es.plp) || es.n_forks != n_ch - 1 ||
            eng_sampler_create(se->info.mi.vocab_size, &rq->sp, &es.smp) != ENG_OK ||
            eng_sampler_set_logit_bias(es.smp, rq->bias_ids, rq->bias, rq->n_bias) != ENG_OK) {
            forks_release(se, &es);
            eseq_release(&es);
            if (es.sess) { es.sess->busy = 0; session_drop(se, es.sess); }
            else eng_seq_free(se->eng, es.seq);
            fail_job(se, job, 500, "out of memory (sampler)");
        } else {
            job->eng_live = 1;
            se->run[se->n_run++] = es;
            srv_event *e = ev_new(se, SRV_EV_START, job);
            if (e) e->usage = (srv_usage){ rq->n_prompt, 0, es.cached };
        }
        memmove(&se->wait[i], &se->wait[i + 1], (size_t)(se->n_wait - i - 1) * sizeof *se->wait);
        se->n_wait--;
    }
}

/* log-softmax facts of the raw logits for the logprobs field. */
static void fill_logprob(const float *raw, int V, int32_t tok, int n_top, srv_logprob *lp)
{
    float mx = raw[0];
    for (int v = 1; v < V; v++) if (raw[v] > mx) mx = raw[v];
    double sum = 0;
    for (int v = 0; v < V; v++) sum += exp((double)(raw[v] - mx));
    float lse = mx + (float)log(sum);
    lp->token = tok;
    lp->logprob = raw[tok] - lse;
    lp->n_top = 0;
    for (int v = 0; v < V; v++) {
        /* insertion into the small sorted top list */
        int k = lp->n_top;
        if (k == n_top && (k == 0 || raw[v] <= lp->top_logprobs[k - 1])) continue;
        if (k < n_top) lp->n_top++;
        else k--;
        while (k > 0 && lp->top_logprobs[k - 1] < raw[v]) {
            lp->top_logprobs[k] = lp->top_logprobs[k - 1];
            lp->top_tokens[k] = lp->top_tokens[k - 1];
            k--;
        }
        lp->top_logprobs[k] = raw[v];
        lp->top_tokens[k] = v;
    }
    for (int k = 0; k < lp->n_top; k++) lp->top_logprobs[k] -= lse;
}

/* Hands the prompt's logprobs (echo) to the loop; -1 when memory runs out. */
static int post_prompt_logprobs(srv_engine *se, eseq *es)
{
    srv_event *e = ev_new(se, SRV_EV_PROMPT_LOGPROBS, es->job);
    if (!e) {
        flush_events(se);
        e = ev_new(se, SRV_EV_PROMPT_LOGPROBS, es->job);
    }
    if (!e) return -1;
    e->lp = es->plp; /* the loop frees it */
    e->n_lp = es->n_src;
    es->plp = NULL;
    return 0;
}

/* Posts a TOKEN event, with its logprobs (the top n_top alternatives) when
 * n_top >= 0.  -1 when memory runs out: nothing was posted. */
static int post_token(srv_engine *se, srv_job *job, int choice, int32_t tok, int n_top)
{
    srv_logprob *lp = NULL;
    if (n_top >= 0) {
        if (!(lp = malloc(sizeof *lp))) return -1;
        fill_logprob(se->scratch, se->info.mi.vocab_size, tok, n_top, lp);
    }
    srv_event *e = ev_new(se, SRV_EV_TOKEN, job);
    if (!e) { /* hand what is there to the loop, then retry once */
        flush_events(se);
        e = ev_new(se, SRV_EV_TOKEN, job);
    }
    if (!e) {
        free(lp);
        return -1;
    }
    e->token = tok;
    e->choice = choice;
    e->lp = lp;
    return 0;
}

static void publish_state(srv_engine *se)
{
    eng_stats st;
    eng_get_stats(se->eng, &st);
    srv_metrics_state(se->met, se->n_run, se->n_wait + se->n_pre, st.blocks_used, st.blocks_total,
                      se->n_sess);
    int pc_blocks = 0;
    for (int i = 0; i < se->n_pc; i++) pc_blocks += eng_seq_len(se->eng, se->pc[i].seq) / se->info.block_size;
    srv_metrics_prefix_cache(se->met, se->n_pc, pc_blocks);

}

/* New K/V blocks the planned item k needs. */
static int item_blocks(const srv_engine *se, int k)
{
    const eseq *es = &se->run[se->plan[k].idx];
    int len = eng_seq_len(se->eng, es->seq);
    int n = blocks_for(se, len + se->plan[k].n_tokens) - blocks_for(se, len);
    /* the chunk that ends the prompt of choice 0: each fork copies the
     * partial last block right after the step */
    if (es->n_forks > 0 && es->n_past + se->plan[k].n_tokens == es->n_src &&
        es->n_src % se->info.block_size != 0)
        n += es->n_forks;
    return n;
}

/* Plans the next step so that its new blocks fit the pool: idle sessions
 * are evicted first, then prefill chunks wait (youngest first), then the
 * youngest sequence is preempted.  Returns the number of items. */
static int plan_fitting(srv_engine *se)
{
    for (;;) {
        /* a "both" resume prefills up to its split, then waits for its
         * loaded half (left out of the plan meanwhile): map[] takes the
         * planner's indices back to run[] */
        int map[se->n_run > 0 ? se->n_run : 1], m = 0;
        for (int r = 0; r < se->n_run; r++) {
            eseq *es = &se->run[r];
            int end = es->gate ? es->gate : es->n_src;
            if (es->gate && es->n_past >= es->gate) continue;
            map[m] = r;
            se->pseqs[m++] = (srv_plan_seq){ end - es->n_past, es->order, es->last_step, es->plp ? 1 : 0 };
        }
        int n = srv_plan_step(se->pseqs, m, se->info.max_batch_tokens, se->cfg->prefill_chunk,
                              se->cfg->step_target_ms / 1000.0, &se->cost, se->plan);
        if (n == 0) return 0;
        for (int k = 0; k < n; k++) se->plan[k].idx = map[se->plan[k].idx];
        int need = 0;
        for (int k = 0; k < n; k++) need += item_blocks(se, k);
        int avail = free_blocks(se);
        if (need <= avail) return n;
        if (evict_lru(se, NULL)) continue;
        /* drop prefill chunks, youngest first */
        for (;;) {
            int young = -1;
            for (int k = 0; k < n; k++) {
                const eseq *es = &se->run[se->plan[k].idx];
                if (es->n_past < es->n_src &&
                    (young < 0 || es->order > se->run[se->plan[young].idx].order))
                    young = k;
            }
            if (young < 0) break;
            need -= item_blocks(se, young);
            se->plan[young] = se->plan[--n];
            if (need <= avail && n > 0) return n;
        }
        /* only decoders left and still short: preempt the youngest sequence */
        if (se->n_run <= 1) {
            finish_seq(se, 0, SRV_FINISH_ERROR, 503, "out of K/V blocks");
            return 0;
        }
        int young = 0;
        for (int r = 1; r < se->n_run; r++)
            if (se->run[r].order > se->run[young].order) young = r;
        preempt(se, young);
    }
}

/* done_fin of choice 0 when its forks could not be made */
#define FIN_FORK_FAILED (-1)

/* A decode step of this sequence needs only the argmax of its logits (the
 * engine computes it, on the device with CUDA, and no logits come back):
 * greedy, nothing that reads or changes the logits. */
static int ids_only(const eseq *es)
{
    const srv_genreq *rq = es->job->req;
    return rq->sp.temperature == 0.0f && !rq->logprobs && rq->n_bias == 0 &&
           rq->sp.repetition_penalty == 1.0f && rq->sp.presence_penalty == 0.0f &&
           rq->sp.frequency_penalty == 0.0f && !es->plp;
}

static int take_token(srv_engine *se, eseq *es, int32_t tok);

/* Samples the sequence's next token from lg (vocab_size, modified) and
 * posts it; returns SRV_FINISH_NONE while it goes on, else how it ended. */
static int sample_next(srv_engine *se, eseq *es, float *lg)
{
    const srv_genreq *rq = es->job->req;
    int V = se->info.mi.vocab_size;
    if (rq->logprobs) memcpy(se->scratch, lg, (size_t)V * sizeof *lg);
    int32_t tok = eng_sampler_sample(es->smp, lg, eng_seq_tokens(se->eng, es->seq),
                                     eng_seq_len(se->eng, es->seq));
    return take_token(se, es, tok);
}

/* Posts the sequence's next token tok (sampled, or the engine's argmax);
 * returns as sample_next. */
static int take_token(srv_engine *se, eseq *es, int32_t tok)
{
    const srv_genreq *rq = es->job->req;
    es->n_gen++;
    int is_stop = tok == se->info.mi.eos_token_id;
    for (int q = 0; q < rq->n_stop_ids; q++) is_stop |= tok == rq->stop_ids[q];
    if (is_stop && !rq->ignore_eos) return SRV_FINISH_STOP;
    if (post_token(se, es->job, es->choice, tok, rq->logprobs ? rq->top_logprobs : -1) != 0)
        return SRV_FINISH_ERROR; /* the client must not get text with a token missing */
    es->next_tok = tok;
    if (es->n_gen >= es->max_gen || eng_seq_len(se->eng, es->seq) >= se->info.max_ctx)
        return SRV_FINISH_LENGTH;
    return SRV_FINISH_NONE;
}

/* The seed of choice i: choice 0 has the request's own (so n = 1 and choice
 * 0 of n > 1 agree), the others a well-mixed function of (seed, i), so that
 * a seeded request gives the same n choices every time while no two
 * choices share a random stream (engine/sample.c seeds xoshiro256** with
 * splitmix64 of the seed: seeds seed+1, seed+2 ... would give overlapping
 * states). */
static uint64_t choice_seed(uint64_t seed, int i)
{
    if (i == 0) return seed;
    uint64_t z = seed ^ ((uint64_t)i * 0xd1b54a32d192ed03ULL);
    z = (z ^ (z >> 33)) * 0xff51afd7ed558ccdULL;
    z = (z ^ (z >> 33)) * 0xc4ceb9fe1a85ec53ULL;
    return z ^ (z >> 33);
}

/* Choice 0 (run[r]) has its whole prompt in the engine: forks choices
 * 1..n-1 into the slots it reserved (eng_seq_fork: the prompt's full blocks
 * are shared, a partial last block copied) and appends them to the run
 * array, decoding from the same logits.  All or nothing: -1 (nothing
 * forked, the slots released) when a sampler or a block cannot be had. */
static int fork_choices(srv_engine *se, int r)
{
    eseq *es = &se->run[r];
    const srv_genreq *rq = es->job->req;
    int n = es->n_forks, len = eng_seq_len(se->eng, es->seq), made = 0, rc = ENG_OK;
    eng_sampler *smp[n];
    for (int i = 0; i < n; i++) {
        eng_sampler_params sp = rq->sp;
        sp.seed = choice_seed(rq->sp.seed, i + 1);
        smp[i] = NULL;
        if (eng_sampler_create(se->info.mi.vocab_size, &sp, &smp[i]) != ENG_OK ||
            eng_sampler_set_logit_bias(smp[i], rq->bias_ids, rq->bias, rq->n_bias) != ENG_OK)
            rc = ENG_ENOMEM;
    }
    for (; rc == ENG_OK && made < n; made++)
        if ((rc = eng_seq_fork(se->eng, es->seq, es->forks[made], len)) != ENG_OK) break;
    if (rc != ENG_OK) {
        if (rc == ENG_EDEVICE) device_fault(se, "eng_seq_fork", rc, NULL);
        srv_log("error", "fork_failed", " choices=%d forked=%d tokens=%d status=%s", n + 1, made, len,
                eng_strerror(rc));
        for (int i = 0; i < n; i++) eng_sampler_free(smp[i]);
        forks_release(se, es); /* forked ones included: freeing a slot frees its blocks */
        return -1;
    }
    for (int i = 0; i < n; i++) {
        eseq kid = { .job = es->job, .seq = es->forks[i], .src = es->src, .n_src = es->n_src,
                     .n_past = es->n_src, .max_gen = es->max_gen, .cached = es->cached,
                     .smp = smp[i], .order = ++se->order, .last_step = es->last_step,
                     .choice = i + 1 };
        se->run[se->n_run++] = kid;
    }
    es->job->eng_live += n;
    free(es->forks);
    es->forks = NULL;
    es->n_forks = 0;
    return 0;
}

static void run_step(srv_engine *se)
{
    int V = se->info.mi.vocab_size;
    int n = plan_fitting(se);
    if (n == 0) return;
    int n_tok = 0;
    for (int k = 0; k < n; k++) {
        eseq *es = &se->run[se->plan[k].idx];
        int t = se->plan[k].n_tokens;
        int prefill = es->n_past < es->n_src;
        const int ids = !prefill && ids_only(es);
        se->items[k] = (eng_batch_item){
            .seq = es->seq,
            .tokens = prefill ? es->src + es->n_past : &es->next_tok,
            .n_tokens = t,
            /* logits to sample from, or (plp) for the next prompt token's logprob */
            .logits = !ids && (!prefill || (es->n_past + t == es->n_src && !es->resuming) ||
                               es->plp)
                          ? se->logits + (size_t)k * V : NULL,
            .argmax = ids ? &es->argmax_tok : NULL,
        };
        n_tok += t;
    }
    char err[256];
    double t0 = srv_now();
    int rc = eng_step(se->eng, se->items, n, err, sizeof err);
    double dt = srv_now() - t0;
    se->step_no++;
    if (rc == ENG_EDEVICE) {
        device_fault(se, "eng_step", rc, err); /* the main loop fails every job */
        return;
    }
    if (rc != ENG_OK) {
        srv_log("error", "step_failed", " status=%d items=%d tokens=%d error=%s", rc, n, n_tok,
                eng_strerror(rc));
        /* Fail every job in the step; indices shift on removal, so mark first. */
        for (int k = 0; k < n; k++) se->run[se->plan[k].idx].last_step = -1;
        for (int r = se->n_run - 1; r >= 0; r--)
            if (se->run[r].last_step == -1)
                finish_seq(se, r, SRV_FINISH_ERROR, 500, "the engine step failed");
        return;
    }
    srv_metrics_step(se->met, n, n_tok, dt);
    int n_dec = 0;
    for (int k = 0; k < n; k++) n_dec += se->items[k].tokens == &se->run[se->plan[k].idx].next_tok;
    srv_cost_note(&se->cost, n_dec, n_tok - n_dec, dt);
    keep_chunks(se);
    /* the cost model's prefill rate: steps that are one prefill chunk of
     * at least a block (and a few decodes at most) */
    if (se->store) {
        int pk = -1, n_pre = 0;
        for (int k = 0; k < n; k++)
            if (se->items[k].tokens != &se->run[se->plan[k].idx].next_tok) { pk = k; n_pre++; }
        if (n_pre == 1 && se->items[pk].n_tokens >= se->info.block_size && n_tok - se->items[pk].n_tokens <= 4)
            srv_store_note_prefill(se->store, se->run[se->plan[pk].idx].n_past + se->items[pk].n_tokens,
                                   se->items[pk].n_tokens, dt);
    }
    /* Sample; collect finished indices, then remove from the highest down.
     * Forked choices join the run array (at the end) during the loop. */
    int done[se->info.max_seqs];
    int done_fin[se->info.max_seqs];
    int n_done = 0;
    for (int k = 0; k < n; k++) {
        int r = se->plan[k].idx;
        eseq *es = &se->run[r];
        const srv_genreq *rq = es->job->req;
        es->last_step = se->step_no;
        int prefill = es->n_past < es->n_src;
        int pos = es->n_past; /* the item's first token */
        if (prefill) es->n_past += se->plan[k].n_tokens;
        if (es->resuming && es->n_past == es->n_src) {
            /* the replay is back in the engine: decode next_tok as before */
            es->resuming = 0;
            free(es->replay);
            es->replay = NULL;
            es->src = NULL;
        }
        if (se->items[k].argmax) { /* a greedy decode step: the engine's pick */
            int fin = take_token(se, es, es->argmax_tok);
            if (fin != SRV_FINISH_NONE) {
                done[n_done] = r;
                done_fin[n_done++] = fin;
            }
            continue;
        }
        if (!se->items[k].logits) continue;
        float *lg = se->items[k].logits;
        int fin = SRV_FINISH_NONE;
        if (es->plp) {
            if (es->n_past < es->n_src) { /* one token in: the next one's logprob */
                fill_logprob(lg, V, es->src[pos + 1], rq->top_logprobs, &es->plp[pos + 1]);
                continue;
            }
            /* the whole prompt is in: its logprobs go out before the first token */
            if (post_prompt_logprobs(se, es) != 0) fin = SRV_FINISH_ERROR;
        }
        if (!fin && es->max_gen == 0) fin = SRV_FINISH_LENGTH; /* echo only */
        if (fin) {
            done[n_done] = r;
            done_fin[n_done++] = fin;
            continue;
        }
        if (es->n_forks > 0) {
            /* choice 0's prompt is in: the other choices start here, sharing
             * its blocks, each sampling its first token from these logits */
            int first = se->n_run;
            if (fork_choices(se, r) != 0) {
                done[n_done] = r;
                done_fin[n_done++] = FIN_FORK_FAILED;
                continue;
            }
            es = &se->run[r];
            for (int q = first; q < se->n_run; q++) {
                memcpy(se->fork_lg, lg, (size_t)V * sizeof *lg);
                if ((fin = sample_next(se, &se->run[q], se->fork_lg)) != SRV_FINISH_NONE) {
                    done[n_done] = q;
                    done_fin[n_done++] = fin;
                }
            }
        }
        if ((fin = sample_next(se, es, lg)) != SRV_FINISH_NONE) {
            done[n_done] = r;
            done_fin[n_done++] = fin;
        }
    }
    /* remove finished ones from the highest index down so indices stay valid */
    for (int a = 0; a < n_done; a++)
        for (int b = a + 1; b < n_done; b++)
            if (done[b] > done[a]) {
                int t = done[a]; done[a] = done[b]; done[b] = t;
                t = done_fin[a]; done_fin[a] = done_fin[b]; done_fin[b] = t;
            }
    for (int a = 0; a < n_done; a++)
        if (done_fin[a] == SRV_FINISH_ERROR)
            finish_seq(se, done[a], SRV_FINISH_ERROR, 500, "out of memory: a generated token could "
                       "not be delivered");
        else if (done_fin[a] == FIN_FORK_FAILED)
            finish_seq(se, done[a], SRV_FINISH_ERROR, 503, "the n choices could not be started "
                       "(no free K/V block for their copies of the prompt's last block)");
        else
            finish_seq(se, done[a], done_fin[a], 0, NULL);
}

/* Why a running or preempted sequence must end now: 0 (it goes on), or
 * *finish (and a metrics reason in *why, 0 for none) from its job's cancel
 * flag, its choice's stop flag (the loop matched a stop string in it), or
 * an error of another choice of the job. */
static int must_end(const eseq *es, int *finish, int *why)
{
    const srv_job *job = es->job;
    int c = atomic_load(&job->cancel);
    *why = 0;
    if (c != SRV_CANCEL_NONE) {
        *finish = c == SRV_CANCEL_STOP ? SRV_FINISH_STOP : SRV_FINISH_CANCELLED;
        *why = c == SRV_CANCEL_STOP ? 0 : c;
        return 1;
    }
    if (job->eng_err_status) {
        *finish = SRV_FINISH_ERROR;
        return 1;
    }
    if (atomic_load(&((srv_job *)job)->choice_stop[es->choice])) {
        *finish = SRV_FINISH_STOP;
        return 1;
    }
    return 0;
}

static void drop_cancelled(srv_engine *se)
{
    for (int i = 0; i < se->n_wait;) {
        srv_job *job = se->wait[i];
        int c = atomic_load(&job->cancel);
        if (c == SRV_CANCEL_NONE) { i++; continue; }
        srv_usage u = { job->req->n_prompt, 0, 0 };
        post_final(se, job, SRV_FINISH_CANCELLED, 0, NULL, &u);
        srv_metrics_cancelled(se->met, c);
        memmove(&se->wait[i], &se->wait[i + 1], (size_t)(se->n_wait - i - 1) * sizeof *se->wait);
        se->n_wait--;
    }
    int finish, why;
    for (int r = se->n_run - 1; r >= 0; r--) {
        if (!must_end(&se->run[r], &finish, &why)) continue;
        /* a job's cancel reason is counted once, with its last sequence */
        if (why && se->run[r].job->eng_live == 1) srv_metrics_cancelled(se->met, why);
        const srv_job *job = se->run[r].job;
        finish_seq(se, r, finish, job->eng_err_status, job->eng_err_msg);
    }
    for (int k = se->n_pre - 1; k >= 0; k--) {
        eseq *p = &se->pre[k];
        if (!must_end(p, &finish, &why)) continue;
        if (why && p->job->eng_live == 1) srv_metrics_cancelled(se->met, why);
        eseq_release(p);
        eseq_end(se, p, finish, p->job->eng_err_status, p->job->eng_err_code, p->job->eng_err_msg);
        se->pre[k] = se->pre[--se->n_pre];
    }
}

/* eng_params.log: progress of long work in eng_create (weights going to the
 * GPU, ...) as key=value log lines. */
static void engine_progress(void *ctx, const char *line)
{
    (void)ctx;
    char msg[400], q[420];
    snprintf(msg, sizeof msg, "%s", line ? line : "");
    size_t n = strlen(msg);
    while (n && (msg[n - 1] == '\n' || msg[n - 1] == '\r')) msg[--n] = '\0';
    srv_log("info", "engine_progress", " msg=%s", srv_log_quote(msg, q, sizeof q));
}

/* Opens the session store in the state directory, bound to this model and
 * this engine's block format (a store of another is refused: the daemon
 * stops rather than serve without the sessions it promised to keep). */
static int open_store(srv_engine *se, char *err, size_t errlen)
{
    const eng_model_info *mi = eng_model_get_info(se->model);
    char identity[256];
    snprintf(identity, sizeof identity, "model=%s arch=%s layers=%d hidden=%d kv_dim=%d kv_dtype=%s block_bytes=%zu",
             mi->fingerprint, mi->arch, mi->n_layers, mi->d_model, se->bf.kv_dim,
             se->bf.kv_dtype == ENG_KV_BF16 ? "bf16" : "f32", se->bf.block_bytes);
    char path[4096];
    snprintf(path, sizeof path, "%s/sessions", se->cfg->state_dir);
    srv_store_params sp = { .dir = path, .identity = identity, .block_tokens = se->bf.block_tokens,
                            .block_bytes = se->bf.block_bytes,
                            .warm_bytes = (size_t)se->cfg->session_warm_mb << 20,
                            .sync = se->cfg->session_sync, .loaded = store_loaded, .loaded_ctx = se,
                            .forgot = store_forgot, .forgot_ctx = se,
                            .met = se->met, .post = se->post, .post_arg = se->post_arg,
                            .ttl_s = se->cfg->session_ttl_s,
                            .model = eng_get_params(se->eng)->l3_capture ? se->model : NULL,
                            .disk_budget = (uint64_t)se->cfg->session_disk_mb << 20,
                            .sync_ms = se->cfg->session_sync_ms,
                            .resume_policy = srv_resume_policy_parse(se->cfg->resume_policy),
                            .user_bytes = (uint64_t)se->cfg->user_session_mb << 20,
                            .user_chunks = se->cfg->user_chunks_max,
                            .l3_index_bytes = (size_t)se->cfg->longterm_index_mb << 20 };
    if (sp.resume_policy < 0) sp.resume_policy = SRV_RESUME_AUTO; /* main.c checked it */
    double t0 = srv_now();
    if (srv_store_open(&sp, &se->store, err, errlen) != 0) return -1;
    char dur[32];
    if (se->cfg->session_sync_ms > 0) snprintf(dur, sizeof dur, "group_%dms", se->cfg->session_sync_ms);
    else snprintf(dur, sizeof dur, "%s", se->cfg->session_sync ? "sync" : "async");
    srv_log("info", "session_store_opened", " dir=%s warm_mib=%d durability=%s resume_policy=%s user_session_mib=%d "
            "user_chunks_max=%d open_s=%.3f", path, se->cfg->session_warm_mb, dur,
            se->cfg->resume_policy && *se->cfg->resume_policy ? se->cfg->resume_policy : "auto",
            se->cfg->user_session_mb, se->cfg->user_chunks_max, srv_now() - t0);
    return 0;
}

static int load(srv_engine *se)
{
    char err[512];
    double t0 = srv_now();
    const char *want = se->cfg->backend && *se->cfg->backend ? se->cfg->backend : "auto";
    srv_log("info", "model_loading", " dir=%s backend=%s", se->cfg->model, want);
    eng_params p = eng_default_params();
    int rc = srv_config_backend(se->cfg, &p.backend);
    if (rc != ENG_OK) {
        snprintf(err, sizeof err, "backend: unknown backend '%s' (auto, cpu, cuda)", want);
        goto fail;
    }
    rc = eng_model_load(se->cfg->model, &se->model, err, sizeof err);
    if (rc != ENG_OK) goto fail;
    p.log = engine_progress;
    p.log_ctx = se;
    p.n_threads = se->cfg->threads;
    if (se->cfg->cpu_math) eng_cpu_math_parse(se->cfg->cpu_math, &p.cpu_math); /* main.c checked the spelling */
    p.block_size = se->cfg->block_size;
    p.max_seqs = se->cfg->max_seqs;
    p.max_ctx = se->cfg->max_ctx;
    p.max_batch_tokens = se->cfg->max_batch_tokens;
    p.kv_mem_mb = se->cfg->kv_mem_mb;
    /* long-term memory: sessions' chunks are kept when they are stored, for
     * models whose router reads L3 */
    p.l3_capture = se->cfg->state_dir && *se->cfg->state_dir && eng_model_get_info(se->model)->mka_levels >= 3;
    if ((rc = eng_create(se->model, &p, &se->eng, err, sizeof err)) != ENG_OK) goto fail;
    eng_get_block_format(se->eng, &se->bf);
    if (se->cfg->state_dir && *se->cfg->state_dir && open_store(se, err, sizeof err) != 0) {
        rc = ENG_EINVAL;
        goto fail;
    }
    char tinfo[160];
    if (srv_text_load(se->cfg->model, se->cfg->chat_template, &se->codec, tinfo, sizeof tinfo, err,
                      sizeof err) != 0) {
        rc = ENG_EFORMAT;
        goto fail;
    }
    const eng_params *ep = eng_get_params(se->eng);
    eng_stats st;
    eng_get_stats(se->eng, &st);
    srv_engine_info info = { .mi = *eng_model_get_info(se->model), .max_ctx = ep->max_ctx,
                             .block_size = ep->block_size, .n_blocks = st.blocks_total,
                             .max_seqs = ep->max_seqs, .max_batch_tokens = ep->max_batch_tokens,
                             .kv_bytes = st.kv_bytes, .codec = se->codec };
    const char *bn = eng_backend_name(se->eng);
    snprintf(info.backend, sizeof info.backend, "%s", bn ? bn : "?");
    snprintf(info.kv_dtype, sizeof info.kv_dtype, "%s", st.kv_dtype ? st.kv_dtype : "?");
    int V = info.mi.vocab_size;
    se->run = calloc((size_t)ep->max_seqs, sizeof *se->run);
    se->sess = calloc((size_t)(se->cfg->max_sessions > 0 ? se->cfg->max_sessions : 1), sizeof *se->sess);
    se->logits = malloc((size_t)ep->max_seqs * V * sizeof *se->logits);
    se->fork_lg = malloc((size_t)V * sizeof *se->fork_lg);
    se->pc = calloc((size_t)(se->cfg->prefix_cache > 0 ? se->cfg->prefix_cache : 1), sizeof *se->pc);
    se->scratch = malloc((size_t)V * sizeof *se->scratch);
    se->items = calloc((size_t)ep->max_seqs, sizeof *se->items);
    se->pseqs = calloc((size_t)ep->max_seqs, sizeof *se->pseqs);
    se->plan = calloc((size_t)ep->max_seqs, sizeof *se->plan);
    if (!se->run || !se->sess || !se->logits || !se->scratch || !se->items || !se->pseqs || !se->plan ||
        !se->fork_lg || !se->pc) {
        snprintf(err, sizeof err, "out of memory for the scheduler tables");
        rc = ENG_ENOMEM;
        goto fail;
    }
    pthread_mutex_lock(&se->mu);
    se->info = info;
    pthread_mutex_unlock(&se->mu);
    srv_metrics_engine(se->met, info.backend, info.kv_dtype, info.kv_bytes);
    srv_log("info", "model_loaded", " dir=%s backend=%s arch=%s layers=%d hidden=%d vocab=%d "
            "mka_levels=%d dtype=%s fingerprint=%s max_ctx=%d max_seqs=%d kv_blocks=%d block_size=%d "
            "kv_pool_mib=%.1f kv_dtype=%s threads=%d cpu_math=%s tokenizer=%s load_s=%.3f", se->cfg->model,
            info.backend, info.mi.arch, info.mi.n_layers, info.mi.d_model, info.mi.vocab_size,
            info.mi.mka_levels, info.mi.dtype, info.mi.fingerprint, info.max_ctx, info.max_seqs,
            info.n_blocks, info.block_size, (double)info.kv_bytes / (1024.0 * 1024.0), info.kv_dtype,
            ep->n_threads, ep->cpu_math == ENG_CPU_MATH_FAST ? "fast" : "exact", se->codec ? "yes" : "no",
            srv_now() - t0);
    if (se->codec) srv_log("info", "tokenizer_loaded", " dir=%s %s", se->cfg->model, tinfo);
    ev_new(se, SRV_EV_READY, NULL);
    flush_events(se);
    publish_state(se);
    return 0;
fail:
    {
        char q[600];
        srv_log("error", "model_load_failed", " dir=%s backend=%s status=%d error=%s", se->cfg->model,
                want, rc, srv_log_quote(err, q, sizeof q));
    }
    srv_event *e = ev_new(se, SRV_EV_LOAD_FAILED, NULL);
    if (e) snprintf(e->msg, sizeof e->msg, "%.150s", err);
    flush_events(se);
    return -1;
}

static void close_ops(srv_engine *se)
{
    pthread_mutex_lock(&se->mu);
    se->ops_closed = 1;
    for (srv_sess_op *op = se->ops; op; op = op->next) {
        op->found = 0;
        op->done = 1;
    }
    se->ops = NULL;
    pthread_cond_broadcast(&se->ops_cv);
    pthread_mutex_unlock(&se->mu);
}

static void *engine_main(void *arg)
{
    srv_engine *se = arg;
    if (load(se) != 0) {
        close_ops(se);
        return NULL;
    }
    for (;;) {
        pthread_mutex_lock(&se->mu);
        /* sleep while nothing can move: no new job, no store answer, nothing
         * running, and every waiting job waits for the store */
        while (!se->stop && se->n_inbox == 0 && !se->loaded && !se->ops && se->n_run == n_stalled(se) &&
               se->n_pre == 0 && se->n_wait == n_loading(se))
            pthread_cond_wait(&se->cv, &se->mu);
        if (se->ops) answer_ops(se);
        if (se->stop) {
            pthread_mutex_unlock(&se->mu);
            break;
        }
        if (se->n_inbox) {
            if (se->n_wait + se->n_inbox > se->cap_wait) {
                int cap = (se->n_wait + se->n_inbox) * 2;
                srv_job **w = realloc(se->wait, (size_t)cap * sizeof *w);
                if (w) { se->wait = w; se->cap_wait = cap; }
            }
            int n = se->n_inbox;
            if (se->n_wait + n > se->cap_wait) n = se->cap_wait - se->n_wait;
            memcpy(se->wait + se->n_wait, se->inbox, (size_t)n * sizeof *se->inbox);
            se->n_wait += n;
            memmove(se->inbox, se->inbox + n, (size_t)(se->n_inbox - n) * sizeof *se->inbox);
            se->n_inbox -= n;
        }
        pthread_mutex_unlock(&se->mu);
        take_loaded(se);
        take_forgotten(se);

        if (se->dead) { /* new jobs after a device fault: answer them at once */
            fail_all_dead(se);
            flush_events(se);
            continue;
        }
        drop_cancelled(se);
        admit(se);
        if (!se->dead && se->n_run == 0 && se->n_wait > n_loading(se)) {
            /* Nothing runs and nothing could be admitted: only busy sessions
             * block the head, which cannot happen with n_run == 0, or the
             * pool is exhausted by idle sessions, which admit evicts.  Fail
             * the first job that is not waiting for the store rather than
             * spin. */
            int h = 0;
            while (se->wait[h]->store_state == STORE_LOADING) h++;
            fail_job(se, se->wait[h], 503, "no sequence slot or K/V memory available");
            memmove(se->wait + h, se->wait + h + 1, (size_t)(se->n_wait - h - 1) * sizeof *se->wait);
            se->n_wait--;
        }
        if (!se->dead) land_tails(se);
        if (!se->dead) run_step(se);
        if (se->dead) fail_all_dead(se);
        flush_events(se);
        if (!se->dead) publish_state(se);
    }
    close_ops(se);
    return NULL;
}

int srv_engine_start(const srv_config *cfg, srv_metrics *m, srv_post_fn post, void *arg,
                     srv_engine **out)
{
    srv_engine *se = calloc(1, sizeof *se);
    if (!se) return -1;
    se->cfg = cfg;
    se->met = m;
    se->post = post;
    se->post_arg = arg;
    pthread_mutex_init(&se->mu, NULL);
    pthread_cond_init(&se->cv, NULL);
    pthread_cond_init(&se->ops_cv, NULL);
    if (pthread_create(&se->th, NULL, engine_main, se) != 0) {
        pthread_mutex_destroy(&se->mu);
        pthread_cond_destroy(&se->cv);
        free(se);
        return -1;
    }
    se->started = 1;
    *out = se;
    return 0;
}

srv_store *srv_engine_store(srv_engine *se)
{
    return se->store;
}

const srv_engine_info *srv_engine_get_info(const srv_engine *se)
{
    return &se->info;
}

void srv_engine_submit(srv_engine *se, srv_job *job)
{
    pthread_mutex_lock(&se->mu);
    if (se->n_inbox == se->cap_inbox) {
        int cap = se->cap_inbox ? se->cap_inbox * 2 : 64;
        srv_job **in = realloc(se->inbox, (size_t)cap * sizeof *in);
        if (!in) {
            /* The caller bounds in-flight jobs, so this is a real OOM. */
            pthread_mutex_unlock(&se->mu);
            srv_event e = { .type = SRV_EV_FINAL, .job = job, .finish = SRV_FINISH_ERROR,
                            .status = 503 };
            snprintf(e.msg, sizeof e.msg, "out of memory");
            se->post(&e, 1, se->post_arg);
            return;
        }
        se->inbox = in;
        se->cap_inbox = cap;
    }
    se->inbox[se->n_inbox++] = job;
    pthread_cond_signal(&se->cv);
    pthread_mutex_unlock(&se->mu);
}

void srv_engine_wake(srv_engine *se)
{
    if (!se) return;
    pthread_mutex_lock(&se->mu);
    pthread_cond_signal(&se->cv);
    pthread_mutex_unlock(&se->mu);
}

void srv_engine_stop(srv_engine *se)
{
    if (!se) return;
    pthread_mutex_lock(&se->mu);
    se->stop = 1;
    pthread_cond_signal(&se->cv);
    pthread_mutex_unlock(&se->mu);
    if (se->started) pthread_join(se->th, NULL);
    srv_store_close(se->store); /* finishes every queued write */
    while (se->loaded) {
        srv_loaded *n = se->loaded->next;
        srv_loaded_free(se->loaded);
        se->loaded = n;
    }
    for (int i = 0; i < se->n_wait; i++) {
        srv_loaded_free(se->wait[i]->loaded);
        srv_loaded_free(se->wait[i]->tail);
        se->wait[i]->loaded = se->wait[i]->tail = NULL;
    }
    while (se->forgot) {
        forgot *n = se->forgot->next;
        free(se->forgot);
        se->forgot = n;
    }
    for (int r = 0; r < se->n_run; r++) {
        eseq_release(&se->run[r]);
    }
    for (int k = 0; k < se->n_pre; k++) {
        eseq_release(&se->pre[k]);
    }
    free(se->pre);
    eng_free(se->eng);
    eng_model_free(se->model);
    srv_text_free(se->codec);
    free(se->run);
    free(se->sess);
    free(se->logits);
    free(se->fork_lg);
    free(se->pc);
    free(se->scratch);
    free(se->items);
    free(se->pseqs);
    free(se->plan);
    free(se->wait);
    free(se->inbox);
    for (int i = 0; i < se->n_evs; i++) free(se->evs[i].lp);
    free(se->evs);
    pthread_mutex_destroy(&se->mu);
    pthread_cond_destroy(&se->cv);
    pthread_cond_destroy(&se->ops_cv);
    free(se);
}
