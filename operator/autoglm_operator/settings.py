"""One configuration object for the operator, read from ``AUTOGLM_OPERATOR_*`` variables.

Validated once at start (``main`` and the kopf start-up handler); a bad value fails fast with a
message naming the variable.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

ENV_PREFIX = "AUTOGLM_OPERATOR_"
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_IMAGE_REPO = re.compile(
    r"^([a-zA-Z0-9]([-a-zA-Z0-9]*[a-zA-Z0-9])?(\.[a-zA-Z0-9]([-a-zA-Z0-9]*[a-zA-Z0-9])?)*(:[0-9]+)?/)?"
    r"[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*$"
)
_TAG = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")


class OperatorSettings(BaseSettings):
    """Environment variable names are ``AUTOGLM_OPERATOR_<FIELD>`` (upper case)."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", validate_default=True)

    namespaces: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated namespaces to watch; empty = all namespaces.",
    )
    resync_seconds: float = Field(
        default=60.0,
        ge=1.0,
        le=86400.0,
        description="Period of the one background safety-net resync over every known resource.",
    )
    default_runtime_image: str = Field(
        default="ghcr.io/autoglm/runtime",
        description="Runtime image repository (no tag) used when spec.runtime.image is unset.",
    )
    default_runtime_version: str = Field(
        default="0.1.0", description="Runtime image tag used when spec.runtime.version is unset."
    )
    default_router_image: str = Field(
        default="ghcr.io/autoglm/router:0.1.0",
        min_length=1,
        description="Router image (repository:tag, Dockerfile.router) used when spec.router.image is unset.",
    )
    prometheus_address: str | None = Field(
        default=None,
        description="Prometheus that KEDA queries for queue depth when spec.autoscaling.prometheus.address is unset.",
    )
    max_concurrent_reconciles: int = Field(default=16, ge=1, le=1024)
    api_threads: int = Field(default=16, ge=1, le=256, description="Threads for the blocking API client.")
    metrics_port: int = Field(
        default=8081,
        ge=0,
        le=65535,
        description="Port of the operator's Prometheus /metrics (0 = no metrics server).",
    )
    metrics_address: str = Field(
        default="127.0.0.1",
        description="Address the metrics server listens on (the chart sets 0.0.0.0 for its Service).",
    )
    leader_election: bool = Field(
        default=False,
        description="Hold a Lease to act (one active replica, the others standby); see leader.py.",
    )
    leader_election_namespace: str = Field(
        default="default", description="Namespace of the leader-election Lease (the chart: its release's)."
    )
    leader_election_name: str = Field(default="autoglm-operator", description="Name of the leader-election Lease.")
    # Client-side rate limit (a token bucket in kube.py). Reads come from the watch-fed cache, so what
    # is paced is a new resource's ~8 requests (a GET that no one else's object has its name and an
    # apply for the Deployment and the Service, two status patches, two events; measured from the
    # audit log) and the odd uncached read. 200/s, bursts of 400: 1,000 new resources in ~40 s (the
    # target is all Ready in 120 s; at 100/s the limiter alone took 80 s and apply → Deployment p50
    # was 12 s at N = 500), while a runaway loop stays capped well under the apiserver's default
    # 200 mutating / 400 read requests in flight shared with everyone.
    api_qps: float = Field(default=200.0, gt=0, le=10000, description="Sustained API requests per second.")
    api_burst: int = Field(default=400, ge=1, le=10000, description="API requests allowed in a burst.")
    api_timeout_seconds: float = Field(default=30.0, gt=0, le=600, description="Timeout of one API request.")
    cache_audit_seconds: float = Field(
        default=600.0,
        ge=10.0,
        le=86400.0,
        description="Period of the check that the cache holds no object deleted while a watch was down.",
    )
    precondition_poll_seconds: float = Field(
        default=10.0,
        ge=1.0,
        le=3600.0,
        description="Period of the one shared poll of the Secrets/PVCs that resources wait for.",
    )
    liveness_endpoint: str | None = Field(
        default=None,
        description="kopf liveness endpoint, e.g. http://0.0.0.0:8080/healthz.",
    )

    @field_validator("namespaces", mode="before")
    @classmethod
    def _split(cls, v: object) -> object:
        if isinstance(v, str):
            return [p.strip() for p in v.split(",") if p.strip()]
        return v

    @field_validator("namespaces")
    @classmethod
    def _dns(cls, v: list[str]) -> list[str]:
        bad = [n for n in v if not _DNS_LABEL.match(n) or len(n) > 63]
        if bad:
            raise ValueError(f"not valid namespace names: {', '.join(bad)}")
        return v

    @field_validator("default_runtime_image")
    @classmethod
    def _image(cls, v: str) -> str:
        if not _IMAGE_REPO.match(v):
            raise ValueError(f"{v!r} is not an image repository without a tag (e.g. ghcr.io/autoglm/runtime)")
        return v

    @field_validator("default_runtime_version")
    @classmethod
    def _tag(cls, v: str) -> str:
        if not _TAG.match(v) or len(v) > 63:
            raise ValueError(f"{v!r} is not a valid image tag")
        return v


def format_validation_error(exc: ValidationError) -> str:
    """One line per bad setting, naming the environment variable."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ()))
        lines.append(f"invalid setting {ENV_PREFIX}{loc.upper()}: {err.get('msg', 'invalid')}")
    return "\n".join(lines)


def load_settings() -> OperatorSettings:
    """Read and validate the settings; raises ``SettingsError`` with a readable message."""
    try:
        return OperatorSettings()
    except ValidationError as exc:
        raise SettingsError(format_validation_error(exc)) from None


class SettingsError(ValueError):
    """The operator's environment is invalid."""
