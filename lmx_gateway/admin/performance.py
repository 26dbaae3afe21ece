"""Performance profiles: `POST /admin/models/autotune` (202 with a job that
measures the model in throwaway workers and stores the best settings as its
profile), `GET /admin/models/autotune/{job_id}`, `DELETE
/admin/models/autotune/{job_id}` (cancel: its throwaway worker is stopped,
no profile is written), and `GET
/admin/models/{model_id}/performance` (the profile with the measurements
behind it, and what a loaded model runs with)."""

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
from lmx_gateway.state import GatewayState, gateway_state
from lmx_supervisor.errors import LMXError
from lmx_supervisor.tuning.autotune import AutotuneJobs, TrialShape
from lmx_supervisor.tuning.performance import performance_view


class AutotuneRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    model_id: ModelName
    objective: Literal["latency", "throughput"] = "throughput"
    budget_sec: Annotated[float, Meta(gt=0, le=6 * 3600)] | None = None
    # As in the runbook (§2.11) and the benchmark: what each trial generates.
    prompt: Annotated[str, Meta(min_length=1, max_length=100_000)] | None = None
    max_tokens: Annotated[int, Meta(ge=2, le=4096)] = 32
    runs: Annotated[int, Meta(ge=1, le=20)] = 1


def autotune_jobs(state: GatewayState) -> AutotuneJobs:
    jobs = state.autotune_jobs
    if jobs is None:  # only before the lifespan ran
        raise LMXError("autotune is not initialised")
    return jobs


async def start(request: Request) -> Response:
    state = gateway_state(request)
    req = await read_json(request, AutotuneRequest, state.config.server.max_request_body_bytes)
    job = await autotune_jobs(state).start(req.model_id, req.objective, req.budget_sec,
                                           TrialShape(req.prompt, req.max_tokens, req.runs))
    return JSONResponse(job.snapshot(), status_code=202)


async def get_job(request: Request) -> Response:
    jobs = autotune_jobs(gateway_state(request))
    return JSONResponse(jobs.get(request.path_params["job_id"]).snapshot())


async def cancel_job(request: Request) -> Response:
    jobs = autotune_jobs(gateway_state(request))
    job = await jobs.cancel(request.path_params["job_id"])
    return JSONResponse({"success": True, **job.snapshot()})


async def performance(request: Request) -> Response:
    state = gateway_state(request)
    model_id = request.path_params["model_id"]
    store = autotune_jobs(state).store
    profile = await asyncio.to_thread(store.load, model_id)
    loaded = next((m for m in state.supervisor.models() if m.model_id == model_id), None)
    return JSONResponse({
        "model_id": model_id,
        "profile": profile.as_dict() if profile is not None else None,
        "profile_path": str(store.path_for(model_id)),
        "loaded": performance_view(loaded.settings) if loaded is not None else None,
    })


ROUTES = [
    ScopedRoute(ADMIN, "/admin/models/autotune", start, methods=["POST"], body=AutotuneRequest,
                ok=(202,), errors=(404, 409, 422, 429)),
    ScopedRoute(ADMIN, "/admin/models/autotune/{job_id}", get_job, methods=["GET"],
                errors=(404,)),
    ScopedRoute(ADMIN, "/admin/models/autotune/{job_id}", cancel_job, methods=["DELETE"],
                errors=(404, 409)),
    ScopedRoute(ADMIN, "/admin/models/{model_id:path}/performance", performance,
                methods=["GET"], errors=(404,)),
]
