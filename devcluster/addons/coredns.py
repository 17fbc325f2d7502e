"""Cluster DNS: CoreDNS (``gobuild/coredns``: its ``kubernetes`` plugin, no forwarding: a name outside
the cluster does not resolve, nothing leaves this machine) in the node's network namespace on the
node's address, behind the ``kube-dns`` Service at the service range's tenth address, as kubeadm
sets it up. Pods' resolv.conf points at that Service with the usual search domains
(``<ns>.svc.cluster.local svc.cluster.local cluster.local``, ``ndots:5``), so
``http://prometheus.monitoring:9090`` resolves from a pod as in a user's cluster. The host's
resolv.conf is left alone."""

from __future__ import annotations

import contextlib
import ipaddress
import urllib.request
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from devcluster.cluster import Cluster

DOMAIN = "cluster.local"
READY_PORT = 8181
COREFILE = """\
.:53 {{
    bind {node_ip}
    errors
    ready {node_ip}:{ready_port}
    kubernetes {domain} in-addr.arpa ip6.arpa {{
        kubeconfig {kubeconfig}
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
        ttl 5
    }}
    cache 5
    loadbalance
}}
"""


def dns_ip(service_range: str) -> str:
    """The ``kube-dns`` Service's address: the service range's tenth (kubeadm's choice too)."""
    return str(ipaddress.ip_network(service_range)[10])


def objects(service_range: str, node_ip: str) -> list[dict[str, Any]]:
    """The ``kube-dns`` Service (no selector) and its EndpointSlice: the node's address, port 53."""
    meta = {
        "name": "kube-dns",
        "namespace": "kube-system",
        "labels": {"k8s-app": "kube-dns", "kubernetes.io/name": "CoreDNS"},
    }
    ports = [("dns", "UDP"), ("dns-tcp", "TCP")]
    return [
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": meta,
            "spec": {
                "clusterIP": dns_ip(service_range),
                "ports": [{"name": n, "port": 53, "targetPort": 53, "protocol": p} for n, p in ports],
            },
        },
        {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": "kube-dns",
                "namespace": "kube-system",
                "labels": {
                    "kubernetes.io/service-name": "kube-dns",
                    "endpointslice.kubernetes.io/managed-by": "devcluster",
                },
            },
            "addressType": "IPv4",
            "endpoints": [{"addresses": [node_ip], "conditions": {"ready": True}}],
            "ports": [{"name": n, "port": 53, "protocol": p} for n, p in ports],
        },
    ]


def start(c: Cluster) -> None:
    if "coredns" in c.processes.procs:
        return
    r = c.network.ranges
    for obj in objects(r.service_range, r.node_ip):
        c.kube.create(obj)
    corefile = c.dir / "Corefile"
    corefile.write_text(
        COREFILE.format(node_ip=r.node_ip, ready_port=READY_PORT, domain=DOMAIN, kubeconfig=c.node_kubeconfig)
    )
    c.processes.spawn(
        "coredns", ["ip", "netns", "exec", c.network.node_ns, str(c.bin_dir / "coredns"), "-conf", str(corefile)]
    )


def wait(c: Cluster, timeout: float) -> None:
    def ready() -> bool:
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(f"http://{c.network.ranges.node_ip}:{READY_PORT}/ready", timeout=2) as resp:
                return resp.status == 200
        return False

    c.processes.poll("CoreDNS ready", ready, timeout)
