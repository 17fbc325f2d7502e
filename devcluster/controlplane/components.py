"""The control plane's command lines: etcd → kube-apiserver (client-cert auth, RBAC, audit log) →
kube-controller-manager (all controllers) → kube-scheduler → kwok (fake nodes) → kube-proxy
(nftables, in the process node's network namespace). Pure: paths and ports in, argv out."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from devcluster.node.config import NODE_API_PORT

SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
KWOK_STAGES = ["node-initialize", "node-heartbeat-with-lease", "pod-ready", "pod-complete", "pod-delete"]


@dataclass(frozen=True)
class Ports:
    """Loopback ports of the root namespace's servers."""

    etcd: int
    etcd_peer: int
    api: int
    controller_manager: int
    scheduler: int


def etcd(bin_dir: Path, data: Path, p: Ports) -> list[str]:
    return [
        str(bin_dir / "etcd"),
        f"--data-dir={data}",
        "--unsafe-no-fsync",
        "--log-level=warn",
        f"--listen-client-urls=http://127.0.0.1:{p.etcd}",
        f"--advertise-client-urls=http://127.0.0.1:{p.etcd}",
        f"--listen-peer-urls=http://127.0.0.1:{p.etcd_peer}",
        f"--initial-advertise-peer-urls=http://127.0.0.1:{p.etcd_peer}",
        f"--initial-cluster=default=http://127.0.0.1:{p.etcd_peer}",
        "--listen-metrics-urls=",
        "--quota-backend-bytes=4294967296",
    ]


def kube_apiserver(bin_dir: Path, d: Path, pki: Path, p: Ports, service_range: str) -> list[str]:
    """The apiserver on 127.0.0.1. ``--endpoint-reconciler-type=none``: the ``kubernetes`` Service's
    endpoint is the process node's address (``devcluster.cluster`` writes its EndpointSlice), where
    the node agent forwards to this loopback port."""
    return [
        str(bin_dir / "kube-apiserver"),
        f"--audit-policy-file={d / 'audit-policy.yaml'}",
        f"--audit-log-path={d / 'audit.log'}",
        "--audit-log-format=json",
        "--audit-log-mode=blocking",
        f"--etcd-servers=http://127.0.0.1:{p.etcd}",
        "--bind-address=127.0.0.1",
        "--advertise-address=127.0.0.1",
        f"--secure-port={p.api}",
        f"--cert-dir={pki}",
        f"--tls-cert-file={pki / 'server.crt'}",
        f"--tls-private-key-file={pki / 'server.key'}",
        f"--client-ca-file={pki / 'ca.crt'}",
        f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
        f"--service-account-key-file={pki / 'sa.pub'}",
        f"--service-account-signing-key-file={pki / 'sa.key'}",
        f"--service-cluster-ip-range={service_range}",
        "--authorization-mode=Node,RBAC",
        "--enable-admission-plugins=ExtendedResourceToleration",
        f"--requestheader-client-ca-file={pki / 'front-proxy-ca.crt'}",
        "--requestheader-allowed-names=front-proxy-client",
        "--requestheader-extra-headers-prefix=X-Remote-Extra-",
        "--requestheader-group-headers=X-Remote-Group",
        "--requestheader-username-headers=X-Remote-User",
        f"--proxy-client-cert-file={pki / 'front-proxy-client.crt'}",
        f"--proxy-client-key-file={pki / 'front-proxy-client.key'}",
        "--enable-aggregator-routing=true",
        "--allow-privileged=true",
        "--enable-priority-and-fairness=false",
        "--endpoint-reconciler-type=none",
        "--profiling=false",
        "--v=0",
    ]


def _common(kubeconfig: Path) -> list[str]:
    return [
        f"--kubeconfig={kubeconfig}",
        f"--authentication-kubeconfig={kubeconfig}",
        f"--authorization-kubeconfig={kubeconfig}",
        "--bind-address=127.0.0.1",
        "--leader-elect=false",
    ]


def kube_controller_manager(bin_dir: Path, kubeconfig: Path, pki: Path, p: Ports, service_range: str) -> list[str]:
    return [
        str(bin_dir / "kube-controller-manager"),
        *_common(kubeconfig),
        f"--secure-port={p.controller_manager}",
        "--controllers=*",
        f"--service-account-private-key-file={pki / 'sa.key'}",
        f"--root-ca-file={pki / 'ca.crt'}",
        f"--cluster-signing-cert-file={pki / 'ca.crt'}",
        f"--cluster-signing-key-file={pki / 'ca.key'}",
        "--use-service-account-credentials=true",
        f"--service-cluster-ip-range={service_range}",
        "--horizontal-pod-autoscaler-sync-period=5s",
        "--profiling=false",
        # Client limits sized for 1,000+ Deployments (the defaults, 20 qps and 5 workers,
        # take minutes to make 1,000 ReplicaSets and pods; large clusters raise them too).
        "--kube-api-qps=400",
        "--kube-api-burst=800",
        "--concurrent-deployment-syncs=20",
        "--concurrent-replicaset-syncs=20",
    ]


def kube_scheduler(bin_dir: Path, kubeconfig: Path, p: Ports) -> list[str]:
    return [
        str(bin_dir / "kube-scheduler"),
        *_common(kubeconfig),
        f"--secure-port={p.scheduler}",
        "--profiling=false",
        "--kube-api-qps=300",
        "--kube-api-burst=600",
    ]


def kwok_stages(bin_dir: Path) -> str:
    """kwok's stage definitions (from its module), as one YAML stream."""
    return "---\n".join((bin_dir / "stages" / f"{s}.yaml").read_text() for s in KWOK_STAGES)


def kwok(bin_dir: Path, kubeconfig: Path, stages: Path, pod_cidr: str, node_ip: str) -> list[str]:
    """kwok manages only the nodes annotated ``kwok.x-k8s.io/node: fake`` (never ``proc-0``)."""
    return [
        str(bin_dir / "kwok"),
        f"--kubeconfig={kubeconfig}",
        f"--config={stages}",
        "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake",
        "--node-lease-duration-seconds=40",
        f"--cidr={pod_cidr}",
        f"--node-ip={node_ip}",
    ]


def kube_proxy(bin_dir: Path, node_ns: str, kubeconfig: Path, node: str, cluster_cidr: str) -> list[str]:
    """kube-proxy in the node's network namespace (its nftables rules stay there), reaching the
    apiserver through the node agent's forwarder."""
    return [
        "ip",
        "netns",
        "exec",
        node_ns,
        str(bin_dir / "kube-proxy"),
        f"--kubeconfig={kubeconfig}",
        f"--hostname-override={node}",
        "--proxy-mode=nftables",
        f"--cluster-cidr={cluster_cidr}",
        "--conntrack-max-per-core=0",
        "--healthz-bind-address=127.0.0.1:10256",
        "--metrics-bind-address=127.0.0.1:10249",
        "--v=0",
    ]


def kubernetes_endpoints(node_ip: str) -> dict[str, Any]:
    """The ``kubernetes`` Service's EndpointSlice: the node's address, where the node agent forwards
    to the apiserver (the apiserver itself listens on loopback only)."""
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": "kubernetes",
            "namespace": "default",
            "labels": {
                "kubernetes.io/service-name": "kubernetes",
                "endpointslice.kubernetes.io/managed-by": "devcluster",
            },
        },
        "addressType": "IPv4",
        "endpoints": [{"addresses": [node_ip], "conditions": {"ready": True}}],
        "ports": [{"name": "https", "port": NODE_API_PORT, "protocol": "TCP"}],
    }
