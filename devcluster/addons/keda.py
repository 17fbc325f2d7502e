"""KEDA: its CRDs, the operator and the metrics apiserver registered as
``v1beta1.external.metrics.k8s.io``. The operator runs in the root namespace (all its listeners on
loopback); the metrics apiserver runs in the node's network namespace on the node's address, because
the aggregator refuses loopback endpoints, and reaches the apiserver and the operator's gRPC through
the node agent's forwarders."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from devcluster.controlplane.pki import ca, issue
from devcluster.processes import free_ports

if TYPE_CHECKING:
    from devcluster.cluster import Cluster

GRPC_PORT = 9666  # the operator's gRPC as seen from the node namespace (forwarded)
ADAPTER_PORT = 6444  # the metrics apiserver, on the node's address
APISERVICE = "v1beta1.external.metrics.k8s.io"


def objects(node_ip: str) -> list[dict[str, Any]]:
    """KEDA's namespace, the metrics apiserver's Service (its endpoint: the node's address, which the
    aggregator reaches directly with --enable-aggregator-routing) and its APIService."""
    svc = {"name": "keda-metrics-apiserver", "namespace": "keda"}
    return [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "keda"}},
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": svc,
            "spec": {"ports": [{"name": "https", "port": 443, "targetPort": ADAPTER_PORT, "protocol": "TCP"}]},
        },
        {
            "apiVersion": "v1",
            "kind": "Endpoints",
            "metadata": svc,
            "subsets": [
                {"addresses": [{"ip": node_ip}], "ports": [{"name": "https", "port": ADAPTER_PORT, "protocol": "TCP"}]}
            ],
        },
        {
            "apiVersion": "apiregistration.k8s.io/v1",
            "kind": "APIService",
            "metadata": {"name": APISERVICE},
            "spec": {
                "service": {"name": "keda-metrics-apiserver", "namespace": "keda", "port": 443},
                "group": "external.metrics.k8s.io",
                "version": "v1beta1",
                "insecureSkipTLSVerify": True,
                "groupPriorityMinimum": 100,
                "versionPriority": 100,
            },
        },
    ]


def make_certs(d: Path) -> None:
    """KEDA's CA and one certificate (server and client: the operator's gRPC and the metrics
    apiserver use it both ways) for its in-cluster names, as its cert rotation would make them."""
    d.mkdir(parents=True, exist_ok=True)
    ca(d, "ca", "keda-local-ca")
    names = [
        f"{svc}.keda.svc{suffix}"
        for svc in ("keda-operator", "keda-metrics-apiserver")
        for suffix in ("", ".cluster.local")
    ]
    issue(
        d,
        "tls",
        "/CN=keda-operator.keda.svc",
        f"subjectAltName={','.join('DNS:' + n for n in names)}\nextendedKeyUsage=serverAuth,clientAuth\n",
    )


def start(c: Cluster) -> None:
    if "keda-operator" in c.processes.procs:
        return
    r = c.network.ranges
    c.kubectl("apply", "--server-side", "-f", str(c.bin_dir / "keda-crds"))
    for obj in objects(r.node_ip):
        c.kube.create(obj)
    certs = c.dir / "keda-certs"
    make_certs(certs)
    env = {
        "KUBECONFIG": str(c.kubeconfig),
        "WATCH_NAMESPACE": "",
        "POD_NAMESPACE": "keda",
        "KEDA_CLUSTER_OBJECT_NAMESPACE": "keda",
        "OPERATOR_NAME": "keda-operator",
        "POD_NAME": "keda-operator",
    }
    probe, metrics = free_ports(2)
    c.processes.spawn(
        "keda-operator",
        [
            str(c.bin_dir / "keda-operator"),
            "--leader-elect=false",
            f"--metrics-bind-address=127.0.0.1:{metrics}",
            f"--health-probe-bind-address=127.0.0.1:{probe}",
            f"--metrics-service-bind-address=127.0.0.1:{c.keda_grpc_port}",
            "--enable-cert-rotation=false",
            f"--cert-dir={certs}",
            "--enable-webhook-patching=false",
            "--enable-apiservice-patching=false",
            "--zap-log-level=info",
        ],
        env=env,
    )
    kc = c.node_kubeconfig  # the apiserver as seen from the node's namespace
    c.processes.spawn(
        "keda-adapter",
        [
            "ip",
            "netns",
            "exec",
            c.network.node_ns,
            str(c.bin_dir / "keda-adapter"),
            f"--secure-port={ADAPTER_PORT}",
            f"--bind-address={r.node_ip}",
            f"--cert-dir={certs}",
            f"--tls-cert-file={certs / 'tls.crt'}",
            f"--tls-private-key-file={certs / 'tls.key'}",
            f"--authentication-kubeconfig={kc}",
            f"--authorization-kubeconfig={kc}",
            f"--kubeconfig={kc}",
            f"--lister-kubeconfig={kc}",
            f"--metrics-service-address=127.0.0.1:{GRPC_PORT}",
            "--metrics-service-grpc-authority=keda-operator.keda.svc.cluster.local",
        ],
        env={**env, "KUBECONFIG": str(kc)},
    )


def wait(c: Cluster, timeout: float) -> None:
    def available() -> bool:
        svc = c.kube.get(f"/apis/apiregistration.k8s.io/v1/apiservices/{APISERVICE}")
        return any(
            cond["type"] == "Available" and cond["status"] == "True"
            for cond in (svc.get("status") or {}).get("conditions") or []
        )

    c.processes.poll("KEDA's metrics apiserver Available", available, timeout)
