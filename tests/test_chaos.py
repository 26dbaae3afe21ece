"""Real workers broken with real signals and failpoints: the gateway keeps
serving, clients get clean errors, nothing hangs, nothing is orphaned."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from typing import Any

import httpx
import psutil
import pytest

from tests.conftest import MODEL_ID, LMXServer, wait_until
from tests.event_reader import EventReader

pytestmark = pytest.mark.timeout(120)

CHAT = {"messages": [{"role": "user", "content": "Tell me a long story about a dragon."}]}


def test_sigkill_worker_mid_stream(start_server: Any) -> None:
    server: LMXServer = start_server(auto_load=[MODEL_ID])
    server.wait_ready(MODEL_ID)
    pid = server.worker_pid(MODEL_ID)
    body = {"model": MODEL_ID, **CHAT, "stream": True, "max_tokens": 2000, "ignore_eos": True}
    events: list[str] = []
    with server.http.stream("POST", "/v1/chat/completions", json=body) as resp:
        assert resp.status_code == 200
        lines = resp.iter_lines()
        for line in lines:
            if line.startswith("data: ") and '"content"' in line:
                events.append(line)
            if len(events) >= 5:
                break
        killed_at = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        rest = [line for line in lines if line.startswith("data: ")]
        ended_after = time.monotonic() - killed_at
    assert ended_after < 2.0, f"stream took {ended_after:.2f}s to end after the kill"
    assert rest[-1] == "data: [DONE]"
    error = httpx.Response(200, content=rest[-2][len("data: "):]).json()["error"]
    assert error["code"] == "worker_crashed"
    assert "SIGKILL" in error["message"]
    assert server.http.get("/healthz").status_code == 200
    server.wait_ready(MODEL_ID, timeout=30)
    assert server.worker_pid(MODEL_ID) != pid
    ok = server.http.post("/v1/chat/completions", json={"model": MODEL_ID, **CHAT,
                                                        "max_tokens": 5})
    assert ok.status_code == 200, ok.text
    assert server.admin_models()[MODEL_ID]["restarts"] == 1


def test_segfault_on_load_is_reported_fast(start_server: Any) -> None:
    server: LMXServer = start_server(
        env={"LMX_FAILPOINTS": "broken=segfault_on_load"}, loader_timeout_sec=60)
    server.wait_healthy()
    started = time.monotonic()
    resp = server.load(MODEL_ID, served_name="broken")
    elapsed = time.monotonic() - started
    assert resp.status_code == 409, resp.text
    error = resp.json()["error"]
    assert error["code"] == "model_loader_crashed"
    assert "SIGSEGV" in error["message"]
    assert elapsed < 2.0, f"took {elapsed:.2f}s"  # not the 60 s loader timeout
    assert server.http.get("/healthz").status_code == 200


def test_hang_on_load_times_out(start_server: Any) -> None:
    server: LMXServer = start_server(
        env={"LMX_FAILPOINTS": "stuck=hang_on_load"}, loader_timeout_sec=2)
    server.wait_healthy()
    started = time.monotonic()
    resp = server.load(MODEL_ID, served_name="stuck")
    elapsed = time.monotonic() - started
    assert resp.status_code == 409
    assert resp.json()["error"]["code"] == "model_load_timeout"
    assert 2.0 <= elapsed < 10
    # The hung worker was killed, not left behind.
    children = psutil.Process(server.proc.pid).children(recursive=True)
    assert not [c for c in children if "lmx_worker" in " ".join(c.cmdline())]


def test_three_crashes_quarantine_while_other_model_serves(start_server: Any) -> None:
    server: LMXServer = start_server(
        env={"LMX_FAILPOINTS": "flaky=crash_on_load"}, auto_load=[MODEL_ID])
    server.wait_ready(MODEL_ID)
    codes = [server.load(MODEL_ID, served_name="flaky").json()["error"]["code"]
             for _ in range(3)]
    assert codes == ["model_loader_crashed"] * 3
    fourth = server.load(MODEL_ID, served_name="flaky")
    assert fourth.status_code == 409
    assert fourth.json()["error"]["code"] == "model_unstable"
    row = server.admin_models()["flaky"]
    assert row["readiness"] == {"state": "quarantined", "reason": "crash_loop:3"}
    resp = server.http.post("/v1/chat/completions",
                            json={"model": MODEL_ID, **CHAT, "max_tokens": 5})
    assert resp.status_code == 200
    quarantined = server.http.post("/v1/chat/completions",
                                   json={"model": "flaky", **CHAT, "max_tokens": 5})
    assert quarantined.status_code == 503
    assert quarantined.json()["error"]["code"] == "model_unstable"


def test_client_disconnect_aborts_generation(start_server: Any) -> None:
    server: LMXServer = start_server(auto_load=[MODEL_ID])
    server.wait_ready(MODEL_ID)
    body = {"model": MODEL_ID, **CHAT, "stream": True, "max_tokens": 1500, "ignore_eos": True}
    with server.http.stream("POST", "/v1/chat/completions", json=body) as resp:
        seen = 0
        for line in resp.iter_lines():
            seen += '"content"' in line
            if seen >= 3:
                break
    # The connection is closed; the worker must notice and stop generating.
    stats = wait_until(
        lambda: (s := server.admin_models()[MODEL_ID]["worker_stats"])
        and s["requests_aborted"] == 1 and s["active_requests"] == 0 and s,
        timeout=10, what="abort reaching the worker")
    generated = stats["tokens_generated"]
    assert generated < 1500
    time.sleep(0.5)  # a still-running generation would keep adding tokens
    assert server.admin_models()[MODEL_ID]["worker_stats"]["tokens_generated"] == generated


@pytest.mark.timeout(240)
def test_client_gone_before_first_token_is_released(start_server: Any) -> None:
    """A client that leaves while its stream is still queued: once its turn
    comes, the request is counted out and aborted, not left running."""
    server: LMXServer = start_server(auto_load=[MODEL_ID], parallel_slots=1)
    server.wait_ready(MODEL_ID)
    first = {"model": MODEL_ID, **CHAT, "stream": True, "max_tokens": 200, "ignore_eos": True}
    done = threading.Event()

    def occupy() -> None:  # holds the only slot for a while (own client: own thread)
        with httpx.Client(base_url=server.url, timeout=60) as http, \
                http.stream("POST", "/v1/chat/completions", json=first) as resp:
            for _ in resp.iter_lines():
                pass
        done.set()

    threading.Thread(target=occupy, daemon=True).start()
    wait_until(lambda: server.http.get("/admin/status").json()["in_flight_requests"] == 1,
               timeout=10, what="the first request running")
    body = httpx.Request("POST", f"{server.url}/v1/chat/completions", json={
        "model": MODEL_ID, **CHAT, "stream": True, "max_tokens": 1500, "ignore_eos": True})
    with socket.create_connection(("127.0.0.1", server.port)) as sock:  # raw: leave early
        head = "".join(f"{k}: {v}\r\n" for k, v in body.headers.items())
        sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\n{head}\r\n".encode()
                     + body.read())
        wait_until(lambda: server.http.get("/admin/status").json()["in_flight_requests"] == 2,
                   timeout=10, what="the second request waiting")
    # 200 tokens on one slot: seconds on a quiet machine, over 30 s on a 2-core
    # box shared by several test runs (seen), hence the generous bound.
    assert done.wait(120), server.log()
    stats = wait_until(
        lambda: (s := server.admin_models()[MODEL_ID]["worker_stats"])
        and s["active_requests"] == 0 and s["queued_requests"] == 0
        and server.http.get("/admin/status").json()["in_flight_requests"] == 0 and s,
        timeout=15, what="the abandoned request released")
    assert stats["requests_aborted"] == 1
    assert stats["tokens_generated"] < 200 + 1500


def _worker_pids(gateway_pid: int) -> list[int]:
    return [c.pid for c in psutil.Process(gateway_pid).children(recursive=True)
            if "lmx_worker" in " ".join(c.cmdline())]


def _alive(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.NoSuchProcess:
            pass
    return alive


def test_sigkill_gateway_leaves_no_worker(start_server: Any) -> None:
    server: LMXServer = start_server(auto_load=[MODEL_ID])
    server.wait_ready(MODEL_ID)
    assert server.load(MODEL_ID, served_name="second").status_code == 200
    workers = _worker_pids(server.proc.pid)
    assert len(workers) == 2
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait(5)
    wait_until(lambda: not _alive(workers), timeout=3, what="workers to exit")


def test_sigterm_gateway_exits_cleanly(start_server: Any) -> None:
    server: LMXServer = start_server(auto_load=[MODEL_ID])
    server.wait_ready(MODEL_ID)
    workers = _worker_pids(server.proc.pid)
    assert workers
    # A stream in flight when SIGTERM arrives is allowed to finish.
    result: dict[str, Any] = {}

    def consume() -> None:
        with httpx.Client(base_url=server.url, timeout=30) as own:
            r = own.post("/v1/chat/completions",
                         json={"model": MODEL_ID, **CHAT, "max_tokens": 40, "ignore_eos": True})
        result["status"] = r.status_code
        result["body"] = r.json()

    thread = threading.Thread(target=consume)
    thread.start()
    wait_until(lambda: server.http.get("/admin/status").json()["in_flight_requests"] == 1,
               timeout=10, interval=0.01, what="request in flight")
    assert server.stop(signal.SIGTERM) == 0
    thread.join(10)
    assert result["status"] == 200
    assert result["body"]["usage"]["completion_tokens"] == 40
    assert not _alive(workers)
    assert "Traceback" not in server.log()


def test_worker_exit_before_and_during_response(start_server: Any) -> None:
    server: LMXServer = start_server(
        env={"LMX_FAILPOINTS": "early=exit_mid_stream:0,late=exit_mid_stream:3"})
    server.wait_healthy()
    for name in ("early", "late"):
        assert server.load(MODEL_ID, served_name=name).status_code == 200
    # Died before the first token: the client gets a real 503, not a 200.
    early = server.http.post("/v1/chat/completions",
                             json={"model": "early", **CHAT, "stream": True})
    assert early.status_code == 503
    assert early.json()["error"]["code"] == "worker_crashed"
    assert "exited with code 70" in early.json()["error"]["message"]
    # Died after streaming began: a final error chunk, then [DONE].
    late = server.http.post("/v1/chat/completions",
                            json={"model": "late", **CHAT, "stream": True, "max_tokens": 50})
    assert late.status_code == 200
    data = [line for line in late.text.splitlines() if line.startswith("data: ")]
    assert data[-1] == "data: [DONE]"
    assert '"worker_crashed"' in data[-2]
    assert sum('"content"' in line for line in data) >= 3
    assert server.http.get("/healthz").status_code == 200


def test_events_stream_reports_lifecycle(start_server: Any) -> None:
    server: LMXServer = start_server(config={"server": {"sse_heartbeat_interval_sec": 0.5}})
    server.wait_healthy()
    with EventReader(server.url) as events:
        assert events.status_code == 200
        assert server.load(MODEL_ID).status_code == 200
        os.kill(server.worker_pid(MODEL_ID), signal.SIGKILL)
        wait_until(lambda: events.of("worker_restarted"), 90, what="worker_restarted")
        seen = events.kinds()
    assert "model_loaded" in seen
    assert seen.index("worker_crashed") < seen.index("worker_restarted")
