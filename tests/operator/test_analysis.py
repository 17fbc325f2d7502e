"""Canary analysis: the verdict from figures (pure), and measuring through a Prometheus HTTP API.

A small aiohttp server stands in for Prometheus's /api/v1/query: it answers each query from a table
keyed by the metric and revision it asks for, so the test checks which PromQL is sent for what.
"""

from __future__ import annotations

import asyncio
import datetime as dt

import pytest
from aiohttp import web

from autoglm_operator import queries
from autoglm_operator.analysis import Measurement, analyse_if_due, judge, measure
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


async def fake_prometheus(answers: dict[tuple[str, str], float | None], seen: list[str], canary: list[str]):
    """Answers ``(role, metric)`` from ``answers``; the role is canary for a revision listed in ``canary``."""

    async def query(request: web.Request) -> web.Response:
        promql = request.query["query"]
        seen.append(promql)
        revision = "canary" if any(f'revision="{h}"' in promql for h in canary) else "stable"
        metric = next((m for m in ("request_duration", "time_to_first", "inter_token", "status=\"success\"")
                       if m in promql), "requests")
        value = answers.get((revision, metric))
        result = [] if value is None else [{"metric": {}, "value": [float(request.query["time"]), str(value)]}]
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
    answers = {("canary", "requests"): 40.0, ("canary", 'status="success"'): 0.975,
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
    sel = queries.selector("demo", "tiny", "ccc")
    assert queries.served_requests(sel, "30s") in seen
    assert all("[30s]" in q for q in seen)
    verdict = judge(m, ANALYSIS, NOW)
    assert verdict.verdict == "Failed" and "success rate 0.975 < 0.99" in verdict.reason
    assert "latency p99 0.8s > 1.5 x stable's 0.4s" in verdict.reason


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
    answers = {("canary", "requests"): 50.0, ("canary", 'status="success"'): 0.5}
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
