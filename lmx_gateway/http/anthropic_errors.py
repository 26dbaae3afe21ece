"""Anthropic's error shape, `{"type": "error", "error": {"type", "message"}}`,
used on the `/v1/messages` routes (their SDK reads it), with the error type
Anthropic gives each HTTP status."""

from __future__ import annotations

from typing import Any

MESSAGES_PATH_PREFIX = "/v1/messages"

_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                403: "permission_error", 404: "not_found_error", 409: "invalid_request_error",
                413: "request_too_large", 415: "invalid_request_error",
                421: "invalid_request_error", 422: "invalid_request_error",
                429: "rate_limit_error", 503: "overloaded_error", 504: "timeout_error"}


def anthropic_error_type(status: int) -> str:
    return _ERROR_TYPES.get(status, "api_error")


def anthropic_error_body(status: int, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": anthropic_error_type(status), "message": message}}


def is_messages_path(path: str) -> bool:
    return path == MESSAGES_PATH_PREFIX or path.startswith(MESSAGES_PATH_PREFIX + "/")
