"""Rendering every failure over HTTP. The supervisor's errors carry a code
and a kind; this module decides the HTTP status of each kind, OpenAI's error
type, the `Retry-After` header, and the hints that name routes (only the
gateway knows its routes). Bodies are OpenAI's shape,
`{"error": {"message", "type", "code", "param"}}`; the Anthropic routes
render the same status in their own shape (`anthropic_errors`)."""

from __future__ import annotations

import logging

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from lmx_supervisor.errors import ErrorKind, LMXError

log = logging.getLogger("lmx.gateway")

STATUS_OF_KIND = {
    ErrorKind.INVALID: 400,
    ErrorKind.FORBIDDEN: 403,
    ErrorKind.NOT_FOUND: 404,
    ErrorKind.CONFLICT: 409,
    ErrorKind.TOO_LARGE: 413,
    ErrorKind.MEDIA_TYPE: 415,
    ErrorKind.UNSUPPORTED: 422,
    ErrorKind.BUSY: 429,
    ErrorKind.INTERNAL: 500,
    ErrorKind.UPSTREAM: 502,
    ErrorKind.UNAVAILABLE: 503,
    ErrorKind.NODE_UNREACHABLE: 503,
    ErrorKind.TIMEOUT: 504,
    ErrorKind.NO_RESOURCES: 507,
}
# OpenAI's `error.type` for each kind (its SDKs pick exception classes by status).
_OPENAI_TYPE_OF_KIND = {
    ErrorKind.INVALID: "invalid_request_error",
    ErrorKind.FORBIDDEN: "permission_error",
    ErrorKind.NOT_FOUND: "invalid_request_error",
    ErrorKind.CONFLICT: "invalid_request_error",
    ErrorKind.TOO_LARGE: "invalid_request_error",
    ErrorKind.MEDIA_TYPE: "invalid_request_error",
    ErrorKind.UNSUPPORTED: "invalid_request_error",
    ErrorKind.BUSY: "rate_limit_error",
    ErrorKind.TIMEOUT: "timeout_error",
}
# What to do next, where the answer is a route of this gateway.
_ROUTE_HINTS = {
    "no-model-loaded": "load one with POST /admin/models/load",
    "model_incomplete": "re-download it (POST /admin/models/load with auto_download) or "
                        "delete it (DELETE /admin/models/{id})",
    "invalid_model_id": "ids are listed by GET /admin/models/available",
}


def status_of(exc: LMXError) -> int:
    return STATUS_OF_KIND[exc.kind]


def openai_type_of(exc: LMXError) -> str:
    return _OPENAI_TYPE_OF_KIND.get(exc.kind, "server_error")


def message_of(exc: LMXError) -> str:
    hint = _ROUTE_HINTS.get(exc.code)
    return f"{exc.message} ({hint})" if hint else exc.message


def headers_of(exc: LMXError) -> dict[str, str]:
    if exc.retry_after_sec is None:
        return {}
    return {"Retry-After": str(exc.retry_after_sec)}


def error_body(message: str, type_: str, code: str | None, param: str | None = None
               ) -> dict[str, dict[str, str | None]]:
    return {"error": {"message": message, "type": type_, "code": code, "param": param}}


def error_payload(exc: LMXError) -> dict[str, dict[str, str | None]]:
    return error_body(message_of(exc), openai_type_of(exc), exc.code, exc.param)


def error_response(exc: LMXError) -> JSONResponse:
    return JSONResponse(error_payload(exc), status_code=status_of(exc), headers=headers_of(exc))


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
