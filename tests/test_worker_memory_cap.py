"""A worker that runs away with memory hits its cap (RLIMIT_DATA, derived
from the model's estimate) and dies alone: its request gets 503
oom-unloaded, the model is unloaded, the other model keeps serving. And
the warm-up canary: a model that loads but cannot generate is refused."""

from __future__ import annotations

import signal
from typing import Any

import psutil
import pytest

from tests.conftest import MODEL_ID, LMXServer, wait_until
from tests.event_reader import EventReader
from tests.lifecycle_support import LIGHT

pytestmark = pytest.mark.timeout(120)

CHAT = {"messages": [{"role": "user", "content": "Tell me a long story."}]}


def test_runaway_worker_dies_alone(start_server: Any) -> None:
    # A tight cap (2 x estimate + 64 MiB + thread allowance) that the model
    # still loads and runs under; the hog fills the rest in 64 MiB steps.
    server: LMXServer = start_server(
        env={"LMX_FAILPOINTS": "hog=alloc_mid_stream:64"}, **LIGHT,
        config={"server": {"sse_heartbeat_interval_sec": 0.5},
                "memory": {"worker_memory_cap_headroom_bytes": 64 * 1024 * 1024}})
    server.wait_healthy()
    assert server.load(MODEL_ID, served_name="hog").status_code == 200
    assert server.load(MODEL_ID, served_name="ok").status_code == 200
    hog = server.admin_models()["hog"]
    memory = server.http.get("/admin/memory").json()["models"]["hog"]
    cap = memory["memory_cap_bytes"]
    assert cap and memory["data_bytes"] < cap  # loaded and ran under its cap
    events = EventReader(server.url)
    try:
        resp = server.http.post("/v1/chat/completions", json={
            "model": "hog", **CHAT, "max_tokens": 1000, "ignore_eos": True}, timeout=60)
        assert resp.status_code == 503, resp.text
        error = resp.json()["error"]
        assert error["code"] == "oom-unloaded"
        assert "memory cap" in error["message"]
        wait_until(lambda: "hog" not in server.admin_models(), 15, what="hog unloaded")
        assert not psutil.pid_exists(hog["pid"]) or psutil.Process(
            hog["pid"]).status() == psutil.STATUS_ZOMBIE
        ok = server.http.post("/v1/chat/completions",
                              json={"model": "ok", **CHAT, "max_tokens": 8})
        assert ok.status_code == 200, ok.text
        assert ok.json()["usage"]["completion_tokens"] > 0
        assert server.model_state("ok") == "ready"
        assert server.admin_models()["ok"]["restarts"] == 0
        warning = wait_until(lambda: events.of("memory_warning", model_id="hog"), 15)
        assert warning[0]["reason"] == "worker_out_of_memory"
        assert warning[0]["memory_cap_bytes"] == cap
        assert events.of("worker_crashed", model_id="hog")[0]["oom"] is True
    finally:
        events.close()
    rows = server.http.get("/admin/models/compatibility",
                           params={"model_id": "hog", "outcome": "fail"}).json()["data"]
    assert rows and rows[-1]["event"] == "crash"
    assert rows[-1]["reason"].startswith("out_of_memory")
    # Not restarted, and not restored by the next start either.
    state = (server.home / "runtime-state.json").read_text()
    assert '"hog"' not in state and '"ok"' in state


def test_warmup_canary_and_plain_crash(start_server: Any) -> None:
    server: LMXServer = start_server(env={"LMX_FAILPOINTS": "bad=fail_generate"},
                                     warmup_on_load=True, **LIGHT)
    server.wait_healthy()
    good = server.load(MODEL_ID)
    assert good.status_code == 200, good.text
    # The canary's one token ran before the load answered.
    stats = server.admin_models()[MODEL_ID]["worker_stats"]
    assert stats["requests_finished"] == 1 and stats["tokens_generated"] == 1
    bad = server.load(MODEL_ID, served_name="bad")
    assert bad.status_code == 409, bad.text
    error = bad.json()["error"]
    assert error["code"] == "model_canary_failed"
    assert "failpoint fail_generate" in error["message"]
    assert set(server.admin_models()) == {MODEL_ID}
    workers = [p for p in psutil.Process(server.proc.pid).children(recursive=True)
               if '"model_id":"bad"' in " ".join(p.cmdline())]
    assert workers == []  # the canary's worker was stopped
    ok = server.http.post("/v1/chat/completions",
                          json={"model": MODEL_ID, **CHAT, "max_tokens": 3})
    assert ok.status_code == 200
    summary = server.http.get("/admin/models/compatibility",
                              params={"include_summary": "true"}).json()["summary"]
    assert summary["by_model"]["bad"] == {"pass": 0, "fail": 1, "total": 1}
    assert summary["by_model"][MODEL_ID]["pass"] == 1
    bad_flag = server.http.get("/admin/models/compatibility",
                               params={"include_summary": "maybe"})
    assert bad_flag.status_code == 400
    assert bad_flag.json()["error"]["param"] == "include_summary"


    # A SIGKILL far below the cap is an ordinary crash, not out-of-memory:
    # the model is restarted (canary included), not unloaded.
    psutil.Process(server.worker_pid(MODEL_ID)).send_signal(signal.SIGKILL)
    wait_until(lambda: server.admin_models()[MODEL_ID]["restarts"] == 1, 30,
               what="restart after crash")
    rows = server.http.get("/admin/models/compatibility",
                           params={"model_id": MODEL_ID}).json()["data"]
    assert [(r["event"], r["outcome"]) for r in rows] == [
        ("load", "pass"), ("crash", "fail"), ("load", "pass")]
    assert "SIGKILL" in rows[1]["reason"]
    assert not rows[1]["reason"].startswith("out_of_memory")
