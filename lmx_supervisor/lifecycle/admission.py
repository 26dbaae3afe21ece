"""Bounded admission with a wait budget: at most `limit` requests in flight
per model; the rest queue FIFO (at most `max_queued` of them: past it a
request is refused at once, → 429 queue_full) and give up after a timeout
(→ 429).

Hand-rolled rather than asyncio.Semaphore + wait_for because on Python 3.11
wait_for can time out after the acquire already succeeded and leak a slot;
here a permit is handed directly to the next waiter's future, and a waiter
that times out checks whether it was handed one at the last moment.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque


class AdmissionTimeout(Exception):
    pass


class AdmissionQueueFull(Exception):
    pass


class AdmissionGate:
    def __init__(self, limit: int, max_queued: int | None = None) -> None:
        self.limit = limit
        self.max_queued = max_queued  # None: unbounded
        self.active = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        # Paused (a drain restart): no permit is handed out, arrivals queue
        # (still bounded by their own timeout) until resume().
        self.paused = False
        self._emptied = asyncio.Event()

    @property
    def queued(self) -> int:
        return sum(1 for fut in self._waiters if not fut.done())

    async def acquire(self, timeout: float) -> None:
        if self.active < self.limit and not self.queued and not self.paused:
            self.active += 1
            return
        if self.max_queued is not None and self.queued >= self.max_queued:
            raise AdmissionQueueFull
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await asyncio.wait_for(asyncio.shield(fut), timeout)
        except TimeoutError:
            if fut.done() and not fut.cancelled():
                return  # handed a permit as the clock ran out: keep it
            fut.cancel()
            self._discard(fut)
            raise AdmissionTimeout from None
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()  # we own a permit nobody will use
            else:
                fut.cancel()
                self._discard(fut)
            raise

    def release(self) -> None:
        # Over a lowered limit a freed permit retires instead of passing on.
        while self._waiters and self.active <= self.limit and not self.paused:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)  # the permit passes on; active unchanged
                return
        self.active -= 1
        if self.active == 0:
            self._emptied.set()

    def pause(self) -> None:
        self.paused = True

    async def wait_empty(self, timeout: float) -> bool:
        """While paused: wait until every permit is back (True) or `timeout`."""
        while self.active > 0:
            self._emptied.clear()
            try:
                await asyncio.wait_for(self._emptied.wait(), timeout)
            except TimeoutError:
                return self.active == 0
        return True

    def resume(self) -> None:
        self.paused = False
        self._admit_waiters()

    def resize(self, limit: int) -> None:
        """Change the limit in place (config reload). Raising it admits
        waiters now; lowering it takes effect as permits are released."""
        self.limit = limit
        self._admit_waiters()

    def _admit_waiters(self) -> None:
        while self._waiters and self.active < self.limit and not self.paused:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                self.active += 1

    def _discard(self, fut: asyncio.Future[None]) -> None:
        with contextlib.suppress(ValueError):
            self._waiters.remove(fut)
