"""Liveness and readiness probes (runbook §1.6). Never authenticated."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from lmx_gateway import __version__
from lmx_gateway.state import gateway_state


async def healthz(_request: Request) -> Response:
    # Answers from the event loop alone: 200 for as long as the process serves.
    return JSONResponse({"status": "ok", "version": __version__})


async def readyz(request: Request) -> Response:
    supervisor = gateway_state(request).supervisor
    ready = len(supervisor.ready_models())
    # A background loop that died (or just restarted) makes routing suspect.
    problems = supervisor.problems()
    if ready and not problems:
        return JSONResponse({"status": "ready", "version": __version__, "models_loaded": ready})
    body = {"status": "not_ready", "version": __version__, "models_loaded": ready}
    if problems:
        body["reason"] = "; ".join(problems)
    return JSONResponse(body, status_code=503)


ROUTES = [
    Route("/healthz", healthz, methods=["GET"]),
    Route("/readyz", readyz, methods=["GET"]),
]
