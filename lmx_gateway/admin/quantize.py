"""Quantize jobs: `POST /admin/quantize` (202 with the job), `GET
/admin/quantize[/{job_id}]`, `DELETE /admin/quantize/{job_id}` (cancel; the
partial output is gone when it answers). The work runs in a child process
(lmx_supervisor/tuning/quantize_jobs.py); progress also goes to /admin/events."""

from __future__ import annotations

from typing import Annotated

import msgspec
from msgspec import Meta
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from lmx_gateway.access.scopes import ADMIN, ScopedRoute
from lmx_gateway.http.body import read_json
from lmx_gateway.state import GatewayState, gateway_state
from lmx_supervisor.errors import BadRequest, LMXError
from lmx_supervisor.tuning.quantize_jobs import QuantizeArgs, QuantizeJobs

NonEmpty = Annotated[str, Meta(min_length=1, max_length=1024)]


class QuantizeRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    source: NonEmpty | None = None
    type: Annotated[str, Meta(min_length=1, max_length=32)] | None = None
    output: NonEmpty | None = None
    group_size: int | None = None
    # The runbook's spelling (§2.15): source_model and bits.
    source_model: NonEmpty | None = None
    bits: Annotated[int, Meta(ge=2, le=8)] | None = None


def quantize_jobs(state: GatewayState) -> QuantizeJobs:
    jobs = state.quantize_jobs
    if jobs is None:  # only before the lifespan ran
        raise LMXError("quantize jobs are not initialised")
    return jobs


async def start(request: Request) -> Response:
    state = gateway_state(request)
    req = await read_json(request, QuantizeRequest, state.config.server.max_request_body_bytes)
    if (req.source is None) == (req.source_model is None):
        raise BadRequest("give the model to quantize as source (or source_model), once",
                         param="source")
    if (req.type is None) == (req.bits is None):
        raise BadRequest("give the target as type (e.g. Q8_0, Q4, float32) or as bits, once",
                         param="type")
    source = req.source or req.source_model
    assert source is not None
    job = await quantize_jobs(state).start(
        QuantizeArgs(source, req.type, req.output, req.group_size, req.bits), state.config)
    return JSONResponse(job.snapshot(), status_code=202)


async def list_jobs(request: Request) -> Response:
    jobs = quantize_jobs(gateway_state(request)).jobs()
    return JSONResponse({"jobs": [j.snapshot() for j in jobs], "count": len(jobs)})


async def get_job(request: Request) -> Response:
    jobs = quantize_jobs(gateway_state(request))
    return JSONResponse(jobs.get(request.path_params["job_id"]).snapshot())


async def cancel_job(request: Request) -> Response:
    jobs = quantize_jobs(gateway_state(request))
    job = await jobs.cancel(request.path_params["job_id"])
    return JSONResponse({"success": True, **job.snapshot()})


ROUTES = [
    ScopedRoute(ADMIN, "/admin/quantize", start, methods=["POST"], body=QuantizeRequest,
                ok=(202,), errors=(404, 409, 422, 429, 507)),
    ScopedRoute(ADMIN, "/admin/quantize", list_jobs, methods=["GET"]),
    ScopedRoute(ADMIN, "/admin/quantize/{job_id}", get_job, methods=["GET"], errors=(404,)),
    ScopedRoute(ADMIN, "/admin/quantize/{job_id}", cancel_job, methods=["DELETE"],
                errors=(404, 409)),
]
