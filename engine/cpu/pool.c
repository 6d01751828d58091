/*
 * pool.c — a fork/join thread pool for the CPU backend.
 *
 * eng_pool_run() hands out tasks through an atomic counter to the calling
 * thread plus n_threads-1 workers and returns when every task has finished.
 * Workers spin briefly on a generation counter before they sleep on a
 * condition variable: a decode step launches dozens of small parallel
 * regions, and a futex wake-up per region would cost more than the work.
 * Which thread runs a task never changes a result: every kernel computes an
 * element in one task with a fixed order of operations.
 */
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>

#include "../internal.h"

#define SPIN_ROUNDS 20000

struct eng_pool {
    int n_threads;
    pthread_t *threads;          /* (n_threads - 1) workers */
    pthread_mutex_t mu;
    pthread_cond_t cv_work;      /* workers wait here for a new generation */
    pthread_cond_t cv_done;      /* the caller waits here for stragglers */
    atomic_uint generation;      /* bumped for every eng_pool_run */
    atomic_int next_task;
    atomic_int active;           /* workers still inside the current run */
    int n_tasks;
    eng_pool_fn fn;
    void *ctx;
    atomic_int stop;
    void **scratch;              /* (n_threads) per-thread scratch (eng_pool_scratch) */
    size_t *scratch_bytes;       /* (n_threads) */
    void *shared;                /* eng_pool_shared */
    size_t shared_bytes;
};

typedef struct worker_arg { eng_pool *p; int id; } worker_arg;

static void run_tasks(eng_pool *p, int thread)
{
    for (;;) {
        int t = atomic_fetch_add_explicit(&p->next_task, 1, memory_order_relaxed);
        if (t >= p->n_tasks) break;
        p->fn(p->ctx, t, thread);
    }
}

static void *worker_main(void *arg)
{
    worker_arg wa = *(worker_arg *)arg;
    free(arg);
    eng_pool *p = wa.p;
    unsigned seen = 0;
    for (;;) {
        unsigned g;
        int spins = 0;
        while ((g = atomic_load_explicit(&p->generation, memory_order_acquire)) == seen &&
               spins < SPIN_ROUNDS)
            spins++;
        if (g == seen) {
            pthread_mutex_lock(&p->mu);
            while ((g = atomic_load(&p->generation)) == seen && !p->stop)
                pthread_cond_wait(&p->cv_work, &p->mu);
            pthread_mutex_unlock(&p->mu);
        }
        if (p->stop) return NULL;
        seen = g;
        run_tasks(p, wa.id);
        if (atomic_fetch_sub_explicit(&p->active, 1, memory_order_acq_rel) == 1) {
            pthread_mutex_lock(&p->mu);
            pthread_cond_signal(&p->cv_done);
            pthread_mutex_unlock(&p->mu);
        }
    }
}

int eng_pool_create(int n_threads, eng_pool **out)
{
    *out = NULL;
    if (n_threads < 1) n_threads = 1;
    eng_pool *p = calloc(1, sizeof *p);
    if (!p) return ENG_ENOMEM;
    p->n_threads = n_threads;
    p->scratch = calloc((size_t)n_threads, sizeof *p->scratch);
    p->scratch_bytes = calloc((size_t)n_threads, sizeof *p->scratch_bytes);
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->cv_work, NULL);
    pthread_cond_init(&p->cv_done, NULL);
    if (!p->scratch || !p->scratch_bytes) { eng_pool_free(p); return ENG_ENOMEM; }
    if (n_threads > 1) {
        p->threads = calloc((size_t)n_threads - 1, sizeof *p->threads);
        if (!p->threads) { eng_pool_free(p); return ENG_ENOMEM; }
    }
    for (int i = 1; i < n_threads; i++) {
        worker_arg *wa = malloc(sizeof *wa);
        if (!wa) { p->n_threads = i; eng_pool_free(p); return ENG_ENOMEM; }
        wa->p = p;
        wa->id = i;
        if (pthread_create(&p->threads[i - 1], NULL, worker_main, wa) != 0) {
            free(wa);
            p->n_threads = i;
            eng_pool_free(p);
            return ENG_ENOMEM;
        }
    }
    *out = p;
    return ENG_OK;
}

void eng_pool_free(eng_pool *p)
{
    if (!p) return;
    pthread_mutex_lock(&p->mu);
    p->stop = 1;
    atomic_fetch_add(&p->generation, 1);
    pthread_cond_broadcast(&p->cv_work);
    pthread_mutex_unlock(&p->mu);
    for (int i = 1; i < p->n_threads; i++) pthread_join(p->threads[i - 1], NULL);
    pthread_mutex_destroy(&p->mu);
    pthread_cond_destroy(&p->cv_work);
    pthread_cond_destroy(&p->cv_done);
    free(p->threads);
    if (p->scratch)
        for (int i = 0; i < p->n_threads; i++) free(p->scratch[i]);
    free(p->scratch);
    free(p->scratch_bytes);
    free(p->shared);
    free(p);
}

int eng_pool_threads(const eng_pool *p) { return p->n_threads; }

void eng_pool_run(eng_pool *p, int n_tasks, eng_pool_fn fn, void *ctx)
{
    if (n_tasks <= 0) return;
    if (p->n_threads == 1 || n_tasks == 1) {
        for (int t = 0; t < n_tasks; t++) fn(ctx, t, 0);
        return;
    }
    p->fn = fn;
    p->ctx = ctx;
    p->n_tasks = n_tasks;
    atomic_store_explicit(&p->next_task, 0, memory_order_relaxed);
    atomic_store_explicit(&p->active, p->n_threads - 1, memory_order_relaxed);
    pthread_mutex_lock(&p->mu);
    atomic_fetch_add_explicit(&p->generation, 1, memory_order_release);
    pthread_cond_broadcast(&p->cv_work);
    pthread_mutex_unlock(&p->mu);

    run_tasks(p, 0);

    int spins = 0;
    while (atomic_load_explicit(&p->active, memory_order_acquire) > 0 && spins < SPIN_ROUNDS) {
        spins++;
        if ((spins & 1023) == 0) sched_yield();
    }
    if (atomic_load_explicit(&p->active, memory_order_acquire) > 0) {
        pthread_mutex_lock(&p->mu);
        while (atomic_load(&p->active) > 0) pthread_cond_wait(&p->cv_done, &p->mu);
        pthread_mutex_unlock(&p->mu);
    }
}

/* *buf grown to at least bytes (64-byte aligned, a whole number of lines). */
static void *grow(void **buf, size_t *have, size_t bytes)
{
    if (*have < bytes) {
        free(*buf);
        *have = 0;
        *buf = aligned_alloc(64, (bytes + 63) / 64 * 64);
        if (!*buf) return NULL;
        *have = bytes;
    }
    return *buf;
}

void *eng_pool_scratch(eng_pool *p, int thread, size_t bytes)
{
    if (thread < 0 || thread >= p->n_threads) return NULL;
    return grow(&p->scratch[thread], &p->scratch_bytes[thread], bytes);
}

void *eng_pool_shared(eng_pool *p, size_t bytes) { return grow(&p->shared, &p->shared_bytes, bytes); }
