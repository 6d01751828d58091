/*
 * gemv.cu — the projections of a decode step (a few rows) without cuBLAS:
 * y (M, N) = x (M, K) . W^T (+ beta * y), W (N, K) bf16 row-major, x bf16,
 * y f32, for M <= CU_GEMV_MAX_M; optionally + bias, and a bf16 copy of y.
 *
 * At a handful of rows a projection reads its weights once and does two
 * FLOPs per weight: it is bound by the bytes it streams, and all that
 * matters is keeping enough 16-byte loads in flight on every
 * multiprocessor.  Each warp owns one row of W, every lane loading
 * GEMV_UNROLL 16-byte chunks of it before it uses any (a 7 KB row of the
 * 7B shape's q projection is then two rounds of loads per warp),
 * with the cache-streaming hint: weights are read once per step and must
 * not push the activations out of L1/L2.  x is read through L1 (every warp
 * of the grid reads the same M rows).  Products are accumulated in f32 per
 * lane, then summed across the warp.
 *
 * The CPU reference sums a row in a different order; the difference is f32
 * rounding of bf16 products, inside the backend's stated tolerance.
 */
#include "cuda_priv.h"

#define GEMV_WARPS 4  /* warps per block */
#define GEMV_ROWS 1   /* rows of W per warp */
#define GEMV_UNROLL 8 /* 16-byte chunks per row per lane per iteration */

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

template <int M>
__global__ void __launch_bounds__(GEMV_WARPS * 32)
    gemv_kernel(const bf16 *__restrict__ W, const bf16 *__restrict__ x, float *__restrict__ y,
                int N, int K, float beta, const float *__restrict__ bias, bf16 *__restrict__ yb)
{
    const int lane = threadIdx.x & 31;
    const int n0 = (blockIdx.x * GEMV_WARPS + (threadIdx.x >> 5)) * GEMV_ROWS;
    if (n0 >= N) return;
    const int K8 = K >> 3; /* 16-byte chunks per row */
    const uint4 *w4[GEMV_ROWS];
#pragma unroll
    for (int r = 0; r < GEMV_ROWS; r++)
        w4[r] = (const uint4 *)(W + (size_t)min(n0 + r, N - 1) * K); /* a row past N repeats N-1 */
    const uint4 *x4 = (const uint4 *)x;

    float acc[M][GEMV_ROWS];
#pragma unroll
    for (int m = 0; m < M; m++)
#pragma unroll
        for (int r = 0; r < GEMV_ROWS; r++) acc[m][r] = 0.0f;

    for (int c0 = lane; c0 < K8; c0 += 32 * GEMV_UNROLL) {
        uint4 wv[GEMV_ROWS][GEMV_UNROLL];
#pragma unroll
        for (int u = 0; u < GEMV_UNROLL; u++) {
            const int c = c0 + 32 * u;
#pragma unroll
            for (int r = 0; r < GEMV_ROWS; r++)
                wv[r][u] = c < K8 ? __ldcs(w4[r] + c) : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int u = 0; u < GEMV_UNROLL; u++) {
            const int c = c0 + 32 * u;
            if (c < K8) {
#pragma unroll
                for (int m = 0; m < M; m++) {
                    const uint4 xv = __ldg(x4 + (size_t)m * K8 + c);
#pragma unroll
                    for (int r = 0; r < GEMV_ROWS; r++) acc[m][r] = dot8(wv[r][u], xv, acc[m][r]);
                }
            }
        }
    }
#pragma unroll
    for (int m = 0; m < M; m++)
#pragma unroll
        for (int r = 0; r < GEMV_ROWS; r++) {
            float v = acc[m][r];
            for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
            acc[m][r] = v;
        }
    /* Lane m * GEMV_ROWS + r writes y[m, n0 + r]. */
#pragma unroll
    for (int m = 0; m < M; m++)
#pragma unroll
        for (int r = 0; r < GEMV_ROWS; r++)
            if (lane == (m * GEMV_ROWS + r) % 32 && n0 + r < N) {
                const size_t i = (size_t)m * N + n0 + r;
                float v = beta != 0.0f ? acc[m][r] + beta * y[i] : acc[m][r];
                if (bias) v += bias[n0 + r];
                y[i] = v;
                if (yb) yb[i] = __float2bfloat16_rn(v);
            }
}

int eng__cu_gemv_fits(const bf16 *W, int K, const bf16 *x, int M)
{
    return M >= 1 && M <= CU_GEMV_MAX_M && K > 0 && K % 8 == 0 &&
           (((uintptr_t)W | (uintptr_t)x) & 15) == 0;
}

cudaError_t eng__cu_gemv(const bf16 *W, int N, int K, const bf16 *x, int M, float *y, float beta,
                         const float *bias, bf16 *yb, cudaStream_t s)
{
    if (!eng__cu_gemv_fits(W, K, x, M) || N <= 0) return cudaErrorInvalidValue;
    const int rows_per_block = GEMV_WARPS * GEMV_ROWS;
    const dim3 grid((unsigned)((N + rows_per_block - 1) / rows_per_block)), block(GEMV_WARPS * 32);
    switch (M) {
    case 1: gemv_kernel<1><<<grid, block, 0, s>>>(W, x, y, N, K, beta, bias, yb); break;
    case 2: gemv_kernel<2><<<grid, block, 0, s>>>(W, x, y, N, K, beta, bias, yb); break;
    case 3: gemv_kernel<3><<<grid, block, 0, s>>>(W, x, y, N, K, beta, bias, yb); break;
    case 4: gemv_kernel<4><<<grid, block, 0, s>>>(W, x, y, N, K, beta, bias, yb); break;
    case 5: gemv_kernel<5><<<grid, block, 0, s>>>(W, x, y, N, K, beta, bias, yb); break;
    case 6: gemv_kernel<6><<<grid, block, 0, s>>>(W, x, y, N, K, beta, bias, yb); break;
    case 7: gemv_kernel<7><<<grid, block, 0, s>>>(W, x, y, N, K, beta, bias, yb); break;
    default: gemv_kernel<8><<<grid, block, 0, s>>>(W, x, y, N, K, beta, bias, yb); break;
    }
    return cudaGetLastError();
}
