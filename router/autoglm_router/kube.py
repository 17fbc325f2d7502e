"""Endpoints from the cluster: the revision Services' EndpointSlices and the AutoGLMDeployment's status,
each kept by a list-then-watch loop (relisting after an expired watch or a lost connection).

The operator gives the router Services ``{name}-stable`` (the stable revision's pods; with
``trafficRouting: Replicas`` every serving revision's) and, during a ``Router`` rollout, ``{name}-canary``.
Only Ready endpoints count, so a pod that starts terminating leaves the router's list on the next
EndpointSlice event. The canary's weight is ``status.canaryWeight``; revision names come from
``status.stableRevision`` / ``status.canaryRevision``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import ssl
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from autoglm_router.endpoints import Endpoint, Revision, Topology, ready_endpoints

log = logging.getLogger("autoglm_router.kube")

SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
GROUP, VERSION, PLURAL = "autoglm.io", "v1alpha1", "autoglmdeployments"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
WATCH_SECONDS = 240


def service_names(name: str) -> tuple[str, str]:
    """(stable, canary): the Services whose EndpointSlices the router reads (the operator creates them)."""
    return f"{name}-stable", f"{name}-canary"


def topology_from(name: str, slices: Mapping[str, Mapping[str, Any]], cr: Mapping[str, Any] | None) -> Topology:
    """The topology in the EndpointSlices (by slice name) and the resource (None: not read yet or gone)."""
    stable_svc, canary_svc = service_names(name)
    by_service: dict[str, list[Endpoint]] = {stable_svc: [], canary_svc: []}
    for s in slices.values():
        svc = ((s.get("metadata") or {}).get("labels") or {}).get(SERVICE_NAME_LABEL)
        if svc in by_service:
            by_service[svc].extend(ready_endpoints(s))
    status = (cr or {}).get("status") or {}
    stable = Revision(
        status.get("stableRevision") or "stable", tuple(sorted(set(by_service[stable_svc]), key=lambda e: e.address))
    )
    canary_name = status.get("canaryRevision")
    routing = ((cr or {}).get("spec") or {}).get("rollout", {}).get("trafficRouting")
    if canary_name and routing == "Router":
        canary = Revision(canary_name, tuple(sorted(set(by_service[canary_svc]), key=lambda e: e.address)))
        return Topology(stable, canary, int(status.get("canaryWeight") or 0))
    return Topology(stable)


class KubeConnection:
    """Where the API server is and how to authenticate (the pod's service account)."""

    def __init__(self, server: str, token_file: Path | None, ssl_context: ssl.SSLContext | bool) -> None:
        self.server = server.rstrip("/")
        self.token_file = token_file
        self.ssl = ssl_context

    @classmethod
    def in_cluster(cls) -> KubeConnection:
        host, port = os.environ["KUBERNETES_SERVICE_HOST"], os.environ["KUBERNETES_SERVICE_PORT"]
        host = f"[{host}]" if ":" in host else host
        return cls(
            f"https://{host}:{port}", SA_DIR / "token", ssl.create_default_context(cafile=str(SA_DIR / "ca.crt"))
        )

    @classmethod
    def from_kubeconfig(cls, path: Path) -> KubeConnection:
        """The current context of a kubeconfig with file references (client certificate or token file):
        for running the router outside a cluster and for tests against a local API server."""
        config = yaml.safe_load(path.read_text())
        context = next(c["context"] for c in config["contexts"] if c["name"] == config["current-context"])
        cluster = next(c["cluster"] for c in config["clusters"] if c["name"] == context["cluster"])
        user = next(u["user"] for u in config["users"] if u["name"] == context["user"])
        ctx = ssl.create_default_context(cafile=cluster.get("certificate-authority"))
        if "client-certificate" in user:
            ctx.load_cert_chain(user["client-certificate"], user["client-key"])
        token = Path(user["tokenFile"]) if "tokenFile" in user else None
        return cls(cluster["server"], token, ctx)

    def headers(self) -> dict[str, str]:
        # Read at every (re)list and watch: the kubelet rotates the projected token.
        if self.token_file is None:
            return {}
        return {"Authorization": "Bearer " + self.token_file.read_text().strip()}


class _Watch:
    """One collection kept current by list + watch; ``on_change`` runs after every change."""

    def __init__(self, conn: KubeConnection, path: str, params: dict[str, str], on_change: Callable[[], None]) -> None:
        self.conn, self.path, self.params, self.on_change = conn, path, params, on_change
        self.items: dict[str, dict[str, Any]] = {}
        self.listed = False

    async def run(self, session: aiohttp.ClientSession) -> None:
        while True:
            try:
                version = await self._list(session)
                await self._watch(session, version)
            except asyncio.CancelledError:
                raise
            except (aiohttp.ClientError, TimeoutError, ValueError, KeyError) as exc:
                log.warning("Lost watch, path=%s error=%s", self.path, exc)
                await asyncio.sleep(1.0)

    async def _list(self, session: aiohttp.ClientSession) -> str:
        url = self.conn.server + self.path
        async with session.get(url, params=self.params, headers=self.conn.headers(), ssl=self.conn.ssl) as r:
            r.raise_for_status()
            body = await r.json()
        self.items = {i["metadata"]["name"]: i for i in body.get("items") or []}
        self.listed = True
        self.on_change()
        return str(body["metadata"]["resourceVersion"])

    async def _watch(self, session: aiohttp.ClientSession, version: str) -> None:
        params = {
            **self.params,
            "watch": "1",
            "resourceVersion": version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(WATCH_SECONDS),
        }
        timeout = aiohttp.ClientTimeout(total=None, sock_read=WATCH_SECONDS + 30)
        url = self.conn.server + self.path
        async with session.get(
            url, params=params, headers=self.conn.headers(), ssl=self.conn.ssl, timeout=timeout
        ) as r:
            r.raise_for_status()
            async for line in r.content:
                if not line.strip():
                    continue
                event = json.loads(line)
                kind, obj = event.get("type"), event.get("object") or {}
                if kind == "ERROR":  # 410 Gone: the version expired; relist
                    return
                if kind in ("ADDED", "MODIFIED"):
                    self.items[obj["metadata"]["name"]] = obj
                elif kind == "DELETED":
                    self.items.pop(obj["metadata"]["name"], None)
                else:
                    continue  # BOOKMARK
                self.on_change()


class KubeSource:
    """``EndpointSource`` over the cluster (see the module doc)."""

    def __init__(self, conn: KubeConnection, name: str, namespace: str) -> None:
        self.name, self.namespace = name, namespace
        stable, canary = service_names(name)
        self._current = Topology(synced=False)
        self._slices = _Watch(
            conn,
            f"/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices",
            {"labelSelector": f"{SERVICE_NAME_LABEL} in ({stable},{canary})"},
            self._changed,
        )
        self._cr = _Watch(
            conn,
            f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}",
            {"fieldSelector": f"metadata.name={name}"},
            self._changed,
        )
        self._session: aiohttp.ClientSession | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._listeners: list[Callable[[], None]] = []

    @classmethod
    def in_cluster(cls, name: str, namespace: str | None = None) -> KubeSource:
        ns = namespace or (SA_DIR / "namespace").read_text().strip()
        return cls(KubeConnection.in_cluster(), name, ns)

    def _changed(self) -> None:
        topo = topology_from(self.name, self._slices.items, self._cr.items.get(self.name))
        synced = self._slices.listed and self._cr.listed
        self._current = Topology(topo.stable, topo.canary, topo.canary_weight, synced)
        log.debug("Updated endpoints, topology=%s", self._current)
        for callback in self._listeners:
            callback()

    def subscribe(self, callback: Callable[[], None]) -> None:
        self._listeners.append(callback)

    def topology(self) -> Topology:
        return self._current

    async def start(self) -> None:
        self._session = aiohttp.ClientSession()
        self._tasks = [asyncio.create_task(w.run(self._session)) for w in (self._slices, self._cr)]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
