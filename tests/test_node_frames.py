"""The supervisor <-> node agent frames (lmx_protocol.node_messages), in
process: each survives encode/decode in its own direction with every field
set, a frame sent the wrong way or garbage is refused, and no node frame
can be mistaken for a worker frame (or the reverse)."""

from __future__ import annotations

import typing

import msgspec
import pytest

from lmx_protocol import Generate, Ready, SamplingParams, decode_from_worker, encode
from lmx_protocol.messages import Frame
from lmx_protocol.node_messages import (
    NODE_PROTOCOL_VERSION,
    HostInfo,
    NodeBeat,
    NodeHello,
    NodeToSupervisor,
    SignalWorker,
    SpawnWorker,
    SupervisorToNode,
    TerminateWorker,
    Welcome,
    WorkerBeat,
    WorkerExited,
    WorkerStarted,
    decode_from_node,
    decode_to_node,
)

FROM_NODE: list[Frame] = [
    NodeHello("studio", NODE_PROTOCOL_VERSION,
              HostInfo(64 << 30, 40 << 30, 12, "apple-silicon", 900 << 30, ["a.gguf", "b-mlx"]),
              advertise="127.0.0.7"),
    NodeBeat(39 << 30, 899 << 30, ["m#1-abc", "m#2-def"]),
    WorkerBeat("m#1-abc", 12345),
    WorkerStarted("m#1-abc", 4242),
    WorkerExited("m#1-abc", -9, "model x.gguf is not on node studio"),
]
TO_NODE: list[Frame] = [
    Welcome(5.0),
    SpawnWorker('{"worker_id": "m#1-abc"}', {"OMP_NUM_THREADS": "4"}),
    SignalWorker("m#1-abc", 19),
    TerminateWorker("m#1-abc", 5.0),
]


def test_every_type_is_covered() -> None:
    assert {type(f) for f in FROM_NODE} == set(typing.get_args(NodeToSupervisor))
    assert {type(f) for f in TO_NODE} == set(typing.get_args(SupervisorToNode))


@pytest.mark.parametrize("frame", FROM_NODE, ids=lambda f: type(f).__name__)
def test_node_frames_round_trip(frame: Frame) -> None:
    assert decode_from_node(encode(frame)) == frame
    with pytest.raises(msgspec.ValidationError):
        decode_to_node(encode(frame))


@pytest.mark.parametrize("frame", TO_NODE, ids=lambda f: type(f).__name__)
def test_supervisor_frames_round_trip(frame: Frame) -> None:
    assert decode_to_node(encode(frame)) == frame
    with pytest.raises(msgspec.ValidationError):
        decode_from_node(encode(frame))


def test_node_and_worker_frames_do_not_mix() -> None:
    with pytest.raises(msgspec.ValidationError):
        decode_from_worker(encode(FROM_NODE[0]))
    with pytest.raises(msgspec.ValidationError):
        decode_from_node(encode(Ready(1, "w", "m", "llama_cpp", 1, [], 0, 2048)))
    with pytest.raises(msgspec.ValidationError):
        decode_to_node(encode(Generate("r", SamplingParams(), prompt="hi")))
    with pytest.raises(msgspec.DecodeError):
        decode_from_node(b"\xc1 not msgpack")
