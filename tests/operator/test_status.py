"""compute_status and friends: a pure function from observed state to status."""

from __future__ import annotations

import datetime as dt

from autoglm_operator import builders as b
from autoglm_operator.observe import Problem, Revision, pod_problems
from autoglm_operator.policy import decide
from autoglm_operator.rollout_state import RolloutState
from autoglm_operator.status import compute_status, status_patch, transition_events
from autoglm_operator.models import AutoGLMDeploymentStatus
from tests.operator.test_builders import cr_for, resolved

SPEC = {"model": {"uri": "hf://a/b"}, "runtime": {"version": "0.1.0"}, "replicas": 2}


def rev(h: str, *, desired: int = 2, ready: int = 0, version: str = "0.1.0", created: str = "2026-01-01T00:00:00Z") -> Revision:
    return Revision(hash=h, name=f"chat-{h}", version=version, desired=desired, replicas=desired, ready=ready,
                    updated=desired, current=True, created=created, uid=f"uid-{h}", spec_hash="x")


NOW = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def decided(revisions, stable="new", desired="new", spec=SPEC, **state):
    """What the rollout policy decides for these revisions (a canary when ``desired`` is not stable)."""
    return decide(r=resolved("chat", spec), desired=desired, revisions=revisions,
                  state=RolloutState(stable=stable, **state), now=NOW)


def status(revisions, decision, problems=(), old=None, spec=SPEC):
    cr = cr_for("chat", spec)
    if old:
        cr["status"] = old
    st = compute_status(cr=cr, r=resolved("chat", spec), decision=decision,
                        revisions=revisions, problems=list(problems), now="T0")
    # Every key is one the CRD declares (extra="forbid"): the apiserver would prune anything else.
    AutoGLMDeploymentStatus.model_validate(st)
    return st


def cond(st, t):
    return next(c for c in st["conditions"] if c["type"] == t)


def test_pending_before_anything_is_ready() -> None:
    st = status({"new": rev("new")}, decided({"new": rev("new")}))
    assert st["phase"] == "Pending"
    assert st["ready"] == "0/2" and st["desiredReplicas"] == 2
    assert cond(st, "Ready")["status"] == "False"
    assert st["stableRevision"] == "chat-new" and st["stableVersion"] == "0.1.0"
    assert st["endpoint"] == "http://chat.demo.svc.cluster.local:8000/v1"
    assert st["selector"] == "autoglm.io/deployment=chat"
    assert st["canaryWeight"] == 0 and "canaryRevision" not in st


def test_healthy_when_all_ready() -> None:
    st = status({"new": rev("new", ready=2)}, decided({"new": rev("new", ready=2)}))
    assert st["phase"] == "Healthy"
    assert cond(st, "Ready") | {} == {"type": "Ready", "status": "True", "reason": "ReplicasReady",
                                      "message": "2/2 replicas of revision chat-new are ready",
                                      "observedGeneration": 1, "lastTransitionTime": "T0"}
    assert cond(st, "Progressing")["status"] == "False"
    assert cond(st, "Degraded")["status"] == "False"
    assert st["revisions"] == [{"name": "chat-new", "version": "0.1.0", "replicas": 2, "readyReplicas": 2}]


def test_progressing_during_rollout_and_ready_stays_true() -> None:
    revs = {"old": rev("old", ready=2), "new": rev("new", ready=1, version="0.2.0")}
    spec = {**SPEC, "runtime": {"version": "0.2.0"}}
    st = status(revs, decided(revs, stable="old", spec=spec, stable_version="0.1.0"), spec=spec)
    assert st["phase"] == "Progressing"
    assert st["canaryRevision"] == "chat-new" and st["canaryVersion"] == "0.2.0"
    assert st["stableVersion"] == "0.1.0"
    assert cond(st, "Ready")["status"] == "True"
    assert cond(st, "Progressing")["reason"] == "CanaryProgressing"
    assert st["rolloutPhase"] == "Progressing" and st["currentStep"] == 0
    assert st["replicas"] == 4 and st["readyReplicas"] == 3


def test_degraded_wins_and_names_the_reason() -> None:
    st = status({"new": rev("new")}, decided({"new": rev("new")}),
                problems=[Problem("SecretNotFound", "Secret k not found in namespace demo")])
    assert st["phase"] == "Degraded"
    assert cond(st, "Degraded")["reason"] == "SecretNotFound"


def test_transition_time_survives_recompute() -> None:
    first = status({"new": rev("new", ready=2)}, decided({"new": rev("new", ready=2)}))
    cr_status = {**first}
    cr_status["conditions"] = [dict(c, lastTransitionTime="EARLIER") for c in first["conditions"]]
    again = status({"new": rev("new", ready=2)}, decided({"new": rev("new", ready=2)}), old=cr_status)
    assert all(c["lastTransitionTime"] == "EARLIER" for c in again["conditions"])
    assert status_patch(cr_status, again) is None


def test_status_patch_nulls_removed_keys() -> None:
    assert status_patch({"a": 1, "canaryRevision": "x"}, {"a": 1}) == {"canaryRevision": None}
    assert status_patch({"a": 1}, {"a": 2}) == {"a": 2}


def test_events_only_on_transitions() -> None:
    pending = status({"new": rev("new")}, decided({"new": rev("new")}))
    healthy = status({"new": rev("new", ready=2)}, decided({"new": rev("new", ready=2)}), old=pending)
    kinds = [e[1] for e in transition_events(pending, healthy)]
    assert kinds == ["Ready"]
    assert transition_events(healthy, healthy) == []
    degraded = status({"new": rev("new")}, decided({"new": rev("new")}), old=healthy,
                      problems=[Problem("Unschedulable", "0/3 nodes are available")])
    assert [e[1] for e in transition_events(healthy, degraded)] == ["Degraded"]
    assert [e[1] for e in transition_events(degraded, healthy)] == ["Ready", "Recovered"]
    three = {"new": rev("new", desired=3, ready=2)}
    scaled = status(three, decided(three, spec={**SPEC, "replicas": 3}), old=healthy, spec={**SPEC, "replicas": 3})
    assert "ScaledUp" in [e[1] for e in transition_events(healthy, scaled)]


def test_pod_problems_reports_unschedulable_with_the_schedulers_message() -> None:
    msg = "0/3 nodes are available: 3 node(s) didn't match Pod's node affinity/selector."
    pods = [{"metadata": {"name": f"chat-new-{i}", "labels": {b.LABEL_REVISION: "new"}},
             "status": {"conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                                        "message": msg}]}} for i in range(2)]
    pods.append({"metadata": {"name": "chat-new-x", "labels": {b.LABEL_REVISION: "new"}},
                 "status": {"containerStatuses": [{"state": {"waiting": {"reason": "ErrImagePull", "message": "nope"}}}]}})
    problems = pod_problems(pods, {"new": rev("new")})
    assert problems[0] == Problem("Unschedulable", f"2 pod(s) of revision chat-new: {msg}")
    assert problems[1].reason == "ImagePullBackOff"


def test_pod_problems_crash_loop_quotes_the_containers_last_words() -> None:
    pod = {"metadata": {"name": "p", "labels": {b.LABEL_REVISION: "new"}},
           "status": {"containerStatuses": [{
               "name": "runtime",
               "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 10s restarting failed container"}},
               "lastState": {"terminated": {"exitCode": 1, "message": "loading\nautoglm-runtime: error: bad config\n"}}}]}}
    problems = pod_problems([pod], {"new": rev("new")})
    assert problems == [Problem("CrashLoopBackOff", "1 pod(s) of revision chat-new: container runtime exited with "
                                                    "code 1: autoglm-runtime: error: bad config")]


def test_deployment_problems_put_refused_pods_first() -> None:
    from autoglm_operator.observe import deployment_problems

    dep = {"metadata": {"name": "chat-new", "labels": {b.LABEL_REVISION: "new"}, "generation": 1},
           "spec": {"replicas": 1},
           "status": {"observedGeneration": 1, "conditions": [
               {"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded", "message": "slow"},
               {"type": "ReplicaFailure", "status": "True", "reason": "FailedCreate",
                "message": 'pods "x" is forbidden: violates PodSecurity "restricted:latest"'}]}}
    problems = deployment_problems([Revision.from_deployment(dep)])
    assert [p.reason for p in problems] == ["PodCreationRefused", "ProgressDeadlineExceeded"]
    assert "violates PodSecurity" in problems[0].message


def test_max_surge_counts_canary_pods_standing_in_for_stable_ones() -> None:
    spec = {**SPEC, "replicas": 4, "runtime": {"version": "0.2.0"}, "rollout": {"maxSurge": 1}}
    revs = {"old": rev("old", desired=3, ready=3), "new": rev("new", desired=2, ready=1, version="0.2.0")}
    d = decided(revs, stable="old", spec=spec, stable_version="0.1.0", phase="Progressing", canary="new",
                canary_version="0.2.0", step=1, step_started_at=NOW)
    st = status(revs, d, spec=spec)
    assert st["ready"] == "4/4" and cond(st, "Ready")["status"] == "True"
    plain = {**spec, "rollout": {}}
    st = status(revs, decided(revs, stable="old", spec=plain, stable_version="0.1.0"), spec=plain)
    assert st["ready"] == "3/4"  # without maxSurge canary pods are extra: the stable itself is short


ZERO_SPEC = {"model": {"uri": "hf://a/b"}, "runtime": {"version": "0.1.0"}, "router": {"enabled": True},
             "autoscaling": {"enabled": True, "provider": "KEDA", "minReplicas": 0, "maxReplicas": 2}}


def test_scaled_to_zero_is_ready_to_wake_not_degraded() -> None:
    """KEDA took the revision to 0 pods: a normal state (Ready, the router holds requests), not Pending or
    Degraded; when KEDA wakes it (1 wanted, none Ready yet) it is Pending until the pod is Ready."""
    zero = {"new": rev("new", desired=0, ready=0)}
    st = status(zero, decided(zero, spec=ZERO_SPEC), spec=ZERO_SPEC)
    assert st["phase"] == "ScaledToZero" and st["ready"] == "0/0"
    assert cond(st, "Ready")["status"] == "True" and cond(st, "Ready")["reason"] == "ScaledToZero"
    assert cond(st, "Degraded")["status"] == "False"
    waking = {"new": rev("new", desired=1, ready=0)}
    st = status(waking, decided(waking, spec=ZERO_SPEC), old=st, spec=ZERO_SPEC)
    assert st["phase"] == "Pending" and cond(st, "Ready")["reason"] == "ReplicasNotReady"
    up = {"new": rev("new", desired=1, ready=1)}
    st = status(up, decided(up, spec=ZERO_SPEC), old=st, spec=ZERO_SPEC)
    assert st["phase"] == "Healthy" and cond(st, "Ready")["reason"] == "ReplicasReady"
