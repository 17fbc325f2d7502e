"""Canary analysis: measure the canary (and the stable) in Prometheus over a window, then judge.

``measure`` is the I/O (the Prometheus HTTP API, ``/api/v1/query``, async with a timeout; the
queries come from queries.py); ``judge`` is pure. Anything that keeps a check from measuring
(Prometheus unreachable, too few requests) is ``Inconclusive``, never a pass.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import math
from typing import Any

import aiohttp

from . import queries
from .models import AnalysisSpec, ResolvedSpec
from .policy import analysis_window
from .rollout_state import Analysis, RolloutState

TIMEOUT_SECONDS = 5.0


@dataclasses.dataclass(frozen=True)
class Measurement:
    window_seconds: float
    requests: float | None = None  # canary requests answered (success, error, invalid)
    success_rate: float | None = None
    latency_p99: float | None = None
    ttft_p99: float | None = None
    inter_token_p99: float | None = None
    stable_latency_p99: float | None = None
    stable_ttft_p99: float | None = None
    stable_inter_token_p99: float | None = None
    refused: float = 0.0  # canary requests refused as invalid beyond the stable's share (counted as failed)
    error: str = ""  # why Prometheus could not answer


ANSWERED = ("success", "error", "timeout", "invalid")


def success_figures(canary: dict[str, float], stable: dict[str, float]) -> tuple[float, float | None, float]:
    """(requests answered, success rate, refusals counted as failures) from counts by status.

    A request counts when the server answered it: ``success``, ``error`` (a server error), ``timeout``
    (it ran past the runtime's ``--request-timeout``: a 504, failed as an error) or ``invalid`` (refused
    as the client's mistake, a 400). Refusals count as failures only beyond the stable's own share of
    them in the same window: clients' mistakes reach both revisions alike,
    while a canary refusing what the stable serves (a ``maxModelLen`` too small for the traffic) is the
    canary's fault. Load shedding (``rejected``, 429) and client disconnects (``aborted``) never count.
    """
    ok, err, timeout, invalid = (canary.get(s, 0.0) for s in ANSWERED)
    err += timeout
    answered = ok + err + invalid
    s_answered = sum(stable.get(s, 0.0) for s in ANSWERED)
    baseline = stable.get("invalid", 0.0) / s_answered if s_answered else 0.0
    refused = max(0.0, invalid - baseline * answered)
    counted = ok + err + refused
    return answered, (ok / counted if counted else None), refused


def _sample(value: str) -> float | None:
    v = float(value)
    return None if math.isnan(v) or math.isinf(v) else v


async def _query(session: aiohttp.ClientSession, address: str, promql: str, at: dt.datetime) -> list[dict[str, Any]]:
    url = address.rstrip("/") + "/api/v1/query"
    async with session.get(url, params={"query": promql, "time": f"{at.timestamp():.3f}"}) as resp:
        body: dict[str, Any] = await resp.json(content_type=None)
        if resp.status != 200 or body.get("status") != "success":
            raise RuntimeError(f"HTTP {resp.status}: {body.get('error', '')}".strip())
    return list(body["data"]["result"])


def _scalar(result: list[dict[str, Any]]) -> float | None:
    return _sample(result[0]["value"][1]) if result else None


async def measure(
    address: str, r: ResolvedSpec, canary: str, stable: str, start: dt.datetime, now: dt.datetime
) -> Measurement:
    """The canary's and the stable's figures over [start, now] (revision labels are revision hashes)."""
    seconds = max(1.0, (now - start).total_seconds())
    window = f"{math.ceil(seconds)}s"
    c_sel = queries.selector(r.namespace, r.model_name, canary)
    s_sel = queries.selector(r.namespace, r.model_name, stable)
    both = queries.selector(r.namespace, r.model_name, f"{canary}|{stable}", regex=True)
    promql = [queries.requests_by_status(both, window)] + [
        queries.p99(metric, sel, window)
        for sel in (c_sel, s_sel)
        for metric in (queries.REQUEST_DURATION, queries.TIME_TO_FIRST_TOKEN, queries.INTER_TOKEN_LATENCY)
    ]
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT_SECONDS)) as session:
            counts, *p99s = await asyncio.gather(*(_query(session, address, q, now) for q in promql))
    except (TimeoutError, aiohttp.ClientError, RuntimeError, ValueError, KeyError) as exc:
        return Measurement(seconds, error=f"Prometheus at {address} did not answer: {exc or type(exc).__name__}")
    by_revision: dict[str, dict[str, float]] = {canary: {}, stable: {}}
    for series in counts:
        labels = series.get("metric") or {}
        value = _sample(series["value"][1])
        if labels.get("revision") in by_revision and value is not None:
            by_revision[labels["revision"]][labels.get("status", "")] = value
    requests, rate, refused = success_figures(by_revision[canary], by_revision[stable])
    latency, ttft, itl, s_latency, s_ttft, s_itl = (_scalar(result) for result in p99s)
    return Measurement(seconds, requests, rate, latency, ttft, itl, s_latency, s_ttft, s_itl, refused)


def _fmt(value: float | None, unit: str = "s") -> str:
    return "none" if value is None else f"{value:.3g}{unit}"


def judge(m: Measurement, spec: AnalysisSpec, now: dt.datetime) -> Analysis:
    """Passed, Failed or Inconclusive, with the figures that decided it in the reason."""
    measured = Analysis(
        time=now,
        verdict="Inconclusive",
        reason=m.error,
        window_seconds=round(m.window_seconds, 1),
        requests=m.requests,
        success_rate=m.success_rate,
        latency_p99=m.latency_p99,
        ttft_p99=m.ttft_p99,
        inter_token_p99=m.inter_token_p99,
        stable_latency_p99=m.stable_latency_p99,
    )
    if m.error:
        return measured
    n = m.requests or 0.0
    if n < max(1, spec.min_requests):
        reason = (
            f"{n:.0f} canary requests in the last {m.window_seconds:.0f}s, fewer than minRequests "
            f"{spec.min_requests}: not enough traffic to judge"
        )
        return dataclasses.replace(measured, reason=reason)
    failures = []
    if m.success_rate is not None and m.success_rate < spec.success_rate_min:
        refused = f" ({m.refused:.0f} refused as invalid beyond the stable's share)" if m.refused >= 0.5 else ""
        failures.append(f"success rate {m.success_rate:.4g} < {spec.success_rate_min}{refused}")
    limits = (
        ("latency p99", m.latency_p99, spec.latency_p99_max_seconds, m.stable_latency_p99),
        ("TTFT p99", m.ttft_p99, spec.ttft_p99_max_seconds, m.stable_ttft_p99),
        ("inter-token p99", m.inter_token_p99, spec.inter_token_p99_max_seconds, m.stable_inter_token_p99),
    )
    for label, value, limit, stable in limits:
        if value is None:
            continue
        if limit is not None and value > limit:
            failures.append(f"{label} {_fmt(value)} > {limit}s")
        ratio = spec.max_ratio_to_stable
        if ratio is not None and stable and value > ratio * stable:
            failures.append(f"{label} {_fmt(value)} > {ratio} x stable's {_fmt(stable)}")
    summary = (
        f"{n:.0f} requests in {m.window_seconds:.0f}s, success rate {_fmt(m.success_rate, '')}, "
        f"latency p99 {_fmt(m.latency_p99)}, TTFT p99 {_fmt(m.ttft_p99)}, inter-token p99 {_fmt(m.inter_token_p99)}"
    )
    if failures:
        return dataclasses.replace(measured, verdict="Failed", reason=f"{'; '.join(failures)} ({summary})")
    return dataclasses.replace(measured, verdict="Passed", reason=summary)


async def analyse_if_due(
    r: ResolvedSpec, state: RolloutState, desired: str, now: dt.datetime, default_address: str | None
) -> Analysis | None:
    """The check of the canary when one is due (policy.analysis_window), else ``None``."""
    spec = r.spec.rollout.analysis
    start = analysis_window(r.spec.rollout, state, desired, now)
    if spec is None or start is None or state.stable is None:
        return None
    address = spec.prometheus.address or default_address
    if not address:
        m = Measurement(
            (now - start).total_seconds(),
            error=(
                "no Prometheus to ask: set spec.rollout.analysis.prometheus.address or the operator's "
                "AUTOGLM_OPERATOR_PROMETHEUS_ADDRESS"
            ),
        )
    else:
        m = await measure(address, r, desired, state.stable, start, now)
    return judge(m, spec, now)
