"""Canary analysis: the verdict from figures (pure), and measuring through a Prometheus HTTP API.

A small aiohttp server stands in for Prometheus's /api/v1/query: it answers each query from a table
keyed by the metric and revision it asks for, so the test checks which PromQL is sent for what.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import re
from typing import Any

import pytest
from aiohttp import web

from autoglm_operator import queries
from autoglm_operator.analysis import Measurement, analyse_if_due, judge, measure, success_figures
from autoglm_operator.rollout_state import RolloutState
from tests.operator.fakes import FakeKube
from tests.operator.test_builders import resolved
from tests.operator.test_reconcile import NS, cr, deployments, edit, make, run
from tests.operator.test_reconcile import SPEC as BASE

NOW = dt.datetime(2026, 1, 1, 12, 0, 30, tzinfo=dt.UTC)
START = NOW - dt.timedelta(seconds=30)
SPEC = {"model": {"name": "tiny", "uri": "hf://a/b"}, "replicas": 2,
        "rollout": {"analysis": {"prometheus": {"address": "http://unused:9090"}, "minRequests": 20,
                                 "successRateMin": 0.99, "latencyP99MaxSeconds": 2.0, "ttftP99MaxSeconds": 1.0,
                                 "interTokenP99MaxSeconds": 0.1, "maxRatioToStable": 1.5}}}
ANALYSIS = resolved("chat", SPEC).spec.rollout.analysis


def good(**kw) -> Measurement:
    base = dict(window_seconds=30, requests=40, success_rate=1.0, latency_p99=0.5, ttft_p99=0.2, inter_token_p99=0.02,
                stable_latency_p99=0.45, stable_ttft_p99=0.2, stable_inter_token_p99=0.02)
    return Measurement(**{**base, **kw})


@pytest.mark.parametrize("m,verdict,words", [
    (good(), "Passed", ["40 requests in 30s", "latency p99 0.5s"]),
    (good(requests=12), "Inconclusive", ["12 canary requests", "fewer than minRequests 20"]),
    (good(requests=None), "Inconclusive", ["0 canary requests"]),
    (Measurement(30, error="Prometheus at http://x did not answer: timeout"), "Inconclusive", ["did not answer"]),
    (good(success_rate=0.95), "Failed", ["success rate 0.95 < 0.99"]),
    (good(success_rate=0.6, refused=35), "Failed",
     ["success rate 0.6 < 0.99 (35 refused as invalid beyond the stable's share)"]),
    (good(latency_p99=2.5, stable_latency_p99=2.4), "Failed", ["latency p99 2.5s > 2.0s"]),
    (good(ttft_p99=1.2, stable_ttft_p99=1.0), "Failed", ["TTFT p99 1.2s > 1.0s"]),
    (good(inter_token_p99=0.2, stable_inter_token_p99=0.15), "Failed", ["inter-token p99 0.2s > 0.1s"]),
    (good(latency_p99=1.0, stable_latency_p99=0.5), "Failed", ["latency p99 1s > 1.5 x stable's 0.5s"]),
    (good(latency_p99=1.0, stable_latency_p99=None), "Passed", []),  # no stable traffic: no ratio
])
def test_judge(m: Measurement, verdict: str, words: list[str]) -> None:
    a = judge(m, ANALYSIS, NOW)
    assert a.verdict == verdict, a.reason
    for w in words:
        assert w in a.reason, a.reason
    assert a.time == NOW and a.requests == m.requests


async def fake_prometheus(answers: dict[tuple[str, str], Any], seen: list[str], canary: list[str]):
    """Answers from ``answers``: ``(role, "counts")`` = {status: count} for the by-status query, ``(role,
    metric)`` = a p99; the role is canary for a revision hash listed in ``canary``, else stable."""

    def role(revision: str) -> str:
        return "canary" if revision in canary else "stable"

    async def query(request: web.Request) -> web.Response:
        promql, at = request.query["query"], float(request.query["time"])
        seen.append(promql)
        result = []
        if "by (revision, status)" in promql:
            for revision in re.search(r'revision=~"([^"]+)"', promql)[1].split("|"):  # type: ignore[index]
                for status, n in (answers.get((role(revision), "counts")) or {}).items():
                    result.append({"metric": {"revision": revision, "status": status}, "value": [at, str(n)]})
        else:
            revision = re.search(r'revision="([^"]+)"', promql)[1]  # type: ignore[index]
            metric = next(m for m in ("request_duration", "time_to_first", "inter_token") if m in promql)
            value = answers.get((role(revision), metric))
            result = [] if value is None else [{"metric": {}, "value": [at, str(value)]}]
        return web.json_response({"status": "success", "data": {"resultType": "vector", "result": result}})

    app = web.Application()
    app.router.add_get("/api/v1/query", query)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}"


async def test_measure_asks_for_the_canary_and_the_stable_over_the_window() -> None:
    seen: list[str] = []
    answers = {("canary", "counts"): {"success": 39, "error": 1, "rejected": 7, "aborted": 2},
               ("stable", "counts"): {"success": 100},
               ("canary", "request_duration"): 0.8, ("canary", "time_to_first"): 0.3, ("canary", "inter_token"): 0.05,
               ("stable", "request_duration"): 0.4}
    runner, url = await fake_prometheus(answers, seen, ["ccc"])
    try:
        m = await measure(url, resolved("chat", SPEC), "ccc", "sss", START, NOW)
    finally:
        await runner.cleanup()
    assert m.error == ""
    assert (m.requests, m.success_rate, m.latency_p99, m.ttft_p99, m.inter_token_p99) == (40, 0.975, 0.8, 0.3, 0.05)
    assert m.stable_latency_p99 == 0.4 and m.stable_ttft_p99 is None
    both = queries.selector("demo", "tiny", "ccc|sss", regex=True)
    assert queries.requests_by_status(both, "30s") in seen
    assert all("[30s]" in q for q in seen)
    verdict = judge(m, ANALYSIS, NOW)
    assert verdict.verdict == "Failed" and "success rate 0.975 < 0.99" in verdict.reason
    assert "latency p99 0.8s > 1.5 x stable's 0.4s" in verdict.reason


@pytest.mark.parametrize("canary,stable,want", [
    ({"success": 90, "error": 10}, {"success": 100}, (100, 0.9, 0)),
    # A request that ran past the runtime's deadline (504) failed as an error did.
    ({"success": 90, "error": 5, "timeout": 5}, {"success": 100}, (100, 0.9, 0)),
    # Client mistakes at the stable's own rate are not the canary's failures...
    ({"success": 90, "invalid": 10}, {"success": 90, "invalid": 10}, (100, 1.0, 0)),
    # ...refusing what the stable serves (a maxModelLen too small) is.
    ({"success": 60, "invalid": 40}, {"success": 95, "invalid": 5}, (100, 60 / 95, 35)),
    # Load shedding and disconnects never count; nothing answered: no rate.
    ({"rejected": 5, "aborted": 3}, {}, (0, None, 0)),
])
def test_success_figures(canary, stable, want) -> None:
    requests, rate, refused = success_figures(canary, stable)
    assert requests == want[0] and refused == pytest.approx(want[2])
    assert rate == (None if want[1] is None else pytest.approx(want[1]))


async def test_unreachable_prometheus_is_inconclusive_never_a_pass() -> None:
    m = await measure("http://127.0.0.1:9", resolved("chat", SPEC), "ccc", "sss", START, NOW)
    assert m.error.startswith("Prometheus at http://127.0.0.1:9 did not answer")
    assert judge(m, ANALYSIS, NOW).verdict == "Inconclusive"


async def test_analyse_if_due_only_when_the_interval_passed_and_without_address_says_why() -> None:
    spec = {**SPEC, "rollout": {"analysis": {"interval": "30s"}}}
    state = RolloutState(phase="Progressing", stable="sss", canary="ccc", step=0, step_started_at=START,
                         step_ready_at=START)
    r = resolved("chat", spec)
    assert await analyse_if_due(r, state, "ccc", NOW - dt.timedelta(seconds=1), None) is None
    a = await analyse_if_due(r, state, "ccc", NOW, None)
    assert a is not None and a.verdict == "Inconclusive"
    assert "AUTOGLM_OPERATOR_PROMETHEUS_ADDRESS" in a.reason


async def test_reconcile_records_each_check_and_rolls_back_after_failure_threshold() -> None:
    """Through reconcile: checks every interval (1 s here), written to status; 2 failures roll back."""
    seen: list[str] = []
    answers = {("canary", "counts"): {"success": 25, "error": 25}, ("stable", "counts"): {"success": 100}}
    canary: list[str] = []
    runner, url = await fake_prometheus(answers, seen, canary)
    try:
        kube = FakeKube()
        analysis = {"prometheus": {"address": url}, "interval": "1s", "minRequests": 20, "failureThreshold": 2}
        make(kube, {**BASE, "rollout": {"steps": [{"weight": 50}], "analysis": analysis}})
        await run(kube)
        [old] = deployments(kube)
        kube.settle(NS, old)
        await run(kube)
        edit(kube, lambda s: s["runtime"].update(version="0.2.0"))
        await run(kube)
        [new] = [d for d in deployments(kube) if d != old]
        canary.append(new.rsplit("-", 1)[1])
        kube.settle(NS, new)
        out = await run(kube)  # Ready at its weight: the first window starts now
        assert cr(kube)["status"].get("stepReadyAt") and not seen
        assert out.requeue_after is not None and out.requeue_after <= 1.0
        await asyncio.sleep(1.1)
        await run(kube)
        st = cr(kube)["status"]
        assert st["lastAnalysis"]["verdict"] == "Failed" and st["failedChecks"] == 1
        assert st["lastAnalysis"]["successRate"] == 0.5 and st["lastAnalysis"]["requests"] == 50
        degraded = next(c for c in st["conditions"] if c["type"] == "Degraded")
        assert degraded["reason"] == "AnalysisFailed" and "success rate 0.5 < 0.99" in degraded["message"]
        checks = len(seen)
        await run(kube)  # not due again yet: no query, no double count
        assert len(seen) == checks
        await asyncio.sleep(1.1)
        await run(kube)
        st = cr(kube)["status"]
        assert deployments(kube) == [old] and st["rolloutPhase"] == "RolledBack"
        degraded = next(c for c in st["conditions"] if c["type"] == "Degraded")
        assert degraded["reason"] == "RolledBack" and "2 failed checks in a row" in degraded["message"]
        assert "success rate 0.5 < 0.99" in degraded["message"]
        assert {"AnalysisFailed", "RolledBack"} <= {e[1] for e in kube.events}
        await run(kube)  # stays rolled back: the spec's revision is not created again
        assert deployments(kube) == [old]
    finally:
        await runner.cleanup()
