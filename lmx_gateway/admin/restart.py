"""`POST /admin/models/restart` (one model, or `{"all": true}`) and
`POST /admin/models/restart-all`: replace a model's worker without downtime,
optionally with new spawn-time settings (lmx_supervisor/lifecycle/restart.py); and the
`apply: rolling` step of `POST /admin/config/reload`."""

from __future__ import annotations

from typing import Any, Literal

import msgspec
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from lmx_gateway.access.scopes import ADMIN, LOAD_ERRORS, ScopedRoute
from lmx_gateway.http.body import decode_json, read_body, require_json
from lmx_gateway.state import GatewayState, gateway_state
from lmx_supervisor.errors import BadRequest
from lmx_supervisor.workers.spawn_settings import parse_overrides


class RestartRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    model_id: str | None = None
    # Spawn-time settings for the new worker; validated by parse_overrides
    # so an unknown key is a 400 naming `settings.KEY`.
    settings: dict[str, Any] | None = None
    # None: rolling when the memory guard says a second copy fits, else drain.
    mode: Literal["rolling", "drain"] | None = None
    all: bool = False


class ReloadRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """`POST /admin/config/reload` body (optional)."""

    # "rolling": also restart the models whose spawn-time settings changed.
    apply: Literal["rolling"] | None = None


class RestartAllRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    mode: Literal["rolling", "drain"] | None = None


async def _body(request: Request, kind: type[Any], state: GatewayState) -> Any:
    raw = await read_body(request, state.config.server.max_request_body_bytes)
    require_json(request, raw)  # an empty body means the defaults
    return decode_json(raw if raw.strip() else b"{}", kind)


async def restart_all_models(state: GatewayState, mode: Literal["rolling", "drain"] | None
                             ) -> Response:
    supervisor = state.supervisor
    results = await supervisor.restart_many({m: {} for m in supervisor.loaded_ids()},
                                            mode=mode)
    return JSONResponse({"success": all(r["success"] for r in results),
                         "restarted": sum(1 for r in results if r["success"]),
                         "results": results})


async def restart_model(request: Request) -> Response:
    state = gateway_state(request)
    req: RestartRequest = await _body(request, RestartRequest, state)
    if req.all:
        if req.model_id is not None or req.settings:
            raise BadRequest("all restarts every loaded model with its own settings: give "
                             "neither model_id nor settings with it", param="all")
        return await restart_all_models(state, req.mode)
    if req.model_id is None:
        raise BadRequest("model_id is required (or all: true)", param="model_id",
                         code="missing_required_parameter")
    overrides = parse_overrides(req.settings, "settings")
    done = await state.supervisor.restart(req.model_id, overrides, req.mode)
    return JSONResponse({"success": True, **done})


async def restart_all(request: Request) -> Response:
    state = gateway_state(request)
    req: RestartAllRequest = await _body(request, RestartAllRequest, state)
    return await restart_all_models(state, req.mode)


async def read_reload_request(request: Request) -> ReloadRequest:
    req: ReloadRequest = await _body(request, ReloadRequest, gateway_state(request))
    return req


async def apply_spawn_settings(state: GatewayState, req: ReloadRequest) -> dict[str, Any]:
    """After a config reload: with `apply: rolling`, restart one at a time
    each model whose spawn-time settings the new config changes; without
    it, only say which would change (when any would)."""
    pending = state.supervisor.spawn_settings_pending()
    if req.apply is None:
        return {"models_restart_pending": pending} if pending else {}
    results = await state.supervisor.restart_many(pending, remember=False)
    return {"restarts": results}


ROUTES = [
    ScopedRoute(ADMIN, "/admin/models/restart", restart_model, methods=["POST"],
                body=RestartRequest, errors=LOAD_ERRORS),
    ScopedRoute(ADMIN, "/admin/models/restart-all", restart_all, methods=["POST"],
                body=RestartAllRequest, errors=LOAD_ERRORS),
]
