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
import random
import re
import shutil
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

    def __init__(self, *args, wait_ready=True, env=None, state=None):
        self.state = state or tempfile.mkdtemp(prefix="mkad-bb-")
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


def test_error_text_utf8():
    """Error messages that quote the client's bytes stay valid JSON: an
    invalid byte, or a quote clipped at 64 bytes inside a character, used to
    make the error object fail to build ("out of memory")."""
    for path, want in ((b"/v1/models/%ff", "\ufffd"),
                       (b"/v1/models/" + b"a" * 63 + b"%C3%A9", "a" * 63)):
        s = socket.create_connection(("127.0.0.1", D.port), timeout=10)
        s.sendall(b"GET " + path + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        s.close()
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 404"), data[:300]
        err = json.loads(body)["error"]
        assert want in err["message"] and "memory" not in err["message"], err
        assert err["code"] == "model_not_found", err
    st, _, body = http("POST", D.base + "/v1/completions",
                       {"model": "b" * 63 + "\u00e9", "prompt": PROMPT, "max_tokens": 1})
    assert_error(st, body, 404, "model")
    assert "b" * 63 in json.loads(body)["error"]["message"], body


# The CPU backend is bit-exact whatever the batch, chunking or where a
# session's state came from, so outputs can be compared for equality.  On
# CUDA (bf16, cuBLAS algorithms per shape) they agree only within tolerance
# (tests/test_cuda.c), and a sampled token may flip: there the suite checks
# what does not depend on the last bits (lengths, counts, errors).
EXACT = True


def same(a, b, what=None):
    if EXACT:
        assert a == b, what if what is not None else (a, b)
    elif not isinstance(a, str):
        assert len(a) == len(b), what if what is not None else (a, b)


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


def sse_events(resp):
    """The data payloads of an SSE response read with http.client."""
    body = resp.read().decode()
    return [e[len("data: "):] for e in body.split("\n\n") if e.startswith("data: ")]


def test_stream_one_event_per_token_keepalive():
    """Every generated token is one SSE event, also when its text is empty
    (a special token; the lead byte of a character that the next token
    completes or breaks): text is held back, the event still comes.  Several
    streams in turn on one keep-alive connection."""
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", D.port, timeout=30)
    special, lead_byte = 1, 130  # <|im_start|>; the byte 0xC3 ("\u00c3" in tokenizer.json)
    cases = [("/v1/completions", {"prompt": PROMPT, "logit_bias": {str(special): 100}}, 5),
             ("/v1/completions", {"prompt": PROMPT, "logit_bias": {str(lead_byte): 100}}, 4),
             ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                       "logit_bias": {str(special): 100}}, 3),
             ("/v1/completions", {"prompt": PROMPT}, 6)]
    for i, (path, extra, n) in enumerate(cases * 2):
        ids = i >= len(cases)  # the second round carries token_ids
        body = dict(model=MODEL_NAME, max_tokens=n, stream=True, seed=2, ignore_eos=True,
                    return_token_ids=ids, stream_options={"include_usage": True}, **extra)
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200 and not resp.will_close, (resp.status, resp.getheaders())
        events = sse_events(resp)
        assert events[-1] == "[DONE]", events
        chunks = [json.loads(e) for e in events[:-1]]
        assert chunks[-1]["usage"]["completion_tokens"] == n, chunks[-1]
        token_events = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"] is None]
        assert len(token_events) == n, (path, extra, len(token_events), events)
        if "chat" in path:
            assert all("content" in c["choices"][0]["delta"] for c in token_events), chunks
        if ids:
            assert all(len(c["choices"][0]["token_ids"]) == 1 for c in token_events), chunks
            if extra.get("logit_bias") == {str(special): 100}:
                assert all(c["choices"][0]["token_ids"] == [special] for c in token_events)
    conn.close()


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
    # /tokenize takes the same template fields (as vLLM's) and counts what the chat route bills
    body = {"model": MODEL_NAME, "messages": msgs, "tools": tools, "chat_template_kwargs": {"enable_thinking": False}}
    st, _, b = http("POST", D.base + "/tokenize", body)
    t = json.loads(b)
    assert st == 200 and t["count"] == r.usage.prompt_tokens, (t, r.usage)
    cont = [{"role": "user", "content": "Tell a story"}, {"role": "assistant", "content": "Once upon"}]
    st, _, b = http("POST", D.base + "/tokenize", {"messages": cont, "continue_final_message": True})
    assert st == 200, b
    st, _, b = http("POST", D.base + "/detokenize", {"tokens": json.loads(b)["tokens"]})
    assert json.loads(b)["prompt"].endswith("assistant\nOnce upon"), b
    assert_error(*http("POST", D.base + "/tokenize", {"messages": cont, "chat_template": "{{ 1 }}"})[::2],
                 400, "chat_template")
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
        st, _, b = http("POST", d.base + "/tokenize", {"messages": [{"role": "user", "content": "hi"}]})
        assert_error(st, b, 400, "messages")
        err = json.loads(b)["error"]
        assert err["code"] == "chat_template_error" and "the first message must be system" in err["message"], err
        sys_hi = [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}]
        a = c.chat.completions.create(model=MODEL_NAME, messages=sys_hi, max_tokens=1, extra_body={"ignore_eos": True})
        b = c.chat.completions.create(model=MODEL_NAME, messages=sys_hi, max_tokens=1,
                                      extra_body={"ignore_eos": True, "chat_template_kwargs": {"greeting": "Hello there"}})
        assert b.usage.prompt_tokens > a.usage.prompt_tokens, (a.usage, b.usage)
        st, _, t = http("POST", d.base + "/tokenize", {"messages": sys_hi, "chat_template_kwargs": {"greeting": "Hello there"}})
        assert st == 200 and json.loads(t)["count"] == b.usage.prompt_tokens, (t, b.usage)
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
        r = completion(c, seed=1, max_tokens=4, echo=True, logprobs=0, extra_body={"ignore_eos": True})
        # the echo: the prompt's ids, then this request's (the same tokens on
        # the CPU; on CUDA the echoed prompt runs in other step shapes)
        echoed = r.choices[0].text.split(" ")
        assert echoed[:len(PROMPT)] == list(map(str, PROMPT)), r.choices[0].text
        same(echoed[len(PROMPT):], list(map(str, ids)), r.choices[0].text)
        assert r.choices[0].logprobs.tokens[:2] == [str(PROMPT[0]), " " + str(PROMPT[1])]
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


def test_nul_in_json_strings_is_text():
    """A \\u0000 escape is valid JSON and valid text: accepted wherever text
    is (prompt, message content, stop strings) instead of invalid_json; a
    raw NUL byte stays invalid JSON; a model name with a NUL is not ours."""
    c = D.client()
    a = c.completions.create(model=MODEL_NAME, prompt="a\u0000b", max_tokens=2, seed=1)
    b = c.completions.create(model=MODEL_NAME, prompt="ab", max_tokens=2, seed=1)
    assert a.usage.prompt_tokens > b.usage.prompt_tokens, (a.usage, b.usage)
    r = c.chat.completions.create(model=MODEL_NAME, max_tokens=2, seed=1, stop=["\u0000", "x\u0000y"],
                                  messages=[{"role": "user", "content": "nul \u0000 here"},
                                            {"role": "user", "content": [{"type": "text", "text": "\u0000"}]}])
    assert r.choices[0].finish_reason in ("length", "stop"), r
    try:
        c.completions.create(model=MODEL_NAME + "\u0000", prompt="a", max_tokens=1)
        raise AssertionError("accepted a model name with a NUL")
    except openai.NotFoundError:
        pass
    st, _, body = http("POST", D.base + "/v1/completions",
                       b'{"model":"mkad-tiny","prompt":"a\x00b","max_tokens":1}')
    assert_error(st, body, 400)
    assert json.loads(body)["error"]["code"] == "invalid_json"


def test_tokenize_detokenize():
    """POST /tokenize and /detokenize with vLLM's shapes; the counts agree
    with what the generation routes (through the openai client) bill."""
    c = D.client()

    def post(path, body):
        st, _, b = http("POST", D.base + path, body)
        return st, json.loads(b)

    text = "Once upon a time, \u00e9l\u00e8ve \u0000 <|im_start|>"
    st, t = post("/tokenize", {"model": MODEL_NAME, "prompt": text})
    assert st == 200 and set(t) == {"count", "max_model_len", "tokens", "token_strs"}, t
    assert t["count"] == len(t["tokens"]) and t["max_model_len"] == 4096 and t["token_strs"] is None
    assert 1 in t["tokens"]  # a special token written in the text is recognised, as in HF
    r = c.completions.create(model=MODEL_NAME, prompt=text, max_tokens=1)
    assert r.usage.prompt_tokens == t["count"], (r.usage, t)
    st, d = post("/detokenize", {"model": MODEL_NAME, "tokens": t["tokens"]})
    assert st == 200 and d == {"prompt": text}, d
    assert post("/tokenize", {"prompt": text, "add_special_tokens": False})[1]["tokens"] == t["tokens"]
    assert post("/detokenize", {"tokens": []}) == (200, {"prompt": ""})
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi \u0000"}]
    st, m = post("/tokenize", {"model": MODEL_NAME, "messages": msgs})
    st2, m2 = post("/tokenize", {"messages": msgs, "add_generation_prompt": False})
    assert st == st2 == 200 and m["count"] > m2["count"] and m["tokens"][:m2["count"]] == m2["tokens"]
    r = c.chat.completions.create(model=MODEL_NAME, messages=msgs, max_tokens=1)
    assert r.usage.prompt_tokens == m["count"], (r.usage, m)
    # the \u0000 in the message reached the template as text
    assert "hi \u0000" in post("/detokenize", {"tokens": m["tokens"]})[1]["prompt"]
    big = " Elizabeth" * 2001  # over 16 KiB: tokenized on the thread pool
    assert post("/tokenize", {"prompt": big})[1]["count"] == 2001
    for path, body, status, param in (
            ("/tokenize", {"model": "nope", "prompt": "a"}, 404, "model"),
            ("/tokenize", {"prompt": 5}, 400, "prompt"),
            ("/tokenize", {}, 400, "prompt"),
            ("/tokenize", {"prompt": "a", "return_token_strs": True}, 400, "return_token_strs"),
            ("/tokenize", {"messages": [{"role": "nobody", "content": "x"}]}, 400, "messages[0]"),
            ("/detokenize", {"tokens": [1, 4096]}, 400, "tokens"),
            ("/detokenize", {"tokens": "1 2"}, 400, "tokens")):
        assert_error(*http("POST", D.base + path, body)[::2], status, param)
    assert_error(*http("GET", D.base + "/tokenize")[::2], 405)


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
    # greedy: without logprobs the engine hands back only its argmax (the
    # logits stay on the device with CUDA); the tokens are the sampler's
    # greedy picks from the full logits, on every backend
    g_lp = completion(D.client(), seed=3, max_tokens=24, temperature=0, logprobs=1, extra_body=IDS)
    g_id = completion(D.client(), seed=3, max_tokens=24, temperature=0, extra_body=IDS)
    assert g_id.choices[0].model_extra["token_ids"] == g_lp.choices[0].model_extra["token_ids"]
    assert len(g_id.choices[0].model_extra["token_ids"]) == 24


def test_logit_bias_and_penalties():
    """logit_bias, presence_penalty and frequency_penalty with OpenAI's
    semantics, through the official client; deterministic."""
    c = D.client()
    r = completion(c, seed=3, max_tokens=6, logit_bias={"42": 100}, extra_body=IDS)
    assert r.choices[0].model_extra["token_ids"] == [42] * 6, r
    greedy = completion(c, seed=3, max_tokens=6, temperature=0, extra_body=IDS)
    first = greedy.choices[0].model_extra["token_ids"][0]
    banned = completion(c, seed=3, max_tokens=6, temperature=0, logit_bias={str(first): -100},
                        extra_body=IDS)
    assert first not in banned.choices[0].model_extra["token_ids"], banned
    ch = c.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "hi"}],
                                   max_tokens=4, logit_bias={"42": 100}, seed=1,
                                   extra_body={"ignore_eos": True, "return_token_ids": True})
    assert ch.choices[0].model_extra["token_ids"] == [42] * 4, ch

    def ids(**kw):
        r = completion(c, seed=4, max_tokens=48, temperature=0, extra_body=IDS, **kw)
        return r.choices[0].model_extra["token_ids"]

    plain, freq = ids(), ids(frequency_penalty=2.0)
    assert freq == ids(frequency_penalty=2.0)  # deterministic
    assert max(map(freq.count, freq)) < max(map(plain.count, plain)), (plain, freq)
    pres = ids(presence_penalty=2.0)
    assert len(set(pres)) > len(set(plain)), (plain, pres)
    assert len(set(ids(presence_penalty=-2.0))) <= len(set(plain))
    try:
        completion(c, seed=1, max_tokens=2, presence_penalty=2.5)
        raise AssertionError("presence_penalty 2.5 accepted")
    except openai.BadRequestError as e:
        assert e.body["param"] == "presence_penalty", e


def test_echo_prompt_logprobs():
    """echo with logprobs: the prompt's tokens and their log-probabilities
    (first null) before the completion's, as OpenAI's legacy completions and
    vLLM return them (what lm-evaluation-harness scores with).  Each prompt
    logprob equals the one a completion of the prompt's prefix reports for
    that token."""
    c = D.client()
    prompt = "It is a truth universally acknowledged"
    r = c.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=0, echo=True, logprobs=2,
                             temperature=0)
    ch, n = r.choices[0], r.usage.prompt_tokens
    assert ch.text == prompt and ch.finish_reason == "length" and r.usage.completion_tokens == 0, r
    lp = ch.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset) == n, lp
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(v <= 0 for v in lp.token_logprobs[1:]) and all(len(t) == 2 for t in lp.top_logprobs[1:])
    assert "".join(lp.tokens) == prompt and lp.text_offset[0] == 0
    assert lp.text_offset == sorted(lp.text_offset)
    ids = json.loads(http("POST", D.base + "/tokenize", {"prompt": prompt})[2])["tokens"]
    assert len(ids) == n
    for i in (1, n // 2, n - 1):  # the same number from a plain completion of the prefix
        one = c.completions.create(model=MODEL_NAME, prompt=ids[:i], max_tokens=1, logprobs=0,
                                   logit_bias={str(ids[i]): 100}, temperature=0,
                                   extra_body={"return_token_ids": True})
        assert one.choices[0].model_extra["token_ids"] == [ids[i]]
        assert abs(one.choices[0].logprobs.token_logprobs[0] - lp.token_logprobs[i]) < (1e-4 if EXACT else 5e-2), i
    # with a completion: prompt then completion, text and logprobs alike
    r2 = c.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=3, echo=True, logprobs=1,
                              seed=5, extra_body={"ignore_eos": True})
    plain = c.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=3, logprobs=1, seed=5,
                                 extra_body={"ignore_eos": True})
    assert r2.choices[0].text.startswith(prompt)
    same(r2.choices[0].text, prompt + plain.choices[0].text)
    l2 = r2.choices[0].logprobs
    assert l2.token_logprobs[:n] == lp.token_logprobs and len(l2.tokens) == n + 3
    # exact on the CPU; elsewhere the echoed prompt's K/V come from one-row
    # steps (GEMV on CUDA) and the plain prompt's from one prefill
    lq = plain.choices[0].logprobs.token_logprobs
    assert l2.token_logprobs[n:] == lq if EXACT else \
        all(abs(a - b) < 5e-2 for a, b in zip(l2.token_logprobs[n:], lq)), (l2.token_logprobs[n:], lq)
    assert l2.text_offset[n] == len(prompt.encode())
    # streaming: the prompt's chunk first
    chunks = list(c.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=3, echo=True,
                                       logprobs=1, seed=5, stream=True, extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].text == prompt
    assert chunks[0].choices[0].logprobs.token_logprobs == lp.token_logprobs
    assert "".join(ch.choices[0].text for ch in chunks) == r2.choices[0].text
    # a session's resident prefix is not reused: every prompt position needs its logits
    for _ in range(2):
        rs = c.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=1, echo=True, logprobs=2,
                                  temperature=0, extra_body={"session_id": "bb-echo"})
        assert rs.usage.prompt_tokens_details.cached_tokens == 0
        assert rs.choices[0].logprobs.token_logprobs[:n] == lp.token_logprobs
    # echo alone; token-id prompts; echo is for completions only
    r3 = c.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=2, echo=True, seed=1)
    assert r3.choices[0].text.startswith(prompt) and r3.choices[0].logprobs is None
    r4 = c.completions.create(model=MODEL_NAME, prompt=ids, max_tokens=0, echo=True)
    assert r4.choices[0].text == prompt
    try:
        c.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "hi"}],
                                  extra_body={"echo": True})
        raise AssertionError("echo accepted on chat")
    except openai.BadRequestError as e:
        assert e.body["param"] == "echo", e
    try:
        c.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=0)
        raise AssertionError("max_tokens 0 accepted without echo")
    except openai.BadRequestError as e:
        assert e.body["param"] == "max_tokens", e


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
        same(text, solo[i], (i, text, solo[i]))
    after = metrics(D)
    # the engine really batched: some step carried more than one sequence
    big = after['mkad_batch_sequences_bucket{le="1"}'] - before['mkad_batch_sequences_bucket{le="1"}']
    total = after["mkad_batch_sequences_count"] - before["mkad_batch_sequences_count"]
    assert total > big, (total, big)


def wait_metric(pred, timeout=10, d=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        m = metrics(d or D)
        if pred(m):
            return m
        time.sleep(0.05)
    raise AssertionError("metric condition not reached: %s" % m)


def test_preemption_keeps_outputs():
    """A K/V pool too small for all streams: some are preempted and resumed,
    and every stream still equals its solo run."""
    d = Daemon("--kv-mem-mb", "1")   # about 15 blocks of 32 tokens (f32 K/V; ~30 with bf16)
    try:
        c = d.client()
        # 16 streams, each long enough to end holding 1/4 of the pool (whose
        # block count depends on the backend's K/V dtype): even when a fast
        # machine finishes early streams before late ones are admitted, the
        # streams that do overlap cannot all fit.
        n = 16
        mt = 32 * (int(metrics(d)["mkad_kv_blocks_total"]) // 4 + 1)
        solo = [completion(c, seed=50 + i, max_tokens=mt, prompt=PROMPT + [i], temperature=1.5,
                           extra_body=IDS).choices[0].model_extra["token_ids"] for i in range(n)]
        assert metrics(d)["mkad_preemptions_total"] == 0

        def run(i):
            s = completion(d.client(), seed=50 + i, max_tokens=mt, prompt=PROMPT + [i],
                           temperature=1.5, stream=True, extra_body=IDS)
            return [t for ch in s if ch.choices for t in ch.choices[0].model_extra["token_ids"]]

        with cf.ThreadPoolExecutor(n) as ex:
            both = list(ex.map(run, range(n)))
        for b, so in zip(both, solo):
            same(b, so)
        m = metrics(d)
        assert m["mkad_preemptions_total"] >= 1, m["mkad_preemptions_total"]
        # finished requests stay as prefix-cache entries; nothing else holds blocks
        assert m["mkad_kv_blocks_used"] <= m["mkad_prefix_cache_blocks"], m
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


def test_n_choices():
    """n > 1: one prefill, n-1 forks; choices sample independently with
    seeded streams, choice 0 is the n = 1 output, greedy choices are equal,
    usage sums them, each choice has its own finish and logprobs."""
    c = D.client()
    eb = dict(IDS)
    r = completion(c, seed=11, max_tokens=12, n=4, extra_body=eb)
    assert [ch.index for ch in r.choices] == [0, 1, 2, 3]
    toks = [ch.model_extra["token_ids"] for ch in r.choices]
    assert all(len(t) == 12 and ch.finish_reason == "length" for t, ch in zip(toks, r.choices))
    assert len({tuple(t) for t in toks}) == 4, toks  # temperature 1: independent streams
    assert r.usage.completion_tokens == 48 and r.usage.prompt_tokens == len(PROMPT)
    # seeded: the same n choices again; choice 0 is what n = 1 gives
    again = completion(c, seed=11, max_tokens=12, n=4, extra_body=eb)
    same([ch.model_extra["token_ids"] for ch in again.choices], toks)
    one = completion(c, seed=11, max_tokens=12, extra_body=eb)
    same(one.choices[0].model_extra["token_ids"], toks[0])
    # greedy: every choice equals the n = 1 greedy output
    g1 = completion(c, seed=1, max_tokens=10, temperature=0, extra_body=eb).choices[0]
    g3 = completion(c, seed=2, max_tokens=10, temperature=0, n=3, extra_body=eb)
    for ch in g3.choices:
        same(ch.model_extra["token_ids"], g1.model_extra["token_ids"])
        same(ch.text, g1.text)
    # logprobs per choice
    lp = completion(c, seed=5, max_tokens=6, n=2, logprobs=2, extra_body=eb)
    for ch in lp.choices:
        assert len(ch.logprobs.tokens) == 6 and len(ch.logprobs.top_logprobs) == 6
    assert lp.choices[0].logprobs.token_logprobs != lp.choices[1].logprobs.token_logprobs
    # chat, with a stop string that ends choices at different lengths
    ch = c.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "hello there"}],
                                   max_tokens=20, n=3, seed=4, stop=["e"])
    assert [x.index for x in ch.choices] == [0, 1, 2]
    for x in ch.choices:
        assert "e" not in x.message.content and x.finish_reason in ("stop", "length"), x
    assert ch.usage.completion_tokens >= 3
    # echo: every choice starts with the prompt (and its logprobs)
    e = completion(c, seed=3, max_tokens=2, n=2, prompt="Once upon", echo=True, logprobs=1)
    for x in e.choices:
        assert x.text.startswith("Once upon") and x.logprobs.token_logprobs[0] is None, x
    assert e.choices[0].logprobs.token_logprobs[:3] == e.choices[1].logprobs.token_logprobs[:3]
    # best_of = n is n; the rest is a clear 400
    assert len(completion(c, seed=1, max_tokens=2, n=2, best_of=2).choices) == 2
    for body, param in (({"n": 2, "session_id": "bb-n"}, "n"), ({"n": 129}, "n"),
                        ({"n": 2, "best_of": 3}, "best_of"), ({"n": 100}, None)):
        st, _, b = http("POST", D.base + "/v1/completions",
                        dict({"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 4}, **body))
        assert_error(st, b, 400, param)
    st, _, b = http("POST", D.base + "/v1/completions",
                    {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 4, "n": 100})
    assert b"max_seqs" in b, b


def test_n_choices_stream():
    """Streamed n > 1: chunks carry their choice's index, each choice ends
    with one finish_reason, the texts equal the non-streamed ones, and the
    usage chunk sums the choices."""
    c = D.client()
    full = completion(c, seed=21, max_tokens=9, n=3, extra_body=IDS)
    chunks = list(completion(c, seed=21, max_tokens=9, n=3, stream=True,
                             stream_options={"include_usage": True}, extra_body=IDS))
    text, ids, fins = {}, {}, {}
    for ch in chunks[:-1]:
        assert len(ch.choices) == 1
        x = ch.choices[0]
        text[x.index] = text.get(x.index, "") + x.text
        ids.setdefault(x.index, []).extend(x.model_extra.get("token_ids") or [])
        if x.finish_reason:
            assert x.index not in fins
            fins[x.index] = x.finish_reason
    assert fins == {0: "length", 1: "length", 2: "length"}, fins
    for x in full.choices:
        assert text[x.index] == x.text and ids[x.index] == x.model_extra["token_ids"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 27
    # chat: the first chunk of every choice carries the role
    roles = {}
    for ch in c.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "hi"}],
                                        max_tokens=4, n=2, seed=3, stream=True):
        for x in ch.choices:
            roles.setdefault(x.index, x.delta.role)
    assert roles == {0: "assistant", 1: "assistant"}, roles


def test_n_choices_cancel_frees_forks():
    """A client that goes away frees every forked sequence and its blocks."""
    wait_metric(lambda m: m["mkad_sequences_running"] == 0)
    base = metrics(D)
    cancelled0 = base.get('mkad_requests_cancelled_total{reason="client"}', 0)
    body = json.dumps({"model": MODEL_NAME, "prompt": list(range(1, 41)), "max_tokens": 3000, "n": 4,
                       "stream": True, "ignore_eos": True}).encode()
    s = socket.create_connection(("127.0.0.1", D.port))
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n" % len(body) + body)
    got = b""
    while got.count(b"data: ") < 12:
        got += s.recv(4096)
    assert got.startswith(b"HTTP/1.1 200")
    for i in range(4):
        assert b'"index":%d' % i in got, got[:2000]
    m = wait_metric(lambda m: m["mkad_sequences_running"] == 4)
    s.close()
    m = wait_metric(lambda m: m["mkad_sequences_running"] == 0 and
                    m.get('mkad_requests_cancelled_total{reason="client"}', 0) == cancelled0 + 1)
    assert m["mkad_kv_blocks_used"] == base["mkad_kv_blocks_used"], (m["mkad_kv_blocks_used"], base)


def test_prefix_sharing_exact_and_per_user():
    """A prompt that shares whole blocks with a resident sequence of the same
    user forks them instead of prefilling: cached_tokens counts them, the
    output (tokens and logprobs) is bit-for-bit the full prefill's, another
    user never shares, and evicting the source keeps the blocks the fork
    holds."""
    d = Daemon("--api-keys", "alice:ka,bob:kb,carol:kc,dave:kd,erin:ke", "--kv-mem-mb", "1")
    try:
        ca, cb, cc = d.client("ka"), d.client("kb"), d.client("kc")
        # dave and erin send each prompt once: their outputs are full prefills
        B = 32
        p = [(i * 7) % 500 + 3 for i in range(3 * B)]  # three full blocks
        kw = dict(temperature=0, logprobs=2, extra_body=IDS)

        def out(r):
            x = r.choices[0]
            return x.model_extra["token_ids"], x.logprobs.token_logprobs, x.logprobs.top_logprobs

        r1 = completion(ca, seed=1, max_tokens=8, prompt=p + [9], **kw)
        assert r1.usage.prompt_tokens_details.cached_tokens == 0
        r2 = completion(ca, seed=1, max_tokens=8, prompt=p + [9], **kw)
        assert r2.usage.prompt_tokens_details.cached_tokens == 3 * B, r2.usage
        same(out(r2), out(r1))
        # bob sends the same prompt: nothing of alice's is his
        r3 = completion(cb, seed=1, max_tokens=8, prompt=p + [9], **kw)
        assert r3.usage.prompt_tokens_details.cached_tokens == 0
        same(out(r3), out(r1))
        # a longer prompt with the same first blocks, sampled: equal to bob's full prefill
        q = p + [5] * 40
        ref = completion(d.client("kd"), seed=8, max_tokens=6, prompt=q, temperature=1.3, extra_body=IDS)
        assert ref.usage.prompt_tokens_details.cached_tokens == 0
        rq = completion(ca, seed=8, max_tokens=6, prompt=q, temperature=1.3, extra_body=IDS)
        assert rq.usage.prompt_tokens_details.cached_tokens == 3 * B, rq.usage
        same(rq.choices[0].model_extra["token_ids"], ref.choices[0].model_extra["token_ids"])
        m = metrics(d)
        assert m["mkad_prefix_shared_total"] >= 2 and m["mkad_prefix_shared_tokens_total"] >= 6 * B, m
        assert m["mkad_prefix_cache_sequences"] >= 2
        # n choices that can never fit the pool: a 400, not a wait
        blocks = int(m["mkad_kv_blocks_total"])
        st, _, b = http("POST", d.base + "/v1/completions",
                        {"model": MODEL_NAME, "prompt": PROMPT, "n": 8, "max_tokens": 32 * blocks // 4},
                        {"Authorization": "Bearer ka"})
        assert_error(st, b, 400)
        assert b"lower max_tokens or n" in b, b

        # eviction respects references: alice streams a fork of her cached
        # prefix while carol's long request needs more of the pool than is
        # left (13 + 22 blocks of the 28-block pool: bf16 K/V of the bundled model), which
        # evicts every cache entry, the fork's source too; the stream is
        # still erin's full-prefill output
        long_q = p + [11] * 8
        ref = completion(d.client("ke"), seed=3, max_tokens=300, prompt=long_q, temperature=1.0,
                         extra_body=IDS)
        assert ref.usage.prompt_tokens_details.cached_tokens == 0
        ref = ref.choices[0].model_extra["token_ids"]
        completion(ca, seed=3, max_tokens=2, prompt=p + [12], temperature=1.0, extra_body=IDS)

        def stream_alice():
            st = completion(ca, seed=3, max_tokens=300, prompt=long_q, temperature=1.0, stream=True,
                            stream_options={"include_usage": True}, extra_body=IDS)
            toks, usage = [], None
            for ch in st:
                for x in ch.choices:
                    toks += x.model_extra.get("token_ids") or []
                usage = ch.usage or usage
            return toks, usage

        def carol():
            time.sleep(0.05)
            return completion(cc, seed=4, max_tokens=300, prompt=[7] * 400, extra_body=IDS)

        ev0 = metrics(d)["mkad_prefix_cache_evicted_total"]
        with cf.ThreadPoolExecutor(2) as ex:
            fa, fc = ex.submit(stream_alice), ex.submit(carol)
            toks, usage = fa.result()
            fc.result()
        assert usage.prompt_tokens_details.cached_tokens == 3 * B, usage
        same(toks, ref)
        m = wait_metric(lambda m: m["mkad_sequences_running"] == 0, d=d)
        assert m["mkad_prefix_cache_evicted_total"] > ev0, m
        # alice's entries, the fork's source among them, went while her fork ran
        assert any("event=prefix_cache_evicted user=alice" in l for l in d.lines), d.lines[-40:]
        # nothing but the prefix cache holds blocks now
        assert m["mkad_kv_blocks_used"] <= m["mkad_prefix_cache_blocks"], m
    finally:
        assert d.stop() == 0


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
    same(r3.choices[0].text, r2.choices[0].text)
    # without a session it forks the session's whole blocks (same user)
    assert r3.usage.prompt_tokens_details.cached_tokens == (len(p2) - 1) // 32 * 32, r3.usage
    # a diverging prompt keeps only the block-aligned common prefix
    p4 = p1[:50] + [9, 9, 9]
    st, _, body = http("POST", D.base + "/v1/completions",
                       {"model": MODEL_NAME, "prompt": p4, "max_tokens": 2},
                       {"X-Session-Id": "bb-s1"})
    assert st == 200, body
    assert json.loads(body)["usage"]["prompt_tokens_details"]["cached_tokens"] == 32
    m = metrics(D)
    assert m["mkad_sessions_resident"] >= 1 and m["mkad_cached_tokens_total"] >= cached + 32


def test_session_survives_restart():
    """A session's turns persist in the state directory: after a restart the
    session resumes from the store (blocks loaded, only the rest prefilled)
    with the same output as recomputing it; a store of another model shape
    and a second daemon on the same directory are refused."""
    d = Daemon()
    eb = dict(IDS, session_id="bb-persist")
    p1 = list(range(3, 103))
    try:
        c = d.client()
        r1 = completion(c, seed=3, max_tokens=12, prompt=p1, extra_body=eb)
        p2 = p1 + r1.choices[0].model_extra["token_ids"] + [7, 8, 9]
        r2 = completion(c, seed=4, max_tokens=12, prompt=p2, extra_body=eb)
        assert r2.usage.prompt_tokens_details.cached_tokens == 100 + 12 - 1
        # out of the engine, into the host-memory tier: the same turn again
        # loads its blocks from there and gives the same tokens
        wait_metric(lambda m: m["mkad_session_write_queue"] == 0, d=d)
        assert http("DELETE", d.base + "/admin/sessions/bb-persist?user=local&tier=hbm")[0] == 200
        r2b = completion(c, seed=4, max_tokens=12, prompt=p2, extra_body=eb)
        assert r2b.usage.prompt_tokens_details.cached_tokens == (len(p2) - 1) // 32 * 32, r2b.usage
        same(r2b.choices[0].model_extra["token_ids"], r2.choices[0].model_extra["token_ids"])
        assert metrics(d)['mkad_session_blocks_loaded_total{tier="host"}'] == (len(p2) - 1) // 32
        wait_metric(lambda m: m["mkad_session_writes_total"] >= 3 and m["mkad_session_write_queue"] == 0, d=d)
        # a second daemon on the same state directory is refused, the first one keeps serving
        second = subprocess.run([ARGS.mkad, "--model", ARGS.model, "--port", "0", "--state-dir", d.state],
                                stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)
        assert second.returncode != 0 and "in use by another process" in second.stderr, second.stderr[-2000:]
        assert http("GET", d.base + "/health")[0] == 200
    finally:
        assert d.stop() == 0
    p3 = p2 + r2.choices[0].model_extra["token_ids"] + [11, 12]
    # without prefix sharing r4 below recomputes everything instead of
    # forking the resumed session's blocks
    d = Daemon("--prefix-sharing=false", state=d.state)
    try:
        c = d.client()
        r3 = completion(c, seed=5, max_tokens=12, prompt=p3, extra_body=eb)
        held = len(p2) + 12 - 1  # what the session held when the first daemon stopped
        assert r3.usage.prompt_tokens_details.cached_tokens == held // 32 * 32, r3.usage
        m = metrics(d)
        assert m["mkad_session_lookups_total"] == 1
        assert m['mkad_session_blocks_loaded_total{tier="disk"}'] == held // 32, m
        # the same as recomputing everything (the CPU engine is exact)
        r4 = completion(c, seed=5, max_tokens=12, prompt=p3, extra_body=IDS)
        assert r4.usage.prompt_tokens_details.cached_tokens == 0
        same(r4.choices[0].model_extra["token_ids"], r3.choices[0].model_extra["token_ids"])
        assert any("event=session_resumed session=bb-persist" in l for l in d.lines)
    finally:
        assert d.stop() == 0
    # a store written for another block format is refused, and left as it was
    other = subprocess.run([ARGS.mkad, "--model", ARGS.model, "--port", "0", "--state-dir", d.state,
                            "--block-size", "16"], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                           timeout=30)
    assert other.returncode != 0 and "written for another model" in other.stderr, other.stderr[-2000:]
    d = Daemon(state=d.state)
    try:
        r5 = completion(d.client(), seed=5, max_tokens=12, prompt=p3, extra_body=eb)
        assert r5.usage.prompt_tokens_details.cached_tokens > 0
    finally:
        assert d.stop() == 0


def test_sigkill_keeps_acknowledged_turns():
    """Kill -9 at random moments while sessions are written: after a restart
    every turn whose response completed (with session_sync, the response
    completes only once its turn is on disk) resumes from the store, exact,
    and nothing stored is reported corrupt."""
    sigkill_loop([], 11)


def test_sigkill_group_commit():
    """The same with group commit (session_sync_ms): a turn's response
    completes once the fsync of its group is done."""
    sigkill_loop(["--session-sync=false", "--session-sync-ms", "30"], 12)


def test_group_commit_holds_final():
    """session_sync_ms: a session turn's response completes only with its
    group's fsync (up to N ms later), and concurrent turns share one fsync."""
    d = Daemon("--session-sync=false", "--session-sync-ms", "400")
    try:
        c = d.client()
        t0 = time.time()
        completion(c, seed=1, max_tokens=2, prompt=PROMPT, extra_body=IDS)
        plain = time.time() - t0
        t0 = time.time()
        completion(c, seed=1, max_tokens=2, prompt=PROMPT, extra_body=dict(IDS, session_id="g-0"))
        held = time.time() - t0
        assert held >= 0.35 and held > plain + 0.2, (held, plain)
        m0 = metrics(d)["mkad_session_group_commits_total"]
        assert m0 == 1, m0
        with cf.ThreadPoolExecutor(4) as ex:
            futs = [ex.submit(completion, c, k, 2, PROMPT + [k], extra_body=dict(IDS, session_id=f"g-{k + 1}"))
                    for k in range(4)]
            for f in futs:
                f.result()
        m = metrics(d)
        assert m["mkad_session_writes_total"] == 5
        assert m["mkad_session_group_commits_total"] - m0 < 4, m  # fewer fsyncs than turns
    finally:
        assert d.stop() == 0


def sigkill_loop(args, seed):
    rng = random.Random(seed)
    state = tempfile.mkdtemp(prefix="mkad-bb-kill-")
    acked = {}  # session -> (prompt, output ids) of its last completed turn
    for it in range(6):
        d = Daemon(*args, state=state)
        stop = threading.Event()

        def client(k):
            sid = f"kill-{k}"
            c = d.client()
            while not stop.is_set():
                p, o = acked.get(sid, ([k + 1] * 40, []))
                prompt = p + o + [rng.randrange(5, 4000) for _ in range(3)]
                if len(prompt) > 3000:
                    return
                try:
                    r = completion(c, seed=k, max_tokens=8, prompt=prompt, extra_body=dict(IDS, session_id=sid))
                except Exception:  # noqa: BLE001 - the daemon was killed
                    return
                acked[sid] = (prompt, r.choices[0].model_extra["token_ids"])

        ths = [threading.Thread(target=client, args=(k,)) for k in range(4)]
        n0 = sum(len(p) for p, _ in acked.values())
        for t in ths:
            t.start()
        # let some turns complete first (slow builds, e.g. under ASan), then a random moment
        deadline = time.time() + 20
        while sum(len(p) for p, _ in acked.values()) < n0 + 4 * 43 and time.time() < deadline:
            time.sleep(0.02)
        time.sleep(rng.random() * 0.6)
        d.proc.kill()
        stop.set()
        for t in ths:
            t.join()
        d.proc.wait()
        assert not [l for l in d.lines if "memstore_corrupt" in l], d.lines[-20:]
    assert len(acked) == 4 and sum(len(p) for p, _ in acked.values()) > 4 * 60, "too few turns completed"
    d = Daemon(*args, state=state)
    try:
        c = d.client()
        for sid, (p, o) in sorted(acked.items()):
            held = len(p) + len(o) - 1
            prompt = p + o + [9, 9]
            r = completion(c, seed=1, max_tokens=6, prompt=prompt, extra_body=dict(IDS, session_id=sid))
            assert r.usage.prompt_tokens_details.cached_tokens >= held // 32 * 32, (sid, held, r.usage)
            ref = completion(c, seed=1, max_tokens=6, prompt=prompt, extra_body=IDS)
            same(r.choices[0].model_extra["token_ids"], ref.choices[0].model_extra["token_ids"], sid)
        assert not [l for l in d.lines if "memstore_corrupt" in l or "session_write_failed" in l]
        if "--session-sync-ms" in args:
            assert any("durability=group_30ms" in l for l in d.lines)
            wait_metric(lambda m: m["mkad_session_group_commits_total"] >= 1, d=d)
    finally:
        assert d.stop() == 0


def test_resume_paths_identical():
    """resume_policy: a stored session resumed by loading its blocks, by
    recomputing them, or both at once (prefill from the start while the last
    blocks load) gives the same tokens as recomputing without a session
    (bit-identical on the CPU); /metrics counts each path and the log says
    which way each resume went."""
    eb = dict(IDS, session_id="bb-paths")
    p1 = list(range(11, 311))  # 300 tokens
    d = Daemon()
    try:
        c = d.client()
        r1 = completion(c, seed=2, max_tokens=9, prompt=p1, extra_body=eb)
        wait_metric(lambda m: m["mkad_session_write_queue"] == 0 and m["mkad_session_writes_total"] == 1, d=d)
        p2 = p1 + r1.choices[0].model_extra["token_ids"] + [5, 6]
        ref = completion(c, seed=6, max_tokens=12, prompt=p2, extra_body=IDS)
    finally:
        assert d.stop() == 0
    held = len(p1) + 9 - 1
    n = held // 32  # stored full blocks
    want_cached = {"load": n * 32, "recompute": 0, "both": (n - n // 2) * 32}
    for policy in ("load", "recompute", "both", "auto"):
        state = tempfile.mkdtemp(prefix=f"mkad-bb-{policy}-")
        shutil.copytree(d.state, state, dirs_exist_ok=True)
        dd = Daemon("--resume-policy", policy, state=state)
        try:
            r = completion(dd.client(), seed=6, max_tokens=12, prompt=p2, extra_body=eb)
            same(r.choices[0].model_extra["token_ids"], ref.choices[0].model_extra["token_ids"], policy)
            path = "load" if policy == "auto" else policy  # nothing measured yet: auto loads
            assert r.usage.prompt_tokens_details.cached_tokens == want_cached[path], (policy, r.usage)
            m = metrics(dd)
            for p in ("load", "recompute", "both"):
                assert m[f'mkad_session_resumes_total{{path="{p}"}}'] == (p == path), (policy, p, m)
            assert any("event=session_resumed session=bb-paths path=" + path in l for l in dd.lines), dd.lines[-8:]
            if path == "both":
                assert any("event=session_resume_split session=bb-paths path=both" in l and
                           f"prefill_blocks={n // 2} load_blocks={n - n // 2}" in l for l in dd.lines), dd.lines[-8:]
            # a second turn on the resumed session continues exactly too
            wait_metric(lambda m: m["mkad_session_write_queue"] == 0, d=dd)
            assert http("DELETE", dd.base + "/admin/sessions/bb-paths?user=local&tier=hbm")[0] == 200
            p3 = p2 + r.choices[0].model_extra["token_ids"] + [8]
            r3 = completion(dd.client(), seed=7, max_tokens=6, prompt=p3, extra_body=eb)
            ref3 = completion(dd.client(), seed=7, max_tokens=6, prompt=p3, extra_body=IDS)
            same(r3.choices[0].model_extra["token_ids"], ref3.choices[0].model_extra["token_ids"], policy)
        finally:
            assert dd.stop() == 0
            shutil.rmtree(state, ignore_errors=True)


def test_user_quotas():
    """user_session_mb: over quota, the user's own least recently used idle
    sessions are deleted (never another user's, never one in flight, logged
    and counted), and one still resident stores itself whole again at its
    next turn; user_chunks_max: likewise for long-term memory chunks, those
    bound in a stored session's L3 bank last."""
    d = Daemon("--api-keys", "alice:ka,bob:kb,root:kr", "--admin-users", "root", "--user-session-mb", "1")
    H = {"Authorization": "Bearer kr"}
    try:
        ca, cb = d.client(key="ka"), d.client(key="kb")
        # each session: 330 tokens = 10 full blocks (~370 KiB with mkad-tiny): two fit in 1 MiB, three do not
        for k in range(2):
            completion(cb, seed=k, max_tokens=4, prompt=[k + 40] * 330, extra_body=dict(IDS, session_id=f"b-{k}"))
        for k in range(2):
            completion(ca, seed=k, max_tokens=4, prompt=[k + 2] * 330, extra_body=dict(IDS, session_id=f"a-{k}"))
            time.sleep(1.1)  # distinct last-use times (the store keeps milliseconds)
        wait_metric(lambda m: m["mkad_session_writes_total"] == 4 and m["mkad_session_write_queue"] == 0, d=d)
        # a-0 (alice's least recently used) is in flight while a-2's write puts alice over quota:
        # a-1 goes instead
        started = threading.Event()

        def long_turn():
            s = ca.completions.create(model=MODEL_NAME, prompt=[2] * 330 + [7], max_tokens=1500, seed=1,
                                      stream=True, extra_body=dict(IDS, session_id="a-0", ignore_eos=True))
            for _ in s:
                started.set()

        th = threading.Thread(target=long_turn)
        th.start()
        assert started.wait(30)
        completion(ca, seed=2, max_tokens=4, prompt=[4] * 330, extra_body=dict(IDS, session_id="a-2"))
        assert th.is_alive()  # a-2's turn (its write and the quota) completed while a-0's ran
        th.join()
        wait_metric(lambda m: m["mkad_session_write_queue"] == 0 and m["mkad_session_writes_total"] == 6, d=d)
        ev = [l for l in d.lines if "event=session_evicted_quota" in l]
        assert ev and "user=alice session=a-1 " in ev[0], ev
        assert not [l for l in ev if "user=bob" in l or "session=a-0 " in l], ev
        m = metrics(d)
        assert m['mkad_session_deleted_total{reason="user_quota"}'] == len(ev), (m, ev)
        st, _, body = http("GET", d.base + "/admin/sessions?user=bob&tier=disk", headers=H)
        assert st == 200 and len(json.loads(body)["data"]) == 2, body  # bob's are untouched
        st, _, body = http("GET", d.base + "/admin/sessions?user=alice&tier=disk", headers=H)
        ids = sorted(s["id"] for s in json.loads(body)["data"])
        assert "a-1" not in ids and "a-0" in ids, ids
        # a-1 is still resident in the engine: its next turn stores it whole
        # again, not only its new blocks (those before were deleted with it)
        p1 = [3] * 330 + [7]
        r = completion(ca, seed=1, max_tokens=4, prompt=p1, extra_body=dict(IDS, session_id="a-1"))
        wait_metric(lambda m: m["mkad_session_write_queue"] == 0, d=d)
        assert http("DELETE", d.base + "/admin/sessions/a-1?user=alice&tier=hbm", headers=H)[0] == 200
        p2 = p1 + r.choices[0].model_extra["token_ids"] + [9]
        r2 = completion(ca, seed=1, max_tokens=2, prompt=p2, extra_body=dict(IDS, session_id="a-1"))
        assert r2.usage.prompt_tokens_details.cached_tokens == (len(p2) - 1) // 32 * 32, r2.usage
        assert not [l for l in d.lines if "session_block_unavailable" in l], d.lines[-10:]
    finally:
        assert d.stop() == 0
    # long-term chunks (64 tokens each): session A makes 5, B binds them as its bank and makes 5 of
    # its own; over 6, B's own (unbound) go first, A's stay: B resumes with its whole bank
    d = Daemon("--api-keys", "alice:ka,bob:kb,root:kr", "--admin-users", "root", "--user-chunks-max", "6")
    try:
        ca, cb = d.client(key="ka"), d.client(key="kb")
        completion(cb, seed=1, max_tokens=4, prompt=[50] * 330, extra_body=dict(IDS, session_id="BOB"))
        completion(ca, seed=1, max_tokens=4, prompt=[60] * 330, extra_body=dict(IDS, session_id="A"))
        wait_metric(lambda m: m["mkad_session_write_queue"] == 0 and m["mkad_longterm_chunks_written_total"] == 10,
                    d=d)
        pb = [61] * 330
        rb = completion(ca, seed=2, max_tokens=4, prompt=pb, extra_body=dict(IDS, session_id="B"))
        assert any("event=session_new session=B user=alice l3_bank=5" in l for l in d.lines), d.lines[-10:]
        wait_metric(lambda m: m["mkad_session_write_queue"] == 0 and m["mkad_longterm_chunks_written_total"] == 15,
                    d=d)
        lt = lambda u: json.loads(http("GET", d.base + f"/admin/users/{u}/longterm", headers=H)[2])["chunks"]
        assert lt("alice") == 6 and lt("bob") == 5, (lt("alice"), lt("bob"))
        m = metrics(d)
        assert m["mkad_longterm_chunks_deleted_quota_total"] == 4, m
        assert any("event=longterm_quota_evicted user=alice" in l for l in d.lines)
        assert not any("event=longterm_quota_evicted user=bob" in l for l in d.lines)
        assert http("DELETE", d.base + "/admin/sessions/B?user=alice&tier=hbm", headers=H)[0] == 200
        pb2 = pb + rb.choices[0].model_extra["token_ids"] + [9]
        r = completion(ca, seed=3, max_tokens=4, prompt=pb2, extra_body=dict(IDS, session_id="B"))
        assert r.usage.prompt_tokens_details.cached_tokens == 320, r.usage
        assert any("event=session_resumed session=B" in l and "l3_bank=5" in l for l in d.lines), d.lines[-10:]
    finally:
        assert d.stop() == 0


def test_session_ttl_and_disk_budget():
    """Stored sessions idle longer than session_ttl are deleted, and beyond
    session_disk_mb the least recently used go first (applied at startup and
    then periodically)."""
    d = Daemon()
    c = d.client()
    for k in range(3):  # 3 sessions of ~12 blocks (~440 KiB each with mkad-tiny)
        completion(c, seed=k, max_tokens=4, prompt=[k + 2] * 400, extra_body=dict(IDS, session_id=f"ttl-{k}"))
        time.sleep(1.1)  # distinct last-use times (the store keeps milliseconds)
    wait_metric(lambda m: m["mkad_session_writes_total"] == 3, d=d)
    assert d.stop() == 0
    d = Daemon("--session-disk-mb", "1", state=d.state)
    try:
        wait_metric(lambda m: m.get('mkad_session_deleted_total{reason="disk_budget"}') == 1, d=d)
        c = d.client()
        r0 = completion(c, seed=0, max_tokens=4, prompt=[2] * 400 + [7], extra_body=dict(IDS, session_id="ttl-0"))
        r2 = completion(c, seed=0, max_tokens=4, prompt=[4] * 400 + [7], extra_body=dict(IDS, session_id="ttl-2"))
        assert r0.usage.prompt_tokens_details.cached_tokens == 0  # the oldest went
        assert r2.usage.prompt_tokens_details.cached_tokens == 384
    finally:
        assert d.stop() == 0
    time.sleep(2.1)
    d = Daemon("--session-ttl", "2", state=d.state)
    try:
        wait_metric(lambda m: m.get('mkad_session_deleted_total{reason="ttl"}') == 3, d=d)  # ttl-0 was written again above
        r = completion(d.client(), seed=0, max_tokens=4, prompt=[4] * 400 + [7],
                       extra_body=dict(IDS, session_id="ttl-2"))
        assert r.usage.prompt_tokens_details.cached_tokens == 0
    finally:
        assert d.stop() == 0


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


def long_prompt_while_streaming(d):
    """A stream decodes while a 1200-token prompt is prefilled: (the engine
    steps that carried more than 2 tokens meanwhile, all the engine steps
    meanwhile, the prompt's 8 greedy token ids)."""
    c = d.client()
    sobj = completion(c, seed=1, max_tokens=3000, stream=True, extra_body={"ignore_eos": True})
    stream = iter(sobj)
    next(stream)
    stop = threading.Event()

    def reader():
        for _ in stream:
            if stop.is_set():
                break
        sobj.close()

    th = threading.Thread(target=reader, daemon=True)
    th.start()
    time.sleep(0.2)  # a few decode steps: the cost model knows them
    long_prompt = [(i * 7) % 4000 + 3 for i in range(1200)]
    m0 = metrics(d)
    r = completion(c, seed=2, max_tokens=8, temperature=0, prompt=long_prompt, extra_body=IDS)
    m1 = metrics(d)
    stop.set()
    th.join(10)
    # steps of more than 2 tokens: a prompt chunk beside the stream's decode
    # (the two decode together afterwards: 2 tokens)
    n = lambda m: m["mkad_batch_tokens_count"] - m['mkad_batch_tokens_bucket{le="2"}']  # noqa: E731
    steps = m1["mkad_batch_tokens_count"] - m0["mkad_batch_tokens_count"]
    return n(m1) - n(m0), steps, r.choices[0].model_extra["token_ids"]


def test_step_time_budget():
    """step_target_ms: a long prompt arriving while a stream decodes is cut
    into many more chunks than prefill_chunk alone makes, and its tokens
    are the same as without the budget (chunking is exact on the CPU)."""
    got = {}
    for target in ("1", "0"):
        d = Daemon("--backend", "cpu", "--threads", "1", "--prefill-chunk", "256", "--step-target-ms", target,
                   "--log-requests=false")
        try:
            got[target] = long_prompt_while_streaming(d)
        finally:
            assert d.stop() == 0
    (_, steps_on, ids_on), (off, steps_off, ids_off) = got["1"], got["0"]
    assert ids_on == ids_off, (ids_on, ids_off)
    assert off == 5, off  # 4 x 256 + 176: the token budget alone
    # a 1 ms target: a few tokens of the prompt a step (tens on the tiny
    # model in a plain build, one or two under the sanitizers), so the
    # prompt takes many more steps than its 5 chunks
    assert steps_on >= 15 and steps_on > 2 * steps_off, (steps_on, steps_off)


def test_request_timeout():
    # the CPU backend on one thread: slow enough everywhere for 4000 tokens
    # to outlast one second (a GPU decodes the tiny model faster than that)
    d = Daemon("--request-timeout", "1", "--backend", "cpu", "--threads", "1")
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
        (400, ["-d", json.dumps(dict(ok, n=0)), *J]),
        (400, ["-d", json.dumps(dict(ok, n=3, session_id="x")), *J]),
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


def raw_exchange(data, port=None, timeout=10, src=None):
    """Sends raw bytes, reads until the server closes: (bytes, seconds)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(timeout)
    if src:
        s.bind((src, 0))
    s.connect(("127.0.0.1", port or D.port))
    t0 = time.time()
    s.sendall(data)
    out = b""
    try:
        while chunk := s.recv(65536):
            out += chunk
    except ConnectionResetError:
        pass
    s.close()
    return out, time.time() - t0


def json_error_once(out, status):
    """One response, the OpenAI error object, then the connection closed."""
    assert len(re.findall(rb"HTTP/1\.1 \d{3} ", out)) == 1, out[:600]
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 %d " % status), out[:300]
    assert b"connection: close" in head.lower(), head
    n = int(re.search(rb"(?i)content-length: (\d+)", head).group(1))
    assert len(body) == n, (n, body)
    return json.loads(body)["error"]


def test_http_framing():
    """RFC 9112 §6.3: a body length a proxy could read differently is a 400
    (501 for a transfer coding we do not know) and the connection closes;
    a Content-Length libmicrohttpd cannot parse gets our JSON error once
    (MHD 0.9.75 itself sent an HTML page with its status line twice)."""
    body = b'{"model":"mkad-tiny","prompt":[1],"max_tokens":1}'
    post = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    cases = [
        (400, post + b"Content-Length: %d\r\nContent-Length: 5\r\n\r\n" % len(body) + body),
        (400, post + b"Transfer-Encoding: gzip\r\n\r\n" + body),
        (400, post + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: gzip\r\n\r\n0\r\n\r\n"),
        (501, post + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n"),
        (400, post + b"Transfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n"),
        (400, b"GET /health HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n"),
        (400, post + b"Content-Length: abc\r\n\r\n" + body),
        (400, post + b"Content-Length: -1\r\n\r\n"),
        (400, post + b"Content-Length: 69 \r\n\r\n" + body),
        (400, post + b"Content-Length: 5, 5\r\n\r\nhello"),
        (413, post + b"Content-Length: 99999999999999999999999\r\n\r\n"),
        (400, b"GET /health HTTP/1.1\r\nConnection: close\r\n\r\n"),
        (400, b"GET /health HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"),
    ]
    for status, data in cases:
        out, dt = raw_exchange(data)
        err = json_error_once(out, status)
        assert err["type"] == "invalid_request_error" and dt < 2, (data, err, dt)
    # the same value twice is one length (RFC 9112 allows it); HTTP/1.0 needs no Host
    out, _ = raw_exchange(post + b"Content-Length: %d\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
                          % (len(body), len(body)) + body)
    assert out.startswith(b"HTTP/1.1 200"), out[:300]
    out, _ = raw_exchange(b"GET /health HTTP/1.0\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 200"), out[:300]
    assert http("GET", D.base + "/health")[0] == 200


def test_mhd_own_errors():
    """What libmicrohttpd 0.9.75 answers before mkad sees the request
    (docs/api.md, Errors): an HTML page with the right status, once, and the
    connection closed."""
    cases = [
        (505, b"GET /health HTTP/2.0\r\nHost: x\r\n\r\n"),
        (400, b"GET /health\r\n\r\n"),
        (400, b"GET /health HTTP/1.1\r\nHost: x\r\nNo colon here\r\n\r\n"),
        (414, b"GET /" + b"a" * 40000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"),
        (431, b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"X-Big: " + b"v" * 40000 + b"\r\n\r\n"),
    ]
    for status, data in cases:
        out, dt = raw_exchange(data)
        assert out.startswith(b"HTTP/1.1 %d " % status), out[:300]
        assert len(re.findall(rb"HTTP/1\.1 \d{3} ", out)) == 1 and b"<html>" in out, out[:300]
        assert dt < 2, dt
    assert http("GET", D.base + "/health")[0] == 200


def test_request_read_deadline():
    """A request must arrive whole within request_read_timeout, whatever the
    pace: a client trickling a byte at a time (which restarted the idle
    timeout on every byte) is cut off; a slow but timely one is served."""
    d = Daemon("--request-read-timeout", "1", "--http-timeout", "10", "--log-requests=false")
    try:
        def trickle(data, pause):
            s = socket.create_connection(("127.0.0.1", d.port), timeout=10)
            t0 = time.time()
            try:
                for i in range(len(data)):
                    s.sendall(data[i:i + 1])
                    time.sleep(pause)
                    if time.time() - t0 > 8:
                        break
                s.settimeout(5)
                out = s.recv(4096)
            except (BrokenPipeError, ConnectionResetError):
                out = b""
            s.close()
            return out, time.time() - t0

        body = json.dumps({"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 1}).encode()
        head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n" % len(body))
        for data in (b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"X: y\r\n" * 20,  # headers
                     head + body):                                               # body
            out, dt = trickle(data, 0.25)
            assert out == b"" and dt < 3.5, (out, dt)
        # keep-alive: the deadline restarts after each response
        s = socket.create_connection(("127.0.0.1", d.port), timeout=10)
        for _ in range(3):
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert s.recv(4096).startswith(b"HTTP/1.1 200")
            time.sleep(0.6)
        s.close()
        out, dt = trickle(head + body, 0.5 / len(head + body))  # slow, within the deadline
        assert out.startswith(b"HTTP/1.1 200"), out
        assert metrics(d)["mkad_http_read_timeouts_total"] == 2
    finally:
        assert d.stop() == 0


def test_per_ip_limit_keeps_health_reachable():
    """1,030 half-sent requests from one client address take at most
    max_connections_per_ip slots (the rest are closed at once): /health
    stays reachable from another address; the log collapses the refusals."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1200:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    d = Daemon("--log-requests=false")
    socks = []
    try:
        for _ in range(1030):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.2", 0))
            s.connect(("127.0.0.1", d.port))
            s.sendall(b"GET /hea")
            socks.append(s)
        t0 = time.time()
        st, _, body = http("GET", d.base + "/health", timeout=5)
        assert st == 200 and time.time() - t0 < 2, (st, body)
        time.sleep(0.5)
        closed = 0
        for s in socks:
            s.setblocking(False)
            try:
                closed += s.recv(1) == b""
            except BlockingIOError:
                pass
            except ConnectionResetError:
                closed += 1
        assert closed == 1030 - 256, closed  # max_connections_per_ip defaults to 256
        with d.cv:
            refusals = [l for l in d.lines if "connection limit" in l]
        assert 1 <= len(refusals) <= 10, refusals[:20]
        assert any("repeated=" in l for l in refusals) or len(refusals) == 1, refusals
    finally:
        for s in socks:
            s.close()
        assert d.stop() == 0


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
        assert_error(*http("POST", d.base + "/tokenize", {"prompt": "a"})[::2], 401)
        assert http("POST", d.base + "/tokenize", {"prompt": "a"}, {"Authorization": "Bearer k1"})[0] == 200
    finally:
        assert d.stop() == 0


def test_users_isolated_and_admin_routes():
    """Keys map to users; a session id is per user (one user never reaches
    another's state, resident or stored, even with the same id); /admin
    needs a key of a user in admin_users (or, without keys, loopback), and
    inspects and evicts per user and tier."""
    d = Daemon("--api-keys", "alice:ka,bob:kb,root:kr", "--admin-users", "root")
    H = lambda k: {"Authorization": "Bearer " + k}  # noqa: E731
    eb = dict(IDS, session_id="same-name")
    pa, pb = list(range(10, 110)), list(range(300, 400))
    try:
        ca, cb = d.client(key="ka"), d.client(key="kb")
        ra = completion(ca, seed=1, max_tokens=8, prompt=pa, extra_body=eb)
        completion(cb, seed=2, max_tokens=8, prompt=pb, extra_body=eb)
        pa2 = pa + ra.choices[0].model_extra["token_ids"] + [5]
        # bob sends alice's history on the same session id: nothing of hers is reused
        assert completion(cb, seed=3, max_tokens=4, prompt=pa2, extra_body=eb).usage.prompt_tokens_details.cached_tokens == 0
        assert completion(ca, seed=3, max_tokens=4, prompt=pa2, extra_body=eb).usage.prompt_tokens_details.cached_tokens == 107
        wait_metric(lambda m: m["mkad_session_write_queue"] == 0 and m["mkad_session_writes_total"] == 4, d=d)
        # admin routes: no key 401, a user's key 403, an admin key 200
        assert_error(*http("GET", d.base + "/admin/memory")[::2], 401)
        assert_error(*http("GET", d.base + "/admin/memory", headers=H("ka"))[::2], 403)
        st, _, body = http("GET", d.base + "/admin/memory", headers=H("kr"))
        mem = json.loads(body)
        assert st == 200 and mem["tiers"]["disk"]["sessions"] == 2 and mem["tiers"]["hbm"]["sessions"] == 2, mem
        st, _, body = http("GET", d.base + "/admin/sessions?user=alice", headers=H("kr"))
        lst = json.loads(body)["data"]
        assert st == 200 and [(x["user"], x["id"]) for x in lst] == [("alice", "same-name")], lst
        st, _, body = http("GET", d.base + "/admin/sessions?limit=1", headers=H("kr"))
        page = json.loads(body)
        assert page["has_more"] and page["next_after_user"] == "alice", page
        st, _, body = http("GET", d.base + "/admin/sessions?limit=1&after_user=alice&after=same-name", headers=H("kr"))
        assert [x["user"] for x in json.loads(body)["data"]] == ["bob"], body
        st, _, body = http("GET", d.base + "/admin/sessions/same-name?user=bob", headers=H("kr"))
        det = json.loads(body)
        assert st == 200 and det["tiers"]["hbm"]["busy"] is False and det["tiers"]["disk"]["blocks"] >= 3, det
        assert_error(*http("GET", d.base + "/admin/sessions/nope?user=bob", headers=H("kr"))[::2], 404)
        for bad in ("0", "abc", "5000", ""):
            st, _, body = http("GET", d.base + "/admin/sessions?limit=" + bad, headers=H("kr"))
            assert_error(st, body, 400)
            assert "limit" in json.loads(body)["error"]["message"], body
        # evict bob's session everywhere; alice's with the same id stays
        st, _, body = http("DELETE", d.base + "/admin/sessions/same-name?user=bob", headers=H("kr"))
        assert st == 200 and json.loads(body)["evicted"] == ["hbm", "host", "disk"], body
        assert_error(*http("GET", d.base + "/admin/sessions/same-name?user=bob", headers=H("kr"))[::2], 404)
        assert http("GET", d.base + "/admin/sessions/same-name?user=alice", headers=H("kr"))[0] == 200
        assert_error(*http("DELETE", d.base + "/admin/sessions/same-name?user=alice&tier=gpu",
                           headers=H("kr"))[::2], 400)
        st, _, body = http("DELETE", d.base + "/admin/sessions/same-name?user=alice&tier=hbm", headers=H("kr"))
        assert st == 200 and json.loads(body)["evicted"] == ["hbm"], body
        st, _, body = http("POST", d.base + "/admin/compact", headers=H("kr"))
        assert st == 200 and json.loads(body)["blocks_deleted"] == 0, body  # bob's went with him
        disk = json.loads(http("GET", d.base + "/admin/memory", headers=H("kr"))[2])["tiers"]["disk"]
        assert disk["sessions"] == 1 and disk["blocks"] == 3, (disk, mem)  # alice's 3 full blocks
        st, _, body = http("GET", d.base + "/admin/users/alice/longterm", headers=H("kr"))
        assert st == 200 and json.loads(body)["chunks"] == 1, body  # positions 0..63 of her session
        # alice resumes from the store (no longer resident); bob's is gone
        r = completion(ca, seed=3, max_tokens=4, prompt=pa2 + [6], extra_body=eb)
        assert r.usage.prompt_tokens_details.cached_tokens >= 96, r.usage
        assert completion(cb, seed=3, max_tokens=4, prompt=pb + [6], extra_body=eb).usage.prompt_tokens_details.cached_tokens == 0
    finally:
        assert d.stop() == 0
    # without keys every request is the local user and /admin answers loopback
    st, _, body = http("GET", D.base + "/admin/memory")
    assert st == 200 and "tiers" in json.loads(body), body


def test_longterm_memory_follows_the_user():
    """FastMKA's L3: the chunks of a user's sessions become that user's
    long-term memory; a new session of the user binds the top R of them as
    its L3 bank (another user's new session gets none), the bank is stored
    with the session and bound again when it resumes after a restart (same
    output as the resident run), and deleting the memory empties it."""
    d = Daemon("--api-keys", "alice:ka,bob:kb,root:kr", "--admin-users", "root")
    H = {"Authorization": "Bearer kr"}
    pa, pq = list(range(5, 205)), list(range(7, 100))
    try:
        ca = d.client(key="ka")
        completion(ca, seed=1, max_tokens=8, prompt=pa, extra_body=dict(IDS, session_id="A"))
        wait_metric(lambda m: m.get("mkad_longterm_chunks_written_total", 0) >= 3 and
                    m["mkad_session_write_queue"] == 0, d=d)
        rb = completion(ca, seed=2, max_tokens=8, prompt=pq, extra_body=dict(IDS, session_id="B"))
        completion(d.client(key="kb"), seed=2, max_tokens=8, prompt=pq, extra_body=dict(IDS, session_id="C"))
        assert any("event=session_new session=B user=alice l3_bank=3" in l for l in d.lines), d.lines[-10:]
        assert any("event=session_new session=C user=bob l3_bank=0" in l for l in d.lines), d.lines[-10:]
        pq2 = pq + rb.choices[0].model_extra["token_ids"] + [9]
        r_res = completion(ca, seed=3, max_tokens=8, prompt=pq2, extra_body=dict(IDS, session_id="B"))
        det = json.loads(http("GET", d.base + "/admin/sessions/B?user=alice", headers=H)[2])
        assert len(det["l3_bank"]) == 3, det
        wait_metric(lambda m: m["mkad_session_write_queue"] == 0, d=d)
    finally:
        assert d.stop() == 0
    d = Daemon("--api-keys", "alice:ka,bob:kb,root:kr", "--admin-users", "root", state=d.state)
    try:
        ca = d.client(key="ka")
        r_st = completion(ca, seed=3, max_tokens=8, prompt=pq2, extra_body=dict(IDS, session_id="B"))
        assert r_st.usage.prompt_tokens_details.cached_tokens > 0
        assert any("event=session_resumed session=B" in l and "l3_bank=3" in l for l in d.lines), d.lines[-10:]
        same(r_st.choices[0].model_extra["token_ids"], r_res.choices[0].model_extra["token_ids"])
        st, _, body = http("GET", d.base + "/admin/users/alice/longterm", headers=H)
        assert st == 200 and json.loads(body)["chunks"] >= 4, body  # A's 3 and B's first
        assert json.loads(http("GET", d.base + "/admin/users/bob/longterm", headers=H)[2])["chunks"] == 1
        st, _, body = http("DELETE", d.base + "/admin/users/alice/longterm", headers=H)
        assert st == 200 and json.loads(body)["deleted_chunks"] >= 4, body
        completion(ca, seed=2, max_tokens=4, prompt=pq, extra_body=dict(IDS, session_id="D"))
        assert any("event=session_new session=D user=alice l3_bank=0" in l for l in d.lines), d.lines[-10:]
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
    # api_keys that name no key (a stray comma) used to turn authentication off
    p = subprocess.run([ARGS.mkad, "--model", ARGS.model, "--port", "0", "--api-keys", " , "],
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=20)
    assert p.returncode != 0 and "no key" in p.stderr, p.stderr[-500:]


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


def test_no_max_tokens_stops_at_pool_limit():
    """Without max_tokens a chat (and a completion with default_max_tokens 0)
    runs until the context or the K/V pool is full and ends with
    finish_reason "length", even when the pool holds less than one context
    (it was a 400 "needs 128 K/V blocks")."""
    d = Daemon("--kv-mem-mb", "1", "--default-max-tokens", "0", "--log-requests=false")
    try:
        pool = int(metrics(d)["mkad_kv_blocks_total"]) * 32
        assert pool < 4096, pool  # less than one full context (max_ctx 4096)
        c = d.client()
        r = c.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "hi"}],
                                      seed=1, extra_body={"ignore_eos": True})
        assert r.choices[0].finish_reason == "length", r
        assert r.usage.prompt_tokens + r.usage.completion_tokens == pool, (r.usage, pool)
        chunks = list(c.completions.create(model=MODEL_NAME, prompt=PROMPT, seed=1, stream=True,
                                           stream_options={"include_usage": True},
                                           extra_body={"ignore_eos": True}))
        assert chunks[-2].choices[0].finish_reason == "length"
        assert chunks[-1].usage.completion_tokens == pool - len(PROMPT), chunks[-1].usage
        # an explicit max_tokens beyond the pool is still refused
        st, _, body = http("POST", d.base + "/v1/completions",
                           {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": pool})
        assert_error(st, body, 400)
        m = metrics(d)
        assert m["mkad_kv_blocks_used"] <= m["mkad_prefix_cache_blocks"], m
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
    # a deadline of 0: the stream is still running when it passes on any
    # backend (the CUDA backend writes the tiny model's 4,000 tokens in < 1 s)
    d = Daemon("--shutdown-timeout", "0")
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
    global ARGS, D, EXACT
    ap = argparse.ArgumentParser()
    ap.add_argument("--mkad", default=os.path.join(BUILD, "mkad"))
    ap.add_argument("--model", default=os.path.join(SRC, "models", "mkad-tiny"))
    ap.add_argument("-k", default="")
    ARGS = ap.parse_args()
    tests = [(n, f) for n, f in globals().items() if n.startswith("test_") and ARGS.k in n]
    D = Daemon("--http-timeout", "2", "--log-requests=false")
    EXACT = json.loads(http("GET", D.base + "/v1/models")[2])["data"][0].get("backend", "cpu") == "cpu"
    print("backend exact:", EXACT, flush=True)
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
