#!/usr/bin/env python3
"""Soak test for mkad (not part of make check; run it on a sanitizer build):

    python3 tests/server_soak.py --mkad ./mkad --seconds 60 --clients 100

Many concurrent raw-socket clients do random things: streaming and plain
completions and chats, sessions, stop strings, logprobs, disconnects at
random moments (before the body is complete, while queued, mid-stream),
malformed bodies.  At the end the daemon must be healthy, every sequence
freed (running 0, K/V blocks only held by resident sessions), and it must
exit 0 on SIGTERM (a sanitizer report fails the run).
"""
import argparse
import asyncio
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.dirname(HERE)


def metrics(port):
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {k: float(v) for k, v in (l.rsplit(" ", 1) for l in body.splitlines() if l and l[0] != "#")}


def make_body(rnd):
    chat = rnd.random() < 0.4
    b = {"model": "mkad-tiny", "max_tokens": rnd.choice([1, 4, 16, 64, 300]), "seed": rnd.randrange(1000)}
    if chat:
        b["messages"] = [{"role": "user", "content": rnd.choice(["hi", "tell me a story", "é" * 50])}]
    else:
        b["prompt"] = rnd.choice([[1, 2, 3], list(range(5, 200)), "Once upon a time", " Elizabeth" * 300])
    if rnd.random() < 0.5:
        b["stream"] = True
        if rnd.random() < 0.5:
            b["stream_options"] = {"include_usage": True}
    if rnd.random() < 0.3:
        b["session_id"] = f"s{rnd.randrange(40)}"
    if rnd.random() < 0.2:
        b["stop"] = [rnd.choice(["e", "the", "\n"])]
    if rnd.random() < 0.2:
        b["ignore_eos"] = True
    if rnd.random() < 0.1:
        b["logprobs"] = True if chat else 2
        if chat:
            b["top_logprobs"] = 2
    path = "/v1/chat/completions" if chat else "/v1/completions"
    raw = json.dumps(b).encode()
    if rnd.random() < 0.05:
        raw = raw[: rnd.randrange(len(raw))] + b"}{"
    return path, raw


async def client(port, rnd, deadline, stats):
    while time.time() < deadline:
        path, raw = make_body(rnd)
        mode = rnd.random()
        try:
            r, w = await asyncio.open_connection("127.0.0.1", port)
            head = (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(raw)}\r\n\r\n").encode()
            if mode < 0.05:  # leave in the middle of the body
                w.write(head + raw[: len(raw) // 2])
                await w.drain()
                await asyncio.sleep(rnd.random() * 0.2)
                w.close()
                stats["cut_body"] += 1
                continue
            w.write(head + raw)
            await w.drain()
            if mode < 0.25:  # leave after a random moment (queued, prefilling, streaming)
                await asyncio.sleep(rnd.random() * 0.3)
                w.close()
                stats["left"] += 1
                continue
            data = b""
            while True:
                chunk = await asyncio.wait_for(r.read(65536), 120)
                if not chunk:
                    break
                data += chunk
                if data.endswith(b"0\r\n\r\n") or (b"Content-Length" in data and b"\r\n\r\n" in data and
                                                    len(data.split(b"\r\n\r\n", 1)[1]) >= int(
                                                        re.search(rb"Content-Length: (\d+)", data).group(1))):
                    break
            w.close()
            st = int(data[9:12]) if data.startswith(b"HTTP/1.1") else 0
            stats[st] = stats.get(st, 0) + 1
            if st == 429:  # Retry-After says 1 s; a shorter random back-off keeps pressure up
                await asyncio.sleep(0.05 + rnd.random() * 0.2)
            if st >= 500 or st == 0:
                print("BAD", st, raw[:200], data[:300], flush=True)
                stats["bad"] += 1
        except (ConnectionError, asyncio.TimeoutError) as e:
            stats["bad"] += 1
            print("ERR", type(e).__name__, raw[:100], flush=True)


async def main_async(port, n, seconds, seed):
    stats = {"left": 0, "cut_body": 0, "bad": 0}
    deadline = time.time() + seconds
    await asyncio.gather(*(client(port, random.Random(seed * 1000 + i), deadline, stats) for i in range(n)))
    return stats


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mkad", default=os.path.join(SRC, "mkad"))
    ap.add_argument("--model", default=os.path.join(SRC, "models", "mkad-tiny"))
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--daemon-args", default="", help="extra mkad flags, e.g. '--kv-mem-mb 8' to force preemptions")
    a = ap.parse_args()
    p = subprocess.Popen([a.mkad, "--model", a.model, "--port", "0", "--log-requests=false",
                          "--max-seqs", "32", "--max-queue", "64", "--max-sessions", "16",
                          *a.daemon_args.split()],
                         stderr=subprocess.PIPE, text=True)
    lines = []
    port = None
    for line in p.stderr:
        lines.append(line)
        m = re.search(r"event=listening .*port=(\d+)", line)
        if m:
            port = int(m.group(1))
        if "event=ready" in line:
            break
    threading.Thread(target=lambda: [lines.append(l) for l in p.stderr], daemon=True).start()
    stats = asyncio.run(main_async(port, a.clients, a.seconds, a.seed))
    print("stats:", stats)
    ok = stats["bad"] == 0
    deadline = time.time() + 30
    while True:
        m = metrics(port)
        if m["mkad_sequences_running"] == 0 and m["mkad_sequences_waiting"] == 0:
            break
        if time.time() > deadline:
            print("FAIL: sequences still running", m["mkad_sequences_running"])
            ok = False
            break
        time.sleep(0.2)
    print("kv_blocks_used", m["mkad_kv_blocks_used"], "sessions", m["mkad_sessions_resident"],
          "inflight", m["mkad_http_inflight_requests"], "preemptions", m["mkad_preemptions_total"])
    if m["mkad_http_inflight_requests"] != 0:
        ok = False
    h = urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).status
    ok &= h == 200
    p.send_signal(signal.SIGTERM)
    rc = p.wait(60)
    time.sleep(0.2)
    bad = [l for l in lines if "Sanitizer" in l or "runtime error" in l]
    if bad or rc != 0:
        print("FAIL: exit", rc, "".join(lines[-40:]))
        ok = False
    print("soak:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
