"""The operator's /metrics: what a reconcile, a failed reconcile, API requests and watch events
leave in it, read back over HTTP from the real server (loopback, a free port)."""

from __future__ import annotations

import socket
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from autoglm_operator import metrics
from autoglm_operator.kube import ApiError, _verb
from autoglm_operator.settings import OperatorSettings
from autoglm_operator.workqueue import Reconciler
from tests.operator.fakes import FakeKube
from tests.operator.test_reconcile import NS, SPEC, make


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def scrape():
    server = metrics.serve(free_port(), "127.0.0.1")
    url = f"http://127.0.0.1:{server.server_port}/metrics"

    def read() -> dict[tuple[str, tuple], float]:
        with urllib.request.urlopen(url, timeout=5) as resp:
            text = resp.read().decode()
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for fam in text_string_to_metric_families(text) for s in fam.samples}

    yield read
    server.shutdown()
    server.server_close()
    metrics.PHASES.clear()


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_reconciles_and_errors_are_counted(scrape) -> None:
    before = scrape()
    kube = FakeKube()
    make(kube, SPEC)
    rec = Reconciler(kube, OperatorSettings())
    rec.observe_event(NS, "chat")
    await __import__("asyncio").gather(*list(rec._tasks))
    after = scrape()
    runs = value(after, "autoglm_operator_reconcile_duration_seconds_count") - value(
        before, "autoglm_operator_reconcile_duration_seconds_count")
    assert runs == rec.runs >= 1
    assert value(after, "autoglm_operator_reconcile_duration_seconds_bucket", le="+Inf") >= runs

    metrics.observe_reconcile(0.2, ApiError(409, "Conflict"))
    metrics.observe_reconcile(0.1, KeyError("x"))
    errors = scrape()
    for reason in ("http_409", "KeyError"):
        assert value(errors, "autoglm_operator_reconcile_errors_total", reason=reason) == value(
            after, "autoglm_operator_reconcile_errors_total", reason=reason) + 1
    await rec.close()


def test_api_requests_by_verb_resource_and_code(scrape) -> None:
    assert _verb("GET", "/apis/apps/v1/namespaces/a/deployments") == "list"
    assert _verb("GET", "/apis/apps/v1/namespaces/a/deployments/chat-1") == "get"
    assert _verb("GET", "/apis/autoglm.io/v1alpha1/namespaces/a/autoglmdeployments/chat/status") == "get"
    assert _verb("GET", "/apis/autoglm.io/v1alpha1/autoglmdeployments") == "list"
    assert _verb("PATCH", "/api/v1/namespaces/a/services/chat") == "patch"
    assert _verb("POST", "/api/v1/namespaces/a/events") == "create"
    before = scrape()
    metrics.count_request("get", "Deployment", "2xx")
    metrics.count_request("get", "Deployment", "404")
    after = scrape()
    for code in ("2xx", "404"):
        labels = {"verb": "get", "resource": "Deployment", "code": code}
        assert value(after, "autoglm_operator_api_requests_total", **labels) == value(
            before, "autoglm_operator_api_requests_total", **labels) + 1


def test_resources_by_phase_and_rollouts_in_progress(scrape) -> None:
    metrics.PHASES.set("a", "one", "Healthy")
    metrics.PHASES.set("a", "two", "Progressing", "Progressing")  # a canary at some step
    metrics.PHASES.set("b", "three", "Progressing", "Paused")
    metrics.PHASES.set("b", "five", "Progressing")  # scaling up, no rollout
    metrics.PHASES.set("b", "four", None)
    s = scrape()
    assert value(s, "autoglm_operator_resources", phase="Healthy") == 1
    assert value(s, "autoglm_operator_resources", phase="Progressing") == 3
    assert value(s, "autoglm_operator_resources", phase="Unknown") == 1
    assert value(s, "autoglm_operator_rollouts_in_progress") == 2
    metrics.PHASES.set("a", "two", "Healthy", "Promoted")
    metrics.PHASES.forget("b", "five")
    metrics.PHASES.forget("b", "three")
    s = scrape()
    assert value(s, "autoglm_operator_resources", phase="Healthy") == 2
    assert ("autoglm_operator_resources", (("phase", "Progressing"),)) not in s
    assert value(s, "autoglm_operator_rollouts_in_progress") == 0
    assert value(s, "process_resident_memory_bytes") > 0
