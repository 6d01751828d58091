#!/usr/bin/env bash
# bench_cpu.sh — CPU prefill/decode speed of mkad-cli on the bundled model and
# on a larger random shape (Qwen2.5-0.5B, made by mkad-genmodel).
#
#   tools/bench_cpu.sh [BUILD_DIR]        (make bench runs it)
#
# Env: BENCH_PROMPT (prompt tokens, default 128), BENCH_GEN (generated tokens,
# default 32), BENCH_THREADS (default nproc), BENCH_DIR (where the 0.5B model
# is written, default $BUILD_DIR/tests/tmp/bench; about 1 GB).
set -euo pipefail
b=${1:-.}
src=$(cd "$(dirname "$0")/.." && pwd)
P=${BENCH_PROMPT:-128}; G=${BENCH_GEN:-32}; TH=${BENCH_THREADS:-$(nproc)}
dir=${BENCH_DIR:-$b/tests/tmp/bench}
mkdir -p "$dir"
[ -f "$dir/qwen2.5-0.5b/config.json" ] ||
    "$b/mkad-genmodel" --out "$dir/qwen2.5-0.5b" --preset qwen2.5-0.5b --seed 5
ids=$(python3 -c "print(','.join(str((i*37+11)%4000) for i in range($P)))")
printf '%-26s %8s %8s %14s %14s\n' model prompt gen prefill_tok/s decode_tok/s
for m in "$src/models/mkad-tiny" "$dir/qwen2.5-0.5b"; do
    line=$("$b/mkad-cli" --model "$m" --prompt-ids "$ids" --max-tokens "$G" --ignore-eos \
           --threads "$TH" 2>&1 >/dev/null | grep '^event=done')
    pf=$(sed -n 's/.*prefill_tok_s=\([0-9.]*\).*/\1/p' <<<"$line")
    dc=$(sed -n 's/.*decode_tok_s=\([0-9.]*\).*/\1/p' <<<"$line")
    printf '%-26s %8s %8s %14s %14s\n' "$(basename "$m")" "$P" "$G" "$pf" "$dc"
done
