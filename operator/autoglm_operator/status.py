"""The status an AutoGLMDeployment shows (pure): phase, conditions, revisions, and the events of a change."""

from __future__ import annotations

from typing import Any

from . import builders as b
from .conditions import DEGRADED, PROGRESSING, READY, get_condition, now_rfc3339, set_condition
from .models import ResolvedSpec
from .observe import Problem, Revision
from .policy import Decision, desired_replicas


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
    desired_hash: str,
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
    desired = desired_replicas(r, decision, revisions)
    ready = stable.ready if stable else 0
    ready_ok = stable is not None and ready >= desired
    cand = revisions.get(decision.candidate) if decision.candidate else None
    cand_name = b.revision_name(name, decision.candidate) if decision.candidate else None
    problem = problems[0] if problems else None

    if problem:
        phase = "Degraded"
    elif decision.candidate:
        phase = "Progressing"
    elif stable is None or (ready == 0 and desired > 0):
        phase = "Pending"
    elif ready_ok and stable.is_ready:
        phase = "Healthy"
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
    elif ready_ok:
        conds = set_condition(conds, READY, True, "ReplicasReady", ready_msg, observed_generation=generation, now=now)
    else:
        conds = set_condition(
            conds, READY, False, "ReplicasNotReady", ready_msg, observed_generation=generation, now=now
        )

    if decision.candidate:
        c_ready, c_desired = (cand.ready, cand.desired) if cand else (0, 0)
        msg = (
            f"Revision {cand_name} is rolling out ({c_ready}/{c_desired} ready); "
            f"revision {stable_name} serves until it is ready"
        )
        conds = set_condition(
            conds, PROGRESSING, True, "RolloutInProgress", msg, observed_generation=generation, now=now
        )
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
            f"Revision {stable_name} is serving",
            observed_generation=generation,
            now=now,
        )

    if problem:
        conds = set_condition(
            conds, DEGRADED, True, problem.reason, problem.message, observed_generation=generation, now=now
        )
    else:
        conds = set_condition(conds, DEGRADED, False, "AsExpected", "", observed_generation=generation, now=now)

    stable_version: str | None
    if stable is not None:
        stable_version = stable.version
    elif decision.stable == desired_hash:
        stable_version = r.version
    else:
        stable_version = old.get("stableVersion")

    status: dict[str, Any] = {
        "phase": phase,
        "observedGeneration": generation,
        "ready": f"{ready}/{desired}",
        "replicas": sum(rv.replicas for rv in revisions.values()),
        "readyReplicas": sum(rv.ready for rv in revisions.values()),
        "desiredReplicas": desired,
        "selector": b.selector_string(b.selector_labels(name)),
        "stableRevision": stable_name,
        "stableVersion": stable_version,
        "canaryRevision": cand_name,
        "canaryVersion": r.version if decision.candidate else None,
        "canaryWeight": 0,
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
    o_st, n_st = old.get("stableRevision"), new.get("stableRevision")
    if o_st and n_st and o_st != n_st:
        events.append(
            (
                "Normal",
                "RevisionPromoted",
                f"Revision {n_st} (version {new.get('stableVersion')}) replaced {o_st} and serves all traffic",
            )
        )
    return events
