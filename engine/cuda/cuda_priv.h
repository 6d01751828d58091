/*
 * cuda_priv.h — private declarations of the CUDA backend (engine/cuda/):
 * the error macros, the backend's device state, and the kernel launchers
 * that kernels.cu provides to backend.cu.
 *
 * Nothing outside engine/cuda/ includes this header; the backend's only
 * public names are eng_backend_cuda and eng_cuda_device_present
 * (engine_priv.h).  Everything here is C++ (compiled by nvcc).
 */
#ifndef MKAD_ENGINE_CUDA_PRIV_H
#define MKAD_ENGINE_CUDA_PRIV_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

/* engine_priv.h declares the CUDA backend only under HAVE_CUDA; config.h is
 * not on the include path when a .cu file is compiled on its own. */
#ifndef HAVE_CUDA
#define HAVE_CUDA 1
#endif
/* The engine headers are C; internal.h has no extern "C" guard of its own. */
extern "C" {
#include "../engine_priv.h"
}

typedef __nv_bfloat16 bf16;

/* Record the failing call, file and line in (err, errlen) and return
 * ENG_EDEVICE.  Both expect `err` and `errlen` in scope. */
#define CUDA_TRY(call)                                                                        \
    do {                                                                                      \
        cudaError_t cuda_try_rc_ = (call);                                                    \
        if (cuda_try_rc_ != cudaSuccess)                                                      \
            return eng__errf(err, errlen, ENG_EDEVICE, "cuda: %s failed at %s:%d: %s", #call, \
                             __FILE__, __LINE__, cudaGetErrorString(cuda_try_rc_));           \
    } while (0)

#define CUBLAS_TRY(call)                                                                      \
    do {                                                                                      \
        cublasStatus_t cublas_try_rc_ = (call);                                               \
        if (cublas_try_rc_ != CUBLAS_STATUS_SUCCESS)                                          \
            return eng__errf(err, errlen, ENG_EDEVICE, "cuda: %s failed at %s:%d: %s", #call, \
                             __FILE__, __LINE__, cublasGetStatusString(cublas_try_rc_));      \
    } while (0)

/* Programmatic dependent launch (Hopper; cu_launch): a kernel launched
 * while the previous one in the stream still runs.  Every kernel of this
 * backend calls cu_pdl_wait() before it touches any memory that another
 * kernel writes or reads — the wait returns once the previous grid has
 * completed and its writes are visible, so order is what the stream gives —
 * and only what depends on nothing (the GEMV's first weight loads) may come
 * before it; then cu_pdl_trigger() lets the next kernel be launched.  The
 * next kernel's launch latency and the GEMV's weight loads thus overlap the
 * tail of the kernel before.  Off (plain launches, where both calls are
 * no-ops) with MKAD_CUDA_PDL=0. */
extern int eng__cu_pdl;

static __device__ __forceinline__ void cu_pdl_wait(void)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

static __device__ __forceinline__ void cu_pdl_trigger(void)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

/* Queues kernel k<<<grid, block, smem, s>>>(args...), as a programmatic
 * dependent launch when eng__cu_pdl is set. */
template <typename... P, typename... A>
static inline cudaError_t cu_launch(void (*k)(P...), dim3 grid, dim3 block, size_t smem,
                                    cudaStream_t s, A... args)
{
    cudaLaunchAttribute at;
    at.id = cudaLaunchAttributeProgrammaticStreamSerialization;
    at.val.programmaticStreamSerializationAllowed = 1;
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = grid;
    cfg.blockDim = block;
    cfg.dynamicSmemBytes = smem;
    cfg.stream = s;
    cfg.attrs = &at;
    cfg.numAttrs = eng__cu_pdl ? 1 : 0;
    return cudaLaunchKernelEx(&cfg, k, ((P)args)...);
}

/* The GEMV kernel (gemv.cu) takes projections of at most CU_GEMV_MAX_M
 * rows (more rows: cuBLAS's tensor cores beat its FMAs — measured on the
 * H200, 7B shape: at 8 rows 11.4 against 6.4 ms a step, at 4 rows 6.42
 * against 6.27, at 2 rows 5.50 against 6.09); MKAD_CUDA_GEMV_ROWS lowers
 * it.  Decode steps of up to CU_GRAPH_ROWS rows replay CUDA graphs. */
#define CU_GEMV_MAX_M 4
#define CU_GRAPH_ROWS 8
/* The router has at most this many levels; lam rows are padded to it. */
#define CU_MAX_LEVELS 3
/* Largest head size the attention and RoPE kernels hold in registers and
 * shared memory. */
#define CU_MAX_HEAD_DIM 256
/* Largest L3 bank: its scores live in the L3 kernel's shared memory. */
#define CU_MAX_L3_CHUNKS 4096
/* Slices of a logit row that the argmax scans in parallel. */
#define CU_ARGMAX_PARTS 64

/* Tensor-core attention (kernels.cu, "paged causal GQA attention"):
 * keys per K/V tile in shared memory; items with at least CU_ATT_PF_ROWS
 * rows take the prefill kernel (64-row query tiles), shorter ones the decode
 * kernel (one row's query heads per tile); the most key splits of one row
 * group; the partial-result rows (one row's H heads of one split) the
 * scratch holds; ints per work unit and per combine entry in the plan. */
#define CU_ATT_KT 64
#define CU_ATT_PF_ROWS 64
#define CU_ATT_MAX_SPLITS 256
#define CU_ATT_PART_ROWS 2048
#define CU_ATT_UNIT_INTS 8
#define CU_ATT_COMB_INTS 4

/* A linear layer on the device: y = x W^T + b. */
typedef struct cu_linear {
    bf16 *w;  /* (rows, cols) */
    float *b; /* (rows) or NULL */
    int rows, cols;
} cu_linear;

typedef struct cu_layer {
    float *attn_norm; /* (D) */
    float *mlp_norm;  /* (D) */
    cu_linear q;      /* (q_dim, D) */
    cu_linear kv;     /* (2*kv_dim, D): W_k rows, then W_v rows (biases fused the same way) */
    cu_linear o;      /* (D, q_dim) */
    cu_linear r1;     /* (D/2, q_dim) router.0; unused when levels == 0 */
    cu_linear r2;     /* (levels, D/2) router.2 */
    cu_linear gu;     /* (2*F, D): W_gate rows, then W_up rows */
    cu_linear down;   /* (D, F) */
} cu_layer;

/* Per-item facts of one step, uploaded with the plan (five ints, so the
 * plan stays one int array). */
typedef struct cu_item {
    int slot;     /* sequence slot */
    int n_tokens; /* rows of the item */
    int start;    /* first row */
    int pos0;     /* position of the first row (the sequence length before the step) */
    int l3_n;     /* chunks in the slot's L3 bank */
} cu_item;

/* What the kernels of one step need to find rows, sequences, blocks and
 * state; passed to kernels by value.  Dimensions are fixed at init, the
 * plan pointers are set per step. */
typedef struct cu_fwd {
    int T, n_items;
    int D, F, q_dim, kv_dim, hd, H, H_kv, n_layers, levels;
    int B;  /* tokens per block */
    int MB; /* row stride of bt: max_blocks_per_seq */
    int R;  /* l3_max_chunks (0 when there is no L3 bank) */
    float eps, beta, omb;   /* RMSNorm epsilon; EMA beta and 1 - beta */
    float att_scale;        /* 1/sqrt(head_dim) */
    float rope_scale;       /* multiplies cos and sin */
    float l3_scale;         /* 1/sqrt(D) */
    const float *rope_inv_freq; /* (hd/2) */
    /* The plan (device copies). */
    const int *tok;      /* (T) */
    const int *tok_pos;  /* (T) */
    const int *tok_item; /* (T) */
    const cu_item *items;/* (n_items) */
    const int *bt;       /* (n_items, MB) block tables of the items; first n_blocks valid */
    const int *tok_chunk;/* (T) the L3 memory chunk row t completes, or -1; NULL when the
                            step captures no chunks (eng_plan.tok_chunk) */
    int any_l3;          /* some item of the step has an L3 bank */
    /* Pool and per-slot state. */
    bf16 *kv_pool;       /* (n_blocks, n_layers, 2, B, kv_dim) */
    float *ema_ckpt;     /* (n_blocks, n_layers, D) */
    float *ema;          /* (max_seqs, n_layers, D) running EMA state */
    const float *l3_mu;    /* (max_seqs, n_layers, R, D) */
    const float *l3_kappa; /* (max_seqs, n_layers, R, D) */

    /* Attention work of the step (built by the host with the plan; unused
     * by the simple kernel).  A unit is CU_ATT_UNIT_INTS ints
     *   {item, t0, nr, pos0, kb, ke, part, ns}:
     * rows t0 .. t0+nr-1 of `item` (positions pos0 ..), keys kb .. ke-1;
     * part < 0: the unit covers every key of its rows and writes att;
     * else it is one of the ns splits of its rows' keys: part = the group's
     * first partial row + the split's index, and row t0+i writes partial
     * row part + i*ns.  A combine entry is CU_ATT_COMB_INTS ints
     * {row, prow, ns, 0}: partial rows prow .. prow+ns-1 make att row `row`. */
    const int *att_units; /* (att_n_dec + att_n_pf, CU_ATT_UNIT_INTS): decode units first */
    int att_n_dec, att_n_pf;
    const int *att_comb;  /* (att_n_comb, CU_ATT_COMB_INTS) */
    int att_n_comb;
    const int *att_count; /* NULL, or (3) device: the step's decode units, prefill units and
                             combine entries, when the launches above are sized for a bound
                             instead (a replayed decode graph; extra blocks return at once) */
    int att_simple;       /* 1: the simple kernel (MKAD_CUDA_ATTN=simple, or a head size
                             the tensor-core kernels do not take) */
    float *att_part_o;    /* (CU_ATT_PART_ROWS, H, hd) partial outputs, unnormalised */
    float *att_part_ml;   /* (CU_ATT_PART_ROWS, H, 2) their running max (log2 units) and sum */
} cu_fwd;

/* The backend's private state (e->be). */
typedef struct cuda_state {
    cudaStream_t stream; /* the one stream every call runs on */
    cublasHandle_t blas; /* bound to stream */
    char dev_name[256];

    /* Weights: one device allocation, every tensor a view into it. */
    void *w_arena;
    size_t w_bytes;
    cu_layer *layers;     /* (n_layers) host array of device views */
    bf16 *embed;          /* (V, D) */
    cu_linear lm_head;    /* (V, D); w == embed when tied */
    float *final_norm;    /* (D) */
    float *rope_inv_freq; /* (hd/2) */

    /* Sequence state and step scratch: one device allocation. */
    void *work_arena;
    size_t work_bytes;
    float *ema;      /* (max_seqs, n_layers, D) */
    float *l3_mu;    /* (max_seqs, n_layers, R, D) or NULL */
    float *l3_kappa; /* (max_seqs, n_layers, R, D) or NULL */
    float *h;        /* (T, D) residual stream */
    float *x;        /* (T, D) attention input RMSNorm(h) */
    bf16 *xb;        /* (T, D) bf16 GEMM input: x, the fused f, or the MLP's norm */
    float *q;        /* (T, q_dim) */
    bf16 *qatt;      /* (T, q_dim) router input (q), then attention output */
    float *lam;      /* (T, CU_MAX_LEVELS) router weights */
    float *mem;      /* (T, D) L3 read, or NULL */
    float *wide;     /* (T, max(D/2, 2*kv_dim, 2*F)) router hidden, then k|v, then gate|up */
    bf16 *act;       /* (T, F) SwiGLU output */
    bf16 *selb;      /* (max_seqs, D) final norm of the selected rows */
    float *logits;   /* (max_seqs, V) */
    int *argmax;     /* (max_seqs) argmax of the selected rows' logits */
    int2 *argmax_part; /* (max_seqs, CU_ARGMAX_PARTS) its scratch */
    float *chunk_acc;/* (max_seqs, n_layers + 1, D) running L3 chunk sums per slot: x of
                        every layer, then the embeddings; NULL without l3_capture */
    float *chunk_out;/* (max_step_chunks, n_layers + 1, D) the step's chunk means, or NULL */
    void *blas_ws;   /* cuBLAS workspace */
    size_t blas_ws_bytes;
    int *plan_dev;   /* (plan_ints) */
    float *att_part_o;  /* (CU_ATT_PART_ROWS, H, hd) or NULL (simple attention) */
    float *att_part_ml; /* (CU_ATT_PART_ROWS, H, 2) or NULL */

    /* Pinned host buffers. */
    int *plan_host;      /* (plan_ints): tok, pos, item, items, bt of one step */
    size_t plan_ints;
    float *logits_host;  /* (max_seqs, V) */
    int *argmax_host;    /* (max_seqs) */
    float *l3_host;      /* (2, n_layers, R, D): mu then kappa of one slot, or NULL */
    float *chunk_host;   /* (max_step_chunks, n_layers + 1, D), or NULL */

    /* The K/V pool (pool_alloc). */
    void *pool_arena;
    bf16 *kv_pool;   /* (n_blocks, n_layers, 2, B, kv_dim) */
    float *ema_ckpt; /* (n_blocks, n_layers, D) */
    int n_blocks;
    size_t blk_bytes; /* n_layers * 2 * B * kv_dim * sizeof(bf16) */

    /* Attention planning (fixed at init). */
    int n_sm;           /* multiprocessors */
    int att_simple;     /* the simple attention kernel only */
    int att_target;     /* thread blocks of one attention launch that fill the device once */
    int att_force_tiles;/* MKAD_CUDA_ATTN_SPLIT: key tiles per split (0 = automatic) */
    size_t att_max_units; /* capacity of the unit list in the plan */

    /* Projections of at most gemv_max_m rows (decode steps) take the GEMV
     * kernel (MKAD_CUDA_GEMV=cublas: never). */
    int gemv_max_m;
    /* GEMV steps write K/V from the K/V GEMV's epilogue
     * (MKAD_CUDA_FUSE_ROPE=0: the RoPE kernel). */
    int fuse_rope;
    /* Decode steps of up to CU_GRAPH_ROWS sequences replay a CUDA graph
     * captured at the first step of their shape: [rows][some L3 bank][argmax]
     * [memory chunks captured] (MKAD_CUDA_GRAPH=0, a forced split or the
     * simple attention: never). */
    int graphs_on;
    cudaGraphExec_t graph[CU_GRAPH_ROWS + 1][2][2][2];
    struct cu_prof *prof; /* MKAD_CUDA_PROFILE=1: per-stage times of decode steps, or NULL */

    cu_fwd fwd; /* dimensions and state pointers; the plan is filled per step */
} cuda_state;

/* ---- kernel launchers (kernels.cu) ----------------------------------------
 * Each queues its kernel on stream s and returns cudaGetLastError(). */

/* h (T, D) = embedding rows of f->tok. */
cudaError_t eng__cu_embed(const cu_fwd *f, const bf16 *emb, float *h, cudaStream_t s);
/* For each of M rows r (input row rows[r], or r when rows is NULL):
 * y = w * (x / sqrt(mean(x^2) + eps)); out (M, D) f32 when non-NULL, outb
 * (M, D) bf16 always. */
cudaError_t eng__cu_rmsnorm(const float *in, const int *rows, int M, int D, const float *w,
                            float eps, float *out, bf16 *outb, cudaStream_t s);
/* out[r] = the argmax of row r of x (M, n): eng__argmax's rule; part
 * (M, CU_ARGMAX_PARTS) scratch. */
cudaError_t eng__cu_argmax(const float *x, int M, int n, int2 *part, int *out, cudaStream_t s);
/* y (M, N) += b (when non-NULL); yb (M, N) = bf16(y). */
cudaError_t eng__cu_bias_bf16(float *y, const float *b, int M, int N, bf16 *yb, cudaStream_t s);
/* y (M, N) += b. */
cudaError_t eng__cu_add_bias(float *y, const float *b, int M, int N, cudaStream_t s);
/* lam (T, CU_MAX_LEVELS) = softmax(W2 silu(rh + b1) + b2); rh (T, Dh). */
cudaError_t eng__cu_router(const cu_fwd *f, const float *rh, int Dh, const float *b1,
                           const bf16 *w2, const float *b2, float *lam, cudaStream_t s);
/* mem (T, D): the L3 read of every row whose sequence has a bank (rows of
 * sequences without one are left untouched and never read). */
cudaError_t eng__cu_l3_read(const cu_fwd *f, int layer, const float *x, float *mem,
                            cudaStream_t s);
/* The EMA recurrence and route fusion: fb (T, D) bf16, the running state
 * and the checkpoints at block ends.  max_n: the largest item's rows. */
cudaError_t eng__cu_ema_fuse(const cu_fwd *f, int layer, int max_n, const float *x,
                             const float *lam, const float *mem, bf16 *fb, cudaStream_t s);
/* Adds q/k/v biases (bq, bkv may be NULL), rotates q in place and k, and
 * writes k, v (bf16) into the pool; kv (T, 2*kv_dim). */
cudaError_t eng__cu_rope_store(const cu_fwd *f, int layer, float *q, const float *bq,
                               const float *kv, const float *bkv, cudaStream_t s);
/* att (T, q_dim) bf16 = causal GQA attention of q over each row's sequence:
 * the simple kernel when f->att_simple, else the tensor-core kernels over
 * f's attention units and the combine of split rows. */
cudaError_t eng__cu_attention(const cu_fwd *f, int layer, const float *q, bf16 *att,
                              cudaStream_t s);
/* 1 when the tensor-core attention kernels take head size hd. */
int eng__cu_attention_fast_hd(int hd);
/* Once at init, for head size hd (a fast one): raises the kernels' dynamic
 * shared-memory limit and gives the decode kernel's resident blocks per
 * multiprocessor (*per_sm). */
cudaError_t eng__cu_attention_setup(int hd, int *per_sm);
/* act (M, F) = silu(gate + b_gate) * (up + b_up) from gu (M, 2F); b (2F) or NULL. */
cudaError_t eng__cu_swiglu(const float *gu, const float *b, int M, int F, bf16 *act,
                           cudaStream_t s);

/* What a GEMV does with its sums besides writing y (eng__cu_gemv). */
typedef struct cu_gemv_epi {
    /* SwiGLU: W holds the gate rows then the up rows (N even); act (M, N/2)
     * = eng__cu_swiglu's result, y untouched. */
    bf16 *act;
    /* K/V projection of a step of M rows (W: the k rows then the v rows of
     * layer `layer`): what eng__cu_rope_store does — biases, k rotated,
     * k and v into the pool, q (M, q_dim) rotated in place with bias bq —
     * and y untouched. */
    const cu_fwd *rope;
    int layer;
    float *q;
    const float *bq;
} cu_gemv_epi;

/* Decode projections (gemv.cu): y (M, N) = x (M, K) W^T (+ beta * y)
 * (+ bias, when non-NULL) for W (N, K) bf16, x (M, K) bf16, y f32, and
 * yb (M, N) = bf16(y) when yb is non-NULL; or, with epi, its work instead.
 * n_sm: the device's multiprocessors (the split of long rows).
 * eng__cu_gemv_fits says whether the kernel takes the call (M <=
 * CU_GEMV_MAX_M, K a multiple of 8, 16-byte aligned W and x); eng__cu_gemv
 * returns cudaErrorInvalidValue when not. */
int eng__cu_gemv_fits(const bf16 *W, int K, const bf16 *x, int M);
cudaError_t eng__cu_gemv(const bf16 *W, int N, int K, const bf16 *x, int M, float *y, float beta,
                         const float *bias, bf16 *yb, const cu_gemv_epi *epi, int n_sm,
                         cudaStream_t s);
/* Rows are split across warps while the grid holds fewer warps than this
 * per multiprocessor (default 16; MKAD_CUDA_GEMV_SPLIT, 0: never). */
extern int eng__cu_gemv_split;

/* L3 memory chunks (chunks.cu): adds src (T, D) — the embeddings (place
 * n_layers) or layer `place`'s x — to each item's slot sums in acc in
 * position order, restarting at multiples of C, and writes the means of
 * the chunks f->tok_chunk emits into out.  max_n: the largest item's rows. */
cudaError_t eng__cu_chunk_sums(const cu_fwd *f, int place, int C, int max_n, const float *src,
                               float *acc, float *out, cudaStream_t s);

#endif /* MKAD_ENGINE_CUDA_PRIV_H */
