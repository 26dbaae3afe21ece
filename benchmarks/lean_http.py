"""A small streaming HTTP/1.1 client for the benchmarks' load generators.

On a 2-core host the client shares the cores with the server it measures: every
millisecond the client spends per streamed token is taken from the model's decode
threads (llama.cpp's threads meet at every op, so one preempted thread stalls both).
LMX's clients mostly sit on other machines of the LAN; here they cannot, so the
client must cost as little as possible per token:

- each stream is read by its own thread with a blocking socket (one `recv` per
  arrival, no event loop between the kernel and the reader: the asyncio reader this
  replaces cost ~0.2 ms of CPU a chunk, httpx ~0.3 ms);
- while the stream runs the thread only de-chunks and splits lines and notes when
  each line arrived; the JSON of the events is parsed after the stream has ended.

The same client serves every HTTP peer in a run, so the ratios stay like for like;
in-process peers need no client at all. Plain `http://` only, one request per
connection (`Connection: close`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

_MAX_HEADER_BYTES = 64 * 1024
_RECV_BYTES = 65536


class HttpError(Exception):
    """The server broke the protocol or the connection."""


@dataclass
class TimedBody:
    """A response as it arrived: status, headers, the body's lines each with the
    perf_counter time its last byte was received."""

    status: int
    headers: dict[str, str]
    lines: list[tuple[float, bytes]] = field(default_factory=list)

    def text(self) -> str:
        return "\n".join(line.decode(errors="replace") for _, line in self.lines)


class _LineSplitter:
    """De-chunks a body fed in pieces (chunked, sized or up to close) into lines."""

    def __init__(self, headers: dict[str, str], out: list[tuple[float, bytes]]) -> None:
        self.chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        length = headers.get("content-length")
        self.left = int(length) if length is not None and not self.chunked else None
        self.out = out
        self.raw = b""             # chunked framing not yet consumed
        self.chunk_left = -1       # bytes of the current chunk still to come; -1: a size line
        self.skip_crlf = False     # the CRLF after a chunk's data is due
        self.pending = b""         # a body line not yet ended
        self.done = False

    def feed(self, data: bytes, now: float) -> None:
        if not self.chunked:
            if self.left is not None:
                data = data[:self.left]
                self.left -= len(data)
                self.done = self.left == 0
            self._body(data, now)
            return
        raw = self.raw + data
        pos = 0
        while pos < len(raw):
            if self.skip_crlf:
                if len(raw) - pos < 2:
                    break
                pos += 2
                self.skip_crlf = False
            elif self.chunk_left < 0:
                end = raw.find(b"\r\n", pos)
                if end < 0:
                    break
                size = int(raw[pos:end].split(b";", 1)[0].strip() or b"0", 16)
                pos = end + 2
                if size == 0:
                    self.done = True
                    break
                self.chunk_left = size
            else:
                take = raw[pos:pos + self.chunk_left]
                pos += len(take)
                self.chunk_left -= len(take)
                self._body(take, now)
                if self.chunk_left == 0:
                    self.chunk_left = -1
                    self.skip_crlf = True
        self.raw = raw[pos:]

    def _body(self, data: bytes, now: float) -> None:
        pending = self.pending + data
        *complete, self.pending = pending.split(b"\n")
        self.out.extend((now, line.rstrip(b"\r")) for line in complete)

    def close(self, now: float) -> None:
        if self.pending:
            self.out.append((now, self.pending))
            self.pending = b""


def post_json_blocking(url: str, body: dict[str, Any], timeout: float) -> TimedBody:
    """POST `body` as JSON and read the whole response, noting when each body
    line arrived. Blocking: run it in a thread. `timeout` bounds the whole call."""
    parts = urlsplit(url)
    if parts.scheme != "http" or parts.hostname is None:
        raise ValueError(f"lean_http speaks plain http:// only, not {url!r}")
    port = parts.port or 80
    payload = json.dumps(body).encode()
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    request = (f"POST {target} HTTP/1.1\r\nHost: {parts.hostname}:{port}\r\n"
               "Content-Type: application/json\r\nAccept: text/event-stream\r\n"
               f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n").encode() + payload
    deadline = time.monotonic() + timeout
    with socket.create_connection((parts.hostname, port), timeout=timeout) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(request)
        head = b""
        while b"\r\n\r\n" not in head:
            data = _recv(sock, deadline)
            if not data:
                raise HttpError("connection closed before the response headers")
            head += data
            if len(head) > _MAX_HEADER_BYTES:
                raise HttpError("response headers too large")
        now = time.perf_counter()
        head, _, rest = head.partition(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        fields = status_line.split(" ", 2)
        if len(fields) < 2 or not fields[0].startswith("HTTP/") or not fields[1].isdigit():
            raise HttpError(f"not an HTTP status line: {status_line[:80]!r}")
        headers: dict[str, str] = {}
        for line in header_lines:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        response = TimedBody(int(fields[1]), headers)
        splitter = _LineSplitter(headers, response.lines)
        splitter.feed(rest, now)
        while not splitter.done:
            data = _recv(sock, deadline)
            now = time.perf_counter()
            if not data:
                if splitter.chunked or splitter.left:
                    raise HttpError("connection closed inside the body")
                break
            splitter.feed(data, now)
        splitter.close(time.perf_counter())
        return response


def _recv(sock: socket.socket, deadline: float) -> bytes:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("the response took longer than the timeout")
    sock.settimeout(left)
    try:
        return sock.recv(_RECV_BYTES)
    except OSError as exc:
        if isinstance(exc, TimeoutError):
            raise
        raise HttpError(f"{type(exc).__name__}: {exc}") from exc


async def in_thread(url: str, body: dict[str, Any], timeout: float) -> TimedBody:
    """post_json_blocking on a thread of its own (a pool would cap how many
    streams run at once), awaited without blocking the event loop."""
    result: concurrent.futures.Future[TimedBody] = concurrent.futures.Future()
    result.set_running_or_notify_cancel()  # an awaiter's cancel leaves the thread be

    def run() -> None:
        try:
            result.set_result(post_json_blocking(url, body, timeout))
        except BaseException as exc:  # handed to the awaiting task
            result.set_exception(exc)

    threading.Thread(target=run, name="lean-http", daemon=True).start()
    return await asyncio.wrap_future(result)


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


def read_chat_events(response: TimedBody) -> ChatStream:
    """The chat completion in an SSE body, timed by when each event arrived."""
    out = ChatStream(response.status)
    if response.status != 200:
        out.error = f"HTTP {response.status}: {response.text()[:200]}"
        return out
    for arrived, line in response.lines:
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
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
                if out.first is None:
                    out.first = arrived
                out.last = arrived
                out.deltas += 1
                out.parts.append(content)
            out.finish = choice.get("finish_reason") or out.finish
    return out


async def stream_chat(url: str, body: dict[str, Any], timeout: float = 600.0) -> ChatStream:
    """POST a streaming chat completion to `url` and read it to its end."""
    return read_chat_events(await in_thread(url, body, timeout))
