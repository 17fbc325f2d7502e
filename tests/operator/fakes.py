"""An in-memory stand-in for autoglm_operator.kube.Kube (same async methods), for unit tests.

It stores plain dicts, assigns uid/resourceVersion/generation like the apiserver, filters lists
by label selector, and counts writes, so reconcile can be driven step by step without a cluster.
``apply`` behaves like server-side apply with one field manager (ours): fields others set are kept,
fields we applied before and stop sending are removed (lists are replaced whole, as atomic lists).
"""

from __future__ import annotations

import collections
import copy
import itertools
import uuid
from typing import Any

from autoglm_operator.kube import ApiError
from autoglm_operator.models import AutoGLMDeploymentStatus

_rv = itertools.count(1)


def _match(labels: dict[str, str], selector: str | dict[str, str] | None) -> bool:
    if isinstance(selector, dict):
        return all(labels.get(k) == v for k, v in selector.items())
    for term in filter(None, (selector or "").split(",")):
        if "=" in term:
            k, v = term.split("=", 1)
            if labels.get(k) != v:
                return False
        elif term not in labels:
            return False
    return True


def merge_patch(target: Any, patch: Any) -> Any:
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            result.pop(k, None)
        else:
            result[k] = merge_patch(result.get(k), v)
    return result


def _prune(obj: Any, before: Any, now: Any) -> Any:
    """``obj`` without the fields in ``before`` (what we applied last time) that ``now`` omits."""
    if not isinstance(obj, dict) or not isinstance(before, dict):
        return obj
    now = now if isinstance(now, dict) else {}
    out = dict(obj)
    for k, v in before.items():
        if k not in now:
            out.pop(k, None)
        elif k in out:
            out[k] = _prune(out[k], v, now[k])
    return out


def _overlay(obj: Any, applied: Any) -> Any:
    if not isinstance(obj, dict) or not isinstance(applied, dict):
        return copy.deepcopy(applied)
    out = dict(obj)
    for k, v in applied.items():
        out[k] = _overlay(out.get(k), v)
    return out


class FakeKube:
    def __init__(self, missing_kinds: set[str] | None = None) -> None:
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.writes: collections.Counter[str] = collections.Counter()
        self.reads: collections.Counter[str] = collections.Counter()
        self.events: list[tuple[str, str, str]] = []
        self.missing_kinds = missing_kinds or set()  # kinds whose CRD is not installed (writes get 404)
        self.applied: dict[tuple[str, str, str], dict[str, Any]] = {}  # what we last applied (our fields)

    # helpers for tests
    def put(self, kind: str, body: dict[str, Any]) -> dict[str, Any]:
        body = copy.deepcopy(body)
        meta = body.setdefault("metadata", {})
        meta.setdefault("uid", str(uuid.uuid4()))
        meta.setdefault("generation", 1)
        meta.setdefault("creationTimestamp", f"2026-01-01T00:00:{next(_rv) % 60:02d}Z")
        meta["resourceVersion"] = str(next(_rv))
        body.setdefault("kind", kind)
        self.objects[(kind, meta["namespace"], meta["name"])] = body
        return copy.deepcopy(body)

    def obj(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        return self.objects.get((kind, namespace, name))

    def names(self, kind: str, namespace: str) -> list[str]:
        return sorted(n for (k, ns, n) in self.objects if k == kind and ns == namespace)

    def total_writes(self) -> int:
        return sum(self.writes.values())

    def _bump(self, body: dict[str, Any], old: dict[str, Any] | None) -> None:
        meta = body["metadata"]
        if old is not None:
            meta["uid"] = old["metadata"]["uid"]
            meta["creationTimestamp"] = old["metadata"]["creationTimestamp"]
            gen = old["metadata"].get("generation", 1)
            meta["generation"] = gen + 1 if body.get("spec") != old.get("spec") else gen
            if "status" in old and "status" not in body:
                body["status"] = old["status"]
        meta["resourceVersion"] = str(next(_rv))

    # the KubeAPI protocol
    async def get(self, kind, namespace, name, *, fresh=False):
        self.reads[f"GET {kind}"] += 1
        o = self.objects.get((kind, namespace, name))
        return copy.deepcopy(o) if o is not None else None

    async def list(self, kind, namespace, label_selector=None):
        self.reads[f"LIST {kind}"] += 1
        return [copy.deepcopy(o) for (k, ns, _), o in sorted(self.objects.items())
                if k == kind and (namespace is None or ns == namespace)
                and _match(o["metadata"].get("labels") or {}, label_selector)]

    async def create(self, kind, namespace, body):
        self.writes[f"POST {kind}"] += 1
        if (kind, namespace, body["metadata"]["name"]) in self.objects:
            return None
        body = copy.deepcopy(body)
        body["metadata"]["namespace"] = namespace
        return self.put(kind, body)

    async def replace(self, kind, namespace, name, body):
        self.writes[f"PUT {kind}"] += 1
        old = self.objects.get((kind, namespace, name))
        if old is None:
            raise ApiError(404, "NotFound")
        if body["metadata"].get("resourceVersion") != old["metadata"]["resourceVersion"]:
            raise ApiError(409, "Conflict")
        body = copy.deepcopy(body)
        self._bump(body, old)
        self.objects[(kind, namespace, name)] = body
        return copy.deepcopy(body)

    async def patch(self, kind, namespace, name, patch):
        self.writes[f"PATCH {kind}"] += 1
        old = self.objects.get((kind, namespace, name))
        if old is None:
            return None
        body = merge_patch(old, patch)
        self._bump(body, old)
        self.objects[(kind, namespace, name)] = body
        return copy.deepcopy(body)

    async def apply(self, kind, namespace, body, *, force=True):
        self.writes[f"APPLY {kind}"] += 1
        if kind in self.missing_kinds:
            raise ApiError(404, "Not Found", "the server could not find the requested resource")
        key = (kind, namespace, body["metadata"]["name"])
        old = self.objects.get(key)
        body = copy.deepcopy(body)
        before = self.applied.get(key, {})
        self.applied[key] = copy.deepcopy(body)
        if old is None:
            body["metadata"]["namespace"] = namespace
            return self.put(kind, body)
        merged = _overlay(_prune(copy.deepcopy(old), before, body), body)
        self._bump(merged, old)
        self.objects[key] = merged
        return copy.deepcopy(merged)

    async def delete(self, kind, namespace, name, uid=None):
        self.writes[f"DELETE {kind}"] += 1
        o = self.objects.get((kind, namespace, name))
        if o is None or (uid and o["metadata"]["uid"] != uid):
            return False
        del self.objects[(kind, namespace, name)]
        self.applied.pop((kind, namespace, name), None)
        return True

    async def patch_status(self, namespace, name, status_patch):
        self.writes["PATCH AutoGLMDeployment/status"] += 1
        o = self.objects.get(("AutoGLMDeployment", namespace, name))
        if o is None:
            return None
        o["status"] = merge_patch(o.get("status") or {}, status_patch)
        # The apiserver would prune a key its status schema lacks: every status written must fit it.
        AutoGLMDeploymentStatus.model_validate(o["status"])
        o["metadata"]["resourceVersion"] = str(next(_rv))
        return copy.deepcopy(o)

    async def post_event(self, obj, type_, reason, message):
        self.writes["POST Event"] += 1
        self.events.append((type_, reason, message))

    # what the deployment controller and kubelet would do
    def settle(self, namespace: str, name: str, ready: int | None = None) -> None:
        d = self.objects[("Deployment", namespace, name)]
        want = d["spec"].get("replicas", 1)
        n = want if ready is None else ready
        d["status"] = {"observedGeneration": d["metadata"]["generation"], "replicas": want,
                       "updatedReplicas": want, "readyReplicas": n, "availableReplicas": n}
        d["metadata"]["resourceVersion"] = str(next(_rv))
