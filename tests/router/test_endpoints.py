"""Endpoints: --backend parsing, Ready endpoints of an EndpointSlice, the topology from slices + status."""

from __future__ import annotations

import pytest

from autoglm_router.endpoints import Endpoint, parse_backends, ready_endpoints
from autoglm_router.kube import topology_from


def _slice(service: str, name: str, *eps: tuple[str, str, bool | None], port: int = 8000) -> dict:
    endpoints = []
    for address, pod, ready in eps:
        ep: dict = {"addresses": [address], "targetRef": {"kind": "Pod", "name": pod}, "conditions": {}}
        if ready is not None:
            ep["conditions"]["ready"] = ready
        endpoints.append(ep)
    return {
        "metadata": {"name": name, "labels": {"kubernetes.io/service-name": service}},
        "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
        "endpoints": endpoints,
    }


def test_only_ready_endpoints_count():
    s = _slice("m-stable", "m-stable-x", ("10.0.0.1", "p1", True), ("10.0.0.2", "p2", False), ("10.0.0.3", "p3", None))
    assert ready_endpoints(s) == [Endpoint("10.0.0.1:8000", "p1"), Endpoint("10.0.0.3:8000", "p3")]
    assert ready_endpoints({**s, "ports": []}) == []


def test_topology_from_slices_and_status():
    slices = {
        "a": _slice("m-stable", "a", ("10.0.0.1", "s1", True)),
        "b": _slice("m-stable", "b", ("10.0.0.2", "s2", True)),
        "c": _slice("m-canary", "c", ("10.0.0.9", "c1", True)),
        "d": _slice("other-stable", "d", ("10.0.0.7", "o1", True)),
    }
    cr = {
        "spec": {"rollout": {"trafficRouting": "Router"}},
        "status": {"stableRevision": "aaa", "canaryRevision": "bbb", "canaryWeight": 10},
    }
    topo = topology_from("m", slices, cr)
    assert topo.stable is not None and topo.canary is not None
    assert topo.stable.name == "aaa" and [e.pod for e in topo.stable.endpoints] == ["s1", "s2"]
    assert topo.canary.name == "bbb" and [e.pod for e in topo.canary.endpoints] == ["c1"]
    assert topo.canary_weight == 10
    # Not routed by the router: no canary of its own (the stable Service holds what serves).
    plain = topology_from("m", slices, {"status": cr["status"]})
    assert plain.canary is None and plain.canary_weight == 0
    # Not read yet: the stable Service's pods under a placeholder name.
    assert topology_from("m", slices, None).stable.name == "stable"


def test_parse_backends():
    topo = parse_backends(["r1=p0@127.0.0.1:1", "r1=127.0.0.1:2", "r2=http://127.0.0.1:3"], "r2", 10)
    assert topo.stable.name == "r1" and [e.pod for e in topo.stable.endpoints] == ["p0", "127.0.0.1:2"]
    assert topo.canary.name == "r2" and topo.canary.endpoints[0].address == "127.0.0.1:3"
    assert topo.canary_weight == 10
    assert parse_backends(["r1=127.0.0.1:1"], None, 10).canary_weight == 0
    for bad in (["nohost"], ["r1=a:1", "r2=b:1"]):
        with pytest.raises(ValueError):
            parse_backends(bad, None, 0)
    with pytest.raises(ValueError):
        parse_backends(["r1=a:1"], "r9", 5)


def test_session_key_grammar_is_the_crds():
    """One grammar in two packages (the router does not import the operator): they must agree."""
    from autoglm_operator.models.router import SESSION_KEY

    from autoglm_router.sessions import SESSION_KEY_PATTERN

    assert SESSION_KEY == SESSION_KEY_PATTERN


def test_queue_depth_from_the_runtimes_metrics():
    from autoglm_router.queues import waiting_from_metrics

    text = (
        "# HELP autoglm_requests_waiting Requests waiting to be scheduled.\n"
        "# TYPE autoglm_requests_waiting gauge\n"
        'autoglm_requests_waiting{model="tiny",revision="r1"} 3.0\n'
        'autoglm_requests_running{model="tiny",revision="r1"} 8.0\n'
    )
    assert waiting_from_metrics(text) == 3
    assert waiting_from_metrics("") == 0
