"""What the server does before the engine's queue (in process, fake engine; see test_server_inprocess.py):
admission at the door (a full server answers 429 before it decodes anything), the model loading inside
the lifespan (``/ready`` says ``loading`` meanwhile), and the detokenizing of logprobs off the event loop."""

from __future__ import annotations

import asyncio
import base64
import threading

import pytest

from autoglm_runtime.logprobs import TokenLogprob
from tests.runtime.fake_engine import FakeEngine
from tests.runtime.test_server_inprocess import CHAT, LIVENESS, serve, within

pytestmark = [pytest.mark.runtime, pytest.mark.timeout(60)]

# An image the server would refuse with a 400 once it decoded it (not base64 of any image at all): a 429
# for it proves the server answered before decoding.
UNDECODABLE = {"model": "fake", "max_tokens": 4, "messages": [{"role": "user", "content": [
    {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(b"no png").decode()}},
    {"type": "text", "text": "what is on the screen?"}]}]}


def assert_full(r) -> None:
    assert r.status_code == 429, r.text
    assert r.headers["retry-after"] == "1"
    assert r.json()["error"]["type"] == "rate_limit_error" and r.json()["error"]["code"] == "queue_full"


def rejected(s) -> float:
    line = next(x for x in s.metrics().splitlines() if x.startswith("autoglm_requests_total{") and 'status="rejected"' in x)
    return float(line.rsplit(" ", 1)[1])


async def test_pending_requests_are_bounded_and_the_next_gets_429_before_its_body_is_decoded(tmp_path):
    engine = FakeEngine()
    engine.hold_admission = asyncio.Event()  # the first request stays between tokenizing and the queue
    engine.auto_tokens = 2
    async with serve(tmp_path, engine, max_pending_requests=1) as s:
        first = asyncio.create_task(s.client.post("/v1/chat/completions", json=CHAT))
        await within(engine.wait_for(lambda: engine.admitting == 1), "the first request at the engine")
        tokenized = engine.tokenizer.calls

        assert_full(await s.client.post("/v1/chat/completions", json=UNDECODABLE))
        assert_full(await s.client.post("/v1/completions", json={"model": "fake", "prompt": "hi", "max_tokens": 2}))
        big = {**UNDECODABLE, "messages": [{"role": "user", "content": [  # an 8 MB screenshot: still a clean 429
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * (8 << 20)}}]}]}
        assert_full(await s.client.post("/v1/chat/completions", json=big))
        assert engine.tokenizer.calls == tokenized  # nothing of theirs was tokenized
        assert rejected(s) == 3

        engine.hold_admission.set()
        assert (await within(first, "the first request")).status_code == 200
        # the gate let go of the first one: the next request is decoded (and refused for what it is)
        r = await s.client.post("/v1/chat/completions", json=UNDECODABLE)
        assert r.status_code == 400, r.text
        assert (await s.client.get("/health")).status_code == 200


async def test_requests_beyond_the_engines_capacity_get_429_before_tokenizing(tmp_path):
    """max_batch_size + max_queue requests in progress fill the server: the next is not even tokenized
    (the engine would refuse it only after the server did all the work)."""
    engine = FakeEngine()
    async with serve(tmp_path, engine, max_batch_size=1, max_queue=1) as s:
        held = [asyncio.create_task(s.client.post("/v1/chat/completions", json=CHAT)) for _ in range(2)]
        await within(engine.wait_for(lambda: len(engine.active) == 2), "two requests in the engine")
        tokenized = engine.tokenizer.calls

        assert_full(await s.client.post("/v1/chat/completions", json=CHAT))
        assert engine.tokenizer.calls == tokenized

        for req in list(engine.active.values()):
            engine.emit(req.request_id, "ok", finished=True)
        assert [r.status_code for r in await within(asyncio.gather(*held), "the held requests")] == [200, 200]

        async def released() -> None:  # the gate lets go once each response has been sent
            while s.state.admission.in_progress:
                await asyncio.sleep(0.01)

        await within(released(), "the gate to let go")
        engine.auto_tokens = 1
        assert (await s.client.post("/v1/chat/completions", json=CHAT)).status_code == 200


async def test_ready_says_loading_while_the_model_loads_in_the_lifespan(tmp_path):
    release = threading.Event()
    engine = FakeEngine()
    engine.auto_tokens = 1

    def make_engine() -> FakeEngine:  # runs in a worker thread, as loading a model does
        assert threading.current_thread() is not threading.main_thread()
        release.wait(LIVENESS)
        return engine

    async with serve(tmp_path, make_engine=make_engine) as s:
        r = await s.client.get("/ready")
        assert (r.status_code, r.json()) == (503, {"status": "loading"})
        assert (await s.client.get("/health")).status_code == 200
        assert (await s.client.get("/metrics")).status_code == 200
        r = await s.client.post("/v1/chat/completions", json=CHAT)
        assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready", r.text
        assert r.headers["retry-after"] == "1"
        assert (await s.client.get("/v1/models")).status_code == 503

        release.set()

        async def ready() -> None:
            while (await s.client.get("/ready")).status_code != 200:
                await asyncio.sleep(0.02)

        await within(ready(), "/ready after loading")
        assert (await s.client.post("/v1/chat/completions", json=CHAT)).status_code == 200
        assert (await s.client.get("/v1/models")).json()["data"][0]["max_model_len"] == engine.max_model_len


async def test_a_failed_load_is_reported_once_and_the_server_is_unhealthy(tmp_path):
    from autoglm_runtime.server.state import StartupError

    reported: list = []

    def make_engine() -> FakeEngine:
        raise StartupError("invalid engine settings: the KV cache does not fit", 2)

    async with serve(tmp_path, make_engine=make_engine, on_startup_error=reported.append) as s:
        async def failed() -> None:
            while not reported:
                await asyncio.sleep(0.02)

        await within(failed(), "the startup error")
        assert [(e.message, e.exit_code) for e in reported] == [("invalid engine settings: the KV cache does not fit", 2)]
        r = await s.client.get("/ready")
        assert (r.status_code, r.json()) == (503, {"status": "failed to start"})
        assert (await s.client.get("/health")).status_code == 503


@pytest.mark.parametrize("path, body", [("/v1/completions", {"model": "fake", "prompt": "hi", "logprobs": 1}),
                                        ("/v1/chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 1})])
@pytest.mark.parametrize("stream", [False, True])
async def test_logprobs_are_detokenized_off_the_event_loop(tmp_path, path, body, stream):
    engine = FakeEngine()
    async with serve(tmp_path, engine) as s:
        lps = [TokenLogprob(ord(c) + 1, -0.5, [(ord(c) + 1, -0.5)]) for c in "ab"]
        task = asyncio.create_task(s.client.post(path, json={**body, "max_tokens": 4, "stream": stream}))
        await within(engine.wait_for(lambda: len(engine.active) == 1), "the request in the engine")
        engine.tokenizer.decode_threads.clear()  # the token-bytes table of chat logprobs is made before
        engine.emit(engine.only().request_id, "ab", finished=True, logprobs=lps)
        r = await within(task, "the response")
        assert r.status_code == 200 and "logprobs" in r.text, r.text
    assert engine.tokenizer.decode_threads, "logprobs were never detokenized"
    assert threading.main_thread().name not in engine.tokenizer.decode_threads
