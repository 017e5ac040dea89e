"""`lsaq-run serve`: the OpenAI API on loopback, driven by the official `openai` client and by
raw HTTP; variant switches under simulated memory pressure; queueing, disconnects, bad input.

Every answer is compared with what the runtime itself generates with the same variant
(Model.generate, or `lsaq-run --variant`), so a server that answered from the wrong variant,
mangled the stream or lost tokens fails."""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import openai
import pytest

import lsaq_runtime
from lsaq_runtime.serve.engine import Engine, StopText
from lsaq_runtime.cli import main
from lsaq_runtime.serve.server import background
from lsaq_runtime.sizes import format_size

REPO = Path(__file__).resolve().parents[2]
# Child processes see what this one sees (an overlay of older packages too: the floor check).
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(
    [p for p in (str(REPO / "runtime"), str(REPO), os.environ.get("PYTHONPATH")) if p])}
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
MODEL = "tiny-llama"
CONTEXT = 128
PROMPT = "the quick brown fox"


@pytest.fixture(scope="module")
def chat_bundle(tiny_bundle, tmp_path_factory) -> Path:
    """The tiny bundle with a chat template (the manifest carries it; no file hash changes)."""
    copy = tmp_path_factory.mktemp("serve") / "tiny-chat"
    shutil.copytree(tiny_bundle, copy)
    m = json.loads((copy / "manifest.json").read_text())
    m["tokenizer"]["chat_template"] = TEMPLATE
    (copy / "manifest.json").write_text(json.dumps(m, indent=1))
    return copy


@pytest.fixture(scope="module")
def reference(chat_bundle):
    """Greedy output of the runtime itself, per variant (loaded once each)."""
    cache = {}

    def ref(variant, prompt, n, chat=False, **sampling):
        key = (variant, json.dumps(prompt), n, chat, tuple(sorted(sampling.items())))
        if key not in cache:
            with lsaq_runtime.load(chat_bundle, context=CONTEXT, device="cpu",
                                   variant=variant) as m:
                cache[key] = m.generate(prompt, max_new_tokens=n, chat=chat, **sampling)
        return cache[key]
    return ref


class Slow:
    """on_token hook: a delay per generated token, so a test can act mid-generation."""
    delay = 0.0

    def __call__(self, job):
        if self.delay:
            time.sleep(self.delay)


@pytest.fixture(scope="module")
def served(chat_bundle):
    """One in-process server (uvicorn in a thread) for the API tests; memory is not squeezed."""
    logs: list[str] = []
    slow = Slow()
    engine = Engine(chat_bundle, context=CONTEXT, device="cpu", poll=0.5, wait=5,
                    log=logs.append, on_token=slow).start()
    with background(engine) as url:
        yield {"url": url, "engine": engine, "logs": logs, "slow": slow,
               "client": openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0,
                                       timeout=60)}
    engine.close()


def raw(url: str, method: str, path: str, body: bytes | None = None,
        headers: dict | None = None) -> tuple[int, dict, bytes]:
    host, port = url.removeprefix("http://").split(":")
    c = http.client.HTTPConnection(host, int(port), timeout=30)
    c.request(method, path, body=body, headers={"Content-Type": "application/json",
                                                **(headers or {})})
    r = c.getresponse()
    data = r.read()
    c.close()
    return r.status, dict(r.getheaders()), data


def metric(url: str, name: str, labels: str = "") -> float:
    _, _, text = raw(url, "GET", "/metrics")
    m = re.search(rf"^{re.escape(name + labels)} (\S+)$", text.decode(), re.M)
    assert m, f"{name}{labels} missing from /metrics"
    return float(m.group(1))


def wait_for(cond, timeout=20.0, step=0.05, what="condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = cond()
        if v:
            return v
        time.sleep(step)
    raise AssertionError(f"timed out waiting for {what}")


# -- the API, with the official client -----------------------------------------------------------
def test_openai_client_completions_chat_and_streams_match_the_runtime(served, reference):
    c = served["client"]
    assert [m.id for m in c.models.list().data] == [MODEL]
    assert c.models.retrieve(MODEL).id == MODEL
    variant = served["engine"].current
    assert variant == "fp16"   # nothing squeezes this server: the most precise variant

    want = reference(variant, PROMPT, 12)
    r = c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0)
    assert r.choices[0].text == want and r.choices[0].finish_reason == "length"
    assert r.system_fingerprint == f"lsaq-{variant}"
    n_prompt = len(served["engine"].encode(PROMPT))
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (n_prompt, 12)

    parts = [ch.choices[0].text for ch in c.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, stream=True)]
    assert "".join(parts) == want and len([p for p in parts if p]) > 1   # really streamed

    msgs = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Name a colour."}]
    want_chat = reference(variant, msgs, 10, chat=True)
    r = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=10, temperature=0)
    assert r.choices[0].message.content == want_chat and r.choices[0].message.role == "assistant"
    # the newer parameter name, and content given as text parts
    r = c.chat.completions.create(model=MODEL, max_completion_tokens=10, temperature=0, messages=[
        {"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": "Name a colour."}])
    assert r.choices[0].message.content == want_chat

    chunks = list(c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=10,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == want_chat
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10

    # sampling with a seed: the same draw as the runtime's own sampler with that seed
    kw = dict(temperature=0.9, top_p=0.95, seed=7)
    r = c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, **kw)
    assert r.choices[0].text == reference(variant, PROMPT, 12, **kw)
    # top_k is not OpenAI's, but clients send it as an extra field (as to llama.cpp, vLLM)
    r = c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, extra_body={"top_k": 1},
                             temperature=1.5)
    assert r.choices[0].text == want

    # a stop string cuts the text before it, and says so
    long = reference(variant, PROMPT, 24)
    stop = long[len(long) // 2: len(long) // 2 + 2]
    assert stop and long.find(stop) > 0
    r = c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0, stop=[stop])
    assert r.choices[0].text == long[:long.find(stop)] and r.choices[0].finish_reason == "stop"
    parts = [ch.choices[0].text for ch in c.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0, stop=stop, stream=True)]
    assert "".join(parts) == long[:long.find(stop)]

    # the client's own error types come back for OpenAI-style errors
    with pytest.raises(openai.BadRequestError, match="Unrecognized request argument"):
        c.completions.create(model=MODEL, prompt=PROMPT, extra_body={"frobnicate": 1})
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        c.completions.create(model="gpt-4o", prompt=PROMPT)


def test_stop_text_holds_back_partial_matches():
    s = StopText(["END", "xy"])
    assert s.push("abcE") == ("abc", False)     # "E" may start "END"
    assert s.push("N") == ("", False)
    assert s.push("Dzz") == ("", True)          # "END" complete: nothing of it is sent
    s = StopText(["END"])
    assert s.push("EN") == ("", False) and s.push("x") == ("ENx", False)
    assert StopText([]).push("abc") == ("abc", False)


def test_example_client(served, reference):
    r = subprocess.run([sys.executable, str(REPO / "examples" / "serve_client.py"), served["url"],
                        "Name a colour."], capture_output=True, text=True, env=ENV, timeout=120)
    assert r.returncode == 0, r.stderr
    want = reference("fp16", [{"role": "user", "content": "Name a colour."}], 48, chat=True)
    assert r.stdout == want + "\n"
    assert "answered by lsaq-fp16; now ok with fp16" in r.stderr


def test_api_key(chat_bundle):
    engine = Engine(chat_bundle, context=CONTEXT, device="cpu", poll=60).start()
    try:
        with background(engine, api_key="s3cret") as url:
            bad = openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0)
            with pytest.raises(openai.AuthenticationError, match="Incorrect API key"):
                bad.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2)
            good = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0)
            assert good.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2).usage
            assert raw(url, "GET", "/health")[0] == 200       # monitoring stays open
            assert raw(url, "GET", "/v1/models")[0] == 401
    finally:
        engine.close()


# -- bad input, as raw HTTP -----------------------------------------------------------------------
def _chat(**kw):
    return json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **kw})


def _cmpl(**kw):
    return json.dumps({"model": MODEL, "prompt": PROMPT, **kw})


BAD = [
    # (path, body, status, param, words in the message)
    ("/v1/chat/completions", '{"model": "tiny-llama", "messages": [', 400, None, "parse the JSON"),
    ("/v1/completions", "[1, 2]", 400, None, "must be a JSON object"),
    ("/v1/completions", '{"model": "tiny-llama", "prompt": "x", "temperature": NaN}', 400, None,
     "NaN"),
    ("/v1/completions", _cmpl(frobnicate=1), 400, "frobnicate", "Unrecognized request argument"),
    ("/v1/chat/completions", _chat(max_tokens=100000), 400, "max_tokens",
     "maximum context length is 128"),
    ("/v1/chat/completions", _chat(max_completion_tokens=500), 400, "max_completion_tokens",
     "maximum context length"),
    ("/v1/completions", _cmpl(max_tokens=CONTEXT), 400, "max_tokens", "at most"),  # any prompt: past it
    ("/v1/chat/completions", json.dumps({"model": MODEL, "messages": []}), 400, "messages",
     "at least one message"),
    ("/v1/chat/completions", json.dumps({"model": MODEL, "messages": "hi"}), 400, "messages",
     "must be an array"),
    ("/v1/chat/completions", json.dumps({"model": MODEL}), 400, "messages", "provide a messages"),
    ("/v1/chat/completions", json.dumps({"model": MODEL, "messages": [{"content": "hi"}]}), 400,
     "messages[0].role", "must be one of"),
    ("/v1/chat/completions", json.dumps({"model": MODEL, "messages": [{"role": "user",
                                                                        "content": 5}]}),
     400, "messages[0].content", "must be a string"),
    ("/v1/chat/completions", _chat(max_tokens="ten"), 400, "max_tokens", "must be an integer"),
    ("/v1/chat/completions", _chat(max_tokens=0), 400, "max_tokens", "at least 1"),
    ("/v1/chat/completions", _chat(temperature="hot"), 400, "temperature", "must be a number"),
    ("/v1/chat/completions", _chat(temperature=3), 400, "temperature", "at most 2"),
    ("/v1/chat/completions", _chat(top_p=0), 400, "top_p", "more than 0"),
    ("/v1/chat/completions", _chat(stream="yes"), 400, "stream", "true or false"),
    ("/v1/chat/completions", _chat(n=2), 400, "n", "one choice per request"),
    ("/v1/chat/completions", _chat(stop=["a", "b", "c", "d", "e"]), 400, "stop", "at most 4"),
    ("/v1/chat/completions", _chat(stream_options={"include_usage": True}), 400,
     "stream_options", "only allowed when 'stream' is true"),
    ("/v1/chat/completions", _chat(tools=[{"type": "function"}]), 400, "tools", "does not call tools"),
    ("/v1/chat/completions", _chat(logprobs=True), 400, "logprobs", "not supported"),
    ("/v1/chat/completions", _chat(presence_penalty=1.0), 400, "presence_penalty", "not supported"),
    ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "x"}]}), 400,
     "model", "provide a model"),
    ("/v1/chat/completions", _chat(model="gpt-4o"), 404, "model", "does not exist"),
    ("/v1/completions", _cmpl(prompt=""), 400, "prompt", "the prompt is empty"),
    ("/v1/completions", _cmpl(prompt=[1, 99999]), 400, "prompt", "outside the vocabulary"),
    ("/v1/completions", _cmpl(prompt=["a", "b"]), 400, "prompt", "one prompt per request"),
    ("/v1/completions", _cmpl(prompt=7), 400, "prompt", "must be a string"),
    ("/v1/completions", _cmpl(echo=True), 400, "echo", "not supported"),
    ("/v1/completions", _cmpl(seed=1.5), 400, "seed", "must be an integer"),
    ("/v1/completions", _cmpl(seed=-1), 400, "seed", "at least 0"),
    ("/v1/completions", _cmpl(seed=2**64), 400, "seed", "at most"),
    ("/v1/completions", _cmpl(temperature=1e-310), 400, "temperature", "too small to sample"),
    ("/v1/completions", '{"model": "tiny-llama", "prompt": "\\ud800"}', 400, "prompt",
     "lone UTF-16 surrogate"),
    ("/v1/completions", _cmpl(stop=["\ud800"]), 400, "stop", "lone UTF-16 surrogate"),
]


@pytest.mark.parametrize("path, body, status, param, words", BAD,
                         ids=[f"{i}-{b[3] or b[4][:12]}" for i, b in enumerate(BAD)])
def test_bad_input_is_an_openai_style_error(served, path, body, status, param, words):
    code, headers, data = raw(served["url"], "POST", path, body.encode())
    assert code == status, data
    assert headers["content-type"].startswith("application/json")
    err = json.loads(data)["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error" and err["param"] == param
    assert words in err["message"] and "Traceback" not in data.decode()


def test_wrong_paths_methods_and_sizes_are_json_errors(served):
    url = served["url"]
    for method, path, status in (("GET", "/nope", 404), ("GET", "/v1/chat/completions", 405),
                                 ("GET", "/v1/models/other", 404)):
        code, _, data = raw(url, method, path)
        assert code == status and "message" in json.loads(data)["error"], (path, data)
    code, _, data = raw(url, "POST", "/v1/completions", b"{" + b" " * (5 << 20) + b"}")
    assert code == 413 and "larger than" in json.loads(data)["error"]["message"]
    code, _, data = raw(url, "GET", "/health")
    assert code == 200 and json.loads(data)["status"] == "ok"


def test_chat_on_a_bundle_without_template_says_what_to_do(tiny_bundle):
    engine = Engine(tiny_bundle, context=64, device="cpu", poll=60).start()
    try:
        with background(engine) as url:
            code, _, data = raw(url, "POST", "/v1/chat/completions", _chat().encode())
            err = json.loads(data)["error"]
            assert code == 400 and "no chat template" in err["message"] and \
                "/v1/completions" in err["message"]
    finally:
        engine.close()


# -- concurrency ----------------------------------------------------------------------------------
def _stream_request(url: str, body: str) -> socket.socket:
    """A request on a raw socket, so the test can hang up whenever it likes."""
    host, port = url.removeprefix("http://").split(":")
    s = socket.create_connection((host, int(port)), timeout=30)
    s.sendall((f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json"
               f"\r\nContent-Length: {len(body)}\r\n\r\n{body}").encode())
    return s


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "not-stream"])
def test_client_disconnect_stops_generation(served, stream):
    url, engine, slow = served["url"], served["engine"], served["slow"]
    before = metric(url, "lsaq_requests_total", '{outcome="cancelled"}')
    tokens_before = metric(url, "lsaq_completion_tokens_total")
    slow.delay = 0.02     # 100 tokens would take 2 s
    try:
        s = _stream_request(url, _cmpl(max_tokens=100, temperature=0, stream=stream))
        if stream:
            got = b""
            while b"data: " not in got:   # the generation has started and is streaming
                got += s.recv(4096)
        else:
            wait_for(lambda: engine.running is not None, what="the generation to start")
            time.sleep(0.2)
        s.close()
        wait_for(lambda: metric(url, "lsaq_requests_total", '{outcome="cancelled"}') == before + 1,
                 what="the cancellation")
    finally:
        slow.delay = 0.0
    generated = metric(url, "lsaq_completion_tokens_total") - tokens_before
    assert 1 <= generated < 60, generated    # it stopped long before the 100 asked for
    line = [l for l in served["logs"] if "client disconnected" in l][-1]
    assert re.search(r"stopped generating after \d+ of 100 tokens", line)
    # the worker went on to the next request
    r = served["client"].completions.create(model=MODEL, prompt=PROMPT, max_tokens=3,
                                            temperature=0)
    assert r.usage.completion_tokens == 3


def test_fifo_order_and_the_bounded_queue(served, reference):
    url, engine, slow = served["url"], served["engine"], served["slow"]
    c = served["client"]
    done: list[int] = []
    results: dict[int, str] = {}

    def ask(i):
        r = c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0)
        results[i] = r.choices[0].text
        done.append(i)

    slow.delay = 0.02   # each request ~0.2 s: the later ones queue behind it
    try:
        threads = []
        for i in range(4):
            t = threading.Thread(target=ask, args=(i,))
            t.start()
            threads.append(t)
            wait_for(lambda: len(engine.jobs) + (engine.running is not None) >= i + 1,
                     what=f"request {i} to be queued")
        assert metric(url, "lsaq_queue_length") >= 1
        for t in threads:
            t.join(30)
        assert done == [0, 1, 2, 3]                    # served in arrival order
        assert set(results.values()) == {reference("fp16", PROMPT, 10)}

        # a full queue refuses at once with 503 and says why
        old, engine.max_queue = engine.max_queue, 1
        try:
            first = threading.Thread(target=ask, args=(10,))
            first.start()
            wait_for(lambda: engine.running is not None, what="a running request")
            second = threading.Thread(target=ask, args=(11,))
            second.start()
            wait_for(lambda: len(engine.jobs) == 1, what="a queued request")
            code, headers, data = raw(url, "POST", "/v1/completions",
                                      _cmpl(max_tokens=5).encode())
            err = json.loads(data)["error"]
            assert code == 503 and err["code"] == "queue_full" and "queue is full" in err["message"]
            assert headers.get("retry-after")
            first.join(30)
            second.join(30)
            assert {10, 11} <= set(results)
        finally:
            engine.max_queue = old
    finally:
        slow.delay = 0.0


# -- re-planning under memory pressure ------------------------------------------------------------
def lsaq_run_json(bundle, variant, prompt, n) -> dict:
    r = subprocess.run([sys.executable, "-m", "lsaq_runtime.cli", str(bundle), prompt,
                        "--variant", variant, "--max-new-tokens", str(n), "--context",
                        str(CONTEXT), "--device", "cpu", "--json"],
                       capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def needs(bundle) -> dict[str, int]:
    r = subprocess.run([sys.executable, "-m", "lsaq_runtime.cli", str(bundle), "--dry-run",
                        "--json", "--memory-budget", "64GiB", "--context", str(CONTEXT)],
                       capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr
    return {v["name"]: v["need_bytes"] for v in json.loads(r.stdout)["variants"]}


class ServeProcess:
    """`lsaq-run serve` as a user starts it, its stderr collected line by line."""

    def __init__(self, *args):
        self.proc = subprocess.Popen([sys.executable, "-m", "lsaq_runtime.cli", "serve",
                                      *map(str, args)], stderr=subprocess.PIPE, text=True,
                                     env=ENV)
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        m = wait_for(lambda: next((re.search(r"on (http://\S+)/v1", l) for l in self.lines
                                   if " on http://" in l), None) or self._dead(), timeout=120,
                     what="the server to start")
        self.url = m.group(1)

    def _read(self):
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def _dead(self):
        if self.proc.poll() is not None:
            raise AssertionError("lsaq-run serve exited:\n" + "\n".join(self.lines))
        return None

    def line(self, text: str) -> str:
        """The first stderr line holding `text` (stderr arrives through a pipe: wait for it)."""
        return wait_for(lambda: next((l for l in self.lines if text in l), None),
                        what=f"a log line with {text!r}")

    def health(self) -> dict:
        return json.loads(raw(self.url, "GET", "/health")[2])

    def stop(self):
        self.proc.terminate()
        self.proc.wait(30)


class BudgetFile:
    """The budget file, rewritten atomically as an orchestrator would (rename over it)."""

    def __init__(self, path: Path):
        self.path = path

    def write_text(self, text: str) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.path)

    def __fspath__(self):
        return str(self.path)

    def __str__(self):
        return str(self.path)


def test_memory_pressure_switches_down_pauses_and_comes_back_up(tiny_bundle, tmp_path):
    need = needs(tiny_bundle)
    assert need["fp16"] > need["int8"] > need["int4"]
    ref = {v: lsaq_run_json(tiny_bundle, v, PROMPT, 10)["text"] for v in ("fp16", "int8")}
    budget = BudgetFile(tmp_path / "budget")
    budget.write_text("none")
    srv = ServeProcess(tiny_bundle, "--port", 0, "--context", CONTEXT, "--device", "cpu",
                       "--memory-budget-file", budget, "--poll", 0.1, "--upgrade-after", 1.5,
                       "--wait", 2)
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0,
                               timeout=60)

        def ask():
            return client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10,
                                             temperature=0)

        r = ask()
        assert (r.system_fingerprint, r.choices[0].text) == ("lsaq-fp16", ref["fp16"])

        # squeeze: fp16 no longer fits, int8 does -> down to int8
        budget.write_text(str(need["int8"]))
        wait_for(lambda: srv.health()["variant"] == "int8", what="the switch down")
        line = srv.line("switch down fp16 -> int8")
        assert f"fp16 needs {format_size(need['fp16'])} ({need['fp16']} B)" in line
        assert f"({need['int8']} B) is free to plan with" in line and "between requests" in line
        r = ask()
        assert (r.system_fingerprint, r.choices[0].text) == ("lsaq-int8", ref["int8"])

        # nothing fits: paused; a request waits in the queue, then fails with a 503 saying why
        budget.write_text("1MB")
        wait_for(lambda: srv.health()["status"] == "paused", what="the pause")
        code, _, data = raw(srv.url, "GET", "/health")
        assert code == 503 and "no variant fits" in json.loads(data)["reason"]
        srv.line("pausing (unloaded int8): no variant fits")
        failed = []
        t = threading.Thread(target=lambda: failed.append(_expect_503(ask)))
        t.start()
        wait_for(lambda: metric(srv.url, "lsaq_queue_length") == 1, what="a queued request")
        assert metric(srv.url, "lsaq_paused") == 1
        t.join(30)
        msg = failed[0]
        assert "no variant fits" in msg and "waited 2s" in msg and "int4" in msg

        # memory comes back while a request waits: it is served, by the best that fits now
        answers = []
        t = threading.Thread(target=lambda: answers.append(ask()))
        t.start()
        wait_for(lambda: metric(srv.url, "lsaq_queue_length") == 1, what="a queued request")
        budget.write_text(str(need["int8"]))
        t.join(30)
        r = answers[0]
        assert (r.system_fingerprint, r.choices[0].text) == ("lsaq-int8", ref["int8"])
        assert srv.line("resuming with int8").startswith("lsaq-run: resuming with int8")

        # memory frees for good: back up to fp16, but only after it stayed free (hysteresis)
        freed = time.monotonic()
        budget.write_text("none")
        wait_for(lambda: srv.health()["variant"] == "fp16", what="the switch up")
        assert time.monotonic() - freed >= 1.5
        line = srv.line("switch up int8 -> fp16")
        assert "stayed free for" in line and f"({need['fp16']} B)" in line
        r = ask()
        assert (r.system_fingerprint, r.choices[0].text) == ("lsaq-fp16", ref["fp16"])
        for direction, n in (("down", 1), ("up", 1), ("pause", 1), ("resume", 1)):
            assert metric(srv.url, "lsaq_switches_total", f'{{direction="{direction}"}}') == n
        assert metric(srv.url, "lsaq_requests_total", '{outcome="timeout"}') == 1
    finally:
        srv.stop()
    assert not any("Traceback" in l for l in srv.lines), "\n".join(srv.lines)


def _expect_503(ask) -> str:
    with pytest.raises(openai.APIStatusError) as e:
        ask()
    assert e.value.status_code == 503
    return e.value.message


def settle(engine) -> str:
    """Let the engine see the current reading and finish any switch it decides; the variant."""
    engine.observe()
    wait_for(lambda: not engine._needs_switch() and not engine.switching,
             what="the switch to finish")
    return engine.current


def test_hysteresis_does_not_flap(chat_bundle):
    """Memory that keeps coming and going never switches up; it must stay free for
    upgrade_after seconds (a fake clock; the budget is what squeezes)."""
    need = needs(chat_bundle)
    now, budget = [0.0], [None]
    engine = Engine(chat_bundle, context=CONTEXT, device="cpu", budget=lambda: budget[0],
                    poll=3600, upgrade_after=1.0, clock=lambda: now[0]).start()

    def at(t, b):
        now[0], budget[0] = t, b
        return settle(engine)

    try:
        assert engine.current == "fp16"
        assert at(1.0, need["int8"]) == "int8"
        for t in (2.0, 2.5, 3.0, 3.5, 4.0, 4.5):   # free, squeezed, free, squeezed, ...
            assert at(t, None if t % 1 == 0 else need["int8"]) == "int8"
        assert at(5.0, None) == "int8" and at(5.9, None) == "int8"
        assert at(6.0, None) == "fp16"             # free at every probe for 1.0 s
        assert engine.counters["switches"] == {"down": 1, "up": 1, "pause": 0, "resume": 0}
    finally:
        engine.close()


def test_a_switch_reads_and_hashes_only_the_variant(chat_bundle, monkeypatch):
    """The bundle is opened once, at launch: a switch (down, then up) neither reads nor parses
    the manifest again, nor hashes or parses the tokenizer; it verifies the new variant's own
    files only."""
    import lsaq_runtime.manifest as manifest
    import lsaq_runtime.model as model
    import lsaq_runtime.verify as verify

    need = needs(chat_bundle)
    budget = [None]
    engine = Engine(chat_bundle, context=CONTEXT, device="cpu", budget=lambda: budget[0],
                    poll=3600, upgrade_after=0).start()
    counts = {"manifest reads": 0, "manifest parses": 0, "tokenizer hashes": 0,
              "tokenizer parses": 0, "variant checks": 0}

    def counting(name, fn):
        def wrapped(*a, **k):
            counts[name] += 1
            return fn(*a, **k)
        return wrapped

    tokenizer = manifest.tokenizer_file(engine.manifest)
    real_verify_files = verify.verify_files

    def verify_files(root, m, rels, log=None):
        counts["tokenizer hashes"] += tokenizer in rels
        return real_verify_files(root, m, rels, log=log)

    monkeypatch.setattr(manifest, "read_manifest_bytes",
                        counting("manifest reads", manifest.read_manifest_bytes))
    monkeypatch.setattr(manifest, "parse_json", counting("manifest parses", manifest.parse_json))
    monkeypatch.setattr(verify, "verify_files", verify_files)
    monkeypatch.setattr(model, "TextCodec", counting("tokenizer parses", model.TextCodec))
    monkeypatch.setattr(model, "verify_variant",
                        counting("variant checks", model.verify_variant))

    def switch_at(b):
        budget[0] = b
        return settle(engine)

    try:
        assert engine.current == "fp16"
        assert switch_at(need["int8"]) == "int8"
        assert switch_at(None) == "fp16"
        assert engine.counters["switches"]["down"] == 1 and engine.counters["switches"]["up"] == 1
        assert counts == {"manifest reads": 0, "manifest parses": 0, "tokenizer hashes": 0,
                          "tokenizer parses": 0, "variant checks": 2}, counts
    finally:
        engine.close()


def test_the_loaded_variant_counts_its_own_memory_as_free(chat_bundle):
    """A real probe sees free memory *after* the loaded variant took its share; planning on
    that alone would push the variant out of the memory it holds itself, and flap. An
    injected probe plays such a device: exactly fp16's need free before loading."""
    from lsaq_runtime.probe import Device

    need = needs(chat_bundle)
    holder: list[Engine] = []

    def probe():
        taken = holder[0].held_bytes if holder and holder[0].model is not None else 0
        return Device("cpu", None, "simulated", 8 << 30, need["fp16"] - taken, "test")

    engine = Engine(chat_bundle, context=CONTEXT, device="cpu", probe=probe, poll=3600,
                    upgrade_after=0)
    holder.append(engine)
    engine.start()
    try:
        assert engine.current == "fp16" and engine.held_bytes > 0
        for _ in range(3):
            engine.observe()
            assert not engine._needs_switch()
        assert engine.status()["free_bytes"] == need["fp16"]
        assert engine.counters["switches"] == {"down": 0, "up": 0, "pause": 0, "resume": 0}
    finally:
        engine.close()


def test_budget_file_keeps_the_last_good_value(tmp_path):
    from lsaq_runtime.serve.budget import FileBudget

    f, logs = tmp_path / "budget", []
    f.write_text("300MB\n")
    b = FileBudget(f, log=logs.append)
    assert b.value == 300_000_000
    f.write_text("")                 # caught mid-rewrite: not "no budget"
    assert b() == 300_000_000 and "empty" in logs[-1]
    f.write_text("lots")
    assert b() == 300_000_000 and "not a size" in logs[-1]
    f.write_text("1GiB")
    assert b() == 1 << 30
    f.write_text("none")
    assert b() is None
    f.unlink()
    assert b() is None and "cannot read" in logs[-1]


# -- the command line -----------------------------------------------------------------------------
def test_serve_errors_are_one_line(tiny_bundle, tmp_path, capsys):
    code = main(["serve", str(tiny_bundle), "--memory-budget", "1MB", "--device", "cpu",
                 "--port", "0", "--context", "64"])
    err = capsys.readouterr().err
    # a fixed budget below the smallest need cannot change: the same message as lsaq-run
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("lsaq-run: error: no variant fits") and "a larger --memory-budget" in err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        code = main(["serve", str(tiny_bundle), "--port", str(taken.getsockname()[1])])
    err = capsys.readouterr().err
    assert code == 2 and "cannot listen on 127.0.0.1" in err and "--port" in err
    code = main(["serve", str(tiny_bundle), "--memory-budget", "1GB", "--memory-budget-file",
                 str(tmp_path / "b")])
    assert code == 2 and "not both" in capsys.readouterr().err
    code = main(["serve", str(tiny_bundle), "--memory-budget-file", str(tmp_path / "none")])
    assert code == 2 and "cannot read the memory budget file" in capsys.readouterr().err


def test_serve_without_the_extra_says_what_to_install(tiny_bundle):
    code = ("import sys; sys.modules['starlette'] = None\n"
            "from lsaq_runtime.cli import main\n"
            f"sys.exit(main(['serve', {str(tiny_bundle)!r}]))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV,
                       timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert 'pip install "lsaq[serve]"' in r.stderr and "Traceback" not in r.stderr


def test_the_plain_runtime_does_not_import_the_server():
    code = ("import sys, lsaq_runtime, lsaq_runtime.cli, lsaq_runtime.serve.engine\n"
            "assert not {'starlette', 'uvicorn'} & {m.split('.')[0] for m in sys.modules}\n"
            "import lsaq_runtime.serve.server\n"
            "bad = {'torch', 'transformers', 'onnx', 'lsaq_compile'} & "
            "{m.split('.')[0] for m in sys.modules}\n"
            "assert not bad, bad\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV,
                       timeout=120)
    assert r.returncode == 0, r.stderr


# -- issue 24: under attack and under load ---------------------------------------------------------
def _lines_after(srv: ServeProcess, start: int) -> list[str]:
    return srv.lines[start:]


def _no_tracebacks(lines: list[str]) -> None:
    text = "\n".join(lines)
    assert "Traceback" not in text and "panicked" not in text and "a bug in lsaq" not in text, text


def _post(url: str, path: str, body, timeout: float = 60, headers: dict | None = None):
    """POST raw bytes (or a JSON string) on a fresh connection: (status, parsed JSON body)."""
    data = body.encode() if isinstance(body, str) else body
    code, _, raw_body = raw(url, "POST", path, data, headers)
    return code, json.loads(raw_body)


def test_slow_clients_cannot_take_the_server(tiny_bundle):
    """Case 8: a thousand-connection slowloris cannot starve well-behaved clients: at the cap
    the connection waiting longest for its request head is closed, a head must arrive within
    HEADER_TIMEOUT_S, and the log stays a few lines (issue: 1,100 connections stopped the
    server, 126k tracebacks)."""
    from lsaq_runtime.serve.server import HEADER_TIMEOUT_S

    srv = ServeProcess(tiny_bundle, "--port", 0, "--context", 64, "--device", "cpu",
                       "--max-connections", 40)
    start = len(srv.lines)
    host, port = srv.url.removeprefix("http://").split(":")
    slow = []
    try:
        for i in range(300):                     # a byte at a time, never finishing the head
            s = socket.create_connection((host, int(port)), timeout=10)
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHo")
            slow.append(s)
        for s in slow[-30:]:
            s.sendall(b"s")
        t0 = time.monotonic()
        for _ in range(5):                        # well-behaved clients are answered at once
            code, body = _post(srv.url, "/v1/completions", _cmpl(max_tokens=3, temperature=0),
                               timeout=20)
            assert code == 200 and body["usage"]["completion_tokens"] == 3, body
        assert time.monotonic() - t0 < 15
        assert metric(srv.url, "lsaq_http_connections_limit") == 40
        assert metric(srv.url, "lsaq_http_connections_closed_total", '{reason="evicted"}') >= 250
        assert metric(srv.url, "lsaq_http_connections_open") <= 40

        # a client gone while sending its body is routine, not "a bug in lsaq"
        s = socket.create_connection((host, int(port)), timeout=10)
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                  b"\r\nContent-Length: 1000\r\n\r\n{\"model\": ")
        time.sleep(0.3)
        s.close()

        # the survivors get no more than HEADER_TIMEOUT_S for their head
        time.sleep(HEADER_TIMEOUT_S + 2)
        for s in slow:
            s.settimeout(5)
            try:
                data = s.recv(4096)
                assert data == b"" or data.startswith(b"HTTP/1.1 408"), data[:80]
            except (ConnectionResetError, BrokenPipeError):
                pass
        assert metric(srv.url, "lsaq_http_connections_open") <= 2
        code, body = _post(srv.url, "/v1/completions", _cmpl(max_tokens=3, temperature=0))
        assert code == 200
    finally:
        for s in slow:
            s.close()
        srv.stop()
    after = _lines_after(srv, start)
    _no_tracebacks(after)
    assert len(after) < 20, "\n".join(after)     # a few lines, not one per connection


def _another_model(src: Path, dest: Path) -> None:
    """What `lsaq-compile build --force` from another model leaves: other weights, another
    name, every hash in its manifest right."""
    shutil.copytree(src, dest)
    m = json.loads((dest / "manifest.json").read_text())
    m["model"]["name"] = "another-model"
    p = dest / "weights" / "int8.safetensors"
    data = bytearray(p.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")
    data[start:start + 256] = bytes(b ^ 0x5A for b in data[start:start + 256])
    p.write_bytes(bytes(data))
    for f in m["files"]:
        if f["path"] == "weights/int8.safetensors":
            import hashlib
            f["sha256"] = hashlib.sha256(bytes(data)).hexdigest()
    (dest / "manifest.json").write_text(json.dumps(m, indent=1))


def test_a_bundle_rebuilt_under_the_server_is_never_served(tiny_bundle, tmp_path):
    """Case 9: the served folder is replaced by another model's bundle (as build --force does);
    the server keeps answering from what it loaded, says on /health that the bundle changed,
    and when memory forces a switch it pauses rather than load the new model's variant under
    the old id."""
    need = needs(tiny_bundle)
    want = lsaq_run_json(tiny_bundle, "fp16", PROMPT, 8)["text"]
    b = tmp_path / "served"
    shutil.copytree(tiny_bundle, b)
    budget = BudgetFile(tmp_path / "budget")
    budget.write_text("none")
    srv = ServeProcess(b, "--port", 0, "--context", CONTEXT, "--device", "cpu", "--poll", 0.1,
                       "--memory-budget-file", budget, "--wait", 1)
    start = len(srv.lines)
    try:
        assert srv.health()["bundle"]["changed"] is None
        _another_model(tiny_bundle, tmp_path / "rebuilt")
        os.rename(b, tmp_path / "old")
        os.rename(tmp_path / "rebuilt", b)
        wait_for(lambda: srv.health()["bundle"]["changed"], what="the change to be noticed")
        code, body = _post(srv.url, "/v1/completions", _cmpl(max_tokens=8, temperature=0))
        assert code == 200 and body["choices"][0]["text"] == want       # still the launch model
        assert body["system_fingerprint"] == "lsaq-fp16"

        budget.write_text(str(need["int8"]))       # fp16 no longer fits: int8 would be next
        wait_for(lambda: srv.health()["status"] == "paused", what="the pause")
        code, _, data = raw(srv.url, "GET", "/health")
        h = json.loads(data)
        assert code == 503 and "changed on disk after launch" in h["reason"] and \
            "restart the server" in h["reason"]
        code, body = _post(srv.url, "/v1/completions", _cmpl(max_tokens=8, temperature=0))
        assert code == 503 and "changed on disk" in body["error"]["message"]
        assert metric(srv.url, "lsaq_variant_loaded", '{variant="int8"}') == 0
    finally:
        srv.stop()
    after = _lines_after(srv, start)
    _no_tracebacks(after)
    assert not any("loaded int8" in l or "switch down fp16 -> int8" in l for l in after), after


def test_client_mistakes_are_400s_naming_the_field(chat_bundle, tmp_path):
    """Case 10: each was a 500 (seed -1, a temperature that makes NaN probabilities, a lone
    surrogate, a tokenizer that panics in Rust); now a 400 naming the field, and the server
    goes on answering."""
    from factories.bundles import backtracking_tokenizer

    b = tmp_path / "b"
    shutil.copytree(chat_bundle, b)
    backtracking_tokenizer(b)
    srv = ServeProcess(b, "--port", 0, "--context", CONTEXT, "--device", "cpu")
    start = len(srv.lines)
    hostile = "a" * 40 + "b"
    cases = [
        ("/v1/completions", _cmpl(seed=-1, temperature=0.7), 400, "seed", "at least 0"),
        ("/v1/completions", _cmpl(temperature=1e-310), 400, "temperature", "too small"),
        ("/v1/completions", '{"model": "tiny-llama", "prompt": "a\\ud800b"}', 400, "prompt",
         "lone UTF-16 surrogate"),
        ("/v1/chat/completions", '{"model": "tiny-llama", "messages": [{"role": "user", '
         '"content": "\\udfff"}]}', 400, "messages[0].content", "lone UTF-16 surrogate"),
        ("/v1/completions", '{"model": "\\ud800", "prompt": "x"}', 404, "model", "does not exist"),
        ("/v1/completions", '{"model": "tiny-llama", "prompt": "x", "\\ud800": 1}', 400,
         "\ud800", "Unrecognized request argument"),
        ("/v1/completions", _cmpl(prompt=hostile), 400, "prompt", "crashed on it"),
        ("/v1/chat/completions", _chat(messages=[{"role": "user", "content": hostile}]), 400,
         "messages", "crashed on it"),
    ]
    try:
        for path, body, status, param, words in cases:
            code, got = _post(srv.url, path, body)
            assert code == status, (body, got)
            assert got["error"]["param"] == param and words in got["error"]["message"], got
        code, got = _post(srv.url, "/v1/completions", _cmpl(max_tokens=3, temperature=0))
        assert code == 200 and got["usage"]["completion_tokens"] == 3
    finally:
        srv.stop()
    _no_tracebacks(_lines_after(srv, start))


def _sse_lines(resp) -> list[str]:
    return [line.decode().strip() for line in resp if line.strip()]


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_shutdown_is_graceful(smollm_bundle, sig):
    """Case 11: on SIGTERM or SIGINT a running stream ends with an error event and [DONE],
    queued clients get a 503 JSON, the engine is closed before the process exits, and the
    log holds no traceback (issue: killed after uvicorn's 5 s grace before the engine closed,
    streams cut, queued clients a closed connection or a plain-text 500)."""
    import signal as signals

    srv = ServeProcess(smollm_bundle, "--port", 0, "--context", 1024, "--device", "cpu",
                       "--max-queue", 4)
    start = len(srv.lines)
    host, port = srv.url.removeprefix("http://").split(":")
    model = json.loads(raw(srv.url, "GET", "/v1/models")[2])["data"][0]["id"]
    body = {"model": model, "prompt": "Once upon a time", "max_tokens": 900, "temperature": 0}
    results = {}
    try:
        streaming = http.client.HTTPConnection(host, int(port), timeout=120)
        streaming.request("POST", "/v1/completions", json.dumps({**body, "stream": True}),
                          {"Content-Type": "application/json"})
        resp = streaming.getresponse()
        assert resp.status == 200
        first = resp.readline()
        assert first.startswith(b"data: ")

        def queued(key, stream):
            results[key] = _post(srv.url, "/v1/completions", json.dumps({**body, "stream": stream}),
                                 timeout=120)
        threads = [threading.Thread(target=queued, args=(k, k == "stream")) for k in ("plain", "stream")]
        for t in threads:
            t.start()
        wait_for(lambda: metric(srv.url, "lsaq_queue_length") == 2, what="two queued requests")
        t0 = time.monotonic()
        srv.proc.send_signal(getattr(signals, sig))
        rest = _sse_lines(resp)
        for t in threads:
            t.join(60)
        srv.proc.wait(60)
        took = time.monotonic() - t0
    finally:
        if srv.proc.poll() is None:
            srv.proc.kill()
    assert rest[-1] == "data: [DONE]", rest[-3:]
    err = json.loads(rest[-2].removeprefix("data: "))["error"]
    assert err["code"] == "shutting_down" and "shutting down" in err["message"]
    for key in ("plain", "stream"):
        code, got = results[key]
        assert code == 503 and got["error"]["code"] == "shutting_down", got
    assert srv.proc.returncode == 0 and took < 30
    wait_for(lambda: any("engine closed" in l for l in srv.lines), what="the last log line")
    after = _lines_after(srv, start)
    _no_tracebacks(after)
    assert "engine closed" in after[-1], after


def test_a_taken_port_is_one_line_naming_it(tiny_bundle):
    """Case 12: `lsaq-run serve` on a taken port exits at once with one line naming it."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "lsaq_runtime.cli", "serve", str(tiny_bundle),
                            "--port", str(port), "--device", "cpu"], capture_output=True,
                           text=True, env=ENV, timeout=60)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith(f"lsaq-run: error: cannot listen on 127.0.0.1:{port} "
                               "(Address already in use)")


def test_a_trickled_body_gets_408(chat_bundle, monkeypatch):
    """Case 8's other half, in-process with a short timeout: a body that does not arrive in
    BODY_TIMEOUT_S is a 408 and the connection closes."""
    import lsaq_runtime.serve.http as http_layer

    monkeypatch.setattr(http_layer, "BODY_TIMEOUT_S", 1.0)
    engine = Engine(chat_bundle, context=CONTEXT, device="cpu", poll=60).start()
    try:
        with background(engine) as url:
            host, port = url.removeprefix("http://").split(":")
            s = socket.create_connection((host, int(port)), timeout=10)
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                      b"application/json\r\nContent-Length: 500\r\n\r\n{\"model\": ")
            data = b""
            while chunk := s.recv(4096):
                data += chunk
            s.close()
            assert data.startswith(b"HTTP/1.1 408") and b"request_timeout" in data, data[:200]
    finally:
        engine.close()


def test_at_the_cap_with_every_connection_answered_a_newcomer_gets_503(served):
    """Only connections waiting for a request head are evicted; when all are being answered
    (one generating, one queued) a newcomer is refused with a 503 JSON, and served after."""
    from lsaq_runtime.serve.server import background

    engine, slow = served["engine"], served["slow"]
    slow.delay = 0.05
    results = []
    try:
        with background(engine, max_connections=2) as url:
            def ask():
                results.append(_post(url, "/v1/completions", _cmpl(max_tokens=40, temperature=0)))
            threads = [threading.Thread(target=ask) for _ in range(2)]
            for t in threads:
                t.start()
                time.sleep(0.3)
            wait_for(lambda: engine.running is not None and len(engine.jobs) == 1,
                     what="one running and one queued request")
            host, port = url.removeprefix("http://").split(":")
            s = socket.create_connection((host, int(port)), timeout=10)
            data = s.recv(4096)
            s.close()
            assert data.startswith(b"HTTP/1.1 503") and b"too_many_connections" in data, data
            slow.delay = 0.0
            for t in threads:
                t.join(60)
            assert [code for code, _ in results] == [200, 200]
    finally:
        slow.delay = 0.0
