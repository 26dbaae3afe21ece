"""When a crashed worker may be restarted: a sliding window of monotonic
crash times (as OTP supervisors count restart intensity) plus exponential
backoff. Over the limit the model is quarantined; the server never halts."""

from __future__ import annotations

import time
from collections import deque


class CrashHistory:
    def __init__(self, max_crashes: int, window_sec: float) -> None:
        self.max_crashes = max_crashes
        self.window_sec = window_sec
        self._times: deque[float] = deque()

    def record(self, now: float | None = None) -> int:
        """Note a crash; return how many fall inside the window."""
        self._times.append(time.monotonic() if now is None else now)
        return self.recent(now)

    def recent(self, now: float | None = None) -> int:
        now = time.monotonic() if now is None else now
        while self._times and now - self._times[0] > self.window_sec:
            self._times.popleft()
        return len(self._times)

    def over_limit(self, now: float | None = None) -> bool:
        return self.recent(now) >= self.max_crashes

    def forget(self, times: set[float]) -> None:
        """Drop these crashes from the count (a poison request's, once it is
        quarantined: the model was not at fault)."""
        self._times = deque(t for t in self._times if t not in times)

    def clear(self) -> None:
        self._times.clear()


def backoff_delay(crashes: int, initial: float, maximum: float) -> float:
    return float(min(maximum, initial * 2 ** max(0, crashes - 1)))
