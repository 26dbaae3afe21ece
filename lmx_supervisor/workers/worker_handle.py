"""What the supervisor holds for one running worker, wherever it runs.

A `ManagedModel` never needs to know whether its worker is a child process of
this gateway (`WorkerProcess`) or a process a node agent started on another
host, or a group of ranks of one sharded model: it needs the worker's exit,
its heartbeat (last beat, progress counter), a way to signal it and a way to
stop it. A `Placement` says where the next worker of a model starts: which
ROUTER socket its DEALER connects to (the ipc socket for local workers, the
CURVE-secured tcp socket for remote ones) and how to start it.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Mapping
from typing import Protocol

from lmx_supervisor.workers.transport import RouterHub
from lmx_supervisor.workers.worker_process import WorkerProcess
from lmx_worker.process.spec import WorkerSpec

LOCAL_NODE = "local"
_WILDCARD_HOSTS = frozenset({"", "*", "0.0.0.0", "::", "[::]"})


def ring_host_of(listen: str | None) -> str:
    """The host part of the `workers.listen` tcp endpoint (what other hosts
    reach this one at); loopback when none is set or it is a wildcard."""
    if not listen or not listen.startswith("tcp://"):
        return "127.0.0.1"
    host = listen[len("tcp://"):].rsplit(":", 1)[0]
    return "127.0.0.1" if host in _WILDCARD_HOSTS else host.strip("[]")


class HostUnreachable(OSError):
    """Raised by `Placement.spawn` when the placement's host cannot be
    reached now (a node that is not connected): the model waits for it
    (unavailable) instead of counting crashes against itself."""


class WorkerHandle(Protocol):
    @property
    def pid(self) -> int: ...

    @property
    def node(self) -> str:
        """The host the worker runs on ("local": this gateway's)."""
        ...

    @property
    def last_beat(self) -> float:
        """time.monotonic() of the latest heartbeat received."""
        ...

    @property
    def progress(self) -> int:
        """The worker's progress counter in that heartbeat."""
        ...

    @property
    def exited(self) -> asyncio.Task[int]:
        """Done with the exit status (negative: killed by that signal)."""
        ...

    @property
    def returncode(self) -> int | None: ...

    def signal_group(self, sig: signal.Signals) -> None: ...

    async def terminate(self, grace_sec: float) -> int: ...


class Placement(Protocol):
    @property
    def node(self) -> str: ...

    @property
    def hub(self) -> RouterHub:
        """The ROUTER socket this placement's workers connect to."""
        ...

    @property
    def ring_host(self) -> str:
        """An IP address of this placement's host that peers on other hosts
        can reach (where an MLX ring backend rank binds its socket)."""
        ...

    async def spawn(self, spec: WorkerSpec, env: Mapping[str, str] | None) -> WorkerHandle:
        """Start a worker; raises OSError when it cannot be started."""
        ...


class LocalPlacement:
    """A child process of this gateway, over the ipc socket."""

    def __init__(self, hub: RouterHub, ring_host: str = "127.0.0.1") -> None:
        self._hub = hub
        self._ring_host = ring_host

    @property
    def node(self) -> str:
        return LOCAL_NODE

    @property
    def hub(self) -> RouterHub:
        return self._hub

    @property
    def ring_host(self) -> str:
        return self._ring_host

    async def spawn(self, spec: WorkerSpec, env: Mapping[str, str] | None) -> WorkerHandle:
        return await WorkerProcess.spawn(spec, env=env)
