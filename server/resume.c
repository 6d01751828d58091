/*
 * resume.c — load or recompute a returning session's history, or both at
 * once: the cost model (pure; unit-tested in tests/test_server.c) and the
 * measured rates it is fed with.
 *
 * A stored session's reusable prefix is n blocks.  The scheduler can read
 * them from the store (warm host-memory tier or RocksDB) and import them, or
 * prefill the same tokens again, or split them: prefill blocks [0, s) from
 * the start while the store reads blocks [s, n) from the end, and import
 * those once the prefill has reached block s ("Compute or load KV cache?
 * Why not both?", 2024).  Both halves run at the same time (the engine
 * thread prefills, the store's thread reads), so a split costs
 *     max(prefill(0, s*B), load(s, n))
 * and the model picks the s that minimises it.  prefill(a, b) sums the
 * measured prefill rate of the positions' length buckets (attention makes
 * late positions slower than early ones); load(s, n) sums each block's
 * bytes over the measured read bandwidth of the tier that holds it.
 *
 * Unknown rates (no load or no prefill measured yet) make the model load:
 * that is what measures them.  A split within SRV_RESUME_MARGIN of the best
 * single path is not worth its second round trip: the single path wins.
 */
#include "config.h"

#include <math.h>
#include <string.h>

#include "srv_internal.h"

#define SRV_RESUME_MARGIN 0.05

int srv_rate_bucket(int pos)
{
    int b = 0;
    for (int p = pos / 256; p > 0 && b < SRV_RATE_BUCKETS - 1; p >>= 1) b++;
    return b;
}

/* The bucket's measured rate, else the nearest measured one's (0: none). */
static double bucket_rate(const srv_resume_rates *r, int b)
{
    for (int d = 0; d < SRV_RATE_BUCKETS; d++) {
        if (b - d >= 0 && r->prefill_tps[b - d] > 0) return r->prefill_tps[b - d];
        if (b + d < SRV_RATE_BUCKETS && r->prefill_tps[b + d] > 0) return r->prefill_tps[b + d];
    }
    return 0;
}

double srv_resume_prefill_s(const srv_resume_rates *r, int from, int to)
{
    double t = 0;
    for (int p = from; p < to;) {
        int b = srv_rate_bucket(p);
        int end = b == SRV_RATE_BUCKETS - 1 ? to : (256 << b);
        if (end > to) end = to;
        double rate = bucket_rate(r, b);
        if (rate <= 0) return -1;
        t += (end - p) / rate;
        p = end;
    }
    return t;
}

void srv_resume_choose(const srv_resume_in *in, srv_resume_plan *out)
{
    int n = in->n_blocks, B = in->block_tokens;
    memset(out, 0, sizeof *out);
    out->split = 0;
    out->path = SRV_PATH_LOAD;
    if (n <= 0) return;
    if (in->policy == SRV_RESUME_RECOMPUTE) {
        out->split = n;
        out->path = SRV_PATH_RECOMPUTE;
        return;
    }
    if (in->policy == SRV_RESUME_LOAD) return;
    /* t_load[s]: reading blocks [s, n); -1 when a tier's rate is unknown */
    const srv_resume_rates *r = in->rates;
    double t_load = 0, best = -1;
    int best_s = 0, known = 1;
    double load_all = -1, prefill_all = srv_resume_prefill_s(r, 0, n * B);
    for (int i = 0; i < n; i++) {
        double bw = in->warm && in->warm[i] ? r->warm_bps : r->disk_bps;
        if (bw <= 0) known = 0;
        else t_load += (double)in->block_bytes / bw;
    }
    if (known) load_all = t_load;
    if (!known || prefill_all < 0) {
        /* nothing to weigh yet: load (it measures the bandwidth); "both"
         * on request still splits in the middle so that it can be tested */
        if (in->policy == SRV_RESUME_BOTH && n >= 2) {
            out->split = n / 2;
            out->path = SRV_PATH_BOTH;
        }
        out->t_load = load_all;
        out->t_prefill = prefill_all;
        return;
    }
    /* walk s from 0 (load all) to n (recompute all) */
    for (int s = 0; s <= n; s++) {
        if (s > 0) {
            double bw = in->warm && in->warm[s - 1] ? r->warm_bps : r->disk_bps;
            t_load -= (double)in->block_bytes / bw;
            if (t_load < 0) t_load = 0;
        }
        double tp = srv_resume_prefill_s(r, 0, s * B);
        double t = tp > t_load ? tp : t_load;
        int interior = s > 0 && s < n;
        if (in->policy == SRV_RESUME_BOTH && !interior) continue;
        if (best < 0 || t < best) {
            best = t;
            best_s = s;
        }
    }
    out->t_load = load_all;
    out->t_prefill = prefill_all;
    out->split = best_s;
    out->t_est = best;
    if (best_s > 0 && best_s < n && in->policy == SRV_RESUME_AUTO) {
        double single = load_all < prefill_all ? load_all : prefill_all;
        if (best > single * (1.0 - SRV_RESUME_MARGIN)) {
            best_s = load_all <= prefill_all ? 0 : n;
            out->split = best_s;
            out->t_est = single;
        }
    }
    out->path = best_s == 0 ? SRV_PATH_LOAD : best_s == n ? SRV_PATH_RECOMPUTE : SRV_PATH_BOTH;
}

const char *srv_resume_path_name(int path)
{
    switch (path) {
    case SRV_PATH_LOAD: return "load";
    case SRV_PATH_RECOMPUTE: return "recompute";
    case SRV_PATH_BOTH: return "both";
    default: return "none";
    }
}

int srv_resume_policy_parse(const char *s)
{
    if (!s || !*s || strcmp(s, "auto") == 0) return SRV_RESUME_AUTO;
    if (strcmp(s, "load") == 0) return SRV_RESUME_LOAD;
    if (strcmp(s, "recompute") == 0) return SRV_RESUME_RECOMPUTE;
    if (strcmp(s, "both") == 0) return SRV_RESUME_BOTH;
    return -1;
}

void srv_rate_ewma(double *rate, double sample)
{
    if (!(sample > 0) || !isfinite(sample)) return;
    *rate = *rate > 0 ? 0.7 * *rate + 0.3 * sample : sample;
}
