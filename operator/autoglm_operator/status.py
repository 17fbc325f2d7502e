"""The status an AutoGLMDeployment shows (pure): phase, conditions, revisions, and the events of a change."""

from __future__ import annotations

from typing import Any

from . import builders as b
from .conditions import DEGRADED, PROGRESSING, READY, get_condition, now_rfc3339, set_condition
from .models import ResolvedSpec
from .observe import Problem, Revision
from .policy import Decision, effective_weight, stable_count


def _strip_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_strip_none(v) for v in value]
    return value


def compute_status(
    *,
    cr: dict[str, Any],
    r: ResolvedSpec,
    decision: Decision,
    revisions: dict[str, Revision],
    problems: list[Problem],
    now: str | None = None,
) -> dict[str, Any]:
    """The status the CR should show, from what was observed (pure)."""
    meta = cr["metadata"]
    name, ns, generation = meta["name"], meta["namespace"], meta.get("generation")
    old = cr.get("status") or {}
    now = now or now_rfc3339()

    stable = revisions.get(decision.stable)
    stable_name = b.revision_name(name, decision.stable)
    desired = stable_count(r, stable)
    cand = revisions.get(decision.canary) if decision.canary else None
    ready = stable.ready if stable else 0
    if cand is not None and r.spec.rollout.max_surge is not None:
        ready = min(desired, ready + cand.ready)  # canary pods stand in for the stable pods they replaced
    ready_ok = stable is not None and ready >= desired
    problem = problems[0] if problems else None
    # Scale to zero: no pod wanted now is a normal, Ready-to-wake state (the router holds requests).
    at_zero = stable is not None and desired == 0 and stable.replicas == 0

    if problem:
        phase = "Degraded"
    elif decision.progressing:
        phase = "Progressing"
    elif stable is None or (ready == 0 and desired > 0):
        phase = "Pending"
    elif ready_ok and stable.is_ready:
        phase = "ScaledToZero" if at_zero else "Healthy"
    else:
        phase = "Progressing"

    conds = old.get("conditions") or []
    ready_msg = f"{ready}/{desired} replicas of revision {stable_name} are ready"
    if stable is None:
        conds = set_condition(
            conds,
            READY,
            False,
            "RevisionNotCreated",
            f"Deployment {stable_name} does not exist yet",
            observed_generation=generation,
            now=now,
        )
    elif ready_ok and at_zero:
        msg = f"Revision {stable_name} is scaled to zero; the router holds requests and the first one wakes it"
        conds = set_condition(conds, READY, True, "ScaledToZero", msg, observed_generation=generation, now=now)
    elif ready_ok:
        conds = set_condition(conds, READY, True, "ReplicasReady", ready_msg, observed_generation=generation, now=now)
    else:
        conds = set_condition(
            conds, READY, False, "ReplicasNotReady", ready_msg, observed_generation=generation, now=now
        )

    if decision.progressing:
        reason, msg = decision.progressing
        conds = set_condition(conds, PROGRESSING, True, reason, msg, observed_generation=generation, now=now)
    elif not (ready_ok and stable is not None and stable.is_ready):
        conds = set_condition(
            conds,
            PROGRESSING,
            True,
            "WaitingForReplicas",
            f"Waiting for revision {stable_name}: {ready_msg}",
            observed_generation=generation,
            now=now,
        )
    else:
        conds = set_condition(
            conds,
            PROGRESSING,
            False,
            "RolloutComplete",
            f"Revision {stable_name} (version {decision.state.stable_version}) is serving",
            observed_generation=generation,
            now=now,
        )

    if problem:
        conds = set_condition(
            conds, DEGRADED, True, problem.reason, problem.message, observed_generation=generation, now=now
        )
    else:
        conds = set_condition(conds, DEGRADED, False, "AsExpected", "", observed_generation=generation, now=now)

    if decision.canary is None:
        weight = 0
    elif r.spec.rollout.traffic_routing in ("GatewayAPI", "Router"):
        weight = decision.route_weight
    else:
        weight = effective_weight(stable, cand)
    status: dict[str, Any] = {
        "phase": phase,
        "observedGeneration": generation,
        "ready": f"{ready}/{desired}",
        "replicas": sum(rv.replicas for rv in revisions.values()),
        "readyReplicas": sum(rv.ready for rv in revisions.values()),
        "desiredReplicas": desired,
        "selector": b.selector_string(b.selector_labels(name)),
        "stableRevision": stable_name,
        "stableVersion": decision.state.stable_version,
        "canaryRevision": b.revision_name(name, decision.canary) if decision.canary else None,
        "canaryVersion": decision.state.canary_version if decision.canary else None,
        "canaryWeight": weight,
        **decision.state.to_status(name),
        "endpoint": b.endpoint(name, ns, tls=r.spec.tls is not None),
        "revisions": [
            {"name": rv.name, "version": rv.version, "replicas": rv.replicas, "readyReplicas": rv.ready}
            for rv in sorted(revisions.values(), key=lambda rv: rv.name)
        ],
        "conditions": conds,
    }
    return _strip_none(status)


def invalid_status(cr: dict[str, Any], message: str, now: str | None = None) -> dict[str, Any]:
    """Status for a spec the operator cannot act on: Degraded/InvalidSpec, children untouched."""
    old = dict(cr.get("status") or {})
    gen = cr["metadata"].get("generation")
    conds = set_condition(
        old.get("conditions"), DEGRADED, True, "InvalidSpec", message, observed_generation=gen, now=now
    )
    return _strip_none({**old, "phase": "Degraded", "observedGeneration": gen, "conditions": conds})


def status_patch(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any] | None:
    """Merge patch turning ``old`` into ``new`` (removed keys → null); ``None`` when equal."""
    if old == new:
        return None
    patch: dict[str, Any] = {k: None for k in old if k not in new}
    for k, v in new.items():
        if old.get(k) != v:
            o = old.get(k)
            patch[k] = status_patch(o, v) if isinstance(o, dict) and isinstance(v, dict) else v
    return patch


def transition_events(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(type, reason, message) for what changed between two statuses."""
    events: list[tuple[str, str, str]] = []
    old_c, new_c = old.get("conditions"), new.get("conditions")
    o_ready, n_ready = get_condition(old_c, READY), get_condition(new_c, READY)
    if n_ready and n_ready["status"] == "True" and (not o_ready or o_ready.get("status") != "True"):
        events.append(("Normal", "Ready", n_ready.get("message", "")))
    o_deg, n_deg = get_condition(old_c, DEGRADED), get_condition(new_c, DEGRADED)
    if n_deg and n_deg["status"] == "True":
        if not o_deg or o_deg.get("status") != "True" or o_deg.get("reason") != n_deg.get("reason"):
            events.append(("Warning", "Degraded", f"{n_deg.get('reason')}: {n_deg.get('message', '')}"))
    elif n_deg and o_deg and o_deg.get("status") == "True":
        events.append(("Normal", "Recovered", f"No longer degraded (was {o_deg.get('reason')})"))
    o_des, n_des = old.get("desiredReplicas"), new.get("desiredReplicas")
    if o_des is not None and n_des is not None and o_des != n_des:
        reason = "ScaledUp" if n_des > o_des else "ScaledDown"
        events.append(("Normal", reason, f"Desired replicas changed from {o_des} to {n_des}"))
    return events
