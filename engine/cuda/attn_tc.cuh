/*
 * attn_tc.cuh — the tensor-core attention kernels of the CUDA backend
 * (design notes: kernels.cu, "paged causal GQA attention").
 *
 * Included by kernels.cu after the device primitives it uses (cp_async16,
 * cp_async_commit, cp_async_wait, ldsm_x4, ldsm_x4_t, mma_bf16, pack_bf16)
 * and FA_DYNAMIC_SMEM(name), which declares the block's dynamic shared
 * memory.  engine/cuda/attn_emu.cc includes it too, with those primitives
 * emulated on the CPU as PTX defines them, to check these kernels' indexing
 * on a machine without a GPU.
 */
#ifndef MKAD_ENGINE_CUDA_ATTN_TC_CUH
#define MKAD_ENGINE_CUDA_ATTN_TC_CUH

#define FA_THREADS 128 /* 4 warps */

/* Loads keys k0 .. k0+63 of KV head kvh (those >= kend as zeros) into the
 * K and V tiles (64, HD + 8) of one stage.  Thread i copies 16-byte chunk
 * i % (HD/8) of rows i / (HD/8), + 128 / (HD/8), ...: a half-warp (hd 128)
 * reads one key's 256 contiguous bytes. */
template <int HD>
static __device__ __forceinline__ void fa_load_tile(const cu_fwd &f, int layer, const int *btr,
                                                    int kvh, int k0, int kend, bf16 *Ks, bf16 *Vs)
{
    constexpr int CPR = HD / 8, LD = HD + 8, RPP = FA_THREADS / CPR;
    static_assert(FA_THREADS % CPR == 0 && CU_ATT_KT % RPP == 0, "tile load shape");
    const int c = threadIdx.x % CPR;
    const size_t kv_dim = (size_t)f.kv_dim;
#pragma unroll
    for (int r = threadIdx.x / CPR; r < CU_ATT_KT; r += RPP) {
        const int j = k0 + r;
        bf16 *kd = Ks + r * LD + c * 8, *vd = Vs + r * LD + c * 8;
        if (j < kend) {
            const int blk = btr[j / f.B], off = j % f.B;
            const bf16 *ks = f.kv_pool +
                             (((size_t)blk * f.n_layers + layer) * 2 * f.B + off) * kv_dim +
                             (size_t)kvh * HD + c * 8;
            cp_async16(kd, ks);
            cp_async16(vd, ks + (size_t)f.B * kv_dim);
        } else {
            *reinterpret_cast<uint4 *>(kd) = make_uint4(0, 0, 0, 0);
            *reinterpret_cast<uint4 *>(vd) = make_uint4(0, 0, 0, 0);
        }
    }
}

/* Dynamic shared memory of attn_tc_kernel<HD, *>: two stages of K and V
 * tiles; the epilogue's f32 O (64 rows of HD + 8) and m, l (64 each) fit in
 * half of it. */
static __host__ __device__ constexpr size_t fa_smem_bytes(int hd)
{
    return (size_t)2 * 2 * CU_ATT_KT * (hd + 8) * sizeof(bf16);
}

/* One block: unit blockIdx.x / nhb (rows, keys, output; see cu_fwd), head
 * block blockIdx.x % nhb.  WM = 1 (decode): head block = (KV head, group of
 * gb of its G query heads), nhb = H_kv * nhg; query slot s (0..15) is row
 * s / gb, head s % gb of the group; warp w takes keys 16w .. 16w+15 of each
 * tile.  WM = 4 (prefill): head block = query head, nhb = H, gb = 1; slot s
 * (0..63) is row s; warp w owns slots 16w .. 16w+15 and all 64 keys. */
template <int HD, int WM>
static __global__ void __launch_bounds__(FA_THREADS, WM == 1 ? 3 : 2)
    attn_tc_kernel(cu_fwd f, int layer, const float *__restrict__ q, bf16 *__restrict__ att,
                   const int *__restrict__ units, int nhb, int gb, int nhg)
{
    cu_pdl_wait();
    cu_pdl_trigger();
    constexpr int WN = 4 / WM;           /* warps across the keys of a tile */
    constexpr int NK = CU_ATT_KT / WN;   /* keys per warp per tile: 16 or 64 */
    constexpr int NT = NK / 8;           /* n8 tiles of S per warp */
    constexpr int KS = HD / 16;          /* k16 steps over the head dimension */
    constexpr int NO = HD / 8;           /* n8 tiles of O */
    constexpr int LD = HD + 8;           /* row stride of the K/V tiles (bf16) */
    constexpr int SLOTS = 16 * WM;       /* query slots per block */
    constexpr int OLD = HD + 8;          /* row stride of the epilogue's O (f32) */
    constexpr int STAGE = 2 * CU_ATT_KT * LD;
    static_assert(HD % 32 == 0 && NK % 16 == 0 && WN * SLOTS == 64, "attention tile shape");
    static_assert((size_t)(64 * OLD + 128) * sizeof(float) <= fa_smem_bytes(HD),
                  "epilogue fits the stages");
    FA_DYNAMIC_SMEM(fa_smem);
    bf16 *const stage0 = reinterpret_cast<bf16 *>(fa_smem);

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int gq = lane >> 2, tq = lane & 3;
    const int wm = WM == 1 ? 0 : warp, wn = WM == 1 ? warp : 0;

    const unsigned unit = blockIdx.x / (unsigned)nhb;
    /* A launch sized for a bound (a replayed graph): blocks past the step's
     * units have nothing to do (block-uniform, before any barrier). */
    if (f.att_count && (int)unit >= f.att_count[WM == 1 ? 0 : 1]) return;
    const int *u = units + (size_t)unit * CU_ATT_UNIT_INTS;
    const int hb = (int)(blockIdx.x % (unsigned)nhb);
    const int item = u[0], t0 = u[1], nr = u[2], pos0 = u[3], kb = u[4], ke = u[5];
    const int part = u[6], ns = u[7];
    const int G = f.H / f.H_kv;
    int head0, nh;
    if (WM == 1) {
        const int hg = hb % nhg;
        head0 = (hb / nhg) * G + hg * gb;
        nh = min(gb, G - hg * gb);
    } else {
        head0 = hb;
        nh = 1;
    }
    const int kvh = head0 / G;
    const int *btr = f.bt + (size_t)item * f.MB;

    /* This thread's two query slots (MMA rows gq and gq + 8 of its warp). */
    const int sA = 16 * wm + gq, sB = sA + 8;
    const int rA = sA / gb, hA = sA % gb, rB = sB / gb, hB = sB % gb;
    const bool okA = rA < nr && hA < nh, okB = rB < nr && hB < nh;
    /* Keys j < lim are visible to the slot (causal, and inside the unit);
     * an unused slot sees the unit's keys and is never written. */
    const int limA = okA ? min(ke, pos0 + rA + 1) : ke;
    const int limB = okB ? min(ke, pos0 + rB + 1) : ke;

    /* Q as bf16 A fragments, per k16 step. */
    uint32_t qa[KS][4];
    {
        /* (an unused slot points at the unit's first row and head, unread) */
        const float *qA = q + (size_t)(okA ? t0 + rA : t0) * f.q_dim +
                          (size_t)(head0 + (okA ? hA : 0)) * HD;
        const float *qB = q + (size_t)(okB ? t0 + rB : t0) * f.q_dim +
                          (size_t)(head0 + (okB ? hB : 0)) * HD;
        const float2 z = make_float2(0.0f, 0.0f);
#pragma unroll
        for (int k = 0; k < KS; k++) {
            const int c = 16 * k + 2 * tq;
            const float2 a0 = okA ? *reinterpret_cast<const float2 *>(qA + c) : z;
            const float2 a2 = okA ? *reinterpret_cast<const float2 *>(qA + c + 8) : z;
            const float2 a1 = okB ? *reinterpret_cast<const float2 *>(qB + c) : z;
            const float2 a3 = okB ? *reinterpret_cast<const float2 *>(qB + c + 8) : z;
            qa[k][0] = pack_bf16(a0.x, a0.y);
            qa[k][1] = pack_bf16(a1.x, a1.y);
            qa[k][2] = pack_bf16(a2.x, a2.y);
            qa[k][3] = pack_bf16(a3.x, a3.y);
        }
    }

    /* Scores in log2 units: s = q.k * att_scale * log2(e). */
    const float sl2 = f.att_scale * 1.4426950408889634f;
    float o[NO][4];
#pragma unroll
    for (int n = 0; n < NO; n++) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
    float mA = -INFINITY, mB = -INFINITY, lA = 0.0f, lB = 0.0f; /* l: this thread's part */

    const int ntiles = (ke - kb + CU_ATT_KT - 1) / CU_ATT_KT;
    if (ntiles > 0) {
        fa_load_tile<HD>(f, layer, btr, kvh, kb, ke, stage0, stage0 + CU_ATT_KT * LD);
        cp_async_commit();
    }
    for (int it = 0; it < ntiles; it++) {
        if (it + 1 < ntiles) {
            bf16 *nx = stage0 + ((it + 1) & 1) * STAGE;
            fa_load_tile<HD>(f, layer, btr, kvh, kb + (it + 1) * CU_ATT_KT, ke, nx,
                             nx + CU_ATT_KT * LD);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads(); /* tile it is in shared memory for every thread */
        const bf16 *Ks = stage0 + (it & 1) * STAGE + (wn * NK) * LD;
        const bf16 *Vs = Ks + CU_ATT_KT * LD;

        /* S (16 x NK) = Q K^T: ldmatrix rows are keys, columns head dims;
         * matrices 0..3 = dims 32p + 0, 8, 16, 24 = (b0, b1) of steps 2p, 2p+1. */
        float s[NT][4];
#pragma unroll
        for (int n = 0; n < NT; n++) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
#pragma unroll
        for (int p = 0; p < KS / 2; p++) {
#pragma unroll
            for (int n = 0; n < NT; n++) {
                uint32_t b[4];
                ldsm_x4(b, Ks + (8 * n + (lane & 7)) * LD + 32 * p + 8 * (lane >> 3));
                mma_bf16(s[n], qa[2 * p], b[0], b[1]);
                mma_bf16(s[n], qa[2 * p + 1], b[2], b[3]);
            }
        }

        /* Mask, scale, online softmax per slot row (a quad shares a row). */
        const int kw = kb + it * CU_ATT_KT + wn * NK + 2 * tq; /* key of s[0][0] */
        float xA = -INFINITY, xB = -INFINITY;
#pragma unroll
        for (int n = 0; n < NT; n++)
#pragma unroll
            for (int e = 0; e < 2; e++) {
                const int j = kw + 8 * n + e;
                s[n][e] = j < limA ? s[n][e] * sl2 : -INFINITY;
                s[n][2 + e] = j < limB ? s[n][2 + e] * sl2 : -INFINITY;
                xA = fmaxf(xA, s[n][e]);
                xB = fmaxf(xB, s[n][2 + e]);
            }
        xA = fmaxf(xA, __shfl_xor_sync(0xffffffffu, xA, 1));
        xA = fmaxf(xA, __shfl_xor_sync(0xffffffffu, xA, 2));
        xB = fmaxf(xB, __shfl_xor_sync(0xffffffffu, xB, 1));
        xB = fmaxf(xB, __shfl_xor_sync(0xffffffffu, xB, 2));
        const float nA = fmaxf(mA, xA), nB = fmaxf(mB, xB);
        /* Shift by 0 while a row has seen no key: exp2(-inf - 0) = 0, no NaN. */
        const float uA = nA == -INFINITY ? 0.0f : nA, uB = nB == -INFINITY ? 0.0f : nB;
        const float cA = exp2f(mA - uA), cB = exp2f(mB - uB);
        mA = nA;
        mB = nB;
        float pA = 0.0f, pB = 0.0f;
#pragma unroll
        for (int n = 0; n < NT; n++) {
            s[n][0] = exp2f(s[n][0] - uA);
            s[n][1] = exp2f(s[n][1] - uA);
            s[n][2] = exp2f(s[n][2] - uB);
            s[n][3] = exp2f(s[n][3] - uB);
            pA += s[n][0] + s[n][1];
            pB += s[n][2] + s[n][3];
        }
        lA = lA * cA + pA;
        lB = lB * cB + pB;
#pragma unroll
        for (int n = 0; n < NO; n++) {
            o[n][0] *= cA;
            o[n][1] *= cA;
            o[n][2] *= cB;
            o[n][3] *= cB;
        }

        /* O += P V: P's A fragment of keys 16k .. 16k+15 is S tiles 2k, 2k+1;
         * V by ldmatrix.trans, rows keys 16k + (0..7, 8..15), columns dims
         * 16d + (0, 8): matrices 0..3 = (b0, b1) of O tiles 2d, 2d+1. */
#pragma unroll
        for (int k = 0; k < NK / 16; k++) {
            const uint32_t pa[4] = {pack_bf16(s[2 * k][0], s[2 * k][1]),
                                    pack_bf16(s[2 * k][2], s[2 * k][3]),
                                    pack_bf16(s[2 * k + 1][0], s[2 * k + 1][1]),
                                    pack_bf16(s[2 * k + 1][2], s[2 * k + 1][3])};
#pragma unroll
            for (int d = 0; d < HD / 16; d++) {
                uint32_t b[4];
                ldsm_x4_t(b, Vs + (16 * k + (lane & 7) + 8 * ((lane >> 3) & 1)) * LD + 16 * d +
                                 8 * (lane >> 4));
                mma_bf16(o[2 * d], pa, b[0], b[1]);
                mma_bf16(o[2 * d + 1], pa, b[2], b[3]);
            }
        }
        __syncthreads(); /* every warp is done with stage it & 1 before it is refilled */
    }
    cp_async_wait<0>();
    __syncthreads();

    /* Epilogue: each warp's O, m, l into shared memory (rows wn * SLOTS +
     * slot), then the WN parts of each slot merged and written coalesced. */
    lA += __shfl_xor_sync(0xffffffffu, lA, 1);
    lA += __shfl_xor_sync(0xffffffffu, lA, 2);
    lB += __shfl_xor_sync(0xffffffffu, lB, 1);
    lB += __shfl_xor_sync(0xffffffffu, lB, 2);
    float *os = reinterpret_cast<float *>(fa_smem); /* (64, OLD) */
    float *om = os + 64 * OLD, *ol = om + 64;       /* (64) each */
    {
        const int ra = wn * SLOTS + sA, rb = wn * SLOTS + sB;
#pragma unroll
        for (int n = 0; n < NO; n++) {
            *reinterpret_cast<float2 *>(os + ra * OLD + 8 * n + 2 * tq) =
                make_float2(o[n][0], o[n][1]);
            *reinterpret_cast<float2 *>(os + rb * OLD + 8 * n + 2 * tq) =
                make_float2(o[n][2], o[n][3]);
        }
        if (tq == 0) {
            om[ra] = mA;
            ol[ra] = lA;
            om[rb] = mB;
            ol[rb] = lB;
        }
    }
    __syncthreads();
    for (int i = tid; i < SLOTS * HD; i += FA_THREADS) {
        const int sl = i / HD, d = i % HD;
        const int r = sl / gb, hh = sl % gb;
        if (r >= nr || hh >= nh) continue;
        float M = -INFINITY;
#pragma unroll
        for (int w = 0; w < WN; w++) M = fmaxf(M, om[w * SLOTS + sl]);
        const float Mu = M == -INFINITY ? 0.0f : M;
        float L = 0.0f, O = 0.0f;
#pragma unroll
        for (int w = 0; w < WN; w++) {
            const int rw = w * SLOTS + sl;
            const float c = exp2f(om[rw] - Mu);
            L += ol[rw] * c;
            O += os[rw * OLD + d] * c;
        }
        const int h = head0 + hh;
        if (part < 0) {
            att[(size_t)(t0 + r) * f.q_dim + (size_t)h * HD + d] =
                __float2bfloat16_rn(L > 0.0f ? O / L : 0.0f);
        } else {
            const size_t pi = (size_t)(part + r * ns) * f.H + h;
            f.att_part_o[pi * HD + d] = O;
            if (d == 0) {
                f.att_part_ml[2 * pi] = M;
                f.att_part_ml[2 * pi + 1] = L;
            }
        }
    }
}

/* One block per (combine entry, query head): merges the ns partial rows of
 * the entry's row for head blockIdx.y and writes its attention output. */
/* One block (COMB_THREADS) per (split row, query head).  The splits' (m, l)
 * are read by one thread each (M = max m, w_s = 2^(m_s - M), L = sum w_s
 * l_s); then warp w sums w_s O_s over splits w, w + 4, ..., its lanes
 * holding four dimensions each (float4), and the four warps' sums are added
 * in shared memory: every load of the block is independent of the others. */
#define COMB_THREADS 128
static __global__ void __launch_bounds__(COMB_THREADS) attn_combine_kernel(cu_fwd f, bf16 *att)
{
    cu_pdl_wait();
    cu_pdl_trigger();
    if (f.att_count && (int)blockIdx.x >= f.att_count[2]) return; /* as in attn_tc_kernel */
    __shared__ float w[CU_ATT_MAX_SPLITS];
    __shared__ float red[COMB_THREADS / 32];
    __shared__ float4 part[COMB_THREADS / 32][32];
    const int *c = f.att_comb + (size_t)blockIdx.x * CU_ATT_COMB_INTS;
    const int t = c[0], pr = c[1], ns = c[2], h = blockIdx.y, H = f.H, hd = f.hd;
    const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32, nw = COMB_THREADS / 32;
    const float *ml = f.att_part_ml;

    float mx = -INFINITY;
    for (int s = tid; s < ns; s += COMB_THREADS)
        mx = fmaxf(mx, ml[2 * ((size_t)(pr + s) * H + h)]);
    for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    if (lane == 0) red[warp] = mx;
    __syncthreads();
    float M = -INFINITY;
    for (int i = 0; i < nw; i++) M = fmaxf(M, red[i]);
    const float Mu = M == -INFINITY ? 0.0f : M;
    __syncthreads(); /* red is reused */
    float ls = 0.0f;
    for (int s = tid; s < ns; s += COMB_THREADS) {
        const size_t k = 2 * ((size_t)(pr + s) * H + h);
        const float ws = exp2f(ml[k] - Mu);
        w[s] = ws;
        ls += ws * ml[k + 1];
    }
    for (int o = 16; o > 0; o >>= 1) ls += __shfl_xor_sync(0xffffffffu, ls, o);
    if (lane == 0) red[warp] = ls;
    __syncthreads(); /* also publishes w */
    float L = 0.0f;
    for (int i = 0; i < nw; i++) L += red[i];
    const float inv = L > 0.0f ? 1.0f / L : 0.0f;

    const int hd4 = hd / 4; /* <= 32: the tensor-core kernels take hd <= 128 */
    float4 acc = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    if (lane < hd4) {
        const float4 *po = (const float4 *)f.att_part_o;
#pragma unroll 4
        for (int s = warp; s < ns; s += nw) {
            const float4 v = po[((size_t)(pr + s) * H + h) * hd4 + lane];
            const float ws = w[s];
            acc.x += ws * v.x;
            acc.y += ws * v.y;
            acc.z += ws * v.z;
            acc.w += ws * v.w;
        }
    }
    part[warp][lane] = acc;
    __syncthreads();
    if (tid < hd4) {
        float4 o = part[0][tid];
        for (int i = 1; i < nw; i++) {
            const float4 v = part[i][tid];
            o.x += v.x;
            o.y += v.y;
            o.z += v.z;
            o.w += v.w;
        }
        bf16 *dst = att + (size_t)t * f.q_dim + (size_t)h * hd + 4 * tid;
        dst[0] = __float2bfloat16_rn(o.x * inv);
        dst[1] = __float2bfloat16_rn(o.y * inv);
        dst[2] = __float2bfloat16_rn(o.z * inv);
        dst[3] = __float2bfloat16_rn(o.w * inv);
    }
}

#endif /* MKAD_ENGINE_CUDA_ATTN_TC_CUH */
