"""Prometheus metrics and the JSON summary.

Each app owns its `CollectorRegistry`, so several apps in one process (tests,
embedding) never clash over the global registry. Counters and histograms are
updated once per request when it completes, except the two per-token figures
(the generated-token tally behind the throughput event, and the inter-token
histogram), which cost an integer add and one pre-resolved `observe`.
Gauges that describe live state (loaded models, memory, in-flight, queue,
uptime, quarantines) are computed when scraped, by a collector callback.

Series exported (all prefixed `lmx_`):
  requests_total, errors_total, stream_requests_total, prompt_tokens_total,
  completion_tokens_total, model_requests_total{model}, model_errors_total{model},
  model_completion_tokens_total{model}, request_duration_seconds{model} (histogram),
  time_to_first_token_seconds{model}, inter_token_seconds{model} (histograms),
  worker_restarts_total{model}, worker_crashes_total{model},
  model_quarantines_total{model}, model_evictions_total{model}, client_requests_total{client},
  client_tokens_total{client}, client_errors_total{client}, events_dropped_total,
  and the scrape-time gauges loaded_models, memory_used_gb, memory_total_gb,
  memory_usage_percent, in_flight_requests, concurrent_limit, queued_requests,
  uptime_seconds, quarantined_models, model_state{model,state}, event_subscribers.
"""

from __future__ import annotations

import asyncio
import bisect
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.metrics_core import HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

# Distinct X-Client-ID values that get their own series; later ones share
# "other", so a client cannot grow the scrape without bound.
MAX_CLIENTS = 100
MAX_CLIENT_ID_LEN = 64
OTHER_CLIENT = "other"

DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
INTER_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1)


def clean_client_id(raw: str | None) -> str | None:
    """The label for an `X-Client-ID` header: printable, bounded length."""
    if not raw:
        return None
    text = "".join(ch for ch in raw.strip() if ch.isprintable())[:MAX_CLIENT_ID_LEN]
    return text or None


@dataclass
class ModelTotals:
    requests: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft_sum_sec: float = 0.0
    ttft_count: int = 0
    duration_sum_sec: float = 0.0

    def summary(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "errors": self.errors,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "avg_time_to_first_token_ms": round(1000 * self.ttft_sum_sec / self.ttft_count, 1)
            if self.ttft_count else None,
            "avg_duration_ms": round(1000 * self.duration_sum_sec / self.requests, 1)
            if self.requests else None,
        }


@dataclass
class ClientTotals:
    requests: int = 0
    tokens: int = 0
    errors: int = 0


@dataclass
class Outcome:
    """What one finished inference request contributes to the metrics."""

    model: str | None
    client: str | None
    stream: bool
    error: bool
    duration_sec: float
    ttft_sec: float | None
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Totals:
    requests: int = 0
    errors: int = 0
    stream_requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    per_model: dict[str, ModelTotals] = field(default_factory=dict)
    per_client: dict[str, ClientTotals] = field(default_factory=dict)
    worker_restarts: dict[str, int] = field(default_factory=dict)
    worker_crashes: dict[str, int] = field(default_factory=dict)
    quarantines: dict[str, int] = field(default_factory=dict)
    evictions: dict[str, int] = field(default_factory=dict)


class GapSeries:
    """One model's inter-token histogram: a bisect and two adds per token."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: list[float]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last slot is +Inf
        self.total = 0.0

    def observe(self, gap: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, gap)] += 1
        self.total += gap


class TokenGapHistogram(Collector):
    """`lmx_inter_token_seconds{model}`, observed once per generated token.
    prometheus-client's Histogram takes locks on every observation; the
    gateway runs on one event loop (scrapes included), so plain counters
    are enough and cost a fraction."""

    name = "lmx_inter_token_seconds"

    def __init__(self, buckets: Iterable[float]) -> None:
        self.bounds = sorted(float(b) for b in buckets)
        self.series: dict[str, GapSeries] = {}

    def child(self, model: str) -> GapSeries:
        series = self.series.get(model)
        if series is None:
            series = self.series[model] = GapSeries(self.bounds)
        return series

    def collect(self) -> Iterable[Metric]:
        family = HistogramMetricFamily(self.name, "Gap between consecutive generated tokens",
                                       labels=["model"])
        for model, series in sorted(self.series.items()):
            cumulative, buckets = 0, []
            for bound, count in zip([*self.bounds, float("inf")], series.counts, strict=True):
                cumulative += count
                buckets.append(("+Inf" if bound == float("inf") else repr(bound),
                                float(cumulative)))
            family.add_metric([model], buckets, series.total)
        return [family]

    def describe(self) -> Iterable[Metric]:
        return [HistogramMetricFamily(self.name, "Gap between consecutive generated tokens",
                                      labels=["model"])]


class _LiveCollector(Collector):
    """Asks the app for its live gauges at scrape time."""

    def __init__(self) -> None:
        self.source: Callable[[], Iterable[Metric]] | None = None

    def collect(self) -> Iterable[Metric]:
        return list(self.source()) if self.source is not None else []

    def describe(self) -> Iterable[Metric]:
        return []  # the families are dynamic; nothing to pre-register


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.started_monotonic = time.monotonic()
        self.totals = Totals()
        # Tokens generated since start; the throughput event diffs it.
        self.tokens_generated = 0
        # Inference requests past routing and not yet completed.
        self.active_requests = 0
        # Set when a request starts generating: wakes the throughput reporter.
        self.activity = asyncio.Event()
        self._clients: set[str] = set()
        self._live = _LiveCollector()
        r = self.registry

        def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
            return Counter(name, doc, labels, registry=r)

        self.requests = counter("lmx_requests", "Inference requests")
        self.errors = counter("lmx_errors", "Inference requests that failed")
        self.stream_requests = counter("lmx_stream_requests", "Streaming inference requests")
        self.prompt_tokens = counter("lmx_prompt_tokens", "Prompt tokens processed")
        self.completion_tokens = counter("lmx_completion_tokens", "Tokens generated")
        self.model_requests = counter("lmx_model_requests", "Requests per model", ("model",))
        self.model_errors = counter("lmx_model_errors", "Failed requests per model", ("model",))
        self.model_completion_tokens = counter(
            "lmx_model_completion_tokens", "Tokens generated per model", ("model",))
        self.worker_restarts = counter(
            "lmx_worker_restarts", "Workers restarted after a crash", ("model",))
        self.worker_crashes = counter("lmx_worker_crashes", "Worker crashes", ("model",))
        self.quarantines = counter(
            "lmx_model_quarantines", "Models quarantined after a crash loop", ("model",))
        self.evictions = counter(
            "lmx_model_evictions", "Models unloaded by the memory guard (LRU or TTL)",
            ("model",))
        self.client_requests = counter(
            "lmx_client_requests", "Requests per X-Client-ID", ("client",))
        self.client_tokens = counter(
            "lmx_client_tokens", "Prompt plus completion tokens per X-Client-ID", ("client",))
        self.client_errors = counter(
            "lmx_client_errors", "Failed requests per X-Client-ID", ("client",))
        self.duration = Histogram(
            "lmx_request_duration_seconds", "Inference request latency, start to last byte",
            ("model",), buckets=DURATION_BUCKETS, registry=r)
        self.ttft = Histogram(
            "lmx_time_to_first_token_seconds", "Request start to first generated token",
            ("model",), buckets=TTFT_BUCKETS, registry=r)
        self.inter_token = TokenGapHistogram(INTER_TOKEN_BUCKETS)
        r.register(self.inter_token)
        r.register(self._live)

    # --- wiring ----------------------------------------------------------------

    def set_live_source(self, source: Callable[[], Iterable[Metric]]) -> None:
        self._live.source = source

    @property
    def uptime_seconds(self) -> float:
        return time.monotonic() - self.started_monotonic

    def client_label(self, client_id: str | None) -> str | None:
        if client_id is None:
            return None
        if client_id in self._clients:
            return client_id
        if len(self._clients) < MAX_CLIENTS:
            self._clients.add(client_id)
            return client_id
        return OTHER_CLIENT

    # --- recording ---------------------------------------------------------------

    def on_event(self, type_: str, data: dict[str, Any]) -> None:
        """Supervisor lifecycle events that are also counters."""
        target = {"worker_restarted": (self.worker_restarts, self.totals.worker_restarts),
                  "worker_crashed": (self.worker_crashes, self.totals.worker_crashes),
                  "model_quarantined": (self.quarantines, self.totals.quarantines),
                  "model_evicted": (self.evictions, self.totals.evictions),
                  }.get(type_)
        model = data.get("model_id")
        if not isinstance(model, str):
            return
        if type_ == "model_loaded":
            # Series start at 0 when a model appears, so rate() and ratios
            # work before its first error or restart.
            for per_model in (self.model_requests, self.model_errors,
                              self.model_completion_tokens, self.worker_restarts,
                              self.worker_crashes, self.quarantines, self.evictions):
                per_model.labels(model)
        if target is None:
            return
        counter, tally = target
        counter.labels(model).inc()
        tally[model] = tally.get(model, 0) + 1

    def record(self, o: Outcome) -> None:
        t = self.totals
        tokens = o.prompt_tokens + o.completion_tokens
        t.requests += 1
        self.requests.inc()
        if o.stream:
            t.stream_requests += 1
            self.stream_requests.inc()
        if o.error:
            t.errors += 1
            self.errors.inc()
        if o.prompt_tokens:
            t.prompt_tokens += o.prompt_tokens
            self.prompt_tokens.inc(o.prompt_tokens)
        if o.completion_tokens:
            t.completion_tokens += o.completion_tokens
            self.completion_tokens.inc(o.completion_tokens)
        if o.model is not None:
            m = t.per_model.setdefault(o.model, ModelTotals())
            m.requests += 1
            m.duration_sum_sec += o.duration_sec
            m.prompt_tokens += o.prompt_tokens
            m.completion_tokens += o.completion_tokens
            self.model_requests.labels(o.model).inc()
            self.duration.labels(o.model).observe(o.duration_sec)
            if o.completion_tokens:
                self.model_completion_tokens.labels(o.model).inc(o.completion_tokens)
            if o.error:
                m.errors += 1
                self.model_errors.labels(o.model).inc()
            if o.ttft_sec is not None:
                m.ttft_sum_sec += o.ttft_sec
                m.ttft_count += 1
        if o.client is not None:
            c = t.per_client.setdefault(o.client, ClientTotals())
            c.requests += 1
            c.tokens += tokens
            self.client_requests.labels(o.client).inc()
            if tokens:
                self.client_tokens.labels(o.client).inc(tokens)
            if o.error:
                c.errors += 1
                self.client_errors.labels(o.client).inc()

    # --- output ------------------------------------------------------------------

    def prometheus_text(self) -> bytes:
        return generate_latest(self.registry)

    def summary(self) -> dict[str, Any]:
        t = self.totals
        return {
            "total_requests": t.requests,
            "total_errors": t.errors,
            "stream_requests": t.stream_requests,
            "prompt_tokens": t.prompt_tokens,
            "completion_tokens": t.completion_tokens,
            "per_model": {name: m.summary() for name, m in sorted(t.per_model.items())},
            "per_client": {name: {"requests": c.requests, "tokens": c.tokens,
                                  "errors": c.errors}
                           for name, c in sorted(t.per_client.items())},
            "worker_restarts": dict(t.worker_restarts),
            "worker_crashes": dict(t.worker_crashes),
            "model_quarantines": dict(t.quarantines),
            "model_evictions": dict(t.evictions),
            "uptime_seconds": round(self.uptime_seconds, 1),
        }
