"""The ``gateway`` add-on: Traefik serving the Gateway API against the local apiserver. Its Gateway is
Accepted and Programmed, an HTTPRoute carries requests from the host through Traefik to the pods of
the Services it names (by path, by header), and the local Prometheus scrapes Traefik's metrics."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
import yaml

from devcluster.addons import gateway as gw
from tests.devcluster.podutil import pod, ready
from tests.helpers import report, wait_for

pytestmark = pytest.mark.cluster

# Answers every GET with the pod's name (its env), so a response says which backend served it. HTTP/1.1
# with keep-alive, as the runtime: the add-on's fast proxy reuses a connection an HTTP/1.0 server closes
# after each answer (~2 % 502s measured, issue 22; see gateway.PROXY_ARGS).
SERVER = r"""
import http.server, os
name = os.environ["NAME"].encode()
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    def do_GET(self):
        self.send_response(200); self.send_header("content-length", str(len(name))); self.end_headers()
        self.wfile.write(name)
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer(("0.0.0.0", 8080), H).serve_forever()
"""


def backend(kube, namespace: str, name: str) -> None:
    """Pod ``name`` answering its name, behind Service ``name`` (port 80 → 8080)."""
    body = pod(
        name,
        ["python3", "-c", SERVER],
        container={
            "env": [{"name": "NAME", "value": name}],
            "readinessProbe": {"httpGet": {"path": "/", "port": "http"}, "periodSeconds": 1},
        },
    )
    svc = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name},
        "spec": {"selector": {"app": name}, "ports": [{"port": 80, "targetPort": 8080}]},
    }
    kube.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump_all([body, svc]))


def route(namespace: str) -> dict:
    """HTTPRoute on the add-on's Gateway: header ``x-color: green`` → green; everything else → blue."""
    ref = {"name": gw.NAME, "namespace": gw.NAMESPACE}
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": "colors", "namespace": namespace},
        "spec": {
            "parentRefs": [ref],
            "rules": [
                {
                    "matches": [{"headers": [{"name": "x-color", "value": "green"}]}],
                    "backendRefs": [{"name": "green", "port": 80}],
                },
                {
                    "matches": [{"path": {"type": "PathPrefix", "value": "/"}}],
                    "backendRefs": [{"name": "blue", "port": 80}],
                },
            ],
        },
    }


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


def conditions(holder: dict | None) -> dict[str, str]:
    """``{type: status}`` of the ``conditions`` in ``holder`` (an object's status, a listener's or a
    route parent's status entry)."""
    return {c["type"]: c["status"] for c in (holder or {}).get("conditions") or []}


def test_gateway_is_programmed_and_routes_host_requests_to_pods(kube, gateway, namespace):
    report(f"\ngateway add-on start: {gateway:.1f}s (0 = already running)")
    node_ip = kube.network.ranges.node_ip
    gc = json.loads(kube.kubectl("get", "gatewayclass", gw.NAME, "-o", "json").stdout)
    assert conditions(gc.get("status")).get("Accepted") == "True", gc.get("status")
    g = json.loads(kube.kubectl("get", "gateway", gw.NAME, "-n", gw.NAMESPACE, "-o", "json").stdout)
    assert gw.programmed(g), g.get("status")
    assert {a["value"] for a in g["status"].get("addresses") or []} == {node_ip}
    listeners = {li["name"]: conditions(li) for li in g["status"]["listeners"]}
    assert listeners[gw.LISTENER].get("Programmed") == "True", listeners

    for name in ("blue", "green"):
        backend(kube, namespace, name)
    kube.kubectl("apply", "-f", "-", input=yaml.safe_dump(route(namespace)))
    for name in ("blue", "green"):
        wait_for(lambda n=name: ready(kube, namespace, n), timeout=60, message=f"pod {name} Ready")

    def route_accepted():
        r = json.loads(kube.kubectl("get", "httproute", "colors", "-n", namespace, "-o", "json").stdout)
        parents = (r.get("status") or {}).get("parents") or []
        return parents and all(conditions(p).get("Accepted") == "True" for p in parents)

    wait_for(route_accepted, timeout=30, message="HTTPRoute colors Accepted by the Gateway")
    url = gw.address(node_ip) + "/"
    assert url == f"http://{node_ip}:80/"
    # Traefik applies a route once it has read it and its Services' endpoints: until then a 404.
    wait_for(lambda: get(url) == (200, "blue"), timeout=30, message="the Gateway serves the route")
    answers = [get(url)[1] for _ in range(10)] + [get(url, {"x-color": "green"})[1] for _ in range(10)]
    assert answers == ["blue"] * 10 + ["green"] * 10
    assert get(gw.address(node_ip) + "/", {"host": "x"})[0] == 200  # no hostnames on the route: any host

    # Prometheus scrapes Traefik (job traefik); its per-service request counter saw the requests.
    def scraped():
        rows = kube.prometheus_query(
            f'sum by (service) (traefik_service_requests_total{{job="traefik", service=~"{namespace}-.*"}})'
        )
        return {r["metric"]["service"]: float(r["value"][1]) for r in rows} or None

    counts = wait_for(scraped, timeout=30, message="Traefik's service metrics in Prometheus")
    report(f"Traefik service request counters: {counts}")
    assert sum(v for k, v in counts.items() if "blue" in k) >= 11
    assert sum(v for k, v in counts.items() if "green" in k) >= 10
