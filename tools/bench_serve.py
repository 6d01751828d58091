#!/usr/bin/env python3
"""mkad's daemon against llama.cpp's llama-server under the same concurrent
streaming load, one interleaved run (make bench-serve).

    python3 tools/bench_serve.py [--build .] [--work DIR] [--threads 2] [--rounds 3]
                                 [--levels 1,8,32] [--prompt 128] [--gen 64]
                                 [--step-target-ms 50]

The servers and the model are bench-peer's (tools/bench_peer.py, cached
under --work, default BUILD/tests/tmp/peer): llama.cpp from the
llama-cpp-python sdist on PyPI (llama-server, CPU only), the Qwen2.5-0.5B
shape from mkad-genmodel (plain attention, bf16) and its bf16 GGUF.  Three
servers run side by side, idle but for the one measured: llama-server
(-t THREADS, -np = the largest level, 1,024 context tokens per slot), mkad
with the step time budget (--step-target-ms) and mkad without it
(--step-target-ms 0, the token budget alone), all with THREADS threads.

Load, for each level N in --levels, the three servers in turn (interleaved):
N streaming clients start together, each sends one /v1/completions request
(a --prompt-token prompt of distinct token ids, --gen tokens out, greedy,
ignore_eos) and reads the stream; measured by the client from the SSE
events (one event per token on both servers): output tokens/s over the
run's wall time, time to first token (TTFT) p50/p99, inter-token latency
(ITL) p50/p99 over every gap between two tokens of one stream, and the gaps
over 1 s.

Arrivals (the stall scenario): --arr-streams streams (--prompt-token
prompts) decode; once all have their first token and --arr-warm seconds
went by, --arr-new new prompts of --arr-prompt tokens arrive --arr-gap
seconds apart (--arr-new-gen tokens out each).  Reported: one decode step
(the running streams' median ITL before the arrivals), their ITL p50/p99
and gaps over 1 s from the first arrival until every new prompt had its
first token, p99 over one decode step (the issue's goal: <= 3), and the new
prompts' TTFT.

--rounds rounds (interleaved: each measurement runs on the three servers in
turn); the tables hold medians over rounds (gap counts: sums).  Before each
measurement the script waits up to --quiet-wait seconds for an idle machine
(other processes stall llama.cpp's spinning threads for seconds on 2 cores)
and counts the measurements that started on a busy one.

Runtime: printed at the end (about 11 minutes on a 2-core VM with the
defaults, waits for quiet aside).  Exit 77 when PyPI cannot be reached
(bench-peer's setup).
"""
import argparse
import asyncio
import json
import math
import os
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench_peer  # noqa: E402  (fetch/build of llama.cpp and the model, shared cache)


def log(msg):
    print("bench-serve: " + msg, file=sys.stderr, flush=True)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Server:
    def __init__(self, name, cmd, port):
        self.name, self.port = name, port
        self.p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.tail = []
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self):
        for line in self.p.stderr:
            self.tail = (self.tail + [line])[-20:]

    def wait_ready(self, timeout=600):
        t0 = time.time()
        while time.time() - t0 < timeout:
            if self.p.poll() is not None:
                sys.exit("bench-serve: %s exited (%d):\n%s" % (self.name, self.p.returncode, "".join(self.tail)))
            try:
                with urllib.request.urlopen("http://127.0.0.1:%d/health" % self.port, timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        sys.exit("bench-serve: %s not ready after %d s" % (self.name, timeout))

    def stop(self):
        self.p.terminate()
        try:
            self.p.wait(30)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()


def cpu_idle(secs=1.0):
    """The machine's idle share of CPU time over secs (/proc/stat)."""
    def snap():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return v[3] + v[4], sum(v)
    i0, t0 = snap()
    time.sleep(secs)
    i1, t1 = snap()
    return (i1 - i0) / max(1, t1 - t0)


def wait_quiet(limit):
    """Waits (at most limit seconds) until the machine is idle: other
    processes on a 2-core VM (builds, other benchmarks) stall llama.cpp's
    spinning threads for seconds and make any figure meaningless.  Returns
    whether it was quiet."""
    t0 = time.time()
    while time.time() - t0 < limit:
        if cpu_idle() >= 0.85:
            return True
    log("  the machine is busy (other processes): measuring anyway")
    return False


def prompt_ids(n, salt):
    """n pseudo-random token ids, a different prompt per salt (no two
    requests share a prefix block)."""
    rnd = random.Random(salt)
    return [rnd.randrange(5, 4000) for _ in range(n)]


async def stream(port, model, prompt, gen, stop_at=None, times=None):
    """One streaming completion.  Returns (send time, [token event times],
    completion_tokens or None, error or None).  stop_at: an asyncio.Event
    that ends the stream early (the connection is closed); times: the list
    the token times go to as they come."""
    t_send = time.perf_counter()
    times = [] if times is None else times
    try:
        r, w = await asyncio.open_connection("127.0.0.1", port)
    except OSError as e:
        return t_send, times, None, str(e)
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": gen, "temperature": 0, "stream": True,
                       "stream_options": {"include_usage": True}, "ignore_eos": True,
                       "cache_prompt": False}).encode()
    w.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body) + body)
    await w.drain()
    st = {"usage": None, "err": None}

    def events(data, now):
        """SSE events: "data: {...}" lines"""
        st["buf"] = st.get("buf", b"") + data
        if not times:
            st["head"] = (st.get("head", b"") + data)[:600]
        while b"\n" in st["buf"]:
            line, st["buf"] = st["buf"].split(b"\n", 1)
            line = line.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            try:
                ev = json.loads(line[6:])
            except ValueError:
                st["err"] = "bad event: %r" % line[:80]
                continue
            if ev.get("error"):
                st["err"] = str(ev["error"])
            if ev.get("usage"):
                st["usage"] = ev["usage"].get("completion_tokens")
            ch = ev.get("choices") or []
            if ch and ch[0].get("finish_reason") is None:
                times.append(now)

    async def consume():
        head = await r.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            st["err"] = head.split(b"\r\n", 1)[0].decode()
        if b"transfer-encoding: chunked" in head.lower():
            while True:
                size = int((await r.readline()).split(b";")[0], 16)
                if size == 0:
                    return
                data = await r.readexactly(size)
                await r.readline()
                events(data, time.perf_counter())
        while True:
            data = await r.read(65536)
            if not data:
                return
            events(data, time.perf_counter())

    task = asyncio.ensure_future(consume())
    waits = {task} | ({asyncio.ensure_future(stop_at.wait())} if stop_at is not None else set())
    fin, rest = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    for f in rest:
        f.cancel()
    if task in fin and task.exception() is not None:
        st["err"] = repr(task.exception())
    w.close()
    if not times and st["err"] is None:
        st["err"] = "no token event in: %r" % st.get("head", b"")
    return t_send, times, st["usage"], st["err"]


def pct(v, q):
    if not v:
        return float("nan")
    v = sorted(v)
    return v[min(len(v) - 1, int(q * len(v)))]


async def load(port, model, n, plen, gen, salt):
    t0 = time.perf_counter()
    res = await asyncio.gather(*(stream(port, model, prompt_ids(plen, salt + i), gen) for i in range(n)))
    wall = time.perf_counter() - t0
    ttft, itl, toks, bad = [], [], 0, []
    for t_send, times, usage, err in res:
        if err or usage != gen or len(times) < gen - 1:
            bad.append((err, usage, len(times)))
        toks += usage or 0
        if times:
            ttft.append(times[0] - t_send)
            itl += [b - a for a, b in zip(times, times[1:])]
    if bad:
        log("  WARNING: %d of %d streams incomplete: %s" % (len(bad), n, bad[:3]))
    return {"tok_s": toks / wall, "ttft50": pct(ttft, .5), "ttft99": pct(ttft, .99), "itl50": pct(itl, .5),
            "itl99": pct(itl, .99), "gaps": sum(g > 1.0 for g in itl), "wall": wall, "bad": len(bad)}


async def arrivals(port, model, a, salt):
    stop = asyncio.Event()
    live = [[] for _ in range(a.arr_streams)]
    running = [asyncio.ensure_future(stream(port, model, prompt_ids(a.prompt, salt + i), a.arr_stream_gen, stop,
                                                  live[i]))
               for i in range(a.arr_streams)]
    # every running stream decodes (its first token came), then a warm-up
    t_start = time.perf_counter()
    while not all(live) and not any(f.done() for f in running) and time.perf_counter() - t_start < 600:
        await asyncio.sleep(0.1)
    await asyncio.sleep(a.arr_warm)
    news = []
    t_arr = time.perf_counter()
    for k in range(a.arr_new):
        news.append(asyncio.ensure_future(stream(port, model, prompt_ids(a.arr_prompt, salt + 100 + k),
                                                 a.arr_new_gen)))
        if k + 1 < a.arr_new:
            await asyncio.sleep(a.arr_gap)
    new_res = await asyncio.gather(*news)
    t_end = max((times[0] for _, times, _, _ in new_res if times), default=time.perf_counter())
    await asyncio.sleep(0.5)
    stop.set()
    run_res = await asyncio.gather(*running)
    before, during, bad = [], [], 0
    for _, times, _, err in run_res:
        if err or not times:
            bad += 1
            continue
        for x, y in zip(times, times[1:]):
            if y <= t_arr:
                before.append(y - x)
            elif x < t_end:
                during.append(y - x)  # a gap that overlaps the arrivals' window
        if times[0] > t_arr:
            bad += 1  # this stream was not decoding yet when the prompts came
    new_ttft = [times[0] - ts for ts, times, _, _ in new_res if times]
    step = statistics.median(before) if before else float("nan")
    p99 = pct(during, .99)
    return {"step": step, "itl50": pct(during, .5), "itl99": pct(during, .99), "ratio": p99 / step,
            "gaps": sum(g > 1.0 for g in during), "new_ttft": max(new_ttft) if new_ttft else float("nan"),
            "window": t_end - t_arr, "bad": bad, "t": t_arr - t_start}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", default=bench_peer.SRC, help="mkad build directory (mkad, mkad-genmodel)")
    ap.add_argument("--work", default=None, help="bench-peer's cache (llama.cpp, the model)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--levels", default="1,8,32")
    ap.add_argument("--quiet-wait", type=float, default=30,
                    help="seconds to wait for an idle machine before each measurement")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the table holds medians "
                    "(gap counts: sums)")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--step-target-ms", type=int, default=50, help="mkad's time budget in the 'on' runs")
    ap.add_argument("--arr-streams", type=int, default=8)
    ap.add_argument("--arr-warm", type=float, default=3.0,
                    help="seconds the running streams decode before the first new prompt")
    ap.add_argument("--arr-stream-gen", type=int, default=768,
                    help="max_tokens of the running streams (they are closed once the new prompts are in)")
    ap.add_argument("--arr-new", type=int, default=2)
    ap.add_argument("--arr-prompt", type=int, default=512)
    ap.add_argument("--arr-gap", type=float, default=1.0)
    ap.add_argument("--arr-new-gen", type=int, default=8)
    ap.add_argument("--skip-llama", action="store_true",
                    help="mkad only, no llama.cpp setup (the model directory must be in --work already)")
    a = ap.parse_args()
    a.build = os.path.abspath(a.build)
    a.work = os.path.abspath(a.work or os.path.join(a.build, "tests", "tmp", "peer"))
    os.makedirs(a.work, exist_ok=True)
    t0 = time.time()
    levels = [int(x) for x in a.levels.split(",") if x]
    servers = []
    if not a.skip_llama:
        src = bench_peer.fetch_llama(a.work)
        _, llama_server = bench_peer.build_llama(src)
        mdir, gguf = bench_peer.make_model(a, a.work, src)
    else:
        mdir = os.path.join(a.work, "qwen2.5-0.5b-plain")
    t_setup = time.time() - t0
    np_ = max(levels + [a.arr_streams + a.arr_new])
    try:
        if not a.skip_llama:
            port = free_port()
            servers.append(Server("llama.cpp", [llama_server, "-m", gguf, "-t", str(a.threads), "--port", str(port),
                                                "-np", str(np_), "-c", str(1024 * np_)], port))
        for name, target in (("mkad budget on", a.step_target_ms), ("mkad budget off", 0)):
            port = free_port()
            servers.append(Server(name, [os.path.join(a.build, "mkad"), "--model", mdir, "--backend", "cpu",
                                         "--threads", str(a.threads), "--port", str(port), "--log-requests=false",
                                         "--max-seqs", str(max(64, np_)), "--prefix-cache", "0",
                                         "--step-target-ms", str(target)], port))
        for s in servers:
            s.wait_ready()
        model = {s.name: ("mkad" if s.name.startswith("mkad") else "llama") for s in servers}
        for s in servers:  # the mkad daemons take their directory's name as model id
            if s.name.startswith("mkad"):
                model[s.name] = os.path.basename(mdir)
        # warm-up: one short request each (page the weights in)
        for s in servers:
            asyncio.run(load(s.port, model[s.name], 1, 16, 4, 900))
        rows, arr = {}, {}
        salt = busy = 0
        for rnd in range(a.rounds):
            for n in levels:
                for s in servers:
                    salt += 1000
                    log("round %d, %d streams: %s" % (rnd + 1, n, s.name))
                    busy += not wait_quiet(a.quiet_wait)
                    r = asyncio.run(load(s.port, model[s.name], n, a.prompt, a.gen, salt))
                    log("  " + " ".join("%s=%.3f" % kv for kv in r.items()))
                    rows.setdefault((n, s.name), []).append(r)
            for s in servers:
                salt += 1000
                log("round %d, arrivals: %s" % (rnd + 1, s.name))
                busy += not wait_quiet(a.quiet_wait)
                r = asyncio.run(arrivals(s.port, model[s.name], a, salt))
                log("  " + " ".join("%s=%.3f" % kv for kv in r.items()))
                arr.setdefault(s.name, []).append(r)
    finally:
        for s in servers:
            s.stop()
    names = [s.name for s in servers]

    def med(runs):
        """the median of each measure over the rounds (counts: their sum)"""
        out = {}
        for k in runs[0]:
            v = [r[k] for r in runs if not math.isnan(r[k])]  # nan: nothing to measure in that round
            out[k] = statistics.median(v) if v else float("nan")
        for k in ("gaps", "bad"):
            out[k] = sum(r[k] for r in runs)
        return out

    rows = {k: med(v) for k, v in rows.items()}
    arr = {k: med(v) for k, v in arr.items()}
    print("\nServing under load: %s, %d threads, %s; %d round(s), medians" % (
        ", ".join(names), a.threads, time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), a.rounds))
    print("model: Qwen2.5-0.5B shape (mkad-genmodel --levels 0, bf16; llama.cpp: its bf16 GGUF); each stream: "
          "%d-token prompt, %d tokens out, greedy; mkad budget on = --step-target-ms %d" %
          (a.prompt, a.gen, a.step_target_ms))
    print("| streams | server | output tok/s | TTFT p50 / p99 s | ITL p50 / p99 s | gaps > 1 s |")
    print("|---|---|---|---|---|---|")
    for n in levels:
        for nm in names:
            r = rows[(n, nm)]
            print("| %d | %s | %.1f | %.2f / %.2f | %.3f / %.3f | %d%s |" % (
                n, nm, r["tok_s"], r["ttft50"], r["ttft99"], r["itl50"], r["itl99"], r["gaps"],
                " (%d streams incomplete)" % r["bad"] if r["bad"] else ""))
    print("\nArrivals: %d streams decode; %d new %d-token prompts arrive %.0f s apart" %
          (a.arr_streams, a.arr_new, a.arr_prompt, a.arr_gap))
    print("| server | one decode step s | running streams' ITL p50 / p99 s | p99 / decode step | gaps > 1 s | "
          "new prompts' TTFT (max) s |")
    print("|---|---|---|---|---|---|")
    for nm in names:
        r = arr[nm]
        print("| %s | %.3f | %.3f / %.3f | %.1f | %d | %.1f%s |" % (
            nm, r["step"], r["itl50"], r["itl99"], r["ratio"], r["gaps"], r["new_ttft"],
            " (%d streams not decoding at the arrivals)" % r["bad"] if r["bad"] else ""))
    print("runtime: %.0f s (of which setup/cached builds %.0f s); measurements started on a busy machine "
          "(other processes): %d of %d" % (time.time() - t0, t_setup, busy, a.rounds * (len(levels) + 1) * len(names)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
