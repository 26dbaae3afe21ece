"""The memory guard: decides whether a model may load, makes room by
evicting idle models, unloads models idle past their TTL, and sizes each
worker's memory cap.

Two ways of counting, chosen by `memory.budget_bytes`:
- unset (default): the whole machine. The OS's used memory (total minus
  available) plus the estimates of models still starting, plus the new
  model's estimate, must stay within `max_memory_percent` of physical RAM.
  Evicting a model frees its worker's resident memory.
- a byte count: LMX's models get that budget. The estimates of the models
  it holds plus the new one must stay within `max_memory_percent` of it
  (like a scheduler's resource requests: each worker's memory cap keeps its
  real use near its estimate), and the new estimate must still fit in what
  the OS reports available.

Thresholds are read from the host's config on every use, so a config
reload takes effect at the next decision.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Protocol

from lmx_supervisor.config import Config, MemoryConfig
from lmx_supervisor.errors import InsufficientMemory
from lmx_supervisor.lifecycle.managed_model import ManagedModel
from lmx_supervisor.lifecycle.states import ModelState
from lmx_supervisor.memory.memory_estimate import MemoryEstimate
from lmx_supervisor.memory.process_memory import system_memory, worker_memory
from lmx_supervisor.workers.worker_handle import LOCAL_NODE

log = logging.getLogger("lmx.memory")

GiB = 1024**3
TICK_SEC = 1.0
THREAD_ALLOWANCE = 16 * 1024 * 1024
# States in which a model holds (or is about to hold) memory.
HOLDING = (ModelState.STARTING, ModelState.READY, ModelState.BACKOFF, ModelState.STOPPING)
# States whose memory the OS does not see yet: the worker is still loading,
# or crashed and about to come back.
PENDING = (ModelState.STARTING, ModelState.BACKOFF)


def gb(n: float) -> float:
    return round(n / GiB, 3)


class GuardHost(Protocol):
    """What the guard needs from the supervisor."""

    config: Config

    def models(self) -> list[ManagedModel]: ...

    def emit(self, event: str, data: dict[str, Any]) -> None: ...

    async def evict(self, model_id: str, reason: str) -> bool:
        """Unload the model if it is still idle; True when it was unloaded."""


@dataclass(frozen=True)
class Shortfall:
    needed: int  # the new model's estimate
    used: int  # what counts as used now
    limit: int
    reclaimable: int  # what evicting every idle model could free
    basis: str  # "system memory" or "memory budget"

    @property
    def hopeless(self) -> bool:
        return self.used - self.reclaimable + self.needed > self.limit

    def describe(self, model_id: str) -> str:
        return (f"Not enough memory to load '{model_id}': it needs ~{gb(self.needed)} GiB, "
                f"{gb(self.used)} GiB of the {gb(self.limit)} GiB {self.basis} limit is in use")


def estimate_of(model: ManagedModel) -> int:
    estimate = model.memory_estimate
    return estimate.total_bytes if estimate is not None else 0


def idle_ttl(model: ManagedModel, cfg: MemoryConfig) -> float | None:
    """Idle seconds after which `model` is unloaded (None: never): what a
    client asked for this model (keep_alive), else the configured TTL."""
    if model.keep_alive_sec is not None:
        return model.keep_alive_sec if model.keep_alive_sec >= 0 else None
    return cfg.ttl_seconds if cfg.ttl_enabled else None


def is_idle(model: ManagedModel) -> bool:
    return (model.state is ModelState.READY and model.in_flight == 0
            and model.gate.queued == 0 and model.gate.active == 0
            and model.restart is None)  # never evict a model mid-restart


class MemoryGuard:
    def __init__(self, host: GuardHost) -> None:
        self._host = host
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._high = False
        # Memory held outside the registry's estimates: a restart's
        # replacement worker loading beside the old one, then the old one
        # draining (keyed by a label; see restart.py).
        self.reserved: dict[str, int] = {}

    @property
    def config(self) -> MemoryConfig:
        return self._host.config.memory

    # --- worker caps --------------------------------------------------------

    def worker_cap(self, estimate: MemoryEstimate, n_threads: int | None) -> int | None:
        """RLIMIT_DATA for the model's worker, or None when caps are off.
        Thread stacks count against RLIMIT_DATA, so each compute thread adds
        THREAD_ALLOWANCE (8 MiB stack plus malloc arena growth).

        Why RLIMIT_DATA: RLIMIT_AS counts address space that is never
        resident (the mapped model file, reserved thread stacks and malloc
        arenas); measured for SmolLM2-135M, VmSize is 0.7-0.9 GB against an
        RSS of 0.2-0.35 GB, and it grows with the core count. RLIMIT_DATA
        counts private writable memory (heap, KV cache, compute buffers):
        VmData 0.42 GB at n_ctx 2048, 0.64 GB at 8192, under caps of 1.1 and
        1.4 GB with the default factor 2 + 512 MiB. A cgroup v2 memory.max
        would also count page cache, but needs a delegated cgroup, which a
        plain user process (or this machine's cgroup v1 layout) lacks."""
        cfg = self.config
        if not cfg.worker_memory_cap_factor:
            return None
        threads = n_threads or os.cpu_count() or 1
        return int(estimate.total_bytes * cfg.worker_memory_cap_factor
                   + cfg.worker_memory_cap_headroom_bytes + threads * THREAD_ALLOWANCE)

    # --- admission ----------------------------------------------------------

    def _local_models(self) -> list[ManagedModel]:
        """Models whose workers run on this host: a node's model neither
        uses this host's memory nor has a pid this host can read."""
        return [m for m in self._host.models() if m.placement.node == LOCAL_NODE]

    def shortfall(self, model_id: str, needed: int, beside: bool = False) -> Shortfall | None:
        """Whether `needed` more bytes fit for `model_id`: replacing the
        model's own memory, or with `beside` (a second copy during a rolling
        restart) on top of it."""
        cfg = self.config
        others = [m for m in self._local_models() if beside or m.model_id != model_id]
        extra = sum(self.reserved.values())
        sysmem = system_memory()
        idle = [m for m in others if is_idle(m)]
        if cfg.budget_bytes is None:
            limit = int(sysmem.total * cfg.max_memory_percent / 100)
            used = sysmem.used + extra + sum(estimate_of(m) for m in others
                                             if m.state in PENDING)
            reclaimable = sum((wm.rss if (wm := worker_memory(m.pid)) else 0) for m in idle)
            basis = f"system memory (memory.max_memory_percent={cfg.max_memory_percent:g}%)"
        else:
            limit = int(cfg.budget_bytes * cfg.max_memory_percent / 100)
            used = extra + sum(estimate_of(m) for m in others if m.state in HOLDING)
            reclaimable = sum(estimate_of(m) for m in idle)
            basis = (f"memory budget (memory.budget_bytes at "
                     f"memory.max_memory_percent={cfg.max_memory_percent:g}%)")
            if needed > sysmem.available:  # the budget may promise more than there is
                idle_rss = sum((wm.rss if (wm := worker_memory(m.pid)) else 0) for m in idle)
                return Shortfall(needed, sysmem.used, sysmem.total, idle_rss, "system memory")
        if used + needed <= limit:
            return None
        return Shortfall(needed, used, limit, reclaimable, basis)

    def lru_idle(self, model_id: str, skip: set[str]) -> ManagedModel | None:
        idle = [m for m in self._local_models()
                if m.model_id != model_id and m.model_id not in skip and is_idle(m)]
        return min(idle, key=lambda m: m.last_used, default=None)

    async def admit(self, model_id: str, estimate: MemoryEstimate) -> None:
        """Return when the model fits (after evicting idle models if that is
        allowed and helps); raise InsufficientMemory (507) otherwise. The
        caller must register the model before its next await, so that a
        concurrent admission counts it."""
        async with self._lock:
            skip: set[str] = set()
            while True:
                short = self.shortfall(model_id, estimate.total_bytes)
                if short is None:
                    return
                message = short.describe(model_id)
                if not self.config.auto_evict_lru:
                    raise InsufficientMemory(message + " (memory.auto_evict_lru is off)",
                                             param="model_id")
                if short.hopeless:
                    raise InsufficientMemory(message + "; evicting every idle model would "
                                             "not free enough", param="model_id")
                victim = self.lru_idle(model_id, skip)
                if victim is None:
                    raise InsufficientMemory(message + "; no idle model left to evict "
                                             "(models with requests in flight are never "
                                             "evicted)", param="model_id")
                if not await self._host.evict(victim.model_id, f"lru: room for {model_id}"):
                    skip.add(victim.model_id)

    # --- background: TTL, sampling, warnings --------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="lmx-memory-guard")

    def problems(self) -> list[str]:
        """The guard's loop catches every tick's error; a task that ended
        anyway is a bug /readyz must show."""
        if self._task is not None and self._task.done():
            return ["memory guard is not running"]
        return []

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        while True:
            cfg = self.config
            tick = min(TICK_SEC, cfg.ttl_seconds / 2) if cfg.ttl_enabled else TICK_SEC
            await asyncio.sleep(tick)
            try:
                await self.tick()
            except Exception:  # the guard must outlive any one bad tick
                log.exception("memory guard tick failed")

    async def tick(self) -> None:
        cfg = self.config
        for model in self._local_models():
            model.memory_sample = worker_memory(model.pid)
        sysmem = system_memory()
        high = sysmem.percent >= cfg.max_memory_percent
        if high and not self._high:
            self._host.emit("memory_warning", {
                "reason": "high_usage", "used_percent": round(sysmem.percent, 1),
                "threshold_percent": cfg.max_memory_percent})
        self._high = high
        now = time.monotonic()
        # Idle unloading applies wherever a model runs (a node's too).
        for model in self._host.models():
            ttl = idle_ttl(model, cfg)
            if ttl is not None and is_idle(model) and now - model.last_used > ttl:
                await self._host.evict(model.model_id, f"ttl: idle for more than {ttl:g}s")

    # --- report (GET /admin/memory) -----------------------------------------

    def report(self) -> dict[str, Any]:
        cfg = self.config
        sysmem = system_memory()
        models: dict[str, Any] = {}
        held = 0
        for m in self._local_models():
            wm = worker_memory(m.pid)
            estimate = m.memory_estimate
            if m.state in HOLDING:
                held += estimate_of(m)
            models[m.model_id] = {
                "memory_gb": gb(wm.rss if wm else 0),
                "loaded": m.state is ModelState.READY,
                "state": str(m.state),
                "pid": m.pid,
                "resident_bytes": wm.rss if wm else 0,
                "virtual_bytes": wm.vms if wm else 0,
                "data_bytes": wm.data if wm else 0,
                "estimate_gb": gb(estimate.total_bytes) if estimate else None,
                "estimate": estimate.as_dict() if estimate else None,
                "memory_cap_bytes": m.memory_cap_bytes,
                "in_flight": m.in_flight,
                "idle_sec": round(time.monotonic() - m.last_used, 1),
                # Figures the backend reports about itself (MLX: active, peak
                # and cache memory); llama.cpp reports none beyond the RSS.
                "backend_memory": None,
            }
        budget = cfg.budget_bytes
        return {
            "total_unified_memory_gb": gb(sysmem.total),
            "used_gb": gb(sysmem.used),
            "available_gb": gb(sysmem.available),
            "used_percent": round(sysmem.percent, 1),
            "threshold_percent": cfg.max_memory_percent,
            "load_shedding_percent": cfg.load_shedding_percent,
            "auto_evict_lru": cfg.auto_evict_lru,
            "ttl_enabled": cfg.ttl_enabled,
            "ttl_seconds": cfg.ttl_seconds,
            "budget_gb": gb(budget) if budget is not None else None,
            "budget_used_gb": gb(held) if budget is not None else None,
            "models_estimate_gb": gb(held),
            # Replacement workers of restarts in progress (and old workers
            # they are draining), counted on top of the models' estimates.
            "restart_reserved_gb": gb(sum(self.reserved.values())),
            "worker_memory_cap": {
                "mechanism": "RLIMIT_DATA" if cfg.worker_memory_cap_factor else None,
                "factor": cfg.worker_memory_cap_factor,
                "headroom_bytes": cfg.worker_memory_cap_headroom_bytes,
            },
            "models": models,
        }
