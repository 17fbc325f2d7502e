"""Autoscaling on real queue depth: load through the Service → autoglm_requests_waiting in Prometheus
→ KEDA → more runtime pods that serve → the queue drains → back down, without flapping or failures."""

from __future__ import annotations

import time

import pytest

from tests.e2e.test_runtime_pods import Load, pods, service_ip, tiny
from tests.helpers import report, wait_for
from tests.operator.test_operator_cluster import (  # noqa: F401 - fixtures
    apply, condition, crd, get, merge, op_env, operator, status, wait_phase,
)

pytestmark = [pytest.mark.cluster, pytest.mark.runtime]


def autoscaled(kube, provider: str, **over) -> dict:
    body = tiny(runtime={"version": "0.1.0", "maxBatchSize": 2, "maxQueue": 256})
    body["spec"].pop("replicas", None)
    body["spec"]["autoscaling"] = {"enabled": True, "provider": provider, "minReplicas": 1, "maxReplicas": 3,
                                   "targetQueueDepth": 2, "scaleDownStabilizationSeconds": 15,
                                   "prometheus": {"address": kube.prometheus_url}, **over}
    return body


class Timeline:
    """Replicas, ready replicas and waiting requests per pod, sampled once a second."""

    def __init__(self, kube, namespace: str, name: str) -> None:
        self.kube, self.ns, self.name = kube, namespace, name
        self.rows: list[tuple[float, int, int, float]] = []
        self.t0 = time.monotonic()

    def sample(self) -> tuple[float, int, int, float]:
        deps = get(self.kube, self.ns, "deployments", "-l", f"autoglm.io/deployment={self.name}")["items"]
        replicas = sum(d["spec"].get("replicas", 0) for d in deps)
        ready = sum(d.get("status", {}).get("readyReplicas", 0) for d in deps)
        series = self.kube.prometheus_query(f'autoglm_requests_waiting{{namespace="{self.ns}"}}')
        waiting = [float(s["value"][1]) for s in series]
        row = (time.monotonic() - self.t0, replicas, ready, sum(waiting) / max(len(waiting), 1))
        self.rows.append(row)
        return row

    def table(self) -> str:
        return "\n".join(f"  t={t:6.1f}s replicas={r} ready={rd} waiting/pod={w:.1f}" for t, r, rd, w in self.rows)

    def scale_ups_after_first_down(self) -> int:
        """How often replicas went back up after they first went down (flapping)."""
        counts = [r for _, r, _, _ in self.rows]
        down = next((i for i in range(1, len(counts)) if counts[i] < counts[i - 1]), None)
        if down is None:
            return 0
        return sum(1 for i in range(down + 1, len(counts)) if counts[i] > counts[i - 1])


def test_keda_scales_up_on_queue_depth_and_back_down_without_failures(kube, namespace, operator, node_models,
                                                                      keda):
    report(f"\nKEDA ready in {keda:.1f}s")
    apply(kube, namespace, autoscaled(kube, "KEDA"))
    wait_phase(kube, namespace, "tiny", "Healthy", timeout=180)
    assert get(kube, namespace, "scaledobject/tiny")["spec"]["maxReplicaCount"] == 3
    ip = service_ip(kube, namespace, "tiny")
    tl = Timeline(kube, namespace, "tiny")
    light = Load(f"http://{ip}:8000/v1", "tiny", n=2, max_tokens=48)
    heavy = Load(f"http://{ip}:8000/v1", "tiny", n=12, max_tokens=48)
    with light:
        with heavy:
            t_load = time.monotonic()
            wait_for(lambda: tl.sample()[2] >= 2, timeout=180, interval=1.0, message="a second pod Ready")
            first_new_ready = time.monotonic() - t_load
            wait_for(lambda: tl.sample()[2] >= 3 or time.monotonic() - t_load > 60, timeout=120, interval=1.0)
        # Heavy load stops; the light load keeps streaming through the scale-down.
        t_drop = time.monotonic()
        wait_for(lambda: tl.sample()[1] == 1 and tl.rows[-1][2] == 1, timeout=180, interval=1.0,
                 message="back to one replica")
        scale_down_s = time.monotonic() - t_drop
        for _ in range(5):  # stays at one
            tl.sample()
            time.sleep(1)
    report(f"KEDA timeline (load at t={t_load - tl.t0:.1f}s, drop at t={t_drop - tl.t0:.1f}s):\n{tl.table()}")
    report(f"first new pod Ready {first_new_ready:.1f}s after the load step; back to 1 replica "
           f"{scale_down_s:.1f}s after the drop; {heavy.ok + light.ok} requests ok, "
           f"{len(heavy.failed) + len(light.failed)} failed")
    assert max(r for _, r, _, _ in tl.rows) >= 2
    assert tl.scale_ups_after_first_down() <= 1, tl.table()
    assert heavy.failed == [] and light.failed == [], (heavy.failed + light.failed)[:5]
    st = status(kube, namespace, "tiny")
    assert st["autoscaler"]["provider"] == "KEDA" and st["autoscaler"]["name"] == "tiny-keda"
    assert st["autoscaler"].get("currentReplicas") == 1


def test_version_change_while_scaled_comes_up_at_the_current_count(kube, namespace, operator, node_models, keda):
    body = autoscaled(kube, "KEDA", minReplicas=2, scaleDownStabilizationSeconds=600)
    body["spec"]["rollout"] = {"steps": []}  # straight to promotion at the current count (canaries: test_rollout*)
    apply(kube, namespace, body)
    wait_phase(kube, namespace, "tiny", "Healthy", timeout=180, ready="2/2")
    old = pods(kube, namespace, "tiny")[0]["metadata"]["labels"]["autoglm.io/revision"]
    merge(kube, namespace, "autoglmdeployment/tiny", {"spec": {"runtime": {"version": "0.1.1"}}})
    new_dep = wait_for(lambda: next((d for d in get(kube, namespace, "deployments")["items"]
                                     if d["metadata"]["labels"]["autoglm.io/revision"] != old), None),
                       timeout=60, message="new revision's Deployment")
    assert new_dep["spec"]["replicas"] == 2  # the current count, not minReplicas of a fresh HPA
    wait_for(lambda: get(kube, namespace, "scaledobject/tiny")["spec"]["scaleTargetRef"]["name"]
             == new_dep["metadata"]["name"], timeout=180, message="the ScaledObject moved to the new revision")


def test_hpa_provider_without_a_metrics_adapter_says_why_in_status(kube, namespace, operator, node_models):
    apply(kube, namespace, autoscaled(kube, "HPA"))
    wait_phase(kube, namespace, "tiny", "Healthy", timeout=180)

    def message():
        st = status(kube, namespace, "tiny").get("autoscaler") or {}
        return st.get("message") if "FailedGetPodsMetric" in (st.get("message") or "") else None

    msg = wait_for(message, timeout=90, interval=1.0, message="the HPA's reason in status.autoscaler")
    assert "autoglm_requests_waiting" in msg or "custom.metrics" in msg, msg


def test_a_pod_that_never_turns_ready_does_not_stall_scaling_for_the_others(kube, namespace, operator, node_models,
                                                                          keda):
    """One of the new pods hangs before it ever serves (its process is frozen with SIGSTOP): the
    autoscaler still brings the others up, they take the load, and nothing fails."""
    import os
    import signal

    apply(kube, namespace, autoscaled(kube, "KEDA", scaleDownStabilizationSeconds=600))
    wait_phase(kube, namespace, "tiny", "Healthy", timeout=180)
    first = pods(kube, namespace, "tiny")[0]["metadata"]["name"]
    ip = service_ip(kube, namespace, "tiny")
    frozen: list[int] = []

    def freeze_one_new_pod() -> str | None:
        for p in pods(kube, namespace, "tiny"):
            if p["metadata"]["name"] == first:
                continue
            pid_file = kube.dir / "procnode" / "pods" / p["metadata"]["uid"] / "containers" / "runtime" / "pid"
            if pid_file.exists():
                pid = int(pid_file.read_text())
                os.kill(pid, signal.SIGSTOP)
                frozen.append(pid)
                return p["metadata"]["name"]
        return None

    try:
        with Load(f"http://{ip}:8000/v1", "tiny", n=12, max_tokens=48) as load:
            stuck = wait_for(freeze_one_new_pod, timeout=120, interval=0.2, message="a new pod to freeze")
            # The other new pod turns Ready and serves; the frozen one never does.
            wait_for(lambda: sum(1 for p in pods(kube, namespace, "tiny")
                                 if any(c["type"] == "Ready" and c["status"] == "True"
                                        for c in p.get("status", {}).get("conditions", []))) >= 2,
                     timeout=120, interval=1.0, message="two Ready pods despite the stuck one")
            before = load.ok
            wait_for(lambda: load.ok >= before + 24, timeout=60, message="load served by the Ready pods")
        stuck_pod = next(p for p in pods(kube, namespace, "tiny") if p["metadata"]["name"] == stuck)
        assert not any(c["type"] == "Ready" and c["status"] == "True" for c in stuck_pod["status"]["conditions"])
        assert get(kube, namespace, "deployments")["items"][0]["spec"]["replicas"] == 3
        assert load.failed == [], load.failed[:5]
    finally:
        for pid in frozen:
            os.kill(pid, signal.SIGCONT)
