"""A Gateway API data plane: Traefik (``gobuild/components/traefik.sh``) with its ``kubernetesgateway``
provider, the GatewayClass ``traefik`` and the Gateway ``gateway/traefik`` (one HTTP listener on port
80, routes from every namespace).

Traefik runs in the node's network namespace, as a Gateway's pods run on a node: its listener is on
the node's address (``GATEWAY_ADDRESS``: the host reaches it over the node's link, pods through their
routes to the node; nothing listens outside the cluster's network), and it sends requests straight to
pod IPs over the node's bridge, from the EndpointSlices of the Services an HTTPRoute names. It reads
the apiserver through the node agent's forwarder (the node kubeconfig). Its ping and Prometheus
metrics are on a second entry point (``METRICS_PORT``), scraped by the cluster's Prometheus as job
``traefik``.
"""

from __future__ import annotations

import contextlib
import urllib.request
from typing import TYPE_CHECKING, Any

from devcluster.addons import prometheus

if TYPE_CHECKING:
    from devcluster.cluster import Cluster

NAMESPACE = "gateway"
NAME = "traefik"  # the Gateway, its GatewayClass, its Service
CONTROLLER = "traefik.io/gateway-controller"  # Traefik's controllerName
LISTENER = "http"
PORT = 80  # the listener's port = Traefik's `web` entry point's
METRICS_PORT = 8082  # Traefik's `traefik` entry point: /ping and /metrics
GW = "/apis/gateway.networking.k8s.io/v1"
# The Gateway API kinds Traefik's provider lists (standard channel): served before it starts.
WATCHED = ("gatewayclasses", "gateways", "httproutes", "grpcroutes", "referencegrants", "backendtlspolicies")
# How Traefik talks to the pods (issue 22; ``bench/repro_proxy_body_race.py`` measures both):
# - its fast proxy: the default one (Go's httputil.ReverseProxy over http.Transport) cut ~0.05 % of
#   streaming POSTs after their response headers. Go's server closes the client's request body when the
#   response headers go out (net/http server.go, chunkWriter.writeHeader), while the transport, having sent
#   the Content-Length bytes, reads that body once more (transfer.go, transferWriter.writeBody); a read
#   after the close fails, and the transport's writeLoop closes the pod's connection under the response
#   being copied. The fast proxy sends the whole request before it reads the response: no such window.
#   Its own limit: it does not honour a backend that closes the connection after an answer (HTTP/1.0, or
#   `Connection: close`): 39 of 2,000 GETs to Python's http.server answered 502 (default proxy: 0). The
#   runtime (uvicorn, HTTP/1.1 keep-alive) closes only idle connections, hence the next flag.
# - idle connections dropped before the runtime drops them (uvicorn's keep-alive, 30 s): a POST sent on
#   a connection the pod is closing fails, and a POST is not retried.
PROXY_ARGS = ("--experimental.fastProxy=true", "--serversTransport.forwardingTimeouts.idleConnTimeout=15s")


def address(node_ip: str) -> str:
    """The Gateway's listener as the host (and pods) reach it."""
    return f"http://{node_ip}:{PORT}"


def exports(node_ip: str) -> dict[str, str]:
    """What ``devcluster up``/``status`` print for this add-on (kept in ``cluster.exports``)."""
    return {"GATEWAY_ADDRESS": address(node_ip), "GATEWAY": f"{NAMESPACE}/{NAME}"}


def objects(node_ip: str) -> list[dict[str, Any]]:
    """Namespace, GatewayClass, Gateway, and a Service (no selector, its endpoint the node's address)
    so pods can also reach the Gateway by name (``http://traefik.gateway``)."""
    meta = {"name": NAME, "namespace": NAMESPACE}
    ports = [("http", PORT), ("metrics", METRICS_PORT)]
    return [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}},
        {
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "GatewayClass",
            "metadata": {"name": NAME},
            "spec": {"controllerName": CONTROLLER},
        },
        {
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "Gateway",
            "metadata": meta,
            "spec": {
                "gatewayClassName": NAME,
                "listeners": [
                    {
                        "name": LISTENER,
                        "protocol": "HTTP",
                        "port": PORT,
                        "allowedRoutes": {"namespaces": {"from": "All"}},
                    }
                ],
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": meta,
            "spec": {"ports": [{"name": n, "port": p, "targetPort": p, "protocol": "TCP"} for n, p in ports]},
        },
        {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                **meta,
                "labels": {"kubernetes.io/service-name": NAME, "endpointslice.kubernetes.io/managed-by": "devcluster"},
            },
            "addressType": "IPv4",
            "endpoints": [{"addresses": [node_ip], "conditions": {"ready": True}}],
            "ports": [{"name": n, "port": p, "protocol": "TCP"} for n, p in ports],
        },
    ]


def args(node_ip: str) -> list[str]:
    """Traefik's static configuration (flags): the two entry points on the node's address, the Gateway
    API provider writing the node's address into the Gateway's status, the proxy (``PROXY_ARGS``), and
    no call home."""
    return [
        *PROXY_ARGS,
        f"--entryPoints.web.address={node_ip}:{PORT}",
        f"--entryPoints.traefik.address={node_ip}:{METRICS_PORT}",
        "--ping=true",
        "--metrics.prometheus=true",
        "--metrics.prometheus.addRoutersLabels=true",
        "--providers.kubernetesgateway=true",
        f"--providers.kubernetesgateway.statusAddress.ip={node_ip}",
        "--global.checkNewVersion=false",
        "--global.sendAnonymousUsage=false",
        "--log.level=INFO",
        "--log.noColor=true",
    ]


def start(c: Cluster) -> None:
    if "traefik" in c.processes.procs:
        return
    node_ip = c.network.ranges.node_ip
    crds = c.bin_dir / "crds"  # the Gateway API's (standard channel)
    c.kubectl("apply", "--server-side", "-f", str(crds))
    served = [f"crd/{kind}.gateway.networking.k8s.io" for kind in WATCHED]
    c.kubectl("wait", "--for=condition=Established", "--timeout=60s", *served)
    for obj in objects(node_ip):
        c.kube.create(obj)
    c.processes.spawn(
        "traefik",
        ["ip", "netns", "exec", c.network.node_ns, str(c.bin_dir / "traefik"), *args(node_ip)],
        env={"KUBECONFIG": str(c.node_kubeconfig)},
    )
    prometheus.add_targets(c, "traefik", [f"{node_ip}:{METRICS_PORT}"])
    c.exports.update(exports(node_ip))


def programmed(gateway: dict[str, Any]) -> bool:
    """The Gateway is Accepted and Programmed (its controller took it and serves its listeners)."""
    conds = {cond["type"]: cond["status"] for cond in (gateway.get("status") or {}).get("conditions") or []}
    return conds.get("Accepted") == "True" and conds.get("Programmed") == "True"


def wait(c: Cluster, timeout: float) -> None:
    node_ip = c.network.ranges.node_ip

    def ready() -> bool:
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(f"http://{node_ip}:{METRICS_PORT}/ping", timeout=2) as resp:
                if resp.status != 200:
                    return False
            return programmed(c.kube.get(f"{GW}/namespaces/{NAMESPACE}/gateways/{NAME}"))
        return False

    c.processes.poll(f"Traefik up and Gateway {NAMESPACE}/{NAME} Programmed", ready, timeout)
