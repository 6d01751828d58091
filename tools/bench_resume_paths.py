#!/usr/bin/env python3
"""Which way the resume cost model goes (resume_policy = auto): one daemon
with a state directory, one session of --tokens history resumed --resumes
times after evicting it from the engine (every third resume also from the
host-memory tier, so that it loads from disk); prints each resume's
event=session_resumed log line (path, tier, load time, the model's
estimate).  Usage: python3 tools/bench_resume_paths.py [--mkad ./mkad]
[--model models/mkad-tiny] [--tokens 2000] [--resumes 4]"""
import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
import server_blackbox as bb  # noqa: E402  (the black-box suite's Daemon and helpers)

ap = argparse.ArgumentParser()
ap.add_argument("--mkad", default="./mkad")
ap.add_argument("--model", default=os.path.join(HERE, "..", "models", "mkad-tiny"))
ap.add_argument("--tokens", type=int, default=2000)
ap.add_argument("--resumes", type=int, default=4)
ap.add_argument("--policy", default="auto")
bb.ARGS = ap.parse_args()
d = bb.Daemon("--resume-policy", bb.ARGS.policy)
try:
    c = d.client()
    p = list(range(11, 11 + bb.ARGS.tokens))
    eb = dict(bb.IDS, session_id="x")
    r = bb.completion(c, seed=1, max_tokens=4, prompt=p, extra_body=eb)
    for k in range(bb.ARGS.resumes):
        bb.wait_metric(lambda m: m["mkad_session_write_queue"] == 0, d=d)
        bb.http("DELETE", d.base + "/admin/sessions/x?user=local&tier=hbm")
        if k % 3 == 2:
            bb.http("DELETE", d.base + "/admin/sessions/x?user=local&tier=host")
        p = p + r.choices[0].model_extra["token_ids"] + [5]
        r = bb.completion(c, seed=1, max_tokens=4, prompt=p, extra_body=eb)
finally:
    d.stop()
print("\n".join(l for l in d.lines if "event=session_resum" in l))
