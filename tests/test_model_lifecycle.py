"""The exact sequence of states one model passes through on a real server,
read from `/admin/events` (every state change is a `model_state` event):
load -> SIGKILL of its worker -> automatic restart -> unload."""

from __future__ import annotations

import os
import signal
from typing import Any

import pytest

from tests.conftest import MODEL_ID, LMXServer, wait_until
from tests.event_reader import EventReader
from tests.lifecycle_support import LIGHT

pytestmark = pytest.mark.timeout(180)

KILLED = "killed by SIGKILL (probable out-of-memory kill)"


def lifecycle(events: EventReader, model_id: str) -> list[str]:
    """The model's events in order; a state change is written `from->to`."""
    return [f"{d['from']}->{d['to']}" if kind == "model_state" else kind
            for kind, d in events.snapshot() if d.get("model_id") == model_id]


def test_load_crash_restart_unload_sequence(start_server: Any) -> None:
    server: LMXServer = start_server(config={"server": {"sse_heartbeat_interval_sec": 0.5}},
                                     **LIGHT)
    server.wait_healthy()
    with EventReader(server.url) as events:
        assert server.load(MODEL_ID).status_code == 200
        first_pid = server.worker_pid(MODEL_ID)
        wait_until(lambda: events.of("model_loaded", model_id=MODEL_ID), 30, what="model_loaded")
        assert lifecycle(events, MODEL_ID) == ["stopped->starting", "starting->ready",
                                               "model_loaded"]

        os.kill(first_pid, signal.SIGKILL)
        wait_until(lambda: events.of("worker_restarted", model_id=MODEL_ID), 90,
                   what="worker_restarted")
        assert server.model_state(MODEL_ID) == "ready"
        assert server.admin_models()[MODEL_ID]["restarts"] == 1
        second_pid = server.worker_pid(MODEL_ID)
        assert second_pid != first_pid

        unload = server.http.post("/admin/models/unload", json={"model_id": MODEL_ID})
        assert unload.status_code == 200, unload.text
        wait_until(lambda: events.of("model_unloaded", model_id=MODEL_ID), 30,
                   what="model_unloaded")
        assert MODEL_ID not in server.admin_models()
        sequence = lifecycle(events, MODEL_ID)
        transitions = events.of("model_state", model_id=MODEL_ID)
        crashed = events.of("worker_crashed", model_id=MODEL_ID)[0]
        restarted = events.of("worker_restarted", model_id=MODEL_ID)[0]
        loaded = events.of("model_loaded", model_id=MODEL_ID)

    assert sequence == [
        # load
        "stopped->starting", "starting->ready", "model_loaded",
        # SIGKILL: the crash is reported, then the model waits out its backoff
        "worker_crashed", "ready->backoff",
        # the restart
        "backoff->starting", "starting->ready", "model_loaded", "worker_restarted",
        # unload
        "ready->stopping", "stopping->stopped", "model_unloaded",
    ]
    assert (crashed["pid"], crashed["returncode"], crashed["oom"]) == (first_pid, -9, False)
    assert crashed["cause"] == KILLED
    # The reason travels with the state it explains; the other moves carry none.
    assert [t["reason"] for t in transitions] == [None, None, KILLED, None, None, None, None]
    assert restarted["restarts"] == 1
    assert [e["pid"] for e in loaded] == [first_pid, second_pid]
