#!/usr/bin/env python3
"""Issue 11's peers on the GPU machine, side by side, in one call: llama.cpp's
CUDA backend and Hugging Face transformers on the Qwen2.5-7B shape (plain
attention, bf16, random weights).

    tools/bench_peer_cuda.py pack DIR
        Here (PyPI reachable): the llama-cpp-python sdist that
        tests/ref/chat_templates.py pins (sha256-checked, cached under
        tests/tmp/peer-cuda), repacked as DIR/llama.cpp-src.tar.gz: its
        vendored llama.cpp without docs/, media/, benches/, tools/ui/, the
        sdist's stray build/ and every models/ file but the Qwen2 vocab
        (~10 MB instead of 77).  `tools/device.sh fetch` puts it into
        .carry/peer/.

    tools/bench_peer_cuda.py run [--src TAR|DIR] [--work DIR] [--out DIR]
                                 [--deadline 525] [--tiny] [--cpu]
        There (`bash tools/device.sh gpu peers`), at the same time:
          - llama.cpp: cmake -G Ninja -DGGML_CUDA=ON
            -DCMAKE_CUDA_ARCHITECTURES=90, FlashAttention vector kernels for
            f16 K/V only, no fatbin compression, targets llama-bench and
            llama-batched-bench, -j(nproc), niced; its time is printed;
          - the GGUF: the shape written straight from numpy (random normal
            bf16 matrices, f32 norms and biases) with the sdist's own gguf-py,
            the tokenizer copied from its models/ggml-vocab-qwen2.gguf
            (151,936 tokens) and padded with [PADn] tokens to the 152,064
            embedding rows, as convert_hf_to_gguf pads; into /dev/shm when it
            has room;
          - transformers on the GPU (a subprocess): the Qwen2 model built in
            bf16 on the device, a StaticCache and
            torch.compile(mode="reduce-overhead", fullgraph=True) of one
            greedy decode step: ms/token at each --hf-contexts (a cache of
            context + steps; the 4K one after a real prefill, longer ones
            with the cache filled with random K/V, which the step reads the
            same), and eager prefill of --prefill[0] tokens;
        then, once the build, the GGUF and transformers are done, llama.cpp
        (-fa 1 -ngl 99, K/V f16): llama-bench tg64 at --depths, pp at
        --prefill with -ub 512 and 2048, llama-batched-bench at --batches
        sequences of --batch-prompt tokens (128 generated).  Every stage has a
        deadline; one that fails or runs out of time fills its cells with the
        reason and the rest still runs.  Prints ONE table (measure,
        llama.cpp, transformers) with the GPU and versions, and writes it to
        OUT/peers.txt (OUT: $OUT, else ./device-out), with the raw rows in
        OUT/peers.json and the stage logs in OUT/peers-logs.tar.gz.
        --tiny: a small shape (2 layers, D 256) and small lengths; --cpu:
        llama.cpp without CUDA (-ngl 0) and transformers on the CPU.  Both
        together test the whole tool on a machine without a GPU.
"""
import argparse
import io
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import bench_peer  # noqa: E402  (pin() and fetch_llama(): one sdist pin for both peers tools)

SHAPES = {
    "qwen2.5-7b": dict(vocab=152064, hidden=3584, layers=28, heads=28, kv_heads=4, ffn=18944,
                       rope_theta=1e6, eps=1e-6),
    "tiny": dict(vocab=152064, hidden=256, layers=2, heads=4, kv_heads=2, ffn=512, rope_theta=1e6, eps=1e-6),
}
VOCAB_GGUF = "models/ggml-vocab-qwen2.gguf"
TARBALL = "llama.cpp-src.tar.gz"
# Paths left out of the repacked source (relative to vendor/llama.cpp).
TRIM = ("docs", "media", "benches", "tools/ui", "build", ".github", ".git")


def log(msg):
    print("bench-peer-cuda: " + msg, file=sys.stderr, flush=True)


# ---- pack (here) ------------------------------------------------------------------

def pack(outdir):
    work = os.path.join(SRC, "tests", "tmp", "peer-cuda")
    os.makedirs(work, exist_ok=True)
    src = bench_peer.fetch_llama(work)  # .../vendor/llama.cpp, sha256-checked by pip
    _, ver, sha = bench_peer.pin()
    os.makedirs(outdir, exist_ok=True)
    out = os.path.join(outdir, TARBALL)

    def keep(rel):
        if rel.startswith("models/"):
            return rel in (VOCAB_GGUF,)
        return not any(rel == t or rel.startswith(t + "/") for t in TRIM)

    with tarfile.open(out + ".tmp", "w:gz", compresslevel=6) as tf:
        for root, dirs, files in os.walk(src):
            rel_root = os.path.relpath(root, src)
            rel_root = "" if rel_root == "." else rel_root + "/"
            dirs[:] = sorted(d for d in dirs if keep(rel_root + d) or (rel_root + d) == "models")
            for f in sorted(files):
                if keep(rel_root + f):
                    tf.add(os.path.join(root, f), arcname="llama.cpp/" + rel_root + f, recursive=False)
        # The vendored commit, from the sdist's changelog ("## [VER]" then
        # "- feat: update llama.cpp to ggml-org/llama.cpp@HASH").
        log_md = open(os.path.join(src, "..", "..", "CHANGELOG.md")).read()
        m = re.search(r"^## \[%s\]\s*\n(?:.*\n)*?- .*llama\.cpp@([0-9a-f]+)" % re.escape(ver), log_md, re.M)
        note = ("llama.cpp %s, vendored by the llama-cpp-python %s sdist (sha256 %s); repacked by "
                "tools/bench_peer_cuda.py pack without %s and models/* but %s\n" %
                (m.group(1) if m else "(commit not in the changelog)", ver, sha, ", ".join(TRIM), VOCAB_GGUF)).encode()
        info = tarfile.TarInfo("llama.cpp/PEER-SOURCE")
        info.size = len(note)
        tf.addfile(info, io.BytesIO(note))
    os.rename(out + ".tmp", out)
    log("%s: %.1f MB (llama-cpp-python %s)" % (out, os.path.getsize(out) / 1e6, ver))
    return 0


# ---- the GGUF (a subprocess of run) -------------------------------------------------

def write_gguf(llama_src, shape_name, path, seed=5):
    sys.path.insert(0, os.path.join(llama_src, "gguf-py"))
    import numpy as np
    import gguf

    s = SHAPES[shape_name]
    H, F, V, L = s["hidden"], s["ffn"], s["vocab"], s["layers"]
    hd = H // s["heads"]
    t0 = time.time()
    r = gguf.GGUFReader(os.path.join(llama_src, VOCAB_GGUF))
    tokens = list(r.fields["tokenizer.ggml.tokens"].contents())
    types = list(r.fields["tokenizer.ggml.token_type"].contents())
    merges = list(r.fields["tokenizer.ggml.merges"].contents())
    eos = int(r.fields["tokenizer.ggml.eos_token_id"].contents())
    if len(tokens) > V:
        raise SystemExit("vocab of %d tokens > %d embedding rows" % (len(tokens), V))
    for i in range(len(tokens), V):  # as convert_hf_to_gguf pads to the config's vocab_size
        tokens.append("[PAD%d]" % i)
        types.append(int(gguf.TokenType.UNUSED))
    log("gguf: vocab %d tokens (%d from %s), %.1f s" % (len(tokens), r.fields["tokenizer.ggml.tokens"].data.__len__(),
                                                         VOCAB_GGUF, time.time() - t0))

    w = gguf.GGUFWriter(path + ".tmp", "qwen2")  # renamed once complete: a killed run leaves no usable half
    w.add_name("qwen2.5-7b-shape-random" if shape_name != "tiny" else "qwen2-tiny-random")
    w.add_context_length(262144)
    w.add_embedding_length(H)
    w.add_block_count(L)
    w.add_feed_forward_length(F)
    w.add_head_count(s["heads"])
    w.add_head_count_kv(s["kv_heads"])
    w.add_rope_freq_base(s["rope_theta"])
    w.add_layer_norm_rms_eps(s["eps"])
    w.add_file_type(int(gguf.LlamaFileType.MOSTLY_BF16))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_eos_token_id(eos)
    w.add_bos_token_id(eos)
    w.add_pad_token_id(eos)
    w.add_add_bos_token(False)

    BF16, F32 = gguf.GGMLQuantizationType.BF16, gguf.GGMLQuantizationType.F32
    tensors = [("token_embd.weight", (V, H), BF16)]
    for i in range(L):
        b = "blk.%d." % i
        tensors += [(b + "attn_norm.weight", (H,), F32),
                    (b + "attn_q.weight", (s["heads"] * hd, H), BF16), (b + "attn_q.bias", (s["heads"] * hd,), F32),
                    (b + "attn_k.weight", (s["kv_heads"] * hd, H), BF16),
                    (b + "attn_k.bias", (s["kv_heads"] * hd,), F32),
                    (b + "attn_v.weight", (s["kv_heads"] * hd, H), BF16),
                    (b + "attn_v.bias", (s["kv_heads"] * hd,), F32),
                    (b + "attn_output.weight", (H, s["heads"] * hd), BF16),
                    (b + "ffn_norm.weight", (H,), F32),
                    (b + "ffn_gate.weight", (F, H), BF16), (b + "ffn_up.weight", (F, H), BF16),
                    (b + "ffn_down.weight", (H, F), BF16)]
    tensors += [("output_norm.weight", (H,), F32), ("output.weight", (V, H), BF16)]
    for name, shp, typ in tensors:
        n = int(np.prod(shp))
        if typ == BF16:
            w.add_tensor_info(name, shp, np.dtype(np.uint16), n * 2, raw_dtype=BF16)
        else:
            w.add_tensor_info(name, shp, np.dtype(np.float32), n * 4)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()

    # Random normal(0, 0.02) bf16 values: one pool, each matrix a run of it
    # from a random offset (the values do not change the work done).
    rng = np.random.default_rng(seed)
    pool_n = min(1 << 26, max(n for _, shp, _ in tensors for n in [int(np.prod(shp))]))
    pool = (rng.standard_normal(pool_n, dtype=np.float32) * 0.02).view(np.uint32)
    pool = ((pool + 0x8000) >> 16).astype(np.uint16)  # round to bf16 (no NaN/inf in this range)
    total = 0
    for name, shp, typ in tensors:
        n = int(np.prod(shp))
        if typ == F32:
            if name.endswith("norm.weight"):
                a = (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)
            else:
                a = (0.02 * rng.standard_normal(n)).astype(np.float32)
        else:
            a = np.empty(n, np.uint16)
            pos, off = 0, int(rng.integers(pool_n))
            while pos < n:
                k = min(n - pos, pool_n - off)
                a[pos:pos + k] = pool[off:off + k]
                pos += k
                off = 0
        w.write_tensor_data(a.reshape(shp))
        total += a.nbytes
    w.close()
    os.rename(path + ".tmp", path)
    log("gguf: %s, %d tensors, %.2f GB of weights, %.1f s" % (path, len(tensors), total / 1e9, time.time() - t0))
    return 0


# ---- transformers (a subprocess of run) ---------------------------------------------

def emit(**kw):
    print(json.dumps(kw), flush=True)


def hf_bench(shape_name, device, contexts, prefill, steps, deadline):
    import torch
    import transformers
    from transformers import Qwen2Config, Qwen2ForCausalLM, StaticCache

    s = SHAPES[shape_name]
    cuda = device.startswith("cuda")
    emit(info={"torch": torch.__version__, "transformers": transformers.__version__,
               "device": torch.cuda.get_device_name(0) if cuda else "cpu",
               "cuda": torch.version.cuda if cuda else None})
    cfg = Qwen2Config(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["ffn"],
                      num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                      num_key_value_heads=s["kv_heads"], max_position_embeddings=262144,
                      rope_theta=s["rope_theta"], rms_norm_eps=s["eps"], tie_word_embeddings=False,
                      use_sliding_window=False, attn_implementation="sdpa")
    t0 = time.time()
    torch.manual_seed(5)
    dflt = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):  # built and initialised (normal_) on the device: seconds, not minutes
        model = Qwen2ForCausalLM(cfg)
    torch.set_default_dtype(dflt)
    model.eval()
    nparams = sum(p.numel() for p in model.parameters())
    emit(info={"init_s": round(time.time() - t0, 1), "params": nparams,
               "dtype": str(next(model.parameters()).dtype)})

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def step(tok, pos, cache):
        logits = model(tok, cache_position=pos, past_key_values=cache, use_cache=True, return_dict=False)[0]
        return torch.argmax(logits[:, -1], dim=-1, keepdim=True)

    torch._dynamo.config.automatic_dynamic_shapes = False  # one static graph per cache size
    torch._dynamo.config.cache_size_limit = 64
    decode = torch.compile(step, mode="reduce-overhead", fullgraph=True)
    gen = torch.Generator(device=device).manual_seed(7)

    def new_cache(n):
        return StaticCache(config=cfg, max_cache_len=n)

    with torch.inference_mode():
        # Prefill (eager, sdpa), the last position's logits only.
        for n in prefill:
            try:
                cache = new_cache(n + steps + 8)
                ids = torch.randint(0, s["vocab"], (1, n), device=device, generator=gen)
                times = []
                for _ in range(3):
                    cache.reset()
                    sync()
                    t = time.perf_counter()
                    model(ids, cache_position=torch.arange(n, device=device), past_key_values=cache,
                          use_cache=True, logits_to_keep=1)
                    sync()
                    times.append(time.perf_counter() - t)
                emit(measure="prefill", n=n, tok_s=n / statistics.median(times),
                     runs=[round(x * 1e3, 2) for x in times])
                del cache
            except Exception as e:  # noqa: BLE001  (a failed row is reported, the rest still runs)
                emit(measure="prefill", n=n, error="%s: %s" % (type(e).__name__, str(e)[:200]))
        # Decode: one compiled greedy step, timed over `steps` steps, 3 times.
        compile_s, seen = 0.0, {}
        for ctx in contexts:
            left = deadline - time.time()
            if compile_s and left < 1.5 * compile_s + 10:
                emit(measure="decode", ctx=ctx, error="not run: %.0f s left, a compile took %.0f s" %
                     (left, compile_s))
                continue
            try:
                cache = new_cache(ctx + 4 * steps + 8)
                if ctx <= max(prefill + [0]):  # a real prefill of ctx tokens
                    ids = torch.randint(0, s["vocab"], (1, ctx), device=device, generator=gen)
                    model(ids, cache_position=torch.arange(ctx, device=device), past_key_values=cache,
                          use_cache=True, logits_to_keep=1)
                    how = "prefilled"
                else:  # K/V of ctx positions as random values: the step reads the whole static cache anyway
                    model(torch.zeros(1, 1, dtype=torch.long, device=device),
                          cache_position=torch.zeros(1, dtype=torch.long, device=device), past_key_values=cache,
                          use_cache=True, logits_to_keep=1)
                    for lay in cache.layers:
                        lay.keys.normal_(generator=gen)
                        lay.values.normal_(generator=gen)
                    how = "filled"
                tok = torch.zeros(1, 1, dtype=torch.long, device=device)
                pos = ctx
                t = time.time()
                for _ in range(3):  # compile, then the graph's warm-up and capture
                    tok = decode(tok, torch.tensor([pos], device=device), cache).clone()
                    pos += 1
                sync()
                compile_s = time.time() - t
                runs = []
                for _ in range(3):
                    sync()
                    t = time.perf_counter()
                    for _ in range(steps):
                        tok = decode(tok, torch.tensor([pos], device=device), cache).clone()
                        pos += 1
                    sync()
                    runs.append((time.perf_counter() - t) * 1e3 / steps)
                # Where inductor gave up on CUDA graphs for this context's step it
                # counts it here (the step then runs without them).
                now = {k: v for k, v in torch._dynamo.utils.counters.get("inductor", {}).items() if "cudagraph" in k}
                skips = {k: v - seen.get(k, 0) for k, v in now.items()} if cuda else {}
                seen.update(now)
                emit(measure="decode", ctx=ctx, ms=statistics.median(runs), runs=[round(x, 3) for x in runs],
                     compile_s=round(compile_s, 1), kv=how, cache_len=ctx + 4 * steps + 8, cudagraph_counters=skips)
                del cache
                if cuda:
                    torch.cuda.empty_cache()
            except Exception as e:  # noqa: BLE001
                emit(measure="decode", ctx=ctx, error="%s: %s" % (type(e).__name__, str(e)[:200]))
    return 0


# ---- run (there) ------------------------------------------------------------------------

class Proc:
    """A child in its own process group, its output to a log file, stdout lines
    handed to on_line as they come, killed at a deadline."""

    started = []

    def __init__(self, name, cmd, logpath, on_line=None, env=None, cwd=None, nice=0):
        self.name, self.cmd, self.logpath, self.on_line = name, cmd, logpath, on_line
        self.rc, self.timed_out, self.t0, self.t1 = None, False, time.time(), None
        pre = ["nice", "-n", str(nice)] if nice else []
        self.log = open(logpath, "a")
        self.log.write("$ %s\n" % " ".join(cmd))
        self.log.flush()
        self.p = subprocess.Popen(pre + cmd, stdout=subprocess.PIPE, stderr=self.log, text=True, env=env, cwd=cwd,
                                  start_new_session=True, bufsize=1)
        self.t_end = None  # when the child exited (wait() may be called later)
        Proc.started.append(self)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        threading.Thread(target=self._reap, daemon=True).start()

    def _reap(self):
        self.p.wait()
        self.t_end = time.time()

    def _read(self):
        for line in self.p.stdout:
            self.log.write(line)
            self.log.flush()
            if self.on_line:
                try:
                    self.on_line(line.rstrip("\n"))
                except Exception as e:  # noqa: BLE001
                    self.log.write("(line not understood: %s)\n" % e)

    def wait(self, deadline):
        try:
            self.rc = self.p.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            self.timed_out = True
            try:
                os.killpg(self.p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.rc = self.p.wait()
        self.reader.join(timeout=5)
        self.t1 = self.t_end or time.time()
        self.log.close()
        return self.rc

    def failure(self):
        """None when it ended well, else a short reason for the table."""
        if self.timed_out:
            return "timeout after %.0f s" % (self.t1 - self.t0)
        if self.rc != 0:
            tail = ""
            try:
                lines = [ln.strip() for ln in open(self.logpath, errors="replace") if ln.strip()]
                errs = [ln for ln in lines if "error" in ln.lower()]
                tail = (errs or lines or [""])[-1][:90]
            except OSError:
                pass
            return "exit %d%s" % (self.rc, (": " + tail) if tail else "")
        return None


class Table:
    """Rows (measure, unit) x engines; a cell is a number or a reason."""

    def __init__(self):
        self.rows, self.cells = [], {}

    def row(self, key, label):
        self.rows.append((key, label))

    def put(self, key, who, value):
        self.cells[(key, who)] = value

    def fill(self, keys, who, reason):
        for k in keys:
            self.cells.setdefault((k, who), reason)

    def render(self, engines):
        def cell(key, v):
            if v is None:
                return "—"
            if isinstance(v, str):
                return v
            return "%.2f" % v if key[0] == "decode" else "{:,.0f}".format(v)  # ms/token, else tokens/s
        out = ["| measure | " + " | ".join(engines) + " |", "|---|" + "---|" * len(engines)]
        for key, label in self.rows:
            out.append("| %s | %s |" % (label, " | ".join(cell(key, self.cells.get((key, e))) for e in engines)))
        return "\n".join(out)


def kfmt(n):
    return "%dK" % (n // 1024) if n >= 1024 and n % 1024 == 0 else str(n)


def sh(cmd):
    try:
        return subprocess.run(cmd, shell=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=20).stdout.strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        return "(%s)" % e


def run(a):
    t0 = time.time()
    deadline = t0 + a.deadline
    out = os.path.abspath(a.out or os.environ.get("OUT") or "device-out")
    work = os.path.abspath(a.work)
    logs = os.path.join(work, "logs")
    os.makedirs(out, exist_ok=True)
    os.makedirs(logs, exist_ok=True)
    shape = "tiny" if a.tiny else "qwen2.5-7b"
    S = SHAPES[shape]
    ints = lambda v: [int(x) for x in v.split(",") if x]  # noqa: E731
    depths, prefill, batches, hf_ctx = ints(a.depths), ints(a.prefill), ints(a.batches), ints(a.hf_contexts)
    env_info = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "host": "%s, %d cores" % (os.uname().nodename, os.cpu_count() or 0),
        "gpu": sh("nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader") if not a.cpu
        else "none (--cpu)",
        "nvcc": sh("PATH=$PATH:/usr/local/cuda/bin nvcc --version | tail -n 2 | head -n 1") if not a.cpu else "",
        "cmake": sh("cmake --version | head -n 1"),
        "disk": sh("df -h %s /dev/shm 2>/dev/null | tail -n +2" % work).replace("\n", "; "),
    }
    for k, v in env_info.items():
        log("%s: %s" % (k, v))

    T = Table()
    for d in depths:
        T.row(("decode", d), "decode ms/token, tg64 at depth %s" % kfmt(d) if d not in hf_ctx or d == 0 else
              "decode ms/token, tg64 at depth %s (transformers: context %s)" % (kfmt(d), kfmt(d)))
    for c in hf_ctx:
        if c not in depths:
            T.row(("decode", c), "decode ms/token, context %s" % kfmt(c))
    for n in prefill:
        T.row(("prefill", n), "prefill tokens/s, %s prompt" % kfmt(n))
    for b in batches:
        T.row(("batched", b), "batched decode tokens/s, %d × %s prompts" % (b, kfmt(a.batch_prompt)))
    LL, HF = "llama.cpp", "transformers"
    raw = {"env": env_info, "llama": [], "batched": [], "hf": []}
    notes = []  # lines under the table
    T.fill([("batched", b) for b in batches], HF, None)
    if 0 in depths:
        T.put(("decode", 0), HF, None)
    for d in depths:
        if d not in hf_ctx:
            T.put(("decode", d), HF, None)

    # 1. llama.cpp source and build (background).
    src = a.src or os.path.join(SRC, ".carry", "peer", TARBALL)
    build_proc, build_err, bins = None, None, {}
    try:
        if os.path.isdir(src):
            lsrc = os.path.abspath(src)
        else:
            lsrc = os.path.join(work, "llama.cpp")
            if not os.path.exists(os.path.join(lsrc, "CMakeLists.txt")):
                with tarfile.open(src) as tf:
                    if hasattr(tarfile, "data_filter"):
                        tf.extractall(work, filter="data")
                    else:
                        tf.extractall(work)
        env_info["llama_src"] = open(os.path.join(lsrc, "PEER-SOURCE")).read().strip() \
            if os.path.exists(os.path.join(lsrc, "PEER-SOURCE")) else lsrc
        bdir = os.path.join(work, "build-cpu" if a.cpu else "build-cuda")
        bins = {b: os.path.join(bdir, "bin", b) for b in ("llama-bench", "llama-batched-bench")}
        if all(os.path.exists(b) for b in bins.values()):
            log("llama.cpp: binaries already built in %s" % bdir)
        else:
            flags = ["-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF",
                     "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF",
                     "-DGGML_NATIVE=ON"]
            if a.cpu:
                flags += ["-DGGML_CUDA=OFF"]
            else:
                flags += ["-DGGML_CUDA=ON", "-DCMAKE_CUDA_ARCHITECTURES=90", "-DGGML_CUDA_FA=ON",
                          "-DGGML_CUDA_FA_QUANTS=f16-f16", "-DGGML_CUDA_COMPRESSION_MODE=none",
                          "-DGGML_CUDA_NCCL=OFF"]
            gen = ["-G", "Ninja"] if shutil.which("ninja") else []
            jobs = a.jobs or os.cpu_count() or 2
            script = ("cmake -S %s -B %s %s %s && cmake --build %s -j%d --target llama-bench llama-batched-bench" %
                      (lsrc, bdir, " ".join(gen), " ".join(flags), bdir, jobs))
            log("llama.cpp: building (%s)" % script)
            benv = dict(os.environ)
            if not a.cpu and not shutil.which("nvcc") and os.path.exists("/usr/local/cuda/bin/nvcc"):
                benv["PATH"] = "/usr/local/cuda/bin:" + benv.get("PATH", "")
                benv["CUDACXX"] = "/usr/local/cuda/bin/nvcc"
            build_proc = Proc("build", ["bash", "-c", script], os.path.join(logs, "build.log"), env=benv, nice=10)
    except Exception as e:  # noqa: BLE001
        build_err = "source: %s" % e
        log("llama.cpp: " + build_err)

    # 2. The GGUF (background).
    gguf_proc, gguf_path = None, None
    if build_err is None:
        need = 16e9 if shape != "tiny" else 1e8
        shm = "/dev/shm"
        roomy = os.path.isdir(shm) and shutil.disk_usage(shm).free > 1.3 * need
        place = shm if (roomy and not a.no_shm and not a.cpu) else work
        gguf_path = os.path.join(place, "peer-%s-bf16.gguf" % shape)
        if os.path.exists(gguf_path):
            log("gguf: %s exists" % gguf_path)
        else:
            gguf_proc = Proc("gguf", [sys.executable, os.path.abspath(__file__), "gguf", "--src", lsrc,
                                      "--shape", shape, "--path", gguf_path], os.path.join(logs, "gguf.log"))

    # Stages 3 and 4 each run under a guard: whatever breaks in one (this
    # tool included), its cells say so and the table is still printed.
    def stage_hf():
        # 3. transformers (foreground: the GPU is its alone until it ends).
        hf_keys = [("prefill", prefill[0])] if prefill else []
        hf_keys += [("decode", c) for c in hf_ctx]
        hf_deadline = min(t0 + a.hf_budget, deadline - 30)

        def hf_line(line):
            if not line.startswith("{"):
                return
            r = json.loads(line)
            raw["hf"].append(r)
            if "info" in r:
                env_info.setdefault("hf", {}).update(r["info"])
                return
            key = ("prefill", r["n"]) if r["measure"] == "prefill" else ("decode", r["ctx"])
            val = r.get("error") or (r["tok_s"] if "tok_s" in r else r["ms"])
            T.put(key, HF, val)
            if "ms" in r:
                skips = r.get("cudagraph_counters", {}).get("cudagraph_skips", 0)
                notes.append("transformers decode at context %s: K/V %s, compile + capture %.0f s, runs %s ms/token%s" %
                             (kfmt(r["ctx"]), r["kv"], r["compile_s"], r["runs"],
                              "; CUDA graphs SKIPPED by inductor (%d)" % skips if skips else ""))
            log("transformers: %s" % line)

        if a.skip_hf:
            T.fill(hf_keys, HF, "not run (--skip-hf)")
        else:
            hf = Proc("hf", [sys.executable, os.path.abspath(__file__), "hf", "--shape", shape,
                             "--device", "cpu" if a.cpu else "cuda", "--contexts", ",".join(map(str, hf_ctx)),
                             "--prefill", str(prefill[0]) if prefill else "", "--steps", str(a.hf_steps),
                             "--deadline", str(hf_deadline - 15)],
                      os.path.join(logs, "transformers.log"), on_line=hf_line)
            hf.wait(hf_deadline)
            T.fill(hf_keys, HF, "FAIL: " + (hf.failure() or "no result") if hf.failure() else "no result")
            log("transformers: done in %.0f s%s" % (hf.t1 - hf.t0, "" if not hf.failure() else " (%s)" % hf.failure()))

    def stage_llama():
        nonlocal build_err
        # 4. Wait for the build and the GGUF, then llama.cpp, most wanted first.
        ll_keys = ([("decode", d) for d in depths] + [("prefill", n) for n in prefill] +
                   [("batched", b) for b in batches])
        if build_proc:
            build_proc.wait(deadline - a.llama_min)
            f = build_proc.failure()
            env_info["llama_build_s"] = round(build_proc.t1 - build_proc.t0)
            log("llama.cpp: build %s in %.0f s" % ("FAILED (%s)" % f if f else "done", build_proc.t1 - build_proc.t0))
            if f:
                build_err = "build: " + f
        if gguf_proc:
            gguf_proc.wait(deadline - a.llama_min)
            if gguf_proc.failure() and build_err is None:
                build_err = "GGUF: " + gguf_proc.failure()
            env_info["gguf_s"] = round(gguf_proc.t1 - gguf_proc.t0)
        if build_err:
            T.fill(ll_keys, LL, "FAIL: " + build_err)
        else:
            ngl = "0" if a.cpu else "99"
            common = ["-m", gguf_path, "-ngl", ngl, "-fa", "1", "-o", "jsonl", "--progress"]
            if a.threads:
                common += ["-t", str(a.threads)]

            def bench_line(line):
                if not line.startswith("{"):
                    return
                r = json.loads(line)
                raw["llama"].append(r)
                env_info["llama_backend"] = "%s, %s" % (r.get("backends"), r.get("gpu_info"))
                if r.get("n_gen", 0) > 0 and r.get("n_prompt", 0) == 0:
                    T.put(("decode", r["n_depth"]), LL, 1000.0 / r["avg_ts"])
                elif r.get("n_prompt", 0) > 0 and r.get("n_gen", 0) == 0 and r.get("n_depth", 0) == 0:
                    key = ("prefill", r["n_prompt"])
                    best = T.cells.get((key, LL))
                    if not isinstance(best, float) or r["avg_ts"] > best:
                        T.put(key, LL, float(r["avg_ts"]))
                        env_info.setdefault("prefill_ubatch", {})[str(r["n_prompt"])] = r.get("n_ubatch")
                log("llama-bench: %s" % {k: r.get(k) for k in ("n_prompt", "n_gen", "n_depth", "n_ubatch", "avg_ts",
                                                              "stddev_ts")})

            def batched_line(line):
                if not line.startswith("{"):
                    return
                r = json.loads(line)
                raw["batched"].append(r)
                T.put(("batched", r["pl"]), LL, float(r["speed_tg"]))
                log("llama-batched-bench: %s" % line)

            ctx_b = max(batches or [1]) * (((a.batch_prompt + 128 + 255) // 256) * 256)
            csv = lambda v: ",".join(map(str, v))  # noqa: E731

            def decode_job(name, ds, reps, need):  # tg64 at each depth
                return (name, [bins["llama-bench"]] + common + ["-p", "0", "-n", "64", "-r", reps, "-d", csv(ds)],
                        [("decode", d) for d in ds], bench_line, need)

            def prefill_job(name, ns, reps, need):  # one prompt of each length, two micro-batch sizes
                return (name, [bins["llama-bench"]] + common + ["-p", csv(ns), "-n", "0", "-r", reps,
                                                                 "-ub", "512,2048"],
                        [("prefill", n) for n in ns], bench_line, need)

            jobs = []  # (name, cmd, keys, on_line, minimum seconds to start it), most wanted first
            small, big = [d for d in depths if d <= a.deep], [d for d in depths if d > a.deep]
            short, long_ = [n for n in prefill if n <= a.deep], [n for n in prefill if n > a.deep]
            if small:
                jobs.append(decode_job("decode", small, "3", 20))
            if short:
                jobs.append(prefill_job("prefill", short, "3", 15))
            if batches:
                jobs.append(("batched", [bins["llama-batched-bench"], "-m", gguf_path, "-ngl", ngl, "-fa", "on",
                                         "-c", str(ctx_b), "-b", "2048", "-ub", "512", "-npp", str(a.batch_prompt),
                                         "-ntg", "128", "-npl", csv(batches), "--output-format", "jsonl"]
                             + (["-t", str(a.threads)] if a.threads else []),
                             [("batched", b) for b in batches], batched_line, 30))
            if big:
                jobs.append(decode_job("decode-deep", big, "2", 45))
            if long_:
                jobs.append(prefill_job("prefill-long", long_, "2", 20))
            for name, cmd, keys, on_line, need in jobs:
                left = deadline - 10 - time.time()
                if left < need:
                    T.fill(keys, LL, "not run: %.0f s left" % left)
                    continue
                p = Proc(name, cmd, os.path.join(logs, "llama-%s.log" % name), on_line=on_line)
                p.wait(deadline - 10)
                f = p.failure()
                log("llama.cpp %s: %s in %.0f s" % (name, f or "done", p.t1 - p.t0))
                T.fill(keys, LL, ("FAIL: " + f) if f else "no result")

    for name, stage, who in (("transformers", stage_hf, HF), ("llama.cpp", stage_llama, LL)):
        try:
            stage()
        except Exception as e:  # noqa: BLE001
            log("%s stage: %s: %s" % (name, type(e).__name__, e))
            T.fill([k for k, _ in T.rows], who, "FAIL: tool error %s: %s" % (type(e).__name__, str(e)[:80]))
        finally:  # nothing of a stage may still use the GPU when the next one starts
            for p in Proc.started:
                if p.name not in ("build", "gguf") and p.p.poll() is None:
                    p.wait(0)

    for p in Proc.started:  # a build or GGUF that the stages did not wait for
        if p.p.poll() is None:
            p.wait(0)

    # 5. The table.
    for n in prefill:
        alts = ["-ub %s: %.0f" % (r.get("n_ubatch"), r["avg_ts"]) for r in raw["llama"]
                if r.get("n_prompt") == n and r.get("n_gen") == 0 and r.get("n_depth") == 0]
        if alts:
            notes.append("llama.cpp prefill of %s, tokens/s: %s (the table has the better)" %
                         (kfmt(n), ", ".join(alts)))
    tg = ["%s: %.2f ± %.2f" % (kfmt(r["n_depth"]), r["avg_ts"], r["stddev_ts"]) for r in raw["llama"]
          if r.get("n_gen", 0) > 0 and r.get("n_prompt") == 0]
    if tg:
        notes.append("llama.cpp decode tokens/s by depth (mean ± sd over the repetitions): " + ", ".join(tg))
    hfv = env_info.get("hf", {})
    head = [
        "Peers on the %s, %s; %s." % ("Qwen2.5-7B shape" if shape != "tiny" else "tiny shape",
                                      "plain attention, bf16, random weights", env_info["date"]),
        "shape: %d layers, D %d, %d/%d heads, FFN %d, vocab %d, rope theta %g, rms eps %g, q/k/v biases, "
        "untied lm_head" % (S["layers"], S["hidden"], S["heads"], S["kv_heads"], S["ffn"], S["vocab"],
                            S["rope_theta"], S["eps"]),
        "GPU: %s; nvcc: %s; host: %s" % (env_info["gpu"], env_info["nvcc"] or "-", env_info["host"]),
        "llama.cpp: %s (backends %s); build %s (cmake, %s); -fa 1 -ngl %s, K/V f16; "
        "llama-bench -r 3 (-r 2 above %s), batched-bench -npp %d -ntg 128" %
        (env_info.get("llama_src", "?").split(",")[0], env_info.get("llama_backend", "?"),
         "%s s" % env_info["llama_build_s"] if "llama_build_s" in env_info else "from an earlier run",
         "CPU only" if a.cpu else "CUDA arch 90, FA kernels for f16 K/V",
         "0" if a.cpu else "99", kfmt(a.deep), a.batch_prompt),
        "transformers %s, torch %s (CUDA %s) on %s: bf16, sdpa, StaticCache(context + %d), torch.compile("
        "mode='reduce-overhead', fullgraph=True) of a greedy step, median of 3 x %d steps; prefill eager, "
        "logits_to_keep=1, median of 3" % (hfv.get("transformers", "?"), hfv.get("torch", "?"), hfv.get("cuda"),
                                           hfv.get("device", "?"), 4 * a.hf_steps + 8, a.hf_steps),
    ]
    text = "\n".join(head) + "\n\n" + T.render([LL, HF]) + "\n\n" + "".join(n + "\n" for n in notes)
    text += "runtime %.0f s (GGUF written in %s)\n" % (
        time.time() - t0, "%s s" % env_info["gguf_s"] if "gguf_s" in env_info else "an earlier run")
    print("\n" + text, flush=True)
    with open(os.path.join(out, "peers.txt"), "w") as f:
        f.write(text)
    with open(os.path.join(out, "peers.json"), "w") as f:
        json.dump(raw, f, indent=1, default=str)
    with tarfile.open(os.path.join(out, "peers-logs.tar.gz"), "w:gz") as tf:
        tf.add(logs, arcname="peers-logs")
    done = sum(1 for v in T.cells.values() if isinstance(v, float))
    return 0 if done and not any(isinstance(v, str) and v.startswith("FAIL") for v in T.cells.values()) else 1


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack")
    p.add_argument("dir")
    r = sub.add_parser("run")
    r.add_argument("--src", help="the packed tarball or a llama.cpp directory (default .carry/peer/%s)" % TARBALL)
    r.add_argument("--work", default="/tmp/mkad-peer-cuda")
    r.add_argument("--out")
    r.add_argument("--deadline", type=float, default=525, help="seconds from start by which the table is printed")
    r.add_argument("--hf-budget", type=float, default=300, help="seconds from start for transformers")
    r.add_argument("--llama-min", type=float, default=110, help="seconds kept for llama.cpp's runs after its build")
    r.add_argument("--tiny", action="store_true")
    r.add_argument("--cpu", action="store_true")
    r.add_argument("--no-shm", action="store_true", help="write the GGUF under --work, not /dev/shm")
    r.add_argument("--skip-hf", action="store_true")
    r.add_argument("--depths")
    r.add_argument("--deep", type=int, default=None, help="depths and prompts above this run last, -r 2")
    r.add_argument("--prefill")
    r.add_argument("--batches")
    r.add_argument("--batch-prompt", type=int)
    r.add_argument("--hf-contexts")
    r.add_argument("--hf-steps", type=int, default=32)
    r.add_argument("--threads", type=int, default=0, help="llama.cpp CPU threads (default: its own)")
    r.add_argument("--jobs", type=int, default=0)
    g = sub.add_parser("gguf")
    g.add_argument("--src", required=True)
    g.add_argument("--shape", required=True, choices=sorted(SHAPES))
    g.add_argument("--path", required=True)
    h = sub.add_parser("hf")
    h.add_argument("--shape", required=True, choices=sorted(SHAPES))
    h.add_argument("--device", default="cuda")
    h.add_argument("--contexts", default="")
    h.add_argument("--prefill", default="")
    h.add_argument("--steps", type=int, default=32)
    h.add_argument("--deadline", type=float, required=True, help="time.time() by which to stop starting rows")
    a = ap.parse_args()
    if a.cmd == "pack":
        return pack(a.dir)
    if a.cmd == "gguf":
        return write_gguf(a.src, a.shape, a.path)
    if a.cmd == "hf":
        ints = [int(x) for x in a.contexts.split(",") if x]
        return hf_bench(a.shape, a.device, ints, [int(x) for x in a.prefill.split(",") if x], a.steps, a.deadline)
    tiny = a.tiny
    dflt = {"depths": "0,256,1024" if tiny else "0,4096,32768,131072",
            "prefill": "256,1024" if tiny else "4096,32768",
            "batches": "1,2,4" if tiny else "1,8,32,64",
            "batch_prompt": 256 if tiny else 4096,
            "hf_contexts": "256,1024" if tiny else "4096,32768,131072",
            "deep": 512 if tiny else 32768}
    for k, v in dflt.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    return run(a)


if __name__ == "__main__":
    sys.exit(main())
