"""Proves the local control plane is real: scheduling, controllers, GC, helm, describe."""

from __future__ import annotations

import json

import pytest

from tests.helpers import wait_for

pytestmark = pytest.mark.cluster

GPU_DEPLOYMENT = """
apiVersion: apps/v1
kind: Deployment
metadata: {name: gpu-smoke}
spec:
  replicas: 1
  selector: {matchLabels: {app: gpu-smoke}}
  template:
    metadata: {labels: {app: gpu-smoke}}
    spec:
      nodeSelector: {nvidia.com/gpu.product: NVIDIA-A10G}
      containers:
      - name: c
        image: example.invalid/never-pulled:1
        resources: {limits: {nvidia.com/gpu: 1}}
"""


def _get(kube, *args):
    return json.loads(kube.kubectl("get", *args, "-o", "json").stdout)


def test_version_is_stamped(kube):
    v = json.loads(kube.kubectl("version", "-o", "json").stdout)
    assert v["serverVersion"]["gitVersion"].startswith("v1.36.")
    assert v["clientVersion"]["gitVersion"].startswith("v1.36.")


def test_nodes_advertise_gpus(kube):
    nodes = {n["metadata"]["name"]: n for n in _get(kube, "nodes")["items"]}
    assert nodes["kwok-gpu-0"]["status"]["allocatable"]["nvidia.com/gpu"] == "8"
    assert "nvidia.com/gpu" not in nodes["kwok-cpu-0"]["status"]["allocatable"]
    # Room for the operator benchmark's 1,000+ simulated pods of cpu: 1, memory: 2Gi.
    sim = nodes["kwok-cpu-0"]["status"]["allocatable"]
    assert int(sim["pods"]) >= 1100 and int(sim["cpu"]) >= 1100 and sim["memory"] == "5Ti"


def test_gpu_deployment_becomes_available_and_is_garbage_collected(kube, namespace):
    kube.kubectl("apply", "-n", namespace, "-f", "-", input=GPU_DEPLOYMENT)
    wait_for(lambda: _get(kube, "-n", namespace, "deployment/gpu-smoke")["status"].get("availableReplicas") == 1,
             timeout=60, message="gpu-smoke available")
    pods = _get(kube, "-n", namespace, "pods", "-l", "app=gpu-smoke")["items"]
    assert [p["spec"]["nodeName"] for p in pods] == ["kwok-gpu-0"]
    assert pods[0]["status"]["phase"] == "Running"

    describe = kube.kubectl("describe", "-n", namespace, "deployment/gpu-smoke").stdout
    assert "nvidia.com/gpu" in describe and "ScalingReplicaSet" in describe

    rs = _get(kube, "-n", namespace, "replicasets", "-l", "app=gpu-smoke")["items"]
    assert len(rs) == 1
    kube.kubectl("delete", "-n", namespace, "deployment/gpu-smoke", "--wait=false")
    wait_for(lambda: not _get(kube, "-n", namespace, "replicasets", "-l", "app=gpu-smoke")["items"],
             timeout=60, message="ReplicaSet garbage-collected")
    wait_for(lambda: not _get(kube, "-n", namespace, "pods", "-l", "app=gpu-smoke")["items"],
             timeout=60, message="pods deleted")


def test_helm_install_and_uninstall(kube, namespace):
    from tests.conftest import REPO

    chart = REPO / "tests" / "devcluster" / "testdata" / "hello-chart"
    kube.helm("install", "smoke", str(chart), "-n", namespace, "--set", "greeting=hi", "--wait")
    cm = _get(kube, "-n", namespace, "configmap/smoke-hello")
    assert cm["data"]["greeting"] == "hi"
    assert "smoke" in kube.helm("list", "-n", namespace).stdout
    kube.helm("uninstall", "smoke", "-n", namespace, "--wait")
    assert kube.kubectl("get", "-n", namespace, "configmap/smoke-hello", check=False).returncode != 0


def test_writes_are_audited(kube, namespace):
    import time

    t0 = time.time()
    kube.kubectl("create", "configmap", "audited", "-n", namespace, "--from-literal=a=b")
    writes = wait_for(lambda: kube.audit_writes(since=t0, user_agent="kubectl", namespace=namespace),
                      timeout=10, message="the create to appear in the audit log")
    assert [(w["verb"], w["objectRef"]["resource"], w["objectRef"]["name"]) for w in writes] == [
        ("create", "configmaps", "audited")]


def test_the_operators_reads_are_audited_and_nobody_elses(kube, namespace):
    import time

    from devcluster import OPERATOR_USER

    t0 = time.time()
    kube.kubectl("create", "configmap", "read-me", "-n", namespace, "--from-literal=a=b")
    kube.kubectl("get", "configmap", "read-me", "-n", namespace)  # the admin's read: not audited
    kube.run("kubectl", f"--kubeconfig={kube.operator_kubeconfig}", "get", "configmap", "read-me", "-n", namespace)
    kube.run("kubectl", f"--kubeconfig={kube.operator_kubeconfig}", "get", "configmaps", "-n", namespace)

    def reads():
        return [(e["verb"], e["user"]["username"]) for e in kube.audit_events(since=t0, namespace=namespace)
                if e["verb"] in ("get", "list")]

    got = wait_for(lambda: len(reads()) >= 2 and reads(), timeout=10, message="the operator's reads audited")
    assert sorted(got) == [("get", OPERATOR_USER), ("list", OPERATOR_USER)]
