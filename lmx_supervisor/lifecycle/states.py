"""A model's lifecycle as an explicit state machine. Every change goes
through `check_transition`, so an impossible move (say, READY straight to
STARTING) is a bug caught where it happens, not a corrupted registry."""

from __future__ import annotations

import enum


class ModelState(enum.StrEnum):
    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"
    BACKOFF = "backoff"  # crashed; waiting to be restarted
    QUARANTINED = "quarantined"  # crashed too often; not restarted
    SHUTDOWN = "shutdown"  # the server is exiting; terminal
    # Its node stopped answering: no worker; started again when the node
    # rejoins or the model is re-placed on another host.
    UNAVAILABLE = "unavailable"


S = ModelState

TRANSITIONS: dict[ModelState, frozenset[ModelState]] = {
    S.STOPPED: frozenset({S.STARTING, S.SHUTDOWN}),
    S.STARTING: frozenset({S.READY, S.STOPPED, S.BACKOFF, S.QUARANTINED, S.STOPPING, S.SHUTDOWN,
                           S.UNAVAILABLE}),
    S.READY: frozenset({S.STOPPING, S.BACKOFF, S.QUARANTINED, S.SHUTDOWN, S.UNAVAILABLE}),
    S.BACKOFF: frozenset({S.STARTING, S.STOPPING, S.SHUTDOWN, S.UNAVAILABLE}),
    S.UNAVAILABLE: frozenset({S.STARTING, S.STOPPING, S.SHUTDOWN}),
    S.QUARANTINED: frozenset({S.STARTING, S.STOPPING, S.STOPPED, S.SHUTDOWN}),
    S.STOPPING: frozenset({S.STOPPED, S.SHUTDOWN}),
    S.SHUTDOWN: frozenset(),
}


class InvalidTransition(RuntimeError):
    pass


def check_transition(current: ModelState, target: ModelState) -> None:
    if target not in TRANSITIONS[current]:
        raise InvalidTransition(f"{current} -> {target} is not a valid transition")
