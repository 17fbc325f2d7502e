"""The router's Prometheus metrics (its own registry: ``/metrics`` shows only these)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST

# Router-added time is small: sub-millisecond buckets up to 100 ms.
ADDED_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


RETRY_REASONS = ("connect", "reset", "unavailable")


class RouterMetrics:
    def __init__(self) -> None:
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
        self.inflight = Gauge("autoglm_router_requests_in_flight", "Requests being proxied now.", registry=r)
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
            self.inflight,
            self.endpoints,
        ]

    def render(self) -> bytes:
        return generate_latest(self.registry)
