"""The Grafana dashboard: generated from the one module of queries, and what the chart ships."""

from __future__ import annotations

import json
from pathlib import Path

from autoglm_operator import builders as b
from autoglm_operator import dashboard, queries
from tests.operator.test_builders import SPECS, cr_for, resolved

SHIPPED = Path(__file__).resolve().parents[2] / "charts" / "autoglm" / "dashboards" / "autoglm-endpoints.json"


def test_the_chart_ships_the_generated_dashboard() -> None:
    assert SHIPPED.read_text() == dashboard.render(), "run `make dashboard` and commit the result"


def test_every_panel_queries_the_runtime_by_namespace_and_model() -> None:
    exprs = dashboard.expressions(json.loads(SHIPPED.read_text()))
    assert len(exprs) >= 15
    for title, expr in exprs:
        if title.startswith("Router: "):  # the router's series have no model: its name picks them
            assert 'namespace=~"$namespace"' in expr and 'autoglm_io_router=~"$router"' in expr, title
        else:
            assert 'namespace=~"$namespace"' in expr and 'model=~"$model"' in expr, title


def test_the_router_panels_cover_every_router_metric() -> None:
    """One panel at least per metric the router exports (its registry is the source of the names)."""
    from autoglm_router.metrics import RouterMetrics

    names = {c._name for c in RouterMetrics().collectors()}  # counters' names without _total
    exprs = " ".join(e for t, e in dashboard.expressions(dashboard.build()) if t.startswith("Router: "))
    assert names and all(n in exprs for n in names), sorted(n for n in names if n not in exprs)
    variables = {v["name"]: v for v in dashboard.build()["templating"]["list"]}
    assert "autoglm_io_router" in variables["router"]["query"]["query"]


def test_keda_and_the_dashboard_share_the_queue_depth_metric() -> None:
    spec = SPECS["keda-cpu"]
    so = b.build_scaled_object(cr_for("keda-cpu", spec), resolved("keda-cpu", spec), "abc", "http://p:9090")
    assert so["spec"]["triggers"][0]["metadata"]["query"] == queries.queue_depth("demo", "tiny", "abc")
    assert any("autoglm_requests_waiting" in e for _, e in dashboard.expressions(dashboard.build()))
