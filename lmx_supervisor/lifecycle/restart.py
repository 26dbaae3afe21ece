"""Restarting one model's worker without downtime, optionally with new
spawn-time settings. The model (its id, registry entry, gate, metrics) stays
the same object throughout; only the worker behind it is replaced.

Rolling: the replacement is spawned beside the serving worker as a shadow
ManagedModel (same id, same crash history, its own frame handler) and must
load and pass the warm-up canary. Then, in one synchronous step, it is
promoted: the model's frame handler takes over its socket, new requests (and
those queued at the gate, as they are admitted) go to it, and the requests
already sent to the old worker finish there (bounded by the drain timeout)
before the old worker is stopped.

Drain: the gate stops handing out permits (arrivals wait in its queue,
bounded by their own `semaphore_timeout_sec`), in-flight requests finish,
the old worker stops, the replacement loads, and the gate reopens. If the
replacement fails, a worker with the old settings is started in its place.

A replacement that fails (crash, timeout, canary, memory cap) is discarded
and its failure counted in the model's crash history, as a load's would be;
in rolling mode the old worker never noticed."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Any

from lmx_protocol import Shutdown
from lmx_supervisor.errors import LoadFailed, ModelUnavailable, WorkerCrashed
from lmx_supervisor.lifecycle.exit_causes import describe_exit
from lmx_supervisor.lifecycle.managed_model import EventSink, ManagedModel
from lmx_supervisor.lifecycle.restart_policy import backoff_delay
from lmx_supervisor.lifecycle.restart_progress import RestartMode, RestartProgress
from lmx_supervisor.lifecycle.states import ModelState
from lmx_supervisor.memory.memory_estimate import MemoryEstimate
from lmx_supervisor.workers.spawn_settings import Overrides, spawn_values, with_overrides
from lmx_supervisor.workers.transport import PeerGone
from lmx_supervisor.workers.worker_handle import WorkerHandle

log = logging.getLogger("lmx.supervisor")

# The replacement's own lifecycle events are not the model's: while it
# loads, the model is still the old worker, ready.
SHADOW_QUIET = frozenset({"model_state", "model_loaded", "model_quarantined",
                          "model_unloaded"})
POLL_SEC = 0.05


@dataclass
class _Retiring:
    """The worker a restart replaced, and the requests still running on it."""

    worker: WorkerHandle | None
    worker_id: str | None
    watch: asyncio.Task[None] | None
    request_ids: set[str]
    stopping: bool = False  # we asked it to exit: its exit is no crash


@dataclass(frozen=True)
class RestartPlan:
    mode: RestartMode
    target: Overrides  # every spawn-time setting the replacement runs with
    estimate: MemoryEstimate
    memory_cap_bytes: int | None
    drain_timeout_sec: float


class Restart:
    """One restart of one model; `run()` returns when the replacement serves
    (and, rolling, the old worker has stopped) or raises its LoadFailed."""

    def __init__(self, model: ManagedModel, plan: RestartPlan, emit: EventSink,
                 reserved: dict[str, int]) -> None:
        self.model = model
        self.plan = plan
        self._emit = emit
        self._reserved = reserved  # the memory guard's extra bytes
        self._key = f"restart:{model.model_id}"
        self.progress = RestartProgress(plan.mode, dict(plan.target), model.pid,
                                        "loading" if plan.mode == "rolling" else "draining")
        self._shadow: ManagedModel | None = None
        self._old_crash: str | None = None
        self._retiring: _Retiring | None = None
        self._retire_deadline: float | None = None
        self.progress.loading_pid = lambda: self._shadow.pid if self._shadow else None
        # What the replaced worker was sized at (reserved while it drains).
        self._replaced_estimate: MemoryEstimate | None = model.memory_estimate
        self._replaced_cap: int | None = model.memory_cap_bytes
        if plan.mode == "rolling":
            # Reserved now, not when run() starts: a load admitted in between
            # must count the replacement.
            reserved[self._key] = plan.estimate.total_bytes

    # --- the two modes ------------------------------------------------------

    async def run(self) -> RestartProgress:
        model = self.model
        model.restart = self.progress
        model.crash_hook = self._serving_worker_died
        try:
            if self.plan.mode == "rolling":
                await self._rolling()
            else:
                await self._drain()
            return self.progress
        finally:
            # Also on cancellation (an unload wins): neither the replacement
            # nor a worker being retired survives.
            await self._discard_shadow()
            retiring, self._retiring = self._retiring, None
            if retiring is not None:
                # Cancelled while the old worker drained (an unload): its
                # requests keep their drain deadline, as an unload gives them.
                await self._retire(retiring, self._retire_deadline)
            self.release()
            model.restart = None
            model.crash_hook = None

    def release(self) -> None:
        """Give back the memory reserved for the restart (idempotent; also
        for a restart cancelled before it started)."""
        self._reserved.pop(self._key, None)

    async def _rolling(self) -> None:
        model = self.model
        try:
            await self._load_replacement(self.plan.target, self.plan.estimate,
                                         self.plan.memory_cap_bytes)
        except LoadFailed:
            self._after_failure()
            raise
        retiring = self._promote()
        self.progress.phase = "draining_old"
        # The registry now counts the replacement; the old worker's memory
        # stays reserved until it has stopped.
        old = self._replaced_estimate
        self._reserved[self._key] = old.total_bytes if old is not None else 0
        log.info("model %s: rolling restart promoted pid %s; draining pid %s",
                 model.model_id, self.progress.new_pid, self.progress.old_pid)
        await self._retire(retiring)

    async def _drain(self) -> None:
        model = self.model
        model.gate.pause()
        try:
            deadline = time.monotonic() + self.plan.drain_timeout_sec
            await model.gate.wait_empty(self.plan.drain_timeout_sec)
            await self._retire(self._detach_serving(), deadline)
            self.progress.phase = "loading"
            try:
                await self._load_replacement(self.plan.target, self.plan.estimate,
                                             self.plan.memory_cap_bytes)
            except LoadFailed:
                await self._restore_old_settings()
                raise
            self._promote()
        finally:
            model.gate.resume()

    # --- the replacement ------------------------------------------------------

    def _quiet_emit(self, event: str, data: dict[str, Any]) -> object:
        if event in SHADOW_QUIET:
            return None
        return self._emit(event, {**data, "replacement": True})

    async def _load_replacement(self, target: Overrides, estimate: MemoryEstimate | None,
                                cap: int | None) -> None:
        model = self.model
        # The canary always runs: nothing reaches a replacement untested.
        settings = dataclasses.replace(with_overrides(model.settings, target),
                                       warmup_on_load=True)
        shadow = ManagedModel(model.model_id, model.path, model.backend, settings,
                              model.placement, model.history, self._quiet_emit, model._worker_env)
        shadow.memory_estimate = estimate
        shadow.memory_cap_bytes = cap
        self._shadow = shadow
        await shadow.load()
        self.progress.new_pid = shadow.pid

    def _promote(self) -> _Retiring:
        """Hand the model to the loaded replacement. Synchronous: no request
        can be sent between the old worker's last and the new one's first."""
        model, shadow = self.model, self._shadow
        assert shadow is not None and shadow.worker is not None and shadow.worker_id
        new_worker, new_id = shadow.worker, shadow.worker_id
        if shadow._watch_task is not None:
            shadow._watch_task.cancel()
        shadow.worker, shadow.worker_id, shadow._watch_task = None, None, None
        self._shadow = None
        retiring = _Retiring(model.worker, model.worker_id, model._watch_task,
                             set(model._inflight))
        model.placement.hub.register(new_id, model._on_frame)
        model.worker, model.worker_id, model.ready = new_worker, new_id, shadow.ready
        # The spawn-time values the replacement really runs with (the old ones
        # when a drain restart restored them), over the model's other settings.
        model.settings = with_overrides(model.settings, spawn_values(shadow.settings))
        model.memory_estimate = shadow.memory_estimate
        model.memory_cap_bytes = shadow.memory_cap_bytes
        model.memory_sample = None
        model.loaded_at = shadow.loaded_at
        model.last_used = time.monotonic()
        model._watch_task = asyncio.create_task(model._watch(new_worker),
                                                name=f"watch-{new_id}")
        if model._restart_task is not None:  # the old worker's crash restart
            model._restart_task.cancel()
            model._restart_task = None
        if model.state is ModelState.BACKOFF:  # the old worker died meanwhile
            model._set_state(ModelState.STARTING, "restart replacement ready")
            model._set_state(ModelState.READY)
        return retiring

    async def _discard_shadow(self) -> None:
        shadow, self._shadow = self._shadow, None
        if shadow is not None and shadow.worker is not None:
            with contextlib.suppress(Exception):
                await shadow._discard_worker()

    # --- the old worker -------------------------------------------------------

    def _detach_serving(self) -> _Retiring:
        model = self.model
        retiring = _Retiring(model.worker, model.worker_id, model._watch_task,
                             set(model._inflight))
        # Detached first: its exit is then an intended stop, not a crash.
        model.worker, model.worker_id, model._watch_task = None, None, None
        return retiring

    async def _retire(self, retiring: _Retiring, deadline: float | None = None) -> None:
        """Let the requests on the old worker finish (until `deadline`, by
        default the drain timeout from now), then stop it."""
        model, worker = self.model, retiring.worker
        if deadline is None:
            deadline = time.monotonic() + self.plan.drain_timeout_sec
        self._retiring, self._retire_deadline = retiring, deadline
        while (retiring.request_ids & model._inflight.keys() and worker is not None
               and worker.returncode is None and time.monotonic() < deadline):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(worker.exited), POLL_SEC)
        if worker is not None and worker.returncode not in (None, 0) and not retiring.stopping:
            # Died on its own while draining: its watcher no longer reports
            # it (the model has moved on), so it is reported here.
            self._emit("worker_crashed", {
                "model_id": model.model_id, "pid": worker.pid, "returncode": worker.returncode,
                "cause": describe_exit(worker.returncode), "oom": False, "retiring": True})
        leftover = retiring.request_ids & model._inflight.keys()
        if leftover:
            if worker is not None and worker.returncode is not None:
                error: ModelUnavailable | WorkerCrashed = WorkerCrashed(
                    f"Worker for model '{model.model_id}' exited while a restart drained it")
            else:
                error = ModelUnavailable(
                    f"Model '{model.model_id}' was restarted and this request did not finish "
                    f"within models.unload_drain_timeout_sec "
                    f"({self.plan.drain_timeout_sec:g}s)", code="model_restarted")
            for rid in leftover:
                model._inflight[rid].put_nowait(error)
        await self._stop(retiring)
        self._retiring = None

    async def _stop(self, retiring: _Retiring) -> None:
        retiring.stopping = True
        worker, worker_id = retiring.worker, retiring.worker_id
        grace = self.model.settings.stop_grace_sec
        if worker is not None:
            if worker_id is not None:
                with contextlib.suppress(PeerGone):
                    self.model.placement.hub.send(worker_id, Shutdown(drain=False))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(worker.exited), grace)
            await worker.terminate(grace)
        if worker_id is not None:
            self.model.placement.hub.unregister(worker_id)
        if retiring.watch is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await retiring.watch

    # --- failures ---------------------------------------------------------------

    def _serving_worker_died(self, cause: str) -> bool:
        """The crash hook: the serving worker died before the replacement
        took over. The crash counts; the model waits (BACKOFF: requests
        queue) for the replacement instead of restarting the old settings."""
        if self.progress.phase not in ("loading", "draining"):
            return False
        model = self.model
        self._old_crash = cause
        crashes = model.history.record()
        model._set_state(ModelState.BACKOFF, f"{cause}; restart replacement loading")
        self._emit("model_restart_old_worker_crashed",
                   {"model_id": model.model_id, "mode": self.plan.mode, "cause": cause,
                    "recent_crashes": crashes})
        return True

    def _after_failure(self) -> None:
        """The replacement failed. If the old worker died meanwhile, the model
        falls back to the usual crash handling with its old settings."""
        if self._old_crash is None:
            return
        model = self.model
        if model.history.over_limit():
            crashes = model.history.recent()
            model._set_state(ModelState.QUARANTINED, f"crash_loop:{crashes}")
            self._emit("model_quarantined", {"model_id": model.model_id,
                                             "reason": self._old_crash})
            return
        delay = backoff_delay(model.history.recent(), model.settings.restart_backoff_initial_sec,
                              model.settings.restart_backoff_max_sec)
        model._restart_task = asyncio.create_task(model._restart_after(delay),
                                                  name=f"restart-{model.model_id}")

    async def _restore_old_settings(self) -> None:
        """Drain mode, replacement failed: the old worker is gone, so a new
        one with the old settings takes its place."""
        self.progress.phase = "restoring"
        await self._discard_shadow()
        try:
            await self._load_replacement(spawn_values(self.model.settings),
                                         self._replaced_estimate, self._replaced_cap)
        except LoadFailed as exc:
            log.error("model %s: restoring the old settings failed too: %s",
                      self.model.model_id, exc.message)
            self._old_crash = self._old_crash or exc.message
            # Nothing serves: the usual crash handling (backoff or quarantine).
            if self.model.state is ModelState.READY:
                self.model._set_state(ModelState.BACKOFF, exc.message)
            self._after_failure()
            return
        self._promote()
