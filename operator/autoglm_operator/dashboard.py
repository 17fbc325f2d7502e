"""The Grafana dashboard for model endpoints, built from ``queries`` (the chart ships its JSON:
``charts/autoglm/dashboards/autoglm-endpoints.json``; regenerate with ``make dashboard``)."""

from __future__ import annotations

import json
from typing import Any

from . import queries as q

SEL = q.selector("$namespace", "$model", regex=True)
WINDOW = "$__rate_interval"

# (title, unit, [(legend, expr)]) in reading order: traffic, latency, queue, capacity.
PANELS: list[tuple[str, str, list[tuple[str, str]]]] = [
    ("Requests per second by revision", "reqps", [("{{revision}}", q.request_rate(SEL, WINDOW))]),
    ("Error ratio by revision", "percentunit", [("{{revision}}", q.error_ratio(SEL, WINDOW))]),
    (
        "Time to first token",
        "s",
        [(f"p{int(p * 100)} {{{{revision}}}}", q.ttft_quantile(p, SEL, WINDOW)) for p in (0.5, 0.9, 0.99)],
    ),
    (
        "Inter-token latency",
        "s",
        [
            (
                f"p{int(p * 100)} {{{{revision}}}}",
                q.latency_quantile("autoglm_inter_token_latency_seconds", p, SEL, WINDOW),
            )
            for p in (0.5, 0.9, 0.99)
        ],
    ),
    (
        "End-to-end request duration",
        "s",
        [
            (
                f"p{int(p * 100)} {{{{revision}}}}",
                q.latency_quantile("autoglm_request_duration_seconds", p, SEL, WINDOW),
            )
            for p in (0.5, 0.9, 0.99)
        ],
    ),
    ("Requests waiting per pod (queue depth)", "short", [("{{pod}}", q.per_pod("autoglm_requests_waiting", SEL))]),
    ("Requests running per pod", "short", [("{{pod}}", q.per_pod("autoglm_requests_running", SEL))]),
    ("Mean batch size", "short", [("{{revision}}", q.mean_batch_size(SEL, WINDOW))]),
    ("KV cache usage per pod", "percentunit", [("{{pod}}", q.per_pod("autoglm_kv_cache_usage_ratio", SEL))]),
    ("Prefix cache hit rate (prompt tokens)", "percentunit", [("{{revision}}", q.prefix_cache_hit_rate(SEL, WINDOW))]),
    ("Generated tokens per second", "short", [("{{revision}}", q.tokens_per_second(SEL, WINDOW))]),
    ("Serving pods by revision", "short", [("{{revision}}", q.serving_pods(SEL))]),
]

# The router's panels (spec.router), below the model pods': selected by namespace and router name.
ROUTER_SEL = q.router_selector("$namespace", "$router", regex=True)
ROUTER_PANELS: list[tuple[str, str, list[tuple[str, str]]]] = [
    (
        "Router: requests per second by revision and code",
        "reqps",
        [("{{revision}} {{code}}", q.router_requests(ROUTER_SEL, WINDOW))],
    ),
    ("Router: retries per second by reason", "reqps", [("{{reason}}", q.router_retries(ROUTER_SEL, WINDOW))]),
    (
        "Router: time added before the response starts",
        "s",
        [(f"p{int(p * 100)}", q.router_added_latency(p, ROUTER_SEL, WINDOW)) for p in (0.5, 0.99)],
    ),
    (
        "Router: picks by policy and sessions moved by load",
        "ops",
        [
            ("{{policy}}", q.router_picks(ROUTER_SEL, WINDOW)),
            ("sessions moved by load", q.router_sessions_moved(ROUTER_SEL, WINDOW)),
        ],
    ),
    (
        "Router: requests in flight per router pod",
        "short",
        [("{{pod}}", q.per_pod("autoglm_router_requests_in_flight", ROUTER_SEL))],
    ),
    ("Router: Ready model pods by revision", "short", [("{{revision}}", q.router_endpoints(ROUTER_SEL))]),
    (
        "Router: requests held for a Ready pod (scale to zero)",
        "short",
        [("held", q.router_held(ROUTER_SEL))],
    ),
    (
        "Router: time held before a Ready pod took the request",
        "s",
        [(f"p{int(p * 100)}", q.router_hold_time(p, ROUTER_SEL, WINDOW)) for p in (0.5, 0.99)],
    ),
    (
        "Router: OAuth2 token checks per second by result",
        "reqps",
        [
            ("{{result}}", q.router_auth(ROUTER_SEL, WINDOW)),
            ("verified users' requests", q.router_user_requests(ROUTER_SEL, WINDOW)),
        ],
    ),
    (
        "Router: OAuth2 issuer reachable and keys held (worst router pod)",
        "short",
        [
            ("reachable", q.router_issuer("autoglm_router_oauth2_issuer_reachable", ROUTER_SEL)),
            ("keys", q.router_issuer("autoglm_router_oauth2_keys", ROUTER_SEL)),
        ],
    ),
]


def _variable(name: str, label: str, query: str) -> dict[str, Any]:
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "query": {"query": query, "refId": name},
        "definition": query,
        "refresh": 2,
        "includeAll": True,
        "multi": True,
        "current": {},
        "sort": 1,
    }


def build() -> dict[str, Any]:
    panels = []
    for i, (title, unit, targets) in enumerate(PANELS + ROUTER_PANELS):
        panels.append(
            {
                "id": i + 1,
                "type": "timeseries",
                "title": title,
                "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": 8 * (i // 2)},
                "datasource": {"type": "prometheus", "uid": "${datasource}"},
                "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
                "targets": [
                    {"refId": chr(ord("A") + j), "expr": expr, "legendFormat": legend}
                    for j, (legend, expr) in enumerate(targets)
                ],
            }
        )
    return {
        "title": "autoglm: model endpoints",
        "uid": "autoglm-endpoints",
        "schemaVersion": 39,
        "version": 1,
        "tags": ["autoglm", "llm"],
        "time": {"from": "now-1h", "to": "now"},
        "refresh": "30s",
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Prometheus",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {},
                },
                _variable("namespace", "Namespace", "label_values(autoglm_requests_running, namespace)"),
                _variable("model", "Model", 'label_values(autoglm_requests_running{namespace=~"$namespace"}, model)'),
                _variable(
                    "router",
                    "Router",
                    'label_values(autoglm_router_requests_in_flight{namespace=~"$namespace"}, autoglm_io_router)',
                ),
            ]
        },
        "panels": panels,
    }


def render() -> str:
    return json.dumps(build(), indent=2, sort_keys=True) + "\n"


def expressions(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, PromQL) for every target of a dashboard JSON."""
    return [(p["title"], t["expr"]) for p in dashboard["panels"] for t in p.get("targets", [])]
