"""Scale to zero on the process node: autoscaling.minReplicas 0 (KEDA) behind the router. At zero the
resource is ScaledToZero (Ready, not Degraded); 20 concurrent streaming requests arriving with no pod are
held by the router, KEDA wakes the revision on the router's held count, and every request is answered;
traffic keeps it up past the idle window; after the idle window without traffic it goes back to zero.
Prints the cold start (request → first token) and its parts (KEDA reaction, pod start, model load)."""

from __future__ import annotations

import datetime as dt
import re
import threading
import time

import pytest

from tests.e2e.test_runtime_pods import Load, pods, service_ip, tiny
from tests.helpers import report, wait_for
from tests.operator.test_operator_cluster import (  # noqa: F401 - fixtures
    apply,
    condition,
    crd,
    get,
    op_env,
    operator,
    status,
)

pytestmark = [pytest.mark.cluster, pytest.mark.runtime, pytest.mark.timeout(900)]

IDLE_S = 20  # scaleToZeroAfter
CONCURRENT = 20


class Replicas:
    """The model Deployments' spec.replicas and readyReplicas, sampled every half second in a thread."""

    def __init__(self, kube, namespace: str, name: str) -> None:
        self.kube, self.ns, self.name = kube, namespace, name
        self.rows: list[tuple[float, int, int]] = []  # (monotonic, replicas, ready)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            # The model revisions only (the router's Deployment carries autoglm.io/deployment too).
            selector = f"autoglm.io/deployment={self.name},app.kubernetes.io/component=runtime"
            deps = get(self.kube, self.ns, "deployments", "-l", selector)["items"]
            self.rows.append((time.monotonic(), sum(d["spec"].get("replicas", 0) for d in deps),
                              sum((d.get("status") or {}).get("readyReplicas", 0) for d in deps)))
            self.stop.wait(0.5)

    def first(self, since: float, predicate) -> float | None:
        return next((t for t, r, rd in self.rows if t >= since and predicate(r, rd)), None)

    def __enter__(self) -> Replicas:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(timeout=30)


def _ask_all(url: str, n: int) -> tuple[list[float], list[str]]:
    """``n`` concurrent streaming requests; (seconds to the first token of each, failures)."""
    from openai import OpenAI

    client = OpenAI(base_url=url, api_key="none", timeout=300, max_retries=0)
    ttft: list[float] = []
    failed: list[str] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        sent, first, text = time.monotonic(), None, ""
        try:
            stream = client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": f"wake up {i}"}], max_tokens=8,
                temperature=0, stream=True, extra_body={"ignore_eos": True})
            for c in stream:
                if c.choices and c.choices[0].delta.content:
                    first = first or time.monotonic()
                    text += c.choices[0].delta.content
        except Exception as exc:  # noqa: BLE001 - every failure is counted and shown
            with lock:
                failed.append(f"{i}: {type(exc).__name__}: {exc}")
            return
        with lock:
            if first is None or not text:
                failed.append(f"{i}: empty answer")
            else:
                ttft.append(first - sent)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=400)
    return ttft, failed


def _ts(text: str) -> float:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def test_requests_at_zero_are_held_answered_and_it_sleeps_again(kube, namespace, operator, node_models,  # noqa: F811
                                                                 keda):
    body = tiny(resources={"gpus": 0, "cpu": "100m", "memory": "1Gi"},
                router={"enabled": True, "replicas": 1, "holdTimeout": "300s"})
    body["spec"].pop("replicas", None)
    body["spec"]["autoscaling"] = {"enabled": True, "provider": "KEDA", "minReplicas": 0, "maxReplicas": 1,
                                   "scaleToZeroAfter": f"{IDLE_S}s", "prometheus": {"address": kube.prometheus_url}}
    apply(kube, namespace, body)

    def asleep() -> bool:
        st = status(kube, namespace, "tiny")
        return (st.get("phase") == "ScaledToZero" and (st.get("router") or {}).get("serving")
                and not pods(kube, namespace, "tiny"))

    wait_for(asleep, timeout=300, interval=1, message="ScaledToZero, no model pod, the router serving")
    st = status(kube, namespace, "tiny")
    assert condition(st, "Ready")["status"] == "True" and condition(st, "Ready")["reason"] == "ScaledToZero"
    assert condition(st, "Degraded")["status"] == "False"
    shown = kube.kubectl("get", "agd", "tiny", "-n", namespace).stdout
    assert re.search(r"tiny\s+0/0\s+ScaledToZero", shown), shown
    report(f"\n{shown.strip()}")
    url = f"http://{service_ip(kube, namespace, 'tiny')}:8000/v1"

    with Replicas(kube, namespace, "tiny") as reps:
        wait_for(lambda: len(reps.rows) >= 2, timeout=30, message="replicas sampled")
        assert reps.rows[-1][1] == 0, reps.rows  # really from zero
        # From zero: all held, all answered.
        sent = time.monotonic()
        ttft, failed = _ask_all(url, CONCURRENT)
        assert not failed, failed[:5]
        assert len(ttft) == CONCURRENT
        woke = reps.first(sent, lambda r, rd: r >= 1)
        pod = pods(kube, namespace, "tiny")[0]
        created = _ts(pod["metadata"]["creationTimestamp"])
        pod_ready = _ts(condition(pod["status"], "Ready")["lastTransitionTime"])
        log = kube.pod_log(namespace, pod["metadata"]["name"])
        loaded = re.search(r"Loaded model, model=\S+ seconds=([0-9.]+)", log)
        ttft.sort()
        report(f"cold start from zero, {CONCURRENT} concurrent streams held by the router: request → first token "
               f"min {ttft[0]:.1f}s p50 {ttft[len(ttft) // 2]:.1f}s max {ttft[-1]:.1f}s; KEDA reaction (request → "
               f"replicas 1, sampled every 0.5 s) {(woke or sent) - sent:.1f}s; pod created → Ready "
               f"{pod_ready - created:.0f}s (1 s resolution); model load "
               f"{loaded.group(1) if loaded else '?'}s (pollingInterval 5s, Prometheus scrape 1s)")

        # Traffic for longer than the idle window: never back to zero while requests are in flight.
        busy_from = time.monotonic()
        with Load(url, "tiny", n=1, max_tokens=48) as load:
            time.sleep(IDLE_S + 20)
        busy_to = time.monotonic()
        assert not load.failed, load.failed[:5]
        during = [r for t, r, _ in reps.rows if busy_from <= t <= busy_to]
        assert during and min(during) >= 1, "scaled to zero while requests were in flight"
        report(f"steady traffic for {busy_to - busy_from:.0f}s (idle window {IDLE_S}s): {load.ok} requests ok, "
               f"replicas never 0")

        # Idle: back to zero after the window.
        wait_for(lambda: reps.rows[-1][1] == 0, timeout=IDLE_S + 120, interval=1, message="back to zero")
        zero = reps.first(busy_to, lambda r, rd: r == 0)
        report(f"idle → replicas 0 after {(zero or busy_to) - busy_to:.1f}s (scaleToZeroAfter {IDLE_S}s)")
    wait_for(asleep, timeout=120, interval=1, message="ScaledToZero again")
