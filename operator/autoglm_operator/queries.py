"""PromQL over the runtime's metrics, in one place: KEDA's trigger, the Grafana dashboard (and the
canary analysis, later) build their queries here so they never drift apart.

Every series the runtime exports carries its own ``model`` (served model name) and ``revision``
labels; Prometheus adds ``namespace`` and ``pod`` (Kubernetes discovery, a PodMonitor or a
ServiceMonitor all do). The queries use only those, so they do not depend on how pod labels are
relabelled. ``selector`` values may be Grafana variables (``$namespace``) or literal values.
"""

from __future__ import annotations


def selector(namespace: str, model: str, revision: str | None = None, *, regex: bool = False) -> str:
    op = "=~" if regex else "="
    parts = [f'namespace{op}"{namespace}"', f'model{op}"{model}"']
    if revision is not None:
        parts.append(f'revision{op}"{revision}"')
    return ",".join(parts)


def queue_depth(namespace: str, model: str, revision: str) -> str:
    """A revision's waiting requests summed over its pods (KEDA divides by the per-pod target)."""
    return f"sum(autoglm_requests_waiting{{{selector(namespace, model, revision)}}}) or vector(0)"


def router_busy(namespace: str, deployment: str) -> str:
    """Requests the deployment's routers hold (no Ready pod) or proxy (in flight, streams included), all
    router pods together: above 0 the deployment must not be at zero (and a held one wakes it). The
    router labels its own series with ``deployment``."""
    sel = f'namespace="{namespace}",deployment="{deployment}"'
    return (
        f"(sum(autoglm_router_held_requests{{{sel}}}) or vector(0))"
        f" + (sum(autoglm_router_requests_in_flight{{{sel}}}) or vector(0))"
    )


def request_rate(sel: str, window: str) -> str:
    return f"sum by (revision) (rate(autoglm_requests_total{{{sel}}}[{window}]))"


def error_ratio(sel: str, window: str) -> str:
    """Failed over finished requests (server errors and timeouts; client mistakes are not the server's)."""
    return (
        f'sum by (revision) (rate(autoglm_requests_total{{{sel},status=~"error|timeout"}}[{window}]))'
        f" / sum by (revision) (rate(autoglm_requests_total{{{sel}}}[{window}]))"
    )


def latency_quantile(metric: str, q: float, sel: str, window: str) -> str:
    return f"histogram_quantile({q}, sum by (le, revision) (rate({metric}_bucket{{{sel}}}[{window}])))"


def ttft_quantile(q: float, sel: str, window: str) -> str:
    return latency_quantile("autoglm_time_to_first_token_seconds", q, sel, window)


def per_pod(gauge: str, sel: str) -> str:
    return f"sum by (pod) ({gauge}{{{sel}}})"


def mean_batch_size(sel: str, window: str) -> str:
    return (
        f"sum by (revision) (rate(autoglm_batch_size_sum{{{sel}}}[{window}]))"
        f" / sum by (revision) (rate(autoglm_batch_size_count{{{sel}}}[{window}]))"
    )


def tokens_per_second(sel: str, window: str) -> str:
    return f"sum by (revision) (rate(autoglm_generation_tokens_total{{{sel}}}[{window}]))"


def prefix_cache_hit_rate(sel: str, window: str) -> str:
    """Share of the prompt tokens looked up in the prefix cache whose KV was found there."""
    hits = f"sum by (revision) (rate(autoglm_prefix_cache_hits_total{{{sel}}}[{window}]))"
    return f"{hits} / sum by (revision) (rate(autoglm_prefix_cache_queries_total{{{sel}}}[{window}]))"


def serving_pods(sel: str) -> str:
    """Pods of each revision that Prometheus scrapes (the replicas that report)."""
    return f"count by (revision) (autoglm_requests_running{{{sel}}})"


# ---------------------------------------------------------------- the router (spec.router)
# The router's series carry no ``model``: its pods are told apart by the ``autoglm_io_router`` label (the
# resource's name; from the pod label ``autoglm.io/router``, which both scrape setups map) and ``namespace``.


def router_selector(namespace: str, router: str, *, regex: bool = False) -> str:
    op = "=~" if regex else "="
    return f'namespace{op}"{namespace}",autoglm_io_router{op}"{router}"'


def router_requests(sel: str, window: str) -> str:
    return f"sum by (revision, code) (rate(autoglm_router_requests_total{{{sel}}}[{window}]))"


def router_retries(sel: str, window: str) -> str:
    return f"sum by (reason) (rate(autoglm_router_retries_total{{{sel}}}[{window}]))"


def router_added_latency(q: float, sel: str, window: str) -> str:
    return (
        f"histogram_quantile({q}, sum by (le) (rate(autoglm_router_added_latency_seconds_bucket{{{sel}}}[{window}])))"
    )


def router_picks(sel: str, window: str) -> str:
    return f"sum by (policy) (rate(autoglm_router_picks_total{{{sel}}}[{window}]))"


def router_sessions_moved(sel: str, window: str) -> str:
    return f"sum(rate(autoglm_router_sessions_moved_by_load_total{{{sel}}}[{window}]))"


def router_held(sel: str) -> str:
    """Requests held for a Ready pod (scale to zero), all revisions: 0 while none is (the gauge's series
    appear with the first held request)."""
    return f"sum(autoglm_router_held_requests{{{sel}}}) or vector(0)"


def router_hold_time(q: float, sel: str, window: str) -> str:
    return f"histogram_quantile({q}, sum by (le) (rate(autoglm_router_hold_seconds_bucket{{{sel}}}[{window}])))"


def router_auth(sel: str, window: str) -> str:
    return f"sum by (result) (rate(autoglm_router_auth_total{{{sel}}}[{window}]))"


def router_user_requests(sel: str, window: str) -> str:
    """Verified users' requests (the 64 hashed buckets summed: the panel shows the rate, not who)."""
    return f"sum(rate(autoglm_router_user_requests_total{{{sel}}}[{window}])) or vector(0)"


def router_issuer(metric: str, sel: str) -> str:
    """The worst router pod's view of the OAuth2 issuer (reachable 0/1, keys held)."""
    return f"min({metric}{{{sel}}})"


def router_endpoints(sel: str) -> str:
    """Ready model pods each revision has, as the router pods see them (the most any router pod sees)."""
    return f"max by (revision) (autoglm_router_endpoints{{{sel}}})"


# ---------------------------------------------------------------- canary analysis (analysis.py)
# Instant queries at the check's time over the last ``window`` (e.g. "30s"). analysis.py turns the
# counts by status into the success rate (see ``analysis.success_figures``).


def requests_by_status(sel: str, window: str) -> str:
    """Finished requests of each revision and outcome (success, error, timeout, invalid, rejected, aborted)."""
    return f"sum by (revision, status) (increase(autoglm_requests_total{{{sel}}}[{window}]))"


def p99(metric: str, sel: str, window: str) -> str:
    """The 99th percentile of one of the runtime's histograms over the window, all pods together."""
    return f"histogram_quantile(0.99, sum by (le) (increase({metric}_bucket{{{sel}}}[{window}])))"


REQUEST_DURATION = "autoglm_request_duration_seconds"
TIME_TO_FIRST_TOKEN = "autoglm_time_to_first_token_seconds"
INTER_TOKEN_LATENCY = "autoglm_inter_token_latency_seconds"
