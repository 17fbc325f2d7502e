"""SessionAffinity's load bound on the process node (issue 20's proof: "with a pod's load pushed past the
bound, new sessions go elsewhere"): the operator-made router in front of three real runtime pods; a long
stream holds one pod P busy through the router, and new sessions whose key hashes to P are answered by
other pods (the ``x-autoglm-pod`` header) and counted in ``autoglm_router_sessions_moved_by_load_total``;
once P is idle again the same sessions go back to P, uncounted.

Which sessions hash to P is computed with the router's own pure code (``policies.HashRing`` over the
Ready endpoints of the ``tiny-stable`` EndpointSlices, ``sessions.session_key``), and checked first on the
idle router: every session lands on its computed home. So the moved sessions are moved by the bound, not
by a different ring.

The bound: ``ceil(loadFactor × (in flight + 1) / pods)``; with one stream on P and nothing elsewhere a
new request makes it ceil(1.25 × 2 / 3) = 1, and P (1 in flight, + 1) is past it. A router that ignored
the bound sends every probe to P and fails the test; so does one that never lets sessions go home.
"""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from autoglm_router.endpoints import ready_endpoints
from autoglm_router.policies import HashRing, load_bound
from autoglm_router.sessions import session_key
from tests.e2e.test_router import _chat, router_pods, wait_router_serving
from tests.e2e.test_runtime_pods import pods, service_ip, tiny
from tests.helpers import report, wait_for
from tests.operator.test_operator_cluster import (  # noqa: F401 - fixtures
    apply, crd, get, op_env, operator, status,
)

pytestmark = [pytest.mark.cluster, pytest.mark.runtime, pytest.mark.timeout(420)]

MOVED = "autoglm_router_sessions_moved_by_load_total"
IN_FLIGHT = "autoglm_router_requests_in_flight"
PROBES = 6  # new sessions whose home is P
LONG_TOKENS = 960  # the holding stream: a second or more of decoding (maxModelLen 1024)
MARGIN = 0.5  # seconds the holding stream must outlive the last probe's answer


def metric(router_url: str, name: str) -> float:
    """A sample of the router's /metrics, summed over its labels."""
    text = httpx.get(router_url + "/metrics", timeout=10).text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name)


class LongStream(threading.Thread):
    """One streaming request through the Service, read to the end (or until ``close``) in its own thread;
    records the pod that answered, when the first token came and when ``[DONE]`` came."""

    def __init__(self, url: str, messages: list[dict]) -> None:
        super().__init__(daemon=True)
        self.url, self.messages = url, messages
        self.pod: str | None = None
        self.started = threading.Event()  # the first token arrived: the request is in flight on self.pod
        self.done_at: float | None = None
        self.error: str | None = None
        self._closing = threading.Event()

    def run(self) -> None:
        body = {"model": "tiny", "messages": self.messages, "max_tokens": LONG_TOKENS, "stream": True,
                "ignore_eos": True, "temperature": 0}
        try:
            with httpx.Client(timeout=60) as client, \
                    client.stream("POST", self.url, json=body, headers={"connection": "close"}) as r:
                self.pod = r.headers.get("x-autoglm-pod")
                if r.status_code != 200:
                    self.error = f"HTTP {r.status_code}: {r.read()[:200]!r}"
                    return
                for line in r.iter_lines():
                    if line == "data: [DONE]":
                        self.done_at = time.monotonic()
                        return
                    if line.startswith("data: "):
                        self.started.set()
                    if self._closing.is_set():
                        return  # leaving the block closes the connection: the router and the pod cancel it
        except Exception as exc:  # noqa: BLE001 - shown by the test
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            self.started.set()

    def close(self) -> None:
        self._closing.set()
        self.join(timeout=60)


def test_router_sends_new_sessions_past_the_load_bound_elsewhere(kube, namespace, operator, node_models):
    t0 = time.monotonic()
    body = tiny(replicas=3, resources={"gpus": 0, "cpu": "100m", "memory": "1Gi"},
                router={"enabled": True, "replicas": 1, "policy": "SessionAffinity", "loadFactor": 1.25})
    body["spec"]["model"]["maxModelLen"] = 1024  # room for the holding stream's tokens
    apply(kube, namespace, body)

    wait_router_serving(kube, namespace, models=3)
    url = f"http://{service_ip(kube, namespace, 'tiny')}:8000/v1/chat/completions"
    router_url = f"http://{router_pods(kube, namespace, 'tiny')[0]['status']['podIP']}:8000"
    model_pods = {p["metadata"]["name"] for p in pods(kube, namespace, "tiny")}

    # The ring the router builds: its own code over the Ready endpoints of the stable revision's slices.
    def endpoints():
        slices = get(kube, namespace, "endpointslices", "-l", "kubernetes.io/service-name=tiny-stable")["items"]
        found = [e for s in slices for e in ready_endpoints(s)]
        return found if len(found) == 3 else None

    eps = wait_for(endpoints, timeout=60, message="3 Ready endpoints in tiny-stable's EndpointSlices")
    assert {e.pod for e in eps} == model_pods
    ring = HashRing(e.address for e in eps)
    pod_of = {e.address: e.pod for e in eps}

    def home(task: int) -> str:
        return pod_of[next(ring.walk(session_key("prompt", {}, {"messages": _chat(task, 0)})))]

    holder, p = 0, home(0)  # the session that holds P busy, and P
    probes = [t for t in range(1, 400) if home(t) == p][:PROBES]
    assert len(probes) == PROBES

    def ask(client: httpx.Client, task: int) -> str:
        r = client.post(url, headers={"connection": "close"},
                        json={"model": "tiny", "messages": _chat(task, 0), "max_tokens": 1})
        assert r.status_code == 200, r.text
        return r.headers["x-autoglm-pod"]

    with httpx.Client(timeout=60) as client:
        # Idle: every session on its computed home (the router has all three pods and the same ring).
        def all_home():
            return all(ask(client, t) == home(t) for t in [holder, *probes, *range(400, 406)])

        wait_for(all_home, timeout=60, interval=1, message="the idle router sends every session to its ring home")
        wait_for(lambda: metric(router_url, IN_FLIGHT) == 0, timeout=30, message="nothing in flight")
        moved_before = metric(router_url, MOVED)

        # P held by one long stream: the probes' sessions go elsewhere. A probe counts only when the holding
        # stream outlived its answer by MARGIN (it was in flight on P when the probe was picked); a stream
        # that ended too soon starts a new round.
        away: dict[int, str] = {}
        answers_elsewhere = 0  # every probe answer not on P, counted rounds included: each a move
        for _ in range(5):
            wait_for(lambda: metric(router_url, IN_FLIGHT) == 0, timeout=30, message="nothing in flight")
            stream = LongStream(url, _chat(holder, 0))
            stream.start()
            assert stream.started.wait(60) and stream.error is None, stream.error
            assert stream.pod == p, f"the holding session went to {stream.pod}, not its home {p}"
            answered = [(t, ask(client, t), time.monotonic()) for t in probes if t not in away]
            time.sleep(MARGIN)
            stream.close()
            answers_elsewhere += sum(pod != p for _, pod, _ in answered)
            assert stream.error is None, stream.error
            away.update((t, pod) for t, pod, at in answered
                        if stream.done_at is None or stream.done_at > at + MARGIN)
            if len(away) == len(probes):
                break
        assert len(away) == len(probes), f"the holding stream ended before the probes were answered: {away}"
        wait_for(lambda: metric(router_url, IN_FLIGHT) == 0, timeout=30, message="the holding stream gone")
        moved = metric(router_url, MOVED) - moved_before
        bound = load_bound({p: 1}, ring.pods, 1.25)
        report(f"\none stream on {p} (bound for a new request {bound}): probes answered by "
               f"{sorted(away.values())}, {moved:.0f} counted as moved by load")
        assert p not in away.values() and set(away.values()) <= model_pods, (p, away)
        assert moved == answers_elsewhere >= len(probes), (moved, answers_elsewhere, away)

        # P idle again: the same sessions go home, and no pick is counted as moved.
        moved_before = metric(router_url, MOVED)
        back = {t: ask(client, t) for t in probes}
        assert set(back.values()) == {p}, (p, back)
        assert metric(router_url, MOVED) == moved_before
    report(f"load bound on the process node {time.monotonic() - t0:.1f}s")
