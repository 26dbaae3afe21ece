"""The supervisor's ROUTER socket (lmx_supervisor.workers.transport) with real
ZeroMQ DEALER peers: sends to a peer that is gone fail loudly, and no message
is ever left waiting in the socket while the hub sends (ZeroMQ's fd signals
edges, and a send can consume the one a message raised)."""

from __future__ import annotations

import asyncio

import pytest
import zmq
import zmq.asyncio

from lmx_protocol import Ping, Pong, WorkerStats, encode
from lmx_protocol.messages import FromWorker
from lmx_supervisor.workers.transport import PeerGone, RouterHub


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
        ctx = zmq.asyncio.Context()
        dealer = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.IDENTITY, b"w1")
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(hub.address)
        try:
            for n in range(1, rounds + 1):
                await dealer.send(encode(Pong(n, WorkerStats())))
                # A hang here is the defect; the outer wait_for turns it into a failure.
                reply = await dealer.recv()
                assert reply == encode(Ping(n))
            # And a burst: many frames queued before the hub reads any.
            burst = [encode(Pong(n, WorkerStats())) for n in range(1000)]
            for payload in burst:
                await dealer.send(payload)
            while len(got) < rounds + len(burst):
                await asyncio.sleep(0.01)
            assert [f.nonce for f in got[rounds:] if isinstance(f, Pong)] == list(range(1000))
        finally:
            dealer.close()
            ctx.term()
            await hub.close()

    asyncio.run(asyncio.wait_for(scenario(), 60))
