/*
 * model.c — loads a Hugging Face model directory (config.json plus
 * safetensors) into a struct eng_model: validates the configuration, resolves
 * RoPE scaling the way transformers does, checks every tensor's shape against
 * the configuration, copies all weights into one arena (BF16 matrices stay
 * bf16, everything else becomes f32) and computes
 * the model fingerprint.  docs/model-format.md describes what is accepted.
 *
 * Every failure returns a status with one line in err that names the file and
 * the field, after releasing everything acquired so far.
 */
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <jansson.h>
#define XXH_INLINE_ALL
#include <xxhash.h>

#include "internal.h"
#include "safetensors.h"

#define CFG "config.json"
#define CFG_MAX_BYTES (16u * 1024u * 1024u)
/* Tensors start on 64-byte boundaries inside the arena. */
#define ARENA_ALIGN 64

enum { ROPE_DEFAULT, ROPE_LINEAR, ROPE_LLAMA3, ROPE_YARN };

/* Everything config.json says that the loader uses. */
typedef struct model_cfg {
    int qwen2;              /* 1: qwen2, 0: llama (mistral included) */
    int64_t hidden, layers, heads, kv_heads, head_dim, ffn, vocab, max_pos;
    double rms_eps;
    int tied;
    int qkv_bias, o_bias;   /* biases the architecture requires */
    int bos, eos;
    int mka_levels;         /* 0 when config.json does not say */
    double ema_beta;
    int64_t l3_chunk, l3_top_r;
    /* RoPE, after the transformers v4/v5 spellings are merged */
    int rope;
    double theta, factor, low_ff, high_ff, orig_max;
    int has_attn_factor, truncate;
    double attn_factor, beta_fast, beta_slow, mscale, mscale_all_dim;
} model_cfg;

/* ---- config.json ----------------------------------------------------------- */

/* A member that is absent or JSON null reads as absent (transformers treats
 * None as "use the default"). */
static json_t *cfg_get(json_t *o, const char *k)
{
    json_t *v = json_object_get(o, k);
    return json_is_null(v) ? NULL : v;
}

/* A positive integer field `pre``k` (pre is "" or "mka." ...).  Absent:
 * default, or an error when required. */
static int cfg_int(json_t *o, const char *pre, const char *k, int required, int64_t def, int64_t *out,
                   char *err, size_t errlen)
{
    json_t *v = cfg_get(o, k);
    if (!v) {
        if (required)
            return eng__errf(err, errlen, ENG_EFORMAT, CFG ": missing field '%s%s'", pre, k);
        *out = def;
        return ENG_OK;
    }
    /* Python ints have no bound; json_load.c reads ones beyond int64 as reals */
    if ((json_is_integer(v) && json_integer_value(v) > INT_MAX) ||
        (json_is_real(v) && json_real_value(v) > INT_MAX && json_real_value(v) == floor(json_real_value(v))))
        return eng__errf(err, errlen, ENG_EFORMAT, CFG ": field '%s%s' is out of range (%.17g; at most %d)",
                         pre, k, json_number_value(v), INT_MAX);
    if (!json_is_integer(v) || json_integer_value(v) <= 0)
        return eng__errf(err, errlen, ENG_EFORMAT, CFG ": field '%s%s' must be a positive integer",
                         pre, k);
    *out = (int64_t)json_integer_value(v);
    return ENG_OK;
}

/* A finite positive number; *present says whether it was there. */
static int cfg_pos_num(json_t *o, const char *pre, const char *k, double def, int *present,
                       double *out, char *err, size_t errlen)
{
    json_t *v = o ? cfg_get(o, k) : NULL;
    if (present) *present = v != NULL;
    if (!v) {
        *out = def;
        return ENG_OK;
    }
    double x = json_is_number(v) ? json_number_value(v) : NAN;
    if (!(x > 0) || !isfinite(x))
        return eng__errf(err, errlen, ENG_EFORMAT, CFG ": field '%s%s' must be a positive number",
                         pre, k);
    *out = x;
    return ENG_OK;
}

static int cfg_bool(json_t *o, const char *k, int def, int *out, char *err, size_t errlen)
{
    json_t *v = cfg_get(o, k);
    if (!v) {
        *out = def;
        return ENG_OK;
    }
    if (!json_is_boolean(v))
        return eng__errf(err, errlen, ENG_EFORMAT, CFG ": field '%s' must be true or false", k);
    *out = json_is_true(v);
    return ENG_OK;
}

/* bos/eos: an id, a list of ids (the first counts) or null (-1). */
static int cfg_token(json_t *o, const char *k, int *out, char *err, size_t errlen)
{
    json_t *v = cfg_get(o, k);
    *out = -1;
    if (v && json_is_array(v)) v = json_array_size(v) ? json_array_get(v, 0) : NULL;
    if (!v) return ENG_OK;
    if (!json_is_integer(v) || json_integer_value(v) < 0 || json_integer_value(v) > INT_MAX)
        return eng__errf(err, errlen, ENG_EFORMAT,
                         CFG ": field '%s' must be a token id (0..%d), a list of token ids or null", k,
                         INT_MAX);
    *out = (int)json_integer_value(v);
    return ENG_OK;
}

static int has_suffix(const char *s, const char *suf)
{
    size_t a = strlen(s), b = strlen(suf);
    return a >= b && strcmp(s + a - b, suf) == 0;
}

static int cfg_arch(json_t *root, model_cfg *c, char *err, size_t errlen)
{
    static const struct { const char *arch, *type; int qwen2, mistral; } known[] = {
        {"Qwen2ForCausalLM", "qwen2", 1, 0},
        {"LlamaForCausalLM", "llama", 0, 0},
        {"MistralForCausalLM", "mistral", 0, 1},
    };
    const int n_known = (int)(sizeof known / sizeof known[0]);
    json_t *archs = cfg_get(root, "architectures"), *mt = cfg_get(root, "model_type");
    const char *a0 = NULL, *type = NULL;
    if (archs) {
        if (!json_is_array(archs))
            return eng__errf(err, errlen, ENG_EFORMAT,
                             CFG ": field 'architectures' must be a list of strings");
        if (json_array_size(archs) > 0) {
            if (!json_is_string(json_array_get(archs, 0)))
                return eng__errf(err, errlen, ENG_EFORMAT,
                                 CFG ": field 'architectures[0]' must be a string");
            a0 = json_string_value(json_array_get(archs, 0));
        }
    }
    if (mt) {
        if (!json_is_string(mt))
            return eng__errf(err, errlen, ENG_EFORMAT, CFG ": field 'model_type' must be a string");
        type = json_string_value(mt);
    }
    int k = -1;
    for (int i = 0; a0 && i < n_known; i++)
        if (strcmp(a0, known[i].arch) == 0) k = i;
    /* A causal-LM class of another name (a patched copy, say) is accepted
     * through model_type; a head other than a causal LM is not. */
    if (k < 0 && type && (!a0 || has_suffix(a0, "ForCausalLM")))
        for (int i = 0; i < n_known; i++)
            if (strcmp(type, known[i].type) == 0) k = i;
    if (k < 0) {
        if (a0)
            return eng__errf(err, errlen, ENG_EUNSUPPORTED,
                             CFG ": architectures[0] '%s' is not supported (supported: "
                                 "Qwen2ForCausalLM, LlamaForCausalLM, MistralForCausalLM)",
                             a0);
        if (type)
            return eng__errf(err, errlen, ENG_EUNSUPPORTED,
                             CFG ": model_type '%s' is not supported (supported: qwen2, llama, "
                                 "mistral)",
                             type);
        return eng__errf(err, errlen, ENG_EFORMAT,
                         CFG ": missing field 'architectures' (or 'model_type')");
    }
    c->qwen2 = known[k].qwen2;
    if (known[k].mistral) {
        json_t *sw = cfg_get(root, "sliding_window");
        if (sw)
            return eng__errf(err, errlen, ENG_EUNSUPPORTED,
                             CFG ": field 'sliding_window' must be null: sliding-window attention "
                                 "is not supported");
    }
    return ENG_OK;
}

/* Merges the RoPE spellings of transformers v4 (top-level rope_theta,
 * rope_scaling with "type" or "rope_type") and v5 (rope_parameters holding
 * rope_theta and rope_type).  As in transformers v5
 * (RotaryEmbeddingConfigMixin.convert_rope_params_to_dict), a non-empty
 * rope_scaling wins over rope_parameters, and rope_theta inside the dict wins
 * over the top-level one. */
static int cfg_rope(json_t *root, model_cfg *c, char *err, size_t errlen)
{
    json_t *rs = cfg_get(root, "rope_scaling"), *rp = cfg_get(root, "rope_parameters");
    json_t *d = NULL;
    const char *dn = "";
    char pre[32] = "";
    int rc;
    if (rs) {
        if (!json_is_object(rs))
            return eng__errf(err, errlen, ENG_EFORMAT,
                             CFG ": field 'rope_scaling' must be an object or null");
        if (json_object_size(rs) > 0) {
            d = rs;
            dn = "rope_scaling";
        }
    }
    if (!d && rp) {
        if (!json_is_object(rp))
            return eng__errf(err, errlen, ENG_EFORMAT,
                             CFG ": field 'rope_parameters' must be an object or null");
        d = rp;
        dn = "rope_parameters";
    }
    if (d) {
        snprintf(pre, sizeof pre, "%s.", dn);
        const char *key;
        json_t *v;
        json_object_foreach(d, key, v) {
            if (json_is_object(v))
                return eng__errf(err, errlen, ENG_EUNSUPPORTED,
                                 CFG ": field '%s.%s': per-layer-type RoPE parameters are not "
                                     "supported",
                                 dn, key);
        }
    }

    int have = 0;
    if ((rc = cfg_pos_num(d, pre, "rope_theta", 0, &have, &c->theta, err, errlen))) return rc;
    if (!have && (rc = cfg_pos_num(root, "", "rope_theta", 10000.0, NULL, &c->theta, err, errlen)))
        return rc;

    json_t *prf[2] = {cfg_get(root, "partial_rotary_factor"),
                      d ? cfg_get(d, "partial_rotary_factor") : NULL};
    for (int i = 0; i < 2; i++)
        if (prf[i] && !(json_is_number(prf[i]) && json_number_value(prf[i]) == 1.0))
            return eng__errf(err, errlen, ENG_EUNSUPPORTED,
                             CFG ": field '%spartial_rotary_factor': partial rotary embeddings are "
                                 "not supported",
                             i ? pre : "");

    const char *tkey = "rope_type";
    json_t *tv = d ? cfg_get(d, "rope_type") : NULL;
    if (d && !tv) {
        tv = cfg_get(d, "type");
        tkey = "type";
    }
    const char *type = "default";
    if (tv) {
        if (!json_is_string(tv))
            return eng__errf(err, errlen, ENG_EFORMAT, CFG ": field '%s%s' must be a string", pre,
                             tkey);
        type = json_string_value(tv);
    }

    /* llama3 and yarn read original_max_position_embeddings; transformers v5
     * (standardize_rope_params) lets a top-level value win over the dict's,
     * and falls back to max_position_embeddings. */
    double top_orig = 0;
    int have_top = 0;
    if ((rc = cfg_pos_num(root, "", "original_max_position_embeddings", 0, &have_top, &top_orig,
                          err, errlen)))
        return rc;
    if ((rc = cfg_pos_num(d, pre, "original_max_position_embeddings", (double)c->max_pos, NULL,
                          &c->orig_max, err, errlen)))
        return rc;
    if (have_top) c->orig_max = top_orig;

    c->factor = 1.0;
    if (strcmp(type, "default") == 0) {
        c->rope = ROPE_DEFAULT;
    } else if (strcmp(type, "linear") == 0) {
        c->rope = ROPE_LINEAR;
        if (!cfg_get(d, "factor"))
            return eng__errf(err, errlen, ENG_EFORMAT, CFG ": missing field '%sfactor' (rope type %s)",
                             pre, type);
        if ((rc = cfg_pos_num(d, pre, "factor", 1.0, NULL, &c->factor, err, errlen))) return rc;
    } else if (strcmp(type, "llama3") == 0) {
        c->rope = ROPE_LLAMA3;
        static const char *req[] = {"factor", "low_freq_factor", "high_freq_factor"};
        double *dst[] = {&c->factor, &c->low_ff, &c->high_ff};
        for (int i = 0; i < 3; i++) {
            if (!cfg_get(d, req[i]))
                return eng__errf(err, errlen, ENG_EFORMAT,
                                 CFG ": missing field '%s%s' (rope type llama3)", pre, req[i]);
            if ((rc = cfg_pos_num(d, pre, req[i], 0, NULL, dst[i], err, errlen))) return rc;
        }
        if (!(c->high_ff > c->low_ff))
            return eng__errf(err, errlen, ENG_EFORMAT,
                             CFG ": field '%shigh_freq_factor' must be greater than "
                                 "'%slow_freq_factor'",
                             pre, pre);
    } else if (strcmp(type, "yarn") == 0) {
        c->rope = ROPE_YARN;
        /* _compute_yarn_parameters: "factor" must be there; null means
         * max_position_embeddings / original_max_position_embeddings. */
        if (!json_object_get(d, "factor"))
            return eng__errf(err, errlen, ENG_EFORMAT, CFG ": missing field '%sfactor' (rope type yarn)",
                             pre);
        if ((rc = cfg_pos_num(d, pre, "factor", (double)c->max_pos / c->orig_max, NULL, &c->factor,
                              err, errlen)))
            return rc;
        if ((rc = cfg_pos_num(d, pre, "attention_factor", 0, &c->has_attn_factor, &c->attn_factor,
                              err, errlen)))
            return rc;
        /* `get("beta_fast") or 32`: absent, null and 0 all give the default. */
        static const char *nz[] = {"beta_fast", "beta_slow", "mscale", "mscale_all_dim"};
        double *ndst[] = {&c->beta_fast, &c->beta_slow, &c->mscale, &c->mscale_all_dim};
        const double ndef[] = {32.0, 1.0, 0.0, 0.0};
        for (int i = 0; i < 4; i++) {
            json_t *v = cfg_get(d, nz[i]);
            if (v && !json_is_number(v))
                return eng__errf(err, errlen, ENG_EFORMAT, CFG ": field '%s%s' must be a number",
                                 pre, nz[i]);
            double x = v ? json_number_value(v) : 0.0;
            if (!isfinite(x))
                return eng__errf(err, errlen, ENG_EFORMAT, CFG ": field '%s%s' must be finite", pre,
                                 nz[i]);
            *ndst[i] = x != 0.0 ? x : ndef[i];
        }
        /* `rope_parameters.get("truncate", True)`: absent is true, null false. */
        json_t *tr = json_object_get(d, "truncate");
        if (tr && !json_is_null(tr) && !json_is_boolean(tr))
            return eng__errf(err, errlen, ENG_EFORMAT, CFG ": field '%struncate' must be true or false",
                             pre);
        c->truncate = !tr || json_is_true(tr);
    } else {
        return eng__errf(err, errlen, ENG_EUNSUPPORTED,
                         CFG ": %s%s '%s' is not supported (supported: default, linear, llama3, yarn)",
                         pre, tkey, type);
    }
    return ENG_OK;
}

static int cfg_mka(json_t *root, model_cfg *c, char *err, size_t errlen)
{
    c->mka_levels = 0;
    c->ema_beta = 0.9;
    c->l3_chunk = 64;
    c->l3_top_r = 8;
    json_t *mka = cfg_get(root, "mka");
    if (!mka) return ENG_OK;
    if (!json_is_object(mka))
        return eng__errf(err, errlen, ENG_EFORMAT, CFG ": field 'mka' must be an object");
    json_t *lv = cfg_get(mka, "levels");
    if (lv) {
        if (!json_is_integer(lv) || (json_integer_value(lv) != 2 && json_integer_value(lv) != 3))
            return eng__errf(err, errlen, ENG_EFORMAT, CFG ": field 'mka.levels' must be 2 or 3");
        c->mka_levels = (int)json_integer_value(lv);
    }
    json_t *b = cfg_get(mka, "ema_beta");
    if (b) {
        double x = json_is_number(b) ? json_number_value(b) : NAN;
        if (!(x >= 0.0 && x < 1.0))
            return eng__errf(err, errlen, ENG_EFORMAT,
                             CFG ": field 'mka.ema_beta' must be a number in [0, 1)");
        c->ema_beta = x;
    }
    int rc;
    if ((rc = cfg_int(mka, "mka.", "l3_chunk_tokens", 0, 64, &c->l3_chunk, err, errlen))) return rc;
    if ((rc = cfg_int(mka, "mka.", "l3_top_r", 0, 8, &c->l3_top_r, err, errlen))) return rc;
    return ENG_OK;
}

static int cfg_parse(json_t *root, model_cfg *c, char *err, size_t errlen)
{
    int rc;
    if (!json_is_object(root))
        return eng__errf(err, errlen, ENG_EFORMAT, CFG ": top level must be a JSON object");
    if ((rc = cfg_arch(root, c, err, errlen))) return rc;

    if ((rc = cfg_int(root, "", "hidden_size", 1, 0, &c->hidden, err, errlen)) ||
        (rc = cfg_int(root, "", "num_hidden_layers", 1, 0, &c->layers, err, errlen)) ||
        (rc = cfg_int(root, "", "num_attention_heads", 1, 0, &c->heads, err, errlen)) ||
        (rc = cfg_int(root, "", "num_key_value_heads", 0, c->heads, &c->kv_heads, err, errlen)) ||
        (rc = cfg_int(root, "", "head_dim", 0, 0, &c->head_dim, err, errlen)) ||
        (rc = cfg_int(root, "", "intermediate_size", 1, 0, &c->ffn, err, errlen)) ||
        (rc = cfg_int(root, "", "vocab_size", 1, 0, &c->vocab, err, errlen)) ||
        (rc = cfg_int(root, "", "max_position_embeddings", 0, 4096, &c->max_pos, err, errlen)))
        return rc;
    if (c->head_dim == 0) {
        if (c->hidden % c->heads != 0)
            return eng__errf(err, errlen, ENG_EFORMAT,
                             CFG ": field 'hidden_size' (%lld) is not a multiple of "
                                 "'num_attention_heads' (%lld) and 'head_dim' is not given",
                             (long long)c->hidden, (long long)c->heads);
        c->head_dim = c->hidden / c->heads;
    }
    if (c->head_dim % 2 != 0)
        return eng__errf(err, errlen, ENG_EFORMAT,
                         CFG ": field 'head_dim' (%lld) must be even for rotary embeddings",
                         (long long)c->head_dim);
    if (c->heads % c->kv_heads != 0)
        return eng__errf(err, errlen, ENG_EFORMAT,
                         CFG ": field 'num_attention_heads' (%lld) must be a multiple of "
                             "'num_key_value_heads' (%lld)",
                         (long long)c->heads, (long long)c->kv_heads);
    if (c->heads * c->head_dim > INT_MAX)
        return eng__errf(err, errlen, ENG_EFORMAT,
                         CFG ": fields 'num_attention_heads' x 'head_dim' overflow");

    if ((rc = cfg_pos_num(root, "", "rms_norm_eps", 1e-6, NULL, &c->rms_eps, err, errlen)) ||
        (rc = cfg_bool(root, "tie_word_embeddings", 0, &c->tied, err, errlen)))
        return rc;

    json_t *act = cfg_get(root, "hidden_act");
    if (act && !json_is_string(act))
        return eng__errf(err, errlen, ENG_EFORMAT, CFG ": field 'hidden_act' must be a string");
    if (act && strcmp(json_string_value(act), "silu") != 0)
        return eng__errf(err, errlen, ENG_EUNSUPPORTED,
                         CFG ": field 'hidden_act' is '%s', only 'silu' is supported",
                         json_string_value(act));

    int mlp_bias = 0, sliding = 0, attn_bias = 0;
    if ((rc = cfg_bool(root, "mlp_bias", 0, &mlp_bias, err, errlen)) ||
        (rc = cfg_bool(root, "use_sliding_window", 0, &sliding, err, errlen)) ||
        (rc = cfg_bool(root, "attention_bias", 0, &attn_bias, err, errlen)))
        return rc;
    if (mlp_bias)
        return eng__errf(err, errlen, ENG_EUNSUPPORTED,
                         CFG ": field 'mlp_bias' is true; MLP biases are not supported");
    if (sliding)
        return eng__errf(err, errlen, ENG_EUNSUPPORTED,
                         CFG ": field 'use_sliding_window' is true; sliding-window attention is not "
                             "supported");
    /* Qwen2Attention: q/k/v always have a bias, o never; LlamaAttention
     * (and Mistral's, which has no attention_bias) follow attention_bias. */
    c->qkv_bias = c->qwen2 ? 1 : attn_bias;
    c->o_bias = c->qwen2 ? 0 : attn_bias;

    if ((rc = cfg_token(root, "bos_token_id", &c->bos, err, errlen)) ||
        (rc = cfg_token(root, "eos_token_id", &c->eos, err, errlen)))
        return rc;
    if (c->bos >= c->vocab || c->eos >= c->vocab)
        return eng__errf(err, errlen, ENG_EFORMAT,
                         CFG ": field '%s' (%d) must be below 'vocab_size' (%lld)",
                         c->bos >= c->vocab ? "bos_token_id" : "eos_token_id",
                         c->bos >= c->vocab ? c->bos : c->eos, (long long)c->vocab);
    /* "torch_dtype" (v4) / "dtype" (v5) are informational: the loader goes
     * by each tensor's own dtype. */

    if ((rc = cfg_rope(root, c, err, errlen))) return rc;
    return cfg_mka(root, c, err, errlen);
}

/* ---- RoPE frequencies ---------------------------------------------------------
 * Each function repeats, operation for operation, the float32 tensor code of
 * transformers' modeling_rope_utils (v5) on the CPU:
 *   base ** (arange(0, dim, 2).float() / dim)   -> rope_pow(base, i, dim)
 *   1.0 / t                                     -> reciprocal(t) * 1.0 = 1.0f / t
 *   scalar / t  (Tensor.__rtruediv__)           -> (1.0f / t) * (float)scalar
 *   t op python-float                           -> float32 op (float)scalar
 * Python scalars combined with each other stay in double.
 *
 * The one operation that cannot be repeated exactly is the float32 pow:
 * torch evaluates it with SLEEF (1-ULP, vectorised) and glibc's powf is not
 * correctly rounded either.  rope_pow rounds the double-precision pow, i.e.
 * it is correctly rounded and the same on every host.  Against transformers
 * 5.x on x86-64 (AVX-512) 5220 of 5248 entries are bit-identical and 28
 * differ by one ULP (theta in {1e4, 3.7e4, 5e5, 1e6} x head_dim in {32, 64,
 * 80, 96, 128, 256} x the four rope types; e.g. one of 64 entries for theta
 * 1e6, head_dim 128; none for 5e5/128).  The angle error that causes is
 * below 1e-7 relative, far under the float noise of the forward pass. */

/* (float)base ** ((float)(2i) / (float)dim), correctly rounded to float. */
static float rope_pow(double base, int i, int dim)
{
    float e = (float)(2 * i) / (float)dim;
    return (float)pow((double)(float)base, (double)e);
}

static void rope_base(float *inv, int dim, double base)
{
    for (int i = 0; i < dim / 2; i++) inv[i] = 1.0f / rope_pow(base, i, dim);
}

/* _compute_llama3_parameters */
static void rope_llama3(float *inv, int dim, const model_cfg *c)
{
    const double two_pi = 2 * M_PI;
    const float factor = (float)c->factor;
    const float low_wl = (float)(c->orig_max / c->low_ff);
    const float high_wl = (float)(c->orig_max / c->high_ff);
    const float ctx = (float)c->orig_max, low = (float)c->low_ff;
    const float span = (float)(c->high_ff - c->low_ff);
    rope_base(inv, dim, c->theta);
    for (int i = 0; i < dim / 2; i++) {
        float f = inv[i];
        float wavelen = (1.0f / f) * (float)two_pi;
        float fl = wavelen > low_wl ? f / factor : f;
        float smooth = ((1.0f / wavelen) * ctx - low) / span;
        float smoothed = (1.0f - smooth) * fl / factor + smooth * fl;
        int medium = !(wavelen < high_wl) && !(wavelen > low_wl);
        inv[i] = medium ? smoothed : fl;
    }
}

static double yarn_mscale(double scale, double mscale)
{
    return scale <= 1 ? 1.0 : 0.1 * mscale * log(scale) + 1.0;
}

static double yarn_correction_dim(double rot, int dim, double base, double max_pos)
{
    return (dim * log(max_pos / (rot * 2 * M_PI))) / (2 * log(base));
}

/* _compute_yarn_parameters; returns the attention factor. */
static double rope_yarn(float *inv, int dim, const model_cfg *c)
{
    double factor = c->factor, att;
    if (c->has_attn_factor)
        att = c->attn_factor;
    else if (c->mscale != 0 && c->mscale_all_dim != 0)
        att = yarn_mscale(factor, c->mscale) / yarn_mscale(factor, c->mscale_all_dim);
    else
        att = yarn_mscale(factor, 1);

    double low = yarn_correction_dim(c->beta_fast, dim, c->theta, c->orig_max);
    double high = yarn_correction_dim(c->beta_slow, dim, c->theta, c->orig_max);
    if (c->truncate) {
        low = floor(low);
        high = ceil(high);
    }
    if (low < 0) low = 0;
    if (high > dim - 1) high = dim - 1;
    if (low == high) high += 0.001; /* linear_ramp_factor: prevent singularity */
    const float flow = (float)low, fspan = (float)(high - low), ffac = (float)factor;

    for (int i = 0; i < dim / 2; i++) {
        float pos = rope_pow(c->theta, i, dim);
        float extra = 1.0f / pos;
        float inter = 1.0f / (ffac * pos);
        float ramp = ((float)i - flow) / fspan;
        ramp = ramp < 0.0f ? 0.0f : ramp > 1.0f ? 1.0f : ramp;
        float ef = 1.0f - ramp;
        inv[i] = inter * (1.0f - ef) + extra * ef;
    }
    return att;
}

static void rope_compute(const model_cfg *c, float *inv, float *attn_scale)
{
    int dim = (int)c->head_dim;
    *attn_scale = 1.0f;
    switch (c->rope) {
    case ROPE_LINEAR:
        rope_base(inv, dim, c->theta);
        for (int i = 0; i < dim / 2; i++) inv[i] = inv[i] / (float)c->factor;
        break;
    case ROPE_LLAMA3: rope_llama3(inv, dim, c); break;
    case ROPE_YARN: *attn_scale = (float)rope_yarn(inv, dim, c); break;
    default: rope_base(inv, dim, c->theta); break;
    }
}

/* ---- weights -------------------------------------------------------------------- */

/* One tensor the model uses: where it comes from and where its view goes. */
typedef struct wslot {
    const eng_st_tensor *t;
    const float **dst;      /* f32 view, or */
    const uint16_t **dst16; /* bf16 view (matrices stored as BF16) */
    size_t off;             /* offset in the arena, bytes */
} wslot;

typedef struct loader {
    const model_cfg *c;
    eng_st_set *st;
    wslot *slots;
    size_t n_slots, cap_slots;
    size_t arena_bytes;
    char *err;
    size_t errlen;
} loader;

static const eng_st_tensor *ld_find(loader *L, const char *name)
{
    return eng_st_set_find(L->st, name);
}

/* Records tensor `name` with the expected shape (ndim 1 or 2) for *dst, or
 * for *dst16 when dst16 is given and the tensor is stored as BF16 (it then
 * stays bf16 in the arena).  Missing: an error when required, else returns 1
 * and leaves the views alone. */
static int ld_bind(loader *L, const char *name, int ndim, int64_t d0, int64_t d1, int required,
                   const float **dst, const uint16_t **dst16)
{
    const eng_st_tensor *t = ld_find(L, name);
    if (!t) {
        if (!required) return 1;
        return eng__errf(L->err, L->errlen, ENG_EFORMAT, "%s: tensor '%s' is missing", L->st->where,
                         name);
    }
    if (t->dtype == ENG_ST_OTHER)
        return eng__errf(L->err, L->errlen, ENG_EUNSUPPORTED,
                         "%s: tensor '%s' has dtype %s, only F32, F16 and BF16 are supported",
                         t->file->name, name, t->dtype_name);
    int64_t want[2] = {d0, d1};
    int ok = t->ndim == ndim;
    for (int i = 0; ok && i < ndim; i++) ok = t->shape[i] == want[i];
    if (!ok) {
        char have[256], exp[64];
        eng_st_shape_str(t->shape, t->ndim, have, sizeof have);
        eng_st_shape_str(want, ndim, exp, sizeof exp);
        return eng__errf(L->err, L->errlen, ENG_EFORMAT, "%s: tensor '%s' has shape %s, expected %s",
                         t->file->name, name, have, exp);
    }
    if (L->n_slots == L->cap_slots) {
        size_t cap = L->cap_slots ? 2 * L->cap_slots : 64;
        wslot *s = realloc(L->slots, cap * sizeof *s);
        if (!s) return eng__errf(L->err, L->errlen, ENG_ENOMEM, "%s: out of memory", name);
        L->slots = s;
        L->cap_slots = cap;
    }
    int keep16 = dst16 && t->dtype == ENG_ST_BF16;
    size_t n = (size_t)t->numel, el = keep16 ? 2 : 4;
    if (n > SIZE_MAX / el - ARENA_ALIGN)
        return eng__errf(L->err, L->errlen, ENG_ENOMEM, "%s: weights too large", name);
    size_t padded = (n * el + ARENA_ALIGN - 1) / ARENA_ALIGN * ARENA_ALIGN;
    if (L->arena_bytes > SIZE_MAX - padded)
        return eng__errf(L->err, L->errlen, ENG_ENOMEM, "%s: weights too large", name);
    L->slots[L->n_slots++] = (wslot){t, keep16 ? NULL : dst, keep16 ? dst16 : NULL, L->arena_bytes};
    L->arena_bytes += padded;
    return ENG_OK;
}

/* Binds a linear layer; the bias is required (1), optional and ignored when
 * absent (0 is never used: a bias the architecture lacks is not read, as
 * transformers ignores it). */
static int ld_linear(loader *L, const char *wname, const char *bname, int64_t rows, int64_t cols,
                     int want_bias, eng_linear *lin)
{
    lin->w = NULL;
    lin->w16 = NULL;
    lin->b = NULL;
    int rc = ld_bind(L, wname, 2, rows, cols, 1, &lin->w, &lin->w16);
    if (rc) return rc;
    lin->rows = (int)rows;
    lin->cols = (int)cols;
    if (want_bias && (rc = ld_bind(L, bname, 1, rows, 0, 1, &lin->b, NULL))) return rc;
    return ENG_OK;
}

/* Attention projection of layer i: accepts the plain spelling and the
 * FastMKA patch's self_attn.original_attn.* (plain wins when both exist). */
static int ld_attn_proj(loader *L, int i, const char *proj, int64_t rows, int64_t cols,
                        int want_bias, eng_linear *lin)
{
    char w[160], b[160], w2[160];
    snprintf(w, sizeof w, "model.layers.%d.self_attn.%s_proj.weight", i, proj);
    snprintf(w2, sizeof w2, "model.layers.%d.self_attn.original_attn.%s_proj.weight", i, proj);
    if (ld_find(L, w)) {
        snprintf(b, sizeof b, "model.layers.%d.self_attn.%s_proj.bias", i, proj);
        return ld_linear(L, w, b, rows, cols, want_bias, lin);
    }
    if (ld_find(L, w2)) {
        snprintf(b, sizeof b, "model.layers.%d.self_attn.original_attn.%s_proj.bias", i, proj);
        return ld_linear(L, w2, b, rows, cols, want_bias, lin);
    }
    return eng__errf(L->err, L->errlen, ENG_EFORMAT, "%s: tensor '%s' is missing (nor is '%s' present)",
                     L->st->where, w, w2);
}

static int layer_has_router(loader *L, int i, char *first_missing, size_t len)
{
    static const char *parts[] = {"router.0.weight", "router.0.bias", "router.2.weight",
                                  "router.2.bias"};
    int n = 0;
    first_missing[0] = '\0';
    for (int p = 0; p < 4; p++) {
        char name[160];
        snprintf(name, sizeof name, "model.layers.%d.self_attn.%s", i, parts[p]);
        if (ld_find(L, name)) n++;
        else if (!first_missing[0]) snprintf(first_missing, len, "%s", name);
    }
    return n;
}

/* Decides the router level count L (0: no router) and binds everything. */
static int ld_bind_all(loader *L, eng_model *m)
{
    const model_cfg *c = L->c;
    const int64_t D = c->hidden, Hd = c->heads * c->head_dim, KVd = c->kv_heads * c->head_dim;
    const int64_t F = c->ffn, V = c->vocab;
    const int nl = (int)c->layers;
    char name[160], miss[160];
    int rc;

    /* Router: all layers or none. */
    int with = -1, without = -1, levels = 0;
    for (int i = 0; i < nl; i++) {
        int n = layer_has_router(L, i, miss, sizeof miss);
        if (n == 4 && with < 0) with = i;
        if (n == 0 && without < 0) without = i;
        if (n > 0 && n < 4)
            return eng__errf(L->err, L->errlen, ENG_EFORMAT,
                             "%s: layer %d has a partial MKA router: tensor '%s' is missing",
                             L->st->where, i, miss);
    }
    if (with >= 0 && without >= 0)
        return eng__errf(L->err, L->errlen, ENG_EFORMAT,
                         "%s: MKA router present in layer %d but missing in layer %d "
                         "('model.layers.%d.self_attn.router.0.weight'); all layers or none",
                         L->st->where, with, without, without);
    if (with >= 0) {
        snprintf(name, sizeof name, "model.layers.%d.self_attn.router.2.weight", with);
        const eng_st_tensor *t = ld_find(L, name);
        if (t->ndim != 2 || (t->shape[0] != 2 && t->shape[0] != 3)) {
            char shs[256];
            eng_st_shape_str(t->shape, t->ndim, shs, sizeof shs);
            return eng__errf(L->err, L->errlen, ENG_EFORMAT,
                             "%s: tensor '%s' has shape %s; the router needs [2 or 3 levels, %lld]",
                             t->file->name, name, shs, (long long)(D / 2));
        }
        levels = (int)t->shape[0];
        if (c->mka_levels && c->mka_levels != levels)
            return eng__errf(L->err, L->errlen, ENG_EFORMAT,
                             CFG ": field 'mka.levels' is %d but tensor '%s' in %s has %d levels",
                             c->mka_levels, name, t->file->name, levels);
        if (D % 2 != 0)
            return eng__errf(L->err, L->errlen, ENG_EFORMAT,
                             CFG ": field 'hidden_size' (%lld) must be even for the MKA router",
                             (long long)D);
    }
    m->info.mka_levels = levels;

    if ((rc = ld_linear(L, "model.embed_tokens.weight", NULL, V, D, 0, &m->embed))) return rc;
    for (int i = 0; i < nl; i++) {
        eng_layer *ly = &m->layers[i];
        snprintf(name, sizeof name, "model.layers.%d.input_layernorm.weight", i);
        if ((rc = ld_bind(L, name, 1, D, 0, 1, &ly->attn_norm, NULL))) return rc;
        if ((rc = ld_attn_proj(L, i, "q", Hd, D, c->qkv_bias, &ly->q)) ||
            (rc = ld_attn_proj(L, i, "k", KVd, D, c->qkv_bias, &ly->k)) ||
            (rc = ld_attn_proj(L, i, "v", KVd, D, c->qkv_bias, &ly->v)) ||
            (rc = ld_attn_proj(L, i, "o", D, Hd, c->o_bias, &ly->o)))
            return rc;
        if (levels) {
            char w[160], b[160];
            snprintf(w, sizeof w, "model.layers.%d.self_attn.router.0.weight", i);
            snprintf(b, sizeof b, "model.layers.%d.self_attn.router.0.bias", i);
            if ((rc = ld_linear(L, w, b, D / 2, Hd, 1, &ly->router1))) return rc;
            snprintf(w, sizeof w, "model.layers.%d.self_attn.router.2.weight", i);
            snprintf(b, sizeof b, "model.layers.%d.self_attn.router.2.bias", i);
            if ((rc = ld_linear(L, w, b, levels, D / 2, 1, &ly->router2))) return rc;
        }
        snprintf(name, sizeof name, "model.layers.%d.post_attention_layernorm.weight", i);
        if ((rc = ld_bind(L, name, 1, D, 0, 1, &ly->mlp_norm, NULL))) return rc;
        char g[160], u[160], dn[160];
        snprintf(g, sizeof g, "model.layers.%d.mlp.gate_proj.weight", i);
        snprintf(u, sizeof u, "model.layers.%d.mlp.up_proj.weight", i);
        snprintf(dn, sizeof dn, "model.layers.%d.mlp.down_proj.weight", i);
        if ((rc = ld_linear(L, g, NULL, F, D, 0, &ly->gate)) ||
            (rc = ld_linear(L, u, NULL, F, D, 0, &ly->up)) ||
            (rc = ld_linear(L, dn, NULL, D, F, 0, &ly->down)))
            return rc;
    }
    if ((rc = ld_bind(L, "model.norm.weight", 1, D, 0, 1, &m->final_norm, NULL))) return rc;
    if (!c->tied) {
        if (!ld_find(L, "lm_head.weight"))
            return eng__errf(L->err, L->errlen, ENG_EFORMAT,
                             "%s: tensor 'lm_head.weight' is missing and " CFG
                             " has tie_word_embeddings false",
                             L->st->where);
        if ((rc = ld_linear(L, "lm_head.weight", NULL, V, D, 0, &m->lm_head))) return rc;
    }
    return ENG_OK;
}

/* Copies (and widens) the tensors into the arena, the slots split by
 * arena offset over up to COPY_THREADS threads: the copy of a 15 GB
 * checkpoint is bound by page faults and memory traffic that one core does
 * not saturate (14 s on one core of the GPU machine). */
#define COPY_THREADS 8
#define COPY_MIN_BYTES ((size_t)256 << 20) /* below: one thread */

typedef struct copy_job {
    const loader *L;
    unsigned char *arena;
    int k, n; /* this job's share: slots whose offset falls in the k-th of n */
} copy_job;

static void *copy_part(void *arg)
{
    const copy_job *j = arg;
    const loader *L = j->L;
    for (size_t i = 0; i < L->n_slots; i++) {
        const wslot *w = &L->slots[i];
        if ((int)((double)w->off / (double)L->arena_bytes * j->n) != j->k) continue;
        unsigned char *dst = j->arena + w->off;
        size_t used;
        if (w->dst16) {
            eng_st_to_bf16(w->t, (uint16_t *)(void *)dst);
            *w->dst16 = (const uint16_t *)(void *)dst;
            used = (size_t)w->t->numel * 2;
        } else {
            eng_st_to_f32(w->t, (float *)(void *)dst);
            *w->dst = (const float *)(void *)dst;
            used = (size_t)w->t->numel * 4;
        }
        /* zero the padding so that the arena holds no uninitialised bytes */
        size_t end = i + 1 < L->n_slots ? L->slots[i + 1].off : L->arena_bytes;
        memset(dst + used, 0, end - w->off - used);
    }
    return NULL;
}

static void copy_weights(const loader *L, unsigned char *arena)
{
    const long cpus = sysconf(_SC_NPROCESSORS_ONLN);
    int n = cpus > 1 ? (cpus < COPY_THREADS ? (int)cpus : COPY_THREADS) : 1;
    if (L->arena_bytes < COPY_MIN_BYTES) n = 1;
    copy_job jobs[COPY_THREADS];
    pthread_t th[COPY_THREADS];
    int on_thread[COPY_THREADS] = {0};
    for (int k = 0; k < n; k++) jobs[k] = (copy_job){L, arena, k, n};
    /* Jobs 1.. on threads of their own; job 0, and any whose thread could
     * not start, here. */
    for (int k = 1; k < n; k++)
        on_thread[k] = pthread_create(&th[k], NULL, copy_part, &jobs[k]) == 0;
    copy_part(&jobs[0]);
    for (int k = 1; k < n; k++) {
        if (on_thread[k])
            pthread_join(th[k], NULL);
        else
            copy_part(&jobs[k]);
    }
}

/* XXH3-64 over the config bytes, then per tensor in name order: name NUL,
 * dtype NUL, ndim and dims as u64 little-endian, then ALL its data bytes, so
 * that any change to any weight changes the fingerprint (the memstore binds
 * persisted sessions to it).  XXH3 reads ~20 GB/s per core: a 15 GB model
 * costs about a second on top of reading it. */
static uint64_t fingerprint(const char *cfg, size_t cfg_len, const eng_st_set *st)
{
    XXH3_state_t hs;
    XXH3_64bits_reset(&hs);
    XXH3_64bits_update(&hs, cfg, cfg_len);
    for (size_t i = 0; i < st->n_tensors; i++) {
        const eng_st_tensor *t = st->tensors[i];
        XXH3_64bits_update(&hs, t->name, strlen(t->name) + 1);
        XXH3_64bits_update(&hs, t->dtype_name, strlen(t->dtype_name) + 1);
        unsigned char le[8 * (ENG_ST_MAX_DIMS + 1)];
        size_t o = 0;
        for (int d = -1; d < t->ndim; d++) {
            uint64_t x = d < 0 ? (uint64_t)t->ndim : (uint64_t)t->shape[d];
            for (int b = 0; b < 8; b++) le[o++] = (unsigned char)(x >> (8 * b));
        }
        XXH3_64bits_update(&hs, le, o);
        XXH3_64bits_update(&hs, t->data, t->nbytes);
    }
    return XXH3_64bits_digest(&hs);
}

/* ---- public ---------------------------------------------------------------- */

void eng_model_free(eng_model *m)
{
    if (!m) return;
    free(m->arena);
    free(m->layers);
    free(m->rope_inv_freq);
    free(m);
}

int eng_model_embed_mean(const eng_model *m, const int32_t *tokens, int n, float *out)
{
    const int D = m->info.d_model, V = m->info.vocab_size;
    if (n <= 0) return ENG_EINVAL;
    for (int d = 0; d < D; d++) out[d] = 0.0f;
    for (int t = 0; t < n; t++) {
        if (tokens[t] < 0 || tokens[t] >= V) return ENG_EINVAL;
        size_t row = (size_t)tokens[t] * (size_t)D;
        const eng_linear *e = &m->embed;
        for (int d = 0; d < D; d++) out[d] += e->w ? e->w[row + d] : eng__bf16_to_f32(e->w16[row + d]);
    }
    for (int d = 0; d < D; d++) out[d] /= (float)n;
    return ENG_OK;
}

const eng_model_info *eng_model_get_info(const eng_model *m)
{
    return m ? &m->info : NULL;
}

int eng_model_load(const char *dir, eng_model **out, char *err, size_t errlen)
{
    if (out) *out = NULL;
    if (err && errlen) err[0] = '\0';
    if (!dir || !out)
        return eng__errf(err, errlen, ENG_EINVAL, "eng_model_load: dir and out must not be NULL");

    struct stat sb;
    if (stat(dir, &sb) != 0)
        return eng__errf(err, errlen, ENG_EIO, "%s: cannot open model directory: %s", dir,
                         strerror(errno));
    if (!S_ISDIR(sb.st_mode))
        return eng__errf(err, errlen, ENG_EIO, "%s: not a directory", dir);

    char *cfg_buf = NULL, *path = NULL;
    size_t cfg_len = 0;
    json_t *root = NULL;
    eng_model *m = NULL;
    model_cfg c;
    loader L;
    memset(&c, 0, sizeof c);
    memset(&L, 0, sizeof L);
    L.err = err;
    L.errlen = errlen;
    L.c = &c;
    int rc;

    path = malloc(strlen(dir) + sizeof "/" CFG);
    if (!path) {
        rc = eng__errf(err, errlen, ENG_ENOMEM, CFG ": out of memory");
        goto done;
    }
    sprintf(path, "%s/" CFG, dir);
    if ((rc = eng_st_read_file(path, CFG, CFG_MAX_BYTES, &cfg_buf, &cfg_len, err, errlen)))
        goto done;
    if ((rc = eng__json_loadb(cfg_buf, cfg_len, CFG, &root, err, errlen))) goto done;
    if ((rc = cfg_parse(root, &c, err, errlen))) goto done;
    if ((rc = eng_st_set_open(dir, &L.st, err, errlen))) goto done;

    /* Every layer has an input_layernorm: checking them first bounds the
     * layer count by the checkpoint before anything is sized by it. */
    for (int64_t i = 0; i < c.layers; i++) {
        char name[96];
        snprintf(name, sizeof name, "model.layers.%lld.input_layernorm.weight", (long long)i);
        if (!eng_st_set_find(L.st, name)) {
            rc = eng__errf(err, errlen, ENG_EFORMAT, "%s: tensor '%s' is missing", L.st->where, name);
            goto done;
        }
    }
    m = calloc(1, sizeof *m);
    if (m) m->layers = calloc((size_t)c.layers, sizeof *m->layers);
    if (!m || !m->layers) {
        rc = eng__errf(err, errlen, ENG_ENOMEM, "%s: out of memory", dir);
        goto done;
    }
    if ((rc = ld_bind_all(&L, m))) goto done;
    /* Shapes are checked: head_dim is now bounded by a real q_proj. */
    m->rope_inv_freq = malloc((size_t)(c.head_dim / 2) * sizeof(float));
    if (!m->rope_inv_freq) {
        rc = eng__errf(err, errlen, ENG_ENOMEM, "%s: out of memory", dir);
        goto done;
    }

    void *arena = NULL;
    size_t bytes = L.arena_bytes ? L.arena_bytes : 1;
    if (posix_memalign(&arena, ARENA_ALIGN, bytes) != 0) {
        rc = eng__errf(err, errlen, ENG_ENOMEM, "%s: out of memory allocating %zu bytes of weights",
                       dir, bytes);
        goto done;
    }
    m->arena = arena;
    m->arena_bytes = L.arena_bytes;
    copy_weights(&L, m->arena);
    if (c.tied) m->lm_head = m->embed;

    m->rms_eps = (float)c.rms_eps;
    rope_compute(&c, m->rope_inv_freq, &m->rope_attn_scale);

    eng_model_info *in = &m->info;
    snprintf(in->arch, sizeof in->arch, "%s", c.qwen2 ? "qwen2" : "llama");
    in->n_layers = (int)c.layers;
    in->d_model = (int)c.hidden;
    in->n_heads = (int)c.heads;
    in->n_kv_heads = (int)c.kv_heads;
    in->head_dim = (int)c.head_dim;
    in->ffn_dim = (int)c.ffn;
    in->vocab_size = (int)c.vocab;
    in->max_position = (int)c.max_pos;
    in->ema_beta = (float)c.ema_beta;
    in->l3_chunk_tokens = (int)c.l3_chunk;
    in->l3_top_r = (int)c.l3_top_r;
    in->tied_embeddings = c.tied;
    in->bos_token_id = c.bos;
    in->eos_token_id = c.eos;
    snprintf(in->dtype, sizeof in->dtype, "%s",
             eng_st_dtype_lower(eng_st_set_find(L.st, "model.embed_tokens.weight")->dtype));
    snprintf(in->fingerprint, sizeof in->fingerprint, "%016llx",
             (unsigned long long)fingerprint(cfg_buf, cfg_len, L.st));
    rc = ENG_OK;

done:
    /* The mappings go away here: every weight now lives in the arena. */
    eng_st_set_close(L.st);
    free(L.slots);
    json_decref(root);
    free(cfg_buf);
    free(path);
    if (rc != ENG_OK) {
        eng_model_free(m);
        return rc;
    }
    *out = m;
    return ENG_OK;
}
