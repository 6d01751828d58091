/*
 * mkad-cli — run a model from the command line: prefill a prompt given as
 * token ids, generate, print the ids and the speed.  Also the parity tool:
 * --dump-logits writes the logits after the last prompt token, --dump-chunks
 * the L3 memory chunks the prompt's prefill completes.
 */
#include "config.h"

#include <errno.h>
#include <getopt.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <jansson.h>

#include "engine.h"

static void usage(FILE *f)
{
    fprintf(f,
        "usage: mkad-cli --model DIR (--prompt TEXT | --prompt-ids 1,2,3 | --messages FILE) [options]\n"
        "  --model DIR              Hugging Face model directory\n"
        "  --prompt TEXT            prompt text, encoded with DIR's tokenizer.json\n"
        "  --chat                   wrap --prompt as one user message in DIR's chat template\n"
        "  --messages FILE          a chat: a JSON array of messages, or an object shaped like a\n"
        "                           /v1/chat/completions body (messages, tools, documents,\n"
        "                           chat_template_kwargs, add_generation_prompt,\n"
        "                           continue_final_message), rendered with the chat template\n"
        "  --chat-template FILE     a Jinja chat template used instead of DIR's own\n"
        "  --chat-template-kwargs J extra template variables as a JSON object, e.g.\n"
        "                           '{\"enable_thinking\": false}'\n"
        "  --print-prompt           print the rendered chat prompt and exit (no weights needed)\n"
        "  --prompt-ids LIST        comma-separated prompt token ids (@FILE: read them from FILE)\n"
        "  --max-tokens N           tokens to generate (default 16; 0 = only evaluate the prompt)\n"
        "  --temperature T          0 = greedy (default 0)\n"
        "  --top-k K                (default 0 = off)\n"
        "  --top-p P                (default 1 = off)\n"
        "  --min-p P                (default 0 = off)\n"
        "  --repetition-penalty R   (default 1 = off)\n"
        "  --seed S                 sampling seed (default 0)\n"
        "  --ignore-eos             do not stop at the model's eos token\n"
        "  --dump-logits FILE       write the logits after the last prompt token (float32 LE)\n"
        "  --dump-chunks FILE       write the L3 memory chunks the prompt's prefill completes:\n"
        "                           float32 LE (n, n_layers + 1, hidden), per chunk each layer's\n"
        "                           mean attention input, then the mean token embedding\n"
        "  --l3-bank FILE           L3 bank: float32 LE (R, n_layers, hidden) chunk values\n"
        "  --chunk N                prefill chunk size in tokens (default 512)\n"
        "  --batch N                decode N sequences at once (each prefilled with the prompt\n"
        "                           on blocks of its own; ids printed for the first; a benchmark)\n"
        "  --backend B              auto, cpu or cuda (default auto: cuda when built with CUDA\n"
        "                           and a GPU answers, else cpu)\n"
        "  --threads N              CPU threads (default: all)\n"
        "  --cpu-math M             exact (default: the reference) or fast (bf16 weights on a CPU\n"
        "                           with AVX512-BF16: activations rounded to bf16)\n"
        "  --block-size N           K/V block size (default 32)\n"
        "  --version                the version, then exit\n");
}

/* eng_params.log: the engine's progress lines (e.g. weights going to the GPU). */
static void progress(void *ctx, const char *line)
{
    (void)ctx;
    size_t n = strlen(line);
    while (n && (line[n - 1] == '\n' || line[n - 1] == '\r')) n--;
    fprintf(stderr, "event=engine_progress msg=\"%.*s\"\n", (int)n, line);
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static int parse_int(const char *opt, const char *s, long lo, long hi, int *out)
{
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || end == s || *end || v < lo || v > hi) {
        fprintf(stderr, "mkad-cli: %s: '%s' is not an integer in [%ld, %ld]\n", opt, s, lo, hi);
        return -1;
    }
    *out = (int)v;
    return 0;
}

static int parse_float(const char *opt, const char *s, float *out)
{
    char *end;
    errno = 0;
    float v = strtof(s, &end);
    if (errno || end == s || *end) {
        fprintf(stderr, "mkad-cli: %s: '%s' is not a number\n", opt, s);
        return -1;
    }
    *out = v;
    return 0;
}

/* The whole file as a NUL-terminated string (caller frees; *len, when
 * given, its size), or NULL with errno set. */
static char *read_file(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    size_t cap = 1 << 16, n = 0, r;
    char *buf = malloc(cap + 1);
    while (buf && (r = fread(buf + n, 1, cap - n, f)) > 0) {
        n += r;
        if (n == cap) {
            char *b2 = realloc(buf, (cap *= 2) + 1);
            if (!b2) free(buf);
            buf = b2;
        }
    }
    if (buf && ferror(f)) {
        free(buf);
        buf = NULL;
        errno = EIO;
    }
    fclose(f);
    if (!buf) return NULL;
    buf[n] = '\0';
    if (len) *len = n;
    return buf;
}

/* Parses "1,2,3" into a new array; caller frees. */
static int32_t *parse_ids(const char *s, int *n)
{
    int cap = 16, cnt = 0;
    int32_t *ids = malloc((size_t)cap * sizeof *ids);
    const char *p = s;
    while (ids && *p) {
        char *end;
        errno = 0;
        long v = strtol(p, &end, 10);
        if (errno || end == p || v < 0 || v > INT32_MAX || (*end && *end != ',')) {
            fprintf(stderr, "mkad-cli: --prompt-ids: bad token id near '%.20s'\n", p);
            free(ids);
            return NULL;
        }
        if (cnt == cap) {
            int32_t *n2 = realloc(ids, (size_t)(cap *= 2) * sizeof *ids);
            if (!n2) { free(ids); return NULL; }
            ids = n2;
        }
        ids[cnt++] = (int32_t)v;
        p = *end ? end + 1 : end;
    }
    if (ids && cnt == 0) {
        fprintf(stderr, "mkad-cli: --prompt-ids: no ids\n");
        free(ids);
        return NULL;
    }
    *n = cnt;
    return ids;
}

/* The chat request for --chat/--messages: an object with "messages" and the
 * optional fields of a /v1/chat/completions body.  NULL (message printed)
 * on error. */
static json_t *chat_request(const char *text, const char *messages_path, const char *kwargs)
{
    json_t *req;
    if (messages_path) {
        json_error_t je;
        json_t *j = json_load_file(messages_path, 0, &je);
        if (!j) {
            fprintf(stderr, "mkad-cli: --messages %s: line %d: %s\n", messages_path, je.line, je.text);
            return NULL;
        }
        if (json_is_array(j)) {
            req = json_pack("{s:o}", "messages", j);
        } else if (json_is_object(j)) {
            req = j;
        } else {
            fprintf(stderr, "mkad-cli: --messages %s: expected an array of messages or an object\n", messages_path);
            json_decref(j);
            return NULL;
        }
    } else {
        req = json_pack("{s:[{s:s, s:s}]}", "messages", "role", "user", "content", text);
    }
    if (req && kwargs) {
        json_error_t je;
        json_t *k = json_loads(kwargs, 0, &je);
        if (!json_is_object(k)) {
            fprintf(stderr, "mkad-cli: --chat-template-kwargs: not a JSON object (%s)\n", k ? "wrong type" : je.text);
            json_decref(k);
            json_decref(req);
            return NULL;
        }
        json_object_set_new(req, "chat_template_kwargs", k);
    }
    return req;
}

int main(int argc, char **argv)
{
    const char *model_dir = NULL, *ids_arg = NULL, *dump = NULL, *bank_path = NULL, *text_arg = NULL;
    const char *dump_chunks = NULL;
    const char *messages_path = NULL, *template_path = NULL, *kwargs_arg = NULL;
    int max_tokens = 16, chunk = 512, ignore_eos = 0, chat = 0, print_prompt = 0, batch = 1;
    eng_tok *tkz = NULL;
    eng_params ep = eng_default_params();
    eng_sampler_params sp = eng_sampler_default_params();
    sp.temperature = 0.0f;

    enum { O_MODEL = 256, O_IDS, O_MAX, O_TEMP, O_TOPK, O_TOPP, O_MINP, O_REP, O_SEED, O_EOS,
           O_DUMP, O_BANK, O_CHUNK, O_THREADS, O_BLOCK, O_HELP, O_VERSION, O_PROMPT, O_CHAT, O_BACKEND, O_MESSAGES,
           O_TEMPLATE, O_KWARGS, O_PRINT, O_DUMP_CHUNKS, O_BATCH, O_CPU_MATH };
    static const struct option opts[] = {
        { "model", required_argument, 0, O_MODEL },
        { "prompt-ids", required_argument, 0, O_IDS },
        { "prompt", required_argument, 0, O_PROMPT },
        { "chat", no_argument, 0, O_CHAT },
        { "messages", required_argument, 0, O_MESSAGES },
        { "chat-template", required_argument, 0, O_TEMPLATE },
        { "chat-template-kwargs", required_argument, 0, O_KWARGS },
        { "print-prompt", no_argument, 0, O_PRINT },
        { "max-tokens", required_argument, 0, O_MAX },
        { "temperature", required_argument, 0, O_TEMP },
        { "top-k", required_argument, 0, O_TOPK },
        { "top-p", required_argument, 0, O_TOPP },
        { "min-p", required_argument, 0, O_MINP },
        { "repetition-penalty", required_argument, 0, O_REP },
        { "seed", required_argument, 0, O_SEED },
        { "ignore-eos", no_argument, 0, O_EOS },
        { "dump-logits", required_argument, 0, O_DUMP },
        { "dump-chunks", required_argument, 0, O_DUMP_CHUNKS },
        { "l3-bank", required_argument, 0, O_BANK },
        { "chunk", required_argument, 0, O_CHUNK },
        { "batch", required_argument, 0, O_BATCH },
        { "threads", required_argument, 0, O_THREADS },
        { "block-size", required_argument, 0, O_BLOCK },
        { "backend", required_argument, 0, O_BACKEND },
        { "cpu-math", required_argument, 0, O_CPU_MATH },
        { "help", no_argument, 0, O_HELP },
        { "version", no_argument, 0, O_VERSION },
        { 0, 0, 0, 0 }
    };
    int c, bad = 0;
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (c) {
        case O_MODEL: model_dir = optarg; break;
        case O_IDS: ids_arg = optarg; break;
        case O_PROMPT: text_arg = optarg; break;
        case O_CHAT: chat = 1; break;
        case O_MESSAGES: messages_path = optarg; chat = 1; break;
        case O_TEMPLATE: template_path = optarg; break;
        case O_KWARGS: kwargs_arg = optarg; break;
        case O_PRINT: print_prompt = 1; break;
        case O_MAX: bad |= parse_int("--max-tokens", optarg, 0, 1 << 24, &max_tokens); break;
        case O_TEMP: bad |= parse_float("--temperature", optarg, &sp.temperature); break;
        case O_TOPK: bad |= parse_int("--top-k", optarg, 0, INT_MAX, &sp.top_k); break;
        case O_TOPP: bad |= parse_float("--top-p", optarg, &sp.top_p); break;
        case O_MINP: bad |= parse_float("--min-p", optarg, &sp.min_p); break;
        case O_REP: bad |= parse_float("--repetition-penalty", optarg, &sp.repetition_penalty); break;
        case O_SEED: {
            char *end;
            errno = 0;
            sp.seed = strtoull(optarg, &end, 10);
            if (errno || *end || end == optarg) {
                fprintf(stderr, "mkad-cli: --seed: '%s' is not an unsigned integer\n", optarg);
                bad = 1;
            }
            break;
        }
        case O_EOS: ignore_eos = 1; break;
        case O_DUMP: dump = optarg; break;
        case O_DUMP_CHUNKS: dump_chunks = optarg; break;
        case O_BANK: bank_path = optarg; break;
        case O_CHUNK: bad |= parse_int("--chunk", optarg, 1, 1 << 20, &chunk); break;
        case O_BATCH: bad |= parse_int("--batch", optarg, 1, 1024, &batch); break;
        case O_THREADS: bad |= parse_int("--threads", optarg, 1, 256, &ep.n_threads); break;
        case O_BLOCK: bad |= parse_int("--block-size", optarg, 1, 4096, &ep.block_size); break;
        case O_BACKEND:
            if (eng_backend_parse(optarg, &ep.backend) != ENG_OK) {
                fprintf(stderr, "mkad-cli: --backend: '%s' is not one of auto, cpu, cuda\n", optarg);
                bad = 1;
            }
            break;
        case O_CPU_MATH:
            if (eng_cpu_math_parse(optarg, &ep.cpu_math) != ENG_OK) {
                fprintf(stderr, "mkad-cli: --cpu-math: '%s' is not one of exact, fast\n", optarg);
                bad = 1;
            }
            break;
        case O_HELP: usage(stdout); return 0;
        case O_VERSION: printf("mkad-cli %s\n", PACKAGE_VERSION); return 0;
        default: bad = 1;
        }
    }
    int n_inputs = !!ids_arg + !!text_arg + !!messages_path;
    if (bad || optind != argc || !model_dir || n_inputs != 1 || (chat && !text_arg && !messages_path) ||
        (print_prompt && !chat)) {
        if (!bad)
            fprintf(stderr, "mkad-cli: --model and one of --prompt, --prompt-ids or --messages are required "
                    "(--chat needs --prompt; --print-prompt needs --chat or --messages)\n");
        usage(stderr);
        return 2;
    }
    char err[512];
    if (eng_sampler_params_validate(&sp, err, sizeof err) != ENG_OK) {
        fprintf(stderr, "mkad-cli: %s\n", err);
        return 2;
    }
    if (!eng_backend_available(ep.backend)) {
        fprintf(stderr, "mkad-cli: --backend cuda: no usable CUDA device (built without CUDA, or no GPU "
                "answers); use --backend cpu or auto\n");
        return 1;
    }
    ep.log = progress;
    ep.l3_capture = dump_chunks != NULL;
    int n_prompt = 0;
    int32_t *prompt = NULL;
    if (text_arg || messages_path) {
        /* the user's text: special tokens in it stay text */
        size_t n_ids = 0;
        int trc;
        if ((trc = eng_tok_load(model_dir, &tkz, err, sizeof err)) != ENG_OK) {
            fprintf(stderr, "mkad-cli: tokenizer: %s\n", err);
            return 1;
        }
        if (template_path) {
            size_t tl = 0;
            char *tpl = read_file(template_path, &tl);
            if (!tpl) {
                fprintf(stderr, "mkad-cli: --chat-template %s: %s\n", template_path, strerror(errno));
                eng_tok_free(tkz);
                return 1;
            }
            trc = eng_tok_set_chat_template(tkz, tpl, tl, template_path, err, sizeof err);
            free(tpl);
            if (trc != ENG_OK) {
                fprintf(stderr, "mkad-cli: %s\n", err);
                eng_tok_free(tkz);
                return 1;
            }
        }
        if (chat) {
            json_t *req = chat_request(text_arg, messages_path, kwargs_arg);
            if (!req) {
                eng_tok_free(tkz);
                return 2;
            }
            eng_chat_params cp;
            eng_chat_params_from_json(&cp, req);
            if (print_prompt) {
                char *text = NULL;
                size_t tl = 0;
                trc = eng_tok_chat_apply(tkz, &cp, &text, &tl, err, sizeof err);
                if (trc == ENG_OK) fwrite(text, 1, tl, stdout);
                else fprintf(stderr, "mkad-cli: chat template: %s\n", err);
                free(text);
                json_decref(req);
                eng_tok_free(tkz);
                return trc == ENG_OK ? 0 : 1;
            }
            trc = eng_tok_chat_encode(tkz, &cp, &prompt, &n_ids, err, sizeof err);
            json_decref(req);
        } else {
            trc = eng_tok_encode(tkz, text_arg, strlen(text_arg), 0, &prompt, &n_ids, err, sizeof err);
        }
        if (trc != ENG_OK || n_ids == 0 || n_ids > INT_MAX / 2) {
            fprintf(stderr, "mkad-cli: %s: %s\n", chat ? "chat template" : "--prompt", trc != ENG_OK ? err : "no tokens");
            free(prompt);
            eng_tok_free(tkz);
            return trc != ENG_OK ? 1 : 2;
        }
        n_prompt = (int)n_ids;
        fprintf(stderr, "event=prompt_encoded tokens=%d\n", n_prompt);
    } else if (ids_arg[0] == '@') {
        /* --prompt-ids @FILE: long prompts exceed one argument's size limit. */
        char *text = read_file(ids_arg + 1, NULL);
        if (!text) {
            fprintf(stderr, "mkad-cli: --prompt-ids: cannot read %s\n", ids_arg + 1);
            return 2;
        }
        text[strcspn(text, "\r\n")] = '\0';
        prompt = parse_ids(text, &n_prompt);
        free(text);
        if (!prompt) return 2;
    } else if (!(prompt = parse_ids(ids_arg, &n_prompt))) {
        return 2;
    }

    double t0 = now_s();
    eng_model *model = NULL;
    int rc = eng_model_load(model_dir, &model, err, sizeof err);
    if (rc != ENG_OK) {
        fprintf(stderr, "mkad-cli: cannot load model: %s\n", err);
        free(prompt);
        eng_tok_free(tkz);
        return 1;
    }
    const eng_model_info *mi = eng_model_get_info(model);
    fprintf(stderr, "event=model_loaded arch=%s layers=%d hidden=%d heads=%d kv_heads=%d vocab=%d "
            "mka_levels=%d dtype=%s fingerprint=%s load_s=%.3f\n", mi->arch, mi->n_layers,
            mi->d_model, mi->n_heads, mi->n_kv_heads, mi->vocab_size, mi->mka_levels, mi->dtype,
            mi->fingerprint, now_s() - t0);

    int total = n_prompt + max_tokens;
    ep.max_seqs = batch;
    ep.max_ctx = total;
    ep.max_batch_tokens = chunk < n_prompt ? chunk : n_prompt;
    if (ep.max_batch_tokens < batch) ep.max_batch_tokens = batch;
    eng_engine *eng = NULL;
    eng_sampler **smp = calloc((size_t)batch, sizeof *smp);
    int *seqs = malloc((size_t)batch * sizeof *seqs);
    eng_batch_item *items = calloc((size_t)batch, sizeof *items);
    int32_t *toks = malloc((size_t)batch * sizeof *toks);
    int32_t *next_ids = malloc((size_t)batch * sizeof *next_ids);
    float *logits = malloc((size_t)batch * mi->vocab_size * sizeof *logits);
    int32_t *out_ids = malloc(((size_t)max_tokens + 1) * sizeof *out_ids);
    void *bank = NULL;
    float *chunks = NULL; /* (n_chunks, n_layers + 1, hidden) for --dump-chunks */
    size_t n_chunks = 0, per_chunk = ((size_t)mi->n_layers + 1) * mi->d_model;
    int seq = -1, status = 1;
    if (!logits || !out_ids || !smp || !seqs || !items || !toks || !next_ids) {
        fprintf(stderr, "mkad-cli: out of memory\n");
        goto done;
    }
    if (total > mi->max_position)
        fprintf(stderr, "mkad-cli: warning: %d tokens exceed max_position_embeddings %d\n", total,
                mi->max_position);
    if ((rc = eng_create(model, &ep, &eng, err, sizeof err)) != ENG_OK) {
        fprintf(stderr, "mkad-cli: %s\n", err);
        goto done;
    }
    {
        eng_stats st;
        eng_get_stats(eng, &st);
        int math = eng_get_params(eng)->cpu_math;
        if (math != ep.cpu_math)
            fprintf(stderr, "mkad-cli: --cpu-math fast: not available here (the CPU backend, a bf16 model and "
                    "a CPU with AVX512-BF16 only); running exact\n");
        fprintf(stderr, "event=engine_created backend=%s kv_blocks=%d kv_pool_mib=%.1f kv_dtype=%s cpu_math=%s\n",
                eng_backend_name(eng), st.blocks_total, (double)st.kv_bytes / (1024.0 * 1024.0),
                st.kv_dtype ? st.kv_dtype : "?", math == ENG_CPU_MATH_FAST ? "fast" : "exact");
    }
    for (int b = 0; b < batch; b++)
        if ((rc = eng_seq_create(eng, &seqs[b])) != ENG_OK) {
            fprintf(stderr, "mkad-cli: %s\n", eng_strerror(rc));
            goto done;
        }
    seq = seqs[0];
    if (bank_path) {
        size_t len = 0;
        size_t per = (size_t)mi->n_layers * mi->d_model * sizeof(float);
        bank = read_file(bank_path, &len);
        if (!bank) { fprintf(stderr, "mkad-cli: --l3-bank: cannot read %s\n", bank_path); goto done; }
        if (len % per != 0) {
            fprintf(stderr, "mkad-cli: --l3-bank: %s: %zu bytes is not a multiple of n_layers*hidden*4 = %zu\n",
                    bank_path, len, per);
            goto done;
        }
        for (int b = 0; b < batch; b++)
            if ((rc = eng_seq_set_l3_bank(eng, seqs[b], (int)(len / per), bank)) != ENG_OK) {
                fprintf(stderr, "mkad-cli: --l3-bank: %s (model mka_levels=%d, bank of %zu chunks)\n",
                        eng_strerror(rc), mi->mka_levels, len / per);
                goto done;
            }
    }
    for (int b = 0; b < batch; b++)
        if ((rc = eng_sampler_create(mi->vocab_size, &sp, &smp[b])) != ENG_OK) {
            fprintf(stderr, "mkad-cli: sampler: %s\n", eng_strerror(rc));
            goto done;
        }

    double tp = now_s();
    for (int off = 0; off < n_prompt; off += chunk) {
        int n = n_prompt - off < chunk ? n_prompt - off : chunk;
        eng_batch_item it = { .seq = seq, .tokens = prompt + off, .n_tokens = n,
                              .logits = off + n == n_prompt ? logits : NULL };
        if ((rc = eng_step(eng, &it, 1, err, sizeof err)) != ENG_OK) {
            fprintf(stderr, "mkad-cli: prefill: %s\n", err);
            goto done;
        }
        const eng_chunk *ch;
        int nc = eng_step_chunks(eng, &ch);
        if (nc > 0) {
            float *grown = realloc(chunks, (n_chunks + (size_t)nc) * per_chunk * sizeof(float));
            if (!grown) { fprintf(stderr, "mkad-cli: out of memory\n"); goto done; }
            chunks = grown;
            for (int i = 0; i < nc; i++, n_chunks++) {
                float *dst = chunks + n_chunks * per_chunk;
                memcpy(dst, ch[i].mu, (size_t)mi->n_layers * mi->d_model * sizeof(float));
                memcpy(dst + (size_t)mi->n_layers * mi->d_model, ch[i].emb, (size_t)mi->d_model * sizeof(float));
            }
        }
    }
    double prefill_s = now_s() - tp;
    /* The other sequences of --batch: the same prompt, on blocks of their
     * own (a decode step then reads as many K/V bytes as real ones do). */
    for (int b = 1; b < batch; b++)
        for (int off = 0; off < n_prompt; off += chunk) {
            int n = n_prompt - off < chunk ? n_prompt - off : chunk;
            eng_batch_item it = { .seq = seqs[b], .tokens = prompt + off, .n_tokens = n,
                                  .logits = off + n == n_prompt ? logits + (size_t)b * mi->vocab_size
                                                                : NULL };
            if ((rc = eng_step(eng, &it, 1, err, sizeof err)) != ENG_OK) {
                fprintf(stderr, "mkad-cli: prefill: %s\n", err);
                goto done;
            }
        }
    if (dump_chunks) {
        FILE *f = fopen(dump_chunks, "wb");
        if (!f || (n_chunks > 0 && fwrite(chunks, sizeof(float), n_chunks * per_chunk, f) != n_chunks * per_chunk) ||
            fclose(f) != 0) {
            fprintf(stderr, "mkad-cli: --dump-chunks: cannot write %s\n", dump_chunks);
            goto done;
        }
        fprintf(stderr, "event=chunks_dumped chunks=%zu chunk_tokens=%d\n", n_chunks, mi->l3_chunk_tokens);
    }
    if (dump) {
        FILE *f = fopen(dump, "wb");
        if (!f || fwrite(logits, sizeof(float), (size_t)mi->vocab_size, f) != (size_t)mi->vocab_size ||
            fclose(f) != 0) {
            fprintf(stderr, "mkad-cli: --dump-logits: cannot write %s\n", dump);
            goto done;
        }
    }

    /* a chat's assistant turn also ends at the template's end-of-turn tokens */
    int32_t stop[8];
    int n_stop = chat && tkz ? eng_tok_chat_stop_ids(tkz, stop, 8) : 0;
    /* Greedy without penalties: the engine's argmax (on the device with
     * CUDA), so that one id per sequence comes back instead of the logits. */
    const int fast_greedy = sp.temperature == 0.0f && sp.repetition_penalty == 1.0f &&
                            sp.presence_penalty == 0.0f && sp.frequency_penalty == 0.0f;
    double td = now_s();
    int n_out = 0;
    for (; n_out < max_tokens; n_out++) {
        for (int b = 0; b < batch; b++) {
            float *lg = logits + (size_t)b * mi->vocab_size;
            if (!fast_greedy || n_out == 0)
                toks[b] = eng_sampler_sample(smp[b], lg, eng_seq_tokens(eng, seqs[b]),
                                             eng_seq_len(eng, seqs[b]));
            else
                toks[b] = next_ids[b];
            items[b] = (eng_batch_item){ .seq = seqs[b], .tokens = &toks[b], .n_tokens = 1,
                                         .logits = fast_greedy ? NULL : lg,
                                         .argmax = fast_greedy ? &next_ids[b] : NULL };
        }
        int32_t tok = toks[0];
        out_ids[n_out] = tok;
        int is_stop = tok == mi->eos_token_id;
        for (int k = 0; k < n_stop; k++) is_stop |= tok == stop[k];
        if (!ignore_eos && is_stop) { n_out++; break; }
        if (n_out + 1 == max_tokens) { n_out++; break; }
        if ((rc = eng_step(eng, items, batch, err, sizeof err)) != ENG_OK) {
            fprintf(stderr, "mkad-cli: decode: %s\n", err);
            goto done;
        }
    }
    double decode_s = now_s() - td;
    for (int i = 0; i < n_out; i++) printf(i ? " %d" : "%d", (int)out_ids[i]);
    printf("\n");
    if (tkz) { /* the generated text, special tokens left out */
        char *text = NULL;
        size_t tl = 0;
        if (eng_tok_decode(tkz, out_ids, (size_t)n_out, ENG_TOK_SKIP_SPECIAL, &text, &tl, err, sizeof err) == ENG_OK) {
            fwrite(text, 1, tl, stdout);
            printf("\n");
        }
        free(text);
    }
    fprintf(stderr, "event=done prompt_tokens=%d prefill_s=%.4f prefill_tok_s=%.1f generated=%d "
            "decode_s=%.4f decode_tok_s=%.2f batch=%d backend=%s threads=%d\n", n_prompt, prefill_s,
            prefill_s > 0 ? n_prompt / prefill_s : 0.0, n_out, decode_s,
            /* the first generated token came from the prefill logits; with
             * --batch, tokens of all sequences */
            n_out > 1 && decode_s > 0 ? (double)batch * (n_out - 1) / decode_s : 0.0, batch,
            eng_backend_name(eng), eng_get_params(eng)->n_threads);
    status = 0;
done:
    for (int b = 0; smp && b < batch; b++) eng_sampler_free(smp[b]);
    free(smp);
    free(seqs);
    free(items);
    free(toks);
    free(next_ids);
    eng_free(eng);
    eng_model_free(model);
    free(bank);
    free(chunks);
    free(logits);
    free(out_ids);
    free(prompt);
    eng_tok_free(tkz);
    return status;
}
