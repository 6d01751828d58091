/*
 * chunks.cu — L3 memory chunks on the device (engine.h, "L3 memory
 * chunks"): the running per-slot sums of the embeddings and of every
 * layer's attention input x, and the means of the chunks a step completes.
 * The CPU twin is chunk_task in engine/cpu/backend.c; tests/test_cuda.c
 * compares the two.
 */
#include "cuda_priv.h"

/* Rows loaded ahead of the sequential additions. */
#define CHUNK_UNROLL 8
/* Most chunk segments one block sums at once (blockDim.y). */
#define CHUNK_MAX_SEGS 8

/* Block (32 dimensions, up to CHUNK_MAX_SEGS segment lanes) per (item,
 * 32-dimension slice).  The item's rows split at multiples of C into
 * segments, one per chunk they touch; each lane sums its segments' rows in
 * position order: from zero where the segment starts a chunk, else (only the
 * first segment can) onto the slot's carried sum.  So every chunk sum is the
 * same sequence of f32 additions as on the CPU, whatever the step
 * boundaries.  A segment that ends a chunk writes sum / C to the chunk's
 * slot in out when the core emits it (tok_chunk of its last row); the
 * item's last segment leaves its sum in acc for the next step.  Items name
 * distinct slots, and the block reads the carried sum before any lane
 * writes it, so no sum is shared between blocks. */
static __global__ void chunk_sums_kernel(cu_fwd f, int place, int C, const float *__restrict__ src,
                                         float *__restrict__ acc, float *__restrict__ out)
{
    cu_pdl_wait();
    cu_pdl_trigger();
    const int d = blockIdx.y * 32 + threadIdx.x;
    const bool ok = d < f.D;
    const cu_item it = f.items[blockIdx.x];
    const size_t D = (size_t)f.D, W = (size_t)f.n_layers + 1;
    const int end = it.pos0 + it.n_tokens, k0 = it.pos0 / C, nseg = (end - 1) / C - k0 + 1;
    float *a = acc + ((size_t)it.slot * W + place) * D + d;
    const float carry = ok ? *a : 0.0f;
    __syncthreads(); /* every lane has read the carried sum before one writes it */
    if (!ok) return;
    for (int sg = threadIdx.y; sg < nseg; sg += blockDim.y) {
        const int c0 = (k0 + sg) * C; /* the chunk's first position */
        const int p0 = max(it.pos0, c0), p1 = min(end, c0 + C), n = p1 - p0;
        const float *r = src + ((size_t)it.start + (size_t)(p0 - it.pos0)) * D + d;
        float s = p0 == c0 ? 0.0f : carry;
        int j = 0;
        for (; j + CHUNK_UNROLL <= n; j += CHUNK_UNROLL) {
            float v[CHUNK_UNROLL];
#pragma unroll
            for (int u = 0; u < CHUNK_UNROLL; u++) v[u] = r[(size_t)(j + u) * D];
#pragma unroll
            for (int u = 0; u < CHUNK_UNROLL; u++) s += v[u];
        }
        for (; j < n; j++) s += r[(size_t)j * D];
        if (p1 - c0 == C) {
            const int k = f.tok_chunk[it.start + (p1 - 1 - it.pos0)];
            if (k >= 0) out[((size_t)k * W + place) * D + d] = s / (float)C;
        }
        if (p1 == end) *a = s;
    }
}

cudaError_t eng__cu_chunk_sums(const cu_fwd *f, int place, int C, int max_n, const float *src,
                               float *acc, float *out, cudaStream_t s)
{
    /* n positions touch at most ceil((n - 1) / C) + 1 chunks. */
    const int n1 = max_n > 1 ? max_n - 1 : 0;
    int segs = n1 / C + (n1 % C != 0) + 1;
    if (segs > CHUNK_MAX_SEGS) segs = CHUNK_MAX_SEGS;
    dim3 grid((unsigned)f->n_items, (unsigned)((f->D + 31) / 32)), block(32, (unsigned)segs);
    cu_launch(chunk_sums_kernel, grid, block, 0, s, *f, place, C, src, acc, out);
    return cudaGetLastError();
}
