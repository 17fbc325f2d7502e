"""The AutoGLMDeployment API's spec as typed models: the one source of its facts.

Every field's type, description, default, bounds, pattern and CEL rule is declared here once;
``crdgen.py`` generates the CRD's schema from these classes (``make crd``), and the operator parses
each object with them, so what the apiserver admits and what the operator acts on cannot drift.
Rules the operator also needs at run time are a ``Cel`` (for the apiserver) beside a Python check that
raises the same message. The status is in ``status_model.py``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, field_validator, model_validator
from pydantic.alias_generators import to_camel

from autoglm_runtime import defaults as runtime_defaults

from .crdrules import Cel, cel

GROUP = "autoglm.io"
VERSION = "v1alpha1"
PLURAL = "autoglmdeployments"
KIND = "AutoGLMDeployment"
API_VERSION = f"{GROUP}/{VERSION}"
# metadata.name: it names the Service, and `{name}-{10-char hash}` the revision Deployments (≤ 63).
MAX_NAME_LENGTH = 52

# Grammars (Go's RE2 in the apiserver and Python's re agree on these; Python matches with re.ASCII).
LABEL_VALUE = "^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
DNS_LABEL = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
DURATION = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$"
IMAGE_REPOSITORY = (
    r"^([a-zA-Z0-9]([-a-zA-Z0-9]*[a-zA-Z0-9])?(\.[a-zA-Z0-9]([-a-zA-Z0-9]*[a-zA-Z0-9])?)*(:[0-9]+)?/)?"
    r"[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*$"
)
# pvc://CLAIM/PATH | file:///PATH | hf://ORG/NAME[@REVISION]; parse_model_uri reads the parts.
MODEL_URI = (
    r"^(pvc://(?P<claim>[a-z0-9]([-a-z0-9]*[a-z0-9])?)/(?P<path>.+)"
    r"|file:///(?P<file>.*)"
    r"|hf://(?P<repo>[^/@\s]+/[^/@\s]+)(@(?P<rev>\S+))?)$"
)
URI_FORMS = "pvc://CLAIM/PATH, file:///PATH or hf://ORG/NAME[@REVISION]"
QUANTITY_RULE = "type(self) == int ? self > 0 : (isQuantity(self) && quantity(self).isGreaterThan(quantity('0')))"

LabelValue = Annotated[str, StringConstraints(max_length=63)]


class _Model(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore", frozen=True)
    # Class-level schema additions (CEL rules) for crdgen.py; never validated here.
    crd_extra: ClassVar[dict[str, Any]] = {}


class ModelSpec(_Model):
    """The model to serve."""

    name: str | None = Field(
        default=None,
        min_length=1,
        max_length=63,
        pattern=LABEL_VALUE,
        description=(
            "Model id served on the OpenAI-compatible API (the `model` field of requests and /v1/models). "
            "Default: metadata.name. Letters, digits, '-', '_' and '.', at most 63 characters (it is also "
            "used as a label value)."
        ),
    )
    uri: str = Field(
        min_length=1,
        max_length=1024,
        description=(
            "Where the weights are: pvc://CLAIM/PATH (a PersistentVolumeClaim in this namespace, mounted "
            "read-only), file:///PATH (a directory on the node, mounted as a hostPath) or "
            "hf://ORG/NAME[@REVISION] (downloaded from the Hugging Face Hub by an init container into a "
            "cache volume)."
        ),
        json_schema_extra=cel(
            Cel(
                rule=f"self.matches(r'{re.sub(r'[(][?]P<[a-z]+>', '(', MODEL_URI)}')",  # groups are Python's
                message_expression=f"'uri must be {URI_FORMS}, got \"' + self + '\"'",
                reason="FieldValueInvalid",
            )
        ),
    )
    dtype: runtime_defaults.Dtype = Field(
        default="auto",
        description=(
            "Weight and activation dtype. auto takes the model's own (torch_dtype in its config), falling "
            "back to float32 on CPU."
        ),
    )
    max_model_len: int | None = Field(
        default=None,
        ge=1,
        le=10485760,
        description=(
            "Longest sequence (prompt plus completion, in tokens) a request may use. Default: the model's own maximum."
        ),
    )

    @field_validator("uri")
    @classmethod
    def _uri(cls, v: str) -> str:
        parse_model_uri(v)  # raises ValueError with the CEL rule's message
        return v


class EnvVar(_Model):
    """One environment variable, as in a Pod's container env."""

    crd_extra: ClassVar[dict[str, Any]] = cel(
        Cel(
            rule="!(has(self.value) && has(self.valueFrom))",
            message="value and valueFrom are mutually exclusive",
            field_path=".valueFrom",
            reason="FieldValueForbidden",
        )
    )
    name: str = Field(
        min_length=1,
        max_length=256,
        pattern="^[-._a-zA-Z][-._a-zA-Z0-9]*$",
        description="Variable name (a C identifier, '.' and '-' also allowed).",
    )
    value: str | None = Field(default=None, max_length=32768, description="Literal value.")
    value_from: dict[str, Any] | None = Field(
        default=None,
        description=(
            "Source of the value (secretKeyRef, configMapKeyRef, fieldRef or resourceFieldRef), copied "
            "unchanged into the Pod; the Pod API validates it."
        ),
    )

    def to_pod(self) -> dict[str, Any]:
        """The entry as the Pod's container env takes it (what the user wrote, nothing added)."""
        return self.model_dump(by_alias=True, exclude_unset=True)


class RuntimeSpec(_Model):
    """The inference server container."""

    image: str | None = Field(
        default=None,
        min_length=1,
        max_length=255,
        pattern=IMAGE_REPOSITORY,
        description=(
            "Container image repository without a tag, e.g. registry.example.com/autoglm/runtime. Default: "
            "the operator's configured runtime image (AUTOGLM_OPERATOR_ settings)."
        ),
    )
    version: str | None = Field(
        default=None,
        min_length=1,
        max_length=63,
        pattern=LABEL_VALUE,
        description=(
            'Image tag, e.g. "0.1.0" (quote it in YAML). Shown as VERSION in `kubectl get agd` and used as '
            "the app.kubernetes.io/version label, so at most 63 characters of letters, digits, '-', '_' and "
            "'.'. Default: the operator's configured runtime version."
        ),
    )
    max_batch_size: int = Field(
        default=runtime_defaults.MAX_BATCH_SIZE,
        ge=1,
        le=4096,
        description="Most sequences the runtime decodes together in one step.",
    )
    max_queue: int = Field(
        default=runtime_defaults.MAX_QUEUE,
        ge=1,
        le=1000000,
        description=(
            "Most requests waiting for a batch slot per pod; beyond it the runtime answers 429. The waiting "
            "count is the autoscaling metric autoglm_requests_waiting."
        ),
    )
    env: tuple[EnvVar, ...] = Field(
        default=(),
        max_length=64,
        description="Extra environment variables for the runtime container, in the same form as a Pod's container env.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )


class ResourcesSpec(_Model):
    """What each pod asks for."""

    crd_extra: ClassVar[dict[str, Any]] = cel(
        Cel(
            rule="!has(self.gpuProduct) || !has(self.gpus) || self.gpus > 0",
            message="gpuProduct requires gpus > 0 (a CPU pod cannot be pinned to a GPU product)",
            field_path=".gpuProduct",
            reason="FieldValueForbidden",
        )
    )
    gpus: int = Field(
        default=1,
        ge=0,
        le=64,
        description="GPUs per pod (requests = limits of gpuResourceName). 0 makes a CPU-only pod.",
    )
    gpu_resource_name: str = Field(
        default="nvidia.com/gpu",
        max_length=253,
        pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$",
        description=(
            "Extended resource that counts GPUs, e.g. nvidia.com/gpu or a MIG profile such as nvidia.com/mig-3g.40gb."
        ),
    )
    gpu_product: str | None = Field(
        default=None,
        min_length=1,
        max_length=63,
        pattern=LABEL_VALUE,
        description=(
            "GPU model the pods must land on, e.g. NVIDIA-A10G; becomes the nodeSelector "
            "nvidia.com/gpu.product (the GPU Feature Discovery label). Requires gpus > 0."
        ),
    )
    cpu: int | str | None = Field(
        default=None,
        description=(
            'CPU request per pod as a Kubernetes quantity ("4", 4, "500m"); the limit is left unset. '
            "Default: chosen by the operator."
        ),
        json_schema_extra={
            "maxLength": 64,
            **cel(
                Cel(
                    rule=QUANTITY_RULE,
                    message='cpu must be a positive Kubernetes quantity such as "4" or "500m"',
                    reason="FieldValueInvalid",
                )
            ),
        },
    )
    memory: int | str | None = Field(
        default=None,
        description=(
            'Memory request and limit per pod as a Kubernetes quantity ("32Gi"). Default: chosen by the operator.'
        ),
        json_schema_extra={
            "maxLength": 64,
            **cel(
                Cel(
                    rule=QUANTITY_RULE,
                    message='memory must be a positive Kubernetes quantity such as "32Gi"',
                    reason="FieldValueInvalid",
                )
            ),
        },
    )

    @field_validator("cpu", "memory", mode="after")
    @classmethod
    def _quantity(cls, v: int | str | None) -> str | None:
        # int-or-string in the CRD; the pod spec wants strings.
        return None if v is None else str(v)

    @property
    def cpu_request(self) -> str:
        return str(self.cpu) if self.cpu is not None else ("4" if self.gpus > 0 else "1")

    @property
    def memory_request(self) -> str:
        return str(self.memory) if self.memory is not None else ("32Gi" if self.gpus > 0 else "2Gi")


class Toleration(_Model):
    """A Pod toleration."""

    crd_extra: ClassVar[dict[str, Any]] = cel(
        Cel(
            rule="!has(self.operator) || self.operator != 'Exists' || !has(self.value) || self.value == ''",
            message="value must be empty when operator is Exists",
            field_path=".value",
            reason="FieldValueInvalid",
        ),
        Cel(
            rule="!has(self.tolerationSeconds) || (has(self.effect) && self.effect == 'NoExecute')",
            message="tolerationSeconds requires effect NoExecute",
            field_path=".tolerationSeconds",
            reason="FieldValueInvalid",
        ),
    )
    key: str | None = Field(
        default=None,
        max_length=316,
        description="Taint key to tolerate; empty with operator Exists tolerates every taint.",
    )
    operator: Literal["Exists", "Equal"] | None = Field(default=None, description="Exists or Equal (default Equal).")
    value: str | None = Field(default=None, max_length=63, description="Taint value to match when operator is Equal.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        default=None, description="Taint effect to match; empty matches all effects."
    )
    toleration_seconds: int | None = Field(
        default=None,
        description="With effect NoExecute, how long the pod stays bound after the taint appears.",
        json_schema_extra={"format": "int64"},
    )

    def to_pod(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, exclude_unset=True)


class PrometheusRef(_Model):
    """A Prometheus server."""

    address: str | None = Field(
        default=None,
        max_length=512,
        pattern=r"^https?://[^\s]+$",
        description="Base URL, e.g. http://prometheus.monitoring:9090.",
    )


class AnalysisPrometheusRef(_Model):
    """The Prometheus that scrapes the runtime pods."""

    address: str | None = Field(
        default=None,
        max_length=2048,
        pattern=r"^https?://[^/\s]+(/\S*)?$",
        description="Base URL, e.g. http://prometheus.monitoring:9090.",
    )


class AutoscalingSpec(_Model):
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
        default=1, ge=1, le=1000, description="Fewest pods the autoscaler keeps. At most maxReplicas."
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

    @property
    def bounds(self) -> tuple[int, int]:
        """(min, max) clamped so that min <= max (never trust a stored object blindly)."""
        lo = self.min_replicas
        hi = max(lo, self.max_replicas if self.max_replicas is not None else lo)
        return lo, hi


class SecretKeyRef(_Model):
    """A key of a Secret in this namespace."""

    name: str = Field(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN, description="Secret name.")
    key: str = Field(
        default="token", min_length=1, max_length=253, pattern="^[-._a-zA-Z0-9]+$", description="Key within the Secret."
    )


class AuthSpec(_Model):
    """Client authentication of the OpenAI-compatible API."""

    api_key_secret_ref: SecretKeyRef | None = Field(
        default=None,
        description=(
            "Secret in this namespace holding the API key clients must send as `Authorization: Bearer KEY`. "
            "Omitted: no authentication."
        ),
    )


class SecretRef(_Model):
    """A Secret in this namespace."""

    name: str = Field(min_length=1, max_length=253, description="Secret name.")


class TLSSpec(_Model):
    """Serving HTTPS."""

    secret_ref: SecretRef = Field(description="The Secret (same namespace) holding tls.crt and tls.key.")


class NetworkPolicySpec(_Model):
    """Who may reach the model pods."""

    enabled: bool = Field(default=False, description="Whether to create the NetworkPolicy. Default false.")
    client_labels: dict[str, LabelValue] = Field(
        default_factory=lambda: {"autoglm.io/client": "true"},
        max_length=16,
        description="Labels of the pods (same namespace) allowed to call the model. Default autoglm.io/client=true.",
    )
    monitoring_namespace: str = Field(
        default="monitoring",
        max_length=63,
        description="Namespace whose pods may scrape metrics (by kubernetes.io/metadata.name). Default monitoring.",
    )


_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h)", re.ASCII)
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """Seconds in a duration such as ``30s``, ``1m30s`` or ``500ms`` (the grammar ``DURATION``)."""
    if not re.fullmatch(DURATION, text, re.ASCII):
        raise ValueError(f"{text!r} is not a duration such as 30s, 5m or 1h30m")
    return sum(float(n) * _UNIT_SECONDS[u] for n, u in _DURATION_PART.findall(text))


class RolloutStep(_Model):
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


class GatewayRef(_Model):
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


class AnalysisSpec(_Model):
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


class RolloutSpec(_Model):
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
    traffic_routing: Literal["Replicas", "GatewayAPI"] = Field(
        default="Replicas",
        description=(
            "How traffic is split. Replicas: both revisions' Ready pods behind the one Service, so the split "
            "follows Ready pod counts: the canary gets ceil(weight x stable replicas / 100) pods (at least 1), "
            "and its share is canary/(stable+canary) Ready pods, reported as status.canaryWeight (with 2 "
            "stable replicas the steps are 33 %, 50 %, ...; more replicas give a finer split). GatewayAPI: "
            "{name}-stable and {name}-canary Services and an HTTPRoute {name} on `gateway` with weighted "
            "backendRefs and a header match for canaryHeader; the operator edits only the rules it names "
            "(autoglm-*) and keeps any other rule."
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
            'Requests carrying this header with value "always" always go to the canary (GatewayAPI routing only).'
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


class AutoGLMDeploymentSpec(_Model):
    """Desired state: the model, how to run it, where, how many, and how to roll out changes."""

    crd_extra: ClassVar[dict[str, Any]] = cel(REPLICAS_WITH_AUTOSCALING, SURGE_WITH_AUTOSCALING)
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
            "read-only), probes switch to HTTPS and status.endpoint says https://. A missing or malformed "
            "Secret makes the resource Degraded; it never falls back to plaintext."
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

    @model_validator(mode="after")
    def _surge_needs_fixed_replicas(self) -> AutoGLMDeploymentSpec:
        if self.rollout.max_surge is not None and self.autoscaling.enabled:
            raise ValueError(SURGE_WITH_AUTOSCALING.message)
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


def parse_model_uri(uri: str) -> ModelSource:
    """The parts of a model URI (the grammar ``MODEL_URI``, which the CRD's CEL rule also applies)."""
    m = re.fullmatch(MODEL_URI, uri, re.ASCII)
    if m is None:
        raise ValueError(f'uri must be {URI_FORMS}, got "{uri}"')
    if m["claim"]:
        return ModelSource("pvc", claim=m["claim"], path=m["path"].strip("/"))
    if m["repo"]:
        return ModelSource("hf", repo=m["repo"], revision=m["rev"] or "")
    return ModelSource("file", path="/" + m["file"].strip("/"))


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
