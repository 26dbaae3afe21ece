"""What watches a running gateway: lifecycle events turned into counters and
log lines, the scrape-time gauges, and the `throughput` event published
about once a second while anything is generating (and never while idle)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator
from typing import Any

import psutil
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from lmx_gateway.observability.events import EventBus
from lmx_gateway.observability.metrics import Metrics
from lmx_gateway.state import GatewayState
from lmx_supervisor.lifecycle.states import ModelState
from lmx_supervisor.workers.worker_handle import LOCAL_NODE

log = logging.getLogger("lmx.gateway")

GB = 1024**3


def gib(n: float) -> float:
    """Bytes as GiB, rounded for JSON answers."""
    return round(n / GB, 3)
THROUGHPUT_INTERVAL_SEC = 1.0


def worker_rss_bytes(pid: int | None) -> int | None:
    if pid is None:
        return None
    try:
        return int(psutil.Process(pid).memory_info().rss)
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def live_metrics(state: GatewayState) -> Iterator[Metric]:
    models = state.supervisor.models()
    vm = psutil.virtual_memory()
    yield _gauge("lmx_loaded_models", "Models loaded and ready",
                 sum(1 for m in models if m.state is ModelState.READY))
    yield _gauge("lmx_memory_used_gb", "Memory in use on the host",
                 (vm.total - vm.available) / GB)
    yield _gauge("lmx_memory_total_gb", "Memory on the host", vm.total / GB)
    yield _gauge("lmx_memory_usage_percent", "Memory in use on the host, percent", vm.percent)
    yield _gauge("lmx_in_flight_requests", "Inference requests being served", state.in_flight)
    yield _gauge("lmx_concurrent_limit", "Concurrent requests allowed per model "
                 "(models.max_concurrent_requests)", state.config.models.max_concurrent_requests)
    yield _gauge("lmx_queued_requests", "Requests waiting for a model slot",
                 sum(m.gate.queued for m in models))
    yield _gauge("lmx_uptime_seconds", "Seconds since the gateway started",
                 state.uptime_seconds)
    yield _gauge("lmx_quarantined_models", "Models quarantined after a crash loop",
                 sum(1 for m in models if m.state is ModelState.QUARANTINED))
    yield _gauge("lmx_event_subscribers", "Clients connected to /admin/events",
                 state.events.subscribers)
    yield CounterMetricFamily("lmx_events_dropped", "Admin events dropped for slow subscribers",
                              value=state.events.dropped_total)
    yield CounterMetricFamily("lmx_router_malformed_frames",
                              "Messages on the worker socket dropped as malformed",
                              value=state.supervisor.router_malformed_frames)
    model_state = GaugeMetricFamily("lmx_model_state", "1 for each model's current state",
                                    labels=["model", "state"])
    in_flight = GaugeMetricFamily("lmx_model_in_flight_requests", "Requests running per model",
                                  labels=["model"])
    queued = GaugeMetricFamily("lmx_model_queued_requests", "Requests queued per model",
                               labels=["model"])
    memory = GaugeMetricFamily("lmx_model_memory_gb", "Resident memory of each model's worker",
                               labels=["model"])
    # Which host each model's worker runs on ("local" or a node's name), to
    # join with the per-model series; and each node's liveness.
    model_node = GaugeMetricFamily("lmx_model_node", "1 for the host each model runs on",
                                   labels=["model", "node"])
    node_up = GaugeMetricFamily("lmx_node_up", "1 while a node answers its heartbeat",
                                labels=["node"])
    for m in models:
        model_state.add_metric([m.model_id, str(m.state)], 1)
        in_flight.add_metric([m.model_id], m.in_flight)
        queued.add_metric([m.model_id], m.gate.queued)
        model_node.add_metric([m.model_id, m.placement.node], 1)
        # A node's worker pid names a process on that host, not on this one.
        rss = worker_rss_bytes(m.pid) if m.placement.node == LOCAL_NODE else None
        if rss is not None:
            memory.add_metric([m.model_id], rss / GB)
    for row in state.supervisor.nodes.report():
        node_up.add_metric([row["name"]], 1 if row["state"] == "connected" else 0)
    yield from (model_state, in_flight, queued, memory, model_node, node_up)


def log_lifecycle(type_: str, data: dict[str, Any]) -> None:
    """Human log lines for model lifecycle events."""
    model = data.get("model_id")
    fields = {"event": type_, "model": model}
    if type_ == "model_loaded":
        gb = (data.get("memory_bytes") or 0) / GB
        secs = data.get("load_time_sec") or 0.0
        log.info("Model loaded: %s (%.1f GB, %.1fs)", model, gb, secs,
                 extra={**fields, "memory_gb": round(gb, 3), "load_time_sec": secs,
                        "pid": data.get("pid")})
    elif type_ == "model_unloaded":
        log.info("Model unloaded: %s", model, extra=fields)
    elif type_ == "worker_restarted":
        log.info("Worker restarted: %s (restart %s)", model, data.get("restarts"),
                 extra={**fields, "restarts": data.get("restarts")})
    elif type_ == "model_quarantined":
        log.error("Model quarantined: %s (%s)", model, data.get("reason"), extra=fields)


class ThroughputReporter:
    def __init__(self, metrics: Metrics, events: EventBus,
                 interval: float = THROUGHPUT_INTERVAL_SEC) -> None:
        self.metrics = metrics
        self.events = events
        self.interval = interval

    async def run(self) -> None:
        m = self.metrics
        while True:
            await m.activity.wait()  # asleep until a request starts generating
            last_tokens, last_at = m.tokens_generated, time.monotonic()
            while True:
                await asyncio.sleep(self.interval)
                now, tokens = time.monotonic(), m.tokens_generated
                self.events.publish("throughput", {
                    "tokens_per_second": round((tokens - last_tokens) / (now - last_at), 2),
                    "tokens": tokens - last_tokens,
                    "active_requests": m.active_requests,
                    "interval_sec": round(now - last_at, 3),
                })
                last_tokens, last_at = tokens, now
                if m.active_requests <= 0:
                    break
            m.activity.clear()


class Observers:
    def __init__(self, state: GatewayState) -> None:
        state.events.add_listener(state.metrics.on_event)
        state.events.add_listener(log_lifecycle)
        state.metrics.set_live_source(lambda: live_metrics(state))
        self._task = asyncio.create_task(
            ThroughputReporter(state.metrics, state.events).run(), name="lmx-throughput")

    async def stop(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
