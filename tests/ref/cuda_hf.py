#!/usr/bin/env python3
"""cuda_hf.py — mkad's CUDA backend against Hugging Face transformers, run now
(driven by tests/cuda_hf.sh under `make check-cuda`).

For every case: mkad-genmodel writes a levels-0 model (no router weights,
i.e. plain attention, which transformers can run); transformers loads it in
float32 with eager attention on the GPU; for token sequences of several
lengths (1 token, within one 32-token K/V block, across several blocks) the
logits after the last token are compared with those mkad-cli dumps:

    mkad-cli --backend cuda --prompt-ids ... --max-tokens 0 --dump-logits F
    mkad-cli --backend cpu  ...                      (control)

Error: max|mkad - hf| / max|hf|.  Tolerances: --tol (2e-2) for CUDA — its
GEMMs take bf16 activations and it keeps K/V in bf16 (see tests/test_cuda.c);
--cpu-tol (1e-4) for the CPU backend, the reference (tests/parity_hf.sh),
and --cpu-tol-bf16 (1e-2) for it on bf16 checkpoints, whose K/V it keeps in
bf16 as transformers would in bf16, while transformers runs here in f32 (see
tests/parity_common.sh: measured 2e-7 .. 3e-3).
Exit 0 when every comparison is within its tolerance, 1 otherwise.
"""
import argparse
import os
import shutil
import subprocess
import sys
import time

import numpy as np

# name -> genmodel arguments (levels 0 is added).
CASES = [
    ("qwen2_h7kv1_d64_bf16",
     ["--arch", "qwen2", "--hidden", "448", "--layers", "2", "--heads", "7", "--kv-heads", "1",
      "--ffn", "1024", "--vocab", "1000", "--dtype", "bf16", "--seed", "41"]),
    ("llama_h14kv2_d128_bf16",
     ["--arch", "llama", "--hidden", "448", "--layers", "2", "--heads", "14", "--kv-heads", "2",
      "--head-dim", "128", "--ffn", "1024", "--vocab", "777", "--dtype", "bf16", "--seed", "42"]),
    ("qwen2_h4kv2_f32_tied",
     ["--arch", "qwen2", "--hidden", "256", "--layers", "3", "--heads", "4", "--kv-heads", "2",
      "--ffn", "512", "--vocab", "512", "--dtype", "f32", "--tied", "1", "--seed", "43"]),
    ("llama_h7kv7_d128_f32_bias",
     ["--arch", "llama", "--hidden", "896", "--layers", "2", "--heads", "7", "--kv-heads", "7",
      "--ffn", "1536", "--vocab", "1024", "--dtype", "f32", "--attn-bias", "1", "--seed", "44"]),
    ("llama_llama3_rope_bf16",
     ["--arch", "llama", "--hidden", "256", "--layers", "2", "--heads", "4", "--kv-heads", "1",
      "--ffn", "640", "--vocab", "384", "--dtype", "bf16", "--tied", "1", "--max-pos", "512",
      "--rope-theta", "500000", "--rope-scaling", "llama3:8", "--seed", "45"]),
    ("qwen2_yarn_bf16",
     ["--arch", "qwen2", "--hidden", "384", "--layers", "2", "--heads", "6", "--kv-heads", "2",
      "--ffn", "768", "--vocab", "640", "--dtype", "bf16", "--max-pos", "1024",
      "--rope-scaling", "yarn:4", "--seed", "46"]),
]
SEQ_LENGTHS = [1, 17, 70, 150]


def rel_err(got, ref):
    got = got.astype(np.float64)
    ref = ref.astype(np.float64)
    scale = float(np.max(np.abs(ref)))
    if not np.all(np.isfinite(got)):
        return float("inf")
    return float(np.max(np.abs(got - ref))) / (scale if scale > 0 else 1.0)


def run_cli(cli, model, ids, backend, out):
    cmd = [cli, "--model", model, "--backend", backend, "--prompt-ids", ",".join(map(str, ids)),
           "--max-tokens", "0", "--dump-logits", out]
    r = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if r.returncode != 0:
        return None, "mkad-cli --backend %s exited %d: %s" % (backend, r.returncode, r.stderr.strip()[-400:])
    return np.fromfile(out, dtype="<f4"), None


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--genmodel", required=True)
    ap.add_argument("--cli", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--tol", type=float, default=2e-2)
    ap.add_argument("--cpu-tol", type=float, default=1e-4)
    ap.add_argument("--cpu-tol-bf16", type=float, default=1e-2)
    ap.add_argument("--cases", help="comma-separated subset")
    a = ap.parse_args()

    import torch
    import transformers

    if not torch.cuda.is_available():
        print("cuda_hf: SKIP: torch sees no GPU")
        return 77
    dev = torch.device("cuda")
    # Full f32 in the reference: no TF32 in matmuls.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    want = set(a.cases.split(",")) if a.cases else None
    shutil.rmtree(a.work, ignore_errors=True)
    os.makedirs(a.work)
    print("cuda_hf: torch %s, transformers %s, %s; tolerance cuda %.0e, cpu %.0e"
          % (torch.__version__, transformers.__version__, torch.cuda.get_device_name(0), a.tol, a.cpu_tol))
    fails, nseq, worst, worst_cpu, t0 = 0, 0, 0.0, 0.0, time.time()
    for ci, (name, args) in enumerate(CASES):
        if want and name not in want:
            continue
        mdir = os.path.join(a.work, name)
        g = subprocess.run([a.genmodel, "--out", mdir] + args + ["--levels", "0"], capture_output=True, text=True)
        if g.returncode != 0:
            print("FAIL %s: mkad-genmodel: %s" % (name, g.stderr.strip()))
            fails += 1
            continue
        model, info = transformers.AutoModelForCausalLM.from_pretrained(
            mdir, dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
        bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
        if bad:
            print("FAIL %s: transformers reports %s" % (name, bad))
            fails += 1
            continue
        model = model.to(dev).eval()
        V = model.config.vocab_size
        rng = np.random.default_rng(1000 + ci)
        for T in SEQ_LENGTHS:
            nseq += 1
            ids = [int(x) for x in rng.integers(0, V, size=T)]
            with torch.no_grad():
                ref = model(torch.tensor([ids], device=dev)).logits[0, -1].float().cpu().numpy()
            label = "%-28s T=%-3d" % (name, T)
            out = os.path.join(a.work, "%s.T%d" % (name, T))
            got, err = run_cli(a.cli, mdir, ids, "cuda", out + ".cuda")
            if err:
                print("FAIL %s: %s" % (label, err))
                fails += 1
                continue
            cpu, err = run_cli(a.cli, mdir, ids, "cpu", out + ".cpu")
            if err:
                print("FAIL %s: %s" % (label, err))
                fails += 1
                continue
            if got.size != V or cpu.size != V:
                print("FAIL %s: %d/%d logits, expected %d" % (label, got.size, cpu.size, V))
                fails += 1
                continue
            e, ec = rel_err(got, ref), rel_err(cpu, ref)
            worst, worst_cpu = max(worst, e), max(worst_cpu, ec)
            ok = e <= a.tol and ec <= (a.cpu_tol_bf16 if "--dtype" in args and
                                        args[args.index("--dtype") + 1] == "bf16" else a.cpu_tol)
            fails += not ok
            print("%s %s: cuda %.3e  cpu %.3e  (max|hf| %.3f, argmax %s)"
                  % ("ok  " if ok else "FAIL", label, e, ec, float(np.max(np.abs(ref))),
                     "same" if int(np.argmax(got)) == int(np.argmax(ref)) else "DIFFERS"), flush=True)
        del model
        torch.cuda.empty_cache()
    verdict = "FAIL (%d failure(s))" % fails if fails else "PASS"
    print("cuda_hf: %s: %d sequences, worst rel err cuda %.2e cpu %.2e (%.1fs)"
          % (verdict, nseq, worst, worst_cpu, time.time() - t0))
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
