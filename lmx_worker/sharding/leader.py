"""Rank 0 of a sharded group: a normal worker engine (the WorkerLoop feeds
it frames from the supervisor) that broadcasts, before each step, the
order the other ranks need to take the identical step (lmx_worker.sharding.orders)."""

from __future__ import annotations

import random
from typing import Any

from lmx_protocol import Generate
from lmx_worker.engines.engine import StepOutput
from lmx_worker.engines.step_budget import StepLoad
from lmx_worker.sharding.group_engine import GroupEngine, group_broken
from lmx_worker.sharding.orders import Admit, Drop, StepOrder


class ShardLeaderEngine(GroupEngine):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # What the followers have not been told yet (sent with the next step).
        self._commands: list[Admit | Drop] = []
        self._retired: list[int] = []
        super().__init__(*args, **kwargs)

    def add(self, request: Generate) -> None:
        p = request.params
        if p.temperature > 0 and p.seed is None:
            # Drawn here, once: each rank samples with the same key.
            p.seed = random.getrandbits(31)
        queued = len(self._pending)
        super().add(request)
        if len(self._pending) > queued:  # not refused, not a count_only answer
            self._commands.append(Admit(request, self._pending[-1].prompt))

    def abort(self, request_id: str) -> list[StepOutput]:
        unsent = next((c for c in self._commands
                       if isinstance(c, Admit) and c.request.request_id == request_id), None)
        outputs = super().abort(request_id)
        if outputs:
            if unsent is not None:  # the followers never heard of it
                self._commands.remove(unsent)
            else:
                self._commands.append(Drop(request_id))
        return outputs

    def _retire(self, uids: list[int]) -> None:
        self._retired.extend(uids)
        super()._retire(uids)

    def _plan_prompt_reading(self) -> StepLoad:
        """Called once per step, right before the model runs: the moment
        the followers must be told what to run."""
        load = super()._plan_prompt_reading()
        order = StepOrder(self._retired, self._commands, int(self._gen.prefill_batch_size),
                          int(self._gen.prefill_step_size))
        self._retired, self._commands = [], []
        try:
            self.channel.send(order)
        except RuntimeError as exc:
            group_broken(f"cannot send the step order: {exc}")
        return load
