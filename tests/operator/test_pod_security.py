"""Pods the operator creates pass the Pod Security "restricted" profile, enforced by the real apiserver."""

from __future__ import annotations

import pytest

from tests.helpers import wait_for
from tests.operator.test_operator_cluster import agd, apply, crd, get, op_env, operator  # noqa: F401 - fixtures

pytestmark = pytest.mark.cluster


def pods_of(kube, namespace: str, name: str) -> list[dict]:
    return get(kube, namespace, "pods", "-l", f"autoglm.io/deployment={name}")["items"]


def test_every_pod_shape_is_admitted_under_restricted(kube, namespace, operator):
    kube.kubectl("label", "namespace", namespace, "pod-security.kubernetes.io/enforce=restricted",
                 "pod-security.kubernetes.io/enforce-version=latest")
    kube.kubectl("create", "secret", "generic", "key", "-n", namespace, "--from-literal=token=t")
    hf = {"name": "glm", "uri": "hf://THUDM/glm-4-9b-chat"}
    cases = {
        "gpu-auth": agd("gpu-auth", model=hf, auth={"apiKeySecretRef": {"name": "key"}}),
        "gpu-h100": agd("gpu-h100", model=hf, resources={"gpus": 2, "gpuProduct": "NVIDIA-H100-80GB-HBM3"}),
        "cpu-sim": agd("cpu-sim", model=hf, resources={"gpus": 0, "cpu": "1", "memory": "2Gi"},
                       nodeSelector={"kubernetes.io/hostname": "kwok-cpu-0"},
                       tolerations=[{"key": "autoglm.io/simulated", "operator": "Exists", "effect": "NoSchedule"}]),
    }
    for body in cases.values():
        apply(kube, namespace, body)
    for name in cases:
        wait_for(lambda: pods_of(kube, namespace, name), timeout=60, message=f"a pod of {name} admitted")
    events = get(kube, namespace, "events")["items"]
    refused = [e["message"] for e in events if e.get("reason") == "FailedCreate"]
    assert refused == [], refused
    init = pods_of(kube, namespace, "gpu-auth")[0]["spec"].get("initContainers") or []
    assert init, "the hf:// download init container is admitted too"


def test_a_refused_pod_degrades_the_resource_with_the_apiservers_reason(kube, namespace, operator):
    # file:// models are hostPath volumes, which "restricted" forbids: the resource says so.
    kube.kubectl("label", "namespace", namespace, "pod-security.kubernetes.io/enforce=restricted")
    apply(kube, namespace, agd("local", model={"name": "glm", "uri": "file:///models/glm"}))

    def degraded():
        st = get(kube, namespace, "autoglmdeployment/local").get("status") or {}
        c = next((c for c in st.get("conditions") or [] if c["type"] == "Degraded"), {})
        return c if c.get("reason") == "PodCreationRefused" else None

    cond = wait_for(degraded, timeout=60, message="Degraded PodCreationRefused")
    assert "PodSecurity" in cond["message"] and "hostPath" in cond["message"], cond
