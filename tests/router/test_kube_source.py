"""KubeSource against the real API server: the router's view follows the EndpointSlices (only Ready
endpoints; a pod turning not-ready leaves at once) and the resource's status (revisions, weight)."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
import yaml

from autoglm_router.kube import KubeConnection, KubeSource
from tests.operator.test_operator_cluster import crd  # noqa: F401 - fixture

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(240)]


def _slice(service: str, *eps: tuple[str, bool]) -> dict:
    return {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
        "metadata": {"name": f"{service}-x", "labels": {"kubernetes.io/service-name": service}},
        "ports": [{"name": "http", "port": 8000, "protocol": "TCP"}],
        "endpoints": [{"addresses": [ip], "conditions": {"ready": ready},
                       "targetRef": {"kind": "Pod", "name": f"p-{ip}"}}
                      for ip, ready in eps],
    }


def _apply(kube, namespace: str, *docs: dict) -> None:
    kube.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump_all(docs))


async def _until(source: KubeSource, predicate, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate(source.topology()):
        assert time.monotonic() < deadline, f"timed out; topology: {source.topology()}"
        await asyncio.sleep(0.1)


async def test_topology_follows_slices_and_status(kube, crd, namespace):  # noqa: F811
    agd = {"apiVersion": "autoglm.io/v1alpha1", "kind": "AutoGLMDeployment", "metadata": {"name": "m"},
           "spec": {"model": {"uri": "file:///models/tiny"}, "router": {"enabled": True},
                    "rollout": {"trafficRouting": "Router"}}}
    services = [{"apiVersion": "v1", "kind": "Service", "metadata": {"name": n},
                 "spec": {"ports": [{"name": "http", "port": 8000}]}} for n in ("m-stable", "m-canary")]
    _apply(kube, namespace, agd, *services,
           _slice("m-stable", ("10.9.0.1", True), ("10.9.0.2", False)), _slice("m-canary", ("10.9.0.9", True)))
    status = {"status": {"stableRevision": "m-aaa", "canaryRevision": "m-bbb", "canaryWeight": 10}}
    kube.kubectl("patch", "-n", namespace, "agd/m", "--subresource=status", "--type=merge", "-p", json.dumps(status))

    source = KubeSource(KubeConnection.from_kubeconfig(kube.kubeconfig), "m", namespace)
    await source.start()
    try:
        await _until(source, lambda t: t.synced and t.canary is not None and t.canary.endpoints)
        topo = source.topology()
        assert topo.stable.name == "m-aaa" and [e.address for e in topo.stable.endpoints] == ["10.9.0.1:8000"]
        assert topo.canary.name == "m-bbb" and topo.canary_weight == 10
        assert topo.stable.endpoints[0].pod == "p-10.9.0.1"
        # The pod turns not-ready (terminating): gone from the router's list on the next event.
        _apply(kube, namespace, _slice("m-stable", ("10.9.0.1", False), ("10.9.0.2", True)))
        await _until(source, lambda t: [e.address for e in t.stable.endpoints] == ["10.9.0.2:8000"])
        status["status"]["canaryWeight"] = 50
        kube.kubectl("patch", "-n", namespace, "agd/m", "--subresource=status", "--type=merge", "-p",
                     json.dumps(status))
        await _until(source, lambda t: t.canary_weight == 50)
    finally:
        await source.stop()
