"""Runtime control: config hot reload,
presets, the benchmark, and the unauthenticated discovery documents."""

from __future__ import annotations

import asyncio
import secrets
import time
from typing import Annotated, Any

import msgspec
from msgspec import Meta
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from lmx_gateway import __version__
from lmx_gateway.access.auth import inference_required
from lmx_gateway.access.scopes import ADMIN, GENERATION_ERRORS, PUBLIC, ScopedRoute
from lmx_gateway.admin.config_reload import reload_config
from lmx_gateway.admin.restart import apply_spawn_settings, read_reload_request
from lmx_gateway.http.body import read_json
from lmx_gateway.inference.generation import Generation, collect
from lmx_gateway.inference.presets import load_presets
from lmx_gateway.inference.routing import resolve_route
from lmx_gateway.openai.schemas import ModelName, Temperature
from lmx_gateway.state import GatewayState, gateway_state
from lmx_protocol import ChatMessage, Generate, SamplingParams

DEFAULT_BENCH_PROMPT = "Explain the concept of recursion in Python with examples."


# --- config and presets -----------------------------------------------------------


async def config_reload(request: Request) -> Response:
    req = await read_reload_request(request)
    result = await reload_config(gateway_state(request))
    applied = await apply_spawn_settings(gateway_state(request), req)
    return JSONResponse({
        "success": True,
        "updated": result.updated,
        "source": result.source,
        "restart_required": result.restart_required,
        "quarantine_lifted": result.quarantine_lifted,
        "presets_loaded": result.presets_loaded,
        "preset_errors": result.preset_errors,
        **applied,
    })


def _presets_body(state: GatewayState) -> dict[str, Any]:
    presets = state.presets
    return {"presets": [p.describe() for p in presets.presets.values()],
            "count": len(presets.presets),
            "directory": str(presets.directory) if presets.directory else None,
            "errors": presets.errors}


async def list_presets(request: Request) -> Response:
    return JSONResponse(_presets_body(gateway_state(request)))


async def presets_reload(request: Request) -> Response:
    state = gateway_state(request)
    fresh = await asyncio.to_thread(load_presets, state.presets.directory)
    changed = not fresh.same_presets(state.presets)
    state.presets = fresh
    if changed:
        state.events.publish("presets_reloaded", {"presets_loaded": len(fresh.presets),
                                                  "errors": len(fresh.errors)})
    return JSONResponse({"success": True, "presets_loaded": len(fresh.presets),
                         "changed": changed, "errors": fresh.errors})


# --- benchmark ----------------------------------------------------------------------


class BenchmarkRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    model_id: ModelName
    prompt: Annotated[str, Meta(min_length=1)] = DEFAULT_BENCH_PROMPT
    max_tokens: Annotated[int, Meta(ge=1, le=8192)] = 128
    runs: Annotated[int, Meta(ge=1, le=20)] = 3
    temperature: Temperature = 0.7
    # Generate exactly max_tokens every run, so runs compare like for like.
    ignore_eos: bool = False
    seed: int | None = None


async def _bench_run(state: GatewayState, req: BenchmarkRequest, run: int) -> dict[str, Any]:
    model = resolve_route(state, req.model_id).model
    frame = Generate(
        request_id=f"bench-{secrets.token_hex(8)}",
        params=SamplingParams(max_tokens=req.max_tokens, temperature=req.temperature,
                              seed=req.seed, ignore_eos=req.ignore_eos),
        messages=[ChatMessage(role="user", content=req.prompt)])
    gen = Generation(state, model, frame, stream=False)
    finished = (await collect(gen)).finished
    ended = time.monotonic()
    first_at = gen.first_token_at or ended
    total, ttft = ended - gen.started, first_at - gen.started
    tokens = finished.completion_tokens
    # Decode speed: tokens after the first over the time after the first
    # (TTFT is reported on its own); end-to-end when that span is empty.
    decode_span = ended - first_at
    tps = (tokens - 1) / decode_span if tokens > 1 and decode_span > 0 else tokens / total
    return {"run": run, "model_id": model.model_id, "prompt_tokens": finished.prompt_tokens,
            "completion_tokens": tokens, "finish_reason": str(finished.finish_reason),
            "time_to_first_token_ms": round(ttft * 1000, 2),
            "total_time_ms": round(total * 1000, 2),
            "tokens_per_second": round(tps, 2)}


def _mean(values: list[float]) -> float:
    return round(sum(values) / len(values), 2) if values else 0.0


async def benchmark(request: Request) -> Response:
    state = gateway_state(request)
    req = await read_json(request, BenchmarkRequest, state.config.server.max_request_body_bytes)
    resolve_route(state, req.model_id)  # unknown model: 404 before any work
    results = [await _bench_run(state, req, run) for run in range(1, req.runs + 1)]
    body = {
        "model_id": results[-1]["model_id"],
        "requested_model": req.model_id,
        "runs": req.runs,
        "max_tokens": req.max_tokens,
        "temperature": req.temperature,
        "avg_tokens_per_second": _mean([r["tokens_per_second"] for r in results]),
        "avg_time_to_first_token_ms": _mean([r["time_to_first_token_ms"] for r in results]),
        "avg_total_time_ms": _mean([r["total_time_ms"] for r in results]),
        "avg_completion_tokens": _mean([r["completion_tokens"] for r in results]),
        "results": results,
    }
    state.events.publish("benchmark_completed", {
        k: body[k] for k in ("model_id", "runs", "avg_tokens_per_second",
                             "avg_time_to_first_token_ms", "avg_total_time_ms")})
    return JSONResponse(body)


# --- discovery (never authenticated: it tells a client how to authenticate) ---------------

_ENDPOINTS = {
    "health": "/healthz",
    "readiness": "/readyz",
    "models": "/v1/models",
    "chat_completions": "/v1/chat/completions",
    "completions": "/v1/completions",
    "responses": "/v1/responses",
    "messages": "/v1/messages",
    "embeddings": "/v1/embeddings",
    "admin_status": "/admin/status",
    "admin_models": "/admin/models",
    "admin_events": "/admin/events",
    "admin_metrics": "/admin/metrics",
    "admin_health": "/admin/health",
    "dashboard": "/admin/dashboard",
    "discovery": "/v1/discovery",
}
DISCOVERY_PATHS = ("/v1/discovery", "/.well-known/opta-lmx")


def _served_paths(request: Request) -> set[str]:
    paths = set()
    for route in request.app.routes:
        path = getattr(route, "path", None)
        if isinstance(path, str):
            paths.add(path)
    return paths


async def discovery(request: Request) -> Response:
    state = gateway_state(request)
    security = state.config.security
    base = str(request.base_url).rstrip("/")
    served = _served_paths(request)
    return JSONResponse({
        "service": "lmx",
        "version": __version__,
        "base_url": base,
        "openai_base_url": f"{base}/v1",
        "auth": {
            "profile": security.profile,
            "admin_key_required": bool(security.admin_key) or security.profile == "cloud",
            "inference_key_required": inference_required(security),
            "admin_header": "X-Admin-Key",
            "inference_headers": ["Authorization: Bearer <key>", "X-Api-Key"],
        },
        "endpoints": {name: path for name, path in _ENDPOINTS.items() if path in served},
        "ready": bool(state.supervisor.ready_models()),
    })


ROUTES = [
    ScopedRoute(ADMIN, "/admin/config/reload", config_reload, methods=["POST"], errors=(400,)),
    ScopedRoute(ADMIN, "/admin/presets", list_presets, methods=["GET"]),
    ScopedRoute(ADMIN, "/admin/presets/reload", presets_reload, methods=["POST"]),
    ScopedRoute(ADMIN, "/admin/benchmark", benchmark, methods=["POST"], body=BenchmarkRequest,
                errors=GENERATION_ERRORS),
    ScopedRoute(PUBLIC, "/v1/discovery", discovery, methods=["GET"]),
    ScopedRoute(PUBLIC, "/.well-known/opta-lmx", discovery, methods=["GET"]),
]
