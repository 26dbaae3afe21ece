"""Restarting one model without downtime (POST /admin/models/restart): real
workers, real load from the official openai client, real failpoints."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from lmx_supervisor.lifecycle.admission import AdmissionGate, AdmissionTimeout
from tests.conftest import MODEL_ID, LMXServer, base_config, wait_until
from tests.event_reader import EventReader
from tests.lifecycle_support import model_estimate

CLIENTS = 8
NORMAL_FINISH = {"stop", "length"}
RESTART_TIMEOUT = 300.0
# Light workers (one compute thread) keep a busy 2-core machine responsive.
LIGHT = {"n_threads": 1, "parallel_slots": 2, "semaphore_timeout_sec": 120,
         "unload_drain_timeout_sec": 60}


class LoadClients:
    """CLIENTS threads, each streaming chat completions with the openai SDK
    back to back until stopped; every outcome is recorded."""

    def __init__(self, server: LMXServer, model: str = MODEL_ID, max_tokens: int = 12) -> None:
        self.results: list[dict[str, Any]] = []
        self.failures: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._server, self._model, self._max_tokens = server, model, max_tokens
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True)
                         for i in range(CLIENTS)]
        for thread in self._threads:
            thread.start()

    def _run(self, index: int) -> None:
        client = self._server.openai(timeout=300)
        n = 0
        while not self._stop.is_set():
            n += 1
            started = time.monotonic()
            first: float | None = None
            finish: str | None = None
            try:
                stream = client.chat.completions.create(
                    model=self._model, stream=True, max_tokens=self._max_tokens,
                    messages=[{"role": "user", "content": f"Count to ten, client {index} #{n}"}])
                for chunk in stream:
                    if first is None and chunk.choices and chunk.choices[0].delta.content:
                        first = time.monotonic()
                    if chunk.choices and chunk.choices[0].finish_reason:
                        finish = chunk.choices[0].finish_reason
            except openai.APIError as exc:
                with self._lock:
                    self.failures.append(f"client {index} #{n}: {type(exc).__name__}: {exc}")
                continue
            with self._lock:
                self.results.append({"started": started, "first": first, "finish": finish,
                                     "ended": time.monotonic()})
                if finish not in NORMAL_FINISH:
                    self.failures.append(f"client {index} #{n}: finish_reason {finish!r}")

    def count(self) -> int:
        with self._lock:
            return len(self.results)

    def wait_for_more(self, more: int, timeout: float = 120) -> None:
        target = self.count() + more
        wait_until(lambda: self.count() >= target, timeout, what=f"{more} more completions")

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(300)


@pytest.fixture
def make_server(tmp_path: Path, models_dir: Path) -> Iterator[Any]:
    servers: list[LMXServer] = []

    def make(home_name: str = "home", env: dict[str, str] | None = None,
             memory: dict[str, Any] | None = None, **models: Any) -> LMXServer:
        home = tmp_path / home_name
        home.mkdir(exist_ok=True)
        cfg = base_config(models_dir, **{**LIGHT, **models})
        if memory:
            cfg["memory"] = memory
        # Frequent heartbeats: an idle event stream notices it was closed.
        cfg["server"] = {"sse_heartbeat_interval_sec": 1}
        server = LMXServer(home, cfg, env)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


def restart(server: LMXServer, **body: Any) -> httpx.Response:
    return server.http.post("/admin/models/restart", json={"model_id": MODEL_ID, **body},
                            timeout=RESTART_TIMEOUT)


def chat_ok(server: LMXServer, content: str = "Hi", max_tokens: int = 4) -> dict[str, Any]:
    resp = server.http.post("/v1/chat/completions", timeout=120, json={
        "model": MODEL_ID, "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": content}]})
    assert resp.status_code == 200, resp.text
    body: dict[str, Any] = resp.json()
    return body


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie counts as gone: the server reaps it when it awaits the exit.
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(") ")[-1].startswith("Z"))


def test_rolling_and_drain_restarts_under_load_fail_no_request(make_server: Any) -> None:
    server = make_server(auto_load=[MODEL_ID])
    server.wait_ready(MODEL_ID)
    events = EventReader(server.url)
    seen_in_progress: list[dict[str, Any]] = []
    watching = threading.Event()

    def watch_admin() -> None:  # what /admin/models shows mid-restart
        with httpx.Client(base_url=server.url, timeout=30) as http:
            while not watching.is_set():
                rows = {r["model_id"]: r for r in http.get("/admin/models").json()["loaded"]}
                row = rows.get(MODEL_ID)
                assert row is not None, "the model left /admin/models during a restart"
                if row["restart"] is not None:
                    seen_in_progress.append(row["restart"])
                listed = [m["id"] for m in http.get("/v1/models").json()["data"]]
                assert MODEL_ID in listed, "the model left /v1/models during a restart"
                time.sleep(0.1)

    watcher = threading.Thread(target=watch_admin, daemon=True)
    watcher.start()
    load = LoadClients(server)
    try:
        load.wait_for_more(CLIENTS)
        pids = [server.worker_pid(MODEL_ID)]
        plan = [("rolling", 4), ("rolling", 2), ("drain", 4)]
        windows: list[tuple[float, float]] = []
        for mode, slots in plan:
            began = time.monotonic()
            resp = restart(server, mode=mode, settings={"parallel_slots": slots})
            windows.append((began, time.monotonic()))
            assert resp.status_code == 200, resp.text
            body = resp.json()
            assert body["mode"] == mode and body["old_pid"] == pids[-1]
            assert body["new_pid"] != pids[-1]
            row = server.admin_models()[MODEL_ID]
            assert row["state"] == "ready" and row["restart"] is None
            assert row["spawn_settings"]["parallel_slots"] == slots
            assert row["pid"] == body["new_pid"]
            wait_until(lambda: not alive(pids[-1]), 60, what="old worker gone")
            pids.append(body["new_pid"])
            load.wait_for_more(CLIENTS)  # the new worker serves the load
    finally:
        load.stop()
        watching.set()
        watcher.join(30)
        events.close()
    assert load.failures == []
    assert load.count() > 4 * CLIENTS
    ttft = [(r["started"], r["first"] - r["started"]) for r in load.results if r["first"]]
    during = [t for s, t in ttft if any(b <= s <= e for b, e in windows)]
    outside = [t for s, t in ttft if not any(b <= s <= e for b, e in windows)]
    print(f"longest TTFT during restarts {max(during, default=0):.2f}s ({len(during)} "
          f"requests), outside {max(outside, default=0):.2f}s ({len(outside)} requests)")
    assert len(set(pids)) == len(plan) + 1
    restarting = events.of("model_restarting", model_id=MODEL_ID)
    restarted = events.of("model_restarted", model_id=MODEL_ID)
    assert [e["mode"] for e in restarting] == [m for m, _ in plan]
    assert [e["mode"] for e in restarted] == [m for m, _ in plan]
    assert all(e["duration_sec"] > 0 for e in restarted)
    phases = {r["phase"] for r in seen_in_progress}
    assert "loading" in phases, seen_in_progress
    assert any(r["old_pid"] and r["new_pid"] for r in seen_in_progress), seen_in_progress
    assert server.admin_models()[MODEL_ID]["restarts"] == 0  # not counted as crashes


def test_replacement_that_crashes_leaves_the_old_worker_serving(make_server: Any) -> None:
    server = make_server(
        auto_load=[MODEL_ID],
        env={"LMX_FAILPOINTS": f"{MODEL_ID}[parallel_slots=3]=crash_on_load,"
                               f"{MODEL_ID}[parallel_slots=5]=hang_on_load"})
    server.wait_ready(MODEL_ID)
    old_pid = server.worker_pid(MODEL_ID)
    events = EventReader(server.url)
    try:
        load = LoadClients(server)
        try:
            load.wait_for_more(CLIENTS)
            resp = restart(server, settings={"parallel_slots": 3})
            load.wait_for_more(CLIENTS)
        finally:
            load.stop()
        assert resp.status_code == 409, resp.text
        error = resp.json()["error"]
        assert "failpoint crash_on_load" in error["message"]
        assert "old worker keeps serving" in error["message"]
        assert load.failures == []
        row = server.admin_models()[MODEL_ID]
        assert row["pid"] == old_pid and row["state"] == "ready"
        assert row["spawn_settings"]["parallel_slots"] == 2
        assert row["recent_crashes"] == 1  # counts toward the crash-loop rule
        failed = wait_until(lambda: events.of("model_restart_failed", model_id=MODEL_ID), 30)
        assert failed[0]["still_serving"] is True and failed[0]["mode"] == "rolling"
        assert events.of("model_load_failed", model_id=MODEL_ID, replacement=True)

        # Drain mode: the old worker is gone before the replacement fails, so
        # a worker with the old settings takes its place.
        drained = restart(server, mode="drain", settings={"parallel_slots": 3})
        assert drained.status_code == 409, drained.text
        assert "old settings were restored" in drained.json()["error"]["message"]
        row = server.admin_models()[MODEL_ID]
        assert row["state"] == "ready" and row["pid"] != old_pid
        assert row["spawn_settings"]["parallel_slots"] == 2
        assert row["recent_crashes"] == 2
        chat_ok(server)
        old_pid = row["pid"]

        # Unknown settings are refused before anything starts.
        bad = restart(server, settings={"parallel_slots": 2, "gpu_layers": 3})
        assert bad.status_code == 400
        assert bad.json()["error"]["param"] == "settings.gpu_layers"

        # A replacement that hangs: a second restart meanwhile is a 409, and
        # an unload wins, stopping both workers.
        outcome: dict[str, httpx.Response] = {}
        thread = threading.Thread(target=lambda: outcome.setdefault(
            "r", restart(server, settings={"parallel_slots": 5})), daemon=True)
        thread.start()

        def loading_pid() -> int | None:
            progress = server.admin_models()[MODEL_ID]["restart"]
            return progress["new_pid"] if progress else None
        new_pid = wait_until(loading_pid, 60, what="the replacement spawned")
        second = restart(server)
        assert second.status_code == 409
        assert second.json()["error"]["code"] == "restart_in_progress"
        chat_ok(server)  # the old worker still serves
        unloaded = server.http.post("/admin/models/unload", json={"model_id": MODEL_ID},
                                    timeout=120)
        assert unloaded.status_code == 200, unloaded.text
        thread.join(120)
        assert outcome["r"].status_code == 409
        assert outcome["r"].json()["error"]["code"] == "restart_cancelled"
        wait_until(lambda: not alive(old_pid) and not alive(new_pid), 60,
                   what="both workers stopped")
        assert MODEL_ID not in server.admin_models()
    finally:
        events.close()


def test_quarantined_model_restarts_with_new_settings_and_keeps_them(
        make_server: Any) -> None:
    env = {"LMX_FAILPOINTS": f"{MODEL_ID}[parallel_slots=3]=crash_on_load"}
    server = make_server(env=env, crash_loop_max_crashes=1)
    server.wait_healthy()
    bad = server.load(MODEL_ID, performance_overrides={"parallel_slot": 3})
    assert bad.status_code == 400
    assert bad.json()["error"]["param"] == "performance_overrides.parallel_slot"
    # performance_overrides are applied: this one hits the failpoint.
    resp = server.load(MODEL_ID, performance_overrides={"parallel_slots": 3})
    assert resp.status_code == 409, resp.text
    assert server.model_state(MODEL_ID) == "quarantined"
    resp = restart(server, settings={"parallel_slots": 2, "context_length": 1024})
    assert resp.status_code == 200, resp.text
    row = server.admin_models()[MODEL_ID]
    assert row["state"] == "ready" and row["context_length"] == 1024
    assert row["spawn_settings"]["parallel_slots"] == 2
    chat_ok(server)
    # The runtime state file carries the new settings: a gateway restart
    # brings the model back with them.
    server.stop()
    again = LMXServer(server.home, yaml.safe_load(server.config_path.read_text()), env)
    try:
        again.wait_ready(MODEL_ID, timeout=120)
        row = again.admin_models()[MODEL_ID]
        assert row["context_length"] == 1024
        assert row["spawn_settings"]["parallel_slots"] == 2
    finally:
        again.stop()


def test_config_reload_applies_a_new_context_length_rolling(make_server: Any) -> None:
    server = make_server(auto_load=[MODEL_ID], context_length=256)
    server.wait_ready(MODEL_ID)
    long_prompt = " ".join(["apple"] * 400)
    resp = server.http.post("/v1/chat/completions", timeout=120, json={
        "model": MODEL_ID, "max_tokens": 4, "messages": [{"role": "user",
                                                          "content": long_prompt}]})
    assert resp.status_code == 400, resp.text
    cfg = yaml.safe_load(server.config_path.read_text())
    cfg["models"]["context_length"] = 2048
    server.config_path.write_text(yaml.safe_dump(cfg))
    plain = server.http.post("/admin/config/reload", timeout=60).json()
    assert plain["models_restart_pending"] == {MODEL_ID: {"context_length": 2048}}
    assert "restarts" not in plain
    assert server.admin_models()[MODEL_ID]["context_length"] == 256
    applied = server.http.post("/admin/config/reload", json={"apply": "rolling"},
                               timeout=RESTART_TIMEOUT)
    assert applied.status_code == 200, applied.text
    [result] = applied.json()["restarts"]
    assert result["success"] and result["model_id"] == MODEL_ID
    assert result["mode"] == "rolling" and result["settings"]["context_length"] == 2048
    assert server.admin_models()[MODEL_ID]["context_length"] == 2048
    chat_ok(server, long_prompt)
    bad = server.http.post("/admin/config/reload", json={"apply": "sometimes"}, timeout=60)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "apply"


def test_memory_guard_chooses_drain_when_two_copies_do_not_fit(
        make_server: Any, model_file: Path) -> None:
    estimate = model_estimate(model_file)
    # parallel_slots 1 at 2048 tokens: the estimate of base_config's model.
    server = make_server(auto_load=[MODEL_ID], parallel_slots=1,
                         memory={"budget_bytes": int(estimate * 1.6)})  # 90%: 1.44 copies
    server.wait_ready(MODEL_ID)
    refused = restart(server, mode="rolling")
    assert refused.status_code == 507, refused.text
    assert refused.json()["error"]["param"] == "mode"
    load = LoadClients(server)
    try:
        load.wait_for_more(CLIENTS)
        resp = restart(server)
        load.wait_for_more(CLIENTS)
    finally:
        load.stop()
    assert resp.status_code == 200, resp.text
    assert resp.json()["mode"] == "drain"
    assert load.failures == []
    # The CLI: `lmx restart --all` rolls (here: drains) every loaded model.
    done = subprocess.run([sys.executable, "-m", "lmx_gateway", "restart", "--all",
                           "--url", server.url], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"Restarted: {MODEL_ID} (drain" in done.stdout
    done = subprocess.run([sys.executable, "-m", "lmx_gateway", "models", "restart", MODEL_ID,
                           "--context-length", "1024", "--url", server.url],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert server.admin_models()[MODEL_ID]["context_length"] == 1024


def test_old_worker_crash_during_rolling_restart_promotes_the_replacement(
        make_server: Any, tmp_path: Path) -> None:
    # The replacement (parallel_slots 3) loads only once `gate` exists;
    # meanwhile the old worker is SIGKILLed. A TTL of 1 s, switched on by a
    # config reload once the restart runs: a model mid-restart is not evicted.
    gate = tmp_path / "let-the-replacement-load"
    server = make_server(
        auto_load=[MODEL_ID],
        env={"LMX_FAILPOINTS": f"{MODEL_ID}[parallel_slots=3]=load_after_file:{gate}"})
    server.wait_ready(MODEL_ID)
    events = EventReader(server.url)
    try:
        old_pid = server.worker_pid(MODEL_ID)
        outcome: dict[str, httpx.Response] = {}
        thread = threading.Thread(target=lambda: outcome.setdefault(
            "r", restart(server, settings={"parallel_slots": 3})), daemon=True)
        thread.start()

        def loading_pid() -> int | None:
            progress = server.admin_models()[MODEL_ID]["restart"]
            return progress["new_pid"] if progress and progress["phase"] == "loading" else None
        new_pid = wait_until(loading_pid, 60, what="the replacement loading")
        cfg = yaml.safe_load(server.config_path.read_text())
        cfg["memory"] = {"ttl_enabled": True, "ttl_seconds": 1}
        server.config_path.write_text(yaml.safe_dump(cfg))
        assert server.http.post("/admin/config/reload", timeout=60).status_code == 200
        os.kill(old_pid, 9)
        wait_until(lambda: events.of("model_restart_old_worker_crashed", model_id=MODEL_ID),
                   30, what="the old worker's crash noticed")
        assert server.model_state(MODEL_ID) == "backoff"
        time.sleep(2)  # longer than the TTL: still not evicted (checked below)
        # A request now waits for the replacement instead of failing.
        waiting: dict[str, dict[str, Any]] = {}
        requester = threading.Thread(target=lambda: waiting.setdefault("r", chat_ok(server)),
                                     daemon=True)
        requester.start()
        wait_until(lambda: server.admin_models()[MODEL_ID]["in_flight"] == 0
                   and server.http.get("/admin/status").json()["in_flight_requests"] == 1,
                   30, what="the request waiting")
        gate.touch()
        requester.join(120)
        assert waiting["r"]["choices"][0]["finish_reason"] in NORMAL_FINISH
        thread.join(RESTART_TIMEOUT)
        assert outcome["r"].status_code == 200, outcome["r"].text
        row = server.admin_models()[MODEL_ID]
        assert row["pid"] == new_pid and row["state"] == "ready"
        assert row["spawn_settings"]["parallel_slots"] == 3
        assert row["recent_crashes"] == 1
        assert not events.of("worker_restarted", model_id=MODEL_ID)  # old settings not respawned
        assert not events.of("model_evicted", model_id=MODEL_ID)
        # Once the restart is over, the TTL applies again.
        wait_until(lambda: events.of("model_evicted", model_id=MODEL_ID), 60,
                   what="TTL eviction after the restart")
    finally:
        events.close()


def test_paused_admission_gate_queues_arrivals_until_resumed() -> None:
    """The drain restart's gate: paused, it hands no permit out (arrivals
    queue, still bounded by their own timeout), reports when the last
    permit is back, and releases the queue in order on resume."""
    async def scenario() -> list[str]:
        gate = AdmissionGate(2)
        await gate.acquire(1)
        gate.pause()
        order: list[str] = []

        async def arrive(name: str, timeout: float) -> None:
            try:
                await gate.acquire(timeout)
                order.append(name)
            except AdmissionTimeout:
                order.append(f"{name}:429")

        waiters = [asyncio.create_task(arrive("a", 30)), asyncio.create_task(arrive("b", 30)),
                   asyncio.create_task(arrive("late", 0.01))]
        await asyncio.sleep(0.05)
        assert gate.active == 1 and gate.queued == 2 and order == ["late:429"]
        assert not await gate.wait_empty(0.01)
        gate.release()  # the in-flight request finishes: not handed on while paused
        assert await gate.wait_empty(1) and gate.active == 0 and gate.queued == 2
        gate.resume()
        await asyncio.gather(*waiters)
        assert gate.active == 2 and gate.queued == 0
        return order

    assert asyncio.run(scenario()) == ["late:429", "a", "b"]
