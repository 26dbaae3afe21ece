"""The poison-request store's rules and bounds (pure logic, fake clock);
the end-to-end behaviour is in test_request_isolation.py."""

from __future__ import annotations

from lmx_protocol import Generate, SamplingParams
from lmx_supervisor.lifecycle.poison import PoisonRegistry, fingerprint


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
