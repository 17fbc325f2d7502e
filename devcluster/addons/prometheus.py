"""Prometheus on 127.0.0.1, discovering pods through the apiserver and scraping those annotated
``prometheus.io/scrape`` (1 s interval, 2 h retention), and what add-ons running outside pods list with
``add_targets`` (job ``addons``, each target group labelled with its own ``job``: Traefik's is
``traefik``). Pods reach it as in a user's cluster, at
``http://prometheus.monitoring:9090``: the Service's endpoint is the node's address, where the node
agent forwards to the loopback port."""

from __future__ import annotations

import contextlib
import json
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from devcluster.cluster import Cluster

PORT = 9090  # the in-cluster Service's port (and the node's forwarder)
CONFIG = """\
global: {{scrape_interval: 1s, scrape_timeout: 1s, evaluation_interval: 1s}}
scrape_configs:
- job_name: kubernetes-pods
  # pods serving HTTPS (prometheus.io/scheme: https) use their own certificates
  tls_config: {{insecure_skip_verify: true}}
  kubernetes_sd_configs:
  - role: pod
    api_server: {api}
    tls_config: {{ca_file: {ca}, cert_file: {cert}, key_file: {key}}}
  relabel_configs:
  - {{source_labels: [__meta_kubernetes_pod_annotation_prometheus_io_scrape], regex: "true", action: keep}}
  - {{source_labels: [__meta_kubernetes_pod_phase], regex: Pending|Succeeded|Failed, action: drop}}
  - source_labels: [__meta_kubernetes_pod_annotation_prometheus_io_path]
    regex: (.+)
    target_label: __metrics_path__
  - source_labels: [__meta_kubernetes_pod_annotation_prometheus_io_scheme]
    regex: "(https?)"
    target_label: __scheme__
  - source_labels: [__meta_kubernetes_pod_ip, __meta_kubernetes_pod_annotation_prometheus_io_port]
    regex: (.+);(\\d+)
    replacement: $1:$2
    target_label: __address__
  - {{source_labels: [__meta_kubernetes_namespace], target_label: namespace}}
  - {{source_labels: [__meta_kubernetes_pod_name], target_label: pod}}
  - {{source_labels: [__meta_kubernetes_pod_node_name], target_label: node}}
  - {{action: labelmap, regex: __meta_kubernetes_pod_label_(app_kubernetes_io_.+|autoglm_io_.+)}}
- job_name: addons
  # add-ons outside pods (add_targets); each file's targets carry their own job label
  file_sd_configs:
  - {{files: ["{targets}/*.json"], refresh_interval: 5s}}
"""


def targets_dir(cluster_dir: Path) -> Path:
    return cluster_dir / "prometheus-targets"


def add_targets(c: Cluster, job: str, targets: list[str]) -> None:
    """Have Prometheus scrape ``targets`` (``host:port``, path /metrics) as job ``job`` (file-based
    discovery: Prometheus picks the file up within seconds, no reload)."""
    d = targets_dir(c.dir)
    d.mkdir(exist_ok=True)
    tmp = d / f".{job}.json.tmp"
    tmp.write_text(json.dumps([{"targets": targets, "labels": {"job": job}}]))
    tmp.rename(d / f"{job}.json")  # whole, never half-written


def objects(node_ip: str) -> list[dict[str, Any]]:
    """Namespace ``monitoring``, Service ``prometheus`` (no selector) and its EndpointSlice."""
    meta = {"name": "prometheus", "namespace": "monitoring"}
    return [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "monitoring"}},
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": meta,
            "spec": {"ports": [{"name": "http", "port": PORT, "targetPort": PORT, "protocol": "TCP"}]},
        },
        {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                **meta,
                "labels": {
                    "kubernetes.io/service-name": "prometheus",
                    "endpointslice.kubernetes.io/managed-by": "devcluster",
                },
            },
            "addressType": "IPv4",
            "endpoints": [{"addresses": [node_ip], "conditions": {"ready": True}}],
            "ports": [{"name": "http", "port": PORT, "protocol": "TCP"}],
        },
    ]


def start(c: Cluster) -> None:
    if "prometheus" in c.processes.procs:
        return
    for obj in objects(c.network.ranges.node_ip):
        c.kube.create(obj)
    pki = c.dir / "pki"
    cfg = c.dir / "prometheus.yml"
    cfg.write_text(
        CONFIG.format(
            api=f"https://127.0.0.1:{c.api_port}",
            ca=pki / "ca.crt",
            cert=pki / "admin.crt",
            key=pki / "admin.key",
            targets=targets_dir(c.dir),
        )
    )
    port = c.prometheus_url.rsplit(":", 1)[1]
    c.processes.spawn(
        "prometheus",
        [
            str(c.bin_dir / "prometheus"),
            f"--config.file={cfg}",
            f"--storage.tsdb.path={c.dir / 'prometheus'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
            "--storage.tsdb.retention.time=2h",
            "--web.enable-lifecycle",
        ],
    )


def wait(c: Cluster, timeout: float) -> None:
    def ready() -> bool:
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(f"{c.prometheus_url}/-/ready", timeout=2) as resp:
                return resp.status == 200
        return False

    c.processes.poll("Prometheus ready", ready, timeout)
