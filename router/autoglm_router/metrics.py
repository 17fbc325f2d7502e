"""The router's Prometheus metrics (its own registry: ``/metrics`` shows only these)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST

# Router-added time is small: sub-millisecond buckets up to 100 ms.
ADDED_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


# A hold lasts as long as a pod takes to start: a second up to the longest hold timeout.
HOLD_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)

RETRY_REASONS = ("connect", "reset", "unavailable")


class RouterMetrics:
    def __init__(self, deployment: str = "") -> None:
        self.deployment = deployment  # the AutoGLMDeployment routed for ("" with --backend)
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "autoglm_router_requests",
            "Requests answered by the router, by the revision that answered (none: the router itself) and HTTP code.",
            ["revision", "code"],
            registry=r,
        )
        self.retries = Counter(
            "autoglm_router_retries",
            "Requests sent again to another pod before any byte reached the client, by reason.",
            ["reason"],
            registry=r,
        )
        for reason in RETRY_REASONS:
            self.retries.labels(reason)
        self.picks = Counter("autoglm_router_picks", "Pods picked, by policy.", ["policy"], registry=r)
        self.sessions_moved = Counter(
            "autoglm_router_sessions_moved_by_load",
            "SessionAffinity picks that left the session's home pod because it was past the load bound.",
            registry=r,
        )
        self.added_latency = Histogram(
            "autoglm_router_added_latency_seconds",
            "Time the router adds before the response starts: reading and checking the body, picking a pod, "
            "and passing the response's start on (the pod's own time excluded).",
            buckets=ADDED_BUCKETS,
            registry=r,
        )
        self.inflight_by_deployment = Gauge(
            "autoglm_router_requests_in_flight",
            "Requests being proxied now (sent to a pod, or streaming its answer), by AutoGLMDeployment.",
            ["deployment"],
            registry=r,
        )
        self.inflight = self.inflight_by_deployment.labels(deployment)
        self.held = Gauge(
            "autoglm_router_held_requests",
            "Requests waiting for a Ready pod (none in any revision: scaled to zero or starting), by "
            "AutoGLMDeployment and the revision they are meant for. KEDA wakes a deployment from zero on it.",
            ["deployment", "revision"],
            registry=r,
        )
        self.hold_seconds = Histogram(
            "autoglm_router_hold_seconds",
            "How long held requests waited for a Ready pod (released ones and timed-out ones).",
            buckets=HOLD_BUCKETS,
            registry=r,
        )
        self.endpoints = Gauge(
            "autoglm_router_endpoints", "Ready pods the router sends to, by revision.", ["revision"], registry=r
        )

    def collectors(self) -> list[Counter | Gauge | Histogram]:
        """Every metric, in order (the reference docs are generated from them)."""
        return [
            self.requests,
            self.retries,
            self.picks,
            self.sessions_moved,
            self.added_latency,
            self.inflight_by_deployment,
            self.held,
            self.hold_seconds,
            self.endpoints,
        ]

    def render(self) -> bytes:
        return generate_latest(self.registry)
