"""The AutoGLMDeployment API's status as typed models: the CRD's status schema is generated from them.

The operator builds the status as plain dicts (``status.py``, ``rollout_state.py``); a fast test
validates what it builds against these models (``extra="forbid"``), so a key the apiserver would prune
cannot slip in unnoticed.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

INT64: dict[str, Any] = {"format": "int64"}
DATE_TIME: dict[str, Any] = {"format": "date-time"}


class _Status(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True)


def _time(description: str) -> Any:
    return Field(default=None, description=description, json_schema_extra=DATE_TIME)


class AutoscalerStatus(_Status):
    """What the autoscaler reports."""

    provider: str | None = Field(default=None, description="HPA or KEDA.")
    name: str | None = Field(default=None, description="The HorizontalPodAutoscaler's name.")
    current_replicas: int | None = Field(default=None, description="Replicas the autoscaler last saw.")
    desired_replicas: int | None = Field(default=None, description="Replicas the autoscaler wants.")
    metric: str | None = Field(
        default=None, description="Last value of the queue-depth metric (per pod for HPA, summed for KEDA)."
    )
    message: str | None = Field(
        default=None, description="Why the autoscaler cannot act, when it says so (e.g. metrics unavailable)."
    )


class RouterAuthStatus(_Status):
    """How the router pods stand with the OAuth2 issuer (their ``autoglm.io/OAuth2Keys`` pod condition)."""

    issuer: str | None = Field(default=None, description="spec.auth.oauth2.issuerURL.")
    ready: str | None = Field(
        default=None, description="Router pods holding the issuer's keys with the issuer answering / router pods."
    )
    reason: str | None = Field(
        default=None,
        description=(
            "KeysFetched (all pods), IssuerUnreachable (a pod's last fetch failed: its cached keys still verify, "
            "unknown keys are refused), NoKeys (a pod has no keys: it refuses every token) or NotReported."
        ),
    )
    message: str | None = Field(default=None, description="The worst pod's own words, with its name.")


class RouterStatus(_Status):
    """The router in front of the model pods (spec.router.enabled)."""

    name: str | None = Field(default=None, description="The router's Deployment.")
    policy: str | None = Field(default=None, description="LeastLoad or SessionAffinity.")
    replicas: int | None = Field(default=None, description="Router pods.")
    ready_replicas: int | None = Field(default=None, description="Ready router pods.")
    service_on_router: bool | None = Field(
        default=None,
        description="Whether the resource's Service selects the router's pods (once a router pod is Ready).",
    )
    ready_endpoints: int | None = Field(
        default=None,
        description="Ready model pods of the revisions the router sends to (its {name}-stable and {name}-canary "
        "Services).",
    )
    serving: bool | None = Field(
        default=None,
        description="Whether requests to the resource's Service are answered through the router: the Service "
        "selects the router's pods and the router has at least one Ready model pod to send to (or, with "
        "autoscaling.minReplicas 0, none is needed: the router holds requests while KEDA wakes a pod).",
    )
    auth: RouterAuthStatus | None = Field(default=None, description="With spec.auth.oauth2: the issuer's keys.")


class AnalysisStatus(_Status):
    """The last analysis check."""

    time: str | None = _time("When the check ran; the next window starts here.")
    window_seconds: float | None = Field(default=None, description="Length of the window the check covered.")
    requests: float | None = Field(default=None, description="Canary requests finished in the window.")
    success_rate: float | None = Field(default=None, description="Share of them that were not server errors.")
    latency_p99: float | None = Field(default=None, description="p99 request latency of the canary, seconds.")
    ttft_p99: float | None = Field(default=None, description="p99 time to first token of the canary, seconds.")
    inter_token_p99: float | None = Field(default=None, description="p99 inter-token latency of the canary, seconds.")
    stable_latency_p99: float | None = Field(
        default=None, description="p99 request latency of the stable revision over the same window."
    )
    verdict: Literal["Passed", "Failed", "Inconclusive"] | None = Field(
        default=None, description="Passed, Failed or Inconclusive (too few requests, or Prometheus unreachable)."
    )
    reason: str | None = Field(default=None, max_length=2048, description="Why, with the figures that decided it.")


class RevisionStatus(_Status):
    """One revision and its pods."""

    name: str = Field(description="Revision name, also the Deployment's name.")
    version: str | None = Field(default=None, description="Runtime version the revision runs.")
    replicas: int | None = Field(default=None, description="Pods of this revision.")
    ready_replicas: int | None = Field(default=None, description="Ready pods of this revision.")


class Condition(_Status):
    """One condition, in the shape of metav1.Condition."""

    type: str = Field(max_length=316, description="Ready, Progressing or Degraded.")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str | None = Field(
        default=None, max_length=1024, description="CamelCase reason for the last transition, e.g. Unschedulable."
    )
    message: str | None = Field(default=None, max_length=32768, description="Human-readable details.")
    observed_generation: int | None = Field(
        default=None, description="metadata.generation the condition was computed from.", json_schema_extra=INT64
    )
    last_transition_time: str | None = _time("When status last changed.")


class AutoGLMDeploymentStatus(_Status):
    """Observed state, written by the operator only."""

    phase: Literal["Pending", "Progressing", "Healthy", "ScaledToZero", "Degraded"] | None = Field(
        default=None,
        description=(
            "Summary: Pending (nothing Ready yet), Progressing (a new revision is rolling out), Healthy (all "
            "desired replicas Ready), ScaledToZero (autoscaling.minReplicas 0 and no pod now: Ready, the "
            "router holds requests and the first one wakes it), Degraded (see conditions)."
        ),
    )
    observed_generation: int | None = Field(
        default=None, description="metadata.generation the operator last acted on.", json_schema_extra=INT64
    )
    ready: str | None = Field(default=None, description='Ready replicas over desired, e.g. "2/2" (the READY column).')
    replicas: int | None = Field(
        default=None, description="Pods of all revisions (the scale subresource's status replicas)."
    )
    ready_replicas: int | None = Field(default=None, description="Ready pods of all revisions.")
    autoscaler: AutoscalerStatus | None = Field(
        default=None, description="What the autoscaler (the HPA, or the one KEDA made) reports, when autoscaling."
    )
    router: RouterStatus | None = Field(default=None, description="The router, when spec.router.enabled.")
    desired_replicas: int | None = Field(
        default=None, description="Pods wanted now (spec.replicas, or the autoscaler's choice)."
    )
    selector: str | None = Field(
        default=None,
        description=(
            "Label selector of all this resource's pods, in string form (for the scale subresource and the HPA)."
        ),
    )
    stable_revision: str | None = Field(
        default=None, description="Revision serving production traffic, a deterministic hash of what its pods run."
    )
    stable_version: str | None = Field(default=None, description="Runtime version of the stable revision.")
    canary_revision: str | None = Field(default=None, description="Revision being rolled out, if any.")
    canary_version: str | None = Field(default=None, description="Runtime version of the canary revision, if any.")
    canary_weight: int | None = Field(
        default=None,
        ge=0,
        le=100,
        description=(
            "Percentage of traffic the canary gets now (0 when none, and while none of its pods is Ready). "
            "Replicas routing: its share of the Ready pods behind the Service, canary/(stable+canary). "
            "GatewayAPI: the HTTPRoute's canary weight."
        ),
    )
    previous_stable_revision: str | None = Field(
        default=None,
        description="The revision the last promotion replaced (what `autoglm rollout undo` returns to).",
    )
    previous_stable_version: str | None = Field(default=None, description="Runtime version of previousStableRevision.")
    rollout_phase: Literal["Idle", "Progressing", "Paused", "Promoting", "Promoted", "RolledBack"] | None = Field(
        default=None,
        description=(
            "Where the rollout is. Idle: no rollout since the first revision. Progressing: a canary walks its "
            "steps. Paused: held by autoglm.io/paused=true. Promoting: the canary is scaled to the stable's "
            "replica count before it takes all traffic (and, once promoted, while the old revision's pods "
            "drain). Promoted: the last rollout finished. RolledBack: the last rollout was rolled back or "
            "aborted; the stable serves, and the spec's revision is not retried until the spec changes."
        ),
    )
    current_step: int | None = Field(
        default=None,
        ge=0,
        description=(
            "0-based index of the step in progress (len(steps) while promoting); absent when no rollout is in progress."
        ),
    )
    step_started_at: str | None = _time("When the current step began (the canary deadline counts from here).")
    step_ready_at: str | None = _time(
        "When the canary became Ready at the current step's weight: its pause and its analysis windows count from here."
    )
    failed_checks: int | None = Field(
        default=None, ge=0, description="Failed analysis checks in a row in this rollout."
    )
    rolled_back_revision: str | None = Field(
        default=None,
        description=(
            "The revision the last rollback removed; it is not rolled out again until the spec changes (back to "
            "the stable's version, or to another one)."
        ),
    )
    last_analysis: AnalysisStatus | None = Field(default=None, description="The last analysis check of the canary.")
    endpoint: str | None = Field(
        default=None,
        description="OpenAI-compatible base URL inside the cluster, e.g. http://NAME.NS.svc.cluster.local:8000/v1.",
    )
    revisions: tuple[RevisionStatus, ...] | None = Field(
        default=None,
        description="Every revision that has pods now.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    conditions: tuple[Condition, ...] | None = Field(
        default=None,
        description="Ready, Progressing and Degraded conditions.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
