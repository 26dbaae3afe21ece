"""No request can take a model down: requests the worker cannot serve fail
alone, poison requests are quarantined instead of their model, and the
supervisor's bounds (queue, served_name, load paths) answer with clear 4xx.
Real server, real worker, real signals."""

from __future__ import annotations

import threading
import time
from typing import Any

import httpx
import pytest

from tests.conftest import MODEL_ID, LMXServer, wait_until

pytestmark = pytest.mark.timeout(480)

# Chat histories whose tool calls the worker's tool formatting cannot read.
# The gateway forwards tool_calls as free-form objects today, so each of
# these reaches the worker's templating (the worker's guard is what they test).
MALFORMED_TOOL_CALLS: list[Any] = [
    [{"id": "c1", "type": "function", "function": "boom"}],
    [{"id": "c1", "type": "function", "function": {"name": 7, "arguments": []}}],
    [{"id": "c1", "type": "function"}],
    [{"id": "c1", "type": "function", "function": None}],
    ["not-an-object"],
]


def _chat_with(tool_calls: Any) -> dict[str, Any]:
    return {"model": MODEL_ID, "max_tokens": 4, "messages": [
        {"role": "assistant", "content": "x", "tool_calls": tool_calls},
        {"role": "user", "content": "hi"}]}


def _model(server: LMXServer) -> dict[str, Any]:
    return server.admin_models()[MODEL_ID]


def test_malformed_tool_call_history_fails_only_itself(start_server: Any) -> None:
    server: LMXServer = start_server(auto_load=[MODEL_ID])
    server.wait_ready(MODEL_ID)
    pid = server.worker_pid(MODEL_ID)
    boom = server.http.post("/v1/chat/completions", json=_chat_with(MALFORMED_TOOL_CALLS[0]))
    assert boom.status_code == 400, boom.text  # the reproduction: killed the worker
    # Refused at the edge now (typed messages), naming the field; the
    # worker's own guard (param "messages") is the second line.
    assert boom.json()["error"]["param"].startswith("messages"), boom.text
    assert "function" in boom.json()["error"]["message"] or "str" in boom.json()["error"]["message"]
    for shape in MALFORMED_TOOL_CALLS:
        resp = server.http.post("/v1/chat/completions", json=_chat_with(shape))
        # Some shapes the template can still render (200); none may cost the worker.
        assert resp.status_code == 200 or 400 <= resp.status_code < 500, (shape, resp.text)
        if resp.status_code == 400 and resp.json()["error"].get("code") == "invalid_request":
            assert resp.json()["error"]["param"].startswith("messages"), resp.text
    # Several at once, beside a normal request: only they fail.
    results: dict[str, int] = {}

    def send(name: str, body: dict[str, Any]) -> None:
        # Generous: on a loaded 2-core machine a short generation can take a minute.
        with httpx.Client(base_url=server.url, timeout=240) as http:
            results[name] = http.post("/v1/chat/completions", json=body).status_code

    normal = {"model": MODEL_ID, "max_tokens": 8,
              "messages": [{"role": "user", "content": "Say hello."}]}
    threads = [threading.Thread(target=send, args=(f"bad{i}", _chat_with(s)))
               for i, s in enumerate(MALFORMED_TOOL_CALLS)]
    threads.append(threading.Thread(target=send, args=("normal", normal)))
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert results.pop("normal") == 200
    assert all(status == 200 or 400 <= status < 500 for status in results.values()), results
    assert results["bad0"] == 400
    row = _model(server)
    assert row["state"] == "ready"
    assert row["restarts"] == 0
    assert row["recent_crashes"] == 0
    assert server.worker_pid(MODEL_ID) == pid


def _state_events(server: LMXServer) -> list[str]:
    return [line for line in server.log().splitlines() if "quarantined" in line]


def test_poison_request_is_quarantined_not_the_model(start_server: Any) -> None:
    marker = "POISON-7f3a"
    server: LMXServer = start_server(
        auto_load=[MODEL_ID], env={"LMX_FAILPOINTS": f"*=segfault_on_prompt:{marker}"},
        crash_loop_max_crashes=3, crash_loop_window_sec=120,
        restart_backoff_initial_sec=0.1, restart_backoff_max_sec=0.5)
    server.wait_ready(MODEL_ID)
    stop = threading.Event()
    problems: list[str] = []
    # Clients hit by a crash, and those that have since retried successfully:
    # the poison's second try waits for them, so a retry never shares its
    # crash (an identical retry in flight at both crashes would be taken
    # for the poison: two crashes cannot tell them apart).
    hit: set[int] = set()
    lock = threading.Lock()
    served = [0] * 4

    def normal_client(n: int) -> None:
        with httpx.Client(base_url=server.url, timeout=240) as http:
            i = 0
            while not stop.is_set():
                body = {"model": MODEL_ID, "max_tokens": 6, "temperature": 0,
                        "messages": [{"role": "user", "content": f"client {n} question {i}"}]}
                for _attempt in range(20):
                    resp = http.post("/v1/chat/completions", json=body)
                    if resp.status_code == 200:
                        with lock:
                            hit.discard(n)
                        served[n] += 1
                        break
                    code = resp.json()["error"].get("code")
                    if code not in ("worker_crashed", "model_unavailable"):
                        problems.append(f"client {n}: {resp.status_code} {resp.text[:200]}")
                        return
                    with lock:
                        hit.add(n)
                    time.sleep(0.2)
                else:
                    problems.append(f"client {n}: request {i} never succeeded")
                    return
                i += 1

    clients = [threading.Thread(target=normal_client, args=(n,)) for n in range(4)]
    for t in clients:
        t.start()
    try:
        wait_until(lambda: all(served), timeout=180, what="every normal client served")
        poison = {"model": MODEL_ID, "max_tokens": 6,
                  "messages": [{"role": "user", "content": f"please {marker} now"}]}
        statuses: list[tuple[int, str]] = []
        for attempt in range(4):
            server.wait_ready(MODEL_ID, timeout=120)
            if attempt == 1:  # see `hit` above
                wait_until(lambda: not hit, timeout=180, what="hit clients to recover")
            resp = server.http.post("/v1/chat/completions", json=poison, timeout=180)
            statuses.append((resp.status_code, resp.json()["error"]["code"]))
        assert statuses[:2] == [(503, "worker_crashed")] * 2, statuses
        assert statuses[2:] == [(422, "request_quarantined")] * 2, statuses
        refused = server.http.post("/v1/chat/completions", json=poison).json()["error"]
        assert "refused" in refused["message"] and "crashes" in refused["message"]
        before = served.copy()
        wait_until(lambda: all(s > b for s, b in zip(served, before, strict=True)),
                   timeout=180, what="normal clients served after the quarantine")
    finally:
        stop.set()
        for t in clients:
            t.join(300)
    assert not problems, problems
    row = _model(server)
    assert row["state"] == "ready", row
    assert row["restarts"] == 2
    assert row["recent_crashes"] == 0  # the poison's crashes do not count
    assert len(row["quarantined_requests"]) == 1
    assert row["quarantined_requests"][0]["crashes"] == 2
    assert 0 < row["quarantined_requests"][0]["expires_in_sec"] <= 600
    assert "request_quarantined" not in server.log() or _state_events(server)
    assert "-> quarantined" not in server.log()


def test_queue_full_is_429(start_server: Any) -> None:
    server: LMXServer = start_server(
        auto_load=[MODEL_ID], max_concurrent_requests=1, max_queued_requests=1,
        env={"LMX_FAILPOINTS": "*=slow_tokens:200"})
    server.wait_ready(MODEL_ID)
    long_body = {"model": MODEL_ID, "max_tokens": 200, "ignore_eos": True,
                 "messages": [{"role": "user", "content": "Count."}]}
    statuses: list[int] = []

    def send() -> None:
        with httpx.Client(base_url=server.url, timeout=120) as http:
            statuses.append(http.post("/v1/chat/completions", json=long_body).status_code)

    running = threading.Thread(target=send)
    running.start()
    wait_until(lambda: _model(server)["in_flight"] == 1, timeout=30, what="one running")
    waiting = threading.Thread(target=send)
    waiting.start()
    wait_until(lambda: _model(server)["queued"] == 1, timeout=30, what="one queued")
    resp = server.http.post("/v1/chat/completions", json=long_body)
    assert resp.status_code == 429, resp.text
    assert resp.json()["error"]["code"] == "queue_full"
    assert int(resp.headers["retry-after"]) >= 1
    # Nothing else is disturbed: both others are still there; unload ends them.
    assert _model(server)["queued"] == 1
    server.http.post("/admin/models/unload", json={"model_id": MODEL_ID}, timeout=60)
    running.join(60)
    waiting.join(60)


def test_served_name_and_load_paths_are_checked(start_server: Any, tmp_path: Any,
                                                model_file: Any) -> None:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "copy.gguf").symlink_to(model_file)
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "ok.gguf").symlink_to(model_file)
    server: LMXServer = start_server(allowed_paths=[str(allowed)])
    server.wait_healthy()
    resp = server.load(MODEL_ID, served_name="x" * 300)
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == "served_name"
    assert resp.json()["error"]["code"] == "invalid_model_id"
    for bad in ("bad name!", "a/../b", "-dash"):
        resp = server.load(MODEL_ID, served_name=bad)
        assert resp.status_code == 400, (bad, resp.text)
    for ref in (str(outside / "copy.gguf"), f"{MODEL_ID}/../../elsewhere/copy.gguf",
                "../elsewhere/copy.gguf"):
        resp = server.load(ref)
        assert resp.status_code == 403, (ref, resp.text)
        assert resp.json()["error"]["code"] == "model_path_not_allowed"
    # No worker was started for any of them: nothing counts toward quarantine.
    assert server.admin_models() == {}
    assert server.load(str(allowed / "ok.gguf")).status_code == 200
    assert server.load(MODEL_ID, served_name="short-name").status_code == 200
    assert server.model_state("short-name") == "ready"


def test_failed_batched_step_fails_its_requests_and_resets_in_process(
        start_server: Any) -> None:
    marker = "STEPFAIL-5d"
    server: LMXServer = start_server(
        auto_load=[MODEL_ID], env={"LMX_FAILPOINTS": f"*=step_error_on_prompt:{marker}"})
    server.wait_ready(MODEL_ID)
    pid = server.worker_pid(MODEL_ID)
    out: dict[str, Any] = {}

    def long_request() -> None:
        with httpx.Client(base_url=server.url, timeout=240) as http:
            out["long"] = http.post("/v1/chat/completions", json={
                "model": MODEL_ID, "max_tokens": 2000, "ignore_eos": True,
                "messages": [{"role": "user", "content": "Tell a long story."}]})

    thread = threading.Thread(target=long_request)
    thread.start()
    wait_until(lambda: _model(server)["in_flight"] == 1, timeout=60, what="one running")
    trigger = server.http.post("/v1/chat/completions", timeout=240, json={
        "model": MODEL_ID, "max_tokens": 4,
        "messages": [{"role": "user", "content": f"x {marker}"}]})
    thread.join(300)
    # Nobody can tell which request broke the shared step: both fail, each
    # told its own id; the worker process lives on.
    for resp in (trigger, out["long"]):
        assert resp.status_code == 500, resp.text
        assert resp.json()["error"]["code"] == "worker_internal_error"
        assert "a batched decode step" in resp.json()["error"]["message"]
    ok = server.http.post("/v1/chat/completions", timeout=240, json={
        "model": MODEL_ID, "max_tokens": 4, "temperature": 0,
        "messages": [{"role": "user", "content": "Say hello."}]})
    assert ok.status_code == 200, ok.text
    row = _model(server)
    assert row["pid"] == pid and row["restarts"] == 0 and row["state"] == "ready"
