"""Reads from kopf's watch-fed indexes: ``CachedKube`` is the ``KubeAPI`` reconcile sees.

Every kind reconcile reads on each pass (the AutoGLMDeployments, and the children carrying our
labels: Deployments, Pods, Services, HPAs, PDBs, NetworkPolicies, ScaledObjects) is indexed by
``@kopf.index`` (handlers.py registers one per kind, on the same server-side-label-selected watch
stream as its ``@kopf.on.event``). kopf runs no handler before every index is populated from its
initial listing, and reconcile is only ever triggered by a handler or by the resync of resources a
handler has seen, so reads never see a half-filled cache. A kind whose CRD is missing (ScaledObject
without KEDA) has no watch stream and blocks nothing: its index stays empty, which is the truth.

Writes go to ``Kube``. Their answers are kept for a few seconds and preferred to the index while
they are newer (by resourceVersion), so the re-observe after a write, and the next reconcile, see
what was just written rather than a watch event still on its way (no duplicate status writes or
events). ``get(..., fresh=True)`` and the kinds not cached (Secrets, PVCs, Events) go to the API.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterable, Mapping
from typing import Any

from . import builders as b
from .kube import KubeAPI
from .models import GROUP, PLURAL, VERSION

# kind → (group, version, plural) of what is served from an index.
CACHED: dict[str, tuple[str, str, str]] = {
    "AutoGLMDeployment": (GROUP, VERSION, PLURAL),
    "Deployment": ("apps", "v1", "deployments"),
    "Pod": ("", "v1", "pods"),
    "Service": ("", "v1", "services"),
    "HorizontalPodAutoscaler": ("autoscaling", "v2", "horizontalpodautoscalers"),
    "PodDisruptionBudget": ("policy", "v1", "poddisruptionbudgets"),
    "NetworkPolicy": ("networking.k8s.io", "v1", "networkpolicies"),
    "ScaledObject": ("keda.sh", "v1alpha1", "scaledobjects"),
}
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


def _terms(selector: str) -> list[tuple[str, str | None]]:
    """Equality and existence terms (``k=v``, ``k``): what reconcile uses. Others → ValueError."""
    out: list[tuple[str, str | None]] = []
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if "!" in term or " " in term or "(" in term:
            raise ValueError(term)
        if "==" in term:
            k, v = term.split("==", 1)
        elif "=" in term:
            k, v = term.split("=", 1)
        else:
            k, v = term, None
        out.append((k, v))
    return out


def _matches(obj: Mapping[str, Any], terms: Iterable[tuple[str, str | None]]) -> bool:
    labels = obj["metadata"].get("labels") or {}
    return all(k in labels and (v is None or labels[k] == v) for k, v in terms)


class CachedKube:
    """``KubeAPI`` with reads served from kopf indexes (``indexes``: kind → kopf.Index), writes to ``api``."""

    def __init__(self, api: KubeAPI, indexes: Mapping[str, Mapping[Any, Iterable[Mapping[str, Any]]]]) -> None:
        self.api = api
        self.indexes = dict(indexes)
        self.hits: dict[str, int] = {}
        # (kind, namespace, name) → (monotonic time, object a write returned | None after a delete, uid deleted)
        self._written: dict[tuple[str, str, str], tuple[float, dict[str, Any] | None, str]] = {}

    # ------------------------------------------------------------ reads

    def _from_index(self, kind: str, key: tuple[str, str, str]) -> list[Mapping[str, Any]]:
        store = self.indexes[kind].get(key)
        return list(store) if store is not None else []

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

    async def list(self, kind: str, namespace: str | None, label_selector: str | None = None) -> list[dict[str, Any]]:
        try:
            terms = _terms(label_selector or "")
        except ValueError:
            terms = None
        owner = next((v for k, v in terms or [] if k == b.LABEL_DEPLOYMENT and v), None)
        if kind not in self.indexes or namespace is None or terms is None or owner is None:
            return await self.api.list(kind, namespace, label_selector)
        self.hits[kind] = self.hits.get(kind, 0) + 1
        by_name = {o["metadata"]["name"]: o for o in self._from_index(kind, ("owner", namespace, owner))}
        for k, ns, name in list(self._written):
            if k == kind and ns == namespace and name not in by_name:
                by_name[name] = None  # type: ignore[assignment]  # written by us, not indexed yet
        out = []
        for name in sorted(by_name):
            obj = self._overlay(kind, namespace, name, by_name[name])
            if obj is not None and _matches(obj, terms):
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

    async def create(self, kind: str, namespace: str, body: dict[str, Any]) -> dict[str, Any] | None:
        return self._remember(kind, await self.api.create(kind, namespace, body))

    async def replace(self, kind: str, namespace: str, name: str, body: dict[str, Any]) -> dict[str, Any]:
        obj = await self.api.replace(kind, namespace, name, body)
        self._remember(kind, obj)
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
