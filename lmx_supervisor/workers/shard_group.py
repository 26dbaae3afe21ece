"""One MLX model tensor-parallel across several workers (issue 16).

A `ShardedPlacement` starts one worker per rank, each through its own
host's placement (this gateway's, or a node agent's), with the group's ring
addresses: a free port per rank, picked anew for every start (local hosts:
a port the OS hands out; remote hosts: one from `workers.ring_ports`).
Rank 0 is the worker the supervisor talks to; the others only talk to
the group (lmx_worker.sharding).

The `ShardGroup` it returns is a WorkerHandle for the whole group, so
ManagedModel's crash, restart, backoff, hang and quarantine handling apply
to it unchanged: it exits when ANY rank exits (the others are then
SIGKILLed: a group missing a rank cannot compute a single token), its
heartbeat is its stalest rank's, and signals and termination go to every
rank.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import signal
import socket
from collections.abc import Mapping, Sequence
from typing import Any

import msgspec

from lmx_supervisor.workers.transport import RouterHub
from lmx_supervisor.workers.worker_handle import LOCAL_NODE, Placement, WorkerHandle
from lmx_worker.process.spec import ShardSpec, WorkerSpec

log = logging.getLogger("lmx.supervisor")

# How long the group waits for its other ranks to die after SIGKILL before
# reporting its exit anyway (a remote rank whose node went silent).
REAP_TIMEOUT_SEC = 10.0


class ShardGroup:
    def __init__(self, ranks: Sequence[WorkerHandle], ring_hosts: Sequence[str]) -> None:
        self.ranks = list(ranks)
        self.ring_hosts = list(ring_hosts)
        self.first_exit_rank: int | None = None
        self._returncode: int | None = None
        self.exited: asyncio.Task[int] = asyncio.create_task(
            self._watch(), name=f"shard-group-{self.ranks[0].pid}")

    async def _watch(self) -> int:
        waits = {rank.exited: i for i, rank in enumerate(self.ranks)}
        done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        first = min(waits[task] for task in done)
        code = self.ranks[first].exited.result()
        self.first_exit_rank = first
        for i, rank in enumerate(self.ranks):
            if rank.returncode is None:
                log.warning("shard group of pid %d: rank %d exited (%s); killing rank %d "
                            "(pid %d)", self.pid, first, code, i, rank.pid)
                rank.signal_group(signal.SIGKILL)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*(r.exited for r in self.ranks),
                                                  return_exceptions=True), REAP_TIMEOUT_SEC)
        self._returncode = code
        return code

    @property
    def pid(self) -> int:
        return self.ranks[0].pid

    @property
    def node(self) -> str:
        return self.ranks[0].node

    @property
    def last_beat(self) -> float:
        return min(rank.last_beat for rank in self.ranks)

    @property
    def progress(self) -> int:
        # Rank 0's counter: it moves with every step and every frame, and
        # stops when any rank stops (rank 0 then waits in a collective).
        return self.ranks[0].progress

    @property
    def returncode(self) -> int | None:
        return self._returncode

    def signal_group(self, sig: signal.Signals) -> None:
        for rank in self.ranks:
            rank.signal_group(sig)

    async def terminate(self, grace_sec: float) -> int:
        if self._returncode is None:
            self.signal_group(signal.SIGTERM)
            try:
                return await asyncio.wait_for(asyncio.shield(self.exited), grace_sec)
            except TimeoutError:
                self.signal_group(signal.SIGKILL)
        return await self.exited

    def describe(self) -> list[dict[str, Any]]:
        return [{"rank": i, "node": rank.node, "pid": rank.pid,
                 "ring_address": self.ring_hosts[i], "returncode": rank.returncode}
                for i, rank in enumerate(self.ranks)]


def _free_local_ports(host: str, count: int) -> list[int]:
    """Ports the OS says are free on `host`, all held open until every one is
    picked (so two local ranks never get the same one)."""
    held: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
            sock.bind((host, 0))
            held.append(sock)
        return [int(sock.getsockname()[1]) for sock in held]
    finally:
        for sock in held:
            sock.close()


class ShardedPlacement:
    def __init__(self, placements: Sequence[Placement], remote_ports: tuple[int, int]) -> None:
        if len(placements) < 2:
            raise ValueError("a sharded model needs at least two placements")
        self.placements = list(placements)
        self._remote_ports = remote_ports

    @property
    def node(self) -> str:
        return self.placements[0].node

    @property
    def hub(self) -> RouterHub:
        return self.placements[0].hub

    @property
    def ring_host(self) -> str:
        return self.placements[0].ring_host

    @property
    def shard_nodes(self) -> list[str]:
        return [p.node for p in self.placements]

    def ring_addresses(self) -> list[str]:
        """One "ip:port" per rank, for one start of the group."""
        local = [i for i, p in enumerate(self.placements) if p.node == LOCAL_NODE]
        ports: dict[int, int] = {}
        by_host: dict[str, list[int]] = {}
        for i in local:
            by_host.setdefault(self.placements[i].ring_host, []).append(i)
        for host, ranks in by_host.items():
            ports.update(zip(ranks, _free_local_ports(host, len(ranks)), strict=True))
        low, high = self._remote_ports
        for i, placement in enumerate(self.placements):
            if i not in ports:
                taken = {ports[j] for j in ports
                         if self.placements[j].ring_host == placement.ring_host}
                choices = [p for p in range(low, high + 1) if p not in taken]
                if not choices:
                    raise OSError(f"no free ring port left in {low}-{high} on "
                                  f"{placement.node}")
                ports[i] = random.choice(choices)
        return [f"{p.ring_host}:{ports[i]}" for i, p in enumerate(self.placements)]

    async def spawn(self, spec: WorkerSpec, env: Mapping[str, str] | None) -> WorkerHandle:
        hosts = self.ring_addresses()
        started: list[WorkerHandle] = []
        try:
            for rank, placement in enumerate(self.placements):
                worker_id = spec.worker_id if rank == 0 else f"{spec.worker_id}.rank{rank}"
                rank_spec = msgspec.structs.replace(spec, worker_id=worker_id,
                                                    shard=ShardSpec(rank, hosts))
                started.append(await placement.spawn(rank_spec, env))
        except BaseException:
            for handle in started:  # a partial group cannot serve: take it down
                handle.signal_group(signal.SIGKILL)
            raise
        log.info("sharded group started: %s", ", ".join(
            f"rank {i} pid {h.pid} on {h.node} at {hosts[i]}" for i, h in enumerate(started)))
        return ShardGroup(started, hosts)


def shard_nodes(placement: Placement) -> list[str] | None:
    """The hosts of a sharded placement's ranks (None: one worker)."""
    return placement.shard_nodes if isinstance(placement, ShardedPlacement) else None


def describe_shards(placement: Placement, worker: WorkerHandle | None
                    ) -> list[dict[str, Any]] | None:
    """The ranks of a sharded model, for /admin/models (None: not sharded)."""
    if not isinstance(placement, ShardedPlacement):
        return None
    if isinstance(worker, ShardGroup):
        return worker.describe()
    return [{"rank": i, "node": node, "pid": None, "ring_address": None, "returncode": None}
            for i, node in enumerate(placement.shard_nodes)]
