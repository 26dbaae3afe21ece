"""`GET /admin/models/compatibility?model_id=&outcome=&include_summary=`
: the ledger of load outcomes and crashes per model and
backend version, oldest row first, optionally with counts."""

from __future__ import annotations

from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from lmx_gateway.access.scopes import ADMIN, QueryParam, ScopedRoute
from lmx_gateway.state import gateway_state
from lmx_supervisor.errors import BadRequest

COMPATIBILITY_QUERY = (
    QueryParam("model_id", {"type": "string"}, "only this model's rows"),
    QueryParam("outcome", {"enum": ["pass", "fail", ""]},
               "only passes or failures (empty: both)"),
    QueryParam("include_summary", {"enum": ["true", "false", "1", "0", "yes", "no", "on",
                                            "off", ""]}, "add counts per model"),
)
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"", "0", "false", "no", "off"}


def _flag(raw: str | None, name: str) -> bool:
    value = (raw or "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise BadRequest(f"{name} must be true or false, not {raw!r}", param=name)


async def compatibility(request: Request) -> Response:
    registry = gateway_state(request).supervisor.compatibility
    query = request.query_params
    model_id = query.get("model_id") or None
    outcome = query.get("outcome") or None
    if outcome not in (None, "pass", "fail"):
        raise BadRequest(f"outcome must be 'pass' or 'fail', not {outcome!r}", param="outcome")
    rows = registry.query(model_id, outcome)
    body: dict[str, Any] = {"object": "list", "count": len(rows),
                            "max_rows": registry.max_rows,
                            "data": msgspec.to_builtins(rows)}
    if _flag(query.get("include_summary"), "include_summary"):
        body["summary"] = registry.summary(rows)
    return JSONResponse(body)


ROUTES = [
    ScopedRoute(ADMIN, "/admin/models/compatibility", compatibility, methods=["GET"],
                query=COMPATIBILITY_QUERY, errors=(400,)),
]
