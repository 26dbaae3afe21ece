"""What every rank of a sharded group does the same way: join the ring,
take its share of the model, agree on the weight plan, and stop (the whole
process) when the group breaks."""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, NoReturn

import mlx.core as mx

from lmx_worker.engines.mlx_engine import MlxEngine
from lmx_worker.mlx_support.mlx_weights import WeightsPlan, plan_weights
from lmx_worker.process.exit_codes import EXIT_SHARD_GROUP_BROKEN
from lmx_worker.process.spec import WorkerSpec
from lmx_worker.sharding.orders import OrderChannel
from lmx_worker.sharding.ring import join_ring
from lmx_worker.sharding.tensor_parallel import shard_model

log = logging.getLogger("lmx.worker.sharding")


def group_broken(why: str) -> NoReturn:
    """The ranks' states can no longer be kept equal (a peer is gone, a
    collective failed, a step failed on this rank only): exit at once,
    without cleanup that could wait on the group. The supervisor restarts
    every rank together."""
    log.error("sharded group broken: %s", why)
    logging.shutdown()
    os._exit(EXIT_SHARD_GROUP_BROKEN)


class GroupEngine(MlxEngine):
    def __init__(self, spec: WorkerSpec) -> None:
        assert spec.shard is not None
        self.group = join_ring(spec.shard)
        self.channel = OrderChannel(self.group)
        super().__init__(spec)

    def _shard(self, model: Any) -> str:
        return shard_model(model, self.group)

    def _plan_weights(self, model: Any, spec: WorkerSpec) -> WeightsPlan:
        """Every rank must hold its weights the same way (a dequantized rank
        beside a quantized one would compute other logits): dequantize only
        when every rank's own plan would (each checks its own memory)."""
        plan = plan_weights(model, spec.mlx_dequantize)
        votes = mx.distributed.all_sum(mx.array([int(plan.dequantize)]), group=self.group)
        agreed = round(float(votes.item().real))
        if agreed in (0, self.group.size()):
            return plan
        return dataclasses.replace(plan, dequantize=False,
                                   reason=f"{plan.reason}; not on every rank: kept as stored")

    def _fail_all(self, message: str) -> list[Any]:
        group_broken(message)

    def reset(self) -> None:
        group_broken("the engine was reset after a failed step")
