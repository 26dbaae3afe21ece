"""The node agent's loop: join, beat, start/stop workers, relay their lives.

Liveness both ways: the agent beats every second; the supervisor answers
every beat period with a Welcome. An agent that hears nothing from the
supervisor for the heartbeat timeout assumes it has been declared lost (the
supervisor has already failed those requests and may have re-placed the
models elsewhere), so it stops its workers (no stray duplicate keeps
memory or answers a stale worker id) and says Hello until it is welcomed
again: a node comes back without anyone restarting anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import msgspec
import psutil
import zmq
import zmq.asyncio
import zmq.auth

from lmx_protocol import encode
from lmx_protocol.messages import Frame
from lmx_protocol.node_messages import (
    NODE_IDENTITY_PREFIX,
    NODE_PROTOCOL_VERSION,
    NodeBeat,
    NodeHello,
    SignalWorker,
    SpawnWorker,
    TerminateWorker,
    Welcome,
    WorkerBeat,
    WorkerExited,
    WorkerStarted,
    decode_to_node,
)
from lmx_worker.node_agent.children import Child, start_child
from lmx_worker.node_agent.host_info import free_disk, host_info
from lmx_worker.process.spec import decode_spec

log = logging.getLogger("lmx.node")

BEAT_SEC = 1.0
# Until the supervisor has said how long it waits (its Welcome).
DEFAULT_TIMEOUT_SEC = 5.0
_SECRET_SUFFIXES = ("_API_KEY", "_TOKEN")


@dataclass
class AgentOptions:
    join: str  # tcp://host:port of the supervisor's workers.listen
    name: str
    key_file: Path  # this node's secret key file (`lmx keys new`)
    server_key: str  # the supervisor's public key (Z85)
    models_dir: Path | None = None
    advertise: str | None = None


def worker_env() -> dict[str, str]:
    """The agent's environment minus secrets a worker never needs."""
    return {k: v for k, v in os.environ.items()
            if not k.upper().endswith(_SECRET_SUFFIXES) and not k.startswith("LMX_SECURITY__")}


class NodeAgent:
    def __init__(self, options: AgentOptions) -> None:
        self.options = options
        self.children: dict[str, Child] = {}
        self.welcomed = False
        self.timeout_sec = DEFAULT_TIMEOUT_SEC
        self.last_heard = 0.0
        # Stops under way (held: the loop keeps only weak references).
        self._tasks: set[asyncio.Task[None]] = set()
        self._ctx = zmq.asyncio.Context()
        self._sock = self._ctx.socket(zmq.DEALER)

    def _connect(self) -> None:
        public, secret = zmq.auth.load_certificate(self.options.key_file)
        if secret is None:
            raise ValueError(f"{self.options.key_file} holds no secret key (use NAME.key_secret)")
        sock = self._sock
        sock.setsockopt(zmq.IDENTITY, NODE_IDENTITY_PREFIX + self.options.name.encode())
        sock.setsockopt(zmq.LINGER, 0)
        # Nothing queues for a peer that is not connected (beats are only
        # worth sending now), and a dead tcp link is noticed and redialled.
        sock.setsockopt(zmq.IMMEDIATE, 1)
        sock.setsockopt(zmq.HEARTBEAT_IVL, 1000)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3000)
        sock.setsockopt(zmq.RECONNECT_IVL, 250)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        sock.curve_publickey = public
        sock.curve_secretkey = secret
        sock.curve_serverkey = self.options.server_key.encode()
        sock.connect(self.options.join)

    def _send(self, frame: Frame) -> None:
        with contextlib.suppress(zmq.Again):
            self._sock.send(encode(frame), flags=zmq.NOBLOCK)

    async def run(self) -> None:
        self._connect()
        log.info("node %s joining %s", self.options.name, self.options.join)
        receiver = asyncio.create_task(self._receive(), name="node-receive")
        try:
            while True:
                self._beat()
                await asyncio.sleep(BEAT_SEC)
                if receiver.done():
                    receiver.result()  # a bug in the receiver must not go unnoticed
        finally:
            receiver.cancel()
            await self._stop_children()
            self._sock.close(linger=0)
            self._ctx.term()

    def _beat(self) -> None:
        now = time.monotonic()
        if self.welcomed and now - self.last_heard > self.timeout_sec:
            log.error("supervisor silent for %.1fs: stopping %d workers and rejoining",
                      now - self.last_heard, len(self.children))
            self.welcomed = False
            self._background(self._stop_children())
        if not self.welcomed:
            self._send(NodeHello(self.options.name, NODE_PROTOCOL_VERSION,
                                 host_info(self.options.models_dir), self.options.advertise))
            return
        self._send(NodeBeat(psutil.virtual_memory().available,
                            free_disk(self.options.models_dir), sorted(self.children)))

    async def _receive(self) -> None:
        while True:
            data = await self._sock.recv()
            try:
                frame = decode_to_node(data)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                log.error("undecodable frame from the supervisor dropped: %s", exc)
                continue
            self.last_heard = time.monotonic()
            if isinstance(frame, Welcome):
                if not self.welcomed:
                    log.info("joined as %s", self.options.name)
                self.welcomed = True
                self.timeout_sec = frame.heartbeat_timeout_sec
            elif isinstance(frame, SpawnWorker):
                await self._spawn(frame)
            elif isinstance(frame, SignalWorker):
                child = self.children.get(frame.worker_id)
                if child is not None:
                    child.signal_group(frame.signal)
            elif isinstance(frame, TerminateWorker):
                child = self.children.get(frame.worker_id)
                if child is not None:
                    self._background(child.terminate(frame.grace_sec))

    def _background(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _local_model_path(self, path: str) -> Path | None:
        """The supervisor's path if it exists here, else the same name in
        this node's models directory."""
        if Path(path).exists():
            return Path(path)
        if self.options.models_dir is not None:
            candidate = self.options.models_dir / Path(path).name
            if candidate.exists():
                return candidate
        return None

    async def _spawn(self, frame: SpawnWorker) -> None:
        try:
            spec = decode_spec(frame.spec_json)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.error("bad worker spec dropped: %s", exc)
            return
        model_path = self._local_model_path(spec.model_path)
        if model_path is None:
            self._send(WorkerExited(spec.worker_id, 127,
                                    f"model {Path(spec.model_path).name} is not on node "
                                    f"{self.options.name}"))
            return
        spec.model_path = str(model_path)
        spec.address = self.options.join
        spec.curve_key_file = str(self.options.key_file)
        spec.curve_server_key = self.options.server_key
        env = worker_env() | frame.env
        try:
            child = await start_child(spec, env, self._relay_beat, self._relay_exit)
        except OSError as exc:
            self._send(WorkerExited(spec.worker_id, 127, f"cannot start a worker: {exc}"))
            return
        self.children[spec.worker_id] = child
        self._send(WorkerStarted(spec.worker_id, child.proc.pid))

    def _relay_beat(self, worker_id: str, progress: int) -> None:
        self._send(WorkerBeat(worker_id, progress))

    def _relay_exit(self, worker_id: str, returncode: int) -> None:
        self.children.pop(worker_id, None)
        self._send(WorkerExited(worker_id, returncode))

    async def _stop_children(self) -> None:
        children = list(self.children.values())
        await asyncio.gather(*(c.terminate(2.0) for c in children), return_exceptions=True)


def route_address(join: str) -> str:
    """This host's address on the route to the supervisor (what peers on
    the gateway's network reach it at), found without sending anything."""
    host = urlsplit(join).hostname or "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((host, 9))
            return str(probe.getsockname()[0])
        except OSError:
            return "127.0.0.1"


def run_agent(options: AgentOptions) -> int:
    """Run until SIGTERM/SIGINT; its workers are stopped on the way out."""
    if options.advertise is None:
        options.advertise = route_address(options.join)

    async def main() -> None:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await NodeAgent(options).run()

    asyncio.run(main())
    return 0
