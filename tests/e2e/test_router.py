"""The router on the process node: `kubectl apply` with spec.router → the operator's router pods (this
checkout's `autoglm-router`, watching EndpointSlices with their own service account) in front of three
real runtime pods; requests through the resource's Service: sessions stick to one pod, and deleting a
router pod under streaming load fails no request."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.e2e.test_runtime_pods import Load, pods, service_ip, tiny
from tests.helpers import report, wait_for
from tests.operator.test_operator_cluster import (  # noqa: F401 - fixtures
    apply, crd, get, op_env, operator, status,
)

pytestmark = [pytest.mark.cluster, pytest.mark.runtime, pytest.mark.timeout(600)]


def router_pods(kube, namespace: str, name: str) -> list[dict]:
    items = get(kube, namespace, "pods", "-l", f"autoglm.io/router={name}")["items"]
    return [p for p in items if not p["metadata"].get("deletionTimestamp")]


def _chat(task: int, step: int) -> list[dict]:
    messages = [{"role": "system", "content": "You are a phone agent."},
                {"role": "user", "content": f"Task {task}: open the settings"}]
    for s in range(step):
        messages += [{"role": "assistant", "content": f"tap({s})"}, {"role": "user", "content": f"screen {s}"}]
    return messages


def test_router_sessions_stick_and_a_router_pod_leaves_without_failures(kube, namespace, operator, node_models):
    t0 = time.monotonic()
    body = tiny(replicas=3, resources={"gpus": 0, "cpu": "100m", "memory": "1Gi"},
                router={"enabled": True, "replicas": 2, "policy": "SessionAffinity"})
    apply(kube, namespace, body)

    def serving():
        st = status(kube, namespace, "tiny")
        router = st.get("router") or {}
        return st.get("readyReplicas") == 3 and router.get("readyReplicas") == 2 and router.get("serving")

    wait_for(serving, timeout=300, interval=1, message="3 model pods and 2 router pods Ready, Service on the router")
    report(f"\napply → router serving in front of 3 pods {time.monotonic() - t0:.1f}s")
    svc = get(kube, namespace, "service/tiny")
    assert svc["spec"]["selector"] == {"autoglm.io/router": "tiny"} and svc["spec"]["ports"][0]["port"] == 8000
    url = f"http://{service_ip(kube, namespace, 'tiny')}:8000"
    model_pods = {p["metadata"]["name"] for p in pods(kube, namespace, "tiny")}
    assert len(model_pods) == 3

    # Sessions: each task's steps on one pod, whichever router replica the Service picked.
    homes: dict[int, set[str]] = {}
    with httpx.Client(timeout=60) as client:
        for step in range(3):
            for task in range(8):
                for _ in range(2):  # new connections: kube-proxy spreads them over both routers
                    r = client.post(url + "/v1/chat/completions", headers={"connection": "close"},
                                    json={"model": "tiny", "messages": _chat(task, step), "max_tokens": 2})
                    assert r.status_code == 200, r.text
                    homes.setdefault(task, set()).add(r.headers["x-autoglm-pod"])
    assert all(len(h) == 1 for h in homes.values()), homes
    assert set().union(*homes.values()) <= model_pods and len(set().union(*homes.values())) >= 2, homes

    # A router pod deleted under streaming load: its streams finish during its drain, nothing fails.
    with Load(url + "/v1", "tiny", n=8, max_tokens=24) as load:
        wait_for(lambda: load.ok >= 16, timeout=120, message="load running")
        victim = router_pods(kube, namespace, "tiny")[0]["metadata"]["name"]
        kube.kubectl("delete", "pod", "-n", namespace, victim, "--wait=false")
        wait_for(lambda: len(router_pods(kube, namespace, "tiny")) == 2
                 and victim not in {p["metadata"]["name"] for p in router_pods(kube, namespace, "tiny")},
                 timeout=180, message="the router Deployment replaced the deleted pod")
        n = load.ok
        wait_for(lambda: load.ok >= n + 16, timeout=120, message="load after the router pod left")
    report(f"router pod deleted under load: {load.ok} requests ok, {len(load.failed)} failed")
    assert not load.failed, load.failed[:5]
