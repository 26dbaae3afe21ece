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

from lmx_supervisor.config import Config
from lmx_supervisor.errors import (
    BadRequest,
    Conflict,
    InsufficientMemory,
    LMXError,
    LoadFailed,
    ModelNotFound,
    NoModelLoaded,
)
from lmx_supervisor.lifecycle import runtime_state
from lmx_supervisor.lifecycle.lifecycle_records import LifecycleRecorder
from lmx_supervisor.lifecycle.managed_model import EventSink, ManagedModel, ModelSettings
from lmx_supervisor.lifecycle.poison import PoisonRegistry
from lmx_supervisor.lifecycle.restart import Restart, RestartPlan
from lmx_supervisor.lifecycle.restart_policy import CrashHistory
from lmx_supervisor.lifecycle.restart_progress import RestartMode
from lmx_supervisor.lifecycle.runtime_state import RuntimeStateStore
from lmx_supervisor.lifecycle.states import ModelState
from lmx_supervisor.memory.memory_estimate import MemoryEstimate, estimate_model_memory
from lmx_supervisor.memory.memory_guard import MemoryGuard, is_idle
from lmx_supervisor.memory.mlx_memory import mlx_estimate
from lmx_supervisor.models import compatibility
from lmx_supervisor.models.bundled_model import lmx_home
from lmx_supervisor.models.compatibility import CompatibilityRegistry
from lmx_supervisor.models.model_layout import MLX
from lmx_supervisor.models.model_resolver import LoadRoots, resolve_model
from lmx_supervisor.nodes.placing import Placer
from lmx_supervisor.nodes.service import NodeService
from lmx_supervisor.tuning.performance import (
    KV_BYTES_PER_VALUE,
    PERFORMANCE_KEYS,
    apply_performance,
    check_backend,
    effective_settings,
)
from lmx_supervisor.workers.shard_group import ShardedPlacement, shard_nodes
from lmx_supervisor.workers.spawn_settings import (
    SPAWN_TIME_SETTINGS,
    Overrides,
    changed,
    spawn_values,
    with_overrides,
)
from lmx_supervisor.workers.transport import RouterHub
from lmx_supervisor.workers.worker_handle import LOCAL_NODE, LocalPlacement, Placement, ring_host_of

log = logging.getLogger("lmx.supervisor")

__all__ = ["SPAWN_TIME_SETTINGS", "Supervisor", "settings_from"]


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
        kv_cache_type=m.kv_cache_type,
        max_queued_requests=m.max_queued_requests,
        worker_heartbeat_timeout_sec=m.worker_heartbeat_timeout_sec,
        worker_stall_timeout_sec=m.worker_stall_timeout_sec,
        max_inter_token_ms=m.max_inter_token_ms,
    )


class Supervisor:
    def __init__(self, config: Config, emit: EventSink | None = None,
                 worker_env: dict[str, str] | None = None, home: Path | None = None) -> None:
        self.config = config
        self.started_at = time.time()
        self._emit_sink = emit
        self._worker_env = worker_env
        self._hub = RouterHub(config.workers.address, config.workers.runtime_dir,
                              max_message_bytes=config.workers.max_message_bytes)
        self._local = LocalPlacement(self._hub, ring_host_of(config.workers.listen))
        # Poison requests outlive a model's entry (a quarantined model is
        # replaced on its next load), so one registry for all of them.
        self.poison = PoisonRegistry(config.models.crash_loop_window_sec,
                                     config.models.request_quarantine_sec,
                                     config.models.request_quarantine_max_entries)
        self._models: dict[str, ManagedModel] = {}
        self._histories: dict[str, CrashHistory] = {}
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        # Restarts under way, by model id (an unload cancels its model's).
        self._restarts: dict[str, asyncio.Task[dict[str, Any]]] = {}
        # Memory admission/eviction/TTL, and the files that outlive the
        # process (~/.opta-lmx/runtime-state.json, compatibility-registry.json).
        home = lmx_home() if home is None else home
        self.memory = MemoryGuard(self)
        self.runtime_state = RuntimeStateStore(home / runtime_state.FILE_NAME)
        self.compatibility = CompatibilityRegistry(home / compatibility.FILE_NAME)
        self.lifecycle = LifecycleRecorder(self.compatibility, self.runtime_state, self.models)
        # Other hosts (lmx_supervisor.nodes): off unless workers.listen is set.
        self.nodes = NodeService(config, self.emit)
        self.placer = Placer(self.nodes, self._local, self.memory, self.models,
                             lambda: self.config.nodes.replace_on_loss,
                             lambda model_id: self._locks[model_id])

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
        await self.nodes.start()
        self.memory.start()

    async def auto_load(self) -> None:
        for ref in self.config.models.auto_load:
            try:
                await self.load(ref)
            except Exception as exc:  # one bad model must not stop startup
                log.error("auto_load of %s failed: %s", ref, exc)

    @property
    def router_malformed_frames(self) -> int:
        return self._hub.malformed_frames

    def problems(self) -> list[str]:
        """Why the supervisor cannot be trusted to route right now (a
        background task that died), for /readyz; empty when healthy."""
        return (self._hub.problems() + self.memory.problems() + self.nodes.problems()
                + [p for m in self._models.values() for p in m.task_failures])

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
            raise NoModelLoaded("No model is loaded",
                                param="model")
        raise ModelNotFound(
            f"Model '{model_id}' is not loaded (loaded: {', '.join(sorted(self._models))})",
            param="model")

    # --- lifecycle ---------------------------------------------------------------

    async def load(self, ref: str, backend: str | None = None, served_name: str | None = None,
                   allow_unsupported_runtime: bool = False,
                   overrides: Overrides | None = None, confine: bool = True,
                   shards: list[str] | None = None, node: str | None = None
                   ) -> tuple[ManagedModel, bool]:
        """Load a model; returns it and whether it was already loaded.
        `overrides` (validated spawn-time settings, `spawn_settings.parse_overrides`)
        win over the model's performance profile and the config, now and
        after restarts. `confine`: refuse paths outside the models directory,
        the hub cache and models.allowed_paths (off only for paths LMX itself
        recorded, such as the models a previous run had loaded). `shards`:
        the hosts (placement names) of a tensor-parallel MLX model's ranks.
        `node`: the host to run it on ("local" or a joined node's name);
        None: local if it fits, else a node with room."""
        overrides = overrides or {}
        if node is not None and shards is not None:
            raise BadRequest("give either node or shards, not both", param="shards")
        chosen = self.placer.named(node) if node is not None else None
        # In a thread: resolving may scan the hub cache and read a GGUF header.
        roots = LoadRoots.from_config(self.config) if confine else None
        resolved = await asyncio.to_thread(
            resolve_model, ref, self.config.models_dir, backend, served_name, roots)
        async with self._locks[resolved.model_id]:
            history = self._histories.setdefault(resolved.model_id, CrashHistory(
                self.config.models.crash_loop_max_crashes,
                self.config.models.crash_loop_window_sec))
            sharded = self._placement_for(resolved.backend, shards)
            current = self._models.get(resolved.model_id)
            if current is not None and current.state is not ModelState.QUARANTINED:
                if shards is not None and shard_nodes(current.placement) != shards:
                    raise Conflict(
                        f"Model '{resolved.model_id}' is already loaded on "
                        f"{shard_nodes(current.placement) or current.placement.node}; unload it "
                        "first to place it otherwise", code="model_loaded_with_other_shards",
                        param="shards")
                if node is not None and current.placement.node != node:
                    raise Conflict(
                        f"Model '{resolved.model_id}' is already loaded on "
                        f"{current.placement.node}; unload it first to move it to {node}",
                        code="model_loaded_elsewhere", param="node")
                if current.path != resolved.path:
                    raise Conflict(
                        f"Model id '{resolved.model_id}' is already serving {current.path}",
                        code="model_id_in_use", param="served_name")
                differing = changed(current.settings, overrides)
                if differing:
                    raise Conflict(
                        f"Model '{resolved.model_id}' is already loaded with other settings "
                        f"({', '.join(sorted(differing))}); restart it with them: "
                        "POST /admin/models/restart", code="model_loaded_with_other_settings",
                        param="performance_overrides")
                return current, True
            if history.over_limit():
                if not allow_unsupported_runtime:
                    raise Conflict(
                        f"Model '{resolved.model_id}' is quarantined after instability "
                        f"(crash_loop:{history.recent()}); pass allow_unsupported_runtime "
                        "to force a load", code="model_unstable")
                history.clear()
            if current is not None:  # quarantined: replace its entry
                await current.stop(0)
            settings = await asyncio.to_thread(self._configured_settings, resolved.model_id,
                                               resolved.backend, overrides)
            estimate = await self._estimate(resolved.path, resolved.backend, settings)
            placement = (sharded or chosen or self.placer.choose(resolved.model_id, estimate)
                         or self._local)
            if placement.node == LOCAL_NODE:
                await self.memory.admit(resolved.model_id, estimate)  # 507, or evicts idle LRU
            # No await from here until the model is registered: a concurrent
            # admission must count it.
            model = ManagedModel(
                resolved.model_id, resolved.path, resolved.backend,
                settings, placement, history, self.emit,
                self._worker_env, self.poison)
            model.memory_estimate = estimate
            if placement.node == LOCAL_NODE:
                model.memory_cap_bytes = self.memory.worker_cap(estimate, settings.n_threads)
            model.spawn_overrides = dict(overrides)
            self._models[resolved.model_id] = model
            try:
                await model.load()
            except LoadFailed:
                if model.state is not ModelState.QUARANTINED:
                    self._models.pop(resolved.model_id, None)
                raise
            return model, False

    def placement_named(self, name: str) -> Placement | None:
        """The host a worker can be placed on by that name ("local": here, or
        a connected node); None: no such host now."""
        try:
            return self.placer.named(name)
        except LMXError:
            return None

    def _placement_for(self, backend: str, shards: list[str] | None) -> Placement | None:
        if shards is None:
            return None
        if backend != MLX:
            raise BadRequest(f"only MLX models can be sharded (this one is {backend})",
                             param="shards")
        if len(shards) < 2:
            raise BadRequest("a sharded model needs at least two shards", param="shards")
        placements = []
        for name in shards:
            placement = self.placement_named(name)
            if placement is None:
                raise BadRequest(f"unknown shard host '{name}'", param="shards")
            placements.append(placement)
        workers = self.config.workers
        return ShardedPlacement(placements, (workers.ring_port_min, workers.ring_port_max))

    def _configured_settings(self, model_id: str, backend: str, overrides: Overrides
                             ) -> ModelSettings:
        """What a worker of this model is spawned with: the config, then the
        model's performance profile (autotune's), then `overrides` (the
        load's or restart's own). Reads the profile file: call off the loop."""
        perf = {k: v for k, v in overrides.items() if k in PERFORMANCE_KEYS}
        effective = effective_settings(model_id, perf)
        check_backend(effective, backend)
        settings = apply_performance(settings_from(self.config, model_id), effective)
        return with_overrides(settings, {k: v for k, v in overrides.items()
                                         if k not in PERFORMANCE_KEYS})

    @staticmethod
    async def _estimate(path: Path, backend: str, settings: ModelSettings) -> MemoryEstimate:
        # In a thread: reads the GGUF header / MLX config.
        estimate = await asyncio.to_thread(
            estimate_model_memory, path, settings.context_length * max(1, settings.parallel_slots),
            KV_BYTES_PER_VALUE[settings.kv_cache_type])
        if backend == MLX:  # float32 on a CPU: see mlx_memory
            estimate = await asyncio.to_thread(mlx_estimate, estimate, path,
                                               settings.mlx_dequantize)
        return estimate

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
            for name in (*SPAWN_TIME_SETTINGS, "performance_sources"):
                setattr(fresh, name, getattr(model.settings, name))
            model.settings = fresh
            model.gate.resize(fresh.max_concurrent_requests)
            model.gate.max_queued = fresh.max_queued_requests
        for history in self._histories.values():
            history.max_crashes = config.models.crash_loop_max_crashes
            history.window_sec = config.models.crash_loop_window_sec
        self.poison.window_sec = config.models.crash_loop_window_sec
        self.poison.quarantine_sec = config.models.request_quarantine_sec
        self.poison.max_entries = config.models.request_quarantine_max_entries
        lifted: list[str] = []
        if models_changed:
            for model in self._models.values():
                if model.state is ModelState.QUARANTINED:
                    model.history.clear()
                    lifted.append(model.model_id)
        return lifted

    # --- restarts (see restart.py) --------------------------------------------------

    def desired_spawn_settings(self, model: ManagedModel) -> Overrides:
        """The spawn-time settings the config (and the model's own overrides)
        ask for; they differ from the running ones after a config change."""
        return spawn_values(self._configured_settings(model.model_id, model.backend,
                                                      model.spawn_overrides))

    def spawn_settings_pending(self) -> dict[str, Overrides]:
        """Per loaded model, the spawn-time settings a restart would change."""
        return {m.model_id: diff for m in self._models.values()
                if m.state is ModelState.READY
                and (diff := changed(m.settings, self.desired_spawn_settings(m)))}

    def restarting(self, model_id: str) -> bool:
        return model_id in self._restarts

    async def restart(self, model_id: str, overrides: Overrides | None = None,
                      mode: RestartMode | None = None, remember: bool = True
                      ) -> dict[str, Any]:
        """Replace the model's worker (rolling or drain; see restart.py) with
        `overrides` applied; returns what happened, raises LoadFailed (the
        old worker still serving, rolling) when the replacement failed.
        `remember`: the overrides stay the model's own (not the config's)."""
        overrides = overrides or {}
        async with self._locks[model_id]:
            model = self.get(model_id)
            if model_id in self._restarts:
                raise Conflict(f"Model '{model_id}' is already restarting",
                               code="restart_in_progress", param="model_id")
            restart: Restart | None = None
            if model.state is ModelState.QUARANTINED:
                coro = self._restart_quarantined(model, overrides, remember)
            elif model.state is ModelState.READY:
                plan = await self._plan(model, overrides, mode)
                restart = Restart(model, plan, self.emit, self.memory.reserved)
                coro = self._run_restart(restart, overrides, remember)
            else:
                raise Conflict(f"Model '{model_id}' is {model.state}; only a ready or "
                               "quarantined model can be restarted", code="model_not_ready",
                               param="model_id")
            task = asyncio.create_task(coro, name=f"restart-{model_id}")
            self._restarts[model_id] = task

            def finished(_task: asyncio.Task[dict[str, Any]]) -> None:
                self._restarts.pop(model_id, None)
                if restart is not None:  # cancelled before it ran: no reservation left
                    restart.release()
            task.add_done_callback(finished)
        # Shielded: a caller that goes away does not abandon a half-done restart.
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if task.cancelled() and not (current and current.cancelling()):
                raise Conflict(f"Restart of '{model_id}' was cancelled: the model was "
                               "unloaded", code="restart_cancelled", param="model_id") from None
            raise

    async def _plan(self, model: ManagedModel, overrides: Overrides,
                    mode: RestartMode | None) -> RestartPlan:
        target = spawn_values(model.settings)
        target.update(overrides)
        settings = with_overrides(model.settings, target)
        estimate = await self._estimate(model.path, model.backend, settings)
        beside = self.memory.shortfall(model.model_id, estimate.total_bytes, beside=True)
        if mode is None:
            mode = "rolling" if beside is None else "drain"
        if mode == "rolling" and beside is not None:
            raise InsufficientMemory(
                beside.describe(model.model_id) + "; a rolling restart runs a second copy "
                "beside the first: use mode 'drain'", param="mode")
        alone = self.memory.shortfall(model.model_id, estimate.total_bytes)
        if alone is not None:
            raise InsufficientMemory(alone.describe(model.model_id), param="settings")
        return RestartPlan(mode, target, estimate,
                           self.memory.worker_cap(estimate, settings.n_threads),
                           self.config.models.unload_drain_timeout_sec)

    async def _run_restart(self, restart: Restart, overrides: Overrides, remember: bool
                           ) -> dict[str, Any]:
        model, plan = restart.model, restart.plan
        started = time.monotonic()
        base = {"model_id": model.model_id, "mode": plan.mode, "settings": plan.target,
                "old_pid": restart.progress.old_pid}
        self.emit("model_restarting", dict(base))
        try:
            progress = await restart.run()
        except LoadFailed as exc:
            serving = model.state is ModelState.READY
            self.emit("model_restart_failed", {
                **base, "duration_sec": round(time.monotonic() - started, 3),
                "code": exc.code, "reason": exc.message, "still_serving": serving})
            raise LoadFailed(
                f"Restart of '{model.model_id}' failed"
                + (" (the old worker keeps serving)" if plan.mode == "rolling" and serving
                   else " (the old settings were restored)" if serving else "")
                + f": {exc.message}", code=exc.code) from None
        except asyncio.CancelledError:
            self.emit("model_restart_failed", {
                **base, "duration_sec": round(time.monotonic() - started, 3),
                "code": "restart_cancelled", "reason": "cancelled (the model was unloaded)",
                "still_serving": False})
            raise
        finally:
            restart.release()
        if remember:
            model.spawn_overrides.update(overrides)
        done = {**base, "new_pid": progress.new_pid,
                "duration_sec": round(time.monotonic() - started, 3)}
        self.emit("model_restarted", dict(done))
        return done

    async def _restart_quarantined(self, model: ManagedModel, overrides: Overrides,
                                   remember: bool) -> dict[str, Any]:
        """Nothing serves a quarantined model: its restart is a load with the
        new settings (as a forced load would be, minus clearing its crashes)."""
        started = time.monotonic()
        target = spawn_values(model.settings)
        target.update(overrides)
        settings = with_overrides(model.settings, target)
        base = {"model_id": model.model_id, "mode": "drain", "settings": target,
                "old_pid": None}
        self.emit("model_restarting", dict(base))
        estimate = await self._estimate(model.path, model.backend, settings)
        await self.memory.admit(model.model_id, estimate)
        model.settings, model.memory_estimate = settings, estimate
        model.memory_cap_bytes = self.memory.worker_cap(estimate, settings.n_threads)
        try:
            await model.load()
        except LoadFailed as exc:
            if model.state is not ModelState.QUARANTINED:
                self._models.pop(model.model_id, None)
            self.emit("model_restart_failed", {
                **base, "duration_sec": round(time.monotonic() - started, 3),
                "code": exc.code, "reason": exc.message, "still_serving": False})
            raise
        if remember:
            model.spawn_overrides.update(overrides)
        done = {**base, "new_pid": model.pid,
                "duration_sec": round(time.monotonic() - started, 3)}
        self.emit("model_restarted", dict(done))
        return done

    async def restart_many(self, targets: dict[str, Overrides], remember: bool = True,
                           mode: RestartMode | None = None) -> list[dict[str, Any]]:
        """Restart the given models one at a time (the next only after the
        previous serves again); one failure does not stop the rest."""
        results: list[dict[str, Any]] = []
        for model_id, overrides in targets.items():
            try:
                done = await self.restart(model_id, overrides, mode, remember)
                results.append({**done, "success": True})
            except (LoadFailed, Conflict, InsufficientMemory, BadRequest, ModelNotFound,
                    NoModelLoaded) as exc:
                results.append({"model_id": model_id, "success": False, "code": exc.code,
                                "error": exc.message, "settings": overrides})
        return results

    def loaded_ids(self) -> list[str]:
        return sorted(m.model_id for m in self._models.values()
                      if m.state is ModelState.READY)

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
        # An unload wins over a restart: the restart is cancelled, which
        # stops its replacement (and any old worker still draining).
        restart = self._restarts.get(model_id)
        if restart is not None:
            restart.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await restart
        async with self._locks[model_id]:
            model = self.get(model_id)
            await model.stop(self.config.models.unload_drain_timeout_sec)
            self._models.pop(model_id, None)
            return model

    def throwaway_model(self, model_id: str, path: Path, backend: str, settings: ModelSettings,
                        emit: EventSink) -> ManagedModel:
        """A worker outside the registry, for autotune's measurements (issue
        14): never routed to, not in the runtime state or the compatibility
        ledger, not restarted into quarantine history; its owner stops it."""
        history = CrashHistory(settings.crash_loop_max_crashes, settings.crash_loop_window_sec)
        return ManagedModel(model_id, path, backend, settings, self._local, history, emit,
                            self._worker_env)

    async def shutdown(self, drain_timeout: float = 5.0) -> None:
        await self.memory.stop()  # no TTL eviction while everything stops
        for restart in list(self._restarts.values()):
            restart.cancel()
        await asyncio.gather(*self._restarts.values(), return_exceptions=True)
        self.lifecycle.freeze()  # the models to restore next time: these
        models = list(self._models.values())
        await asyncio.gather(*(m.stop(drain_timeout, terminal=True) for m in models),
                             return_exceptions=True)
        self._models.clear()
        await self.placer.close()
        with contextlib.suppress(Exception):
            await self.nodes.close()
        with contextlib.suppress(Exception):
            await self._hub.close()
