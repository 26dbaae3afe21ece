"""The supervisor's ROUTER socket (lmx_supervisor.workers.transport) with real
ZeroMQ DEALER peers: sends to a peer that is gone fail loudly, no message is
ever left waiting in the socket while the hub sends (ZeroMQ's fd signals
edges, and a send can consume the one a message raised), a batched step's
frames reach the handler one by one, and a bug in the receive loop is
survived and reported."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

import pytest
import zmq
import zmq.asyncio

from lmx_protocol import (
    ErrorCode,
    Failed,
    Finished,
    FinishReason,
    Ping,
    Pong,
    StepFrames,
    Tokens,
    WorkerStats,
    encode,
)
from lmx_protocol.messages import FromWorker
from lmx_supervisor.workers.transport import PeerGone, RouterHub


@contextlib.asynccontextmanager
async def _worker_socket(hub: RouterHub, identity: bytes) -> AsyncIterator[zmq.asyncio.Socket]:
    """A DEALER connected to `hub` as a worker would be; the hub is closed after."""
    ctx = zmq.asyncio.Context()
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.IDENTITY, identity)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(hub.address)
    try:
        yield dealer
    finally:
        dealer.close()
        ctx.term()
        await hub.close()


async def _until(condition: Callable[[], object], what: str) -> None:
    for _ in range(500):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"not within 10 s: {what}")


def test_a_send_to_a_peer_that_is_not_connected_raises_peer_gone() -> None:
    async def scenario() -> None:
        hub = RouterHub()
        hub.start()
        try:
            with pytest.raises(PeerGone, match="w-absent"):
                hub.send("w-absent", Ping(1))
            with pytest.raises(PeerGone):
                hub.send_raw(b"node-absent", b"x")
        finally:
            await hub.close()

    asyncio.run(asyncio.wait_for(scenario(), 30))


def test_ping_pong_with_sends_between_reads_never_loses_a_wake_up() -> None:
    """Every frame the hub receives makes it send one back at once, so sends
    and arrivals interleave as they do while tokens stream and new requests
    go out. A lost fd edge would leave a frame unread and the exchange stuck."""
    rounds = 3000

    async def scenario() -> None:
        hub = RouterHub()
        got: list[FromWorker] = []

        def answer(frame: FromWorker) -> None:
            got.append(frame)
            hub.send("w1", Ping(len(got)))

        hub.register("w1", answer)
        hub.start()
        async with _worker_socket(hub, b"w1") as dealer:
            for n in range(1, rounds + 1):
                await dealer.send(encode(Pong(n, WorkerStats())))
                # A hang here is the defect; the outer wait_for turns it into a failure.
                assert await dealer.recv() == encode(Ping(n))
            # And a burst: many frames queued before the hub reads any.
            for n in range(1000):
                await dealer.send(encode(Pong(n, WorkerStats())))
            await _until(lambda: len(got) == rounds + 1000, "the burst read")
            assert [f.nonce for f in got[rounds:] if isinstance(f, Pong)] == list(range(1000))

    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_a_steps_frames_reach_the_handler_one_by_one_in_order() -> None:
    """A worker sends what one decode step produced for several requests as
    one StepFrames message; the hub hands each frame over as if it had come
    alone, and a handler failing on one of them does not lose the others."""
    frames: list[Tokens | Finished | Failed] = [
        Tokens(request_id="a", text="x", token_ids=[1]),
        Tokens(request_id="b", text="y", token_ids=[2]),
        Finished(request_id="a", finish_reason=FinishReason.LENGTH, prompt_tokens=3,
                 completion_tokens=1),
        Failed(code=ErrorCode.INTERNAL, message="boom", request_id="c"),
    ]

    async def scenario() -> None:
        hub = RouterHub()
        got: list[FromWorker] = []

        def handle(frame: FromWorker) -> None:
            got.append(frame)
            if len(got) == 2:
                raise RuntimeError("a handler bug on the second frame")

        hub.register("w1", handle)
        hub.start()
        async with _worker_socket(hub, b"w1") as dealer:
            await dealer.send(encode(StepFrames(frames)))
            await _until(lambda: len(got) == len(frames), "the step's frames handled")
            assert got == frames
            assert hub.malformed_frames == 0

    asyncio.run(asyncio.wait_for(scenario(), 30))


def test_router_loop_restarts_after_a_failure_and_says_so() -> None:
    async def scenario() -> None:
        hub = RouterHub()
        got: list[object] = []
        hub.register("w1", got.append)
        real_dispatch = hub._dispatch
        failures = [RuntimeError("injected router bug")]

        def dispatch_failing_once(frames: list[bytes]) -> None:
            if failures:
                raise failures.pop()
            real_dispatch(frames)

        hub._dispatch = dispatch_failing_once  # type: ignore[method-assign]
        hub.start()
        pong = encode(Pong(1, WorkerStats()))
        async with _worker_socket(hub, b"w1") as dealer:
            await dealer.send(pong)  # lost to the injected failure
            await _until(hub.problems, "the failure reported")
            assert "injected router bug" in hub.problems()[0]
            await dealer.send(pong)
            await _until(lambda: bool(got), "the next frame routed")
            assert isinstance(got[0], Pong)

    asyncio.run(asyncio.wait_for(scenario(), 30))
