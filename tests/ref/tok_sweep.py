#!/usr/bin/env python3
"""tok_sweep.py -- every code point, in context, split by mkad's
pre-tokenizer and by the Hugging Face `tokenizers` library, for each Split
regex style the loader meets in real tokenizer.json files.

For each style it writes a small tokenizer.json (byte-level alphabet, no
merges: only the pre-tokenizer matters) with `tokenizers` itself, then
feeds chunks of text to `test_tokenizer --split FILE MODE` (the C
pre-tokenizer alone) and compares the end offset of every pre-token with
tokenizers' pre_tokenize_str.  Every code point except the surrogates
appears in the context  "a" c " " c "1" "\\n"  (after a letter, after a
space, before a digit, before a newline).  MODE -1 is the build as linked;
MODE 2 builds every category class from explicit ranges (what a PCRE2 of
an unknown Unicode version gets), checked for the styles in EXPLICIT.

usage: tok_sweep.py TEST_TOKENIZER_BINARY TMPDIR [--only NAME,...] [--jobs N]
exit 0: all equal; 1: differences (listed); 2: setup error.
"""
import argparse
import array
import concurrent.futures
import os
import subprocess
import sys

os.environ.setdefault("RAYON_NUM_THREADS", "1")
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers  # noqa: E402

GPT2 = None  # ByteLevel's own regex (use_regex=True)
LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
          r"\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
         r"\s*[\r\n]+|\s+(?!\S)|\s+")
DEEPSEEK_V3 = [r"\p{N}{1,3}", "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
               r"""[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+|"""
               r""" ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""]
O200K = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|"
         r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|"
         r"\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# Every General_Category on its own, names in the forms Oniguruma accepts.
CATEGORIES = "|".join(r"\p{%s}+" % n for n in [
    "Uppercase_Letter", "ll", "Lt", "modifier letter", "Lo", "Nonspacing-Mark", "Mc", "Me", "Decimal_Number", "Nl",
    "No", "Pc", "Pd", "Open_Punctuation", "Pe", "Pi", "Pf", "Po", "Sm", "Sc", "Sk", "Other_Symbol", "Zs", "Zl",
    "Zp", "Cc", "Format", "Co", "Cn"])
# Groups, complements inside and outside classes, \d \D \s \S, Any, Assigned.
NEGATIONS = (r"[^\P{So}\p{Sm}]+|[\P{Assigned}\p{Zs}]+|\p{^L}\p{LC}|\p{Cased_Letter}+|[\p{Z}\p{C}]+|\P{Letter}\d+|"
             r"[\S\p{M}]\s|\D\p{Any}|\p{P}+")



def scripts_regex():
    """Every script on its own (and Unknown), by one of the names mkad's
    tables list for it, long names and four-letter codes in turn."""
    import re
    src = open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "engine", "tok_unicode_tables.c")).read()
    names = {}
    for name, idx in re.findall(r'\{"([a-z0-9]+)",(\d+)\}', src):
        names.setdefault(int(idx), []).append(name)
    pick = [sorted(v, key=len)[(i % 2) * (len(v) - 1)] for i, v in sorted(names.items())]
    return "|".join(r"\p{%s}+" % n for n in pick + ["Unknown"])


SCRIPTS = scripts_regex()
# Binary properties (tables checked against Oniguruma when generated; this
# checks how they reach PCRE2), and \h.
BINARY = (r"\p{Alphabetic}+|\p{White_Space}+|\p{Emoji}+|\p{Extended_Pictographic}+|[\P{Cased}\p{Ideographic}]+|"
          r"\p{Default_Ignorable_Code_Point}|\h")

STYLES = {
    "gpt2": GPT2, "llama3": [LLAMA3], "qwen2": [QWEN2], "deepseek_v3": DEEPSEEK_V3, "o200k": [O200K],
    "categories": [CATEGORIES], "negations": [NEGATIONS], "scripts": [SCRIPTS], "binary": [BINARY],
}
EXPLICIT = ["deepseek_v3", "categories"]
CHUNK = 8192


def pretokenizer(regexes):
    if regexes is None:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    steps = [pre_tokenizers.Split(Regex(r), behavior="isolated", invert=False) for r in regexes]
    return pre_tokenizers.Sequence(steps)


def write_tokenizer(regexes, path):
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    steps = [] if regexes is None else [pre_tokenizers.Split(Regex(r), behavior="isolated", invert=False) for r in regexes]
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=regexes is None))
    tok.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tok.decoder = decoders.ByteLevel()
    tok.save(path)


def chunks():
    for lo in range(0, 0x110000, CHUNK):
        cps = [c for c in range(lo, min(lo + CHUNK, 0x110000)) if not 0xD800 <= c < 0xE000]
        yield cps, "".join("a%s %s1\n" % (chr(c), chr(c)) for c in cps)


def describe(text, ends, at):
    """The pieces around character offset at."""
    prev = [0] + list(ends)
    pieces = [text[prev[i]:prev[i + 1]] for i in range(len(ends)) if prev[i + 1] >= at - 6 and prev[i] <= at + 6]
    return " | ".join(repr(p) for p in pieces)


def sweep(name, binary, tmp, modes):
    regexes = STYLES[name]
    path = os.path.join(tmp, "sweep-%s.json" % name)
    write_tokenizer(regexes, path)
    pt = pretokenizer(regexes)
    procs = {m: subprocess.Popen([binary, "--split", path, str(m)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
             for m in modes}
    bad, report = 0, []
    for cps, text in chunks():
        exp = array.array("I", [o[1] for _, o in pt.pre_tokenize_str(text)])
        data = text.encode("utf-8")
        for m, p in procs.items():
            p.stdin.write(b"%d\n" % len(data))
            p.stdin.write(data)
            p.stdin.flush()
            line = p.stdout.readline()
            if not line:
                return name, -1, ["%s: test_tokenizer --split %s died" % (name, m)]
            n = int(line)
            got = array.array("I")
            got.frombytes(p.stdout.read(4 * n))
            if got == exp:
                continue
            # the code points whose context splits differently
            e, g = set(exp), set(got)
            for off in sorted(e ^ g):
                k = min(max(off - 1, 0) // 6, len(cps) - 1)
                bad += 1
                if len(report) < 12:
                    report.append("%s (mode %d): U+%04X: tokenizers %s; mkad %s" % (
                        name, m, cps[k], describe(text, exp, off), describe(text, got, off)))
    for p in procs.values():
        p.stdin.close()
        p.wait()
    return name, bad, report


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("binary")
    ap.add_argument("tmp")
    ap.add_argument("--only", default="")
    ap.add_argument("--jobs", type=int, default=2)
    a = ap.parse_args()
    names = [n for n in STYLES if not a.only or n in a.only.split(",")]
    os.makedirs(a.tmp, exist_ok=True)
    failed = 0
    with concurrent.futures.ProcessPoolExecutor(max_workers=a.jobs) as ex:
        futs = [ex.submit(sweep, n, a.binary, a.tmp, [-1, 2] if n in EXPLICIT else [-1]) for n in names]
        for f in futs:
            name, bad, report = f.result()
            if bad == 0:
                print("tok_sweep: %-12s all %d code points split as tokenizers does" % (name, 0x110000 - 0x800))
            else:
                failed += 1
                print("tok_sweep: %-12s %s differences" % (name, bad if bad > 0 else "?"))
                for r in report:
                    print("  " + r)
    print("%d passed, %d failed" % (len(names) - failed, failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
