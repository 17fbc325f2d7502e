"""Typed views of an AutoGLMDeployment: the spec (with the CRD's defaults) and the model source.

The apiserver enforces the CRD schema; these models repeat its defaults so the operator works on a
typed value even for objects stored before a default existed, and reject the few things the
operator cannot act on (``InvalidSpec``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.alias_generators import to_camel

GROUP = "autoglm.io"
VERSION = "v1alpha1"
PLURAL = "autoglmdeployments"
KIND = "AutoGLMDeployment"
API_VERSION = f"{GROUP}/{VERSION}"


class _Model(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore", frozen=True)


class ModelSpec(_Model):
    name: str | None = None
    uri: str
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = "auto"
    max_model_len: int | None = Field(default=None, ge=1)


class RuntimeSpec(_Model):
    image: str | None = None
    version: str | None = None
    max_batch_size: int = Field(default=32, ge=1)
    max_queue: int = Field(default=256, ge=1)
    env: list[dict[str, Any]] = Field(default_factory=list)


class ResourcesSpec(_Model):
    gpus: int = Field(default=1, ge=0)
    gpu_resource_name: str = "nvidia.com/gpu"
    gpu_product: str | None = None
    cpu: str | None = None
    memory: str | None = None

    @field_validator("cpu", "memory", mode="before")
    @classmethod
    def _quantity(cls, v: object) -> object:
        # int-or-string in the CRD; the pod spec wants strings.
        return str(v) if isinstance(v, int | float) and not isinstance(v, bool) else v

    @property
    def cpu_request(self) -> str:
        return self.cpu or ("4" if self.gpus > 0 else "1")

    @property
    def memory_request(self) -> str:
        return self.memory or ("32Gi" if self.gpus > 0 else "2Gi")


class PrometheusRef(_Model):
    address: str | None = None


class AutoscalingSpec(_Model):
    enabled: bool = False
    provider: Literal["HPA", "KEDA"] = "HPA"
    prometheus: PrometheusRef = Field(default_factory=PrometheusRef)
    min_replicas: int = Field(default=1, ge=1)
    max_replicas: int | None = Field(default=None, ge=1)
    target_queue_depth: int = Field(default=8, ge=1)
    target_cpu_utilization: int = Field(default=0, ge=0, le=100, alias="targetCPUUtilization")
    scale_down_stabilization_seconds: int = Field(default=300, ge=0)

    @property
    def bounds(self) -> tuple[int, int]:
        """(min, max) clamped so that min <= max (never trust a stored object blindly)."""
        lo = self.min_replicas
        hi = max(lo, self.max_replicas if self.max_replicas is not None else lo)
        return lo, hi


class SecretKeyRef(_Model):
    name: str
    key: str = "token"


class AuthSpec(_Model):
    api_key_secret_ref: SecretKeyRef | None = None


class SecretRef(_Model):
    name: str


class TLSSpec(_Model):
    secret_ref: SecretRef


class NetworkPolicySpec(_Model):
    enabled: bool = False
    client_labels: dict[str, str] = Field(default_factory=lambda: {"autoglm.io/client": "true"})
    monitoring_namespace: str = "monitoring"


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """Seconds in a duration such as ``30s``, ``1m30s`` or ``500ms`` (the CRD's pattern)."""
    parts = _DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"{text!r} is not a duration such as 30s, 5m or 1h30m")
    return sum(float(n) * _UNIT_SECONDS[u] for n, u in parts)


class RolloutStep(_Model):
    weight: int = Field(ge=1, le=100)
    pause: str | None = None

    @field_validator("pause")
    @classmethod
    def _duration(cls, v: str | None) -> str | None:
        if v is not None:
            parse_duration(v)
        return v

    @property
    def pause_seconds(self) -> float:
        return parse_duration(self.pause) if self.pause else 0.0


# The CRD's default for spec.rollout.steps (tests/operator/test_policy.py checks they agree).
DEFAULT_STEPS = (RolloutStep(weight=10, pause="60s"), RolloutStep(weight=50, pause="120s"))


class GatewayRef(_Model):
    name: str
    namespace: str | None = None
    section_name: str | None = None


class AnalysisSpec(_Model):
    """Metric checks of the canary; present = analysis on (Prometheus falls back to the operator's)."""

    prometheus: PrometheusRef = Field(default_factory=PrometheusRef)
    interval: str = "30s"
    min_requests: int = Field(default=20, ge=0)
    success_rate_min: float = Field(default=0.99, ge=0, le=1)
    latency_p99_max_seconds: float | None = Field(default=None, gt=0)
    ttft_p99_max_seconds: float | None = Field(default=None, gt=0)
    inter_token_p99_max_seconds: float | None = Field(default=None, gt=0)
    max_ratio_to_stable: float | None = Field(default=None, ge=1)
    failure_threshold: int = Field(default=2, ge=1)

    @field_validator("interval")
    @classmethod
    def _duration(cls, v: str) -> str:
        parse_duration(v)
        return v

    @property
    def interval_seconds(self) -> float:
        return max(1.0, parse_duration(self.interval))


class RolloutSpec(_Model):
    """How a new revision replaces the stable one (policy.py reads it; nothing else does)."""

    steps: tuple[RolloutStep, ...] = DEFAULT_STEPS
    max_surge: int | None = Field(default=None, ge=1)
    traffic_routing: Literal["Replicas", "GatewayAPI"] = "Replicas"
    gateway: GatewayRef | None = None
    canary_header: str = "x-autoglm-canary"
    analysis: AnalysisSpec | None = None
    progress_deadline_seconds: int = Field(default=900, ge=1)

    @model_validator(mode="after")
    def _rules(self) -> RolloutSpec:
        weights = [s.weight for s in self.steps]
        if any(a >= b for a, b in zip(weights, weights[1:], strict=False)):
            raise ValueError(f"step weights must be strictly increasing, got {weights}")
        if self.traffic_routing == "GatewayAPI" and self.gateway is None:
            raise ValueError("gateway is required when trafficRouting is GatewayAPI")
        return self


class AutoGLMDeploymentSpec(_Model):
    model: ModelSpec
    runtime: RuntimeSpec = Field(default_factory=RuntimeSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[dict[str, Any]] = Field(default_factory=list)
    replicas: int | None = Field(default=None, ge=0)
    autoscaling: AutoscalingSpec = Field(default_factory=AutoscalingSpec)
    rollout: RolloutSpec = Field(default_factory=RolloutSpec)
    auth: AuthSpec = Field(default_factory=AuthSpec)
    tls: TLSSpec | None = None
    network_policy: NetworkPolicySpec = Field(default_factory=NetworkPolicySpec)

    @model_validator(mode="after")
    def _source(self) -> AutoGLMDeploymentSpec:
        parse_model_uri(self.model.uri)  # raises ValueError with a readable message
        return self

    @model_validator(mode="after")
    def _surge_needs_fixed_replicas(self) -> AutoGLMDeploymentSpec:
        if self.rollout.max_surge is not None and self.autoscaling.enabled:
            raise ValueError("rollout.maxSurge needs a fixed replica count (not allowed with autoscaling)")
        return self

    @property
    def fixed_replicas(self) -> int:
        """Replicas when autoscaling is off (default 1)."""
        return 1 if self.replicas is None else self.replicas


@dataclass(frozen=True)
class ModelSource:
    """Where the weights come from. ``scheme`` is pvc, file or hf."""

    scheme: Literal["pvc", "file", "hf"]
    claim: str = ""  # pvc: the PersistentVolumeClaim
    path: str = ""  # pvc: sub-path inside the claim; file: host path
    repo: str = ""  # hf: ORG/NAME
    revision: str = ""  # hf: optional @revision


_PVC = re.compile(r"^pvc://(?P<claim>[a-z0-9]([-a-z0-9]*[a-z0-9])?)(/(?P<path>.*))?$")
_HF = re.compile(r"^hf://(?P<repo>[^/@\s]+/[^/@\s]+)(@(?P<rev>[^\s]+))?$")


def parse_model_uri(uri: str) -> ModelSource:
    """pvc://CLAIM/PATH | file:///PATH | hf://ORG/NAME[@REVISION]."""
    if m := _PVC.match(uri):
        return ModelSource("pvc", claim=m["claim"], path=(m["path"] or "").strip("/"))
    if uri.startswith("file:///"):
        return ModelSource("file", path="/" + uri[len("file:///") :].strip("/"))
    if m := _HF.match(uri):
        return ModelSource("hf", repo=m["repo"], revision=m["rev"] or "")
    raise ValueError(f"model.uri {uri!r} is not pvc://CLAIM/PATH, file:///PATH or hf://ORG/NAME")


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
