"""The cluster's Node objects: ``proc-0`` (the process node: pods really run; its agent fills in its
status) and kwok's fake nodes (annotated ``kwok.x-k8s.io/node: fake``, the only ones kwok manages).

Where pods land: a CPU-only pod lands on ``proc-0``; GPU pods land on the fake GPU nodes (tainted
``nvidia.com/gpu``; the ``ExtendedResourceToleration`` admission plugin lets pods that ask for GPUs
tolerate it), where kwok plays their lifecycle; ``kwok-cpu-0`` is tainted ``autoglm.io/simulated`` and
takes only pods that tolerate it (the operator benchmark's 1,000+ pods): it is sized for them
(1,280 pods, 1,280 CPU, 5 TiB memory; kwok's pod IPs come from a /17). The GPU nodes keep
32 CPU / 256Gi / 110 pods."""

from __future__ import annotations

from typing import Any

PROC_NODE = "proc-0"
SIMULATED_CAPACITY = {"cpu": "1280", "memory": "5Ti", "pods": "1280"}
GPU_TAINT = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}
SIMULATED_TAINT = {"key": "autoglm.io/simulated", "value": "true", "effect": "NoSchedule"}
# (name, labels, resources beyond the defaults, taint)
KWOK_NODES: list[tuple[str, dict[str, str], dict[str, str], dict[str, str]]] = [
    (
        "kwok-gpu-0",
        {"nvidia.com/gpu.product": "NVIDIA-A10G", "nvidia.com/gpu.count": "8"},
        {"nvidia.com/gpu": "8"},
        GPU_TAINT,
    ),
    (
        "kwok-gpu-1",
        {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3", "nvidia.com/gpu.count": "8"},
        {"nvidia.com/gpu": "8"},
        GPU_TAINT,
    ),
    ("kwok-cpu-0", {}, SIMULATED_CAPACITY, SIMULATED_TAINT),
]
NODE_COUNT = len(KWOK_NODES) + 1


def _labels(name: str, instance_type: str, extra: dict[str, str]) -> dict[str, str]:
    return {
        "type": instance_type,
        "kubernetes.io/hostname": name,
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": "amd64",
        "node.kubernetes.io/instance-type": instance_type,
        **extra,
    }


def nodes(pod_cidr: str) -> list[dict[str, Any]]:
    """Every Node object to create: ``proc-0`` with the process node's ``podCIDR``, then kwok's."""
    out: list[dict[str, Any]] = [
        {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": PROC_NODE, "labels": _labels(PROC_NODE, "process", {})},
            "spec": {"podCIDR": pod_cidr, "podCIDRs": [pod_cidr]},
        }
    ]
    for name, labels, extra, taint in KWOK_NODES:
        resources = {"cpu": "32", "memory": "256Gi", "pods": "110", "ephemeral-storage": "500Gi", **extra}
        out.append(
            {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {
                    "name": name,
                    "labels": _labels(name, "kwok", labels),
                    "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
                },
                "spec": {"taints": [dict(taint)]},
                "status": {"capacity": dict(resources), "allocatable": dict(resources)},
            }
        )
    return out
