"""The proxy in-process against small aiohttp upstreams (fakes of a pod: this is the unit tier; the real
runtime processes are in test_router_runtime.py). Retries, streaming, body checks, affinity, canary."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator
from ssl import SSLContext

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from autoglm_router.app import STATE, create_app
from autoglm_router.endpoints import Endpoint, Revision, StaticSource, Topology
from autoglm_router.picker import Picker
from tests.helpers import free_port

CHAT = "/v1/chat/completions"


class Pod:
    """A fake model pod: counts requests; behaviour ``ok`` (SSE stream), ``unavailable`` (503 draining),
    ``reset`` (drops the connection before answering), ``cut`` (drops it after the first chunk),
    ``prefill`` (answers nothing until ``release``; ``left`` says the caller went away meanwhile)."""

    def __init__(self, name: str, behaviour: str = "ok", revision: str = "r1") -> None:
        self.name, self.behaviour, self.revision = name, behaviour, revision
        self.hits = 0
        self.release = asyncio.Event()
        self.release.set()
        self.server: TestServer | None = None
        self.left = False

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.hits += 1
        await request.read()
        if self.behaviour == "unavailable":
            body = {
                "error": {"message": "draining", "type": "service_unavailable_error", "param": None, "code": "draining"}
            }
            return web.json_response(body, status=503)
        if self.behaviour == "prefill":
            try:
                await self.release.wait()
            except asyncio.CancelledError:  # the test server cancels a handler whose caller left
                self.left = True
                raise
        if self.behaviour == "reset":
            assert request.transport is not None
            request.transport.close()
            return web.Response()
        resp = web.StreamResponse(headers={"content-type": "text/event-stream", "x-autoglm-revision": self.revision})
        await resp.prepare(request)
        await resp.write(b'data: {"n": 0}\n\n')
        if self.behaviour == "cut":
            assert request.transport is not None
            request.transport.close()
            return resp
        await self.release.wait()
        await resp.write(b'data: {"n": 1}\n\ndata: [DONE]\n\n')
        await resp.write_eof()
        return resp

    async def start(self, ssl: SSLContext | None = None) -> Endpoint:
        """Serve (HTTPS with ``ssl``) on a free loopback port; the endpoint to reach it."""
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.server = TestServer(app, host="127.0.0.1")
        await self.server.start_server(ssl=ssl)
        return Endpoint(f"127.0.0.1:{self.server.port}", self.name)


@pytest.fixture
async def make_router() -> AsyncIterator:
    servers: list[TestServer] = []

    async def make(
        topo: Topology, picker: Picker | None = None, ssl: SSLContext | None = None, **kw
    ) -> tuple[TestServer, StaticSource]:
        source = StaticSource(topo)
        app = create_app(source, picker or Picker(), queue_scrape_interval=0, **kw)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server(ssl=ssl)
        servers.append(server)
        return server, source

    yield make
    for s in servers:
        await s.close()


async def _pods(*pods: Pod, revision: str = "r1") -> Revision:
    return Revision(revision, tuple([await p.start() for p in pods]))


def _chat(user: str = "u", text: str = "hi") -> dict:
    return {"model": "tiny", "stream": True, "user": user, "messages": [{"role": "user", "content": text}]}


async def test_stream_passes_chunk_by_chunk(make_router):
    pod = Pod("p0")
    pod.release.clear()
    router, _ = await make_router(Topology(await _pods(pod)))
    async with aiohttp.ClientSession() as s, s.post(router.make_url(CHAT), json=_chat()) as r:
        assert r.status == 200 and r.headers["x-autoglm-pod"] == "p0" and r.headers["x-autoglm-revision"] == "r1"
        first = await asyncio.wait_for(r.content.readuntil(b"\n\n"), 5)  # the pod is still holding the rest
        assert first == b'data: {"n": 0}\n\n'
        pod.release.set()
        assert (await r.read()).endswith(b"data: [DONE]\n\n")


async def test_connect_failure_reset_and_503_are_retried_elsewhere(make_router):
    dead = Endpoint(f"127.0.0.1:{free_port()}", "dead")
    reset, draining, good = Pod("reset", "reset"), Pod("draining", "unavailable"), Pod("good")
    rev = Revision("r1", (dead, await reset.start(), await draining.start()))
    router, source = await make_router(Topology(rev))
    # Three failing pods: two retries, then the last 503 is what the client gets.
    async with aiohttp.ClientSession() as s, s.post(router.make_url(CHAT), json=_chat()) as r:
        assert r.status == 503 and (await r.json())["error"]["code"] == "draining"
    # One good pod among them: however the picks go, the request succeeds.
    source.set(Topology(Revision("r1", (dead, await draining.start(), await good.start()))))
    for i in range(6):
        async with aiohttp.ClientSession() as s, s.post(router.make_url(CHAT), json=_chat(f"u{i}")) as r:
            assert r.status == 200 and r.headers["x-autoglm-pod"] == "good"
            await r.read()
    async with aiohttp.ClientSession() as s, s.get(router.make_url("/metrics")) as r:
        text = await r.text()
    assert 'autoglm_router_retries_total{reason="connect"}' in text
    assert 'autoglm_router_retries_total{reason="unavailable"}' in text
    assert 'autoglm_router_retries_total{reason="reset"}' in text


async def test_a_response_that_started_is_never_retried(make_router):
    cut, good = Pod("cut", "cut"), Pod("good")
    router, _ = await make_router(Topology(await _pods(cut)))
    async with aiohttp.ClientSession() as s, s.post(router.make_url(CHAT), json=_chat()) as r:
        assert r.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await r.read()
    assert cut.hits == 1 and good.hits == 0


async def test_bad_bodies_never_reach_a_pod(make_router):
    pod = Pod("p0")
    router, _ = await make_router(Topology(await _pods(pod)), max_body_bytes=1000)
    async with aiohttp.ClientSession() as s:
        async with s.post(router.make_url(CHAT), data=b"{not json", headers={"content-type": "application/json"}) as r:
            body = await r.json()
            assert r.status == 400 and body["error"]["type"] == "invalid_request_error"
            assert body["error"]["message"].startswith("Malformed JSON body")
        async with s.post(router.make_url(CHAT), data=b'{"x": "' + b"a" * 2000 + b'"}') as r:
            assert r.status == 413 and (await r.json())["error"]["code"] == "request_too_large"
        # Chunked (no Content-Length): the limit still holds.

        async def gen():
            for _ in range(20):
                yield b"a" * 100

        async with s.post(router.make_url(CHAT), data=gen()) as r:
            assert r.status == 413
        async with s.post(router.make_url(CHAT), json=_chat()) as r:  # and it keeps serving
            assert r.status == 200
            await r.read()
    assert pod.hits == 1


async def test_no_pods_is_a_json_503(make_router):
    router, _ = await make_router(Topology())
    async with aiohttp.ClientSession() as s, s.post(router.make_url(CHAT), json=_chat()) as r:
        assert r.status == 503 and (await r.json())["error"]["code"] == "no_endpoints"
        assert r.headers["Retry-After"] == "1"  # holding is off by default in create_app (the CLI holds)


async def test_held_while_no_pod_then_released_when_one_turns_ready(make_router):
    """Scale to zero: requests that find no Ready pod wait (counted in the held gauge), and go to the pod
    as soon as the source reports it; past the capacity or the timeout: a JSON 503 with Retry-After."""
    router, source = await make_router(Topology(Revision("r1")), hold_timeout=30, hold_capacity=3, deployment="m")
    async with aiohttp.ClientSession() as s:

        async def call() -> tuple[int, bytes]:
            async with s.post(router.make_url(CHAT), json=_chat()) as r:
                return r.status, await r.read()

        held = [asyncio.create_task(call()) for _ in range(3)]
        state = router.app[STATE]
        for _ in range(100):
            if state.hold.held == 3:
                break
            await asyncio.sleep(0.02)
        async with s.get(router.make_url("/metrics")) as r:
            assert 'autoglm_router_held_requests{deployment="m",revision="r1"} 3.0' in await r.text()
        async with s.post(router.make_url(CHAT), json=_chat()) as r:  # the fourth: the queue is full
            assert r.status == 503 and r.headers["Retry-After"] == "5"
            assert (await r.json())["error"]["code"] == "hold_full"
        assert not any(t.done() for t in held)
        pod = Pod("p0")
        source.set(Topology(await _pods(pod)))
        answers = await asyncio.wait_for(asyncio.gather(*held), 5)
        assert [a[0] for a in answers] == [200] * 3 and pod.hits == 3
        async with s.get(router.make_url("/metrics")) as r:
            text = await r.text()
        assert 'autoglm_router_held_requests{deployment="m",revision="r1"} 0.0' in text
        assert "autoglm_router_hold_seconds_count 3.0" in text


async def _until(cond, timeout: float = 5.0) -> None:
    for _ in range(int(timeout / 0.02)):
        if cond():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not met in time")


async def test_a_client_that_leaves_is_let_go_while_held_and_while_the_pod_computes(make_router):
    """A client that gives up while held leaves the hold queue at once (it no longer keeps the deployment
    awake); one that gives up before the pod's first byte closes the pod's connection (the pod stops
    computing for nobody) and no longer counts in that pod's load."""
    router, source = await make_router(Topology(Revision("r1")), hold_timeout=30, hold_capacity=3)
    state = router.app[STATE]
    async with aiohttp.ClientSession() as s:
        gone = asyncio.create_task(s.post(router.make_url(CHAT), json=_chat()))
        await _until(lambda: state.hold.held == 1)
        gone.cancel()
        await _until(lambda: state.hold.held == 0)
    pod = Pod("p0", "prefill")
    pod.release.clear()
    source.set(Topology(await _pods(pod)))
    async with aiohttp.ClientSession() as s:
        gone = asyncio.create_task(s.post(router.make_url(CHAT), json=_chat()))
        await _until(lambda: pod.hits == 1)
        assert sum(state.picker.inflight.values()) == 1
        gone.cancel()
        await _until(lambda: pod.left)
        await _until(lambda: not state.picker.inflight)
        pod.release.set()  # the next request is answered as usual
        async with s.post(router.make_url(CHAT), json=_chat()) as r:
            assert r.status == 200 and (await r.read()).endswith(b"data: [DONE]\n\n")
    assert not state.picker.inflight


async def test_hold_timeout_is_a_json_503_with_retry_after(make_router):
    router, _ = await make_router(Topology(Revision("r1")), hold_timeout=0.3)
    async with aiohttp.ClientSession() as s, s.post(router.make_url(CHAT), json=_chat()) as r:
        assert r.status == 503 and r.headers["Retry-After"] == "5"
        assert (await r.json())["error"]["code"] == "hold_timeout"


async def test_session_affinity_sticks_and_two_routers_agree(make_router):
    pods = [Pod(f"p{i}") for i in range(3)]
    rev = await _pods(*pods)
    a, _ = await make_router(Topology(rev), Picker("SessionAffinity"))
    b, _ = await make_router(Topology(rev), Picker("SessionAffinity"))
    homes: dict[str, set[str]] = {}
    async with aiohttp.ClientSession() as s:
        for step in range(3):
            for task in range(12):
                body = _chat(text=f"task {task}")
                body["messages"].append({"role": "assistant", "content": f"step {step}"})
                for router in (a, b):
                    async with s.post(router.make_url(CHAT), json=body) as r:
                        homes.setdefault(f"task {task}", set()).add(r.headers["x-autoglm-pod"])
                        await r.read()
    assert all(len(h) == 1 for h in homes.values()), homes
    assert len({next(iter(h)) for h in homes.values()}) > 1  # sessions spread over the pods


async def test_canary_by_user_and_header(make_router):
    stable, canary = Pod("s", revision="r1"), Pod("c", revision="r2")
    topo = Topology(await _pods(stable), await _pods(canary, revision="r2"), canary_weight=10)
    router, source = await make_router(topo)
    seen: dict[str, set[str]] = {}
    async with aiohttp.ClientSession() as s:
        for i in range(300):
            user = f"user-{i % 150}"
            async with s.post(router.make_url(CHAT), json=_chat(user)) as r:
                seen.setdefault(user, set()).add(r.headers["x-autoglm-revision"])
                await r.read()
        async with s.post(router.make_url(CHAT), json=_chat("user-0"), headers={"x-autoglm-canary": "always"}) as r:
            assert r.headers["x-autoglm-revision"] == "r2"
            await r.read()
        assert all(len(v) == 1 for v in seen.values())
        on_canary = {u for u, v in seen.items() if v == {"r2"}}
        assert 0.03 < len(on_canary) / len(seen) < 0.2
        source.set(Topology(topo.stable, topo.canary, canary_weight=50))
        for user in on_canary:
            async with s.post(router.make_url(CHAT), json=_chat(user)) as r:
                assert r.headers["x-autoglm-revision"] == "r2"  # raising the weight moves nobody back
                await r.read()
    counts = Counter(v for vs in seen.values() for v in vs)
    assert counts["r1"] + counts["r2"] == 150


async def test_ready_and_drain_flag(make_router):
    router, _ = await make_router(Topology(await _pods(Pod("p0"))))
    async with aiohttp.ClientSession() as s:
        async with s.get(router.make_url("/ready")) as r:
            assert r.status == 200 and json.loads(await r.text())["endpoints"] == 1
        router.app[STATE].draining = True
        async with s.get(router.make_url("/ready")) as r:
            assert r.status == 503
        async with s.get(router.make_url("/healthz")) as r:
            assert r.status == 200


async def test_sessions_leave_a_pod_loaded_past_the_bound(make_router):
    """Streams held open on one pod push its load past ceil(1.25 x mean): sessions whose home it is go to
    the next pod clockwise (and the move is counted); once the streams end they come home."""
    from autoglm_router.policies import HashRing, pick_bounded
    from autoglm_router.sessions import prompt_key

    pods = [Pod(f"p{i}") for i in range(3)]
    rev = await _pods(*pods)
    router, _ = await make_router(Topology(rev), Picker("SessionAffinity"))
    ring = HashRing([e.address for e in rev.endpoints])
    by_address = {e.address: p for e, p in zip(rev.endpoints, pods, strict=True)}

    def home(task: int) -> Pod:
        key = "prompt:" + prompt_key(_chat(text=f"task {task}"))
        return by_address[pick_bounded(ring, key, {}, 1.25).pod]

    busy = home(0)
    mine = [t for t in range(200) if home(t) is busy][:8]
    busy.release.clear()  # its streams stay open; the other pods answer at once
    async with aiohttp.ClientSession() as s:
        held = await s.post(router.make_url(CHAT), json=_chat(text=f"task {mine[0]}"))
        await held.content.readuntil(b"\n\n")
        assert held.headers["x-autoglm-pod"] == busy.name  # load 0: home
        # busy holds 1 of 1 in flight; the bound for one more is ceil(1.25 x 2 / 3) = 1: its sessions move.
        for t in mine[1:4]:
            async with s.post(router.make_url(CHAT), json=_chat(text=f"task {t}")) as r:
                assert r.headers["x-autoglm-pod"] != busy.name
                await r.read()
        busy.release.set()
        await held.read()
        held.release()
        for t in mine[1:4]:
            async with s.post(router.make_url(CHAT), json=_chat(text=f"task {t}")) as r:
                assert r.headers["x-autoglm-pod"] == busy.name  # load gone: back home
                await r.read()
        async with s.get(router.make_url("/metrics")) as r:
            text = await r.text()
    moved = [line for line in text.splitlines() if line.startswith("autoglm_router_sessions_moved_by_load_total ")]
    assert moved and float(moved[0].split()[-1]) >= 3
