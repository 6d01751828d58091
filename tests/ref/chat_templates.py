"""chat_templates.py -- real Hugging Face chat templates: jinja2 (as
transformers renders them) against mkad's interpreter, byte for byte.

The templates are not committed: they come from a pinned PyPI package that
vendors them.  llama-cpp-python's source distribution carries llama.cpp's
models/templates/, verbatim copies of the chat templates of many Hub models
(Llama 3.x, Qwen2.5/Qwen3, Mistral, Gemma, Phi, SmolLM, DeepSeek, ...).

  chat_templates.py prepare WORKDIR FIXTURE_TOKENIZER_DIR
      fetch the package with pip (sha256-pinned; cached in WORKDIR),
      extract the templates, and write WORKDIR/cases.json (the input of
      `tests/test_jinja --render`) and WORKDIR/expected.json (jinja2's
      renderings).  Exit 77 when PyPI cannot be reached.
  chat_templates.py compare WORKDIR GOT.json
      compare mkad's renderings with jinja2's; print one line per template;
      exit 1 on any difference.

Each template gets a model directory of its own (the fixture tokenizer.json
plus the special tokens the template writes, as special added tokens, and
a tokenizer_config.json with its bos/eos and the template), so the cases
also check that mkad's injection-proof encoding (special tokens read only
from the template) gives the ids of encoding the whole text (ids_match).

The reference rendering is transformers' (5.x, utils/chat_template_utils.py):
ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
extensions=[loopcontrols, {% generation %}]), its tojson, raise_exception,
strftime_now, dict and namespace; messages with None values dropped and
reasoning fields aliased; special tokens, then kwargs, as variables.  When
transformers is installed its own render_jinja_template is run too, to
check this replica.
"""
import copy
import datetime
import json
import os
import re
import subprocess
import sys
import tarfile

PACKAGE = "llama-cpp-python"
VERSION = "0.3.36"
SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
NOW = 1700000000  # strftime_now's clock on both sides (TZ=UTC)

# Family of each template file: which bos/eos the model's tokenizer_config has.
LLAMA = ("<|begin_of_text|>", "<|eot_id|>")
QWEN = (None, "<|im_end|>")
DEEPSEEK = ("<\uff5cbegin\u2581of\u2581sentence\uff5c>", "<\uff5cend\u2581of\u2581sentence\uff5c>")
MISTRAL = ("<s>", "</s>")
GEMMA = ("<bos>", "<eos>")
PHI = ("<s>", "<|endoftext|>")
FAMILY = [  # (substring of the file name, tokens)
    ("llama-3", LLAMA), ("Llama-3", LLAMA), ("Hermes", LLAMA), ("functionary", LLAMA),
    ("Qwen", QWEN), ("SmolLM3", QWEN), ("deepseek", DEEPSEEK), ("Mistral", MISTRAL), ("mistral", MISTRAL),
    ("Ministral", MISTRAL), ("gemma", GEMMA), ("Phi-3", PHI),
]
# The families issue 8 names: these must all match.
REQUIRED = [
    "meta-llama-Llama-3.1-8B-Instruct.jinja", "meta-llama-Llama-3.2-3B-Instruct.jinja",
    "meta-llama-Llama-3.3-70B-Instruct.jinja", "Qwen-Qwen2.5-7B-Instruct.jinja", "Qwen-Qwen3-0.6B.jinja",
    "Qwen-QwQ-32B.jinja", "mistralai-Mistral-Nemo-Instruct-2407.jinja", "Mistral-Small-3.2-24B-Instruct-2506.jinja",
    "google-gemma-2-2b-it.jinja", "microsoft-Phi-3.5-mini-instruct.jinja", "HuggingFaceTB-SmolLM3-3B.jinja",
    "deepseek-ai-DeepSeek-R1-Distill-Llama-8B.jinja", "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.jinja",
    "deepseek-ai-DeepSeek-V3.1.jinja",
]
# Templates of the package that mkad renders differently, and why.  Every
# other template of the package must match too.
KNOWN_DIFFERENT = {}

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Get the current weather in a city",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "description": "The city, e.g. Paris"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "add", "description": "Add two numbers",
        "parameters": {"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
                       "required": ["a", "b"]}}},
]
CALL = {"id": "abcDEF123", "type": "function",
        "function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}}
SYS = {"role": "system", "content": "You are a terse assistant."}
CONVS = {
    "user": [{"role": "user", "content": "Hello!"}],
    "system": [SYS, {"role": "user", "content": "Hello!"}],
    "multi": [SYS, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
              {"role": "user", "content": "What's 2+2?"}],
    "multi_nosys": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                    {"role": "user", "content": "What's 2+2?"}],
    "unicode": [{"role": "user", "content": "  \u65e5\u672c\u8a9e \U0001F600 e\u0301 \"q\" \\ <b>\n"},
                {"role": "assistant", "content": "\tok\u3000"}, {"role": "user", "content": "again"}],
    "reasoning": [{"role": "user", "content": "2+2?"},
                  {"role": "assistant", "content": "4", "reasoning_content": "Two and two make four."},
                  {"role": "user", "content": "3+3?"}],
    "tools": [SYS, {"role": "user", "content": "Weather in Paris?"},
              {"role": "assistant", "content": "", "tool_calls": [CALL]},
              {"role": "tool", "tool_call_id": "abcDEF123", "name": "get_weather",
               "content": "{\"temperature\": 20, \"unit\": \"celsius\"}"},
              {"role": "assistant", "content": "It is 20 C."}, {"role": "user", "content": "Thanks!"}],
    "tools_nosys": [{"role": "user", "content": "Weather in Paris?"},
                    {"role": "assistant", "content": None, "tool_calls": [CALL]},
                    {"role": "tool", "tool_call_id": "abcDEF123", "content": "20 C"}],
    "parts": [{"role": "user", "content": [{"type": "text", "text": "Describe"}, {"type": "text", "text": "this."}]}],
    "continue": [{"role": "user", "content": "Tell a story."}, {"role": "assistant", "content": "Once upon a time"}],
}


def log(*a):
    print("chat_templates:", *a, file=sys.stderr)


# ---- fetching -------------------------------------------------------------------

def pip(*args):
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True)


def ensure_module(mod, pkg):
    try:
        __import__(mod)
        return True
    except ImportError:
        pass
    for extra in ([], ["--break-system-packages"]):
        if pip("install", "-q", *extra, pkg).returncode == 0:
            return True
    return False


def fetch(workdir):
    """The templates directory; fetched once per pinned version."""
    tdir = os.path.join(workdir, "templates")
    stamp = os.path.join(tdir, ".sha256")
    if os.path.exists(stamp) and open(stamp).read().strip() == SHA256:
        return tdir
    src = os.environ.get("CHAT_TEMPLATES_SDIST")  # a local copy of the sdist, for offline runs
    if not src:
        if pip("index", "versions", PACKAGE).returncode != 0:
            log("SKIP: PyPI cannot be reached (pip index versions %s failed)" % PACKAGE)
            sys.exit(77)
        # pip reads an sdist's metadata through its build backend; with the
        # backend installed here that takes seconds instead of a build
        # environment's minute.
        if not ensure_module("scikit_build_core", "scikit-build-core"):
            sys.exit("chat_templates: cannot install scikit-build-core (needed to download %s)" % PACKAGE)
        dl = os.path.join(workdir, "dl")
        os.makedirs(dl, exist_ok=True)
        req = os.path.join(workdir, "requirements.txt")
        with open(req, "w") as f:
            f.write("%s==%s --hash=sha256:%s\n" % (PACKAGE, VERSION, SHA256))
        r = pip("download", "-q", "--no-deps", "--no-binary", ":all:", "--no-build-isolation", "--require-hashes",
                "-r", req, "-d", dl)
        if r.returncode != 0:
            sys.exit("chat_templates: pip download %s==%s failed:\n%s" % (PACKAGE, VERSION, r.stderr[-2000:]))
        src = os.path.join(dl, "llama_cpp_python-%s.tar.gz" % VERSION)
    os.makedirs(tdir, exist_ok=True)
    n = 0
    with tarfile.open(src) as tf:
        for m in tf.getmembers():
            if "/models/templates/" in m.name and m.name.endswith(".jinja") and m.isfile():
                with open(os.path.join(tdir, os.path.basename(m.name)), "wb") as out:
                    out.write(tf.extractfile(m).read())
                n += 1
    if n == 0:
        sys.exit("chat_templates: %s has no models/templates/*.jinja" % src)
    with open(stamp, "w") as f:
        f.write(SHA256 + "\n")
    log("extracted %d templates from %s" % (n, os.path.basename(src)))
    return tdir


# ---- the reference: transformers' rendering ------------------------------------------

def environment():
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class AssistantTracker(jinja2.ext.Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_generation_support"), [], [], body).set_lineno(lineno)

        def _generation_support(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.datetime.fromtimestamp(NOW).strftime(fmt)

    class TemplateNamespace(jinja2.utils.Namespace):
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check_name(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError("underscore-prefixed namespace attribute %r" % name)

    class TemplateDict:
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[AssistantTracker, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = TemplateDict()
    env.globals["namespace"] = TemplateNamespace
    return env


REASONING = ("reasoning_content", "thinking", "reasoning")


def normalize(messages):
    """apply_chat_template's _normalize_chat_messages and _alias_reasoning_fields."""
    out = []
    for m in messages:
        m = {k: v for k, v in m.items() if v is not None}
        r = next((m[k] for k in REASONING if m.get(k) is not None), None)
        if r is not None:
            m = {"thinking": r, **m, "reasoning_content": r}
        out.append(m)
    return out


def iterates_content(env, src):
    """vLLM's test for a template that wants OpenAI content parts: a for loop
    over some value's 'content'."""
    import jinja2.nodes as n
    for node in env.parse(src).find_all(n.For):
        it = node.iter
        if isinstance(it, n.Getattr) and it.attr == "content":
            return True
        if isinstance(it, n.Getitem) and isinstance(it.arg, n.Const) and it.arg.value == "content":
            return True
    return False


def reference(tpl, messages, tools, gen, cont, kwargs, special):
    """(status, text) of the compiled template tpl: 'ok', 'raise'
    (raise_exception) or 'error'."""
    import jinja2
    tag = "CONTINUE_FINAL_MESSAGE_TAG "
    messages = normalize(copy.deepcopy(messages))
    if cont:
        messages[-1]["content"] = messages[-1]["content"] + tag
    try:
        text = tpl.render(messages=messages, tools=tools, documents=None, add_generation_prompt=gen,
                          **{**special, **kwargs})
    except jinja2.exceptions.TemplateError as e:
        if type(e) is jinja2.exceptions.TemplateError:
            return "raise", str(e)
        return "error", "%s: %s" % (type(e).__name__, e)
    except Exception as e:  # TypeError and the like, from inside the template
        return "error", "%s: %s" % (type(e).__name__, e)
    if cont:
        at = text.rfind(tag.strip())
        if at < 0:
            return "error", "continue_final_message: the final message is not in the output"
        text = text[:at] if text[at:at + len(tag)] == tag else text[:at].rstrip()
    return "ok", text


def transformers_check(src, messages, tools, gen, kwargs, special, want):
    """The replica against transformers itself, when it is installed."""
    try:
        from transformers.utils import chat_template_utils as ctu
    except Exception:
        return None
    ctu._compile_jinja_template(src).globals["strftime_now"] = \
        lambda fmt: datetime.datetime.fromtimestamp(NOW).strftime(fmt)
    try:
        got, _ = ctu.render_jinja_template(conversations=[normalize(copy.deepcopy(messages))], tools=tools,
                                           chat_template=src, add_generation_prompt=gen, **{**special, **kwargs})
        got = got[0]
    except Exception:
        return None  # the replica decides about errors
    return got == want


# ---- cases ----------------------------------------------------------------------------

SPECIAL_RE = re.compile(r"<\|[^|<>\s'\"]{1,48}\|>|<\uff5c[^\uff5c<>'\"]{1,48}\uff5c>|\[/?[A-Z][A-Z_]{1,30}\]|"
                        r"</?(?:start_of_turn|end_of_turn|think|tool_call|tool_response|bos|eos|s)>")


def openai_to_template(conv, parts_native):
    """What an OpenAI-compatible server hands the template for these messages,
    as vLLM does (and mkad): a null or absent content is "" (no parts, [],
    for a template that loops over content parts); text parts are joined
    with "\n" for a template that wants a string."""
    out = []
    for m in conv:
        m = dict(m)
        c = m.get("content")
        if c is None:
            m["content"] = [] if parts_native else ""
        elif isinstance(c, list) and not parts_native:
            m["content"] = "\n".join(p["text"] for p in c)
        out.append(m)
    return out


def family(name):
    for sub, toks in FAMILY:
        if sub in name:
            return toks
    return ("<s>", "</s>")


def model_dir(workdir, name, src, tok_json, bos, eos):
    """A directory with the fixture tokenizer, the template's special tokens
    added, and a tokenizer_config.json holding the template."""
    d = os.path.join(workdir, "models", name.replace(".jinja", ""))
    os.makedirs(d, exist_ok=True)
    tok = copy.deepcopy(tok_json)
    have = {t["content"] for t in tok.get("added_tokens", [])}
    next_id = max([t["id"] for t in tok.get("added_tokens", [])] + list(tok["model"]["vocab"].values())) + 1
    for s in sorted(set(SPECIAL_RE.findall(src)) | {t for t in (bos, eos) if t}):
        if s in have:
            continue
        tok["added_tokens"].append({"id": next_id, "content": s, "single_word": False, "lstrip": False,
                                    "rstrip": False, "normalized": False, "special": True})
        next_id += 1
        have.add(s)
    with open(os.path.join(d, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(tok, f, ensure_ascii=False)
    cfg = {"bos_token": bos, "eos_token": eos, "chat_template": src,
           "model_max_length": 1000000000000000019884624838656}
    with open(os.path.join(d, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, ensure_ascii=False)
    return d


def prepare(workdir, fixture):
    os.makedirs(workdir, exist_ok=True)
    if not ensure_module("jinja2", "jinja2"):
        if pip("index", "versions", "jinja2").returncode != 0:
            log("SKIP: PyPI cannot be reached to install jinja2")
            sys.exit(77)
        sys.exit("chat_templates: cannot install jinja2")
    tdir = fetch(workdir)
    env = environment()
    tok_json = json.load(open(os.path.join(fixture, "tokenizer.json"), encoding="utf-8"))
    cases, expected = [], []
    names = sorted(f for f in os.listdir(tdir) if f.endswith(".jinja"))
    missing = [r for r in REQUIRED if r not in names]
    if missing:
        sys.exit("chat_templates: the package lacks %s" % ", ".join(missing))
    cross = {"checked": 0, "differ": []}
    for name in names:
        src = open(os.path.join(tdir, name), encoding="utf-8").read()
        bos, eos = family(name)
        special = {k: v for k, v in (("bos_token", bos), ("eos_token", eos)) if v}
        d = model_dir(workdir, name, src, tok_json, bos, eos)
        parts_native = iterates_content(env, src)
        tpl = env.from_string(src)
        kw_sets = [{}]
        if "enable_thinking" in src:
            kw_sets += [{"enable_thinking": False}, {"enable_thinking": True}]
        for conv_name, conv in CONVS.items():
            tools = TOOLS if conv_name.startswith("tools") else None
            py_conv = openai_to_template(conv, parts_native)
            for kw in kw_sets:
                for gen, cont in ((False, False), (True, False)) if conv_name != "continue" else ((False, True),):
                    status, text = reference(tpl, py_conv, tools, gen, cont, kw, special)
                    if status == "ok" and not cont:
                        same = transformers_check(src, py_conv, tools, gen, kw, special, text)
                        if same is not None:
                            cross["checked"] += 1
                            if not same:
                                cross["differ"].append("%s/%s" % (name, conv_name))
                    req = {"messages": conv, "add_generation_prompt": gen, "continue_final_message": cont}
                    if tools:
                        req["tools"] = tools
                    if kw:
                        req["chat_template_kwargs"] = kw
                    cases.append({"dir": d, "request": req, "now": NOW})
                    expected.append({"template": name, "conv": conv_name, "gen": gen, "kwargs": kw,
                                     "status": status, "text": text})
    if cross["differ"]:
        sys.exit("chat_templates: this script's rendering differs from transformers' for %s" %
                 ", ".join(cross["differ"][:10]))
    if cross["checked"]:
        log("the reference agrees with transformers' render_jinja_template on %d renderings" % cross["checked"])
    with open(os.path.join(workdir, "cases.json"), "w", encoding="utf-8") as f:
        json.dump({"cases": cases}, f, ensure_ascii=False)
    with open(os.path.join(workdir, "expected.json"), "w", encoding="utf-8") as f:
        json.dump(expected, f, ensure_ascii=False)
    log("%d cases over %d templates" % (len(cases), len(names)))


# ---- comparing ---------------------------------------------------------------------------

ENG_EINVAL = -1


def compare(workdir, got_path):
    expected = json.load(open(os.path.join(workdir, "expected.json"), encoding="utf-8"))
    got = json.load(open(got_path, encoding="utf-8"))
    if len(got) != len(expected):
        sys.exit("chat_templates: %d results for %d cases" % (len(got), len(expected)))
    per = {}
    for e, g in zip(expected, got):
        t = per.setdefault(e["template"], {"n": 0, "bad": [], "ok": 0})
        t["n"] += 1
        what = "%s gen=%s %s" % (e["conv"], e["gen"], json.dumps(e["kwargs"]) if e["kwargs"] else "")
        if e["status"] == "ok":
            if "text" not in g:
                t["bad"].append("%s: mkad failed: %s" % (what, g.get("error")))
            elif g["text"] != e["text"]:
                a, b = e["text"], g["text"]
                i = next((k for k in range(min(len(a), len(b))) if a[k] != b[k]), min(len(a), len(b)))
                t["bad"].append("%s: differs at %d: jinja2 %r, mkad %r" % (what, i, a[max(0, i - 30):i + 40],
                                                                         b[max(0, i - 30):i + 40]))
            elif not g.get("ids_match"):
                t["bad"].append("%s: the injection-proof encoding differs from encoding the text" % what)
            else:
                t["ok"] += 1
        elif e["status"] == "raise":
            if "error" not in g or g.get("status") != ENG_EINVAL or e["text"] not in g["error"]:
                t["bad"].append("%s: jinja2 raised %r, mkad: %r" % (what, e["text"], g.get("error", g.get("text"))))
            else:
                t["ok"] += 1
        else:
            if "error" not in g:
                t["bad"].append("%s: jinja2 failed (%s), mkad rendered" % (what, e["text"][:200]))
            else:
                t["ok"] += 1
    failed = 0
    for name in sorted(per):
        t = per[name]
        tag = "required" if name in REQUIRED else "known" if name in KNOWN_DIFFERENT else "other"
        if t["bad"]:
            if name in KNOWN_DIFFERENT:
                print("KNOWN  %s: %d of %d cases differ (%s)" % (name, len(t["bad"]), t["n"], KNOWN_DIFFERENT[name]))
                continue
            failed += 1
            print("FAIL   %s [%s]: %d of %d cases differ" % (name, tag, len(t["bad"]), t["n"]))
            for b in t["bad"][:5]:
                print("         " + b)
        else:
            print("PASS   %s [%s]: %d cases" % (name, tag, t["n"]))
    npass = sum(1 for t in per.values() if not t["bad"])
    print("chat_templates: %d templates byte-identical, %d differ" % (npass, len(per) - npass))
    return 1 if failed else 0


def main():
    if len(sys.argv) == 4 and sys.argv[1] == "prepare":
        prepare(sys.argv[2], sys.argv[3])
    elif len(sys.argv) == 4 and sys.argv[1] == "compare":
        sys.exit(compare(sys.argv[2], sys.argv[3]))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
