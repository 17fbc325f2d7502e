"""Writing children, one function per kind: compare desired with observed, write only what differs.

Each ``sync_*`` takes what ``observe`` read and what the rollout policy decided, writes through
``KubeAPI``, counts its writes in the ``Outcome`` and appends the events of what it did.

Every child is written with server-side apply under one field manager (``autoglm-operator``):
fields others set (``kubectl rollout restart``'s annotation, an HPA's ``replicas``) are kept,
fields we stop sending are pruned, and ``replicas`` is left out when an autoscaler owns it. An
object is applied only when we control it (its controller ownerReference is this resource) or it
does not exist; one that carries the name but is not ours is never touched: the resource is
Degraded with reason ``ChildConflict`` naming it (``Outcome.conflicts``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from . import builders as b
from . import router_builders as rb
from .kube import ApiError, KubeAPI
from .models import ResolvedSpec
from .observe import Observed, Problem, _controlled_by, uses_keda
from .policy import Decision, stable_count
from .settings import OperatorSettings
from .status import status_patch, transition_events

Events = list[tuple[str, str, str]]


@dataclasses.dataclass
class Outcome:
    writes: int = 0
    status_written: bool = False
    gone: bool = False
    requeue_after: float | None = None  # reconcile again after this many seconds (the rollout's clock)
    conflicts: list[Problem] = dataclasses.field(default_factory=list)  # children not ours (ChildConflict)
    # Secrets/PVCs it waits for (kind, name, resourceVersion seen or ""): polled, not watched
    waiting_for: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)


# ==================================================================== comparing


def needs_update(desired: Any, actual: Any) -> bool:
    """True when ``desired`` is not contained in ``actual`` (lists: same length, item-wise).

    Server defaults (extra keys in ``actual``) never cause an update; missing or different values do.
    """
    return not _subset(desired, actual)


def _subset(desired: Any, actual: Any) -> bool:
    if isinstance(desired, dict):
        return isinstance(actual, dict) and all(k in actual and _subset(v, actual[k]) for k, v in desired.items())
    if isinstance(desired, list):
        return (
            isinstance(actual, list)
            and len(desired) == len(actual)
            and all(_subset(d, a) for d, a in zip(desired, actual, strict=True))
        )
    return desired == actual


def _child_differs(
    desired: dict[str, Any], actual: dict[str, Any] | None, exact: Callable[[dict], Any] | None = None
) -> bool:
    if actual is None:
        return True
    # spec, or what a kind has instead (a Role's rules, a RoleBinding's roleRef and subjects, ...)
    body = {k: v for k, v in desired.items() if k not in ("apiVersion", "kind", "metadata")}
    keys = {"metadata": {k: desired["metadata"][k] for k in ("labels", "ownerReferences")}, **body}
    if needs_update(keys, actual):
        return True
    return exact is not None and exact(desired) != exact(actual)


async def _apply_if_ours(
    kube: KubeAPI,
    cr: dict[str, Any],
    kind: str,
    desired: dict[str, Any],
    observed: dict[str, Any] | None,
    out: Outcome,
) -> bool:
    """Server-side apply ``desired`` unless an object of that name exists that we do not control.

    ``observed`` comes from the cache, which holds only objects with our labels: when it has none,
    the API is asked (``fresh``) before creating, so an unlabelled object of the user's is seen.
    """
    namespace, uid = cr["metadata"]["namespace"], cr["metadata"]["uid"]
    name = desired["metadata"]["name"]
    current = observed if observed is not None else await kube.get(kind, namespace, name, fresh=True)
    if current is not None and not _controlled_by(current, uid):
        out.conflicts.append(
            Problem(
                "ChildConflict",
                f"{kind} {name} already exists and is not controlled by this AutoGLMDeployment: "
                "it is left alone (delete or rename it)",
            )
        )
        return False
    if current is not None and current["metadata"].get("deletionTimestamp"):
        return False  # ours, on its way out: applied again once it is gone
    out.writes += 1
    await kube.apply(kind, namespace, desired, force=True)
    return True


# ==================================================================== one sync per child kind


async def sync_deployments(
    kube: KubeAPI,
    cr: dict[str, Any],
    r: ResolvedSpec,
    desired_hash: str,
    decision: Decision,
    obs: Observed,
    out: Outcome,
    events: Events,
    logger: Any,
) -> None:
    """The desired revision's Deployment (created, or updated to the current template), then the others' replicas."""
    namespace = cr["metadata"]["namespace"]
    for rev_hash, want in sorted(decision.replicas.items(), key=lambda kv: (kv[0] != desired_hash, kv[0])):
        existing = obs.revisions.get(rev_hash)
        if rev_hash == desired_hash:
            body = b.build_deployment(cr, r, rev_hash, replicas=want if want is not None else 1)
            if existing is None:
                if obs.preconditions:
                    continue  # cannot run without its PVC/Secret: wait (status says why)
                if await _apply_if_ours(kube, cr, "Deployment", body, None, out):
                    logger.info("Created revision %s (version %s).", body["metadata"]["name"], r.version)
                    events.append(
                        (
                            "Normal",
                            "RevisionCreated",
                            f"Created revision {body['metadata']['name']} (version {r.version})",
                        )
                    )
                continue
            stale = existing.spec_hash != body["metadata"]["annotations"][b.ANNOTATION_SPEC_HASH]
            if stale or (want is not None and existing.desired != want):
                if want is None and existing.replicas_managed_elsewhere:
                    del body["spec"]["replicas"]  # the autoscaler's now: never fight it over spec.replicas
                elif want is None:
                    body["spec"]["replicas"] = existing.desired  # still ours: omitting it would reset it
                out.writes += 1
                await kube.apply("Deployment", namespace, body, force=True)  # ours: observe checked the owner
                if stale:
                    logger.info("Updated deployment %s to the current template.", existing.name)
                else:
                    logger.info("Scaled deployment %s from %d to %d replicas.", existing.name, existing.desired, want)
                continue
        if existing is not None and want is not None and existing.desired != want:
            out.writes += 1
            await kube.patch("Deployment", namespace, existing.name, {"spec": {"replicas": want}})
            logger.info("Scaled deployment %s from %d to %d replicas.", existing.name, existing.desired, want)


async def sync_service(
    kube: KubeAPI, cr: dict[str, Any], r: ResolvedSpec, decision: Decision, obs: Observed, out: Outcome, logger: Any
) -> None:
    """The shared Service: the stable revision, plus the canary once it has Ready pods (Replicas routing)."""
    name = cr["metadata"]["name"]
    serving = list(decision.serving) if r.spec.rollout.traffic_routing == "Replicas" else [decision.stable]
    if router_serves(r, obs):
        svc, what = rb.build_router_service(cr, r), rb.router_name(name)
    else:  # no router, or none of its pods Ready yet: the model pods keep being served directly
        svc, what = b.build_service(cr, r, serving), ", ".join(b.revision_name(name, h) for h in serving)
    if _child_differs(svc, obs.service, exact=lambda o: (o.get("spec") or {}).get("selector")):
        if await _apply_if_ours(kube, cr, "Service", svc, obs.service, out):
            logger.info("Applied service %s selecting %s.", name, what)


def router_serves(r: ResolvedSpec, obs: Observed) -> bool:
    """The resource's Service points at the router once it is on and one of its pods is Ready."""
    return r.spec.router.enabled and obs.router_ready > 0


async def sync_route(
    kube: KubeAPI, cr: dict[str, Any], r: ResolvedSpec, decision: Decision, obs: Observed, out: Outcome, logger: Any
) -> None:
    """GatewayAPI routing: {name}-stable and {name}-canary Services and our rules of the HTTPRoute {name}.

    Rules the operator does not name (a user's) are kept as they are.
    """
    namespace, name = cr["metadata"]["namespace"], cr["metadata"]["name"]
    routing = r.spec.rollout.traffic_routing
    gateway = routing == "GatewayAPI"
    split = gateway or (r.spec.router.enabled and routing == "Router")  # one Service per role
    roles = {"stable": decision.stable, "canary": decision.canary or decision.stable}
    for (role, rev_hash), svc_name in zip(roles.items(), b.route_service_names(name), strict=True):
        desired = b.build_route_service(cr, r, role, rev_hash) if split else None
        if r.spec.router.enabled and routing == "Replicas" and role == "stable":
            # The router reads every serving revision as one pool: the split follows the pod counts.
            desired = rb.build_revision_service(cr, r, "stable", list(decision.serving))
        observed = obs.route_services.get(svc_name)
        what = f"{role} service"
        await _sync_optional_child(kube, cr, "Service", what, desired, observed, out, logger, name=svc_name)
    if not gateway:
        if any(obs.route_services.values()):  # switched away from GatewayAPI: our route goes with its Services
            route_now = await kube.get("HTTPRoute", namespace, name)
            await _sync_optional_child(kube, cr, "HTTPRoute", "route", None, route_now, out, logger)
        return
    route = b.build_http_route(cr, r, decision.route_weight, (obs.route or {}).get("spec", {}).get("rules") or [])
    if _child_differs(route, obs.route, exact=lambda o: (o.get("spec") or {}).get("rules")):
        if await _apply_if_ours(kube, cr, "HTTPRoute", route, obs.route, out):
            logger.info("Applied route %s with canary weight %d.", name, decision.route_weight)


async def clear_annotations(kube: KubeAPI, cr: dict[str, Any], keys: tuple[str, ...], out: Outcome) -> None:
    """Remove control annotations the rollout acted on (after the status that records the act)."""
    if keys:
        out.writes += 1
        patch = {"metadata": {"annotations": dict.fromkeys(keys)}}
        await kube.patch("AutoGLMDeployment", cr["metadata"]["namespace"], cr["metadata"]["name"], patch)


async def sync_autoscaler(
    kube: KubeAPI,
    settings: OperatorSettings,
    cr: dict[str, Any],
    r: ResolvedSpec,
    decision: Decision,
    obs: Observed,
    out: Outcome,
    logger: Any,
) -> list[Problem]:
    """The autoscaler on the serving revision: our HPA, or a KEDA ScaledObject (KEDA makes the HPA)."""
    name = cr["metadata"]["name"]
    a = r.spec.autoscaling
    hpa = b.build_hpa(cr, r, b.revision_name(name, decision.stable)) if a.enabled and a.provider == "HPA" else None
    await _sync_optional_child(kube, cr, "HorizontalPodAutoscaler", "autoscaler", hpa, obs.hpa, out, logger)
    problems: list[Problem] = []
    prometheus = a.prometheus.address or settings.prometheus_address
    so = None
    if uses_keda(r):
        if prometheus:
            so = b.build_scaled_object(cr, r, decision.stable, prometheus)
        else:
            problems.append(
                Problem(
                    "PrometheusAddressMissing",
                    (
                        "autoscaling.provider KEDA needs a Prometheus: set spec.autoscaling.prometheus.address "
                        "or the operator's AUTOGLM_OPERATOR_PROMETHEUS_ADDRESS"
                    ),
                )
            )
    if so is not None or obs.scaled_object is not None:
        try:
            await _sync_optional_child(kube, cr, "ScaledObject", "scaled object", so, obs.scaled_object, out, logger)
        except ApiError as exc:
            if exc.status != 404:
                raise
            problems.append(
                Problem(
                    "KEDANotInstalled",
                    (
                        "autoscaling.provider is KEDA but this cluster has no scaledobjects.keda.sh "
                        "(install KEDA, or use provider HPA)"
                    ),
                )
            )
    return problems


async def sync_pdb(
    kube: KubeAPI, cr: dict[str, Any], r: ResolvedSpec, decision: Decision, obs: Observed, out: Outcome, logger: Any
) -> None:
    """A PodDisruptionBudget when more than one replica is wanted."""
    pdb = b.build_pdb(cr, r) if stable_count(r, obs.revisions.get(decision.stable)) > 1 else None
    await _sync_optional_child(kube, cr, "PodDisruptionBudget", "disruption budget", pdb, obs.pdb, out, logger)


async def sync_network_policy(
    kube: KubeAPI, cr: dict[str, Any], r: ResolvedSpec, obs: Observed, out: Outcome, logger: Any
) -> None:
    build = rb.build_model_network_policy if r.spec.router.enabled else b.build_network_policy
    netpol = build(cr, r) if r.spec.network_policy.enabled else None
    await _sync_optional_child(kube, cr, "NetworkPolicy", "network policy", netpol, obs.network_policy, out, logger)


async def delete_revisions(
    kube: KubeAPI, cr: dict[str, Any], decision: Decision, obs: Observed, out: Outcome, events: Events, logger: Any
) -> None:
    """Old revisions go only after the Service points at the serving one (call this last)."""
    namespace = cr["metadata"]["namespace"]
    for rev_hash in decision.delete:
        rv = obs.revisions[rev_hash]
        out.writes += 1
        if await kube.delete("Deployment", namespace, rv.name, uid=rv.uid):
            logger.info("Deleted revision %s.", rv.name)
            events.append(("Normal", "RevisionDeleted", f"Deleted revision {rv.name} (version {rv.version})"))


async def _sync_optional_child(
    kube: KubeAPI,
    cr: dict[str, Any],
    kind: str,
    what: str,
    desired: dict[str, Any] | None,
    observed: dict[str, Any] | None,
    out: Outcome,
    logger: Any,
    name: str | None = None,
) -> None:
    """A child that exists only when wanted: apply it when it differs, delete it (if ours) when not wanted."""
    namespace, name = cr["metadata"]["namespace"], name or cr["metadata"]["name"]
    if desired is not None:
        if _child_differs(desired, observed) and await _apply_if_ours(kube, cr, kind, desired, observed, out):
            logger.info("Applied %s %s.", what, name)
    elif observed is not None and _controlled_by(observed, cr["metadata"]["uid"]):
        out.writes += 1
        await kube.delete(kind, namespace, name)
        logger.info("Deleted %s %s.", what, name)


async def write_status(
    kube: KubeAPI,
    cr: dict[str, Any],
    old: dict[str, Any],
    new: dict[str, Any],
    out: Outcome,
    logger: Any,
    events: Events | None = None,
) -> None:
    events = list(events or [])
    patch = status_patch(old, new)
    if patch is not None:
        out.writes += 1
        out.status_written = True
        if await kube.patch_status(cr["metadata"]["namespace"], cr["metadata"]["name"], patch) is None:
            return
        if old.get("phase") != new.get("phase"):
            logger.info(
                "Changed phase of %s from %s to %s.", cr["metadata"]["name"], old.get("phase"), new.get("phase")
            )
        events += transition_events(old, new)
    for type_, reason, message in events:
        out.writes += 1
        await kube.post_event(cr, type_, reason, message)
