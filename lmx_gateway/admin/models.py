"""Admin routes: model load/unload/listing and system status."""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator
from typing import Any

import psutil
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from lmx_gateway import __version__
from lmx_gateway.access.scopes import ADMIN, LOAD_ERRORS, SSE, ScopedRoute
from lmx_gateway.admin.model_files import auto_download, needs_download
from lmx_gateway.admin.schemas import LoadRequest, UnloadRequest
from lmx_gateway.encoders.routes import encoder_listing
from lmx_gateway.http.body import read_json
from lmx_gateway.http.sse import EventStreamResponse, sse_event
from lmx_gateway.observability.observers import gib
from lmx_gateway.state import gateway_state
from lmx_supervisor.errors import BadRequest, LMXError
from lmx_supervisor.lifecycle.managed_model import ManagedModel
from lmx_supervisor.supervisor import Supervisor
from lmx_supervisor.tuning.performance import performance_view
from lmx_supervisor.workers.shard_group import describe_shards
from lmx_supervisor.workers.spawn_settings import parse_overrides, spawn_values


async def describe_model(model: ManagedModel, with_stats: bool = True) -> dict[str, Any]:
    ready = model.ready
    stats = await model.worker_stats() if with_stats else None
    return {
        "model_id": model.model_id,
        "path": str(model.path),
        "backend": model.backend,
        "backend_version": ready.backend_version if ready else None,
        "state": str(model.state),
        "readiness": {"state": str(model.state), "reason": model.reason},
        "pid": model.pid,
        "shards": describe_shards(model.placement, model.worker),  # None: not sharded
        # The host the worker runs on: "local", or a node's name.
        "node": model.placement.node,
        "restarts": model.restarts,
        "recent_crashes": model.history.recent(),
        "quarantined_requests": model.quarantined_requests(),
        "in_flight": model.in_flight,
        "queued": model.gate.queued,
        "max_concurrent_requests": model.gate.limit,
        "context_length": ready.context_length if ready else None,
        "capabilities": ready.capabilities if ready else [],
        **encoder_listing(ready),
        "memory_gb": gib(stats.rss_bytes if stats else (ready.memory_bytes if ready else 0)),
        "loaded_at": model.loaded_at,
        "performance": performance_view(model.settings),
        # What the worker was spawned with, and a restart under way (old pid,
        # new pid, phase) or None.
        "spawn_settings": spawn_values(model.settings),
        "restart": model.restart.describe() if model.restart else None,
        "worker_stats": {
            "requests_started": stats.requests_started,
            "requests_finished": stats.requests_finished,
            "requests_aborted": stats.requests_aborted,
            "tokens_generated": stats.tokens_generated,
            "prompt_tokens": stats.prompt_tokens,
            "active_requests": stats.active_requests,
            "queued_requests": stats.queued_requests,
            "rss_bytes": stats.rss_bytes,
            "prompt_tokens_cached": stats.prompt_tokens_cached,
            "encoder_batches": stats.encoder_batches,
            "prompt_budget_tokens": stats.prompt_budget_tokens,
            "step_time_ms": stats.step_time_ms,
        } if stats else None,
    }


def check_shards(supervisor: Supervisor, shards: list[str] | None) -> None:
    """At the edge: at least two ranks, each on a host this gateway knows
    (whether the model is MLX is known once it is resolved)."""
    if shards is None:
        return
    if len(shards) < 2:
        raise BadRequest("shards needs at least two hosts (one per rank)", param="shards")
    unknown = [name for name in shards if supervisor.placement_named(name) is None]
    if unknown:
        raise BadRequest(f"unknown host(s) in shards: {', '.join(unknown)} (known: local "
                         "and joined nodes)", param="shards")


async def list_loaded(request: Request) -> Response:
    state = gateway_state(request)
    loaded = [await describe_model(m) for m in state.supervisor.models()]
    return JSONResponse({"loaded": loaded, "count": len(loaded)})


async def load_model(request: Request) -> Response:
    state = gateway_state(request)
    req = await read_json(request, LoadRequest, state.config.server.max_request_body_bytes)
    overrides = parse_overrides(req.performance_overrides, "performance_overrides")
    check_shards(state.supervisor, req.shards)
    started = time.monotonic()
    try:
        model, already = await state.supervisor.load(
            req.model_id, backend=req.backend, served_name=req.served_name,
            allow_unsupported_runtime=req.allow_unsupported_runtime, overrides=overrides,
            shards=req.shards, node=req.node)
    except LMXError as exc:
        if not (req.auto_download and needs_download(exc, req.model_id)):
            raise
        return await auto_download(state, req.model_id, req.backend, req.served_name,
                                   req.allow_unsupported_runtime, overrides)
    body = await describe_model(model, with_stats=False)
    body.update(success=True, already_loaded=already,
                load_time_sec=round(time.monotonic() - started, 3))
    return JSONResponse(body)


async def unload_model(request: Request) -> Response:
    state = gateway_state(request)
    req = await read_json(request, UnloadRequest, state.config.server.max_request_body_bytes)
    model = await state.supervisor.unload(req.model_id)
    freed = model.ready.memory_bytes if model.ready else 0
    return JSONResponse({"success": True, "model_id": model.model_id,
                         "memory_freed_gb": gib(freed)})


def memory_summary() -> dict[str, Any]:
    vm = psutil.virtual_memory()
    return {"total_gb": gib(vm.total), "used_gb": gib(vm.total - vm.available),
            "available_gb": gib(vm.available), "percent": vm.percent}


async def status(request: Request) -> Response:
    state = gateway_state(request)
    models = state.supervisor.models()
    ready = state.supervisor.ready_models()
    return JSONResponse({
        "version": __version__,
        "uptime_seconds": round(state.uptime_seconds, 1),
        "loaded_models": len(ready),
        "models": [m.model_id for m in ready],
        "model_states": {m.model_id: str(m.state) for m in models},
        "memory": memory_summary(),
        "in_flight_requests": state.in_flight,
        "queued_requests": sum(m.gate.queued for m in models),
        "max_concurrent_requests": state.config.models.max_concurrent_requests,
    })


async def list_nodes(request: Request) -> Response:
    """The nodes that joined (lmx_supervisor.nodes): state, last heartbeat,
    host, and the models placed on each."""
    supervisor = gateway_state(request).supervisor
    placed: dict[str, list[str]] = {}
    for model in supervisor.models():
        placed.setdefault(model.placement.node, []).append(model.model_id)
    nodes = [{**row, "loaded_models": sorted(placed.get(row["name"], []))}
             for row in supervisor.nodes.report()]
    return JSONResponse({"listening": supervisor.nodes.enabled, "nodes": nodes,
                         "count": len(nodes)})


async def events(request: Request) -> Response:
    state = gateway_state(request)
    heartbeat = state.config.server.sse_heartbeat_interval_sec

    async def body() -> AsyncGenerator[bytes, None]:
        yield b": connected\n\n"  # flush headers so clients see the stream open
        async for event in state.events.stream(heartbeat):
            yield sse_event(event.type, event.payload())

    return EventStreamResponse(body())


ROUTES = [
    ScopedRoute(ADMIN, "/admin/events", events, methods=["GET"], produces=(SSE,)),
    ScopedRoute(ADMIN, "/admin/models", list_loaded, methods=["GET"]),
    ScopedRoute(ADMIN, "/admin/models/load", load_model, methods=["POST"], body=LoadRequest,
                ok=(200, 202), errors=LOAD_ERRORS),
    ScopedRoute(ADMIN, "/admin/models/unload", unload_model, methods=["POST"],
                body=UnloadRequest, errors=(404, 409)),
    ScopedRoute(ADMIN, "/admin/status", status, methods=["GET"]),
    ScopedRoute(ADMIN, "/admin/nodes", list_nodes, methods=["GET"]),
]
