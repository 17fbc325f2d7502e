"""TLS for model endpoints: spec.tls.secretRef → the runtime serves HTTPS with that certificate, the
real openai client verifies it through the ClusterIP; a missing or malformed Secret degrades the
resource and nothing is served in plaintext."""

from __future__ import annotations

import ssl
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.e2e.test_runtime_pods import service_ip, tiny
from tests.helpers import wait_for
from tests.operator.test_operator_cluster import (  # noqa: F401 - fixtures
    apply, condition, crd, get, op_env, operator, status, wait_phase,
)

pytestmark = [pytest.mark.cluster, pytest.mark.runtime]


def make_cert(d: Path, ip: str, dns: str) -> Path:
    """A CA and a server certificate for the Service's ClusterIP and DNS name; returns the CA file."""
    def ssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    ssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
        "-subj", "/CN=test-ca")
    (d / "ext").write_text(f"subjectAltName=IP:{ip},DNS:{dns}\nextendedKeyUsage=serverAuth\n")
    ssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "tls.key", "-out", "tls.csr", "-subj", f"/CN={dns}")
    ssl("x509", "-req", "-in", "tls.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-out", "tls.crt",
        "-days", "2", "-extfile", "ext")
    return d / "ca.crt"


def test_https_endpoint_verified_by_the_openai_client(kube, namespace, operator, node_models, tmp_path):
    apply(kube, namespace, tiny(tls={"secretRef": {"name": "tiny-tls"}}))
    st = wait_phase(kube, namespace, "tiny", "Degraded", timeout=60)
    assert condition(st, "Degraded")["reason"] == "TLSSecretNotFound"
    assert get(kube, namespace, "deployments")["items"] == []  # nothing runs without its certificate

    ip = service_ip(kube, namespace, "tiny")
    ca = make_cert(tmp_path, ip, f"tiny.{namespace}.svc")
    kube.kubectl("create", "secret", "tls", "tiny-tls", "-n", namespace, f"--cert={tmp_path / 'tls.crt'}",
                 f"--key={tmp_path / 'tls.key'}")
    st = wait_phase(kube, namespace, "tiny", "Healthy", timeout=180)
    assert st["endpoint"].startswith("https://")

    from openai import OpenAI

    with httpx.Client(verify=ssl.create_default_context(cafile=str(ca))) as http:
        client = OpenAI(base_url=f"https://{ip}:8000/v1", api_key="none", http_client=http)
        answer = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                                max_tokens=4)
        assert answer.choices[0].message.content
    # Prometheus scrapes it over HTTPS (prometheus.io/scheme: https).
    wait_for(lambda: kube.prometheus_query(f'autoglm_requests_running{{namespace="{namespace}"}}'), timeout=30,
             message="metrics scraped over HTTPS")
    with pytest.raises(httpx.HTTPError):  # no plaintext next to it
        httpx.get(f"http://{ip}:8000/v1/models", timeout=5).raise_for_status()
    with pytest.raises(httpx.ConnectError):  # and a client that does not trust the CA refuses it
        httpx.get(f"https://{ip}:8000/v1/models", timeout=5)


def test_a_malformed_tls_secret_degrades_and_serves_nothing(kube, namespace, operator, node_models):
    kube.kubectl("create", "secret", "generic", "bad-tls", "-n", namespace, "--from-literal=tls.crt=not a cert",
                 "--from-literal=tls.key=not a key")
    apply(kube, namespace, tiny(tls={"secretRef": {"name": "bad-tls"}}))
    st = wait_phase(kube, namespace, "tiny", "Degraded", timeout=60)
    deg = condition(st, "Degraded")
    assert deg["reason"] == "TLSSecretInvalid" and "PEM" in deg["message"], deg
    assert get(kube, namespace, "deployments")["items"] == []
