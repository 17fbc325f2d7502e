"""metav1.Condition helpers: ``lastTransitionTime`` changes only when ``status`` flips."""

from __future__ import annotations

import datetime as dt
from typing import Any

READY = "Ready"
PROGRESSING = "Progressing"
DEGRADED = "Degraded"
ORDER = (READY, PROGRESSING, DEGRADED)


def format_time(value: dt.datetime) -> str:
    """A metav1.Time: RFC 3339 in UTC, whole seconds (``2026-01-01T00:00:00Z``)."""
    return value.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def format_micro_time(value: dt.datetime) -> str:
    """A metav1.MicroTime (Lease renew/acquire times): RFC 3339 in UTC with microseconds."""
    return value.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(value: str | None) -> dt.datetime | None:
    """A metav1.Time or MicroTime as an aware datetime (``None`` stays ``None``)."""
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00")) if value else None


def now_rfc3339() -> str:
    return format_time(dt.datetime.now(dt.UTC))


def get_condition(conditions: list[dict[str, Any]] | None, type_: str) -> dict[str, Any] | None:
    for c in conditions or []:
        if c.get("type") == type_:
            return c
    return None


def set_condition(
    conditions: list[dict[str, Any]] | None,
    type_: str,
    status: bool | str,
    reason: str,
    message: str = "",
    *,
    observed_generation: int | None = None,
    now: str | None = None,
) -> list[dict[str, Any]]:
    """Return a new list with condition ``type_`` set (input untouched).

    ``lastTransitionTime`` is kept from the existing condition unless its status flips (or it has
    none); reason, message and observedGeneration are always updated. Order: Ready, Progressing,
    Degraded, then any others in their existing order.
    """
    status_s = status if isinstance(status, str) else ("True" if status else "False")
    existing = get_condition(conditions, type_)
    if existing is not None and existing.get("status") == status_s and existing.get("lastTransitionTime"):
        ltt = existing["lastTransitionTime"]
    else:
        ltt = now or now_rfc3339()
    new = {"type": type_, "status": status_s, "reason": reason, "message": message, "lastTransitionTime": ltt}
    if observed_generation is not None:
        new["observedGeneration"] = observed_generation
    others = [dict(c) for c in conditions or [] if c.get("type") != type_]
    merged = others + [new]
    rank = {t: i for i, t in enumerate(ORDER)}
    return sorted(merged, key=lambda c: rank.get(c.get("type", ""), len(ORDER)))
