"""The router process in front of three REAL runtime processes serving the tiny model, talked to with the
REAL OpenAI client: streaming, sticky sessions (the router's ``x-autoglm-pod`` header), retries around a
draining and a killed pod with no client failure, the runtime's 4xx for bad input, the router's drain."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from tests.helpers import free_port, wait_for
from tests.runtime.test_server import Server, metric, start_server

pytestmark = [pytest.mark.runtime, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[2]
ROUTER = REPO / ".venv" / "bin" / "autoglm-router"


@dataclass
class Router:
    proc: subprocess.Popen
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0)

    def aclient(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0)

    def metrics(self) -> str:
        return httpx.get(self.url + "/metrics", timeout=10).text

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_router(logdir: Path, pods: dict[str, Server], *extra: str, name: str = "router") -> Router:
    port = free_port()
    argv = [str(ROUTER), "--port", str(port), *extra]
    argv += [f"--backend=r1={pod}@127.0.0.1:{srv.port}" for pod, srv in pods.items()]
    log = logdir / f"{name}.log"
    proc = subprocess.Popen(argv, stdout=log.open("w"), stderr=subprocess.STDOUT)
    router = Router(proc, port, log)

    def ready() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"router exited {proc.returncode}: {log.read_text()[-2000:]}")
        return httpx.get(router.url + "/ready", timeout=5).status_code == 200

    wait_for(ready, timeout=30, interval=0.1, message="router /ready")
    return router


@pytest.fixture(scope="module")
def logdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("router-logs")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from autoglm_runtime.modelmaker import make_model

    return make_model("tiny", tmp_path_factory.mktemp("tiny-model") / "tiny-glm", seed=0)


@pytest.fixture(scope="module")
def pods(model_dir, logdir):
    servers: dict[str, Server] = {}
    try:
        for i in range(3):
            servers[f"pod-{i}"] = start_server(
                model_dir, logdir, "--revision", "r1", "--drain-timeout", "30", name=f"pod-{i}"
            )
        yield servers
    finally:
        for srv in servers.values():
            srv.stop()


def _chat(task: int, step: int) -> list[dict]:
    """An agent's step: the same system prompt and task, a growing history after them."""
    messages = [
        {"role": "system", "content": "You are a phone agent."},
        {"role": "user", "content": f"Task {task}: open the settings"},
    ]
    for s in range(step):
        messages += [{"role": "assistant", "content": f"tap({s}, {s})"}, {"role": "user", "content": f"screen {s}"}]
    return messages


def test_streams_and_sessions_stick(pods, logdir):
    router = start_router(logdir, pods, "--policy", "SessionAffinity", name="router-affinity")
    try:
        client = router.client()
        with client.chat.completions.with_streaming_response.create(
            model="tiny", messages=_chat(0, 0), max_tokens=8, stream=True
        ) as r:
            assert r.headers["x-autoglm-revision"] == "r1" and r.headers["x-autoglm-pod"] in pods
            chunks = [c for c in r.parse() if c.choices]
        assert len(chunks) >= 2 and "".join(c.choices[0].delta.content or "" for c in chunks)
        homes: dict[int, set[str]] = {}
        for step in range(3):
            for task in range(8):
                raw = client.chat.completions.with_raw_response.create(
                    model="tiny", messages=_chat(task, step), max_tokens=2
                )
                homes.setdefault(task, set()).add(raw.headers["x-autoglm-pod"])
                assert raw.parse().choices[0].message is not None
        assert all(len(h) == 1 for h in homes.values()), homes
        assert len(set().union(*homes.values())) >= 2, homes  # 8 tasks do not all hash to one pod
        assert metric(router.metrics(), "autoglm_router_picks_total", policy="SessionAffinity") >= 25
    finally:
        assert router.stop() == 0


def test_bad_input_gets_the_runtimes_4xx(pods, logdir):
    router = start_router(logdir, pods, "--max-body-bytes", "100000", name="router-bad-input")
    direct = next(iter(pods.values()))
    try:
        for url in (router.url, direct.url):  # the same answer from the router and from a pod
            r = httpx.post(
                url + "/v1/chat/completions",
                content=b"{not json",
                timeout=30,
                headers={"content-type": "application/json"},
            )
            assert r.status_code == 400, r.text
            assert r.json()["error"]["type"] == "invalid_request_error"
            assert r.json()["error"]["message"].startswith("Malformed JSON body")
        with pytest.raises(openai.BadRequestError) as err:
            router.client().chat.completions.create(model="nope", messages=_chat(0, 0), max_tokens=2)
        assert err.value.code == "model_not_found"
        r = httpx.post(
            router.url + "/v1/chat/completions",
            timeout=30,
            json={"model": "tiny", "messages": [{"role": "user", "content": "x" * 200_000}]},
        )
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        out = router.client().chat.completions.create(model="tiny", messages=_chat(0, 0), max_tokens=2)
        assert out.choices  # still serving
        text = router.metrics()
        assert metric(text, "autoglm_router_requests_total", code="413") == 1
        assert metric(text, "autoglm_router_requests_total", code="400") == 2  # malformed + unknown model
    finally:
        assert router.stop() == 0


def _load(router: Router, stop: threading.Event, results: list, concurrency: int = 6) -> threading.Thread:
    async def one(ac: openai.AsyncOpenAI, i: int) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            try:
                got = 0
                async for c in await ac.chat.completions.create(
                    model="tiny",
                    messages=_chat(i * 1000 + n, 0),
                    max_tokens=24,
                    stream=True,
                    stream_options={"include_usage": True},
                    extra_body={"ignore_eos": True},
                ):
                    if c.usage:
                        got = c.usage.completion_tokens
                results.append((got == 24, f"tokens={got}"))
            except Exception as exc:  # noqa: BLE001 - every failure is recorded
                results.append((False, repr(exc)))

    async def main() -> None:
        async with router.aclient() as ac:
            await asyncio.gather(*(one(ac, i) for i in range(concurrency)))

    t = threading.Thread(target=lambda: asyncio.run(main()), daemon=True)
    t.start()
    return t


def test_router_drain_finishes_its_streams(pods, logdir):
    """SIGTERM to the router mid-stream: /ready turns 503, the stream runs to its end, the process exits 0."""
    router = start_router(logdir, pods, "--drain-delay", "1", name="router-drain")
    try:
        with httpx.stream(
            "POST",
            router.url + "/v1/chat/completions",
            timeout=60,
            json={"model": "tiny", "messages": _chat(1, 0), "max_tokens": 200, "stream": True, "ignore_eos": True},
        ) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            router.proc.send_signal(signal.SIGTERM)
            wait_for(
                lambda: httpx.get(router.url + "/ready", timeout=5).status_code == 503,
                timeout=10,
                message="router not ready while draining",
            )
            rest = list(lines)
        assert rest[-2:] == ["data: [DONE]", ""] or "data: [DONE]" in rest, rest[-3:]
        assert router.proc.wait(60) == 0
    finally:
        router.stop()


def test_draining_and_killed_pods_fail_no_request(pods, logdir):
    """LeastLoad under streaming load: one pod drains (SIGTERM: its 503s are retried, its streams finish)
    and exits, yet stays listed (a static endpoint list: its connections are refused and retried, then
    it is set aside for a while): not one client failure. (This test stops pod-1: it runs last.)"""
    router = start_router(logdir, pods, "--policy", "LeastLoad", name="router-failover")
    stop, results = threading.Event(), []
    t = _load(router, stop, results)
    try:
        wait_for(lambda: len(results) >= 12, timeout=90, message="load running")
        victim = pods["pod-1"]
        victim.proc.send_signal(signal.SIGTERM)  # drain: in-flight finish, new requests get 503
        assert victim.proc.wait(60) == 0
        n = len(results)
        wait_for(lambda: len(results) >= n + 24, timeout=120, message="load after the pod left")
        text = router.metrics()
    finally:
        stop.set()
        t.join(120)
        code = router.stop()
    failures = [d for ok, d in results if not ok]
    assert not failures, failures[:5]
    assert code == 0
    retried = sum(metric(text, "autoglm_router_retries_total", reason=r) for r in ("connect", "unavailable", "reset"))
    assert retried >= 1, text
