"""The poison-request store's rules and bounds (pure logic, fake clock);
the end-to-end behaviour is in test_request_isolation.py."""

from __future__ import annotations

import asyncio

import zmq
import zmq.asyncio

from lmx_protocol import Generate, Pong, SamplingParams, WorkerStats, encode
from lmx_supervisor.lifecycle.poison import PoisonRegistry, fingerprint
from lmx_supervisor.workers.transport import RouterHub


def _request(rid: str, text: str) -> Generate:
    return Generate(request_id=rid, params=SamplingParams(max_tokens=4), prompt=text)


def test_fingerprint_ignores_request_id_not_body_or_model() -> None:
    a = fingerprint("m", _request("r1", "hello"))
    assert a == fingerprint("m", _request("r2", "hello"))
    assert a != fingerprint("m", _request("r1", "hello!"))
    assert a != fingerprint("other", _request("r1", "hello"))


def test_two_crashes_within_the_window_quarantine() -> None:
    reg = PoisonRegistry(window_sec=60, quarantine_sec=600, max_entries=10)
    newly, earlier = reg.record_crash("m", {"p", "x"}, now=100.0)
    assert newly == [] and earlier == set()
    newly, earlier = reg.record_crash("m", {"p", "y"}, now=130.0)
    assert [e.fingerprint for e in newly] == ["p"]
    assert earlier == {100.0}  # the first crash stops counting against the model
    assert reg.check("p", now=131.0) is not None
    assert reg.check("x", now=131.0) is None and reg.check("y", now=131.0) is None
    assert reg.check("p", now=130.0 + 600.5) is None  # expired
    assert reg.quarantined("m", now=2000.0) == []


def test_crashes_outside_the_window_do_not_add_up() -> None:
    reg = PoisonRegistry(window_sec=60, quarantine_sec=600, max_entries=10)
    reg.record_crash("m", {"p"}, now=0.0)
    newly, _ = reg.record_crash("m", {"p"}, now=61.0)
    assert newly == []
    newly, _ = reg.record_crash("m", {"p"}, now=62.0)
    assert len(newly) == 1


def test_store_is_bounded_and_clear_is_per_model() -> None:
    reg = PoisonRegistry(window_sec=60, quarantine_sec=600, max_entries=5)
    for i in range(50):
        reg.record_crash("m", {f"s{i}"}, now=float(i))
    assert len(reg._suspects) + len(reg._quarantined) <= 5
    reg.record_crash("a", {"q"}, now=1.0)
    reg.record_crash("a", {"q"}, now=2.0)
    reg.record_crash("b", {"r"}, now=1.0)
    reg.record_crash("b", {"r"}, now=2.0)
    reg.clear("a")
    assert reg.check("q", now=3.0) is None
    assert reg.check("r", now=3.0) is not None


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
        ctx = zmq.asyncio.Context()
        dealer = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.IDENTITY, b"w1")
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(hub.address)
        pong = encode(Pong(1, WorkerStats()))
        try:
            await dealer.send(pong)  # lost to the injected failure
            for _ in range(200):
                if hub.problems():
                    break
                await asyncio.sleep(0.02)
            assert "injected router bug" in hub.problems()[0]
            await dealer.send(pong)
            for _ in range(200):
                if got:
                    break
                await asyncio.sleep(0.02)
            assert got and isinstance(got[0], Pong)
        finally:
            dealer.close()
            ctx.term()
            await hub.close()

    asyncio.run(asyncio.wait_for(scenario(), 30))
