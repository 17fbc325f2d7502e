"""A pod's volumes on the node, each a folder of this machine bound at its ``mountPath``s: hostPath
(through the node's host-path map), emptyDir, Secret and ConfigMap files, and projected volumes,
including what the ServiceAccount admission plugin adds to every pod (``kube-api-access-*``: a
TokenRequest token bound to the pod, ``ca.crt``, ``namespace``) and the pod's ``/etc/resolv.conf``
pointing at the cluster DNS. Folders live under ``<state>/pods/<uid>/volumes/<volume>``."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from devcluster.kube import KubeError
from devcluster.node.config import ConfigError

if TYPE_CHECKING:
    from devcluster.node.container import Container
    from devcluster.node.env import EnvResolver
    from devcluster.node.pod import PodWorker

log = logging.getLogger("procnode")
DEFAULT_TOKEN_SECONDS = 3600
# The kubelet renews a projected token once 80 % of its lifetime has passed.
TOKEN_RENEW_FRACTION = 0.8


def resolv_conf(policy: str, dns_config: dict[str, Any] | None, namespace: str, domain: str, dns_ip: str) -> str | None:
    """The pod's /etc/resolv.conf for its ``dnsPolicy`` and ``dnsConfig`` (None: the host's own,
    as ``dnsPolicy: Default``, and ``ClusterFirst`` on a node without cluster DNS)."""
    dns_config = dns_config or {}
    if policy == "None":
        servers, search, options = [], [], []
    elif policy in ("ClusterFirst", "ClusterFirstWithHostNet") and dns_ip:
        servers = [dns_ip]
        search = [f"{namespace}.svc.{domain}", f"svc.{domain}", domain]
        options = [{"name": "ndots", "value": "5"}]
    else:
        return None
    servers += dns_config.get("nameservers") or []
    search += [s for s in dns_config.get("searches") or [] if s not in search]
    merged = {o["name"]: o.get("value") for o in options}
    merged.update({o["name"]: o.get("value") for o in dns_config.get("options") or []})
    lines = [f"nameserver {s}" for s in servers]
    if search:
        lines.append("search " + " ".join(search))
    if merged:
        lines.append("options " + " ".join(k if v is None else f"{k}:{v}" for k, v in merged.items()))
    return "\n".join(lines) + "\n"


def write_file(path: Path, text: str, mode: int = 0o644) -> None:
    """Replace a file at once (a reader never sees half a token)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


class Volumes:
    def __init__(self, worker: PodWorker, resolver: EnvResolver) -> None:
        self.w = worker
        self.resolver = resolver
        self.paths: dict[str, str] = {}  # volume name -> folder (or hostPath) on this machine
        self.tokens: list[tuple[Path, dict[str, Any]]] = []  # (file, serviceAccountToken source)
        self.resolv_conf: Path | None = None
        self.renew_at = float("inf")

    async def prepare(self) -> None:
        w = self.w
        vol_dir = w.dir / "volumes"
        self.tokens.clear()
        for v in w.pod["spec"].get("volumes") or []:
            name, target = v["name"], vol_dir / v["name"]
            if "hostPath" in v:
                path = w.agent.cfg.host_path(v["hostPath"]["path"])
                kind = v["hostPath"].get("type", "")
                if kind == "Directory" and not os.path.isdir(path):
                    raise ConfigError(
                        "ContainerCreating", f"hostPath {v['hostPath']['path']} is not a directory on the node"
                    )
                if kind == "DirectoryOrCreate":
                    os.makedirs(path, exist_ok=True)
                self.paths[name] = path
            elif "emptyDir" in v:
                target.mkdir(parents=True, exist_ok=True)
                os.chmod(target, 0o777)
                self.paths[name] = str(target)
            elif "secret" in v or "configMap" in v or "projected" in v or "downwardAPI" in v:
                sources = (v["projected"].get("sources") or []) if "projected" in v else [v]
                target.mkdir(parents=True, exist_ok=True)
                os.chmod(target, 0o755)
                for s in sources:
                    await self._project(s, target)
                self.paths[name] = str(target)
            else:
                raise ConfigError(
                    "ContainerCreating",
                    f"volume {name}: only hostPath, emptyDir, secret, configMap, "
                    "downwardAPI and projected volumes run on the process node",
                )
        await self.renew_tokens()
        text = resolv_conf(
            w.pod["spec"].get("dnsPolicy", "ClusterFirst"),
            w.pod["spec"].get("dnsConfig"),
            w.ns,
            w.agent.cfg.cluster_domain,
            w.agent.cfg.dns_ip,
        )
        if text is not None:
            self.resolv_conf = w.dir / "resolv.conf"
            write_file(self.resolv_conf, text)

    async def _project(self, s: dict[str, Any], target: Path) -> None:
        for kind, key, name_key in (("Secret", "secret", "secretName"), ("ConfigMap", "configMap", "name")):
            if key not in s:
                continue
            ref = s[key]
            data = (
                await self.resolver.object(kind, ref.get(name_key) or ref.get("name"), ref.get("optional", False)) or {}
            )
            items = ref.get("items") or [{"key": k, "path": k} for k in data]
            for it in items:
                if it["key"] in data:
                    write_file(target / it["path"], data[it["key"]])
        if "downwardAPI" in s:
            for it in s["downwardAPI"].get("items") or []:
                if "fieldRef" not in it:
                    raise ConfigError("ContainerCreating", f"downwardAPI {it['path']}: only fieldRef items run here")
                write_file(target / it["path"], self.resolver.field(it["fieldRef"]["fieldPath"]))
        if "serviceAccountToken" in s:
            self.tokens.append((target / s["serviceAccountToken"]["path"], s["serviceAccountToken"]))

    async def renew_tokens(self) -> None:
        """Ask the apiserver for each projected token (TokenRequest, bound to this pod) and write it."""
        w = self.w
        sa = w.pod["spec"].get("serviceAccountName") or "default"
        renew_in = float("inf")
        for path, src in self.tokens:
            seconds = int(src.get("expirationSeconds") or DEFAULT_TOKEN_SECONDS)
            body = {
                "apiVersion": "authentication.k8s.io/v1",
                "kind": "TokenRequest",
                "spec": {
                    "audiences": [src["audience"]] if src.get("audience") else [],
                    "expirationSeconds": seconds,
                    "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": w.name, "uid": w.uid},
                },
            }
            try:
                got = await w.agent.call("POST", f"/api/v1/namespaces/{w.ns}/serviceaccounts/{sa}/token", body)
            except KubeError as exc:
                raise ConfigError(
                    "ContainerCreating", f'failed to fetch token for ServiceAccount "{sa}": {exc}'
                ) from None
            write_file(path, got["status"]["token"])
            renew_in = min(renew_in, seconds * TOKEN_RENEW_FRACTION)
        self.renew_at = time.monotonic() + renew_in

    async def keep_tokens_fresh(self) -> None:
        while self.tokens:
            await asyncio.sleep(max(self.renew_at - time.monotonic(), 1.0))
            try:
                await self.renew_tokens()
            except ConfigError as exc:
                log.warning("Renewing tokens failed pod=%s/%s error=%s", self.w.ns, self.w.name, exc)
                self.renew_at = time.monotonic() + 10

    def mounts(self, c: Container) -> list[dict[str, Any]]:
        """The container's mounts for ``launch.py``: its volumeMounts, then /etc/resolv.conf."""
        out = []
        for m in c.spec.get("volumeMounts") or []:
            src = self.paths.get(m["name"])
            if src is None:
                continue
            if m.get("subPath"):
                src = os.path.join(src, m["subPath"])
            out.append({"source": src, "target": m["mountPath"], "readOnly": bool(m.get("readOnly"))})
        if self.resolv_conf is not None:
            out.append({"source": str(self.resolv_conf), "target": "/etc/resolv.conf", "readOnly": True})
        return out
