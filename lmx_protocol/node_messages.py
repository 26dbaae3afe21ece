"""Frames between the supervisor and a node agent (`lmx node --join`).

A node agent is a small process on another host: it connects one DEALER
(identity "node:<name>") to the supervisor's CURVE-secured tcp ROUTER,
describes its host, starts and stops workers when told, and relays their
heartbeats and exits (the pipes a local worker's parent reads). The workers
it starts connect their own DEALER to the same ROUTER for model frames.
Same evolution rule as lmx_protocol.messages: append-only fields.
"""

from __future__ import annotations

import msgspec

from lmx_protocol.messages import Frame

NODE_PROTOCOL_VERSION = 1
# The ROUTER identity prefix of a node agent (a worker's is its worker id).
NODE_IDENTITY_PREFIX = b"node:"


class HostInfo(msgspec.Struct, omit_defaults=True, gc=False):
    ram_total_bytes: int
    ram_available_bytes: int
    cpu_cores: int
    accelerator: str
    free_disk_bytes: int
    # Model files and MLX dirs under the node's models directory (names).
    models: list[str] = msgspec.field(default_factory=list)


# --- node -> supervisor ------------------------------------------------------


class NodeHello(Frame, tag="node_hello"):
    """Sent on connect and repeated until a Welcome arrives."""

    name: str
    protocol_version: int
    host: HostInfo
    # The address peers on other hosts reach this node at (`--advertise`).
    advertise: str | None = None


class NodeBeat(Frame, tag="node_beat"):
    ram_available_bytes: int
    free_disk_bytes: int
    # Workers the agent runs now: one the supervisor does not know is stopped.
    worker_ids: list[str] = msgspec.field(default_factory=list)


class WorkerBeat(Frame, tag="worker_beat"):
    """A worker's heartbeat record, relayed (its progress counter)."""

    worker_id: str
    progress: int


class WorkerStarted(Frame, tag="worker_started"):
    worker_id: str
    pid: int


class WorkerExited(Frame, tag="worker_exited"):
    """The worker exited (negative: killed by that signal), or could not be
    started at all (returncode 127 and `error`)."""

    worker_id: str
    returncode: int
    error: str | None = None


NodeToSupervisor = NodeHello | NodeBeat | WorkerBeat | WorkerStarted | WorkerExited


# --- supervisor -> node ------------------------------------------------------


class Welcome(Frame, tag="welcome"):
    """The supervisor accepted the node; also its liveness beat to the node."""

    heartbeat_timeout_sec: float


class SpawnWorker(Frame, tag="spawn_worker"):
    # A WorkerSpec as JSON (lmx_worker.process.spec); the agent fills in the address
    # and key file its worker connects with.
    spec_json: str
    env: dict[str, str] = msgspec.field(default_factory=dict)


class SignalWorker(Frame, tag="signal_worker"):
    worker_id: str
    signal: int


class TerminateWorker(Frame, tag="terminate_worker"):
    worker_id: str
    grace_sec: float


SupervisorToNode = Welcome | SpawnWorker | SignalWorker | TerminateWorker

_to_node = msgspec.msgpack.Decoder(SupervisorToNode)
_from_node = msgspec.msgpack.Decoder(NodeToSupervisor)


def decode_to_node(data: bytes) -> SupervisorToNode:
    frame: SupervisorToNode = _to_node.decode(data)
    return frame


def decode_from_node(data: bytes) -> NodeToSupervisor:
    frame: NodeToSupervisor = _from_node.decode(data)
    return frame
