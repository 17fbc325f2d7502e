"""Canary rollouts against the real local control plane (kwok pods go Ready without containers, so there
is no traffic and no analysis here: the real-traffic scenarios are in tests/e2e).

- a version change walks its steps (weights seen in status at each), survives a SIGKILL of the
  operator mid-rollout, is promoted, and the old revision goes;
- the CLI (`autoglm rollout ...`) pauses, resumes, promotes, aborts and undoes;
- GatewayAPI routing: the apiserver accepts our Services and HTTPRoute, and a user's rule survives.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from autoglm_operator.analysis import judge, measure
from tests.helpers import wait_for
from tests.operator.test_builders import resolved
from tests.operator.test_operator_cluster import (  # noqa: F401 - fixtures used by name
    LABEL_DEPLOYMENT,
    agd,
    apply,
    condition,
    crd,
    deployments,
    get,
    merge,
    op_env,
    operator,
    operator_process,
    operator_requests,
    status,
    try_get,
    wait_phase,
)

pytestmark = pytest.mark.cluster

CLI = str(Path(sys.executable).parent / "autoglm")


def version_of(dep: dict) -> str:
    return dep["metadata"]["labels"]["app.kubernetes.io/version"]


def test_steps_weights_sigkill_resume_and_promotion(kube, namespace, crd, op_env, tmp_path):  # noqa: F811
    log = tmp_path / "operator.log"
    steps = [{"weight": 25, "pause": "4s"}, {"weight": 50, "pause": "4s"}]
    apply(kube, namespace, agd("walk", replicas=4, rollout={"steps": steps}))
    with operator_process(op_env, namespace, log) as proc:
        wait_phase(kube, namespace, "walk", "Healthy", timeout=90, ready="4/4")
        [old] = deployments(kube, namespace, "walk")
        merge(kube, namespace, "agd/walk", {"spec": {"runtime": {"version": "0.2.0"}}})

        seen: dict[int, set[int]] = {}

        def at_step(step: int):
            st = status(kube, namespace, "walk")
            if st.get("currentStep") is not None and st.get("canaryRevision"):
                seen.setdefault(st["currentStep"], set()).add(st.get("canaryWeight", 0))
            return st if st.get("currentStep") == step and st.get("stepReadyAt") else None

        st = wait_for(lambda: at_step(0), timeout=60, interval=0.3, message=f"step 0 (log: {log})")
        assert st["rolloutPhase"] == "Progressing" and st["canaryVersion"] == "0.2.0" and st["stableVersion"] == "0.1.0"
        assert st["canaryWeight"] == 20  # 1 canary pod beside 4 stable ones
        svc = get(kube, namespace, "service/walk")
        assert svc["spec"]["selector"] == {LABEL_DEPLOYMENT: "walk"}  # both revisions' Ready pods
        assert condition(st, "Progressing")["reason"] == "CanaryProgressing"
        old_pods = {d["metadata"]["name"]: d["spec"]["replicas"] for d in deployments(kube, namespace, "walk")}
        assert old_pods[old["metadata"]["name"]] == 4  # stable untouched

        st = wait_for(lambda: at_step(1), timeout=60, interval=0.3, message=f"step 1 (log: {log})")
        assert st["canaryWeight"] == 33  # 2 canary pods beside 4
        os.killpg(proc.pid, signal.SIGKILL)  # mid-rollout: everything it needs is in the status
        proc.wait()
    killed_at = status(kube, namespace, "walk")
    assert killed_at["currentStep"] == 1 and killed_at["rolloutPhase"] == "Progressing"

    with operator_process(op_env, namespace, log):
        def promoted():
            st = status(kube, namespace, "walk")
            deps = deployments(kube, namespace, "walk")
            done = (st.get("rolloutPhase") == "Promoted" and condition(st, "Progressing").get("status") == "False"
                    and len(deps) == 1 and st.get("phase") == "Healthy")
            return st if done else None
        st = wait_for(promoted, timeout=120, interval=0.5, message=f"promoted after the restart (log: {log})")
    [new] = deployments(kube, namespace, "walk")
    assert version_of(new) == "0.2.0" and new["spec"]["replicas"] == 4
    assert st["stableRevision"] == new["metadata"]["name"] and st["stableVersion"] == "0.2.0"
    assert st["previousStableRevision"] == old["metadata"]["name"] and st["previousStableVersion"] == "0.1.0"
    for gone in ("canaryRevision", "canaryVersion", "currentStep", "stepStartedAt", "failedChecks"):
        assert gone not in st, gone
    assert st["canaryWeight"] == 0 and st["ready"] == "4/4"
    assert 20 in seen[0] and 33 in seen[1], seen  # the Ready pod shares at each step
    assert get(kube, namespace, "service/walk")["spec"]["selector"]["autoglm.io/revision"] == new["metadata"]["labels"][
        "autoglm.io/revision"]
    reasons = [e["reason"] for e in get(kube, namespace, "events", "--field-selector",
                                         "involvedObject.name=walk")["items"]]
    assert {"CanaryStarted", "StepAdvanced", "Promoting", "Promoted", "RevisionDeleted"} <= set(reasons), reasons
    assert reasons.count("CanaryStarted") == 1  # the restart did not start the rollout again


def cli(kube, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    proc = subprocess.run([CLI, "rollout", *args], env={**os.environ, **kube.env, "KUBECONFIG": str(kube.kubeconfig)},
                          capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def test_cli_pause_resume_promote_abort_undo(kube, namespace, operator):  # noqa: F811
    ns = ["-n", namespace]
    apply(kube, namespace, agd("ctl", replicas=2, rollout={"steps": [{"weight": 50, "pause": "1h"}]}))
    wait_phase(kube, namespace, "ctl", "Healthy", timeout=60, ready="2/2")
    assert cli(kube, "status", "ctl", *ns, "--watch", "--timeout", "30").returncode == 0  # nothing to roll out

    merge(kube, namespace, "agd/ctl", {"spec": {"runtime": {"version": "0.2.0"}}})
    wait_for(lambda: status(kube, namespace, "ctl").get("stepReadyAt"), timeout=60, message="canary at step 0")
    out = cli(kube, "status", "ctl", *ns).stdout
    for text in ("Step:          0/1", "Canary weight: 33%", "(version 0.1.0), 2/2 ready", "(version 0.2.0), 1/1 ready",
                 "► 0: weight 50%, pause 1h", "Pause left:"):
        assert text in out, f"{text!r} not in:\n{out}"

    cli(kube, "pause", "ctl", *ns)
    wait_for(lambda: status(kube, namespace, "ctl").get("rolloutPhase") == "Paused", timeout=30, message="paused")
    assert condition(status(kube, namespace, "ctl"), "Progressing")["reason"] == "CanaryPaused"
    cli(kube, "resume", "ctl", *ns)
    wait_for(lambda: status(kube, namespace, "ctl").get("rolloutPhase") == "Progressing", timeout=30, message="resumed")
    assert "autoglm.io/paused" not in (get(kube, namespace, "agd/ctl")["metadata"].get("annotations") or {})

    cli(kube, "promote", "ctl", *ns)
    watched = cli(kube, "status", "ctl", *ns, "--watch", "--timeout", "90")
    assert "rollout of \"ctl\" complete" in watched.stdout
    st = status(kube, namespace, "ctl")
    assert st["stableVersion"] == "0.2.0" and st["previousStableVersion"] == "0.1.0"
    assert "autoglm.io/promote" not in (get(kube, namespace, "agd/ctl")["metadata"].get("annotations") or {})

    # Abort: rolled back, `status --watch` exits non-zero, the stable is untouched.
    merge(kube, namespace, "agd/ctl", {"spec": {"runtime": {"version": "0.3.0"}}})
    wait_for(lambda: status(kube, namespace, "ctl").get("canaryVersion") == "0.3.0", timeout=30, message="canary 0.3.0")
    cli(kube, "abort", "ctl", *ns)
    watched = cli(kube, "status", "ctl", *ns, "--watch", "--timeout", "60", check=False)
    assert watched.returncode == 1 and "rolled back" in watched.stderr, watched.stdout + watched.stderr
    st = status(kube, namespace, "ctl")
    assert st["rolloutPhase"] == "RolledBack" and condition(st, "Degraded")["reason"] == "RolledBack"
    assert [version_of(d) for d in deployments(kube, namespace, "ctl")] == ["0.2.0"]

    # Undo after a rollback: the spec goes back to the stable's version; nothing is rolled out.
    cli(kube, "undo", "ctl", *ns)
    assert get(kube, namespace, "agd/ctl")["spec"]["runtime"]["version"] == "0.2.0"
    st = wait_phase(kube, namespace, "ctl", "Healthy", timeout=60)
    assert st["rolloutPhase"] == "Idle" and condition(st, "Degraded")["status"] == "False"

    # Undo after a promotion: back to the previous stable version, as a canary rollout.
    cli(kube, "undo", "ctl", *ns)
    assert get(kube, namespace, "agd/ctl")["spec"]["runtime"]["version"] == "0.1.0"
    wait_for(lambda: status(kube, namespace, "ctl").get("canaryVersion") == "0.1.0", timeout=30, message="undo canary")


def test_gateway_api_route_is_accepted_and_keeps_a_users_rule(kube, namespace, operator):  # noqa: F811
    kube.kubectl("apply", "--server-side", "-f", str(kube.bin_dir / "crds"))
    kube.kubectl("wait", "--for=condition=Established", "crd/httproutes.gateway.networking.k8s.io", "--timeout=60s")
    routing = {"trafficRouting": "GatewayAPI", "gateway": {"name": "inference-gateway", "sectionName": "http"},
               "steps": [{"weight": 30, "pause": "1h"}]}
    apply(kube, namespace, agd("gw", replicas=2, rollout=routing))
    wait_phase(kube, namespace, "gw", "Healthy", timeout=60)
    route = wait_for(lambda: try_get(kube, namespace, "httproute/gw"), timeout=30, message="HTTPRoute gw")
    assert [r.get("name") for r in route["spec"]["rules"]] == ["autoglm-canary-header", "autoglm-weighted"]
    assert route["spec"]["parentRefs"][0]["namespace"] == namespace
    stable_svc = get(kube, namespace, "service/gw-stable")
    assert stable_svc["spec"]["selector"] == get(kube, namespace, "service/gw")["spec"]["selector"]

    user_rule = {"name": "docs", "matches": [{"path": {"type": "PathPrefix", "value": "/docs"}}],
                 "backendRefs": [{"name": "docs", "port": 80}]}
    kube.kubectl("patch", "-n", namespace, "httproute/gw", "--type=json",
                 "-p", json.dumps([{"op": "add", "path": "/spec/rules/-", "value": user_rule}]))
    merge(kube, namespace, "agd/gw", {"spec": {"runtime": {"version": "0.2.0"}}})

    def weighted():
        r = get(kube, namespace, "httproute/gw")
        refs = {ref["name"]: ref["weight"] for rule in r["spec"]["rules"] if rule.get("name") == "autoglm-weighted"
                for ref in rule["backendRefs"]}
        return r if refs == {"gw-stable": 70, "gw-canary": 30} else None
    route = wait_for(weighted, timeout=60, message="route at 30 % canary")
    assert [r.get("name") for r in route["spec"]["rules"]] == ["autoglm-canary-header", "autoglm-weighted", "docs"]
    st = status(kube, namespace, "gw")
    assert st["canaryWeight"] == 30
    canary_svc = get(kube, namespace, "service/gw-canary")
    assert canary_svc["spec"]["selector"]["autoglm.io/revision"] == st["canaryRevision"].rsplit("-", 1)[1]
    # The shared Service stays on the stable (clients inside the cluster bypass the gateway).
    assert get(kube, namespace, "service/gw")["spec"]["selector"]["autoglm.io/revision"] == st["stableRevision"].rsplit(
        "-", 1)[1]
    # Idle: resyncs every 5 s write nothing to the route (server defaults never look like a difference)
    # and read nothing: the route, like every child, comes from the watch cache (audit log).
    rv = route["metadata"]["resourceVersion"]
    time.sleep(2)
    t0 = time.time()
    time.sleep(12)
    assert get(kube, namespace, "httproute/gw")["metadata"]["resourceVersion"] == rv
    writes, reads = operator_requests(kube, t0, namespace)
    assert (writes, reads) == ([], []), (writes, reads)


async def test_analysis_promql_runs_on_a_real_prometheus(kube):
    """Every analysis query parses and runs on the session's Prometheus (no traffic: 0 requests, inconclusive)."""
    spec = {"model": {"uri": "hf://a/b"}, "rollout": {"analysis": {"minRequests": 1}}}
    r = resolved("chat", spec)
    now = dt.datetime.now(dt.UTC)
    m = await measure(kube.prometheus_url, r, "ccc", "sss", now - dt.timedelta(seconds=30), now)
    assert m.error == "", m.error
    assert m.requests == 0 and m.success_rate is None and m.latency_p99 is None
    a = judge(m, r.spec.rollout.analysis, now)
    assert a.verdict == "Inconclusive" and "fewer than minRequests 1" in a.reason


def test_max_surge_keeps_the_pod_count_within_budget(kube, namespace, operator):  # noqa: F811
    # Pauses of a few seconds hold each step long enough to be sampled (simulated pods are Ready at once).
    steps = [{"weight": 34, "pause": "4s"}, {"weight": 67, "pause": "4s"}]
    apply(kube, namespace, agd("surge", replicas=3, rollout={"maxSurge": 1, "steps": steps}))
    wait_phase(kube, namespace, "surge", "Healthy", timeout=60, ready="3/3")
    merge(kube, namespace, "agd/surge", {"spec": {"runtime": {"version": "0.2.0"}}})
    counts: list[int] = []

    def promoted():
        pods = get(kube, namespace, "pods", "-l", f"{LABEL_DEPLOYMENT}=surge")["items"]
        counts.append(len(pods))  # terminating ones included: they still hold their GPU
        st = status(kube, namespace, "surge")
        return st.get("rolloutPhase") == "Promoted" and st.get("stableVersion") == "0.2.0" and len(pods) == 3
    wait_for(promoted, timeout=180, interval=0.3, message="promoted within the surge budget")
    assert max(counts) <= 4, counts
    assert max(counts) == 4  # the budget was used (a canary pod beside the stable's)
    [dep] = deployments(kube, namespace, "surge")
    assert version_of(dep) == "0.2.0" and dep["spec"]["replicas"] == 3
