/*
 * genmodel.c — mkad-genmodel: writes a deterministic random model in the
 * Hugging Face format (config.json + safetensors, single file or sharded) of
 * any Qwen2/Llama shape, optionally with FastMKA router weights
 * (shared/FASTMKA.md).  Used by the parity tests and for benchmarks.
 *
 * Values.  Element i of tensor `name` is a pure function of (seed, name, i):
 *
 *     key  = mix64(seed * 0x9E3779B97F4A7C15 ^ fnv1a64(name))
 *     r    = mix64(key + (i + 1) * 0x9E3779B97F4A7C15)      (a splitmix64 stream)
 *     n    = r >> 40                                          (24 bits)
 *     u    = (float)(2n + 1 - 2^24) * 2^-24                   (exact, in (-1, 1))
 *     v    = offset + scale * u                               (float32 ops)
 *
 * mix64 is splitmix64's finalizer.  The stored value is v in f32, or v rounded
 * to nearest-even in bf16/f16.  So the bytes are identical on every machine
 * and do not depend on the shard layout.  Scales (see tensor_init):
 *     embed_tokens      u                       (offset 0)
 *     linear weights    u * sqrt(3 / fan_in)    (variance 1/fan_in)
 *     router.2.weight   u * 3 * sqrt(3 / fan_in) (so lambda varies between tokens)
 *     q/k/v biases      u * 0.2;  o_proj bias u * 0.1;  router biases u * 0.5
 *     norm weights      1 + 0.2 * u
 *
 * Output is streamed in chunks: memory use is constant whatever the shape.
 */
#include "config.h"

#include <errno.h>
#include <inttypes.h>
#include <dirent.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#include <jansson.h>

#define PROG "mkad-genmodel"
#define GEN_VERSION 1

/* ---- options ------------------------------------------------------------- */

enum { ARCH_QWEN2, ARCH_LLAMA };
enum { DT_F32, DT_F16, DT_BF16 };
enum { ROPE_NONE, ROPE_LINEAR, ROPE_LLAMA3, ROPE_YARN };

typedef struct opts {
    const char *out;
    int arch;
    long hidden, layers, heads, kv_heads, head_dim, ffn, vocab, max_pos;
    int head_dim_explicit;
    int dtype;
    int levels;
    double ema_beta;
    long l3_chunk; /* mka.l3_chunk_tokens */
    uint64_t seed;
    int tied;
    long shards;
    double rope_theta;
    int rope_kind;
    double rope_factor;
    int attn_bias;
    int original_attn;
    double rms_eps;
    int verbose;
} opts;

static void usage(FILE *f)
{
    fprintf(f,
        "Usage: " PROG " --out DIR [options]\n"
        "Writes a deterministic random Qwen2/Llama model (optionally with FastMKA\n"
        "router weights) in the Hugging Face format: config.json + safetensors.\n"
        "\n"
        "  --out DIR              output directory (created)\n"
        "  --preset NAME          tiny | bundled | qwen2.5-0.5b | qwen2.5-7b (default tiny);\n"
        "                         the other flags override the preset's values\n"
        "  --arch A               qwen2 | llama\n"
        "  --hidden D             hidden size\n"
        "  --layers N             decoder layers\n"
        "  --heads H              query heads\n"
        "  --kv-heads K           key/value heads (divides H)\n"
        "  --head-dim d           head size (default D/H; written to config when given)\n"
        "  --ffn F                SwiGLU intermediate size\n"
        "  --vocab V              vocabulary size (> 2)\n"
        "  --max-pos P            max_position_embeddings (default 4096)\n"
        "  --dtype T              f32 | f16 | bf16 (default bf16)\n"
        "  --levels L             0 (no router, plain attention) | 2 | 3 (default 3)\n"
        "  --ema-beta B           mka.ema_beta, in [0, 1) (default 0.9)\n"
        "  --l3-chunk-tokens C    mka.l3_chunk_tokens, tokens per L3 memory chunk (default 64)\n"
        "  --seed S               value seed, unsigned 64-bit (default 1)\n"
        "  --tied 0|1             tie lm_head to the embeddings\n"
        "  --shards N             1 = model.safetensors; N > 1 = model-0000i-of-0000N\n"
        "                         .safetensors + model.safetensors.index.json\n"
        "  --rope-theta T         RoPE base (default 10000)\n"
        "  --rope-scaling S       none | linear:F | llama3:F | yarn:F (default none)\n"
        "  --attn-bias 0|1        q/k/v/o biases (llama only; qwen2 always has q/k/v bias)\n"
        "  --original-attn        name attention projections self_attn.original_attn.*\n"
        "  --rms-eps E            rms_norm_eps (default 1e-6)\n"
        "  --verbose              progress per tensor on stderr\n"
        "  --version              the version, then exit\n"
        "  --help                 this text\n"
        "Every --flag VALUE may also be written --flag=VALUE.\n");
}

/* Prints "mkad-genmodel: message" and exits with `code`; a usage error (2)
 * also points at --help. */
static void die(int code, const char *fmt, ...) __attribute__((format(printf, 2, 3), noreturn));
static void die(int code, const char *fmt, ...)
{
    va_list ap;
    fprintf(stderr, PROG ": ");
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fprintf(stderr, code == 2 ? "\n(" PROG " --help lists the options)\n" : "\n");
    exit(code);
}
#define usage_error(...) die(2, __VA_ARGS__)
#define fatal(...) die(1, __VA_ARGS__)

static long parse_long(const char *flag, const char *s, long lo, long hi)
{
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || end == s || *end != '\0' || v < lo || v > hi)
        usage_error("%s: expected an integer in [%ld, %ld], got '%s'", flag, lo, hi, s);
    return v;
}

static double parse_double(const char *flag, const char *s, double lo, double hi, int hi_open)
{
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || *end != '\0' || !isfinite(v) || v < lo || v > hi || (hi_open && v >= hi))
        usage_error("%s: expected a number in [%g, %g%s, got '%s'", flag, lo, hi, hi_open ? ")" : "]", s);
    return v;
}

static int parse_bool(const char *flag, const char *s)
{
    if (!strcmp(s, "0")) return 0;
    if (!strcmp(s, "1")) return 1;
    usage_error("%s: expected 0 or 1, got '%s'", flag, s);
}

static void apply_preset(opts *o, const char *name)
{
    /* Common defaults first: a preset names a whole shape. */
    o->arch = ARCH_QWEN2;
    o->max_pos = 4096;
    o->rope_theta = 10000.0;
    o->tied = 0;
    if (!strcmp(name, "tiny")) {
        o->hidden = 64; o->layers = 2; o->heads = 4; o->kv_heads = 2; o->ffn = 128; o->vocab = 256;
    } else if (!strcmp(name, "bundled")) {
        o->hidden = 256; o->layers = 4; o->heads = 8; o->kv_heads = 2; o->ffn = 704; o->vocab = 4096;
        o->dtype = DT_BF16;
    } else if (!strcmp(name, "qwen2.5-0.5b")) {
        o->hidden = 896; o->layers = 24; o->heads = 14; o->kv_heads = 2; o->ffn = 4864; o->vocab = 151936;
        o->tied = 1; o->rope_theta = 1e6; o->max_pos = 32768;
    } else if (!strcmp(name, "qwen2.5-7b")) {
        o->hidden = 3584; o->layers = 28; o->heads = 28; o->kv_heads = 4; o->ffn = 18944; o->vocab = 152064;
        o->tied = 0; o->rope_theta = 1e6; o->max_pos = 32768;
    } else {
        usage_error("--preset: expected tiny, bundled, qwen2.5-0.5b or qwen2.5-7b, got '%s'", name);
    }
}

static void parse_args(opts *o, int argc, char **argv)
{
    memset(o, 0, sizeof *o);
    o->dtype = DT_BF16;
    o->levels = 3;
    o->ema_beta = 0.9;
    o->l3_chunk = 64;
    o->seed = 1;
    o->shards = 1;
    o->rope_kind = ROPE_NONE;
    o->rms_eps = 1e-6;

    /* Pass 1: --help and --preset (so that explicit flags override it whatever their order). */
    const char *preset = "tiny";
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            usage(stdout);
            exit(0);
        }
        if (!strcmp(argv[i], "--version")) {
            printf(PROG " %s\n", PACKAGE_VERSION);
            exit(0);
        }
        if (!strcmp(argv[i], "--preset")) {
            if (i + 1 >= argc) usage_error("--preset: missing value");
            preset = argv[++i];
        } else if (!strncmp(argv[i], "--preset=", 9)) {
            preset = argv[i] + 9;
        }
    }
    apply_preset(o, preset);

    /* Pass 2: everything else, in order. */
    for (int i = 1; i < argc; i++) {
        char flagbuf[64];
        const char *flag = argv[i];
        const char *val = NULL;
        const char *eq = strchr(flag, '=');
        if (!strncmp(flag, "--", 2) && eq) {
            size_t n = (size_t)(eq - flag);
            if (n >= sizeof flagbuf) usage_error("unknown option '%s'", argv[i]);
            memcpy(flagbuf, flag, n);
            flagbuf[n] = '\0';
            flag = flagbuf;
            val = eq + 1;
        }
        /* flags without a value */
        if (!strcmp(flag, "--verbose") || !strcmp(flag, "--original-attn")) {
            if (val) usage_error("%s takes no value", flag);
            if (!strcmp(flag, "--verbose")) o->verbose = 1;
            else o->original_attn = 1;
            continue;
        }
        if (strncmp(flag, "--", 2) != 0)
            usage_error("unexpected argument '%s'", argv[i]);
        if (!val) {
            if (i + 1 >= argc) usage_error("%s: missing value", flag);
            val = argv[++i];
        }
        if (!strcmp(flag, "--preset")) {
            /* handled in pass 1 */
        } else if (!strcmp(flag, "--out")) {
            if (!*val) usage_error("--out: empty directory name");
            o->out = val;
        } else if (!strcmp(flag, "--arch")) {
            if (!strcmp(val, "qwen2")) o->arch = ARCH_QWEN2;
            else if (!strcmp(val, "llama")) o->arch = ARCH_LLAMA;
            else usage_error("--arch: expected qwen2 or llama, got '%s'", val);
        } else if (!strcmp(flag, "--hidden")) {
            o->hidden = parse_long(flag, val, 2, 1L << 20);
        } else if (!strcmp(flag, "--layers")) {
            o->layers = parse_long(flag, val, 1, 4096);
        } else if (!strcmp(flag, "--heads")) {
            o->heads = parse_long(flag, val, 1, 4096);
        } else if (!strcmp(flag, "--kv-heads")) {
            o->kv_heads = parse_long(flag, val, 1, 4096);
        } else if (!strcmp(flag, "--head-dim")) {
            o->head_dim = parse_long(flag, val, 2, 1L << 16);
            o->head_dim_explicit = 1;
        } else if (!strcmp(flag, "--ffn")) {
            o->ffn = parse_long(flag, val, 1, 1L << 22);
        } else if (!strcmp(flag, "--vocab")) {
            o->vocab = parse_long(flag, val, 3, 1L << 24);
        } else if (!strcmp(flag, "--max-pos")) {
            o->max_pos = parse_long(flag, val, 1, 1L << 30);
        } else if (!strcmp(flag, "--dtype")) {
            if (!strcmp(val, "f32")) o->dtype = DT_F32;
            else if (!strcmp(val, "f16")) o->dtype = DT_F16;
            else if (!strcmp(val, "bf16")) o->dtype = DT_BF16;
            else usage_error("--dtype: expected f32, f16 or bf16, got '%s'", val);
        } else if (!strcmp(flag, "--levels")) {
            if (!strcmp(val, "0")) o->levels = 0;
            else if (!strcmp(val, "2")) o->levels = 2;
            else if (!strcmp(val, "3")) o->levels = 3;
            else usage_error("--levels: expected 0, 2 or 3, got '%s'", val);
        } else if (!strcmp(flag, "--ema-beta")) {
            o->ema_beta = parse_double(flag, val, 0.0, 1.0, 1);
        } else if (!strcmp(flag, "--l3-chunk-tokens")) {
            o->l3_chunk = parse_long(flag, val, 1, 1L << 20);
        } else if (!strcmp(flag, "--seed")) {
            char *end;
            errno = 0;
            unsigned long long s = strtoull(val, &end, 0);
            if (errno || end == val || *end != '\0' || val[0] == '-')
                usage_error("--seed: expected an unsigned 64-bit integer, got '%s'", val);
            o->seed = (uint64_t)s;
        } else if (!strcmp(flag, "--tied")) {
            o->tied = parse_bool(flag, val);
        } else if (!strcmp(flag, "--shards")) {
            o->shards = parse_long(flag, val, 1, 99999);
        } else if (!strcmp(flag, "--rope-theta")) {
            o->rope_theta = parse_double(flag, val, 1.0, 1e12, 0);
        } else if (!strcmp(flag, "--rope-scaling")) {
            if (!strcmp(val, "none")) {
                o->rope_kind = ROPE_NONE;
            } else {
                const char *colon = strchr(val, ':');
                size_t n = colon ? (size_t)(colon - val) : strlen(val);
                if (!colon)
                    usage_error("--rope-scaling: expected none, linear:F, llama3:F or yarn:F, got '%s'", val);
                if (n == 6 && !strncmp(val, "linear", 6)) o->rope_kind = ROPE_LINEAR;
                else if (n == 6 && !strncmp(val, "llama3", 6)) o->rope_kind = ROPE_LLAMA3;
                else if (n == 4 && !strncmp(val, "yarn", 4)) o->rope_kind = ROPE_YARN;
                else usage_error("--rope-scaling: expected none, linear:F, llama3:F or yarn:F, got '%s'", val);
                o->rope_factor = parse_double("--rope-scaling (factor)", colon + 1, 1.0, 1e6, 0);
            }
        } else if (!strcmp(flag, "--attn-bias")) {
            o->attn_bias = parse_bool(flag, val);
        } else if (!strcmp(flag, "--rms-eps")) {
            o->rms_eps = parse_double(flag, val, 1e-30, 1.0, 0);
        } else {
            usage_error("unknown option '%s'", flag);
        }
    }

    if (!o->out) usage_error("--out: required");
    if (!o->head_dim_explicit) {
        if (o->hidden % o->heads)
            usage_error("--heads: %ld does not divide --hidden %ld (give --head-dim)", o->heads, o->hidden);
        o->head_dim = o->hidden / o->heads;
    }
    if (o->head_dim % 2)
        usage_error("--head-dim: head size %ld must be even (RoPE)", o->head_dim);
    if (o->hidden % 2)
        usage_error("--hidden: %ld must be even (router width D/2)", o->hidden);
    if (o->kv_heads > o->heads || o->heads % o->kv_heads)
        usage_error("--kv-heads: %ld must divide --heads %ld", o->kv_heads, o->heads);
    if (o->arch == ARCH_QWEN2 && o->attn_bias)
        usage_error("--attn-bias: llama only (qwen2 always has q/k/v bias and no o bias)");
    if (o->rope_kind == ROPE_LLAMA3 || o->rope_kind == ROPE_YARN) {
        long orig = lround((double)o->max_pos / o->rope_factor);
        if (orig < 1)
            usage_error("--rope-scaling: original context --max-pos/F = %ld is < 1", orig);
    }
}

/* ---- deterministic values -------------------------------------------------- */

static uint64_t mix64(uint64_t z)
{
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

static uint64_t fnv1a64(const char *s)
{
    uint64_t h = 0xcbf29ce484222325ULL;
    for (; *s; s++) {
        h ^= (unsigned char)*s;
        h *= 0x100000001b3ULL;
    }
    return h;
}

#define GOLDEN 0x9E3779B97F4A7C15ULL

static inline float unif(uint64_t key, uint64_t i)
{
    uint64_t r = mix64(key + (i + 1) * GOLDEN);
    int32_t n = (int32_t)(r >> 40);                   /* [0, 2^24) */
    return (float)(2 * n + 1 - 16777216) * (1.0f / 16777216.0f);
}

static inline uint16_t f32_to_bf16(float f)
{
    uint32_t x;
    memcpy(&x, &f, 4);
    if ((x & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((x >> 16) | 0x40); /* NaN stays NaN */
    x += 0x7fffu + ((x >> 16) & 1u);
    return (uint16_t)(x >> 16);
}

/* Round-to-nearest-even f32 -> f16 (F. Giesen's float_to_half_fast3_rtne). */
static inline uint16_t f32_to_f16(float fv)
{
    const uint32_t f32infty = 255u << 23, f16max = (127u + 16u) << 23;
    const uint32_t denorm_magic_u = ((127u - 15u) + (23u - 10u) + 1u) << 23;
    uint32_t f, o;
    memcpy(&f, &fv, 4);
    uint32_t sign = f & 0x80000000u;
    f ^= sign;
    if (f >= f16max) {
        o = (f > f32infty) ? 0x7e00u : 0x7c00u;
    } else if (f < (113u << 23)) {
        float ff, dm;
        memcpy(&ff, &f, 4);
        memcpy(&dm, &denorm_magic_u, 4);
        ff += dm;
        memcpy(&o, &ff, 4);
        o -= denorm_magic_u;
    } else {
        uint32_t mant_odd = (f >> 13) & 1u;
        f += ((uint32_t)(15 - 127) << 23) + 0xfffu;
        f += mant_odd;
        o = f >> 13;
    }
    return (uint16_t)(o | (sign >> 16));
}

/* ---- tensor list ------------------------------------------------------------ */

typedef struct tensor {
    char name[128];
    int ndim;
    int64_t shape[2];
    float scale, offset;
    int shard;
    uint64_t off; /* data offset within the shard */
} tensor;

typedef struct tlist {
    tensor *t;
    int n, cap;
} tlist;

static void add_tensor(tlist *l, const char *name, int ndim, int64_t d0, int64_t d1, float scale, float offset)
{
    if (l->n == l->cap) {
        l->cap = l->cap ? 2 * l->cap : 64;
        l->t = realloc(l->t, (size_t)l->cap * sizeof *l->t);
        if (!l->t) fatal("out of memory");
    }
    tensor *t = &l->t[l->n++];
    memset(t, 0, sizeof *t);
    if (snprintf(t->name, sizeof t->name, "%s", name) >= (int)sizeof t->name) fatal("tensor name too long");
    t->ndim = ndim;
    t->shape[0] = d0;
    t->shape[1] = d1;
    t->scale = scale;
    t->offset = offset;
}

static int64_t numel(const tensor *t)
{
    return t->ndim == 1 ? t->shape[0] : t->shape[0] * t->shape[1];
}

static float lin_scale(int64_t fan_in)
{
    return (float)sqrt(3.0 / (double)fan_in);
}

static void build_tensors(const opts *o, tlist *l)
{
    const int64_t D = o->hidden, H = o->heads, K = o->kv_heads, d = o->head_dim, F = o->ffn, V = o->vocab;
    const int64_t Hd = H * d, Kd = K * d;
    const int qkv_bias = (o->arch == ARCH_QWEN2) || o->attn_bias;
    const int o_bias = (o->arch == ARCH_LLAMA) && o->attn_bias;
    const char *attn = o->original_attn ? "self_attn.original_attn" : "self_attn";
    char nm[128];

    add_tensor(l, "model.embed_tokens.weight", 2, V, D, 1.0f, 0.0f);
    for (long i = 0; i < o->layers; i++) {
#define NAME(...) (snprintf(nm, sizeof nm, __VA_ARGS__), nm)
        add_tensor(l, NAME("model.layers.%ld.input_layernorm.weight", i), 1, D, 0, 0.2f, 1.0f);
        add_tensor(l, NAME("model.layers.%ld.%s.q_proj.weight", i, attn), 2, Hd, D, lin_scale(D), 0.0f);
        if (qkv_bias) add_tensor(l, NAME("model.layers.%ld.%s.q_proj.bias", i, attn), 1, Hd, 0, 0.2f, 0.0f);
        add_tensor(l, NAME("model.layers.%ld.%s.k_proj.weight", i, attn), 2, Kd, D, lin_scale(D), 0.0f);
        if (qkv_bias) add_tensor(l, NAME("model.layers.%ld.%s.k_proj.bias", i, attn), 1, Kd, 0, 0.2f, 0.0f);
        add_tensor(l, NAME("model.layers.%ld.%s.v_proj.weight", i, attn), 2, Kd, D, lin_scale(D), 0.0f);
        if (qkv_bias) add_tensor(l, NAME("model.layers.%ld.%s.v_proj.bias", i, attn), 1, Kd, 0, 0.2f, 0.0f);
        add_tensor(l, NAME("model.layers.%ld.%s.o_proj.weight", i, attn), 2, D, Hd, lin_scale(Hd), 0.0f);
        if (o_bias) add_tensor(l, NAME("model.layers.%ld.%s.o_proj.bias", i, attn), 1, D, 0, 0.1f, 0.0f);
        if (o->levels > 0) {
            add_tensor(l, NAME("model.layers.%ld.self_attn.router.0.weight", i), 2, D / 2, Hd, lin_scale(Hd), 0.0f);
            add_tensor(l, NAME("model.layers.%ld.self_attn.router.0.bias", i), 1, D / 2, 0, 0.5f, 0.0f);
            add_tensor(l, NAME("model.layers.%ld.self_attn.router.2.weight", i), 2, o->levels, D / 2,
                       3.0f * lin_scale(D / 2), 0.0f);
            add_tensor(l, NAME("model.layers.%ld.self_attn.router.2.bias", i), 1, o->levels, 0, 0.5f, 0.0f);
        }
        add_tensor(l, NAME("model.layers.%ld.post_attention_layernorm.weight", i), 1, D, 0, 0.2f, 1.0f);
        add_tensor(l, NAME("model.layers.%ld.mlp.gate_proj.weight", i), 2, F, D, lin_scale(D), 0.0f);
        add_tensor(l, NAME("model.layers.%ld.mlp.up_proj.weight", i), 2, F, D, lin_scale(D), 0.0f);
        add_tensor(l, NAME("model.layers.%ld.mlp.down_proj.weight", i), 2, D, F, lin_scale(F), 0.0f);
#undef NAME
    }
    add_tensor(l, "model.norm.weight", 1, D, 0, 0.2f, 1.0f);
    if (!o->tied) add_tensor(l, "lm_head.weight", 2, V, D, lin_scale(D), 0.0f);
}

/* Splits the tensors, in order, into n contiguous non-empty shards of about
 * equal byte size. */
static void assign_shards(tlist *l, int n, size_t esize)
{
    if (n > l->n) usage_error("--shards: %d shards for only %d tensors", n, l->n);
    uint64_t total = 0;
    for (int i = 0; i < l->n; i++) total += (uint64_t)numel(&l->t[i]) * esize;
    int shard = 0;
    uint64_t cum = 0; /* bytes before the current tensor */
    for (int i = 0; i < l->n; i++) {
        int remaining_tensors = l->n - i;
        int remaining_shards = n - shard;
        /* open the next shard when this one reached its share of the bytes, or
         * when every remaining shard needs one of the remaining tensors */
        if (i > 0 && l->t[i - 1].shard == shard && shard < n - 1 &&
            (cum >= total * (uint64_t)(shard + 1) / (uint64_t)n || remaining_tensors == remaining_shards))
            shard++;
        l->t[i].shard = shard;
        cum += (uint64_t)numel(&l->t[i]) * esize;
    }
    if (shard != n - 1) {
        /* Tiny tail: force the last tensors into the empty last shards. */
        int s = n - 1;
        for (int i = l->n - 1; i >= 0 && s > l->t[i].shard; i--, s--) l->t[i].shard = s;
    }
}

/* ---- writing ------------------------------------------------------------- */

static const char *dtype_st(int dt)
{
    return dt == DT_F32 ? "F32" : dt == DT_F16 ? "F16" : "BF16";
}

static size_t dtype_size(int dt)
{
    return dt == DT_F32 ? 4 : 2;
}

static int cmp_name(const void *a, const void *b)
{
    const tensor *const *x = a, *const *y = b;
    return strcmp((*x)->name, (*y)->name);
}

static void write_all(FILE *f, const void *p, size_t n, const char *path)
{
    if (n && fwrite(p, 1, n, f) != n) fatal("%s: write failed: %s", path, strerror(errno));
}

#define CHUNK (1 << 18)

static void write_tensor_data(FILE *f, const char *path, const tensor *t, const opts *o, void *buf)
{
    const uint64_t key = mix64(o->seed * GOLDEN ^ fnv1a64(t->name));
    const int64_t n = numel(t);
    const float sc = t->scale, off = t->offset;
    const size_t es = dtype_size(o->dtype);
    for (int64_t base = 0; base < n; base += CHUNK) {
        int64_t m = n - base < CHUNK ? n - base : CHUNK;
        for (int64_t j = 0; j < m; j++) {
            float v = sc * unif(key, (uint64_t)(base + j));
            if (off != 0.0f) v = off + v;
            if (o->dtype == DT_F32) {
                ((float *)buf)[j] = v;
            } else if (o->dtype == DT_BF16) {
                ((uint16_t *)buf)[j] = f32_to_bf16(v);
            } else {
                ((uint16_t *)buf)[j] = f32_to_f16(v);
            }
        }
        /* safetensors is little-endian */
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
        for (int64_t j = 0; j < m; j++) {
            unsigned char *p = (unsigned char *)buf + j * es;
            for (size_t a = 0, b = es - 1; a < b; a++, b--) {
                unsigned char c = p[a]; p[a] = p[b]; p[b] = c;
            }
        }
#endif
        write_all(f, buf, (size_t)m * es, path);
    }
}

static void shard_filename(char *out, size_t n, const opts *o, int shard)
{
    if (o->shards == 1) snprintf(out, n, "model.safetensors");
    else snprintf(out, n, "model-%05d-of-%05ld.safetensors", shard + 1, o->shards);
}

static void write_shard(const opts *o, tlist *l, int shard, void *buf)
{
    char fname[64], path[4096];
    shard_filename(fname, sizeof fname, o, shard);
    snprintf(path, sizeof path, "%s/%s", o->out, fname);

    tensor **sel = malloc((size_t)l->n * sizeof *sel);
    if (!sel) fatal("out of memory");
    int ns = 0;
    for (int i = 0; i < l->n; i++)
        if (l->t[i].shard == shard) sel[ns++] = &l->t[i];
    qsort(sel, (size_t)ns, sizeof *sel, cmp_name);

    const size_t es = dtype_size(o->dtype);
    json_t *hdr = json_object();
    json_object_set_new(hdr, "__metadata__", json_pack("{s:s}", "format", "pt"));
    uint64_t off = 0;
    for (int i = 0; i < ns; i++) {
        tensor *t = sel[i];
        t->off = off;
        uint64_t nb = (uint64_t)numel(t) * es;
        json_t *shape = t->ndim == 1 ? json_pack("[I]", (json_int_t)t->shape[0])
                                     : json_pack("[I,I]", (json_int_t)t->shape[0], (json_int_t)t->shape[1]);
        json_object_set_new(hdr, t->name,
                            json_pack("{s:s,s:o,s:[I,I]}", "dtype", dtype_st(o->dtype), "shape", shape,
                                      "data_offsets", (json_int_t)off, (json_int_t)(off + nb)));
        off += nb;
    }
    char *hs = json_dumps(hdr, JSON_COMPACT | JSON_SORT_KEYS);
    json_decref(hdr);
    if (!hs) fatal("out of memory");
    size_t hlen = strlen(hs);
    size_t padded = (hlen + 7) & ~(size_t)7;

    FILE *f = fopen(path, "wb");
    if (!f) fatal("%s: cannot create: %s", path, strerror(errno));
    unsigned char lenb[8];
    for (int i = 0; i < 8; i++) lenb[i] = (unsigned char)((uint64_t)padded >> (8 * i));
    write_all(f, lenb, 8, path);
    write_all(f, hs, hlen, path);
    for (size_t i = hlen; i < padded; i++) write_all(f, " ", 1, path);
    free(hs);
    for (int i = 0; i < ns; i++) {
        if (o->verbose) {
            if (sel[i]->ndim == 1)
                fprintf(stderr, PROG ": %s: %s [%" PRId64 "]\n", fname, sel[i]->name, sel[i]->shape[0]);
            else
                fprintf(stderr, PROG ": %s: %s [%" PRId64 ", %" PRId64 "]\n", fname, sel[i]->name,
                        sel[i]->shape[0], sel[i]->shape[1]);
        }
        write_tensor_data(f, path, sel[i], o, buf);
    }
    if (fflush(f) != 0 || ferror(f)) fatal("%s: write failed: %s", path, strerror(errno));
    if (fclose(f) != 0) fatal("%s: close failed: %s", path, strerror(errno));
    free(sel);
}

static void write_json_file(const char *dir, const char *name, json_t *j)
{
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    char *s = json_dumps(j, JSON_INDENT(2) | JSON_PRESERVE_ORDER | JSON_REAL_PRECISION(15));
    if (!s) fatal("out of memory");
    FILE *f = fopen(path, "wb");
    if (!f) fatal("%s: cannot create: %s", path, strerror(errno));
    write_all(f, s, strlen(s), path);
    write_all(f, "\n", 1, path);
    free(s);
    if (fclose(f) != 0) fatal("%s: close failed: %s", path, strerror(errno));
}

static void write_index(const opts *o, const tlist *l, size_t esize)
{
    json_t *wm = json_object();
    uint64_t total = 0;
    for (int i = 0; i < l->n; i++) {
        char fname[64];
        shard_filename(fname, sizeof fname, o, l->t[i].shard);
        json_object_set_new(wm, l->t[i].name, json_string(fname));
        total += (uint64_t)numel(&l->t[i]) * esize;
    }
    json_t *root = json_pack("{s:{s:I},s:o}", "metadata", "total_size", (json_int_t)total, "weight_map", wm);
    /* weight_map sorted by name, as transformers writes it */
    char path[4096];
    snprintf(path, sizeof path, "%s/model.safetensors.index.json", o->out);
    char *s = json_dumps(root, JSON_INDENT(2) | JSON_SORT_KEYS);
    json_decref(root);
    if (!s) fatal("out of memory");
    FILE *f = fopen(path, "wb");
    if (!f) fatal("%s: cannot create: %s", path, strerror(errno));
    write_all(f, s, strlen(s), path);
    write_all(f, "\n", 1, path);
    free(s);
    if (fclose(f) != 0) fatal("%s: close failed: %s", path, strerror(errno));
}

static json_t *build_config(const opts *o)
{
    const int qwen = o->arch == ARCH_QWEN2;
    json_t *c = json_object();
    json_object_set_new(c, "architectures", json_pack("[s]", qwen ? "Qwen2ForCausalLM" : "LlamaForCausalLM"));
    json_object_set_new(c, "model_type", json_string(qwen ? "qwen2" : "llama"));
    json_object_set_new(c, "hidden_size", json_integer(o->hidden));
    json_object_set_new(c, "intermediate_size", json_integer(o->ffn));
    json_object_set_new(c, "num_hidden_layers", json_integer(o->layers));
    json_object_set_new(c, "num_attention_heads", json_integer(o->heads));
    json_object_set_new(c, "num_key_value_heads", json_integer(o->kv_heads));
    if (o->head_dim_explicit) json_object_set_new(c, "head_dim", json_integer(o->head_dim));
    json_object_set_new(c, "max_position_embeddings", json_integer(o->max_pos));
    json_object_set_new(c, "rms_norm_eps", json_real(o->rms_eps));
    json_object_set_new(c, "rope_theta", json_real(o->rope_theta));
    if (o->rope_kind == ROPE_NONE) {
        json_object_set_new(c, "rope_scaling", json_null());
    } else {
        const char *t = o->rope_kind == ROPE_LINEAR ? "linear" : o->rope_kind == ROPE_LLAMA3 ? "llama3" : "yarn";
        json_t *rs = json_object();
        json_object_set_new(rs, "rope_type", json_string(t));
        json_object_set_new(rs, "type", json_string(t));
        json_object_set_new(rs, "factor", json_real(o->rope_factor));
        if (o->rope_kind == ROPE_LLAMA3) {
            json_object_set_new(rs, "low_freq_factor", json_real(1.0));
            json_object_set_new(rs, "high_freq_factor", json_real(4.0));
        }
        if (o->rope_kind == ROPE_LLAMA3 || o->rope_kind == ROPE_YARN)
            json_object_set_new(rs, "original_max_position_embeddings",
                                json_integer(lround((double)o->max_pos / o->rope_factor)));
        json_object_set_new(c, "rope_scaling", rs);
    }
    json_object_set_new(c, "tie_word_embeddings", json_boolean(o->tied));
    json_object_set_new(c, "vocab_size", json_integer(o->vocab));
    json_object_set_new(c, "hidden_act", json_string("silu"));
    json_object_set_new(c, "torch_dtype",
                        json_string(o->dtype == DT_F32 ? "float32" : o->dtype == DT_F16 ? "float16" : "bfloat16"));
    json_object_set_new(c, "bos_token_id", json_integer(1));
    json_object_set_new(c, "eos_token_id", json_integer(2));
    json_object_set_new(c, "attention_dropout", json_real(0.0));
    json_object_set_new(c, "initializer_range", json_real(0.02));
    json_object_set_new(c, "use_cache", json_true());
    if (qwen) {
        json_object_set_new(c, "use_sliding_window", json_false());
        json_object_set_new(c, "sliding_window", json_integer(o->max_pos));
        json_object_set_new(c, "max_window_layers", json_integer(o->layers));
    } else {
        json_object_set_new(c, "attention_bias", json_boolean(o->attn_bias));
        json_object_set_new(c, "mlp_bias", json_false());
        json_object_set_new(c, "pretraining_tp", json_integer(1));
    }
    if (o->levels > 0)
        json_object_set_new(c, "mka",
                            json_pack("{s:i,s:f,s:i,s:i}", "levels", o->levels, "ema_beta", o->ema_beta,
                                      "l3_chunk_tokens", (int)o->l3_chunk, "l3_top_r", 8));
    /* provenance; the seed as a string so that every 64-bit value survives */
    char seedbuf[32];
    snprintf(seedbuf, sizeof seedbuf, "%" PRIu64, o->seed);
    json_object_set_new(c, "mkad_genmodel", json_pack("{s:i,s:s}", "version", GEN_VERSION, "seed", seedbuf));
    return c;
}

static void mkdir_p(const char *dir)
{
    char buf[4096];
    if (snprintf(buf, sizeof buf, "%s", dir) >= (int)sizeof buf) fatal("--out: path too long");
    for (char *p = buf + 1; *p; p++) {
        if (*p != '/') continue;
        *p = '\0';
        if (mkdir(buf, 0777) != 0 && errno != EEXIST) fatal("%s: cannot create directory: %s", buf, strerror(errno));
        *p = '/';
    }
    if (mkdir(buf, 0777) != 0 && errno != EEXIST) fatal("%s: cannot create directory: %s", buf, strerror(errno));
    struct stat st;
    if (stat(buf, &st) != 0 || !S_ISDIR(st.st_mode)) fatal("%s: not a directory", buf);
}

/* Removes weight files of an earlier run in the same directory (another shard
 * count), so that a loader never sees a mix. */
static void remove_stale(const opts *o)
{
    DIR *d = opendir(o->out);
    if (!d) fatal("%s: cannot open directory: %s", o->out, strerror(errno));
    struct dirent *e;
    char path[4096];
    while ((e = readdir(d))) {
        const char *n = e->d_name;
        size_t len = strlen(n);
        int is_st = len > 12 && !strcmp(n + len - 12, ".safetensors") && !strncmp(n, "model", 5);
        int is_idx = !strcmp(n, "model.safetensors.index.json");
        if (!is_st && !is_idx) continue;
        snprintf(path, sizeof path, "%s/%s", o->out, n);
        if (unlink(path) != 0) fatal("%s: cannot remove stale file: %s", path, strerror(errno));
    }
    closedir(d);
}

int main(int argc, char **argv)
{
    opts o;
    parse_args(&o, argc, argv);

    tlist l = {0};
    build_tensors(&o, &l);
    const size_t es = dtype_size(o.dtype);
    assign_shards(&l, (int)o.shards, es);

    mkdir_p(o.out);
    remove_stale(&o);

    json_t *cfg = build_config(&o);
    write_json_file(o.out, "config.json", cfg);
    json_decref(cfg);

    void *buf = malloc((size_t)CHUNK * 4);
    if (!buf) fatal("out of memory");
    for (int s = 0; s < (int)o.shards; s++) write_shard(&o, &l, s, buf);
    free(buf);
    if (o.shards > 1) write_index(&o, &l, es);

    if (o.verbose) {
        uint64_t total = 0;
        for (int i = 0; i < l.n; i++) total += (uint64_t)numel(&l.t[i]);
        fprintf(stderr, PROG ": wrote %s: %d tensors, %" PRIu64 " parameters, %ld file(s)\n", o.out, l.n, total,
                o.shards);
    }
    free(l.t);
    return 0;
}
