#!/usr/bin/env python3
"""tok_bench.py -- encode throughput of the C tokenizer and of Hugging Face
`tokenizers`, one thread each, same text, same machine, one run.

The text (about 4 MB) mixes Jane Austen, the SQLite documentation, C
headers, Chinese man pages and emoji, as tools/train_tokenizer.py collects
them (Debian packages r-cran-janeaustenr sqlite3-doc manpages-zh).

usage: tok_bench.py BUILD_DIR TOKENIZER_DIR... [--reps 3]
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

os.environ["RAYON_NUM_THREADS"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "tools"))


def mixed_text():
    import train_tokenizer as tt
    parts = [tt.austen_text()[:1_600_000], tt.sqlite_text(800_000)[:800_000], tt.code_text(800_000)[:800_000],
             tt.chinese_text(600_000)[:600_000], tt.emoji_text(30000)[:200_000]]
    return "\n".join(parts)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("build")
    ap.add_argument("dirs", nargs="+")
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    from tokenizers import Tokenizer, __version__
    text = mixed_text()
    data = text.encode("utf-8")
    with tempfile.NamedTemporaryFile("wb", suffix=".txt", delete=False) as f:
        f.write(data)
        path = f.name
    print("text: %.2f MB; tokenizers %s; RAYON_NUM_THREADS=1" % (len(data) / 1e6, __version__))
    for d in a.dirs:
        hf = Tokenizer.from_file(os.path.join(d, "tokenizer.json"))
        best = 1e30
        for _ in range(a.reps):
            t0 = time.perf_counter()
            enc = hf.encode(text, add_special_tokens=False)
            best = min(best, time.perf_counter() - t0)
        print("%s\n  HF tokenizers encode: %.2f MB/s, %d tokens (best of %d)" % (d, len(data) / 1e6 / best, len(enc.ids), a.reps))
        out = subprocess.run([os.path.join(a.build, "tests", "test_tokenizer"), "--bench", d, path, str(a.reps)],
                             capture_output=True, text=True, check=True).stdout.strip()
        print("  " + out)
        lines = re.findall(r"[^\n]*\n|[^\n]+$", text)  # split at \n only, as the C side does
        best = 1e30
        for _ in range(a.reps):
            t0 = time.perf_counter()
            encs = hf.encode_batch(lines, add_special_tokens=False)
            best = min(best, time.perf_counter() - t0)
        print("  HF tokenizers encode_batch by line: %.2f MB/s, %d tokens (best of %d)"
              % (len(data) / 1e6 / best, sum(len(e.ids) for e in encs), a.reps))
        out = subprocess.run([os.path.join(a.build, "tests", "test_tokenizer"), "--bench", d, path, str(a.reps), "lines"],
                             capture_output=True, text=True, check=True).stdout.strip()
        print("  " + out)
    os.unlink(path)


if __name__ == "__main__":
    main()
