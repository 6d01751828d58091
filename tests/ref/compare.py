#!/usr/bin/env python3
"""compare.py — numpy helpers for tests/parity_mka.sh and tests/parity_hf.sh.

  compare.py logits GOT REF [--tol 1e-4] [--label TEXT]
      GOT, REF: raw little-endian float32 logits.  Prints one line with
      max|got-ref| / max|ref|; exit 0 when within --tol, 1 otherwise (also on
      a size mismatch, a non-finite value or a missing file).
  compare.py meta-args META
      prints the case's mkad-genmodel arguments, one per line
  compare.py meta-seqs META
      prints one line per sequence: "NAME FILE ID,ID,..."
  compare.py check-model META DIR
      checks the sha256 of every model file recorded in META against DIR;
      exit 0 when all match, 1 (naming the files) otherwise.  config.json is
      also accepted when it parses to the same JSON as recorded (a different
      jansson may print numbers differently).
  compare.py kv-dtype MODEL_DIR
      prints the dtype mkad's CPU backend keeps K/V in for this model: bf16
      when model.embed_tokens.weight is stored as BF16, else f32
  compare.py ids N V|MODEL_DIR [SEED]
      prints N deterministic token ids in [0, V), comma-separated (V read from
      MODEL_DIR/config.json when a directory is given)
"""
import hashlib
import json
import os
import sys

import numpy as np

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import st  # noqa: E402


def cmd_logits(args):
    tol = 1e-4
    label = None
    files = []
    i = 0
    while i < len(args):
        if args[i] == "--tol":
            tol = float(args[i + 1])
            i += 2
        elif args[i] == "--label":
            label = args[i + 1]
            i += 2
        else:
            files.append(args[i])
            i += 1
    if len(files) != 2:
        print("usage: compare.py logits GOT REF [--tol T] [--label TEXT]", file=sys.stderr)
        return 2
    got_p, ref_p = files
    label = label or os.path.basename(got_p)
    for p in files:
        if not os.path.exists(p):
            print("FAIL %s: %s does not exist" % (label, p))
            return 1
    got = np.fromfile(got_p, dtype="<f4").astype(np.float64)
    ref = np.fromfile(ref_p, dtype="<f4").astype(np.float64)
    if got.size != ref.size or ref.size == 0:
        print("FAIL %s: %d logits, expected %d" % (label, got.size, ref.size))
        return 1
    if not np.all(np.isfinite(got)):
        print("FAIL %s: %d non-finite logits" % (label, int(np.sum(~np.isfinite(got)))))
        return 1
    scale = float(np.max(np.abs(ref)))
    err = float(np.max(np.abs(got - ref))) / (scale if scale > 0 else 1.0)
    ok = err <= tol
    same_argmax = int(np.argmax(got)) == int(np.argmax(ref))
    print("%s %s: max|a-b|/max|b| = %.3e (tol %.0e, max|b| %.3f, argmax %s)"
          % ("ok  " if ok else "FAIL", label, err, tol, scale, "same" if same_argmax else "DIFFERS"))
    return 0 if ok else 1


def load_meta(p):
    with open(p) as f:
        return json.load(f)


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(1 << 20), b""):
            h.update(b)
    return h.hexdigest()


def cmd_check_model(args):
    meta_p, d = args
    meta = load_meta(meta_p)
    want = meta["model_files"]
    have = sorted(os.listdir(d))
    bad = []
    for fn in sorted(set(want) | set(have)):
        if fn not in want:
            bad.append("%s: not in the fixture" % fn)
            continue
        if fn not in have:
            bad.append("%s: not generated" % fn)
            continue
        if sha256(os.path.join(d, fn)) == want[fn]:
            continue
        if fn == "config.json" and "config" in meta:
            with open(os.path.join(d, fn)) as f:
                if json.load(f) == meta["config"]:
                    continue
        bad.append("%s: sha256 differs" % fn)
    if bad:
        for b in bad:
            print("  " + b)
        return 1
    return 0


def main(argv):
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    cmd, args = argv[1], argv[2:]
    if cmd == "logits":
        return cmd_logits(args)
    if cmd == "meta-args" and len(args) == 1:
        for a in load_meta(args[0])["genmodel_args"]:
            print(a)
        return 0
    if cmd == "meta-seqs" and len(args) == 1:
        for s in load_meta(args[0])["sequences"]:
            print(s["name"], s["file"], ",".join(str(i) for i in s["ids"]))
        return 0
    if cmd == "check-model" and len(args) == 2:
        return cmd_check_model(args)
    if cmd == "kv-dtype" and len(args) == 1:
        print("bf16" if st.tensor_dtype(args[0], "model.embed_tokens.weight") == "BF16" else "f32")
        return 0
    if cmd == "ids" and len(args) in (2, 3):
        n = int(args[0])
        if os.path.isdir(args[1]):
            with open(os.path.join(args[1], "config.json")) as f:
                v = int(json.load(f)["vocab_size"])
        else:
            v = int(args[1])
        seed = int(args[2]) if len(args) == 3 else 0
        rng = np.random.default_rng(seed)
        print(",".join(str(int(x)) for x in rng.integers(0, v, size=n)))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
