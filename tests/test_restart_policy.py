"""When a crashed worker is restarted, in process and with explicit clock
values: the crash history's sliding window (a crash leaves it strictly
after `window_sec`), the over-limit test that quarantines a crash loop, and
the exponential backoff with its cap."""

from __future__ import annotations

import pytest

from lmx_supervisor.lifecycle.restart_policy import CrashHistory, backoff_delay


def test_crashes_inside_the_window_accumulate() -> None:
    history = CrashHistory(max_crashes=3, window_sec=60)
    assert history.recent(now=1000.0) == 0
    assert history.record(now=1000.0) == 1
    assert history.record(now=1010.0) == 2
    assert not history.over_limit(now=1010.0)
    assert history.record(now=1059.0) == 3
    assert history.over_limit(now=1059.0)  # the third crash in 60 s: quarantine


def test_old_crashes_slide_out_of_the_window() -> None:
    history = CrashHistory(max_crashes=3, window_sec=60)
    history.record(now=0.0)
    history.record(now=30.0)
    # Exactly window_sec old still counts; a moment later it is gone.
    assert history.recent(now=60.0) == 2
    assert history.recent(now=60.001) == 1
    assert history.recent(now=90.0) == 1
    assert history.recent(now=90.001) == 0
    # Spread-out crashes never reach the limit, however many there are.
    for i in range(10):
        assert history.record(now=100.0 + 61.0 * i) == 1
        assert not history.over_limit(now=100.0 + 61.0 * i)


def test_window_is_pruned_as_it_slides() -> None:
    """The history keeps only what is inside the window (bounded memory)."""
    history = CrashHistory(max_crashes=5, window_sec=10)
    for t in range(1000):
        history.record(now=float(t))
    assert history.recent(now=999.0) == 11  # t = 989 .. 999
    assert len(history._times) == 11


def test_record_counts_the_new_crash_against_its_own_time() -> None:
    history = CrashHistory(max_crashes=2, window_sec=5)
    history.record(now=0.0)
    # A crash long after the first: the first has left the window.
    assert history.record(now=100.0) == 1
    assert not history.over_limit(now=100.0)
    assert history.record(now=104.0) == 2
    assert history.over_limit(now=104.0)
    assert not history.over_limit(now=105.5)  # the crash at 100 left the window


def test_clear_forgets_every_crash() -> None:
    history = CrashHistory(max_crashes=2, window_sec=60)
    history.record(now=1.0)
    history.record(now=2.0)
    assert history.over_limit(now=3.0)
    history.clear()  # what lifting a quarantine does
    assert history.recent(now=3.0) == 0
    assert not history.over_limit(now=3.0)
    assert history.record(now=4.0) == 1


def test_limit_of_one_quarantines_on_the_first_crash() -> None:
    history = CrashHistory(max_crashes=1, window_sec=60)
    assert not history.over_limit(now=0.0)
    history.record(now=0.0)
    assert history.over_limit(now=0.0)


def test_without_now_the_monotonic_clock_is_used() -> None:
    history = CrashHistory(max_crashes=3, window_sec=3600)
    assert history.record() == 1
    assert history.record() == 2
    assert history.recent() == 2


@pytest.mark.parametrize(("crashes", "expected"), [
    (0, 0.25), (1, 0.25), (2, 0.5), (3, 1.0), (4, 2.0), (5, 4.0), (6, 8.0),
    (7, 10.0), (8, 10.0), (50, 10.0),
])
def test_backoff_doubles_from_initial_up_to_the_cap(crashes: int, expected: float) -> None:
    # The defaults: restart_backoff_initial_sec 0.25, restart_backoff_max_sec 10.
    assert backoff_delay(crashes, initial=0.25, maximum=10) == expected


def test_backoff_is_a_float_and_never_exceeds_the_cap() -> None:
    delays = [backoff_delay(n, initial=1, maximum=30) for n in range(1, 12)]
    assert delays[:5] == [1.0, 2.0, 4.0, 8.0, 16.0]
    assert all(isinstance(d, float) for d in delays)
    assert max(delays) == 30.0
    assert delays == sorted(delays)  # never shorter after another crash
