"""CachedKube: reads from (kopf-like) indexes, writes to the API, its own writes seen at once."""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from typing import Any

from autoglm_operator import builders as b
from autoglm_operator.cache import CACHED, CachedKube, index_keys
from autoglm_operator.reconcile import reconcile
from autoglm_operator.settings import OperatorSettings
from tests.operator.fakes import FakeKube

NS = "demo"
SPEC = {"model": {"name": "tiny", "uri": "file:///models/tiny"}, "runtime": {"version": "0.1.0"},
        "resources": {"gpus": 1, "gpuProduct": "NVIDIA-A10G"}, "replicas": 2}


class LiveIndex(Mapping):
    """What kopf's index of one kind holds, computed from the fake's objects (with our labels for
    children, as the server-side label selector would give): key → the objects under it."""

    def __init__(self, kube: FakeKube, kind: str) -> None:
        self.kube, self.kind = kube, kind
        self.frozen: dict | None = None

    def _all(self) -> dict[Any, list[dict]]:
        out: dict[Any, list[dict]] = {}
        objects = self.frozen if self.frozen is not None else self.kube.objects
        for (kind, ns, name), obj in objects.items():
            labels = obj["metadata"].get("labels") or {}
            if kind != self.kind or (kind != "AutoGLMDeployment" and labels.get(b.LABEL_MANAGED_BY) != b.MANAGER):
                continue
            for key in index_keys(ns, name, labels):
                out.setdefault(key, []).append(obj)
        return out

    def __getitem__(self, key: Any) -> list[dict]:
        return self._all()[key]

    def __iter__(self) -> Iterator[Any]:
        return iter(self._all())

    def __len__(self) -> int:
        return len(self._all())


def cached(kube: FakeKube) -> tuple[CachedKube, dict[str, LiveIndex]]:
    indexes = {kind: LiveIndex(kube, kind) for kind in CACHED}
    return CachedKube(kube, indexes), indexes


def make(kube: FakeKube) -> None:
    kube.put("AutoGLMDeployment", {"apiVersion": "autoglm.io/v1alpha1", "kind": "AutoGLMDeployment",
                                   "metadata": {"name": "chat", "namespace": NS}, "spec": copy.deepcopy(SPEC)})


async def test_reconcile_in_sync_reads_nothing_from_the_api() -> None:
    kube = FakeKube()
    make(kube)
    ck, _ = cached(kube)
    await reconcile(ck, OperatorSettings(), NS, "chat")
    [dep] = kube.names("Deployment", NS)
    kube.settle(NS, dep)
    await reconcile(ck, OperatorSettings(), NS, "chat")
    assert kube.obj("AutoGLMDeployment", NS, "chat")["status"]["phase"] == "Healthy"
    kube.reads.clear()
    writes = kube.total_writes()
    out = await reconcile(ck, OperatorSettings(), NS, "chat")
    assert out.writes == 0 and kube.total_writes() == writes
    assert sum(kube.reads.values()) == 0, kube.reads  # the resync's pass: no GET, no LIST
    assert ck.hits["AutoGLMDeployment"] >= 1 and ck.hits["Deployment"] >= 1


async def test_get_list_and_what_falls_back_to_the_api() -> None:
    kube = FakeKube()
    make(kube)
    ck, _ = cached(kube)
    await reconcile(ck, OperatorSettings(), NS, "chat")
    kube.reads.clear()
    assert (await ck.get("Service", NS, "chat"))["metadata"]["name"] == "chat"
    assert await ck.get("Service", NS, "nope") is None
    sel = {b.LABEL_DEPLOYMENT: "chat", b.LABEL_MANAGED_BY: b.MANAGER}
    assert [d["metadata"]["name"] for d in await ck.list("Deployment", NS, sel)] == kube.names("Deployment", NS)
    assert await ck.list("Deployment", NS, {**sel, b.LABEL_DEPLOYMENT: "other"}) == []
    assert await ck.list("Deployment", NS, {**sel, b.LABEL_MANAGED_BY: "someone-else"}) == []
    assert sum(kube.reads.values()) == 0
    # Not cached: Secrets; asked fresh; a selector the index cannot serve (no owner; a string).
    await ck.get("Secret", NS, "key")
    await ck.get("Service", NS, "chat", fresh=True)
    await ck.list("Deployment", NS, {b.LABEL_MANAGED_BY: b.MANAGER})
    await ck.list("Deployment", NS, f"{b.LABEL_DEPLOYMENT}=chat")
    assert kube.reads == {"GET Secret": 1, "GET Service": 1, "LIST Deployment": 2}


async def test_own_writes_are_seen_before_the_watch_delivers_them() -> None:
    kube = FakeKube()
    make(kube)
    ck, indexes = cached(kube)
    for index in indexes.values():
        index.frozen = copy.deepcopy(kube.objects)  # the watch is late: nothing after this arrives
    await ck.patch_status(NS, "chat", {"phase": "Pending"})
    assert (await ck.get("AutoGLMDeployment", NS, "chat"))["status"]["phase"] == "Pending"
    svc = {"apiVersion": "v1", "kind": "Service",
           "metadata": {"name": "chat", "namespace": NS, "labels": {b.LABEL_DEPLOYMENT: "chat",
                                                                   b.LABEL_MANAGED_BY: b.MANAGER}},
           "spec": {"ports": [{"port": 80}]}}
    await ck.apply("Service", NS, svc)
    assert (await ck.get("Service", NS, "chat"))["spec"]["ports"] == [{"port": 80}]
    # The index catches up with a newer version (someone else's write): the index wins again.
    kube.obj("Service", NS, "chat")["spec"]["ports"] = [{"port": 81}]
    kube.obj("Service", NS, "chat")["metadata"]["resourceVersion"] = "999999999"
    indexes["Service"].frozen = None
    assert (await ck.get("Service", NS, "chat"))["spec"]["ports"] == [{"port": 81}]
    # Deleted by us: hidden while the index still shows it.
    indexes["Service"].frozen = copy.deepcopy(kube.objects)
    await ck.delete("Service", NS, "chat")
    assert await ck.get("Service", NS, "chat") is None


async def test_referenced_secrets_are_read_only_while_they_gate_something() -> None:
    """Before the revision exists (the Secret gates its creation) and while the status shows it
    missing; a running resource's resync reads nothing, Secrets included."""
    kube = FakeKube()
    kube.put("AutoGLMDeployment", {"apiVersion": "autoglm.io/v1alpha1", "kind": "AutoGLMDeployment",
                                   "metadata": {"name": "chat", "namespace": NS},
                                   "spec": {**copy.deepcopy(SPEC), "auth": {"apiKeySecretRef": {"name": "key"}}}})
    ck, _ = cached(kube)
    await reconcile(ck, OperatorSettings(), NS, "chat")
    assert kube.reads["GET Secret"] >= 1 and kube.names("Deployment", NS) == []  # missing: it gates
    kube.reads.clear()
    await reconcile(ck, OperatorSettings(), NS, "chat")
    assert kube.reads["GET Secret"] == 1  # still shown missing: read again
    kube.put("Secret", {"metadata": {"name": "key", "namespace": NS}, "data": {"token": "eA=="}})
    await reconcile(ck, OperatorSettings(), NS, "chat")
    [dep] = kube.names("Deployment", NS)
    kube.settle(NS, dep)
    await reconcile(ck, OperatorSettings(), NS, "chat")
    assert kube.obj("AutoGLMDeployment", NS, "chat")["status"]["phase"] == "Healthy"
    kube.reads.clear()
    await reconcile(ck, OperatorSettings(), NS, "chat")
    assert sum(kube.reads.values()) == 0, kube.reads


def test_slim_keeps_what_reconcile_reads() -> None:
    from autoglm_operator.cache import slim

    mf = [{"manager": "x", "fieldsV1": {}}]
    pod = {"kind": "Pod", "metadata": {"name": "p", "labels": {"a": "b"}, "managedFields": mf},
           "spec": {"containers": []}, "status": {"phase": "Running"}}
    assert slim("Pod", pod) == {"kind": "Pod", "metadata": {"name": "p", "labels": {"a": "b"}},
                                "status": {"phase": "Running"}}
    dep = {"metadata": {"name": "d", "managedFields": mf}, "spec": {"replicas": 1}}
    assert slim("Deployment", dep) == dep  # managedFields say who owns spec.replicas
    assert "managedFields" not in slim("Service", dep)["metadata"] and pod["metadata"]["managedFields"] == mf


async def test_audit_hides_what_was_deleted_while_a_watch_was_down() -> None:
    """kopf relists after a 410 without dropping what was deleted meanwhile: the audit finds it."""
    kube = FakeKube()
    make(kube)
    ck, indexes = cached(kube)
    await reconcile(ck, OperatorSettings(), NS, "chat")
    [dep] = kube.names("Deployment", NS)
    assert await ck.audit([NS]) == []  # all in sync: nothing stale
    for index in indexes.values():
        index.frozen = copy.deepcopy(kube.objects)  # the watch is down from here
    del kube.objects[("Deployment", NS, dep)]  # deleted meanwhile; no event will say so
    stale = await ck.audit([NS])
    assert [(k, n) for k, _, n, _ in stale] == [("Deployment", dep)]
    assert await ck.get("Deployment", NS, dep) is None
    assert await ck.list("Deployment", NS, {b.LABEL_DEPLOYMENT: "chat", b.LABEL_MANAGED_BY: b.MANAGER}) == []
    # The next reconcile puts the revision back.
    await reconcile(ck, OperatorSettings(), NS, "chat")
    assert kube.names("Deployment", NS) == [dep]
