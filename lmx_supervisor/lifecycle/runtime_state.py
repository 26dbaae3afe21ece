"""`~/.opta-lmx/runtime-state.json`: which models were loaded (so a restart
brings them back) and how the last runs ended (so a crash loop is noticed).

Crash-loop rule: a start that follows a run which did
not shut down cleanly is an *unclean start*. When this start makes
CRASH_LOOP_STARTS unclean starts within CRASH_LOOP_WINDOW_SEC, the server
comes up in safe mode: no auto_load, no restoration, so a model that takes
the host down on load cannot do it again and again. A clean shutdown (SIGTERM or
SIGINT) writes `last_clean_shutdown: true, startup_count: 0` and clears
the count.

Every write replaces the whole file atomically (atomic_json), so a SIGKILL
at any moment leaves either the previous state or the next one.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from lmx_supervisor.atomic_json import (
    read_json_or_set_aside,
    remove_stale_temp_files,
    write_json_atomic,
)

log = logging.getLogger("lmx.state")

FILE_NAME = "runtime-state.json"
CRASH_LOOP_STARTS = 3
CRASH_LOOP_WINDOW_SEC = 60.0


class LoadedModelRecord(msgspec.Struct, kw_only=True):
    model_id: str  # the id clients route by (the served name)
    path: str  # what the worker opened; reloading passes it as the ref
    backend: str
    served_name: str | None = None
    # Spawn-time settings chosen for this model (load performance_overrides,
    # restart settings), applied again when it is restored.
    settings: dict[str, Any] | None = None
    # The hosts of a sharded MLX model's ranks (None: one worker).
    shards: list[str] | None = None


class RuntimeState(msgspec.Struct, kw_only=True):
    loaded_models: list[LoadedModelRecord] = []
    # Starts since the last clean shutdown, this one included.
    startup_count: int = 0
    last_startup_at: float | None = None
    last_clean_shutdown: bool = True
    last_shutdown_at: float | None = None
    # Times of recent unclean starts, for the crash-loop window.
    unclean_starts: list[float] = []
    safe_mode: bool = False
    pid: int | None = None


@dataclass(frozen=True)
class StartupVerdict:
    safe_mode: bool
    # Models loaded when the previous run ended, to be loaded again.
    previous_models: list[LoadedModelRecord]
    startup_count: int
    unclean_starts_in_window: int


def _convert(data: Any) -> RuntimeState:
    return msgspec.convert(data, RuntimeState)


class RuntimeStateStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._state = RuntimeState()
        # Models of the previous run not restored yet (kept in the file so a
        # crash during restoration does not forget them).
        self._pending: list[LoadedModelRecord] = []
        self._frozen = False

    @property
    def state(self) -> RuntimeState:
        return self._state

    def begin_startup(self, now: float | None = None) -> StartupVerdict:
        now = time.time() if now is None else now
        remove_stale_temp_files(self.path)
        previous = read_json_or_set_aside(self.path, _convert)
        if previous is None or previous.last_clean_shutdown:
            unclean: list[float] = []
            count = 1
        else:
            unclean = [t for t in previous.unclean_starts
                       if 0 <= now - t <= CRASH_LOOP_WINDOW_SEC] + [now]
            count = previous.startup_count + 1
        safe = len(unclean) >= CRASH_LOOP_STARTS
        models = list(previous.loaded_models) if previous is not None else []
        self._pending = models
        self._state = RuntimeState(
            loaded_models=list(models), startup_count=count, last_startup_at=now,
            last_clean_shutdown=False,
            last_shutdown_at=previous.last_shutdown_at if previous else None,
            unclean_starts=unclean, safe_mode=safe, pid=os.getpid())
        self._write()
        return StartupVerdict(safe, models, count, len(unclean))

    def restore_done(self, model_id: str) -> None:
        """The previous run's model is loaded again, or could not be: stop
        carrying it as pending."""
        self._pending = [r for r in self._pending if r.model_id != model_id]

    def set_loaded(self, records: list[LoadedModelRecord]) -> None:
        """The models loaded right now (plus any still waiting to be
        restored). Ignored once shutdown has begun: unloading everything on
        the way out must not erase what to restore next time."""
        if self._frozen:
            return
        current = {r.model_id for r in records}
        merged = records + [r for r in self._pending if r.model_id not in current]
        if merged == self._state.loaded_models:
            return
        self._state.loaded_models = merged
        self._write()

    def freeze(self, records: list[LoadedModelRecord]) -> None:
        """Shutdown begins: remember what is loaded now, then ignore the
        unloads that follow. In safe mode the models not restored are
        dropped: a clean stop is the operator's acknowledgement."""
        if self._frozen:
            return
        pending = [] if self._state.safe_mode else self._pending
        current = {r.model_id for r in records}
        self._state.loaded_models = records + [r for r in pending if r.model_id not in current]
        self._frozen = True

    def mark_clean_shutdown(self, now: float | None = None) -> None:
        self._state.last_clean_shutdown = True
        self._state.startup_count = 0
        self._state.unclean_starts = []
        self._state.safe_mode = False
        self._state.last_shutdown_at = time.time() if now is None else now
        self._write()

    def _write(self) -> None:
        try:
            write_json_atomic(self.path, self._state)
        except OSError as exc:  # a full disk must not take the server down
            log.error("cannot write %s: %s", self.path, exc)
