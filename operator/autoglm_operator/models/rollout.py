"""spec.rollout: canary steps, durations, traffic routing and the analysis of the canary."""

from __future__ import annotations

import re
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from ..crdrules import Cel, cel
from .base import DNS_LABEL, DNS_SUBDOMAIN, DURATION, SpecModel


class AnalysisPrometheusRef(SpecModel):
    """The Prometheus that scrapes the runtime pods."""

    address: str | None = Field(
        default=None,
        max_length=2048,
        pattern=r"^https?://[^/\s]+(/\S*)?$",
        description="Base URL, e.g. http://prometheus.monitoring:9090.",
    )


_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h)", re.ASCII)
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """Seconds in a duration such as ``30s``, ``1m30s`` or ``500ms`` (the grammar ``DURATION``)."""
    if not re.fullmatch(DURATION, text, re.ASCII):
        raise ValueError(f"{text!r} is not a duration such as 30s, 5m or 1h30m")
    return sum(float(n) * _UNIT_SECONDS[u] for n, u in _DURATION_PART.findall(text))


class RolloutStep(SpecModel):
    """A step holds the canary at a traffic weight, optionally for a fixed time."""

    weight: int = Field(ge=1, le=100, description="Percentage of traffic sent to the canary during this step (1..100).")
    pause: str | None = Field(
        default=None,
        max_length=32,
        pattern=DURATION,
        description=(
            "How long to hold this weight before the next step, a duration such as 30s, 5m or 1h30m, counted "
            "from the moment the canary's pods for this weight are Ready. Omitted: move on as soon as they are "
            "Ready and (with analysis) a check passes."
        ),
    )

    @property
    def pause_seconds(self) -> float:
        return parse_duration(self.pause) if self.pause else 0.0


DEFAULT_STEPS = (RolloutStep(weight=10, pause="60s"), RolloutStep(weight=50, pause="120s"))


class GatewayRef(SpecModel):
    """A Gateway API Gateway."""

    name: str = Field(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN, description="Gateway name.")
    namespace: str | None = Field(
        default=None,
        min_length=1,
        max_length=63,
        pattern=DNS_LABEL,
        description="Gateway namespace. Default: this resource's namespace.",
    )
    section_name: str | None = Field(
        default=None,
        min_length=1,
        max_length=253,
        pattern=DNS_SUBDOMAIN,
        description="Listener of the Gateway to attach to (parentRefs[].sectionName). Default: all listeners.",
    )


class AnalysisSpec(SpecModel):
    """Metric checks of the canary; present = analysis on (Prometheus falls back to the operator's)."""

    prometheus: AnalysisPrometheusRef = Field(
        default_factory=AnalysisPrometheusRef,
        description=(
            "The Prometheus that scrapes the runtime pods. Default: the operator's AUTOGLM_OPERATOR_PROMETHEUS_ADDRESS."
        ),
    )
    interval: str = Field(
        default="30s",
        max_length=32,
        pattern=DURATION,
        description=(
            "How often the checks run, a duration such as 30s or 1m; each check covers the time since the previous one."
        ),
    )
    success_rate_min: float = Field(
        default=0.99,
        ge=0,
        le=1,
        description=(
            "Lowest acceptable success rate of the canary, 0..1: successes over the requests it answered "
            "(non-5xx). Server errors and timeouts count against it; requests refused as invalid (400) count "
            "only beyond the stable's own share of them in the same window (a canary refusing what the stable "
            "serves, e.g. a maxModelLen too small, fails; clients' own mistakes do not). Load shedding (429) "
            "and client disconnects never count."
        ),
    )
    latency_p99_max_seconds: float | None = Field(
        default=None,
        gt=0,
        le=3600,
        description="Highest acceptable p99 request latency of the canary, in seconds (> 0). Omitted: not checked.",
    )
    ttft_p99_max_seconds: float | None = Field(
        default=None,
        gt=0,
        le=3600,
        description="Highest acceptable p99 time to first token of the canary, in seconds (> 0). Omitted: not checked.",
    )
    inter_token_p99_max_seconds: float | None = Field(
        default=None,
        gt=0,
        le=3600,
        description=(
            "Highest acceptable p99 time between generated tokens of the canary, in seconds (> 0). Omitted: "
            "not checked."
        ),
    )
    max_ratio_to_stable: float | None = Field(
        default=None,
        ge=1,
        le=1000,
        description=(
            "Most the canary's p99s (latency, time to first token, inter-token) may exceed the stable's over "
            "the same window, as a factor >= 1 (1.25 = 25 % slower). Checked only when the stable served "
            "requests in the window. Omitted: not checked."
        ),
    )
    failure_threshold: int = Field(
        default=2, ge=1, le=100, description="Failed checks in a row that roll the canary back."
    )
    min_requests: int = Field(
        default=20,
        ge=0,
        le=1000000,
        description="Fewest canary requests in an interval for a check to count; fewer means inconclusive.",
    )

    @property
    def interval_seconds(self) -> float:
        return max(1.0, parse_duration(self.interval))


STEPS_INCREASING = Cel(
    rule="self.all(i, s, i == 0 || self[i - 1].weight < s.weight)",
    message_expression="'step weights must be strictly increasing, got %s'.format([self.map(s, s.weight)])",
    reason="FieldValueInvalid",
)
GATEWAY_REQUIRED = Cel(
    rule="!has(self.trafficRouting) || self.trafficRouting != 'GatewayAPI' || has(self.gateway)",
    message="gateway is required when trafficRouting is GatewayAPI",
    field_path=".gateway",
    reason="FieldValueRequired",
)


class RolloutSpec(SpecModel):
    """How a new revision replaces the stable one (policy.py reads it; nothing else does)."""

    crd_extra: ClassVar[dict[str, Any]] = cel(GATEWAY_REQUIRED)
    steps: tuple[RolloutStep, ...] = Field(
        default=DEFAULT_STEPS,
        max_length=20,
        description=(
            "Canary steps, in order. Weights are percentages of traffic, 1..100, strictly increasing. After "
            "the last step the canary is scaled to the stable's current replica count and, once Ready at that "
            "count, promoted to stable. Empty ([]): switch over as soon as the new revision is Ready at full "
            "count (also what happens when the stable has no Ready pod: there is no traffic to protect). "
            "Default: 10 % for 60s, then 50 % for 120s."
        ),
        json_schema_extra={
            "default": [s.model_dump(by_alias=True) for s in DEFAULT_STEPS],
            "x-kubernetes-list-type": "atomic",
            **cel(STEPS_INCREASING),
        },
    )
    max_surge: int | None = Field(
        default=None,
        ge=1,
        le=1000,
        description=(
            "At most this many pods above the stable's replica count during a rollout (a GPU budget): stable "
            "pods are removed only as Ready canary pods take their share of the traffic. Needs a fixed replica "
            "count (not allowed with autoscaling, whose autoscaler owns the stable's count). Omitted: canary "
            "pods come on top of the stable's."
        ),
    )
    traffic_routing: Literal["Replicas", "GatewayAPI", "Router"] = Field(
        default="Replicas",
        description=(
            "How traffic is split. Replicas: both revisions' Ready pods behind the one Service, so the split "
            "follows Ready pod counts: the canary gets ceil(weight x stable replicas / 100) pods (at least 1), "
            "and its share is canary/(stable+canary) Ready pods, reported as status.canaryWeight (with 2 "
            "stable replicas the steps are 33 %, 50 %, ...; more replicas give a finer split). GatewayAPI: "
            "{name}-stable and {name}-canary Services and an HTTPRoute {name} on `gateway` with weighted "
            "backendRefs and a header match for canaryHeader; the operator edits only the rules it names "
            "(autoglm-*) and keeps any other rule. Router (needs router.enabled): the router splits by user: "
            "exact weights whatever the pod counts, a user's requests stay on one revision through a step and "
            "only move stable to canary as the weight grows; canaryHeader still forces the canary."
        ),
    )
    gateway: GatewayRef | None = Field(
        default=None,
        description="The Gateway the HTTPRoute attaches to. Required when trafficRouting is GatewayAPI.",
    )
    canary_header: str = Field(
        default="x-autoglm-canary",
        min_length=1,
        max_length=256,
        pattern="^[A-Za-z0-9][-A-Za-z0-9]*$",
        description=(
            'Requests carrying this header with value "always" always go to the canary (GatewayAPI and Router '
            "routing only)."
        ),
    )
    analysis: AnalysisSpec | None = Field(
        default=None,
        description=(
            "Metric checks of the canary, run every interval while a step holds (from Prometheus, over the "
            "runtime's own metrics of the canary revision). A step advances only after a passing check; "
            "failureThreshold failed checks in a row roll the canary back; fewer than minRequests requests "
            "make a check inconclusive (never a pass). Omitted: no analysis, steps advance on readiness and "
            "pause alone."
        ),
    )
    progress_deadline_seconds: int = Field(
        default=900,
        ge=1,
        le=86400,
        description=(
            "Seconds a canary may take to become Ready at a step's weight, or, once Ready and its pause over, "
            "to get a passing check, before it is rolled back (Degraded/RolledBack)."
        ),
    )

    @model_validator(mode="after")
    def _rules(self) -> RolloutSpec:
        weights = [s.weight for s in self.steps]
        if any(a >= b for a, b in zip(weights, weights[1:], strict=False)):
            raise ValueError(f"step weights must be strictly increasing, got {weights}")
        if self.traffic_routing == "GatewayAPI" and self.gateway is None:
            raise ValueError(GATEWAY_REQUIRED.message)
        return self
