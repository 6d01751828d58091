#!/usr/bin/env python3
"""bench_fork.py — what sharing K/V blocks saves: n choices and prefix sharing.

Runs mkad (CPU backend unless --backend says otherwise) with the bundled
model and measures, wall clock at the client:

  n choices   one request with n = N (the prompt prefilled once, N-1 forks)
              against N concurrent n = 1 requests of the same prompt on a
              daemon with prefix_sharing off (each prefills the prompt);
  prefix      the time to first token (max_tokens 1, not streamed) of a
              prompt of L tokens prefilled from scratch, and of the same
              prompt with another last token right after it, which forks
              the first one's full blocks (same user).

  python3 tools/bench_fork.py --mkad ./mkad --model models/mkad-tiny [--len 2000] [--n 8]
"""
import argparse
import concurrent.futures as cf
import json
import re
import statistics
import subprocess
import threading
import time
import urllib.request


class Daemon:
    def __init__(self, args, extra):
        cmd = [args.mkad, "--model", args.model, "--host", "127.0.0.1", "--port", "0",
               "--log-requests=false"] + (["--backend", args.backend] if args.backend else []) + extra
        self.p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True)
        self.port = None
        ev = threading.Event()

        def read():
            for line in self.p.stderr:
                m = re.search(r"event=listening .*port=(\d+)", line)
                if m:
                    self.port = int(m.group(1))
                    ev.set()
        threading.Thread(target=read, daemon=True).start()
        ev.wait(20)
        self.base = "http://127.0.0.1:%d" % self.port
        for _ in range(400):
            try:
                with urllib.request.urlopen(self.base + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise SystemExit("mkad did not become healthy")

    def post(self, body):
        req = urllib.request.Request(self.base + "/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        t0 = time.perf_counter()
        with urllib.request.urlopen(req, timeout=600) as r:
            out = json.loads(r.read())
        return time.perf_counter() - t0, out

    def stop(self):
        self.p.terminate()
        self.p.wait(30)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mkad", default="./mkad")
    ap.add_argument("--model", default="models/mkad-tiny")
    ap.add_argument("--backend", default="")
    ap.add_argument("--len", type=int, default=2000, help="prompt tokens")
    ap.add_argument("--n", type=int, default=8, help="choices")
    ap.add_argument("--gen", type=int, default=32, help="max_tokens per choice")
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()

    def prompt(k):
        return [(i * 31 + k * 97) % 2000 + 3 for i in range(a.len)]

    body = dict(model="mkad-tiny", max_tokens=a.gen, ignore_eos=True, seed=1)
    d = Daemon(a, ["--prefix-sharing=false"])
    try:
        d.post(dict(body, prompt=prompt(99), max_tokens=1))  # warm up
        t_n, t_sep = [], []
        for k in range(a.reps):
            t, r = d.post(dict(body, prompt=prompt(k), n=a.n))
            assert len(r["choices"]) == a.n
            t_n.append(t)
            with cf.ThreadPoolExecutor(a.n) as ex:
                t0 = time.perf_counter()
                list(ex.map(lambda i: d.post(dict(body, prompt=prompt(k), seed=i)), range(a.n)))
                t_sep.append(time.perf_counter() - t0)
    finally:
        d.stop()
    d = Daemon(a, [])
    try:
        d.post(dict(body, prompt=prompt(99), max_tokens=1))
        cold, shared, cached = [], [], 0
        for k in range(a.reps):
            p = prompt(10 + k)
            t, r = d.post(dict(body, prompt=p + [1], max_tokens=1))
            cold.append(t)
            t, r = d.post(dict(body, prompt=p + [2], max_tokens=1))
            shared.append(t)
            cached = r["usage"]["prompt_tokens_details"]["cached_tokens"]
    finally:
        d.stop()
    med = statistics.median
    print(f"prompt {a.len} tokens, {a.gen} generated per choice, median of {a.reps}")
    print(f"n={a.n} in one request (1 prefill + {a.n - 1} forks): {med(t_n):.3f} s")
    print(f"{a.n} concurrent n=1 requests, no sharing:        {med(t_sep):.3f} s")
    print(f"TTFT, prompt prefilled from scratch:             {med(cold) * 1000:.1f} ms")
    print(f"TTFT, {cached} of {a.len + 1} tokens forked (same user):  {med(shared) * 1000:.1f} ms")


if __name__ == "__main__":
    main()
