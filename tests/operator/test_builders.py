"""Pure builders against golden YAML, and the revision hash.

Regenerate the golden files after an intended change:

    UPDATE_GOLDEN=1 .venv/bin/pytest tests/operator/test_builders.py

then review `git diff tests/operator/golden/`.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import yaml

from autoglm_operator import builders as b
from autoglm_operator.models import InvalidSpec, resolve_spec

GOLDEN = Path(__file__).parent / "golden"
UID = "00000000-0000-4000-8000-000000000001"

SPECS = {
    "tiny-cpu": {
        "model": {"name": "tiny-glm", "uri": "file:///models/tiny-glm", "maxModelLen": 512},
        "runtime": {"version": "0.1.0", "maxBatchSize": 8, "maxQueue": 64},
        "resources": {"gpus": 0, "cpu": "1", "memory": "2Gi"},
        "replicas": 1,
    },
    "gpu-autoscaling-pvc-auth-tls": {
        "model": {"name": "glm-4-9b-chat", "uri": "pvc://model-store/glm-4-9b-chat", "dtype": "bfloat16",
                  "maxModelLen": 8192},
        "runtime": {"image": "registry.example.com/autoglm/runtime", "version": "0.1.0",
                    "env": [{"name": "AUTOGLM_RUNTIME_LOG_LEVEL", "value": "debug"}]},
        "resources": {"gpus": 1, "gpuProduct": "NVIDIA-A10G", "cpu": 4, "memory": "32Gi"},
        "nodeSelector": {"pool": "inference"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "llm", "effect": "NoSchedule"}],
        "autoscaling": {"enabled": True, "minReplicas": 2, "maxReplicas": 8, "targetQueueDepth": 8,
                        "targetCPUUtilization": 80, "scaleDownStabilizationSeconds": 300},
        "auth": {"apiKeySecretRef": {"name": "chat-api-key", "key": "token"}},
        "tls": {"secretRef": {"name": "chat-tls"}},
        "networkPolicy": {"enabled": True},
    },
    "keda-cpu": {
        "model": {"name": "tiny", "uri": "file:///models/tiny", "maxModelLen": 512},
        "resources": {"gpus": 0, "cpu": "1", "memory": "2Gi"},
        "autoscaling": {"enabled": True, "provider": "KEDA", "minReplicas": 1, "maxReplicas": 3,
                        "targetQueueDepth": 2, "targetCPUUtilization": 70, "scaleDownStabilizationSeconds": 20,
                        "prometheus": {"address": "http://prometheus.monitoring:9090"}},
    },
    "gateway-canary": {
        "model": {"name": "tiny", "uri": "file:///models/tiny"},
        "resources": {"gpus": 1},
        "replicas": 2,
        "rollout": {"trafficRouting": "GatewayAPI", "canaryHeader": "x-autoglm-canary",
                    "gateway": {"name": "inference-gateway", "namespace": "gateway-system", "sectionName": "http"}},
    },
    "hf-mig": {
        "model": {"uri": "hf://THUDM/glm-4-9b-chat"},
        "runtime": {"version": "0.2.0"},
        "resources": {"gpus": 2, "gpuResourceName": "nvidia.com/mig-3g.40gb"},
        "replicas": 3,
    },
}


def cr_for(name: str, spec: dict, namespace: str = "demo") -> dict:
    return {"apiVersion": "autoglm.io/v1alpha1", "kind": "AutoGLMDeployment",
            "metadata": {"name": name, "namespace": namespace, "uid": UID, "generation": 1}, "spec": spec}


def resolved(name: str, spec: dict):
    return resolve_spec(name, "demo", spec, default_image="ghcr.io/autoglm/runtime", default_version="0.1.0")


def children(name: str, spec: dict) -> list[dict]:
    cr, r = cr_for(name, spec), resolved(name, spec)
    rev = b.revision_hash(r)
    docs = [b.build_deployment(cr, r, rev, replicas=r.spec.autoscaling.bounds[0] if r.spec.autoscaling.enabled
                               else r.spec.fixed_replicas),
            b.build_service(cr, r, [rev])]
    if r.spec.autoscaling.enabled and r.spec.autoscaling.provider == "KEDA":
        docs.append(b.build_scaled_object(cr, r, rev, r.spec.autoscaling.prometheus.address or ""))
    elif r.spec.autoscaling.enabled:
        docs.append(b.build_hpa(cr, r, b.revision_name(name, rev)))
    if (r.spec.autoscaling.bounds[0] if r.spec.autoscaling.enabled else r.spec.fixed_replicas) > 1:
        docs.append(b.build_pdb(cr, r))
    if r.spec.network_policy.enabled:
        docs.append(b.build_network_policy(cr, r))
    if r.spec.rollout.traffic_routing == "GatewayAPI":  # mid-canary at 10 %, with a rule of the user's
        docs += [b.build_route_service(cr, r, "stable", rev), b.build_route_service(cr, r, "canary", CANARY),
                 b.build_http_route(cr, r, 10, [USER_RULE])]
    return docs


CANARY = "c0ffee0000"
USER_RULE = {"name": "docs", "matches": [{"path": {"type": "PathPrefix", "value": "/docs"}}],
             "backendRefs": [{"name": "docs", "port": 80}]}


def test_http_route_replaces_only_its_own_rules() -> None:
    spec = SPECS["gateway-canary"]
    cr, r = cr_for("chat", spec), resolved("chat", spec)
    first = b.build_http_route(cr, r, 10, [USER_RULE])
    again = b.build_http_route(cr, r, 50, first["spec"]["rules"])
    names = [rule.get("name") for rule in again["spec"]["rules"]]
    assert names == [b.RULE_CANARY_HEADER, b.RULE_WEIGHTED, "docs"]
    assert again["spec"]["rules"][2] == USER_RULE
    weighted = again["spec"]["rules"][1]["backendRefs"]
    assert [(ref["name"], ref["weight"]) for ref in weighted] == [("chat-stable", 50), ("chat-canary", 50)]
    header = again["spec"]["rules"][0]["matches"][0]["headers"][0]
    assert header == {"type": "Exact", "name": "x-autoglm-canary", "value": "always"}


def test_shared_service_selects_both_revisions_during_a_canary() -> None:
    spec = SPECS["tiny-cpu"]
    cr, r = cr_for("chat", spec), resolved("chat", spec)
    assert b.build_service(cr, r, ["aaa", "bbb"])["spec"]["selector"] == {b.LABEL_DEPLOYMENT: "chat"}
    assert b.build_service(cr, r, ["aaa"])["spec"]["selector"] == {b.LABEL_DEPLOYMENT: "chat", b.LABEL_REVISION: "aaa"}


@pytest.mark.parametrize("case", sorted(SPECS))
def test_golden(case: str) -> None:
    text = yaml.safe_dump_all(children(case, SPECS[case]), sort_keys=True, default_flow_style=False)
    path = GOLDEN / f"{case}.yaml"
    if os.environ.get("UPDATE_GOLDEN"):
        path.write_text(text)
    assert path.exists(), f"missing {path}; run UPDATE_GOLDEN=1 .venv/bin/pytest {__file__}"
    assert text == path.read_text(), f"{case} differs from {path} (UPDATE_GOLDEN=1 to accept)"


def test_revision_hash_is_stable_and_ignores_key_order() -> None:
    spec = SPECS["gpu-autoscaling-pvc-auth-tls"]
    shuffled = {k: spec[k] for k in reversed(list(spec))}
    shuffled["model"] = {k: spec["model"][k] for k in reversed(list(spec["model"]))}
    h = b.revision_hash(resolved("chat", spec))
    assert h == b.revision_hash(resolved("chat", shuffled))
    assert len(h) == 10 and all(c in "0123456789abcdef" for c in h)
    # A fixed value: the hash must not change between runs or Python processes (hash seeds).
    assert b.revision_hash(resolved("chat", SPECS["tiny-cpu"])) == b.stable_hash(
        b.revision_inputs(resolved("chat", SPECS["tiny-cpu"])))


def test_revision_hash_ignores_scaling_and_rollout_policy() -> None:
    spec = copy.deepcopy(SPECS["gpu-autoscaling-pvc-auth-tls"])
    h = b.revision_hash(resolved("chat", spec))
    spec["autoscaling"] |= {"minReplicas": 3, "maxReplicas": 12, "targetQueueDepth": 4, "targetCPUUtilization": 0,
                            "scaleDownStabilizationSeconds": 60}
    spec["rollout"] = {"steps": [{"weight": 10, "pause": "60s"}], "progressDeadlineSeconds": 300}
    assert b.revision_hash(resolved("chat", spec)) == h
    tiny = copy.deepcopy(SPECS["tiny-cpu"])
    h2 = b.revision_hash(resolved("tiny", tiny))
    tiny["replicas"] = 5
    assert b.revision_hash(resolved("tiny", tiny)) == h2


@pytest.mark.parametrize("change", [
    lambda s: s["runtime"].__setitem__("version", "0.2.0"),
    lambda s: s["model"].__setitem__("uri", "pvc://model-store/glm-4-9b-chat-v2"),
    lambda s: s["model"].__setitem__("dtype", "float16"),
    lambda s: s["runtime"].__setitem__("maxBatchSize", 64),
    lambda s: s["resources"].__setitem__("gpus", 2),
    lambda s: s["resources"].__setitem__("gpuProduct", "NVIDIA-H100-80GB-HBM3"),
    lambda s: s["runtime"]["env"].append({"name": "X", "value": "1"}),
    lambda s: s["auth"]["apiKeySecretRef"].__setitem__("name", "other"),
])
def test_revision_hash_changes_with_what_pods_run(change) -> None:
    spec = copy.deepcopy(SPECS["gpu-autoscaling-pvc-auth-tls"])
    h = b.revision_hash(resolved("chat", spec))
    change(spec)
    assert b.revision_hash(resolved("chat", spec)) != h


def test_default_image_is_part_of_the_revision() -> None:
    spec = SPECS["tiny-cpu"]
    a = resolve_spec("t", "demo", spec, default_image="ghcr.io/autoglm/runtime", default_version="0.1.0")
    c = resolve_spec("t", "demo", spec, default_image="registry.local/runtime", default_version="0.1.0")
    assert b.revision_hash(a) != b.revision_hash(c)


def test_deployment_essentials() -> None:
    docs = children("chat", SPECS["gpu-autoscaling-pvc-auth-tls"])
    dep, svc, hpa, pdb, netpol = docs
    rev = dep["metadata"]["labels"][b.LABEL_REVISION]
    assert dep["metadata"]["name"] == f"chat-{rev}"
    assert dep["metadata"]["ownerReferences"][0] | {} == {
        "apiVersion": "autoglm.io/v1alpha1", "kind": "AutoGLMDeployment", "name": "chat", "uid": UID,
        "controller": True, "blockOwnerDeletion": True}
    pod = dep["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["image"] == "registry.example.com/autoglm/runtime:0.1.0"
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert pod["nodeSelector"] == {"pool": "inference", "nvidia.com/gpu.product": "NVIDIA-A10G"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert {"name": "AUTOGLM_RUNTIME_API_KEY",
            "valueFrom": {"secretKeyRef": {"name": "chat-api-key", "key": "token"}}} in c["env"]
    assert c["env"][-1] == {"name": "AUTOGLM_RUNTIME_LOG_LEVEL", "value": "debug"}
    assert pod["volumes"][0] == {"name": "model",
                                 "persistentVolumeClaim": {"claimName": "model-store", "readOnly": True}}
    assert c["volumeMounts"][0]["subPath"] == "glm-4-9b-chat"
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["args"][c["args"].index("--revision") + 1] == rev
    assert svc["spec"]["selector"] == {b.LABEL_DEPLOYMENT: "chat", b.LABEL_REVISION: rev}
    assert hpa["spec"]["scaleTargetRef"]["name"] == f"chat-{rev}"
    assert [m["type"] for m in hpa["spec"]["metrics"]] == ["Pods", "Resource"]
    assert pdb["spec"]["maxUnavailable"] == 1
    # TLS: HTTPS serving, probes and scrapes; the certificate mounted read-only.
    assert c["args"][c["args"].index("--ssl-certfile") + 1] == "/etc/autoglm/tls/tls.crt"
    assert c["readinessProbe"]["httpGet"]["scheme"] == "HTTPS" and c["startupProbe"]["httpGet"]["scheme"] == "HTTPS"
    assert {"name": "tls", "secret": {"secretName": "chat-tls"}} in pod["volumes"]
    assert dep["spec"]["template"]["metadata"]["annotations"]["prometheus.io/scheme"] == "https"
    # NetworkPolicy: labelled clients and the monitoring namespace, on the model port only.
    ingress = netpol["spec"]["ingress"][0]
    assert netpol["spec"]["podSelector"] == {"matchLabels": {b.LABEL_DEPLOYMENT: "chat"}}
    assert {"podSelector": {"matchLabels": {"autoglm.io/client": "true"}}} in ingress["from"]
    assert ingress["ports"] == [{"protocol": "TCP", "port": 8000}]


def test_hf_source_downloads_in_an_init_container() -> None:
    dep = children("hf", SPECS["hf-mig"])[0]
    pod = dep["spec"]["template"]["spec"]
    init = pod["initContainers"][0]
    assert "THUDM/glm-4-9b-chat" in init["command"]
    assert {"name": "model", "emptyDir": {}} in pod["volumes"]
    assert pod["containers"][0]["resources"]["requests"]["nvidia.com/mig-3g.40gb"] == "2"


def test_no_cpu_limit_no_gpu_for_cpu_pods() -> None:
    dep = children("tiny", SPECS["tiny-cpu"])[0]
    pod = dep["spec"]["template"]["spec"]
    assert "tolerations" not in pod and "nodeSelector" not in pod
    assert pod["volumes"][0]["hostPath"]["path"] == "/models/tiny-glm"
    assert pod["containers"][0]["resources"] == {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"memory": "2Gi"}}


def test_hpa_clamps_min_and_max() -> None:
    spec = {"model": {"uri": "hf://a/b"}, "autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 2}}
    hpa = b.build_hpa(cr_for("x", spec), resolved("x", spec), "x-abc")
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (5, 5)


def test_invalid_spec_names_the_field() -> None:
    with pytest.raises(InvalidSpec, match="model.uri"):
        resolved("x", {"model": {"uri": "s3://bucket/model"}})
    with pytest.raises(InvalidSpec, match="spec.resources.gpus"):
        resolved("x", {"model": {"uri": "hf://a/b"}, "resources": {"gpus": -1}})
