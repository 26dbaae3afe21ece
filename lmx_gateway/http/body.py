"""Reading and validating JSON request bodies.

msgspec validates while it decodes; its error text names the JSON path of
the bad field, which becomes OpenAI's `param`."""

from __future__ import annotations

import asyncio
import re
from typing import TypeVar

import msgspec
from starlette.requests import Request

from lmx_gateway.http.json_depth import MAX_JSON_DEPTH, too_deep_raw, too_deep_value
from lmx_supervisor.errors import BadRequest, RequestTooLarge, UnsupportedMediaType

T = TypeVar("T")

_AT_PATH = re.compile(r" - at `\$\.?(.*)`$")
_MISSING = re.compile(r"Object missing required field `(.+)`")
# An integer literal this long may not fit in 64 bits (found by fuzzing).
_LONG_DIGITS = re.compile(rb"\d{19,}")
_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestTooLarge(f"Request body of {declared} bytes exceeds the {limit}-byte limit")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestTooLarge(f"Request body exceeds the {limit}-byte limit")
        chunks.append(chunk)
    return b"".join(chunks)


def _param_from(text: str) -> tuple[str | None, str]:
    match = _AT_PATH.search(text)
    where = match.group(1) if match else ""
    what = text[: match.start()] if match else text
    missing = _MISSING.match(what)
    if missing:
        field = f"{where}.{missing.group(1)}" if where else missing.group(1)
        return field, "missing_required_parameter"
    if what.startswith("Expected `"):
        return (where or None), ("invalid_value" if any(op in what for op in "<>=")
                                 else "invalid_type")
    return (where or None), "invalid_value"


def _oversized_int(node: object, path: str) -> str | None:
    """Where a free-form part of the body (tool arguments, metadata) holds an
    integer beyond 64 bits: the worker frames (msgpack) cannot carry it."""
    if isinstance(node, bool):
        return None
    if isinstance(node, int):
        return path if not _INT_MIN <= node <= _INT_MAX else None
    children: list[tuple[str, object]] = []
    if isinstance(node, dict):
        children = [(str(k), v) for k, v in node.items()]
    elif isinstance(node, list):
        children = [(str(i), v) for i, v in enumerate(node)]
    for name, child in children:
        found = _oversized_int(child, f"{path}.{name}" if path else name)
        if found is not None:
            return found
    return None


def _too_deep(param: str | None) -> BadRequest:
    return BadRequest(f"JSON nested deeper than {MAX_JSON_DEPTH} levels"
                      + (f" in {param}" if param else ""), param=param, code="too_deeply_nested")


def decode_json(raw: bytes, kind: type[T]) -> T:
    if not raw.strip():
        raise BadRequest("Request body is empty; expected a JSON object", code="invalid_json")
    try:
        value = msgspec.json.decode(raw, type=kind)
    except msgspec.ValidationError as exc:
        param, code = _param_from(str(exc))
        raise BadRequest(f"Invalid request: {exc}", param=param, code=code) from None
    except msgspec.DecodeError as exc:
        raise BadRequest(f"Malformed JSON: {exc}", code="invalid_json") from None
    except RecursionError:
        raise _too_deep(too_deep_raw(raw)) from None
    deep = too_deep_value(value)
    if deep is not None:
        raise _too_deep(deep)
    if _LONG_DIGITS.search(raw):  # rare: only then walk the request (depth is bounded now)
        where = _oversized_int(msgspec.to_builtins(value), "")
        if where is not None:
            raise BadRequest("Invalid request: an integer outside the 64-bit range",
                             param=where or None, code="invalid_value")
    return value


# Larger bodies are decoded and walked on a thread: a few MB of small JSON
# values take long enough to hold up every other request on the event loop.
OFF_LOOP_BYTES = 256 * 1024


def is_json_media_type(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/")
                                            and media.endswith("+json"))


def require_json(request: Request, raw: bytes) -> None:
    """415 unless the body is declared JSON. A browser may post text/plain
    or form data (or an untyped blob) to any site without a preflight; such
    a "simple" request never reaches a JSON route's handler. An empty body
    without a type falls through to the "body is empty" 400."""
    declared = request.headers.get("content-type")
    if declared is None and not raw:
        return
    if declared is None or not is_json_media_type(declared):
        raise UnsupportedMediaType(
            f"Content-Type must be application/json, not {(declared or 'none')[:80]!r}",
            param="Content-Type")


async def read_json(request: Request, kind: type[T], limit: int, *,
                    untyped_ok_without_origin: bool = False) -> T:
    """The body decoded as `kind`. `untyped_ok_without_origin`: a request
    that carries no Origin (so no browser page sent it) may omit the JSON
    Content-Type; Ollama's clients and documented `curl -d` calls do."""
    raw = await read_body(request, limit)
    if not (untyped_ok_without_origin and "origin" not in request.headers):
        require_json(request, raw)
    if len(raw) > OFF_LOOP_BYTES:
        return await asyncio.to_thread(decode_json, raw, kind)
    return decode_json(raw, kind)
