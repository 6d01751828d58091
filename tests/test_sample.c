/*
 * test_sample.c — sampling semantics: greedy, seeds, temperature, top-k,
 * top-p, min-p, repetition penalty, presence and frequency penalties,
 * logit bias, parameter validation.
 */
#include <check.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "engine.h"

#define V 50

static void fill(float *l)
{
    for (int i = 0; i < V; i++) l[i] = sinf((float)i * 1.7f) * 3.0f;
}

static int sample_once(eng_sampler *s, const int32_t *hist, int nh)
{
    float l[V];
    fill(l);
    return eng_sampler_sample(s, l, hist, nh);
}

static int argmax(void)
{
    float l[V];
    fill(l);
    int b = 0;
    for (int i = 1; i < V; i++)
        if (l[i] > l[b]) b = i;
    return b;
}

static eng_sampler *mk(float temp, int k, float p, float minp, float rep, uint64_t seed)
{
    eng_sampler_params sp = { temp, k, p, minp, rep, seed, 0.0f, 0.0f };
    eng_sampler *s = NULL;
    ck_assert_int_eq(eng_sampler_create(V, &sp, &s), ENG_OK);
    return s;
}

START_TEST(greedy_is_argmax)
{
    eng_sampler *s = mk(0.0f, 0, 1.0f, 0.0f, 1.0f, 1);
    for (int i = 0; i < 5; i++) ck_assert_int_eq(sample_once(s, NULL, 0), argmax());
    eng_sampler_free(s);
    s = mk(1.0f, 1, 1.0f, 0.0f, 1.0f, 99); /* top_k = 1 is greedy too */
    for (int i = 0; i < 20; i++) ck_assert_int_eq(sample_once(s, NULL, 0), argmax());
    eng_sampler_free(s);
}
END_TEST

START_TEST(same_seed_same_tokens)
{
    eng_sampler *a = mk(1.0f, 0, 1.0f, 0.0f, 1.0f, 42), *b = mk(1.0f, 0, 1.0f, 0.0f, 1.0f, 42);
    eng_sampler *c = mk(1.0f, 0, 1.0f, 0.0f, 1.0f, 43);
    int diff_c = 0;
    for (int i = 0; i < 200; i++) {
        int x = sample_once(a, NULL, 0);
        ck_assert_int_eq(x, sample_once(b, NULL, 0));
        diff_c += x != sample_once(c, NULL, 0);
    }
    ck_assert_msg(diff_c > 20, "another seed gave nearly the same tokens (%d/200 differ)", diff_c);
    eng_sampler_free(a); eng_sampler_free(b); eng_sampler_free(c);
}
END_TEST

START_TEST(frequencies_follow_softmax)
{
    /* Two live tokens with logits 0 and ln 3: expect 1/4 and 3/4. */
    eng_sampler_params sp = { 1.0f, 0, 1.0f, 0.0f, 1.0f, 7, 0.0f, 0.0f };
    eng_sampler *s = NULL;
    ck_assert_int_eq(eng_sampler_create(V, &sp, &s), ENG_OK);
    int hits = 0, n = 20000;
    for (int i = 0; i < n; i++) {
        float l[V];
        for (int j = 0; j < V; j++) l[j] = -1e30f;
        l[3] = 0.0f;
        l[9] = logf(3.0f);
        int t = eng_sampler_sample(s, l, NULL, 0);
        ck_assert(t == 3 || t == 9);
        hits += t == 9;
    }
    ck_assert_msg(fabs(hits / (double)n - 0.75) < 0.015, "p(9) = %f", hits / (double)n);
    eng_sampler_free(s);
}
END_TEST

START_TEST(top_k_and_top_p_restrict_candidates)
{
    float base[V];
    fill(base);
    int order[V];
    for (int i = 0; i < V; i++) order[i] = i;
    for (int i = 0; i < V; i++) /* selection sort by logit, descending */
        for (int j = i + 1; j < V; j++)
            if (base[order[j]] > base[order[i]]) { int t = order[i]; order[i] = order[j]; order[j] = t; }
    eng_sampler *k3 = mk(5.0f, 3, 1.0f, 0.0f, 1.0f, 5);
    int seen[V] = {0};
    for (int i = 0; i < 3000; i++) seen[sample_once(k3, NULL, 0)]++;
    for (int i = 0; i < V; i++) {
        int rank = 0;
        while (order[rank] != i) rank++;
        if (rank < 3) ck_assert_msg(seen[i] > 0, "top-3 token %d never drawn", i);
        else ck_assert_msg(seen[i] == 0, "token %d of rank %d drawn with top_k 3", i, rank);
    }
    eng_sampler_free(k3);
    eng_sampler *p = mk(1.0f, 0, 1e-6f, 0.0f, 1.0f, 5); /* only the top token survives */
    for (int i = 0; i < 100; i++) ck_assert_int_eq(sample_once(p, NULL, 0), order[0]);
    eng_sampler_free(p);
    eng_sampler *mp = mk(1.0f, 0, 1.0f, 1.0f, 1.0f, 5); /* min_p 1 keeps only the max */
    for (int i = 0; i < 100; i++) ck_assert_int_eq(sample_once(mp, NULL, 0), order[0]);
    eng_sampler_free(mp);
}
END_TEST

START_TEST(top_p_nucleus_is_exact_on_a_large_vocab)
{
    /* A vocabulary where most logits are far below the top (the sampler then
     * sorts only the near ones): every draw lies in the nucleus computed by
     * brute force here, and every member of the nucleus is drawn. */
    enum { NV = 5000 };
    static float base[NV], l[NV];
    srand(9);
    for (int i = 0; i < NV; i++) base[i] = i % 50 == 0 ? (float)(rand() % 400) / 100.0f : -60.0f;
    int order[NV];
    for (int i = 0; i < NV; i++) order[i] = i;
    for (int i = 0; i < NV; i++) /* sort ids by logit, descending, ties by id */
        for (int j = i + 1; j < NV; j++)
            if (base[order[j]] > base[order[i]]) { int t = order[i]; order[i] = order[j]; order[j] = t; }
    double z = 0.0;
    for (int i = 0; i < NV; i++) z += exp((double)base[i] - base[order[0]]);
    double cum = 0.0;
    int nucleus = 0;
    while (nucleus < NV) {
        cum += exp((double)base[order[nucleus]] - base[order[0]]) / z;
        nucleus++;
        if (cum >= 0.7) break;
    }
    ck_assert(nucleus > 3 && nucleus < 100);
    eng_sampler_params sp = { 1.0f, 0, 0.7f, 0.0f, 1.0f, 5, 0.0f, 0.0f };
    eng_sampler *s = NULL;
    ck_assert_int_eq(eng_sampler_create(NV, &sp, &s), ENG_OK);
    static int seen[NV];
    for (int r = 0; r < 20000; r++) {
        memcpy(l, base, sizeof l);
        seen[eng_sampler_sample(s, l, NULL, 0)]++;
    }
    for (int i = 0; i < NV; i++) {
        int rank = 0;
        while (order[rank] != i) rank++;
        if (rank < nucleus) ck_assert_msg(seen[i] > 0, "nucleus token %d (rank %d) never drawn", i, rank);
        else ck_assert_msg(seen[i] == 0, "token %d of rank %d outside the nucleus of %d drawn", i, rank, nucleus);
    }
    eng_sampler_free(s);
}
END_TEST

START_TEST(repetition_penalty_follows_hf)
{
    eng_sampler_params sp = { 0.0f, 0, 1.0f, 0.0f, 2.0f, 0, 0.0f, 0.0f };
    eng_sampler *s = NULL;
    ck_assert_int_eq(eng_sampler_create(V, &sp, &s), ENG_OK);
    float l[V];
    for (int i = 0; i < V; i++) l[i] = 0.0f;
    l[1] = 4.0f; l[2] = 3.0f; l[4] = -1.0f;
    int32_t hist[] = { 1, 1, 4 }; /* a repeated id is penalised once */
    ck_assert_int_eq(eng_sampler_sample(s, l, hist, 3), 2);
    ck_assert(l[1] == 2.0f);
    ck_assert(l[4] == -2.0f);
    eng_sampler_free(s);
}
END_TEST

START_TEST(extreme_logits_and_temperatures)
{
    /* A temperature so small that logit/T overflows still picks the top
     * token; NaN logits are never chosen; +inf wins. */
    eng_sampler *s = mk(1e-39f, 0, 1.0f, 0.0f, 1.0f, 3);
    for (int r = 0; r < 20; r++) {
        float l[V];
        for (int i = 0; i < V; i++) l[i] = -2.0f;
        l[7] = 5.0f;
        l[8] = 4.0f;
        ck_assert_int_eq(eng_sampler_sample(s, l, NULL, 0), 7);
    }
    eng_sampler_free(s);
    eng_sampler *g = mk(0.0f, 0, 1.0f, 0.0f, 1.0f, 3), *h = mk(1.0f, 0, 1.0f, 0.0f, 1.0f, 3);
    float l[V];
    for (int i = 0; i < V; i++) l[i] = 0.0f;
    l[0] = NAN;
    l[5] = 1.0f;
    ck_assert_int_eq(eng_sampler_sample(g, l, NULL, 0), 5);
    for (int i = 0; i < V; i++) l[i] = (float)i;
    l[2] = INFINITY;
    ck_assert_int_eq(eng_sampler_sample(h, l, NULL, 0), 2);
    eng_sampler_free(g);
    eng_sampler_free(h);
}
END_TEST

/* OpenAI: logit[t] -= frequency_penalty * c[t] + presence_penalty * (c[t] > 0),
 * c[t] = how often the sampler has returned t so far (the completion). */
START_TEST(presence_and_frequency_follow_openai)
{
    eng_sampler_params sp = eng_sampler_default_params();
    sp.temperature = 0.0f;
    sp.presence_penalty = 0.5f;
    sp.frequency_penalty = 0.25f;
    eng_sampler *s = NULL;
    ck_assert_int_eq(eng_sampler_create(4, &sp, &s), ENG_OK);
    /* token 0 leads by 1.2: penalised 0, 0.75, 1.0, then 1.25 > 1.2, so
     * token 1 (penalised 0.75 from then on) comes once; a prompt history
     * does not count (OpenAI: the completion only). */
    int32_t hist[3] = { 1, 1, 1 };
    float want[6] = { 0, 0, 0, 1, 0, 0 }, got[6];
    for (int i = 0; i < 6; i++) {
        float l[4] = { 1.2f, 0.0f, -0.4f, -5.0f };
        got[i] = (float)eng_sampler_sample(s, l, hist, 3);
        if (i == 0) ck_assert(l[0] == 1.2f); /* nothing counted yet */
        if (i == 2) ck_assert(fabsf(l[0] - (1.2f - 0.5f - 0.5f)) < 1e-6f); /* c = 2 */
    }
    for (int i = 0; i < 6; i++) ck_assert_msg(got[i] == want[i], "step %d: %g", i, got[i]);
    eng_sampler_free(s);
    /* negative values encourage repetition */
    sp.presence_penalty = -2.0f;
    sp.frequency_penalty = 0.0f;
    ck_assert_int_eq(eng_sampler_create(4, &sp, &s), ENG_OK);
    for (int i = 0; i < 5; i++) {
        float l[4] = { 0.0f, 0.5f, 0.0f, 0.0f };
        if (i > 0) l[1] = -1.0f; /* 1 was returned: -1 + 2 = 1 still wins */
        ck_assert_int_eq(eng_sampler_sample(s, l, NULL, 0), 1);
    }
    eng_sampler_free(s);
}
END_TEST

START_TEST(logit_bias_forces_and_bans)
{
    eng_sampler *s = mk(1.0f, 0, 1.0f, 0.0f, 1.0f, 3);
    int32_t ids[2] = { 7, argmax() };
    float bias[2] = { 100.0f, -100.0f };
    ck_assert_int_eq(eng_sampler_set_logit_bias(s, ids, bias, 2), ENG_OK);
    for (int i = 0; i < 50; i++) ck_assert_int_eq(sample_once(s, NULL, 0), 7);
    /* replaced, not added to: a ban alone */
    ck_assert_int_eq(eng_sampler_set_logit_bias(s, ids + 1, bias + 1, 1), ENG_OK);
    for (int i = 0; i < 200; i++) ck_assert_int_ne(sample_once(s, NULL, 0), ids[1]);
    ck_assert_int_eq(eng_sampler_set_logit_bias(s, NULL, NULL, 0), ENG_OK);
    eng_sampler_free(s);
    /* greedy: the bias moves the argmax */
    s = mk(0.0f, 0, 1.0f, 0.0f, 1.0f, 0);
    float small = 0.01f;
    int32_t second = argmax() == 0 ? 1 : 0;
    float l[V];
    fill(l);
    float b2 = l[argmax()] - l[second] + small;
    ck_assert_int_eq(eng_sampler_set_logit_bias(s, &second, &b2, 1), ENG_OK);
    ck_assert_int_eq(sample_once(s, NULL, 0), second);
    /* out of range */
    int32_t bad = V;
    float one = 1.0f, big = 101.0f;
    ck_assert_int_eq(eng_sampler_set_logit_bias(s, &bad, &one, 1), ENG_EINVAL);
    ck_assert_int_eq(eng_sampler_set_logit_bias(s, &second, &big, 1), ENG_EINVAL);
    eng_sampler_free(s);
}
END_TEST

START_TEST(validation_names_the_field)
{
    char err[128];
    eng_sampler_params p = eng_sampler_default_params();
    p.top_p = 0.0f;
    ck_assert_int_eq(eng_sampler_params_validate(&p, err, sizeof err), ENG_EINVAL);
    ck_assert(strstr(err, "top_p") != NULL);
    p = eng_sampler_default_params();
    p.temperature = -1.0f;
    ck_assert_int_eq(eng_sampler_params_validate(&p, err, sizeof err), ENG_EINVAL);
    ck_assert(strstr(err, "temperature") != NULL);
    p = eng_sampler_default_params();
    p.temperature = NAN;
    ck_assert_int_eq(eng_sampler_params_validate(&p, err, sizeof err), ENG_EINVAL);
    p = eng_sampler_default_params();
    p.top_k = -2;
    ck_assert_int_eq(eng_sampler_params_validate(&p, err, sizeof err), ENG_EINVAL);
    ck_assert(strstr(err, "top_k") != NULL);
    eng_sampler_params q = eng_sampler_default_params();
    q.presence_penalty = 2.5f;
    ck_assert_int_eq(eng_sampler_params_validate(&q, err, sizeof err), ENG_EINVAL);
    ck_assert(strstr(err, "presence_penalty") != NULL);
    q = eng_sampler_default_params();
    q.frequency_penalty = NAN;
    ck_assert_int_eq(eng_sampler_params_validate(&q, err, sizeof err), ENG_EINVAL);
    ck_assert(strstr(err, "frequency_penalty") != NULL);
    eng_sampler *s = NULL;
    ck_assert_int_eq(eng_sampler_create(V, &p, &s), ENG_EINVAL);
    ck_assert_ptr_null(s);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("sample");
    TCase *tc = tcase_create("sampler");
    tcase_add_test(tc, greedy_is_argmax);
    tcase_add_test(tc, same_seed_same_tokens);
    tcase_add_test(tc, frequencies_follow_softmax);
    tcase_add_test(tc, top_k_and_top_p_restrict_candidates);
    tcase_add_test(tc, top_p_nucleus_is_exact_on_a_large_vocab);
    tcase_add_test(tc, repetition_penalty_follows_hf);
    tcase_add_test(tc, extreme_logits_and_temperatures);
    tcase_add_test(tc, presence_and_frequency_follow_openai);
    tcase_add_test(tc, logit_bias_forces_and_bans);
    tcase_add_test(tc, validation_names_the_field);
    suite_add_tcase(s, tc);
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? 1 : 0;
}
