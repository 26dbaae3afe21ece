"""Stopping work whose client has gone away, for answers sent whole.

A stream notices a departed reader when its response watches `receive()`
(sse.py). A whole answer sends nothing until the end, so nothing would
notice: the generation would run to max_tokens holding a slot for up to
`models.inference_timeout_sec`. The request-context middleware keeps each
request's ASGI `receive` here; `abort_on_disconnect` watches it while the
answer is computed and cancels that work when `http.disconnect` arrives
(closing the generation, which aborts it in the worker), raising
ClientDisconnected, which no client will read. The body has been read by
then, so the only message `receive()` can still deliver is the disconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextvars import ContextVar

from starlette.types import Receive

from lmx_supervisor.errors import ErrorKind, LMXError

client_receive: ContextVar[Receive | None] = ContextVar("lmx_client_receive", default=None)


class ClientDisconnected(LMXError):
    kind = ErrorKind.UNAVAILABLE
    code = "client_disconnected"


@contextlib.asynccontextmanager
async def abort_on_disconnect() -> AsyncIterator[None]:
    receive = client_receive.get()
    task = asyncio.current_task()
    if receive is None or task is None:
        yield
        return
    gone = False

    async def watch() -> None:
        nonlocal gone
        while (await receive())["type"] != "http.disconnect":
            pass
        gone = True
        task.cancel()

    watcher = asyncio.create_task(watch(), name="lmx-disconnect-watch")
    try:
        yield
    except asyncio.CancelledError:
        if gone and task.uncancel() == 0:
            raise ClientDisconnected("The client closed the connection") from None
        raise
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
