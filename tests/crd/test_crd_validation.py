"""The AutoGLMDeployment CRD on a real kube-apiserver: it installs, examples pass, bad input is
rejected at `kubectl apply` with a message naming the field, defaults are filled in, `kubectl
explain`/`get`/`scale` behave. No operator runs here: these are the API's own guarantees.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from autoglm_operator.models import parse_model_uri, resolve_spec
from tests.crd.test_crd_generated import URIS
from tests.helpers import wait_for

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[2]
CRD_NAME = "autoglmdeployments.autoglm.io"
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))
DELETE = object()  # in a patch: remove this key


@pytest.fixture(scope="module")
def crd(kube):
    """Install the CRD (idempotent: other modules may have installed it) and wait until usable."""
    # The default field manager, like `kubectl apply --server-side -f crds/` elsewhere, so no conflicts.
    kube.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(REPO / "crds"))
    kube.kubectl("wait", "--for=condition=Established", f"crd/{CRD_NAME}", "--timeout=60s")
    wait_for(lambda: kube.kubectl("get", "agd", "-A", check=False).returncode == 0, timeout=30,
             message="kubectl to discover the agd short name")
    return kube


# A valid resource that uses most fields; every bad case below changes one thing in it.
BASE: dict[str, Any] = {
    "apiVersion": "autoglm.io/v1alpha1",
    "kind": "AutoGLMDeployment",
    "metadata": {"name": "chat"},
    "spec": {
        "model": {"name": "glm-4-9b-chat", "uri": "pvc://model-store/glm-4-9b-chat", "dtype": "bfloat16", "maxModelLen": 8192},
        "runtime": {"image": "registry.example.com/autoglm/runtime", "version": "0.1.0", "maxBatchSize": 32,
                    "maxQueue": 256, "env": [{"name": "LOG_LEVEL", "value": "info"}]},
        "resources": {"gpus": 1, "gpuResourceName": "nvidia.com/gpu", "gpuProduct": "NVIDIA-A10G", "cpu": "4", "memory": "32Gi"},
        "nodeSelector": {"pool": "gpu"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "replicas": 2,
        "autoscaling": {"enabled": False, "minReplicas": 1, "maxReplicas": 8, "targetQueueDepth": 8},
        "rollout": {
            "steps": [{"weight": 10, "pause": "60s"}, {"weight": 50, "pause": "2m"}],
            "trafficRouting": "Replicas",
            "canaryHeader": "x-autoglm-canary",
            "analysis": {"prometheus": {"address": "http://prometheus.monitoring:9090"}, "interval": "30s",
                         "successRateMin": 0.99, "latencyP99MaxSeconds": 2.0, "failureThreshold": 2, "minRequests": 20},
            "progressDeadlineSeconds": 900,
        },
        "auth": {"apiKeySecretRef": {"name": "chat-api-key", "key": "token"}},
    },
}


def merged(base: Any, patch: Any) -> Any:
    """``base`` with ``patch`` merged in: dicts recursively, DELETE removes a key, anything else replaces."""
    if not isinstance(patch, dict) or not isinstance(base, dict):
        return copy.deepcopy(patch)
    out = copy.deepcopy(base)
    for k, v in patch.items():
        if v is DELETE:
            out.pop(k, None)
        else:
            out[k] = merged(out.get(k), v)
    return out


def spec(**patch: Any) -> dict[str, Any]:
    return merged(BASE, {"spec": patch})


OAUTH2 = {"issuerURL": "https://login.example.com/", "audiences": ["autoglm"]}


def with_oauth2(**fields: Any) -> dict[str, Any]:
    """BASE with the router on and spec.auth.oauth2 (``fields`` changed) in place of the API key."""
    return spec(router={"enabled": True}, auth={"apiKeySecretRef": DELETE, "oauth2": merged(OAUTH2, fields)})


def enabled_autoscaling(**extra: Any) -> dict[str, Any]:
    return {"replicas": DELETE, "autoscaling": {"enabled": True, **extra}}


def apply(kube, obj: dict[str, Any], namespace: str, *extra: str):
    """`kubectl apply -f -`, exactly what a user runs (client-side apply: a plain create)."""
    return kube.kubectl("apply", "-n", namespace, "-f", "-", *extra, input=json.dumps(obj), check=False)


# (id, resource, substrings the apiserver's error must contain: the field path first).
BAD: list[tuple[str, dict[str, Any], tuple[str, ...]]] = [
    ("no-spec", merged(BASE, {"spec": DELETE}), ("spec", "Required value")),
    ("no-model", spec(model=DELETE), ("spec.model", "Required value")),
    ("no-uri", spec(model={"uri": DELETE}), ("spec.model.uri", "Required value")),
    ("uri-s3", spec(model={"uri": "s3://bucket/glm"}), ("spec.model.uri", "pvc://CLAIM/PATH")),
    ("uri-pvc-bad-claim", spec(model={"uri": "pvc://Model_Store/glm"}), ("spec.model.uri",)),
    ("uri-pvc-no-path", spec(model={"uri": "pvc://model-store"}), ("spec.model.uri",)),
    ("uri-hf-no-name", spec(model={"uri": "hf://THUDM"}), ("spec.model.uri",)),
    ("uri-hf-space", spec(model={"uri": "hf://THUDM/glm 4"}), ("spec.model.uri",)),
    ("uri-hf-at-in-org", spec(model={"uri": "hf://THU@DM/glm"}), ("spec.model.uri",)),
    ("dtype", spec(model={"dtype": "fp8"}), ("spec.model.dtype", "Unsupported value")),
    ("model-name-slash", spec(model={"name": "THUDM/glm-4"}), ("spec.model.name",)),
    ("max-model-len-0", spec(model={"maxModelLen": 0}), ("spec.model.maxModelLen",)),
    ("unknown-field", spec(model={"nmae": "typo"}), ("spec.model.nmae",)),
    ("image-with-tag", spec(runtime={"image": "registry.example.com/autoglm/runtime:0.1.0"}), ("spec.runtime.image",)),
    ("image-upper", spec(runtime={"image": "Registry/AutoGLM"}), ("spec.runtime.image",)),
    ("version-space", spec(runtime={"version": "0.1 beta"}), ("spec.runtime.version",)),
    ("version-number", spec(runtime={"version": 0.1}), ("spec.runtime.version", "string")),
    ("max-batch-0", spec(runtime={"maxBatchSize": 0}), ("spec.runtime.maxBatchSize",)),
    ("max-queue-0", spec(runtime={"maxQueue": 0}), ("spec.runtime.maxQueue",)),
    ("env-value-and-from", spec(runtime={"env": [{"name": "A", "value": "1", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]}),
     ("spec.runtime.env[0].valueFrom", "mutually exclusive")),
    ("env-duplicate", spec(runtime={"env": [{"name": "A", "value": "1"}, {"name": "A", "value": "2"}]}),
     ("spec.runtime.env[1]", "Duplicate")),
    ("env-bad-name", spec(runtime={"env": [{"name": "1=A", "value": "1"}]}), ("spec.runtime.env[0].name",)),
    ("gpus-negative", spec(resources={"gpus": -1}), ("spec.resources.gpus",)),
    ("gpu-product-on-cpu", spec(resources={"gpus": 0}), ("spec.resources.gpuProduct", "gpus > 0")),
    ("gpu-resource-no-domain", spec(resources={"gpuResourceName": "gpu"}), ("spec.resources.gpuResourceName",)),
    ("cpu-word", spec(resources={"cpu": "four"}), ("spec.resources.cpu", "quantity")),
    ("cpu-zero", spec(resources={"cpu": 0}), ("spec.resources.cpu",)),
    ("memory-gb", spec(resources={"memory": "32GB"}), ("spec.resources.memory", "quantity")),
    ("memory-negative", spec(resources={"memory": "-1Gi"}), ("spec.resources.memory",)),
    ("node-selector-value", spec(nodeSelector={"pool": "x" * 64}), ("spec.nodeSelector.pool",)),
    ("toleration-operator", spec(tolerations=[{"key": "k", "operator": "Maybe"}]), ("spec.tolerations[0].operator",)),
    ("toleration-exists-value", spec(tolerations=[{"key": "k", "operator": "Exists", "value": "v"}]),
     ("spec.tolerations[0].value",)),
    ("toleration-seconds", spec(tolerations=[{"key": "k", "operator": "Exists", "effect": "NoSchedule", "tolerationSeconds": 30}]),
     ("spec.tolerations[0].tolerationSeconds", "NoExecute")),
    ("replicas-negative", spec(replicas=-1), ("spec.replicas",)),
    ("replicas-with-autoscaling", spec(autoscaling={"enabled": True}), ("spec.replicas", "autoscaling.enabled")),
    ("min-over-max", spec(**enabled_autoscaling(minReplicas=5, maxReplicas=2)),
     ("spec.autoscaling.minReplicas", "minReplicas (5)", "maxReplicas (2)")),
    ("autoscaling-no-max", spec(**enabled_autoscaling(maxReplicas=DELETE)), ("spec.autoscaling.maxReplicas", "Required")),
    ("queue-depth-0", spec(autoscaling={"targetQueueDepth": 0}), ("spec.autoscaling.targetQueueDepth",)),
    ("min-0-with-hpa", spec(router={"enabled": True}, **enabled_autoscaling(minReplicas=0)),
     ("spec.autoscaling.minReplicas", "needs autoscaling.provider KEDA and router.enabled true")),
    ("min-0-without-router", spec(**enabled_autoscaling(provider="KEDA", minReplicas=0)),
     ("spec.autoscaling.minReplicas", "needs autoscaling.provider KEDA and router.enabled true")),
    ("min-negative", spec(autoscaling={"minReplicas": -1}), ("spec.autoscaling.minReplicas",)),
    ("scale-to-zero-after-words", spec(autoscaling={"scaleToZeroAfter": "5 minutes"}),
     ("spec.autoscaling.scaleToZeroAfter",)),
    ("hold-timeout-words", spec(router={"holdTimeout": "2 min"}), ("spec.router.holdTimeout",)),
    ("tls-without-secret", spec(tls={}), ("spec.tls.secretRef", "Required value")),
    ("tls-secret-without-name", spec(tls={"secretRef": {}}), ("spec.tls.secretRef.name", "Required value")),
    ("autoscaling-provider-unknown", spec(autoscaling={"provider": "VPA"}),
     ("spec.autoscaling.provider", "Unsupported value", '"HPA"', '"KEDA"')),
    ("autoscaling-prometheus-no-scheme", spec(autoscaling={"provider": "KEDA", "prometheus": {"address": "prom:9090"}}),
     ("spec.autoscaling.prometheus.address",)),
    ("cpu-utilization-150", spec(autoscaling={"targetCPUUtilization": 150}), ("spec.autoscaling.targetCPUUtilization",)),
    ("stabilization-too-long", spec(autoscaling={"scaleDownStabilizationSeconds": 7200}),
     ("spec.autoscaling.scaleDownStabilizationSeconds",)),
    ("step-weight-0", spec(rollout={"steps": [{"weight": 0}]}), ("spec.rollout.steps[0].weight",)),
    ("step-weight-101", spec(rollout={"steps": [{"weight": 10}, {"weight": 101}]}), ("spec.rollout.steps[1].weight",)),
    ("step-no-weight", spec(rollout={"steps": [{"pause": "1m"}]}), ("spec.rollout.steps[0].weight", "Required")),
    ("steps-decreasing", spec(rollout={"steps": [{"weight": 50}, {"weight": 10}]}), ("spec.rollout.steps", "strictly increasing")),
    ("steps-equal", spec(rollout={"steps": [{"weight": 10}, {"weight": 20}, {"weight": 20}]}),
     ("spec.rollout.steps", "strictly increasing", "got [10, 20, 20]")),
    ("steps-too-many", spec(rollout={"steps": [{"weight": w} for w in range(1, 23)]}), ("spec.rollout.steps", "must have at most 20")),
    ("pause-words", spec(rollout={"steps": [{"weight": 10, "pause": "1 minute"}]}), ("spec.rollout.steps[0].pause",)),
    ("traffic-routing", spec(rollout={"trafficRouting": "Istio"}), ("spec.rollout.trafficRouting", "Unsupported value")),
    ("gateway-missing", spec(rollout={"trafficRouting": "GatewayAPI"}), ("spec.rollout.gateway", "Required value")),
    ("gateway-bad-name", spec(rollout={"trafficRouting": "GatewayAPI", "gateway": {"name": "Inference_GW"}}),
     ("spec.rollout.gateway.name",)),
    ("canary-header-space", spec(rollout={"canaryHeader": "x canary"}), ("spec.rollout.canaryHeader",)),
    ("success-rate-over-1", spec(rollout={"analysis": {"successRateMin": 1.5}}), ("spec.rollout.analysis.successRateMin",)),
    ("latency-zero", spec(rollout={"analysis": {"latencyP99MaxSeconds": 0}}), ("spec.rollout.analysis.latencyP99MaxSeconds",)),
    ("interval-words", spec(rollout={"analysis": {"interval": "often"}}), ("spec.rollout.analysis.interval",)),
    ("max-surge-0", spec(rollout={"maxSurge": 0}), ("spec.rollout.maxSurge",)),
    ("max-surge-with-autoscaling", spec(replicas=DELETE, autoscaling={"enabled": True}, rollout={"maxSurge": 1}),
     ("spec.rollout.maxSurge", "needs a fixed replica count")),
    ("router-routing-without-router", spec(rollout={"trafficRouting": "Router"}),
     ("spec.router.enabled", "trafficRouting Router needs router.enabled true")),
    ("router-with-gateway", spec(router={"enabled": True},
                                 rollout={"trafficRouting": "GatewayAPI", "gateway": {"name": "gw"}}),
     ("spec.rollout.trafficRouting", "route around the router")),
    ("router-session-key", spec(router={"enabled": True, "sessionKey": "cookie:x"}), ("spec.router.sessionKey",)),
    ("router-load-factor", spec(router={"enabled": True, "loadFactor": 0.5}), ("spec.router.loadFactor",)),
    ("router-policy", spec(router={"policy": "Random"}), ("spec.router.policy", "Unsupported value")),
    ("router-replicas-0", spec(router={"replicas": 0}), ("spec.router.replicas",)),
    ("ratio-below-1", spec(rollout={"analysis": {"maxRatioToStable": 0.5}}), ("spec.rollout.analysis.maxRatioToStable",)),
    ("ttft-zero", spec(rollout={"analysis": {"ttftP99MaxSeconds": 0}}), ("spec.rollout.analysis.ttftP99MaxSeconds",)),
    ("prometheus-no-scheme", spec(rollout={"analysis": {"prometheus": {"address": "prometheus:9090"}}}),
     ("spec.rollout.analysis.prometheus.address",)),
    ("progress-deadline-0", spec(rollout={"progressDeadlineSeconds": 0}), ("spec.rollout.progressDeadlineSeconds",)),
    ("oauth2-without-router", spec(auth={"apiKeySecretRef": DELETE, "oauth2": OAUTH2}),
     ("spec.auth.oauth2", "auth.oauth2 needs router.enabled true")),
    ("oauth2-with-api-key", spec(router={"enabled": True}, auth={"oauth2": OAUTH2}),
     ("spec.auth.apiKeySecretRef", "cannot both be set")),
    ("oauth2-issuer-not-url", with_oauth2(issuerURL="login.example.com"), ("spec.auth.oauth2.issuerURL",)),
    ("oauth2-issuer-query", with_oauth2(issuerURL="https://login.example.com/?tenant=a"), ("spec.auth.oauth2.issuerURL",)),
    ("oauth2-no-audiences", with_oauth2(audiences=[]), ("spec.auth.oauth2.audiences",)),
    ("oauth2-audiences-missing", with_oauth2(audiences=DELETE), ("spec.auth.oauth2.audiences", "Required value")),
    ("oauth2-scope-space", with_oauth2(requiredScopes=["infer admin"]), ("spec.auth.oauth2.requiredScopes[0]",)),
    ("oauth2-user-claim-space", with_oauth2(userClaim="user id"), ("spec.auth.oauth2.userClaim",)),
    ("secret-bad-name", spec(auth={"apiKeySecretRef": {"name": "Chat Key"}}), ("spec.auth.apiKeySecretRef.name",)),
    ("secret-no-name", spec(auth={"apiKeySecretRef": {"name": DELETE}}), ("spec.auth.apiKeySecretRef.name", "Required value")),
    ("name-too-long", merged(BASE, {"metadata": {"name": "c" * 53}}), ("metadata.name", "52")),
    ("name-starts-with-digit", merged(BASE, {"metadata": {"name": "4chat"}}), ("metadata.name", "DNS-1035")),
    ("name-with-dot", merged(BASE, {"metadata": {"name": "chat.v1"}}), ("metadata.name", "DNS-1035")),
]


def test_there_are_enough_bad_cases():
    assert len(BAD) >= 25
    assert len({case_id for case_id, _, _ in BAD}) == len(BAD)


def test_crd_is_established(crd):
    out = crd.kubectl("get", "crd", CRD_NAME, "-o", "json").stdout
    status = json.loads(out)["status"]
    conditions = {c["type"]: c["status"] for c in status["conditions"]}
    assert conditions.get("Established") == "True"
    assert conditions.get("NamesAccepted") == "True"
    assert status["acceptedNames"]["shortNames"] == ["agd"]
    assert status["acceptedNames"]["categories"] == ["autoglm"]


def test_base_resource_is_valid(crd, namespace):
    proc = apply(crd, BASE, namespace, "--dry-run=server")
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_example_applies(crd, namespace, example):
    proc = crd.kubectl("apply", "--server-side", "--field-manager=autoglm-tests", "-n", namespace, "-f", str(example), check=False)
    assert proc.returncode == 0, proc.stderr
    # Nothing was pruned: what comes back contains everything the example said.
    doc = yaml.safe_load(example.read_text())
    got = json.loads(crd.kubectl("get", "agd", doc["metadata"]["name"], "-n", namespace, "-o", "json").stdout)
    assert merged(got["spec"], doc["spec"]) == got["spec"]


@pytest.mark.parametrize("case_id,obj,expected", BAD, ids=[case_id for case_id, _, _ in BAD])
def test_bad_resource_is_rejected(crd, namespace, case_id, obj, expected):
    proc = apply(crd, obj, namespace)
    assert proc.returncode != 0, f"{case_id} was accepted:\n{proc.stdout}"
    for text in expected:
        assert text in proc.stderr, f"{case_id}: {text!r} not in the error:\n{proc.stderr}"
    names = crd.kubectl("get", "agd", "-n", namespace, "-o", "name").stdout.split()
    assert names == []


def test_scale_to_zero_with_keda_and_the_router_is_accepted(crd, namespace):
    obj = spec(router={"enabled": True, "holdTimeout": "3m"},
               **enabled_autoscaling(provider="KEDA", minReplicas=0, scaleToZeroAfter="90s"))
    proc = apply(crd, obj, namespace, "--dry-run=server")
    assert proc.returncode == 0, proc.stderr


def test_the_router_with_tls_is_accepted(crd, namespace):
    """The router serves and calls HTTPS with spec.tls's certificate (it was refused before it could)."""
    obj = spec(router={"enabled": True}, tls={"secretRef": {"name": "chat-tls"}})
    proc = apply(crd, obj, namespace, "--dry-run=server")
    assert proc.returncode == 0, proc.stderr
    resolve_spec("chat", namespace, obj["spec"], default_image="autoglm/runtime", default_version="0.1.0")


def test_defaults_are_filled_in(crd, namespace):
    minimal = {"apiVersion": "autoglm.io/v1alpha1", "kind": "AutoGLMDeployment", "metadata": {"name": "mini"},
               "spec": {"model": {"uri": "hf://THUDM/glm-4-9b-chat"}, "autoscaling": {"enabled": True, "maxReplicas": 3},
                        "rollout": {"analysis": {"prometheus": {"address": "http://prom:9090"}}},
                        "auth": {"apiKeySecretRef": {"name": "key"}}, "networkPolicy": {"enabled": True}}}
    proc = apply(crd, minimal, namespace)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(crd.kubectl("get", "agd", "mini", "-n", namespace, "-o", "json").stdout)["spec"]
    assert got["model"] == {"uri": "hf://THUDM/glm-4-9b-chat", "dtype": "auto"}
    assert got["runtime"] == {"maxBatchSize": 32, "maxQueue": 256}
    assert got["resources"] == {"gpus": 1, "gpuResourceName": "nvidia.com/gpu"}
    assert got["autoscaling"] == {"enabled": True, "provider": "HPA", "minReplicas": 1, "maxReplicas": 3,
                                  "targetQueueDepth": 8, "targetCPUUtilization": 0,
                                  "scaleDownStabilizationSeconds": 300, "scaleToZeroAfter": "5m"}
    assert got["rollout"] == {
        "steps": [{"weight": 10, "pause": "60s"}, {"weight": 50, "pause": "120s"}],
        "trafficRouting": "Replicas", "canaryHeader": "x-autoglm-canary", "progressDeadlineSeconds": 900,
        "analysis": {"prometheus": {"address": "http://prom:9090"}, "interval": "30s", "successRateMin": 0.99,
                     "failureThreshold": 2, "minRequests": 20},
    }
    assert got["auth"] == {"apiKeySecretRef": {"name": "key", "key": "token"}}
    assert got["networkPolicy"] == {"enabled": True, "monitoringNamespace": "monitoring"}
    assert "replicas" not in got


def test_oauth2_with_the_router_applies_and_user_claim_defaults_to_sub(crd, namespace):
    proc = apply(crd, merged(with_oauth2(requiredScopes=["infer"]), {"metadata": {"name": "oauth"}}), namespace)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(crd.kubectl("get", "agd", "oauth", "-n", namespace, "-o", "json").stdout)["spec"]["auth"]
    assert got == {"oauth2": {**OAUTH2, "requiredScopes": ["infer"], "userClaim": "sub"}}


@pytest.mark.parametrize("uri", URIS)
def test_model_uri_grammar_is_the_operators(crd, namespace, uri):
    """The CEL rule (RE2, in the apiserver) admits exactly the URIs the operator parses."""
    try:
        parse_model_uri(uri)
        parsed = True
    except ValueError:
        parsed = False
    name = "u-" + hashlib.sha256(uri.encode()).hexdigest()[:8]
    obj = merged(BASE, {"metadata": {"name": name}, "spec": {"model": {"uri": uri}}})
    proc = apply(crd, obj, namespace)
    assert (proc.returncode == 0) == parsed, f"{uri!r}: operator parses={parsed}, apiserver says:\n{proc.stderr}"


def test_explain_shows_descriptions(crd):
    model = crd.kubectl("explain", "agd.spec.model").stdout
    for text in ("uri", "dtype", "maxModelLen", "pvc://CLAIM/PATH", "<string> -required-"):
        assert text in model, f"{text!r} not in:\n{model}"
    steps = crd.kubectl("explain", "agd.spec.rollout.steps").stdout
    for text in ("weight", "pause", "strictly", "increasing"):
        assert text in steps, f"{text!r} not in:\n{steps}"
    deep = crd.kubectl("explain", "agd.spec.rollout.analysis.successRateMin").stdout
    assert "non-5xx" in deep
    status = crd.kubectl("explain", "agd.status").stdout
    for field in ("ready", "stableVersion", "canaryWeight", "selector", "revisions", "conditions", "rolloutPhase",
                  "currentStep", "stepStartedAt", "failedChecks", "lastAnalysis", "previousStableVersion"):
        assert field in status


def test_get_shows_printer_columns(crd, namespace):
    assert crd.kubectl("apply", "-n", namespace, "-f", str(REPO / "examples" / "tiny-cpu.yaml")).returncode == 0
    header = crd.kubectl("get", "agd", "-n", namespace).stdout.splitlines()[0].split()
    assert header == ["NAME", "READY", "PHASE", "VERSION", "CANARY", "WEIGHT", "AGE"]
    wide = crd.kubectl("get", "agd", "-n", namespace, "-o", "wide").stdout.splitlines()[0].split()
    assert wide == ["NAME", "READY", "PHASE", "VERSION", "CANARY", "WEIGHT", "STEP", "ROLLOUT", "MODEL", "ENDPOINT",
                    "AGE"]

    # What the operator writes shows up in the columns (and the status schema accepts it).
    status = {"status": {"phase": "Progressing", "ready": "1/1", "replicas": 2, "readyReplicas": 1, "desiredReplicas": 1,
                         "observedGeneration": 1, "selector": "app.kubernetes.io/instance=tiny",
                         "stableRevision": "tiny-5d8f7c", "stableVersion": "0.1.0",
                         "canaryRevision": "tiny-9a1b2c", "canaryVersion": "0.2.0", "canaryWeight": 10,
                         "endpoint": f"http://tiny.{namespace}.svc.cluster.local:8000/v1",
                         "revisions": [{"name": "tiny-5d8f7c", "version": "0.1.0", "replicas": 1, "readyReplicas": 1},
                                       {"name": "tiny-9a1b2c", "version": "0.2.0", "replicas": 1, "readyReplicas": 0}],
                         "conditions": [{"type": "Ready", "status": "True", "reason": "AllReplicasReady", "message": "1/1",
                                         "observedGeneration": 1, "lastTransitionTime": "2026-01-01T00:00:00Z"}]}}
    crd.kubectl("patch", "agd", "tiny", "-n", namespace, "--subresource=status", "--type=merge", "-p", json.dumps(status))
    row = crd.kubectl("get", "agd", "tiny", "-n", namespace, "--no-headers").stdout.split()
    assert row[:6] == ["tiny", "1/1", "Progressing", "0.1.0", "0.2.0", "10"]
    wide_row = crd.kubectl("get", "agd", "tiny", "-n", namespace, "-o", "wide", "--no-headers").stdout.split()
    assert wide_row[6:8] == ["tiny", f"http://tiny.{namespace}.svc.cluster.local:8000/v1"]

    # The status schema holds the operator to the documented phases.
    bad = crd.kubectl("patch", "agd", "tiny", "-n", namespace, "--subresource=status", "--type=merge",
                      "-p", json.dumps({"status": {"phase": "Running"}}), check=False)
    assert bad.returncode != 0 and "status.phase" in bad.stderr


def test_scale_when_autoscaling_is_off(crd, namespace):
    crd.kubectl("apply", "-n", namespace, "-f", str(REPO / "examples" / "tiny-cpu.yaml"))
    crd.kubectl("scale", "agd/tiny", "-n", namespace, "--replicas=3")
    replicas = crd.kubectl("get", "agd", "tiny", "-n", namespace, "-o", "jsonpath={.spec.replicas}").stdout
    assert replicas == "3"
    scale = json.loads(crd.kubectl("get", "--raw", f"/apis/autoglm.io/v1alpha1/namespaces/{namespace}/autoglmdeployments/tiny/scale").stdout)
    assert scale["kind"] == "Scale" and scale["spec"]["replicas"] == 3


def test_scale_with_no_replicas_set(crd, namespace):
    obj = merged(BASE, {"spec": {"replicas": DELETE}})
    assert apply(crd, obj, namespace).returncode == 0
    crd.kubectl("scale", "agd/chat", "-n", namespace, "--replicas=4")
    assert crd.kubectl("get", "agd", "chat", "-n", namespace, "-o", "jsonpath={.spec.replicas}").stdout == "4"


def test_scale_is_refused_when_autoscaling_is_on(crd, namespace):
    crd.kubectl("apply", "-n", namespace, "-f", str(REPO / "examples" / "glm4-9b-gpu.yaml"))
    proc = crd.kubectl("scale", "agd/glm4-chat", "-n", namespace, "--replicas=3", check=False)
    assert proc.returncode != 0
    assert "spec.replicas" in proc.stderr and "autoscaling.enabled" in proc.stderr
    got = crd.kubectl("get", "agd", "glm4-chat", "-n", namespace, "-o", "jsonpath={.spec.replicas}").stdout
    assert got == ""


def test_plain_kubectl_apply_installs_the_crd(crd):
    # The README says `kubectl apply -f crds/` (client-side): the CRD must fit its annotation too.
    proc = crd.kubectl("apply", "--dry-run=server", "-f", str(REPO / "crds"))
    assert "autoglmdeployments.autoglm.io" in proc.stdout


def test_switching_from_replicas_to_autoscaling_with_apply(crd, namespace):
    # kubectl's three-way merge drops spec.replicas when the new manifest leaves it out, so the
    # "not both" rule does not get in the way of a normal edit-and-apply.
    fixed = merged(BASE, {"spec": {"autoscaling": DELETE}})
    assert apply(crd, fixed, namespace).returncode == 0
    proc = apply(crd, spec(**enabled_autoscaling()), namespace)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(crd.kubectl("get", "agd", "chat", "-n", namespace, "-o", "json").stdout)["spec"]
    assert "replicas" not in got and got["autoscaling"]["enabled"] is True
    # Updates are validated too: the rules are not only for create.
    proc = crd.kubectl("patch", "agd", "chat", "-n", namespace, "--type=merge", "-p",
                       json.dumps({"spec": {"autoscaling": {"minReplicas": 9}}}), check=False)
    assert proc.returncode != 0 and "spec.autoscaling.minReplicas" in proc.stderr
