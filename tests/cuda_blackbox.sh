#!/bin/sh
# cuda_blackbox.sh — the daemon's black-box suite (tests/server_blackbox.sh)
# against `mkad --backend cuda`.  Run by `make check-cuda`; skips (77) where
# the CUDA backend cannot run (built without --with-cuda, or no GPU).
: "${top_srcdir:=$(cd "$(dirname "$0")/.." && pwd)}"
: "${top_builddir:=$(pwd)}"
if [ ! -x "$top_builddir/tests/test_cuda" ]; then
    echo "cuda_blackbox: FAIL: $top_builddir/tests/test_cuda is not built (make check-cuda builds it)"
    exit 1
fi
if ! "$top_builddir/tests/test_cuda" --available; then
    echo "cuda_blackbox: SKIP: the CUDA backend is not available here"
    exit 77
fi
MKAD_EXTRA_ARGS="--backend cuda${MKAD_EXTRA_ARGS:+ $MKAD_EXTRA_ARGS}"
export top_srcdir top_builddir MKAD_EXTRA_ARGS
exec sh "$top_srcdir/tests/server_blackbox.sh"
