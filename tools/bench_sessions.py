#!/usr/bin/env python3
"""bench_sessions.py — what the session tiers save a returning client.

For each history length H it runs mkad (the CPU backend unless --backend
says otherwise) with a state directory and measures the time to first token
(a non-streaming request with max_tokens 1, wall clock at the client) of a
request that continues a session whose history is H tokens, when the
session's state is:

  hot      resident in the engine (the previous turn just ended);
  host     evicted from the engine (DELETE /admin/sessions/{id}?tier=hbm),
           its blocks in the store's host-memory tier;
  disk     after a restart of the daemon (the host tier is empty; the OS
           page cache may still hold the files: this measures RocksDB reads
           from a warm page cache, not a cold disk);
  prefill  no stored state: the same prompt on a new session id, i.e. the
           whole history prefilled again.

It also reports the store's bytes per token of history, the write-behind
rate (blocks written per second of store time while a long turn is
persisted), and the restart-to-ready time with N stored sessions.

  tools/bench_sessions.py --mkad ./mkad --genmodel ./mkad-genmodel [--lengths 4096,32768]

The model: mkad-genmodel --preset bundled --levels 3 --max-pos (longest + 1024)
(the bundled model's shape; its context is only 4096).
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request


def http(method, url, body=None, timeout=600):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


class Daemon:
    def __init__(self, mkad, model, state, extra):
        self.proc = subprocess.Popen([mkad, "--model", model, "--port", "0", "--state-dir", state,
                                      "--log-requests=false"] + extra,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        self.port = None
        self.lines = []
        self.t0 = time.time()
        self.ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.time() + 120
        while self.port is None and time.time() < deadline and self.proc.poll() is None:
            time.sleep(0.01)
        if self.port is None:
            raise SystemExit("mkad did not start:\n" + "\n".join(self.lines[-20:]))
        self.base = "http://127.0.0.1:%d" % self.port
        while http("GET", self.base + "/health")[0] != 200:
            if time.time() > deadline:
                raise SystemExit("mkad not ready:\n" + "\n".join(self.lines[-20:]))
            time.sleep(0.005)
        self.ready_s = time.time() - self.t0
        self.name = json.loads(http("GET", self.base + "/v1/models")[1])["data"][0]["id"]

    def _read(self):
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))
            m = re.search(r"event=listening .*port=(\d+)", line)
            if m:
                self.port = int(m.group(1))

    def stop(self):
        self.proc.terminate()
        self.proc.wait(120)

    def ttft(self, prompt, sid):
        body = {"model": self.name, "prompt": prompt, "max_tokens": 1, "temperature": 0}
        if sid:
            body["session_id"] = sid
        t = time.perf_counter()
        st, out = http("POST", self.base + "/v1/completions", body)
        dt = time.perf_counter() - t
        if st != 200:
            raise SystemExit("request failed: %d %s" % (st, out[:300]))
        return dt, json.loads(out)["usage"]["prompt_tokens_details"]["cached_tokens"]

    def metrics(self):
        out = {}
        for line in http("GET", self.base + "/metrics")[1].decode().splitlines():
            if line and not line.startswith("#"):
                k, v = line.rsplit(" ", 1)
                out[k] = float(v)
        return out

    def drain(self):
        while self.metrics().get("mkad_session_write_queue", 0) > 0:
            time.sleep(0.01)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mkad", default="./mkad")
    ap.add_argument("--genmodel", default="./mkad-genmodel")
    ap.add_argument("--lengths", default="4096,32768")
    ap.add_argument("--backend", default="cpu")
    ap.add_argument("--sessions", type=int, default=1000, help="stored sessions for the restart time")
    a = ap.parse_args()
    lengths = [int(x) for x in a.lengths.split(",")]
    work = tempfile.mkdtemp(prefix="mkad-bench-sessions-")
    model = os.path.join(work, "model")
    subprocess.run([a.genmodel, "--out", model, "--preset", "bundled", "--levels", "3", "--max-pos",
                    str(max(lengths) + 1024), "--seed", "3"], check=True, stdout=subprocess.DEVNULL)
    extra = ["--backend", a.backend, "--max-ctx", str(max(lengths) + 1024), "--max-batch-tokens", "4096",
             "--prefill-chunk", "4096"]
    print("mkad session tiers, %s backend, model %s (mkad-genmodel --preset bundled --levels 3), %s"
          % (a.backend, "bundled", time.strftime("%Y-%m-%d")))
    print("%-8s %10s %10s %10s %10s %14s" % ("history", "hot_s", "host_s", "disk_s", "prefill_s", "store_B/token"))
    for H in lengths:
        state = os.path.join(work, "state-%d" % H)
        hist = [(i * 7919 + 13) % 3000 + 100 for i in range(H)]
        d = Daemon(a.mkad, model, state, extra)
        d.ttft(hist, "s")  # the history's first turn
        d.drain()
        turn = hist + [5, 6, 7]
        hot, c_hot = d.ttft(turn, "s")
        d.drain()
        st, _ = http("DELETE", d.base + "/admin/sessions/s?user=local&tier=hbm")
        assert st == 200
        host, c_host = d.ttft(turn + [8], "s")
        d.drain()
        mem = json.loads(http("GET", d.base + "/admin/memory")[1])
        disk_bytes = mem["tiers"]["disk"]["bytes"]
        d.stop()
        d = Daemon(a.mkad, model, state, extra)
        disk, c_disk = d.ttft(turn + [8, 9], "s")
        pre, c_pre = d.ttft(turn + [8, 9], "other")
        d.stop()
        print("%-8d %10.3f %10.3f %10.3f %10.3f %14.0f" % (H, hot, host, disk, pre, disk_bytes / (H + 4)))
        print("         cached tokens: hot %d, host %d, disk %d, prefill %d" % (c_hot, c_host, c_disk, c_pre))
        shutil.rmtree(state)
    # write-behind rate and restart with many sessions
    state = os.path.join(work, "state-many")
    d = Daemon(a.mkad, model, state, extra)
    t = time.perf_counter()
    for i in range(a.sessions):
        http("POST", d.base + "/v1/completions", {"model": d.name, "prompt": [(i * 31 + k) % 3000 + 100 for k in range(64)],
                                                   "max_tokens": 1, "session_id": "s%d" % i})
    d.drain()
    dt = time.perf_counter() - t
    m = d.metrics()
    d.stop()
    d = Daemon(a.mkad, model, state, extra)
    print("%d sessions of 64 tokens: %.0f turns/s end to end (each synced before its response), %d blocks "
          "written; restart to ready with them stored: %.2f s" % (a.sessions, a.sessions / dt,
                                                                  m.get("mkad_session_blocks_written_total", 0),
                                                                  d.ready_s))
    d.stop()
    shutil.rmtree(work)


if __name__ == "__main__":
    sys.exit(main())
