"""The router on the process node: `kubectl apply` with spec.router → the operator's router pods (this
checkout's `autoglm-router`, watching EndpointSlices with their own service account) in front of three
real runtime pods; requests through the resource's Service: sessions stick to one pod, and deleting a
router pod under streaming load fails no request. trafficRouting Router: a canary at 10 % gets the users
the router's hash puts there (each user on one revision), and its promotion and a second canary's rollback
under streaming load fail no request."""

from __future__ import annotations

import collections
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


def wait_router_serving(kube, namespace: str, models: int, routers: int = 1, timeout: float = 300) -> None:
    """Until ``tiny`` is Healthy with ``models`` model pods and ``routers`` router pods Ready and
    ``status.router.serving`` (its Service on the router, a Ready model pod behind it)."""

    def serving() -> bool:
        st = status(kube, namespace, "tiny")
        router = st.get("router") or {}
        return (st.get("phase") == "Healthy" and st.get("readyReplicas") == models
                and router.get("readyReplicas") == routers and bool(router.get("serving")))

    wait_for(serving, timeout=timeout, interval=1,
             message=f"{models} model pod(s) and {routers} router pod(s) Ready, the Service on the router")


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

    wait_router_serving(kube, namespace, models=3, routers=2)
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


def test_router_canary_by_user_then_promotion_and_rollback_under_load(kube, namespace, operator, node_models):
    """trafficRouting Router, 1 stable + 1 canary pod at 10 %: 1,000 requests from 200 users through the
    Service; the canary's share is 10 % ± 3 % and every user saw one revision; a promotion, then a second
    canary's rollback (abort), each under streaming load through the router, fail no request.
    (Monotonicity as the weight grows: tests/router/.)"""
    body = tiny(replicas=1, resources={"gpus": 0, "cpu": "100m", "memory": "1Gi"},
                router={"enabled": True, "replicas": 1},
                rollout={"trafficRouting": "Router",
                         "steps": [{"weight": 10, "pause": "1h"}, {"weight": 50, "pause": "1h"}]})
    apply(kube, namespace, body)

    # The stable's pod Ready too, not just the router's: the router pod is Ready seconds before the runtime
    # has loaded its model, and a spec change while the stable has no Ready pod skips the steps by design
    # (no traffic to protect): the canary is promoted at once and never holds at 10 %.
    wait_router_serving(kube, namespace, models=1, timeout=240)
    stable = status(kube, namespace, "tiny")["stableRevision"]
    kube.kubectl("patch", "-n", namespace, "agd/tiny", "--type=merge", "-p",
                 '{"spec": {"runtime": {"maxBatchSize": 6}}}')  # a new revision: the canary

    def at(weight: int):
        st = status(kube, namespace, "tiny")
        revs = {r["name"]: r for r in st.get("revisions") or []}
        canary = st.get("canaryRevision")
        return st.get("canaryWeight") == weight and canary and (revs.get(canary) or {}).get("readyReplicas")

    wait_for(lambda: at(10), timeout=240, interval=1, message="canary Ready at 10 %")
    # Users user-0 … user-199: the router's hash (autoglm_router.policies.is_canary) puts 24 of them (12 %)
    # below 10 %; with 5 requests each, the canary's share of the 1,000 requests is theirs.
    canary = status(kube, namespace, "tiny")["canaryRevision"]
    url = f"http://{service_ip(kube, namespace, 'tiny')}:8000/v1/chat/completions"

    answers: collections.Counter[str] = collections.Counter()  # revision → requests it answered

    def send(users: range, rounds: int) -> dict[str, set[str]]:
        seen: dict[str, set[str]] = {}
        answers.clear()
        with httpx.Client(timeout=60) as client:
            for _ in range(rounds):
                for u in users:
                    r = client.post(url, json={"model": "tiny", "user": f"user-{u}", "max_tokens": 1,
                                               "messages": [{"role": "user", "content": "hi"}]})
                    assert r.status_code == 200, r.text
                    seen.setdefault(f"user-{u}", set()).add(r.headers["x-autoglm-revision"])
                    answers[r.headers["x-autoglm-revision"]] += 1
        return seen

    # The router must have read the weight (its status watch) before we count.
    wait_for(lambda: any(v == {canary.rsplit("-", 1)[1]} for v in send(range(0, 60), 1).values()), timeout=30,
             message="router sends someone to the canary")
    seen = send(range(200), 5)
    canary_hash, stable_hash = canary.rsplit("-", 1)[1], stable.rsplit("-", 1)[1]
    assert all(len(v) == 1 for v in seen.values()), {u: v for u, v in seen.items() if len(v) > 1}
    on_canary = {u for u, v in seen.items() if v == {canary_hash}}
    share = answers[canary_hash] / sum(answers.values())
    report(f"\ncanary at 10 %: {answers[canary_hash]} of {sum(answers.values())} requests ({share:.1%}) from "
           f"{len(on_canary)} of 200 users on the canary")
    assert sum(answers.values()) == 1000 and 0.07 <= share <= 0.13, (answers, share)
    assert {h for v in seen.values() for h in v} == {canary_hash, stable_hash}

    kube.kubectl("annotate", "-n", namespace, "agd/tiny", "autoglm.io/promote=true", "--overwrite")
    with Load(url.removesuffix("/chat/completions"), "tiny", n=4, max_tokens=8) as load:
        wait_for(lambda: status(kube, namespace, "tiny").get("stableRevision") == canary
                 and not status(kube, namespace, "tiny").get("canaryRevision"), timeout=240, interval=1,
                 message="canary promoted")
        n = load.ok
        wait_for(lambda: load.ok >= n + 8, timeout=120, message="load after the promotion")
    report(f"promotion under load through the router: {load.ok} requests ok, {len(load.failed)} failed")
    assert not load.failed, load.failed[:5]
    wait_for(lambda: {p["metadata"]["labels"]["autoglm.io/revision"] for p in pods(kube, namespace, "tiny")}
             == {canary_hash}, timeout=120, message="the old revision's pods gone")
    assert all(v == {canary_hash} for v in send(range(0, 20), 1).values())

    # Rollback: another version as a canary at 10 %, aborted under streaming load; no request fails and every
    # user is back on the (promoted) stable.
    stable, stable_hash = canary, canary_hash
    kube.kubectl("patch", "-n", namespace, "agd/tiny", "--type=merge", "-p",
                 '{"spec": {"runtime": {"maxBatchSize": 7}}}')
    wait_for(lambda: at(10), timeout=240, interval=1, message="second canary Ready at 10 %")
    second = status(kube, namespace, "tiny")["canaryRevision"]
    second_hash = second.rsplit("-", 1)[1]
    wait_for(lambda: second_hash in {h for v in send(range(0, 60), 1).values() for h in v}, timeout=30,
             message="router sends someone to the second canary")
    base = url.removesuffix("/chat/completions")
    # Streams on both revisions: plain clients (their users on the stable) and clients the canary header sends
    # to the canary while it exists (then the stable serves them: the router's fallback).
    with Load(base, "tiny", n=3, max_tokens=8) as plain, \
            Load(base, "tiny", n=3, max_tokens=8, headers={"x-autoglm-canary": "always"}) as forced:
        wait_for(lambda: plain.ok >= 6 and forced.revisions[second_hash] >= 6, timeout=120,
                 message="load running on both revisions")
        kube.kubectl("annotate", "-n", namespace, "agd/tiny", "autoglm.io/abort=true", "--overwrite")
        wait_for(lambda: status(kube, namespace, "tiny").get("rolloutPhase") == "RolledBack"
                 and not status(kube, namespace, "tiny").get("canaryRevision"), timeout=120, interval=1,
                 message="canary rolled back")
        wait_for(lambda: {p["metadata"]["labels"]["autoglm.io/revision"] for p in pods(kube, namespace, "tiny")}
                 == {stable_hash}, timeout=120, message="the aborted canary's pods gone")
        n = forced.revisions[stable_hash]
        wait_for(lambda: forced.revisions[stable_hash] >= n + 8, timeout=120,
                 message="the canary's clients answered by the stable after the rollback")
    report(f"rollback under load through the router: plain {dict(plain.revisions)}, forced to the canary "
           f"{dict(forced.revisions)}; failed {len(plain.failed)} + {len(forced.failed)}")
    assert not plain.failed and not forced.failed, (plain.failed + forced.failed)[:5]
    assert status(kube, namespace, "tiny")["stableRevision"] == stable
    assert all(v == {stable_hash} for v in send(range(0, 60), 1).values())
