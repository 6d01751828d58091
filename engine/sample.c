/*
 * sample.c — token sampling: logit bias, repetition, presence and
 * frequency penalties, temperature, top-k, top-p, min-p, and a per-sampler
 * seeded generator (xoshiro256**), so that the same seed and the same
 * logits give the same tokens on every run.
 *
 * Order: OpenAI's logit bias and penalties first (they change the logits),
 * then as Hugging Face applies its logits processors: repetition penalty,
 * temperature, top-k, top-p, min-p; then a draw from the renormalised
 * distribution.  Temperature 0 is greedy (argmax, lowest id on ties) and
 * ignores the rest but the bias and the penalties.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

struct eng_sampler {
    eng_sampler_params p;
    int vocab;
    uint64_t rng[4];
    int32_t *idx;          /* (vocab) candidate ids */
    unsigned char *mark;   /* (vocab) repetition-penalty marks */
    /* presence/frequency penalties (allocated only when one is set) */
    int32_t *count;        /* (vocab) times each id was returned */
    int32_t *returned;     /* (vocab) the distinct ids returned, n_returned of them */
    int n_returned;
    /* logit bias (sparse) */
    int32_t *bias_ids;     /* (n_bias) */
    float *bias;           /* (n_bias) */
    int n_bias;
};

eng_sampler_params eng_sampler_default_params(void)
{
    eng_sampler_params p = { 1.0f, 0, 1.0f, 0.0f, 1.0f, 0, 0.0f, 0.0f };
    return p;
}

int eng_sampler_params_validate(const eng_sampler_params *p, char *err, size_t errlen)
{
    if (!(p->temperature >= 0.0f && p->temperature <= 100.0f))
        return eng__errf(err, errlen, ENG_EINVAL, "temperature must be in [0, 100]");
    if (p->top_k < 0) return eng__errf(err, errlen, ENG_EINVAL, "top_k must be >= 0");
    if (!(p->top_p > 0.0f && p->top_p <= 1.0f))
        return eng__errf(err, errlen, ENG_EINVAL, "top_p must be in (0, 1]");
    if (!(p->min_p >= 0.0f && p->min_p <= 1.0f))
        return eng__errf(err, errlen, ENG_EINVAL, "min_p must be in [0, 1]");
    if (!(p->repetition_penalty > 0.0f && p->repetition_penalty <= 100.0f))
        return eng__errf(err, errlen, ENG_EINVAL, "repetition_penalty must be in (0, 100]");
    if (!(p->presence_penalty >= -2.0f && p->presence_penalty <= 2.0f))
        return eng__errf(err, errlen, ENG_EINVAL, "presence_penalty must be in [-2, 2]");
    if (!(p->frequency_penalty >= -2.0f && p->frequency_penalty <= 2.0f))
        return eng__errf(err, errlen, ENG_EINVAL, "frequency_penalty must be in [-2, 2]");
    return ENG_OK;
}

static inline uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

static uint64_t next_u64(uint64_t s[4])
{
    uint64_t r = rotl(s[1] * 5, 7) * 9, t = s[1] << 17;
    s[2] ^= s[0]; s[3] ^= s[1]; s[1] ^= s[2]; s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return r;
}

int eng_sampler_create(int vocab_size, const eng_sampler_params *p, eng_sampler **out)
{
    *out = NULL;
    if (vocab_size <= 0 || !p || eng_sampler_params_validate(p, NULL, 0) != ENG_OK)
        return ENG_EINVAL;
    eng_sampler *s = calloc(1, sizeof *s);
    if (!s) return ENG_ENOMEM;
    s->p = *p;
    s->vocab = vocab_size;
    s->idx = malloc((size_t)vocab_size * sizeof *s->idx);
    s->mark = calloc((size_t)vocab_size, 1);
    if (!s->idx || !s->mark) { eng_sampler_free(s); return ENG_ENOMEM; }
    if (p->presence_penalty != 0.0f || p->frequency_penalty != 0.0f) {
        s->count = calloc((size_t)vocab_size, sizeof *s->count);
        s->returned = malloc((size_t)vocab_size * sizeof *s->returned);
        if (!s->count || !s->returned) { eng_sampler_free(s); return ENG_ENOMEM; }
    }
    uint64_t x = p->seed;
    for (int i = 0; i < 4; i++) s->rng[i] = eng_splitmix64(&x);
    *out = s;
    return ENG_OK;
}

void eng_sampler_free(eng_sampler *s)
{
    if (!s) return;
    free(s->idx);
    free(s->mark);
    free(s->count);
    free(s->returned);
    free(s->bias_ids);
    free(s->bias);
    free(s);
}

int eng_sampler_set_logit_bias(eng_sampler *s, const int32_t *ids, const float *bias, int n)
{
    if (n < 0 || (n > 0 && (!ids || !bias))) return ENG_EINVAL;
    for (int i = 0; i < n; i++) {
        if (ids[i] < 0 || ids[i] >= s->vocab || !(bias[i] >= -100.0f && bias[i] <= 100.0f))
            return ENG_EINVAL;
        if (s->mark[ids[i]]) { /* repeated id */
            for (int k = 0; k < i; k++) s->mark[ids[k]] = 0;
            return ENG_EINVAL;
        }
        s->mark[ids[i]] = 1;
    }
    for (int i = 0; i < n; i++) s->mark[ids[i]] = 0;
    int32_t *ni = NULL;
    float *nb = NULL;
    if (n > 0) {
        ni = malloc((size_t)n * sizeof *ni);
        nb = malloc((size_t)n * sizeof *nb);
        if (!ni || !nb) {
            free(ni);
            free(nb);
            return ENG_ENOMEM;
        }
        memcpy(ni, ids, (size_t)n * sizeof *ni);
        memcpy(nb, bias, (size_t)n * sizeof *nb);
    }
    free(s->bias_ids);
    free(s->bias);
    s->bias_ids = ni;
    s->bias = nb;
    s->n_bias = n;
    return ENG_OK;
}

/* The id the sampler returns: counted for the presence/frequency penalties. */
static int32_t note_returned(eng_sampler *s, int32_t tok)
{
    if (s->count && tok >= 0 && tok < s->vocab && s->count[tok]++ == 0)
        s->returned[s->n_returned++] = tok;
    return tok;
}

/* qsort has no context argument; one sampler runs on one thread at a time. */
static _Thread_local const float *g_sort_logits;

static int by_logit_desc(const void *a, const void *b)
{
    int32_t ia = *(const int32_t *)a, ib = *(const int32_t *)b;
    float la = g_sort_logits[ia], lb = g_sort_logits[ib];
    if (la != lb) return la > lb ? -1 : 1;
    return ia < ib ? -1 : (ia > ib);
}

/* Moves the k largest candidates (by logit, ties to the lower id) to the
 * front of idx[0..n) in descending order. */
static void top_k_select(int32_t *idx, int n, int k, const float *logits)
{
    g_sort_logits = logits;
    if (k < n) {
        /* Quickselect on the comparator, then sort the k kept. */
        int lo = 0, hi = n - 1;
        while (lo < hi) {
            int32_t pivot = idx[lo + (hi - lo) / 2];
            int i = lo, j = hi;
            while (i <= j) {
                while (by_logit_desc(&idx[i], &pivot) < 0) i++;
                while (by_logit_desc(&idx[j], &pivot) > 0) j--;
                if (i <= j) { int32_t t = idx[i]; idx[i] = idx[j]; idx[j] = t; i++; j--; }
            }
            if (k - 1 <= j) hi = j;
            else if (k - 1 >= i) lo = i;
            else break;
        }
    }
    qsort(idx, (size_t)(k < n ? k : n), sizeof *idx, by_logit_desc);
}

int32_t eng_sampler_sample(eng_sampler *s, float *logits, const int32_t *history, int n_history)
{
    int V = s->vocab;
    const eng_sampler_params *p = &s->p;

    for (int i = 0; i < s->n_bias; i++) logits[s->bias_ids[i]] += s->bias[i];
    if (p->repetition_penalty != 1.0f && history) {
        for (int i = 0; i < n_history; i++) {
            int32_t t = history[i];
            if (t < 0 || t >= V || s->mark[t]) continue;
            s->mark[t] = 1;
            logits[t] = logits[t] > 0 ? logits[t] / p->repetition_penalty
                                      : logits[t] * p->repetition_penalty;
        }
        for (int i = 0; i < n_history; i++)
            if (history[i] >= 0 && history[i] < V) s->mark[history[i]] = 0;
    }

    for (int i = 0; i < s->n_returned; i++) {
        int32_t t = s->returned[i];
        logits[t] -= p->frequency_penalty * (float)s->count[t] + p->presence_penalty;
    }

    int best = eng__argmax(logits, V); /* over the non-NaN logits, lowest id on ties */
    if (p->temperature == 0.0f) return note_returned(s, best);

    /* Candidates: everything, or the top k. Exclude NaN logits. */
    float top = logits[best];
    if (!isfinite(top)) return note_returned(s, best);
    int n = 0;
    for (int i = 0; i < V; i++)
        if (logits[i] == logits[i]) { s->idx[n++] = i; logits[i] = (logits[i] - top) / p->temperature; }
    if (n == 0) return note_returned(s, best);
    int k = p->top_k > 0 && p->top_k < n ? p->top_k : n;
    /* Top-p without top-k would sort the whole vocabulary every token.  The
     * nucleus holds the most probable tokens, so when those within e^-30 of
     * the top (the logits are now <= 0) already carry top_p of the mass, the
     * nucleus lies among them and only they need sorting; the cut below
     * still measures against the full mass z_all, so the result is exact. */
    double z_all = 0.0;
    if (k == n && p->top_p < 1.0f) {
        double z_near = 0.0;
        for (int i = 0; i < n; i++) {
            float l = logits[s->idx[i]];
            double e = expf(l);
            z_all += e;
            if (l >= -30.0f) z_near += e;
        }
        if (z_near >= p->top_p * z_all) {
            int m = 0;
            for (int i = 0; i < n; i++)
                if (logits[s->idx[i]] >= -30.0f) s->idx[m++] = s->idx[i];
            n = k = m;
        } else {
            z_all = 0.0;
        }
    }
    if (k < n || p->top_p < 1.0f) {
        top_k_select(s->idx, n, k, logits);
        n = k;
    }
    float mx = logits[s->idx[0]];
    for (int i = 1; i < n; i++) mx = logits[s->idx[i]] > mx ? logits[s->idx[i]] : mx;
    /* Probabilities in place of the logits of the candidates. */
    double sum = 0.0;
    for (int i = 0; i < n; i++) {
        float e = expf(logits[s->idx[i]] - mx);
        logits[s->idx[i]] = e;
        sum += e;
    }
    if (p->top_p < 1.0f) { /* candidates are sorted descending here */
        double cum = 0.0, z = z_all > 0.0 ? z_all : sum;
        int keep = n;
        for (int i = 0; i < n; i++) {
            cum += logits[s->idx[i]] / z;
            if (cum >= p->top_p) { keep = i + 1; break; }
        }
        n = keep;
    }
    if (p->min_p > 0.0f) { /* the top probability is exp(0) = 1 before normalising */
        int keep = 0;
        for (int i = 0; i < n; i++)
            if (logits[s->idx[i]] >= p->min_p) s->idx[keep++] = s->idx[i];
        n = keep;
    }
    sum = 0.0;
    for (int i = 0; i < n; i++) sum += logits[s->idx[i]];
    double u = (double)(next_u64(s->rng) >> 11) * 0x1.0p-53 * sum, cum = 0.0;
    for (int i = 0; i < n; i++) {
        cum += logits[s->idx[i]];
        if (u < cum) return note_returned(s, s->idx[i]);
    }
    return note_returned(s, s->idx[n - 1]);
}
