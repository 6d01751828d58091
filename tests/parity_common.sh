# parity_common.sh — sourced by the parity scripts after they set `name`:
# locates the tree, the built tools and Python, and makes a clean work
# directory $W.  Exits 77 (skip) when numpy is missing on a developer's
# machine, 1 (fail) under CI, where tools/bootstrap.sh must have installed it.
top_srcdir=${top_srcdir:-$(cd "$(dirname "$0")/.." && pwd)}
top_builddir=${top_builddir:-$top_srcdir}
PYTHON=${PYTHON:-python3}
TOL=${PARITY_TOL:-1e-4}
# bf16 checkpoints: mkad keeps their K/V in bf16 (`compare.py kv-dtype`).
# Against logits computed elsewhere with f32 K/V (transformers, the training
# run) every K and V element carries a relative rounding error of up to 2^-9
# and the logits move by the same order (measured 0.3e-3 .. 2.9e-3 on the
# fixtures and the bundled model): TOL_KV_BF16.  The numpy reference rounds
# K/V as mkad does, but from f32 values that differ in the last bits, so an
# element near a rounding midpoint can land one bf16 step apart (measured
# 3e-7 .. 1e-4 over 16 prompts on the bundled model): TOL_KV_ROUND.  A real
# bug (RoPE, mask, head mapping, EMA carry) moves logits by far more.
TOL_KV_BF16=${PARITY_TOL_KV_BF16:-1e-2}
TOL_KV_ROUND=${PARITY_TOL_KV_ROUND:-5e-4}
export PYTHONDONTWRITEBYTECODE=1 # keep tests/ref/ free of __pycache__ (srcdir may be read-only)

if [ "$PYTHON" = no ] || ! "$PYTHON" -c 'import numpy' >/dev/null 2>&1; then
    if [ -n "${CI:-}" ]; then
        echo "$name: FAIL: numpy is not importable by PYTHON='$PYTHON' (tools/bootstrap.sh deps installs it)"
        exit 1
    fi
    echo "$name: SKIP: numpy is not importable by PYTHON='$PYTHON' (pip install numpy)"
    exit 77
fi

GEN=$top_builddir/mkad-genmodel
CLI=$top_builddir/mkad-cli
CMP=$top_srcdir/tests/ref/compare.py
for b in "$GEN" "$CLI"; do
    if [ ! -x "$b" ]; then
        echo "$name: FAIL: $b not built"
        exit 1
    fi
done

W=$top_builddir/tests/tmp/$name
rm -rf "$W"
mkdir -p "$W" || exit 1
