"""The server in process with a fake engine (tests/runtime/fake_engine.py): no model, no sleeps.

The real app (`create_app`) is served by a real uvicorn on a socket bound here, in the test's own event
loop; the test drives the engine's side (admission, outputs, failures) and waits on events, so nothing
depends on the machine's speed. The real-process tier (test_server.py) runs the same app on a model.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from autoglm_runtime.cli import _Server
from autoglm_runtime.config import RuntimeSettings
from autoglm_runtime.engine_api import EngineDeadError, EngineDrainingError, InvalidRequestError
from autoglm_runtime.loader import InsufficientMemoryError, ModelLoadError
from autoglm_runtime.metrics import RuntimeMetrics
from autoglm_runtime.server.api import EventStreamResponse, create_app
from autoglm_runtime.server.generation import EventStream
from autoglm_runtime.server.state import ServerState
from tests.runtime.fake_engine import FakeEngine

pytestmark = [pytest.mark.runtime, pytest.mark.timeout(60)]

CHAT = {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
COMPLETION = {"model": "fake", "prompt": "hello", "max_tokens": 8}
LIVENESS = 20  # seconds: only a bound that turns a hang into a failure, never a speed goal


@dataclass
class Served:
    url: str
    state: ServerState
    engine: FakeEngine | None
    client: httpx.AsyncClient

    def metrics(self) -> str:
        return self.state.metrics.render().decode()


@contextlib.asynccontextmanager
async def serve(root: Path, engine: FakeEngine | None = None, make_engine=None, on_startup_error=None,
                **overrides) -> AsyncIterator[Served]:
    """``make_engine``: the server loads its engine in the lifespan (as the CLI's does) instead of being given
    ``engine``; ``Served.engine`` is then None."""
    if make_engine is None:
        engine = engine or FakeEngine()
    model = root / "models" / "fake"
    model.mkdir(parents=True, exist_ok=True)
    settings = RuntimeSettings(model=model, served_model_name="fake", **overrides)
    state = ServerState(settings, engine, RuntimeMetrics("fake", "r1"),
                        max_model_len=engine.max_model_len if engine else 0)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)  # connections wait in the backlog until uvicorn has started: no polling
    import uvicorn

    server = _Server.make(uvicorn.Config(create_app(state, make_engine, on_startup_error), lifespan="on",
                                         log_level="warning",
                                         timeout_graceful_shutdown=5))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        async with httpx.AsyncClient(base_url=url, timeout=LIVENESS) as client:
            yield Served(url, state, engine, client)
    finally:
        server.should_exit = True
        await task
        sock.close()


async def within(aw, what: str):
    try:
        return await asyncio.wait_for(aw, LIVENESS)
    except TimeoutError:
        raise AssertionError(f"hung: {what}") from None


def events(body: str) -> list[str]:
    return [e for e in body.split("\n\n") if e]


# ------------------------------------------------------------------ streaming and admission


@pytest.mark.parametrize("path, body", [("/v1/completions", COMPLETION), ("/v1/chat/completions", CHAT)])
async def test_stream_headers_arrive_on_admission_while_queued(tmp_path, path, body):
    async with serve(tmp_path) as s:
        async with s.client.stream("POST", path, json={**body, "stream": True}) as r:
            # The engine admitted the request and produced nothing yet: headers are already here.
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            req = s.engine.only()
            assert req.sent_tokens == 0
            s.engine.emit(req.request_id, "ab")
            s.engine.emit(req.request_id, "c", finished=True)
            text = (await r.aread()).decode()
        evs = events(text)
        assert evs[-1] == "data: [DONE]"
        chunks = [json.loads(e[6:]) for e in evs[:-1]]
        if path == "/v1/completions":
            assert "".join(c["choices"][0]["text"] for c in chunks) == "abc"
        else:
            assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
            assert "".join(c["choices"][0]["delta"]["content"] or "" for c in chunks) == "abc"
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert s.state.inflight == 0 and not s.engine.aborted


@pytest.mark.parametrize("path, body", [("/v1/completions", COMPLETION), ("/v1/chat/completions", CHAT)])
async def test_stream_client_gone_before_first_chunk_frees_the_slot_and_drain_does_not_wait(tmp_path, path, body):
    async with serve(tmp_path) as s:
        async with s.client.stream("POST", path, json={**body, "stream": True}) as r:
            assert r.status_code == 200
            rid = s.engine.only().request_id
            assert s.state.inflight == 1
        # The client hung up without a single token produced: the server notices, aborts, frees the slot.
        await within(s.engine.wait_for(lambda: not s.engine.active), "abort after disconnect")
        assert s.engine.aborted == [rid]
        await within(s.state._idle.wait(), "in-flight count back to 0")
        assert s.state.inflight == 0
        assert await within(s.state.drain(timeout=3600), "drain") is True
        assert 'status="aborted"} 1.0' in s.metrics()


@pytest.mark.parametrize("path, body", [("/v1/completions", COMPLETION), ("/v1/chat/completions", CHAT)])
async def test_non_streaming_client_gone_before_first_token_frees_the_slot(tmp_path, path, body):
    async with serve(tmp_path) as s:
        call = asyncio.create_task(s.client.post(path, json=body))
        await within(s.engine.wait_for(lambda: bool(s.engine.active)), "admission")
        rid = s.engine.only().request_id
        call.cancel()  # the client gives up: httpx closes the connection
        with pytest.raises(asyncio.CancelledError):
            await call
        await within(s.engine.wait_for(lambda: not s.engine.active), "abort after disconnect")
        assert s.engine.aborted == [rid]
        await within(s.state._idle.wait(), "in-flight count back to 0")
        assert await within(s.state.drain(timeout=3600), "drain") is True


async def test_client_gone_while_admission_is_pending_frees_the_slot(tmp_path):
    engine = FakeEngine()
    engine.hold_admission = asyncio.Event()
    async with serve(tmp_path, engine) as s:
        call = asyncio.create_task(s.client.post("/v1/completions", json={**COMPLETION, "stream": True}))
        while s.state.inflight == 0:
            await asyncio.sleep(0)  # yields to the server in this loop; no time passes
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        await within(s.state._idle.wait(), "in-flight count back to 0")
        engine.hold_admission.set()
        await asyncio.sleep(0)
        assert not engine.requests  # the admission was cancelled with its request: nothing entered the engine


async def test_event_stream_closes_even_if_its_body_never_starts():
    """The race behind the leak: the handler returned a started generation, and the client was already gone."""
    closed: list[bool] = []

    async def body():
        yield "data: never\n\n"

    async def close() -> None:
        closed.append(True)

    async def receive():
        return {"type": "http.disconnect"}

    async def send(message):
        raise OSError("client gone")

    await EventStreamResponse(EventStream(body(), close))({"type": "http"}, receive, send)
    assert closed == [True]


async def test_streams_and_full_responses_match(tmp_path):
    engine = FakeEngine()
    engine.auto_tokens = 5
    async with serve(tmp_path, engine) as s:
        full = (await s.client.post("/v1/completions", json=COMPLETION)).json()
        assert full["choices"][0]["text"] == "xxxxx"
        assert full["usage"] == {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10,
                                 "prompt_tokens_details": {"cached_tokens": 0}}
        r = await s.client.post("/v1/completions", json={**COMPLETION, "stream": True,
                                                         "stream_options": {"include_usage": True}})
        chunks = [json.loads(e[6:]) for e in events(r.text)[:-1]]
        assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == "xxxxx"
        assert chunks[-1]["usage"]["completion_tokens"] == 5
        chat = (await s.client.post("/v1/chat/completions", json=CHAT)).json()
        assert chat["choices"][0]["message"] == {"role": "assistant", "content": "xxxxx"}
        assert s.state.inflight == 0


@pytest.mark.parametrize("path, body", [("/v1/completions", {**COMPLETION, "logprobs": 1}),
                                        ("/v1/chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 1})])
async def test_streamed_logprobs_ride_with_the_text_of_their_tokens(tmp_path, path, body):
    """The logprobs of a text-less delta (half a UTF-8 character) come with the next chunk that has text;
    a completion's text_offset keeps counting across chunks."""
    from autoglm_runtime.logprobs import TokenLogprob

    def lp(text: str, value: float) -> list[TokenLogprob]:
        return [TokenLogprob(ord(c) + 1, value, [(ord(c) + 1, value)]) for c in text]

    async with serve(tmp_path) as s:
        async with s.client.stream("POST", path, json={**body, "stream": True}) as r:
            assert r.status_code == 200
            req = s.engine.only()
            assert req.params.logprobs == 1
            s.engine.emit(req.request_id, "", ids=[ord("a") + 1], logprobs=lp("a", -0.5))
            s.engine.emit(req.request_id, "ab", ids=[ord("b") + 1], logprobs=lp("b", -1.0))
            s.engine.emit(req.request_id, "c", finished=True, logprobs=lp("c", -2.0))
            text = (await r.aread()).decode()
    chunks = [json.loads(e[6:]) for e in events(text)[:-1]]
    with_lp = [c["choices"][0] for c in chunks if c["choices"][0].get("logprobs")]
    if path == "/v1/completions":
        assert [c["text"] for c in with_lp] == ["ab", "c"]
        assert [c["logprobs"]["tokens"] for c in with_lp] == [["a", "b"], ["c"]]
        assert [c["logprobs"]["token_logprobs"] for c in with_lp] == [[-0.5, -1.0], [-2.0]]
        assert [c["logprobs"]["text_offset"] for c in with_lp] == [[0, 1], [2]]
    else:
        assert [c["delta"]["content"] for c in with_lp] == ["ab", "c"]
        content = [[(t["token"], t["logprob"]) for t in c["logprobs"]["content"]] for c in with_lp]
        assert content == [[("a", -0.5), ("b", -1.0)], [("c", -2.0)]]
        assert with_lp[0]["logprobs"]["content"][0]["top_logprobs"] == [
            {"token": "a", "logprob": -0.5, "bytes": [97]}
        ]


@pytest.mark.parametrize("extra, param, needle", [
    ({"repetition_penalty": math.inf}, "repetition_penalty", "repetition_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty", "repetition_penalty"),
    ({"frequency_penalty": 2.5}, "frequency_penalty", "frequency_penalty"),
    ({"response_format": {"type": "json_schema"}}, "response_format", "json_schema.schema"),
    ({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]}, "messages", "text-only"),
])
async def test_vision_and_sampling_extensions_refused_with_400(tmp_path, extra, param, needle):
    """Bad penalties, an unusable response_format and images for a text-only model are 400s naming the
    parameter; nothing reaches the engine."""
    async with serve(tmp_path) as s:
        r = await s.client.post("/v1/chat/completions", content=json.dumps({**CHAT, **extra}),
                                headers={"content-type": "application/json"})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == param and needle in err["message"], err
        assert not s.engine.requests and s.state.inflight == 0


# ------------------------------------------------------------------ errors from the engine


@pytest.mark.parametrize("stream", [False, True])
async def test_queue_full_is_429_before_any_stream(tmp_path, stream):
    engine = FakeEngine()
    engine.capacity = 1
    async with serve(tmp_path, engine) as s:
        first = asyncio.create_task(s.client.post("/v1/completions", json=COMPLETION))
        await within(engine.wait_for(lambda: bool(engine.active)), "first admitted")
        r = await s.client.post("/v1/completions", json={**COMPLETION, "stream": stream})
        assert r.status_code == 429
        assert r.headers["retry-after"] == "1"
        assert r.json()["error"]["type"] == "rate_limit_error"
        engine.emit(engine.only().request_id, "ok", finished=True)
        assert (await first).status_code == 200
        assert 'status="rejected"} 1.0' in s.metrics()
        assert s.state.inflight == 0


@pytest.mark.parametrize("exc, status, code", [
    (EngineDrainingError("draining"), 503, "draining"),
    (EngineDeadError("dead"), 503, "engine_dead"),
    (InvalidRequestError("prompt has token ids outside the vocabulary", param="prompt"), 400, None),
])
async def test_engine_errors_map_to_http_codes(tmp_path, exc, status, code):
    engine = FakeEngine()
    engine.refuse = exc
    async with serve(tmp_path, engine) as s:
        for path, body in (("/v1/completions", COMPLETION), ("/v1/chat/completions", CHAT)):
            r = await s.client.post(path, json=body)
            assert r.status_code == status, r.text
            assert r.json()["error"]["code"] == code
        assert s.state.inflight == 0


async def test_engine_death_mid_stream_ends_with_an_error_event(tmp_path):
    async with serve(tmp_path) as s:
        async with s.client.stream("POST", "/v1/completions", json={**COMPLETION, "stream": True}) as r:
            rid = s.engine.only().request_id
            s.engine.emit(rid, "a")
            s.engine.fail(rid, EngineDeadError("boom"))
            text = (await r.aread()).decode()
        evs = events(text)
        assert evs[-1] == "data: [DONE]"
        assert json.loads(evs[-2][6:])["error"]["code"] == "engine_dead"
        assert s.state.inflight == 0


@pytest.mark.parametrize("stream", [False, True])
async def test_request_timeout_is_504_and_frees_the_slot(tmp_path, stream):
    # The engine never answers, so the request runs into its timeout whatever the machine's speed.
    async with serve(tmp_path, request_timeout_seconds=0.2) as s:
        r = await within(s.client.post("/v1/completions", json={**COMPLETION, "stream": stream}), "timeout")
        if stream:  # headers went out at admission: the error comes in-band
            assert r.status_code == 200
            evs = events(r.text)
            assert evs[-1] == "data: [DONE]"
            assert json.loads(evs[-2][6:])["error"]["code"] == "request_timeout"
        else:
            assert r.status_code == 504
            assert r.json()["error"] == {"message": r.json()["error"]["message"], "type": "timeout_error",
                                         "param": None, "code": "request_timeout"}
        assert len(s.engine.aborted) == 1 and not s.engine.active  # not polled: freed before the answer
        assert s.state.inflight == 0
        assert 'status="timeout"} 1.0' in s.metrics() and 'status="aborted"} 0.0' in s.metrics()


async def test_drain_waits_for_in_flight_and_refuses_new_requests(tmp_path):
    async with serve(tmp_path) as s:
        call = asyncio.create_task(s.client.post("/v1/completions", json=COMPLETION))
        await within(s.engine.wait_for(lambda: bool(s.engine.active)), "admission")
        drain = asyncio.create_task(s.state.drain(timeout=3600))
        await asyncio.sleep(0)
        assert (await s.client.get("/ready")).status_code == 503
        late = await s.client.post("/v1/completions", json=COMPLETION)
        assert late.status_code == 503 and late.json()["error"]["code"] == "draining"
        assert not drain.done()
        s.engine.emit(s.engine.only().request_id, "done", finished=True)
        assert (await call).json()["choices"][0]["text"] == "done"
        assert await within(drain, "drain") is True


# ------------------------------------------------------------------ input hardening


@pytest.mark.parametrize("path, raw", [
    ("/v1/completions", b'{"model": "fake", "prompt": "a\\ud800b"}'),
    ("/v1/completions", b'{"model": "fake", "prompt": "x", "stop": ["\\udfff"]}'),
    ("/v1/chat/completions", b'{"model": "fake", "messages": [{"role": "user", "content": "\\ud800"}]}'),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud83d"}]}]}'),
])
async def test_lone_surrogate_is_400_and_the_connection_stays_usable(tmp_path, path, raw):
    engine = FakeEngine()
    engine.auto_tokens = 1
    async with serve(tmp_path, engine) as s:
        transport = httpx.AsyncHTTPTransport(retries=0)
        async with httpx.AsyncClient(base_url=s.url, transport=transport, timeout=LIVENESS,
                                     limits=httpx.Limits(max_connections=1)) as one:
            r = await one.post(path, content=raw, headers={"content-type": "application/json"})
            assert r.status_code == 400, r.text
            assert r.json()["error"]["type"] == "invalid_request_error"
            assert "surrogate" in r.json()["error"]["message"]
            ok = await one.post("/v1/completions", json=COMPLETION)  # the same keep-alive connection
            assert ok.status_code == 200
        assert s.state.inflight == 0


async def test_priority_is_refused_unless_allowed_and_bounded(tmp_path):
    engine = FakeEngine()
    engine.auto_tokens = 1
    async with serve(tmp_path, engine) as s:
        r = await s.client.post("/v1/completions", json={**COMPLETION, "priority": -5})
        assert r.status_code == 400 and r.json()["error"]["param"] == "priority"
        assert (await s.client.post("/v1/completions", json={**COMPLETION, "priority": 0})).status_code == 200
    engine = FakeEngine()
    engine.auto_tokens = 1
    async with serve(tmp_path, engine, allow_client_priority=True) as s:
        assert (await s.client.post("/v1/completions", json={**COMPLETION, "priority": -5})).status_code == 200
        assert engine.requests[-1].priority == -5
        for bad in (10**6, -(10**6), 10**40):
            r = await s.client.post("/v1/completions", json={**COMPLETION, "priority": bad})
            assert r.status_code == 400 and r.json()["error"]["param"] == "priority", bad


@pytest.mark.parametrize("body, param, code", [
    ({"prompt": "x" * 64}, "prompt", "context_length_exceeded"),
    ({"prompt": "x" * 10, "max_tokens": 60}, "max_tokens", "context_length_exceeded"),
    ({"prompt": ""}, "prompt", None),
    ({"prompt": "x", "max_tokens": 4, "min_tokens": 5}, "min_tokens", None),
])
async def test_lengths_are_checked_in_one_place(tmp_path, body, param, code):
    async with serve(tmp_path) as s:
        r = await s.client.post("/v1/completions", json={"model": "fake", **body})
        assert r.status_code == 400, r.text
        assert (r.json()["error"]["param"], r.json()["error"]["code"]) == (param, code)
        assert not s.engine.requests
        if code == "context_length_exceeded":  # a revision too short for its traffic shows in its metrics
            assert 'autoglm_requests_total{model="fake",revision="r1",status="invalid"} 1.0' in s.metrics()


# ------------------------------------------------------------------ reload safety


async def test_reload_is_off_unless_enabled(tmp_path):
    async with serve(tmp_path) as s:
        r = await s.client.post("/admin/reload", json={})
        assert r.status_code == 403 and r.json()["error"]["code"] == "reload_disabled"
        assert not s.engine.reloads


async def test_reload_needs_the_api_key_and_a_folder_under_the_root(tmp_path):
    key = tmp_path / "key"
    key.write_text("sk-k\n")
    (tmp_path / "models" / "other").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (tmp_path / "models" / "escape").symlink_to(tmp_path / "outside")
    async with serve(tmp_path, enable_reload=True, api_key_file=key) as s:
        auth = {"Authorization": "Bearer sk-k"}
        assert (await s.client.post("/admin/reload", json={})).status_code == 401
        for bad in (str(tmp_path / "outside"), str(tmp_path / "models" / ".." / "outside"),
                    str(tmp_path / "models" / "escape"), "/etc"):
            r = await s.client.post("/admin/reload", json={"model": bad}, headers=auth)
            assert r.status_code == 403 and r.json()["error"]["code"] == "model_not_allowed", bad
        r = await s.client.post("/admin/reload", json={"model": str(tmp_path / "models" / "missing")}, headers=auth)
        assert r.status_code == 400 and r.json()["error"]["code"] == "model_not_found"
        for raw in (b'{"model": "a\\u0000b"}', b'{"model": "\\ud800"}', b'{"model": 5}', b'{"x": 1}', b"[1"):
            r = await s.client.post("/admin/reload", content=raw, headers={**auth, "content-type": "application/json"})
            assert r.status_code == 400, (raw, r.text)
        assert not s.engine.reloads
        r = await s.client.post("/admin/reload", json={"model": str(tmp_path / "models" / "other"), "revision": "r2"},
                                headers=auth)
        assert r.status_code == 200, r.text
        assert s.engine.reloads == [((tmp_path / "models" / "other").resolve(), "r2")]


@pytest.mark.parametrize("exc, status, code", [
    (InsufficientMemoryError("needs 9 GiB, 1 GiB available"), 409, "insufficient_memory"),
    (ModelLoadError("no config.json"), 400, "model_load_failed"),
])
async def test_reload_that_cannot_load_keeps_serving(tmp_path, exc, status, code):
    engine = FakeEngine()

    async def refuse(model_dir, revision=""):
        raise exc

    engine.reload = refuse  # type: ignore[method-assign]
    async with serve(tmp_path, engine, enable_reload=True) as s:
        r = await s.client.post("/admin/reload", json={"revision": "r2"})
        assert r.status_code == status and r.json()["error"]["code"] == code
        assert (await s.client.get("/ready")).status_code == 200
        assert 'revision="r1",status="error"} 1.0' in s.metrics()


async def test_reload_drops_the_old_revisions_gauges(tmp_path):
    (tmp_path / "models" / "other").mkdir(parents=True)
    async with serve(tmp_path, enable_reload=True) as s:
        assert 'autoglm_requests_running{model="fake",revision="r1"}' in s.metrics()
        r = await s.client.post("/admin/reload", json={"model": str(tmp_path / "models" / "other"), "revision": "r2"})
        assert r.status_code == 200
        text = s.metrics()
        for gauge in ("autoglm_requests_running", "autoglm_requests_waiting", "autoglm_kv_cache_usage_ratio"):
            assert f'{gauge}{{model="fake",revision="r2"}}' in text
            assert f'{gauge}{{model="fake",revision="r1"}}' not in text


async def test_the_revision_header_follows_a_reload_and_rides_on_a_bugs_500(tmp_path):
    (tmp_path / "models" / "other").mkdir(parents=True)
    engine = FakeEngine()
    async with serve(tmp_path, engine, enable_reload=True) as s:
        assert (await s.client.get("/health")).headers["x-autoglm-revision"] == "r1"
        r = await s.client.post("/admin/reload", json={"model": str(tmp_path / "models" / "other"), "revision": "r2"})
        assert r.status_code == 200 and r.headers["x-autoglm-revision"] == "r2"
        engine.refuse = RuntimeError("a bug")  # Starlette's last-resort handler, outside every middleware
        r = await s.client.post("/v1/completions", json=COMPLETION, headers={"x-request-id": "bug-1"})
        assert r.status_code == 500 and r.json()["error"]["type"] == "internal_error"
        assert r.headers["x-autoglm-revision"] == "r2" and r.headers["x-request-id"] == "bug-1"


async def test_a_request_being_tokenized_when_drain_starts_is_served(tmp_path):
    """In-flight accounting starts before tokenization (which runs off the event loop): a drain waits for it."""
    import threading

    engine = FakeEngine()
    engine.auto_tokens = 2
    entered, release = threading.Event(), threading.Event()
    real = engine.tokenizer.__call__

    class SlowTokenizer(type(engine.tokenizer)):
        def __call__(self, text, add_special_tokens=True):
            entered.set()
            release.wait(LIVENESS)
            return real(text, add_special_tokens)

    engine.tokenizer = SlowTokenizer()
    async with serve(tmp_path, engine) as s:
        call = asyncio.create_task(s.client.post("/v1/completions", json=COMPLETION))
        assert await asyncio.to_thread(entered.wait, LIVENESS)
        drain = asyncio.create_task(s.state.drain(timeout=3600))
        await asyncio.sleep(0)
        assert not drain.done() and s.state.inflight == 1
        release.set()
        r = await within(call, "request")
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == "xx"
        assert await within(drain, "drain") is True
