"""Rollout policy (pure): which revision serves, which rolls out, which go, and with how many pods."""

from __future__ import annotations

import dataclasses

from .models import ResolvedSpec
from .observe import Revision


@dataclasses.dataclass(frozen=True)
class Decision:
    stable: str  # hash of the revision that serves (may not exist yet on first rollout)
    candidate: str | None  # hash rolling out, not yet serving
    promote: bool  # the desired revision just became Ready and takes over now
    delete: tuple[str, ...]  # hashes whose Deployments go


def decide_revisions(desired: str, revisions: dict[str, Revision], previous_stable: str | None) -> Decision:
    """Which revision serves, which rolls out, which go.

    The previous stable revision keeps serving until the desired one is Ready; then the desired
    one is promoted and every other revision is deleted. Revisions that are neither (an
    intermediate edit that never became Ready) are deleted at once. With no status (restart after
    a crash before the first status write) the old revision with most ready pods serves.
    """
    others = {h: rv for h, rv in revisions.items() if h != desired}
    new = revisions.get(desired)
    if not others:
        return Decision(stable=desired, candidate=None, promote=False, delete=())
    if new is not None and new.is_ready:
        return Decision(stable=desired, candidate=None, promote=True, delete=tuple(sorted(others)))
    prev = next((h for h, rv in others.items() if rv.name == previous_stable), None)
    if prev is None:
        prev = max(others.values(), key=lambda rv: (rv.ready, rv.created, rv.name)).hash
    return Decision(stable=prev, candidate=desired, promote=False, delete=tuple(sorted(h for h in others if h != prev)))


def wanted_replicas(r: ResolvedSpec, rev_hash: str, decision: Decision, revisions: dict[str, Revision]) -> int | None:
    """spec.replicas for a revision's Deployment; ``None`` = leave it alone (the HPA owns it)."""
    a = r.spec.autoscaling
    if not a.enabled:
        return r.spec.fixed_replicas
    lo, hi = a.bounds
    stable = revisions.get(decision.stable)
    if rev_hash == decision.stable:
        return None if stable is not None else lo
    base = stable.desired if stable is not None else lo
    return min(max(base, lo), hi)


def desired_replicas(r: ResolvedSpec, decision: Decision, revisions: dict[str, Revision]) -> int:
    """Pods wanted now for the serving revision (spec.replicas, or the autoscaler's choice)."""
    if not r.spec.autoscaling.enabled:
        return r.spec.fixed_replicas
    stable = revisions.get(decision.stable)
    return stable.desired if stable is not None else r.spec.autoscaling.bounds[0]
