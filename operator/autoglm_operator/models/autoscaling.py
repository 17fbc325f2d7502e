"""spec.autoscaling: scaling the serving revision on queue depth (HPA or KEDA)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from ..crdrules import Cel, cel
from .base import DURATION, SpecModel
from .rollout import parse_duration

# Cross-field (needs spec.router): the rule sits on the spec; spec.py lists it with the others.
SCALE_TO_ZERO_NEEDS_KEDA_AND_ROUTER = Cel(
    rule=(
        "!(has(self.autoscaling) && has(self.autoscaling.minReplicas) && self.autoscaling.minReplicas == 0) || "
        "(has(self.autoscaling.provider) && self.autoscaling.provider == 'KEDA' && has(self.router) && "
        "has(self.router.enabled) && self.router.enabled)"
    ),
    message=(
        "autoscaling.minReplicas 0 (scale to zero) needs autoscaling.provider KEDA and router.enabled true: "
        "the router holds requests while no pod is Ready and KEDA wakes the deployment on them"
    ),
    field_path=".autoscaling.minReplicas",
    reason="FieldValueForbidden",
)


class PrometheusRef(SpecModel):
    """A Prometheus server."""

    address: str | None = Field(
        default=None,
        max_length=512,
        pattern=r"^https?://[^\s]+$",
        description="Base URL, e.g. http://prometheus.monitoring:9090.",
    )


class AutoscalingSpec(SpecModel):
    """Scaling the serving Deployment on the per-pod queue depth."""

    crd_extra: ClassVar[dict[str, Any]] = cel(
        Cel(
            rule="!has(self.enabled) || !self.enabled || has(self.maxReplicas)",
            message="maxReplicas is required when autoscaling is enabled",
            field_path=".maxReplicas",
            reason="FieldValueRequired",
        ),
        Cel(
            rule="!has(self.minReplicas) || !has(self.maxReplicas) || self.minReplicas <= self.maxReplicas",
            message_expression=(
                "'minReplicas (%d) must be less than or equal to maxReplicas (%d)'.format([self.minReplicas, "
                "self.maxReplicas])"
            ),
            field_path=".minReplicas",
            reason="FieldValueInvalid",
        ),
    )
    enabled: bool = Field(
        default=False, description="Whether to autoscale (create the HPA or the ScaledObject). Default false."
    )
    provider: Literal["HPA", "KEDA"] = Field(
        default="HPA",
        description=(
            "HPA (default): an autoscaling/v2 HorizontalPodAutoscaler on the Pods metric "
            "autoglm_requests_waiting, served by a custom-metrics adapter such as prometheus-adapter. KEDA: a "
            "keda.sh ScaledObject with a Prometheus trigger on the serving revision's queue depth; KEDA "
            "creates the HPA. Needs KEDA installed."
        ),
    )
    prometheus: PrometheusRef = Field(
        default_factory=PrometheusRef,
        description="Prometheus that KEDA queries (provider KEDA); default the operator's setting.",
    )
    min_replicas: int = Field(
        default=1,
        ge=0,
        le=1000,
        description=(
            "Fewest pods the autoscaler keeps. At most maxReplicas. 0 = scale to zero (provider KEDA and "
            "router.enabled only): after scaleToZeroAfter without requests the serving revision has no pod; the "
            "router holds new requests (router.holdTimeout) and the first one wakes it."
        ),
    )
    max_replicas: int | None = Field(
        default=None, ge=1, le=1000, description="Most pods the autoscaler may create. Required when enabled."
    )
    target_queue_depth: int = Field(
        default=8,
        ge=1,
        le=100000,
        description=(
            "Target average number of waiting requests per pod (the Pods metric autoglm_requests_waiting). "
            "Must be greater than 0."
        ),
    )
    target_cpu_utilization: int = Field(
        default=0,
        ge=0,
        le=100,
        alias="targetCPUUtilization",
        description="Target average CPU utilisation in percent of the request; 0 = not used.",
    )
    scale_down_stabilization_seconds: int = Field(
        default=300,
        ge=0,
        le=3600,
        description="How long the autoscaler looks back before scaling down (0..3600).",
    )

    scale_to_zero_after: str = Field(
        default="5m",
        max_length=32,
        pattern=DURATION,
        description=(
            "With minReplicas 0: how long the deployment must be idle (no request held, in flight or "
            "streaming at the router, none waiting at a pod) before it goes to zero, a duration such as 30s or "
            "5m (KEDA's cooldownPeriod). Default 5m."
        ),
    )

    @property
    def scale_to_zero_seconds(self) -> int:
        return max(1, round(parse_duration(self.scale_to_zero_after)))

    @property
    def bounds(self) -> tuple[int, int]:
        """(min, max) clamped so that min <= max (never trust a stored object blindly)."""
        lo = self.min_replicas
        hi = max(lo, self.max_replicas if self.max_replicas is not None else lo)
        return lo, hi
