#!/usr/bin/env python3
"""Server benchmarks for docs/performance.md (not part of make check).

    python3 tests/server_bench.py [--mkad ./mkad] [--model models/mkad-tiny] [--quick]

1. overhead: sequential keep-alive requests (max_tokens=1); time to first
   byte measured by the client minus the engine's step time (the delta of
   mkad_step_seconds_sum over the run, per request) = HTTP + JSON +
   scheduling + thread hand-off cost per request.
2. requests/s under load with wrk (Debian package `wrk`): non-streaming
   completions with 16 and 1 generated tokens, and GET /health.
3. concurrent streams held: N streaming clients at once (raw asyncio
   sockets), every one must finish with [DONE]; aggregate tokens/s and the
   inter-token latency percentiles from /metrics.
"""
import argparse
import asyncio
import http.client
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.dirname(HERE)
PROMPT = [1, 15, 27, 300, 42, 7]


def start(args, *extra):
    cmd = [args.mkad, "--model", args.model, "--port", "0", "--log-requests=false", *extra]
    p = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    port = None
    for line in p.stderr:
        m = re.search(r"event=listening .*port=(\d+)", line)
        if m:
            port = int(m.group(1))
        if "event=ready" in line:
            break
    threading.Thread(target=lambda: [None for _ in p.stderr], daemon=True).start()
    return p, port


def metrics(port):
    c = http.client.HTTPConnection("127.0.0.1", port)
    c.request("GET", "/metrics")
    body = c.getresponse().read().decode()
    out = {}
    for line in body.splitlines():
        if line and not line.startswith("#"):
            k, v = line.rsplit(" ", 1)
            out[k] = float(v)
    return out


def histo_quantile(m, name, q):
    """Upper bound of the bucket holding quantile q (Prometheus style)."""
    buckets = sorted(((float(re.search(r'le="([^"]+)"', k).group(1).replace("+Inf", "inf")), v)
                      for k, v in m.items() if k.startswith(name + "_bucket")))
    total = buckets[-1][1]
    for le, v in buckets:
        if v >= q * total:
            return le
    return float("inf")


CHAT = {"model": "mkad-tiny", "messages": [{"role": "user", "content": "Hello there, how are you today?"}],
        "max_tokens": 1, "temperature": 0}


def overhead(port, n, path="/v1/completions", body=None):
    body = json.dumps(body or {"model": "mkad-tiny", "prompt": PROMPT, "max_tokens": 1, "temperature": 0})
    c = http.client.HTTPConnection("127.0.0.1", port)
    hdr = {"Content-Type": "application/json"}
    for _ in range(20):  # warm-up
        c.request("POST", path, body, hdr)
        c.getresponse().read()
    m0 = metrics(port)
    ttfb = []
    for _ in range(n):
        t0 = time.perf_counter()
        c.request("POST", path, body, hdr)
        r = c.getresponse()
        r.read(1)
        ttfb.append(time.perf_counter() - t0)
        r.read()
        assert r.status == 200
    m1 = metrics(port)
    eng = (m1["mkad_step_seconds_sum"] - m0["mkad_step_seconds_sum"]) / n
    steps = (m1["mkad_step_seconds_count"] - m0["mkad_step_seconds_count"]) / n
    ttfb.sort()
    mean = statistics.mean(ttfb)
    print(f"overhead: path={path} n={n} ttfb_mean_ms={mean*1e3:.3f} ttfb_p50_ms={ttfb[n//2]*1e3:.3f} "
          f"ttfb_p99_ms={ttfb[int(n*0.99)]*1e3:.3f} engine_ms_per_req={eng*1e3:.3f} "
          f"steps_per_req={steps:.2f} server_overhead_ms={(mean-eng)*1e3:.3f}")


def wrk(port, path, body, conns, secs):
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        if body:
            f.write('wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
                    f"wrk.body = '{body}'\n")
        script = f.name
    out = subprocess.run(["wrk", "-t2", f"-c{conns}", f"-d{secs}s", "--latency", "-s", script,
                          f"http://127.0.0.1:{port}{path}"], capture_output=True, text=True).stdout
    os.unlink(script)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)
    lat = dict(re.findall(r"\s+(50|99)%\s+([\d.]+\w+)", out))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    print(f"wrk: path={path} conns={conns} secs={secs} requests_per_s={rps} "
          f"p50={lat.get('50')} p99={lat.get('99')} non2xx={non2xx.group(1) if non2xx else 0}"
          + (f" body={body}" if body else ""))


async def one_stream(port, i, max_tokens):
    r, w = await asyncio.open_connection("127.0.0.1", port)
    body = json.dumps({"model": "mkad-tiny", "prompt": PROMPT + [i % 4000], "max_tokens": max_tokens,
                       "stream": True, "stream_options": {"include_usage": True},
                       "ignore_eos": True, "seed": i}).encode()
    w.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body) + body)
    await w.drain()
    data = b""
    while not data.endswith(b"data: [DONE]\n\n\r\n") and b"0\r\n\r\n" not in data[-16:]:
        chunk = await r.read(65536)
        if not chunk:
            break
        data += chunk
    w.close()
    m = re.search(rb'"completion_tokens":(\d+)', data)
    return int(m.group(1)) if m else 0, b"data: [DONE]" in data


async def streams(port, n, max_tokens):
    m0 = metrics(port)
    t0 = time.perf_counter()
    res = await asyncio.gather(*(one_stream(port, i, max_tokens) for i in range(n)))
    dt = time.perf_counter() - t0
    m1 = metrics(port)
    done = sum(1 for _, ok in res if ok)
    toks = sum(t for t, _ in res)
    itl = {k: v - m0.get(k, 0) for k, v in m1.items() if k.startswith("mkad_inter_token")}
    bs = {k: v - m0.get(k, 0) for k, v in m1.items() if k.startswith("mkad_batch_sequences")}
    print(f"streams: n={n} completed={done} tokens={toks} wall_s={dt:.2f} tokens_per_s={toks/dt:.0f} "
          f"itl_p50_le_s={histo_quantile(itl, 'mkad_inter_token_latency_seconds', 0.5)} "
          f"itl_p99_le_s={histo_quantile(itl, 'mkad_inter_token_latency_seconds', 0.99)} "
          f"batch_seqs_mean={bs['mkad_batch_sequences_sum']/max(1, bs['mkad_batch_sequences_count']):.1f}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mkad", default=os.path.join(SRC, "mkad"))
    ap.add_argument("--model", default=os.path.join(SRC, "models", "mkad-tiny"))
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    secs = 3 if args.quick else 10
    p, port = start(args, "--max-seqs", "256", "--max-queue", "4096", "--max-connections", "4096")
    try:
        overhead(port, 200 if args.quick else 1000)
        overhead(port, 200 if args.quick else 1000, "/v1/chat/completions", CHAT)
        wrk(port, "/health", None, 32, secs)
        for mt in (1, 16):
            body = json.dumps({"model": "mkad-tiny", "prompt": PROMPT, "max_tokens": mt,
                               "ignore_eos": True})
            wrk(port, "/v1/completions", body, 64, secs)
        wrk(port, "/v1/chat/completions", json.dumps(dict(CHAT, ignore_eos=True)), 64, secs)
        for n, mt in ((64, 200), (256, 100), (1000, 50)):
            asyncio.run(streams(port, n, mt))
    finally:
        p.terminate()
        p.wait(30)


if __name__ == "__main__":
    sys.exit(main())
