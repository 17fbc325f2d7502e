"""Traffic for rollout tests: clients streaming and not streaming chat completions through a Service's
ClusterIP, counting every failure and recording, per request, which revision answered it
(the runtime's ``x-autoglm-revision`` header) and when.

Every request opens a new connection, so kube-proxy picks a backend pod per request and the share
each revision gets follows its share of the ready endpoints (keep-alive would pin a client to a pod).

The clients start once the Service accepts a connection: pods turn Ready in the API before kube-proxy
has written them into the node's rules (its syncs are at least a second apart), and a connect in
between is refused, on any cluster (kube-proxy's reject for a Service without endpoints). Once
started, every failed connect counts.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass

import httpx

REVISION_HEADER = "x-autoglm-revision"


@dataclass(frozen=True)
class Answer:
    """One request: when it started and ended (monotonic), who answered, whether it succeeded."""

    start: float
    end: float
    revision: str | None    # None when no response came (connection refused/reset)
    ok: bool
    stream: bool
    error: str = ""
    ttft: float | None = None  # seconds to the first token (streaming)

    @property
    def seconds(self) -> float:
        return self.end - self.start


class Traffic:
    """``streams`` streaming and ``calls`` non-streaming clients, each in its own thread, sending one request
    after another (``pause`` seconds between two of one client: low traffic) until stopped; ``headers``
    go with every request.

    ``prompt`` is what every client says (long prompts test a revision's ``maxModelLen``); every request
    generates exactly ``max_tokens`` tokens (``ignore_eos``), so every request does the same work.
    """

    def __init__(self, base_url: str, model: str, *, streams: int = 4, calls: int = 4, max_tokens: int = 8,
                 pause: float = 0.0, prompt: str = "hello from client {i}", timeout: float = 60,
                 headers: dict[str, str] | None = None) -> None:
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.headers = headers or {}  # sent with every request (a canary header, say)
        self.model, self.max_tokens, self.pause, self.prompt, self.timeout = model, max_tokens, pause, prompt, timeout
        self.answers: list[Answer] = []
        self.waited = 0.0  # seconds until the Service accepted a connection (see wait_reachable)
        self.lock = threading.Lock()
        self.stop_event = threading.Event()
        self.threads = [threading.Thread(target=self._client, args=(i, i < streams), daemon=True, name=f"traffic-{i}")
                        for i in range(streams + calls)]

    # ------------------------------------------------------------------ clients
    def _client(self, i: int, stream: bool) -> None:
        body = {"model": self.model, "messages": [{"role": "user", "content": self.prompt.format(i=i)}],
                "max_tokens": self.max_tokens, "temperature": 0, "ignore_eos": True, "stream": stream}
        # No keep-alive: a new connection (and a new kube-proxy choice of pod) for every request.
        limits = httpx.Limits(max_keepalive_connections=0)
        with httpx.Client(timeout=self.timeout, limits=limits, headers=self.headers) as client:
            while not self.stop_event.is_set():
                answer = self._one(client, body, stream)
                with self.lock:
                    self.answers.append(answer)
                # A failure comes back at once: a short breath keeps a failing revision from eating the CPUs.
                wait = self.pause or (0.0 if answer.ok else 0.05)
                if wait:
                    self.stop_event.wait(wait)

    def _one(self, client: httpx.Client, body: dict, stream: bool) -> Answer:
        start = time.monotonic()
        revision = None
        try:
            with client.stream("POST", self.url, json=body) as r:
                revision = r.headers.get(REVISION_HEADER)
                if r.status_code != 200:
                    return Answer(start, time.monotonic(), revision, False, stream,
                                  f"HTTP {r.status_code}: {r.read().decode(errors='replace')[:200]}")
                if not stream:
                    text = r.read().decode()
                    content = json.loads(text)["choices"][0]["message"]["content"]
                    ok = bool(content)
                    return Answer(start, time.monotonic(), revision, ok, stream, "" if ok else "empty answer")
                return self._read_stream(r, start, revision)
        except Exception as exc:  # noqa: BLE001 - every failure is counted and shown
            return Answer(start, time.monotonic(), revision, False, stream, f"{type(exc).__name__}: {exc}")

    def _read_stream(self, r: httpx.Response, start: float, revision: str | None) -> Answer:
        first, parts, done = None, [], False
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                done = True
                break
            chunk = json.loads(data)
            if "error" in chunk:  # an error after the headers went out comes in-band
                return Answer(start, time.monotonic(), revision, False, True, f"in-band error: {chunk['error']}")
            for choice in chunk.get("choices") or []:
                if (choice.get("delta") or {}).get("content"):
                    first = first or time.monotonic()
                    parts.append(choice["delta"]["content"])
        end = time.monotonic()
        ok = done and bool(parts)
        error = "" if ok else ("stream ended without [DONE]" if not done else "empty answer")
        return Answer(start, end, revision, ok, True, error, None if first is None else first - start)

    # ------------------------------------------------------------------ lifetime
    def wait_reachable(self, timeout: float = 30) -> float:
        """Block until the Service accepts a TCP connection (kube-proxy has an endpoint for it); return
        the seconds that took."""
        url = httpx.URL(self.url)
        start, last = time.monotonic(), ""
        while time.monotonic() - start < timeout:
            try:
                with socket.create_connection((url.host, url.port or 80), timeout=2):
                    return time.monotonic() - start
            except OSError as exc:
                last = f"{type(exc).__name__}: {exc}"
            time.sleep(0.05)
        raise AssertionError(f"traffic: {url.host}:{url.port} accepted no connection in {timeout:.0f}s (last: {last})")

    def __enter__(self) -> "Traffic":
        self.waited = self.wait_reachable()
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self.stop_event.set()
        for t in self.threads:
            t.join(timeout=self.timeout + 30)

    # ------------------------------------------------------------------ what happened
    def snapshot(self, since: float = 0.0, until: float = float("inf")) -> list[Answer]:
        """Requests that ended in ``[since, until)`` (monotonic seconds)."""
        with self.lock:
            return [a for a in self.answers if since <= a.end < until]

    @property
    def ok(self) -> int:
        return sum(1 for a in self.snapshot() if a.ok)

    @property
    def failed(self) -> list[Answer]:
        return [a for a in self.snapshot() if not a.ok]

    def by_revision(self, since: float = 0.0, until: float = float("inf")) -> Counter[str | None]:
        """Successful answers per answering revision in a window."""
        return Counter(a.revision for a in self.snapshot(since, until) if a.ok)

    def share(self, revision: str, since: float = 0.0, until: float = float("inf")) -> tuple[float, int]:
        """The fraction of the window's successful answers that ``revision`` gave, and how many there were."""
        counts = self.by_revision(since, until)
        total = sum(counts.values())
        return (counts[revision] / total if total else 0.0), total

    def wait_answers(self, n: int, since: float | None = None, timeout: float = 60) -> None:
        """Block until ``n`` more requests succeeded (after ``since``, default now)."""
        since = time.monotonic() if since is None else since
        deadline = time.monotonic() + timeout
        while sum(1 for a in self.snapshot(since) if a.ok) < n:
            if time.monotonic() > deadline:
                raise AssertionError(f"traffic: fewer than {n} answers in {timeout:.0f}s; {self.summary()}")
            time.sleep(0.2)

    def summary(self, since: float = 0.0, until: float = float("inf")) -> str:
        window = self.snapshot(since, until)
        failed = [a for a in window if not a.ok]
        counts = Counter(a.revision for a in window if a.ok)
        revs = ", ".join(f"{r}: {n}" for r, n in sorted(counts.items(), key=lambda kv: str(kv[0])))
        text = f"{len(window) - len(failed)} ok ({revs}), {len(failed)} failed"
        if failed:
            text += "; first failures: " + "; ".join(f"[{a.revision}] {a.error}" for a in failed[:3])
        return text
