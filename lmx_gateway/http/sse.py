"""Server-sent events: framing, and a response that always notices a client
that went away.

Starlette's StreamingResponse watches for disconnects only under some ASGI
spec versions and otherwise learns of them when a write fails, leaving the
body generator for the garbage collector to close. A generation must stop
the moment its reader leaves, so this response watches `receive()` itself
and closes the generator explicitly, which sends the worker its Abort.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

import anyio
import msgspec
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

_json = msgspec.json.Encoder()

DONE = b"data: [DONE]\n\n"


def sse_data(payload: Any) -> bytes:
    return b"data: " + _json.encode(payload) + b"\n\n"


def sse_event(event: str, payload: Any) -> bytes:
    return f"event: {event}\n".encode() + sse_data(payload)


class EventStreamResponse(Response):
    def __init__(self, events: AsyncGenerator[bytes, None],
                 headers: dict[str, str] | None = None,
                 on_close: Callable[[], Awaitable[None]] | None = None) -> None:
        # Response.__init__ is skipped on purpose: it would render a body and
        # a content-length; a stream has neither.
        self.events = events
        # Runs however the response ends, even when `events` never started
        # (closing an unstarted generator skips its finally blocks).
        self.on_close = on_close
        self.status_code = 200
        self.background = None
        merged = {
            "content-type": "text/event-stream; charset=utf-8",
            "cache-control": "no-cache",
            "x-accel-buffering": "no",  # proxies must not buffer tokens
            **(headers or {}),
        }
        self.raw_headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in merged.items()]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send({"type": "http.response.start", "status": 200,
                        "headers": self.raw_headers})
            async with anyio.create_task_group() as group:

                async def pump() -> None:
                    try:
                        async for chunk in self.events:
                            await send({"type": "http.response.body", "body": chunk,
                                        "more_body": True})
                        await send({"type": "http.response.body", "body": b"",
                                    "more_body": False})
                    finally:
                        group.cancel_scope.cancel()

                async def watch_disconnect() -> None:
                    while True:
                        message = await receive()
                        if message["type"] == "http.disconnect":
                            group.cancel_scope.cancel()
                            return

                group.start_soon(pump)
                group.start_soon(watch_disconnect)
        except OSError:
            pass  # the client went away mid-write
        finally:
            try:
                await self.events.aclose()
            finally:
                if self.on_close is not None:
                    await self.on_close()
