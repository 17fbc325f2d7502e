"""The process node's configuration (``procnode.json``, written by the cluster) and its image table."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BACKOFF_BASE, BACKOFF_MAX = 10.0, 300.0
# The node namespace's port forwarded to the apiserver (kube-proxy, add-ons in the node namespace, and
# the `kubernetes` Service's endpoint on the node's address).
NODE_API_PORT = 6443


@dataclass
class NodeConfig:
    kubeconfig_server: str
    ca: str
    cert: str
    key: str
    node: str
    slot: int
    state_dir: str
    images: list[dict[str, Any]]  # [{"match": "ghcr.io/autoglm/runtime", "binds": [...], "env": {...}}]
    host_paths: dict[str, str] = field(default_factory=dict)  # hostPath prefix -> folder on this machine
    api_port: int = 0  # forwarded to the node namespace's port NODE_API_PORT
    # [node-ns port, root-namespace 127.0.0.1 port] on the node namespace's loopback, or with a third
    # item "node" on the node's address (a Service's endpoint, for pods)
    forwards: list[list[Any]] = field(default_factory=list)
    cpu: str = "16"
    memory: str = "64Gi"
    backoff_base: float = BACKOFF_BASE
    cluster_domain: str = "cluster.local"
    dns_ip: str = ""  # the cluster DNS Service's IP ("" when DNS is not running)

    @classmethod
    def load(cls, path: str) -> NodeConfig:
        return cls(**json.loads(Path(path).read_text()))

    def image(self, ref: str) -> dict[str, Any] | None:
        repo = ref.split("@")[0]
        if ":" in repo.rsplit("/", 1)[-1]:
            repo = repo.rsplit(":", 1)[0]
        return next((i for i in self.images if i["match"] == repo), None)

    def host_path(self, path: str) -> str:
        for prefix, target in sorted(self.host_paths.items(), key=lambda kv: -len(kv[0])):
            if path == prefix or path.startswith(prefix.rstrip("/") + "/"):
                return target + path[len(prefix.rstrip("/")) :]
        return path


class ConfigError(Exception):
    """A pod's config cannot be resolved yet (missing Secret key...): reason + message for the status."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
