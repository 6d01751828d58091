#!/usr/bin/env python3
"""train_tokenizer.py -- makes the small byte-level BPE tokenizers that the
tokenizer tests and the bundled model use, with the Hugging Face
`tokenizers` library, the way the real model families configure theirs.

  tests/fixtures/tokenizers/qwen2/    Qwen2.5 layout: NFC, the Qwen2 split
      regex, ByteLevel, merges as "a b" strings, <|endoftext|> <|im_start|>
      <|im_end|> and Qwen2.5's other added tokens after the vocabulary
      (special and non-special ones), the Qwen2.5 chat template.
  tests/fixtures/tokenizers/llama3/   Llama-3.1 layout: no normalizer, the
      Llama-3 split regex, ignore_merges, merges as ["a", "b"] pairs, the
      <|begin_of_text|> post-processor, Llama-3 special tokens, the
      Llama-3.1 chat template.
  models/mkad-tiny/                    the bundled model's tokenizer:
      Qwen2 style (ChatML), 4096 ids in all (<|endoftext|> <|im_start|>
      <|im_end|> = 0, 1, 2, then 4093 learned), trained on Jane Austen only,
      the Qwen2 chat template (default system prompt).

The corpus comes from Debian packages (apt-get install r-cran-janeaustenr
sqlite3-doc manpages-zh), this machine's C headers, and generated emoji
text; the chat templates from tests/ref/tok_templates.py.

usage: tools/train_tokenizer.py [--out-root .] [--which all|qwen2|llama3|tiny]
Needs: pip install tokenizers (and Python 3).
"""
import argparse
import glob
import gzip
import html
import json
import os
import random
import re
import struct
import sys
import zlib

os.environ.setdefault("RAYON_NUM_THREADS", "1")  # deterministic, single thread

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "ref"))
import tok_templates  # noqa: E402

QWEN2_RE = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
LLAMA3_RE = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""

AUSTEN_RDB = "/usr/lib/R/site-library/janeaustenr/data/Rdata.rdb"


# ---- corpus -------------------------------------------------------------------

def austen_text():
    """Jane Austen's six novels from r-cran-janeaustenr: the .rdb file is a
    run of blocks (4-byte big-endian length + zlib stream) of R's XDR
    serialisation; every string is a CHARSXP (type 9, length, bytes)."""
    data = open(AUSTEN_RDB, "rb").read()
    out, pos = [], 0
    while pos < len(data):
        d = zlib.decompressobj()
        raw = d.decompress(data[pos + 4:])
        pos = len(data) - len(d.unused_data)
        i = 14
        if struct.unpack(">i", raw[2:6])[0] == 3:  # format 3 names the native encoding
            i += 4 + struct.unpack(">i", raw[i:i + 4])[0]
        while i + 8 <= len(raw):
            flags = struct.unpack(">I", raw[i:i + 4])[0]
            if flags & 0xFF == 9:
                n = struct.unpack(">i", raw[i + 4:i + 8])[0]
                if 0 <= n <= len(raw) - i - 8:
                    out.append(raw[i + 8:i + 8 + n].decode("utf-8", "replace"))
                    i += 8 + n
                    continue
            i += 4
    # the package stores one line per string; the books in their order
    return "\n".join(out)


def sqlite_text(limit=3_000_000):
    parts, total = [], 0
    for f in sorted(glob.glob("/usr/share/doc/sqlite3/*.html")):
        t = open(f, encoding="utf-8", errors="replace").read()
        t = re.sub(r"(?s)<script.*?</script>|<style.*?</style>", " ", t)
        t = html.unescape(re.sub(r"<[^>]+>", "", t))
        t = re.sub(r"\n\s*\n+", "\n\n", t)
        parts.append(t)
        total += len(t)
        if total > limit:
            break
    return "\n".join(parts)


def code_text(limit=1_500_000):
    parts, total = [], 0
    for f in sorted(glob.glob("/usr/include/*.h")):
        t = open(f, encoding="utf-8", errors="replace").read()
        parts.append(t)
        total += len(t)
        if total > limit:
            break
    return "\n".join(parts)


def chinese_text(limit=1_500_000):
    parts, total = [], 0
    for f in sorted(glob.glob("/usr/share/man/zh_CN/man*/*.gz")):
        t = gzip.open(f).read().decode("utf-8", "replace")
        lines = [ln for ln in t.splitlines() if not ln.startswith(".\\\"")]
        t = "\n".join(re.sub(r"^\.[A-Za-z]+\s*", "", ln) for ln in lines)
        t = re.sub(r"\\f[BIPR]|\\[-&]", "", t)
        parts.append(t)
        total += len(t)
        if total > limit:
            break
    return "\n".join(parts)


def emoji_text(n=20000, seed=7):
    rng = random.Random(seed)
    pics = [chr(c) for c in list(range(0x1F600, 0x1F650)) + list(range(0x1F300, 0x1F5FF, 3)) + list(range(0x1F900, 0x1F9FF, 2))]
    zwj = ["\U0001F468\u200D\U0001F469\u200D\U0001F467", "\U0001F3F3\uFE0F\u200D\U0001F308", "\u2764\uFE0F", "\U0001F1EF\U0001F1F5",
           "\U0001F44D\U0001F3FD"]
    words = ["ok", "great", "lol", "see you", "thanks", "yes", "no", "wow", "nice", "cool"]
    out = []
    for _ in range(n):
        k = rng.randrange(4)
        if k == 0:
            out.append("".join(rng.choice(pics) for _ in range(rng.randrange(1, 4))))
        elif k == 1:
            out.append(rng.choice(zwj))
        else:
            out.append(rng.choice(words))
    return " ".join(out)


def corpus(kind):
    if kind == "austen":
        return [austen_text()]
    return [austen_text(), sqlite_text(), code_text(), chinese_text(), emoji_text()]


# ---- building -----------------------------------------------------------------

def batches(texts, size=1000):
    for t in texts:
        lines = t.splitlines(keepends=True)
        for i in range(0, len(lines), size):
            yield "".join(lines[i:i + size])


def train(texts, vocab_size, regex, nfc, specials=()):
    tok = Tokenizer(models.BPE())
    if nfc:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tr = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=list(specials))
    tok.train_from_iterator(batches(texts), trainer=tr)
    return tok


def write(dirname, tok, config, merges_as_strings, model_fields):
    os.makedirs(dirname, exist_ok=True)
    path = os.path.join(dirname, "tokenizer.json")
    tok.save(path)
    j = json.load(open(path, encoding="utf-8"))
    m = j["model"]
    if merges_as_strings:
        m["merges"] = [" ".join(p) if isinstance(p, list) else p for p in m["merges"]]
    else:
        m["merges"] = [p.split(" ") if isinstance(p, str) else p for p in m["merges"]]
    m.update(model_fields)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(j, f, ensure_ascii=False, separators=(",", ":"))
    with open(os.path.join(dirname, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, ensure_ascii=False, indent=2)
        f.write("\n")
    print("wrote %s: %d ids, %d bytes" % (dirname, tok.get_vocab_size(), os.path.getsize(path)))


def build_qwen2(root, texts):
    tok = train(texts, 12000, QWEN2_RE, nfc=True)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>"]])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t in ["<tool_call>", "</tool_call>", "<|fim_prefix|>"]])
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    cfg = {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None,
           "model_max_length": 32768, "tokenizer_class": "Qwen2Tokenizer", "clean_up_tokenization_spaces": False,
           "chat_template": tok_templates.QWEN25}
    write(os.path.join(root, "tests/fixtures/tokenizers/qwen2"), tok, cfg, True,
          {"continuing_subword_prefix": "", "end_of_word_suffix": "", "ignore_merges": False})


def build_llama3(root, texts):
    tok = train(texts, 12000, LLAMA3_RE, nfc=False)
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
                "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>", "<|start_header_id|>",
                "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True),
        processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|>:1 $B:1",
                                      special_tokens=[("<|begin_of_text|>", bos)]),
    ])
    cfg = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "clean_up_tokenization_spaces": True,
           "model_max_length": 131072, "tokenizer_class": "PreTrainedTokenizerFast",
           "chat_template": tok_templates.LLAMA31}
    write(os.path.join(root, "tests/fixtures/tokenizers/llama3"), tok, cfg, False, {"ignore_merges": True})


def build_tiny(root):
    # the special tokens take ids 0..2 (the trainer puts them first), so that
    # the model's config.json can say eos_token_id = 2 (<|im_end|>)
    tok = train(corpus("austen"), 4096, QWEN2_RE, nfc=True, specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    if tok.get_vocab_size() != 4096 or tok.token_to_id("<|im_end|>") != 2:
        sys.exit("mkad-tiny: trainer gave %d tokens, <|im_end|> = %s" % (tok.get_vocab_size(), tok.token_to_id("<|im_end|>")))
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    cfg = {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None,
           "model_max_length": 4096, "tokenizer_class": "Qwen2Tokenizer", "clean_up_tokenization_spaces": False,
           "chat_template": tok_templates.QWEN2}
    write(os.path.join(root, "models/mkad-tiny"), tok, cfg, True,
          {"continuing_subword_prefix": "", "end_of_word_suffix": "", "ignore_merges": False})


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out-root", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    ap.add_argument("--which", default="all", choices=["all", "qwen2", "llama3", "tiny"])
    a = ap.parse_args()
    if a.which in ("all", "qwen2", "llama3"):
        texts = corpus("mixed")
        print("corpus: %d characters" % sum(map(len, texts)))
        if a.which in ("all", "qwen2"):
            build_qwen2(a.out_root, texts)
        if a.which in ("all", "llama3"):
            build_llama3(a.out_root, texts)
    if a.which in ("all", "tiny"):
        build_tiny(a.out_root)


if __name__ == "__main__":
    main()
