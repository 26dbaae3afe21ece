"""Would a model fit now, and what would the memory guard evict to make it
fit? The guard's own reasoning (`MemoryGuard.shortfall`, least recently used
idle models first, never one with requests in flight), run as a dry run:
nothing is evicted. `POST /admin/models/probe` reports it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lmx_supervisor.lifecycle.managed_model import ManagedModel
from lmx_supervisor.memory.memory_guard import MemoryGuard, estimate_of, gb, is_idle
from lmx_supervisor.memory.process_memory import worker_memory


@dataclass(frozen=True)
class FitPlan:
    fits: bool
    needed_bytes: int
    # Model ids the guard would unload first, in order (empty when it fits as is).
    evict: list[str] = field(default_factory=list)
    reason: str = ""
    used_bytes: int | None = None
    limit_bytes: int | None = None
    basis: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"fits": self.fits, "needed_bytes": self.needed_bytes,
                "needed_gb": gb(self.needed_bytes), "would_evict": self.evict,
                "reason": self.reason, "used_bytes": self.used_bytes,
                "limit_bytes": self.limit_bytes, "basis": self.basis}


def _frees(model: ManagedModel, system_basis: bool) -> int:
    """What unloading `model` gives back under the guard's way of counting:
    its worker's resident memory (whole machine) or its estimate (budget)."""
    if system_basis:
        wm = worker_memory(model.pid)
        return wm.rss if wm else 0
    return estimate_of(model)


def plan_fit(guard: MemoryGuard, models: list[ManagedModel], model_id: str,
             needed: int) -> FitPlan:
    short = guard.shortfall(model_id, needed)
    if short is None:
        return FitPlan(True, needed, [], "fits without evicting anything")
    message = short.describe(model_id)

    def verdict(fits: bool, evict: list[str], reason: str) -> FitPlan:
        return FitPlan(fits, needed, evict, reason, short.used, short.limit, short.basis)

    if not guard.config.auto_evict_lru:
        return verdict(False, [], message + " (memory.auto_evict_lru is off)")
    if short.hopeless:
        return verdict(False, [], message + "; evicting every idle model would not free "
                       "enough")
    system_basis = short.basis.startswith("system memory")
    idle = sorted((m for m in models if m.model_id != model_id and is_idle(m)),
                  key=lambda m: m.last_used)
    freed = 0
    victims: list[str] = []
    for victim in idle:
        victims.append(victim.model_id)
        freed += _frees(victim, system_basis)
        if short.used - freed + needed <= short.limit:
            return verdict(True, victims, message + f"; fits after evicting "
                           f"{', '.join(victims)} (idle, least recently used first)")
    return verdict(False, [], message + "; no idle model left to evict (models with requests "
                   "in flight are never evicted)")
