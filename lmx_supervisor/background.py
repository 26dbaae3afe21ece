"""Background loops that cannot die silently.

A `SupervisedTask` runs a coroutine factory; if the coroutine raises or
returns (both unexpected for a loop meant to run until cancelled), the
failure is logged, counted and kept as a reason for /readyz, and the loop is
started again after a short pause. /readyz stays red for `RECENT_SEC` after
a failure, so an operator sees it even though routing already resumed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

log = logging.getLogger("lmx.supervisor")

RESTART_DELAY_SEC = 0.5
RECENT_SEC = 30.0


class SupervisedTask:
    def __init__(self, name: str, factory: Callable[[], Coroutine[Any, Any, None]]) -> None:
        self.name = name
        self._factory = factory
        self._task: asyncio.Task[None] | None = None
        self.failures = 0
        self.last_failure: str | None = None
        self._failed_at: float | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._keep_running(), name=self.name)

    async def _keep_running(self) -> None:
        while True:
            try:
                await self._factory()
                why = "ended"
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.exception("background task %s failed; restarting it", self.name)
                why = f"{type(exc).__name__}: {exc}"
            else:
                log.error("background task %s ended unexpectedly; restarting it", self.name)
            self.failures += 1
            self.last_failure = why
            self._failed_at = time.monotonic()
            await asyncio.sleep(RESTART_DELAY_SEC)

    def problem(self) -> str | None:
        """Why readiness is in doubt, or None."""
        if self._task is not None and self._task.done():
            return f"{self.name} is not running"
        if self._failed_at is not None and time.monotonic() - self._failed_at < RECENT_SEC:
            return (f"{self.name} failed ({self.last_failure}) and was restarted "
                    f"{time.monotonic() - self._failed_at:.0f}s ago")
        return None

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
