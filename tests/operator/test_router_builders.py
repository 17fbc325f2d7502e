"""The router's builders against golden YAML (UPDATE_GOLDEN=1 to accept an intended change), and the
facts the router relies on: its pods are not model pods, the Service keeps its name and port."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from autoglm_operator import builders as b
from autoglm_operator import router_builders as rb
from tests.operator.test_builders import CANARY, cr_for, resolved

GOLDEN = Path(__file__).parent / "golden"
IMAGE = "ghcr.io/autoglm/router:0.1.0"

SPECS = {
    "router-affinity-netpol": {
        "model": {"name": "tiny", "uri": "file:///models/tiny"},
        "resources": {"gpus": 0, "cpu": "1", "memory": "2Gi"},
        "replicas": 3,
        "networkPolicy": {"enabled": True},
        "router": {"enabled": True, "replicas": 2, "policy": "SessionAffinity", "sessionKey": "header:x-session-id",
                   "loadFactor": 1.5},
    },
    "router-keda-zero": {
        "model": {"name": "tiny", "uri": "file:///models/tiny"},
        "resources": {"gpus": 0, "cpu": "1", "memory": "2Gi"},
        "router": {"enabled": True, "holdTimeout": "3m"},
        "autoscaling": {"enabled": True, "provider": "KEDA", "minReplicas": 0, "maxReplicas": 2,
                        "targetQueueDepth": 2, "scaleToZeroAfter": "90s",
                        "prometheus": {"address": "http://prometheus.monitoring:9090"}},
    },
    "router-tls": {
        "model": {"name": "tiny", "uri": "file:///models/tiny"},
        "resources": {"gpus": 0, "cpu": "1", "memory": "2Gi"},
        "replicas": 2,
        "tls": {"secretRef": {"name": "tiny-tls"}},
        "router": {"enabled": True},
    },
    "router-canary": {
        "model": {"name": "tiny", "uri": "file:///models/tiny"},
        "resources": {"gpus": 1},
        "replicas": 1,
        "router": {"enabled": True},
        "rollout": {"trafficRouting": "Router", "canaryHeader": "x-canary"},
        "auth": {"oauth2": {"issuerURL": "https://login.example.com/", "audiences": ["autoglm", "agents"],
                            "requiredScopes": ["infer"], "userClaim": "client_id"}},
    },
}


def children(name: str, spec: dict) -> list[dict]:
    cr, r = cr_for(name, spec), resolved(name, spec)
    rev = b.revision_hash(r)
    docs = [
        rb.build_router_deployment(cr, r, IMAGE),
        rb.build_router_service(cr, r),
        rb.build_router_service_account(cr, r),
        rb.build_router_role(cr, r),
        rb.build_router_role_binding(cr, r),
        rb.build_router_pdb(cr, r),
    ]
    if r.spec.rollout.traffic_routing == "Router":  # mid-canary
        docs += [rb.build_revision_service(cr, r, "stable", [rev]), rb.build_revision_service(cr, r, "canary", [CANARY])]
    else:
        docs.append(rb.build_revision_service(cr, r, "stable", [rev, CANARY]))
    if r.spec.network_policy.enabled:
        docs += [rb.build_model_network_policy(cr, r), rb.build_router_network_policy(cr, r)]
    if r.spec.autoscaling.enabled:  # KEDA (scale to zero wakes on the router's held requests)
        docs.append(b.build_scaled_object(cr, r, rev, r.spec.autoscaling.prometheus.address or ""))
    return docs


@pytest.mark.parametrize("case", sorted(SPECS))
def test_golden(case: str) -> None:
    text = yaml.safe_dump_all(children(case, SPECS[case]), sort_keys=True, default_flow_style=False)
    path = GOLDEN / f"{case}.yaml"
    if os.environ.get("UPDATE_GOLDEN"):
        path.write_text(text)
    assert path.exists(), f"missing {path}; run UPDATE_GOLDEN=1 .venv/bin/pytest {__file__}"
    assert text == path.read_text(), f"{case} differs from {path} (UPDATE_GOLDEN=1 to accept)"


def test_router_pods_are_not_model_pods() -> None:
    spec = SPECS["router-affinity-netpol"]
    cr, r = cr_for("chat", spec), resolved("chat", spec)
    pod_labels = rb.build_router_deployment(cr, r, IMAGE)["spec"]["template"]["metadata"]["labels"]
    model_selector = b.selector_labels("chat")
    assert not all(pod_labels.get(k) == v for k, v in model_selector.items())
    svc = rb.build_router_service(cr, r)
    assert svc["metadata"]["name"] == "chat" and svc["spec"]["ports"][0]["port"] == 8000
    assert all(pod_labels.get(k) == v for k, v in svc["spec"]["selector"].items())
    # Only the router (and monitoring) reach the model pods.
    sources = rb.build_model_network_policy(cr, r)["spec"]["ingress"][0]["from"]
    assert sources[0] == {"podSelector": {"matchLabels": {rb.LABEL_ROUTER: "chat"}}}
    assert "namespaceSelector" in sources[1]


def test_router_args_follow_the_spec() -> None:
    spec = SPECS["router-affinity-netpol"]
    args = rb.build_router_deployment(cr_for("chat", spec), resolved("chat", spec), IMAGE)["spec"]["template"]["spec"][
        "containers"][0]["args"]
    assert "--policy=SessionAffinity" in args and "--session-key=header:x-session-id" in args
    assert "--load-factor=1.5" in args and "--deployment=chat" in args and "--namespace=demo" in args


def test_scale_to_zero_wakes_on_the_routers_requests() -> None:
    """minReplicas 0: KEDA may go to zero (after scaleToZeroAfter), and a second trigger on the router's
    held + in-flight requests (activationThreshold 0) wakes it and keeps it up while any is held or
    streaming; the router is told its hold timeout and is scraped. minReplicas 1: no such trigger."""
    spec = SPECS["router-keda-zero"]
    cr, r = cr_for("chat", spec), resolved("chat", spec)
    so = b.build_scaled_object(cr, r, "abc", "http://prom:9090")["spec"]
    assert so["minReplicaCount"] == 0 and so["cooldownPeriod"] == 90
    wake = next(t for t in so["triggers"] if t["name"] == "router-requests")["metadata"]
    assert wake["activationThreshold"] == "0"
    assert 'autoglm_router_held_requests{namespace="demo",deployment="chat"}' in wake["query"]
    assert 'autoglm_router_requests_in_flight{namespace="demo",deployment="chat"}' in wake["query"]
    router = rb.build_router_deployment(cr, r, IMAGE)["spec"]["template"]
    assert "--hold-timeout=180" in router["spec"]["containers"][0]["args"]
    assert router["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    one = {**spec, "autoscaling": {**spec["autoscaling"], "minReplicas": 1}}
    so = b.build_scaled_object(cr_for("chat", one), resolved("chat", one), "abc", "http://prom:9090")["spec"]
    assert [t["name"] for t in so["triggers"]] == ["queue-depth"] and "cooldownPeriod" not in so


def test_scale_to_zero_needs_keda_and_the_router() -> None:
    """The operator's own check agrees with the CRD's CEL rule (a stored object is never trusted)."""
    from autoglm_operator.models import InvalidSpec

    spec = SPECS["router-keda-zero"]
    for bad in ({**spec, "router": {"enabled": False}},
                {**spec, "autoscaling": {**spec["autoscaling"], "provider": "HPA"}}):
        with pytest.raises(InvalidSpec, match="needs autoscaling.provider KEDA and router.enabled true"):
            resolved("chat", bad)


def test_oauth2_becomes_the_router_flags_and_only_when_set() -> None:
    """The router gets every audience and scope as a repeated flag (its argparse appends them), and no
    --oauth2-* flag at all without spec.auth.oauth2 (a stray one would turn token checking on)."""
    spec = SPECS["router-canary"]
    args = rb.build_router_deployment(cr_for("chat", spec), resolved("chat", spec), IMAGE)["spec"]["template"][
        "spec"
    ]["containers"][0]["args"]
    assert [a for a in args if a.startswith("--oauth2-")] == [
        "--oauth2-issuer=https://login.example.com/",
        "--oauth2-audience=autoglm",
        "--oauth2-audience=agents",
        "--oauth2-scope=infer",
        "--oauth2-user-claim=client_id",
    ]
    from autoglm_router.__main__ import make_verifier, parser

    verifier = make_verifier(parser().parse_args(args))
    assert verifier is not None
    assert verifier.config.audiences == ("autoglm", "agents") and verifier.config.required_scopes == ("infer",)
    assert verifier.config.user_claim == "client_id"
    plain = SPECS["router-affinity-netpol"]
    args = rb.build_router_deployment(cr_for("chat", plain), resolved("chat", plain), IMAGE)["spec"]["template"][
        "spec"
    ]["containers"][0]["args"]
    assert not [a for a in args if a.startswith("--oauth2-")]
    assert make_verifier(parser().parse_args(args)) is None


def test_oauth2_rules_hold_in_the_operator_too() -> None:
    """The CEL rules' twins in the models (the operator's own parse, for an object written before the CRD
    had them): the same messages, and the issuer/claim grammars."""
    from autoglm_operator.models import InvalidSpec

    base = {"model": {"uri": "hf://a/b"}, "router": {"enabled": True}}
    oauth2 = {"issuerURL": "http://10.0.0.1:4444/", "audiences": ["autoglm"]}
    assert resolved("x", {**base, "auth": {"oauth2": oauth2}}).spec.auth.oauth2.user_claim == "sub"
    with pytest.raises(InvalidSpec, match="auth.oauth2 needs router.enabled true"):
        resolved("x", {"model": {"uri": "hf://a/b"}, "auth": {"oauth2": oauth2}})
    with pytest.raises(InvalidSpec, match="cannot both be set"):
        resolved("x", {**base, "auth": {"oauth2": oauth2, "apiKeySecretRef": {"name": "k"}}})
    for bad in ({"issuerURL": "ftp://x/"}, {"issuerURL": "https://x/#f"}, {"audiences": []}, {"userClaim": "a b"}):
        with pytest.raises(InvalidSpec, match="spec.auth.oauth2"):
            resolved("x", {**base, "auth": {"oauth2": {**oauth2, **bad}}})


def test_tls_the_router_serves_https_and_pins_the_pods_to_the_secrets_certificate() -> None:
    """spec.tls with the router: the router mounts the model pods' Secret, serves its certificate, calls the
    pods over HTTPS trusting that certificate alone, and its probes and Prometheus use HTTPS; the model
    pods serve HTTPS as without the router. Without spec.tls: none of it."""
    spec = SPECS["router-tls"]
    cr, r = cr_for("chat", spec), resolved("chat", spec)
    template = rb.build_router_deployment(cr, r, IMAGE)["spec"]["template"]
    c = template["spec"]["containers"][0]
    crt, key = f"{b.TLS_DIR}/tls.crt", f"{b.TLS_DIR}/tls.key"
    for arg in (f"--ssl-certfile={crt}", f"--ssl-keyfile={key}", "--backend-tls", f"--backend-ca={crt}"):
        assert arg in c["args"], arg
    assert template["spec"]["volumes"] == [{"name": "tls", "secret": {"secretName": "tiny-tls"}}]
    assert c["volumeMounts"] == [{"name": "tls", "mountPath": b.TLS_DIR, "readOnly": True}]
    assert c["readinessProbe"]["httpGet"]["scheme"] == "HTTPS" and c["livenessProbe"]["httpGet"]["scheme"] == "HTTPS"
    assert template["metadata"]["annotations"]["prometheus.io/scheme"] == "https"
    model = b.build_pod_spec(r, b.revision_hash(r))["containers"][0]
    assert model["args"][model["args"].index("--ssl-certfile") + 1] == crt  # the certificate the router pins

    plain = {k: v for k, v in spec.items() if k != "tls"}
    template = rb.build_router_deployment(cr_for("chat", plain), resolved("chat", plain), IMAGE)["spec"]["template"]
    c = template["spec"]["containers"][0]
    assert not [a for a in c["args"] if "ssl" in a or "backend" in a] and "volumes" not in template["spec"]
    assert "scheme" not in c["readinessProbe"]["httpGet"] and "prometheus.io/scheme" not in template["metadata"][
        "annotations"]
