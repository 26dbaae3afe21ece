"""The nodes that joined: the CURVE-secured tcp ROUTER they (and their
workers) connect to, who they are, whether they still beat.

A node is `connected` from its first Hello until it misses heartbeats for
`nodes.heartbeat_timeout_sec`; then `unreachable`, and the supervisor is
told at once (its models' requests end, the models become unavailable).
The agent, no longer welcomed, stops its workers and says Hello again
until it is welcomed: the node is `connected` again and its models come
back, with no restart of anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec
import zmq.asyncio
from zmq.auth.asyncio import AsyncioAuthenticator

from lmx_protocol import encode
from lmx_protocol.messages import Frame
from lmx_protocol.node_messages import (
    NODE_IDENTITY_PREFIX,
    NODE_PROTOCOL_VERSION,
    HostInfo,
    NodeBeat,
    NodeHello,
    SpawnWorker,
    TerminateWorker,
    Welcome,
    WorkerBeat,
    WorkerExited,
    WorkerStarted,
    decode_from_node,
)
from lmx_supervisor.background import SupervisedTask
from lmx_supervisor.config import Config
from lmx_supervisor.nodes.keys import AuthorizedKeys, server_key_pair
from lmx_supervisor.nodes.remote import RemoteWorker
from lmx_supervisor.workers.transport import PeerGone, RouterHub
from lmx_supervisor.workers.worker_handle import HostUnreachable

log = logging.getLogger("lmx.nodes")

# Nodes remembered at most (an unreachable one stays listed until then).
MAX_NODES = 64
EventSink = Callable[[str, dict[str, Any]], object]
NodeCallback = Callable[[str], None]


class NodeState(enum.StrEnum):
    CONNECTED = "connected"
    UNREACHABLE = "unreachable"


@dataclass
class Node:
    name: str
    identity: bytes
    host: HostInfo
    address: str
    state: NodeState
    joined_at: float  # time.time() of the latest join
    last_heartbeat: float  # time.monotonic()
    # The CURVE public key (Z85) it joined with: the name is bound to it.
    key: str = ""

    def report(self, now: float) -> dict[str, Any]:
        return {"name": self.name, "state": str(self.state), "address": self.address,
                "joined_at": self.joined_at,
                "last_heartbeat_sec_ago": round(now - self.last_heartbeat, 2),
                "ram_total_bytes": self.host.ram_total_bytes,
                "ram_available_bytes": self.host.ram_available_bytes,
                "cpu_cores": self.host.cpu_cores, "accelerator": self.host.accelerator,
                "free_disk_bytes": self.host.free_disk_bytes, "models": self.host.models}


class NodeService:
    def __init__(self, config: Config, emit: EventSink) -> None:
        self.config = config
        self._emit = emit
        self.nodes: dict[str, Node] = {}
        self.workers: dict[str, RemoteWorker] = {}
        self._hub: RouterHub | None = None
        self._ctx: zmq.asyncio.Context | None = None
        self._auth: AsyncioAuthenticator | None = None
        self._monitor = SupervisedTask("node heartbeat monitor", self._watch)
        self.public_key: str | None = None
        # Who sent the message being handled (its key), for Hello.
        self._sender_key = ""
        # Set by the supervisor: a node was declared lost (called before its
        # workers are marked gone, so models see the loss, not a crash), and
        # a node (re)joined.
        self.on_lost: NodeCallback = lambda _name: None
        self.on_joined: NodeCallback = lambda _name: None

    @property
    def enabled(self) -> bool:
        return self.config.workers.listen is not None

    @property
    def hub(self) -> RouterHub:
        if self._hub is None:
            raise OSError("no tcp endpoint for nodes (workers.listen is not set)")
        return self._hub

    @property
    def timeout_sec(self) -> float:
        return self.config.nodes.heartbeat_timeout_sec

    async def start(self) -> None:
        listen = self.config.workers.listen
        if listen is None:
            return
        keys = server_key_pair(self.config.nodes)
        self.public_key = keys[0].decode()
        self._ctx = zmq.asyncio.Context()
        # The authenticator runs before the socket binds: no window in which
        # a CURVE client with any key would be let in.
        self._auth = AsyncioAuthenticator(self._ctx)
        self._auth.start()
        self._auth.configure_curve_callback("*", AuthorizedKeys(self.config.nodes))
        self._hub = RouterHub(listen, max_message_bytes=self.config.workers.max_message_bytes,
                              context=self._ctx, curve_server_keys=keys)
        self._hub.register_peers(NODE_IDENTITY_PREFIX, self._on_node_frame)
        self._hub.identity_check = self._sender_owns
        self._hub.start()
        self._monitor.start()
        log.info("nodes may join at %s (server key %s)", self._hub.address, self.public_key)

    def problems(self) -> list[str]:
        if self._hub is None:
            return []
        problem = self._monitor.problem()
        return self._hub.problems() + ([problem] if problem else [])

    async def close(self) -> None:
        await self._monitor.stop()
        if self._hub is not None:
            await self._hub.close()
        if self._auth is not None:
            self._auth.stop()
        if self._ctx is not None:
            self._ctx.term()

    # --- lookup -----------------------------------------------------------------

    def node(self, name: str) -> Node:
        node = self.nodes.get(name)
        if node is None:
            raise KeyError(name)
        return node

    def connected(self) -> list[Node]:
        return [n for n in self.nodes.values() if n.state is NodeState.CONNECTED]

    def report(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        return [n.report(now) for n in sorted(self.nodes.values(), key=lambda n: n.name)]

    # --- frames -----------------------------------------------------------------

    def _send(self, identity: bytes, frame: Frame) -> None:
        if self._hub is not None:
            self._hub.send_raw(identity, encode(frame))

    def _sender_owns(self, identity: bytes, key: str) -> bool:
        """A node speaks only as itself (the name is bound to the key it
        first joined with), a worker only with its own node's key."""
        self._sender_key = key
        if identity.startswith(NODE_IDENTITY_PREFIX):
            node = self.nodes.get(identity[len(NODE_IDENTITY_PREFIX):].decode(errors="replace"))
            return node is None or node.key == key
        worker = self.workers.get(identity.decode(errors="replace"))
        if worker is None:
            return False
        owner = self.nodes.get(worker.node)
        return owner is not None and owner.key == key

    def _on_node_frame(self, identity: bytes, payload: bytes) -> None:
        name = identity[len(NODE_IDENTITY_PREFIX):].decode(errors="replace")
        try:
            frame = decode_from_node(payload)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.error("undecodable frame from node %r dropped: %s", name[:64], exc)
            return
        if isinstance(frame, NodeHello):
            self._hello(identity, name, frame)
            return
        node = self.nodes.get(name)
        if node is None or node.state is not NodeState.CONNECTED:
            return  # not welcomed (again) yet: it will say Hello
        node.last_heartbeat = time.monotonic()
        if isinstance(frame, NodeBeat):
            node.host.ram_available_bytes = frame.ram_available_bytes
            node.host.free_disk_bytes = frame.free_disk_bytes
            self._welcome(node)
            for worker_id in frame.worker_ids:
                if worker_id not in self.workers:  # left over: nobody routes to it
                    self._send_quietly(identity, TerminateWorker(worker_id, 2.0))
            return
        worker = self.workers.get(frame.worker_id)
        if worker is None or worker.node != name:
            return
        if isinstance(frame, WorkerBeat):
            worker.beat(frame.progress)
        elif isinstance(frame, WorkerStarted):
            worker.started(frame.pid)
        elif isinstance(frame, WorkerExited):
            if frame.error:
                log.error("node %s: worker %s: %s", name, frame.worker_id, frame.error)
            worker.gone(frame.returncode, frame.error)

    def _hello(self, identity: bytes, name: str, hello: NodeHello) -> None:
        if hello.protocol_version != NODE_PROTOCOL_VERSION:
            log.error("node %s speaks node protocol %d, this supervisor %d: not admitted",
                      name, hello.protocol_version, NODE_PROTOCOL_VERSION)
            return
        previous = self.nodes.get(name)
        if previous is None and len(self.nodes) >= MAX_NODES:
            log.error("node %s refused: %d nodes already known", name, MAX_NODES)
            return
        if previous is not None and previous.state is NodeState.CONNECTED:
            # A connected node saying Hello again: its agent restarted, and
            # the workers the old one ran died with it.
            self._workers_gone(name, "its node agent restarted")
        node = Node(name, identity, hello.host, hello.advertise or "", NodeState.CONNECTED,
                    time.time(), time.monotonic(), self._sender_key)
        self.nodes[name] = node
        self._welcome(node)
        log.info("node %s joined (%s, %d cores, %.1f GB RAM)", name, hello.host.accelerator,
                 hello.host.cpu_cores, hello.host.ram_total_bytes / 1e9)
        self._emit("node_joined", {"node": name, "address": node.address})
        self.on_joined(name)

    def _welcome(self, node: Node) -> None:
        with contextlib.suppress(PeerGone):  # its heartbeat check decides
            self._send(node.identity, Welcome(self.timeout_sec))

    def _workers_gone(self, name: str, why: str) -> None:
        for worker in [w for w in self.workers.values() if w.node == name]:
            worker.gone(-signal.SIGKILL, why)

    # --- workers ------------------------------------------------------------------

    def spawn(self, name: str, frame: SpawnWorker, worker_id: str) -> RemoteWorker:
        node = self.nodes.get(name)
        if node is None or node.state is not NodeState.CONNECTED:
            raise HostUnreachable(f"node '{name}' is not connected")
        identity = node.identity
        worker = RemoteWorker(worker_id, name, lambda f: self._send_quietly(identity, f))
        self.workers[worker_id] = worker
        worker.exited.add_done_callback(lambda _t: self.workers.pop(worker_id, None))
        try:
            self._send(identity, frame)
        except PeerGone as exc:
            worker.gone(127, str(exc))
            # Connected by its heartbeat, yet not on the socket right now: a
            # crash-like failure (retried with backoff), not a lost node.
            raise OSError(f"node '{name}' is not reachable: {exc}") from exc
        return worker

    def _send_quietly(self, identity: bytes, frame: Frame) -> None:
        try:
            self._send(identity, frame)
        except PeerGone as exc:
            log.warning("%s", exc)

    # --- heartbeats -----------------------------------------------------------------

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(min(0.25, self.timeout_sec / 8))
            now = time.monotonic()
            for node in self.connected():
                silent = now - node.last_heartbeat
                if silent > self.timeout_sec:
                    self._lose(node, silent)

    def _lose(self, node: Node, silent: float) -> None:
        node.state = NodeState.UNREACHABLE
        log.error("node %s unreachable: no heartbeat for %.1fs", node.name, silent)
        self._emit("node_unreachable", {"node": node.name, "silent_sec": round(silent, 2)})
        self.on_lost(node.name)
        self._workers_gone(node.name, f"node {node.name} unreachable")
