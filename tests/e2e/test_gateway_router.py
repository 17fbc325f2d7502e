"""The Gateway in front of the router (issue 22): Gateway → router → pods, streaming.

A platform team's Gateway (the ``gateway`` add-on's Traefik) keeps its own HTTPRoute to the resource's
Service; with ``spec.router.enabled`` that Service selects the router pods, and ``trafficRouting: Router``
makes the router split a canary. Streaming and non-streaming clients go through the Gateway's listener,
some with the canary header; a canary at 10 % is promoted under that load. No request may fail, the
header's clients reach the canary through both proxies, and every answer carries the router's
``x-autoglm-pod`` (the runtime does not set it): the router was on the path. Figures are printed with ``-s``.
"""

from __future__ import annotations

import time

import httpx
import pytest

from devcluster.addons import gateway as gw
from tests.e2e.test_gateway import StreamsCut, served_through_gateway
from tests.e2e.test_runtime_pods import pods, tiny
from tests.e2e.traffic import Traffic
from tests.e2e.test_router import wait_router_serving
from tests.helpers import report, wait_for
from tests.operator.test_operator_cluster import apply, crd, get, op_env, operator, status  # noqa: F401 - fixtures

pytestmark = [pytest.mark.cluster, pytest.mark.runtime, pytest.mark.timeout(600)]

HEADER = "x-autoglm-canary"  # the default rollout.canaryHeader, which the router reads


def route_to_service(namespace: str, service: str) -> dict:
    """The platform team's HTTPRoute: every path on the add-on's Gateway to ``service`` (port 8000)."""
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": f"{service}-via-gateway", "namespace": namespace},
        "spec": {
            "parentRefs": [{"name": gw.NAME, "namespace": gw.NAMESPACE, "sectionName": gw.LISTENER}],
            "rules": [{"backendRefs": [{"name": service, "port": 8000}]}],
        },
    }


def test_gateway_in_front_of_the_router_streams_through_a_canary_and_its_promotion_without_failures(
    kube, gateway, namespace, operator, node_models  # noqa: F811 - operator: the fixture imported above
):
    body = tiny(replicas=1, resources={"gpus": 0, "cpu": "100m", "memory": "1Gi"},
                router={"enabled": True, "replicas": 1},
                rollout={"trafficRouting": "Router", "steps": [{"weight": 10, "pause": "1h"}]})
    apply(kube, namespace, body)

    wait_router_serving(kube, namespace, models=1, timeout=240)
    assert get(kube, namespace, "service/tiny")["spec"]["selector"] == {"autoglm.io/router": "tiny"}
    kube.kube.request("POST", f"{gw.GW}/namespaces/{namespace}/httproutes", route_to_service(namespace, "tiny"))
    url = gw.address(kube.network.ranges.node_ip) + "/v1"
    served_through_gateway(url)
    stable = status(kube, namespace, "tiny")["stableRevision"]
    kube.kubectl("patch", "-n", namespace, "agd/tiny", "--type=merge", "-p",
                 '{"spec": {"runtime": {"maxBatchSize": 6}}}')  # a new revision: the canary

    def at_10():
        st = status(kube, namespace, "tiny")
        revs = {r["name"]: r for r in st.get("revisions") or []}
        canary = st.get("canaryRevision")
        return st.get("canaryWeight") == 10 and canary and (revs.get(canary) or {}).get("readyReplicas")

    wait_for(at_10, timeout=240, interval=1, message="canary Ready at 10 %")
    canary = status(kube, namespace, "tiny")["canaryRevision"]
    canary_hash = canary.rsplit("-", 1)[1]
    t0 = time.monotonic()
    with Traffic(url, "tiny", streams=3, calls=1, max_tokens=4) as plain, \
            Traffic(url, "tiny", streams=2, calls=0, max_tokens=4, headers={HEADER: "always"}) as forced:
        # The router reads the canary from the resource's status (its watch): from then on, the header's
        # clients are on the canary.
        wait_for(lambda: forced.by_revision()[canary_hash] > 0, timeout=30, message="the header reaching the canary")
        since = time.monotonic()
        forced.wait_answers(100, since=since, timeout=120)
        plain.wait_answers(200, since=since, timeout=120)
        forced_at_10 = dict(forced.by_revision(since))
        t_promote = time.monotonic()
        kube.kubectl("annotate", "-n", namespace, "agd/tiny", "autoglm.io/promote=true", "--overwrite")
        wait_for(lambda: status(kube, namespace, "tiny").get("stableRevision") == canary
                 and not status(kube, namespace, "tiny").get("canaryRevision"), timeout=240, interval=1,
                 message="canary promoted")
        promote_s = time.monotonic() - t_promote
        wait_for(lambda: {p["metadata"]["labels"]["autoglm.io/revision"] for p in pods(kube, namespace, "tiny")}
                 == {canary_hash}, timeout=120, message="the old revision's pods gone")
        after = time.monotonic()
        plain.wait_answers(100, since=after, timeout=120)
        after_promotion = dict(plain.by_revision(after))

    # The router on the path: it names the pod it picked in every answer, streaming or not.
    model_pods = {p["metadata"]["name"] for p in pods(kube, namespace, "tiny")}
    picked: set[str] = set()
    with httpx.Client(timeout=60) as client:
        for i in range(10):
            with client.stream("POST", url + "/chat/completions", json={
                    "model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                    "stream": i % 2 == 0}) as r:
                r.read()
                assert r.status_code == 200, r.text
                picked.add(r.headers["x-autoglm-pod"])
    ttfts = sorted(a.ttft for a in plain.answers if a.ok and a.ttft is not None)
    report(f"\nGateway → router → pods: canary header at 10 % {forced_at_10}; promoted {promote_s:.1f}s after the "
           f"annotation; after it {after_promotion}; plain {plain.summary()}; header {forced.summary()}; stream "
           f"TTFT median {1000 * ttfts[len(ttfts) // 2]:.0f} ms; whole run {time.monotonic() - t0:.0f}s")
    assert set(forced_at_10) == {canary_hash}, forced_at_10
    assert set(after_promotion) == {canary_hash}, after_promotion
    assert picked <= model_pods and picked, (picked, model_pods)
    assert stable != canary
    if plain.failed or forced.failed:
        raise StreamsCut(f"plain: {plain.summary()}; header: {forced.summary()}")
