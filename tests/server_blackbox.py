#!/usr/bin/env python3
"""Black-box tests of mkad: the real daemon on 127.0.0.1 (ephemeral port) with
the bundled model, driven by the official openai client, curl and raw sockets.

Run by tests/server_blackbox.sh under `make check`; standalone:
    python3 tests/server_blackbox.py [--mkad ./mkad] [--model models/mkad-tiny] [-k NAME]
Each test_* function is one test; the summary line counts them.
"""
import argparse
import concurrent.futures as cf
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import openai

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.environ.get("top_srcdir", os.path.dirname(HERE))
BUILD = os.environ.get("top_builddir", SRC)
MODEL_NAME = "mkad-tiny"
PROMPT = [1, 15, 27, 300, 42, 7]


class Daemon:
    """One mkad process; stderr is collected in a thread."""

    def __init__(self, *args, wait_ready=True, env=None):
        self.state = tempfile.mkdtemp(prefix="mkad-bb-")
        cmd = [ARGS.mkad, "--model", ARGS.model, "--host", "127.0.0.1", "--port", "0",
               "--state-dir", self.state] + list(args)
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True,
                                     env=dict(os.environ, **(env or {})))
        self.lines = []
        self.port = None
        self.cv = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()
        with self.cv:
            self.cv.wait_for(lambda: self.port is not None or self.proc.poll() is not None, 10)
        assert self.port, "daemon did not start:\n" + "\n".join(self.lines)
        self.base = f"http://127.0.0.1:{self.port}"
        if wait_ready:
            deadline = time.time() + 10
            while time.time() < deadline:
                if http("GET", self.base + "/health")[0] == 200:
                    break
                time.sleep(0.02)
            else:
                raise AssertionError("not healthy")

    def _read(self):
        for line in self.proc.stderr:
            with self.cv:
                self.lines.append(line.rstrip("\n"))
                m = re.search(r"event=listening .*port=(\d+)", line)
                if m:
                    self.port = int(m.group(1))
                self.cv.notify_all()

    def client(self, key="none", **kw):
        return openai.OpenAI(base_url=self.base + "/v1", api_key=key, max_retries=0, timeout=60, **kw)

    def stop(self, sig=signal.SIGTERM, timeout=20):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError("daemon did not exit after SIGTERM")
        time.sleep(0.05)  # let the reader thread take the last lines
        with self.cv:
            bad = [l for l in self.lines if "Sanitizer" in l or "runtime error:" in l]
        assert not bad, "sanitizer report:\n" + "\n".join(self.lines[-60:])
        return rc


def http(method, url, body=None, headers=None, timeout=30):
    """(status, headers, body bytes) without raising on 4xx/5xx."""
    data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
    h = {"Content-Type": "application/json"} if data is not None else {}
    h.update(headers or {})
    req = urllib.request.Request(url, data=data, method=method, headers=h)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()
    except (ConnectionError, urllib.error.URLError):
        return 0, {}, b""


def curl(*args):
    """curl's (status, body) for raw HTTP cases."""
    out = subprocess.run(["curl", "-s", "-o", "-", "-w", "\n%{http_code}", "--max-time", "30", *args],
                         capture_output=True)
    body, _, code = out.stdout.rpartition(b"\n")
    return int(code or 0), body


def metrics(d):
    st, _, body = http("GET", d.base + "/metrics")
    assert st == 200
    vals = {}
    for line in body.decode().splitlines():
        if line and not line.startswith("#"):
            k, v = line.rsplit(" ", 1)
            vals[k] = float(v)
    return vals


def assert_error(status, body, want_status, param=None):
    assert status == want_status, (status, body)
    err = json.loads(body)["error"]
    assert set(err) >= {"message", "type", "param", "code"}, err
    assert err["message"]
    if param is not None:
        assert err["param"] == param, err


# ---------------------------------------------------------------------------------------------

def test_health_models_metrics():
    st, _, body = http("GET", D.base + "/health")
    assert st == 200 and json.loads(body)["status"] == "ok"
    models = D.client().models.list()
    assert [m.id for m in models.data] == [MODEL_NAME]
    st, _, body = http("GET", D.base + "/v1/models/" + MODEL_NAME)
    assert st == 200 and json.loads(body)["id"] == MODEL_NAME
    assert_error(*http("GET", D.base + "/v1/models/nope")[::2], 404)
    m = metrics(D)
    for name in ("mkad_kv_blocks_total", "mkad_sequences_running", "mkad_sequences_waiting",
                 "mkad_time_to_first_token_seconds_count", "mkad_inter_token_latency_seconds_count",
                 "mkad_batch_tokens_count", "mkad_kv_blocks_used", "mkad_prompt_tokens_total",
                 "mkad_generation_tokens_total", "mkad_cached_tokens_total"):
        assert name in m, name
    assert m["mkad_kv_blocks_total"] > 0


def completion(c, seed, max_tokens=16, prompt=PROMPT, temperature=1.0, **kw):
    return c.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=max_tokens,
                                temperature=temperature, seed=seed, **kw)


IDS = {"ignore_eos": True, "return_token_ids": True}


def test_completions_nonstream():
    r = completion(D.client(), seed=1, max_tokens=8, extra_body=IDS)
    assert r.object == "text_completion" and r.id.startswith("cmpl-") and r.model == MODEL_NAME
    ch = r.choices[0]
    ids = ch.model_extra["token_ids"]
    assert len(ids) == 8 and ch.finish_reason == "length"
    assert isinstance(ch.text, str)
    assert r.usage.prompt_tokens == len(PROMPT) and r.usage.completion_tokens == 8
    assert r.usage.total_tokens == len(PROMPT) + 8
    assert r.usage.prompt_tokens_details.cached_tokens == 0
    # same seed, same tokens and text
    r2 = completion(D.client(), seed=1, max_tokens=8, extra_body=IDS)
    assert r2.choices[0].text == ch.text and r2.choices[0].model_extra["token_ids"] == ids
    # a text prompt goes through the model's tokenizer.json
    r3 = D.client().completions.create(model=MODEL_NAME, prompt="Once upon a time", max_tokens=5,
                                       seed=2, extra_body={"ignore_eos": True})
    assert r3.usage.prompt_tokens >= 3 and r3.usage.completion_tokens == 5
    assert "token_ids" not in (r3.choices[0].model_extra or {})


def test_completions_stream_include_usage():
    c = D.client()
    full = completion(c, seed=5, max_tokens=12, extra_body={"ignore_eos": True})
    chunks = list(completion(c, seed=5, max_tokens=12, stream=True,
                             stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert text == full.choices[0].text, (text, full.choices[0].text)
    fins = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert fins == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert all(ch.usage is None for ch in chunks[:-1])
    # without include_usage: no usage chunk
    chunks = list(completion(c, seed=5, max_tokens=3, stream=True))
    assert all(ch.choices for ch in chunks)


def test_chat_stream_and_not():
    c = D.client()
    msgs = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hello, "}, {"type": "text", "text": "wörld"}]}]
    for eb in ({"ignore_eos": True}, {"prompt_token_ids": PROMPT, "ignore_eos": True}):
        r = c.chat.completions.create(model=MODEL_NAME, messages=msgs, max_tokens=10, seed=3,
                                      extra_body=eb)
        assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
        msg = r.choices[0].message
        assert msg.role == "assistant" and isinstance(msg.content, str)
        assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 10
        stream = c.chat.completions.create(model=MODEL_NAME, messages=msgs, max_completion_tokens=10,
                                           seed=3, stream=True, stream_options={"include_usage": True},
                                           extra_body=eb)
        chunks = list(stream)
        assert chunks[0].object == "chat.completion.chunk"
        assert chunks[0].choices[0].delta.role == "assistant"
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        assert text == msg.content
        assert chunks[-1].usage.completion_tokens == 10
        assert chunks[-1].usage.prompt_tokens == r.usage.prompt_tokens
    assert r.usage.prompt_tokens == len(PROMPT)


def test_chat_template_fields():
    """tools, tool_calls and chat_template_kwargs reach the model's Jinja template."""
    c = D.client()
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
    msgs = [{"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "20 C"}]
    r = c.chat.completions.create(model=MODEL_NAME, messages=msgs, tools=tools, tool_choice="auto", max_tokens=4,
                                  seed=1, extra_body={"chat_template_kwargs": {"enable_thinking": False},
                                                      "ignore_eos": True})
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 4
    # OpenAI's null content of a tool-call turn reads as empty text (as in vLLM), so a template
    # that reads every message's content (Qwen2's, the bundled model's) renders it
    msgs[1]["content"] = None
    r2 = c.chat.completions.create(model=MODEL_NAME, messages=msgs, max_tokens=1, extra_body={"ignore_eos": True})
    assert r2.usage.prompt_tokens == r.usage.prompt_tokens, (r.usage, r2.usage)
    for bad, param in (({"tool_choice": "required"}, "tool_choice"),
                       ({"extra_body": {"chat_template_kwargs": [1]}}, "chat_template_kwargs")):
        try:
            c.chat.completions.create(model=MODEL_NAME, messages=msgs, tools=tools, max_tokens=2, **bad)
            raise AssertionError("accepted %r" % bad)
        except openai.BadRequestError as e:
            assert e.body["param"] == param, e.body


def test_chat_template_override_and_errors():
    """--chat-template replaces the model's template; a template's raise_exception is a 400
    with its message; a directory template that does not parse leaves completions working and
    answers chat with a 400 naming the file and line."""
    tmp = tempfile.mkdtemp(prefix="mkad-tpl-")
    tpl = os.path.join(tmp, "t.jinja")
    with open(tpl, "w") as f:
        f.write("{% if messages[0].role != 'system' %}{{ raise_exception('the first message must be system') }}{% endif %}"
                "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                "{% if greeting is defined %}{{ greeting }}{% endif %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}\n")
    d = Daemon("--chat-template", tpl)
    try:
        c = d.client()
        try:
            c.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
            raise AssertionError("the template's raise_exception was ignored")
        except openai.BadRequestError as e:
            assert "the first message must be system" in e.body["message"], e.body
            assert e.body["code"] == "chat_template_error" and e.body["param"] == "messages", e.body
        sys_hi = [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}]
        a = c.chat.completions.create(model=MODEL_NAME, messages=sys_hi, max_tokens=1, extra_body={"ignore_eos": True})
        b = c.chat.completions.create(model=MODEL_NAME, messages=sys_hi, max_tokens=1,
                                      extra_body={"ignore_eos": True, "chat_template_kwargs": {"greeting": "Hello there"}})
        assert b.usage.prompt_tokens > a.usage.prompt_tokens, (a.usage, b.usage)
    finally:
        assert d.stop() == 0
    # an override that cannot be read or parsed stops the daemon at start, naming it
    for arg, what in ((os.path.join(tmp, "missing.jinja"), "missing.jinja"), ("{% if x %}", "line 1")):
        r = subprocess.run([ARGS.mkad, "--model", ARGS.model, "--port", "0", "--chat-template", arg],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode != 0 and what in r.stderr, (r.returncode, r.stderr[-2000:])
    # the model directory's own template does not parse
    model = os.path.join(tmp, MODEL_NAME)
    os.mkdir(model)
    for f in ("config.json", "model.safetensors", "tokenizer.json"):
        os.symlink(os.path.join(os.path.abspath(ARGS.model), f), os.path.join(model, f))
    with open(os.path.join(model, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": "<|im_end|>", "model_max_length": 1000000000000000019884624838656,
                   "chat_template": "{% for m in messages %}\n{{ m.content | no_such_filter }}\n{% endfor %}"}, f)
    d = Daemon("--model", model)
    try:
        c = d.client()
        r = c.completions.create(model=MODEL_NAME, prompt="Once", max_tokens=2, extra_body={"ignore_eos": True})
        assert r.usage.completion_tokens == 2
        try:
            c.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
            raise AssertionError("chat with a broken template")
        except openai.BadRequestError as e:
            msg = e.body["message"]
            assert e.body["code"] == "chat_template_unavailable", e.body
            assert "tokenizer_config.json" in msg and "line 2" in msg and "no_such_filter" in msg, msg
        with d.cv:
            assert any("event=chat_template_unusable" in l for l in d.lines), d.lines
    finally:
        assert d.stop() == 0


def test_no_tokenizer():
    """A model directory without tokenizer.json: token ids only, text is a clear 400."""
    tmp = tempfile.mkdtemp(prefix="mkad-notok-")
    model = os.path.join(tmp, MODEL_NAME)
    os.mkdir(model)
    for f in ("config.json", "model.safetensors"):
        os.symlink(os.path.join(os.path.abspath(ARGS.model), f), os.path.join(model, f))
    d = Daemon("--model", model)
    try:
        c = d.client()
        for call in (lambda: c.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "hi"}]),
                     lambda: c.completions.create(model=MODEL_NAME, prompt="hello")):
            try:
                call()
                raise AssertionError("accepted a text prompt without tokenizer")
            except openai.BadRequestError as e:
                assert "tokenizer.json" in str(e) and e.body["code"] == "no_tokenizer", e
        r = completion(c, seed=1, max_tokens=4, extra_body={"ignore_eos": True})
        ids = r.choices[0].model_extra["token_ids"]
        assert r.choices[0].text == " ".join(map(str, ids))  # ids as text, space-separated
        # a stop string that begins after the first token: the text before it is returned
        stop = " " + str(ids[1])
        for stream in (False, True):
            r = completion(c, seed=1, max_tokens=4, stop=stop, stream=stream,
                           extra_body={"ignore_eos": True})
            chunks = list(r) if stream else [r]
            text = "".join(ch.choices[0].text for ch in chunks)
            assert text == str(ids[0]) and chunks[-1].choices[0].finish_reason == "stop", chunks
        r = c.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "hi"}],
                                      max_tokens=3, extra_body={"prompt_token_ids": PROMPT, "ignore_eos": True})
        assert len(r.choices[0].message.content.split()) == 3
    finally:
        assert d.stop() == 0


def test_big_text_prompts_tokenized_off_loop():
    """Bodies over 16 KiB are tokenized on the thread pool; same results."""
    c = D.client()
    big = " Elizabeth" * 2001          # 20 KB, 2001 tokens with the bundled tokenizer
    r = c.completions.create(model=MODEL_NAME, prompt=big, max_tokens=3, seed=1,
                             extra_body={"ignore_eos": True})
    assert r.usage.prompt_tokens == 2001 and r.usage.completion_tokens == 3
    small = c.completions.create(model=MODEL_NAME, prompt=" Elizabeth" * 5, max_tokens=1, seed=1)
    assert small.usage.prompt_tokens == 5
    r2 = c.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": big}],
                                   max_tokens=2, seed=1, stream=True,
                                   stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    chunks = list(r2)
    assert chunks[-1].usage.prompt_tokens > 2001 and chunks[-1].usage.completion_tokens == 2
    try:
        c.completions.create(model=MODEL_NAME, prompt=" the" * 5000, max_tokens=3)
        raise AssertionError("accepted an over-long prompt")
    except openai.BadRequestError as e:
        assert e.body["code"] == "context_length_exceeded", e


def test_stop_strings():
    c = D.client()
    prompt = "The quick brown fox jumps over the lazy dog"
    kw = dict(model=MODEL_NAME, prompt=prompt, max_tokens=20, seed=11, temperature=1.0,
              extra_body={"ignore_eos": True})
    base = c.completions.create(**kw).choices[0].text
    assert len(base) >= 8, base
    stop = base[len(base) // 2: len(base) // 2 + 3]
    cut = base.index(stop)              # the earliest occurrence ends the text
    r = c.completions.create(stop=[stop, "\x01never"], **kw)
    assert r.choices[0].text == base[:cut] and r.choices[0].finish_reason == "stop", (r, base, stop)
    chunks = list(c.completions.create(stop=stop, stream=True, **kw))
    assert "".join(ch.choices[0].text for ch in chunks) == base[:cut]
    assert chunks[-1].choices[0].finish_reason == "stop"
    # Chat: a stop hit by the very first text still streams the assistant role.
    ck = dict(model=MODEL_NAME, messages=[{"role": "user", "content": prompt}], max_tokens=8,
              seed=11, temperature=1.0)
    first = c.chat.completions.create(**ck).choices[0].message.content
    assert first, first
    chunks = list(c.chat.completions.create(stop=[first[:1]], stream=True, **ck))
    assert chunks[0].choices[0].delta.role == "assistant", chunks
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == ""


def test_logprobs():
    r = completion(D.client(), seed=2, max_tokens=4, logprobs=3, extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == 4 and len(lp.token_logprobs) == 4 and len(lp.top_logprobs) == 4
    assert all(v <= 0 for v in lp.token_logprobs)
    assert all(len(t) == 3 for t in lp.top_logprobs)
    r = D.client().chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "x"}],
                                           max_tokens=3, logprobs=True, top_logprobs=2, seed=2,
                                           extra_body={"prompt_token_ids": PROMPT, "ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == 3 and all(len(t.top_logprobs) == 2 for t in content)


def test_concurrent_streams_independent():
    """64 concurrent streaming clients; each text equals its solo run (same seed)."""
    n = 64
    c = D.client()
    solo = {}
    for i in range(n):
        ch = completion(c, seed=1000 + i, max_tokens=24, prompt=PROMPT + [i + 100],
                        temperature=1.5, extra_body=IDS).choices[0]
        solo[i] = (ch.text, ch.model_extra["token_ids"])
    barrier = threading.Barrier(n)

    def run(i):
        cl = D.client()
        barrier.wait(30)
        s = completion(cl, seed=1000 + i, max_tokens=24, prompt=PROMPT + [i + 100], stream=True,
                       temperature=1.5, extra_body=IDS)
        chunks = [ch for ch in s if ch.choices]
        return i, ("".join(ch.choices[0].text for ch in chunks),
                   [t for ch in chunks for t in ch.choices[0].model_extra["token_ids"]])

    before = metrics(D)
    with cf.ThreadPoolExecutor(n) as ex:
        results = list(ex.map(run, range(n)))
    for i, text in results:
        assert text == solo[i], (i, text, solo[i])
    after = metrics(D)
    # the engine really batched: some step carried more than one sequence
    big = after['mkad_batch_sequences_bucket{le="1"}'] - before['mkad_batch_sequences_bucket{le="1"}']
    total = after["mkad_batch_sequences_count"] - before["mkad_batch_sequences_count"]
    assert total > big, (total, big)


def wait_metric(pred, timeout=10):
    deadline = time.time() + timeout
    while time.time() < deadline:
        m = metrics(D)
        if pred(m):
            return m
        time.sleep(0.05)
    raise AssertionError("metric condition not reached: %s" % m)


def test_preemption_keeps_outputs():
    """A K/V pool too small for all streams: some are preempted and resumed,
    and every stream still equals its solo run."""
    d = Daemon("--kv-mem-mb", "2")   # about 30 blocks of 32 tokens (f32 K/V; ~60 with bf16)
    try:
        c = d.client()
        # Each stream ends holding 7 blocks; run enough of them that the pool
        # (whose block count depends on the backend's K/V dtype) cannot hold all.
        mt = 200
        n = min(16, int(metrics(d)["mkad_kv_blocks_total"]) // 7 + 2)
        solo = [completion(c, seed=50 + i, max_tokens=mt, prompt=PROMPT + [i], temperature=1.5,
                           extra_body=IDS).choices[0].model_extra["token_ids"] for i in range(n)]
        assert metrics(d)["mkad_preemptions_total"] == 0

        def run(i):
            s = completion(d.client(), seed=50 + i, max_tokens=mt, prompt=PROMPT + [i],
                           temperature=1.5, stream=True, extra_body=IDS)
            return [t for ch in s if ch.choices for t in ch.choices[0].model_extra["token_ids"]]

        with cf.ThreadPoolExecutor(n) as ex:
            both = list(ex.map(run, range(n)))
        assert both == solo
        m = metrics(d)
        assert m["mkad_preemptions_total"] >= 1, m["mkad_preemptions_total"]
        assert m["mkad_kv_blocks_used"] == 0
    finally:
        assert d.stop() == 0


def test_disconnect_frees_sequence():
    wait_metric(lambda m: m["mkad_sequences_running"] == 0)
    base = metrics(D)
    blocks0 = base["mkad_kv_blocks_used"]
    cancelled0 = base.get('mkad_requests_cancelled_total{reason="client"}', 0)
    body = json.dumps({"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 3000, "stream": True,
                       "ignore_eos": True}).encode()
    s = socket.create_connection(("127.0.0.1", D.port))
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n" % len(body) + body)
    got = b""
    while got.count(b"data: ") < 3:
        got += s.recv(4096)
    assert got.startswith(b"HTTP/1.1 200")
    wait_metric(lambda m: m["mkad_sequences_running"] >= 1)
    s.close()
    m = wait_metric(lambda m: m["mkad_sequences_running"] == 0 and
                    m.get('mkad_requests_cancelled_total{reason="client"}', 0) >= cancelled0 + 1)
    assert m["mkad_kv_blocks_used"] == blocks0, (m["mkad_kv_blocks_used"], blocks0)
    # the generated count stayed far below 3000
    assert m["mkad_generation_tokens_total"] - base["mkad_generation_tokens_total"] < 2900


def test_disconnect_nonstream():
    wait_metric(lambda m: m["mkad_sequences_running"] == 0)
    body = json.dumps({"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 3000,
                       "ignore_eos": True}).encode()
    s = socket.create_connection(("127.0.0.1", D.port))
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n" % len(body) + body)
    wait_metric(lambda m: m["mkad_sequences_running"] >= 1)
    s.close()
    wait_metric(lambda m: m["mkad_sequences_running"] == 0)


def test_sessions_reuse_prefix():
    c = D.client()
    p1 = list(range(1, 101))
    eb = IDS
    r1 = completion(c, seed=7, max_tokens=10, prompt=p1, extra_body=dict(eb, session_id="bb-s1"))
    assert r1.usage.prompt_tokens_details.cached_tokens == 0
    p2 = p1 + r1.choices[0].model_extra["token_ids"] + [5, 6, 7, 8]
    r2 = completion(c, seed=9, max_tokens=10, prompt=p2, extra_body=dict(eb, session_id="bb-s1"))
    cached = r2.usage.prompt_tokens_details.cached_tokens
    assert cached == 100 + 10 - 1, cached  # everything the session held
    # same result as without a session (the engine is exact)
    r3 = completion(c, seed=9, max_tokens=10, prompt=p2, extra_body=eb)
    assert r3.choices[0].text == r2.choices[0].text
    assert r3.usage.prompt_tokens_details.cached_tokens == 0
    # a diverging prompt keeps only the block-aligned common prefix
    p4 = p1[:50] + [9, 9, 9]
    st, _, body = http("POST", D.base + "/v1/completions",
                       {"model": MODEL_NAME, "prompt": p4, "max_tokens": 2},
                       {"X-Session-Id": "bb-s1"})
    assert st == 200, body
    assert json.loads(body)["usage"]["prompt_tokens_details"]["cached_tokens"] == 32
    m = metrics(D)
    assert m["mkad_sessions_resident"] >= 1 and m["mkad_cached_tokens_total"] >= cached + 32


def test_session_concurrent_requests_serialize():
    """Two requests of one session at once: both complete (the second waits)."""
    c = D.client()
    eb = {"ignore_eos": True, "session_id": "bb-par"}
    with cf.ThreadPoolExecutor(2) as ex:
        futs = [ex.submit(completion, c, 20 + i, 30, PROMPT + [i], extra_body=eb) for i in range(2)]
        rs = [f.result() for f in futs]
    assert all(r.usage.completion_tokens == 30 for r in rs)


def test_long_prompt_does_not_starve_decoders():
    """A stream keeps getting tokens while a 1200-token prompt is prefilled."""
    c = D.client()
    sobj = completion(c, seed=1, max_tokens=3000, stream=True, extra_body={"ignore_eos": True})
    stream = iter(sobj)
    next(stream)
    arrivals = []
    stop = threading.Event()

    def reader():
        for _ in stream:
            arrivals.append(time.time())
            if stop.is_set():
                break
        sobj.close()

    th = threading.Thread(target=reader, daemon=True)
    th.start()
    time.sleep(0.1)
    t0 = time.time()
    long_prompt = [(i * 7) % 4000 + 3 for i in range(1200)]
    first = None
    for ch in completion(c, seed=2, max_tokens=2, prompt=long_prompt, stream=True):
        first = first or time.time()
    stop.set()
    during = [t for t in arrivals if t0 <= t <= first]
    # prefill takes several steps of prefill_chunk tokens; the stream decodes in each
    assert len(during) >= 3, (len(during), first - t0)
    th.join(10)


def test_request_timeout():
    d = Daemon("--request-timeout", "1")
    try:
        t0 = time.time()
        try:
            for _ in completion(d.client(), seed=1, max_tokens=4000, stream=True,
                                extra_body={"ignore_eos": True}):
                pass
            raise AssertionError("no timeout")
        except openai.APIError as e:
            assert "request_timeout" in str(e), e
        assert time.time() - t0 < 4
        st, _, body = http("POST", d.base + "/v1/completions",
                           {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 4000, "ignore_eos": True})
        assert_error(st, body, 503)
        assert json.loads(body)["error"]["code"] == "timeout"
        m = metrics(d)
        assert m['mkad_requests_cancelled_total{reason="timeout"}'] == 2
        assert m["mkad_sequences_running"] == 0
    finally:
        assert d.stop() == 0


def test_malformed_corpus():
    url = D.base + "/v1/completions"
    ok = {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 2}
    J = ["-H", "Content-Type: application/json"]
    cases = [
        (400, ["-d", "{not json", *J]),
        (400, ["-d", "[1,2,3]", *J]),
        (400, ["-d", "", *J]),
        (400, ["-d", json.dumps(dict(ok, max_tokens=-5)), *J]),
        (400, ["-d", json.dumps(dict(ok, max_tokens="12")), *J]),
        (400, ["-d", '{"model":"mkad-tiny","prompt":[1],"max_tokens":1e400}', *J]),
        (400, ["-d", '{"model":"mkad-tiny","prompt":[1],"max_tokens":123456789012345678901234567890}', *J]),
        (400, ["-d", json.dumps(dict(ok, temperature=[1])), *J]),
        (400, ["-d", json.dumps(dict(ok, temperature=1e308)), *J]),
        (400, ["-d", json.dumps(dict(ok, prompt=[1, 99999999])), *J]),
        (400, ["-d", json.dumps(dict(ok, prompt=[[1], [2]])), *J]),
        (400, ["-d", json.dumps(dict(ok, n=3)), *J]),
        (400, ["-d", json.dumps(dict(ok, stop={"a": 1})), *J]),
        (400, ["-d", json.dumps(dict(ok, max_tokens=5000)), *J]),
        (400, [b'{"model":"mkad-tiny","prompt":[1],"user":"\xc3\x28"}', *J]),
        (400, [b'{"model":"mkad-tiny","prompt":[1\x00,2]}', *J]),
        (400, [b"\x00\x01\x02\xff", *J]),
        (400, ["-d", "[" * 100000, *J]),
        (404, ["-d", json.dumps(dict(ok, model="gpt-4")), *J]),
        (415, ["-d", json.dumps(ok), "-H", "Content-Type: text/plain"]),
        (405, ["-X", "GET"]),
        (405, ["-X", "DELETE"]),
    ]
    for want, args in cases:
        if isinstance(args[0], bytes):  # raw bytes go through a file
            with tempfile.NamedTemporaryFile() as f:
                f.write(args[0])
                f.flush()
                st, body = curl(url, "--data-binary", "@" + f.name, *args[1:])
        else:
            st, body = curl(url, *args)
        assert_error(st, body, want)
    st, body = curl(D.base + "/nope")
    assert_error(st, body, 404)
    st, body = curl("-X", "POST", D.base + "/health", "-d", "{}", *J)
    assert_error(st, body, 405)
    # 10 MB body: 413 whether announced by Content-Length or sent chunked
    big = b'{"model":"mkad-tiny","prompt":[1],"user":"' + b"a" * (10 << 20) + b'"}'
    with tempfile.NamedTemporaryFile() as f:
        f.write(big)
        f.flush()
        st, body = curl(url, "--data-binary", "@" + f.name, *J)
        assert_error(st, body, 413)
        st, body = curl(url, "--data-binary", "@" + f.name, *J, "-H", "Transfer-Encoding: chunked")
        assert_error(st, body, 413)
    # invalid UTF-8 in the body (raw bytes)
    st, _, body = http("POST", url, b'{"model":"mkad-tiny","prompt":[1],"user":"\xff\xfe"}')
    assert_error(st, body, 400)
    # a mid-body disconnect and a garbage request line
    s = socket.create_connection(("127.0.0.1", D.port))
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: 500\r\n\r\n{\"model\":")
    s.close()
    s = socket.create_connection(("127.0.0.1", D.port))
    s.sendall(b"\x16\x03\x01garbage\r\n\r\n")
    s.recv(4096)
    s.close()
    assert http("GET", D.base + "/health")[0] == 200
    assert completion(D.client(), seed=1, max_tokens=2).usage.completion_tokens >= 1


def test_fuzz_fields_and_bytes():
    """Random field values and byte flips: every answer is 200 or a 4xx error
    object, never a 5xx, never a hang; the daemon stays healthy."""
    import random
    rnd = random.Random(1234)
    pool = [None, True, False, 0, -1, 1, 3, 2.5, 1e308, -1e308, 2 ** 63, -(2 ** 63), "", "x",
            "\u0000", "\ud7ff\ue000", [], {}, [1], [[1, 2]], ["a", 1], {"a": 1}, "a" * 300,
            {"include_usage": True}, {"type": "text"}, [{"role": "user", "content": "hi"}],
            [{"role": "user", "content": None}], [{"role": "assistant", "content": None}]]
    fields = ["model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature",
              "top_p", "top_k", "seed", "stop", "n", "stream", "stream_options", "logprobs",
              "top_logprobs", "session_id", "ignore_eos", "response_format", "prompt_token_ids",
              "echo", "logit_bias", "user", "min_p", "repetition_penalty"]
    statuses = {}
    for i in range(300):
        chat = i % 2 == 1
        body = {"model": MODEL_NAME, "max_tokens": 3}
        if chat:
            body["messages"] = [{"role": "user", "content": "hello"}]
        else:
            body["prompt"] = PROMPT
        for _ in range(rnd.randint(1, 3)):
            body[rnd.choice(fields)] = rnd.choice(pool)
        raw = json.dumps(body).encode()
        if i % 5 == 0:  # byte-level damage
            b = bytearray(raw)
            for _ in range(rnd.randint(1, 4)):
                b[rnd.randrange(len(b))] = rnd.randrange(256)
            raw = bytes(b)
        path = "/v1/chat/completions" if chat else "/v1/completions"
        st, _, resp = http("POST", D.base + path, raw, timeout=20)
        statuses[st] = statuses.get(st, 0) + 1
        assert st == 200 or 400 <= st < 500, (st, raw, resp)
        if st != 200:
            assert_error(st, resp, st)
        elif body.get("stream") is True:
            assert resp.rstrip().endswith(b"data: [DONE]"), resp[-200:]
        else:
            assert json.loads(resp)["usage"]["completion_tokens"] >= 1
    print("  fuzz statuses:", dict(sorted(statuses.items())))
    assert statuses.get(200, 0) > 10 and statuses.get(400, 0) > 100, statuses
    assert http("GET", D.base + "/health")[0] == 200
    wait_metric(lambda m: m["mkad_sequences_running"] == 0)


def test_slowloris():
    """Partial bodies do not block others and are closed after http_timeout."""
    socks = []
    for _ in range(20):
        s = socket.create_connection(("127.0.0.1", D.port))
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 1000\r\n\r\n{\"model\": \"mkad-")
        socks.append(s)
    t0 = time.time()
    r = completion(D.client(), seed=1, max_tokens=4)
    assert r.usage.completion_tokens >= 1 and time.time() - t0 < 5
    s = socks[0]
    s.settimeout(10)
    data = s.recv(4096)  # closed by the server (idle timeout 2 s)
    assert time.time() - t0 < 9, "slow connection was not timed out"
    assert data == b"" or data.startswith(b"HTTP/1.1"), data
    for s in socks:
        s.close()
    assert http("GET", D.base + "/health")[0] == 200


def test_auth():
    d = Daemon("--api-keys", "k1,k2")
    try:
        url = d.base + "/v1/completions"
        body = {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 2}
        assert_error(*http("POST", url, body)[::2], 401)
        assert_error(*http("POST", url, body, {"Authorization": "Bearer nope"})[::2], 401)
        assert_error(*http("GET", d.base + "/v1/models")[::2], 401)
        assert http("GET", d.base + "/health")[0] == 200
        try:
            completion(d.client(key="bad"), seed=1, max_tokens=2)
            raise AssertionError("bad key accepted")
        except openai.AuthenticationError:
            pass
        r = completion(d.client(key="k2"), seed=1, max_tokens=2)
        assert r.usage.completion_tokens >= 1
    finally:
        assert d.stop() == 0


def test_sighup_reloads_keys():
    with tempfile.NamedTemporaryFile("w", suffix=".keys") as f:
        f.write("# keys\nold-key\n")
        f.flush()
        d = Daemon("--api-keys-file", f.name)
        try:
            body = {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 1}
            url = d.base + "/v1/completions"
            assert http("POST", url, body, {"Authorization": "Bearer old-key"})[0] == 200
            with open(f.name, "w") as g:
                g.write("new-key\n")
            d.proc.send_signal(signal.SIGHUP)
            deadline = time.time() + 5
            while http("POST", url, body, {"Authorization": "Bearer new-key"})[0] != 200:
                assert time.time() < deadline, "SIGHUP did not reload the keys file"
                time.sleep(0.05)
            assert http("POST", url, body, {"Authorization": "Bearer old-key"})[0] == 401
        finally:
            assert d.stop() == 0


def test_keys_file_comments_and_empty_file():
    # '#' starts a comment anywhere; a long comment line stays a comment;
    # several keys on one line are fine; a file with no key refuses to start
    # instead of turning authentication off.
    with tempfile.NamedTemporaryFile("w", suffix=".keys") as f:
        f.write("# " + "password123 " * 200 + "\n")
        f.write("ka kb kc kd ke  # old:hunter2\n")
        f.flush()
        d = Daemon("--api-keys-file", f.name)
        try:
            url = d.base + "/v1/models"
            for k in ("ka", "kc", "ke"):
                assert http("GET", url, None, {"Authorization": "Bearer " + k})[0] == 200, k
            for k in ("password123", "old:hunter2", "#", "hunter2"):
                assert http("GET", url, None, {"Authorization": "Bearer " + k})[0] == 401, k
        finally:
            assert d.stop() == 0
    with tempfile.NamedTemporaryFile("w", suffix=".keys") as f:
        f.write("# nothing but comments\n\n")
        f.flush()
        p = subprocess.run([ARGS.mkad, "--model", ARGS.model, "--port", "0", "--api-keys-file", f.name],
                           stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=20)
        assert p.returncode != 0 and "holds no key" in p.stderr, p.stderr[-500:]


def test_body_on_get_is_answered():
    # A body on a GET (and on an unknown route) still gets its response, and
    # a request pipelined after it on the same connection too.
    s = socket.create_connection(("127.0.0.1", D.port), timeout=10)
    try:
        s.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
                  b"GET /nope HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi"
                  b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    finally:
        s.close()
    statuses = re.findall(rb"HTTP/1.1 (\d{3})", data)
    assert statuses == [b"200", b"404", b"200"], data[:600]


def test_small_kv_pool_long_prompts_complete():
    # Two prompts that each fit the K/V pool but not together: the scheduler
    # must preempt rather than spin (a livelock once left both hanging).
    d = Daemon("--kv-mem-mb", "1", "--block-size", "32", "--prefill-chunk", "64",
               "--request-timeout", "30", "--log-requests=false")
    try:
        res = {}

        def go(i):
            body = {"model": MODEL_NAME, "prompt": [(7 * k + i) % 4000 + 10 for k in range(320)],
                    "max_tokens": 10, "temperature": 0}
            t0 = time.time()
            st, _, b = http("POST", d.base + "/v1/completions", body, timeout=40)
            res[i] = (st, time.time() - t0, b[:200])

        ths = [threading.Thread(target=go, args=(i,)) for i in range(2)]
        [t.start() for t in ths]
        [t.join() for t in ths]
        for i in range(2):
            assert res[i][0] == 200 and res[i][1] < 20, res[i]
    finally:
        assert d.stop() == 0


def test_sigterm_while_big_prompt_is_tokenized():
    # SIGTERM right after a 4 MB text prompt arrives: the body is tokenized on
    # the thread pool; shutdown must wait for that work (it once freed the
    # tokenizer under it). The client gets an answer, the daemon exits 0.
    d = Daemon("--max-body-kb", "8192", "--log-requests=false")
    out = {}

    def go():
        body = {"model": MODEL_NAME, "prompt": "It is a truth universally acknowledged. " * 100000,
                "max_tokens": 1}
        try:
            out["r"] = http("POST", d.base + "/v1/completions", body, timeout=60)
        except Exception as e:  # noqa: BLE001 - a reset is an acceptable answer
            out["r"] = (None, None, repr(e).encode())

    t = threading.Thread(target=go)
    t.start()
    time.sleep(0.05)
    rc = d.stop()
    t.join()
    assert rc == 0, "\n".join(d.lines[-20:])
    # 400: tokenized before the signal (the prompt is far over the context).
    assert out["r"][0] in (400, 503, None), out["r"]


def test_queue_full_and_sigterm():
    d = Daemon("--max-seqs", "1", "--max-queue", "0", "--shutdown-timeout", "20")
    try:
        c = d.client()
        stream = completion(c, seed=1, max_tokens=400, stream=True, extra_body={"ignore_eos": True})
        it = iter(stream)
        first = next(it)
        assert first.choices[0].text
        st, hdr, body = http("POST", d.base + "/v1/completions",
                             {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 2})
        assert_error(st, body, 429)
        assert int(hdr.get("Retry-After", "0")) >= 1
        # SIGTERM: the running stream finishes, new connections are refused, exit 0
        d.proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        assert http("GET", d.base + "/health", timeout=2)[0] in (0, 503)
        rest = list(it)
        assert rest[-1].choices[0].finish_reason == "length"
        n = 1 + sum(1 for ch in rest if ch.choices and ch.choices[0].text)
        assert n == 400, n
        assert d.proc.wait(20) == 0
        assert any("event=shutdown" in l for l in d.lines)
    finally:
        d.stop()


def test_sigterm_deadline():
    d = Daemon("--shutdown-timeout", "1")
    stream = completion(d.client(), seed=1, max_tokens=4000, stream=True,
                        extra_body={"ignore_eos": True})
    it = iter(stream)
    next(it)
    t0 = time.time()
    d.proc.send_signal(signal.SIGTERM)
    try:
        for _ in it:
            pass
        raise AssertionError("stream ended without an error event")
    except openai.APIError as e:
        assert "shutting down" in str(e), e
    assert d.proc.wait(10) == 0 and time.time() - t0 < 5


def test_systemd_notify():
    """READY=1 once loaded, STATUS= lines, WATCHDOG=1 pings, STOPPING=1 on SIGTERM."""
    path = os.path.join(tempfile.mkdtemp(prefix="mkad-notify-"), "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000"}
    os.environ.pop("WATCHDOG_PID", None)
    d = Daemon(env=env)
    msgs = []
    try:
        deadline = time.time() + 5
        while time.time() < deadline and sum("WATCHDOG=1" in m for m in msgs) < 2:
            msgs.append(sock.recv(4096).decode())
        d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(10) == 0
        sock.settimeout(0.5)
        try:
            while True:
                msgs.append(sock.recv(4096).decode())
        except socket.timeout:
            pass
    finally:
        d.stop()
        sock.close()
    text = "\n".join(msgs)
    assert "READY=1" in text and "STATUS=serving mkad-tiny" in text, text
    assert "STATUS=loading model" in text and "STOPPING=1" in text, text
    assert text.count("WATCHDOG=1") >= 2, text


def test_loading_state():
    """While the model loads: /health 503 "loading", generation 503 with
    Retry-After, progress lines; a load failure exits 1.  config.json is a
    FIFO, so the loader blocks in open() until the test writes to it."""
    tmp = tempfile.mkdtemp(prefix="mkad-fifo-")
    os.mkfifo(os.path.join(tmp, "config.json"))
    d = Daemon("--model", tmp, wait_ready=False)
    try:
        st, hdr, body = http("GET", d.base + "/health")
        assert st == 503 and json.loads(body)["status"] == "loading" and hdr.get("Retry-After") == "5"
        st, hdr, body = http("POST", d.base + "/v1/completions",
                             {"model": os.path.basename(tmp), "prompt": [1], "max_tokens": 1})
        assert_error(st, body, 503)
        assert json.loads(body)["error"]["code"] == "model_loading" and hdr.get("Retry-After")
        m = metrics(d)
        assert m["mkad_ready"] == 0
        time.sleep(1.3)
        with d.cv:
            assert any("event=model_loading" in l and "elapsed_s=" in l for l in d.lines), d.lines
        fd = os.open(os.path.join(tmp, "config.json"), os.O_WRONLY)
        os.close(fd)  # the loader now sees a FIFO, not a file: load fails
        assert d.proc.wait(10) == 1
        assert any("event=model_load_failed" in l for l in d.lines)
    finally:
        d.stop()


def test_config_and_flags():
    r = subprocess.run([ARGS.mkad, "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--max-batch-tokens" in r.stdout and "[scheduler]" in r.stdout
    r = subprocess.run([ARGS.mkad, "--model", ARGS.model, "--port", "70000"], capture_output=True, text=True)
    assert r.returncode == 2 and "port" in r.stderr and "70000" in r.stderr, r.stderr
    r = subprocess.run([ARGS.mkad, "--model", ARGS.model, "--bogus", "1"], capture_output=True, text=True)
    assert r.returncode == 2 and "--bogus" in r.stderr
    r = subprocess.run([ARGS.mkad, "--port", "1"], capture_output=True, text=True)
    assert r.returncode == 2 and "model" in r.stderr
    with tempfile.NamedTemporaryFile("w", suffix=".conf") as f:
        f.write("[model]\nmodel = %s\n\n[http]\nport = 9\nmax_seqs = 3\n" % ARGS.model)
        f.flush()
        r = subprocess.run([ARGS.mkad, "--config", f.name], capture_output=True, text=True)
        assert r.returncode == 2 and ":6:" in r.stderr and "[engine]" in r.stderr, r.stderr
    conf = os.path.join(SRC, "conf", "mkad.conf")
    r = subprocess.run([ARGS.mkad, "--config", conf, "--port", "1234", "--print-config"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "port = 1234" in r.stdout and "host = 127.0.0.1" in r.stdout
    # a model directory that does not load: the daemon exits non-zero
    d = Daemon(wait_ready=False)
    d.stop()
    bad = subprocess.run([ARGS.mkad, "--model", "/nonexistent", "--port", "0"], capture_output=True,
                         text=True, timeout=20)
    assert bad.returncode == 1 and "model_load_failed" in bad.stderr


def test_still_healthy():
    st, _, body = http("GET", D.base + "/health")
    assert st == 200
    m = metrics(D)
    assert m['mkad_http_requests_total{route="/v1/completions",status="200"}'] > 64
    assert any(k.startswith('mkad_http_requests_total{route="/v1/completions",status="400"') for k in m)
    assert D.proc.poll() is None


def main():
    global ARGS, D
    ap = argparse.ArgumentParser()
    ap.add_argument("--mkad", default=os.path.join(BUILD, "mkad"))
    ap.add_argument("--model", default=os.path.join(SRC, "models", "mkad-tiny"))
    ap.add_argument("-k", default="")
    ARGS = ap.parse_args()
    tests = [(n, f) for n, f in globals().items() if n.startswith("test_") and ARGS.k in n]
    D = Daemon("--http-timeout", "2", "--log-requests=false")
    failed = 0
    t_all = time.time()
    try:
        for name, fn in tests:
            t0 = time.time()
            try:
                fn()
                print(f"PASS {name} ({time.time() - t0:.1f}s)", flush=True)
            except Exception as e:  # noqa: BLE001 - report every failure
                failed += 1
                import traceback
                traceback.print_exc()
                print(f"FAIL {name}: {e!r}"[:2000], flush=True)
                if D.proc.poll() is not None:
                    print("daemon died; last log lines:\n" + "\n".join(D.lines[-30:]))
                    break
    finally:
        rc = D.stop()
        if rc != 0:
            failed += 1
            print(f"FAIL main daemon exit status {rc}")
            print("\n".join(D.lines[-30:]))
    print(f"server black-box: {len(tests) - failed}/{len(tests)} passed in {time.time() - t_all:.1f}s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
