"""Rendering every failure in OpenAI's error shape,
`{"error": {"message", "type", "code", "param"}}`, with the runbook's codes."""

from __future__ import annotations

import logging

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from lmx_supervisor.errors import LMXError

log = logging.getLogger("lmx.gateway")


def error_body(message: str, type_: str, code: str | None, param: str | None = None
               ) -> dict[str, dict[str, str | None]]:
    return {"error": {"message": message, "type": type_, "code": code, "param": param}}


def error_payload(exc: LMXError) -> dict[str, dict[str, str | None]]:
    return error_body(exc.message, exc.type, exc.code, exc.param)


def error_response(exc: LMXError) -> JSONResponse:
    return JSONResponse(error_payload(exc), status_code=exc.status, headers=exc.headers)


async def handle_lmx_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, LMXError)
    return error_response(exc)


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}


async def handle_http_exception(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    return JSONResponse(error_body(str(exc.detail), "invalid_request_error", code),
                        status_code=exc.status_code, headers=exc.headers)


async def handle_unexpected(_request: Request, exc: Exception) -> Response:
    log.exception("unhandled error", exc_info=exc)
    return JSONResponse(
        error_body(f"Internal error: {type(exc).__name__}", "server_error", "internal_error"),
        status_code=500)


EXCEPTION_HANDLERS = {
    LMXError: handle_lmx_error,
    HTTPException: handle_http_exception,
    Exception: handle_unexpected,
}
