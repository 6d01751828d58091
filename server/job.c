/*
 * job.c — a generation job on the loop thread: created from a validated
 * request and handed to the engine thread; the engine's TOKEN events become
 * text (with stop strings matched on it) and SSE chunks, or at the end one
 * JSON body; the FINAL event releases the engine's reference.
 *
 * Ownership: a job is referenced by its connection and by the engine (until
 * the engine's FINAL event); both references are dropped on this thread, so
 * the count needs no atomics.
 */
#include "config.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "srv_internal.h"

srv_job *srv_job_start(srv_server *s, srv_conn *c, srv_genreq *r)
{
    if (!r->has_seed) r->sp.seed = eng_splitmix64(&s->rng);
    snprintf(r->user, sizeof r->user, "%s", c->who.user);
    srv_job *j = calloc(1, sizeof *j);
    if (!j) {
        srv_genreq_free(r);
        return NULL;
    }
    j->id = ++s->next_id;
    j->req = r;
    j->t_arrival = c->t0;
    atomic_init(&j->cancel, SRV_CANCEL_NONE);
    j->refs = 2;
    j->conn = c;
    j->created = (long)time(NULL);
    snprintf(j->cid, sizeof j->cid, "%s-%016llx%06llx", r->chat ? "chatcmpl" : "cmpl",
             (unsigned long long)eng_splitmix64(&s->rng), (unsigned long long)(j->id & 0xffffff));
    j->next = s->jobs;
    if (s->jobs) s->jobs->prev = j;
    s->jobs = j;
    s->n_inflight++;
    c->job = j;
    srv_engine_submit(s->eng, j);
    return j;
}

void srv_job_unref(srv_job *j)
{
    if (--j->refs > 0) return;
    srv_genreq_free(j->req);
    srv_buf_free(&j->text);
    srv_buf_free(&j->sse);
    free(j->ids);
    free(j->lps);
    free(j->plps);
    free(j->body);
    free(j);
}

void srv_job_cancel(srv_server *s, srv_job *j, int reason)
{
    int expect = SRV_CANCEL_NONE;
    if (atomic_compare_exchange_strong(&j->cancel, &expect, reason)) srv_engine_wake(s->eng);
}

static const char *finish_name(int f)
{
    return f == SRV_FINISH_LENGTH ? "length" : "stop";
}

/* Sets the job's error for a cancelled job from its cancel reason. */
static void cancel_error(srv_server *s, srv_job *j)
{
    int why = atomic_load(&j->cancel);
    if (why == SRV_CANCEL_TIMEOUT)
        srv_error_set(&j->error, 503, "timeout", NULL, "timeout",
                      "the request did not finish within request_timeout (%d s)",
                      s->cfg->request_timeout_s);
    else if (why == SRV_CANCEL_CLIENT)
        srv_error_set(&j->error, 499, "invalid_request_error", NULL, "client_closed",
                      "the client closed the connection");
    else
        srv_error_set(&j->error, 503, "server_error", NULL, "shutting_down",
                      "the server is shutting down");
}

/* The job's text is complete: emit what is left and the end of the stream,
 * or build the full body; then wake the connection.  A stream whose events
 * cannot be appended (memory) ends with an error event, or, when even that
 * does not fit, is cut (sse_broken): never a stream with text missing. */
static void job_finish(srv_server *s, srv_job *j, int finish)
{
    if (j->finished) return;
    j->finished = 1;
    j->finish = finish;
    const srv_genreq *r = j->req;
    if (finish == SRV_FINISH_CANCELLED) cancel_error(s, j);
    int err = finish == SRV_FINISH_ERROR || finish == SRV_FINISH_CANCELLED;
    if (r->stream) {
        int rc = 0;
        if (!err) {
            /* text held back so far (an unfinished character, a possible
             * stop-string start) goes out with the finish_reason */
            rc = srv_sse_chunk(&j->sse, r, j->cid, j->created, j->text.data + j->emitted,
                               j->text.len - j->emitted, NULL, 0, NULL, 0, finish_name(finish),
                               !j->first_chunk_sent);
            j->emitted = j->text.len;
            j->first_chunk_sent = 1;
            if (rc == 0 && r->include_usage)
                rc = srv_sse_usage(&j->sse, r, j->cid, j->created, &j->usage);
            if (rc == 0) rc = srv_sse_done(&j->sse);
            if (rc != 0) {
                j->finish = SRV_FINISH_ERROR;
                srv_error_set(&j->error, 500, "server_error", NULL, NULL, "out of memory");
            }
        }
        if ((err || rc != 0) && srv_sse_error(&j->sse, &j->error) != 0) j->sse_broken = 1;
    } else if (!err) {
        j->body = srv_build_completion(r, j->cid, j->created, j->text.data, j->text.len, j->ids,
                                       j->n_ids, j->plps, j->n_plps, j->lps, j->n_lps,
                                       finish_name(finish), &j->usage);
        if (!j->body) {
            srv_error_set(&j->error, 500, "server_error", NULL, NULL, "out of memory");
            j->finish = SRV_FINISH_ERROR;
        }
    }
    if (j->conn) srv_conn_resume(j->conn);
}

/* Memory ran out while taking a token: the job ends with an error (the
 * engine stops at its next step). */
static void job_oom(srv_server *s, srv_job *j)
{
    srv_error_set(&j->error, 500, "server_error", NULL, NULL, "out of memory");
    srv_job_cancel(s, j, SRV_CANCEL_STOP);
    job_finish(s, j, SRV_FINISH_ERROR);
}

/* A stream with echo: the prompt's chunk first. */
static void job_echo(srv_server *s, srv_job *j)
{
    if (srv_sse_echo(&j->sse, j->req, j->cid, j->created, j->plps, j->n_plps) != 0) {
        job_oom(s, j);
        return;
    }
    if (j->conn) srv_conn_resume(j->conn);
}

void srv_job_started(srv_server *s, srv_job *j, const srv_event *ev)
{
    j->usage.cached_tokens = ev->usage.cached_tokens;
    j->usage.prompt_tokens = ev->usage.prompt_tokens;
    if (!j->finished && j->req->stream && j->req->echo && !j->req->prompt_logprobs) job_echo(s, j);
}

void srv_job_prompt_logprobs(srv_server *s, srv_job *j, const srv_event *ev)
{
    if (j->finished) {
        free(ev->lp);
        return;
    }
    free(j->plps);
    j->plps = ev->lp;
    j->n_plps = ev->n_lp;
    if (j->req->stream) job_echo(s, j);
}

void srv_job_token(srv_server *s, srv_job *j, const srv_event *ev)
{
    srv_logprob *evlp = ev->lp; /* ours to free */
    if (j->finished) {
        free(evlp);
        return;
    }
    double now = srv_now();
    if (j->n_ids == 0) {
        j->t_first = now;
        srv_metrics_ttft(s->met, now - j->t_arrival);
    } else {
        srv_metrics_itl(s->met, now - j->t_last);
    }
    j->t_last = now;
    if (srv_array_grow(&j->ids, &j->cap_ids, j->n_ids, sizeof *j->ids, 32) != 0) goto oom;
    srv_logprob *lp = NULL;
    if (evlp) {
        if (srv_array_grow(&j->lps, &j->cap_lps, j->n_lps, sizeof *j->lps, 32) != 0) goto oom;
        lp = &j->lps[j->n_lps++];
        *lp = *evlp;
        free(evlp);
        evlp = NULL;
    }
    j->ids[j->n_ids++] = ev->token;
    char piece[SRV_PIECE_MAX];
    /* without a tokenizer ids are space-separated: none before the first,
     * unless the echoed prompt comes before it */
    size_t n = srv_token_piece(j->req->codec, ev->token, j->n_ids == 1 && !j->req->echo, piece);
    if (srv_buf_append(&j->text, piece, n) != 0) goto oom;
    int stopped = 0;
    size_t end = srv_stop_scan(j->text.data, j->text.len, j->emitted, j->req->stop,
                               j->req->stop_len, j->req->n_stop, &stopped);
    /* One event per token, also when its text is empty or held back (an
     * unfinished character, a possible stop-string start): clients count
     * tokens and time them by events, as llama.cpp's server sends them. */
    if (j->req->stream) {
        if (srv_sse_chunk(&j->sse, j->req, j->cid, j->created, j->text.data + j->emitted,
                          end - j->emitted, &ev->token, 1, lp, lp ? 1 : 0, NULL,
                          !j->first_chunk_sent) != 0)
            goto oom;
        j->first_chunk_sent = 1;
        j->emitted = end;
    }
    if (stopped) {
        j->text.len = end;
        j->text.data[end] = '\0';
        j->emitted = end;
        j->usage.completion_tokens = j->n_ids;
        srv_job_cancel(s, j, SRV_CANCEL_STOP);
        job_finish(s, j, SRV_FINISH_STOP);
        return;
    }
    if (j->req->stream && j->conn) srv_conn_resume(j->conn);
    return;
oom:
    free(evlp);
    job_oom(s, j);
}

void srv_job_final(srv_server *s, srv_job *j, const srv_event *ev)
{
    j->engine_done = 1;
    srv_metrics_tokens(s->met, ev->usage.prompt_tokens, ev->usage.completion_tokens,
                       ev->usage.cached_tokens);
    if (!j->finished) {
        j->usage.prompt_tokens = ev->usage.prompt_tokens;
        j->usage.completion_tokens = ev->usage.completion_tokens;
        j->usage.cached_tokens = ev->usage.cached_tokens;
        if (ev->finish == SRV_FINISH_ERROR)
            srv_error_set(&j->error, ev->status ? ev->status : 500,
                          ev->status == 400 ? "invalid_request_error" : "server_error", NULL, ev->code,
                          "%s", ev->msg[0] ? ev->msg : "generation failed");
        job_finish(s, j, ev->finish);
    }
    if (j->prev) j->prev->next = j->next;
    else s->jobs = j->next;
    if (j->next) j->next->prev = j->prev;
    s->n_inflight--;
    srv_job_unref(j);
}
