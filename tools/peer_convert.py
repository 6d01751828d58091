#!/usr/bin/env python3
"""Runs llama.cpp's convert_hf_to_gguf.py (from the vendored copy given as
argv[1]) on an mkad-genmodel Qwen2 model with the rest of the arguments.

The one change: the model directory carries mkad's small test tokenizer
(a 12,000-token BPE with Qwen2's pre-tokenizer regex), whose vocabulary
checksum the converter does not know, so its pre-tokenizer name is given as
"qwen2" instead of being guessed from the checksum.  The weights, the
hyper-parameters and the tensor layout are converted by the unmodified code.
"""
import os
import runpy
import sys

src = os.path.abspath(sys.argv[1])
sys.path[:0] = [src, os.path.join(src, "gguf-py")]
import conversion.base as base  # noqa: E402

base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "qwen2"
sys.argv = [os.path.join(src, "convert_hf_to_gguf.py")] + sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
