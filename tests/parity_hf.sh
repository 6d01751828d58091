#!/usr/bin/env bash
# parity_hf.sh — mkad-cli's plain-attention logits (models without router
# weights) against Hugging Face transformers, through the reference logits
# committed in tests/fixtures/hf/<case>/ (made by tools/hf_fixtures.py).
#
# Per case: regenerate the model with the recorded mkad-genmodel arguments,
# check its files against the recorded sha256 (so a generator change cannot go
# unnoticed), run mkad-cli --dump-logits for every recorded token sequence and
# compare: max|a-b| / max|b| <= 1e-4 (1e-2 for bf16 checkpoints, whose K/V
# mkad keeps in bf16 while the fixtures were computed with f32 K/V; see
# parity_common.sh).
#
# Run by `make check` with top_srcdir, top_builddir and PYTHON set.
# Exit: 0 pass, 1 fail, 77 skip (only when numpy is missing).
set -u

name=parity_hf
. "$(dirname "$0")/parity_common.sh"
FIX=$top_srcdir/tests/fixtures/hf
mkdir -p "$W/out" || exit 1
fails=0
ncases=0
nseqs=0

for meta in "$FIX"/*/meta.json; do
    [ -f "$meta" ] || continue
    c=$(basename "$(dirname "$meta")")
    ncases=$((ncases + 1))
    mapfile -t args < <("$PYTHON" "$CMP" meta-args "$meta")
    if [ "${#args[@]}" -eq 0 ]; then
        echo "FAIL $c: no genmodel_args in $meta"
        fails=$((fails + 1))
        continue
    fi
    if ! "$GEN" --out "$W/$c" "${args[@]}" >"$W/$c.gen.log" 2>&1; then
        echo "FAIL $c: mkad-genmodel ${args[*]}"
        sed 's/^/    /' "$W/$c.gen.log"
        fails=$((fails + 1))
        continue
    fi
    if ! "$PYTHON" "$CMP" check-model "$meta" "$W/$c"; then
        echo "FAIL $c: generator output changed; rerun tools/hf_fixtures.py"
        fails=$((fails + 1))
        continue
    fi
    tol=$TOL
    [ "$("$PYTHON" "$CMP" kv-dtype "$W/$c")" = bf16 ] && tol=$TOL_KV_BF16
    while read -r seq file ids; do
        nseqs=$((nseqs + 1))
        T=$(echo "$ids" | tr ',' '\n' | wc -l)
        label=$(printf '%-24s %s T=%-3s' "$c" "$seq" "$T")
        out=$W/out/$c.$seq
        rc=0
        "$CLI" --backend cpu --model "$W/$c" --prompt-ids "$ids" --max-tokens 0 --dump-logits "$out.logits" \
            >"$out.log" 2>&1 </dev/null || rc=$?
        if [ "$rc" -ne 0 ]; then
            echo "FAIL $label: mkad-cli exited with status $rc"
            tail -n 5 "$out.log" | sed 's/^/    /'
            fails=$((fails + 1))
            continue
        fi
        "$PYTHON" "$CMP" logits "$out.logits" "$FIX/$c/$file" --tol "$tol" --label "$label" </dev/null ||
            fails=$((fails + 1))
    done < <("$PYTHON" "$CMP" meta-seqs "$meta")
done

if [ "$ncases" -eq 0 ]; then
    echo "$name: FAIL: no fixtures in $FIX (run tools/hf_fixtures.py)"
    exit 1
fi
if [ "$fails" -ne 0 ]; then
    echo "$name: FAIL ($fails failure(s); $ncases cases, $nseqs sequences; files in $W)"
    exit 1
fi
echo "$name: PASS ($ncases cases, $nseqs sequences)"
exit 0
