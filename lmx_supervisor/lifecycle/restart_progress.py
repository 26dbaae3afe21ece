"""What `/admin/models` shows of a restart in progress (see restart.py)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

RestartMode = Literal["rolling", "drain"]
# rolling: loading (the replacement, beside the old worker) -> draining_old
# drain: draining (no new admissions) -> loading -> (restoring, if the
# replacement failed and the old settings come back)
RestartPhase = Literal["loading", "draining_old", "draining", "restoring"]


@dataclass
class RestartProgress:
    mode: RestartMode
    settings: dict[str, Any]
    old_pid: int | None
    phase: RestartPhase
    new_pid: int | None = None
    started: float = field(default_factory=time.monotonic)
    # The replacement's pid while it loads (before new_pid is settled).
    loading_pid: Callable[[], int | None] = lambda: None

    def describe(self) -> dict[str, Any]:
        return {"mode": self.mode, "phase": self.phase, "old_pid": self.old_pid,
                "new_pid": self.new_pid if self.new_pid is not None else self.loading_pid(),
                "settings": self.settings,
                "elapsed_sec": round(time.monotonic() - self.started, 3)}
