#!/bin/sh
# cuda_hf.sh — plain attention on the CUDA backend against Hugging Face
# transformers run now (torch on the GPU, float32 model): mkad-cli --backend
# cuda --dump-logits on levels-0 models from mkad-genmodel (qwen2 and llama,
# GQA 7, head_dim 64/128, bf16/f32, RoPE scalings), tolerance for bf16
# (tests/ref/cuda_hf.py says why).  mkad-cli --backend cpu is checked too, as
# a control (1e-4, like tests/parity_hf.sh).
#
# Run by `make check-cuda`.  Skips (77) without the CUDA backend, a GPU for
# torch, or torch/transformers/numpy.
: "${top_srcdir:=$(cd "$(dirname "$0")/.." && pwd)}"
: "${top_builddir:=$(pwd)}"
PYTHON=${PYTHON:-python3}
[ "$PYTHON" != no ] || PYTHON=python3
export PYTHONDONTWRITEBYTECODE=1
if [ ! -x "$top_builddir/tests/test_cuda" ]; then
    echo "cuda_hf: FAIL: $top_builddir/tests/test_cuda is not built (make check-cuda builds it)"
    exit 1
fi
if ! "$top_builddir/tests/test_cuda" --available; then
    echo "cuda_hf: SKIP: the CUDA backend is not available here"
    exit 77
fi
if ! "$PYTHON" -c 'import numpy, torch, transformers; assert torch.cuda.is_available()' >/dev/null 2>&1; then
    echo "cuda_hf: SKIP: $PYTHON lacks numpy/torch/transformers or torch sees no GPU"
    exit 77
fi
exec "$PYTHON" "$top_srcdir/tests/ref/cuda_hf.py" --genmodel "$top_builddir/mkad-genmodel" \
    --cli "$top_builddir/mkad-cli" --work "$top_builddir/tests/tmp/cuda_hf" ${CUDA_TOL:+--tol "$CUDA_TOL"}
