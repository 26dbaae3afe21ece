"""A small streaming HTTP/1.1 client for the benchmarks' load generators.

On a 2-core host the client shares the cores with the server it measures: every
millisecond the client spends per streamed token is taken from the model's decode
threads (llama.cpp's threads meet at every op, so one preempted thread stalls both).
httpx spent ~0.3 ms of CPU per SSE chunk here; this reader parses only what a
benchmark needs (status line, framing headers, chunked or close-delimited bodies) and
costs a fraction of that. The same client serves every HTTP peer in a run, so the
ratios stay like for like; in-process peers need no client at all.

Plain `http://` only, one request per connection (`Connection: close`).
`stream_chat` reads an OpenAI chat-completions SSE stream the way both benchmarks
time it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

_MAX_HEADER_BYTES = 64 * 1024


class HttpError(Exception):
    """The server broke the protocol or the connection."""


class StreamingResponse:
    def __init__(self, status: int, headers: dict[str, str], reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.status = status
        self.headers = headers
        self._reader = reader
        self._writer = writer

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as the server wrote it (chunked, sized or up to close)."""
        reader = self._reader
        if "chunked" in self.headers.get("transfer-encoding", "").lower():
            while True:
                size_line = await reader.readline()
                if not size_line:
                    raise HttpError("connection closed inside a chunked body")
                size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    return
                data = await reader.readexactly(size + 2)  # the chunk and its CRLF
                yield data[:-2]
        length = self.headers.get("content-length")
        if length is not None:
            yield await reader.readexactly(int(length))
            return
        while data := await reader.read(65536):
            yield data

    async def lines(self) -> AsyncIterator[str]:
        pending = b""
        async for data in self.chunks():
            pending += data
            *complete, pending = pending.split(b"\n")
            for line in complete:
                yield line.rstrip(b"\r").decode()
        if pending:
            yield pending.decode()

    async def read(self) -> bytes:
        return b"".join([data async for data in self.chunks()])

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()


async def post_json(url: str, body: dict[str, Any]) -> StreamingResponse:
    """POST `body` as JSON; the response with its headers read, body not yet."""
    parts = urlsplit(url)
    if parts.scheme != "http" or parts.hostname is None:
        raise ValueError(f"lean_http speaks plain http:// only, not {url!r}")
    port = parts.port or 80
    payload = json.dumps(body).encode()
    reader, writer = await asyncio.open_connection(parts.hostname, port)
    try:
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        writer.write(
            f"POST {target} HTTP/1.1\r\nHost: {parts.hostname}:{port}\r\n"
            "Content-Type: application/json\r\nAccept: text/event-stream\r\n"
            f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode() + payload)
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
        writer.close()
        raise HttpError(f"{type(exc).__name__}: {exc}") from exc
    if len(head) > _MAX_HEADER_BYTES:
        writer.close()
        raise HttpError("response headers too large")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    fields = status_line.split(" ", 2)
    if len(fields) < 2 or not fields[0].startswith("HTTP/") or not fields[1].isdigit():
        writer.close()
        raise HttpError(f"not an HTTP status line: {status_line[:80]!r}")
    headers: dict[str, str] = {}
    for line in header_lines:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return StreamingResponse(int(fields[1]), headers, reader, writer)


@dataclass
class ChatStream:
    """One streamed chat completion as a benchmark sees it."""

    status: int | None            # None: no response at all (see error)
    error: str | None = None      # non-200 body, an error chunk, or why there was no response
    first: float | None = None    # perf_counter at the first non-empty content delta
    last: float | None = None     # ... and at the last one
    deltas: int = 0
    usage_tokens: int | None = None  # completion_tokens of the usage chunk, if sent
    finish: str | None = None
    parts: list[str] = field(default_factory=list)


async def stream_chat(url: str, body: dict[str, Any]) -> ChatStream:
    """POST a streaming chat completion to `url` and read it to [DONE]."""
    resp = await post_json(url, body)
    out = ChatStream(resp.status)
    try:
        if resp.status != 200:
            text = (await resp.read()).decode(errors="replace")
            out.error = f"HTTP {resp.status}: {text[:200]}"
            return out
        async for line in resp.lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if chunk.get("error"):
                out.error = f"stream error: {json.dumps(chunk['error'])[:200]}"
                break
            if chunk.get("usage"):
                out.usage_tokens = int(chunk["usage"].get("completion_tokens", 0))
            for choice in chunk.get("choices") or []:
                content = (choice.get("delta") or {}).get("content")
                if content:
                    now = time.perf_counter()
                    if out.first is None:
                        out.first = now
                    out.last = now
                    out.deltas += 1
                    out.parts.append(content)
                out.finish = choice.get("finish_reason") or out.finish
    finally:
        await resp.close()
    return out
