"""The router's Prometheus metrics (its own registry: ``/metrics`` shows only these)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from autoglm_router.policies import hash64

CONTENT_TYPE = CONTENT_TYPE_LATEST

# Router-added time is small: sub-millisecond buckets up to 100 ms.
ADDED_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


# A hold lasts as long as a pod takes to start: a second up to the longest hold timeout.
HOLD_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)

RETRY_REASONS = ("connect", "reset", "unavailable")
# Bearer-token checks (--oauth2-issuer): a fixed set of results, never the user or the token's words.
AUTH_RESULTS = ("authenticated", "missing_token", "invalid_token", "insufficient_scope")
# Verified users are counted in this many buckets (a stable hash of the user, never the user itself):
# a label with at most 64 values however many users there are.
USER_BUCKETS = 64


def user_bucket(user: str) -> str:
    """The user's bucket, "0".."63": the same user always lands in the same one (blake2b, as picking uses;
    its own prefix, so it says nothing about the user's canary point)."""
    return str(hash64("metrics:" + user) % USER_BUCKETS)


class RouterMetrics:
    def __init__(self, deployment: str = "", oauth2: bool = False) -> None:
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
        self.auth = Counter(
            "autoglm_router_auth",
            "Bearer-token checks (OAuth2 on), by result: authenticated, missing_token, invalid_token (401) or "
            "insufficient_scope (403).",
            ["result"],
            registry=r,
        )
        self.user_requests = Counter(
            "autoglm_router_user_requests",
            f"Requests of token-verified users, by user bucket 0..{USER_BUCKETS - 1} (a stable hash of the user "
            "claim: one user always counts in one bucket; no user id is a label).",
            ["bucket"],
            registry=r,
        )
        self.issuer_reachable = Gauge(
            "autoglm_router_oauth2_issuer_reachable",
            "1 while the last fetch of the issuer's discovery document and JWKS succeeded, 0 after a failure "
            "(cached keys still verify tokens; tokens naming an unknown key are refused).",
            registry=r,
        )
        self.issuer_keys = Gauge(
            "autoglm_router_oauth2_keys",
            "The issuer's signing keys the router holds (0: every token refused).",
            registry=r,
        )
        if oauth2:
            for result in AUTH_RESULTS:
                self.auth.labels(result)

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
            self.auth,
            self.user_requests,
            self.issuer_reachable,
            self.issuer_keys,
        ]

    def render(self) -> bytes:
        return generate_latest(self.registry)
