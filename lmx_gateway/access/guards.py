"""What a route checks before its handler runs (called by
`ScopedRoute.handle`): first where a browser request comes from, then the
key its scope needs.

Origin: browsers send `Origin` on every cross-origin request and on
same-origin POSTs. A request whose Origin is neither this server itself nor
listed in `server.cors_origins` is refused with 403 on every route but the
health probes, whatever its method or content type: a web page on another
site (or a DNS-rebinding page) cannot drive the server through the
visitor's browser, not even with `mode: "no-cors"`. Clients that are not
browsers send no Origin and are unaffected.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Scope

from lmx_gateway.access.auth import check_admin, check_inference
from lmx_gateway.http.anthropic_errors import anthropic_error_body, is_messages_path
from lmx_gateway.http.errors import error_body
from lmx_gateway.observability.inference_record import current_record
from lmx_supervisor.config import Config

OLLAMA_PATH_PREFIX = "/api/"
_DEFAULT_PORTS = {"http": 80, "https": 443}


def refusal(scope: Scope, status: int, message: str, type_: str, code: str,
            headers: dict[str, str] | None = None) -> JSONResponse:
    """An error in the route family's own shape (Anthropic's on /v1/messages,
    Ollama's `{"error": ...}` on /api/)."""
    body: dict[str, Any]
    if is_messages_path(scope["path"]):
        body = anthropic_error_body(status, message)
    elif scope["path"].startswith(OLLAMA_PATH_PREFIX):
        body = {"error": message}
    else:
        body = error_body(message, type_, code)
    return JSONResponse(body, status_code=status, headers=headers)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value).decode("latin-1")
    return None


def _origin_key(scheme: str, netloc: str) -> tuple[str, str, int] | None:
    try:
        parts = urlsplit(f"{scheme}://{netloc}")
        port = parts.port
    except ValueError:
        return None
    if not parts.hostname:
        return None
    return scheme, parts.hostname.lower(), port or _DEFAULT_PORTS.get(scheme, 0)


def normalize_origin(origin: str) -> str:
    return origin.strip().rstrip("/").lower()


def same_origin(scope: Scope, origin: str) -> bool:
    """The Origin is this server as the browser reached it: the request's own
    scheme and (already host-checked) Host header."""
    host = _header(scope, b"host")
    scheme_of_origin, sep, netloc = origin.partition("://")
    if host is None or not sep:
        return False
    mine = _origin_key(scope.get("scheme", "http"), host)
    theirs = _origin_key(scheme_of_origin.lower(), netloc)
    return mine is not None and mine == theirs


def origin_allowed(scope: Scope, config: Config) -> bool:
    origin = _header(scope, b"origin")
    if origin is None:
        return True  # not a browser, or a same-origin GET
    allowed = config.server.cors_origins
    if "*" in allowed or normalize_origin(origin) in {normalize_origin(o) for o in allowed}:
        return True
    return same_origin(scope, origin)


def _live_config(scope: Scope) -> Config | None:
    state = getattr(getattr(scope.get("app"), "state", None), "lmx", None)
    config = getattr(state, "config", None)
    return config if isinstance(config, Config) else None


def guard_route(scope: Scope, route_scope: str, *, any_origin: bool) -> ASGIApp | None:
    """None to go on to the handler, else the response that refuses. A
    refused request leaves no metrics, event or log line (keyless junk must
    not fill the per-client series); an admitted one may be labelled with
    its client."""
    refused = _verdict(scope, route_scope, any_origin)
    record = current_record.get()
    if record is not None:
        if refused is None:
            record.trust_client()
        else:
            record.discard()
    return refused


def _verdict(scope: Scope, route_scope: str, any_origin: bool) -> ASGIApp | None:
    config = _live_config(scope)
    if config is None:  # no lifespan (never in a served app): fail closed
        return refusal(scope, 503, "Server is starting", "server_error", "not_ready")
    if not any_origin and not origin_allowed(scope, config):
        return refusal(scope, 403, "Cross-origin request refused: this Origin is not in "
                       "server.cors_origins", "permission_error", "origin_not_allowed")
    if route_scope == "admin":
        if not check_admin(config.security, scope).allowed:
            return refusal(scope, 403, "Invalid or missing admin key", "permission_error",
                           "permission_denied")
    elif route_scope == "inference":
        verdict = check_inference(config.security, scope)
        if not verdict.allowed:
            return refusal(scope, 401, "Invalid or missing API key", "authentication_error",
                           "authentication_error", headers={"WWW-Authenticate": "Bearer"})
        record = current_record.get()
        if verdict.identity is not None and record is not None:
            # The key's name, not the client-supplied X-Client-ID.
            record.client = verdict.identity
    return None
