/*
 * bench_kernels.c — speed of the CPU backend's kernels in isolation, per
 * instruction-set path and thread count: the projection GEMM of a prefill
 * (GFLOP/s), the decode GEMV (GB/s of weights streamed) and the attention of
 * one token at a given depth (ms per layer).  Shapes default to
 * Qwen2.5-0.5B's.  Medians of --reps runs.
 *
 *   bench-kernels [--threads N] [--isa portable|avx2|avx512] [--math exact|fast] [--reps R]
 *                 [--M 512] [--K 896] [--N 4864] [--gemv-rows 151936] [--depth 2048]
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "engine_priv.h" /* eng__f32_to_bf16 */

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int cmpd(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double median(double *v, int n)
{
    qsort(v, (size_t)n, sizeof *v, cmpd);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

static uint16_t *rand_bf16(size_t n)
{
    uint16_t *w = aligned_alloc(64, (n * sizeof *w + 63) / 64 * 64); /* sum_lines reads 64-byte lines */
    if (!w) { perror("malloc"); exit(1); }
    uint32_t s = 12345;
    for (size_t i = 0; i < n; i++) {
        s = s * 1664525u + 1013904223u;
        w[i] = eng__f32_to_bf16(((float)(s >> 8) / 16777216.0f - 0.5f) * 0.1f);
    }
    return w;
}

static float *rand_f32(size_t n)
{
    float *x = malloc(n * sizeof *x);
    if (!x) { perror("malloc"); exit(1); }
    for (size_t i = 0; i < n; i++) x[i] = (float)((i * 2654435761u) % 1000) / 1000.0f - 0.5f;
    return x;
}

typedef struct bw_ctx {
    const uint32_t *p;
    size_t n;
    int parts;
    volatile uint32_t sink[64];
} bw_ctx;

typedef uint32_t u32x16 __attribute__((vector_size(64)));

/* Sums n 64-byte lines with four independent vector accumulators: the loads
 * are the only cost (the widest registers the CPU has, picked at run time). */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx512f", "avx2", "default")))
#endif
static uint32_t sum_lines(const u32x16 *p, size_t n)
{
    u32x16 a = {0}, b = {0}, c = {0}, d = {0};
    size_t i = 0;
    for (; i + 4 <= n; i += 4) { a += p[i]; b += p[i + 1]; c += p[i + 2]; d += p[i + 3]; }
    for (; i < n; i++) a += p[i];
    a += b + c + d;
    uint32_t t = 0;
    for (int l = 0; l < 16; l++) t += a[l];
    return t;
}

static void bw_task(void *vctx, int task, int thread)
{
    (void)thread;
    bw_ctx *c = vctx;
    size_t lines = c->n / 16;
    size_t a = lines * (size_t)task / (size_t)c->parts, b = lines * (size_t)(task + 1) / (size_t)c->parts;
    c->sink[task % 64] = sum_lines((const u32x16 *)(const void *)c->p + a, b - a);
}

int main(int argc, char **argv)
{
    int threads = 1, reps = 5, M = 512, K = 896, N = 4864, GR = 151936, depth = 2048;
    const char *isa = NULL;
    int math = ENG_CPU_MATH_EXACT;
    for (int i = 1; i + 1 < argc; i += 2) {
        const char *a = argv[i], *v = argv[i + 1];
        if (!strcmp(a, "--threads")) threads = atoi(v);
        else if (!strcmp(a, "--isa")) isa = v;
        else if (!strcmp(a, "--math")) {
            if (eng_cpu_math_parse(v, &math) != ENG_OK) { fprintf(stderr, "bench-kernels: bad --math\n"); return 2; }
        } else if (!strcmp(a, "--reps")) reps = atoi(v);
        else if (!strcmp(a, "--M")) M = atoi(v);
        else if (!strcmp(a, "--K")) K = atoi(v);
        else if (!strcmp(a, "--N")) N = atoi(v);
        else if (!strcmp(a, "--gemv-rows")) GR = atoi(v);
        else if (!strcmp(a, "--depth")) depth = atoi(v);
        else { fprintf(stderr, "bench-kernels: unknown option %s\n", a); return 2; }
    }
    if (threads < 1 || reps < 1 || reps > 100 || M < 1 || K < 1 || N < 1 || GR < 1 || depth < 1) {
        fprintf(stderr, "bench-kernels: bad arguments\n");
        return 2;
    }
    if (isa) {
        int lv = !strcmp(isa, "avx512") ? ENG_ISA_AVX512 : !strcmp(isa, "avx2") ? ENG_ISA_AVX2
               : !strcmp(isa, "portable") ? ENG_ISA_PORTABLE : -1;
        if (lv < 0 || eng_cpu_isa_set(lv) != ENG_OK) {
            fprintf(stderr, "bench-kernels: this CPU has no %s path\n", isa);
            return 2;
        }
    }
    if (!eng_cpu_math_available(math)) {
        fprintf(stderr, "bench-kernels: --math fast needs AVX512-BF16 on the AVX-512 path\n");
        return 2;
    }
    eng_pool *pool;
    if (eng_pool_create(threads, &pool) != ENG_OK) return 1;
    double t[100];

    /* GEMM: y (M, N) = x (M, K) W^T, W bf16 */
    uint16_t *w = rand_bf16((size_t)N * K);
    float *x = rand_f32((size_t)M * K), *y = malloc((size_t)M * N * sizeof *y);
    eng_linear l = { NULL, w, NULL, N, K };
    eng_cpu_linear(pool, &l, x, M, y, math);
    for (int r = 0; r < reps; r++) {
        double t0 = now();
        eng_cpu_linear(pool, &l, x, M, y, math);
        t[r] = now() - t0;
    }
    double gemm = median(t, reps), gemm_best = t[0];

    /* GEMV: one row against a (GR, K) bf16 matrix (the LM head's size) */
    uint16_t *g = rand_bf16((size_t)GR * K);
    float *gy = malloc((size_t)GR * sizeof *gy);
    eng_linear gl = { NULL, g, NULL, GR, K };
    eng_cpu_linear(pool, &gl, x, 1, gy, math);
    for (int r = 0; r < reps; r++) {
        double t0 = now();
        eng_cpu_linear(pool, &gl, x, 1, gy, math);
        t[r] = now() - t0;
    }
    double gemv = median(t, reps);

    /* Attention of one token over `depth` positions: 2 K/V heads of 7
     * query heads, head size 64, bf16 K/V in blocks of 16 (one layer). */
    int B = 16, hd = 64, G = 7, Hkv = 2, nb = (depth + B - 1) / B;
    size_t kv_dim = (size_t)Hkv * hd, block_bytes = 2 * (size_t)B * kv_dim * 2;
    unsigned char *kv = (unsigned char *)rand_bf16((size_t)nb * block_bytes / 2);
    int *blocks = malloc((size_t)nb * sizeof *blocks);
    for (int i = 0; i < nb; i++) blocks[i] = nb - 1 - i;
    float *q = rand_f32((size_t)G * hd * Hkv), *out = malloc((size_t)G * hd * Hkv * sizeof *out);
    float *sc = malloc(ENG_CPU_ATTN_SCRATCH(G, depth, hd) * sizeof *sc);
    for (int r = 0; r < reps; r++) {
        double t0 = now();
        for (int h = 0; h < Hkv; h++) {
            eng_cpu_attn a = { q + (size_t)h * G * hd, out + (size_t)h * G * hd, sc, G, hd, depth, B, 1,
                               blocks, kv, block_bytes, (size_t)h * hd * 2, B * kv_dim * 2 + (size_t)h * hd * 2,
                               kv_dim * 2, 0.125f, math };
            eng_cpu_attention(&a);
        }
        t[r] = now() - t0;
    }
    double att = median(t, reps);

    /* Read bandwidth: the same bytes as the GEMV, summed as u32 words split
     * over the pool's threads (what a decode step's weight stream can reach). */
    bw_ctx bc = { (const uint32_t *)(const void *)g, (size_t)GR * K / 2, threads, {0} };
    eng_pool_run(pool, threads, bw_task, &bc);
    for (int r = 0; r < reps; r++) {
        double t0 = now();
        eng_pool_run(pool, threads, bw_task, &bc);
        t[r] = now() - t0;
    }
    double bw = median(t, reps);

    printf("read_GBps=%.1f ", (double)GR * K * 2 / bw * 1e-9);
    printf("math=%s ", math == ENG_CPU_MATH_FAST ? "fast" : "exact");
    printf("isa=%s threads=%d gemm_M%d_K%d_N%d_gflops=%.1f (best %.1f) gemv_rows%d_GBps=%.1f attn_depth%d_ms=%.3f\n",
           eng_cpu_isa_name(eng_cpu_isa()), threads, M, K, N, 2.0 * M * K * N / gemm * 1e-9, 2.0 * M * K * N / gemm_best * 1e-9, GR,
           (double)GR * K * 2 / gemv * 1e-9, depth, att * 1e3);
    eng_pool_free(pool);
    free(w); free(x); free(y); free(g); free(gy); free(kv); free(blocks); free(q); free(out); free(sc);
    return 0;
}
