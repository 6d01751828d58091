#!/bin/sh
# tokenizer_unicode.sh — every code point (all 1,114,112 but the surrogates),
# in context, through mkad's pre-tokenizer and through the Hugging Face
# `tokenizers` library, for each Split regex style the loader meets (GPT-2's
# ByteLevel regex, Llama-3, Qwen2, DeepSeek V3's three Splits, o200k's
# letter-case classes, every General_Category and every script by name,
# complements, binary properties):
# tests/ref/tok_sweep.py.  tokenizers is pinned (0.23.3: Oniguruma with
# Unicode 16.0.0, the version of engine/tok_unicode_tables.c) and installed
# from PyPI when missing; skips (exit 77) only when it cannot be installed.
set -eu
top_srcdir=${top_srcdir:-.}
top_builddir=${top_builddir:-.}
PYTHON=${PYTHON:-python3}
TOKENIZERS_VERSION=0.23.3
if ! command -v "$PYTHON" >/dev/null 2>&1; then
    echo "tokenizer_unicode: SKIP: no $PYTHON"
    exit 77
fi
if ! "$PYTHON" -c 'import tokenizers' 2>/dev/null; then
    echo "tokenizer_unicode: installing tokenizers==$TOKENIZERS_VERSION from PyPI"
    "$PYTHON" -m pip install -q "tokenizers==$TOKENIZERS_VERSION" 2>/dev/null ||
        "$PYTHON" -m pip install -q --break-system-packages "tokenizers==$TOKENIZERS_VERSION" 2>/dev/null || true
fi
if ! "$PYTHON" -c 'import tokenizers' 2>/dev/null; then
    echo "tokenizer_unicode: SKIP: the tokenizers package cannot be installed (pip install tokenizers==$TOKENIZERS_VERSION)"
    exit 77
fi
have=$("$PYTHON" -c 'import tokenizers; print(tokenizers.__version__)')
[ "$have" = "$TOKENIZERS_VERSION" ] ||
    echo "tokenizer_unicode: note: tokenizers $have, the tables were made for $TOKENIZERS_VERSION; a newer Unicode in its Oniguruma shows as differences"
exec "$PYTHON" "$top_srcdir/tests/ref/tok_sweep.py" "$top_builddir/tests/test_tokenizer" "$top_builddir/tests/tmp/tok_sweep" \
    ${TOK_SWEEP_ONLY:+--only "$TOK_SWEEP_ONLY"}
