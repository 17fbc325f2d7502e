"""spec.router: the OpenAI-aware router in front of the model pods (router/, Dockerfile.router)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .base import DURATION, SpecModel
from .rollout import parse_duration

# One source: the router's own grammar for --session-key (autoglm_router.sessions) is the same string.
SESSION_KEY = r"^(prompt|user|header:[A-Za-z0-9][-A-Za-z0-9_]*)$"


class RouterSpec(SpecModel):
    """The router: a Deployment of streaming reverse proxies that pick a model pod per request."""

    enabled: bool = Field(
        default=False,
        description=(
            "Run the router. On: the resource's Service ({name}, port 8000) selects the router's pods, which "
            "pick a model pod for each request (policy), retry a refused connection or a 503 on another pod "
            "before the first byte, and (trafficRouting Router) split a canary by user. Off: the Service "
            "selects the model pods directly."
        ),
    )
    replicas: int = Field(default=2, ge=1, le=100, description="Router pods (a PodDisruptionBudget keeps one up).")
    image: str | None = Field(
        default=None,
        max_length=512,
        description="Router image (repository:tag). Default: the operator's AUTOGLM_OPERATOR_DEFAULT_ROUTER_IMAGE.",
    )
    policy: Literal["LeastLoad", "SessionAffinity"] = Field(
        default="LeastLoad",
        description=(
            "How a model pod is picked. LeastLoad: fewest in-flight requests plus the pod's queue depth "
            "(scraped each second). SessionAffinity: consistent hashing with bounded loads on the session "
            "key: a session stays on one pod (its prefix cache) until that pod holds more than loadFactor x "
            "the mean load; every router replica picks the same pod for the same session."
        ),
    )
    session_key: str = Field(
        default="prompt",
        max_length=256,
        pattern=SESSION_KEY,
        description=(
            "Where a session id comes from: prompt (a hash of the system prompt and the first user "
            "message's text, images ignored: one agent task), user (the OpenAI `user` field), or "
            "header:<name> (that request header). A request without it falls back to prompt."
        ),
    )
    load_factor: float = Field(
        default=1.25,
        ge=1,
        le=10,
        description="SessionAffinity's bound: a pod takes a new request only while its load stays within "
        "ceil(loadFactor x mean load).",
    )
    hold_timeout: str = Field(
        default="120s",
        max_length=32,
        pattern=DURATION,
        description=(
            "How long the router holds a request while no model pod is Ready (scaled to zero, starting), a "
            "duration such as 120s or 5m; then a 503 with Retry-After. 0s: answer the 503 at once. Default 120s."
        ),
    )

    @property
    def hold_timeout_seconds(self) -> float:
        return parse_duration(self.hold_timeout)
