"""The rollout's memory: what the CR's status records of a rollout, as typed values.

``RolloutState`` (and the last canary check, ``Analysis``) are read from the status at the start of a
reconcile and written back from the policy's decision; nothing about a rollout is kept in memory, so
an operator killed at any point resumes from here. Revisions are hashes here, names in the status.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any, Literal

from .conditions import DEGRADED, format_time, get_condition, parse_time
from .names import revision_name

Verdict = Literal["Passed", "Failed", "Inconclusive"]


def _time(value: dt.datetime | None) -> str | None:
    return format_time(value) if value else None


@dataclasses.dataclass(frozen=True)
class Analysis:
    """One check of the canary over a window (status.lastAnalysis)."""

    time: dt.datetime
    verdict: Verdict
    reason: str
    window_seconds: float | None = None
    requests: float | None = None
    success_rate: float | None = None
    latency_p99: float | None = None
    ttft_p99: float | None = None
    inter_token_p99: float | None = None
    stable_latency_p99: float | None = None

    def to_status(self) -> dict[str, Any]:
        out = {
            "time": _time(self.time),
            "windowSeconds": self.window_seconds,
            "requests": self.requests,
            "successRate": self.success_rate,
            "latencyP99": self.latency_p99,
            "ttftP99": self.ttft_p99,
            "interTokenP99": self.inter_token_p99,
            "stableLatencyP99": self.stable_latency_p99,
            "verdict": self.verdict,
            "reason": self.reason,
        }
        return {k: v for k, v in out.items() if v is not None}

    @classmethod
    def from_status(cls, st: dict[str, Any] | None) -> Analysis | None:
        if not st or not st.get("time"):
            return None
        when = parse_time(st["time"])
        assert when is not None
        return cls(
            time=when,
            verdict=st.get("verdict", "Inconclusive"),
            reason=st.get("reason", ""),
            window_seconds=st.get("windowSeconds"),
            requests=st.get("requests"),
            success_rate=st.get("successRate"),
            latency_p99=st.get("latencyP99"),
            ttft_p99=st.get("ttftP99"),
            inter_token_p99=st.get("interTokenP99"),
            stable_latency_p99=st.get("stableLatencyP99"),
        )


@dataclasses.dataclass(frozen=True)
class RolloutState:
    """What the status remembers of the rollout (revision *hashes* here; names in the status)."""

    phase: str = "Idle"
    stable: str | None = None
    stable_version: str | None = None
    canary: str | None = None
    canary_version: str | None = None
    step: int | None = None
    step_started_at: dt.datetime | None = None
    step_ready_at: dt.datetime | None = None
    failed_checks: int = 0
    last_analysis: Analysis | None = None
    previous_stable: str | None = None
    previous_stable_version: str | None = None
    rolled_back: str | None = None
    rollback_message: str = ""

    @classmethod
    def from_status(cls, cr_name: str, st: dict[str, Any]) -> RolloutState:
        def rev(key: str) -> str | None:
            value = st.get(key)
            return value.removeprefix(f"{cr_name}-") if value else None

        degraded = get_condition(st.get("conditions"), DEGRADED) or {}
        rolled_back_msg = degraded.get("message", "") if degraded.get("reason") == "RolledBack" else ""
        return cls(
            phase=st.get("rolloutPhase") or "Idle",
            stable=rev("stableRevision"),
            stable_version=st.get("stableVersion"),
            canary=rev("canaryRevision"),
            canary_version=st.get("canaryVersion"),
            step=st.get("currentStep"),
            step_started_at=parse_time(st.get("stepStartedAt")),
            step_ready_at=parse_time(st.get("stepReadyAt")),
            failed_checks=int(st.get("failedChecks") or 0),
            last_analysis=Analysis.from_status(st.get("lastAnalysis")),
            previous_stable=rev("previousStableRevision"),
            previous_stable_version=st.get("previousStableVersion"),
            rolled_back=rev("rolledBackRevision"),
            rollback_message=rolled_back_msg,
        )

    def to_status(self, cr_name: str) -> dict[str, Any]:
        """The status fields this state owns (``None`` = remove)."""

        def name(h: str | None) -> str | None:
            return revision_name(cr_name, h) if h else None

        return {
            "rolloutPhase": self.phase,
            "currentStep": self.step,
            "stepStartedAt": _time(self.step_started_at),
            "stepReadyAt": _time(self.step_ready_at),
            "failedChecks": self.failed_checks if self.canary else None,
            "lastAnalysis": self.last_analysis.to_status() if self.last_analysis else None,
            "previousStableRevision": name(self.previous_stable),
            "previousStableVersion": self.previous_stable_version,
            "rolledBackRevision": name(self.rolled_back),
        }
