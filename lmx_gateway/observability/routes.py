"""Admin observability routes: Prometheus metrics and their JSON summary,
detailed health and the model stack."""

from __future__ import annotations

import importlib.metadata
from typing import Any

import psutil
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from lmx_gateway import __version__
from lmx_gateway.access.scopes import ADMIN, ScopedRoute
from lmx_gateway.observability.observers import gib, worker_rss_bytes
from lmx_gateway.state import GatewayState, gateway_state
from lmx_supervisor.lifecycle.managed_model import ManagedModel
from lmx_supervisor.lifecycle.states import ModelState
from lmx_supervisor.models.model_resolver import AVAILABLE_BACKENDS
from lmx_supervisor.workers.worker_handle import LOCAL_NODE

# Backend name -> the distribution that provides it.
BACKEND_DISTRIBUTIONS = {"llama_cpp": "llama-cpp-python", "mlx": "mlx"}


async def metrics(request: Request) -> Response:
    text = gateway_state(request).metrics.prometheus_text()
    return Response(text, media_type=CONTENT_TYPE_LATEST)


async def metrics_json(request: Request) -> Response:
    state = gateway_state(request)
    body = state.metrics.summary()
    body.update(
        uptime_seconds=round(state.uptime_seconds, 1),
        in_flight_requests=state.in_flight,
        queued_requests=sum(m.gate.queued for m in state.supervisor.models()),
        events={"subscribers": state.events.subscribers,
                "dropped_total": state.events.dropped_total},
    )
    return JSONResponse(body)


def _worker(model: ManagedModel) -> dict[str, Any]:
    # A node's worker pid names a process on that host, not on this one.
    rss = worker_rss_bytes(model.pid) if model.placement.node == LOCAL_NODE else None
    return {
        "model_id": model.model_id,
        "node": model.placement.node,
        "backend": model.backend,
        "state": str(model.state),
        "reason": model.reason,
        "pid": model.pid,
        "rss_bytes": rss,
        "rss_gb": gib(rss) if rss is not None else None,
        "restarts": model.restarts,
        "recent_crashes": model.history.recent(),
        "in_flight": model.in_flight,
        "queued": model.gate.queued,
    }


def health_report(state: GatewayState) -> dict[str, Any]:
    models = state.supervisor.models()
    workers = [_worker(m) for m in models]
    vm = psutil.virtual_memory()
    limit = state.config.memory.max_memory_percent
    reasons: list[str] = []
    for m in models:
        if m.state is ModelState.QUARANTINED:
            reasons.append(f"model_quarantined: {m.model_id} ({m.reason})")
        elif m.state is ModelState.BACKOFF:
            reasons.append(f"model_restarting: {m.model_id} ({m.reason})")
        elif m.state is ModelState.UNAVAILABLE:
            reasons.append(f"model_unavailable: {m.model_id} ({m.reason})")
    if vm.percent >= limit:
        reasons.append(f"memory_pressure: {vm.percent:.1f}% used "
                       f">= memory.max_memory_percent {limit:g}%")
    workers_rss = sum(w["rss_bytes"] or 0 for w in workers)
    return {
        "status": "degraded" if reasons else "ok",
        "reasons": reasons,
        "version": __version__,
        "uptime_seconds": round(state.uptime_seconds, 1),
        "memory_usage_percent": vm.percent,
        "memory": {
            "total_gb": gib(vm.total), "used_gb": gib(vm.total - vm.available),
            "available_gb": gib(vm.available), "percent": vm.percent,
            "threshold_percent": limit,
            "load_shedding_percent": state.config.memory.load_shedding_percent,
        },
        # What the model workers hold. No Metal here: llama.cpp runs on the CPU.
        "backend_memory": {
            "workers_rss_gb": gib(workers_rss),
            "per_model_gb": {w["model_id"]: w["rss_gb"] for w in workers},
        },
        "metal": None,
        "workers": workers,
        "helpers": [],
        "in_flight_requests": state.in_flight,
        "events": {"subscribers": state.events.subscribers,
                   "dropped_total": state.events.dropped_total},
    }


async def health(request: Request) -> Response:
    return JSONResponse(health_report(gateway_state(request)))


def _first_ready(candidates: list[str], ready: set[str]) -> str | None:
    return next((c for c in candidates if c in ready), None)


def _backend_version(backend: str) -> str | None:
    dist = BACKEND_DISTRIBUTIONS.get(backend)
    if dist is None:
        return None
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


async def stack(request: Request) -> Response:
    state = gateway_state(request)
    models = state.supervisor.models()
    ready = {m.model_id for m in models if m.state is ModelState.READY}
    routing = state.config.routing
    roles = {
        alias: {"candidates": list(candidates), "resolved": _first_ready(candidates, ready)}
        for alias, candidates in sorted(routing.aliases.items())
    }
    backends = {
        name: {
            "available": name in AVAILABLE_BACKENDS,
            "version": _backend_version(name),
            "loaded_models": [m.model_id for m in models if m.backend == name],
        }
        for name in sorted(BACKEND_DISTRIBUTIONS)
    }
    return JSONResponse({
        "roles": roles,
        "default_model": routing.default_model or state.config.models.default_model,
        "helper_nodes": [],
        "loaded_models": [
            {"model_id": m.model_id, "state": str(m.state), "backend": m.backend,
             "backend_version": m.ready.backend_version if m.ready else None,
             "pid": m.pid, "in_flight": m.in_flight}
            for m in models
        ],
        "backends": backends,
    })


ROUTES = [
    ScopedRoute(ADMIN, "/admin/metrics", metrics, methods=["GET"], produces=("text/plain",)),
    ScopedRoute(ADMIN, "/admin/metrics/json", metrics_json, methods=["GET"]),
    ScopedRoute(ADMIN, "/admin/health", health, methods=["GET"]),
    ScopedRoute(ADMIN, "/admin/stack", stack, methods=["GET"]),
]
