"""Rollout policy (pure): the canary state machine.

``decide()`` takes what is there (the revisions), what is wanted (the spec's revision and its rollout
policy), what the status remembers (``RolloutState``), the clock, the analysis verdict of this pass
and the control annotations, and returns a ``Decision``: which revision is stable, which is the
canary, how many pods each gets, which revisions go, the new ``RolloutState`` and the events. All
state lives in the CR's status, so an operator killed at any point resumes from it.

Phases (status.rolloutPhase)::

    Idle/Promoted/RolledBack --spec changes--> Progressing (step 0) --pause + passing check--> step 1 ...
    Progressing --last step done, or autoglm.io/promote--> Promoting --canary Ready at stable's count-->
        Promoted (Service/route and autoscaler move, old revision deleted; Progressing until its pods are gone)
    Progressing/Promoting --failureThreshold failed checks, deadline, autoglm.io/abort--> RolledBack
    Progressing <--autoglm.io/paused--> Paused
    any rollout --spec back to the stable's revision--> Idle (canary deleted at once, event Aborted)
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math

from .conditions import format_time
from .models import ResolvedSpec, RolloutSpec
from .names import revision_name
from .observe import Problem, Revision
from .rollout_state import Analysis, RolloutState

ANNOTATION_PROMOTE = "autoglm.io/promote"
ANNOTATION_ABORT = "autoglm.io/abort"
ANNOTATION_PAUSED = "autoglm.io/paused"

Event = tuple[str, str, str]


@dataclasses.dataclass(frozen=True)
class Decision:
    stable: str  # hash of the revision that serves (may not exist yet on first rollout)
    canary: str | None  # hash of the canary revision
    replicas: dict[str, int | None]  # spec.replicas per kept revision; None = the autoscaler's
    serving: tuple[str, ...]  # revisions behind the shared Service (Replicas routing)
    route_weight: int  # canary weight in the HTTPRoute (GatewayAPI routing), percent
    delete: tuple[str, ...]  # hashes whose Deployments go
    state: RolloutState
    events: tuple[Event, ...] = ()
    clear_annotations: tuple[str, ...] = ()
    requeue_after: float | None = None
    problem: Problem | None = None  # the rollout's Degraded reason (AnalysisFailed, RolledBack)
    progressing: tuple[str, str] | None = None  # (reason, message) of Progressing=True; None = status decides


def stable_count(r: ResolvedSpec, stable: Revision | None) -> int:
    """The stable revision's pods wanted now: the fixed count, or the autoscaler's current choice."""
    if not r.spec.autoscaling.enabled:
        return r.spec.fixed_replicas
    lo, hi = r.spec.autoscaling.bounds
    return min(max(stable.desired, lo), hi) if stable is not None else lo


def canary_count(weight: int, stable_pods: int) -> int:
    """Canary pods for ``weight`` percent of the stable's load: ceil(weight x stable / 100), at least 1."""
    return max(1, math.ceil(weight * stable_pods / 100)) if weight > 0 else 0


def effective_weight(stable: Revision | None, canary: Revision | None) -> int:
    """The canary's share of Ready pods (what a Service splitting by pod count gives it), percent."""
    c = canary.ready if canary else 0
    s = stable.ready if stable else 0
    return round(100 * c / (c + s)) if c + s > 0 and c > 0 else 0


def _pick_stable(desired: str, revisions: dict[str, Revision], remembered: str | None) -> str:
    if remembered and (remembered in revisions or not revisions):
        return remembered
    others = {h: rv for h, rv in revisions.items() if h != desired}
    if not others:
        return desired
    # No status (restart before the first status write): the old revision with most ready pods serves.
    return max(others.values(), key=lambda rv: (rv.ready, rv.created, rv.name)).hash


def analysis_window(spec: RolloutSpec, state: RolloutState, desired: str, now: dt.datetime) -> dt.datetime | None:
    """Start of the window to check now, or ``None`` when no check is due.

    A check is due ``interval`` after the later of: the canary reaching the step's weight, the last
    check. The last check's time is in the status, so a restart never counts a window twice.
    """
    if spec.analysis is None or state.phase != "Progressing" or state.canary != desired or not state.step_ready_at:
        return None
    start = state.step_ready_at
    last = state.last_analysis
    if last is not None and last.time > start:
        start = last.time
    return start if (now - start).total_seconds() >= spec.analysis.interval_seconds else None


def _replicas(
    r: ResolvedSpec, weight: int, stable: Revision | None, canary: Revision | None
) -> tuple[int | None, int, int]:
    """(stable's spec.replicas or None for the autoscaler's, canary's spec.replicas, canary's target).

    Without maxSurge the stable is untouched and the canary gets ceil(weight x stable / 100) pods on
    top. With maxSurge the total stays within stable + maxSurge: the canary grows into the room there
    is, and a stable pod goes only when a Ready canary pod has taken its place, never below what the
    stable's own share needs.
    """
    s_count = stable_count(r, stable)
    target = s_count if weight >= 100 else canary_count(weight, s_count)
    surge = r.spec.rollout.max_surge  # only with a fixed count (the models and the CRD refuse it with autoscaling)
    if surge is None:
        return None if r.spec.autoscaling.enabled else s_count, target, target
    stable_pods = max(stable.desired, stable.pods) if stable else 0
    c_want = min(target, max(0, s_count + surge - stable_pods))
    share = 0 if weight >= 100 else math.ceil((100 - weight) * s_count / 100)
    c_ready = canary.ready if canary else 0
    s_want = max(share, s_count - c_ready, s_count + surge - target)
    return min(s_count, s_want), c_want, target


def decide(
    *,
    r: ResolvedSpec,
    desired: str,
    revisions: dict[str, Revision],
    state: RolloutState,
    now: dt.datetime,
    analysis: Analysis | None = None,
    annotations: dict[str, str] | None = None,
    draining: int = 0,
) -> Decision:
    """The next step of the rollout (see the module's docstring for the phases)."""
    return _Machine(r, desired, revisions, state, now, analysis, annotations or {}, draining).run()


class _Machine:
    """One pass of the state machine; ``run()`` returns the Decision. Pure: no I/O, no clock of its own."""

    def __init__(
        self,
        r: ResolvedSpec,
        desired: str,
        revisions: dict[str, Revision],
        state: RolloutState,
        now: dt.datetime,
        analysis: Analysis | None,
        annotations: dict[str, str],
        draining: int,
    ) -> None:
        self.r, self.spec, self.desired, self.revs = r, r.spec.rollout, desired, revisions
        self.state, self.now, self.analysis, self.draining = state, now, analysis, draining
        self.promote = annotations.get(ANNOTATION_PROMOTE) == "true"
        self.abort = annotations.get(ANNOTATION_ABORT) == "true"
        self.paused = annotations.get(ANNOTATION_PAUSED) == "true"
        self.clear = tuple(a for a in (ANNOTATION_PROMOTE, ANNOTATION_ABORT) if a in annotations)
        self.events: list[Event] = []
        self.stable = _pick_stable(desired, revisions, state.stable)
        self.stable_version = (
            revisions[self.stable].version if self.stable in revisions else state.stable_version or r.version
        )
        if self.stable == desired:
            self.stable_version = r.version

    # ------------------------------------------------------------ outcomes

    def _steady(self, state: RolloutState, problem: Problem | None = None) -> Decision:
        """No canary: the stable serves everything, every other revision goes."""
        stable = self.revs.get(self.stable)
        hpa_owned = self.r.spec.autoscaling.enabled and stable is not None
        replicas: dict[str, int | None] = {self.stable: None if hpa_owned else stable_count(self.r, stable)}
        progressing = None
        if state.phase in ("Promoted", "Promoting") and self.draining:
            progressing = (
                "Promoted",
                f"Revision {self._name(self.stable)} is promoted; {self.draining} pod(s) of the old revision "
                "are draining",
            )
            state = dataclasses.replace(state, phase="Promoting")
        elif state.phase == "Promoting":
            state = dataclasses.replace(state, phase="Promoted")
        return Decision(
            stable=self.stable,
            canary=None,
            replicas=replicas,
            serving=(self.stable,),
            route_weight=0,
            delete=tuple(sorted(h for h in self.revs if h != self.stable)),
            state=dataclasses.replace(
                state,
                stable=self.stable,
                stable_version=self.stable_version,
                canary=None,
                canary_version=None,
                step=None,
                step_started_at=None,
                step_ready_at=None,
                failed_checks=0,
            ),
            events=tuple(self.events),
            clear_annotations=self.clear,
            problem=problem,
            progressing=progressing,
            requeue_after=2.0 if progressing else None,
        )

    def _rollback(self, st: RolloutState, why: str, reason: str = "RolledBack") -> Decision:
        msg = f"Rolled back revision {self._name(self.desired)} (version {self.r.version}): {why}"
        self.events.append(("Warning", reason, msg))
        state = dataclasses.replace(st, phase="RolledBack", rolled_back=self.desired, rollback_message=msg)
        return self._steady(state, Problem("RolledBack", msg))

    def _name(self, h: str | None) -> str:
        return revision_name(self.r.name, h or "")

    # ------------------------------------------------------------ the machine

    def run(self) -> Decision:
        st = self.state
        if self.stable == self.desired:
            if st.canary and st.canary != self.stable:
                self.events.append(
                    (
                        "Normal",
                        "Aborted",
                        f"Aborted the rollout of {self._name(st.canary)}: the spec is back to the stable "
                        f"revision {self._name(self.stable)} (version {self.stable_version})",
                    )
                )
                return self._steady(dataclasses.replace(st, phase="Idle", rolled_back=None, last_analysis=None))
            phase = "Idle" if st.phase in ("RolledBack", "Progressing", "Paused") else st.phase
            return self._steady(dataclasses.replace(st, phase=phase, rolled_back=None))
        if self.desired == st.rolled_back:
            msg = st.rollback_message or f"Rolled back revision {self._name(self.desired)}"
            return self._steady(dataclasses.replace(st, phase="RolledBack"), Problem("RolledBack", msg))

        if st.canary != self.desired:  # a new rollout, or a newer revision superseding the canary
            if st.canary and st.canary != self.stable:
                self.events.append(
                    (
                        "Normal",
                        "Superseded",
                        f"Revision {self._name(self.desired)} replaced canary {self._name(st.canary)}",
                    )
                )
            self.events.append(
                (
                    "Normal",
                    "CanaryStarted",
                    f"Started canary {self._name(self.desired)} (version {self.r.version}) against stable "
                    f"{self._name(self.stable)} (version {self.stable_version})",
                )
            )
            # A stable with no Ready pod serves nothing: no traffic to protect, no steps to walk.
            stable = self.revs.get(self.stable)
            walk = bool(self.spec.steps) and (stable is None or stable.ready > 0)
            st = RolloutState(
                phase="Progressing" if walk else "Promoting",
                stable=self.stable,
                stable_version=self.stable_version,
                canary=self.desired,
                canary_version=self.r.version,
                step=0 if walk else len(self.spec.steps),
                step_started_at=self.now,
                previous_stable=st.previous_stable,
                previous_stable_version=st.previous_stable_version,
            )
        if self.abort:
            return self._rollback(st, "aborted by the autoglm.io/abort annotation", reason="Aborted")

        st = self._record_analysis(st)
        if st.failed_checks >= (self.spec.analysis.failure_threshold if self.spec.analysis else 1):
            assert st.last_analysis is not None
            return self._rollback(st, f"{st.failed_checks} failed checks in a row; last: {st.last_analysis.reason}")
        if self.promote and st.phase in ("Progressing", "Paused"):
            self.events.append(("Normal", "Promoting", "Skipping the remaining steps (autoglm.io/promote)"))
            st = dataclasses.replace(
                st, phase="Promoting", step=len(self.spec.steps), step_started_at=self.now, step_ready_at=None
            )
        if self.paused and st.phase == "Progressing":
            self.events.append(("Normal", "Paused", f"Paused at step {st.step} (autoglm.io/paused)"))
            st = dataclasses.replace(st, phase="Paused")
        elif not self.paused and st.phase == "Paused":
            self.events.append(("Normal", "Resumed", f"Resumed at step {st.step}; its pause starts again"))
            st = dataclasses.replace(st, phase="Progressing", step_started_at=self.now, step_ready_at=None)
        return self._canary(st)

    def _record_analysis(self, st: RolloutState) -> RolloutState:
        a = self.analysis
        if a is None:
            return st
        failed = st.failed_checks + 1 if a.verdict == "Failed" else 0 if a.verdict == "Passed" else st.failed_checks
        if a.verdict == "Failed":
            self.events.append(("Warning", "AnalysisFailed", a.reason))
        return dataclasses.replace(st, last_analysis=a, failed_checks=failed)

    def _canary(self, st: RolloutState) -> Decision:
        steps = self.spec.steps
        stable, canary = self.revs.get(self.stable), self.revs.get(self.desired)
        step, started = st.step, st.step_started_at
        assert step is not None and started is not None
        weight = 100 if st.phase == "Promoting" else steps[step].weight
        s_replicas, c_replicas, c_target = _replicas(self.r, weight, stable, canary)
        at_weight = canary is not None and canary.current and canary.ready >= c_target and canary.desired == c_target
        deadline = float(self.spec.progress_deadline_seconds)
        since_start = (self.now - started).total_seconds()
        requeue: list[float] = []

        if st.phase == "Promoting":
            if at_weight and canary is not None and canary.is_ready:
                return self._promoted(st)
            if since_start > deadline:
                ready = canary.ready if canary else 0
                return self._rollback(st, f"not Ready at {c_target} replicas within {deadline:.0f}s ({ready} ready)")
            progressing = (
                "Promoting",
                f"Scaling canary {self._name(self.desired)} to {c_target} replicas before it takes all traffic "
                f"({canary.ready if canary else 0} ready)",
            )
            requeue.append(deadline - since_start)
        else:
            if at_weight and st.step_ready_at is None:
                st = dataclasses.replace(st, step_ready_at=self.now)
            pause = steps[step].pause_seconds
            if st.step_ready_at is None:
                if since_start > deadline and st.phase == "Progressing":
                    ready = canary.ready if canary else 0
                    return self._rollback(
                        st, f"not Ready at step {st.step} ({c_target} replicas) within {deadline:.0f}s ({ready} ready)"
                    )
                requeue.append(deadline - since_start)
                reason, msg = "CanaryProgressing", f"Waiting for {c_target} Ready canary pod(s) at step {st.step}"
            else:
                held = (self.now - st.step_ready_at).total_seconds()
                checked = self.spec.analysis is None or (
                    st.last_analysis is not None
                    and st.last_analysis.verdict == "Passed"
                    and st.last_analysis.time > st.step_ready_at
                )
                if st.phase == "Progressing" and held >= pause and checked:
                    return self._advance(st)
                reason, msg = self._waiting(st, held, pause)
                if st.phase == "Progressing" and held > pause + deadline:
                    return self._rollback(
                        st,
                        f"no passing analysis within {deadline:.0f}s after the pause of step {st.step}; last: "
                        + (st.last_analysis.reason if st.last_analysis else "no check"),
                    )
                if pause > held:
                    requeue.append(pause - held)
                if self.spec.analysis is not None:
                    last = st.last_analysis.time if st.last_analysis else st.step_ready_at
                    start = max(last, st.step_ready_at)
                    requeue.append(self.spec.analysis.interval_seconds - (self.now - start).total_seconds())
                requeue.append(pause + deadline - held)
            if st.phase == "Paused":
                reason, msg = "CanaryPaused", f"Paused at step {st.step} by autoglm.io/paused=true"
                requeue = []  # nothing moves until the annotation changes (a CR event)
            progressing = (reason, msg)

        serving = (self.stable, self.desired) if canary is not None and canary.ready > 0 else (self.stable,)
        problem = None
        if st.failed_checks and st.last_analysis is not None:
            problem = Problem("AnalysisFailed", f"{st.failed_checks} failed check(s): {st.last_analysis.reason}")
        return Decision(
            stable=self.stable,
            canary=self.desired,
            replicas={self.stable: s_replicas, self.desired: c_replicas},
            serving=serving,
            route_weight=self._route_weight(st, canary, weight),
            delete=tuple(sorted(h for h in self.revs if h not in (self.stable, self.desired))),
            state=st,
            events=tuple(self.events),
            clear_annotations=self.clear,
            requeue_after=max(1.0, min(requeue)) if requeue else None,
            problem=problem,
            progressing=progressing,
        )

    def _route_weight(self, st: RolloutState, canary: Revision | None, weight: int) -> int:
        """GatewayAPI: the canary's weight; while promoting it keeps the last step's until it is promoted."""
        if canary is None or canary.ready == 0:
            return 0
        if st.phase == "Promoting":
            return self.spec.steps[-1].weight if self.spec.steps else 0
        return weight

    def _waiting(self, st: RolloutState, held: float, pause: float) -> tuple[str, str]:
        """Progressing's reason and message while a step holds (no countdown: the message stays put)."""
        assert st.step is not None and st.step_ready_at is not None
        if pause > held:
            until = format_time(st.step_ready_at + dt.timedelta(seconds=pause))
            weight = self.spec.steps[st.step].weight
            return "CanaryProgressing", f"Step {st.step} ({weight}%): holding until {until}"
        last = st.last_analysis
        if last is not None and last.verdict == "Inconclusive" and last.time > (st.step_ready_at or last.time):
            return "AnalysisInconclusive", f"Step {st.step}: waiting for a conclusive check; last: {last.reason}"
        return "CanaryProgressing", f"Step {st.step}: waiting for a passing analysis check"

    def _advance(self, st: RolloutState) -> Decision:
        steps = self.spec.steps
        assert st.step is not None
        nxt = st.step + 1
        if nxt < len(steps):
            self.events.append(
                ("Normal", "StepAdvanced", f"Step {nxt}: canary {self._name(self.desired)} at {steps[nxt].weight}%")
            )
            st = dataclasses.replace(st, step=nxt, step_started_at=self.now, step_ready_at=None)
        else:
            self.events.append(
                ("Normal", "Promoting", f"Steps done: scaling canary {self._name(self.desired)} to the stable's count")
            )
            st = dataclasses.replace(st, phase="Promoting", step=nxt, step_started_at=self.now, step_ready_at=None)
        return self._canary(st)

    def _promoted(self, st: RolloutState) -> Decision:
        old = self.stable
        self.events.append(
            (
                "Normal",
                "Promoted",
                f"Revision {self._name(self.desired)} (version {self.r.version}) replaced {self._name(old)} "
                f"(version {self.stable_version}) and serves all traffic",
            )
        )
        promoted = dataclasses.replace(
            st,
            phase="Promoting",
            previous_stable=old,
            previous_stable_version=self.stable_version,
            rolled_back=None,
        )
        self.stable, self.stable_version = self.desired, self.r.version
        self.draining = max(self.draining, 1)  # the old revision's pods go from here
        return self._steady(promoted)
