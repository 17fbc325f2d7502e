"""reconcile() with spec.router against an in-memory API: the router's children come and go, the
Service turns to the router only once a router pod is Ready, and a second pass writes nothing."""

from __future__ import annotations

from autoglm_operator import router_builders as rb
from tests.operator.test_reconcile import NS, SPEC, assert_idle, cr, deployments, edit, make, run
from tests.operator.fakes import FakeKube

ROUTER_KINDS = ("ServiceAccount", "Role", "RoleBinding", "Deployment", "PodDisruptionBudget")


async def test_router_on_then_off() -> None:
    kube = FakeKube()
    make(kube, {**SPEC, "router": {"enabled": True, "policy": "SessionAffinity"}})
    await run(kube)
    [model] = [d for d in deployments(kube) if d != "chat-router"]
    for kind in ROUTER_KINDS:
        assert "chat-router" in kube.names(kind, NS), kind
    assert "chat-stable" in kube.names("Service", NS)  # the router's endpoints
    # No router pod Ready yet: the Service still selects the model pods.
    assert kube.obj("Service", NS, "chat")["spec"]["selector"] == {"autoglm.io/deployment": "chat",
                                                                   "autoglm.io/revision": model.removeprefix("chat-")}
    kube.settle(NS, model)
    kube.settle(NS, "chat-router")
    await run(kube)
    svc = kube.obj("Service", NS, "chat")
    assert svc["spec"]["selector"] == {rb.LABEL_ROUTER: "chat"} and svc["spec"]["ports"][0]["port"] == 8000
    assert cr(kube)["status"]["router"] == {"name": "chat-router", "policy": "SessionAffinity", "replicas": 2,
                                            "readyReplicas": 2, "serviceOnRouter": True, "readyEndpoints": 1,
                                            "serving": True}
    await assert_idle(kube)

    edit(kube, lambda s: s.update(router={"enabled": False}))
    await run(kube)
    assert kube.obj("Service", NS, "chat")["spec"]["selector"]["autoglm.io/deployment"] == "chat"
    for kind in ROUTER_KINDS:
        assert "chat-router" not in kube.names(kind, NS), kind
    assert "chat-stable" not in kube.names("Service", NS)
    assert "router" not in cr(kube)["status"]
    await assert_idle(kube)


async def test_router_routing_gets_one_service_per_revision_and_a_network_policy() -> None:
    kube = FakeKube()
    spec = {**SPEC, "networkPolicy": {"enabled": True}, "router": {"enabled": True, "replicas": 1},
            "rollout": {"trafficRouting": "Router", "steps": [{"weight": 10}]}}
    make(kube, spec)
    await run(kube)
    assert {"chat-stable", "chat-canary"} <= set(kube.names("Service", NS))
    assert "chat-router" not in kube.names("PodDisruptionBudget", NS)  # one replica: no budget
    assert sorted(kube.names("NetworkPolicy", NS)) == ["chat", "chat-router"]
    model_np = kube.obj("NetworkPolicy", NS, "chat")
    assert model_np["spec"]["ingress"][0]["from"][0] == {"podSelector": {"matchLabels": {rb.LABEL_ROUTER: "chat"}}}
    [model] = [d for d in deployments(kube) if d != "chat-router"]
    kube.settle(NS, model)
    kube.settle(NS, "chat-router")
    await run(kube)
    await assert_idle(kube)


ROUTER_CANARY = {**SPEC, "router": {"enabled": True, "replicas": 1},
                 "rollout": {"trafficRouting": "Router", "steps": [{"weight": 10, "pause": "1h"}]}}


async def test_router_canary_holds_its_step_weight_once_its_pod_is_ready() -> None:
    """What the router reads: status.canaryWeight is the step's weight (not a pod share) once the canary has a
    Ready pod, {name}-canary selects the canary's pods, and the resource's Service stays on the router."""
    kube = FakeKube()
    make(kube, ROUTER_CANARY)
    await run(kube)
    [old] = [d for d in deployments(kube) if d != "chat-router"]
    kube.settle(NS, old)
    kube.settle(NS, "chat-router")
    await run(kube)
    edit(kube, lambda s: s["runtime"].update(maxBatchSize=6))
    await run(kube)
    [new] = [d for d in deployments(kube) if d not in (old, "chat-router")]
    assert cr(kube)["status"]["canaryWeight"] == 0  # no Ready canary pod: the router keeps everyone on stable
    kube.settle(NS, new)
    await run(kube)
    st = cr(kube)["status"]
    assert (st["rolloutPhase"], st["currentStep"], st["canaryWeight"]) == ("Progressing", 0, 10), st
    assert (st["stableRevision"], st["canaryRevision"]) == (old, new)
    selects = {svc: kube.obj("Service", NS, svc)["spec"]["selector"]["autoglm.io/revision"]
               for svc in ("chat-stable", "chat-canary")}
    assert selects == {"chat-stable": old.removeprefix("chat-"), "chat-canary": new.removeprefix("chat-")}
    assert kube.obj("Service", NS, "chat")["spec"]["selector"] == {rb.LABEL_ROUTER: "chat"}
    await assert_idle(kube)


async def test_router_canary_started_before_the_stable_is_ready_skips_the_steps() -> None:
    """The router pod is Ready seconds before a runtime has loaded its model. A spec change in that gap
    finds a stable with no Ready pod (no traffic to protect): the new revision is promoted without its steps
    (policy.py), so status.canaryWeight never shows the first step's weight. The e2e canary test waits for
    the stable's pod (status.router.serving once said true in this gap: it made that test time out at "canary
    Ready at 10 %"; it now waits for a Ready model pod too, test_router_serving_needs_a_ready_model_pod)."""
    kube = FakeKube()
    make(kube, ROUTER_CANARY)
    await run(kube)
    [old] = [d for d in deployments(kube) if d != "chat-router"]
    kube.settle(NS, "chat-router")  # the router Ready, the model pod still loading
    await run(kube)
    st = cr(kube)["status"]
    assert st["router"]["serviceOnRouter"] and not st["router"]["serving"] and st["readyReplicas"] == 0, st
    edit(kube, lambda s: s["runtime"].update(maxBatchSize=6))
    await run(kube)
    assert cr(kube)["status"]["rolloutPhase"] == "Promoting"
    [new] = [d for d in deployments(kube) if d not in (old, "chat-router")]
    kube.settle(NS, new)
    await run(kube)
    st = cr(kube)["status"]
    assert st["stableRevision"] == new and "canaryRevision" not in st and st["canaryWeight"] == 0, st


async def test_router_serving_needs_a_ready_model_pod() -> None:
    """status.router.serving is what a client gets: true only with the Service on a Ready router pod AND a
    Ready model pod behind the router. A router pod turns Ready in seconds, a runtime after loading its model:
    in between the Service already selects the router (which answers 503 no_endpoints), and serving says no."""
    kube = FakeKube()
    make(kube, {**SPEC, "replicas": 2, "router": {"enabled": True}})
    await run(kube)
    [model] = [d for d in deployments(kube) if d != "chat-router"]
    assert cr(kube)["status"]["router"] == {"name": "chat-router", "policy": "LeastLoad", "replicas": 0,
                                            "readyReplicas": 0, "serviceOnRouter": False, "readyEndpoints": 0,
                                            "serving": False}
    kube.settle(NS, "chat-router")  # router Ready, no model pod Ready
    await run(kube)
    router = cr(kube)["status"]["router"]
    assert (router["serviceOnRouter"], router["readyEndpoints"], router["serving"]) == (True, 0, False), router
    assert kube.obj("Service", NS, "chat")["spec"]["selector"] == {rb.LABEL_ROUTER: "chat"}
    kube.settle(NS, model, ready=1)  # one of the two model pods Ready
    await run(kube)
    router = cr(kube)["status"]["router"]
    assert (router["serviceOnRouter"], router["readyEndpoints"], router["serving"]) == (True, 1, True), router
    kube.settle(NS, model)
    await run(kube)
    assert cr(kube)["status"]["router"]["readyEndpoints"] == 2
    kube.settle(NS, "chat-router", ready=0)  # the router pods gone unready: the Service back on the model pods
    await run(kube)
    router = cr(kube)["status"]["router"]
    assert (router["serviceOnRouter"], router["serving"]) == (False, False), router


async def test_router_routing_counts_the_canary_pods_as_endpoints() -> None:
    """trafficRouting Router: the router reads {name}-stable and {name}-canary, so both revisions' Ready pods
    are its endpoints."""
    kube = FakeKube()
    make(kube, ROUTER_CANARY)
    await run(kube)
    [old] = [d for d in deployments(kube) if d != "chat-router"]
    kube.settle(NS, old)
    kube.settle(NS, "chat-router")
    await run(kube)
    assert cr(kube)["status"]["router"]["readyEndpoints"] == 1
    edit(kube, lambda s: s["runtime"].update(maxBatchSize=6))
    await run(kube)
    [new] = [d for d in deployments(kube) if d not in (old, "chat-router")]
    kube.settle(NS, new)
    await run(kube)
    router = cr(kube)["status"]["router"]
    assert cr(kube)["status"]["canaryRevision"] == new and (router["readyEndpoints"], router["serving"]) == (2, True)


def _router_pod(name: str, cond: dict | None = None, terminating: bool = False) -> dict:
    meta = {"name": name, "namespace": NS, "labels": {rb.LABEL_ROUTER: "chat"}}
    if terminating:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    conds = [{"type": "Ready", "status": "True"}] + ([{"type": "autoglm.io/OAuth2Keys", **cond}] if cond else [])
    return {"metadata": meta, "status": {"conditions": conds}}


async def test_oauth2_status_shows_the_router_pods_keys() -> None:
    """status.router.auth follows the router pods' autoglm.io/OAuth2Keys conditions: the worst pod's reason
    and words (NoKeys before IssuerUnreachable before NotReported), terminating pods left out."""
    kube = FakeKube()
    oauth2 = {"issuerURL": "http://issuer.test/", "audiences": ["autoglm"]}
    make(kube, {**SPEC, "router": {"enabled": True}, "auth": {"oauth2": oauth2}})
    await run(kube)
    [model] = [d for d in deployments(kube) if d != "chat-router"]
    kube.settle(NS, model)
    kube.settle(NS, "chat-router")
    role = kube.obj("Role", NS, "chat-router")
    assert {"apiGroups": [""], "resources": ["pods/status"], "verbs": ["patch"]} in role["rules"]
    await run(kube)
    assert cr(kube)["status"]["router"]["auth"] == {"issuer": "http://issuer.test/", "ready": "0/0",
                                                    "reason": "NotReported", "message": "no router pod yet"}
    ok = {"status": "True", "reason": "KeysFetched", "message": "1 key(s) from http://issuer.test/jwks"}
    down = {"status": "False", "reason": "IssuerUnreachable", "message": "the issuer cannot be reached (x)"}
    kube.put("Pod", _router_pod("chat-router-a", ok))
    kube.put("Pod", _router_pod("chat-router-b", ok))
    kube.put("Pod", _router_pod("chat-router-c", {"status": "False", "reason": "NoKeys", "message": "m"}, True))
    await run(kube)
    auth = cr(kube)["status"]["router"]["auth"]
    assert auth == {"issuer": "http://issuer.test/", "ready": "2/2", "reason": "KeysFetched",
                    "message": "chat-router-a: 1 key(s) from http://issuer.test/jwks"}
    kube.put("Pod", _router_pod("chat-router-b", down))
    await run(kube)
    auth = cr(kube)["status"]["router"]["auth"]
    assert (auth["ready"], auth["reason"]) == ("1/2", "IssuerUnreachable")
    assert auth["message"] == "chat-router-b: the issuer cannot be reached (x)"
    kube.put("Pod", _router_pod("chat-router-a"))  # a new pod that has not reported yet
    await run(kube)
    assert cr(kube)["status"]["router"]["auth"]["reason"] == "IssuerUnreachable"  # worse than not reported


async def test_router_pods_are_listed_only_with_oauth2() -> None:
    lists = []
    for auth in ({}, {"oauth2": {"issuerURL": "http://issuer.test/", "audiences": ["autoglm"]}}):
        kube = FakeKube()
        make(kube, {**SPEC, "router": {"enabled": True}, "auth": auth})
        await run(kube)
        lists.append(kube.reads["LIST Pod"])
    assert lists[1] == 2 * lists[0]  # each pass: the model pods, and with OAuth2 the router's too


async def test_router_serving_at_zero_needs_no_model_pod() -> None:
    """Scale to zero (minReplicas 0): no model pod is wanted, the router holds a request and KEDA wakes a pod
    for it, so the router Ready is serving."""
    kube = FakeKube()
    autoscaling = {"enabled": True, "provider": "KEDA", "minReplicas": 0, "maxReplicas": 2}
    make(kube, {**SPEC, "router": {"enabled": True}, "autoscaling": autoscaling})
    await run(kube)
    assert cr(kube)["status"]["router"]["serving"] is False  # no router pod Ready yet
    kube.settle(NS, "chat-router")
    await run(kube)
    router = cr(kube)["status"]["router"]
    assert (router["serviceOnRouter"], router["readyEndpoints"], router["serving"]) == (True, 0, True), router
