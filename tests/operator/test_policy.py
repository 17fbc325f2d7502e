"""The rollout state machine (policy.decide), one row per transition.

Each row: the spec, the revisions there are, what the status remembers, the clock, this pass's
analysis verdict and the annotations → what the decision must hold. Revisions are named by short
hashes: ``old`` (stable), ``new`` (the spec's revision), ``newer``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
from pathlib import Path
from typing import Any

import pytest
import yaml

from autoglm_operator.models import DEFAULT_STEPS
from autoglm_operator.observe import Revision
from autoglm_operator.policy import (
    ANNOTATION_ABORT,
    ANNOTATION_PAUSED,
    ANNOTATION_PROMOTE,
    analysis_window,
    canary_count,
    decide,
    effective_weight,
)
from autoglm_operator.rollout_state import Analysis, RolloutState
from tests.operator.test_builders import resolved

REPO = Path(__file__).resolve().parents[2]
T0 = dt.datetime(2026, 1, 1, 12, 0, 0, tzinfo=dt.UTC)
ANALYSIS = {"prometheus": {"address": "http://prom:9090"}, "interval": "30s", "minRequests": 20,
            "failureThreshold": 2, "latencyP99MaxSeconds": 2.0}
STEPS = [{"weight": 10, "pause": "60s"}, {"weight": 50}]


def spec(replicas: int | None = 4, steps=STEPS, analysis=ANALYSIS, version: str = "0.2.0", **rollout) -> dict:
    out: dict[str, Any] = {"model": {"uri": "hf://a/b"}, "runtime": {"version": version},
                           "rollout": {"steps": steps, **rollout}}
    if analysis is not None:
        out["rollout"]["analysis"] = analysis
    if replicas is None:
        out["autoscaling"] = {"enabled": True, "minReplicas": 1, "maxReplicas": 10}
    else:
        out["replicas"] = replicas
    return out


def rev(h: str, desired: int, ready: int | None = None, version: str = "0.1.0", pods: int | None = None) -> Revision:
    ready = desired if ready is None else ready
    return Revision(hash=h, name=f"chat-{h}", version=version, desired=desired, replicas=desired, ready=ready,
                    updated=desired, current=True, created="2026-01-01T00:00:00Z", uid=f"uid-{h}", spec_hash="x",
                    pods=desired if pods is None else pods)


def at(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


def canary_state(step: int = 0, ready_at: float | None = None, phase: str = "Progressing", **kw) -> RolloutState:
    """A rollout of ``new`` over ``old`` at ``step`` (started at T0; Ready at its weight at ``ready_at``)."""
    base: dict[str, Any] = dict(phase=phase, stable="old", stable_version="0.1.0", canary="new",
                                canary_version="0.2.0", step=step, step_started_at=T0,
                                step_ready_at=None if ready_at is None else at(ready_at))
    return RolloutState(**{**base, **kw})


def passed(t: float) -> Analysis:
    return Analysis(time=at(t), verdict="Passed", reason="40 requests in 30s, success rate 1", requests=40)


def failed(t: float) -> Analysis:
    return Analysis(time=at(t), verdict="Failed", reason="latency p99 3.1s > 2.0s (40 requests in 30s)",
                    requests=40, latency_p99=3.1)


def inconclusive(t: float) -> Analysis:
    return Analysis(time=at(t), verdict="Inconclusive", requests=3,
                    reason="3 canary requests in the last 30s, fewer than minRequests 20: not enough traffic to judge")


@dataclasses.dataclass
class Row:
    id: str
    revisions: list[Revision]
    state: RolloutState
    now: float = 0
    spec: dict = dataclasses.field(default_factory=spec)
    desired: str = "new"
    analysis: Analysis | None = None
    annotations: dict[str, str] = dataclasses.field(default_factory=dict)
    draining: int = 0
    expect: dict[str, Any] = dataclasses.field(default_factory=dict)


OLD4 = rev("old", 4)

ROWS = [
    Row("first deployment goes straight to 100%", [], RolloutState(), expect={
        "stable": "new", "canary": None, "replicas": {"new": 4}, "phase": "Idle", "events": [], "serving": ("new",)}),
    Row("a change creates the canary at step 0", [OLD4], RolloutState(stable="old", phase="Promoted"), expect={
        "stable": "old", "canary": "new", "replicas": {"old": 4, "new": 1}, "phase": "Progressing", "step": 0,
        "events": ["CanaryStarted"], "serving": ("old",), "progressing": "CanaryProgressing", "route_weight": 0}),
    Row("canary not Ready: no traffic to it, the pause does not start", [OLD4, rev("new", 1, ready=0, version="0.2.0")],
        canary_state(), now=120, expect={
            "serving": ("old",), "route_weight": 0, "step_ready_at": None, "step": 0, "events": []}),
    Row("canary Ready at its weight: it serves, the pause starts", [OLD4, rev("new", 1, version="0.2.0")],
        canary_state(), now=5, expect={
            "serving": ("old", "new"), "route_weight": 10, "step_ready_at": at(5), "requeue_after": 30.0}),
    Row("pause not over: hold", [OLD4, rev("new", 1, version="0.2.0")], canary_state(ready_at=0), now=40,
        analysis=passed(40), expect={"step": 0, "events": [], "progressing": "CanaryProgressing",
                                     "requeue_after": 20.0}),
    Row("pause over and a check passed: next step", [OLD4, rev("new", 1, version="0.2.0")],
        canary_state(ready_at=0, last_analysis=passed(30)), now=61, expect={
            "step": 1, "events": ["StepAdvanced"], "replicas": {"old": 4, "new": 2}, "step_started_at": at(61),
            "step_ready_at": None}),
    Row("pause over, no analysis configured: next step", [OLD4, rev("new", 1, version="0.2.0")],
        canary_state(ready_at=0), now=60, spec=spec(analysis=None), expect={"step": 1, "events": ["StepAdvanced"]}),
    Row("pause over but no passing check in this step yet: hold", [OLD4, rev("new", 1, version="0.2.0")],
        canary_state(ready_at=10, last_analysis=passed(5)), now=80, expect={"step": 0, "events": []}),
    Row("no pause: advance as soon as a check passes (last step → promoting)",
        [OLD4, rev("new", 2, version="0.2.0")], canary_state(step=1, ready_at=0), now=30, analysis=passed(30),
        expect={"phase": "Promoting", "step": 2, "replicas": {"old": 4, "new": 4}, "events": ["Promoting"],
                "progressing": "Promoting"}),
    Row("inconclusive (too few requests): no advance, the reason says why",
        [OLD4, rev("new", 2, version="0.2.0")], canary_state(step=1, ready_at=0), now=30,
        analysis=inconclusive(30), expect={
            "step": 1, "failed_checks": 0, "progressing": "AnalysisInconclusive",
            "progressing_message": "fewer than minRequests 20", "last_verdict": "Inconclusive"}),
    Row("one failed check (threshold 2): Degraded/AnalysisFailed, no rollback",
        [OLD4, rev("new", 2, version="0.2.0")], canary_state(step=1, ready_at=0), now=30, analysis=failed(30),
        expect={"canary": "new", "failed_checks": 1, "problem": "AnalysisFailed", "events": ["AnalysisFailed"]}),
    Row("a passing check resets the failures", [OLD4, rev("new", 1, version="0.2.0")],
        canary_state(ready_at=0, failed_checks=1), now=30, analysis=passed(30), expect={
            "failed_checks": 0, "problem": None}),
    Row("failed failureThreshold times: rollback with the figures",
        [OLD4, rev("new", 2, version="0.2.0")], canary_state(step=1, ready_at=0, failed_checks=1), now=60,
        analysis=failed(60), expect={
            "canary": None, "phase": "RolledBack", "delete": ("new",), "replicas": {"old": 4},
            "rolled_back": "new", "problem": "RolledBack", "problem_message": "latency p99 3.1s > 2.0s",
            "last_verdict": "Failed", "failed_checks": 0,
            "events": ["AnalysisFailed", "RolledBack"], "serving": ("old",)}),
    Row("canary not Ready within progressDeadlineSeconds: rollback", [OLD4, rev("new", 1, ready=0, version="0.2.0")],
        canary_state(), now=901, expect={"phase": "RolledBack", "delete": ("new",), "problem": "RolledBack",
                                         "problem_message": "not Ready at step 0", "events": ["RolledBack"]}),
    Row("no passing check within the deadline after the pause: rollback", [OLD4, rev("new", 1, version="0.2.0")],
        canary_state(ready_at=0, last_analysis=inconclusive(950)), now=961, expect={
            "phase": "RolledBack", "problem_message": "no passing analysis within 900s"}),
    Row("rolled back: the spec's revision is not retried", [OLD4], RolloutState(
        phase="RolledBack", stable="old", rolled_back="new", rollback_message="Rolled back revision chat-new: x"),
        expect={"canary": None, "replicas": {"old": 4}, "problem": "RolledBack", "events": [], "phase": "RolledBack"}),
    Row("promoting: canary scaled to the stable's CURRENT count (autoscaled to 6) before it takes all traffic",
        [rev("old", 6), rev("new", 3, version="0.2.0")], canary_state(step=2, phase="Promoting"), now=10,
        spec=spec(replicas=None), expect={"replicas": {"old": None, "new": 6}, "canary": "new", "stable": "old",
                                           "serving": ("old", "new"), "progressing": "Promoting"}),
    Row("promoting, Ready at full count: promoted, old revision goes, Progressing until its pods are gone",
        [OLD4, rev("new", 4, version="0.2.0")], canary_state(step=2, phase="Promoting"), now=10, expect={
            "stable": "new", "canary": None, "delete": ("old",), "events": ["Promoted"], "serving": ("new",),
            "progressing": "Promoted", "previous_stable": "old", "previous_stable_version": "0.1.0",
            "stable_version": "0.2.0"}),
    Row("promoted, old pods still draining: Progressing stays True", [rev("new", 4, version="0.2.0")],
        RolloutState(phase="Promoting", stable="new", stable_version="0.2.0"), desired="new", draining=2,
        expect={"progressing": "Promoted", "phase": "Promoting", "events": []}),
    Row("promoted, old pods gone: done", [rev("new", 4, version="0.2.0")],
        RolloutState(phase="Promoting", stable="new", stable_version="0.2.0"), draining=0,
        expect={"progressing": None, "phase": "Promoted"}),
    Row("a newer revision supersedes the canary; stable untouched",
        [OLD4, rev("new", 2, version="0.2.0")], canary_state(step=1, ready_at=0), now=30, desired="newer",
        spec=spec(version="0.3.0"), expect={
            "stable": "old", "canary": "newer", "step": 0, "delete": ("new",), "replicas": {"old": 4, "newer": 1},
            "events": ["Superseded", "CanaryStarted"], "failed_checks": 0}),
    Row("spec back to the stable's version: abort at once, no new revision, no stable pod touched",
        [OLD4, rev("new", 2, version="0.2.0")], canary_state(step=1, ready_at=0), desired="old",
        spec=spec(version="0.1.0"), expect={
            "stable": "old", "canary": None, "delete": ("new",), "replicas": {"old": 4}, "events": ["Aborted"],
            "phase": "Idle", "problem": None}),
    Row("autoglm.io/promote: skip the remaining steps, annotation cleared",
        [OLD4, rev("new", 1, version="0.2.0")], canary_state(ready_at=0), now=5,
        annotations={ANNOTATION_PROMOTE: "true"}, expect={
            "phase": "Promoting", "replicas": {"old": 4, "new": 4}, "clear": (ANNOTATION_PROMOTE,),
            "events": ["Promoting"]}),
    Row("autoglm.io/abort: rollback, annotation cleared", [OLD4, rev("new", 1, version="0.2.0")],
        canary_state(ready_at=0), now=5, annotations={ANNOTATION_ABORT: "true"}, expect={
            "phase": "RolledBack", "delete": ("new",), "clear": (ANNOTATION_ABORT,), "events": ["Aborted"],
            "problem": "RolledBack", "problem_message": "autoglm.io/abort"}),
    Row("autoglm.io/abort with no rollout: cleared, nothing else", [rev("new", 4, version="0.2.0")],
        RolloutState(stable="new", phase="Promoted"), annotations={ANNOTATION_ABORT: "true"}, expect={
            "clear": (ANNOTATION_ABORT,), "events": [], "problem": None, "phase": "Promoted"}),
    Row("autoglm.io/paused: no advance although the pause is over and a check passed",
        [OLD4, rev("new", 1, version="0.2.0")], canary_state(ready_at=0, last_analysis=passed(30)), now=90,
        annotations={ANNOTATION_PAUSED: "true"}, expect={
            "phase": "Paused", "step": 0, "progressing": "CanaryPaused", "events": ["Paused"], "clear": (),
            "requeue_after": None}),
    Row("paused past the deadline: no rollback while paused", [OLD4, rev("new", 1, ready=0, version="0.2.0")],
        canary_state(phase="Paused"), now=5000, annotations={ANNOTATION_PAUSED: "true"}, expect={
            "phase": "Paused", "canary": "new", "events": []}),
    Row("paused annotation removed: resumes, the step's pause starts again",
        [OLD4, rev("new", 1, version="0.2.0")], canary_state(phase="Paused", ready_at=0), now=500, expect={
            "phase": "Progressing", "step": 0, "events": ["Resumed"], "step_started_at": at(500),
            "step_ready_at": at(500)}),
    Row("maxSurge 1, 10 %: canary pod on top, stable keeps what its 90 % needs", [OLD4], RolloutState(stable="old"),
        spec=spec(maxSurge=1), expect={"replicas": {"old": 4, "new": 1}}),
    Row("maxSurge 1, 50 %: canary grows into the room; a stable pod goes only for a Ready canary pod",
        [OLD4, rev("new", 1, version="0.2.0")], canary_state(step=1), now=1, spec=spec(maxSurge=1),
        expect={"replicas": {"old": 3, "new": 1}}),
    Row("maxSurge 1, 50 % once the stable shrank: canary reaches its 2 pods, stable stays at its share",
        [rev("old", 3), rev("new", 1, version="0.2.0")], canary_state(step=1), now=2, spec=spec(maxSurge=1),
        expect={"replicas": {"old": 3, "new": 2}}),
    Row("maxSurge 1, a terminating stable pod still takes room",
        [rev("old", 3, pods=4), rev("new", 1, version="0.2.0")], canary_state(step=1), now=2, spec=spec(maxSurge=1), expect={"replicas": {"old": 3, "new": 1}}),
    Row("maxSurge 1, promoting: the stable shrinks only as canary pods are Ready",
        [rev("old", 2), rev("new", 3, ready=2, version="0.2.0")], canary_state(step=2, phase="Promoting"), now=2,
        spec=spec(maxSurge=1), expect={"replicas": {"old": 2, "new": 3}, "canary": "new"}),
    Row("autoscaler during a canary: the HPA keeps the stable; canary = ceil(50% x stable's desired 6)",
        [rev("old", 6), rev("new", 1, version="0.2.0")], canary_state(step=1), now=1, spec=spec(replicas=None),
        expect={"replicas": {"old": None, "new": 3}}),
    Row("steps: [] → blue/green: straight to promoting at full count", [OLD4], RolloutState(stable="old"),
        spec=spec(steps=[]), expect={"phase": "Promoting", "step": 0, "replicas": {"old": 4, "new": 4},
                                     "route_weight": 0, "events": ["CanaryStarted"]}),
    Row("stable with no Ready pod (broken): nothing to protect, straight to promoting",
        [rev("old", 4, ready=0)], RolloutState(stable="old"), expect={
            "phase": "Promoting", "step": 2, "replicas": {"old": 4, "new": 4}, "events": ["CanaryStarted"]}),
    Row("no status (restart before the first write): the revision with Ready pods is stable",
        [rev("a", 4), rev("new", 1, ready=0, version="0.2.0")], RolloutState(), expect={
            "stable": "a", "canary": "new", "step": 0, "delete": ()}),
]


def _get(d, key: str) -> Any:
    st = d.state
    return {
        "events": lambda: [e[1] for e in d.events],
        "phase": lambda: st.phase,
        "step": lambda: st.step,
        "step_started_at": lambda: st.step_started_at,
        "step_ready_at": lambda: st.step_ready_at,
        "failed_checks": lambda: st.failed_checks,
        "rolled_back": lambda: st.rolled_back,
        "previous_stable": lambda: st.previous_stable,
        "previous_stable_version": lambda: st.previous_stable_version,
        "stable_version": lambda: st.stable_version,
        "last_verdict": lambda: st.last_analysis.verdict if st.last_analysis else None,
        "problem": lambda: d.problem.reason if d.problem else None,
        "problem_message": lambda: d.problem.message if d.problem else "",
        "progressing": lambda: d.progressing[0] if d.progressing else None,
        "progressing_message": lambda: d.progressing[1] if d.progressing else "",
        "clear": lambda: d.clear_annotations,
    }.get(key, lambda: getattr(d, key))()


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_transition(row: Row) -> None:
    d = decide(r=resolved("chat", row.spec), desired=row.desired, revisions={rv.hash: rv for rv in row.revisions},
               state=row.state, now=at(row.now), analysis=row.analysis, annotations=row.annotations,
               draining=row.draining)
    for key, want in row.expect.items():
        got = _get(d, key)
        if key.endswith("_message"):
            assert want in got, f"{key}: {want!r} not in {got!r}"
        else:
            assert got == want, f"{key}: got {got!r}, want {want!r}"


def test_every_phase_has_a_row() -> None:
    phases = {r.expect.get("phase") for r in ROWS}
    assert {"Idle", "Progressing", "Paused", "Promoting", "Promoted", "RolledBack"} <= phases


def test_decide_is_stable_once_settled() -> None:
    """Feeding a decision's state back with nothing changed decides the same (no events twice)."""
    revs = {"old": OLD4, "new": rev("new", 1, version="0.2.0")}
    first = decide(r=resolved("chat", spec()), desired="new", revisions=revs, state=RolloutState(stable="old"), now=T0)
    again = decide(r=resolved("chat", spec()), desired="new", revisions=revs, state=first.state, now=at(1))
    assert [e[1] for e in first.events] == ["CanaryStarted"] and again.events == ()
    assert again.state.step == 0 and again.state.step_started_at == T0 and again.replicas == first.replicas


def test_analysis_window_is_due_every_interval_from_the_status_clock() -> None:
    ro = resolved("chat", spec()).spec.rollout
    st = canary_state(ready_at=0)
    assert analysis_window(ro, st, "new", at(29)) is None
    assert analysis_window(ro, st, "new", at(30)) == T0
    # After a check at 30 s (recorded in status) the next window starts there: a restart does not re-count it.
    st = dataclasses.replace(st, last_analysis=passed(30))
    assert analysis_window(ro, st, "new", at(45)) is None
    assert analysis_window(ro, st, "new", at(60)) == at(30)
    # Not for a canary being replaced, not while paused or not yet Ready, not without analysis.
    assert analysis_window(ro, st, "newer", at(60)) is None
    assert analysis_window(ro, dataclasses.replace(st, phase="Paused"), "new", at(60)) is None
    assert analysis_window(ro, canary_state(), "new", at(60)) is None
    assert analysis_window(resolved("chat", spec(analysis=None)).spec.rollout, st, "new", at(60)) is None


def test_replicas_routing_weight_is_the_ready_pod_share() -> None:
    assert effective_weight(rev("old", 4), rev("new", 1)) == 20
    assert effective_weight(rev("old", 2), rev("new", 2)) == 50
    assert effective_weight(rev("old", 4), rev("new", 1, ready=0)) == 0
    assert effective_weight(rev("old", 4), None) == 0
    assert [canary_count(w, 4) for w in (1, 10, 25, 50, 100)] == [1, 1, 1, 2, 4]
    assert all(canary_count(w, s) == max(1, math.ceil(w * s / 100)) for w in range(1, 101) for s in range(1, 9))


def test_state_round_trips_through_the_status() -> None:
    st = canary_state(step=1, ready_at=5, failed_checks=1, last_analysis=failed(30), previous_stable="older",
                      previous_stable_version="0.0.9")
    status = {"stableRevision": "chat-old", "stableVersion": "0.1.0", "canaryRevision": "chat-new",
              "canaryVersion": "0.2.0", **st.to_status("chat")}
    status = {k: v for k, v in status.items() if v is not None}
    assert RolloutState.from_status("chat", status) == dataclasses.replace(st, rollback_message="")


def test_default_steps_agree_with_the_crd() -> None:
    crd = yaml.safe_load((REPO / "crds" / "autoglm.io_autoglmdeployments.yaml").read_text())
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    default = schema["properties"]["spec"]["properties"]["rollout"]["properties"]["steps"]["default"]
    assert default == [s.model_dump(by_alias=True) for s in DEFAULT_STEPS]
