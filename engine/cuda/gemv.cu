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

/* A block holds RPB = GEMV_WARPS / KS rows, warp w slice w % KS of row
 * w / KS.  Plain: rows blockIdx.x * RPB + r.  With act (N even, RPB even):
 * the block's first RPB/2 rows are gate rows j .. of the first half of W,
 * the others the up rows F + j .. (F = N/2), and it writes act columns j ... */
template <int M, int KS>
__global__ void __launch_bounds__(GEMV_WARPS * 32)
    gemv_kernel(const bf16 *__restrict__ W, const bf16 *__restrict__ x, float *__restrict__ y,
                int N, int K, float beta, const float *__restrict__ bias, bf16 *__restrict__ yb,
                bf16 *__restrict__ act)
{
    constexpr int RPB = GEMV_WARPS / KS;
    __shared__ float part[GEMV_WARPS][M];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int r = warp / KS, slice = warp % KS;
    int n;
    if (act) {
        const int half = RPB > 1 ? RPB / 2 : 1, j = blockIdx.x * half + r % half;
        n = r < half ? j : N / 2 + j;
    } else {
        n = blockIdx.x * RPB + r;
    }
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
    if (act) {
        /* The rows' sums to part[r], then lane m of a gate row's first
         * slice: act[m, j] = silu(gate) * up. */
        if (KS > 1) __syncthreads();
        if (slice == 0 && lane < M) {
#pragma unroll
            for (int m = 0; m < M; m++)
                if (lane == m) part[r][m] = acc[m];
        }
        __syncthreads();
        const int half = RPB > 1 ? RPB / 2 : 1, F = N / 2;
        if (slice == 0 && r < half && n < F && lane < M) {
#pragma unroll
            for (int m = 0; m < M; m++)
                if (lane == m) {
                    float g = part[r][m], u = part[r + half][m];
                    if (bias) {
                        g += bias[n];
                        u += bias[F + n];
                    }
                    act[(size_t)m * F + n] = __float2bfloat16_rn(gemv_silu(g) * u);
                }
        }
        return;
    }
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
}

int eng__cu_gemv_fits(const bf16 *W, int K, const bf16 *x, int M)
{
    return M >= 1 && M <= CU_GEMV_MAX_M && K > 0 && K % 8 == 0 &&
           (((uintptr_t)W | (uintptr_t)x) & 15) == 0;
}

/* The slices per row: doubled while the grid holds fewer than
 * eng__cu_gemv_split warps per multiprocessor and every lane of a slice still
 * has a chunk to load (gate|up with act: at most 2, so that a block holds a
 * gate and an up row of the same column).  Measured on the H200 (7B shape,
 * one row): the K/V projection (1,024 rows) went from 8.7 to 7.9 us with 4
 * slices, while splitting q, o and down (3,584 rows) into 2 made them 7-11 %
 * slower — the kernel's registers already hold a multiprocessor's full
 * share of those grids. */
int eng__cu_gemv_split = 16;

static int gemv_slices(int N, int K, int n_sm, int act)
{
    int ks = 1;
    while (ks < (act ? 2 : GEMV_WARPS) && (long long)N * ks < (long long)eng__cu_gemv_split * n_sm &&
           K / 8 >= 2 * ks * 32)
        ks *= 2;
    return ks;
}

template <int M>
static void gemv_launch(int ks, dim3 grid, cudaStream_t s, const bf16 *W, const bf16 *x, float *y,
                        int N, int K, float beta, const float *bias, bf16 *yb, bf16 *act)
{
    const dim3 block(GEMV_WARPS * 32);
    if (ks == 4)
        cu_launch(gemv_kernel<M, 4>, grid, block, 0, s, W, x, y, N, K, beta, bias, yb, act);
    else if (ks == 2)
        cu_launch(gemv_kernel<M, 2>, grid, block, 0, s, W, x, y, N, K, beta, bias, yb, act);
    else
        cu_launch(gemv_kernel<M, 1>, grid, block, 0, s, W, x, y, N, K, beta, bias, yb, act);
}

cudaError_t eng__cu_gemv(const bf16 *W, int N, int K, const bf16 *x, int M, float *y, float beta,
                         const float *bias, bf16 *yb, bf16 *act, int n_sm, cudaStream_t s)
{
    if (!eng__cu_gemv_fits(W, K, x, M) || N <= 0 || (act && N % 2)) return cudaErrorInvalidValue;
    const int ks = gemv_slices(N, K, n_sm, act != NULL), rpb = GEMV_WARPS / ks;
    /* With act a block makes rpb / 2 columns of act out of N / 2. */
    const int per_block = act ? rpb / 2 : rpb, cols = act ? N / 2 : N;
    const dim3 grid((unsigned)((cols + per_block - 1) / per_block));
    switch (M) {
    case 1: gemv_launch<1>(ks, grid, s, W, x, y, N, K, beta, bias, yb, act); break;
    case 2: gemv_launch<2>(ks, grid, s, W, x, y, N, K, beta, bias, yb, act); break;
    case 3: gemv_launch<3>(ks, grid, s, W, x, y, N, K, beta, bias, yb, act); break;
    case 4: gemv_launch<4>(ks, grid, s, W, x, y, N, K, beta, bias, yb, act); break;
    case 5: gemv_launch<5>(ks, grid, s, W, x, y, N, K, beta, bias, yb, act); break;
    case 6: gemv_launch<6>(ks, grid, s, W, x, y, N, K, beta, bias, yb, act); break;
    case 7: gemv_launch<7>(ks, grid, s, W, x, y, N, K, beta, bias, yb, act); break;
    default: gemv_launch<8>(ks, grid, s, W, x, y, N, K, beta, bias, yb, act); break;
    }
    return cudaGetLastError();
}
