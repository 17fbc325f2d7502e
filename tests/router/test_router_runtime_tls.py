"""HTTPS end to end on one machine: the ``autoglm-router`` process serving HTTPS in front of a REAL
``autoglm-runtime`` process serving HTTPS (the tiny model), with the flags the operator passes for
``spec.tls`` (one certificate for both, the router pinning the pod to it), talked to by the REAL ``openai``
client verifying the router's certificate with the CA."""

from __future__ import annotations

import ssl
import subprocess
from pathlib import Path

import httpx
import openai
import pytest

from tests.helpers import free_port, wait_for
from tests.router.certs import CA
from tests.runtime.test_server import CLI as RUNTIME
from tests.runtime.test_server import metric

pytestmark = [pytest.mark.runtime, pytest.mark.timeout(300)]

ROUTER = Path(__file__).resolve().parents[2] / ".venv" / "bin" / "autoglm-router"


def _start(argv: list[str], log: Path, url: str, verify: ssl.SSLContext, timeout: float) -> subprocess.Popen:
    proc = subprocess.Popen(argv, stdout=log.open("w"), stderr=subprocess.STDOUT)

    def ready() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"{argv[0]} exited {proc.returncode}: {log.read_text()[-3000:]}")
        try:
            return httpx.get(url + "/ready", verify=verify, timeout=5).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_for(ready, timeout=timeout, interval=0.2, message=f"{log.stem} /ready over HTTPS")
    except BaseException:
        proc.kill()
        raise
    return proc


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def test_openai_client_streams_through_an_https_router_from_an_https_runtime(tmp_path):
    from autoglm_runtime.modelmaker import make_model

    model = make_model("tiny", tmp_path / "tiny-glm", seed=0)
    ca = CA.make(tmp_path / "ca")
    secret = ca.issue(tmp_path / "secret", dns=("tiny.demo.svc",), ips=("127.0.0.1",))
    verify = ssl.create_default_context(cafile=str(ca.cert))
    pod_port, router_port = free_port(), free_port()
    pod_url, router_url = f"https://127.0.0.1:{pod_port}", f"https://127.0.0.1:{router_port}"
    pod = _start(
        [str(RUNTIME), "serve", "--model", str(model), "--host", "127.0.0.1", "--port", str(pod_port),
         "--dtype", "float32", "--device", "cpu", "--served-model-name", "tiny", "--revision", "r1",
         "--ssl-certfile", str(secret.cert), "--ssl-keyfile", str(secret.key)],
        tmp_path / "pod.log", pod_url, verify, timeout=120,
    )
    try:
        router = _start(
            [str(ROUTER), "--port", str(router_port), f"--backend=r1=pod-0@127.0.0.1:{pod_port}",
             f"--ssl-certfile={secret.cert}", f"--ssl-keyfile={secret.key}", "--backend-tls",
             f"--backend-ca={secret.cert}", "--queue-scrape-interval=0.2"],
            tmp_path / "router.log", router_url, verify, timeout=30,
        )
        try:
            with httpx.Client(verify=verify) as http:
                client = openai.OpenAI(base_url=router_url + "/v1", api_key="none", max_retries=0, http_client=http)
                for i in range(3):
                    stream = client.chat.completions.with_raw_response.create(
                        model="tiny", messages=[{"role": "user", "content": f"Hi {i}"}], max_tokens=6, stream=True,
                    )
                    assert stream.headers["x-autoglm-pod"] == "pod-0"
                    assert stream.headers["x-autoglm-revision"] == "r1"
                    chunks = list(stream.parse())
                    assert len(chunks) >= 2 and any(c.choices and c.choices[0].delta.content for c in chunks)
                # The runtime's own 4xx passes through HTTPS unchanged.
                with pytest.raises(openai.BadRequestError) as err:
                    client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
                assert err.value.code == "model_not_found"
                router_metrics = http.get(router_url + "/metrics").text
            assert metric(router_metrics, "autoglm_router_requests_total", revision="r1", code="200") == 3
            # The pod answered them over HTTPS (its own count), and nothing listens in plaintext on either.
            pod_metrics = httpx.get(pod_url + "/metrics", verify=verify).text
            assert metric(pod_metrics, "autoglm_requests_total", status="success") >= 3
            for url in (pod_url, router_url):
                with pytest.raises(httpx.HTTPError):
                    httpx.get(url.replace("https://", "http://") + "/v1/models", timeout=5).raise_for_status()
        finally:
            _stop(router)
    finally:
        _stop(pod)
