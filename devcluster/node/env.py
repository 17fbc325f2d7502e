"""A container's environment, as a kubelet resolves it: ``value`` (with ``$(VAR)`` expansion),
Secret and ConfigMap keys, ``fieldRef``, ``envFrom``; plus what every pod finds (``HOSTNAME``,
``KUBERNETES_SERVICE_HOST``/``PORT``)."""

from __future__ import annotations

import base64
import re
from typing import TYPE_CHECKING, Any

from devcluster.kube import KubeError
from devcluster.node.config import ConfigError

if TYPE_CHECKING:
    from devcluster.node.container import Container
    from devcluster.node.pod import PodWorker

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion ($$(VAR) escapes it); unknown variables stay as written."""
    return re.sub(
        r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
        lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)),
        value,
    )


class EnvResolver:
    """Reads what a pod's env and volumes refer to (Secrets, ConfigMaps, its own fields)."""

    def __init__(self, worker: PodWorker) -> None:
        self.w = worker

    async def object(self, kind: str, name: str, optional: bool = False) -> dict[str, str] | None:
        """The data of a Secret (decoded) or ConfigMap; None for a missing optional one."""
        plural = {"Secret": "secrets", "ConfigMap": "configmaps"}[kind]
        try:
            obj = await self.w.agent.call("GET", f"/api/v1/namespaces/{self.w.ns}/{plural}/{name}")
        except KubeError as exc:
            if exc.status == 404:
                if optional:
                    return None
                raise ConfigError("CreateContainerConfigError", f'{kind.lower()} "{name}" not found') from None
            raise
        data = dict(obj.get("data") or {})
        if kind == "Secret":
            data = {k: base64.b64decode(v).decode(errors="replace") for k, v in data.items()}
        return data

    async def key(self, kind: str, ref: dict[str, Any]) -> str | None:
        data = await self.object(kind, ref["name"], ref.get("optional", False))
        if data is None:
            return None
        if ref["key"] not in data:
            if ref.get("optional"):
                return None
            raise ConfigError(
                "CreateContainerConfigError", f"couldn't find key {ref['key']} in {kind} {self.w.ns}/{ref['name']}"
            )
        return data[ref["key"]]

    def field(self, path: str) -> str:
        """A ``fieldRef`` (env or downwardAPI volume)."""
        w = self.w
        meta = w.pod["metadata"]
        simple = {
            "metadata.name": w.name,
            "metadata.namespace": w.ns,
            "metadata.uid": w.uid,
            "spec.nodeName": w.agent.cfg.node,
            "spec.serviceAccountName": w.pod["spec"].get("serviceAccountName", ""),
            "status.podIP": w.pod_ip,
            "status.hostIP": w.agent.net.ranges.node_ip,
        }
        if path in simple:
            return simple[path]
        m = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
        if m:
            return (meta.get(m.group(1)) or {}).get(m.group(2), "")
        raise ConfigError("CreateContainerConfigError", f"unsupported fieldRef {path}")

    async def env(self, c: Container, image: dict[str, Any]) -> dict[str, str]:
        ranges = self.w.agent.net.ranges
        env = {
            "PATH": DEFAULT_PATH,
            **image.get("env", {}),
            "HOSTNAME": self.w.name,
            "KUBERNETES_SERVICE_HOST": ranges.kubernetes_service_ip,
            "KUBERNETES_SERVICE_PORT": "443",
            "KUBERNETES_SERVICE_PORT_HTTPS": "443",
        }
        for src in c.spec.get("envFrom") or []:
            prefix = src.get("prefix", "")
            for kind, key in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
                if key in src:
                    data = await self.object(kind, src[key]["name"], src[key].get("optional", False)) or {}
                    env.update({prefix + k: v for k, v in data.items()})
        for e in c.spec.get("env") or []:
            if "value" in e or "valueFrom" not in e:
                env[e["name"]] = expand(e.get("value", ""), env)
                continue
            vf = e["valueFrom"]
            if "secretKeyRef" in vf:
                value = await self.key("Secret", vf["secretKeyRef"])
            elif "configMapKeyRef" in vf:
                value = await self.key("ConfigMap", vf["configMapKeyRef"])
            elif "fieldRef" in vf:
                value = self.field(vf["fieldRef"]["fieldPath"])
            else:
                raise ConfigError("CreateContainerConfigError", f"unsupported valueFrom for env {e['name']}")
            if value is not None:
                env[e["name"]] = value
        return env
