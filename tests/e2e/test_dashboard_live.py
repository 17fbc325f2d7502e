"""Every panel of the shipped Grafana dashboard (the router's included) returns data from the local
cluster's Prometheus while real load runs through a model endpoint's router."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from autoglm_operator import dashboard
from tests.e2e.test_runtime_pods import Load, service_ip, tiny
from tests.helpers import wait_for
from tests.operator.test_operator_cluster import (  # noqa: F401 - fixtures
    apply, crd, op_env, operator, status, wait_phase,
)

pytestmark = [pytest.mark.cluster, pytest.mark.runtime]
SHIPPED = Path(__file__).resolve().parents[2] / "charts" / "autoglm" / "dashboards" / "autoglm-endpoints.json"


def concrete(expr: str, namespace: str, model: str, router: str) -> str:
    """The panel's PromQL as Grafana would send it for one namespace, model and router."""
    return (expr.replace("$namespace", namespace).replace("$model", model).replace("$router", router)
            .replace("$__rate_interval", "30s"))


# Panels with data only under spec.auth.oauth2 (token checks by result): test_router_oauth2 checks them.
OAUTH2_PANELS = "Router: OAuth2"


def panels_return_data(kube, namespace: str, name: str, *, oauth2: bool) -> None:
    """Every panel of the shipped dashboard (``oauth2``: only the OAuth2 ones, else all the others) has
    data from the cluster's Prometheus for this resource (its model pods and its router)."""
    for title, expr in dashboard.expressions(json.loads(SHIPPED.read_text())):
        if title.startswith(OAUTH2_PANELS) != oauth2:
            continue
        promql = concrete(expr, namespace, name, name)
        wait_for(lambda: kube.prometheus_query(promql), timeout=30, interval=1.0,
                 message=f"data for panel {title!r}: {promql}")


def test_every_dashboard_panel_returns_live_data(kube, namespace, operator, node_models):
    """With the router on (its panels too): the load goes through the router pod to the model pod."""
    apply(kube, namespace, tiny(router={"enabled": True, "replicas": 1}))
    wait_phase(kube, namespace, "tiny", "Healthy", timeout=180)
    wait_for(lambda: (status(kube, namespace, "tiny").get("router") or {}).get("serving"),
             timeout=120, message="the Service on the router, a model pod behind it")
    with Load(f"http://{service_ip(kube, namespace, 'tiny')}:8000/v1", "tiny", n=8, max_tokens=24) as load:
        wait_for(lambda: load.ok >= 16, timeout=60, message="load running")
        panels_return_data(kube, namespace, "tiny", oauth2=False)
    assert load.failed == []
