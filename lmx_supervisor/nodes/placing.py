"""Where a model's worker runs, and what happens to a node's models when
the node is lost or comes back."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from lmx_supervisor.errors import BadRequest, ModelNotFound
from lmx_supervisor.lifecycle.managed_model import ManagedModel
from lmx_supervisor.lifecycle.states import ModelState
from lmx_supervisor.memory.memory_estimate import MemoryEstimate
from lmx_supervisor.nodes.remote import RemotePlacement
from lmx_supervisor.nodes.service import NodeService, NodeState
from lmx_supervisor.workers.worker_handle import LOCAL_NODE, Placement

if TYPE_CHECKING:
    from lmx_supervisor.memory.memory_guard import MemoryGuard

log = logging.getLogger("lmx.nodes")


class Placer:
    def __init__(self, service: NodeService, local: Placement, memory: MemoryGuard,
                 models: Callable[[], list[ManagedModel]], replace_on_loss: Callable[[], bool],
                 lock: Callable[[str], asyncio.Lock]) -> None:
        self.service = service
        self.local = local
        self._memory = memory
        self._models = models
        self._replace_on_loss = replace_on_loss
        # The supervisor's per-model lifecycle lock: a relaunch never
        # interleaves with an unload or a restart of the same model.
        self._lock = lock
        self._tasks: set[asyncio.Task[None]] = set()
        service.on_lost = self._node_lost
        service.on_joined = self._node_joined

    def named(self, node: str) -> Placement:
        """The placement `"node": NAME` of a load asks for."""
        if node == LOCAL_NODE:
            return self.local
        if not self.service.enabled:
            raise BadRequest("This gateway takes no nodes (workers.listen is not set)",
                             param="node", code="nodes_disabled")
        known = self.service.nodes.get(node)
        if known is None:
            names = ", ".join(sorted(self.service.nodes)) or "none"
            raise ModelNotFound(f"Node '{node}' is not known (joined nodes: {names})",
                                param="node", code="node_not_found")
        if known.state is not NodeState.CONNECTED:
            raise BadRequest(f"Node '{node}' is {known.state}", param="node",
                             code="node_unreachable")
        return RemotePlacement(self.service, node)

    def choose(self, model_id: str, estimate: MemoryEstimate, skip: str | None = None
               ) -> Placement | None:
        """Local first when it fits without evicting anything; else the
        connected node with the most free RAM that has room; None: none has
        room (the caller admits locally, which may evict or refuse)."""
        if skip != LOCAL_NODE and self._memory.shortfall(model_id, estimate.total_bytes) is None:
            return self.local
        roomy = [n for n in self.service.connected()
                 if n.name != skip and n.host.ram_available_bytes >= estimate.total_bytes]
        if not roomy:
            return None
        best = max(roomy, key=lambda n: n.host.ram_available_bytes)
        return RemotePlacement(self.service, best.name)

    # --- node loss --------------------------------------------------------------

    def _node_lost(self, node: str) -> None:
        lost = [m for m in self._models() if m.node_lost(node)]
        if lost:
            self._spawn_task(self._after_loss(node, lost))

    async def _after_loss(self, node: str, lost: list[ManagedModel]) -> None:
        for model in lost:
            await model.release_lost_worker()
        if not self._replace_on_loss():
            return
        for model in lost:
            estimate = model.memory_estimate
            placement = self.choose(model.model_id, estimate, skip=node) if estimate else None
            if placement is None:
                log.error("model %s: no other host has room; unavailable until node %s "
                          "returns", model.model_id, node)
                continue
            log.info("model %s: re-placed from lost node %s on %s", model.model_id, node,
                     placement.node)
            await self._relaunch(model, placement)

    def _node_joined(self, node: str) -> None:
        back = [m for m in self._models()
                if m.state is ModelState.UNAVAILABLE and m.placement.node == node]
        for model in back:
            self._spawn_task(self._relaunch(model, RemotePlacement(self.service, node)))

    async def _relaunch(self, model: ManagedModel, placement: Placement) -> None:
        async with self._lock(model.model_id):
            if model not in self._models():  # unloaded meanwhile
                return
            # This host's memory cap for a worker here; a node's own
            # memory is not this host's to budget.
            estimate = model.memory_estimate
            model.memory_cap_bytes = (
                self._memory.worker_cap(estimate, model.settings.n_threads)
                if placement.node == LOCAL_NODE and estimate is not None else None)
            await model.relaunch(placement)

    def _spawn_task(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

