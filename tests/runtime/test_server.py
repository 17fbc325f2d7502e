"""The runtime server end to end: a REAL `autoglm-runtime serve` process, the REAL OpenAI client.

Servers are module-scoped (one main server with an API key; small ones for 429 and drain), so the
file runs in well under two minutes on two cores.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import pytest

from tests.helpers import free_port, wait_for

pytestmark = [pytest.mark.runtime, pytest.mark.timeout(240)]

REPO = Path(__file__).resolve().parents[2]
CLI = REPO / ".venv" / "bin" / "autoglm-runtime"
API_KEY = "sk-test-key"


@dataclass
class Server:
    proc: subprocess.Popen
    port: int
    log: Path
    api_key: str | None = None
    headers: dict = field(default_factory=dict)
    host: str = "127.0.0.1"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def get(self, path: str, **kw) -> httpx.Response:
        return httpx.get(self.url + path, timeout=30, **kw)

    def post(self, path: str, body: dict | None = None, **kw) -> httpx.Response:
        headers = {**self.headers, **kw.pop("headers", {})}
        return httpx.post(self.url + path, json=body, headers=headers, timeout=60, **kw)

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=self.api_key or "none", max_retries=0, **kw)

    def aclient(self, **kw) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.url + "/v1", api_key=self.api_key or "none", max_retries=0, **kw)

    def metrics(self) -> str:
        return self.get("/metrics").text

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def start_server(model_dir: Path, logdir: Path, *extra: str, api_key: str | None = None, name: str = "server",
                 env: dict[str, str] | None = None, host: str = "127.0.0.1") -> Server:
    port = free_port()
    argv = [str(CLI), "serve", "--model", str(model_dir), "--host", host, "--port", str(port),
            "--dtype", "float32", "--device", "cpu", "--served-model-name", "tiny", *extra]
    if api_key:
        key_file = logdir / f"{name}.key"
        key_file.write_text(api_key + "\n")
        argv += ["--api-key-file", str(key_file)]
    log = logdir / f"{name}.log"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("AUTOGLM_RUNTIME_")}, **(env or {})}
    proc = subprocess.Popen(argv, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    srv = Server(proc, port, log, api_key, {"Authorization": f"Bearer {api_key}"} if api_key else {}, host)

    def ready():
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}:\n{srv.log_text()[-3000:]}")
        return srv.get("/ready").status_code == 200

    try:
        wait_for(ready, timeout=120, interval=0.2, message=f"{name} /ready")
    except BaseException:
        srv.stop()
        raise
    return srv


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    total, found = 0.0, False
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        sample, _, lbl = head.partition("{")
        if sample != name:
            continue
        if all(f'{k}="{v}"' in lbl for k, v in labels.items()):
            total += float(value)
            found = True
    assert found, f"metric {name}{labels} not found"
    return total


@pytest.fixture(scope="module")
def logdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("server-logs")


@pytest.fixture(scope="module")
def other_model_dir(tiny_model_dir) -> Path:
    """A second, different model (other weights) next to the first: under the server's reload root."""
    from autoglm_runtime.modelmaker import make_model

    return make_model("tiny", tiny_model_dir.parent / "tiny-glm-other", seed=1)


@pytest.fixture(scope="module")
def server(tiny_model_dir, logdir):
    srv = start_server(tiny_model_dir, logdir, "--revision", "r1", "--max-batch-size", "16", "--enable-reload",
                       "--allow-client-priority", api_key=API_KEY)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return server.client()


# ------------------------------------------------------------------ basic API


def test_models_lists_the_served_model(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]


def test_completion_counts_usage_and_echoes_request_id(server, client, tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompt = "The quick brown fox jumps over the lazy dog."
    resp = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0,
                                     extra_body={"ignore_eos": True})
    assert resp.object == "text_completion"
    choice = resp.choices[0]
    assert choice.finish_reason == "length"
    assert isinstance(choice.text, str) and choice.text
    assert resp.usage.prompt_tokens == len(tok(prompt)["input_ids"])
    assert resp.usage.completion_tokens == 12
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + 12

    raw = server.post("/v1/completions", {"model": "tiny", "prompt": "Hello", "max_tokens": 2},
                      headers={"x-request-id": "req-abc-123"})
    assert raw.status_code == 200
    assert raw.headers["x-request-id"] == "req-abc-123"
    assert server.get("/health").headers.get("x-request-id")  # generated when absent


def test_streaming_completion_matches_non_streaming(server, client):
    prompt = "A language model reads a sequence of tokens and"
    full = client.completions.create(model="tiny", prompt=prompt, max_tokens=20, temperature=0,
                                     extra_body={"ignore_eos": True})
    chunks = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=20, temperature=0, stream=True,
                                            stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens

    # Raw SSE framing: `data: {json}\n\n` ... `data: [DONE]\n\n`, no usage chunk unless asked.
    with httpx.stream("POST", server.url + "/v1/completions", headers=server.headers, timeout=60,
                      json={"model": "tiny", "prompt": prompt, "max_tokens": 5, "stream": True}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        body = r.read().decode()
    events = [e for e in body.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    payloads = [json.loads(e[6:]) for e in events[:-1]]
    assert all(p["choices"] for p in payloads)


def test_chat_completion_and_stream(client, server):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello! How are you?"}]
    resp = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0,
                                          extra_body={"ignore_eos": True})
    assert resp.object == "chat.completion"
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage.completion_tokens == 10

    async def stream():
        async with server.aclient() as ac:
            chunks = [c async for c in await ac.chat.completions.create(
                model="tiny", messages=messages, max_tokens=10, temperature=0, stream=True,
                stream_options={"include_usage": True}, extra_body={"ignore_eos": True})]
        return chunks

    chunks = asyncio.run(stream())
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == resp.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == 10
    assert chunks[-1].usage.prompt_tokens == resp.usage.prompt_tokens


def test_stop_strings_cut_the_text(client):
    prompt = "Once upon a time, in a small village by the sea,"
    base = client.completions.create(model="tiny", prompt=prompt, max_tokens=40, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    # A stop string that first occurs somewhere in the middle of the greedy text.
    cut = len(base) // 2
    stop = base[cut:cut + 3]
    assert len(stop) == 3
    expected = base[: base.find(stop)]
    resp = client.completions.create(model="tiny", prompt=prompt, max_tokens=40, temperature=0, stop=[stop],
                                     extra_body={"ignore_eos": True})
    assert resp.choices[0].text == expected
    assert resp.choices[0].finish_reason == "stop"
    streamed = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=40, temperature=0,
                                              stop=stop, stream=True, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in streamed if c.choices) == expected
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_min_tokens_defers_stop_strings_and_is_validated(server, client):
    prompt = "Once upon a time, in a small village by the sea,"
    full = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = full[:2]
    assert len(stop) == 2
    cut = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0, stop=stop,
                                    extra_body={"ignore_eos": True})
    assert (cut.choices[0].text, cut.choices[0].finish_reason) == ("", "stop")
    # Stop strings (like EOS and stop token ids) do not end a request before min_tokens tokens.
    resp = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0, stop=stop,
                                     extra_body={"ignore_eos": True, "min_tokens": 12})
    assert (resp.choices[0].text, resp.choices[0].finish_reason) == (full, "length")
    assert resp.usage.completion_tokens == 12
    streamed = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0, stop=stop,
                                              stream=True, extra_body={"ignore_eos": True, "min_tokens": 12}))
    assert "".join(c.choices[0].text for c in streamed if c.choices) == full
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                          temperature=0, extra_body={"min_tokens": 5})
    assert chat.usage.completion_tokens == 5 and chat.choices[0].finish_reason == "length"

    for body in ({"prompt": "hi", "max_tokens": 3, "min_tokens": 4}, {"prompt": "hi", "min_tokens": -1}):
        r = server.post("/v1/completions", {"model": "tiny", **body})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == "min_tokens"
    r = server.post("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                                             "max_completion_tokens": 2, "min_tokens": 3})
    assert r.status_code == 400 and r.json()["error"]["param"] == "min_tokens"


def test_greedy_output_equals_model_generate(client, tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # = the server's ignore_eos: EOS may come, and does not stop
    prompts = ["Hello! How are you today?", "Kubernetes runs containers on a cluster of machines; an operator",
               "one two three"]

    async def ask_all():
        async with openai.AsyncOpenAI(base_url=client.base_url, api_key=API_KEY, max_retries=0) as ac:
            return await asyncio.gather(*(ac.completions.create(
                model="tiny", prompt=p, max_tokens=24, temperature=0,
                extra_body={"ignore_eos": True, "return_token_ids": True}) for p in prompts))

    responses = asyncio.run(ask_all())  # concurrently: batched in the engine
    for prompt, resp in zip(prompts, responses):
        ids = tok(prompt, return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**ids, max_new_tokens=24, do_sample=False, pad_token_id=tok.pad_token_id)
        expected = out[0, ids["input_ids"].shape[1]:].tolist()
        got = resp.choices[0].model_extra["token_ids"]
        assert got == expected, prompt
        assert resp.choices[0].text == tok.decode(expected, skip_special_tokens=True)
        # Streamed: the token ids of all chunks together are the same (none lost with text-less chunks).
        streamed = []
        for chunk in client.completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0, stream=True,
                                               extra_body={"ignore_eos": True, "return_token_ids": True,
                                                           "priority": -1}):
            streamed.extend(chunk.choices[0].model_extra.get("token_ids") or [])
        assert streamed == expected, prompt


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize("body, param", [
    ({"model": "nope", "prompt": "hi"}, "model"),
    ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "hi", "max_tokens": 100000}, "max_tokens"),
    ({"prompt": "hi", "n": 2}, "n"),
    ({"prompt": "hi", "temperature": 3}, "temperature"),
    ({"prompt": "hi", "top_p": 0}, "top_p"),
    ({"prompt": "hi", "top_p": "x"}, "top_p"),
    ({"prompt": ["a", "b"]}, "prompt"),
    ({"prompt": ""}, "prompt"),
])
def test_bad_parameters_are_400(client, body, param):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(**{"model": "tiny", **body})
    assert err.value.status_code == 400
    error = err.value.body
    assert set(error) >= {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert param in (error["param"] or "") or param in error["message"]


def test_chat_errors_are_400(client):
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=[], max_tokens=3)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=10**6)


def test_malformed_json_is_400(server):
    r = httpx.post(server.url + "/v1/completions", content=b"{not json", timeout=30,
                   headers={**server.headers, "content-type": "application/json"})
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(server.url + "/v1/chat/completions", content=b"[1, 2", timeout=30,
                   headers={**server.headers, "content-type": "application/json"})
    assert r.status_code == 400
    r = server.post("/v1/completions", {"max_tokens": 3})  # no prompt
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = server.post("/v1/completions", None)  # no body at all
    assert r.status_code == 400


def test_api_key_is_required_except_for_probes(server):
    with pytest.raises(openai.AuthenticationError) as err:
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).completions.create(
            model="tiny", prompt="hi", max_tokens=2)
    assert err.value.status_code == 401
    assert httpx.post(server.url + "/v1/completions", json={"prompt": "hi"}, timeout=30).status_code == 401
    assert httpx.post(server.url + "/admin/reload", json={}, timeout=30).status_code == 401
    assert httpx.get(server.url + "/v1/models", timeout=30).status_code == 401
    for path in ("/health", "/ready", "/metrics"):
        assert httpx.get(server.url + path, timeout=30).status_code == 200, path


# ------------------------------------------------------------------ metrics, disconnects, reload


def test_metrics_are_present_and_move(server, client):
    before = server.metrics()
    labels = {"model": "tiny", "revision": "r1"}
    for name in ("autoglm_requests_running", "autoglm_requests_waiting", "autoglm_kv_cache_usage_ratio"):
        metric(before, name, **labels)
    client.completions.create(model="tiny", prompt="metrics please", max_tokens=8, temperature=0,
                              extra_body={"ignore_eos": True})
    after = server.metrics()
    assert metric(after, "autoglm_requests_total", status="success", **labels) >= \
        metric(before, "autoglm_requests_total", status="success", **labels) + 1
    assert metric(after, "autoglm_generation_tokens_total", **labels) >= \
        metric(before, "autoglm_generation_tokens_total", **labels) + 8
    assert metric(after, "autoglm_prompt_tokens_total", **labels) > metric(before, "autoglm_prompt_tokens_total", **labels)
    for hist in ("autoglm_time_to_first_token_seconds", "autoglm_inter_token_latency_seconds",
                 "autoglm_request_duration_seconds", "autoglm_batch_size"):
        assert metric(after, hist + "_count", **labels) > metric(before, hist + "_count", **labels), hist


def test_prefix_cache_reports_cached_tokens_and_counts_hits(server, client):
    """The same long prompt twice: the second reuses the first's KV (usage.prompt_tokens_details.cached_tokens,
    streamed usage too); another cache_salt shares nothing; the prefix cache counters move."""
    labels = {"model": "tiny", "revision": "r1"}
    before = server.metrics()
    prompt = "the agent opened the settings app and then " * 12
    first = client.completions.create(model="tiny", prompt=prompt, max_tokens=2, temperature=0)
    second = client.completions.create(model="tiny", prompt=prompt, max_tokens=2, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert 0 < cached < second.usage.prompt_tokens and cached % 16 == 0
    stream = client.completions.create(model="tiny", prompt=prompt, max_tokens=2, temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    usage = [c.usage for c in stream if c.usage is not None][-1]
    assert usage.prompt_tokens_details.cached_tokens == cached
    salted = client.completions.create(model="tiny", prompt=prompt, max_tokens=2, temperature=0,
                                       extra_body={"cache_salt": "tenant-b"})
    assert salted.usage.prompt_tokens_details.cached_tokens == 0
    assert salted.choices[0].text == second.choices[0].text
    after = server.metrics()
    assert metric(after, "autoglm_prefix_cache_hits_total", **labels) >= \
        metric(before, "autoglm_prefix_cache_hits_total", **labels) + 2 * cached
    assert metric(after, "autoglm_prefix_cache_queries_total", **labels) > \
        metric(after, "autoglm_prefix_cache_hits_total", **labels)
    assert metric(after, "autoglm_kv_cache_blocks_capacity", **labels) > 0
    metric(after, "autoglm_kv_cache_blocks_used", **labels)
    metric(after, "autoglm_preemptions_total", **labels)


def test_every_response_names_the_revision_that_answered(server, client):
    """`x-autoglm-revision` (the metrics' `revision` label) on answers, streams, errors and probes, so a
    client of a canary rollout sees which revision answered."""
    raw = client.chat.completions.with_raw_response.create(
        model="tiny", messages=[{"role": "user", "content": "who answers?"}], max_tokens=4)
    assert raw.headers["x-autoglm-revision"] == "r1"
    with client.chat.completions.with_streaming_response.create(
            model="tiny", messages=[{"role": "user", "content": "who streams?"}], max_tokens=4, stream=True) as r:
        assert r.headers["x-autoglm-revision"] == "r1"
        assert "".join(c.choices[0].delta.content or "" for c in r.parse() if c.choices)
    errors = [
        server.post("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": -1}),  # 400
        server.post("/v1/completions", {"model": "tiny", "prompt": "x"}, headers={"Authorization": "Bearer no"}),
        server.post("/v1/nothing-here", {}),  # 404
        server.post("/v1/completions", {"model": "tiny", "prompt": "x " * 5000, "max_tokens": 4}),  # too long
    ]
    assert [r.status_code for r in errors] == [400, 401, 404, 400], [r.text for r in errors]
    for r in (*errors, server.get("/health"), server.get("/ready"), server.get("/metrics")):
        assert r.headers["x-autoglm-revision"] == "r1", (r.request.url, r.headers)
    assert 'revision="r1"' in server.metrics()  # the header and the metrics name the same revision


def test_client_disconnect_aborts_the_request(server):
    def aborted() -> float:
        return metric(server.metrics(), "autoglm_requests_total", status="aborted")

    start = aborted()
    # Streaming: read one chunk, then hang up.
    with httpx.stream("POST", server.url + "/v1/completions", headers=server.headers, timeout=60,
                      json={"model": "tiny", "prompt": "Tell me a long story", "max_tokens": 900,
                            "ignore_eos": True, "stream": True}) as r:
        next(r.iter_lines())
    wait_for(lambda: aborted() >= start + 1, timeout=30, message="streaming request aborted")

    # Non-streaming: the client times out and closes the connection.
    with pytest.raises(httpx.TimeoutException):
        httpx.post(server.url + "/v1/completions", headers=server.headers, timeout=0.3,
                   json={"model": "tiny", "prompt": "Tell me a long story", "max_tokens": 900, "ignore_eos": True})
    wait_for(lambda: aborted() >= start + 2, timeout=30, message="non-streaming request aborted")
    wait_for(lambda: metric(server.metrics(), "autoglm_requests_running") == 0, timeout=30,
             message="slots freed")


def _load(server: Server, stop: threading.Event, results: list, concurrency: int = 8) -> threading.Thread:
    """Background load: `concurrency` streams of requests until `stop` is set; results get (ok, detail)."""

    async def one(ac: openai.AsyncOpenAI, i: int) -> None:
        while not stop.is_set():
            try:
                if i % 2:
                    r = await ac.completions.create(model="tiny", prompt=f"Request {i} says", max_tokens=16,
                                                    temperature=0, extra_body={"ignore_eos": True})
                    ok = r.usage.completion_tokens == 16
                else:
                    n = 0
                    async for c in await ac.chat.completions.create(
                            model="tiny", messages=[{"role": "user", "content": f"hi {i}"}], max_tokens=16,
                            temperature=0, stream=True, stream_options={"include_usage": True},
                            extra_body={"ignore_eos": True}):
                        if c.usage:
                            n = c.usage.completion_tokens
                    ok = n == 16
                results.append((ok, "short" if not ok else ""))
            except Exception as exc:  # noqa: BLE001 - every failure is recorded
                results.append((False, repr(exc)))

    async def main() -> None:
        async with server.aclient() as ac:
            await asyncio.gather(*(one(ac, i) for i in range(concurrency)))

    t = threading.Thread(target=lambda: asyncio.run(main()), daemon=True)
    t.start()
    return t


def _gauges(server: Server, revision: str) -> list[str]:
    return [line for line in server.metrics().splitlines()
            if line.startswith(("autoglm_requests_running{", "autoglm_requests_waiting{", "autoglm_kv_cache_usage"))
            and f'revision="{revision}"' in line]


def test_hot_reload_to_another_model_under_load_fails_no_request(server, other_model_dir):
    stop, results = threading.Event(), []
    t = _load(server, stop, results)
    try:
        wait_for(lambda: len(results) >= 8, timeout=60, message="load running")
        assert len(_gauges(server, "r1")) == 3
        before = server.post("/v1/completions", {"model": "tiny", "prompt": "same prompt", "max_tokens": 8,
                                                 "temperature": 0, "ignore_eos": True}).json()["choices"][0]["text"]
        r = server.post("/admin/reload", {"model": str(other_model_dir), "revision": "r2"})
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "reloaded" and r.json()["revision"] == "r2"
        # The old revision's gauges are gone (an autoscaler must not read a queue that no longer exists).
        assert _gauges(server, "r1") == []
        assert len(_gauges(server, "r2")) == 3
        after = server.post("/v1/completions", {"model": "tiny", "prompt": "same prompt", "max_tokens": 8,
                                                "temperature": 0, "ignore_eos": True}).json()["choices"][0]["text"]
        assert after != before  # the other weights serve now
        n = len(results)
        wait_for(lambda: len(results) >= n + 8, timeout=60, message="load after /admin/reload")
        reloads = metric(server.metrics(), "autoglm_reloads_total", status="success")
        server.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: metric(server.metrics(), "autoglm_reloads_total", status="success") >= reloads + 1,
                 timeout=60, message="SIGHUP reload")
        n = len(results)
        wait_for(lambda: len(results) >= n + 8, timeout=60, message="load after SIGHUP")
        assert server.post("/admin/reload", {"model": "/does/not/exist"}).status_code == 403  # outside the root
        missing = server.post("/admin/reload", {"model": str(other_model_dir.parent / "missing")})
        assert missing.status_code == 400 and missing.json()["error"]["code"] == "model_not_found"
    finally:
        stop.set()
        t.join(60)
    failures = [d for ok, d in results if not ok]
    assert not failures, failures[:5]
    assert server.proc.poll() is None
    assert server.get("/ready").status_code == 200


def test_lone_surrogate_is_400_and_the_connection_stays_usable(server):
    """`"\\ud800"` is valid JSON but no tokenizer takes it: a 400, and the keep-alive connection serves on."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    headers = {**server.headers, "Content-Type": "application/json"}
    try:
        for path, raw in (("/v1/completions", b'{"model": "tiny", "prompt": "a\\ud800b", "max_tokens": 2}'),
                          ("/v1/chat/completions",
                           b'{"model": "tiny", "messages": [{"role": "user", "content": "\\udfff"}]}')):
            conn.request("POST", path, body=raw, headers=headers)
            r = conn.getresponse()
            body = json.loads(r.read())
            assert r.status == 400, body
            assert body["error"]["type"] == "invalid_request_error" and "surrogate" in body["error"]["message"]
            conn.request("POST", "/v1/completions", body=b'{"model": "tiny", "prompt": "ok", "max_tokens": 2}',
                         headers=headers)
            ok = conn.getresponse()
            assert ok.status == 200, ok.read()
            ok.read()
    finally:
        conn.close()


@pytest.fixture(scope="module")
def one_slot(tiny_model_dir, logdir):
    """One slot, no reload, no client priority."""
    srv = start_server(tiny_model_dir, logdir, "--max-batch-size", "1", name="one-slot")
    yield srv
    srv.stop()


def _hog(srv: Server) -> tuple[threading.Thread, list]:
    """A long request that holds the only slot (until aborted by the caller's disconnect or the end)."""
    out: list = []

    def run() -> None:
        with httpx.stream("POST", srv.url + "/v1/completions", timeout=120, json={
                "model": "tiny", "prompt": "hog", "max_tokens": 1000, "ignore_eos": True, "stream": True}) as r:
            for line in r.iter_lines():
                out.append(line)
                if len(out) > 2 and out[-1] == "stop":
                    break

    t = threading.Thread(target=run, daemon=True)
    t.start()
    wait_for(lambda: metric(srv.metrics(), "autoglm_requests_running") == 1, timeout=60, message="hog running")
    return t, out


def test_stream_headers_arrive_while_queued_and_leaving_frees_the_queue_slot(one_slot):
    hog, _ = _hog(one_slot)
    aborted = metric(one_slot.metrics(), "autoglm_requests_total", status="aborted")
    # The slot is taken: this request waits in the queue, and its headers are here already.
    with httpx.stream("POST", one_slot.url + "/v1/chat/completions", timeout=60, json={
            "model": "tiny", "messages": [{"role": "user", "content": "queued"}], "max_tokens": 4,
            "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        assert metric(one_slot.metrics(), "autoglm_requests_waiting") == 1
    # It left before its first token: it is aborted and out of the queue while the hog still runs.
    wait_for(lambda: metric(one_slot.metrics(), "autoglm_requests_waiting") == 0, timeout=30,
             message="queued stream aborted")
    assert metric(one_slot.metrics(), "autoglm_requests_running") == 1
    # The same for a non-streaming request that gives up while queued.
    async def give_up_while_queued() -> None:
        async with httpx.AsyncClient(base_url=one_slot.url, timeout=60) as hc:
            call = asyncio.create_task(hc.post("/v1/completions", json={"model": "tiny", "prompt": "queued too",
                                                                        "max_tokens": 4}))
            await asyncio.to_thread(wait_for, lambda: metric(one_slot.metrics(), "autoglm_requests_waiting") == 1,
                                    timeout=30, message="queued")
            call.cancel()  # closes the connection
            with pytest.raises(asyncio.CancelledError):
                await call

    asyncio.run(give_up_while_queued())
    assert metric(one_slot.metrics(), "autoglm_requests_running") == 1  # the hog still holds the slot
    wait_for(lambda: metric(one_slot.metrics(), "autoglm_requests_total", status="aborted") >= aborted + 2,
             timeout=30, message="queued requests aborted")
    assert metric(one_slot.metrics(), "autoglm_requests_waiting") == 0
    hog.join(120)


def test_reload_and_client_priority_are_off_by_default(one_slot):
    r = one_slot.post("/admin/reload", {})
    assert r.status_code == 403 and r.json()["error"]["code"] == "reload_disabled"
    r = one_slot.post("/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 2, "priority": -1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "priority"
    assert one_slot.post("/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 2}).status_code == 200


# ------------------------------------------------------------------ admission, drain, load errors


def test_queue_full_is_429_with_retry_after(tiny_model_dir, logdir):
    srv = start_server(tiny_model_dir, logdir, "--max-queue", "1", "--max-batch-size", "1", name="small-queue")
    try:
        async def flood():
            async with httpx.AsyncClient(base_url=srv.url, timeout=120) as hc:
                return await asyncio.gather(*(hc.post("/v1/completions", json={
                    "model": "tiny", "prompt": f"flood {i}", "max_tokens": 64, "ignore_eos": True})
                    for i in range(12)))

        responses = asyncio.run(flood())
        codes = sorted(r.status_code for r in responses)
        assert 429 in codes and 200 in codes, codes
        assert set(codes) == {200, 429}, codes
        limited = next(r for r in responses if r.status_code == 429)
        assert int(limited.headers["retry-after"]) >= 1
        assert limited.json()["error"]["type"] == "rate_limit_error"
        with pytest.raises(openai.RateLimitError):
            async def flood_openai():
                async with srv.aclient() as ac:
                    await asyncio.gather(*(ac.completions.create(model="tiny", prompt="x", max_tokens=64,
                                                                 extra_body={"ignore_eos": True})
                                           for _ in range(8)))
            asyncio.run(flood_openai())
        assert metric(srv.metrics(), "autoglm_requests_total", status="rejected") >= 1
    finally:
        srv.stop()


def test_sigterm_drains_in_flight_requests_and_exits_zero(tiny_model_dir, logdir):
    srv = start_server(tiny_model_dir, logdir, "--max-batch-size", "8", "--drain-timeout", "60", name="drain")
    results: list = []

    async def flight(ac: openai.AsyncOpenAI, i: int) -> None:
        try:
            r = await ac.completions.create(model="tiny", prompt=f"Drain me {i}", max_tokens=128, temperature=0,
                                            extra_body={"ignore_eos": True})
            results.append(r.usage.completion_tokens)
        except Exception as exc:  # noqa: BLE001
            results.append(exc)

    async def main() -> None:
        async with srv.aclient(timeout=120) as ac:
            tasks = [asyncio.create_task(flight(ac, i)) for i in range(32)]
            await asyncio.to_thread(wait_for, lambda: metric(srv.metrics(), "autoglm_requests_running") >= 4,
                                    timeout=30, message="requests running")
            srv.proc.send_signal(signal.SIGTERM)
            async with httpx.AsyncClient(base_url=srv.url, timeout=10) as hc:
                ready = await hc.get("/ready")
                late = await hc.post("/v1/completions", json={"model": "tiny", "prompt": "late", "max_tokens": 2})
            assert ready.status_code == 503
            assert late.status_code == 503
            assert late.json()["error"]["code"] == "draining"
            await asyncio.gather(*tasks)

    try:
        asyncio.run(main())
        assert results == [128] * 32, [r for r in results if r != 128][:3]
        assert srv.proc.wait(60) == 0, srv.log_text()[-2000:]
    finally:
        srv.stop()


def _fake_cgroup_v2(root: Path, limit: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "memory.max").write_text(limit + "\n")
    (root / "memory.current").write_text("0\n")
    return root


def test_kv_cache_larger_than_the_container_limit_exits_2(tiny_model_dir, tmp_path):
    """The host has GBs free; a 1 MiB cgroup limit is what the KV cache must fit in."""
    cg = _fake_cgroup_v2(tmp_path / "cgroup", str(1 << 20))
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("AUTOGLM_RUNTIME_")},
           "AUTOGLM_RUNTIME_CGROUP_ROOT": str(cg)}
    proc = subprocess.run([str(CLI), "serve", "--model", str(tiny_model_dir), "--device", "cpu", "--port",
                           str(free_port()), "--host", "127.0.0.1"], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "KV cache" in proc.stderr and "available" in proc.stderr and "Traceback" not in proc.stderr


def test_reload_that_does_not_fit_next_to_the_serving_model_is_409(tiny_model_dir, other_model_dir, logdir, tmp_path):
    cg = _fake_cgroup_v2(tmp_path / "cgroup", "max")
    srv = start_server(tiny_model_dir, logdir, "--enable-reload", "--revision", "r1", name="reload-memory",
                       env={"AUTOGLM_RUNTIME_CGROUP_ROOT": str(cg)})
    try:
        (cg / "memory.max").write_text(f"{1 << 20}\n")  # the pod's limit, with the first model already loaded
        r = srv.post("/admin/reload", {"model": str(other_model_dir), "revision": "r2"})
        assert r.status_code == 409, r.text
        assert r.json()["error"]["code"] == "insufficient_memory"
        assert srv.get("/ready").status_code == 200
        assert srv.post("/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 2}).status_code == 200
        assert metric(srv.metrics(), "autoglm_reloads_total", status="error", revision="r1") == 1
        (cg / "memory.max").write_text("max\n")
        assert srv.post("/admin/reload", {"model": str(other_model_dir), "revision": "r2"}).status_code == 200
    finally:
        srv.stop()


@pytest.mark.parametrize("kind", ["missing", "broken"])
def test_model_load_error_exits_nonzero_with_a_clear_line(tmp_path, kind):
    model_dir = tmp_path / "model"
    if kind == "broken":
        model_dir.mkdir()
        (model_dir / "config.json").write_text("{not json")
    proc = subprocess.run([str(CLI), "serve", "--model", str(model_dir), "--port", str(free_port())],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(lines) == 1 and "cannot load model" in lines[0] and str(model_dir) in lines[0], proc.stderr


def test_bad_settings_exit_nonzero(tmp_path):
    proc = subprocess.run([str(CLI), "serve", "--model", str(tmp_path), "--max-batch-size", "0"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "max_batch_size" in proc.stderr and "Traceback" not in proc.stderr


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
