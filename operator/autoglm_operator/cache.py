"""Reads from kopf's watch-fed indexes: ``CachedKube`` is the ``KubeAPI`` reconcile sees.

Every kind reconcile reads on each pass (the AutoGLMDeployments, and the children carrying our
labels: Deployments, Pods, Services, HPAs, PDBs, NetworkPolicies, ScaledObjects, HTTPRoutes) is indexed by
``@kopf.index`` (handlers.py registers one per kind, on the same server-side-label-selected watch
stream as its ``@kopf.on.event``). kopf runs no handler before every index is populated from its
initial listing, and reconcile is only ever triggered by a handler or by the resync of resources a
handler has seen, so reads never see a half-filled cache. A kind whose CRD is missing (ScaledObject
without KEDA, HTTPRoute without the Gateway API) has no watch stream and blocks nothing: its index
stays empty, which is the truth.

kopf relists a kind after a watch is lost for longer than etcd keeps history (410 Gone, e.g. an
apiserver restart) without dropping from its indexes the objects deleted meanwhile. ``audit()``,
run every ``cache_audit_seconds`` (10 min: one LIST per kind and namespace, ~0.1 request/s at
N = 1,000 in 10 namespaces), finds those, confirms each with a GET, hides them from reads and
names their owners for a reconcile.

Writes go to ``Kube``. Their answers are kept for a few seconds and preferred to the index while
they are newer (by resourceVersion), so the re-observe after a write, and the next reconcile, see
what was just written rather than a watch event still on its way (no duplicate status writes or
events). ``get(..., fresh=True)`` and the kinds not cached (Secrets, PVCs, Events) go to the API.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from . import builders as b
from .kube import RESOURCES, ApiError, KubeAPI, Selector

# kind → (group, version, plural) of what is served from an index.
CACHED: dict[str, tuple[str, str, str]] = {
    kind: RESOURCES[kind]
    for kind in (
        "AutoGLMDeployment",
        "Deployment",
        "Pod",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "NetworkPolicy",
        "ScaledObject",
        "HTTPRoute",
    )
}
log = logging.getLogger(__name__)
# The server-side label selector of the children's watches (handlers.py), for the audit's LISTs.
CHILD_SELECTOR = f"{b.MANAGED_SELECTOR},{b.LABEL_DEPLOYMENT}"
# How long an object a write returned is preferred to an index that has not caught up.
WRITTEN_TTL_SECONDS = 10.0


def index_id(kind: str) -> str:
    """The kopf index (and handler kwarg) name of a kind."""
    return f"cache_{kind.lower()}"


def index_keys(namespace: str, name: str, labels: Mapping[str, str]) -> list[tuple[str, str, str]]:
    """Each object is indexed by name, and by the AutoGLMDeployment it belongs to (its label)."""
    keys = [("name", namespace, name)]
    owner = labels.get(b.LABEL_DEPLOYMENT)
    if owner:
        keys.append(("owner", namespace, owner))
    return keys


def slim(kind: str, body: Mapping[str, Any]) -> dict[str, Any]:
    """What reconcile reads of an object, and no more (memory at N = 1,000): ``managedFields`` only
    for Deployments (who owns ``spec.replicas``), only metadata and status for Pods."""
    obj = dict(body)
    meta = dict(obj.get("metadata") or {})
    if kind != "Deployment":
        meta.pop("managedFields", None)
    obj["metadata"] = meta
    if kind == "Pod":
        obj.pop("spec", None)
    return obj


def _rv(obj: Mapping[str, Any]) -> int:
    try:
        return int(obj["metadata"].get("resourceVersion") or 0)
    except (TypeError, ValueError):
        return 0


def _matches(obj: Mapping[str, Any], selector: Mapping[str, str]) -> bool:
    labels = obj["metadata"].get("labels") or {}
    return all(labels.get(k) == v for k, v in selector.items())


class CachedKube:
    """``KubeAPI`` with reads served from kopf indexes (``indexes``: kind → kopf.Index), writes to ``api``."""

    def __init__(self, api: KubeAPI, indexes: Mapping[str, Mapping[Any, Iterable[Mapping[str, Any]]]]) -> None:
        self.api = api
        self.indexes = dict(indexes)
        self.hits: dict[str, int] = {}
        # (kind, namespace, name) → (monotonic time, object a write returned | None after a delete, uid deleted)
        self._written: dict[tuple[str, str, str], tuple[float, dict[str, Any] | None, str]] = {}
        # (kind, namespace, name) → uid of an object the index still holds but the API no longer has
        self._gone: dict[tuple[str, str, str], str] = {}

    # ------------------------------------------------------------ reads

    def _from_index(self, kind: str, key: tuple[str, str, str]) -> list[Mapping[str, Any]]:
        store = self.indexes[kind].get(key)
        found = list(store) if store is not None else []
        if self._gone:
            found = [o for o in found if self._gone.get((kind, key[1], o["metadata"]["name"])) != o["metadata"]["uid"]]
        return found

    async def audit(self, namespaces: Iterable[str]) -> list[tuple[str, str, str, dict[str, Any]]]:
        """(kind, namespace, name, object) the indexes hold that the API does not (deleted while a
        watch was down): from now on hidden from reads. One LIST per kind and namespace; a GET
        confirms each suspect (an object created after the LIST is not one)."""
        stale = []
        for key in [k for k, uid in self._gone.items() if not self._still_indexed(*k, uid)]:
            del self._gone[key]  # the index dropped it (or holds a new object of that name)
        for kind in self.indexes:
            for ns in sorted(set(namespaces)):
                selector = None if kind == "AutoGLMDeployment" else CHILD_SELECTOR
                try:
                    live = {o["metadata"]["uid"] for o in await self.api.list(kind, ns, selector)}
                except ApiError as exc:
                    if exc.status == 404:  # no such kind (ScaledObject without KEDA)
                        break
                    raise
                for key in list(self.indexes[kind]):
                    if key[0] != "name" or key[1] != ns:
                        continue
                    for obj in self._from_index(kind, key):
                        meta = obj["metadata"]
                        if meta["uid"] in live:
                            continue
                        now = await self.api.get(kind, ns, meta["name"])
                        if now is None or now["metadata"]["uid"] != meta["uid"]:
                            self._gone[(kind, ns, meta["name"])] = meta["uid"]
                            stale.append((kind, ns, meta["name"], dict(obj)))
        for kind, ns, name, _ in stale:
            log.warning("Dropped %s %s/%s from the cache: deleted while a watch was down.", kind, ns, name)
        return stale

    def _still_indexed(self, kind: str, namespace: str, name: str, uid: str) -> bool:
        store = self.indexes[kind].get(("name", namespace, name))
        return any(o["metadata"]["uid"] == uid for o in store or [])

    def _overlay(self, kind: str, namespace: str, name: str, cached: Mapping[str, Any] | None) -> Any:
        """The newer of the index's copy and what our last write returned (``None``: gone)."""
        key = (kind, namespace, name)
        entry = self._written.get(key)
        if entry is None:
            return cached
        at, written, deleted_uid = entry
        if time.monotonic() - at > WRITTEN_TTL_SECONDS:
            del self._written[key]
            return cached
        if written is None:  # we deleted it: hide the index's copy of that object until the event comes
            if cached is not None and cached["metadata"].get("uid") != deleted_uid:
                del self._written[key]
                return cached
            return None
        if cached is not None and _rv(cached) >= _rv(written):
            del self._written[key]
            return cached
        return written

    async def get(self, kind: str, namespace: str, name: str, *, fresh: bool = False) -> dict[str, Any] | None:
        if fresh or kind not in self.indexes:
            return await self.api.get(kind, namespace, name)
        self.hits[kind] = self.hits.get(kind, 0) + 1
        found = self._from_index(kind, ("name", namespace, name))
        obj = self._overlay(kind, namespace, name, found[0] if found else None)
        return copy.deepcopy(dict(obj)) if obj is not None else None

    async def list(
        self, kind: str, namespace: str | None, label_selector: Selector | None = None
    ) -> list[dict[str, Any]]:
        """Served from the index when the selector is labels including the owner's; else from the API."""
        owner = label_selector.get(b.LABEL_DEPLOYMENT) if isinstance(label_selector, Mapping) else None
        if kind not in self.indexes or namespace is None or owner is None:
            return await self.api.list(kind, namespace, label_selector)
        assert isinstance(label_selector, Mapping)
        self.hits[kind] = self.hits.get(kind, 0) + 1
        by_name = {o["metadata"]["name"]: o for o in self._from_index(kind, ("owner", namespace, owner))}
        for k, ns, name in list(self._written):
            if k == kind and ns == namespace and name not in by_name:
                by_name[name] = None  # type: ignore[assignment]  # written by us, not indexed yet
        out = []
        for name in sorted(by_name):
            obj = self._overlay(kind, namespace, name, by_name[name])
            if obj is not None and _matches(obj, label_selector):
                out.append(copy.deepcopy(dict(obj)))
        return out

    # ------------------------------------------------------------ writes (remembered until the index catches up)

    def _expire(self) -> None:
        if len(self._written) > 256:  # entries are dropped when read; these were never read again
            now = time.monotonic()
            for key in [k for k, (at, _, _) in self._written.items() if now - at > WRITTEN_TTL_SECONDS]:
                del self._written[key]

    def _remember(self, kind: str, obj: dict[str, Any] | None) -> dict[str, Any] | None:
        self._expire()
        if obj is not None and kind in self.indexes:
            meta = obj["metadata"]
            self._written[(kind, meta["namespace"], meta["name"])] = (time.monotonic(), obj, "")
        return obj

    async def patch(self, kind: str, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any] | None:
        return self._remember(kind, await self.api.patch(kind, namespace, name, patch))

    async def apply(self, kind: str, namespace: str, body: dict[str, Any], *, force: bool = True) -> dict[str, Any]:
        obj = await self.api.apply(kind, namespace, body, force=force)
        self._remember(kind, obj)
        return obj

    async def delete(self, kind: str, namespace: str, name: str, uid: str | None = None) -> bool:
        gone = await self.api.delete(kind, namespace, name, uid=uid)
        if kind in self.indexes:
            found = self._from_index(kind, ("name", namespace, name))
            cached_uid = uid or (found[0]["metadata"].get("uid", "") if found else "")
            self._written[(kind, namespace, name)] = (time.monotonic(), None, cached_uid)
        return gone

    async def patch_status(self, namespace: str, name: str, status_patch: dict[str, Any]) -> dict[str, Any] | None:
        return self._remember("AutoGLMDeployment", await self.api.patch_status(namespace, name, status_patch))

    async def post_event(self, obj: dict[str, Any], type_: str, reason: str, message: str) -> None:
        await self.api.post_event(obj, type_, reason, message)


async def audit_forever(
    cache: CachedKube,
    known: Callable[[], Iterable[tuple[str, str]]],
    trigger: Callable[[str, str], None],
    period: float,
) -> None:
    """Every ``period`` seconds: ``cache.audit()`` over the namespaces of the known resources, then a
    reconcile of each resource that had a stale object (the resource itself, or its child)."""
    while True:
        await asyncio.sleep(period)
        try:
            stale = await cache.audit({ns for ns, _ in known()})
        except ApiError as exc:
            log.warning("Failed to audit the cache: %s", exc)
            continue
        for kind, ns, name, obj in stale:
            owner = (
                name if kind == "AutoGLMDeployment" else (obj["metadata"].get("labels") or {}).get(b.LABEL_DEPLOYMENT)
            )
            if owner:
                trigger(ns, owner)
