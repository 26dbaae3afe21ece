"""The registry of managed models: load, unload, route, shut down.

Lifecycle operations on one model id are serialised by a per-id lock, so a
load racing an unload of the same model cannot interleave; operations on
different models run concurrently.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from lmx_supervisor import compatibility, runtime_state
from lmx_supervisor.bundled_model import lmx_home
from lmx_supervisor.compatibility import CompatibilityRegistry
from lmx_supervisor.config import Config
from lmx_supervisor.errors import LoadConflict, ModelNotFound, NoModelLoaded
from lmx_supervisor.lifecycle_records import LifecycleRecorder
from lmx_supervisor.managed_model import EventSink, ManagedModel, ModelSettings
from lmx_supervisor.memory_estimate import estimate_model_memory
from lmx_supervisor.memory_guard import MemoryGuard, is_idle
from lmx_supervisor.mlx_memory import mlx_estimate
from lmx_supervisor.model_layout import MLX
from lmx_supervisor.model_resolver import resolve_model
from lmx_supervisor.restart_policy import CrashHistory
from lmx_supervisor.runtime_state import RuntimeStateStore
from lmx_supervisor.states import ModelState
from lmx_supervisor.transport import RouterHub

log = logging.getLogger("lmx.supervisor")

# ModelSettings baked into a worker when it is spawned: a config reload leaves
# them alone for running models (a restart after a crash must not change them).
SPAWN_TIME_SETTINGS = ("context_length", "n_threads", "parallel_slots", "mlx_dequantize",
                       "max_inter_token_ms")


def settings_from(config: Config, model_id: str) -> ModelSettings:
    m = config.models
    return ModelSettings(
        loader_timeout_sec=m.loader_timeout_sec,
        max_concurrent_requests=m.per_model_concurrency_limits.get(
            model_id, m.max_concurrent_requests),
        semaphore_timeout_sec=m.semaphore_timeout_sec,
        crash_loop_max_crashes=m.crash_loop_max_crashes,
        crash_loop_window_sec=m.crash_loop_window_sec,
        restart_backoff_initial_sec=m.restart_backoff_initial_sec,
        restart_backoff_max_sec=m.restart_backoff_max_sec,
        stop_grace_sec=m.stop_grace_sec,
        warmup_on_load=m.warmup_on_load,
        context_length=m.context_length,
        n_threads=m.n_threads,
        parallel_slots=m.parallel_slots,
        mlx_dequantize=m.mlx_dequantize,
        max_inter_token_ms=m.max_inter_token_ms,
    )


class Supervisor:
    def __init__(self, config: Config, emit: EventSink | None = None,
                 worker_env: dict[str, str] | None = None, home: Path | None = None) -> None:
        self.config = config
        self.started_at = time.time()
        self._emit_sink = emit
        self._worker_env = worker_env
        self._hub = RouterHub(config.workers.address, config.workers.runtime_dir)
        self._models: dict[str, ManagedModel] = {}
        self._histories: dict[str, CrashHistory] = {}
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        # Memory admission/eviction/TTL, and the files that outlive the
        # process (~/.opta-lmx/runtime-state.json, compatibility-registry.json).
        home = lmx_home() if home is None else home
        self.memory = MemoryGuard(self)
        self.runtime_state = RuntimeStateStore(home / runtime_state.FILE_NAME)
        self.compatibility = CompatibilityRegistry(home / compatibility.FILE_NAME)
        self.lifecycle = LifecycleRecorder(self.compatibility, self.runtime_state, self.models)

    def emit(self, event: str, data: dict[str, Any]) -> None:
        if event == "model_unloaded" and data.get("reason") == "oom":
            self._forget_stopped(str(data.get("model_id")))
        self.lifecycle.on_event(event, data)
        if self._emit_sink is not None:
            self._emit_sink(event, data)

    def _forget_stopped(self, model_id: str) -> None:
        """A model that unloaded itself (its worker ran out of memory) leaves
        the registry, as an unload would have removed it."""
        model = self._models.get(model_id)
        if model is not None and model.state is ModelState.STOPPED:
            del self._models[model_id]

    async def start(self) -> None:
        self._hub.start()
        self.memory.start()

    async def auto_load(self) -> None:
        for ref in self.config.models.auto_load:
            try:
                await self.load(ref)
            except Exception as exc:  # one bad model must not stop startup
                log.error("auto_load of %s failed: %s", ref, exc)

    # --- lookup ------------------------------------------------------------------

    def models(self) -> list[ManagedModel]:
        return list(self._models.values())

    def ready_models(self) -> list[ManagedModel]:
        return [m for m in self._models.values() if m.state is ModelState.READY]

    def get(self, model_id: str) -> ManagedModel:
        model = self._models.get(model_id)
        if model is not None:
            return model
        if not self._models:
            raise NoModelLoaded("No model is loaded; load one with POST /admin/models/load",
                                param="model")
        raise ModelNotFound(
            f"Model '{model_id}' is not loaded (loaded: {', '.join(sorted(self._models))})",
            param="model")

    # --- lifecycle ---------------------------------------------------------------

    async def load(self, ref: str, backend: str | None = None, served_name: str | None = None,
                   allow_unsupported_runtime: bool = False) -> tuple[ManagedModel, bool]:
        """Load a model; returns it and whether it was already loaded."""
        # In a thread: resolving may scan the hub cache and read a GGUF header.
        resolved = await asyncio.to_thread(
            resolve_model, ref, self.config.models_dir, backend, served_name)
        async with self._locks[resolved.model_id]:
            history = self._histories.setdefault(resolved.model_id, CrashHistory(
                self.config.models.crash_loop_max_crashes,
                self.config.models.crash_loop_window_sec))
            current = self._models.get(resolved.model_id)
            if current is not None and current.state is not ModelState.QUARANTINED:
                if current.path != resolved.path:
                    raise LoadConflict(
                        f"Model id '{resolved.model_id}' is already serving {current.path}",
                        code="model_id_in_use", param="served_name")
                return current, True
            if history.over_limit():
                if not allow_unsupported_runtime:
                    raise LoadConflict(
                        f"Model '{resolved.model_id}' is quarantined after instability "
                        f"(crash_loop:{history.recent()}); pass allow_unsupported_runtime "
                        "to force a load", code="model_unstable")
                history.clear()
            if current is not None:  # quarantined: replace its entry
                await current.stop(0)
            settings = settings_from(self.config, resolved.model_id)
            estimate = await asyncio.to_thread(
                estimate_model_memory, resolved.path,
                settings.context_length * max(1, settings.parallel_slots))
            if resolved.backend == MLX:  # float32 on a CPU: see mlx_memory
                estimate = await asyncio.to_thread(mlx_estimate, estimate, resolved.path,
                                                   settings.mlx_dequantize)
            await self.memory.admit(resolved.model_id, estimate)  # 507, or evicts idle LRU
            # No await from here until the model is registered: a concurrent
            # admission must count it.
            model = ManagedModel(
                resolved.model_id, resolved.path, resolved.backend,
                settings, self._hub, history, self.emit,
                self._worker_env)
            model.memory_estimate = estimate
            model.memory_cap_bytes = self.memory.worker_cap(estimate, settings.n_threads)
            self._models[resolved.model_id] = model
            try:
                await model.load()
            except LoadConflict:
                if model.state is not ModelState.QUARANTINED:
                    self._models.pop(resolved.model_id, None)
                raise
            return model, False

    def reconfigure(self, config: Config) -> list[str]:
        """Adopt a reloaded config without touching any worker. Settings read
        per request or per restart (concurrency, admission wait, crash-loop
        limits, backoff, grace) apply at once; those fixed when a worker is
        spawned keep their running values until the model is loaded again.
        A change to the models section lifts quarantines (the change may be
        the fix): their crash history is cleared, so the next load is allowed.
        Returns the ids whose quarantine was lifted."""
        models_changed = config.models != self.config.models
        self.config = config
        for model in self._models.values():
            fresh = settings_from(config, model.model_id)
            for name in SPAWN_TIME_SETTINGS:
                if hasattr(fresh, name):
                    setattr(fresh, name, getattr(model.settings, name))
            model.settings = fresh
            model.gate.resize(fresh.max_concurrent_requests)
        for history in self._histories.values():
            history.max_crashes = config.models.crash_loop_max_crashes
            history.window_sec = config.models.crash_loop_window_sec
        lifted: list[str] = []
        if models_changed:
            for model in self._models.values():
                if model.state is ModelState.QUARANTINED:
                    model.history.clear()
                    lifted.append(model.model_id)
        return lifted

    async def evict(self, model_id: str, reason: str) -> bool:
        """Unload a model the memory guard picked (LRU or TTL), but only if
        it is still idle and no lifecycle operation holds it; a model with
        requests in flight or queued is never evicted."""
        lock = self._locks[model_id]
        if lock.locked():
            return False
        async with lock:
            model = self._models.get(model_id)
            if model is None or not is_idle(model):
                return False
            log.info("evicting model %s (%s)", model_id, reason)
            await model.stop(self.config.models.unload_drain_timeout_sec)
            self._models.pop(model_id, None)
        self.emit("model_evicted", {"model_id": model_id, "reason": reason})
        return True

    async def unload(self, model_id: str) -> ManagedModel:
        async with self._locks[model_id]:
            model = self.get(model_id)
            await model.stop(self.config.models.unload_drain_timeout_sec)
            self._models.pop(model_id, None)
            return model

    async def shutdown(self, drain_timeout: float = 5.0) -> None:
        await self.memory.stop()  # no TTL eviction while everything stops
        self.lifecycle.freeze()  # the models to restore next time: these
        models = list(self._models.values())
        await asyncio.gather(*(m.stop(drain_timeout, terminal=True) for m in models),
                             return_exceptions=True)
        self._models.clear()
        with contextlib.suppress(Exception):
            await self._hub.close()
