#!/usr/bin/env bash
# bench_cuda.sh — single-stream speed of mkad's CUDA backend on the Qwen2.5-7B
# shape (random FastMKA L = 3 weights from mkad-genmodel, bf16), with the
# hardware floor measured in the same run.
#
#   tools/bench_cuda.sh [BUILD_DIR [OUT_DIR]]      (make bench-cuda runs it;
#                                                  tools/device.sh gpu bench on the GPU machine)
#
# For each context length C in BENCH_CTX it prefills a C-token prompt with
# mkad-cli --backend cuda (chunks of BENCH_CHUNK tokens), then decodes
# BENCH_GEN tokens at batch 1, and prints:
#   prefill tok/s and time to first token (the prompt's prefill; the first
#   token is sampled from its logits);
#   decode ms/token (mean over the BENCH_GEN steps, context C .. C+GEN);
#   the floor of one decode step: (weight bytes read per step + K/V bytes of
#   the mean context) / the device read bandwidth measured here with torch
#   (a bf16 reduction over 8 GiB), and measured / floor;
#   prefill as a fraction of the bf16 GEMM rate measured here (torch.matmul
#   8192^3), counting 2 FLOPs per weight per token plus attention
#   (4 * n_layers * q_dim * mean context per token).
# The table goes to stdout and, with OUT_DIR, to OUT_DIR/bench_cuda.txt.
#
# BENCH_VARIANTS runs each context once per variant, a label and the
# environment of the run ("label:VAR=x,VAR=y"; default "mkad:" — the
# defaults), so that e.g. cuBLAS against the GEMV kernel, or with and without
# CUDA graphs, are measured in the same run; BENCH_PROFILE=1 adds a run per
# context with MKAD_CUDA_PROFILE=1 whose per-stage table of one decode step
# (time, bytes, bandwidth) follows the main table.  BENCH_VARIANTS_AT and
# BENCH_PROFILE_AT (context lists) limit the variants after the first and
# the profile run to those contexts; BENCH_BATCH_PROFILE=0: no profile of
# the largest batch.
# BENCH_BATCH (default "8 32 64"; "" for none) adds batched decode at
# context BENCH_BATCH_CTX (4096): mkad-cli --batch N, N sequences prefilled
# with the prompt on blocks of their own, decoded together; tokens/s of all
# of them against the floor (weights once + N contexts of K/V per step),
# once per BENCH_BATCH_VARIANTS entry (same form as BENCH_VARIANTS).
# Env: BENCH_CTX (default "4096 32768"), BENCH_GEN (64), BENCH_CHUNK (4096),
# BENCH_DIR (where the ~15 GB model is written, default /tmp/mkad-bench),
# BENCH_PRESET (qwen2.5-7b), PYTHON (python3 with torch, for the floor).
set -euo pipefail
b=$(cd "${1:-.}" && pwd)
out=${2:-}
CTX=${BENCH_CTX:-4096 32768}
G=${BENCH_GEN:-64}
CHUNK=${BENCH_CHUNK:-4096}
PRESET=${BENCH_PRESET:-qwen2.5-7b}
dir=${BENCH_DIR:-/tmp/mkad-bench}
model=$dir/$PRESET-mka3-bf16
py=${PYTHON:-python3}
log() { printf 'bench_cuda: %s\n' "$*" >&2; }

command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1 || { log "no NVIDIA GPU here"; exit 77; }
for p in mkad-cli mkad-genmodel; do
    [ -x "$b/$p" ] || { log "$b/$p missing: build with ./configure --with-cuda=yes first"; exit 1; }
done
if [ ! -f "$model/config.json" ]; then
    mkdir -p "$dir"
    log "writing the $PRESET model (levels 3, bf16) into $model"
    t0=$(date +%s)
    "$b/mkad-genmodel" --out "$model" --preset "$PRESET" --levels 3 --dtype bf16 --seed 7 >&2
    log "model written in $(($(date +%s) - t0)) s"
fi

# Device numbers and the model's bytes: read bandwidth, GEMM rate, weight
# bytes one decode step reads (all tensors but the token embedding, of which
# a step reads one row; counted once when lm_head is tied to it), K/V bytes
# per token, FLOPs per token.
read -r BW GEMM WBYTES KVTOK WFLOP ATTF VOCAB GPU < <("$py" - "$model" <<'EOF'
import json, os, struct, sys, time
import torch
m = sys.argv[1]
cfg = json.load(open(os.path.join(m, "config.json")))
wbytes = wparams = 0
for f in sorted(os.listdir(m)):
    if not f.endswith(".safetensors"):
        continue
    with open(os.path.join(m, f), "rb") as fh:
        n = struct.unpack("<Q", fh.read(8))[0]
        hdr = json.loads(fh.read(n))
    for k, v in hdr.items():
        if k == "__metadata__" or k.endswith("embed_tokens.weight"):
            continue
        a, b_ = v["data_offsets"]
        wbytes += b_ - a
        el = 1
        for s in v["shape"]:
            el *= s
        wparams += el
if cfg.get("tie_word_embeddings"):  # lm_head is the embedding: a step reads all of it once
    d, V = cfg["hidden_size"], cfg["vocab_size"]
    wbytes += d * V * 2
    wparams += d * V
L, H = cfg["num_hidden_layers"], cfg["num_attention_heads"]
hd = cfg.get("head_dim") or cfg["hidden_size"] // H
kvh = cfg.get("num_key_value_heads", H)
kvtok = L * 2 * kvh * hd * 2  # bf16 K and V
attf = 4 * L * H * hd         # attention FLOPs per token per context position
dev = torch.device("cuda")
x = torch.ones(4 << 30, dtype=torch.bfloat16, device=dev)  # 8 GiB
for _ in range(2):
    x.sum(dtype=torch.float32)
torch.cuda.synchronize()
best = 0.0
for _ in range(5):
    t = time.perf_counter(); x.sum(dtype=torch.float32); torch.cuda.synchronize()
    best = max(best, x.numel() * 2 / (time.perf_counter() - t))
del x
a = torch.randn(8192, 8192, dtype=torch.bfloat16, device=dev)
bm = torch.randn(8192, 8192, dtype=torch.bfloat16, device=dev)
for _ in range(3):
    a @ bm
torch.cuda.synchronize()
t = time.perf_counter()
for _ in range(10):
    a @ bm
torch.cuda.synchronize()
gemm = 10 * 2 * 8192 ** 3 / (time.perf_counter() - t)
name = torch.cuda.get_device_name(0).replace(" ", "_")
print(best, gemm, wbytes, kvtok, 2 * wparams, attf, cfg["vocab_size"], name)
EOF
)
log "$GPU: read bandwidth $(awk -v x="$BW" 'BEGIN{printf "%.0f", x/1e9}') GB/s, bf16 GEMM $(awk -v x="$GEMM" 'BEGIN{printf "%.0f", x/1e12}') TFLOP/s;" \
    "weights read per step $(awk -v x="$WBYTES" 'BEGIN{printf "%.2f", x/1e9}') GB, K/V $KVTOK B/token"

VARIANTS=${BENCH_VARIANTS:-mkad:}
table=$(mktemp)
prof=$(mktemp)
btable=$(mktemp)
# The tables so far, into OUT_DIR/bench_cuda.txt after every row (a run
# stopped by a device deadline keeps the rows measured until then), and to
# stdout at the end.
report() {
    [ -n "$out" ] || return 0
    {
        echo "mkad CUDA backend, $PRESET shape (FastMKA L=3, bf16), batch 1, $(date -u +%Y-%m-%d), $GPU"
        echo "read bandwidth $(awk -v x="$BW" 'BEGIN{printf "%.0f", x/1e9}') GB/s, bf16 GEMM $(awk -v x="$GEMM" 'BEGIN{printf "%.0f", x/1e12}') TFLOP/s (torch, this run)"
        cat "$table"
        if [ -s "$btable" ]; then echo "batched decode:"; cat "$btable"; fi
        if [ -s "$prof" ]; then cat "$prof"; fi
    } >"$out/bench_cuda.txt"
}
printf '%-8s %-14s %12s %10s %14s %10s %8s %12s\n' context variant prefill_tok/s ttft_s decode_ms/tok floor_ms ratio prefill/gemm >"$table"
for C in $CTX; do
    ids=$(mktemp)
    "$py" -c "import sys; print(','.join(str((i * 7919 + 13) % ($VOCAB - 1000) + 100) for i in range($C)))" >"$ids"
    runs=$VARIANTS
    # Variants after the first only at BENCH_VARIANTS_AT, the profile only at
    # BENCH_PROFILE_AT (default: every context).
    case " ${BENCH_VARIANTS_AT:-$C} " in *" $C "*) ;; *) runs=${VARIANTS%% *} ;; esac
    case " ${BENCH_PROFILE_AT:-$C} " in
    *" $C "*) [ "${BENCH_PROFILE:-0}" = 1 ] && runs="$runs profile:MKAD_CUDA_PROFILE=1" ;;
    esac
    for v in $runs; do
        label=${v%%:*}
        envs=$(tr ',' ' ' <<<"${v#*:}")
        log "context $C, $label ($envs): prefill in chunks of $CHUNK, then $G decode steps"
        # shellcheck disable=SC2086
        out_all=$(env $envs "$b/mkad-cli" --backend cuda --model "$model" --prompt-ids "@$ids" \
            --max-tokens $((G + 1)) --ignore-eos --chunk "$CHUNK" 2>&1 >/dev/null) || {
            printf '%s\n' "$out_all" >&2; log "mkad-cli failed at context $C ($label)"; continue; }
        printf '%s\n' "$out_all" >&2
        line=$(grep '^event=done' <<<"$out_all")
        if [ "$label" = profile ]; then
            { echo "context $C, per step (MKAD_CUDA_PROFILE=1):"
              grep -o 'cuda profile: .*' <<<"$out_all" | sed 's/^cuda profile: /  /; s/"$//'; } >>"$prof"
        fi
        get() { sed -n "s/.* $1=\([0-9.]*\).*/\1/p" <<<"$line"; }
        awk -v C="$C" -v V="$label" -v G="$G" -v pf="$(get prefill_tok_s)" -v ps="$(get prefill_s)" -v dt="$(get decode_tok_s)" \
            -v bw="$BW" -v gemm="$GEMM" -v wb="$WBYTES" -v kv="$KVTOK" -v wf="$WFLOP" -v af="$ATTF" 'BEGIN {
            dms = 1000 / dt
            floor = 1000 * (wb + kv * (C + G / 2)) / bw
            pflops = pf * (wf + af * C / 2)      # model FLOPs/s during prefill
            printf "%-8d %-14s %12.0f %10.3f %14.2f %10.2f %8.2f %11.1f%%\n", C, V, pf, ps, dms, floor, dms / floor, 100 * pflops / gemm
        }' >>"$table"
        report
    done
    rm -f "$ids"
done
BATCHES=${BENCH_BATCH-8 32 64}
BC=${BENCH_BATCH_CTX:-4096}
if [ -n "$BATCHES" ]; then
    printf '%-6s %-8s %-10s %14s %12s %14s %8s\n' batch context variant decode_ms/step tokens/s floor_tok/s of_floor >"$btable"
    ids=$(mktemp)
    "$py" -c "import sys; print(','.join(str((i * 7919 + 13) % ($VOCAB - 1000) + 100) for i in range($BC)))" >"$ids"
    for N in $BATCHES; do
      for v in ${BENCH_BATCH_VARIANTS:-mkad:}; do
        label=${v%%:*}
        envs=$(tr ',' ' ' <<<"${v#*:}")
        log "batch $N at context $BC, $label ($envs): $N prefills, then $G decode steps of all of them"
        # shellcheck disable=SC2086
        line=$(env $envs "$b/mkad-cli" --backend cuda --model "$model" --prompt-ids "@$ids" --max-tokens $((G + 1)) \
            --ignore-eos --chunk "$CHUNK" --batch "$N" 2>&1 >/dev/null | tee /dev/stderr | grep '^event=done') || {
            log "mkad-cli failed at batch $N ($label)"; continue; }
        dt=$(sed -n 's/.* decode_tok_s=\([0-9.]*\).*/\1/p' <<<"$line")
        bv=${BENCH_BATCH_VARIANTS:-mkad:}
        if [ "${BENCH_PROFILE:-0}" = 1 ] && [ "${BENCH_BATCH_PROFILE:-1}" = 1 ] && [ "$N" = "${BATCHES##* }" ] &&
            [ "$v" = "${bv%% *}" ]; then
            log "batch $N at context $BC, profiled"
            { echo "batch $N at context $BC, one decode step (MKAD_CUDA_PROFILE=1):"
              MKAD_CUDA_PROFILE=1 "$b/mkad-cli" --backend cuda --model "$model" --prompt-ids "@$ids" \
                  --max-tokens 17 --ignore-eos --chunk "$CHUNK" --batch "$N" 2>&1 >/dev/null |
                  grep -o 'cuda profile: .*' | sed 's/^cuda profile: /  /; s/"$//'; } >>"$prof"
        fi
        awk -v N="$N" -v C="$BC" -v V="$label" -v G="$G" -v dt="$dt" -v bw="$BW" -v wb="$WBYTES" -v kv="$KVTOK" 'BEGIN {
            step = 1000 * N / dt
            floor_tok = N / ((wb + N * kv * (C + G / 2)) / bw)
            printf "%-6d %-8d %-10s %14.2f %12.0f %14.0f %7.1f%%\n", N, C, V, step, dt, floor_tok, 100 * dt / floor_tok
        }' >>"$btable"
        report
      done
    done
    rm -f "$ids"
fi
if [ -n "$out" ]; then
    report
    cat "$out/bench_cuda.txt"
else
    out=$(mktemp -d)
    report
    cat "$out/bench_cuda.txt"
    rm -rf "$out"
fi
rm -f "$table" "$prof" "$btable"
