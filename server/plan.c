/*
 * plan.c — the step planner and its cost model (pure functions, unit-tested
 * in tests/test_server.c; sched.c's engine thread calls them).
 *
 * srv_plan_step decides who runs how many tokens in the next engine step:
 * every decoding sequence one token, then prompt chunks in arrival order
 * from what is left of the step's token budget and, with a step latency
 * target, of its time budget (stall-free batching in the spirit of
 * Sarathi-Serve: a long prompt is split so that running streams keep
 * decoding at a steady pace instead of freezing while it prefills).
 *
 * The time budget needs what a step costs.  srv_cost_note learns it from the
 * steps that ran: a decode-only step's time (EWMA, with the number of
 * decoders it had) and the seconds per prefill token (the part of a mixed
 * step's time that its decoders do not explain, over its prefill tokens, as
 * a ratio of EWMAs so that big chunks weigh more than one-token ones).
 * srv_cost_decode predicts a decode-only step of n decoders from that:
 * the observed step plus one token's marginal cost per decoder more or less
 * (a decode token goes through the same weights as a prompt token).
 *
 * srv_reuse_len: how much of a resident sequence a new prompt keeps.
 */
#include "config.h"

#include "srv_internal.h"

/* Weight of the newest observation in the cost model's averages. */
#define COST_ALPHA 0.2

static double ewma(double old, double x, int first)
{
    return first ? x : old + COST_ALPHA * (x - old);
}

double srv_cost_tok(const srv_step_cost *c)
{
    return c->n_pre_obs > 0 && c->pre_n > 0 ? c->pre_s / c->pre_n : 0;
}

double srv_cost_decode(const srv_step_cost *c, int n_dec)
{
    if (n_dec <= 0) return 0;
    double tok = srv_cost_tok(c);
    if (c->n_dec_obs == 0) return tok * n_dec; /* no decode-only step yet: the marginal cost alone */
    double t = c->dec_s + tok * (n_dec - c->dec_n);
    if (n_dec >= c->dec_n) return t;
    /* fewer decoders than observed: never below their proportional share
     * (the step's fixed part, reading the weights, stays) */
    double prop = c->dec_s * n_dec / c->dec_n;
    return t > prop ? t : prop;
}

void srv_cost_note(srv_step_cost *c, int n_dec, int n_pre, double dt)
{
    if (dt <= 0 || n_dec < 0 || n_pre < 0 || n_dec + n_pre == 0) return;
    if (n_pre == 0) {
        int first = c->n_dec_obs++ == 0;
        c->dec_s = ewma(c->dec_s, dt, first);
        c->dec_n = ewma(c->dec_n, n_dec, first);
        return;
    }
    /* the prefill tokens' part: what the decoders do not explain, but at
     * least a quarter of their share of the step's tokens (a noisy decode
     * prediction must not make prefill look free) */
    double part = dt - srv_cost_decode(c, n_dec);
    double floor = 0.25 * dt * n_pre / (n_pre + n_dec);
    if (part < floor) part = floor;
    int first = c->n_pre_obs++ == 0;
    c->pre_s = ewma(c->pre_s, part, first);
    c->pre_n = ewma(c->pre_n, n_pre, first);
}

int srv_plan_prefill_time(double target_s, const srv_step_cost *cost, int n_dec)
{
    if (target_s <= 0 || !cost || n_dec <= 0) return -1;
    double tok = srv_cost_tok(cost);
    if (tok <= 0) return -1;
    double dec = srv_cost_decode(cost, n_dec);
    /* the target, or SRV_PLAN_DECODE_FACTOR times the decoders' time when
     * that is longer (slow decoders must not stop the prompts) */
    double allow = dec * SRV_PLAN_DECODE_FACTOR > target_s ? dec * SRV_PLAN_DECODE_FACTOR : target_s;
    double t = (allow - dec) / tok;
    if (t < 1) return 1; /* no starvation: the oldest prompt always moves */
    return t > 1 << 30 ? 1 << 30 : (int)t;
}

int srv_plan_step(const srv_plan_seq *seqs, int n_seqs, int budget, int chunk, double target_s,
                  const srv_step_cost *cost, srv_plan_item *out)
{
    int n = 0;
    if (budget <= 0 || n_seqs <= 0) return 0;
    if (chunk <= 0) chunk = budget;
    /* Decoders first: one token each.  With more decoders than budget, the
     * ones that waited longest (oldest last_step, then oldest order) go. */
    int n_dec = 0;
    for (int i = 0; i < n_seqs; i++) n_dec += seqs[i].prefill_left == 0;
    if (n_dec <= budget) {
        for (int i = 0; i < n_seqs; i++)
            if (seqs[i].prefill_left == 0) out[n++] = (srv_plan_item){ i, 1 };
    } else {
        /* Selection by (last_step, order) without allocating: repeated scans
         * are fine for the sizes involved (max_seqs). */
        int last_step = -1;
        uint64_t last_order = 0;
        for (int k = 0; k < budget; k++) {
            int best = -1;
            for (int i = 0; i < n_seqs; i++) {
                if (seqs[i].prefill_left != 0) continue;
                /* strictly after the previous pick in (last_step, order) */
                if (k > 0 && (seqs[i].last_step < last_step ||
                              (seqs[i].last_step == last_step && seqs[i].order <= last_order)))
                    continue;
                if (best < 0 || seqs[i].last_step < seqs[best].last_step ||
                    (seqs[i].last_step == seqs[best].last_step && seqs[i].order < seqs[best].order))
                    best = i;
            }
            if (best < 0) break;
            out[n++] = (srv_plan_item){ best, 1 };
            last_step = seqs[best].last_step;
            last_order = seqs[best].order;
        }
        return n;
    }
    int left = budget - n;
    int by_time = srv_plan_prefill_time(target_s, cost, n_dec);
    if (by_time >= 0 && by_time < left) left = by_time;
    /* Prefills in arrival order, each at most `chunk` tokens. */
    uint64_t prev = 0;
    int have_prev = 0;
    while (left > 0) {
        int best = -1;
        for (int i = 0; i < n_seqs; i++) {
            if (seqs[i].prefill_left == 0) continue;
            if (have_prev && seqs[i].order <= prev) continue;
            if (best < 0 || seqs[i].order < seqs[best].order) best = i;
        }
        if (best < 0) break;
        int t = seqs[best].prefill_left;
        if (t > chunk) t = chunk;
        if (seqs[best].chunk > 0 && t > seqs[best].chunk) t = seqs[best].chunk;
        if (t > left) t = left;
        out[n++] = (srv_plan_item){ best, t };
        left -= t;
        prev = seqs[best].order;
        have_prev = 1;
    }
    return n;
}

int srv_reuse_len(const int32_t *have, int n_have, const int32_t *prompt, int n_prompt,
                  int block_size)
{
    int k = 0;
    while (k < n_have && k < n_prompt && have[k] == prompt[k]) k++;
    if (k > n_prompt - 1) k = n_prompt - 1; /* the last prompt token must run for logits */
    if (k < 0) k = 0;
    if (k == n_have) return k;
    return block_size > 0 ? k / block_size * block_size : 0;
}
