"""Liveness and readiness probes. Never authenticated."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from lmx_gateway import __version__
from lmx_gateway.access.scopes import PUBLIC, ScopedRoute
from lmx_gateway.state import gateway_state


async def healthz(_request: Request) -> Response:
    # Answers from the event loop alone: 200 for as long as the process serves.
    return JSONResponse({"status": "ok", "version": __version__})


async def readyz(request: Request) -> Response:
    ready = len(gateway_state(request).supervisor.ready_models())
    if ready:
        return JSONResponse({"status": "ready", "version": __version__, "models_loaded": ready})
    return JSONResponse({"status": "not_ready", "version": __version__, "models_loaded": 0},
                        status_code=503)


ROUTES = [
    ScopedRoute(PUBLIC, "/healthz", healthz, methods=["GET"], any_origin=True),
    ScopedRoute(PUBLIC, "/readyz", readyz, methods=["GET"], any_origin=True),
]
