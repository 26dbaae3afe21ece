"""Encoding and decoding of frames: one encoder, one typed decoder per
direction, built once and reused (msgspec's decoders are cheap to call but
not to build)."""

from __future__ import annotations

import msgspec

from lmx_protocol.messages import Frame, FromWorker, ToWorker

_encoder = msgspec.msgpack.Encoder()
_to_worker = msgspec.msgpack.Decoder(ToWorker)
_from_worker = msgspec.msgpack.Decoder(FromWorker)


def encode(frame: Frame) -> bytes:
    return _encoder.encode(frame)


def decode_from_supervisor(data: bytes) -> ToWorker:
    """Decode a frame a worker received. Raises msgspec.DecodeError."""
    frame: ToWorker = _to_worker.decode(data)
    return frame


def decode_from_worker(data: bytes) -> FromWorker:
    """Decode a frame the supervisor received. Raises msgspec.DecodeError."""
    frame: FromWorker = _from_worker.decode(data)
    return frame
