"""Prometheus metrics of one server, in a per-app ``CollectorRegistry`` (no global state).

Names follow vLLM's (``vllm:num_requests_running`` → ``autoglm_requests_running`` ...). Every series
carries ``model`` and ``revision`` labels. Gauges are read from the engine at scrape time by a collector
that yields only the current labels, so after a reload to a new revision the old revision's gauge
series are gone (not frozen at their last value, which an autoscaler would read as a queue).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

LABELS = ("model", "revision")

_LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
_ITL_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.015,
    0.02,
    0.025,
    0.03,
    0.04,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
)
_E2E_BUCKETS = (
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
)
_BATCH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)

REQUEST_STATUSES = ("success", "error", "timeout", "aborted", "rejected", "invalid")

CONTENT_TYPE = CONTENT_TYPE_LATEST


class RuntimeMetrics:
    """All metrics of one server. ``model``/``revision`` are label values and may change on reload."""

    def __init__(self, model: str, revision: str, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        self.model = model
        self.revision = revision
        r = self.registry
        self.ttft = Histogram(
            "autoglm_time_to_first_token_seconds",
            "Arrival to first generated token.",
            LABELS,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "autoglm_inter_token_latency_seconds",
            "Time between generated tokens of a request.",
            LABELS,
            buckets=_ITL_BUCKETS,
            registry=r,
        )
        self.duration = Histogram(
            "autoglm_request_duration_seconds",
            "Arrival to last token (end to end).",
            LABELS,
            buckets=_E2E_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "autoglm_batch_size", "Sequences per engine step.", LABELS, buckets=_BATCH_BUCKETS, registry=r
        )
        self.step_prefill_tokens = Histogram(
            "autoglm_step_prefill_tokens",
            "Prompt tokens processed per engine step.",
            LABELS,
            buckets=(0, 1, 16, 64, 128, 256, 512, 1024, 2048, 4096, 8192),
            registry=r,
        )
        self.step_seconds = Histogram(
            "autoglm_step_duration_seconds", "Duration of one engine step.", LABELS, buckets=_ITL_BUCKETS, registry=r
        )
        self.requests_total = Counter(
            "autoglm_requests", "Finished requests by outcome.", (*LABELS, "status"), registry=r
        )
        self.prompt_tokens = Counter("autoglm_prompt_tokens", "Prompt tokens of admitted requests.", LABELS, registry=r)
        self.generation_tokens = Counter("autoglm_generation_tokens", "Generated tokens.", LABELS, registry=r)
        self.reloads_total = Counter(
            "autoglm_reloads", "Model hot reloads by outcome.", (*LABELS, "status"), registry=r
        )
        self._stats: Callable[[], Any] | None = None
        r.register(_EngineGauges(self))
        self._init_series()

    def _init_series(self) -> None:
        """Create the labelled series so they exist (at 0) from the first scrape."""
        lv = self.labels
        for status in REQUEST_STATUSES:
            self.requests_total.labels(*lv, status)
        for m in (self.ttft, self.itl, self.duration, self.batch_size, self.prompt_tokens, self.generation_tokens):
            m.labels(*lv)

    @property
    def labels(self) -> tuple[str, str]:
        return (self.model, self.revision)

    def set_labels(self, model: str | None = None, revision: str | None = None) -> None:
        self.model = model or self.model
        self.revision = revision or self.revision
        self._init_series()

    def bind_stats(self, stats: Callable[[], Any]) -> None:
        """``stats()`` is read at every scrape: an object with ``num_running``, ``num_waiting`` and
        ``kv_cache_usage`` (the engine's ``EngineStats``)."""
        self._stats = stats

    # ---- hooks -----------------------------------------------------------------
    def on_step(self, step: Any, num_prefill_tokens: int | None = None, step_seconds: float | None = None) -> None:
        """The engine's per-step callback: a ``StepStats`` object, or ``(batch_size, prefill, seconds)``."""
        if num_prefill_tokens is None:
            batch_size, num_prefill_tokens, step_seconds = step.batch_size, step.num_prefill_tokens, step.step_seconds
        else:
            batch_size = step
        lv = self.labels
        self.batch_size.labels(*lv).observe(batch_size)
        self.step_prefill_tokens.labels(*lv).observe(num_prefill_tokens)
        self.step_seconds.labels(*lv).observe(step_seconds or 0.0)

    def request_finished(self, status: str) -> None:
        self.requests_total.labels(*self.labels, status).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineGauges(Collector):
    """The engine's gauges, read at scrape time, under the labels of now only."""

    def __init__(self, metrics: RuntimeMetrics) -> None:
        self.metrics = metrics

    def describe(self) -> list[Metric]:
        return list(self._families(None))

    def collect(self) -> Iterator[Metric]:
        stats = None
        if self.metrics._stats is not None:
            try:
                stats = self.metrics._stats()
            except Exception:  # noqa: BLE001 - a dead engine must not break /metrics
                stats = None
        return self._families(stats)

    def _families(self, stats: Any) -> Iterator[Metric]:
        lv = list(self.metrics.labels)
        for name, doc, attr in (
            ("autoglm_requests_running", "Requests in the running batch.", "num_running"),
            ("autoglm_requests_waiting", "Requests waiting to be scheduled.", "num_waiting"),
            ("autoglm_kv_cache_usage_ratio", "Fraction of the KV cache in use (0-1).", "kv_cache_usage"),
            ("autoglm_kv_cache_blocks_used", "KV cache blocks held by sequences.", "kv_blocks_used"),
            ("autoglm_kv_cache_blocks_capacity", "KV cache blocks of the pool.", "kv_blocks_total"),
        ):
            family = GaugeMetricFamily(name, doc, labels=LABELS)
            family.add_metric(lv, float(getattr(stats, attr, 0) if stats is not None else 0))
            yield family
        for name, doc, attr in (
            ("autoglm_prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", "prefix_cache_queries"),
            ("autoglm_prefix_cache_hits", "Prompt tokens whose KV came from the prefix cache.", "prefix_cache_hits"),
            ("autoglm_preemptions", "Sequences sent back to the queue for lack of KV blocks.", "num_preemptions"),
        ):
            counter = CounterMetricFamily(name, doc, labels=LABELS)
            counter.add_metric(lv, float(getattr(stats, attr, 0) if stats is not None else 0))
            yield counter


class RequestTimer:
    """Per-request latency bookkeeping: TTFT, inter-token latency, end to end."""

    __slots__ = ("metrics", "labels", "arrival", "first", "last")

    def __init__(self, metrics: RuntimeMetrics, arrival: float) -> None:
        self.metrics = metrics
        self.labels = metrics.labels
        self.arrival = arrival
        self.first: float | None = None
        self.last: float | None = None

    def tokens(self, now: float, count: int) -> None:
        if count <= 0:
            return
        if self.first is None:
            self.first = now
            self.metrics.ttft.labels(*self.labels).observe(now - self.arrival)
            count -= 1
        elif self.last is not None and count > 0:
            gap = (now - self.last) / count
            for _ in range(count):
                self.metrics.itl.labels(*self.labels).observe(gap)
        self.last = now

    def done(self, now: float, prompt_tokens: int, completion_tokens: int, status: str) -> None:
        lv = self.labels
        if status == "success":
            self.metrics.duration.labels(*lv).observe(now - self.arrival)
        self.metrics.prompt_tokens.labels(*lv).inc(prompt_tokens)
        self.metrics.generation_tokens.labels(*lv).inc(completion_tokens)
        self.metrics.requests_total.labels(*lv, status).inc()
