"""The router with spec.tls on the process node: the operator's router pod (this checkout's
`autoglm-router`) serves the resource's certificate through the Service and calls the real runtime pod
over HTTPS pinned to that certificate; the real openai client verifying the CA streams through it, and
Prometheus scrapes the router over HTTPS (prometheus.io/scheme: https)."""

from __future__ import annotations

import ssl
import time

import httpx
import pytest

from tests.e2e.test_runtime_pods import pods, service_ip, tiny
from tests.e2e.test_tls import make_cert
from tests.e2e.test_router import wait_router_serving
from tests.helpers import report, wait_for
from tests.operator.test_operator_cluster import (  # noqa: F401 - fixtures
    apply, condition, crd, get, op_env, operator, status, wait_phase,
)

pytestmark = [pytest.mark.cluster, pytest.mark.runtime, pytest.mark.timeout(600)]


def test_router_serves_https_and_calls_the_runtime_pod_over_https(kube, namespace, operator, node_models, tmp_path):
    t0 = time.monotonic()
    apply(kube, namespace, tiny(replicas=1, resources={"gpus": 0, "cpu": "100m", "memory": "1Gi"},
                                tls={"secretRef": {"name": "tiny-tls"}}, router={"enabled": True, "replicas": 1}))
    st = wait_phase(kube, namespace, "tiny", "Degraded", timeout=60)
    assert condition(st, "Degraded")["reason"] == "TLSSecretNotFound"  # the router does not change that

    ip = service_ip(kube, namespace, "tiny")
    ca = make_cert(tmp_path, ip, f"tiny.{namespace}.svc")
    kube.kubectl("create", "secret", "tls", "tiny-tls", "-n", namespace, f"--cert={tmp_path / 'tls.crt'}",
                 f"--key={tmp_path / 'tls.key'}")

    wait_router_serving(kube, namespace, models=1)
    report(f"\nsecret → HTTPS router serving in front of an HTTPS pod {time.monotonic() - t0:.1f}s")
    assert status(kube, namespace, "tiny")["endpoint"].startswith("https://")
    assert get(kube, namespace, "service/tiny")["spec"]["selector"] == {"autoglm.io/router": "tiny"}
    model_pods = {p["metadata"]["name"] for p in pods(kube, namespace, "tiny")}

    from openai import OpenAI

    url = f"https://{ip}:8000"
    with httpx.Client(verify=ssl.create_default_context(cafile=str(ca))) as http:
        client = OpenAI(base_url=url + "/v1", api_key="none", http_client=http, max_retries=0)
        for i in range(3):
            raw = client.chat.completions.with_raw_response.create(
                model="tiny", messages=[{"role": "user", "content": f"Hi {i}"}], max_tokens=4, stream=True,
            )
            assert raw.headers["x-autoglm-pod"] in model_pods  # the router answered, from the runtime pod
            chunks = list(raw.parse())
            assert chunks and any(c.choices and c.choices[0].delta.content for c in chunks)
    # Prometheus scrapes the router's /metrics over HTTPS: its count of these requests arrives.
    query = f'sum(autoglm_router_requests_total{{namespace="{namespace}",code="200"}})'
    wait_for(lambda: any(float(s["value"][1]) >= 3 for s in kube.prometheus_query(query)), timeout=60,
             message="the router's metrics scraped over HTTPS")
    with pytest.raises(httpx.HTTPError):  # no plaintext next to it
        httpx.get(f"http://{ip}:8000/v1/models", timeout=5).raise_for_status()
    with pytest.raises(httpx.ConnectError):  # and a client that does not trust the CA refuses it
        httpx.get(f"{url}/v1/models", timeout=5)
