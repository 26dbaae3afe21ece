"""Admin routes for models as files: the on-disk
inventory, downloads with progress and cancel, and deletion."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from msgspec import Meta
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from lmx_gateway.access.scopes import ADMIN, ScopedRoute
from lmx_gateway.http.body import read_json
from lmx_gateway.state import GatewayState, gateway_state
from lmx_supervisor.errors import Conflict, LMXError, ModelNotFound, NotFound
from lmx_supervisor.models import hub_cache
from lmx_supervisor.models.downloads import DownloadJob
from lmx_supervisor.models.model_files import LoadArgs, ModelFiles

NonEmpty = Annotated[str, Meta(min_length=1)]


class DownloadRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    repo_id: NonEmpty
    revision: NonEmpty | None = None
    allow_patterns: Annotated[list[NonEmpty], Meta(min_length=1)] | NonEmpty | None = None


def model_files(state: GatewayState) -> ModelFiles:
    files = state.model_files
    if files is None:  # only before the lifespan ran
        raise LMXError("model file management is not initialised")
    return files


def _job(state: GatewayState, download_id: str) -> DownloadJob:
    job = model_files(state).downloads.get(download_id)
    if job is None:
        raise NotFound(f"No download '{download_id}' (ids are kept for the last 100 downloads "
                       "of this process)", code="download_not_found", param="download_id")
    return job


def accepted(job: DownloadJob, **extra: object) -> JSONResponse:
    body = {"download_id": job.id, "repo_id": job.repo_id, "status": str(job.status),
            "progress_url": f"/admin/models/download/{job.id}/progress", **extra}
    return JSONResponse(body, status_code=202)


async def available(request: Request) -> Response:
    state = gateway_state(request)
    return JSONResponse(await model_files(state).available(state.config.models_dir))


async def start_download(request: Request) -> Response:
    state = gateway_state(request)
    req = await read_json(request, DownloadRequest, state.config.server.max_request_body_bytes)
    patterns = [req.allow_patterns] if isinstance(req.allow_patterns, str) else req.allow_patterns
    job = await model_files(state).downloads.start(req.repo_id, req.revision, patterns)
    return accepted(job)


async def list_downloads(request: Request) -> Response:
    state = gateway_state(request)
    jobs = model_files(state).downloads.jobs()
    return JSONResponse({"downloads": [j.snapshot() for j in jobs], "count": len(jobs)})


async def download_progress(request: Request) -> Response:
    state = gateway_state(request)
    return JSONResponse(_job(state, request.path_params["download_id"]).snapshot())


async def cancel_download(request: Request) -> Response:
    state = gateway_state(request)
    job = _job(state, request.path_params["download_id"])
    if not job.active:
        raise Conflict(f"Download '{job.id}' already ended ({job.status})",
                       code="download_finished", param="download_id")
    model_files(state).downloads.cancel(job.id)
    return JSONResponse({"success": True, "download_id": job.id, "repo_id": job.repo_id,
                         "status": "cancelling"})


async def delete_model(request: Request) -> Response:
    state = gateway_state(request)
    model_id = request.path_params["model_id"]
    done = await model_files(state).delete(model_id, state.config.models_dir)
    return JSONResponse({"success": True, "model_id": done.model_id,
                         "freed_bytes": done.freed_bytes, "local_path": str(done.path),
                         "source": done.source})


def needs_download(exc: LMXError, model_id: str) -> bool:
    """Whether a failed load is one `auto_download` fixes: the model is not on
    disk, or it is a hub-cache snapshot with files missing."""
    if isinstance(exc, ModelNotFound):
        return True
    return exc.code == "model_incomplete" and hub_cache.locate(model_id) is not None


async def auto_download(state: GatewayState, model_id: str, backend: str | None,
                        served_name: str | None, allow_unsupported_runtime: bool,
                        overrides: dict[str, Any] | None = None) -> Response:
    """`POST /admin/models/load` with `auto_download` for a model not on disk:
    202 now, and the model loads when the download completes."""
    job = await model_files(state).download_then_load(
        LoadArgs(model_id, backend, served_name, allow_unsupported_runtime, overrides or {}))
    return accepted(job, model_id=model_id,
                    message="Model is not on disk; downloading it, it loads when the download "
                            "completes (watch /admin/events for model_loaded)")


ROUTES = [
    ScopedRoute(ADMIN, "/admin/models/available", available, methods=["GET"]),
    ScopedRoute(ADMIN, "/admin/models/download", start_download, methods=["POST"],
                body=DownloadRequest, ok=(202,), errors=(400, 404, 409, 502, 503, 507)),
    ScopedRoute(ADMIN, "/admin/models/download", list_downloads, methods=["GET"]),
    ScopedRoute(ADMIN, "/admin/models/download/{download_id}/progress", download_progress,
                methods=["GET"], errors=(404,)),
    ScopedRoute(ADMIN, "/admin/models/download/{download_id}", cancel_download,
                methods=["DELETE"], errors=(404,)),
    # Last: ids contain slashes, so this matches any DELETE under /admin/models/.
    ScopedRoute(ADMIN, "/admin/models/{model_id:path}", delete_model, methods=["DELETE"],
                errors=(400, 404, 409)),
]
