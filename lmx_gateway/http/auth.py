"""API keys: `security.admin_key` guards `/admin/*`,
`security.inference_api_key` guards `/v1/*` and Ollama's `/api/*`.

- Profile `lan`: a key is required only when configured.
- Profile `cloud`: both keys are required; startup refuses without them
  (config.load_config), and should one be missing anyway the routes fail
  closed rather than open.

The keys are read from the live config on every request, so a config reload
that changes them takes effect on the next request. Comparison is constant
time; neither the configured key nor what the client sent is ever logged,
published or echoed. Probes and discovery stay open.
"""

from __future__ import annotations

import hmac
from typing import Any

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from lmx_gateway.http.anthropic_errors import anthropic_error_body, is_messages_path
from lmx_gateway.http.errors import error_body
from lmx_supervisor.config import Config, SecurityConfig

# Open whatever the keys: probes, discovery, and the dashboard page itself
# (it holds no data; its scripts send the admin key to the data endpoints).
PUBLIC_PATHS = frozenset({
    "/healthz", "/readyz", "/v1/discovery", "/.well-known/opta-lmx", "/admin/dashboard",
})

ADMIN_KEY_HEADERS = (b"x-admin-key",)
INFERENCE_KEY_HEADERS = (b"x-api-key",)


def _bearer(value: bytes) -> bytes | None:
    scheme, _, token = value.partition(b" ")
    if scheme.lower() != b"bearer":
        return None
    return token.strip() or None


def presented_keys(scope: Scope, extra_headers: tuple[bytes, ...]) -> list[bytes]:
    """Every credential the request carries: `Authorization: Bearer` plus the
    family's own header."""
    found: list[bytes] = []
    for name, value in scope["headers"]:
        if name == b"authorization":
            token = _bearer(value)
            if token is not None:
                found.append(token)
        elif name in extra_headers and value.strip():
            found.append(bytes(value).strip())
    return found


def key_matches(expected: str, presented: list[bytes]) -> bool:
    want = expected.encode("utf-8")
    matched = False
    for candidate in presented:
        # No early exit: every candidate is compared, in constant time.
        matched |= hmac.compare_digest(want, candidate)
    return matched


class AuthMiddleware:
    def __init__(self, app: ASGIApp, initial_config: Config) -> None:
        self.app = app
        self._initial = initial_config

    def _security(self, scope: Scope) -> SecurityConfig:
        # The lifespan's state holds the live (reloadable) config.
        state = getattr(getattr(scope.get("app"), "state", None), "lmx", None)
        config = getattr(state, "config", None)
        if isinstance(config, Config):
            return config.security
        return self._initial.security

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        if path in PUBLIC_PATHS:
            await self.app(scope, receive, send)
            return
        security = self._security(scope)
        if path == "/admin" or path.startswith("/admin/"):
            key, headers, status = security.admin_key, ADMIN_KEY_HEADERS, 403
            body: dict[str, Any] = error_body("Invalid or missing admin key", "permission_error",
                              "permission_denied")
        elif path.startswith(("/v1/", "/api/")):  # /api/: Ollama's API, inference scope
            key, headers, status = security.inference_api_key, INFERENCE_KEY_HEADERS, 401
            body = error_body("Invalid or missing API key", "authentication_error",
                              "authentication_error")
            if is_messages_path(path):  # the Anthropic SDK reads its own error shape
                body = anthropic_error_body(401, "Invalid or missing API key")
            elif path.startswith("/api/"):  # Ollama's clients read {"error": "..."}
                body = {"error": "Invalid or missing API key"}
        else:
            await self.app(scope, receive, send)
            return
        key = key or None  # an empty key is no key, as for the cloud check
        required = key is not None or security.profile == "cloud"
        if not required or (key is not None and key_matches(key, presented_keys(scope, headers))):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        extra = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        await JSONResponse(body, status_code=status, headers=extra)(scope, receive, send)
