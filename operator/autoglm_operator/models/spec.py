"""The whole spec, its cross-field rules, and the resolved spec the builders take."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from pydantic import Field, ValidationError, model_validator

from ..crdrules import Cel, cel
from .access import AuthSpec, NetworkPolicySpec, TLSSpec
from .autoscaling import SCALE_TO_ZERO_NEEDS_KEDA_AND_ROUTER, AutoscalingSpec
from .base import LabelValue, SpecModel
from .pod import ResourcesSpec, RuntimeSpec, Toleration
from .rollout import RolloutSpec
from .router import RouterSpec
from .source import ModelSource, ModelSpec, parse_model_uri

REPLICAS_WITH_AUTOSCALING = Cel(
    rule="!(has(self.replicas) && has(self.autoscaling) && has(self.autoscaling.enabled) && self.autoscaling.enabled)",
    message=(
        "replicas must not be set when autoscaling.enabled is true (the HorizontalPodAutoscaler owns the "
        "replica count); remove spec.replicas or disable autoscaling"
    ),
    field_path=".replicas",
    reason="FieldValueForbidden",
)
SURGE_WITH_AUTOSCALING = Cel(
    rule=(
        "!(has(self.rollout) && has(self.rollout.maxSurge) && has(self.autoscaling) && "
        "has(self.autoscaling.enabled) && self.autoscaling.enabled)"
    ),
    message=(
        "rollout.maxSurge needs a fixed replica count: with autoscaling the autoscaler owns the stable's "
        "replicas, so stable pods cannot be handed over to the canary; remove rollout.maxSurge or disable "
        "autoscaling"
    ),
    field_path=".rollout.maxSurge",
    reason="FieldValueForbidden",
)


ROUTER_FOR_ROUTER_ROUTING = Cel(
    rule=(
        "!(has(self.rollout) && has(self.rollout.trafficRouting) && self.rollout.trafficRouting == 'Router') || "
        "(has(self.router) && has(self.router.enabled) && self.router.enabled)"
    ),
    message="rollout.trafficRouting Router needs router.enabled true",
    field_path=".router.enabled",
    reason="FieldValueRequired",
)
ROUTER_NOT_WITH_GATEWAY = Cel(
    rule=(
        "!(has(self.router) && has(self.router.enabled) && self.router.enabled && has(self.rollout) && "
        "has(self.rollout.trafficRouting) && self.rollout.trafficRouting == 'GatewayAPI')"
    ),
    message=(
        "router.enabled with rollout.trafficRouting GatewayAPI would route around the router; use "
        "trafficRouting Router (or Replicas)"
    ),
    field_path=".rollout.trafficRouting",
    reason="FieldValueForbidden",
)
OAUTH2_NEEDS_ROUTER = Cel(
    rule=(
        "!(has(self.auth) && has(self.auth.oauth2)) || "
        "(has(self.router) && has(self.router.enabled) && self.router.enabled)"
    ),
    message="auth.oauth2 needs router.enabled true (the router checks the tokens)",
    field_path=".auth.oauth2",
    reason="FieldValueRequired",
)
OAUTH2_NOT_WITH_API_KEY = Cel(
    rule="!(has(self.auth) && has(self.auth.oauth2) && has(self.auth.apiKeySecretRef))",
    message=(
        "auth.oauth2 and auth.apiKeySecretRef cannot both be set (the router passes no token on, so a model "
        "pod checking an API key would refuse every request); remove one"
    ),
    field_path=".auth.apiKeySecretRef",
    reason="FieldValueForbidden",
)
ROUTER_RULES = (
    ROUTER_FOR_ROUTER_ROUTING,
    ROUTER_NOT_WITH_GATEWAY,
    OAUTH2_NEEDS_ROUTER,
    OAUTH2_NOT_WITH_API_KEY,
)


class AutoGLMDeploymentSpec(SpecModel):
    """Desired state: the model, how to run it, where, how many, and how to roll out changes."""

    crd_extra: ClassVar[dict[str, Any]] = cel(
        REPLICAS_WITH_AUTOSCALING, SURGE_WITH_AUTOSCALING, *ROUTER_RULES, SCALE_TO_ZERO_NEEDS_KEDA_AND_ROUTER
    )
    model: ModelSpec = Field(
        description=(
            "The model to serve. Changing anything here starts a new revision (new pods), which replaces the "
            "current one once it is Ready."
        )
    )
    runtime: RuntimeSpec = Field(
        default_factory=RuntimeSpec,
        description=(
            "The inference server container. Changing image or version starts a new revision; the other "
            "fields are passed to the runtime and also start a new revision."
        ),
        json_schema_extra={"default": {}},
    )
    resources: ResourcesSpec = Field(
        default_factory=ResourcesSpec,
        description="What each pod asks for. Changing it starts a new revision.",
        json_schema_extra={"default": {}},
    )
    node_selector: dict[str, LabelValue] = Field(
        default_factory=dict,
        max_length=32,
        description="Extra node labels the pods must match (merged with the gpuProduct selector).",
    )
    tolerations: tuple[Toleration, ...] = Field(
        default=(),
        max_length=32,
        description="Tolerations for the pods, as in a Pod spec (GPU nodes are often tainted).",
        json_schema_extra={"x-kubernetes-list-type": "atomic"},
    )
    replicas: int | None = Field(
        default=None,
        ge=0,
        le=1000,
        description=(
            "Pods of the serving revision when autoscaling is off (the operator uses 1 when it is unset). Set "
            "by `kubectl scale agd/NAME --replicas=N`. Must not be set when autoscaling.enabled is true."
        ),
    )
    autoscaling: AutoscalingSpec = Field(
        default_factory=AutoscalingSpec,
        description=(
            "Scale the serving Deployment on the per-pod queue depth (autoglm_requests_waiting) and optionally "
            "CPU, through a HorizontalPodAutoscaler (provider HPA, needs a custom-metrics adapter) or a KEDA "
            "ScaledObject (provider KEDA, reads Prometheus). Changing it never starts a new revision. When "
            "enabled, spec.replicas must be unset."
        ),
    )
    network_policy: NetworkPolicySpec = Field(
        default_factory=NetworkPolicySpec,
        description=(
            "A NetworkPolicy letting only labelled client pods of this namespace and the monitoring namespace "
            "reach the model pods' port (enforced by the cluster's CNI)."
        ),
    )
    tls: TLSSpec | None = Field(
        default=None,
        description=(
            "Serve HTTPS: the runtime uses the certificate and key of a kubernetes.io/tls Secret (mounted "
            "read-only), probes switch to HTTPS and status.endpoint says https://. With router.enabled the "
            "router serves the same certificate and calls the model pods over HTTPS, trusting only that "
            "certificate. A missing or malformed Secret makes the resource Degraded; it never falls back to "
            "plaintext."
        ),
    )
    rollout: RolloutSpec = Field(
        default_factory=RolloutSpec,
        description=(
            "How a new revision (changed model or runtime) replaces the stable one: a canary takes traffic in "
            "steps (only once its pods are Ready), its metrics are checked, and it is promoted after the last "
            "step or rolled back when the checks fail or the deadline passes. The first revision goes straight "
            "to 100 %. Manual control: annotations autoglm.io/promote=true, autoglm.io/abort=true, "
            "autoglm.io/paused=true (or `autoglm rollout promote|abort|pause|resume|undo NAME`)."
        ),
        json_schema_extra={"default": {}},
    )
    auth: AuthSpec = Field(default_factory=AuthSpec, description="Client authentication of the OpenAI-compatible API.")
    router: RouterSpec = Field(
        default_factory=RouterSpec,
        description=(
            "The OpenAI-aware router in front of the model pods (session affinity, least load, canary by "
            "user, retries before the first byte). Off by default."
        ),
        json_schema_extra={"default": {}},
    )

    @model_validator(mode="after")
    def _surge_needs_fixed_replicas(self) -> AutoGLMDeploymentSpec:
        if self.rollout.max_surge is not None and self.autoscaling.enabled:
            raise ValueError(SURGE_WITH_AUTOSCALING.message)
        routing, router = self.rollout.traffic_routing, self.router.enabled
        if routing == "Router" and not router:
            raise ValueError(ROUTER_FOR_ROUTER_ROUTING.message)
        if router and routing == "GatewayAPI":
            raise ValueError(ROUTER_NOT_WITH_GATEWAY.message)
        if self.autoscaling.min_replicas == 0 and not (self.autoscaling.provider == "KEDA" and router):
            raise ValueError(SCALE_TO_ZERO_NEEDS_KEDA_AND_ROUTER.message)
        if self.auth.oauth2 is not None and not router:
            raise ValueError(OAUTH2_NEEDS_ROUTER.message)
        if self.auth.oauth2 is not None and self.auth.api_key_secret_ref is not None:
            raise ValueError(OAUTH2_NOT_WITH_API_KEY.message)
        return self

    @property
    def fixed_replicas(self) -> int:
        """Replicas when autoscaling is off (default 1)."""
        return 1 if self.replicas is None else self.replicas


@dataclass(frozen=True)
class ResolvedSpec:
    """The spec plus what the operator fills in (names, image, version) — the builders' input."""

    name: str
    namespace: str
    spec: AutoGLMDeploymentSpec
    image: str
    version: str
    model_name: str
    source: ModelSource

    @property
    def image_ref(self) -> str:
        return f"{self.image}:{self.version}"


def resolve_spec(
    name: str, namespace: str, raw_spec: dict[str, Any] | None, *, default_image: str, default_version: str
) -> ResolvedSpec:
    """Parse the CR's spec with defaults. Raises ``InvalidSpec`` naming the bad fields."""
    try:
        spec = AutoGLMDeploymentSpec.model_validate(raw_spec or {})
    except ValidationError as exc:
        raise InvalidSpec(_format(exc)) from None
    return ResolvedSpec(
        name=name,
        namespace=namespace,
        spec=spec,
        image=spec.runtime.image or default_image,
        version=spec.runtime.version or default_version,
        model_name=spec.model.name or name,
        source=parse_model_uri(spec.model.uri),
    )


class InvalidSpec(ValueError):
    """The spec cannot be acted on; the message names the fields."""


def _format(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ()))
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        parts.append(f"spec.{loc}: {msg}" if loc else msg)
    return "; ".join(parts)
