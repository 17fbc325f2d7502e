"""`--request-timeout` end to end: a REAL server process with a short timeout and one slot.

A request that runs past the timeout gets a 504 with an OpenAI-style error body (or, once a stream
has started, an error event and `data: [DONE]`); its engine slot is free by the time the client
sees the error, and it counts as `autoglm_requests_total{status="timeout"}` (not `aborted`, which is a
client's disconnect). The timeout is sized from this machine's measured speed; the in-process tier (test_server_inprocess.py) covers 504 with a fake
engine that never answers.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from tests.runtime.test_server import metric, start_server

pytestmark = [pytest.mark.runtime, pytest.mark.timeout(240)]

LONG_TOKENS = 1000  # the prompt + this stays under the tiny model's 1024 positions
LONG = {"model": "tiny", "prompt": "Tell me a very long story", "max_tokens": LONG_TOKENS, "ignore_eos": True,
        "temperature": 0}


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    """The timeout is a tenth of what a long request takes on THIS machine (measured first, on a server
    without a timeout), so a long request always runs past it and a 4-token one never does, however
    fast or loaded the machine is."""
    logs = tmp_path_factory.mktemp("timeout-logs")
    probe = start_server(tiny_model_dir, logs, "--max-batch-size", "1", name="calibrate")
    try:
        t0 = time.monotonic()
        r = probe.post("/v1/completions", LONG)
        long_seconds = time.monotonic() - t0
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == LONG_TOKENS
    finally:
        probe.stop()
    timeout = round(long_seconds / 10, 3)
    # One slot: a request admitted right after a timed-out one proves the slot was freed.
    srv = start_server(tiny_model_dir, logs, "--max-batch-size", "1", "--request-timeout", str(timeout),
                       name="timeout")
    srv.timeout = timeout
    yield srv
    srv.stop()


def _timed_out(srv) -> float:
    return metric(srv.metrics(), "autoglm_requests_total", status="timeout")


def _assert_slot_free_and_reusable(srv) -> None:
    # Not polled: the slot must be free by the time the client has the error.
    assert metric(srv.metrics(), "autoglm_requests_running") == 0
    assert metric(srv.metrics(), "autoglm_requests_waiting") == 0
    r = srv.post("/v1/completions", {"model": "tiny", "prompt": "short", "max_tokens": 4, "ignore_eos": True})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 4


def test_short_requests_are_unaffected(server):
    r = server.post("/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 3, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", LONG),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "A long story, please"}],
                              "max_tokens": 1000, "ignore_eos": True}),
])
def test_non_streaming_request_past_the_timeout_is_504(server, path, body):
    before = _timed_out(server)
    success = metric(server.metrics(), "autoglm_requests_total", status="success")
    t0 = time.monotonic()
    r = server.post(path, body)
    assert r.status_code == 504, r.text
    assert time.monotonic() - t0 >= server.timeout  # not before the timeout (an upper bound would be a speed goal)
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "timeout_error" and error["code"] == "request_timeout"
    assert str(server.timeout) in error["message"]
    assert r.headers.get("x-request-id")
    assert _timed_out(server) == before + 1
    _assert_slot_free_and_reusable(server)
    assert metric(server.metrics(), "autoglm_requests_total", status="success") == success + 1  # the short one


def test_streaming_request_past_the_timeout_ends_with_an_error_event(server):
    before = _timed_out(server)
    with httpx.stream("POST", server.url + "/v1/completions", timeout=60, json={**LONG, "stream": True}) as r:
        assert r.status_code == 200  # the stream had started: the error comes in-band
        body = r.read().decode()
    events = [e for e in body.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    payloads = [json.loads(e[6:]) for e in events[:-1]]
    assert payloads[-1] == {"error": {"message": payloads[-1]["error"]["message"], "type": "timeout_error",
                                      "param": None, "code": "request_timeout"}}
    chunks = payloads[:-1]
    assert all(p["choices"] for p in chunks)
    assert not any(p["choices"][0]["finish_reason"] for p in chunks)
    assert _timed_out(server) == before + 1
    _assert_slot_free_and_reusable(server)


def test_queued_request_times_out_before_it_starts(server):
    """Two long requests on one slot: the second waits in the queue and times out there (its stream's headers
    went out at admission, so a streamed one ends with the error event), and both are counted once."""
    before = _timed_out(server)

    async def both():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as hc:
            return await asyncio.gather(hc.post("/v1/completions", json=LONG),
                                        hc.post("/v1/completions", json={**LONG, "stream": True}))

    first, second = asyncio.run(both())
    assert first.status_code == 504, first.text
    assert second.status_code == 200 and '"timeout_error"' in second.text
    assert _timed_out(server) == before + 2
    _assert_slot_free_and_reusable(server)
