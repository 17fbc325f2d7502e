"""The whole loop on the process node: `kubectl apply` → the operator → pods running the real
runtime → requests through the Service's ClusterIP → metrics in Prometheus; failures reported in
the CR's status; a version change and a pod deletion under load lose no request."""

from __future__ import annotations

import collections
import json
import threading
import time
from pathlib import Path

import pytest
import yaml

from tests.helpers import report, wait_for
from tests.operator.test_operator_cluster import (  # noqa: F401 - fixtures
    agd, apply, condition, crd, get, merge, op_env, operator, status, wait_phase,
)

pytestmark = [pytest.mark.cluster, pytest.mark.runtime]
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def models(node_models) -> Path:
    return node_models


def tiny(name: str = "tiny", **spec) -> dict:
    body = yaml.safe_load((REPO / "examples" / "tiny-cpu.yaml").read_text())
    body["metadata"]["name"] = name
    body["spec"].update(spec)
    return body


def pods(kube, namespace: str, name: str) -> list[dict]:
    items = get(kube, namespace, "pods", "-l", f"autoglm.io/deployment={name}")["items"]
    return [p for p in items if not p["metadata"].get("deletionTimestamp")]


def service_ip(kube, namespace: str, name: str) -> str:
    return get(kube, namespace, f"service/{name}")["spec"]["clusterIP"]


def http_status(url: str) -> int:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


class Load:
    """``n`` clients streaming chat completions through the Service, counting what fails."""

    def __init__(self, base_url: str, model: str, n: int = 16, max_tokens: int = 12,
                 headers: dict[str, str] | None = None) -> None:
        from openai import OpenAI

        self.client = OpenAI(base_url=base_url, api_key="none", timeout=120, default_headers=headers)
        self.model, self.n, self.max_tokens = model, n, max_tokens
        self.ok = 0
        self.revisions: collections.Counter[str] = collections.Counter()  # x-autoglm-revision of each answer
        self.failed: list[str] = []
        self.ttft: list[tuple[float, float]] = []   # (monotonic start, seconds to the first token)
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(n)]

    def _run(self, i: int) -> None:
        while not self.stop.is_set():
            try:
                start = time.monotonic()
                first = None
                raw = self.client.chat.completions.with_raw_response.create(
                    model=self.model, messages=[{"role": "user", "content": f"client {i} says hello"}],
                    max_tokens=self.max_tokens, temperature=0, stream=True,
                    extra_body={"ignore_eos": True})  # every request does the same work
                revision = raw.headers.get("x-autoglm-revision", "")
                stream = raw.parse()
                parts = []
                for c in stream:
                    if c.choices and c.choices[0].delta.content:
                        first = first or time.monotonic()
                        parts.append(c.choices[0].delta.content)
                text = "".join(parts)
                with self.lock:
                    self.ok += 1 if text else 0
                    self.revisions[revision] += 1 if text else 0
                    if first is not None:
                        self.ttft.append((start, first - start))
                    if not text:
                        self.failed.append("empty answer")
            except Exception as exc:  # noqa: BLE001 - every failure is counted and shown
                with self.lock:
                    self.failed.append(f"{type(exc).__name__}: {exc}")

    def __enter__(self) -> "Load":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=90)


def test_tiny_example_turns_ready_after_the_runtime_and_answers_through_its_service(kube, namespace, operator, models):
    t0 = time.monotonic()
    apply(kube, namespace, tiny())
    first_runtime_ready = first_cr_ready = None
    while first_cr_ready is None and time.monotonic() - t0 < 180:
        ps = pods(kube, namespace, "tiny")
        ip = ps[0]["status"].get("podIP") if ps else None
        if first_runtime_ready is None and ip and http_status(f"http://{ip}:8000/ready") == 200:
            first_runtime_ready = time.monotonic()
        if condition(status(kube, namespace, "tiny"), "Ready").get("status") == "True":
            first_cr_ready = time.monotonic()
        time.sleep(0.1)
    assert first_cr_ready is not None, f"never Ready: {status(kube, namespace, 'tiny')}"
    assert first_runtime_ready is not None and first_runtime_ready <= first_cr_ready, \
        "the CR said Ready before the runtime's /ready answered"
    report(f"\napply → runtime /ready {first_runtime_ready - t0:.1f}s, → CR Ready {first_cr_ready - t0:.1f}s")

    from openai import OpenAI

    client = OpenAI(base_url=f"http://{service_ip(kube, namespace, 'tiny')}:8000/v1", api_key="none")
    answer = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hello"}],
                                            max_tokens=8, temperature=0)
    assert answer.choices[0].message.content and answer.usage.completion_tokens > 0

    # Prometheus found the pod and scrapes it, with the pod's identity as labels.
    pod = pods(kube, namespace, "tiny")[0]
    revision = pod["metadata"]["labels"]["autoglm.io/revision"]
    series = wait_for(lambda: kube.prometheus_query(f'autoglm_requests_running{{namespace="{namespace}"}}'),
                      timeout=30, message="autoglm_requests_running in Prometheus")
    report(f"autoglm_requests_running in Prometheus {time.monotonic() - first_runtime_ready:.1f}s after /ready")
    labels = series[0]["metric"]
    assert labels["pod"] == pod["metadata"]["name"] and labels["autoglm_io_revision"] == revision
    assert labels["app_kubernetes_io_instance"] == "tiny"
    rss = kube.container_rss_mib(namespace, pod["metadata"]["name"], "runtime")
    report(f"runtime pod RSS {rss:.0f} MiB")


def test_a_model_that_fails_to_load_crash_loops_and_degrades_with_the_runtimes_error(kube, namespace, operator,
                                                                                       models):
    apply(kube, namespace, tiny("broken", model={"name": "broken", "uri": "file:///models/broken"}))
    st = wait_phase(kube, namespace, "broken", "Degraded", timeout=120)
    deg = condition(st, "Degraded")
    assert deg["reason"] == "CrashLoopBackOff", deg
    assert "exited with code 1: autoglm-runtime: error:" in deg["message"], deg
    cs = pods(kube, namespace, "broken")[0]["status"]["containerStatuses"][0]
    assert cs["lastState"]["terminated"]["message"].startswith("autoglm-runtime: error:")


def test_an_image_the_node_cannot_run_degrades_with_image_pull_back_off(kube, namespace, operator, models):
    apply(kube, namespace, tiny("noimage", runtime={"image": "registry.invalid/autoglm/runtime", "version": "0.1.0"}))
    st = wait_phase(kube, namespace, "noimage", "Degraded", timeout=60)
    deg = condition(st, "Degraded")
    assert deg["reason"] == "ImagePullBackOff" and "registry.invalid/autoglm/runtime:0.1.0" in deg["message"], deg


def test_version_change_under_load_loses_no_request(kube, namespace, operator, models):
    apply(kube, namespace, tiny(rollout={"steps": []}))  # blue/green: the Service switches once
    wait_phase(kube, namespace, "tiny", "Healthy", timeout=180)
    old = pods(kube, namespace, "tiny")[0]["metadata"]["labels"]["autoglm.io/revision"]
    ip = service_ip(kube, namespace, "tiny")
    with Load(f"http://{ip}:8000/v1", "tiny") as load:
        wait_for(lambda: load.ok >= 16, timeout=60, message="load running")
        t0 = time.monotonic()
        merge(kube, namespace, "autoglmdeployment/tiny", {"spec": {"runtime": {"version": "0.1.1"}}})

        def switched():
            sel = get(kube, namespace, "service/tiny")["spec"]["selector"]["autoglm.io/revision"]
            return sel if sel != old else None

        new = wait_for(switched, timeout=180, message="Service switched to the new revision")
        switch_s = time.monotonic() - t0
        wait_for(lambda: all(p["metadata"]["labels"]["autoglm.io/revision"] == new
                             for p in get(kube, namespace, "pods", "-l", "autoglm.io/deployment=tiny")["items"]),
                 timeout=120, message="old pods drained and gone")
        done_s = time.monotonic() - t0
        before = load.ok
        wait_for(lambda: load.ok >= before + 16, timeout=60, message="load continues on the new revision")
    report(f"\nversion change: Service switched after {switch_s:.1f}s, old pods gone after {done_s:.1f}s; "
          f"{load.ok} requests ok, {len(load.failed)} failed")
    assert load.failed == [], load.failed[:5]
    assert wait_phase(kube, namespace, "tiny", "Healthy", timeout=60)


def test_pod_deletion_under_load_drains_in_flight_requests(kube, namespace, operator, models):
    apply(kube, namespace, tiny(replicas=2))
    wait_phase(kube, namespace, "tiny", "Healthy", timeout=180, ready="2/2")
    ip = service_ip(kube, namespace, "tiny")
    victim = pods(kube, namespace, "tiny")[0]["metadata"]["name"]
    with Load(f"http://{ip}:8000/v1", "tiny") as load:
        wait_for(lambda: load.ok >= 16, timeout=60, message="load running")
        t0 = time.monotonic()
        kube.kubectl("delete", "pod", victim, "-n", namespace, "--wait=false")
        wait_for(lambda: not kube.kubectl("get", "pod", victim, "-n", namespace, check=False).stdout,
                 timeout=90, message="pod gone")
        gone_s = time.monotonic() - t0
        before = load.ok
        wait_for(lambda: load.ok >= before + 16, timeout=60, message="load continues")
    log = kube.pod_log(namespace, victim)
    report(f"\npod deletion: gone after {gone_s:.1f}s (grace 60s); {load.ok} ok, {len(load.failed)} failed")
    assert "Started draining" in log, log[-2000:]
    assert gone_s < 60
    assert load.failed == [], load.failed[:5]
