"""`POST /admin/models/probe`: what a model on disk is and what loading it
would cost, without starting a worker (lmx_supervisor/tuning/probe.py does the
work; a bad file is a 422 naming what is wrong)."""

from __future__ import annotations

import asyncio
from typing import Annotated, Literal

import msgspec
from msgspec import Meta
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from lmx_gateway.access.scopes import ADMIN, ScopedRoute
from lmx_gateway.http.body import read_json
from lmx_gateway.openai.schemas import ModelName
from lmx_gateway.state import gateway_state
from lmx_supervisor.errors import InferenceTimeout
from lmx_supervisor.tuning.probe import ProbeArgs, probe_model


class ProbeRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    model_id: ModelName
    backend: str | None = None
    context_length: Annotated[int, Meta(ge=16, le=16 * 1024 * 1024)] | None = None
    parallel_slots: Annotated[int, Meta(ge=1, le=256)] | None = None
    kv_cache_type: Literal["f16", "q8_0", "q4_0"] | None = None
    # The runbook's bound on the probe (§2.12); it reads headers only, so
    # this is a guard against a stalled disk.
    timeout_sec: Annotated[float, Meta(gt=0, le=3600)] = 60.0


async def probe(request: Request) -> Response:
    state = gateway_state(request)
    req = await read_json(request, ProbeRequest, state.config.server.max_request_body_bytes)
    try:
        body = await asyncio.wait_for(probe_model(state.supervisor, ProbeArgs(
            req.model_id, req.backend, req.context_length, req.parallel_slots,
            req.kv_cache_type)), req.timeout_sec)
    except TimeoutError:
        raise InferenceTimeout(f"probing '{req.model_id}' took longer than "
                               f"{req.timeout_sec:g} s", code="model_probe_timeout",
                               param="timeout_sec") from None
    return JSONResponse(body)


ROUTES = [ScopedRoute(ADMIN, "/admin/models/probe", probe, methods=["POST"], body=ProbeRequest,
                      errors=(404, 409, 422, 504))]
