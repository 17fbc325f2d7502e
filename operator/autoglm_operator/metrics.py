"""The operator's own Prometheus metrics, served on their own port (``AUTOGLM_OPERATOR_METRICS_PORT``).

- ``autoglm_operator_reconcile_duration_seconds`` (histogram): one observation per reconcile run;
  its ``_count`` is the number of reconciles.
- ``autoglm_operator_reconcile_errors_total{reason}``: failed reconciles (retried with backoff);
  ``reason`` is the HTTP status for API errors (``http_409``), else the exception's class name.
- ``autoglm_operator_api_requests_total{verb,resource,code}``: requests the reconciler makes through
  ``kube.py`` (kopf's own watch streams are not counted); ``code`` is ``2xx`` on success, the HTTP
  status on an API error, ``error`` when no response came back.
- ``autoglm_operator_resources{phase}`` (gauge, computed at scrape time): AutoGLMDeployments by
  ``status.phase`` as last seen in their watch events (``Unknown`` before a first status).
- ``autoglm_operator_rollouts_in_progress`` (gauge): resources with a canary rollout under way
  (``status.rolloutPhase`` ``Progressing``, ``Paused`` or ``Promoting``).

Plus the process collectors (``process_cpu_seconds_total``, ``process_resident_memory_bytes``...).
Everything lives in this module's own ``REGISTRY``, so several operators in one test process never
collide.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client import Counter as PromCounter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)

RECONCILE_DURATION = Histogram(
    "autoglm_operator_reconcile_duration_seconds",
    "Time one reconcile of an AutoGLMDeployment took (reads, writes, status).",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
    registry=REGISTRY,
)
RECONCILE_ERRORS = PromCounter(
    "autoglm_operator_reconcile_errors",
    "Reconciles that failed (and were retried), by reason: http_<status> or the exception class.",
    ["reason"],
    registry=REGISTRY,
)
API_REQUESTS = PromCounter(
    "autoglm_operator_api_requests",
    "Kubernetes API requests made by the reconciler, by verb, resource and response code.",
    ["verb", "resource", "code"],
    registry=REGISTRY,
)
ROLLING_OUT = frozenset({"Progressing", "Paused", "Promoting"})  # status.rolloutPhase


class PhaseCollector(Collector):
    """Resources by phase, from the phase each resource's latest watch event carried."""

    def __init__(self) -> None:
        self._phases: dict[tuple[str, str], tuple[str, str]] = {}  # (phase, rolloutPhase)
        self._lock = threading.Lock()  # scrapes run in the HTTP server's thread

    def set(self, namespace: str, name: str, phase: str | None, rollout_phase: str | None = None) -> None:
        with self._lock:
            self._phases[(namespace, name)] = (phase or "Unknown", rollout_phase or "Idle")

    def forget(self, namespace: str, name: str) -> None:
        with self._lock:
            self._phases.pop((namespace, name), None)

    def clear(self) -> None:
        with self._lock:
            self._phases.clear()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        with self._lock:
            counts = Counter(phase for phase, _ in self._phases.values())
            rolling = sum(1 for _, rollout in self._phases.values() if rollout in ROLLING_OUT)
        by_phase = GaugeMetricFamily(
            "autoglm_operator_resources", "AutoGLMDeployments by status.phase, as last seen.", labels=["phase"]
        )
        for phase, n in sorted(counts.items()):
            by_phase.add_metric([phase], n)
        yield by_phase
        yield GaugeMetricFamily(
            "autoglm_operator_rollouts_in_progress",
            "AutoGLMDeployments with a canary rollout under way (rolloutPhase Progressing, Paused or Promoting).",
            value=rolling,
        )


PHASES = PhaseCollector()
REGISTRY.register(PHASES)


def error_reason(exc: BaseException) -> str:
    status = getattr(exc, "status", None)  # kube.ApiError (imported by kube.py, not here: no cycle)
    return f"http_{status}" if isinstance(status, int) else type(exc).__name__


def observe_reconcile(seconds: float, error: BaseException | None = None) -> None:
    RECONCILE_DURATION.observe(seconds)
    if error is not None:
        RECONCILE_ERRORS.labels(reason=error_reason(error)).inc()


def count_request(verb: str, resource: str, code: str) -> None:
    API_REQUESTS.labels(verb=verb, resource=resource, code=code).inc()


def serve(port: int, address: str) -> Any:
    """Start the /metrics HTTP server in a thread; returns the server (``.shutdown()`` stops it)."""
    server, _thread = start_http_server(port, addr=address, registry=REGISTRY)
    return server
