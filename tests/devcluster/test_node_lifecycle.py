"""The process node's lifecycle: restarts with the kubelet's back-off and the log tail as the
termination message, liveness and startup probes, readiness gating the pod's Ready condition."""

from __future__ import annotations

import socket

import pytest
import yaml

from tests.devcluster.podutil import container_status, pod, ready
from tests.helpers import wait_for

pytestmark = pytest.mark.cluster


def test_crash_restarts_with_backoff_and_reports_the_log_tail(kube, namespace):
    body = pod("crash", ["sh", "-c", "echo starting; echo 'fatal: no model here' >&2; exit 3"],
               container={"terminationMessagePolicy": "FallbackToLogsOnError"})
    kube.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(body))
    cs = wait_for(lambda: (lambda s: s if s.get("state", {}).get("waiting", {}).get("reason") == "CrashLoopBackOff"
                           else None)(container_status(kube, namespace, "crash")), timeout=30, message="back-off")
    last = cs["lastState"]["terminated"]
    assert last["exitCode"] == 3 and last["reason"] == "Error"
    assert last["message"].splitlines()[-1] == "fatal: no model here"
    assert "back-off 10s" in cs["state"]["waiting"]["message"]
    cs = wait_for(lambda: (lambda s: s if s.get("restartCount", 0) >= 1 else None)(
        container_status(kube, namespace, "crash")), timeout=40, message="one restart")
    # Caught running again, just exited, or waiting out the doubled back-off.
    state = cs["state"]
    assert state.get("running") or state.get("terminated") or "back-off 20s" in state["waiting"]["message"], state


def test_liveness_failure_restarts_and_startup_probe_gates_started(kube, namespace):
    # exec probes run inside the container: /tmp/alive exists for ~3 s after start, then liveness fails.
    script = "touch /tmp/alive; (sleep 3; rm /tmp/alive) & exec sleep 300"
    body = pod("live", ["sh", "-c", script], container={
        "startupProbe": {"exec": {"command": ["test", "-f", "/tmp/alive"]}, "periodSeconds": 1},
        "livenessProbe": {"exec": {"command": ["test", "-f", "/tmp/alive"]}, "periodSeconds": 1, "failureThreshold": 2}})
    kube.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(body))
    wait_for(lambda: container_status(kube, namespace, "live").get("started"), timeout=30, message="started")
    cs = wait_for(lambda: (lambda s: s if s.get("restartCount", 0) >= 1 else None)(
        container_status(kube, namespace, "live")), timeout=60, message="liveness restart")
    assert cs["lastState"]["terminated"]["exitCode"] != 0


def test_tcp_readiness_gates_endpoints(kube, namespace):
    # Ready only once something listens on 8080 (after 2 s): the pod's Ready condition follows.
    body = pod("late", ["sh", "-c", "sleep 2; exec python3 -m http.server 8080"], container={
        "readinessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 1}})
    kube.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(body))
    running = wait_for(lambda: container_status(kube, namespace, "late").get("state", {}).get("running"),
                       timeout=30, message="running")
    assert running and not ready(kube, namespace, "late")
    p = wait_for(lambda: ready(kube, namespace, "late"), timeout=30, message="ready")
    with socket.create_connection((p["status"]["podIP"], 8080), timeout=2):
        pass
