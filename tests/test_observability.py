"""Events, health, stack, request ids and log lines against real servers:
`request_completed` and `throughput` on /admin/events, a stalled subscriber
that never reads, `/admin/health` going degraded, structured JSON logs."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import MODEL_ID, LMXServer, running_server, wait_until
from tests.event_reader import EventReader

pytestmark = pytest.mark.timeout(90)

# Every token takes at least 50 ms, so a 25-token answer spans > 1 s and
# crosses at least one throughput tick, on any machine.
SLOW = "*=slow_tokens:50"


@pytest.fixture(scope="module")
def obs_server(tmp_path_factory: pytest.TempPathFactory, model_file: Path
               ) -> Iterator[LMXServer]:
    with running_server(
            tmp_path_factory, "obs", links=[model_file], models={"auto_load": [MODEL_ID]},
            config={"server": {"sse_heartbeat_interval_sec": 0.5},
                    "routing": {"aliases": {"chat": ["missing-model", MODEL_ID],
                                            "code": ["nope"]}}},
            env={"LMX_FAILPOINTS": SLOW}, wait_for=[MODEL_ID]) as server:
        yield server


def stream_chat(server: LMXServer, max_tokens: int, request_id: str) -> str:
    body = {"model": MODEL_ID, "messages": [{"role": "user", "content": "Tell a story."}],
            "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=server.url, timeout=60) as client:
        resp = client.post("/v1/chat/completions", json=body,
                           headers={"X-Request-ID": request_id})
    assert resp.status_code == 200
    assert resp.headers["x-request-id"] == request_id
    return resp.text


def test_request_completed_and_throughput_events(obs_server: LMXServer) -> None:
    watcher = EventReader(obs_server.url)
    try:
        text = stream_chat(obs_server, 25, "obs-throughput-1")
        assert text.rstrip().endswith("data: [DONE]")
        done = wait_until(lambda: [e for e in watcher.of("request_completed")
                                   if e["request_id"] == "obs-throughput-1"], 10,
                          what="request_completed")[0]
        assert done["model"] == MODEL_ID
        assert done["status"] == "ok"
        assert done["stream"] is True
        assert done["completion_tokens"] == 25
        assert done["prompt_tokens"] > 0
        assert done["tokens_per_second"] > 0
        assert 0 < done["ttft_ms"] < done["duration_ms"]
        ticks = watcher.of("throughput")
        assert any(t["active_requests"] >= 1 and t["tokens_per_second"] > 0 for t in ticks)
        # Idle now: heartbeats go on, throughput stops after at most one last tick.
        seen = len(watcher.snapshot())
        wait_until(lambda: watcher.kinds()[seen:].count("heartbeat") >= 4,
                   10, what="four heartbeats while idle")
        late = [d for k, d in watcher.snapshot()[seen:] if k == "throughput"]
        assert len(late) <= 1
        assert all(t["active_requests"] == 0 for t in late)
    finally:
        watcher.close()


def stalled_subscriber(server: LMXServer) -> socket.socket:
    """Opens /admin/events and never reads. A small MSS and receive buffer keep
    the kernel from absorbing megabytes, so the server's writes block soon."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 536)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    sock.connect(("127.0.0.1", server.port))
    sock.sendall(b"GET /admin/events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    return sock


def test_stalled_subscriber_never_blocks_inference(obs_server: LMXServer) -> None:
    def events_state() -> dict[str, int]:
        return dict(obs_server.http.get("/admin/metrics/json").json()["events"])

    dropped_before = events_state()["dropped_total"]
    stalled = stalled_subscriber(obs_server)
    watcher = EventReader(obs_server.url)
    try:
        wait_until(lambda: events_state()["subscribers"] == 2, 10, what="two subscribers")
        # Cheap failing requests each publish a request_completed, until the
        # stalled subscriber's socket and then its queue overflow.
        flood = {"model": "flood", "messages": []}
        with httpx.Client(base_url=obs_server.url, timeout=30) as client:
            for i in range(4000):
                assert client.post("/v1/chat/completions", json=flood).status_code == 400
                if i % 100 == 99 and events_state()["dropped_total"] > dropped_before:
                    break
        assert events_state()["dropped_total"] > dropped_before
        # Inference goes on while the subscriber stays stalled.
        for n in range(2):
            text = stream_chat(obs_server, 8, f"during-stall-{n}")
            assert text.rstrip().endswith("data: [DONE]")
            assert '"finish_reason":"length"' in text
        wait_until(lambda: {e["request_id"] for e in watcher.of("request_completed")}
                   >= {"during-stall-0", "during-stall-1"}, 10,
                   what="the healthy subscriber got both completions")
        health = obs_server.http.get("/admin/health").json()
        assert health["events"]["dropped_total"] > dropped_before
        prom = obs_server.http.get("/admin/metrics").text
        dropped_line = re.search(r"^lmx_events_dropped_total (\S+)$", prom, re.M)
        assert dropped_line is not None and float(dropped_line.group(1)) > dropped_before
    finally:
        stalled.close()
        watcher.close()
    wait_until(lambda: events_state()["subscribers"] == 0, 10,
               what="both subscribers gone after disconnect")


def test_request_ids(obs_server: LMXServer) -> None:
    http = obs_server.http
    given = http.get("/healthz", headers={"X-Request-ID": "abc-123.x:y_z"})
    assert given.headers["x-request-id"] == "abc-123.x:y_z"
    generated = http.get("/healthz").headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{24}", generated)
    for insane in ("has spaces in it", "x" * 200, "new\\nline"):
        replaced = http.get("/healthz", headers={"X-Request-ID": insane})
        assert re.fullmatch(r"[0-9a-f]{24}", replaced.headers["x-request-id"])
    error = http.post("/v1/chat/completions", json={"model": "nope", "messages": [
        {"role": "user", "content": "x"}]}, headers={"X-Request-ID": "err-req-7"})
    assert error.status_code == 404
    assert error.headers["x-request-id"] == "err-req-7"
    ok = http.post("/v1/completions", json={"model": MODEL_ID, "prompt": "Hi",
                                            "max_tokens": 3, "ignore_eos": True},
                   headers={"X-Request-ID": "log-req-42"})
    assert ok.headers["x-request-id"] == "log-req-42"

    def completion_line() -> str | None:
        return next((line for line in obs_server.log().splitlines()
                     if "Completion request model=" in line and "log-req-42" in line), None)
    line = wait_until(completion_line, 10, what="the completion log line")
    assert re.fullmatch(rf"INFO: Completion request model={re.escape(MODEL_ID)} tokens=3 "
                        r"speed=\d+\.\dtok/s ttft=\d+ms duration=\d+\.\d\ds "
                        r"request_id=log-req-42", line), line
    assert re.search(rf"^INFO: Model loaded: {re.escape(MODEL_ID)} \(\d+\.\d GB, \d+\.\ds\)$",
                     obs_server.log(), re.M)
    assert re.search(r"^WARNING: Completion request failed model=None status=404 "
                     r"code=model-not-found .* request_id=err-req-7$", obs_server.log(), re.M)


def test_stack_resolves_roles(obs_server: LMXServer) -> None:
    stack = obs_server.http.get("/admin/stack").json()
    assert stack["roles"] == {
        "chat": {"candidates": ["missing-model", MODEL_ID], "resolved": MODEL_ID},
        "code": {"candidates": ["nope"], "resolved": None},
    }
    assert stack["helper_nodes"] == []
    assert [m["model_id"] for m in stack["loaded_models"]] == [MODEL_ID]
    assert stack["loaded_models"][0]["state"] == "ready"
    llama = stack["backends"]["llama_cpp"]
    assert llama["available"] is True
    assert llama["version"]
    assert llama["loaded_models"] == [MODEL_ID]


def test_status_and_health_when_ok(obs_server: LMXServer) -> None:
    status = obs_server.http.get("/admin/status").json()
    for key in ("version", "uptime_seconds", "loaded_models", "models", "memory",
                "in_flight_requests", "max_concurrent_requests"):
        assert key in status, key
    assert status["models"] == [MODEL_ID] and status["loaded_models"] == 1
    health = obs_server.http.get("/admin/health").json()
    assert health["status"] == "ok" and health["reasons"] == []
    assert 0 < health["memory_usage_percent"] < 100
    assert health["helpers"] == []
    (worker,) = health["workers"]
    assert worker["model_id"] == MODEL_ID and worker["state"] == "ready"
    assert worker["pid"] == obs_server.worker_pid(MODEL_ID)
    assert worker["rss_bytes"] > 10 * 1024**2
    assert worker["restarts"] == 0
    assert health["backend_memory"]["workers_rss_gb"] > 0


def metric(server: LMXServer, name: str, **labels: str) -> float:
    text = server.http.get("/admin/metrics").text
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    pattern = rf"^{name}{{{want}}} (\S+)$" if labels else rf"^{name} (\S+)$"
    found = re.search(pattern, text, re.M)
    return float(found.group(1)) if found else 0.0


def test_restarts_quarantine_health_and_structured_logs(start_server: Any) -> None:
    server: LMXServer = start_server(
        env={"LMX_FAILPOINTS": "broken=segfault_on_load"}, auto_load=[MODEL_ID],
        crash_loop_max_crashes=2,
        config={"logging": {"format": "structured", "level": "INFO"}})
    server.wait_ready(MODEL_ID)
    # A crash and its restart.
    os.kill(server.worker_pid(MODEL_ID), signal.SIGKILL)
    wait_until(lambda: server.admin_models()[MODEL_ID]["restarts"] == 1
               and server.model_state(MODEL_ID) == "ready", 30, what="restart")
    assert metric(server, "lmx_worker_crashes_total", model=MODEL_ID) == 1
    assert metric(server, "lmx_worker_restarts_total", model=MODEL_ID) == 1
    # A model that segfaults while loading: the second crash quarantines it.
    for _ in range(2):
        assert server.load(MODEL_ID, served_name="broken").status_code == 409
    assert server.model_state("broken") == "quarantined"
    assert metric(server, "lmx_model_quarantines_total", model="broken") == 1
    assert metric(server, "lmx_quarantined_models") == 1
    health = server.http.get("/admin/health").json()
    assert health["status"] == "degraded"
    assert any(r.startswith("model_quarantined: broken") for r in health["reasons"])
    workers = {w["model_id"]: w for w in health["workers"]}
    assert workers["broken"]["state"] == "quarantined" and workers["broken"]["pid"] is None
    assert workers[MODEL_ID]["restarts"] == 1
    summary = server.http.get("/admin/metrics/json").json()
    assert summary["model_quarantines"] == {"broken": 1}
    assert summary["worker_restarts"] == {MODEL_ID: 1}

    resp = server.http.post("/v1/chat/completions", headers={"X-Request-ID": "json-log-1"},
                            json={"model": MODEL_ID, "max_tokens": 2,
                                  "messages": [{"role": "user", "content": "Hi"}]})
    assert resp.status_code == 200

    def records() -> list[dict[str, Any]]:
        # Worker processes share the stream with their own (non-JSON) output;
        # every line the gateway logs is one JSON object.
        lines = server.log().splitlines()
        assert not [ln for ln in lines if re.match(r"(INFO|WARNING|ERROR):", ln)]
        return [json.loads(ln) for ln in lines if ln.startswith("{")]

    def completed() -> dict[str, Any] | None:
        return next((r for r in records() if r.get("event") == "request_completed"
                     and r.get("request_id") == "json-log-1"), None)
    entry = wait_until(completed, 10, what="structured completion record")
    assert entry["level"] == "INFO" and entry["model"] == MODEL_ID
    assert entry["completion_tokens"] == 2
    assert entry["message"].startswith(f"Completion request model={MODEL_ID} tokens=2 ")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", entry["ts"])
    loaded = [r for r in records() if r.get("event") == "model_loaded"]
    assert loaded and loaded[0]["model"] == MODEL_ID and loaded[0]["load_time_sec"] > 0
    access = [r for r in records() if r.get("request_id") == "json-log-1"]
    assert len(access) >= 2  # uvicorn's access line carries the id too


def test_health_degraded_by_memory_threshold(start_server: Any) -> None:
    server: LMXServer = start_server(config={"memory": {"max_memory_percent": 0.1}})
    server.wait_healthy()
    health = server.http.get("/admin/health").json()
    assert health["status"] == "degraded"
    assert any(r.startswith("memory_pressure: ") for r in health["reasons"])
    assert health["memory"]["threshold_percent"] == 0.1
    assert health["workers"] == []
    assert server.http.get("/healthz").status_code == 200  # liveness is unaffected
