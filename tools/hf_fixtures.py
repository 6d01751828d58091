#!/usr/bin/env python3
"""hf_fixtures.py — reference logits from Hugging Face transformers for the
parity test tests/parity_hf.sh.

For every case below: generate a tiny model with mkad-genmodel (levels 0, i.e.
plain attention, so that transformers can run it), load it with transformers
in float32 with eager attention, and save the logits after the last token of a
few token sequences:

    tests/fixtures/hf/<case>/<seq>.logits   raw little-endian float32 (vocab floats)
    tests/fixtures/hf/<case>/meta.json      genmodel args, token ids, versions, sha256
                                            of every generated model file, and how
                                            the numpy reference (tests/ref/fastmka_ref.py)
                                            compares with transformers

Needs torch, transformers, numpy and an mkad-genmodel binary:

    python3 tools/hf_fixtures.py --genmodel ./mkad-genmodel [--out tests/fixtures/hf] [--cases a,b]

Rerun it whenever tools/genmodel.c changes its output (parity_hf.sh says so).
"""
import argparse
import datetime
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
TOP = os.path.dirname(HERE)
sys.dont_write_bytecode = True
sys.path.insert(0, os.path.join(TOP, "tests", "ref"))

# name -> (description, genmodel args).  Every case: levels 0.
CASES = [
    ("qwen2_f32",
     "qwen2, q/k/v bias, GQA 4:2, untied, f32 storage",
     ["--arch", "qwen2", "--hidden", "64", "--layers", "2", "--heads", "4", "--kv-heads", "2",
      "--ffn", "128", "--vocab", "256", "--dtype", "f32", "--tied", "0", "--seed", "11"]),
    ("llama_bf16_gqa",
     "llama, GQA 8:2, untied, no attention bias, bf16 storage",
     ["--arch", "llama", "--hidden", "128", "--layers", "2", "--heads", "8", "--kv-heads", "2",
      "--ffn", "256", "--vocab", "320", "--dtype", "bf16", "--tied", "0", "--attn-bias", "0",
      "--seed", "12"]),
    ("llama_tied_llama3",
     "llama, tied embeddings, llama3 rope scaling (factor 8, theta 5e5), MQA 4:1, 3 layers, bf16",
     ["--arch", "llama", "--hidden", "64", "--layers", "3", "--heads", "4", "--kv-heads", "1",
      "--ffn", "160", "--vocab", "384", "--dtype", "bf16", "--tied", "1", "--max-pos", "512",
      "--rope-theta", "500000", "--rope-scaling", "llama3:8", "--seed", "13"]),
    ("qwen2_yarn",
     "qwen2, yarn rope scaling (factor 4, attention factor 1.1386), bf16",
     ["--arch", "qwen2", "--hidden", "96", "--layers", "2", "--heads", "6", "--kv-heads", "2",
      "--ffn", "192", "--vocab", "288", "--dtype", "bf16", "--tied", "0", "--max-pos", "1024",
      "--rope-scaling", "yarn:4", "--seed", "14"]),
    ("qwen2_sharded",
     "qwen2, 3 safetensors shards + index, tied, linear rope scaling 2, 3 layers, f32",
     ["--arch", "qwen2", "--hidden", "64", "--layers", "3", "--heads", "4", "--kv-heads", "2",
      "--ffn", "128", "--vocab", "256", "--dtype", "f32", "--tied", "1", "--shards", "3",
      "--rope-scaling", "linear:2", "--seed", "15"]),
    ("llama_bias_headdim_f16",
     "llama, attention_bias (q/k/v/o), explicit head_dim 32 (H*d = 128 != D = 64), f16 storage",
     ["--arch", "llama", "--hidden", "64", "--layers", "2", "--heads", "4", "--kv-heads", "2",
      "--head-dim", "32", "--ffn", "128", "--vocab", "256", "--dtype", "f16", "--attn-bias", "1",
      "--rms-eps", "1e-5", "--seed", "16"]),
]

SEQ_LENGTHS = [1, 17, 70]
SEQ_SEED = 2024


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(1 << 20), b""):
            h.update(b)
    return h.hexdigest()


def dump_json(obj, ind=0):
    """JSON with one key per line but lists of scalars on one line."""
    pad = " " * (ind + 1)
    if isinstance(obj, dict):
        if not obj:
            return "{}"
        items = ["%s%s: %s" % (pad, json.dumps(k), dump_json(v, ind + 1)) for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + " " * ind + "}"
    if isinstance(obj, list):
        if all(not isinstance(v, (dict, list)) for v in obj):
            return json.dumps(obj)
        items = [pad + dump_json(v, ind + 1) for v in obj]
        return "[\n" + ",\n".join(items) + "\n" + " " * ind + "]"
    return json.dumps(obj)


def rel_err(a, b):
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))) / np.max(np.abs(b.astype(np.float64))))


def main():
    ap = argparse.ArgumentParser(description="Hugging Face reference logits for tests/parity_hf.sh")
    ap.add_argument("--genmodel", default=shutil.which("mkad-genmodel") or "./mkad-genmodel",
                    help="mkad-genmodel binary")
    ap.add_argument("--out", default=os.path.join(TOP, "tests", "fixtures", "hf"), help="fixture directory")
    ap.add_argument("--cases", help="comma-separated subset of: " + ",".join(c[0] for c in CASES))
    ap.add_argument("--keep", help="keep the generated models under this directory")
    a = ap.parse_args()

    import torch
    import transformers
    import fastmka_ref

    torch.manual_seed(0)
    want = set(a.cases.split(",")) if a.cases else None
    if want:
        unknown = want - {c[0] for c in CASES}
        if unknown:
            ap.error("--cases: unknown case(s) %s" % ",".join(sorted(unknown)))
    work = a.keep or tempfile.mkdtemp(prefix="hf_fixtures.")
    worst = 0.0
    try:
        for ci, (name, desc, args) in enumerate(CASES):
            if want and name not in want:
                continue
            mdir = os.path.join(work, name)
            full = args + ["--levels", "0"]
            subprocess.run([a.genmodel, "--out", mdir] + full, check=True)
            with open(os.path.join(mdir, "config.json")) as f:
                cfg = json.load(f)
            files = sorted(os.listdir(mdir))
            shas = {fn: sha256(os.path.join(mdir, fn)) for fn in files}

            model, info = transformers.AutoModelForCausalLM.from_pretrained(
                mdir, dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
            for k in ("missing_keys", "unexpected_keys", "mismatched_keys"):
                if info.get(k):
                    raise SystemExit("%s: transformers reports %s: %s" % (name, k, sorted(info[k])[:5]))
            model.eval()
            ref = fastmka_ref.Model(mdir)

            V = int(cfg["vocab_size"])
            rng = np.random.default_rng(SEQ_SEED + ci)
            odir = os.path.join(a.out, name)
            if os.path.isdir(odir):
                shutil.rmtree(odir)
            os.makedirs(odir)
            seqs = []
            for si, T in enumerate(SEQ_LENGTHS):
                ids = [int(x) for x in rng.integers(0, V, size=T)]
                with torch.no_grad():
                    out = model(torch.tensor([ids], dtype=torch.long)).logits[0, -1].float().numpy()
                out = out.astype("<f4")
                fn = "s%d.logits" % si
                out.tofile(os.path.join(odir, fn))
                r = fastmka_ref.forward(ref, ids)
                e = rel_err(r, out)
                worst = max(worst, e)
                print("%-24s %s  T=%-3d  numpy ref vs transformers: max|a-b|/max|b| = %.3e  (max|logit| %.3f)"
                      % (name, fn, T, e, float(np.max(np.abs(out)))))
                seqs.append({"name": "s%d" % si, "file": fn, "length": T, "ids": ids,
                             "numpy_ref_rel_err": float("%.3e" % e)})
            meta = {
                "case": name,
                "description": desc,
                "genmodel_args": full,
                "model_files": shas,
                "config": cfg,
                "sequences": seqs,
                "produced_by": {
                    "script": "tools/hf_fixtures.py",
                    "how": ("mkad-genmodel --out DIR <genmodel_args>; "
                            "transformers.AutoModelForCausalLM.from_pretrained(DIR, dtype=torch.float32, "
                            "attn_implementation='eager'); logits[0, -1] of model(ids) for each sequence, "
                            "saved as raw little-endian float32; token ids from "
                            "numpy.random.default_rng(%d + case index).integers(0, vocab)" % SEQ_SEED),
                    "transformers": transformers.__version__,
                    "torch": torch.__version__,
                    "numpy": np.__version__,
                    "python": platform.python_version(),
                    "machine": platform.machine(),
                    "date": datetime.date.today().isoformat(),
                },
                "tolerance": "max|a-b| / max|b| <= 1e-4",
            }
            with open(os.path.join(odir, "meta.json"), "w") as f:
                f.write(dump_json(meta) + "\n")
            del model
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    print("worst numpy reference vs transformers error: %.3e" % worst)
    return 0 if worst <= 1e-5 else 1


if __name__ == "__main__":
    sys.exit(main())
