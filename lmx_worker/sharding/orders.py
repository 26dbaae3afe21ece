"""What rank 0 tells the other ranks before each engine step, and how.

An order carries everything that changed the engine's state since the last
step, in the order rank 0 applied it: requests queued (with the prompt
tokens rank 0 computed and a sampling seed rank 0 drew, so no follower
templates, tokenizes or draws on its own), requests dropped, sequences
retired after the last step, and the prompt-reading plan of this step
(from rank 0's timing-adaptive budget). Each order is one step: a follower
applies it and runs the step.

Orders travel over the group itself, as an all_sum in which only rank 0
contributes non-zero bytes (as mlx_lm.server shares its requests): a fixed
head carries small orders whole, a second collective the rest of a large
one. Using the group keeps one transport, one ordering and one failure
mode: a lost peer fails the next collective. The collectives run on
mlx-lm's generation stream, the one the model's own all_sums run on: ops on
one stream execute in the order they were issued, and that order is the
same on every rank; on a stream of their own they could interleave with a
step still in flight differently on each rank (and sum unrelated arrays).
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import msgspec
import numpy as np
from mlx_lm.generate import generation_stream

from lmx_protocol import Generate

HEAD_BYTES = 1024
_LENGTH_BYTES = 4


class Admit(msgspec.Struct, tag="admit", array_like=True):
    request: Generate
    prompt: list[int]


class Drop(msgspec.Struct, tag="drop", array_like=True):
    request_id: str


class StepOrder(msgspec.Struct, array_like=True):
    retired: list[int]  # generator uids rank 0 retired after the last step
    commands: list[Admit | Drop]
    prefill_batch_size: int
    prefill_step_size: int


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(StepOrder)


class OrderChannel:
    def __init__(self, group: Any) -> None:
        self._group = group
        self.bytes_sent = 0  # payload bytes rank 0 has broadcast (for the benchmark)

    def _sum(self, data: np.ndarray) -> np.ndarray:
        with mx.stream(generation_stream):
            total = mx.distributed.all_sum(mx.array(data), group=self._group)
            mx.eval(total)
        return np.array(total, dtype=np.uint8)

    def send(self, order: StepOrder) -> None:
        payload = _encoder.encode(order)
        head = np.zeros(HEAD_BYTES, dtype=np.uint8)
        head[:_LENGTH_BYTES] = np.frombuffer(len(payload).to_bytes(_LENGTH_BYTES, "little"),
                                             dtype=np.uint8)
        first = payload[:HEAD_BYTES - _LENGTH_BYTES]
        head[_LENGTH_BYTES:_LENGTH_BYTES + len(first)] = np.frombuffer(first, dtype=np.uint8)
        self._sum(head)
        rest = payload[len(first):]
        if rest:
            self._sum(np.frombuffer(rest, dtype=np.uint8))
        self.bytes_sent += len(payload)

    def receive(self) -> StepOrder:
        head = self._sum(np.zeros(HEAD_BYTES, dtype=np.uint8))
        length = int.from_bytes(head[:_LENGTH_BYTES].tobytes(), "little")
        payload = head[_LENGTH_BYTES:_LENGTH_BYTES + length].tobytes()
        if length > len(payload):
            payload += self._sum(np.zeros(length - len(payload), dtype=np.uint8)).tobytes()
        return _decoder.decode(payload)
