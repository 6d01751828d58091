/*
 * gemv.cu — the projections of a decode step (a few rows) without cuBLAS:
 * y (M, N) = x (M, K) . W^T (+ beta * y), W (N, K) bf16 row-major, x bf16,
 * y f32, for M <= CU_GEMV_MAX_M; optionally + bias, and a bf16 copy of y;
 * or, for the MLP's gate|up projection, act (M, N/2) = silu(gate) * up
 * straight from the sums (no gate|up row in memory, no SwiGLU kernel).
 *
 * At a handful of rows a projection reads its weights once and does two
 * FLOPs per weight: it is bound by the bytes it streams, and all that
 * matters is keeping enough 16-byte loads in flight on every
 * multiprocessor.  A row of W is read by KS warps (KS slices of its
 * 16-byte chunks, interleaved; KS > 1 only for short grids such as the 7B
 * shape's K/V projection of 1,024 rows, gemv_slices); every lane loads
 * GEMV_UNROLL chunks before it uses any,
 * with the cache-streaming hint (weights are read once per step and must
 * not push the activations out of L1/L2), and the first of those loads
 * are issued before the wait for the previous kernel (cu_launch).  x is
 * read through L1 (every warp of the grid reads the same M rows).
 * Products are accumulated in f32 per lane, summed across the warp, then
 * the KS slices in a fixed order through shared memory.
 *
 * The CPU reference sums a row in a different order; the difference is f32
 * rounding of bf16 products, inside the backend's stated tolerance.
 */
#include "cuda_priv.h"

#define GEMV_WARPS 4  /* warps per block */
#define GEMV_UNROLL 8 /* 16-byte chunks per row per lane per iteration */

static __device__ __forceinline__ float gemv_silu(float v) { return v / (1.0f + expf(-v)); }

/* acc += the dot product of 8 bf16 weights with 8 bf16 inputs, in f32. */
static __device__ __forceinline__ float dot8(const uint4 w, const uint4 x, float acc)
{
    const unsigned wv[4] = {w.x, w.y, w.z, w.w};
    const unsigned xv[4] = {x.x, x.y, x.z, x.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
        acc = fmaf(__uint_as_float(wv[i] << 16), __uint_as_float(xv[i] << 16), acc);
        acc = fmaf(__uint_as_float(wv[i] & 0xffff0000u), __uint_as_float(xv[i] & 0xffff0000u), acc);
    }
    return acc;
}

/* wv = GEMV_UNROLL 16-byte chunks of a row from chunk c0 on, 32 apart
 * (zero past the row's end), with the cache-streaming hint. */
static __device__ __forceinline__ void gemv_load(const uint4 *w4, int c0, int K8,
                                                 uint4 (&wv)[GEMV_UNROLL])
{
#pragma unroll
    for (int u = 0; u < GEMV_UNROLL; u++) {
        const int c = c0 + 32 * u;
        wv[u] = c < K8 ? __ldcs(w4 + c) : make_uint4(0, 0, 0, 0);
    }
}

/* What the kernel does after the sums (cu_gemv_epi). */
enum { EPI_PLAIN, EPI_SWIGLU, EPI_ROPE };

/* The epilogue's arguments on the device (by value). */
struct gemv_epi_args {
    bf16 *act;
    cu_fwd f; /* EPI_ROPE */
    int layer;
    float *q;
    const float *bq;
};

/* cos and sin of RoPE frequency i at position pos, as eng__cu_rope_store
 * computes them. */
static __device__ __forceinline__ void rope_cs(const cu_fwd &f, int pos, int i, float *c, float *sn)
{
    const float ang = (float)pos * f.rope_inv_freq[i];
    *c = cosf(ang) * f.rope_scale;
    *sn = sinf(ang) * f.rope_scale;
}

/* A block holds RPB = GEMV_WARPS / KS rows, warp w slice w % KS of row
 * w / KS.  Plain: rows blockIdx.x * RPB + r.  The other epilogues pair rows
 * (RPB even; the first RPB/2 warps' rows with the last RPB/2's):
 * EPI_SWIGLU pairs gate row j with up row N/2 + j and writes act column j;
 * EPI_ROPE pairs element i of a head with element i + hd/2 (the
 * rotate-half partners, k and v heads alike). */
template <int M, int KS, int EPI>
__global__ void __launch_bounds__(GEMV_WARPS * 32)
    gemv_kernel(const bf16 *__restrict__ W, const bf16 *__restrict__ x, float *__restrict__ y,
                int N, int K, float beta, const float *__restrict__ bias, bf16 *__restrict__ yb,
                gemv_epi_args e)
{
    constexpr int RPB = GEMV_WARPS / KS;
    constexpr int HP = RPB > 1 ? RPB / 2 : 1; /* pairs per block */
    __shared__ float part[GEMV_WARPS][M];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int r = warp / KS, slice = warp % KS;
    const int pair = blockIdx.x * HP + r % HP, second = r >= HP;
    const int hh = EPI == EPI_ROPE ? e.f.hd / 2 : 1;
    int n;
    if (EPI == EPI_SWIGLU)
        n = second ? N / 2 + pair : pair;
    else if (EPI == EPI_ROPE)
        n = (pair / hh) * e.f.hd + pair % hh + (second ? hh : 0);
    else
        n = blockIdx.x * RPB + r;
    const int K8 = K >> 3; /* 16-byte chunks per row */
    const uint4 *w4 = (const uint4 *)(W + (size_t)min(n, N - 1) * K); /* past N: row N-1 again */
    const uint4 *x4 = (const uint4 *)x;

    float acc[M];
#pragma unroll
    for (int m = 0; m < M; m++) acc[m] = 0.0f;
    uint4 wv[GEMV_UNROLL];
    int c0 = lane + 32 * GEMV_UNROLL * slice;
    gemv_load(w4, c0, K8, wv);
    cu_pdl_wait();
    cu_pdl_trigger();
    for (;;) {
#pragma unroll
        for (int u = 0; u < GEMV_UNROLL; u++) {
            const int c = c0 + 32 * u;
            if (c < K8) {
#pragma unroll
                for (int m = 0; m < M; m++)
                    acc[m] = dot8(wv[u], __ldg(x4 + (size_t)m * K8 + c), acc[m]);
            }
        }
        c0 += 32 * GEMV_UNROLL * KS;
        if (c0 >= K8) break;
        gemv_load(w4, c0, K8, wv);
    }
#pragma unroll
    for (int m = 0; m < M; m++) {
        float v = acc[m];
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
        acc[m] = v;
    }
    if (KS > 1) {
        if (lane < M) {
#pragma unroll
            for (int m = 0; m < M; m++)
                if (lane == m) part[warp][m] = acc[m];
        }
        __syncthreads();
#pragma unroll
        for (int m = 0; m < M; m++) {
            float v = part[r * KS][m];
#pragma unroll
            for (int k = 1; k < KS; k++) v += part[r * KS + k][m];
            acc[m] = v;
        }
    }
    if (EPI == EPI_PLAIN) {
        /* Lane m of the row's first slice writes y[m, n]. */
        if (slice == 0 && n < N) {
#pragma unroll
            for (int m = 0; m < M; m++)
                if (lane == m) {
                    const size_t i = (size_t)m * N + n;
                    float v = beta != 0.0f ? acc[m] + beta * y[i] : acc[m];
                    if (bias) v += bias[n];
                    y[i] = v;
                    if (yb) yb[i] = __float2bfloat16_rn(v);
                }
        }
        return;
    }
    /* Paired epilogues: the rows' sums to part[r], then lane m of a first
     * row's first slice handles pair (row r, row r + HP) of x row m. */
    if (KS > 1) __syncthreads();
    if (slice == 0 && lane < M) {
#pragma unroll
        for (int m = 0; m < M; m++)
            if (lane == m) part[r][m] = acc[m];
    }
    __syncthreads();
    const int n2 = EPI == EPI_SWIGLU ? N / 2 + pair : n + hh; /* the partner row */
    if (slice == 0 && !second && pair < N / 2 && lane < M) {
#pragma unroll
        for (int m = 0; m < M; m++)
            if (lane == m) {
                float a = part[r][m], b = part[r + HP][m];
                if (bias) {
                    a += bias[n];
                    b += bias[n2];
                }
                if (EPI == EPI_SWIGLU) {
                    e.act[(size_t)m * (N / 2) + n] = __float2bfloat16_rn(gemv_silu(a) * b);
                } else {
                    const cu_fwd &f = e.f;
                    const int pos = f.tok_pos[m], kv_dim = f.kv_dim;
                    const int blk = f.bt[(size_t)f.tok_item[m] * f.MB + pos / f.B];
                    bf16 *kd = f.kv_pool +
                               ((((size_t)blk * f.n_layers + e.layer) * 2 + 0) * f.B + pos % f.B) *
                                   kv_dim;
                    if (n < kv_dim) {
                        float c, sn;
                        rope_cs(f, pos, pair % hh, &c, &sn);
                        kd[n] = __float2bfloat16_rn(a * c - b * sn);
                        kd[n2] = __float2bfloat16_rn(b * c + a * sn);
                    } else {
                        bf16 *vd = kd + (size_t)f.B * kv_dim; /* the V half of (block, layer) */
                        vd[n - kv_dim] = __float2bfloat16_rn(a);
                        vd[n2 - kv_dim] = __float2bfloat16_rn(b);
                    }
                }
            }
    }
    if (EPI == EPI_ROPE) {
        /* q's rotation, spread over the grid: element i of every q head of
         * every row with its partner i + hd/2. */
        const cu_fwd &f = e.f;
        const int per_row = f.H * hh;
        for (int idx = blockIdx.x * blockDim.x + threadIdx.x; idx < M * per_row;
             idx += gridDim.x * blockDim.x) {
            const int m = idx / per_row, pp = idx % per_row, i = pp % hh;
            const int qi = (pp / hh) * f.hd + i;
            float *qr = e.q + (size_t)m * f.q_dim;
            float a = qr[qi], b = qr[qi + hh];
            if (e.bq) {
                a += e.bq[qi];
                b += e.bq[qi + hh];
            }
            float c, sn;
            rope_cs(f, f.tok_pos[m], i, &c, &sn);
            qr[qi] = a * c - b * sn;
            qr[qi + hh] = b * c + a * sn;
        }
    }
}

int eng__cu_gemv_fits(const bf16 *W, int K, const bf16 *x, int M)
{
    return M >= 1 && M <= CU_GEMV_MAX_M && K > 0 && K % 8 == 0 &&
           (((uintptr_t)W | (uintptr_t)x) & 15) == 0;
}

/* The slices per row: doubled while the grid holds fewer than
 * eng__cu_gemv_split warps per multiprocessor and every lane of a slice
 * still has a chunk to load (paired epilogues: at most 2, so that a block
 * holds both rows of a pair).  Measured on the H200 (7B shape, one row):
 * the K/V projection (1,024 rows) went from 8.7 to 7.9 us with 4 slices,
 * while splitting q, o and down (3,584 rows) into 2 made them 7-11 % slower
 * — the kernel's registers already hold a multiprocessor's full share of
 * those grids. */
int eng__cu_gemv_split = 16;

static int gemv_slices(int N, int K, int n_sm, int paired)
{
    int ks = 1;
    while (ks < (paired ? 2 : GEMV_WARPS) &&
           (long long)N * ks < (long long)eng__cu_gemv_split * n_sm && K / 8 >= 2 * ks * 32)
        ks *= 2;
    return ks;
}

template <int M, int EPI>
static void gemv_launch(int ks, dim3 grid, cudaStream_t s, const bf16 *W, const bf16 *x, float *y,
                        int N, int K, float beta, const float *bias, bf16 *yb,
                        const gemv_epi_args &e)
{
    const dim3 block(GEMV_WARPS * 32);
    if (EPI == EPI_PLAIN && ks == 4)
        cu_launch(gemv_kernel<M, EPI == EPI_PLAIN ? 4 : 2, EPI>, grid, block, 0, s, W, x, y, N, K,
                  beta, bias, yb, e);
    else if (ks >= 2)
        cu_launch(gemv_kernel<M, 2, EPI>, grid, block, 0, s, W, x, y, N, K, beta, bias, yb, e);
    else
        cu_launch(gemv_kernel<M, 1, EPI>, grid, block, 0, s, W, x, y, N, K, beta, bias, yb, e);
}

template <int EPI>
static void gemv_rows(int M, int ks, dim3 grid, cudaStream_t s, const bf16 *W, const bf16 *x,
                      float *y, int N, int K, float beta, const float *bias, bf16 *yb,
                      const gemv_epi_args &e)
{
    switch (M) {
    case 1: gemv_launch<1, EPI>(ks, grid, s, W, x, y, N, K, beta, bias, yb, e); break;
    case 2: gemv_launch<2, EPI>(ks, grid, s, W, x, y, N, K, beta, bias, yb, e); break;
    case 3: gemv_launch<3, EPI>(ks, grid, s, W, x, y, N, K, beta, bias, yb, e); break;
    default: gemv_launch<4, EPI>(ks, grid, s, W, x, y, N, K, beta, bias, yb, e); break;
    }
}

cudaError_t eng__cu_gemv(const bf16 *W, int N, int K, const bf16 *x, int M, float *y, float beta,
                         const float *bias, bf16 *yb, const cu_gemv_epi *epi, int n_sm,
                         cudaStream_t s)
{
    const int epi_kind = !epi ? EPI_PLAIN : epi->act ? EPI_SWIGLU : EPI_ROPE;
    if (!eng__cu_gemv_fits(W, K, x, M) || N <= 0 || (epi_kind != EPI_PLAIN && N % 2) ||
        (epi_kind == EPI_ROPE && (!epi->rope || epi->rope->hd % 2 || N != 2 * epi->rope->kv_dim ||
                                  M != epi->rope->T)))
        return cudaErrorInvalidValue;
    gemv_epi_args e = {};
    if (epi) {
        e.act = epi->act;
        if (epi->rope) e.f = *epi->rope;
        e.layer = epi->layer;
        e.q = epi->q;
        e.bq = epi->bq;
    }
    const int ks = gemv_slices(N, K, n_sm, epi_kind != EPI_PLAIN), rpb = GEMV_WARPS / ks;
    /* Paired epilogues: a block handles rpb / 2 pairs of the N / 2. */
    const int per_block = epi_kind != EPI_PLAIN ? rpb / 2 : rpb;
    const int units = epi_kind != EPI_PLAIN ? N / 2 : N;
    const dim3 grid((unsigned)((units + per_block - 1) / per_block));
    if (epi_kind == EPI_SWIGLU)
        gemv_rows<EPI_SWIGLU>(M, ks, grid, s, W, x, y, N, K, beta, bias, yb, e);
    else if (epi_kind == EPI_ROPE)
        gemv_rows<EPI_ROPE>(M, ks, grid, s, W, x, y, N, K, beta, bias, yb, e);
    else
        gemv_rows<EPI_PLAIN>(M, ks, grid, s, W, x, y, N, K, beta, bias, yb, e);
    return cudaGetLastError();
}
