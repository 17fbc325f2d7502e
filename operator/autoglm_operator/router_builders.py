"""Pure builders of the router's children (``spec.router.enabled``): its Deployment, the resource's Service
pointed at it, the revision Services it reads endpoints from, its ServiceAccount with a read-only Role,
its PodDisruptionBudget and NetworkPolicy.

Names: ``{cr}-router`` for the router's own objects; the resource's Service keeps ``{cr}`` and port 8000;
the revision Services are ``{cr}-stable`` / ``{cr}-canary`` (the GatewayAPI ones: ``route_service_names``).
Router pods carry ``autoglm.io/router: {cr}`` and NOT ``autoglm.io/deployment`` (that label selects model
pods: the revision Services, the PDB, the NetworkPolicy and the operator's pod listing use it).
"""

from __future__ import annotations

from typing import Any

from . import builders as b
from .models import ResolvedSpec

LABEL_ROUTER = "autoglm.io/router"
ROUTER_IMAGE_COMMAND = "autoglm-router"
DRAIN_DELAY_SECONDS = 5  # the Service's endpoints lag the pod's readiness: keep serving this long
DRAIN_TIMEOUT_SECONDS = 120  # streams in flight get this long to finish


def router_name(name: str) -> str:
    return f"{name}-router"


# Prometheus's annotation-based discovery (the local cluster's, many clusters') scrapes the router's /metrics.
SCRAPE = {"prometheus.io/scrape": "true", "prometheus.io/port": str(b.PORT), "prometheus.io/path": "/metrics"}


def router_selector(name: str) -> dict[str, str]:
    return {LABEL_ROUTER: name}


def router_labels(name: str) -> dict[str, str]:
    """The router pods' labels."""
    return {
        b.LABEL_NAME: "autoglm-router",
        b.LABEL_INSTANCE: name,
        b.LABEL_COMPONENT: "router",
        b.LABEL_MANAGED_BY: b.MANAGER,
        LABEL_ROUTER: name,
    }


def router_object_labels(name: str) -> dict[str, str]:
    """The router's objects' labels: the pods' plus ``autoglm.io/deployment`` (the operator's watches
    select children by it), which the pods must not carry."""
    return {**router_labels(name), b.LABEL_DEPLOYMENT: name}


def _oauth2_args(r: ResolvedSpec) -> list[str]:
    """``spec.auth.oauth2`` as the router's flags (none when it is not set: no token checking)."""
    o = r.spec.auth.oauth2
    if o is None:
        return []
    return [
        f"--oauth2-issuer={o.issuer_url}",
        *(f"--oauth2-audience={a}" for a in o.audiences),
        *(f"--oauth2-scope={s}" for s in o.required_scopes),
        f"--oauth2-user-claim={o.user_claim}",
    ]


def _router_args(r: ResolvedSpec) -> list[str]:
    rt = r.spec.router
    return [
        "--host=0.0.0.0",
        f"--port={b.PORT}",
        f"--deployment={r.name}",
        f"--namespace={r.namespace}",
        f"--policy={rt.policy}",
        f"--session-key={rt.session_key}",
        f"--load-factor={rt.load_factor:g}",
        f"--canary-header={r.spec.rollout.canary_header}",
        f"--hold-timeout={rt.hold_timeout_seconds:g}",
        f"--drain-delay={DRAIN_DELAY_SECONDS}",
        f"--drain-timeout={DRAIN_TIMEOUT_SECONDS}",
        *_tls_args(r),
        *_oauth2_args(r),
    ]


def _tls_args(r: ResolvedSpec) -> list[str]:
    """``spec.tls``: the router serves the Secret's certificate, as the model pods do, and calls them over
    HTTPS pinned to that same certificate (they are dialled by IP, which it rarely names)."""
    if r.spec.tls is None:
        return []
    crt, key = f"{b.TLS_DIR}/tls.crt", f"{b.TLS_DIR}/tls.key"
    return [f"--ssl-certfile={crt}", f"--ssl-keyfile={key}", "--backend-tls", f"--backend-ca={crt}"]


def build_router_deployment(cr: dict[str, Any], r: ResolvedSpec, image: str) -> dict[str, Any]:
    """The router's Deployment: ``spec.router.replicas`` pods spread over nodes, restricted Pod Security."""
    name = r.name
    labels = router_labels(name)
    tls = r.spec.tls
    scheme = {"scheme": "HTTPS"} if tls is not None else {}
    container: dict[str, Any] = {
        "name": "router",
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "command": [ROUTER_IMAGE_COMMAND],
        "args": _router_args(r),
        "ports": [{"name": "http", "containerPort": b.PORT, "protocol": "TCP"}],
        "resources": {"requests": {"cpu": "250m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}},
        "readinessProbe": {
            "httpGet": {"path": "/ready", "port": "http", **scheme},
            "periodSeconds": 2,
            "timeoutSeconds": 2,
            "failureThreshold": 2,
        },
        "livenessProbe": {
            "httpGet": {"path": "/healthz", "port": "http", **scheme},
            "periodSeconds": 10,
            "timeoutSeconds": 5,
            "failureThreshold": 3,
        },
        "securityContext": b._container_security(),
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if r.spec.auth.oauth2 is not None:  # it reports the issuer's keys as a condition on its own pod
        container["env"] = [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]
    pod: dict[str, Any] = {
        "serviceAccountName": router_name(name),
        "automountServiceAccountToken": True,  # it watches EndpointSlices and the resource
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": DRAIN_DELAY_SECONDS + DRAIN_TIMEOUT_SECONDS + 5,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": 1000,
            "runAsGroup": 1000,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "affinity": {
            "podAntiAffinity": {
                "preferredDuringSchedulingIgnoredDuringExecution": [
                    {
                        "weight": 100,
                        "podAffinityTerm": {
                            "labelSelector": {"matchLabels": router_selector(name)},
                            "topologyKey": "kubernetes.io/hostname",
                        },
                    }
                ]
            }
        },
        "containers": [container],
    }
    annotations = dict(SCRAPE)
    if tls is not None:  # the model pods' Secret, mounted as they mount it
        container["volumeMounts"] = [{"name": "tls", "mountPath": b.TLS_DIR, "readOnly": True}]
        pod["volumes"] = [{"name": "tls", "secret": {"secretName": tls.secret_ref.name}}]
        annotations["prometheus.io/scheme"] = "https"
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": b._metadata(cr, router_name(name), router_object_labels(name)),
        "spec": {
            "replicas": r.spec.router.replicas,
            "selector": {"matchLabels": router_selector(name)},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            # Scraped: its held and in-flight requests are what KEDA reads to scale from and to zero.
            "template": {"metadata": {"labels": dict(labels), "annotations": annotations}, "spec": pod},
        },
    }


def build_router_service(cr: dict[str, Any], r: ResolvedSpec) -> dict[str, Any]:
    """The resource's own Service ``{cr}`` (name and port unchanged), now selecting the router's pods."""
    svc = b.build_service(cr, r, [])
    svc["spec"]["selector"] = router_selector(r.name)
    return svc


def build_revision_service(cr: dict[str, Any], r: ResolvedSpec, role: str, rev_hashes: list[str]) -> dict[str, Any]:
    """``{cr}-{role}``: the pods the router reads as one revision. Router routing: one revision each;
    Replicas routing: ``{cr}-stable`` selects every serving revision (the split follows the pod counts)."""
    svc = b.build_service(cr, r, rev_hashes)
    svc["metadata"]["name"] = f"{r.name}-{role}"
    svc["metadata"]["labels"] = {**svc["metadata"]["labels"], "autoglm.io/role": role}
    return svc


def build_router_service_account(cr: dict[str, Any], r: ResolvedSpec) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": b._metadata(cr, router_name(r.name), router_object_labels(r.name)),
        "automountServiceAccountToken": False,  # only the router's pods mount it (their spec says so)
    }


def build_router_role(cr: dict[str, Any], r: ResolvedSpec) -> dict[str, Any]:
    """Read-only, this namespace: EndpointSlices (the revision Services' pods) and AutoGLMDeployments
    (the status's revisions and canary weight). With OAuth2, ``patch`` on ``pods/status``: the router
    writes its ``autoglm.io/OAuth2Keys`` condition on its own pod (RBAC cannot name a pod not made yet)."""
    read = ("get", "list", "watch")
    rules = [
        {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": list(read)},
        {"apiGroups": ["autoglm.io"], "resources": ["autoglmdeployments"], "verbs": list(read)},
    ]
    if r.spec.auth.oauth2 is not None:
        rules.append({"apiGroups": [""], "resources": ["pods/status"], "verbs": ["patch"]})
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": b._metadata(cr, router_name(r.name), router_object_labels(r.name)),
        "rules": rules,
    }


def build_router_role_binding(cr: dict[str, Any], r: ResolvedSpec) -> dict[str, Any]:
    name = router_name(r.name)
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": b._metadata(cr, name, router_object_labels(r.name)),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
        "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": r.namespace}],
    }


def build_router_pdb(cr: dict[str, Any], r: ResolvedSpec) -> dict[str, Any]:
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": b._metadata(cr, router_name(r.name), router_object_labels(r.name)),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": router_selector(r.name)}},
    }


def build_router_network_policy(cr: dict[str, Any], r: ResolvedSpec) -> dict[str, Any]:
    """Who may reach the router: the labelled clients and monitoring (what reached the model pods before)."""
    np = b.build_network_policy(cr, r)
    np["metadata"] = b._metadata(cr, router_name(r.name), router_object_labels(r.name))
    np["spec"]["podSelector"] = {"matchLabels": router_selector(r.name)}
    return np


def build_model_network_policy(cr: dict[str, Any], r: ResolvedSpec) -> dict[str, Any]:
    """With the router on, only the router's pods (and monitoring) reach the model pods."""
    np = b.build_network_policy(cr, r)
    sources = np["spec"]["ingress"][0]["from"]
    sources[0] = {"podSelector": {"matchLabels": router_selector(r.name)}}
    return np
