"""Scale to zero at the router, with real parts: the router PROCESS reading a real API server's
EndpointSlices, a REAL runtime process started only after the requests arrived, the REAL OpenAI client.
Requests sent while no pod is Ready are held (none fails, none gets a 404 or a 503) and all go to the pod
as soon as its EndpointSlice says Ready. Prints each request's time to its first token."""

from __future__ import annotations

import concurrent.futures
import subprocess
import time

import httpx
import pytest
import yaml

from tests.helpers import free_port, wait_for
from tests.operator.test_operator_cluster import crd  # noqa: F401 - fixture
from tests.router.test_router_runtime import ROUTER, Router
from tests.runtime.test_server import metric, start_server

pytestmark = [pytest.mark.cluster, pytest.mark.runtime, pytest.mark.timeout(300)]

CONCURRENT = 8


def _slice(port: int, ready: bool | None, address: str = "") -> dict:
    """m-stable's EndpointSlice: no endpoint (None), or the runtime's address (the API refuses loopback
    ones: the runtime listens on this machine's end of the process node's link, which leaves nothing)."""
    endpoints = [] if ready is None else [
        {"addresses": [address], "conditions": {"ready": ready}, "targetRef": {"kind": "Pod", "name": "pod-0"}}
    ]
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
            "metadata": {"name": "m-stable-x", "labels": {"kubernetes.io/service-name": "m-stable"}},
            "ports": [{"name": "http", "port": port, "protocol": "TCP"}], "endpoints": endpoints}


def test_requests_held_at_zero_are_answered_when_a_pod_turns_ready(kube, crd, namespace, tmp_path):  # noqa: F811
    from autoglm_runtime.modelmaker import make_model

    model = make_model("tiny", tmp_path / "tiny-glm", seed=0)
    agd = {"apiVersion": "autoglm.io/v1alpha1", "kind": "AutoGLMDeployment", "metadata": {"name": "m"},
           "spec": {"model": {"uri": "file:///models/tiny"}, "router": {"enabled": True}}}
    svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "m-stable"},
           "spec": {"ports": [{"name": "http", "port": 8000}]}}

    def apply(*docs: dict) -> None:
        kube.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump_all(docs))

    host = kube.network.ranges.host_ip
    apply(agd, svc, _slice(8000, None))
    port = free_port()
    log = tmp_path / "router.log"
    argv = [str(ROUTER), "--port", str(port), "--deployment", "m", "--namespace", namespace,
            "--kubeconfig", str(kube.kubeconfig), "--hold-timeout", "120", "--queue-scrape-interval", "0"]
    router = Router(subprocess.Popen(argv, stdout=log.open("w"), stderr=subprocess.STDOUT), port, log)
    server = None
    try:
        wait_for(lambda: httpx.get(router.url + "/ready", timeout=5).status_code == 200, timeout=30,
                 message="router /ready (synced, no endpoints)")
        client = router.client()

        def ask(i: int) -> tuple[float, str]:
            sent = time.monotonic()
            first, text = None, ""
            stream = client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": f"wake up {i}"}], max_tokens=6, stream=True,
                timeout=180)
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    first = first or time.monotonic()
                    text += chunk.choices[0].delta.content
            assert first is not None and text
            return first - sent, text

        with concurrent.futures.ThreadPoolExecutor(CONCURRENT) as pool:
            sent = time.monotonic()
            futures = [pool.submit(ask, i) for i in range(CONCURRENT)]
            wait_for(lambda: metric(router.metrics(), "autoglm_router_held_requests", deployment="m") == CONCURRENT,
                     timeout=30, message="every request held")
            # One more client gives up after 1 s: it leaves the hold queue (it must not keep the deployment
            # awake nor take a place in the queue), the others stay held.
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(router.url + "/v1/chat/completions", timeout=httpx.Timeout(5, read=1), json={
                    "model": "tiny", "messages": [{"role": "user", "content": "gives up"}], "max_tokens": 1})
            wait_for(lambda: metric(router.metrics(), "autoglm_router_held_requests", deployment="m") == CONCURRENT,
                     timeout=10, message="the client that gave up no longer held")
            server = start_server(model, tmp_path, "--revision", "r1", name="pod-0", host=host)  # until /ready
            loaded = time.monotonic()
            assert not any(f.done() for f in futures)  # still held: the slice has no Ready endpoint yet
            apply(_slice(server.port, True, host))
            results = [f.result(timeout=120) for f in futures]
        ttft = sorted(r[0] for r in results)
        print(f"\n[scale-to-zero] {CONCURRENT} requests held at zero; pod start + model load "
              f"{loaded - sent:.2f}s; request -> first token min {ttft[0]:.2f}s max {ttft[-1]:.2f}s; "
              f"after the slice turned Ready: max {max(ttft) - (loaded - sent):.2f}s")
        text = router.metrics()
        assert metric(text, "autoglm_router_held_requests", deployment="m") == 0
        assert metric(text, "autoglm_router_requests_total", code="200") == CONCURRENT
        assert metric(text, "autoglm_router_hold_seconds_count") == CONCURRENT
    finally:
        assert router.stop() == 0
        if server is not None:
            server.stop()
