#!/bin/sh
# tokenizer_parity.sh — the tokenizer against the Hugging Face `tokenizers`
# library run now (the committed digests are checked by test_tokenizer in
# every build; this adds fresh strings).  For each committed tokenizer
# (tests/fixtures/tokenizers/qwen2, llama3, models/mkad-tiny) it writes a
# digest of 3,000 new strings (a seed from the clock) with
# tests/ref/tok_gen.py and runs test_tokenizer against it.  Real model files
# join when TOK_REAL_DIR names a directory made by tests/ref/tok_real.py
# (qwen2.5/ and llama3.2/, megabytes, not committed).
# Skips (exit 77) when python3 or its `tokenizers` package is missing
# (tools/bootstrap.sh, which CI runs, installs tokenizers 0.23.3).
set -eu
top_srcdir=${top_srcdir:-.}
top_builddir=${top_builddir:-.}
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import tokenizers' 2>/dev/null; then
    echo "tokenizer_parity: SKIP: python3 has no 'tokenizers' (pip install tokenizers)"
    exit 77
fi
tmp="$top_builddir/tests/tmp/tokparity"
mkdir -p "$tmp"
seed=${TOK_SEED:-$(date +%s)}
n=${TOK_N:-3000}
extra=""
add() { # DIR NAME
    "$PYTHON" "$top_srcdir/tests/ref/tok_gen.py" expected "$1" --seed "$seed" --n "$n" --out "$tmp/$2.txt" >/dev/null
    extra="$extra${extra:+;}$1=$tmp/$2.txt"
}
add "$top_srcdir/tests/fixtures/tokenizers/qwen2" qwen2
add "$top_srcdir/tests/fixtures/tokenizers/llama3" llama3
add "$top_srcdir/models/mkad-tiny" mkad-tiny
if [ -n "${TOK_REAL_DIR:-}" ]; then
    for d in qwen2.5 llama3.2; do
        [ -f "$TOK_REAL_DIR/$d/tokenizer.json" ] && add "$TOK_REAL_DIR/$d" "real-$d"
    done
fi
echo "tokenizer_parity: seed $seed, $n strings per tokenizer"
TOK_PARITY_EXTRA="$extra" CK_RUN_CASE=extra "$top_builddir/tests/test_tokenizer"
