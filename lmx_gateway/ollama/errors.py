"""Ollama's error shape, `{"error": "..."}`, with the status LMX would
give (404 for an unknown model, 400 for bad input, 503/429/504...)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from lmx_gateway.http.errors import headers_of, message_of, status_of
from lmx_supervisor.errors import LMXError

log = logging.getLogger("lmx.gateway")

Handler = Callable[[Request], Awaitable[Response]]


def error_text(exc: LMXError) -> str:
    text = message_of(exc)
    if exc.param and exc.param.lower() not in text.lower():
        return f"{exc.param}: {text}"
    return text


def ollama_errors(handler: Handler) -> Handler:
    async def wrapped(request: Request) -> Response:
        try:
            return await handler(request)
        except LMXError as exc:
            return JSONResponse({"error": error_text(exc)}, status_code=status_of(exc),
                                headers=headers_of(exc))
        except Exception as exc:
            log.exception("unhandled error", exc_info=exc)
            return JSONResponse({"error": f"internal error: {type(exc).__name__}"},
                                status_code=500)
    return wrapped
