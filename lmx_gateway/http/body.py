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
from lmx_supervisor.errors import BadRequest, RequestTooLarge

T = TypeVar("T")

_AT_PATH = re.compile(r" - at `\$\.?(.*)`$")
_MISSING = re.compile(r"Object missing required field `(.+)`")


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
    return value


# Larger bodies are decoded and walked on a thread: a few MB of small JSON
# values take long enough to hold up every other request on the event loop.
OFF_LOOP_BYTES = 256 * 1024


async def read_json(request: Request, kind: type[T], limit: int) -> T:
    raw = await read_body(request, limit)
    if len(raw) > OFF_LOOP_BYTES:
        return await asyncio.to_thread(decode_json, raw, kind)
    return decode_json(raw, kind)
