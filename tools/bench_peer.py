#!/usr/bin/env python3
"""mkad's CPU backend against llama.cpp on the same machine and model, one
interleaved run (make bench-peer).

    python3 tools/bench_peer.py [--build .] [--work DIR] [--threads 2] [--rounds 3]
                                [--depths 0,2048,8192] [--gen 128] [--cpu-math exact,fast]

What it does, caching every step under --work (default BUILD/tests/tmp/peer):
 1. llama.cpp: the copy vendored by the llama-cpp-python sdist on PyPI, at the
    version and sha256 that tests/ref/chat_templates.py pins (pip download
    --require-hashes); built with cmake, CPU only, -DGGML_NATIVE=ON
    (llama-bench, llama-server).
 2. The model: mkad-genmodel --preset qwen2.5-0.5b --levels 0 (plain
    attention, bf16, seed 5) with mkad's test tokenizer, converted to a bf16
    GGUF by llama.cpp's convert_hf_to_gguf.py (tools/peer_convert.py; its
    Python needs torch, transformers, numpy, sentencepiece, installed with pip
    into a venv under --work: several GB, once).
 3. Greedy check: 16 greedy tokens after three prompts from llama-server and
    from mkad-cli must agree.
 4. --rounds rounds, each running in turn: the read bandwidth of the weights'
    size with --threads threads (bench-kernels), llama-bench (flash attention
    on, -fa 1: its faster attention on the CPU, and what llama-server uses by
    default) and mkad-cli in each --cpu-math mode (exact: the reference; fast:
    bf16 dot products, only where the CPU has AVX512-BF16) for
    prefill of 512 and 2,048 tokens, and --gen decoded tokens after a prompt
    of each of --depths tokens (depths above --deep only in the first
    --deep-rounds rounds: an 8,192-token prefill takes minutes per engine).
    mkad's prefill of 2,048 is timed in the same run as its decode at depth
    2,048 (mkad-cli reports both); llama-bench runs them separately.  The table holds medians over rounds, the
    ratio mkad / llama.cpp, and the decode bandwidth floor: read GB/s divided
    by the bytes a decode step reads (the weights, model.safetensors).
Runtime is printed at the end.  Exit 77 when PyPI cannot be reached.
"""
import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.dirname(HERE)


def log(msg):
    print("bench-peer: " + msg, file=sys.stderr, flush=True)


def run(cmd, **kw):
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)
    if r.returncode != 0:
        sys.exit("bench-peer: %s failed (%d):\n%s" % (" ".join(cmd), r.returncode, r.stderr[-3000:]))
    return r.stdout


def pin():
    """(package, version, sha256) of the llama-cpp-python sdist, from the chat
    template test, so both use one pin."""
    text = open(os.path.join(SRC, "tests", "ref", "chat_templates.py")).read()
    get = lambda k: re.search(r'^%s = "([^"]+)"' % k, text, re.M).group(1)  # noqa: E731
    return get("PACKAGE"), get("VERSION"), get("SHA256")


def fetch_llama(work):
    pkg, ver, sha = pin()
    src = os.path.join(work, "llama_cpp_python-%s" % ver, "vendor", "llama.cpp")
    if os.path.exists(os.path.join(src, "CMakeLists.txt")):
        return src
    req = os.path.join(work, "requirements.txt")
    with open(req, "w") as f:
        f.write("%s==%s --hash=sha256:%s\n" % (pkg, ver, sha))
    r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        "--require-hashes", "-r", req, "-d", work],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if r.returncode != 0:
        if "Could not" in r.stderr or "connection" in r.stderr.lower():
            log("SKIP: PyPI cannot be reached")
            sys.exit(77)
        sys.exit("bench-peer: pip download failed:\n" + r.stderr[-2000:])
    run(["tar", "xzf", os.path.join(work, "llama_cpp_python-%s.tar.gz" % ver), "-C", work])
    return src


def build_llama(src):
    bdir = os.path.join(src, "build")
    bins = [os.path.join(bdir, "bin", b) for b in ("llama-bench", "llama-server")]
    if all(os.path.exists(b) for b in bins):
        return bins
    log("building llama.cpp (cmake, CPU only, GGML_NATIVE=ON) in %s" % bdir)
    run(["cmake", "-S", src, "-B", bdir, "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DGGML_CUDA=OFF",
         "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF"])
    run(["cmake", "--build", bdir, "-j%d" % (os.cpu_count() or 2), "--target", "llama-bench", "llama-server"])
    return bins


def venv_python(work):
    vpy = os.path.join(work, "venv", "bin", "python")
    stamp = os.path.join(work, "venv", ".ok")
    if not os.path.exists(stamp):
        log("installing the converter's Python packages (torch, transformers, ...) into %s/venv" % work)
        run([sys.executable, "-m", "venv", os.path.join(work, "venv")])
        run([vpy, "-m", "pip", "install", "-q", "torch", "transformers", "numpy", "sentencepiece", "safetensors"])
        open(stamp, "w").close()
    return vpy


def make_model(a, work, llama_src):
    mdir = os.path.join(work, "qwen2.5-0.5b-plain")
    gguf = os.path.join(work, "qwen2.5-0.5b-plain-bf16.gguf")
    if not os.path.exists(os.path.join(mdir, "model.safetensors")):
        run([os.path.join(a.build, "mkad-genmodel"), "--out", mdir, "--preset", "qwen2.5-0.5b", "--levels", "0",
             "--dtype", "bf16", "--seed", "5"])
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(os.path.join(SRC, "tests", "fixtures", "tokenizers", "qwen2", f), mdir)
    if not os.path.exists(gguf):
        vpy = venv_python(work)
        run([vpy, os.path.join(HERE, "peer_convert.py"), llama_src, mdir, "--outtype", "bf16", "--outfile",
             gguf + ".tmp"])
        os.rename(gguf + ".tmp", gguf)
    return mdir, gguf


def ids(n, salt=0):
    return [((i + salt) * 37 + 11) % 4000 for i in range(n)]


def mkad_cli(a, mdir, prompt, gen, math="exact"):
    path = os.path.join(a.work, "prompt.txt")
    with open(path, "w") as f:
        f.write(",".join(map(str, prompt)))
    cmd = [os.path.join(a.build, "mkad-cli"), "--model", mdir, "--prompt-ids", "@" + path, "--max-tokens", str(gen),
           "--ignore-eos", "--threads", str(a.threads), "--cpu-math", math]
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if r.returncode != 0:
        sys.exit("bench-peer: mkad-cli failed:\n" + r.stderr[-2000:])
    if math == "fast" and "cpu_math=fast" not in r.stderr:
        sys.exit("bench-peer: mkad-cli --cpu-math fast is not available on this CPU; use --cpu-math exact")
    done = [ln for ln in r.stderr.splitlines() if ln.startswith("event=done")][-1]
    kv = dict(f.split("=", 1) for f in done.split()[1:])
    return r.stdout.split(), float(kv["prefill_tok_s"]), float(kv["decode_tok_s"])


def llama_bench(a, bench, gguf, p, n, d):
    out = run([bench, "-m", gguf, "-t", str(a.threads), "-p", str(p), "-n", str(n), "-d", str(d), "-r", "1",
               "-fa", "1", "-o", "jsonl"])
    rows = [json.loads(ln) for ln in out.splitlines() if ln.startswith("{")]
    return rows[-1]["avg_ts"]


def read_bandwidth(a, nbytes):
    bk = os.path.join(a.build, "bench-kernels")
    rows = nbytes // (896 * 2)
    out = run([bk, "--threads", str(a.threads), "--reps", "3", "--M", "1", "--N", "16", "--gemv-rows", str(rows),
               "--depth", "16"])
    return float(re.search(r"read_GBps=([0-9.]+)", out).group(1))


def greedy_check(a, server, gguf, mdir):
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    p = subprocess.Popen([server, "-m", gguf, "-t", str(a.threads), "--port", str(port), "-c", "4096", "-np", "1"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(600):
            try:
                with urllib.request.urlopen("http://127.0.0.1:%d/health" % port, timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        ok = True
        for salt in (0, 5, 77):
            prompt = ids(24, salt)
            body = json.dumps({"prompt": prompt, "n_predict": 16, "temperature": 0, "top_k": 1, "ignore_eos": True,
                               "cache_prompt": False, "return_tokens": True}).encode()
            req = urllib.request.Request("http://127.0.0.1:%d/completion" % port, body,
                                         {"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=300) as r:
                theirs = [int(t) for t in json.load(r)["tokens"]]
            ours = [int(t) for t in mkad_cli(a, mdir, prompt, 16)[0]]
            same = ours == theirs
            ok &= same
            log("greedy tokens %s (prompt %d): mkad %s / llama.cpp %s" % ("agree" if same else "DIFFER", salt,
                                                                           ours[:8], theirs[:8]))
        return ok
    finally:
        p.terminate()
        p.wait()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", default=SRC, help="mkad build directory (mkad-cli, mkad-genmodel, bench-kernels)")
    ap.add_argument("--work", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--depths", default="0,2048,8192")
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--deep", type=int, default=4096, help="depths above this are measured in --deep-rounds rounds")
    ap.add_argument("--deep-rounds", type=int, default=1)
    ap.add_argument("--cpu-math", default="exact,fast", help="mkad's modes to run, comma-separated (exact, fast)")
    a = ap.parse_args()
    a.build = os.path.abspath(a.build)
    a.work = os.path.abspath(a.work or os.path.join(a.build, "tests", "tmp", "peer"))
    os.makedirs(a.work, exist_ok=True)
    t0 = time.time()
    src = fetch_llama(a.work)
    bench, server = build_llama(src)
    mdir, gguf = make_model(a, a.work, src)
    t_setup = time.time() - t0
    agree = greedy_check(a, server, gguf, mdir)
    wbytes = os.path.getsize(os.path.join(mdir, "model.safetensors"))
    depths = [int(d) for d in a.depths.split(",") if d != ""]
    maths = [m for m in a.cpu_math.split(",") if m]
    if not maths or any(m not in ("exact", "fast") for m in maths):
        sys.exit("bench-peer: --cpu-math: a list of exact, fast")
    col = {"exact": "mkad", "fast": "mkad fast"}
    res = {}

    def add(key, who, v):
        res.setdefault(key, {}).setdefault(who, []).append(v)
        log("  %-22s %-6s %.2f" % (key, who, v))

    for r in range(a.rounds):
        log("round %d/%d" % (r + 1, a.rounds))
        add("read bandwidth GB/s", "bw", read_bandwidth(a, wbytes))
        for p in (512, 2048):
            add("prefill %d" % p, "llama", llama_bench(a, bench, gguf, p, 0, 0))
            if p not in depths:
                for m in maths:
                    add("prefill %d" % p, col[m], mkad_cli(a, mdir, ids(p), 0, m)[1])
        for d in depths:
            if d > a.deep and r >= a.deep_rounds:
                continue
            key = "decode %d @ depth %d" % (a.gen, d)
            add(key, "llama", llama_bench(a, bench, gguf, 0, a.gen, d))
            for m in maths:
                _, pf, dc = mkad_cli(a, mdir, ids(max(d, 1)), a.gen, m)
                if d in (512, 2048):  # the same prompt: its prefill is the prefill measurement
                    add("prefill %d" % d, col[m], pf)
                add(key, col[m], dc)
    bw = statistics.median(res.pop("read bandwidth GB/s")["bw"])
    floor = bw * 1e9 / wbytes
    print("\nmkad vs llama.cpp, tokens/s (median of %d interleaved rounds), %d threads, %s" %
          (a.rounds, a.threads, time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())))
    print("model: Qwen2.5-0.5B shape (mkad-genmodel --levels 0, bf16), %.0f MB of weights; greedy tokens %s" %
          (wbytes / 1e6, "agree" if agree else "DIFFER"))
    head = "| measure | runs | llama.cpp |"
    for m in maths:
        head += " %s | %s / llama.cpp | %s / bandwidth floor |" % (col[m], col[m], col[m])
    print(head)
    print("|---|---|---|" + "---|---|---|" * len(maths))
    for k in sorted(res, key=lambda k: (k.split()[0] != "prefill", int(k.split()[-1]))):
        v = res[k]
        lm = statistics.median(v["llama"])
        line = "| %s | %d | %.1f |" % (k, len(v["llama"]), lm)
        for m in maths:
            mk = statistics.median(v[col[m]])
            fl = "%.0f %%" % (100 * mk / floor) if k.startswith("decode") else ""
            line += " %.1f | %.2f | %s |" % (mk, mk / lm, fl)
        print(line)
    print("read bandwidth (%d threads, median): %.1f GB/s -> decode floor %.1f tokens/s" % (a.threads, bw, floor))
    print("runtime: %.0f s (of which setup/cached builds %.0f s)" % (time.time() - t0, t_setup))
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
