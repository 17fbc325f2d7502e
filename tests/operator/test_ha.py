"""Two operator processes with leader election (leader.py) on the real local control plane: one
acts, the other stands by; SIGKILL the active one, change a resource during the failover, and the
standby acts on it. The measured failover (kill → the change on the Deployment) is printed."""

from __future__ import annotations

import json
import os
import signal
import time
from contextlib import ExitStack

import pytest

from tests.helpers import wait_for
from tests.operator.test_operator_cluster import (  # noqa: F401 - crd is a fixture
    agd,
    apply,
    crd,
    deployments,
    merge,
    operator_process,
    wait_phase,
)

pytestmark = pytest.mark.cluster
LEASE = "autoglm-operator"


def lease_holder(kube, namespace: str) -> str | None:
    proc = kube.kubectl("get", "lease", LEASE, "-n", namespace, "-o", "json", check=False)
    return json.loads(proc.stdout)["spec"].get("holderIdentity") if proc.returncode == 0 else None


def test_standby_takes_over_when_the_leader_is_killed(kube, namespace, crd, tmp_path):  # noqa: F811
    env = {**kube.env, "AUTOGLM_OPERATOR_LEADER_ELECTION": "true",
           "AUTOGLM_OPERATOR_LEADER_ELECTION_NAMESPACE": namespace, "AUTOGLM_OPERATOR_LEADER_ELECTION_NAME": LEASE,
           "AUTOGLM_OPERATOR_METRICS_PORT": "0", "AUTOGLM_OPERATOR_RESYNC_SECONDS": "60"}
    logs = {k: tmp_path / f"operator-{k}.log" for k in "ab"}
    with ExitStack() as stack:
        procs = {k: stack.enter_context(operator_process(env, namespace, logs[k])) for k in "ab"}
        apply(kube, namespace, agd("ha", replicas=1))
        wait_phase(kube, namespace, "ha", "Healthy", timeout=90)
        holder = wait_for(lambda: lease_holder(kube, namespace), timeout=30, message="a Lease holder")
        pid = int(holder.rsplit("_", 1)[1])
        [leader] = [k for k, p in procs.items() if p.pid == pid]
        standby = "b" if leader == "a" else "a"
        # Only the leader acted: the standby watched the same events and changed nothing.
        assert "Created revision" in logs[leader].read_text()
        standby_log = logs[standby].read_text()
        assert "Created revision" not in standby_log and "Became the leader" not in standby_log, standby_log
        [dep] = deployments(kube, namespace, "ha")
        assert dep["spec"]["replicas"] == 1

        os.killpg(procs[leader].pid, signal.SIGKILL)
        killed = time.monotonic()
        procs[leader].wait()
        merge(kube, namespace, "agd/ha", {"spec": {"replicas": 2}})  # during the failover

        def acted() -> bool:
            return any(d["spec"]["replicas"] == 2 for d in deployments(kube, namespace, "ha"))

        wait_for(acted, timeout=60, interval=0.2, message=f"the standby acts (log: {logs[standby]})")
        failover = time.monotonic() - killed
        print(f"\nfailover: leader SIGKILLed → spec change on the Deployment by the standby in {failover:.1f} s")
        assert failover < 60
        # Nobody acted while the dead leader's Lease was still valid (a standby that did not wait
        # would have reacted in well under a second).
        assert failover > 5, f"the standby acted {failover:.1f} s after the kill, before the Lease expired"
        assert lease_holder(kube, namespace) == f"{holder.rsplit('_', 1)[0]}_{procs[standby].pid}"
        assert "Took over Lease" in logs[standby].read_text()
        wait_phase(kube, namespace, "ha", "Healthy", timeout=60, ready="2/2")
