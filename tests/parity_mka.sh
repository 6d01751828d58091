#!/usr/bin/env bash
# parity_mka.sh — mkad-cli's FastMKA logits against the independent numpy
# reference tests/ref/fastmka_ref.py (shared/FASTMKA.md), on random models from
# mkad-genmodel: levels 2 and 3, qwen2 and llama, f32/bf16/f16 storage, GQA,
# an L3 bank and none, a 100-token prompt that crosses several 32-token K/V
# blocks, chunked prefill (EMA state carried across chunks).  Tolerance
# max|a-b| / max|b| <= 1e-4 with f32 K/V, 5e-4 for bf16 checkpoints (K/V
# kept in bf16 on both sides; parity_common.sh says why).
#
# Run by `make check` with top_srcdir, top_builddir and PYTHON set; by hand:
#   top_srcdir=. top_builddir=. tests/parity_mka.sh
# Exit: 0 pass, 1 fail, 77 skip (only when numpy is missing).
set -u

name=parity_mka
. "$(dirname "$0")/parity_common.sh"
REF=$top_srcdir/tests/ref/fastmka_ref.py
fails=0
cases=0

# gen MODEL genmodel-args...
gen() {
    local m=$1
    shift
    if ! "$GEN" --out "$W/$m" "$@" >"$W/$m.gen.log" 2>&1; then
        echo "FAIL $m: mkad-genmodel $*"
        sed 's/^/    /' "$W/$m.gen.log"
        fails=$((fails + 1))
        return 1
    fi
}

# run LABEL MODEL T BANK_R [mkad-cli args...]   (BANK_R 0: no bank)
run() {
    local label=$1 m=$2 T=$3 R=$4
    shift 4
    local dir=$W/$m ids bankargs=()
    cases=$((cases + 1))
    if [ ! -d "$dir" ]; then
        echo "FAIL $label: model $m was not generated"
        fails=$((fails + 1))
        return
    fi
    ids=$("$PYTHON" "$CMP" ids "$T" "$dir" "$cases") || { fails=$((fails + 1)); return; }
    if [ "$R" -gt 0 ]; then
        if ! "$PYTHON" "$REF" --model "$dir" --make-bank "$R" --seed "$cases" --out-bank "$W/$label.bank"; then
            echo "FAIL $label: could not make the L3 bank"
            fails=$((fails + 1))
            return
        fi
        bankargs=(--l3-bank "$W/$label.bank")
    fi
    local rc=0
    "$CLI" --backend cpu --model "$dir" --prompt-ids "$ids" --max-tokens 0 --dump-logits "$W/$label.cli" \
        ${bankargs[@]+"${bankargs[@]}"} "$@" >"$W/$label.cli.log" 2>&1 || rc=$?
    if [ "$rc" -ne 0 ]; then
        echo "FAIL $label: mkad-cli exited with status $rc"
        tail -n 5 "$W/$label.cli.log" | sed 's/^/    /'
        fails=$((fails + 1))
        return
    fi
    if ! "$PYTHON" "$REF" --model "$dir" --ids "$ids" ${bankargs[@]+"${bankargs[@]}"} --out "$W/$label.ref" \
        2>"$W/$label.ref.log"; then
        echo "FAIL $label: fastmka_ref.py failed"
        tail -n 5 "$W/$label.ref.log" | sed 's/^/    /'
        fails=$((fails + 1))
        return
    fi
    local tol=$TOL
    [ "$("$PYTHON" "$CMP" kv-dtype "$dir")" = bf16 ] && tol=$TOL_KV_ROUND
    "$PYTHON" "$CMP" logits "$W/$label.cli" "$W/$label.ref" --tol "$tol" \
        --label "$(printf '%-28s T=%-3s bank=%-2s' "$label" "$T" "$R")" || fails=$((fails + 1))
}

tiny="--hidden 64 --layers 2 --heads 4 --kv-heads 2 --ffn 128 --vocab 256"
gqa8="--hidden 128 --layers 2 --heads 8 --kv-heads 2 --ffn 256 --vocab 320"

gen q_l3_f32 --arch qwen2 $tiny --levels 3 --dtype f32 --seed 21
gen q_l2_bf16 --arch qwen2 $tiny --levels 2 --dtype bf16 --seed 22
gen l_l2_f32 --arch llama $gqa8 --levels 2 --dtype f32 --seed 23
gen l_l3_bf16 --arch llama $tiny --kv-heads 1 --layers 3 --levels 3 --dtype bf16 --tied 1 --attn-bias 1 \
    --max-pos 512 --rope-theta 500000 --rope-scaling llama3:8 --seed 24
gen q_l3_long --arch qwen2 --hidden 96 --layers 3 --heads 6 --kv-heads 2 --ffn 192 --vocab 288 \
    --levels 3 --dtype bf16 --ema-beta 0.8 --max-pos 1024 --rope-scaling yarn:4 --seed 25
gen q_l3_orig_shard --arch qwen2 $tiny --levels 3 --dtype f16 --original-attn --shards 2 \
    --rope-scaling linear:2 --seed 26
gen q_l3_headdim --arch qwen2 $tiny --head-dim 32 --levels 3 --dtype f32 --seed 27
gen l_l0_f32 --arch llama $gqa8 --levels 0 --dtype f32 --seed 28
gen l_l0_bf16 --arch llama $gqa8 --levels 0 --dtype bf16 --seed 29

run qwen2-L3-f32-bank q_l3_f32 20 5
run qwen2-L3-f32-nobank q_l3_f32 20 0
run qwen2-L3-f32-1token q_l3_f32 1 3
run qwen2-L2-bf16 q_l2_bf16 33 0
run llama-L2-f32-gqa8:2 l_l2_f32 24 0
run llama-L3-bf16-tied-llama3 l_l3_bf16 40 8
run qwen2-L3-long-yarn q_l3_long 100 4
run qwen2-L3-long-chunk7 q_l3_long 100 4 --chunk 7
run qwen2-L3-long-block16-t3 q_l3_long 100 4 --block-size 16 --threads 3
run qwen2-L3-long-nobank q_l3_long 100 0 --chunk 32
run qwen2-L3-origattn-shards q_l3_orig_shard 12 2
run qwen2-L3-headdim32 q_l3_headdim 10 1
run llama-L0-f32 l_l0_f32 16 0
run llama-L0-bf16-chunk5 l_l0_bf16 70 0 --chunk 5

# The bundled, trained model: against the numpy reference (with and without
# an L3 bank) and against the logits of the PyTorch implementation that
# trained it (tools/train_mka.py, fixture made with --ref-ids at training;
# f32 K/V there, bf16 here: TOL_KV_BF16).
ln -sfn "$top_srcdir/models/mkad-tiny" "$W/bundled"
run bundled-mkad-tiny bundled 60 0
run bundled-mkad-tiny-bank bundled 60 3 --chunk 16
cases=$((cases + 1))
fx=$top_srcdir/tests/fixtures/mkad-tiny
if "$CLI" --backend cpu --model "$W/bundled" --prompt-ids "$(cat "$fx/torch.ids")" --max-tokens 0 \
        --dump-logits "$W/bundled-torch.cli" >"$W/bundled-torch.cli.log" 2>&1; then
    "$PYTHON" "$CMP" logits "$W/bundled-torch.cli" "$fx/torch.logits" --tol "$TOL_KV_BF16" \
        --label "$(printf '%-28s T=%-3s' bundled-vs-pytorch-train 10)" || fails=$((fails + 1))
else
    echo "FAIL bundled-vs-pytorch-train: mkad-cli failed"
    fails=$((fails + 1))
fi

if [ "$fails" -ne 0 ]; then
    echo "$name: FAIL ($fails failure(s) in $cases cases; files in $W)"
    exit 1
fi
echo "$name: PASS ($cases cases)"
exit 0
