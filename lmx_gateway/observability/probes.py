"""Liveness and readiness probes. Never authenticated."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from lmx_gateway import __version__
from lmx_gateway.access.scopes import PUBLIC, ScopedRoute
from lmx_gateway.state import gateway_state
from lmx_supervisor.lifecycle.states import ModelState


async def healthz(_request: Request) -> Response:
    # Answers from the event loop alone: 200 for as long as the process serves.
    return JSONResponse({"status": "ok", "version": __version__})


async def readyz(request: Request) -> Response:
    supervisor = gateway_state(request).supervisor
    ready = len(supervisor.ready_models())
    # A background loop that died (or just restarted) makes routing suspect.
    problems = supervisor.problems()
    # Models whose node stopped answering: named, whatever the status.
    unavailable = sorted(m.model_id for m in supervisor.models()
                         if m.state is ModelState.UNAVAILABLE)
    extra: dict[str, object] = {"unavailable_models": unavailable} if unavailable else {}
    if ready and not problems:
        return JSONResponse({"status": "ready", "version": __version__, "models_loaded": ready,
                             **extra})
    body = {"status": "not_ready", "version": __version__, "models_loaded": ready, **extra}
    if problems:
        body["reason"] = "; ".join(problems)
    return JSONResponse(body, status_code=503)


ROUTES = [
    ScopedRoute(PUBLIC, "/healthz", healthz, methods=["GET"], any_origin=True),
    ScopedRoute(PUBLIC, "/readyz", readyz, methods=["GET"], any_origin=True),
]
