"""reconcile() against an in-memory API: what it writes, and that a second pass writes nothing."""

from __future__ import annotations

import asyncio
import copy

from autoglm_operator import builders as b
from autoglm_operator.reconcile import reconcile
from autoglm_operator.settings import OperatorSettings
from autoglm_operator.workqueue import Reconciler
from tests.operator.fakes import FakeKube

NS = "demo"
SETTINGS = OperatorSettings()
# steps: [] = blue/green (the new revision takes over once Ready at full count); canaries: test_policy.py
# and test_canary_walks_the_steps_then_promotes below.
SPEC = {"model": {"name": "tiny", "uri": "file:///models/tiny"}, "runtime": {"version": "0.1.0"},
        "resources": {"gpus": 1, "gpuProduct": "NVIDIA-A10G"}, "replicas": 1, "rollout": {"steps": []}}


def make(kube: FakeKube, spec: dict, name: str = "chat") -> None:
    kube.put("AutoGLMDeployment", {"apiVersion": "autoglm.io/v1alpha1", "kind": "AutoGLMDeployment",
                                   "metadata": {"name": name, "namespace": NS}, "spec": copy.deepcopy(spec)})


def edit(kube: FakeKube, fn, name: str = "chat") -> None:
    cr = kube.obj("AutoGLMDeployment", NS, name)
    fn(cr["spec"])
    cr["metadata"]["generation"] += 1


def cr(kube: FakeKube, name: str = "chat") -> dict:
    return kube.obj("AutoGLMDeployment", NS, name)


def deployments(kube: FakeKube) -> list[str]:
    return kube.names("Deployment", NS)


async def run(kube: FakeKube, name: str = "chat"):
    return await reconcile(kube, SETTINGS, NS, name)


async def assert_idle(kube: FakeKube) -> None:
    before = kube.total_writes()
    out = await run(kube)
    assert out.writes == 0 and kube.total_writes() == before, kube.writes


async def test_first_rollout_then_ready_then_idle() -> None:
    kube = FakeKube()
    make(kube, SPEC)
    await run(kube)
    [dep] = deployments(kube)
    assert dep.startswith("chat-")
    assert kube.names("Service", NS) == ["chat"]
    assert kube.names("HorizontalPodAutoscaler", NS) == [] and kube.names("PodDisruptionBudget", NS) == []
    st = cr(kube)["status"]
    assert st["phase"] == "Pending" and st["stableRevision"] == dep and st["ready"] == "0/1"
    assert [e[1] for e in kube.events] == ["RevisionCreated"]
    await assert_idle(kube)

    kube.settle(NS, dep)
    await run(kube)
    st = cr(kube)["status"]
    assert st["phase"] == "Healthy" and st["ready"] == "1/1" and st["readyReplicas"] == 1
    assert [e[1] for e in kube.events] == ["RevisionCreated", "Ready"]
    await assert_idle(kube)


async def test_new_version_switches_only_when_ready() -> None:
    kube = FakeKube()
    make(kube, SPEC)
    await run(kube)
    [old] = deployments(kube)
    kube.settle(NS, old)
    await run(kube)

    edit(kube, lambda s: s["runtime"].update(version="0.2.0"))
    await run(kube)
    assert len(deployments(kube)) == 2
    [new] = [d for d in deployments(kube) if d != old]
    svc = kube.obj("Service", NS, "chat")
    assert svc["spec"]["selector"][b.LABEL_REVISION] == old.rsplit("-", 1)[1]
    st = cr(kube)["status"]
    assert st["phase"] == "Progressing" and st["canaryRevision"] == new and st["stableVersion"] == "0.1.0"
    assert st["canaryVersion"] == "0.2.0"
    await assert_idle(kube)

    kube.settle(NS, new, ready=0)  # pods exist, none ready: status counts them, nothing switches
    await run(kube)
    assert kube.obj("Service", NS, "chat")["spec"]["selector"][b.LABEL_REVISION] == old.rsplit("-", 1)[1]
    await assert_idle(kube)
    kube.settle(NS, new)
    await run(kube)
    assert deployments(kube) == [new]
    assert kube.obj("Service", NS, "chat")["spec"]["selector"][b.LABEL_REVISION] == new.rsplit("-", 1)[1]
    st = cr(kube)["status"]
    progressing = next(c for c in st["conditions"] if c["type"] == "Progressing")
    assert st["phase"] == "Progressing" and progressing["reason"] == "Promoted"  # until the old pods are gone
    await run(kube)  # the next pass sees no old pod left
    st = cr(kube)["status"]
    assert st["phase"] == "Healthy" and st["stableRevision"] == new and st["stableVersion"] == "0.2.0"
    assert st["rolloutPhase"] == "Promoted" and st["previousStableVersion"] == "0.1.0"
    assert "canaryRevision" not in st
    assert {"CanaryStarted", "Promoted", "RevisionDeleted"} <= {e[1] for e in kube.events}
    await assert_idle(kube)


async def test_autoscaling_edits_patch_the_hpa_in_place_and_never_fight_it() -> None:
    spec = {**SPEC, "autoscaling": {"enabled": True, "minReplicas": 2, "maxReplicas": 4}}
    spec.pop("replicas")
    kube = FakeKube()
    make(kube, spec)
    await run(kube)
    [dep] = deployments(kube)
    assert kube.obj("Deployment", NS, dep)["spec"]["replicas"] == 2
    hpa = kube.obj("HorizontalPodAutoscaler", NS, "chat")
    assert hpa["spec"]["scaleTargetRef"]["name"] == dep and hpa["spec"]["maxReplicas"] == 4
    assert kube.names("PodDisruptionBudget", NS) == ["chat"]
    kube.settle(NS, dep)
    await run(kube)

    # The HPA scales the Deployment: the operator follows, never resets it.
    kube.obj("Deployment", NS, dep)["spec"]["replicas"] = 3
    kube.settle(NS, dep)
    await run(kube)
    assert kube.obj("Deployment", NS, dep)["spec"]["replicas"] == 3
    assert cr(kube)["status"]["desiredReplicas"] == 3
    await assert_idle(kube)

    edit(kube, lambda s: s["autoscaling"].update(maxReplicas=8, targetQueueDepth=4))
    await run(kube)
    assert deployments(kube) == [dep]
    hpa = kube.obj("HorizontalPodAutoscaler", NS, "chat")
    assert hpa["spec"]["maxReplicas"] == 8
    assert hpa["spec"]["metrics"][0]["pods"]["target"]["averageValue"] == "4"
    await assert_idle(kube)

    edit(kube, lambda s: (s.pop("autoscaling"), s.update(replicas=1)))
    await run(kube)
    assert kube.names("HorizontalPodAutoscaler", NS) == [] and kube.names("PodDisruptionBudget", NS) == []
    assert kube.obj("Deployment", NS, dep)["spec"]["replicas"] == 1
    assert "ScaledDown" in {e[1] for e in kube.events}


async def test_scale_creates_pdb_and_emits_scaled_up() -> None:
    kube = FakeKube()
    make(kube, SPEC)
    await run(kube)
    [dep] = deployments(kube)
    kube.settle(NS, dep)
    await run(kube)
    edit(kube, lambda s: s.update(replicas=3))
    await run(kube)
    assert kube.obj("Deployment", NS, dep)["spec"]["replicas"] == 3
    assert kube.names("PodDisruptionBudget", NS) == ["chat"]
    assert "ScaledUp" in {e[1] for e in kube.events}
    assert cr(kube)["status"]["phase"] == "Progressing"


async def test_missing_secret_blocks_and_recovers() -> None:
    kube = FakeKube()
    make(kube, {**SPEC, "auth": {"apiKeySecretRef": {"name": "key", "key": "token"}}})
    out = await run(kube)
    assert out.waiting_for == [("Secret", "key", "")]  # not watched: the shared poll looks at it
    assert deployments(kube) == []
    st = cr(kube)["status"]
    deg = next(c for c in st["conditions"] if c["type"] == "Degraded")
    assert st["phase"] == "Degraded" and deg["reason"] == "SecretNotFound" and "key" in deg["message"]
    await assert_idle(kube)

    kube.put("Secret", {"metadata": {"name": "key", "namespace": NS}, "data": {"other": "eA=="}})
    await run(kube)
    assert "has no key token" in next(c for c in cr(kube)["status"]["conditions"] if c["type"] == "Degraded")["message"]

    kube.put("Secret", {"metadata": {"name": "key", "namespace": NS}, "data": {"token": "eA=="}})
    await run(kube)
    [dep] = deployments(kube)
    kube.settle(NS, dep)
    await run(kube)
    assert cr(kube)["status"]["phase"] == "Healthy"
    assert "Recovered" in {e[1] for e in kube.events}


async def test_missing_pvc_is_degraded() -> None:
    kube = FakeKube()
    make(kube, {**SPEC, "model": {"uri": "pvc://store/glm"}})
    await run(kube)
    deg = next(c for c in cr(kube)["status"]["conditions"] if c["type"] == "Degraded")
    assert deg["reason"] == "PersistentVolumeClaimNotFound" and "store" in deg["message"]
    kube.put("PersistentVolumeClaim", {"metadata": {"name": "store", "namespace": NS}})
    await run(kube)
    assert len(deployments(kube)) == 1


async def test_unschedulable_pods_degrade_and_a_fixed_spec_recovers() -> None:
    kube = FakeKube()
    make(kube, {**SPEC, "resources": {"gpus": 1, "gpuProduct": "NVIDIA-B200"}})
    await run(kube)
    [bad] = deployments(kube)
    rev = bad.rsplit("-", 1)[1]
    kube.put("Pod", {"metadata": {"name": f"{bad}-abc", "namespace": NS, "labels": {
        b.LABEL_DEPLOYMENT: "chat", b.LABEL_MANAGED_BY: b.MANAGER, b.LABEL_REVISION: rev}},
        "status": {"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False",
                                                       "reason": "Unschedulable", "message": "0/3 nodes are available"}]}})
    await run(kube)
    st = cr(kube)["status"]
    assert st["phase"] == "Degraded"
    assert next(c for c in st["conditions"] if c["type"] == "Degraded")["reason"] == "Unschedulable"
    assert ("Warning", "Degraded") in {(e[0], e[1]) for e in kube.events}
    await assert_idle(kube)

    edit(kube, lambda s: s["resources"].update(gpuProduct="NVIDIA-A10G"))
    await run(kube)
    [good] = [d for d in deployments(kube) if d != bad]
    kube.settle(NS, good)
    await run(kube)
    del kube.objects[("Pod", NS, f"{bad}-abc")]  # GC'd with its ReplicaSet
    await run(kube)
    st = cr(kube)["status"]
    assert deployments(kube) == [good] and st["phase"] == "Healthy" and st["stableRevision"] == good


async def test_invalid_spec_is_degraded_without_touching_children() -> None:
    kube = FakeKube()
    make(kube, {"model": {"uri": "s3://nope"}})
    await run(kube)
    assert deployments(kube) == []
    st = cr(kube)["status"]
    assert st["phase"] == "Degraded"
    assert next(c for c in st["conditions"] if c["type"] == "Degraded")["reason"] == "InvalidSpec"
    await assert_idle(kube)


async def test_deleted_service_is_recreated_and_gone_cr_is_a_noop() -> None:
    kube = FakeKube()
    make(kube, SPEC)
    await run(kube)
    del kube.objects[("Service", NS, "chat")]
    await run(kube)
    assert kube.names("Service", NS) == ["chat"]
    out = await run(kube, "missing")
    assert out.gone and out.writes == 0


async def test_reconciler_coalesces_triggers() -> None:
    kube = FakeKube()
    make(kube, SPEC)
    rec = Reconciler(kube, SETTINGS)
    rec.observe_event(NS, "chat")
    for _ in range(20):
        rec.trigger(NS, "chat")
    await __import__("asyncio").gather(*list(rec._tasks))
    assert rec.runs <= 2
    assert len(deployments(kube)) == 1
    await rec.close()


KEDA_SPEC = {**{k: v for k, v in SPEC.items() if k != "replicas"},
             "autoscaling": {"enabled": True, "provider": "KEDA", "minReplicas": 1, "maxReplicas": 3,
                             "prometheus": {"address": "http://prom:9090"}}}


async def test_keda_scaled_object_follows_the_serving_revision_and_carries_replicas_over() -> None:
    kube = FakeKube()
    make(kube, KEDA_SPEC)
    await run(kube)
    [dep] = deployments(kube)
    so = kube.obj("ScaledObject", NS, "chat")
    assert so["spec"]["scaleTargetRef"]["name"] == dep and so["spec"]["maxReplicaCount"] == 3
    assert 'revision="' + dep.rsplit("-", 1)[1] + '"' in so["spec"]["triggers"][0]["metadata"]["query"]
    assert kube.names("HorizontalPodAutoscaler", NS) == []  # KEDA makes the HPA, not us
    kube.settle(NS, dep)
    await run(kube)
    # KEDA's HPA scaled the Deployment to 3: the operator leaves replicas alone...
    kube.obj("Deployment", NS, dep)["spec"]["replicas"] = 3
    kube.settle(NS, dep)
    await run(kube)
    assert kube.obj("Deployment", NS, dep)["spec"]["replicas"] == 3
    await assert_idle(kube)
    # ...and a new version comes up at 3, not at minReplicas; the ScaledObject moves when it serves.
    edit(kube, lambda s: s["runtime"].update(version="0.2.0"))
    await run(kube)
    new = next(d for d in deployments(kube) if d != dep)
    assert kube.obj("Deployment", NS, new)["spec"]["replicas"] == 3
    assert kube.obj("ScaledObject", NS, "chat")["spec"]["scaleTargetRef"]["name"] == dep
    kube.settle(NS, new)
    await run(kube)
    assert kube.obj("ScaledObject", NS, "chat")["spec"]["scaleTargetRef"]["name"] == new
    assert deployments(kube) == [new]


async def test_keda_provider_without_keda_installed_is_degraded_and_serves() -> None:
    kube = FakeKube(missing_kinds={"ScaledObject"})
    make(kube, KEDA_SPEC)
    await run(kube)
    [dep] = deployments(kube)
    kube.settle(NS, dep)
    await run(kube)
    st = cr(kube)["status"]
    deg = next(c for c in st["conditions"] if c["type"] == "Degraded")
    assert deg["status"] == "True" and deg["reason"] == "KEDANotInstalled", deg
    assert "scaledobjects.keda.sh" in deg["message"]
    assert kube.obj("Service", NS, "chat") is not None  # nothing else breaks


async def test_keda_provider_without_prometheus_is_degraded() -> None:
    spec = copy.deepcopy(KEDA_SPEC)
    spec["autoscaling"].pop("prometheus")
    kube = FakeKube()
    make(kube, spec)
    await run(kube)
    deg = next(c for c in cr(kube)["status"]["conditions"] if c["type"] == "Degraded")
    assert deg["reason"] == "PrometheusAddressMissing", deg
    assert kube.names("ScaledObject", NS) == []


async def test_canary_walks_the_steps_then_promotes() -> None:
    """Steps without pause or analysis: each advances once the canary is Ready at its weight."""
    kube = FakeKube()
    make(kube, {**SPEC, "replicas": 4, "rollout": {"steps": [{"weight": 25}, {"weight": 50}]}})
    await run(kube)
    [old] = deployments(kube)
    kube.settle(NS, old)
    await run(kube)
    edit(kube, lambda s: s["runtime"].update(version="0.2.0"))
    await run(kube)
    [new] = [d for d in deployments(kube) if d != old]
    st = cr(kube)["status"]
    assert (st["rolloutPhase"], st["currentStep"], st["canaryWeight"]) == ("Progressing", 0, 0)
    assert kube.obj("Deployment", NS, new)["spec"]["replicas"] == 1
    assert b.LABEL_REVISION in kube.obj("Service", NS, "chat")["spec"]["selector"]  # no Ready canary pod yet
    await assert_idle(kube)

    weights = []
    for want_replicas in (2, 4):
        kube.settle(NS, new)
        await run(kube)
        st = cr(kube)["status"]
        weights.append(st["canaryWeight"])
        assert kube.obj("Deployment", NS, new)["spec"]["replicas"] == want_replicas
        assert kube.obj("Service", NS, "chat")["spec"]["selector"] == {b.LABEL_DEPLOYMENT: "chat"}  # both
        assert kube.obj("Deployment", NS, old)["spec"]["replicas"] == 4  # stable untouched
    assert weights == [20, 33]  # 1/(4+1), 2/(4+2): Ready pod shares
    assert st["rolloutPhase"] == "Promoting" and st["currentStep"] == 2
    kube.settle(NS, new)
    await run(kube)
    st = cr(kube)["status"]
    assert deployments(kube) == [new] and st["stableRevision"] == new and "canaryRevision" not in st
    assert st["previousStableRevision"] == old and st["previousStableVersion"] == "0.1.0"
    reasons = [e[1] for e in kube.events]
    assert reasons.count("StepAdvanced") == 1 and "Promoting" in reasons and "Promoted" in reasons


async def test_promote_annotation_is_acted_on_then_removed() -> None:
    kube = FakeKube()
    make(kube, {**SPEC, "rollout": {"steps": [{"weight": 10, "pause": "1h"}]}})
    await run(kube)
    [old] = deployments(kube)
    kube.settle(NS, old)
    await run(kube)
    edit(kube, lambda s: s["runtime"].update(version="0.2.0"))
    await run(kube)
    [new] = [d for d in deployments(kube) if d != old]
    kube.settle(NS, new)
    out = await run(kube)
    assert cr(kube)["status"]["currentStep"] == 0 and out.requeue_after and out.requeue_after > 3000  # the 1 h pause
    await asyncio.sleep(1.1)
    await assert_idle(kube)  # holding a step writes nothing (no countdown in the status)
    cr(kube)["metadata"]["annotations"] = {"autoglm.io/promote": "true", "team": "x"}
    await run(kube)
    assert cr(kube)["metadata"]["annotations"] == {"team": "x"}
    assert cr(kube)["status"]["rolloutPhase"] == "Promoting"
    await run(kube)  # canary already Ready at the stable's count (1): promoted
    assert cr(kube)["status"]["stableRevision"] == new and deployments(kube) == [new]


async def test_gateway_api_routing_children_follow_the_canary_and_go_when_switched_off() -> None:
    kube = FakeKube()
    gw = {"trafficRouting": "GatewayAPI", "gateway": {"name": "gw"}, "steps": [{"weight": 30, "pause": "1h"}]}
    make(kube, {**SPEC, "replicas": 2, "rollout": gw})
    await run(kube)
    [old] = deployments(kube)
    kube.settle(NS, old)
    await run(kube)
    assert kube.names("Service", NS) == ["chat", "chat-canary", "chat-stable"]
    route = kube.obj("HTTPRoute", NS, "chat")
    assert route["spec"]["rules"][1]["backendRefs"][1]["weight"] == 0
    await assert_idle(kube)

    edit(kube, lambda s: s["runtime"].update(version="0.2.0"))
    await run(kube)
    [new] = [d for d in deployments(kube) if d != old]
    kube.settle(NS, new)
    await run(kube)
    rules = kube.obj("HTTPRoute", NS, "chat")["spec"]["rules"]
    assert [(ref["name"], ref["weight"]) for ref in rules[1]["backendRefs"]] == [("chat-stable", 70), ("chat-canary", 30)]
    assert kube.obj("Service", NS, "chat-canary")["spec"]["selector"][b.LABEL_REVISION] == new.rsplit("-", 1)[1]
    assert kube.obj("Service", NS, "chat")["spec"]["selector"][b.LABEL_REVISION] == old.rsplit("-", 1)[1]
    assert cr(kube)["status"]["canaryWeight"] == 30

    edit(kube, lambda s: s["rollout"].update(trafficRouting="Replicas"))
    await run(kube)
    assert kube.names("Service", NS) == ["chat"] and kube.names("HTTPRoute", NS) == []
    assert cr(kube)["status"]["canaryWeight"] == 33  # now the Ready pod share: 1 canary pod beside 2


# ------------------------------------------------------------------ writes that never hurt what is not ours


async def test_a_users_objects_with_our_names_are_never_adopted() -> None:
    """A user's Service/HPA/PDB named like the resource: left alone, and the status says why."""
    kube = FakeKube()
    spec = {**{k: v for k, v in SPEC.items() if k != "replicas"},
            "autoscaling": {"enabled": True, "minReplicas": 2, "maxReplicas": 3}}
    make(kube, spec)
    theirs = {"Service": {"spec": {"ports": [{"port": 80}], "selector": {"app": "theirs"}}},
              "HorizontalPodAutoscaler": {"spec": {"maxReplicas": 9}},
              "PodDisruptionBudget": {"spec": {"minAvailable": 1}}}
    for kind, body in theirs.items():
        kube.put(kind, {"metadata": {"name": "chat", "namespace": NS, "labels": {"team": "web"}}, **body})
    before = {kind: copy.deepcopy(kube.obj(kind, NS, "chat")) for kind in theirs}
    await run(kube)
    [dep] = deployments(kube)
    kube.settle(NS, dep)
    await run(kube)
    for kind in theirs:
        assert kube.obj(kind, NS, "chat") == before[kind], f"the user's {kind} was written"
        assert f"APPLY {kind}" not in kube.writes
    st = cr(kube)["status"]
    deg = next(c for c in st["conditions"] if c["type"] == "Degraded")
    assert st["phase"] == "Degraded" and deg["reason"] == "ChildConflict", deg
    assert "Service chat" in deg["message"] and "not controlled" in deg["message"]
    assert ("Warning", "Degraded") in {e[:2] for e in kube.events}
    await assert_idle(kube)

    # Once the user's objects are gone, ours are created and the resource recovers.
    for kind in theirs:
        del kube.objects[(kind, NS, "chat")]
    await run(kube)
    for kind in theirs:
        owner = kube.obj(kind, NS, "chat")["metadata"]["ownerReferences"][0]
        assert owner["uid"] == cr(kube)["metadata"]["uid"] and owner["controller"]


async def test_a_users_deployment_with_the_revision_name_is_never_adopted() -> None:
    kube = FakeKube()
    make(kube, SPEC)
    from autoglm_operator.models import resolve_spec
    r = resolve_spec("chat", NS, SPEC, default_image="ghcr.io/autoglm/runtime", default_version="0.1.0")
    name = b.revision_name("chat", b.revision_hash(r))
    kube.put("Deployment", {"metadata": {"name": name, "namespace": NS}, "spec": {"replicas": 5}})
    await run(kube)
    assert kube.obj("Deployment", NS, name)["spec"] == {"replicas": 5}
    deg = next(c for c in cr(kube)["status"]["conditions"] if c["type"] == "Degraded")
    assert deg["reason"] == "ChildConflict" and f"Deployment {name}" in deg["message"]


async def test_template_update_keeps_what_others_wrote_and_prunes_what_we_dropped() -> None:
    """`kubectl rollout restart`'s annotation (and a label someone added) survive our update."""
    kube = FakeKube()
    make(kube, SPEC)
    await run(kube)
    [dep] = deployments(kube)
    kube.settle(NS, dep)
    await run(kube)
    d = kube.obj("Deployment", NS, dep)
    d["spec"]["template"]["metadata"].setdefault("annotations", {})["kubectl.kubernetes.io/restartedAt"] = "now"
    d["metadata"]["labels"]["team"] = "web"
    edit(kube, lambda s: s.setdefault("rollout", {}).update(progressDeadlineSeconds=123))
    await run(kube)
    d = kube.obj("Deployment", NS, dep)
    assert d["spec"]["progressDeadlineSeconds"] == 123  # updated in place (same revision)
    assert d["spec"]["template"]["metadata"]["annotations"]["kubectl.kubernetes.io/restartedAt"] == "now"
    assert d["metadata"]["labels"]["team"] == "web"
    assert "PUT Deployment" not in kube.writes
    await assert_idle(kube)


async def test_replicas_are_left_out_when_the_autoscaler_owns_them() -> None:
    kube = FakeKube()
    spec = {**{k: v for k, v in SPEC.items() if k != "replicas"},
            "autoscaling": {"enabled": True, "minReplicas": 1, "maxReplicas": 5}}
    make(kube, spec)
    await run(kube)
    [dep] = deployments(kube)
    kube.settle(NS, dep)
    await run(kube)
    # Not scaled by anyone yet: spec.replicas is still ours and we keep sending what is there.
    edit(kube, lambda s: s.setdefault("rollout", {}).update(progressDeadlineSeconds=200))
    await run(kube)
    assert kube.applied[("Deployment", NS, dep)]["spec"]["replicas"] == 1
    # The HPA scaled it (it owns spec.replicas now, managedFields say): we leave replicas out.
    d = kube.obj("Deployment", NS, dep)
    d["spec"]["replicas"] = 4
    d["metadata"]["managedFields"] = [{"manager": "kube-controller-manager", "operation": "Update",
                                       "subresource": "scale", "fieldsV1": {"f:spec": {"f:replicas": {}}}}]
    edit(kube, lambda s: s.setdefault("rollout", {}).update(progressDeadlineSeconds=300))
    await run(kube)
    assert "replicas" not in kube.applied[("Deployment", NS, dep)]["spec"]


# ------------------------------------------------------------------ Secrets/PVCs: one shared poll


async def test_shared_poll_reconciles_only_when_an_awaited_secret_changes() -> None:
    import asyncio

    kube = FakeKube()
    for name in ("a", "b"):
        make(kube, {**SPEC, "auth": {"apiKeySecretRef": {"name": "key", "key": "token"}}}, name=name)
    rec = Reconciler(kube, SETTINGS)
    for name in ("a", "b"):
        rec.observe_event(NS, name)
    await asyncio.gather(*list(rec._tasks))
    assert set(rec.waiting) == {(NS, "a"), (NS, "b")}
    runs = rec.runs
    assert await rec.poll_preconditions() == 0  # nothing changed: no reconcile
    assert rec.runs == runs
    kube.put("Secret", {"metadata": {"name": "key", "namespace": NS}, "data": {"token": "eA=="}})
    assert await rec.poll_preconditions() == 2
    await asyncio.gather(*list(rec._tasks))
    assert rec.waiting == {} and len(kube.names("Deployment", NS)) == 2
    await rec.close()


async def test_a_reconcile_that_lost_a_race_is_retried_from_the_api_not_the_cache() -> None:
    import asyncio

    from autoglm_operator.kube import ApiError

    class Racing(FakeKube):
        """Reads like a cache that has not caught up; its first write loses a race (409)."""

        def __init__(self) -> None:
            super().__init__()
            self.lost = False

        async def apply(self, kind, namespace, body, *, force=True):
            if not self.lost:
                self.lost = True
                raise ApiError(409, "Conflict", "the object has been modified")
            return await super().apply(kind, namespace, body, force=force)

    api = FakeKube()
    cache = Racing()
    cache.objects = api.objects  # same state; only the first one is "the cache"
    make(api, SPEC)
    rec = Reconciler(cache, SETTINGS, api=api)
    rec.observe_event(NS, "chat")
    await asyncio.gather(*list(rec._tasks))
    assert rec._stale == {(NS, "chat")} and deployments(api) == []
    rec._retry((NS, "chat"))  # the backoff timer firing
    await asyncio.gather(*list(rec._tasks))
    assert len(deployments(api)) == 1 and api.writes["APPLY Deployment"] == 1
    assert rec._stale == set()
    await rec.close()
