/*
 * kernels.cu — the device kernels of the CUDA backend and their launchers:
 * one kernel per stage of the FastMKA decoder layer (FASTMKA.md) that is not
 * a plain projection (those are cuBLAS GEMMs in backend.cu).
 *
 * Every kernel works on a ragged batch: rows 0..T-1 belong to the plan's
 * items, and a row finds its sequence, position and K/V blocks through the
 * plan arrays in cu_fwd.  Activations and reductions are f32; weights, the
 * K/V pool and GEMM inputs are bf16.  Each kernel computes what the CPU
 * reference (engine/cpu/) computes for the same stage, in the same order of
 * operations where that is cheap, so that the two backends agree within the
 * stated tolerance.
 */
#include "cuda_priv.h"

/* Threads per block of the row-wise kernels. */
#define ROW_THREADS 256
/* Tokens per chunk of the EMA scan and the most chunks one block scans at
 * once (blockDim.y). */
#define EMA_CHUNK 32
#define EMA_MAX_NC 8
/* Warps per (row, head) block of the attention kernel. */
#define ATT_WARPS 4

static __device__ __forceinline__ float warp_sum(float v)
{
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

/* Sum of v over the block (blockDim.x a multiple of 32, blockDim.y == 1);
 * every thread gets the result.  sh holds 33 floats.  The leading barrier
 * keeps a previous call's readers of sh[32] ahead of this call's writers. */
static __device__ float block_sum(float v, float *sh)
{
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) sh[w] = v;
    __syncthreads();
    if (w == 0) {
        v = lane < nw ? sh[lane] : 0.0f;
        v = warp_sum(v);
        if (lane == 0) sh[32] = v;
    }
    __syncthreads();
    return sh[32];
}

/* silu as the CPU reference writes it. */
static __device__ __forceinline__ float silu(float v) { return v / (1.0f + expf(-v)); }

/* Blocks for a grid-stride loop over n elements. */
static unsigned stride_grid(size_t n, int threads)
{
    size_t g = (n + (size_t)threads - 1) / (size_t)threads;
    if (g > (1u << 20)) g = 1u << 20;
    return g ? (unsigned)g : 1u;
}

/* ---- embedding ----------------------------------------------------------- */

/* One block per row: widens the token's bf16 embedding row to f32. */
static __global__ void embed_kernel(const int *tok, const bf16 *emb, int D, float *h)
{
    cu_pdl_wait();
    cu_pdl_trigger();
    const int t = blockIdx.x;
    const bf16 *src = emb + (size_t)tok[t] * D;
    float *dst = h + (size_t)t * D;
    for (int i = threadIdx.x; i < D; i += blockDim.x) dst[i] = __bfloat162float(src[i]);
}

cudaError_t eng__cu_embed(const cu_fwd *f, const bf16 *emb, float *h, cudaStream_t s)
{
    cu_launch(embed_kernel, f->T, ROW_THREADS, 0, s, f->tok, emb, f->D, h);
    return cudaGetLastError();
}

/* ---- RMSNorm ------------------------------------------------------------- */

/* One block per output row; the sum of squares is reduced in f32.  V = 4:
 * float4 loads (D a multiple of 4), one or two per thread at the 7B shape's
 * D = 3584, so that a decode step's norm is one round of loads, not a loop
 * of dependent ones. */
template <int V>
static __global__ void rmsnorm_kernel(const float *in, const int *rows, const float *w, int D,
                                      float eps, float *out, bf16 *outb)
{
    cu_pdl_wait();
    cu_pdl_trigger();
    __shared__ float sh[33];
    const int r = blockIdx.x, nv = D / V;
    const float *x = in + (size_t)(rows ? rows[r] : r) * D;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < nv; i += blockDim.x) {
        float v[V];
        if constexpr (V == 4) {
            const float4 q = ((const float4 *)x)[i];
            v[0] = q.x, v[1] = q.y, v[2] = q.z, v[3] = q.w;
        } else {
            v[0] = x[i];
        }
#pragma unroll
        for (int k = 0; k < V; k++) ss += v[k] * v[k];
    }
    ss = block_sum(ss, sh);
    const float inv = 1.0f / sqrtf(ss / (float)D + eps);
    for (int i = threadIdx.x; i < nv; i += blockDim.x) {
        float y[V];
#pragma unroll
        for (int k = 0; k < V; k++) y[k] = w[i * V + k] * (x[i * V + k] * inv);
        const size_t o = (size_t)r * D + (size_t)i * V;
        if constexpr (V == 4) {
            if (out) *(float4 *)(out + o) = make_float4(y[0], y[1], y[2], y[3]);
            __nv_bfloat162 *ob = (__nv_bfloat162 *)(outb + o);
            ob[0] = __floats2bfloat162_rn(y[0], y[1]);
            ob[1] = __floats2bfloat162_rn(y[2], y[3]);
        } else {
            if (out) out[o] = y[0];
            outb[o] = __float2bfloat16_rn(y[0]);
        }
    }
}

cudaError_t eng__cu_rmsnorm(const float *in, const int *rows, int M, int D, const float *w,
                            float eps, float *out, bf16 *outb, cudaStream_t s)
{
    const bool v4 = D % 4 == 0 && (((uintptr_t)in | (uintptr_t)w | (uintptr_t)out) & 15) == 0 &&
                    ((uintptr_t)outb & 7) == 0;
    const int n = v4 ? D / 4 : D;
    int threads = (n + 31) / 32 * 32;
    if (threads > 1024) threads = 1024;
    if (v4)
        cu_launch(rmsnorm_kernel<4>, M, threads, 0, s, in, rows, w, D, eps, out, outb);
    else
        cu_launch(rmsnorm_kernel<1>, M, threads, 0, s, in, rows, w, D, eps, out, outb);
    return cudaGetLastError();
}

/* ---- argmax of logit rows -------------------------------------------------- */

/* (value, id) a beats (value, id) b: larger value, lower id on ties; NaN
 * never wins (eng__argmax's rule; id -1 marks "nothing yet"). */
static __device__ __forceinline__ bool am_better(float av, int ai, float bv, int bi)
{
    if (ai < 0 || av != av) return false;
    if (bi < 0) return true;
    return av > bv || (av == bv && ai < bi);
}

/* The best (value, id) of the block's threads into (*bv, *bi) of thread 0. */
static __device__ void am_block_reduce(float *bv, int *bi)
{
    __shared__ float sv[32];
    __shared__ int si[32];
    float v = *bv;
    int i = *bi;
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, v, o);
        const int oi = __shfl_xor_sync(0xffffffffu, i, o);
        if (am_better(ov, oi, v, i)) v = ov, i = oi;
    }
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    if (lane == 0) sv[w] = v, si[w] = i;
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int k = 1; k < nw; k++)
            if (am_better(sv[k], si[k], v, i)) v = sv[k], i = si[k];
        *bv = v;
        *bi = i;
    }
}

/* Pass 1, block (p, row): the best of slice p of the row's CU_ARGMAX_PARTS
 * slices, into part (rows, CU_ARGMAX_PARTS) of {value bits, id}; pass 2,
 * one warp a row: the best of those — a row of only NaN gives n - 1, as the
 * host rule does.  The rule is a total order on (value, id), so the split
 * does not change the answer.  (One block a row took 47 us at 152K ids.) */
static __global__ void argmax_part_kernel(const float *x, int n, int2 *part)
{
    cu_pdl_wait();
    cu_pdl_trigger();
    const float *row = x + (size_t)blockIdx.y * n;
    const int per = (n + CU_ARGMAX_PARTS - 1) / CU_ARGMAX_PARTS;
    const int i0 = blockIdx.x * per, i1 = min(i0 + per, n);
    float bv = 0.0f;
    int bi = -1;
    for (int i = i0 + threadIdx.x; i < i1; i += blockDim.x) {
        const float v = row[i];
        if (am_better(v, i, bv, bi)) bv = v, bi = i;
    }
    am_block_reduce(&bv, &bi);
    if (threadIdx.x == 0)
        part[(size_t)blockIdx.y * CU_ARGMAX_PARTS + blockIdx.x] = make_int2(__float_as_int(bv), bi);
}

static __global__ void argmax_final_kernel(const int2 *part, int n, int *out)
{
    cu_pdl_wait();
    cu_pdl_trigger();
    float bv = 0.0f;
    int bi = -1;
    for (int k = threadIdx.x; k < CU_ARGMAX_PARTS; k += 32) {
        const int2 p = part[(size_t)blockIdx.x * CU_ARGMAX_PARTS + k];
        if (am_better(__int_as_float(p.x), p.y, bv, bi)) bv = __int_as_float(p.x), bi = p.y;
    }
    am_block_reduce(&bv, &bi);
    if (threadIdx.x == 0) out[blockIdx.x] = bi < 0 ? n - 1 : bi;
}

cudaError_t eng__cu_argmax(const float *x, int M, int n, int2 *part, int *out, cudaStream_t s)
{
    cu_launch(argmax_part_kernel, dim3(CU_ARGMAX_PARTS, (unsigned)M), 256, 0, s, x, n, part);
    cu_launch(argmax_final_kernel, M, 32, 0, s, part, n, out);
    return cudaGetLastError();
}

/* ---- biases -------------------------------------------------------------- */

static __global__ void bias_bf16_kernel(float *y, const float *b, int N, size_t total, bf16 *yb)
{
    cu_pdl_wait();
    cu_pdl_trigger();
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (size_t)gridDim.x * blockDim.x) {
        float v = y[i];
        if (b) {
            v += b[i % N];
            y[i] = v;
        }
        yb[i] = __float2bfloat16_rn(v);
    }
}

cudaError_t eng__cu_bias_bf16(float *y, const float *b, int M, int N, bf16 *yb, cudaStream_t s)
{
    size_t total = (size_t)M * N;
    cu_launch(bias_bf16_kernel, stride_grid(total, ROW_THREADS), ROW_THREADS, 0, s, y, b, N, total,
              yb);
    return cudaGetLastError();
}

static __global__ void add_bias_kernel(float *y, const float *b, int N, size_t total)
{
    cu_pdl_wait();
    cu_pdl_trigger();
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (size_t)gridDim.x * blockDim.x)
        y[i] += b[i % N];
}

cudaError_t eng__cu_add_bias(float *y, const float *b, int M, int N, cudaStream_t s)
{
    size_t total = (size_t)M * N;
    cu_launch(add_bias_kernel, stride_grid(total, ROW_THREADS), ROW_THREADS, 0, s, y, b, N, total);
    return cudaGetLastError();
}

/* ---- router -------------------------------------------------------------- */

/* One block per row: a = silu(rh + b1) (D/2), z_l = W2[l] . a + b2[l] for the
 * L <= 3 levels, lam = softmax(z) in f32 (padded with zeros to 3).  W2 has
 * only L rows, so a GEMM would waste a launch on a 3-wide output. */
static __global__ void router_kernel(const float *rh, int Dh, const float *b1, const bf16 *w2,
                                     const float *b2, int L, float *lam)
{
    cu_pdl_wait();
    cu_pdl_trigger();
    __shared__ float sh[33];
    const int t = blockIdx.x;
    const float *r = rh + (size_t)t * Dh;
    float acc[CU_MAX_LEVELS] = {0.0f, 0.0f, 0.0f};
    for (int i = threadIdx.x; i < Dh; i += blockDim.x) {
        float a = silu(r[i] + b1[i]);
#pragma unroll
        for (int l = 0; l < CU_MAX_LEVELS; l++)
            if (l < L) acc[l] += a * __bfloat162float(w2[(size_t)l * Dh + i]);
    }
#pragma unroll
    for (int l = 0; l < CU_MAX_LEVELS; l++) acc[l] = block_sum(acc[l], sh);
    if (threadIdx.x == 0) {
        float z[CU_MAX_LEVELS], mx = -INFINITY, sum = 0.0f;
#pragma unroll
        for (int l = 0; l < CU_MAX_LEVELS; l++) {
            z[l] = l < L ? acc[l] + b2[l] : 0.0f;
            if (l < L) mx = fmaxf(mx, z[l]);
        }
#pragma unroll
        for (int l = 0; l < CU_MAX_LEVELS; l++) {
            z[l] = l < L ? expf(z[l] - mx) : 0.0f;
            sum += z[l];
        }
#pragma unroll
        for (int l = 0; l < CU_MAX_LEVELS; l++) lam[(size_t)t * CU_MAX_LEVELS + l] = z[l] / sum;
    }
}


cudaError_t eng__cu_router(const cu_fwd *f, const float *rh, int Dh, const float *b1,
                           const bf16 *w2, const float *b2, float *lam, cudaStream_t s)
{
    cu_launch(router_kernel, f->T, 512, 0, s, rh, Dh, b1, w2, b2, f->levels, lam);
    return cudaGetLastError();
}

/* ---- L3 read ------------------------------------------------------------- */

/* One block per row: scores x . kappa_r / sqrt(D) over the n chunks of the
 * row's bank, softmax, m = sum_r p_r mu_r.  Rows whose sequence has no bank
 * return at once (the fusion kernel does not read their m). */
static __global__ void l3_read_kernel(cu_fwd f, int layer, const float *x, float *mem)
{
    cu_pdl_wait();
    cu_pdl_trigger();
    extern __shared__ float sc[]; /* (n) scores, then probabilities */
    __shared__ float sh[33];
    const int t = blockIdx.x, D = f.D;
    const cu_item it = f.items[f.tok_item[t]];
    const int n = it.l3_n;
    if (n <= 0) return; /* block-uniform */
    const size_t bank = ((size_t)it.slot * f.n_layers + layer) * f.R * D;
    const float *kap = f.l3_kappa + bank, *mu = f.l3_mu + bank;
    const float *xr = x + (size_t)t * D;
    for (int r = 0; r < n; r++) {
        float d = 0.0f;
        for (int i = threadIdx.x; i < D; i += blockDim.x) d += xr[i] * kap[(size_t)r * D + i];
        d = block_sum(d, sh);
        if (threadIdx.x == 0) sc[r] = d * f.l3_scale;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        float mx = -INFINITY, sum = 0.0f;
        for (int r = 0; r < n; r++) mx = fmaxf(mx, sc[r]);
        for (int r = 0; r < n; r++) {
            sc[r] = expf(sc[r] - mx);
            sum += sc[r];
        }
        for (int r = 0; r < n; r++) sc[r] /= sum;
    }
    __syncthreads();
    for (int i = threadIdx.x; i < D; i += blockDim.x) {
        float acc = 0.0f;
        for (int r = 0; r < n; r++) acc += sc[r] * mu[(size_t)r * D + i];
        mem[(size_t)t * D + i] = acc;
    }
}

cudaError_t eng__cu_l3_read(const cu_fwd *f, int layer, const float *x, float *mem,
                            cudaStream_t s)
{
    size_t smem = (size_t)(f->R > 0 ? f->R : 1) * sizeof(float);
    cu_launch(l3_read_kernel, f->T, ROW_THREADS, smem, s, *f, layer, x, mem);
    return cudaGetLastError();
}

/* ---- EMA scan and route fusion -------------------------------------------
 *
 * s_t = beta s_{t-1} + (1 - beta) x_t is a first-order linear recurrence in t,
 * independent per dimension.  A block takes one item and 32 dimensions
 * (threadIdx.x, one warp's coalesced row slice); its blockDim.y chunk lanes
 * each own EMA_CHUNK consecutive tokens of the current stretch of
 * blockDim.y * EMA_CHUNK tokens.  Per stretch:
 *   1. every lane scans its chunk seeded with 0, giving (u_c, beta^len_c),
 *      where the chunk maps a seed s to beta^len_c s + u_c;
 *   2. lane c composes the maps of chunks 0..c-1 onto the carried state to
 *      get its own seed (at most EMA_MAX_NC - 1 steps);
 *   3. every lane re-runs its chunk's recurrence from that seed, writing the
 *      fused f, and the checkpoint at every block end;
 *   the lane holding the stretch's last token hands its s on as the carry.
 * Within a chunk s therefore follows exactly the CPU's sequential operations;
 * only chunk seeds carry the scan's reassociation.  The last token's s is the
 * state stored back, so a checkpoint at the item's end equals the state. */
static __global__ void ema_fuse_kernel(cu_fwd f, int layer, const float *x, const float *lam,
                                       const float *mem, bf16 *fb)
{
    cu_pdl_wait();
    cu_pdl_trigger();
    __shared__ float s_end[EMA_MAX_NC][32], s_pow[EMA_MAX_NC][32], s_carry[32];
    const int tx = threadIdx.x, c = threadIdx.y, NC = blockDim.y;
    const int D = f.D, d = blockIdx.y * 32 + tx;
    const bool ok = d < D;
    const cu_item it = f.items[blockIdx.x];
    const int *btr = f.bt + (size_t)blockIdx.x * f.MB;
    const bool use_mem = mem != NULL && it.l3_n > 0;
    const float beta = f.beta, omb = f.omb;
    float *state = f.ema + ((size_t)it.slot * f.n_layers + layer) * D;
    float carry = ok ? state[d] : 0.0f;

    for (int base = 0; base < it.n_tokens; base += NC * EMA_CHUNK) {
        const int end = min(base + NC * EMA_CHUNK, it.n_tokens);
        const int j0 = min(base + c * EMA_CHUNK, end), j1 = min(j0 + EMA_CHUNK, end);
        /* 1. local scan from 0 */
        float u = 0.0f, bp = 1.0f;
        if (ok)
            for (int j = j0; j < j1; j++) {
                u = beta * u + omb * x[(size_t)(it.start + j) * D + d];
                bp *= beta;
            }
        s_end[c][tx] = u;
        s_pow[c][tx] = bp;
        __syncthreads();
        /* 2. this chunk's seed */
        float s = carry;
        for (int cc = 0; cc < c; cc++) s = s_pow[cc][tx] * s + s_end[cc][tx];
        /* 3. the recurrence from the seed, fusion, checkpoints */
        if (ok)
            for (int j = j0; j < j1; j++) {
                const size_t t = (size_t)(it.start + j);
                const int pos = it.pos0 + j;
                const float xv = x[t * D + d];
                const float *lm = lam + t * CU_MAX_LEVELS;
                s = beta * s + omb * xv;
                float fv = lm[0] * xv + lm[1] * s;
                if (use_mem) fv += lm[2] * mem[t * D + d];
                fb[t * D + d] = __float2bfloat16_rn(fv);
                if ((pos + 1) % f.B == 0)
                    f.ema_ckpt[((size_t)btr[pos / f.B] * f.n_layers + layer) * D + d] = s;
            }
        if (j0 < j1 && j1 == end) s_carry[tx] = s;
        __syncthreads();
        carry = s_carry[tx];
    }
    if (ok && c == 0) state[d] = carry;
}

cudaError_t eng__cu_ema_fuse(const cu_fwd *f, int layer, int max_n, const float *x,
                             const float *lam, const float *mem, bf16 *fb, cudaStream_t s)
{
    /* As many chunk lanes as the longest item can use: decode steps (one
     * token per item) get one warp per block, long prefills eight. */
    int nc = (max_n + EMA_CHUNK - 1) / EMA_CHUNK;
    if (nc < 1) nc = 1;
    if (nc > EMA_MAX_NC) nc = EMA_MAX_NC;
    dim3 grid((unsigned)f->n_items, (unsigned)((f->D + 31) / 32)), block(32, (unsigned)nc);
    cu_launch(ema_fuse_kernel, grid, block, 0, s, *f, layer, x, lam, mem, fb);
    return cudaGetLastError();
}

/* ---- RoPE and the K/V write -------------------------------------------------- */

/* One block per row: adds the q/k/v biases, rotates q (in place, f32, kept
 * for attention) and k by the rotate-half convention, and writes k and v as
 * bf16 at the row's position in its block:
 *   cos, sin = cosf/sinf((float)pos * inv_freq[i]) * rope_scale
 *   (a, b) = (v[i], v[i + hd/2]) -> (a cos - b sin, b cos + a sin). */
static __global__ void rope_store_kernel(cu_fwd f, int layer, float *q, const float *bq,
                                         const float *kv, const float *bkv)
{
    cu_pdl_wait();
    cu_pdl_trigger();
    __shared__ float cs[CU_MAX_HEAD_DIM / 2], sn[CU_MAX_HEAD_DIM / 2];
    const int t = blockIdx.x, pos = f.tok_pos[t], hd = f.hd, half = hd / 2;
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        float ang = (float)pos * f.rope_inv_freq[i];
        cs[i] = cosf(ang) * f.rope_scale;
        sn[i] = sinf(ang) * f.rope_scale;
    }
    __syncthreads();

    float *qr = q + (size_t)t * f.q_dim;
    for (int p = threadIdx.x; p < f.H * half; p += blockDim.x) {
        const int i = p % half, idx = (p / half) * hd + i;
        float a = qr[idx], b = qr[idx + half];
        if (bq) {
            a += bq[idx];
            b += bq[idx + half];
        }
        qr[idx] = a * cs[i] - b * sn[i];
        qr[idx + half] = b * cs[i] + a * sn[i];
    }

    const int kv_dim = f.kv_dim;
    const int blk = f.bt[(size_t)f.tok_item[t] * f.MB + pos / f.B], off = pos % f.B;
    bf16 *kd = f.kv_pool + ((((size_t)blk * f.n_layers + layer) * 2 + 0) * f.B + off) * kv_dim;
    bf16 *vd = kd + (size_t)f.B * kv_dim; /* the V half of the same (block, layer) */
    const float *kr = kv + (size_t)t * 2 * kv_dim, *vr = kr + kv_dim;
    for (int p = threadIdx.x; p < f.H_kv * half; p += blockDim.x) {
        const int i = p % half, idx = (p / half) * hd + i;
        float a = kr[idx], b = kr[idx + half];
        if (bkv) {
            a += bkv[idx];
            b += bkv[idx + half];
        }
        kd[idx] = __float2bfloat16_rn(a * cs[i] - b * sn[i]);
        kd[idx + half] = __float2bfloat16_rn(b * cs[i] + a * sn[i]);
    }
    for (int i = threadIdx.x; i < kv_dim; i += blockDim.x)
        vd[i] = __float2bfloat16_rn(bkv ? vr[i] + bkv[kv_dim + i] : vr[i]);
}

cudaError_t eng__cu_rope_store(const cu_fwd *f, int layer, float *q, const float *bq,
                               const float *kv, const float *bkv, cudaStream_t s)
{
    cu_launch(rope_store_kernel, f->T, 512, 0, s, *f, layer, q, bq, kv, bkv);
    return cudaGetLastError();
}

/* ---- paged causal GQA attention ----------------------------------------------
 *
 * Design (issue 11).  Attention reads, per row and KV head, the K/V of every
 * earlier position through the sequence's block table; K/V of one block and
 * layer are (B, kv_dim) bf16 rows, K then V, so one key of one KV head is hd
 * contiguous bf16 (256 bytes at hd 128).  Three kernels, one launch sequence
 * per step for any ragged batch (the host plans the work with the step:
 * attn_plan.h, plan_attention):
 *
 * 1. attn_tc_kernel<HD, 1> ("decode"): rows of items with fewer than
 *    CU_ATT_PF_ROWS rows (decode tokens, short chunks).  A thread block takes
 *    one row group x one KV head's query heads (up to 16: GQA packing, the
 *    (row, head) pairs of 16 // G consecutive rows and G heads form the 16
 *    query slots of one m16n8k16 MMA tile) x one key split.  Each K/V tile
 *    (64 keys) is loaded once into shared memory and serves all G query heads;
 *    the 4 warps split the tile's keys (16 each), each keeps its own online
 *    softmax, and the four are merged at the end.
 * 2. attn_tc_kernel<HD, 4> ("prefill", FlashAttention-2 style): rows of items
 *    with at least CU_ATT_PF_ROWS rows, in tiles of 64 consecutive rows of one
 *    query head; warp w owns query rows 16w .. 16w+15 against the whole 64-key
 *    tile.  The 7 query heads of a KV head (GQA) re-read the same K/V tiles at
 *    about the same time (the head is the fastest block index), so the
 *    repeats come from L2, not HBM.  Per tile and warp: S = Q K^T (16 x 64,
 *    hd/16 x 8 MMAs), causal mask, online softmax in f32 (log2 domain,
 *    exp2f), P rounded to bf16 straight from the S accumulators into A
 *    fragments (the C layout of two n8 tiles is the A layout of one k16
 *    step), O += P V (4 x hd/8 MMAs, V fragments by ldmatrix.trans).
 * 3. attn_combine_kernel: rows whose keys were split merge their splits'
 *    (max, sum, unnormalised O) partials: O = sum_s 2^(m_s - M) O_s / sum_s
 *    2^(m_s - M) l_s.
 *
 * Both tensor-core kernels: 128 threads; Q (f32 after RoPE) is rounded to
 * bf16 into A fragments once per block; K/V tiles arrive by 16-byte cp.async
 * (a half-warp reads one key's 256 contiguous bytes; rows past the range are
 * zero-filled, never read) into two shared-memory stages, so the next tile
 * loads while this one is computed; rows are padded by 8 bf16 (16 bytes), so
 * that ldmatrix's eight 16-byte rows fall in distinct banks.  Shared memory:
 * 2 stages x (K + V) x 64 x (hd + 8) x 2 bytes = 69,632 at hd 128 (36,864 at
 * 64); after the loop the same bytes hold the warps' f32 O for the merge and
 * the coalesced output write.  Accumulation is f32 throughout; the only
 * roundings beyond the bf16 K/V are q and p to bf16 (relative 2^-9).
 *
 * Splits (flash-decoding).  Without splits a batch-1 decode step has only
 * H_kv (4) blocks per layer.  The host counts the blocks of the step without
 * splits; when they are fewer than att_target (the decode kernel's resident
 * blocks on the whole device: 3 x 132 on an H200), a row group of `tiles`
 * key tiles gets ns = floor(tiles * att_target / W) splits (W: blocks x
 * tiles summed over all groups; at least 1, at most tiles and
 * CU_ATT_MAX_SPLITS), its tiles spread evenly over them: one launch is then
 * at most one wave of equal blocks.  Batch-1 decode, 4K context: 65 splits
 * of one tile x 4 KV heads = 260 blocks; 32K: 99 splits of 5-6 tiles = 396
 * blocks; batch 8 at 4K: 12 splits each, 384 blocks; batch 64 at 4K: 256
 * blocks, no split.  A split may hold no key of some row of its group
 * (m = -inf, l = 0, weight 0 in the combine); the first split holds key 0.
 * Partials are f32 (CU_ATT_PART_ROWS rows of H x hd, 29 MB for the
 * Qwen2.5-7B shape); a plan that would need more gets fewer splits.
 *
 * Expected cost (H200, Qwen2.5-7B shape: 28 layers, 4 KV heads, hd 128; K/V
 * 2 KB per token and layer): batch-1 decode reads 8 MB of K/V per layer at
 * 4K (about 2 us at 4.2 TB/s; launch and combine latency dominate: ~5-8 us
 * a layer, ~0.2 ms a step) and 64 MB at 32K (15 us at the floor, expect
 * 70-80 % of it: ~20-25 us a layer with the combine, ~0.7 ms a step),
 * where the simple kernel took about 27 and 215 ms a step (a linear fit of
 * the 34.6 and 222.7 ms steps measured at 4K and 32K; the rest of the step,
 * ~7.7 ms, is not attention).  Prefill: 4 x hd FLOPs per (query head, key)
 * on tensor cores through mma.sync (Hopper runs it at a fraction of the
 * wgmma rate; FlashAttention-2 reaches ~350 TFLOP/s with it on H100, this
 * simpler kernel perhaps 150-250).
 *
 * The simple kernel (attention_simple_kernel) stays as the oracle
 * (MKAD_CUDA_ATTN=simple) and for head sizes the tensor-core kernels do not
 * take (hd not 32, 64 or 128).
 *
 * Files: the tensor-core kernels are in attn_tc.cuh and the host planner in
 * attn_plan.h, so that attn_emu.cc can run both on the CPU (every thread a
 * fiber, ldmatrix / mma.sync / cp.async emulated as PTX defines them) and
 * check their indexing without a GPU; tests/test_cuda.c compares them with
 * the simple kernel on the device. */

/* ---- the simple kernel --------------------------------------------------------
 *
 * One block per (row t, query head h), ATT_WARPS warps.  Warp w takes keys
 * j = w, w + ATT_WARPS, ... up to the row's position, each through the
 * sequence's block table; its lanes split the head dimension in bf16 pairs
 * (pair p = lane + 32 k, so any even head_dim up to 256 works, the last
 * pairs on fewer lanes), reduce the dot product across the warp and keep an
 * online softmax (running max m, sum l, output acc) in f32.  The warps'
 * partial results are then merged in shared memory. */
#define ATT_PAIRS (CU_MAX_HEAD_DIM / 64) /* pairs per lane */

static __global__ void __launch_bounds__(ATT_WARPS * 32)
    attention_simple_kernel(cu_fwd f, int layer, const float *q, bf16 *att)
{
    cu_pdl_wait();
    cu_pdl_trigger();
    __shared__ float sm_m[ATT_WARPS], sm_l[ATT_WARPS];
    __shared__ float sm_acc[ATT_WARPS][CU_MAX_HEAD_DIM];
    const int t = blockIdx.x, h = blockIdx.y;
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    const int hd = f.hd, npairs = hd / 2, kv_dim = f.kv_dim;
    const int kvh = h / (f.H / f.H_kv);
    const int pos = f.tok_pos[t];
    const int *btr = f.bt + (size_t)f.tok_item[t] * f.MB;

    const float2 *qp = reinterpret_cast<const float2 *>(q + (size_t)t * f.q_dim + (size_t)h * hd);
    float2 qr[ATT_PAIRS], acc[ATT_PAIRS];
#pragma unroll
    for (int k = 0; k < ATT_PAIRS; k++) {
        const int p = lane + 32 * k;
        qr[k] = p < npairs ? qp[p] : make_float2(0.0f, 0.0f);
        acc[k] = make_float2(0.0f, 0.0f);
    }

    float m = -INFINITY, l = 0.0f;
    for (int j = w; j <= pos; j += ATT_WARPS) {
        const int blk = btr[j / f.B], off = j % f.B;
        const bf16 *kp = f.kv_pool +
                         ((((size_t)blk * f.n_layers + layer) * 2 + 0) * f.B + off) * kv_dim +
                         (size_t)kvh * hd;
        const bf16 *vp = kp + (size_t)f.B * kv_dim;
        const __nv_bfloat162 *k2 = reinterpret_cast<const __nv_bfloat162 *>(kp);
        const __nv_bfloat162 *v2 = reinterpret_cast<const __nv_bfloat162 *>(vp);
        float dot = 0.0f;
#pragma unroll
        for (int k = 0; k < ATT_PAIRS; k++) {
            const int p = lane + 32 * k;
            if (p < npairs) {
                float2 kk = __bfloat1622float2(k2[p]);
                dot += qr[k].x * kk.x + qr[k].y * kk.y;
            }
        }
        const float sc = warp_sum(dot) * f.att_scale;
        const float m_new = fmaxf(m, sc);
        const float corr = expf(m - m_new); /* 0 on the warp's first key */
        const float pj = expf(sc - m_new);
        l = l * corr + pj;
#pragma unroll
        for (int k = 0; k < ATT_PAIRS; k++) {
            const int p = lane + 32 * k;
            if (p < npairs) {
                float2 vv = __bfloat1622float2(v2[p]);
                acc[k].x = acc[k].x * corr + pj * vv.x;
                acc[k].y = acc[k].y * corr + pj * vv.y;
            }
        }
        m = m_new;
    }

    /* Merge: a warp that saw no key has m = -inf, l = 0, acc = 0 and weighs
     * exp(-inf) = 0; warp 0 always saw key 0, so the max is finite. */
    if (lane == 0) {
        sm_m[w] = m;
        sm_l[w] = l;
    }
#pragma unroll
    for (int k = 0; k < ATT_PAIRS; k++) {
        const int p = lane + 32 * k;
        if (p < npairs) {
            sm_acc[w][2 * p] = acc[k].x;
            sm_acc[w][2 * p + 1] = acc[k].y;
        }
    }
    __syncthreads();
    float mx = sm_m[0];
    for (int i = 1; i < ATT_WARPS; i++) mx = fmaxf(mx, sm_m[i]);
    float wt[ATT_WARPS], sum = 0.0f;
#pragma unroll
    for (int i = 0; i < ATT_WARPS; i++) {
        wt[i] = expf(sm_m[i] - mx);
        sum += sm_l[i] * wt[i];
    }
    const float inv = 1.0f / sum;
    bf16 *out = att + (size_t)t * f.q_dim + (size_t)h * hd;
    for (int i = threadIdx.x; i < hd; i += blockDim.x) {
        float o = 0.0f;
#pragma unroll
        for (int k = 0; k < ATT_WARPS; k++) o += sm_acc[k][i] * wt[k];
        out[i] = __float2bfloat16_rn(o * inv);
    }
}

/* ---- the tensor-core kernels ---------------------------------------------------- */

static __device__ __forceinline__ uint32_t smem_addr(const void *p)
{
    return (uint32_t)__cvta_generic_to_shared(p);
}

/* 16 bytes global -> shared, asynchronously (L2 only: K/V are streamed). */
static __device__ __forceinline__ void cp_async16(void *dst, const void *src)
{
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_addr(dst)), "l"(src)
                 : "memory");
}

static __device__ __forceinline__ void cp_async_commit()
{
    asm volatile("cp.async.commit_group;\n" ::: "memory");
}

/* Waits until at most N of this thread's committed groups are pending. */
template <int N> static __device__ __forceinline__ void cp_async_wait()
{
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

/* Four 8x8 b16 matrices; lane l addresses row l % 8 of matrix l / 8 and
 * receives of matrix i, in r[i], the elements (row l / 4, columns 2 (l % 4)
 * and +1); .trans: (rows 2 (l % 4) and +1, column l / 4). */
static __device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void *p)
{
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p))
                 : "memory");
}

static __device__ __forceinline__ void ldsm_x4_t(uint32_t (&r)[4], const void *p)
{
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p))
                 : "memory");
}

/* c (16x8 f32) += a (16x16 bf16, row) b (16x8 bf16, col).  With g = lane / 4
 * and q = lane % 4, a thread holds
 *   a[0] = A[g][2q, 2q+1]   a[1] = A[g+8][2q, 2q+1]
 *   a[2] = A[g][2q+8, +9]   a[3] = A[g+8][2q+8, +9]
 *   b0 = B[2q, 2q+1][g]     b1 = B[2q+8, 2q+9][g]
 *   c[0], c[1] = C[g][2q, 2q+1]   c[2], c[3] = C[g+8][2q, 2q+1]
 * (pairs: the lower column or row in the lower 16 bits). */
static __device__ __forceinline__ void mma_bf16(float (&c)[4], const uint32_t (&a)[4],
                                                uint32_t b0, uint32_t b1)
{
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
                 "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

/* bf16 pair (lo in the lower 16 bits), rounded to nearest even. */
static __device__ __forceinline__ uint32_t pack_bf16(float lo, float hi)
{
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    uint32_t r;
    memcpy(&r, &v, sizeof r);
    return r;
}

/* The block's dynamic shared memory (attn_tc.cuh). */
#define FA_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]

#include "attn_tc.cuh"

int eng__cu_attention_fast_hd(int hd) { return hd == 32 || hd == 64 || hd == 128; }

template <int HD> static cudaError_t attn_setup_hd(int *per_sm)
{
    const int smem = (int)fa_smem_bytes(HD);
    cudaError_t rc = cudaFuncSetAttribute(attn_tc_kernel<HD, 1>,
                                          cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (rc == cudaSuccess)
        rc = cudaFuncSetAttribute(attn_tc_kernel<HD, 4>,
                                  cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (rc == cudaSuccess)
        rc = cudaOccupancyMaxActiveBlocksPerMultiprocessor(per_sm, attn_tc_kernel<HD, 1>,
                                                           FA_THREADS, (size_t)smem);
    return rc;
}

cudaError_t eng__cu_attention_setup(int hd, int *per_sm)
{
    *per_sm = 0;
    switch (hd) {
    case 32: return attn_setup_hd<32>(per_sm);
    case 64: return attn_setup_hd<64>(per_sm);
    case 128: return attn_setup_hd<128>(per_sm);
    default: return cudaErrorInvalidValue;
    }
}

template <int HD>
static cudaError_t attn_launch_hd(const cu_fwd *f, int layer, const float *q, bf16 *att,
                                  cudaStream_t s)
{
    const size_t smem = fa_smem_bytes(HD);
    const int G = f->H / f->H_kv, gb = G < 16 ? G : 16, nhg = (G + gb - 1) / gb;
    if (f->att_n_dec > 0) {
        const int nhb = f->H_kv * nhg;
        cu_launch(attn_tc_kernel<HD, 1>, (unsigned)f->att_n_dec * (unsigned)nhb, FA_THREADS, smem,
                  s, *f, layer, q, att, f->att_units, nhb, gb, nhg);
        cudaError_t rc = cudaGetLastError();
        if (rc != cudaSuccess) return rc;
    }
    if (f->att_n_pf > 0) {
        cu_launch(attn_tc_kernel<HD, 4>, (unsigned)f->att_n_pf * (unsigned)f->H, FA_THREADS, smem,
                  s, *f, layer, q, att, f->att_units + (size_t)f->att_n_dec * CU_ATT_UNIT_INTS,
                  f->H, 1, 1);
        cudaError_t rc = cudaGetLastError();
        if (rc != cudaSuccess) return rc;
    }
    if (f->att_n_comb > 0) {
        dim3 grid((unsigned)f->att_n_comb, (unsigned)f->H);
        cu_launch(attn_combine_kernel, grid, COMB_THREADS, 0, s, *f, att);
    }
    return cudaGetLastError();
}

cudaError_t eng__cu_attention(const cu_fwd *f, int layer, const float *q, bf16 *att,
                              cudaStream_t s)
{
    if (!f->att_simple) {
        switch (f->hd) {
        case 32: return attn_launch_hd<32>(f, layer, q, att, s);
        case 64: return attn_launch_hd<64>(f, layer, q, att, s);
        case 128: return attn_launch_hd<128>(f, layer, q, att, s);
        default: return cudaErrorInvalidValue; /* init chose the simple kernel for these */
        }
    }
    dim3 grid((unsigned)f->T, (unsigned)f->H);
    cu_launch(attention_simple_kernel, grid, ATT_WARPS * 32, 0, s, *f, layer, q, att);
    return cudaGetLastError();
}

/* ---- SwiGLU -------------------------------------------------------------- */

static __global__ void swiglu_kernel(const float *gu, const float *b, int M, int F, bf16 *act)
{
    cu_pdl_wait();
    cu_pdl_trigger();
    /* Rows on y, columns on x: no 64-bit division per element (the flat
     * grid-stride loop with one took 12 ms for a 4,096-row prefill step of
     * the 7B shape, 775 MB moved). */
    for (int t = blockIdx.y; t < M; t += gridDim.y) {
        const float *g_row = gu + (size_t)t * 2 * F, *u_row = g_row + F;
        bf16 *a_row = act + (size_t)t * F;
        for (int j = blockIdx.x * blockDim.x + threadIdx.x; j < F; j += gridDim.x * blockDim.x) {
            float g = g_row[j], u = u_row[j];
            if (b) {
                g += b[j];
                u += b[F + j];
            }
            a_row[j] = __float2bfloat16_rn(silu(g) * u);
        }
    }
}

cudaError_t eng__cu_swiglu(const float *gu, const float *b, int M, int F, bf16 *act,
                           cudaStream_t s)
{
    const int bx = (F + ROW_THREADS - 1) / ROW_THREADS;
    const dim3 grid((unsigned)(bx < 1024 ? bx : 1024), (unsigned)(M < 65535 ? M : 65535));
    cu_launch(swiglu_kernel, grid, ROW_THREADS, 0, s, gu, b, M, F, act);
    return cudaGetLastError();
}
