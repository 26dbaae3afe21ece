"""Load shedding: while the machine's used memory is
above `memory.load_shedding_percent`, every request except the health
probes gets 503 `overloaded` with `Retry-After: 30`, before any work is
done for it. The threshold is read from the live config on every request.

A pure ASGI middleware (no BaseHTTPMiddleware buffering); the memory
figure is sampled at most every SAMPLE_SEC, so a burst of requests costs
one read of /proc/meminfo, not one each.
"""

from __future__ import annotations

import logging
import time

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from lmx_gateway.http.anthropic_errors import anthropic_error_body, is_messages_path
from lmx_gateway.http.errors import error_body
from lmx_gateway.state import GatewayState
from lmx_supervisor.memory.process_memory import system_memory

log = logging.getLogger("lmx.gateway")

EXEMPT_PATHS = frozenset({"/healthz", "/readyz", "/admin/health"})
SAMPLE_SEC = 0.25
RETRY_AFTER_SEC = 30
MESSAGE = "Server under memory pressure"


class LoadSheddingMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._sampled_at = float("-inf")
        self._percent = 0.0
        self._shedding = False

    def _used_percent(self) -> float:
        now = time.monotonic()
        if now - self._sampled_at >= SAMPLE_SEC:
            self._percent = system_memory().percent
            self._sampled_at = now
        return self._percent

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in EXEMPT_PATHS:
            await self.app(scope, receive, send)
            return
        state = getattr(scope["app"].state, "lmx", None)
        if not isinstance(state, GatewayState):  # lifespan not run yet
            await self.app(scope, receive, send)
            return
        threshold = state.config.memory.load_shedding_percent
        percent = self._used_percent()
        if percent < threshold:
            if self._shedding:
                self._shedding = False
                log.info("memory back to %.1f%% (< %g%%): load shedding ends", percent,
                         threshold)
            await self.app(scope, receive, send)
            return
        if not self._shedding:
            self._shedding = True
            log.warning("memory at %.1f%% (>= memory.load_shedding_percent %g%%): shedding "
                        "every request but health probes", percent, threshold)
            state.supervisor.emit("memory_warning", {
                "reason": "load_shedding", "used_percent": round(percent, 1),
                "load_shedding_percent": threshold})
        body = (anthropic_error_body(503, MESSAGE) if is_messages_path(scope["path"])
                else error_body(MESSAGE, "server_error", "overloaded"))
        response = JSONResponse(body, status_code=503,
                                headers={"Retry-After": str(RETRY_AFTER_SEC)})
        await response(scope, receive, send)
