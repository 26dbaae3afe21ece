"""A worker a node agent runs, as the supervisor sees it: a WorkerHandle
fed by the agent's relays (started, heartbeat, exited), and the Placement
that asks an agent to start one."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from lmx_protocol.messages import Frame
from lmx_protocol.node_messages import SignalWorker, SpawnWorker, TerminateWorker
from lmx_supervisor.workers.transport import RouterHub
from lmx_worker.process.spec import WorkerSpec, encode_spec

if TYPE_CHECKING:
    from lmx_supervisor.nodes.service import NodeService
    from lmx_supervisor.workers.worker_handle import WorkerHandle

# After a Terminate, how long beyond its grace the agent may take to say the
# worker exited before the supervisor stops waiting (the node may be gone).
_TERMINATE_SLACK_SEC = 3.0


class RemoteWorker:
    def __init__(self, worker_id: str, node: str, send: Callable[[Frame], None]) -> None:
        self.worker_id = worker_id
        self._node = node
        self._send = send
        self._pid = 0
        self.last_beat = time.monotonic()
        self.progress = 0
        self._exit: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.exited: asyncio.Task[int] = asyncio.create_task(self._wait(),
                                                             name=f"remote-{worker_id}")
        self.error: str | None = None

    async def _wait(self) -> int:
        return await self._exit

    @property
    def pid(self) -> int:
        """The worker's pid on its node (0 until the agent reports it)."""
        return self._pid

    @property
    def node(self) -> str:
        return self._node

    @property
    def returncode(self) -> int | None:
        return self._exit.result() if self._exit.done() else None

    def started(self, pid: int) -> None:
        self._pid = pid
        self.last_beat = time.monotonic()

    def beat(self, progress: int) -> None:
        self.progress = progress
        self.last_beat = time.monotonic()

    def gone(self, returncode: int, error: str | None = None) -> None:
        if not self._exit.done():
            self.error = error
            self._exit.set_result(returncode)

    def signal_group(self, sig: signal.Signals) -> None:
        self._send(SignalWorker(self.worker_id, int(sig)))

    async def terminate(self, grace_sec: float) -> int:
        if self.returncode is None:
            self._send(TerminateWorker(self.worker_id, grace_sec))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self.exited),
                                       grace_sec + _TERMINATE_SLACK_SEC)
            # No word from the agent: as far as this supervisor knows it is
            # gone (an agent that rejoins stops workers it was not asked for).
            self.gone(-signal.SIGKILL, "no exit report from its node")
        return await self.exited


class RemotePlacement:
    """Workers started by the agent of node `name`, connecting to the
    supervisor's tcp ROUTER."""

    def __init__(self, service: NodeService, name: str) -> None:
        self._service = service
        self._name = name

    @property
    def node(self) -> str:
        return self._name

    @property
    def hub(self) -> RouterHub:
        return self._service.hub

    @property
    def ring_host(self) -> str:
        return self._service.node(self._name).address

    async def spawn(self, spec: WorkerSpec, env: Mapping[str, str] | None) -> WorkerHandle:
        # The agent runs the worker with its own environment: the gateway's
        # (paths, threads of this host) means nothing there.
        return self._service.spawn(self._name, SpawnWorker(encode_spec(spec)), spec.worker_id)
