"""Canary rollouts end to end: real runtime pods on the process node, real Prometheus, real traffic.

Every scenario runs the real `autoglm-operator` process, sends streaming and non-streaming requests
through the Service's ClusterIP during the whole rollout (tests/e2e/traffic.py), records who answered
each request (the runtime's `x-autoglm-revision` header) and samples the CR's status and the pods twice
a second (`Watch`). Bad canaries fail for real reasons: a model that cannot load, a revision that is
slower under the same load, a `maxModelLen` too small for the traffic's prompts.

Analysis windows are short (interval 5 s, Prometheus scrapes every second), so a scenario takes a
minute or two. Figures (time to promotion against the sum of pauses, rollback reaction times, failed
requests) are printed with `-s`.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.e2e.test_runtime_pods import service_ip, tiny
from tests.e2e.traffic import Traffic
from tests.helpers import report, wait_for
from tests.operator.test_operator_cluster import (  # noqa: F401 - fixtures
    apply,
    condition,
    crd,
    event_reasons,
    get,
    merge,
    op_env,
    operator_process,
    try_get,
    wait_phase,
)

pytestmark = [pytest.mark.cluster, pytest.mark.runtime]

NAME = "chat"
INTERVAL = 5.0  # analysis interval (seconds)
FAILURE_THRESHOLD = 2
GROUP, VERSION, PLURAL = "autoglm.io", "v1alpha1", "autoglmdeployments"
CLI = Path(sys.executable).parent / "autoglm"
LABEL_REVISION = "autoglm.io/revision"


# ------------------------------------------------------------------ the resource


def analysis(kube, **over) -> dict:
    """Analysis on the cluster's Prometheus with short windows; ``over`` replaces any field."""
    return {
        "prometheus": {"address": kube.prometheus_url},
        "interval": f"{INTERVAL:.0f}s",
        "minRequests": 10,
        "successRateMin": 0.95,
        "failureThreshold": FAILURE_THRESHOLD,
        **over,
    }


def canary_cr(
    replicas: int = 2, steps: list[dict] | None = None, analysis: dict | None = None, deadline: int = 120, **rollout
) -> dict:
    """The tiny model with ``replicas`` pods and a canary rollout."""
    body = tiny(NAME, replicas=replicas, runtime={"version": "0.1.0", "maxBatchSize": 8, "maxQueue": 64})
    spec = {
        "steps": steps or [{"weight": 34, "pause": "5s"}, {"weight": 67, "pause": "5s"}],
        "trafficRouting": "Replicas",
        "progressDeadlineSeconds": deadline,
        **rollout,
    }
    if analysis is not None:
        spec["analysis"] = analysis
    body["spec"]["rollout"] = spec
    return body


# ------------------------------------------------------------------ observing


@dataclass
class Sample:
    t: float  # monotonic
    status: dict
    pods: list[tuple[str, str, bool]]  # (name, revision, ready), terminating pods left out
    all_pods: int  # every pod object, terminating included (what occupies the node)
    desired: dict[str, int] = field(default_factory=dict)  # Deployments' spec.replicas by revision

    @property
    def weight(self) -> int:
        return int(self.status.get("canaryWeight") or 0)

    def ready(self, revision: str | None) -> int:
        return sum(1 for _, rev, ok in self.pods if ok and rev == revision)

    @property
    def canary_rev(self) -> str | None:
        return _hash(self.status.get("canaryRevision"))

    @property
    def stable_rev(self) -> str | None:
        return _hash(self.status.get("stableRevision"))

    def pod_ratio(self) -> float:
        """The canary's share of the ready pods behind the Service (Replicas routing)."""
        canary, total = self.ready(self.canary_rev), sum(1 for _, _, ok in self.pods if ok)
        return canary / total if total else 0.0


def _hash(revision_name: str | None) -> str | None:
    """``chat-5d8f…`` (status, Deployment name) → ``5d8f…`` (pod label, metrics, the response header)."""
    return revision_name[len(NAME) + 1 :] if revision_name else None


class Watch:
    """The CR's status and the pods, sampled every ``period`` seconds in a thread (kubernetes client: no
    kubectl processes on a two-core machine)."""

    def __init__(self, kube, namespace: str, period: float = 0.5) -> None:
        from kubernetes import client

        api = kube.api_client()
        self.custom, self.core, self.apps = client.CustomObjectsApi(api), client.CoreV1Api(api), client.AppsV1Api(api)
        self.ns, self.period = namespace, period
        self.samples: list[Sample] = []
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name="watch")

    def sample(self) -> Sample:
        obj = self.custom.get_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, NAME)
        items = self.core.list_namespaced_pod(self.ns, label_selector=f"autoglm.io/deployment={NAME}").items
        pods = []
        for p in items:
            if p.metadata.deletion_timestamp:
                continue
            ready = any(c.type == "Ready" and c.status == "True" for c in (p.status.conditions or []))
            pods.append((p.metadata.name, p.metadata.labels.get(LABEL_REVISION), ready))
        deps = self.apps.list_namespaced_deployment(self.ns, label_selector=f"autoglm.io/deployment={NAME}").items
        desired = {d.metadata.labels.get(LABEL_REVISION): d.spec.replicas or 0 for d in deps}
        return Sample(time.monotonic(), obj.get("status") or {}, pods, len(items), desired)

    def _run(self) -> None:
        while not self.stop_event.is_set():
            try:
                self.samples.append(self.sample())
            except Exception:  # noqa: BLE001 - an apiserver hiccup skips one sample
                pass
            self.stop_event.wait(self.period)

    def __enter__(self) -> "Watch":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop_event.set()
        self.thread.join(timeout=10)

    def first(self, predicate: Callable[[Sample], bool], after: float = 0.0) -> Sample | None:
        return next((s for s in list(self.samples) if s.t >= after and predicate(s)), None)

    def weights(self) -> list[int]:
        """The distinct canary weights in the order they were seen (0 left out)."""
        seen: list[int] = []
        for s in list(self.samples):
            if s.weight and (not seen or seen[-1] != s.weight):
                seen.append(s.weight)
        return seen

    def steady_windows(self, settle: float = 2.0) -> list[tuple[float, float, int, float]]:
        """Stretches where the canary weight and the ready pods of both revisions did not change:
        ``(since, until, weight, canary pod ratio)``, each starting ``settle`` seconds late (kube-proxy
        follows the endpoints a moment after the pods turn Ready)."""
        out, start = [], None
        samples = [s for s in list(self.samples) if s.canary_rev]
        for prev, cur in zip(samples, samples[1:] + [None]):
            key = (prev.weight, prev.ready(prev.canary_rev), prev.ready(prev.stable_rev))
            start = start or prev
            if cur is None or (cur.weight, cur.ready(cur.canary_rev), cur.ready(cur.stable_rev)) != key:
                if prev.t - (start.t + settle) > 2.0 and key[0] > 0 and key[1] > 0:
                    out.append((start.t + settle, prev.t, key[0], start.pod_ratio()))
                start = None
        return out

    def timeline(self) -> str:
        rows, last = [], None
        t0 = self.samples[0].t if self.samples else 0.0
        for s in list(self.samples):
            row = (
                s.status.get("rolloutPhase"),
                s.weight,
                s.status.get("currentStep"),
                s.status.get("failedChecks"),
                f"{s.ready(s.stable_rev)}({s.desired.get(s.stable_rev, '-')})",
                f"{s.ready(s.canary_rev)}({s.desired.get(s.canary_rev, '-')})",
                s.all_pods,
                (s.status.get("lastAnalysis") or {}).get("verdict"),
            )
            if row != last:
                rows.append(
                    f"  t={s.t - t0:6.1f}s phase={row[0]} weight={row[1]} step={row[2]} failed={row[3]} "
                    f"ready(desired) stable/canary={row[4]}/{row[5]} pods={row[6]} analysis={row[7]}"
                )
                last = row
        return "\n".join(rows)


# ------------------------------------------------------------------ acting


@dataclass
class Scenario:
    """One namespace, the operator process, and what a test does to the rollout."""

    kube: object
    ns: str
    log: Path
    env: dict[str, str] = field(default_factory=dict)

    def apply(self, body: dict) -> None:
        apply(self.kube, self.ns, body)

    def status(self) -> dict:
        return get(self.kube, self.ns, f"autoglmdeployment/{NAME}").get("status") or {}

    def patch(self, spec: dict) -> float:
        """Merge ``spec`` into the CR's spec; returns when (monotonic) the change was made."""
        t = time.monotonic()
        merge(self.kube, self.ns, f"autoglmdeployment/{NAME}", {"spec": spec})
        return t

    def set_version(self, version: str, **runtime) -> float:
        return self.patch({"runtime": {"version": version, **runtime}})

    def annotate(self, key: str, value: str | None = "true") -> None:
        """Set ``key=value``, or remove ``key`` when ``value`` is None."""
        arg = f"{key}-" if value is None else f"{key}={value}"
        self.kube.kubectl("annotate", "-n", self.ns, f"autoglmdeployment/{NAME}", arg, "--overwrite")

    def cli(self, *args: str, timeout: float = 240, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``kubectl autoglm rollout …`` as a user runs it: kubectl finds the plugin kubectl-autoglm on PATH."""
        env = {**self.env, "PATH": f"{self.kube.bin_dir}{os.pathsep}{CLI.parent}{os.pathsep}{os.environ['PATH']}"}
        proc = subprocess.run(
            ["kubectl", "autoglm", "rollout", *args, NAME, "-n", self.ns],
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"autoglm rollout {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}"
            )
        return proc

    def describe(self) -> str:
        return self.kubectl_out("describe", f"agd/{NAME}")

    def kubectl_out(self, *args: str) -> str:
        return self.kube.kubectl(*args, "-n", self.ns).stdout

    def url(self) -> str:
        return f"http://{service_ip(self.kube, self.ns, NAME)}:8000/v1"

    def traffic(self, **kw) -> Traffic:
        return Traffic(self.url(), "tiny", **kw)

    def wait(self, predicate: Callable[[dict], object], timeout: float, message: str) -> dict:
        """Poll the status until ``predicate(status)`` holds; returns that status."""

        def check():
            st = self.status()
            return st if predicate(st) else None

        return wait_for(check, timeout=timeout, interval=0.5, message=f"{message} (operator log: {self.log})")

    def wait_healthy(self, replicas: int, timeout: float = 180) -> dict:
        return wait_phase(self.kube, self.ns, NAME, "Healthy", timeout=timeout, ready=f"{replicas}/{replicas}")

    def wait_promoted(self, stable_before: str, timeout: float) -> dict:
        """The new revision is stable, no canary is left, and only its pods exist (the old ones drained)."""

        def done(st: dict) -> bool:
            if st.get("stableRevision") in (None, stable_before) or st.get("canaryRevision"):
                return False
            revs = {
                p["metadata"]["labels"][LABEL_REVISION]
                for p in get(self.kube, self.ns, "pods", "-l", f"autoglm.io/deployment={NAME}")["items"]
            }
            return revs == {_hash(st["stableRevision"])} and condition(st, "Progressing").get("status") == "False"

        return self.wait(done, timeout, "promoted, old pods gone")

    def wait_rolled_back(self, stable: str, timeout: float) -> dict:
        def done(st: dict) -> bool:
            return (
                st.get("stableRevision") == stable
                and not st.get("canaryRevision")
                and condition(st, "Degraded").get("reason") == "RolledBack"
            )

        return self.wait(done, timeout, "rolled back")

    def children(self) -> dict[str, list[str]]:
        """The operator's children in the namespace, by kind."""
        out = {}
        for kind in ("deployments", "services", "scaledobjects.keda.sh"):
            items = try_get(self.kube, self.ns, kind)
            out[kind] = sorted(i["metadata"]["name"] for i in (items or {}).get("items", []))
        return out


@pytest.fixture
def scenario(kube, crd, op_env, namespace, node_models, tmp_path) -> Iterator[Scenario]:
    """The real operator process for this namespace (killable), its log kept for the failure message."""
    log = tmp_path / "operator.log"
    env = {**op_env, "AUTOGLM_OPERATOR_RESYNC_SECONDS": "2"}
    with operator_process(env, namespace, log):
        yield Scenario(kube, namespace, log, env)


@contextmanager
def rolled_out(sc: Scenario, body: dict, replicas: int) -> Iterator[str]:
    """Apply ``body`` and wait until its first revision serves (straight to 100 %); yields the stable revision."""
    sc.apply(body)
    st = sc.wait_healthy(replicas)
    yield st["stableRevision"]


def pod_share(step_weight: int, stable: int) -> int:
    """The canary weight (percent) that Replicas routing gives a step: its share of the ready pods."""
    canary = max(1, math.ceil(step_weight * stable / 100))
    return round(100 * canary / (canary + stable))


def within_binomial(share: float, expected: float, n: int) -> bool:
    """``share`` of ``n`` answers is within 3 standard deviations (at least 0.08) of ``expected``."""
    return abs(share - expected) <= max(0.08, 3 * math.sqrt(expected * (1 - expected) / max(n, 1)))


def reaction(watch: Watch, since: float, what: Callable[[Sample], bool]) -> float | None:
    s = watch.first(what, after=since)
    return None if s is None else s.t - since


# ------------------------------------------------------------------ (a) a good canary


def test_good_canary_is_promoted_through_every_step_with_no_failed_request(kube, scenario):
    sc = scenario
    steps = [{"weight": 34, "pause": "5s"}, {"weight": 67, "pause": "5s"}]
    with rolled_out(sc, canary_cr(replicas=2, steps=steps, analysis=analysis(kube)), 2) as stable:
        with sc.traffic(streams=3, calls=3) as traffic, Watch(kube, sc.ns) as watch:
            traffic.wait_answers(30)
            t0 = sc.set_version("0.1.1")
            sc.wait(
                lambda st: st.get("currentStep") == 1 and st.get("canaryWeight") == pod_share(67, 2),
                120,
                "the second step's weight",
            )
            mid = f"$ kubectl get agd\n{sc.kubectl_out('get', 'agd')}\n$ kubectl describe agd {NAME}\n{sc.describe()}"
            st = sc.wait_promoted(stable, timeout=240)
            promoted_s = time.monotonic() - t0
            traffic.wait_answers(30)  # the new stable serves
    report(f"\n(a) during the second step:\n{mid}")
    report(f"\n(a) good canary timeline:\n{watch.timeline()}")
    pauses = sum(float(s["pause"].rstrip("s")) for s in steps)
    report(
        f"(a) version change → full promotion (old pods gone) {promoted_s:.1f}s; sum of pauses {pauses:.0f}s; "
        f"traffic: {traffic.summary()}"
    )
    assert traffic.failed == [], traffic.summary()
    # Replicas routing: each step runs ceil(weight x stable / 100) canary pods next to the stable's; the
    # status' canaryWeight is the canary's share of the ready pods.
    expected = [pod_share(s["weight"], 2) for s in steps]
    assert watch.weights() == expected, (expected, watch.timeline())
    for i, weight in enumerate(expected):
        assert watch.first(lambda s, i=i, w=weight: s.status.get("currentStep") == i and s.weight == w), i
    new = _hash(st["stableRevision"])
    for since, until, weight, ratio in watch.steady_windows():
        share, n = traffic.share(new, since, until)
        report(
            f"(a) weight {weight}%: canary answered {share:.2f} of {n} requests; its share of ready pods {ratio:.2f}"
        )
        if n >= 30:
            assert within_binomial(share, ratio, n), (weight, share, ratio, n)
    assert st["stableVersion"] == "0.1.1" and st.get("previousStableRevision") == stable
    assert {"CanaryStarted", "StepAdvanced", "Promoted"} <= set(event_reasons(kube, sc.ns, NAME))
    assert promoted_s >= pauses


# ------------------------------------------------------------------ (b) bad canaries, caught by real failures


def test_a_canary_whose_model_cannot_load_never_gets_traffic_and_is_rolled_back_at_the_deadline(kube, scenario):
    sc = scenario
    deadline = 30
    with rolled_out(sc, canary_cr(analysis=analysis(kube), deadline=deadline), 2) as stable:
        with sc.traffic(streams=2, calls=2) as traffic, Watch(kube, sc.ns) as watch:
            traffic.wait_answers(20)
            t0 = sc.patch({"model": {"uri": "file:///models/broken"}})
            st = sc.wait_rolled_back(stable, timeout=deadline + 60)
            back_s = time.monotonic() - t0
            traffic.wait_answers(20)
    report(f"\n(b) broken model timeline:\n{watch.timeline()}")
    report(
        f"(b) broken model: rolled back {back_s:.1f}s after the change (deadline {deadline}s); "
        f"traffic: {traffic.summary()}"
    )
    assert traffic.failed == [], traffic.summary()
    assert all(s.ready(s.canary_rev) == 0 for s in watch.samples), "a broken canary pod turned Ready"
    assert set(traffic.by_revision()) == {_hash(stable)}, "a request reached the broken canary"
    # status.stepStartedAt is kept in whole seconds (RFC 3339, as Kubernetes' own times), so the deadline
    # may be acted on up to 1 s before `deadline` seconds measured here with a sub-second clock.
    assert deadline - 1 <= back_s <= deadline + INTERVAL + 10, back_s
    assert "RolledBack" in event_reasons(kube, sc.ns, NAME)
    assert str(deadline) in condition(st, "Degraded")["message"] or "deadline" in condition(st, "Degraded")["message"]


def _bad_canary(kube, sc: Scenario, change: dict, analysis_over: dict, traffic_kw: dict, what: str):
    """Roll out ``change`` under load and wait for the rollback; returns (status after it, reaction seconds,
    traffic, watch, stable revision, when it rolled back).

    The reaction time runs from the first moment the canary had a Ready pod behind the Service (it could
    take traffic, so analysis could see it) to the rollback (weight 0, Degraded/RolledBack); it must be
    within failureThreshold x interval + one interval (+ 3 s: status polling and the status write)."""
    budget = FAILURE_THRESHOLD * INTERVAL + INTERVAL
    with rolled_out(sc, canary_cr(analysis=analysis(kube, **analysis_over), deadline=600), 2) as stable:
        with sc.traffic(**traffic_kw) as traffic, Watch(kube, sc.ns) as watch:
            traffic.wait_answers(20)
            sc.patch(change)
            sc.wait(lambda st: (st.get("canaryWeight") or 0) > 0, 120, "the canary serves")
            try:
                st = sc.wait_rolled_back(stable, timeout=budget + 3)
            finally:
                report(f"\n({what}) timeline:\n{watch.timeline()}\n({what}) status: {sc.status()}")
            t_back = time.monotonic()
            traffic.wait_answers(20)
    serving = watch.first(lambda s: s.weight > 0)
    assert serving is not None, f"the canary never served:\n{watch.timeline()}"
    react = t_back - serving.t
    report(
        f"({what}) rolled back {react:.1f}s after the canary first served (budget {budget:.0f}s, "
        f"measured by polling every 0.5s); last analysis {st.get('lastAnalysis')}; traffic: {traffic.summary()}"
    )
    assert react <= budget + 3, react
    return st, react, traffic, watch, stable, t_back


def test_a_slower_canary_is_caught_by_latency_and_rolled_back(kube, scenario):
    # maxBatchSize 1: the canary serves one request at a time, so under the same load its requests
    # queue; stable batches them. Caught by the ratio of its p99s to the stable's.
    st, react, traffic, watch, stable, _ = _bad_canary(
        kube,
        scenario,
        {"runtime": {"version": "0.1.1", "maxBatchSize": 1}},
        {"maxRatioToStable": 1.5, "successRateMin": 0.9},
        {"streams": 4, "calls": 4, "max_tokens": 16},
        "b slow",
    )
    assert traffic.failed == [], traffic.summary()
    assert st["lastAnalysis"]["verdict"] == "Failed", st["lastAnalysis"]
    assert "p99" in st["lastAnalysis"]["reason"], st["lastAnalysis"]


def test_a_canary_whose_max_model_len_is_too_small_is_caught_by_success_rate(kube, scenario):
    # Prompts of ~60 tokens; the canary's maxModelLen 48 refuses them (400 context_length_exceeded).
    prompt = "client {i} asks: " + "please summarise the following words " * 8
    st, react, traffic, watch, stable, t_back = _bad_canary(
        kube,
        scenario,
        {"model": {"maxModelLen": 48}},
        {},
        {"streams": 2, "calls": 2, "prompt": prompt},
        "b maxModelLen",
    )
    failed = traffic.failed
    assert failed and {a.revision for a in failed} == {
        watch.samples[-1].canary_rev or next(s.canary_rev for s in watch.samples if s.canary_rev)
    }
    assert all(a.start < t_back for a in failed), "requests failed after the rollback"
    assert st["lastAnalysis"]["verdict"] == "Failed" and st["lastAnalysis"]["successRate"] < 0.95
    report(f"(b maxModelLen) {len(failed)} requests failed, all answered by the canary before the rollback")


# ------------------------------------------------------------------ (c) too little traffic


def test_too_little_traffic_is_inconclusive_never_promoted_and_says_why(kube, scenario):
    sc = scenario
    steps = [{"weight": 50, "pause": "2s"}]
    with rolled_out(sc, canary_cr(steps=steps, analysis=analysis(kube, minRequests=20), deadline=600), 2) as stable:
        with sc.traffic(streams=1, calls=0, pause=1.0) as traffic, Watch(kube, sc.ns) as watch:
            sc.set_version("0.1.1")
            st = sc.wait(
                lambda st: (st.get("lastAnalysis") or {}).get("verdict") == "Inconclusive",
                timeout=120,
                message="an inconclusive analysis",
            )
            time.sleep(4 * INTERVAL)  # several more windows: still not promoted
            st = sc.status()
    report(f"\n(c) low traffic timeline:\n{watch.timeline()}\n(c) {st['lastAnalysis']}; traffic {traffic.summary()}")
    assert st["stableRevision"] == stable and st.get("canaryRevision"), st
    assert st["lastAnalysis"]["verdict"] == "Inconclusive" and st["lastAnalysis"]["requests"] < 20
    assert "20" in st["lastAnalysis"]["reason"], st["lastAnalysis"]  # says how many it needs
    prog = condition(st, "Progressing")
    assert prog["reason"] == "AnalysisInconclusive" and prog["status"] == "True", prog
    assert all(s.stable_rev == _hash(stable) for s in watch.samples)
    assert traffic.failed == [], traffic.summary()


# ------------------------------------------------------------------ (d) manual control


def test_pause_resume_promote_and_abort_by_annotation(kube, scenario):
    sc = scenario
    steps = [{"weight": 34, "pause": "1h"}, {"weight": 67, "pause": "1h"}]
    with rolled_out(sc, canary_cr(steps=steps, deadline=3600), 2) as first:
        with sc.traffic(streams=2, calls=2) as traffic:
            sc.set_version("0.1.1")
            sc.wait(lambda st: st.get("canaryWeight") == pod_share(34, 2), 120, "canary at step 0")
            sc.annotate("autoglm.io/paused")
            sc.wait(
                lambda st: (
                    st.get("rolloutPhase") == "Paused" and condition(st, "Progressing").get("reason") == "CanaryPaused"
                ),
                30,
                "paused",
            )
            sc.annotate("autoglm.io/paused", None)  # resume: the annotation removed
            sc.wait(lambda st: st.get("rolloutPhase") == "Progressing", 30, "resumed")
            sc.annotate("autoglm.io/promote")  # skips the remaining steps (and the hour of pause)
            second = sc.wait_promoted(first, timeout=180)["stableRevision"]
            assert "autoglm.io/promote" not in annotations(sc), "the promote annotation was not cleared"
            sc.set_version("0.1.2")
            sc.wait(lambda st: st.get("canaryWeight") == pod_share(34, 2), 120, "second canary at step 0")
            sc.annotate("autoglm.io/abort")
            st = sc.wait_rolled_back(second, timeout=60)
            wait_for(lambda: sc.children()["deployments"] == [second], timeout=60, message="canary removed")
            assert "autoglm.io/abort" not in annotations(sc), "the abort annotation was not cleared"
            traffic.wait_answers(20)
    report(f"\n(d) annotations: traffic {traffic.summary()}; after abort: {condition(st, 'Degraded')}")
    reasons = event_reasons(kube, sc.ns, NAME)
    assert {"Paused", "Resumed", "Promoting", "Promoted", "Aborted"} <= set(reasons), reasons
    assert st["stableVersion"] == "0.1.1" and st["rolloutPhase"] == "RolledBack", st
    assert traffic.failed == [], traffic.summary()


def annotations(sc: Scenario) -> dict[str, str]:
    return get(sc.kube, sc.ns, f"autoglmdeployment/{NAME}")["metadata"].get("annotations") or {}


def test_pause_resume_promote_abort_and_undo_with_kubectl_autoglm(kube, scenario):
    """The kubectl plugin (`kubectl autoglm rollout ...`, found on PATH as kubectl-autoglm) drives a rollout
    of real pods; `status --watch` exits 0 on promotion and 1 on rollback, as `kubectl rollout status` does."""
    sc = scenario
    steps = [{"weight": 34, "pause": "1h"}, {"weight": 67, "pause": "1h"}]
    with rolled_out(sc, canary_cr(steps=steps, analysis=analysis(kube), deadline=3600), 2) as first:
        with sc.traffic(streams=2, calls=2) as traffic:
            sc.set_version("0.1.1")
            sc.wait(
                lambda st: (
                    st.get("canaryWeight") == pod_share(34, 2)
                    and (st.get("lastAnalysis") or {}).get("verdict") == "Passed"
                ),
                120,
                "canary checked at step 0",
            )
            sc.cli("pause")
            sc.wait(lambda st: st.get("rolloutPhase") == "Paused", 30, "paused")
            paused = sc.cli("status").stdout
            sc.cli("resume")
            sc.wait(lambda st: st.get("rolloutPhase") == "Progressing", 30, "resumed")
            mid = sc.cli("status").stdout
            sc.cli("promote")
            done = sc.cli("status", "--watch", "--timeout", "180", check=False)
            assert done.returncode == 0, done.stdout + done.stderr
            second = sc.status()["stableRevision"]

            sc.set_version("0.1.2")
            sc.wait(lambda st: (st.get("canaryWeight") or 0) > 0, 120, "second canary serves")
            sc.cli("abort")
            rolled = sc.cli("status", "--watch", "--timeout", "120", check=False)
            assert rolled.returncode == 1, rolled.stdout + rolled.stderr
            sc.cli("undo")  # after a rollback: the spec goes back to the stable's version
            st = sc.wait(
                lambda st: st.get("rolloutPhase") == "Idle" and condition(st, "Degraded")["status"] == "False",
                60,
                "back to the stable, not degraded",
            )
            assert get(kube, sc.ns, f"agd/{NAME}")["spec"]["runtime"]["version"] == "0.1.1"
            sc.cli("undo")  # after a promotion: a canary rollout back to the previous stable's version
            sc.wait(lambda st: st.get("canaryVersion") == "0.1.0", 60, "a canary of the previous version")
            sc.cli("promote")
            back = sc.cli("status", "--watch", "--timeout", "180", check=False)
            assert back.returncode == 0, back.stdout + back.stderr
            traffic.wait_answers(20)
    report(f"\n(d) $ kubectl autoglm rollout status {NAME}   (paused at step 0)\n{paused}")
    report(f"\n(d) $ kubectl autoglm rollout status {NAME}   (resumed)\n{mid}")
    report(
        f"\n(d) $ kubectl autoglm rollout status --watch {NAME}   (promoted; last lines)\n"
        + "\n".join(done.stdout.splitlines()[-30:])
    )
    report(f"\n(d) $ kubectl autoglm rollout status --watch {NAME}   (aborted)\n{rolled.stdout[-1500:]}{rolled.stderr}")
    report(f"(d) kubectl autoglm: traffic {traffic.summary()}")
    st = sc.status()
    assert "Paused" in paused and "CanaryPaused" in paused, paused
    assert st["stableRevision"] == first and st["stableVersion"] == "0.1.0" and second != first, st
    assert traffic.failed == [], traffic.summary()


# ------------------------------------------------------------------ (e) superseded, reverted


def test_a_newer_revision_supersedes_the_canary_and_reverting_to_stable_aborts_at_once(kube, scenario):
    sc = scenario
    steps = [{"weight": 34, "pause": "1h"}, {"weight": 67, "pause": "1h"}]
    with rolled_out(sc, canary_cr(steps=steps, deadline=3600), 2) as stable:
        stable_pods = {n for n, _, _ in Watch(kube, sc.ns).sample().pods}
        with sc.traffic(streams=2, calls=2) as traffic, Watch(kube, sc.ns) as watch:
            sc.set_version("0.1.1")
            first = sc.wait(lambda st: st.get("canaryWeight") == pod_share(34, 2), 120, "canary 0.1.1 at step 0")[
                "canaryRevision"
            ]
            sc.set_version("0.1.2")
            st = sc.wait(
                lambda st: st.get("canaryVersion") == "0.1.2" and st.get("canaryWeight") == pod_share(34, 2),
                120,
                "0.1.2 supersedes 0.1.1",
            )
            second = st["canaryRevision"]
            wait_for(lambda: first not in sc.children()["deployments"], timeout=60, message="0.1.1 removed")
            t_revert = sc.set_version("0.1.0")
            st = sc.wait(
                lambda st: not st.get("canaryRevision") and st.get("canaryWeight") in (0, None),
                60,
                "reverted to stable",
            )
            revert_s = time.monotonic() - t_revert
            wait_for(lambda: sc.children()["deployments"] == [stable], timeout=60, message="only stable left")
            traffic.wait_answers(20)
    report(
        f"\n(e) supersede/revert timeline:\n{watch.timeline()}\n(e) reverted to stable {revert_s:.1f}s after "
        f"the spec change; traffic {traffic.summary()}"
    )
    assert first != second and st["stableRevision"] == stable
    assert {n for n, _, _ in watch.sample().pods} == stable_pods, "a stable pod was replaced"
    assert traffic.failed == [], traffic.summary()
    assert revert_s < 2 * INTERVAL, revert_s


# ------------------------------------------------------------------ (f) maxSurge


def test_max_surge_one_never_runs_more_than_replicas_plus_one_pods(kube, scenario):
    sc = scenario
    replicas = 3
    steps = [{"weight": 34, "pause": "3s"}, {"weight": 67, "pause": "3s"}]
    with rolled_out(sc, canary_cr(replicas=replicas, steps=steps, maxSurge=1), replicas) as stable:
        with sc.traffic(streams=2, calls=2) as traffic, Watch(kube, sc.ns, period=0.25) as watch:
            t0 = sc.set_version("0.1.1")
            sc.wait_promoted(stable, timeout=300)
            promoted_s = time.monotonic() - t0
    for a in traffic.failed:
        report(f"(f) failed at t={a.start - watch.samples[0].t:.2f}s: {a.error}")
    most = max(len(s.pods) for s in watch.samples)
    most_with_terminating = max(s.all_pods for s in watch.samples)
    report(
        f"\n(f) maxSurge 1 timeline:\n{watch.timeline()}\n(f) promoted in {promoted_s:.1f}s; most pods "
        f"{most} (with terminating ones {most_with_terminating}), replicas {replicas}; traffic {traffic.summary()}"
    )
    assert most <= replicas + 1, watch.timeline()
    assert traffic.failed == [], traffic.summary()
    assert min(s.ready(s.stable_rev) + s.ready(s.canary_rev) for s in watch.samples if s.canary_rev) >= replicas - 1, (
        "serving capacity dropped by more than the surge"
    )


# ------------------------------------------------------------------ (g) KEDA during a canary


def test_keda_keeps_scaling_stable_during_a_canary_and_promotion_has_no_cliff(kube, scenario, keda):
    """KEDA scales the stable on its own queue (its trigger names the stable's revision, so the canary's
    pods never count); the canary follows weight x the stable's current count; at promotion the canary is
    brought to the stable's count before it takes all traffic."""
    sc = scenario
    steps = [{"weight": 50, "pause": "20s"}]
    body = canary_cr(steps=steps, analysis=analysis(kube))
    body["spec"].pop("replicas")
    body["spec"]["runtime"].update(maxBatchSize=2, maxQueue=256)
    body["spec"]["autoscaling"] = {
        "enabled": True, "provider": "KEDA", "minReplicas": 1, "maxReplicas": 6, "targetQueueDepth": 2,
        "scaleDownStabilizationSeconds": 600, "prometheus": {"address": kube.prometheus_url},
    }
    with rolled_out(sc, body, 1) as stable:
        with sc.traffic(streams=6, calls=2, max_tokens=24) as traffic, Watch(kube, sc.ns) as watch:
            wait_for(lambda: watch.samples and watch.samples[-1].ready(_hash(stable)) >= 2, timeout=120,
                     message="KEDA scaled the stable up on its queue")
            t0 = sc.set_version("0.1.1")
            st = sc.wait(lambda st: (st.get("canaryWeight") or 0) > 0, 120, "the canary serves")
            so = get(kube, sc.ns, f"scaledobject/{NAME}")
            st = sc.wait_promoted(stable, timeout=300)
            promoted_s = time.monotonic() - t0
            traffic.wait_answers(30)
    report(f"\n(g) KEDA canary timeline:\n{watch.timeline()}\n(g) promoted in {promoted_s:.1f}s; traffic "
           f"{traffic.summary()}")
    trigger = so["spec"]["triggers"][0]["metadata"]["query"]
    assert so["spec"]["scaleTargetRef"]["name"] == stable and f'revision="{_hash(stable)}"' in trigger, so["spec"]
    during = [s for s in watch.samples if s.t >= t0 and s.canary_rev and s.status.get("rolloutPhase") == "Progressing"]
    # The stable scales on its own queue only (the trigger above names its revision): never to max
    # because the canary's pods were counted (Argo Rollouts #2857). On two shared cores the canary's
    # start-up can slow the stable and grow its own queue by a pod; that is the stable's load, not a bug.
    at_start = watch.first(lambda s: s.canary_rev is not None, after=t0)
    assert during and at_start is not None, watch.timeline()
    most = max(s.desired.get(_hash(stable), 0) for s in during)
    report(f"(g) stable's replicas: {at_start.desired[_hash(stable)]} when the canary started, at most {most} during it")
    assert most < 6, watch.timeline()
    # The canary's replicas follow 50 % of the stable's current count (checked once both settled).
    follows = [s for s in during if s.desired.get(s.canary_rev) == max(1, math.ceil(s.desired[s.stable_rev] / 2))]
    assert len(follows) >= len(during) // 2, watch.timeline()
    assert traffic.failed == [], traffic.summary()
    # No cliff: when the new revision took all traffic it had as many ready pods as the stable had then.
    before = [s for s in watch.samples if s.stable_rev == _hash(stable) and s.canary_rev]
    after = watch.first(lambda s: s.stable_rev not in (None, _hash(stable)), after=t0)
    assert after is not None and after.ready(after.stable_rev) >= before[-1].ready(_hash(stable)), watch.timeline()


# ------------------------------------------------------------------ (h) the operator killed at random points


def test_operator_sigkilled_at_random_points_every_rollout_ends_right_with_no_orphans(
    kube, crd, op_env, namespace, node_models, tmp_path
):
    import random
    import signal

    rng = random.Random(int(os.environ.get("AUTOGLM_KILL_SEED", "10")))
    log = tmp_path / "operator.log"
    env = {**op_env, "AUTOGLM_OPERATOR_RESYNC_SECONDS": "2"}
    sc = Scenario(kube, namespace, log, env)
    kills: list[float] = []
    stop = threading.Event()

    def killer() -> None:
        """Run the operator; SIGKILL it after a random 2–8 s, start it again, until stopped."""
        while not stop.is_set():
            with operator_process(env, namespace, log) as proc:
                if stop.wait(rng.uniform(2, 8)):
                    return
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                kills.append(time.monotonic())

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        steps = [{"weight": 34, "pause": "3s"}, {"weight": 67, "pause": "3s"}]
        # The deadline is the time a step may take. Here the operator is down about half of the time (killed
        # every 2-8 s, 3-5 s to start again on 2 busy cores), so a healthy step (pod start ~10 s, analysis
        # windows of 5 s, a 3 s pause) needs more than 40 s: one full CI run rolled the good canary back
        # at 40 s. 60 s keeps the broken canary's rollback (rollout 2) quick.
        sc.apply(canary_cr(steps=steps, analysis=analysis(kube), deadline=60))
        first = sc.wait(lambda st: st.get("phase") == "Healthy" and st.get("ready") == "2/2", 240, "first revision")[
            "stableRevision"
        ]
        with sc.traffic(streams=2, calls=2) as traffic, Watch(kube, namespace) as watch:
            sc.set_version("0.1.1")  # 1: promoted
            second = sc.wait_promoted(first, timeout=300)["stableRevision"]
            sc.patch({"model": {"uri": "file:///models/broken"}})  # 2: deadline → rolled back
            sc.wait_rolled_back(second, timeout=240)
            sc.patch({"model": {"uri": "file:///models/tiny"}, "runtime": {"version": "0.1.2"}})
            sc.wait(lambda st: (st.get("canaryWeight") or 0) > 0, 240, "third canary")
            sc.annotate("autoglm.io/abort")  # 3: aborted
            sc.wait(lambda st: not st.get("canaryRevision") and st.get("stableRevision") == second, 240, "aborted")
            while len(kills) < 10:
                time.sleep(1)
    finally:
        stop.set()
        thread.join(timeout=30)
    with operator_process(env, namespace, log):  # one last, unkilled operator settles everything
        st = sc.wait(
            lambda st: st.get("phase") in ("Healthy", "Degraded") and not st.get("canaryRevision"), 120, "settled"
        )
        wait_for(lambda: sc.children()["deployments"] == [second], timeout=120, message="only the stable Deployment")
    report(f"\n(h) timeline:\n{watch.timeline()}")
    for a in traffic.failed:
        report(f"(h) failed at t={a.start - watch.samples[0].t:.2f}s: {a.error}")
    report(f"(h) {len(kills)} SIGKILLs; final {sc.children()}; traffic {traffic.summary()}")
    assert len(kills) >= 10
    assert st["stableRevision"] == second and st["stableVersion"] == "0.1.1"
    assert sc.children()["services"] == [NAME]
    assert sc.children()["scaledobjects.keda.sh"] == []
    assert traffic.failed == [], traffic.summary()
