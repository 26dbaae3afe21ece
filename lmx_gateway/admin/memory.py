"""`GET /admin/memory`: the machine's memory, the guard's
thresholds, and per model its worker's resident memory and estimate."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from lmx_gateway.access.scopes import ADMIN, ScopedRoute
from lmx_gateway.state import gateway_state


async def memory(request: Request) -> Response:
    return JSONResponse(gateway_state(request).supervisor.memory.report())


ROUTES = [ScopedRoute(ADMIN, "/admin/memory", memory, methods=["GET"])]
