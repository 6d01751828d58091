#!/usr/bin/env python3
"""tok_gen.py -- the test strings of the tokenizer parity test and the
expected outputs, produced by the Hugging Face libraries.

The strings are not stored: both this script and tests/test_tokenizer.c
build them from tests/fixtures/tokenizers/gen.json (a small mixed corpus
and a list of pieces) with the same generator (splitmix64, rules in
gen_string below; keep the two in step).  Only a compact digest of the
expected results is committed, per tokenizer, in expected.txt:

    # comments
    B <block> <fnv32 of the block's 100 strings>     (checks the C generator)
    <n_ids> <fnv32 of ids> <fnv32 of ids without special tokens | => <fnv32 of decode | =>

ids: tokenizers' encode(text, add_special_tokens=False); the text is the
string's bytes decoded with errors="replace" (U+FFFD per maximal invalid
subpart, what the C tokenizer does with invalid UTF-8).  "without special
tokens": encode_special_tokens=True ("=" when the same).  decode: of the
ids ("=" when it equals the normalised text, the round trip).  chat.json
holds transformers' apply_chat_template output for a set of conversations.

usage:
  tok_gen.py corpus                    rebuild gen.json from Debian packages
  tok_gen.py expected DIR [--seed S --n N --out FILE]
                                       write DIR's expected digest
  tok_gen.py chat DIR [--out FILE]     write DIR's chat.json (needs transformers)
  tok_gen.py strings [--n N]           print the strings (debugging)
"""
import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.normpath(os.path.join(HERE, "..", ".."))
GEN_JSON = os.path.join(ROOT, "tests", "fixtures", "tokenizers", "gen.json")
M64 = (1 << 64) - 1
DEFAULT_SEED = 20260601
DEFAULT_N = 10000


class Rng:
    """splitmix64; below(n) = next() % n."""

    def __init__(self, seed):
        self.s = seed & M64

    def next(self):
        self.s = (self.s + 0x9E3779B97F4A7C15) & M64
        z = self.s
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
        return z ^ (z >> 31)

    def below(self, n):
        return self.next() % n


WS = [0x20, 0x09, 0x0A, 0x0D, 0xA0, 0x3000, 0x85, 0x180E, 0x2028, 0x200B, 0xFEFF, 0x0B, 0x0C]
SEPS = [b",", b".", b" ", b"", b"e-", b"/", b"_", b"\xc2\xa0"]


def cp_utf8(c):
    return chr(c).encode("utf-8", "surrogatepass")


def aligned(corpus, off, length):
    """corpus[off:off+length] moved to character boundaries."""
    n = len(corpus)
    while off < n and (corpus[off] & 0xC0) == 0x80:
        off += 1
    end = min(n, off + length)
    while end < n and end > off and (corpus[end] & 0xC0) == 0x80:
        end -= 1
    return corpus[off:end]


def gen_cp(r):
    k = r.below(8)
    if k == 0:
        return 32 + r.below(95)
    if k == 1:
        return 0xA0 + r.below(0x250 - 0xA0)
    if k == 2:
        return 0x300 + r.below(0x70)
    if k == 3:
        return 0x4E00 + r.below(0x9FFF - 0x4E00)
    if k == 4:
        return 0xAC00 + r.below(0xD7A4 - 0xAC00) if r.below(2) else 0x1100 + r.below(0x100)
    if k == 5:
        return 0x1F300 + r.below(0x1FB00 - 0x1F300)
    if k == 6:
        c = 1 + r.below(0x10FFFF)
        return c + 0x800 if 0xD800 <= c < 0xE000 else c
    return WS[r.below(len(WS))]


def gen_string(g, i, seed):
    """The i-th test string (bytes).  tests/test_tokenizer.c: gen_string()."""
    corpus, pieces = g["corpus_bytes"], g["pieces_bytes"]
    r = Rng(seed ^ ((i * 0x632BE59BD9B4E019) & M64))
    kind = r.below(10)
    out = bytearray()
    if kind <= 1:
        out += aligned(corpus, r.below(len(corpus)), 1 + r.below(300))
    elif kind == 2:
        off = r.below(len(corpus))
        out += corpus[off:off + 1 + r.below(64)]
    elif kind == 3:
        for _ in range(2 + r.below(6)):
            if r.below(2):
                out += pieces[r.below(len(pieces))]
            else:
                out += aligned(corpus, r.below(len(corpus)), 1 + r.below(40))
    elif kind == 4:
        for _ in range(1 + r.below(24)):
            out += cp_utf8(gen_cp(r))
    elif kind == 5:
        for _ in range(1 + r.below(32)):
            out.append(r.below(256))
    elif kind == 6:
        for _ in range(1 + r.below(200)):
            out += cp_utf8(WS[r.below(len(WS))])
        out += aligned(corpus, r.below(len(corpus)), 1 + r.below(12))
    elif kind == 7:
        unit = pieces[r.below(len(pieces))] if r.below(2) else cp_utf8(gen_cp(r))
        count = 1 + r.below(1000)
        while count > 0 and len(out) + len(unit) <= 4000:
            out += unit
            count -= 1
    elif kind == 8:
        for _ in range(1 + r.below(5)):
            for _ in range(1 + r.below(20)):
                out.append(0x30 + r.below(10))
            out += SEPS[r.below(len(SEPS))]
    else:
        # special-token look-alikes: a piece, cut or with a character changed, amid text
        p = bytearray(pieces[r.below(len(pieces))])
        op = r.below(4)
        # one draw per statement: the C generator draws in this order
        if op == 1 and len(p) > 1:
            at = r.below(len(p))
            del p[at]
        elif op == 2:
            at = r.below(len(p) + 1)
            c = 32 + r.below(95)
            p.insert(at, c)
        elif op == 3 and len(p) > 0:
            at = r.below(len(p))
            c = 32 + r.below(95)
            p[at] = c
        out += aligned(corpus, r.below(len(corpus)), r.below(20))
        out += p
        out += aligned(corpus, r.below(len(corpus)), r.below(20))
    return bytes(out)


def load_gen():
    g = json.load(open(GEN_JSON, encoding="utf-8"))
    g["corpus_bytes"] = g["corpus"].encode("utf-8")
    g["pieces_bytes"] = [p.encode("utf-8") for p in g["pieces"]]
    return g


def fnv32(data, h=0x811C9DC5):
    for b in data:
        h = ((h ^ b) * 0x01000193) & 0xFFFFFFFF
    return h


def ids_hash(ids):
    return fnv32(b"".join(int(x).to_bytes(4, "little") for x in ids))


# ---- corpus -------------------------------------------------------------------

PIECES = [
    "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|im_start|>user\n", "<|im_start|>assistant\n",
    "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
    "<|eom_id|>", "<|python_tag|>", "<|reserved_special_token_1|>", "<|object_ref_start|>", "<tool_call>",
    "</tool_call>", "<|fim_prefix|>", "<|im_end", "im_end|>", "<| im_end |>", "<|IM_END|>", "<<|im_end|>>",
    "<|im_end|><|im_end|>", "< |eot_id|>", "<|endoftext|", "\u00abspecial\u00bb",
    "   ", "\n\n", "\r\n", "\t\t", " \n ", "\u3000", "\u00a0\u00a0", "\n\n\n\n",
    "don't", "I'M", "you'll", "we'VE", "it's", "'s", "'d", "\u2019s",
    "123", "4567", "1,000,000", "3.14159", "2026-06-01", "0x7fff", "\u0661\u0662\u0663", "\u2167",
    "e\u0301", "a\u0308\u0301", "\u1100\u1161\u11a8", "\uac00\u11a8", "\u0915\u093c", "\u212b", "\u1e9b\u0323",
    "\ufb01", "\u00c5", "A\u030a", "\u0344", "q\u0301\u0316", "\u0898a\u0316", "\U00011935\U00011930",
    "\U0001F468\u200D\U0001F469\u200D\U0001F467\u200D\U0001F466", "\U0001F1EF\U0001F1F5", "\U0001F44D\U0001F3FD",
    "\u2764\ufe0f", "\U0001F600", "\u200b", "\ufeff", "\u180e", "\u2028", "\u0085",
    "int main(void) {\n    return 0;\n}", "def f(x):\n    return x ** 2", "SELECT * FROM t WHERE a = 'b';",
    "fn main() { println!(\"hi\"); }", "<div class=\"x\">&amp;</div>", "    ", "\t", "=>", "->", "::", "!==",
    "\u4f60\u597d\uff0c\u4e16\u754c", "\u3053\u3093\u306b\u3061\u306f", "\uc548\ub155\ud558\uc138\uc694",
    "\u0645\u0631\u062d\u0628\u0627", "\u0928\u092e\u0938\u094d\u0924\u0947", "\u041f\u0440\u0438\u0432\u0435\u0442",
    "\u0393\u03b5\u03b9\u03ac", "\u05e9\u05dc\u05d5\u05dd", "\u0e2a\u0e27\u0e31\u0e2a\u0e14\u0e35",
    "\U0001e4f0\U00011f02\u1c89", "\U00010d40\U00016130",
]

MULTI = """
日本語の文章です。東京は日本の首都です。漢字、ひらがな、カタカナが混ざっています。
한국어 문장입니다. 서울은 대한민국의 수도입니다.
Русский текст: Москва — столица России. Ёлка, ёж.
Ελληνικά: Η Αθήνα είναι η πρωτεύουσα της Ελλάδας.
العربية: القاهرة هي عاصمة مصر.
हिन्दी: नई दिल्ली भारत की राजधानी है।
עברית: ירושלים היא עיר.
ไทย: กรุงเทพมหานครเป็นเมืองหลวง
Tiếng Việt: Hà Nội là thủ đô của Việt Nam.
Emoji: 😀😃😄 👍🏽 👨‍👩‍👧‍👦 🇯🇵🇺🇸 ❤️ 🏳️‍🌈 ✨🚀
Math: ∀x∈ℝ, x² ≥ 0; ∑_{i=1}^{n} i = n(n+1)/2; π ≈ 3.14159; √2; ∞.
Combining: e\u0301 a\u0308 n\u0303 o\u0302\u0323 Z\u0351\u036b\u0343\u036a\u0302\u036b\u033d\u034f\u0334
def fibonacci(n: int) -> int:
    if n < 2:
        return n
    return fibonacci(n - 1) + fibonacci(n - 2)

const add = (a, b) => a + b; // JavaScript
fn main() { let v: Vec<u32> = (0..10).collect(); println!("{:?}", v); }
#include <stdio.h>
int main(int argc, char **argv) { printf("%d\\n", argc); return 0; }
SELECT name, COUNT(*) FROM users GROUP BY name HAVING COUNT(*) > 1;
{"key": "value", "list": [1, 2.5, null, true], "nested": {"a": "\\u00e9"}}
Numbers: 1234567890 3.14159 -42 1e-10 0xDEADBEEF 1,234,567.89 ١٢٣ ⅷ
    Indented    with    tabs	and	spaces   
Trailing spaces and a very      long     gap.
"""


def make_corpus():
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import train_tokenizer as tt
    aus = tt.austen_text()
    sq = tt.sqlite_text(200000)
    code = tt.code_text(200000)
    zh = tt.chinese_text(200000)
    parts = [aus[200000:216000], sq[50000:58000], code[30000:38000], zh[20000:28000], MULTI]
    corpus = "\n".join(parts)
    json.dump({"comment": "tests/ref/tok_gen.py corpus; the tokenizer test strings are cut from this",
               "corpus": corpus, "pieces": PIECES}, open(GEN_JSON, "w", encoding="utf-8"), ensure_ascii=False, indent=0)
    print("wrote %s: %d corpus bytes, %d pieces" % (GEN_JSON, len(corpus.encode()), len(PIECES)))


# ---- expected outputs ---------------------------------------------------------

def expected(d, seed, n, out):
    from tokenizers import Tokenizer, __version__
    g = load_gen()
    hf = Tokenizer.from_file(os.path.join(d, "tokenizer.json"))
    norm = hf.normalizer.normalize_str if hf.normalizer else (lambda s: s)
    bos = json.load(open(os.path.join(d, "tokenizer.json"), encoding="utf-8")).get("post_processor")
    lines = ["# tokenizer parity digest: tests/ref/tok_gen.py expected (tokenizers %s)" % __version__,
             "seed %d n %d" % (seed, n)]
    texts = []
    for i in range(n):
        b = gen_string(g, i, seed)
        texts.append(b.decode("utf-8", "replace"))
    hf.encode_special_tokens = False
    enc_a = hf.encode_batch(texts, add_special_tokens=False)
    hf.encode_special_tokens = True
    enc_b = hf.encode_batch(texts, add_special_tokens=False)
    hf.encode_special_tokens = False
    bh = 0x811C9DC5
    for i in range(n):
        if i % 100 == 0:
            bh = 0x811C9DC5
            for k in range(i, min(n, i + 100)):
                bh = fnv32(gen_string(g, k, seed), bh)
            lines.append("B %d %08x" % (i // 100, bh))
        a, b = enc_a[i].ids, enc_b[i].ids
        dec = hf.decode(a, skip_special_tokens=False)
        fb = "=" if b == a else "%08x" % ids_hash(b)
        fd = "=" if dec == norm(texts[i]) else "%08x" % fnv32(dec.encode("utf-8"))
        lines.append("%d %08x %s %s" % (len(a), ids_hash(a), fb, fd))
        if i < 50 and bos is not None:  # the post-processor adds what the C side adds
            withs = hf.encode(texts[i], add_special_tokens=True).ids
            assert withs[len(withs) - len(a):] == a or withs[:len(a)] == a, (i, withs, a)
    with open(out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("wrote %s (%d strings)" % (out, n))


# ---- chat ------------------------------------------------------------------------

CONVS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "What's 2+2?"}],
    [{"role": "user", "content": "  spaced content \n"}, {"role": "assistant", "content": "\tok\u3000"}],
    [{"role": "system", "content": "  sys prompt  \n"}, {"role": "user", "content": "a"}],
    [{"role": "user", "content": "weather?"}, {"role": "assistant", "content": "calling"},
     {"role": "tool", "content": "{\"temp\": 20}"}, {"role": "tool", "content": "line1\nline2\t\"q\"\\ \x01"},
     {"role": "user", "content": "thanks"}],
    [{"role": "user", "content": "日本語と한국어 😀👍🏽 e\u0301 ﬁ"}, {"role": "assistant", "content": "ok"}],
    [{"role": "user", "content": "first"}, {"role": "system", "content": "late system"},
     {"role": "user", "content": "second"}],
    [{"role": "user", "content": ""}],
]


def chat(d, out):
    """apply_chat_template with the directory's own chat template (real
    templates of other models are tested by tests/chat_templates.sh)."""
    import transformers
    from transformers import PreTrainedTokenizerFast
    tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(d, "tokenizer.json"))
    cfg = json.load(open(os.path.join(d, "tokenizer_config.json"), encoding="utf-8"))
    for k in ("bos_token", "eos_token", "pad_token"):
        if cfg.get(k):
            setattr(tok, k, cfg[k])
    cases = []
    for ci, conv in enumerate(CONVS):
        for gen in (False, True):
            text = tok.apply_chat_template(conv, chat_template=cfg["chat_template"], tokenize=False,
                                           add_generation_prompt=gen)
            ids = tok.apply_chat_template(conv, chat_template=cfg["chat_template"], tokenize=True,
                                          add_generation_prompt=gen)
            if isinstance(ids, dict) or hasattr(ids, "keys"):
                ids = ids["input_ids"]
            cases.append({"conv": ci, "add_generation_prompt": gen, "text": text, "ids": list(ids)})
    json.dump({"comment": "transformers %s apply_chat_template; tests/ref/tok_gen.py chat" % transformers.__version__,
               "convs": CONVS, "cases": cases},
              open(out, "w", encoding="utf-8"), ensure_ascii=False, indent=1)
    print("wrote %s: %d cases" % (out, len(cases)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("cmd", choices=["corpus", "expected", "chat", "strings"])
    ap.add_argument("dir", nargs="?")
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED)
    ap.add_argument("--n", type=int, default=DEFAULT_N)
    ap.add_argument("--out")
    a = ap.parse_args()
    if a.cmd == "corpus":
        make_corpus()
    elif a.cmd == "expected":
        expected(a.dir, a.seed, a.n, a.out or os.path.join(a.dir, "expected.txt"))
    elif a.cmd == "chat":
        chat(a.dir, a.out or os.path.join(a.dir, "chat.json"))
    else:
        g = load_gen()
        for i in range(a.n):
            print(i, repr(gen_string(g, i, a.seed)))


if __name__ == "__main__":
    main()
