/*
 * test_loader.c — Check suite for the model loader (engine/model.c) and the
 * safetensors reader (engine/safetensors.c).
 *
 * The fixtures are written by this file itself, not by mkad-genmodel: a small
 * builder (tm_*) makes a valid model directory (config.json + safetensors,
 * single or sharded) with random weights, and each test mutates it — a
 * config field, a tensor's shape or dtype, a file's bytes — before loading.
 * Every negative test checks the status, that no model is returned, and that
 * the one-line message names the file and the field at fault.  Each test
 * works in its own directory under tu_tmpdir().
 */
#include <check.h>
#include <jansson.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#define XXH_INLINE_ALL
#include <xxhash.h>

#include "../engine/internal.h"
#include "../engine/safetensors.h"
#include "engine.h"
#include "testutil.h"

/* ---- fixture builder ----------------------------------------------------- */

#define TM_MAX_TENSORS 256

typedef struct tm_tensor {
    char name[160];
    char dtype[8];  /* "F32", "F16", "BF16", "I64", ... */
    int ndim;
    int64_t shape[2];
    unsigned char *data;
    size_t nbytes;
    int unused; /* the loader does not read it (extra, ignored bias, tied lm_head) */
} tm_tensor;

typedef struct tm_model {
    json_t *config;
    tm_tensor t[TM_MAX_TENSORS];
    int n;
    int shards; /* 0/1: model.safetensors; else that many shards plus the index */
    uint64_t rng;
} tm_model;

typedef struct tm_params {
    const char *arch; /* "qwen2", "llama", "mistral" */
    int D, layers, heads, kv, ffn, vocab, head_dim;
    const char *dtype;
    int levels;         /* router levels written (0: no router) */
    int tied;           /* tie_word_embeddings */
    int write_lm_head;  /* write lm_head.weight even when tied */
    int attn_bias;      /* llama attention_bias */
    int original_attn;  /* FastMKA patch spelling for q/k/v/o */
    int shards;
    uint64_t seed;
} tm_params;

static tm_params tm_defaults(void)
{
    tm_params p = {"qwen2", 8, 2, 2, 1, 16, 32, 0, "F32", 0, 0, 0, 0, 0, 0, 1};
    return p;
}

static uint64_t tm_rand(tm_model *m)
{
    uint64_t x = m->rng;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return m->rng = x;
}

static size_t tm_esize(const char *dtype)
{
    if (!strcmp(dtype, "F32") || !strcmp(dtype, "I32")) return 4;
    if (!strcmp(dtype, "F16") || !strcmp(dtype, "BF16")) return 2;
    if (!strcmp(dtype, "I64") || !strcmp(dtype, "F64")) return 8;
    return 1;
}

static size_t tm_numel(const tm_tensor *t)
{
    size_t n = 1;
    for (int i = 0; i < t->ndim; i++) n *= (size_t)t->shape[i];
    return n;
}

/* Fresh random contents for t in its dtype: f32 in [-1, 1); bf16 the upper
 * half of such a float; f16 any finite normal half; others random bytes. */
static void tm_fill(tm_model *m, tm_tensor *t)
{
    size_t n = tm_numel(t), es = tm_esize(t->dtype);
    free(t->data);
    t->nbytes = n * es;
    t->data = malloc(t->nbytes ? t->nbytes : 1);
    ck_assert_ptr_nonnull(t->data);
    for (size_t i = 0; i < n; i++) {
        uint64_t r = tm_rand(m);
        float x = (float)((double)(r >> 11) / 9007199254740992.0 * 2.0 - 1.0);
        uint32_t u;
        memcpy(&u, &x, 4);
        unsigned char *p = t->data + i * es;
        if (!strcmp(t->dtype, "F32")) {
            for (int b = 0; b < 4; b++) p[b] = (unsigned char)(u >> (8 * b));
        } else if (!strcmp(t->dtype, "BF16")) {
            p[0] = (unsigned char)(u >> 16);
            p[1] = (unsigned char)(u >> 24);
        } else if (!strcmp(t->dtype, "F16")) {
            uint16_t h = (uint16_t)((r >> 20 & 0x8000u) | ((1 + (r >> 30) % 29) << 10) | (r & 0x3ffu));
            p[0] = (unsigned char)h;
            p[1] = (unsigned char)(h >> 8);
        } else {
            for (size_t b = 0; b < es; b++) p[b] = (unsigned char)(r >> (8 * b));
        }
    }
}

static tm_tensor *tm_add(tm_model *m, const char *dtype, int64_t d0, int64_t d1, const char *fmt, ...)
    __attribute__((format(printf, 5, 6)));
static tm_tensor *tm_add(tm_model *m, const char *dtype, int64_t d0, int64_t d1, const char *fmt, ...)
{
    ck_assert_int_lt(m->n, TM_MAX_TENSORS);
    tm_tensor *t = &m->t[m->n++];
    memset(t, 0, sizeof *t);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(t->name, sizeof t->name, fmt, ap);
    va_end(ap);
    snprintf(t->dtype, sizeof t->dtype, "%s", dtype);
    t->ndim = d1 > 0 ? 2 : 1;
    t->shape[0] = d0;
    t->shape[1] = d1 > 0 ? d1 : 0;
    tm_fill(m, t);
    return t;
}

static tm_tensor *tm_find(tm_model *m, const char *name)
{
    for (int i = 0; i < m->n; i++)
        if (!strcmp(m->t[i].name, name)) return &m->t[i];
    ck_abort_msg("fixture has no tensor %s", name);
    return NULL;
}

static void tm_remove(tm_model *m, const char *name)
{
    tm_tensor *t = tm_find(m, name);
    free(t->data);
    int i = (int)(t - m->t);
    memmove(&m->t[i], &m->t[i + 1], (size_t)(m->n - i - 1) * sizeof *t);
    m->n--;
}

static void tm_reshape(tm_model *m, const char *name, int64_t d0, int64_t d1)
{
    tm_tensor *t = tm_find(m, name);
    t->ndim = d1 > 0 ? 2 : 1;
    t->shape[0] = d0;
    t->shape[1] = d1 > 0 ? d1 : 0;
    tm_fill(m, t);
}

static void tm_set_dtype(tm_model *m, const char *name, const char *dtype)
{
    tm_tensor *t = tm_find(m, name);
    snprintf(t->dtype, sizeof t->dtype, "%s", dtype);
    tm_fill(m, t);
}

static void tm_build(tm_model *m, const tm_params *p)
{
    memset(m, 0, sizeof *m);
    m->rng = p->seed * 0x9e3779b97f4a7c15ULL + 12345;
    m->shards = p->shards;
    int qwen2 = !strcmp(p->arch, "qwen2");
    const char *cls = qwen2 ? "Qwen2ForCausalLM"
                      : !strcmp(p->arch, "llama") ? "LlamaForCausalLM" : "MistralForCausalLM";
    int hd = p->head_dim ? p->head_dim : p->D / p->heads;
    json_t *c = json_object();
    json_object_set_new(c, "architectures", json_pack("[s]", cls));
    json_object_set_new(c, "model_type", json_string(p->arch));
    json_object_set_new(c, "hidden_size", json_integer(p->D));
    json_object_set_new(c, "num_hidden_layers", json_integer(p->layers));
    json_object_set_new(c, "num_attention_heads", json_integer(p->heads));
    json_object_set_new(c, "num_key_value_heads", json_integer(p->kv));
    if (p->head_dim) json_object_set_new(c, "head_dim", json_integer(p->head_dim));
    json_object_set_new(c, "intermediate_size", json_integer(p->ffn));
    json_object_set_new(c, "vocab_size", json_integer(p->vocab));
    json_object_set_new(c, "max_position_embeddings", json_integer(256));
    json_object_set_new(c, "rms_norm_eps", json_real(1e-5));
    json_object_set_new(c, "rope_theta", json_real(10000.0));
    json_object_set_new(c, "tie_word_embeddings", json_boolean(p->tied));
    json_object_set_new(c, "hidden_act", json_string("silu"));
    json_object_set_new(c, "bos_token_id", json_integer(1));
    json_object_set_new(c, "eos_token_id", json_integer(2));
    json_object_set_new(c, "torch_dtype", json_string("float32"));
    if (qwen2) {
        json_object_set_new(c, "use_sliding_window", json_false());
        json_object_set_new(c, "sliding_window", json_integer(4096));
    } else {
        json_object_set_new(c, "attention_bias", json_boolean(p->attn_bias));
        json_object_set_new(c, "mlp_bias", json_false());
    }
    if (!strcmp(p->arch, "mistral")) json_object_set_new(c, "sliding_window", json_null());
    if (p->levels)
        json_object_set_new(c, "mka", json_pack("{s:i,s:f}", "levels", p->levels, "ema_beta", 0.9));
    m->config = c;

    const char *dt = p->dtype;
    int D = p->D, Hd = p->heads * hd, KVd = p->kv * hd;
    tm_add(m, dt, p->vocab, D, "model.embed_tokens.weight");
    const char *att = p->original_attn ? "self_attn.original_attn" : "self_attn";
    int qkv_bias = qwen2 || p->attn_bias, o_bias = !qwen2 && p->attn_bias;
    for (int i = 0; i < p->layers; i++) {
        tm_add(m, dt, D, 0, "model.layers.%d.input_layernorm.weight", i);
        tm_add(m, dt, Hd, D, "model.layers.%d.%s.q_proj.weight", i, att);
        tm_add(m, dt, KVd, D, "model.layers.%d.%s.k_proj.weight", i, att);
        tm_add(m, dt, KVd, D, "model.layers.%d.%s.v_proj.weight", i, att);
        tm_add(m, dt, D, Hd, "model.layers.%d.%s.o_proj.weight", i, att);
        if (qkv_bias) {
            tm_add(m, dt, Hd, 0, "model.layers.%d.%s.q_proj.bias", i, att);
            tm_add(m, dt, KVd, 0, "model.layers.%d.%s.k_proj.bias", i, att);
            tm_add(m, dt, KVd, 0, "model.layers.%d.%s.v_proj.bias", i, att);
        }
        if (o_bias) tm_add(m, dt, D, 0, "model.layers.%d.%s.o_proj.bias", i, att);
        if (p->levels) {
            tm_add(m, dt, D / 2, Hd, "model.layers.%d.self_attn.router.0.weight", i);
            tm_add(m, dt, D / 2, 0, "model.layers.%d.self_attn.router.0.bias", i);
            tm_add(m, dt, p->levels, D / 2, "model.layers.%d.self_attn.router.2.weight", i);
            tm_add(m, dt, p->levels, 0, "model.layers.%d.self_attn.router.2.bias", i);
        }
        tm_add(m, dt, D, 0, "model.layers.%d.post_attention_layernorm.weight", i);
        tm_add(m, dt, p->ffn, D, "model.layers.%d.mlp.gate_proj.weight", i);
        tm_add(m, dt, p->ffn, D, "model.layers.%d.mlp.up_proj.weight", i);
        tm_add(m, dt, D, p->ffn, "model.layers.%d.mlp.down_proj.weight", i);
    }
    tm_add(m, dt, D, 0, "model.norm.weight");
    if (!p->tied || p->write_lm_head) tm_add(m, dt, p->vocab, D, "lm_head.weight")->unused = p->tied;
}

static void tm_free(tm_model *m)
{
    for (int i = 0; i < m->n; i++) free(m->t[i].data);
    json_decref(m->config);
    memset(m, 0, sizeof *m);
}

/* Writes one safetensors file the way the reference writer does: header
 * padded with spaces to a multiple of 8, tensors contiguous in list order. */
static void st_write(const char *dir, const char *fname, tm_tensor *const *ts, int n)
{
    json_t *h = json_object();
    json_object_set_new(h, "__metadata__", json_pack("{s:s}", "format", "pt"));
    size_t off = 0;
    for (int i = 0; i < n; i++) {
        const tm_tensor *t = ts[i];
        json_t *shape = json_array();
        for (int d = 0; d < t->ndim; d++) json_array_append_new(shape, json_integer(t->shape[d]));
        json_object_set_new(h, t->name,
                            json_pack("{s:s,s:o,s:[I,I]}", "dtype", t->dtype, "shape", shape,
                                      "data_offsets", (json_int_t)off, (json_int_t)(off + t->nbytes)));
        off += t->nbytes;
    }
    char *hs = json_dumps(h, JSON_COMPACT);
    json_decref(h);
    size_t hl = strlen(hs), padded = (hl + 7) / 8 * 8;
    size_t total = 8 + padded + off;
    unsigned char *buf = malloc(total);
    ck_assert_ptr_nonnull(buf);
    for (int b = 0; b < 8; b++) buf[b] = (unsigned char)((uint64_t)padded >> (8 * b));
    memcpy(buf + 8, hs, hl);
    memset(buf + 8 + hl, ' ', padded - hl);
    size_t o = 8 + padded;
    for (int i = 0; i < n; i++) {
        memcpy(buf + o, ts[i]->data, ts[i]->nbytes);
        o += ts[i]->nbytes;
    }
    ck_assert_int_eq(tu_write_file(dir, fname, buf, total), 0);
    free(buf);
    free(hs);
}

/* Writes a raw safetensors file: header length field hlen (as given), header
 * text, then data. */
static void st_write_raw(const char *dir, const char *fname, uint64_t hlen, const char *header,
                         const void *data, size_t dlen)
{
    size_t hl = strlen(header);
    unsigned char *buf = malloc(8 + hl + dlen + 1);
    for (int b = 0; b < 8; b++) buf[b] = (unsigned char)(hlen >> (8 * b));
    memcpy(buf + 8, header, hl);
    if (dlen) memcpy(buf + 8 + hl, data, dlen);
    ck_assert_int_eq(tu_write_file(dir, fname, buf, 8 + hl + dlen), 0);
    free(buf);
}

static void write_json(const char *dir, const char *fname, json_t *j)
{
    char *s = json_dumps(j, JSON_INDENT(2));
    ck_assert_int_eq(tu_write_file(dir, fname, s, strlen(s)), 0);
    free(s);
}

static void rm_rf_mkdir(const char *dir)
{
    char cmd[4400];
    snprintf(cmd, sizeof cmd, "rm -rf '%s' && mkdir -p '%s'", dir, dir);
    ck_assert_int_eq(system(cmd), 0);
}

/* A fresh directory tu_tmpdir()/loader/<name> (test-private). */
static const char *test_dir(const char *name, char *buf, size_t len)
{
    int w = snprintf(buf, len, "%s/loader/%s", tu_tmpdir(), name);
    ck_assert(w > 0 && (size_t)w < len);
    rm_rf_mkdir(buf);
    return buf;
}

static void tm_write(tm_model *m, const char *dir)
{
    rm_rf_mkdir(dir);
    write_json(dir, "config.json", m->config);
    tm_tensor *ts[TM_MAX_TENSORS];
    if (m->shards <= 1) {
        for (int i = 0; i < m->n; i++) ts[i] = &m->t[i];
        st_write(dir, "model.safetensors", ts, m->n);
        return;
    }
    json_t *wm = json_object();
    for (int s = 0; s < m->shards; s++) {
        char fname[64];
        snprintf(fname, sizeof fname, "model-%05d-of-%05d.safetensors", s + 1, m->shards);
        int k = 0;
        for (int i = s; i < m->n; i += m->shards) {
            ts[k++] = &m->t[i];
            json_object_set_new(wm, m->t[i].name, json_string(fname));
        }
        st_write(dir, fname, ts, k);
    }
    json_t *idx = json_pack("{s:{s:i},s:o}", "metadata", "total_size", 0, "weight_map", wm);
    write_json(dir, "model.safetensors.index.json", idx);
    json_decref(idx);
}

/* Builds the fixture with params p and writes it to dir. */
static void make_model(const char *dir, const tm_params *p, tm_model *m)
{
    tm_build(m, p);
    tm_write(m, dir);
}

/* ---- loading helpers -------------------------------------------------------- */

static eng_model *load_ok(const char *dir)
{
    char err[512] = "";
    eng_model *m = NULL;
    int rc = eng_model_load(dir, &m, err, sizeof err);
    ck_assert_msg(rc == ENG_OK, "load '%s' failed (%d): %s", dir, rc, err);
    ck_assert_ptr_nonnull(m);
    return m;
}

/* Loads dir expecting status `want`, no model, and a one-line message that
 * contains each of the non-NULL fragments a, b, c. */
static void load_fail(const char *dir, int want, const char *a, const char *b, const char *c)
{
    char err[512];
    memset(err, 'x', sizeof err);
    err[sizeof err - 1] = '\0';
    eng_model *m = (eng_model *)&err; /* must be reset to NULL */
    int rc = eng_model_load(dir, &m, err, sizeof err);
    ck_assert_msg(rc == want, "status %d (%s), expected %d: %s", rc, eng_strerror(rc), want, err);
    ck_assert_ptr_null(m);
    if (getenv("TEST_LOADER_VERBOSE")) fprintf(stderr, "%-16s %s\n", eng_strerror(rc), err);
    ck_assert_msg(strchr(err, '\n') == NULL, "message has a newline: %s", err);
    const char *frag[3] = {a, b, c};
    for (int i = 0; i < 3; i++)
        ck_assert_msg(!frag[i] || strstr(err, frag[i]), "message '%s' does not mention '%s'", err,
                      frag[i]);
}

/* The default fixture parameters (D 8, 2 layers, 2 heads, 1 kv head, ffn 16, vocab 32). */
static tm_params P(void) { return tm_defaults(); }

/* ---- independent references ------------------------------------------------- */

/* IEEE binary16 -> float by arithmetic (not bit manipulation). */
static float ref_f16(uint16_t h)
{
    int s = h >> 15, e = (h >> 10) & 31, f = h & 1023;
    float v;
    if (e == 0) v = ldexpf((float)f, -24);
    else if (e == 31) v = f ? NAN : INFINITY;
    else v = ldexpf((float)(f + 1024), e - 25);
    return s ? -v : v;
}

static float ref_elem(const tm_tensor *t, size_t i)
{
    const unsigned char *p = t->data;
    if (!strcmp(t->dtype, "F32")) {
        uint32_t u = (uint32_t)p[4 * i] | (uint32_t)p[4 * i + 1] << 8 | (uint32_t)p[4 * i + 2] << 16 |
                     (uint32_t)p[4 * i + 3] << 24;
        float f;
        memcpy(&f, &u, 4);
        return f;
    }
    uint16_t h = (uint16_t)(p[2 * i] | p[2 * i + 1] << 8);
    if (!strcmp(t->dtype, "F16")) return ref_f16(h);
    /* bf16: value = (-1)^s * 2^(e-127) * (1 + m/128) for normals */
    int s = h >> 15, e = (h >> 7) & 255, f = h & 127;
    float v = e == 0 ? ldexpf((float)f, -133) : e == 255 ? (f ? NAN : INFINITY)
                                                         : ldexpf((float)(f + 128), e - 134);
    return s ? -v : v;
}

/* A view of one tensor in the arena: f32 (f) or, for matrices stored as
 * BF16, bf16 bits (h). */
typedef struct view { const float *f; const uint16_t *h; } view;

static view lin_view(const eng_linear *l) { return (view){l->w, l->w16}; }
static view vec_view(const float *p) { return (view){p, NULL}; }
static float view_elem(view v, size_t i) { return v.f ? v.f[i] : eng__bf16_to_f32(v.h[i]); }
static float emb(const eng_model *m, size_t i) { return view_elem(lin_view(&m->embed), i); }

/* The model's view of tensor `name`, {NULL, NULL} when it has none. */
static view view_of(const eng_model *m, const char *name)
{
    view none = {NULL, NULL};
    if (!strcmp(name, "model.embed_tokens.weight")) return lin_view(&m->embed);
    if (!strcmp(name, "model.norm.weight")) return vec_view(m->final_norm);
    if (!strcmp(name, "lm_head.weight")) return lin_view(&m->lm_head);
    int i, n = 0;
    if (sscanf(name, "model.layers.%d.%n", &i, &n) != 1 || n == 0) return none;
    ck_assert_int_lt(i, m->info.n_layers);
    const eng_layer *l = &m->layers[i];
    char rest[160];
    const char *r = name + n;
    if (!strncmp(r, "self_attn.original_attn.", 24)) {
        snprintf(rest, sizeof rest, "self_attn.%s", r + 24);
        r = rest;
    }
    static const char *names[] = {"input_layernorm.weight", "post_attention_layernorm.weight",
                                  "self_attn.q_proj.weight", "self_attn.q_proj.bias",
                                  "self_attn.k_proj.weight", "self_attn.k_proj.bias",
                                  "self_attn.v_proj.weight", "self_attn.v_proj.bias",
                                  "self_attn.o_proj.weight", "self_attn.o_proj.bias",
                                  "self_attn.router.0.weight", "self_attn.router.0.bias",
                                  "self_attn.router.2.weight", "self_attn.router.2.bias",
                                  "mlp.gate_proj.weight", "mlp.up_proj.weight",
                                  "mlp.down_proj.weight"};
    const view views[] = {vec_view(l->attn_norm), vec_view(l->mlp_norm), lin_view(&l->q),
                          vec_view(l->q.b), lin_view(&l->k), vec_view(l->k.b), lin_view(&l->v),
                          vec_view(l->v.b), lin_view(&l->o), vec_view(l->o.b),
                          lin_view(&l->router1), vec_view(l->router1.b), lin_view(&l->router2),
                          vec_view(l->router2.b), lin_view(&l->gate), lin_view(&l->up),
                          lin_view(&l->down)};
    for (size_t k = 0; k < sizeof names / sizeof names[0]; k++)
        if (!strcmp(r, names[k])) return views[k];
    return none;
}

/* Every tensor the model uses must appear, converted exactly, inside the
 * arena; BF16 matrices stay bf16 (half the memory), everything else is f32. */
static void check_views(const tm_model *tm, const eng_model *m)
{
    for (int k = 0; k < tm->n; k++) {
        const tm_tensor *t = &tm->t[k];
        if (t->unused) continue;
        view v = view_of(m, t->name);
        ck_assert_msg(v.f || v.h, "model has no view of %s", t->name);
        ck_assert_msg(!v.f || !v.h, "%s has two views", t->name);
        int want16 = !strcmp(t->dtype, "BF16") && t->ndim == 2;
        ck_assert_msg(want16 == (v.h != NULL), "%s: bf16 matrices stay bf16, the rest is f32",
                      t->name);
        size_t n = tm_numel(t);
        const unsigned char *p = v.f ? (const void *)v.f : (const void *)v.h;
        ck_assert_msg(p >= m->arena && p + n * (v.f ? 4 : 2) <= m->arena + m->arena_bytes,
                      "%s outside the arena", t->name);
        ck_assert_msg(((uintptr_t)p & 63) == 0, "%s not 64-byte aligned", t->name);
        for (size_t i = 0; i < n; i++) {
            float want = ref_elem(t, i), got = view_elem(v, i);
            if (isnan(want)) ck_assert_msg(isnan(got), "%s[%zu]", t->name, i);
            else
                ck_assert_msg(got == want && signbit(got) == signbit(want),
                              "%s[%zu] = %a, expected %a", t->name, i, (double)got, (double)want);
        }
    }
}

/* ---- valid models --------------------------------------------------------------- */

static void check_common_info(const eng_model *m, const tm_params *p)
{
    const eng_model_info *in = eng_model_get_info(m);
    ck_assert_ptr_eq(in, &m->info);
    ck_assert_int_eq(in->n_layers, p->layers);
    ck_assert_int_eq(in->d_model, p->D);
    ck_assert_int_eq(in->n_heads, p->heads);
    ck_assert_int_eq(in->n_kv_heads, p->kv);
    ck_assert_int_eq(in->head_dim, p->head_dim ? p->head_dim : p->D / p->heads);
    ck_assert_int_eq(in->ffn_dim, p->ffn);
    ck_assert_int_eq(in->vocab_size, p->vocab);
    ck_assert_int_eq(in->max_position, 256);
    ck_assert_int_eq(in->bos_token_id, 1);
    ck_assert_int_eq(in->eos_token_id, 2);
    ck_assert_int_eq(strlen(in->fingerprint), 16);
    ck_assert_int_eq((int)strspn(in->fingerprint, "0123456789abcdef"), 16);
    ck_assert_float_eq_tol(m->rms_eps, 1e-5f, 1e-12f);
    ck_assert_float_eq(m->rope_attn_scale, 1.0f);
    int hd = in->head_dim;
    for (int i = 0; i < hd / 2; i++) {
        double ref = 1.0 / pow(10000.0, 2.0 * i / hd);
        ck_assert_double_eq_tol(m->rope_inv_freq[i], ref, ref * 1e-6);
    }
    ck_assert_ptr_nonnull(m->layers);
    const eng_layer *l = &m->layers[0];
    int Hd = in->n_heads * hd, KVd = in->n_kv_heads * hd;
    ck_assert_int_eq(l->q.rows, Hd);
    ck_assert_int_eq(l->q.cols, p->D);
    ck_assert_int_eq(l->k.rows, KVd);
    ck_assert_int_eq(l->v.rows, KVd);
    ck_assert_int_eq(l->o.rows, p->D);
    ck_assert_int_eq(l->o.cols, Hd);
    ck_assert_int_eq(l->gate.rows, p->ffn);
    ck_assert_int_eq(l->up.cols, p->D);
    ck_assert_int_eq(l->down.rows, p->D);
    ck_assert_int_eq(l->down.cols, p->ffn);
    ck_assert_ptr_null(l->gate.b);
    ck_assert_ptr_null(l->down.b);
}

START_TEST(test_qwen2_f32)
{
    char dir[1024];
    test_dir("qwen2_f32", dir, sizeof dir);
    tm_params p = P();
    tm_model tm;
    make_model(dir, &p, &tm);
    eng_model *m = load_ok(dir);
    check_common_info(m, &p);
    const eng_model_info *in = eng_model_get_info(m);
    ck_assert_str_eq(in->arch, "qwen2");
    ck_assert_str_eq(in->dtype, "f32");
    ck_assert_int_eq(in->mka_levels, 0);
    ck_assert_int_eq(in->tied_embeddings, 0);
    ck_assert_float_eq(in->ema_beta, 0.9f);
    ck_assert_int_eq(in->l3_chunk_tokens, 64);
    ck_assert_int_eq(in->l3_top_r, 8);
    for (int i = 0; i < p.layers; i++) {
        const eng_layer *l = &m->layers[i];
        ck_assert_ptr_nonnull(l->q.b);
        ck_assert_ptr_nonnull(l->k.b);
        ck_assert_ptr_nonnull(l->v.b);
        ck_assert_ptr_null(l->o.b);
        ck_assert_ptr_null(l->router1.w);
    }
    ck_assert_ptr_ne(lin_view(&m->lm_head).f, lin_view(&m->embed).f);
    check_views(&tm, m);
    eng_model_free(m);
    tm_free(&tm);
}
END_TEST

START_TEST(test_qwen2_bf16)
{
    char dir[1024];
    test_dir("qwen2_bf16", dir, sizeof dir);
    tm_params p = P();
    p.dtype = "BF16";
    tm_model tm;
    tm_build(&tm, &p);
    /* known values: 1, -3, the smallest bf16 subnormal, +inf, -0 */
    static const uint16_t pat[] = {0x3f80, 0xc040, 0x0001, 0x7f80, 0x8000};
    unsigned char *e = tm_find(&tm, "model.embed_tokens.weight")->data;
    for (int i = 0; i < 5; i++) e[2 * i] = (unsigned char)pat[i], e[2 * i + 1] = (unsigned char)(pat[i] >> 8);
    tm_write(&tm, dir);
    eng_model *m = load_ok(dir);
    check_common_info(m, &p);
    ck_assert_str_eq(m->info.dtype, "bf16");
    ck_assert_ptr_nonnull(m->embed.w16); /* bf16 matrices stay bf16 */
    ck_assert(emb(m, 0) == 1.0f);
    ck_assert(emb(m, 1) == -3.0f);
    ck_assert(emb(m, 2) == ldexpf(1.0f, -133));
    ck_assert(isinf(emb(m, 3)) && emb(m, 3) > 0);
    ck_assert(emb(m, 4) == 0.0f && signbit(emb(m, 4)));
    check_views(&tm, m);
    eng_model_free(m);
    tm_free(&tm);
}
END_TEST

START_TEST(test_qwen2_f16)
{
    char dir[1024];
    test_dir("qwen2_f16", dir, sizeof dir);
    tm_params p = P();
    p.dtype = "F16";
    tm_model tm;
    tm_build(&tm, &p);
    static const uint16_t pat[] = {0x0001, 0x03ff, 0x8001, 0x0400, 0x3c00, 0x3555,
                                   0x7bff, 0x7c00, 0xfc00, 0x8000, 0x7e01};
    const int np = (int)(sizeof pat / sizeof pat[0]);
    unsigned char *e = tm_find(&tm, "model.embed_tokens.weight")->data;
    for (int i = 0; i < np; i++) e[2 * i] = (unsigned char)pat[i], e[2 * i + 1] = (unsigned char)(pat[i] >> 8);
    tm_write(&tm, dir);
    eng_model *m = load_ok(dir);
    check_common_info(m, &p);
    ck_assert_str_eq(m->info.dtype, "f16");
    const float *v = m->embed.w;
    ck_assert_ptr_nonnull(v); /* f16 is widened to f32 at load */
    ck_assert(v[0] == 5.9604644775390625e-08f);      /* 2^-24, smallest subnormal */
    ck_assert(v[1] == 6.09755516052246094e-05f);      /* 1023 * 2^-24, largest subnormal */
    ck_assert(v[2] == -5.9604644775390625e-08f);
    ck_assert(v[3] == 6.103515625e-05f);              /* 2^-14, smallest normal */
    ck_assert(v[4] == 1.0f);
    ck_assert(v[5] == 0.333251953125f);
    ck_assert(v[6] == 65504.0f);
    ck_assert(isinf(v[7]) && v[7] > 0);
    ck_assert(isinf(v[8]) && v[8] < 0);
    ck_assert(v[9] == 0.0f && signbit(v[9]));
    ck_assert(isnan(v[10]));
    uint32_t bits;
    memcpy(&bits, &v[10], 4);
    ck_assert_uint_eq(bits, 0x7fc02000u); /* quiet bit and payload kept */
    check_views(&tm, m);
    eng_model_free(m);
    tm_free(&tm);
}
END_TEST

/* Exhaustive check of the half conversion against the arithmetic reference. */
START_TEST(test_f16_all_values)
{
    for (uint32_t h = 0; h < 65536; h++) {
        float a = eng_st_f16_to_f32((uint16_t)h), b = ref_f16((uint16_t)h);
        if (isnan(b)) ck_assert_msg(isnan(a), "0x%04x", h);
        else ck_assert_msg(a == b && signbit(a) == signbit(b), "0x%04x: %a vs %a", h, (double)a, (double)b);
    }
}
END_TEST

START_TEST(test_llama_untied)
{
    char dir[1024];
    test_dir("llama_untied", dir, sizeof dir);
    tm_params p = P();
    p.arch = "llama";
    p.kv = 2;
    tm_model tm;
    make_model(dir, &p, &tm);
    eng_model *m = load_ok(dir);
    check_common_info(m, &p);
    ck_assert_str_eq(m->info.arch, "llama");
    ck_assert_int_eq(m->info.tied_embeddings, 0);
    ck_assert_ptr_ne(lin_view(&m->lm_head).f, lin_view(&m->embed).f);
    ck_assert_ptr_null(m->layers[0].q.b);
    ck_assert_ptr_null(m->layers[1].o.b);
    check_views(&tm, m);
    eng_model_free(m);
    tm_free(&tm);
}
END_TEST

START_TEST(test_llama_tied)
{
    char dir[1024];
    test_dir("llama_tied", dir, sizeof dir);
    tm_params p = P();
    p.arch = "llama";
    p.tied = 1;
    tm_model tm;
    make_model(dir, &p, &tm);
    eng_model *m = load_ok(dir);
    ck_assert_int_eq(m->info.tied_embeddings, 1);
    ck_assert_ptr_eq(lin_view(&m->lm_head).f, lin_view(&m->embed).f);
    check_views(&tm, m);
    eng_model_free(m);
    tm_free(&tm);

    /* tied with an lm_head.weight in the file: the embedding still wins */
    p.write_lm_head = 1;
    make_model(dir, &p, &tm);
    m = load_ok(dir);
    ck_assert_ptr_eq(lin_view(&m->lm_head).f, lin_view(&m->embed).f);
    check_views(&tm, m);
    eng_model_free(m);
    tm_free(&tm);
}
END_TEST

START_TEST(test_llama_attention_bias)
{
    char dir[1024];
    test_dir("llama_bias", dir, sizeof dir);
    tm_params p = P();
    p.arch = "llama";
    p.attn_bias = 1;
    tm_model tm;
    make_model(dir, &p, &tm);
    eng_model *m = load_ok(dir);
    ck_assert_ptr_nonnull(m->layers[0].q.b);
    ck_assert_ptr_nonnull(m->layers[0].o.b);
    check_views(&tm, m);
    eng_model_free(m);
    /* attention_bias true makes the o_proj bias required */
    tm_remove(&tm, "model.layers.1.self_attn.o_proj.bias");
    tm_write(&tm, dir);
    load_fail(dir, ENG_EFORMAT, "model.safetensors", "'model.layers.1.self_attn.o_proj.bias' is missing",
              NULL);
    tm_free(&tm);
}
END_TEST

START_TEST(test_mistral)
{
    char dir[1024];
    test_dir("mistral", dir, sizeof dir);
    tm_params p = P();
    p.arch = "mistral";
    tm_model tm;
    make_model(dir, &p, &tm);
    eng_model *m = load_ok(dir);
    ck_assert_str_eq(m->info.arch, "llama");
    eng_model_free(m);
    json_object_set_new(tm.config, "sliding_window", json_integer(4096));
    tm_write(&tm, dir);
    load_fail(dir, ENG_EUNSUPPORTED, "config.json", "'sliding_window'", NULL);
    tm_free(&tm);
}
END_TEST

START_TEST(test_sharded)
{
    char d1[1024], d3[1024];
    test_dir("single", d1, sizeof d1);
    test_dir("sharded", d3, sizeof d3);
    tm_params p = P();
    tm_model tm;
    make_model(d1, &p, &tm);
    tm.shards = 3;
    tm_write(&tm, d3);
    eng_model *m1 = load_ok(d1), *m3 = load_ok(d3);
    check_views(&tm, m3);
    /* the fingerprint covers config and tensors, not how they are split */
    ck_assert_str_eq(m1->info.fingerprint, m3->info.fingerprint);
    eng_model_free(m1);
    eng_model_free(m3);
    tm_free(&tm);
}
END_TEST

START_TEST(test_both_single_and_index)
{
    /* As in transformers, model.safetensors wins over an index next to it. */
    char dir[1024];
    test_dir("both", dir, sizeof dir);
    tm_params p = P();
    tm_model tm;
    make_model(dir, &p, &tm);
    json_t *idx = json_pack("{s:{s:s}}", "weight_map", "model.norm.weight", "absent.safetensors");
    write_json(dir, "model.safetensors.index.json", idx);
    json_decref(idx);
    eng_model *m = load_ok(dir);
    eng_model_free(m);
    tm_free(&tm);
}
END_TEST

static void router_case(const char *name, int levels, int mka_block)
{
    char dir[1024];
    test_dir(name, dir, sizeof dir);
    tm_params p = P();
    p.levels = levels;
    tm_model tm;
    tm_build(&tm, &p);
    if (!mka_block) json_object_del(tm.config, "mka");
    else
        json_object_set_new(tm.config, "mka",
                            json_pack("{s:i,s:f,s:i,s:i}", "levels", levels, "ema_beta", 0.5,
                                      "l3_chunk_tokens", 32, "l3_top_r", 4));
    tm_write(&tm, dir);
    eng_model *m = load_ok(dir);
    ck_assert_int_eq(m->info.mka_levels, levels);
    for (int i = 0; i < p.layers; i++) {
        const eng_layer *l = &m->layers[i];
        ck_assert_ptr_nonnull(l->router1.w);
        ck_assert_ptr_nonnull(l->router1.b);
        ck_assert_int_eq(l->router1.rows, p.D / 2);
        ck_assert_int_eq(l->router1.cols, p.heads * (p.D / p.heads));
        ck_assert_int_eq(l->router2.rows, levels);
        ck_assert_int_eq(l->router2.cols, p.D / 2);
    }
    if (mka_block) {
        ck_assert_float_eq(m->info.ema_beta, 0.5f);
        ck_assert_int_eq(m->info.l3_chunk_tokens, 32);
        ck_assert_int_eq(m->info.l3_top_r, 4);
    } else {
        ck_assert_float_eq(m->info.ema_beta, 0.9f);
    }
    check_views(&tm, m);
    eng_model_free(m);
    tm_free(&tm);
}

START_TEST(test_router_l2) { router_case("router_l2", 2, 1); }
END_TEST
START_TEST(test_router_l3) { router_case("router_l3", 3, 1); }
END_TEST
START_TEST(test_router_l3_no_mka_block) { router_case("router_l3_nocfg", 3, 0); }
END_TEST

START_TEST(test_no_router_with_mka_block)
{
    /* mka block without router weights: plain attention */
    char dir[1024];
    test_dir("norouter_mka", dir, sizeof dir);
    tm_params p = P();
    tm_model tm;
    tm_build(&tm, &p);
    json_object_set_new(tm.config, "mka", json_pack("{s:i}", "levels", 3));
    tm_write(&tm, dir);
    eng_model *m = load_ok(dir);
    ck_assert_int_eq(m->info.mka_levels, 0);
    ck_assert_ptr_null(m->layers[0].router1.w);
    eng_model_free(m);
    tm_free(&tm);
}
END_TEST

START_TEST(test_original_attn)
{
    char dir[1024];
    test_dir("original_attn", dir, sizeof dir);
    tm_params p = P();
    p.original_attn = 1;
    p.levels = 3;
    tm_model tm;
    make_model(dir, &p, &tm);
    eng_model *m = load_ok(dir);
    ck_assert_int_eq(m->info.mka_levels, 3);
    ck_assert_ptr_nonnull(m->layers[1].q.b);
    check_views(&tm, m);
    eng_model_free(m);
    tm_free(&tm);
}
END_TEST

START_TEST(test_config_defaults)
{
    char dir[1024];
    test_dir("defaults", dir, sizeof dir);
    tm_params p = P();
    p.kv = 2;
    tm_model tm;
    tm_build(&tm, &p);
    static const char *drop[] = {"num_key_value_heads", "max_position_embeddings", "rms_norm_eps",
                                 "rope_theta", "tie_word_embeddings", "hidden_act",
                                 "bos_token_id", "torch_dtype", "architectures"};
    for (size_t i = 0; i < sizeof drop / sizeof drop[0]; i++) json_object_del(tm.config, drop[i]);
    json_object_set_new(tm.config, "head_dim", json_null());
    json_object_set_new(tm.config, "eos_token_id", json_pack("[i,i]", 7, 9));
    json_object_set_new(tm.config, "dtype", json_string("bfloat16")); /* v5 spelling */
    tm_write(&tm, dir);
    eng_model *m = load_ok(dir);
    const eng_model_info *in = &m->info;
    ck_assert_str_eq(in->arch, "qwen2"); /* from model_type */
    ck_assert_int_eq(in->n_kv_heads, 2);
    ck_assert_int_eq(in->head_dim, 4);
    ck_assert_int_eq(in->max_position, 4096);
    ck_assert_float_eq_tol(m->rms_eps, 1e-6f, 1e-13f);
    ck_assert_int_eq(in->bos_token_id, -1);
    ck_assert_int_eq(in->eos_token_id, 7);
    ck_assert_int_eq(in->tied_embeddings, 0);
    eng_model_free(m);
    json_object_set_new(tm.config, "eos_token_id", json_null());
    tm_write(&tm, dir);
    m = load_ok(dir);
    ck_assert_int_eq(m->info.eos_token_id, -1);
    eng_model_free(m);
    tm_free(&tm);
}
END_TEST

START_TEST(test_explicit_head_dim)
{
    char dir[1024];
    test_dir("head_dim", dir, sizeof dir);
    tm_params p = P();
    p.head_dim = 6; /* H*d = 12 != D = 8 */
    p.levels = 2;
    tm_model tm;
    make_model(dir, &p, &tm);
    eng_model *m = load_ok(dir);
    ck_assert_int_eq(m->info.head_dim, 6);
    ck_assert_int_eq(m->layers[0].q.rows, 12);
    ck_assert_int_eq(m->layers[0].o.cols, 12);
    ck_assert_int_eq(m->layers[0].router1.cols, 12);
    check_views(&tm, m);
    eng_model_free(m);
    tm_free(&tm);
}
END_TEST

/* An unused tensor of a dtype the engine cannot convert is harmless. */
START_TEST(test_unused_other_dtype)
{
    char dir[1024];
    test_dir("unused_i64", dir, sizeof dir);
    tm_params p = P();
    tm_model tm;
    tm_build(&tm, &p);
    tm_add(&tm, "I64", 5, 0, "model.rotary_emb.position_ids")->unused = 1;
    tm_add(&tm, "F32", 2, 0, "model.layers.0.self_attn.o_proj.bias")->unused = 1; /* qwen2: ignored */
    tm_write(&tm, dir);
    eng_model *m = load_ok(dir);
    ck_assert_ptr_null(m->layers[0].o.b);
    check_views(&tm, m);
    eng_model_free(m);
    tm_free(&tm);
}
END_TEST

/* ---- fingerprint ------------------------------------------------------------------ */

/* Appends n bytes to the growing buffer *buf (length *len). */
static void ref_append(unsigned char **buf, size_t *len, const void *data, size_t n)
{
    *buf = realloc(*buf, *len + n);
    ck_assert_ptr_nonnull(*buf);
    memcpy(*buf + *len, data, n);
    *len += n;
}

static int cmp_tensor_name(const void *a, const void *b)
{
    return strcmp((*(const tm_tensor *const *)a)->name, (*(const tm_tensor *const *)b)->name);
}

/* The fingerprint as docs/model-format.md specifies it. */
static void ref_fingerprint(const char *dir, tm_model *tm, char out[17])
{
    char path[4200];
    snprintf(path, sizeof path, "%s/config.json", dir);
    FILE *f = fopen(path, "rb");
    ck_assert_ptr_nonnull(f);
    char buf[65536];
    size_t n = fread(buf, 1, sizeof buf, f);
    fclose(f);
    /* The whole byte stream, hashed at once (the loader streams it). */
    unsigned char *all = NULL;
    size_t len = 0;
    ref_append(&all, &len, buf, n);
    tm_tensor *ts[TM_MAX_TENSORS];
    for (int i = 0; i < tm->n; i++) ts[i] = &tm->t[i];
    qsort(ts, (size_t)tm->n, sizeof ts[0], cmp_tensor_name);
    for (int i = 0; i < tm->n; i++) {
        const tm_tensor *t = ts[i];
        ref_append(&all, &len, t->name, strlen(t->name) + 1);
        ref_append(&all, &len, t->dtype, strlen(t->dtype) + 1);
        uint64_t dims[3] = {(uint64_t)t->ndim, (uint64_t)t->shape[0], (uint64_t)t->shape[1]};
        for (int d = 0; d <= t->ndim; d++)
            for (int b = 0; b < 8; b++) {
                unsigned char c = (unsigned char)(dims[d] >> (8 * b));
                ref_append(&all, &len, &c, 1);
            }
        ref_append(&all, &len, t->data, t->nbytes);
    }
    uint64_t h = XXH3_64bits(all, len);
    free(all);
    snprintf(out, 17, "%016llx", (unsigned long long)h);
}

START_TEST(test_fingerprint)
{
    char dir[1024];
    test_dir("fingerprint", dir, sizeof dir);
    tm_params p = P();
    p.vocab = 8192; /* embed and lm_head are 256 KiB */
    tm_model tm;
    make_model(dir, &p, &tm);
    char ref[17];
    ref_fingerprint(dir, &tm, ref);
    eng_model *m = load_ok(dir);
    ck_assert_str_eq(m->info.fingerprint, ref);
    char fp0[17];
    snprintf(fp0, sizeof fp0, "%s", m->info.fingerprint);
    eng_model_free(m);

    /* any byte of any tensor is hashed, the middle of a large one too */
    tm_tensor *e = tm_find(&tm, "model.embed_tokens.weight");
    e->data[e->nbytes / 2] ^= 0x40;
    tm_write(&tm, dir);
    m = load_ok(dir);
    ck_assert_str_ne(m->info.fingerprint, fp0);
    ref_fingerprint(dir, &tm, ref);
    ck_assert_str_eq(m->info.fingerprint, ref);
    eng_model_free(m);
    e->data[e->nbytes / 2] ^= 0x40; /* back to fp0's bytes */

    /* and so is every config byte */
    json_object_set_new(tm.config, "rms_norm_eps", json_real(2e-5));
    tm_write(&tm, dir);
    m = load_ok(dir);
    ck_assert_str_ne(m->info.fingerprint, fp0);
    eng_model_free(m);
    tm_free(&tm);
}
END_TEST

/* ---- RoPE ----------------------------------------------------------------------------- */

/* A model with head_dim 128 (D 8, 2 heads) and the given rope settings. */
static eng_model *rope_model(const char *name, json_t *rope_scaling, json_t *rope_parameters,
                             double theta)
{
    char dir[1024];
    test_dir(name, dir, sizeof dir);
    tm_params p = P();
    p.head_dim = 128;
    tm_model tm;
    tm_build(&tm, &p);
    json_object_set_new(tm.config, "max_position_embeddings", json_integer(131072));
    if (theta > 0) json_object_set_new(tm.config, "rope_theta", json_real(theta));
    else json_object_del(tm.config, "rope_theta");
    if (rope_scaling) json_object_set_new(tm.config, "rope_scaling", rope_scaling);
    if (rope_parameters) json_object_set_new(tm.config, "rope_parameters", rope_parameters);
    tm_write(&tm, dir);
    tm_free(&tm);
    return load_ok(dir);
}

static void check_inv_freq(const eng_model *m, const double *ref, int n, double rel)
{
    ck_assert_int_eq(m->info.head_dim / 2, n);
    for (int i = 0; i < n; i++)
        ck_assert_msg(fabs(m->rope_inv_freq[i] - ref[i]) <= rel * ref[i], "inv_freq[%d] = %.9g, expected %.9g",
                      i, (double)m->rope_inv_freq[i], ref[i]);
}

START_TEST(test_rope_v5_rope_parameters)
{
    /* transformers v5: rope_theta inside rope_parameters, no top-level value */
    eng_model *m = rope_model("rope_v5", NULL,
                              json_pack("{s:s,s:f}", "rope_type", "default", "rope_theta", 500000.0), 0);
    double ref[64];
    for (int i = 0; i < 64; i++) ref[i] = 1.0 / pow(500000.0, 2.0 * i / 128);
    check_inv_freq(m, ref, 64, 1e-6);
    ck_assert_float_eq(m->rope_attn_scale, 1.0f);
    eng_model_free(m);

    /* v4: "type" in rope_scaling, top-level rope_theta */
    m = rope_model("rope_v4_linear", json_pack("{s:s,s:f}", "type", "linear", "factor", 4.0), NULL,
                   1e6);
    for (int i = 0; i < 64; i++) ref[i] = 1.0 / pow(1e6, 2.0 * i / 128) / 4.0;
    check_inv_freq(m, ref, 64, 1e-6);
    eng_model_free(m);

    /* rope_scaling null and rope_parameters null: plain RoPE */
    m = rope_model("rope_nulls", json_null(), json_null(), 10000.0);
    for (int i = 0; i < 64; i++) ref[i] = 1.0 / pow(10000.0, 2.0 * i / 128);
    check_inv_freq(m, ref, 64, 1e-6);
    eng_model_free(m);
}
END_TEST

/* Llama 3.1 scaling, reference: Meta's llama-models `apply_scaling`
 * (models/llama3/reference_impl/model.py), evaluated here in double. */
static void ref_llama3(double *out, int dim, double theta, double factor, double low, double high,
                       double ctx)
{
    double low_wl = ctx / low, high_wl = ctx / high;
    for (int i = 0; i < dim / 2; i++) {
        double f = 1.0 / pow(theta, 2.0 * i / dim), wl = 2 * M_PI / f;
        if (wl < high_wl) out[i] = f;
        else if (wl > low_wl) out[i] = f / factor;
        else {
            double s = (ctx / wl - low) / (high - low);
            out[i] = (1 - s) * f / factor + s * f;
        }
    }
}

START_TEST(test_rope_llama3)
{
    eng_model *m = rope_model("rope_llama3",
                              json_pack("{s:s,s:f,s:f,s:f,s:i}", "rope_type", "llama3", "factor", 8.0,
                                        "low_freq_factor", 1.0, "high_freq_factor", 4.0,
                                        "original_max_position_embeddings", 8192),
                              NULL, 500000.0);
    double ref[64];
    ref_llama3(ref, 128, 500000.0, 8.0, 1.0, 4.0, 8192);
    check_inv_freq(m, ref, 64, 2e-6);
    ck_assert_float_eq(m->rope_attn_scale, 1.0f);
    /* all three regimes occur with these settings */
    ck_assert(m->rope_inv_freq[0] == 1.0f);
    ck_assert(ref[63] < 1.0 / pow(500000.0, 126.0 / 128) * 0.2);
    eng_model_free(m);
}
END_TEST

/* YaRN, reference: the paper's implementation (jquesnelle/yarn,
 * scaled_rope/LlamaYaRNScaledRotaryEmbedding: find_correction_range with
 * floor/ceil, linear ramp mask, mscale 0.1*ln(s)+1), in double. */
static double ref_yarn(double *out, int dim, double theta, double s, double orig, double beta_fast,
                       double beta_slow, int truncate)
{
#define CORR(rot) ((dim * log(orig / ((rot) * 2 * M_PI))) / (2 * log(theta)))
    double low = CORR(beta_fast), high = CORR(beta_slow);
#undef CORR
    if (truncate) {
        low = floor(low);
        high = ceil(high);
    }
    low = fmax(low, 0);
    high = fmin(high, dim - 1);
    if (low == high) high += 0.001;
    for (int i = 0; i < dim / 2; i++) {
        double pos = pow(theta, 2.0 * i / dim);
        double ramp = fmin(fmax((i - low) / (high - low), 0), 1);
        double mask = 1 - ramp; /* extrapolation weight */
        out[i] = (1.0 / (s * pos)) * (1 - mask) + (1.0 / pos) * mask;
    }
    return 0.1 * log(s) + 1;
}

START_TEST(test_rope_yarn)
{
    /* Qwen2.5 style, v4 spelling */
    eng_model *m = rope_model("rope_yarn",
                              json_pack("{s:s,s:f,s:i}", "type", "yarn", "factor", 4.0,
                                        "original_max_position_embeddings", 32768),
                              NULL, 1e6);
    double ref[64];
    double att = ref_yarn(ref, 128, 1e6, 4.0, 32768, 32, 1, 1);
    check_inv_freq(m, ref, 64, 2e-6);
    ck_assert_double_eq_tol(m->rope_attn_scale, att, 1e-6);
    ck_assert_double_eq_tol(att, 1.1386294361, 1e-9);
    eng_model_free(m);

    /* v5 spelling, explicit betas, truncate false, mscale/mscale_all_dim */
    m = rope_model("rope_yarn_v5", NULL,
                   json_pack("{s:s,s:f,s:f,s:i,s:f,s:f,s:b,s:f,s:f}", "rope_type", "yarn",
                             "rope_theta", 10000.0, "factor", 8.0,
                             "original_max_position_embeddings", 4096, "beta_fast", 16.0,
                             "beta_slow", 2.0, "truncate", 0, "mscale", 1.0, "mscale_all_dim", 0.5),
                   0);
    ref_yarn(ref, 128, 10000.0, 8.0, 4096, 16, 2, 0);
    check_inv_freq(m, ref, 64, 2e-6);
    double want = (0.1 * 1.0 * log(8.0) + 1) / (0.1 * 0.5 * log(8.0) + 1);
    ck_assert_double_eq_tol(m->rope_attn_scale, want, 1e-6);
    eng_model_free(m);

    /* explicit attention_factor */
    m = rope_model("rope_yarn_af",
                   json_pack("{s:s,s:f,s:i,s:f}", "rope_type", "yarn", "factor", 2.0,
                             "original_max_position_embeddings", 8192, "attention_factor", 1.25),
                   NULL, 10000.0);
    ck_assert_float_eq(m->rope_attn_scale, 1.25f);
    eng_model_free(m);
}
END_TEST

/* ---- negative: directory and config.json ------------------------------------------- */

START_TEST(test_bad_args)
{
    char err[128];
    eng_model *m = (eng_model *)err;
    ck_assert_int_eq(eng_model_load(NULL, &m, err, sizeof err), ENG_EINVAL);
    ck_assert_ptr_null(m);
    ck_assert_int_eq(eng_model_load("/", NULL, NULL, 0), ENG_EINVAL);
    ck_assert_ptr_null(eng_model_get_info(NULL));
    eng_model_free(NULL);
}
END_TEST

START_TEST(test_missing_dir)
{
    char dir[4200];
    snprintf(dir, sizeof dir, "%s/loader/does-not-exist", tu_tmpdir());
    load_fail(dir, ENG_EIO, "does-not-exist", "No such file", NULL);
}
END_TEST

START_TEST(test_missing_config)
{
    char dir[1024];
    test_dir("missing_config", dir, sizeof dir);
    tm_params p = P();
    tm_model tm;
    make_model(dir, &p, &tm);
    char path[4200];
    snprintf(path, sizeof path, "%s/config.json", dir);
    ck_assert_int_eq(unlink(path), 0);
    load_fail(dir, ENG_EIO, "config.json", "cannot open", NULL);
    tm_free(&tm);
}
END_TEST

START_TEST(test_bad_json)
{
    char dir[1024];
    test_dir("bad_json", dir, sizeof dir);
    tm_params p = P();
    tm_model tm;
    make_model(dir, &p, &tm);
    const char *bad = "{\"hidden_size\": 8,, }";
    tu_write_file(dir, "config.json", bad, strlen(bad));
    load_fail(dir, ENG_EFORMAT, "config.json", "invalid JSON", "line 1");
    tu_write_file(dir, "config.json", "[1,2]", 5);
    load_fail(dir, ENG_EFORMAT, "config.json", "object", NULL);
    tm_free(&tm);
}
END_TEST

/* Writes the default fixture with config key `key` set to v (NULL: deleted)
 * and expects the failure. */
static void config_case(const char *name, const char *key, json_t *v, int want, const char *a,
                        const char *b)
{
    char dir[1024];
    test_dir(name, dir, sizeof dir);
    tm_params p = P();
    tm_model tm;
    tm_build(&tm, &p);
    if (v) json_object_set_new(tm.config, key, v);
    else json_object_del(tm.config, key);
    tm_write(&tm, dir);
    load_fail(dir, want, a, b, NULL);
    tm_free(&tm);
}

START_TEST(test_config_missing_field)
{
    config_case("cfg_missing_hidden", "hidden_size", NULL, ENG_EFORMAT, "config.json",
                "missing field 'hidden_size'");
    config_case("cfg_missing_vocab", "vocab_size", NULL, ENG_EFORMAT, "config.json", "'vocab_size'");
    config_case("cfg_missing_ffn", "intermediate_size", NULL, ENG_EFORMAT, "config.json",
                "'intermediate_size'");
}
END_TEST

START_TEST(test_config_wrong_type)
{
    config_case("cfg_type_heads", "num_attention_heads", json_string("2"), ENG_EFORMAT, "config.json",
                "field 'num_attention_heads' must be a positive integer");
    config_case("cfg_zero_layers", "num_hidden_layers", json_integer(0), ENG_EFORMAT, "config.json",
                "'num_hidden_layers' must be a positive integer");
    config_case("cfg_real_hidden", "hidden_size", json_real(8.5), ENG_EFORMAT, "config.json",
                "'hidden_size'");
    config_case("cfg_type_tie", "tie_word_embeddings", json_string("yes"), ENG_EFORMAT, "config.json",
                "'tie_word_embeddings' must be true or false");
    config_case("cfg_type_eps", "rms_norm_eps", json_string("1e-6"), ENG_EFORMAT, "config.json",
                "'rms_norm_eps'");
    config_case("cfg_neg_eps", "rms_norm_eps", json_real(-1.0), ENG_EFORMAT, "config.json",
                "'rms_norm_eps'");
    config_case("cfg_type_eos", "eos_token_id", json_string("</s>"), ENG_EFORMAT, "config.json",
                "'eos_token_id'");
    config_case("cfg_eos_range", "eos_token_id", json_pack("[i,i]", 32, 2), ENG_EFORMAT,
                "config.json", "'eos_token_id' (32) must be below 'vocab_size' (32)");
    config_case("cfg_type_arch", "architectures", json_string("Qwen2ForCausalLM"), ENG_EFORMAT,
                "config.json", "'architectures'");
    config_case("cfg_type_rope", "rope_scaling", json_integer(3), ENG_EFORMAT, "config.json",
                "'rope_scaling'");
    config_case("cfg_type_mka", "mka", json_integer(3), ENG_EFORMAT, "config.json", "'mka'");
}
END_TEST

/* config.json as transformers 4.x and 5.x write it: keys the loader does not
 * use, nulls, Python ints beyond int64 (VERY_LARGE_INTEGER), v5's dtype and
 * rope_parameters; and out-of-range integers named in the error. */
static void write_config_text(const char *dir, json_t *cfg, const char *extra)
{
    char *s = json_dumps(cfg, JSON_INDENT(2));
    size_t n = strlen(s);
    ck_assert(n > 2 && s[n - 1] == '}');
    size_t cap = n + strlen(extra) + 8;
    char *t = malloc(cap);
    snprintf(t, cap, "%.*s,\n  %s\n}", (int)(n - 2), s, extra); /* s ends with "\n}" */
    ck_assert_int_eq(tu_write_file(dir, "config.json", t, strlen(t)), 0);
    free(t);
    free(s);
}

START_TEST(test_config_real_shapes)
{
    char dir[1024];
    tm_params p = P();
    tm_model tm;
    tm_build(&tm, &p);
    test_dir("cfg_v4", dir, sizeof dir);
    tm_write(&tm, dir);
    write_config_text(dir, tm.config,
                      "\"_name_or_path\": \"HuggingFaceTB/SmolLM2-135M-Instruct\", \"torch_dtype\": \"bfloat16\", "
                      "\"transformers_version\": \"4.42.3\", \"use_cache\": true, \"pretraining_tp\": 1, "
                      "\"rope_scaling\": null, \"pad_token_id\": null, \"is_llama_config\": true, "
                      "\"rope_interleaved\": false, \"attention_dropout\": 0.0, \"initializer_range\": 0.02, "
                      "\"sliding_window\": null, \"max_window_layers\": 21, \"quantization_config\": null, "
                      "\"model_max_length\": 1000000000000000019884624838656, \"unknown_future_key\": {\"a\": [1, null]}");
    eng_model *m = load_ok(dir);
    eng_model_free(m);
    test_dir("cfg_v5", dir, sizeof dir);
    tm_write(&tm, dir);
    json_object_del(tm.config, "rope_theta");
    write_config_text(dir, tm.config,
                      "\"dtype\": \"bfloat16\", \"transformers_version\": \"5.0.0\", "
                      "\"rope_parameters\": {\"rope_theta\": 10000.0, \"rope_type\": \"default\"}, "
                      "\"layer_types\": [\"full_attention\", \"full_attention\"], \"output_router_logits\": false, "
                      "\"big\": -99999999999999999999999");
    m = load_ok(dir);
    eng_model_free(m);
    /* a used key out of range says which and why */
    test_dir("cfg_range", dir, sizeof dir);
    tm_write(&tm, dir);
    json_object_del(tm.config, "max_position_embeddings");
    write_config_text(dir, tm.config, "\"max_position_embeddings\": 1000000000000000019884624838656");
    load_fail(dir, ENG_EFORMAT, "config.json", "'max_position_embeddings' is out of range", NULL);
    json_object_set_new(tm.config, "max_position_embeddings", json_integer(4096));
    json_object_del(tm.config, "num_hidden_layers");
    write_config_text(dir, tm.config, "\"num_hidden_layers\": 4294967296");
    load_fail(dir, ENG_EFORMAT, "config.json", "'num_hidden_layers' is out of range", NULL);
    tm_free(&tm);
}
END_TEST

START_TEST(test_config_inconsistent)
{
    config_case("cfg_gqa", "num_key_value_heads", json_integer(3), ENG_EFORMAT, "config.json",
                "'num_key_value_heads'");
    config_case("cfg_odd_head", "head_dim", json_integer(3), ENG_EFORMAT, "config.json", "'head_dim'");
    config_case("cfg_indivisible", "num_attention_heads", json_integer(3), ENG_EFORMAT, "config.json",
                "'hidden_size'");
}
END_TEST

START_TEST(test_unknown_architecture)
{
    char dir[1024];
    test_dir("arch", dir, sizeof dir);
    tm_params p = P();
    tm_model tm;
    tm_build(&tm, &p);
    json_object_set_new(tm.config, "architectures", json_pack("[s]", "GPT2LMHeadModel"));
    json_object_set_new(tm.config, "model_type", json_string("gpt2"));
    tm_write(&tm, dir);
    load_fail(dir, ENG_EUNSUPPORTED, "config.json", "architectures[0] 'GPT2LMHeadModel'", NULL);
    /* a non-causal-LM head of a known family is refused too */
    json_object_set_new(tm.config, "architectures", json_pack("[s]", "Qwen2ForSequenceClassification"));
    json_object_set_new(tm.config, "model_type", json_string("qwen2"));
    tm_write(&tm, dir);
    load_fail(dir, ENG_EUNSUPPORTED, "config.json", "'Qwen2ForSequenceClassification'", NULL);
    /* only model_type */
    json_object_del(tm.config, "architectures");
    json_object_set_new(tm.config, "model_type", json_string("gemma"));
    tm_write(&tm, dir);
    load_fail(dir, ENG_EUNSUPPORTED, "config.json", "model_type 'gemma'", NULL);
    json_object_del(tm.config, "model_type");
    tm_write(&tm, dir);
    load_fail(dir, ENG_EFORMAT, "config.json", "'architectures'", NULL);
    tm_free(&tm);
}
END_TEST

START_TEST(test_unsupported_features)
{
    config_case("rope_dynamic", "rope_scaling", json_pack("{s:s,s:f}", "type", "dynamic", "factor", 2.0),
                ENG_EUNSUPPORTED, "config.json", "rope_scaling.type 'dynamic'");
    config_case("rope_longrope", "rope_scaling",
                json_pack("{s:s,s:f}", "rope_type", "longrope", "factor", 2.0), ENG_EUNSUPPORTED,
                "config.json", "rope_scaling.rope_type 'longrope'");
    config_case("rope_v5_dynamic", "rope_parameters",
                json_pack("{s:s,s:f}", "rope_type", "dynamic", "rope_theta", 1e4), ENG_EUNSUPPORTED,
                "config.json", "rope_parameters.rope_type 'dynamic'");
    config_case("rope_linear_nofactor", "rope_scaling", json_pack("{s:s}", "rope_type", "linear"),
                ENG_EFORMAT, "config.json", "'rope_scaling.factor'");
    config_case("rope_llama3_bad", "rope_scaling",
                json_pack("{s:s,s:f,s:f,s:f}", "rope_type", "llama3", "factor", 8.0, "low_freq_factor",
                          4.0, "high_freq_factor", 1.0),
                ENG_EFORMAT, "config.json", "'rope_scaling.high_freq_factor'");
    config_case("partial_rotary", "partial_rotary_factor", json_real(0.5), ENG_EUNSUPPORTED,
                "config.json", "'partial_rotary_factor'");
    config_case("sliding", "use_sliding_window", json_true(), ENG_EUNSUPPORTED, "config.json",
                "'use_sliding_window'");
    config_case("act", "hidden_act", json_string("gelu"), ENG_EUNSUPPORTED, "config.json",
                "'hidden_act' is 'gelu'");
    config_case("mlp_bias", "mlp_bias", json_true(), ENG_EUNSUPPORTED, "config.json", "'mlp_bias'");
}
END_TEST

START_TEST(test_bad_mka_block)
{
    config_case("mka_levels", "mka", json_pack("{s:i}", "levels", 4), ENG_EFORMAT, "config.json",
                "'mka.levels' must be 2 or 3");
    config_case("mka_beta", "mka", json_pack("{s:f}", "ema_beta", 1.0), ENG_EFORMAT, "config.json",
                "'mka.ema_beta'");
    config_case("mka_beta_type", "mka", json_pack("{s:s}", "ema_beta", "0.9"), ENG_EFORMAT,
                "config.json", "'mka.ema_beta'");
    config_case("mka_chunk", "mka", json_pack("{s:i}", "l3_chunk_tokens", 0), ENG_EFORMAT,
                "config.json", "'mka.l3_chunk_tokens'");
    config_case("mka_top_r", "mka", json_pack("{s:i}", "l3_top_r", -1), ENG_EFORMAT, "config.json",
                "'mka.l3_top_r'");
}
END_TEST

/* ---- negative: tensors ------------------------------------------------------------- */

START_TEST(test_missing_tensor)
{
    char dir[1024];
    test_dir("missing_tensor", dir, sizeof dir);
    tm_params p = P();
    tm_model tm;
    tm_build(&tm, &p);
    tm_remove(&tm, "model.layers.1.mlp.up_proj.weight");
    tm_write(&tm, dir);
    load_fail(dir, ENG_EFORMAT, "model.safetensors: tensor 'model.layers.1.mlp.up_proj.weight' is missing",
              NULL, NULL);
    tm_free(&tm);

    tm_build(&tm, &p);
    tm_remove(&tm, "model.layers.0.self_attn.k_proj.bias"); /* required for qwen2 */
    tm_write(&tm, dir);
    load_fail(dir, ENG_EFORMAT, "'model.layers.0.self_attn.k_proj.bias' is missing", NULL, NULL);
    tm_free(&tm);

    tm_build(&tm, &p);
    tm_remove(&tm, "model.layers.1.self_attn.q_proj.weight");
    tm_write(&tm, dir);
    load_fail(dir, ENG_EFORMAT, "'model.layers.1.self_attn.q_proj.weight' is missing",
              "original_attn", NULL);
    tm_free(&tm);

    tm_build(&tm, &p);
    tm_remove(&tm, "lm_head.weight");
    tm_write(&tm, dir);
    load_fail(dir, ENG_EFORMAT, "'lm_head.weight'", "tie_word_embeddings", NULL);
    tm_free(&tm);

    /* num_hidden_layers larger than the checkpoint */
    tm_build(&tm, &p);
    json_object_set_new(tm.config, "num_hidden_layers", json_integer(1000000));
    tm_write(&tm, dir);
    load_fail(dir, ENG_EFORMAT, "'model.layers.2.input_layernorm.weight' is missing", NULL, NULL);
    tm_free(&tm);
}
END_TEST

START_TEST(test_wrong_shape)
{
    char dir[1024];
    test_dir("wrong_shape", dir, sizeof dir);
    tm_params p = P();
    tm_model tm;
    tm_build(&tm, &p);
    tm_reshape(&tm, "model.layers.1.mlp.up_proj.weight", 16, 9);
    tm_write(&tm, dir);
    load_fail(dir, ENG_EFORMAT,
              "model.safetensors: tensor 'model.layers.1.mlp.up_proj.weight' has shape [16,9], expected "
              "[16,8]",
              NULL, NULL);
    tm_free(&tm);

    tm_build(&tm, &p);
    tm_reshape(&tm, "model.norm.weight", 8, 1);
    tm_write(&tm, dir);
    load_fail(dir, ENG_EFORMAT, "'model.norm.weight' has shape [8,1], expected [8]", NULL, NULL);
    tm_free(&tm);

    /* vocab_size disagrees with the embedding, in a sharded checkpoint */
    tm_build(&tm, &p);
    tm.shards = 2;
    json_object_set_new(tm.config, "vocab_size", json_integer(33));
    tm_write(&tm, dir);
    load_fail(dir, ENG_EFORMAT,
              "model-00001-of-00002.safetensors: tensor 'model.embed_tokens.weight' has shape [32,8], "
              "expected [33,8]",
              NULL, NULL);
    tm_free(&tm);
}
END_TEST

START_TEST(test_unsupported_dtype)
{
    char dir[1024];
    test_dir("dtype", dir, sizeof dir);
    tm_params p = P();
    tm_model tm;
    tm_build(&tm, &p);
    tm_set_dtype(&tm, "model.layers.0.mlp.gate_proj.weight", "I64");
    tm_write(&tm, dir);
    load_fail(dir, ENG_EUNSUPPORTED, "model.safetensors", "'model.layers.0.mlp.gate_proj.weight'",
              "I64");
    tm_free(&tm);

    tm_build(&tm, &p);
    snprintf(tm_find(&tm, "model.norm.weight")->dtype, 8, "%s", "Q4_K");
    tm_write(&tm, dir);
    load_fail(dir, ENG_EUNSUPPORTED, "model.safetensors", "'model.norm.weight'", "Q4_K");
    tm_free(&tm);
}
END_TEST

/* A directory with a valid config.json and the given raw model.safetensors. */
static void raw_case(const char *name, uint64_t hlen, const char *header, const void *data,
                     size_t dlen, int want, const char *a, const char *b)
{
    char dir[1024];
    test_dir(name, dir, sizeof dir);
    tm_params p = P();
    tm_model tm;
    tm_build(&tm, &p);
    write_json(dir, "config.json", tm.config);
    st_write_raw(dir, "model.safetensors", hlen, header, data, dlen);
    load_fail(dir, want, a, b, NULL);
    tm_free(&tm);
}

START_TEST(test_truncated_safetensors)
{
    char dir[1024];
    test_dir("trunc_data", dir, sizeof dir);
    tm_params p = P();
    tm_model tm;
    make_model(dir, &p, &tm);
    char path[4200];
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    struct stat st;
    ck_assert_int_eq(stat(path, &st), 0);
    ck_assert_int_eq(truncate(path, st.st_size - 100), 0);
    load_fail(dir, ENG_EFORMAT, "model.safetensors: truncated: header says", "bytes of data, file has",
              NULL);
    /* only part of the header */
    ck_assert_int_eq(truncate(path, 40), 0);
    load_fail(dir, ENG_EFORMAT, "model.safetensors: truncated: header length", NULL, NULL);
    /* not even the length */
    ck_assert_int_eq(truncate(path, 5), 0);
    load_fail(dir, ENG_EFORMAT, "model.safetensors: truncated", "8", NULL);
    tm_free(&tm);
}
END_TEST

START_TEST(test_header_limits)
{
    const char *h = "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}";
    float one = 1.0f;
    raw_case("hdr_gt_file", 100000, h, &one, 4, ENG_EFORMAT, "model.safetensors: truncated",
             "header length is 100000");
    raw_case("hdr_huge", 200ULL * 1024 * 1024, h, &one, 4, ENG_EFORMAT, "model.safetensors",
             "exceeds the limit");
    raw_case("hdr_bad_json", strlen("{\"a\":"), "{\"a\":", NULL, 0, ENG_EFORMAT, "model.safetensors",
             "not valid JSON");
    raw_case("hdr_array", 2, "[]", NULL, 0, ENG_EFORMAT, "model.safetensors", "JSON object");
    const char *dup = "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
                      "\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}";
    raw_case("hdr_dup", strlen(dup), dup, &one, 4, ENG_EFORMAT, "model.safetensors", "JSON");
}
END_TEST

START_TEST(test_bad_offsets)
{
    unsigned char data[64] = {0};
    const char *overlap = "{\"a\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]},"
                          "\"b\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[8,24]}}";
    raw_case("off_overlap", strlen(overlap), overlap, data, 24, ENG_EFORMAT, "model.safetensors",
             "tensor 'b': data_offsets [8,24] overlap tensor 'a'");
    const char *hole = "{\"a\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]},"
                       "\"b\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[20,36]}}";
    raw_case("off_hole", strlen(hole), hole, data, 36, ENG_EFORMAT, "model.safetensors",
             "hole of 4 bytes");
    const char *rev = "{\"a\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[16,0]}}";
    raw_case("off_reversed", strlen(rev), rev, data, 16, ENG_EFORMAT, "model.safetensors",
             "tensor 'a': data_offsets [16,0] end before begin");
    const char *size = "{\"a\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,12]}}";
    raw_case("off_size", strlen(size), size, data, 12, ENG_EFORMAT, "model.safetensors",
             "tensor 'a': shape [4] of F32 needs 16 bytes");
    const char *trail = "{\"a\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]}}";
    raw_case("off_trailing", strlen(trail), trail, data, 20, ENG_EFORMAT, "model.safetensors",
             "4 trailing bytes");
    const char *neg = "{\"a\":{\"dtype\":\"F32\",\"shape\":[-4],\"data_offsets\":[0,16]}}";
    raw_case("off_neg_shape", strlen(neg), neg, data, 16, ENG_EFORMAT, "model.safetensors",
             "tensor 'a': field 'shape'");
    const char *ovf = "{\"a\":{\"dtype\":\"F32\",\"shape\":[4294967296,4294967296],\"data_offsets\":[0,16]}}";
    raw_case("off_overflow", strlen(ovf), ovf, data, 16, ENG_EFORMAT, "model.safetensors",
             "tensor 'a': shape overflows");
    const char *noff = "{\"a\":{\"dtype\":\"F32\",\"shape\":[4]}}";
    raw_case("off_missing", strlen(noff), noff, data, 16, ENG_EFORMAT, "model.safetensors",
             "'data_offsets'");
}
END_TEST

/* The low-level reader: tensors listed out of offset order are valid, and
 * the lookup finds every one. */
START_TEST(test_st_out_of_order_valid)
{
    char dir[1024];
    test_dir("st_order", dir, sizeof dir);
    float data[8] = {1, 2, 3, 4, 5, 6, 7, 8};
    const char *h = "{\"__metadata__\":{\"format\":\"pt\"},"
                    "\"z\":{\"dtype\":\"F32\",\"shape\":[2,2],\"data_offsets\":[16,32]},"
                    "\"e\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[16,16]},"
                    "\"a\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]}}";
    st_write_raw(dir, "x.safetensors", strlen(h), h, data, sizeof data);
    char path[4200], err[256];
    snprintf(path, sizeof path, "%s/x.safetensors", dir);
    eng_st_file *f = NULL;
    ck_assert_int_eq(eng_st_open(path, "x.safetensors", &f, err, sizeof err), ENG_OK);
    ck_assert_uint_eq(f->n_tensors, 3);
    const eng_st_tensor *z = eng_st_file_find(f, "z"), *a = eng_st_file_find(f, "a");
    ck_assert_ptr_nonnull(z);
    ck_assert_ptr_nonnull(a);
    ck_assert_ptr_nonnull(eng_st_file_find(f, "e"));
    ck_assert_ptr_null(eng_st_file_find(f, "__metadata__"));
    ck_assert_int_eq(z->ndim, 2);
    float out[4];
    eng_st_to_f32(z, out);
    ck_assert(out[0] == 5 && out[3] == 8);
    eng_st_to_f32(a, out);
    ck_assert(out[0] == 1 && out[3] == 4);
    eng_st_close(f);
}
END_TEST

static void shard_case(const char *name, void (*mutate)(const char *dir), int want, const char *a,
                       const char *b)
{
    char dir[1024];
    test_dir(name, dir, sizeof dir);
    tm_params p = P();
    p.shards = 2;
    tm_model tm;
    make_model(dir, &p, &tm);
    mutate(dir);
    load_fail(dir, want, a, b, NULL);
    tm_free(&tm);
}

static void rm_shard(const char *dir)
{
    char path[4200];
    snprintf(path, sizeof path, "%s/model-00002-of-00002.safetensors", dir);
    ck_assert_int_eq(unlink(path), 0);
}

/* The index names the embedding's shard as the other one. */
static void misdirect(const char *dir)
{
    char path[4200];
    snprintf(path, sizeof path, "%s/model.safetensors.index.json", dir);
    json_t *j = json_load_file(path, 0, NULL);
    json_object_set_new(json_object_get(j, "weight_map"), "model.embed_tokens.weight",
                        json_string("model-00002-of-00002.safetensors"));
    write_json(dir, "model.safetensors.index.json", j);
    json_decref(j);
}

static void escape(const char *dir)
{
    char path[4200];
    snprintf(path, sizeof path, "%s/model.safetensors.index.json", dir);
    json_t *j = json_load_file(path, 0, NULL);
    json_object_set_new(json_object_get(j, "weight_map"), "model.norm.weight",
                        json_string("../model-00001-of-00002.safetensors"));
    write_json(dir, "model.safetensors.index.json", j);
    json_decref(j);
}

static void no_weight_map(const char *dir)
{
    tu_write_file(dir, "model.safetensors.index.json", "{\"metadata\":{}}", 15);
}

static void no_weights(const char *dir)
{
    char path[4200];
    snprintf(path, sizeof path, "%s/model.safetensors.index.json", dir);
    ck_assert_int_eq(unlink(path), 0);
}

START_TEST(test_sharded_errors)
{
    shard_case("shard_missing", rm_shard, ENG_EIO, "model.safetensors.index.json",
               "shard 'model-00002-of-00002.safetensors'");
    shard_case("shard_misdirect", misdirect, ENG_EFORMAT, "model.safetensors.index.json",
               "tensor 'model.embed_tokens.weight' is mapped to 'model-00002-of-00002.safetensors', "
               "which does not contain it");
    shard_case("shard_escape", escape, ENG_EFORMAT, "model.safetensors.index.json",
               "not a plain file name");
    shard_case("shard_no_map", no_weight_map, ENG_EFORMAT, "model.safetensors.index.json",
               "'weight_map'");
    shard_case("no_weights", no_weights, ENG_EIO, "model.safetensors.index.json", "model.safetensors");
}
END_TEST

START_TEST(test_router_errors)
{
    char dir[1024];
    test_dir("router_err", dir, sizeof dir);
    tm_params p = P();
    p.levels = 3;
    p.layers = 3;
    tm_model tm;

    /* router in layers 0 and 2 only */
    tm_build(&tm, &p);
    static const char *parts[] = {"router.0.weight", "router.0.bias", "router.2.weight", "router.2.bias"};
    char name[160];
    for (int k = 0; k < 4; k++) {
        snprintf(name, sizeof name, "model.layers.1.self_attn.%s", parts[k]);
        tm_remove(&tm, name);
    }
    tm_write(&tm, dir);
    load_fail(dir, ENG_EFORMAT, "model.safetensors", "router present in layer 0 but missing in layer 1",
              NULL);
    tm_free(&tm);

    /* a partial router */
    tm_build(&tm, &p);
    tm_remove(&tm, "model.layers.2.self_attn.router.2.bias");
    tm_write(&tm, dir);
    load_fail(dir, ENG_EFORMAT, "'model.layers.2.self_attn.router.2.bias' is missing", "router", NULL);
    tm_free(&tm);

    /* mka.levels disagrees with the router's shape */
    tm_build(&tm, &p);
    json_object_set_new(tm.config, "mka", json_pack("{s:i}", "levels", 2));
    tm_write(&tm, dir);
    load_fail(dir, ENG_EFORMAT, "config.json: field 'mka.levels' is 2",
              "'model.layers.0.self_attn.router.2.weight'", "3 levels");
    tm_free(&tm);

    /* four levels */
    p.levels = 4;
    tm_build(&tm, &p);
    json_object_del(tm.config, "mka");
    tm_write(&tm, dir);
    load_fail(dir, ENG_EFORMAT, "'model.layers.0.self_attn.router.2.weight' has shape [4,4]",
              "2 or 3 levels", NULL);
    tm_free(&tm);

    /* router.0 with the wrong input width */
    p.levels = 2;
    tm_build(&tm, &p);
    tm_reshape(&tm, "model.layers.1.self_attn.router.0.weight", 4, 4);
    tm_write(&tm, dir);
    load_fail(dir, ENG_EFORMAT, "'model.layers.1.self_attn.router.0.weight' has shape [4,4], expected [4,8]",
              NULL, NULL);
    tm_free(&tm);

    /* levels disagreeing between layers */
    tm_build(&tm, &p);
    tm_reshape(&tm, "model.layers.2.self_attn.router.2.weight", 3, 4);
    tm_write(&tm, dir);
    load_fail(dir, ENG_EFORMAT, "'model.layers.2.self_attn.router.2.weight' has shape [3,4], expected [2,4]",
              NULL, NULL);
    tm_free(&tm);
}
END_TEST

/* Robustness: every single-byte corruption of the safetensors header (and
 * of its length field) and of config.json must give a clean status — no
 * crash, no leak (run under ASan/valgrind) — and success only when the
 * result still describes this model. */
static void corrupt_and_load(const char *dir, const char *fname, size_t from, size_t to)
{
    char path[1200];
    snprintf(path, sizeof path, "%s/%s", dir, fname);
    FILE *f = fopen(path, "rb");
    ck_assert_ptr_nonnull(f);
    static unsigned char buf[1 << 16];
    size_t n = fread(buf, 1, sizeof buf, f);
    fclose(f);
    ck_assert_uint_lt(n, sizeof buf);
    if (to > n) to = n;
    static const unsigned char repl[] = {'"', '}', '9', 0xff};
    for (size_t i = from; i < to; i++) {
        unsigned char orig = buf[i];
        for (size_t r = 0; r < sizeof repl; r++) {
            if (repl[r] == orig) continue;
            buf[i] = repl[r];
            ck_assert_int_eq(tu_write_file(dir, fname, buf, n), 0);
            char err[256] = "";
            eng_model *m = NULL;
            int rc = eng_model_load(dir, &m, err, sizeof err);
            ck_assert_msg(rc <= 0 && (rc == 0) == (m != NULL), "byte %zu: rc %d", i, rc);
            if (rc != 0) ck_assert_msg(err[0] != '\0' && !strchr(err, '\n'), "byte %zu: bad message", i);
            eng_model_free(m);
        }
        buf[i] = orig;
    }
    ck_assert_int_eq(tu_write_file(dir, fname, buf, n), 0);
}

START_TEST(test_corruption_safetensors_header)
{
    char dir[1024];
    test_dir("corrupt_st", dir, sizeof dir);
    tm_params p = P();
    p.layers = 1;
    p.vocab = 4;
    tm_model tm;
    make_model(dir, &p, &tm);
    char path[1200];
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    FILE *f = fopen(path, "rb");
    ck_assert_ptr_nonnull(f);
    unsigned char len8[8];
    ck_assert_uint_eq(fread(len8, 1, 8, f), 8);
    fclose(f);
    uint64_t hl = 0;
    for (int b = 7; b >= 0; b--) hl = hl << 8 | len8[b];
    corrupt_and_load(dir, "model.safetensors", 0, 8 + (size_t)hl);
    tm_free(&tm);
}
END_TEST

START_TEST(test_corruption_config)
{
    char dir[1024];
    test_dir("corrupt_cfg", dir, sizeof dir);
    tm_params p = P();
    p.layers = 1;
    p.vocab = 4;
    tm_model tm;
    make_model(dir, &p, &tm);
    corrupt_and_load(dir, "config.json", 0, 1 << 16);
    tm_free(&tm);
}
END_TEST

static Suite *loader_suite(void)
{
    Suite *s = suite_create("loader");
    TCase *ok = tcase_create("valid");
    tcase_set_timeout(ok, 60);
    tcase_add_test(ok, test_qwen2_f32);
    tcase_add_test(ok, test_qwen2_bf16);
    tcase_add_test(ok, test_qwen2_f16);
    tcase_add_test(ok, test_f16_all_values);
    tcase_add_test(ok, test_llama_untied);
    tcase_add_test(ok, test_llama_tied);
    tcase_add_test(ok, test_llama_attention_bias);
    tcase_add_test(ok, test_mistral);
    tcase_add_test(ok, test_sharded);
    tcase_add_test(ok, test_both_single_and_index);
    tcase_add_test(ok, test_router_l2);
    tcase_add_test(ok, test_router_l3);
    tcase_add_test(ok, test_router_l3_no_mka_block);
    tcase_add_test(ok, test_no_router_with_mka_block);
    tcase_add_test(ok, test_original_attn);
    tcase_add_test(ok, test_config_defaults);
    tcase_add_test(ok, test_explicit_head_dim);
    tcase_add_test(ok, test_unused_other_dtype);
    tcase_add_test(ok, test_fingerprint);
    tcase_add_test(ok, test_st_out_of_order_valid);
    suite_add_tcase(s, ok);

    TCase *rope = tcase_create("rope");
    tcase_add_test(rope, test_rope_v5_rope_parameters);
    tcase_add_test(rope, test_rope_llama3);
    tcase_add_test(rope, test_rope_yarn);
    suite_add_tcase(s, rope);

    TCase *bad = tcase_create("invalid");
    tcase_set_timeout(bad, 60);
    tcase_add_test(bad, test_bad_args);
    tcase_add_test(bad, test_missing_dir);
    tcase_add_test(bad, test_missing_config);
    tcase_add_test(bad, test_bad_json);
    tcase_add_test(bad, test_config_missing_field);
    tcase_add_test(bad, test_config_wrong_type);
    tcase_add_test(bad, test_config_real_shapes);
    tcase_add_test(bad, test_config_inconsistent);
    tcase_add_test(bad, test_unknown_architecture);
    tcase_add_test(bad, test_unsupported_features);
    tcase_add_test(bad, test_bad_mka_block);
    tcase_add_test(bad, test_missing_tensor);
    tcase_add_test(bad, test_wrong_shape);
    tcase_add_test(bad, test_unsupported_dtype);
    tcase_add_test(bad, test_truncated_safetensors);
    tcase_add_test(bad, test_header_limits);
    tcase_add_test(bad, test_bad_offsets);
    tcase_add_test(bad, test_sharded_errors);
    tcase_add_test(bad, test_router_errors);
    suite_add_tcase(s, bad);

    TCase *fz = tcase_create("corruption");
    tcase_set_timeout(fz, 300);
    tcase_add_test(fz, test_corruption_safetensors_header);
    tcase_add_test(fz, test_corruption_config);
    suite_add_tcase(s, fz);
    return s;
}

int main(void)
{
    SRunner *sr = srunner_create(loader_suite());
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
