"""Per-request context: the `X-Request-ID` every response carries and every
log record names, and the InferenceRecord opened for each `POST /v1/*`.

A pure ASGI middleware rather than Starlette's BaseHTTPMiddleware, which
would buffer streams through an extra task and queue."""

from __future__ import annotations

import logging
import re
import secrets
from contextvars import ContextVar

import msgspec
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lmx_gateway.observability.inference_record import InferenceRecord, current_record
from lmx_gateway.observability.metrics import clean_client_id
from lmx_gateway.state import GatewayState

REQUEST_ID_HEADER = b"x-request-id"
CLIENT_ID_HEADER = b"x-client-id"
# A client's id is echoed into headers and logs, so only a tame shape is kept.
_SANE_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")

request_id_var: ContextVar[str | None] = ContextVar("lmx_request_id", default=None)


def new_request_id() -> str:
    return secrets.token_hex(12)


def accept_request_id(raw: bytes | None) -> str:
    if raw:
        text = raw.decode("latin-1").strip()
        if _SANE_ID.fullmatch(text):
            return text
    return new_request_id()


class RequestIdFilter(logging.Filter):
    """Stamps the current request id on every record logged while serving it
    (uvicorn's access lines included)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            rid = request_id_var.get()
            if rid is not None:
                record.request_id = rid
        return True


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value)
    return None


def _gateway_state(scope: Scope) -> GatewayState | None:
    app = scope.get("app")
    state = getattr(getattr(app, "state", None), "lmx", None)
    return state if isinstance(state, GatewayState) else None


def _error_from_body(body: bytes) -> tuple[str, str] | None:
    try:
        payload = msgspec.json.decode(body)
        error = payload["error"]
        return str(error.get("code") or error.get("type")), str(error.get("message", ""))
    except (msgspec.DecodeError, KeyError, TypeError, AttributeError):
        return None


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = accept_request_id(_header(scope, REQUEST_ID_HEADER))
        rid_header = (REQUEST_ID_HEADER, rid.encode("latin-1"))
        record: InferenceRecord | None = None
        if scope["method"] == "POST" and scope["path"].startswith("/v1/"):
            state = _gateway_state(scope)
            if state is not None:
                raw_client = _header(scope, CLIENT_ID_HEADER)
                client = clean_client_id(raw_client.decode("latin-1") if raw_client else None)
                record = InferenceRecord(state.metrics, state.events, rid, client,
                                         scope["path"])
        rid_token = request_id_var.set(rid)
        record_token = current_record.set(record)
        started = False
        closed = False

        def close_record() -> None:
            nonlocal closed
            if record is not None and not closed:
                closed = True
                record.finish()

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = list(message.get("headers", []))
                if not any(k.lower() == REQUEST_ID_HEADER for k, _ in headers):
                    headers.append(rid_header)
                message = {**message, "headers": headers}
                if record is not None:
                    record.status = int(message["status"])
            elif (message["type"] == "http.response.body" and record is not None
                  and record.status >= 400 and record.error_code is None):
                found = _error_from_body(message.get("body", b""))
                if found is not None:
                    record.on_error(*found)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                # Closed before the body's last byte leaves: a client that has
                # read the whole response then finds its request counted
                # (metrics, request_completed), never a moment later.
                close_record()
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as exc:
            if record is not None:
                if not started:
                    record.status = 500
                record.on_error("internal_error", type(exc).__name__)
            raise
        finally:
            close_record()  # a response cut short (client gone, error) never sent its end
            current_record.reset(record_token)
            request_id_var.reset(rid_token)
