"""The supervisor's model state machine, in process: the moves the lifecycle
needs are allowed, every other move of the 8 x 8 raises InvalidTransition,
and the table's shape (terminal shutdown, no dead ends) holds."""

from __future__ import annotations

import itertools

import pytest

from lmx_supervisor.lifecycle.states import (
    TRANSITIONS,
    InvalidTransition,
    ModelState,
    check_transition,
)

S = ModelState

# Written out independently of states.py: the table is checked against this,
# so a move added or removed there has to be added or removed here as well.
ALLOWED = {
    (S.STOPPED, S.STARTING),  # load
    (S.STOPPED, S.SHUTDOWN),
    (S.STARTING, S.READY),  # the worker said Ready (and passed its canary)
    (S.STARTING, S.STOPPED),  # an explicit load failed
    (S.STARTING, S.BACKOFF),  # a restart failed: try again later
    (S.STARTING, S.QUARANTINED),  # ... once too often
    (S.STARTING, S.STOPPING),  # unloaded while loading
    (S.STARTING, S.SHUTDOWN),
    (S.READY, S.STOPPING),  # unload
    (S.READY, S.BACKOFF),  # the worker crashed
    (S.READY, S.QUARANTINED),  # crashed once too often
    (S.READY, S.SHUTDOWN),
    (S.BACKOFF, S.STARTING),  # the restart
    (S.BACKOFF, S.STOPPING),  # unloaded while waiting
    (S.BACKOFF, S.SHUTDOWN),
    (S.QUARANTINED, S.STARTING),  # an explicit load lifts the quarantine
    (S.QUARANTINED, S.STOPPING),
    (S.QUARANTINED, S.STOPPED),  # unloaded
    (S.QUARANTINED, S.SHUTDOWN),
    (S.STOPPING, S.STOPPED),
    (S.STOPPING, S.SHUTDOWN),
    (S.READY, S.UNAVAILABLE),  # its node stopped answering
    (S.BACKOFF, S.UNAVAILABLE),  # ... while it waited to restart there
    (S.STARTING, S.UNAVAILABLE),  # a restart found its node unreachable
    (S.UNAVAILABLE, S.STARTING),  # the node rejoined, or re-placed elsewhere
    (S.UNAVAILABLE, S.STOPPING),  # unloaded
    (S.UNAVAILABLE, S.SHUTDOWN),
}
ALL_MOVES = list(itertools.product(ModelState, ModelState))


def test_there_are_eight_states() -> None:
    assert [s.value for s in ModelState] == [
        "stopped", "starting", "ready", "stopping", "backoff", "quarantined", "shutdown",
        "unavailable"]
    assert set(TRANSITIONS) == set(ModelState)


@pytest.mark.parametrize(("current", "target"), sorted(ALLOWED), ids=lambda s: str(s))
def test_allowed_move(current: ModelState, target: ModelState) -> None:
    check_transition(current, target)  # no exception


@pytest.mark.parametrize(("current", "target"),
                         [m for m in ALL_MOVES if m not in ALLOWED], ids=lambda s: str(s))
def test_every_other_move_raises(current: ModelState, target: ModelState) -> None:
    with pytest.raises(InvalidTransition, match=f"^{current} -> {target} is not a valid"):
        check_transition(current, target)


def test_table_is_exactly_the_allowed_moves() -> None:
    table = {(a, b) for a, targets in TRANSITIONS.items() for b in targets}
    assert table == ALLOWED
    assert len(ALL_MOVES) - len(ALLOWED) == 64 - 27  # the moves that must raise


def test_no_state_moves_to_itself() -> None:
    assert all(a != b for a, b in ALLOWED)


def test_shutdown_is_terminal_and_reachable_from_everywhere() -> None:
    assert TRANSITIONS[S.SHUTDOWN] == frozenset()
    assert all(S.SHUTDOWN in TRANSITIONS[s] for s in ModelState if s is not S.SHUTDOWN)


def test_every_state_is_reachable_and_can_get_back_to_stopped() -> None:
    def reachable(start: ModelState) -> set[ModelState]:
        seen, todo = {start}, [start]
        while todo:
            for nxt in TRANSITIONS[todo.pop()]:
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    assert reachable(S.STOPPED) == set(ModelState)
    for state in set(ModelState) - {S.SHUTDOWN}:
        assert S.STOPPED in reachable(state), state
