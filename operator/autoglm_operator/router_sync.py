"""The router's children (``spec.router``), created while it is on and removed when it goes off.

Order: ServiceAccount, Role, RoleBinding (the pods need them to watch), Deployment, PodDisruptionBudget,
NetworkPolicy. The resource's Service, the revision Services and the model pods' NetworkPolicy are the
ordinary syncs' (sync.py): the Service turns to the router only once a router pod is Ready, and back
to the model pods as soon as the router is off (before its pods go: ``sync_service`` runs first).
ServiceAccount/Role/RoleBinding are not cached: they are read (GET) only while the router is on or
``status.router`` says it was, so a resource without a router costs no read.
"""

from __future__ import annotations

import asyncio
from typing import Any

from . import router_builders as rb
from .conditions import get_condition
from .kube import KubeAPI
from .models import ResolvedSpec
from .observe import Observed
from .policy import Decision
from .settings import OperatorSettings
from .sync import Outcome, _sync_optional_child, router_serves

KINDS = ("ServiceAccount", "Role", "RoleBinding", "Deployment", "PodDisruptionBudget", "NetworkPolicy")


def desired_router(cr: dict[str, Any], r: ResolvedSpec, settings: OperatorSettings) -> dict[str, dict | None]:
    """Kind → the router's object of that kind, or None when it must not exist."""
    if not r.spec.router.enabled:
        return dict.fromkeys(KINDS)
    image = r.spec.router.image or settings.default_router_image
    return {
        "ServiceAccount": rb.build_router_service_account(cr, r),
        "Role": rb.build_router_role(cr, r),
        "RoleBinding": rb.build_router_role_binding(cr, r),
        "Deployment": rb.build_router_deployment(cr, r, image),
        "PodDisruptionBudget": rb.build_router_pdb(cr, r) if r.spec.router.replicas > 1 else None,
        "NetworkPolicy": rb.build_router_network_policy(cr, r) if r.spec.network_policy.enabled else None,
    }


async def sync_router(
    kube: KubeAPI,
    settings: OperatorSettings,
    cr: dict[str, Any],
    r: ResolvedSpec,
    obs: Observed,
    out: Outcome,
    logger: Any,
) -> None:
    had = bool((cr.get("status") or {}).get("router")) or obs.router_deployment is not None
    if not r.spec.router.enabled and not had:
        return
    ns, name = cr["metadata"]["namespace"], rb.router_name(cr["metadata"]["name"])
    observed = dict(zip(KINDS, await asyncio.gather(*(kube.get(kind, ns, name) for kind in KINDS)), strict=True))
    observed["Deployment"] = obs.router_deployment or observed["Deployment"]
    desired = desired_router(cr, r, settings)
    for kind in KINDS if r.spec.router.enabled else reversed(KINDS):
        what = f"router {kind.lower()}"
        await _sync_optional_child(kube, cr, kind, what, desired[kind], observed[kind], out, logger, name=name)


KEYS_CONDITION = "autoglm.io/OAuth2Keys"  # written by each router pod (autoglm_router.auth.report)
# Worst first: a pod without keys refuses every token; one that lost the issuer still verifies known keys.
KEYS_REASONS = ("NoKeys", "IssuerUnreachable", "NotReported", "KeysFetched")


def router_auth_status(r: ResolvedSpec, pods: list[dict[str, Any]]) -> dict[str, Any] | None:
    """``status.router.auth`` from the router pods' ``autoglm.io/OAuth2Keys`` conditions: how many hold
    the issuer's keys with the issuer answering, and the worst pod's reason and words."""
    if r.spec.auth.oauth2 is None:
        return None
    live = sorted((p for p in pods if not p["metadata"].get("deletionTimestamp")), key=lambda p: p["metadata"]["name"])
    seen: list[tuple[str, str, str]] = []  # (reason, pod, message)
    for p in live:
        cond = get_condition((p.get("status") or {}).get("conditions"), KEYS_CONDITION)
        if cond is None:
            seen.append(("NotReported", p["metadata"]["name"], "has not reported the issuer's keys yet"))
        else:
            reason = str(cond.get("reason")) if cond.get("reason") in KEYS_REASONS else "NotReported"
            seen.append((reason, p["metadata"]["name"], cond.get("message") or ""))
    ok = sum(1 for reason, _, _ in seen if reason == "KeysFetched")
    out = {"issuer": r.spec.auth.oauth2.issuer_url, "ready": f"{ok}/{len(live)}"}
    if not seen:
        return {**out, "reason": "NotReported", "message": "no router pod yet"}
    reason, pod, message = min(seen, key=lambda s: KEYS_REASONS.index(s[0]))
    return {**out, "reason": reason, "message": f"{pod}: {message}"[:500]}


def routed_revisions(r: ResolvedSpec, decision: Decision) -> tuple[str, ...]:
    """The revisions behind the Services the router reads (sync_route): Replicas routing, every serving one
    under ``{name}-stable``; Router routing, the stable and the canary each under its own."""
    if r.spec.rollout.traffic_routing == "Router":
        return tuple(h for h in (decision.stable, decision.canary) if h)
    return tuple(decision.serving)


def wakes_from_zero(r: ResolvedSpec) -> bool:
    a = r.spec.autoscaling
    return a.enabled and a.min_replicas == 0


def router_status(r: ResolvedSpec, obs: Observed, decision: Decision) -> dict[str, Any] | None:
    """``status.router`` (None while the router is off). ``serving`` only when a request would be answered:
    the Service on the router AND a Ready model pod behind it (a router pod is Ready seconds to minutes
    before a runtime has loaded its model) — or, scaling to zero (minReplicas 0), none needed: the router
    holds the request and KEDA wakes a pod for it."""
    if not r.spec.router.enabled:
        return None
    st = (obs.router_deployment or {}).get("status") or {}
    on_router = router_serves(r, obs)
    endpoints = sum(obs.revisions[h].ready for h in set(routed_revisions(r, decision)) if h in obs.revisions)
    out = {
        "name": rb.router_name(r.name),
        "policy": r.spec.router.policy,
        "replicas": int(st.get("replicas") or 0),
        "readyReplicas": int(st.get("readyReplicas") or 0),
        "serviceOnRouter": on_router,
        "readyEndpoints": endpoints,
        "serving": on_router and (endpoints > 0 or wakes_from_zero(r)),
    }
    auth = router_auth_status(r, obs.router_pods)
    return {**out, "auth": auth} if auth is not None else out
