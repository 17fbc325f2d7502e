"""Pure builders: a typed spec in, Kubernetes manifests (plain dicts) out. No API calls here.

Names: Deployment ``{cr}-{revision-hash}`` (the *revision name*), Service/HPA/PDB ``{cr}``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from autoglm_runtime import defaults as runtime_defaults

from . import queries
from .models import API_VERSION, KIND, ResolvedSpec
from .names import revision_name

__all__ = ["revision_name"]  # b.revision_name is how the other modules name a revision

PORT = runtime_defaults.PORT
MODEL_DIR = "/models/model"
MANAGER = "autoglm-operator"
APP_NAME = "autoglm-runtime"

LABEL_NAME = "app.kubernetes.io/name"
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_VERSION = "app.kubernetes.io/version"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_DEPLOYMENT = "autoglm.io/deployment"
LABEL_REVISION = "autoglm.io/revision"
ANNOTATION_SPEC_HASH = "autoglm.io/spec-hash"
MANAGED_SELECTOR = f"{LABEL_MANAGED_BY}={MANAGER}"

# Bump to roll every revision when the pod template's shape changes in a way old pods must not keep.
POD_TEMPLATE_SCHEMA = 1


# ---------------------------------------------------------------- hashing


def stable_hash(value: Any, length: int = 10) -> str:
    """Hex digest of the canonical JSON of ``value`` (dict key order never matters)."""
    blob = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


def revision_inputs(r: ResolvedSpec) -> dict[str, Any]:
    """Everything the pods run, and nothing else (no replicas, autoscaling, rollout policy)."""
    s = r.spec
    return {
        "schema": POD_TEMPLATE_SCHEMA,
        "image": r.image,
        "version": r.version,
        "model": {
            "name": r.model_name,
            "uri": s.model.uri,
            "dtype": s.model.dtype,
            "maxModelLen": s.model.max_model_len,
        },
        "runtime": {
            "maxBatchSize": s.runtime.max_batch_size,
            "maxQueue": s.runtime.max_queue,
            "env": [e.to_pod() for e in s.runtime.env],
        },
        "resources": {
            "gpus": s.resources.gpus,
            "gpuResourceName": s.resources.gpu_resource_name,
            "gpuProduct": s.resources.gpu_product,
            "cpu": s.resources.cpu_request,
            "memory": s.resources.memory_request,
        },
        "nodeSelector": s.node_selector,
        "tolerations": [t.to_pod() for t in s.tolerations],
        "auth": s.auth.api_key_secret_ref.model_dump() if s.auth.api_key_secret_ref else None,
        **({"tls": s.tls.secret_ref.name} if s.tls else {}),  # absent when off: old hashes stay valid
    }


def revision_hash(r: ResolvedSpec) -> str:
    """Short deterministic hash of what the pods run."""
    return stable_hash(revision_inputs(r))


# ---------------------------------------------------------------- metadata helpers


def selector_labels(cr_name: str, rev_hash: str | None = None) -> dict[str, str]:
    labels = {LABEL_DEPLOYMENT: cr_name}
    if rev_hash:
        labels[LABEL_REVISION] = rev_hash
    return labels


def common_labels(cr_name: str, version: str | None = None) -> dict[str, str]:
    labels = {
        LABEL_NAME: APP_NAME,
        LABEL_INSTANCE: cr_name,
        LABEL_COMPONENT: "runtime",
        LABEL_MANAGED_BY: MANAGER,
        LABEL_DEPLOYMENT: cr_name,
    }
    if version:
        labels[LABEL_VERSION] = version
    return labels


def revision_labels(r: ResolvedSpec, rev_hash: str) -> dict[str, str]:
    return {**common_labels(r.name, r.version), LABEL_REVISION: rev_hash}


def owner_reference(cr: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": cr["metadata"]["name"],
        "uid": cr["metadata"]["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _metadata(cr: dict[str, Any], name: str, labels: dict[str, str]) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": cr["metadata"]["namespace"],
        "labels": labels,
        "ownerReferences": [owner_reference(cr)],
    }


def selector_string(labels: Mapping[str, str]) -> str:
    """Equality labels in the apiserver's selector syntax (``k1=v1,k2=v2``, sorted)."""
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


TLS_DIR = "/etc/autoglm/tls"


def endpoint(name: str, namespace: str, tls: bool = False) -> str:
    return f"{'https' if tls else 'http'}://{name}.{namespace}.svc.cluster.local:{PORT}/v1"


# ---------------------------------------------------------------- Deployment


def _model_volume(r: ResolvedSpec) -> tuple[list[dict], list[dict], list[dict]]:
    """(volumes, runtime container mounts, init containers) for the model source."""
    src = r.source
    if src.scheme == "pvc":
        mount = {"name": "model", "mountPath": MODEL_DIR, "readOnly": True}
        if src.path:
            mount["subPath"] = src.path
        vol = {"name": "model", "persistentVolumeClaim": {"claimName": src.claim, "readOnly": True}}
        return [vol], [mount], []
    if src.scheme == "file":
        vol = {"name": "model", "hostPath": {"path": src.path, "type": "Directory"}}
        return [vol], [{"name": "model", "mountPath": MODEL_DIR, "readOnly": True}], []
    # hf://ORG/NAME: an init container downloads into an emptyDir the runtime mounts read-only.
    download = (
        "import sys; from huggingface_hub import snapshot_download; "
        "snapshot_download(repo_id=sys.argv[1], revision=sys.argv[2] or None, local_dir=sys.argv[3])"
    )
    init = {
        "name": "model-download",
        "image": r.image_ref,
        "imagePullPolicy": "IfNotPresent",
        "command": ["python", "-c", download, src.repo, src.revision, MODEL_DIR],
        "env": [
            {"name": "HOME", "value": "/tmp"},
            {"name": "HF_HOME", "value": "/models/.hf-home"},
            {"name": "HF_HUB_DISABLE_TELEMETRY", "value": "1"},
            {"name": "HF_HUB_OFFLINE", "value": "0"},  # the runtime image sets 1 for the server
        ],
        "resources": {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"memory": "1Gi"}},
        "securityContext": _container_security(),
        "volumeMounts": [{"name": "model", "mountPath": "/models"}, {"name": "tmp", "mountPath": "/tmp"}],
    }
    vol = {"name": "model", "emptyDir": {}}
    return [vol], [{"name": "model", "mountPath": "/models", "readOnly": True}], [init]


def _container_security() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": 1000,
        "runAsGroup": 1000,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _runtime_args(r: ResolvedSpec, rev_hash: str) -> list[str]:
    s = r.spec
    args = [
        "serve",
        "--model",
        MODEL_DIR,
        "--host",
        "0.0.0.0",
        "--port",
        str(PORT),
        "--served-model-name",
        r.model_name,
        "--max-batch-size",
        str(s.runtime.max_batch_size),
        "--max-queue",
        str(s.runtime.max_queue),
        "--dtype",
        s.model.dtype,
        "--device",
        "cuda" if s.resources.gpus > 0 else "cpu",
        "--revision",
        rev_hash,
    ]
    if s.model.max_model_len:
        args += ["--max-model-len", str(s.model.max_model_len)]
    if s.tls is not None:
        args += ["--ssl-certfile", f"{TLS_DIR}/tls.crt", "--ssl-keyfile", f"{TLS_DIR}/tls.key"]
    return args


def build_pod_spec(r: ResolvedSpec, rev_hash: str) -> dict[str, Any]:
    s = r.spec
    gpus = s.resources.gpus
    volumes, model_mounts, init_containers = _model_volume(r)
    volumes = volumes + [{"name": "tmp", "emptyDir": {}}]
    mounts = model_mounts + [{"name": "tmp", "mountPath": "/tmp"}]
    if s.tls is not None:
        volumes.append({"name": "tls", "secret": {"secretName": s.tls.secret_ref.name}})
        mounts.append({"name": "tls", "mountPath": TLS_DIR, "readOnly": True})
    if gpus > 0:
        # PyTorch worker processes share tensors through /dev/shm.
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "2Gi"}})
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})

    requests: dict[str, str] = {"cpu": s.resources.cpu_request, "memory": s.resources.memory_request}
    limits: dict[str, str] = {"memory": s.resources.memory_request}
    if gpus > 0:
        requests[s.resources.gpu_resource_name] = str(gpus)
        limits[s.resources.gpu_resource_name] = str(gpus)

    env: list[dict[str, Any]] = [
        {"name": "HOME", "value": "/tmp"},
        {"name": "HF_HOME", "value": "/tmp/hf-home"},
        {"name": "HF_HUB_OFFLINE", "value": "1"},
        {"name": "AUTOGLM_RUNTIME_REVISION", "value": rev_hash},
    ]
    ref = s.auth.api_key_secret_ref
    if ref is not None:
        env.append(
            {
                "name": "AUTOGLM_RUNTIME_API_KEY",
                "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}},
            }
        )
    env += [e.to_pod() for e in s.runtime.env]  # user env last: it wins over ours

    scheme = {"scheme": "HTTPS"} if s.tls is not None else {}
    container = {
        "name": "runtime",
        "image": r.image_ref,
        "imagePullPolicy": "IfNotPresent",
        "command": ["autoglm-runtime"],
        "args": _runtime_args(r, rev_hash),
        "ports": [{"name": "http", "containerPort": PORT, "protocol": "TCP"}],
        "env": env,
        "resources": {"requests": requests, "limits": limits},
        "volumeMounts": mounts,
        "readinessProbe": {
            "httpGet": {"path": "/ready", "port": "http", **scheme},
            "periodSeconds": 5,
            "timeoutSeconds": 2,
            "failureThreshold": 3,
        },
        "livenessProbe": {
            "httpGet": {"path": "/health", "port": "http", **scheme},
            "periodSeconds": 10,
            "timeoutSeconds": 5,
            "failureThreshold": 6,
        },
        # Model load can take many minutes: up to 2 s x 900 = 30 min before liveness takes over. A short
        # period (a cheap /health) makes a pod Ready within ~2 s of its model loading, not up to 10 s later.
        "startupProbe": {
            "httpGet": {"path": "/health", "port": "http", **scheme},
            "periodSeconds": 2,
            "timeoutSeconds": 5,
            "failureThreshold": 900,
        },
        # Keep serving while the endpoints controller removes the pod, then SIGTERM drains.
        "lifecycle": {"preStop": {"sleep": {"seconds": 5}}},
        "securityContext": _container_security(),
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }

    node_selector = dict(s.node_selector)
    if s.resources.gpu_product:
        node_selector["nvidia.com/gpu.product"] = s.resources.gpu_product
    tolerations = [t.to_pod() for t in s.tolerations]
    if gpus > 0 and not any(t.get("key") == s.resources.gpu_resource_name for t in tolerations):
        tolerations.append({"key": s.resources.gpu_resource_name, "operator": "Exists", "effect": "NoSchedule"})

    pod: dict[str, Any] = {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": 60,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": 1000,
            "runAsGroup": 1000,
            "fsGroup": 1000,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": volumes,
    }
    if init_containers:
        pod["initContainers"] = init_containers
    if node_selector:
        pod["nodeSelector"] = node_selector
    if tolerations:
        pod["tolerations"] = tolerations
    return pod


def build_deployment(cr: dict[str, Any], r: ResolvedSpec, rev_hash: str, replicas: int) -> dict[str, Any]:
    """The Deployment of one revision. ``replicas`` is the initial/fixed count (see reconcile)."""
    labels = revision_labels(r, rev_hash)
    name = revision_name(r.name, rev_hash)
    spec: dict[str, Any] = {
        "replicas": replicas,
        "revisionHistoryLimit": 2,
        "progressDeadlineSeconds": r.spec.rollout.progress_deadline_seconds,
        "selector": {"matchLabels": selector_labels(r.name, rev_hash)},
        "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
        "template": {
            "metadata": {
                "labels": dict(labels),
                "annotations": {
                    "prometheus.io/scrape": "true",
                    "prometheus.io/port": str(PORT),
                    "prometheus.io/path": "/metrics",
                    **({"prometheus.io/scheme": "https"} if r.spec.tls is not None else {}),
                },
            },
            "spec": build_pod_spec(r, rev_hash),
        },
    }
    meta = _metadata(cr, name, labels)
    body = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta, "spec": spec}
    meta["annotations"] = {ANNOTATION_SPEC_HASH: deployment_spec_hash(body)}
    return body


def deployment_spec_hash(body: dict[str, Any]) -> str:
    """Hash of a built Deployment minus replicas: tells whether an existing one must be replaced."""
    spec = {k: v for k, v in body["spec"].items() if k != "replicas"}
    return stable_hash({"labels": body["metadata"]["labels"], "spec": spec}, length=16)


# ---------------------------------------------------------------- Service, HPA, PDB


def build_service(cr: dict[str, Any], r: ResolvedSpec, serving_hashes: list[str]) -> dict[str, Any]:
    """ClusterIP Service selecting the serving revision (one now; several when canaries share traffic)."""
    selector = selector_labels(r.name, serving_hashes[0] if len(serving_hashes) == 1 else None)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(cr, r.name, common_labels(r.name)),
        "spec": {
            "type": "ClusterIP",
            "selector": selector,
            "ports": [{"name": "http", "port": PORT, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def build_hpa(cr: dict[str, Any], r: ResolvedSpec, target_deployment: str) -> dict[str, Any]:
    a = r.spec.autoscaling
    lo, hi = a.bounds
    metrics: list[dict[str, Any]] = [
        {
            "type": "Pods",
            "pods": {
                "metric": {"name": "autoglm_requests_waiting"},
                "target": {"type": "AverageValue", "averageValue": str(a.target_queue_depth)},
            },
        }
    ]
    if a.target_cpu_utilization > 0:
        metrics.append(
            {
                "type": "Resource",
                "resource": {
                    "name": "cpu",
                    "target": {"type": "Utilization", "averageUtilization": a.target_cpu_utilization},
                },
            }
        )
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": _metadata(cr, r.name, common_labels(r.name)),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": target_deployment},
            "minReplicas": lo,
            "maxReplicas": hi,
            "metrics": metrics,
            "behavior": {"scaleDown": {"stabilizationWindowSeconds": a.scale_down_stabilization_seconds}},
        },
    }


def keda_hpa_name(name: str) -> str:
    """The HorizontalPodAutoscaler KEDA creates for a resource's ScaledObject."""
    return f"{name}-keda"


def build_scaled_object(cr: dict[str, Any], r: ResolvedSpec, revision: str, prometheus: str) -> dict[str, Any]:
    """KEDA ScaledObject on the serving revision's Deployment: Prometheus trigger on its queue depth
    (and CPU when asked); KEDA creates and owns the HPA, the operator never touches spec.replicas. With
    minReplicas 0, a second trigger on the router's held and in-flight requests wakes it from zero and
    keeps it up while any is held or streaming; ``cooldownPeriod`` is scaleToZeroAfter."""
    a = r.spec.autoscaling
    lo, hi = a.bounds
    triggers: list[dict[str, Any]] = [
        {
            "type": "prometheus",
            "name": "queue-depth",
            "metricType": "AverageValue",
            "metadata": {
                "serverAddress": prometheus,
                "query": queries.queue_depth(r.namespace, r.model_name, revision),
                "threshold": str(a.target_queue_depth),
            },
        }
    ]
    if lo == 0:
        # Scale to zero: the router's held and in-flight requests. Any at all (> activationThreshold 0)
        # keeps the trigger active: the first held request wakes the revision from zero, and it never
        # goes back to zero while a request is held or streaming. As a scaling metric it asks for a pod
        # per batch of requests plus the target queue (the queue-depth trigger usually asks for more).
        triggers.append(
            {
                "type": "prometheus",
                "name": "router-requests",
                "metricType": "AverageValue",
                "metadata": {
                    "serverAddress": prometheus,
                    "query": queries.router_busy(r.namespace, r.name),
                    "threshold": str(r.spec.runtime.max_batch_size + a.target_queue_depth),
                    "activationThreshold": "0",
                },
            }
        )
    if a.target_cpu_utilization > 0:
        triggers.append(
            {"type": "cpu", "metricType": "Utilization", "metadata": {"value": str(a.target_cpu_utilization)}}
        )
    scale_to_zero = {"cooldownPeriod": a.scale_to_zero_seconds} if lo == 0 else {}
    return {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": _metadata(cr, r.name, common_labels(r.name)),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": revision_name(r.name, revision)},
            "minReplicaCount": lo,
            "maxReplicaCount": hi,
            "pollingInterval": 5,
            **scale_to_zero,
            "advanced": {
                "horizontalPodAutoscalerConfig": {
                    "name": keda_hpa_name(r.name),
                    "behavior": {"scaleDown": {"stabilizationWindowSeconds": a.scale_down_stabilization_seconds}},
                }
            },
            "triggers": triggers,
        },
    }


def build_network_policy(cr: dict[str, Any], r: ResolvedSpec) -> dict[str, Any]:
    """Only labelled clients of the same namespace, and the monitoring namespace (scrapes), reach the
    model pods' port; everything else is dropped by a NetworkPolicy-enforcing CNI."""
    np = r.spec.network_policy
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _metadata(cr, r.name, common_labels(r.name)),
        "spec": {
            "podSelector": {"matchLabels": selector_labels(r.name)},
            "policyTypes": ["Ingress"],
            "ingress": [
                {
                    "from": [
                        {"podSelector": {"matchLabels": dict(np.client_labels)}},
                        {
                            "namespaceSelector": {
                                "matchLabels": {"kubernetes.io/metadata.name": np.monitoring_namespace}
                            }
                        },
                    ],
                    "ports": [{"protocol": "TCP", "port": PORT}],
                }
            ],
        },
    }


def build_pdb(cr: dict[str, Any], r: ResolvedSpec) -> dict[str, Any]:
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _metadata(cr, r.name, common_labels(r.name)),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector_labels(r.name)}},
    }


# ---------------------------------------------------------------- GatewayAPI routing

ROUTE_RULE_PREFIX = "autoglm-"  # rules with this name prefix are ours; any other rule is the user's
RULE_CANARY_HEADER = "autoglm-canary-header"
RULE_WEIGHTED = "autoglm-weighted"


def route_service_names(name: str) -> tuple[str, str]:
    """The Services the HTTPRoute's backendRefs name: (stable, canary)."""
    return f"{name}-stable", f"{name}-canary"


def build_route_service(cr: dict[str, Any], r: ResolvedSpec, role: str, rev_hash: str) -> dict[str, Any]:
    """ClusterIP Service ``{name}-{role}`` (stable or canary) selecting one revision's pods."""
    svc = build_service(cr, r, [rev_hash])
    svc["metadata"]["name"] = f"{r.name}-{role}"
    svc["metadata"]["labels"] = {**svc["metadata"]["labels"], "autoglm.io/role": role}
    return svc


def build_http_route(cr: dict[str, Any], r: ResolvedSpec, canary_weight: int, rules: list[dict]) -> dict[str, Any]:
    """HTTPRoute ``{name}``: our two rules (the canary header, then the weighted split) first, then the
    user's rules from ``rules`` unchanged (the ones not named ``autoglm-*``)."""
    ro = r.spec.rollout
    assert ro.gateway is not None  # the CRD and the model require it for GatewayAPI routing
    stable, canary = route_service_names(r.name)
    parent: dict[str, Any] = {
        "group": "gateway.networking.k8s.io",
        "kind": "Gateway",
        "name": ro.gateway.name,
        "namespace": ro.gateway.namespace or r.namespace,
    }
    if ro.gateway.section_name:
        parent["sectionName"] = ro.gateway.section_name

    def backend(service: str, weight: int) -> dict[str, Any]:
        return {"group": "", "kind": "Service", "name": service, "port": PORT, "weight": weight}

    ours = [
        {
            "name": RULE_CANARY_HEADER,
            "matches": [
                {
                    "path": {"type": "PathPrefix", "value": "/"},
                    "headers": [{"type": "Exact", "name": ro.canary_header, "value": "always"}],
                }
            ],
            "backendRefs": [backend(canary, 1)],
        },
        {
            "name": RULE_WEIGHTED,
            "matches": [{"path": {"type": "PathPrefix", "value": "/"}}],
            "backendRefs": [backend(stable, 100 - canary_weight), backend(canary, canary_weight)],
        },
    ]
    theirs = [rule for rule in rules if not str(rule.get("name", "")).startswith(ROUTE_RULE_PREFIX)]
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": _metadata(cr, r.name, common_labels(r.name)),
        "spec": {"parentRefs": [parent], "rules": ours + theirs},
    }
