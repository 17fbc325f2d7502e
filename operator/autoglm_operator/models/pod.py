"""What the pods run and ask for: spec.runtime, spec.resources, spec.tolerations."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator

from autoglm_runtime import defaults as runtime_defaults

from ..crdrules import Cel, cel
from .base import IMAGE_REPOSITORY, LABEL_VALUE, QUANTITY_RULE, SpecModel


class EnvVar(SpecModel):
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


class RuntimeSpec(SpecModel):
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


class ResourcesSpec(SpecModel):
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


class Toleration(SpecModel):
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
