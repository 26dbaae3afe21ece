"""Workers that stop answering, stall, or are left behind; a router fed
garbage. Real server, real worker, real signals."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import zmq

from tests.conftest import MODEL_ID, LMXServer, wait_until

pytestmark = pytest.mark.timeout(400)

HEARTBEAT_TIMEOUT = 3.0
# How late past the heartbeat timeout the 503 may come: the monitor's tick
# and a loaded machine's scheduling, never the 300 s inference timeout.
SLACK = 7.0
LONG = {"model": MODEL_ID, "max_tokens": 2000, "ignore_eos": True,
        "messages": [{"role": "user", "content": "Tell me a long story."}]}


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _post_in_thread(server: LMXServer, body: dict[str, Any], out: dict[str, Any]) -> \
        threading.Thread:
    def run() -> None:
        with httpx.Client(base_url=server.url, timeout=120) as http:
            resp = http.post("/v1/chat/completions", json=body)
            out["status"], out["body"], out["at"] = resp.status_code, resp.json(), \
                time.monotonic()
    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_sigstopped_worker_is_declared_unresponsive_and_replaced(start_server: Any) -> None:
    server: LMXServer = start_server(auto_load=[MODEL_ID],
                                     worker_heartbeat_timeout_sec=HEARTBEAT_TIMEOUT)
    server.wait_ready(MODEL_ID)
    pid = server.worker_pid(MODEL_ID)
    out: dict[str, Any] = {}
    thread = _post_in_thread(server, LONG, out)
    wait_until(lambda: server.admin_models()[MODEL_ID]["in_flight"] == 1, timeout=30,
               what="the request running")
    stopped_at = time.monotonic()
    os.kill(pid, signal.SIGSTOP)
    try:
        thread.join(HEARTBEAT_TIMEOUT + SLACK + 30)
        assert "status" in out, "request still hanging"
        assert out["status"] == 503, out
        assert out["body"]["error"]["code"] == "worker_unresponsive"
        assert out["at"] - stopped_at < HEARTBEAT_TIMEOUT + SLACK
        server.wait_ready(MODEL_ID, timeout=60)
        wait_until(lambda: _gone(pid), timeout=10, what="the stopped worker gone")
        row = server.admin_models()[MODEL_ID]
        assert row["pid"] != pid
        assert row["restarts"] == 1
        assert row["recent_crashes"] == 1  # it counts as a crash
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
    assert _gone(pid)
    ok = server.http.post("/v1/chat/completions", json={**LONG, "max_tokens": 4})
    assert ok.status_code == 200, ok.text


def test_stalled_decode_loop_is_killed(start_server: Any) -> None:
    marker = "STALL-91c"
    server: LMXServer = start_server(
        auto_load=[MODEL_ID], env={"LMX_FAILPOINTS": f"*=stall_on_prompt:{marker}"},
        worker_heartbeat_timeout_sec=HEARTBEAT_TIMEOUT, worker_stall_timeout_sec=3)
    server.wait_ready(MODEL_ID)
    pid = server.worker_pid(MODEL_ID)
    sent = time.monotonic()
    resp = server.http.post("/v1/chat/completions", timeout=60, json={
        "model": MODEL_ID, "max_tokens": 4,
        "messages": [{"role": "user", "content": f"x {marker}"}]})
    assert resp.status_code == 503, resp.text
    assert resp.json()["error"]["code"] == "worker_unresponsive"
    assert "no progress" in resp.json()["error"]["message"]
    assert time.monotonic() - sent < 3 + SLACK
    server.wait_ready(MODEL_ID, timeout=60)
    assert server.worker_pid(MODEL_ID) != pid
    wait_until(lambda: _gone(pid), timeout=10, what="the stuck worker gone")


def test_slow_step_is_not_killed(start_server: Any) -> None:
    # Each token takes longer than the heartbeat timeout: the heartbeat
    # thread still beats and the progress counter still moves.
    server: LMXServer = start_server(
        auto_load=[MODEL_ID], env={"LMX_FAILPOINTS": "*=slow_tokens:4500"},
        # The stall bound is far above a step (a loaded machine's prefill can
        # take 10 s): what is tested is the heartbeat across slow steps.
        worker_heartbeat_timeout_sec=HEARTBEAT_TIMEOUT, worker_stall_timeout_sec=90)
    server.wait_ready(MODEL_ID, timeout=90)
    pid = server.worker_pid(MODEL_ID)
    resp = server.http.post("/v1/chat/completions", timeout=240,
                            json={**LONG, "max_tokens": 3})
    assert resp.status_code == 200, resp.text
    assert resp.json()["usage"]["completion_tokens"] == 3
    row = server.admin_models()[MODEL_ID]
    assert row["pid"] == pid and row["restarts"] == 0


def test_router_survives_foreign_messages(start_server: Any, tmp_path: Path) -> None:
    runtime = tmp_path / "run"
    server: LMXServer = start_server(auto_load=[MODEL_ID],
                                     config={"workers": {"runtime_dir": str(runtime)}})
    server.wait_ready(MODEL_ID)
    (sock_path,) = runtime.glob("lmx-*/supervisor.sock")
    ctx = zmq.Context()
    intruder = ctx.socket(zmq.DEALER)
    intruder.setsockopt(zmq.LINGER, 0)
    intruder.connect(f"ipc://{sock_path}")
    try:
        intruder.send_multipart([b"part-one", b"part-two"])
        intruder.send_multipart([b"a", b"b", b"c"])
        intruder.send(b"\xc1 not msgpack")  # [identity, junk]: an unknown peer
        wait_until(lambda: "malformed message from peer" in server.log(), timeout=10,
                   what="the malformed messages logged")
    finally:
        intruder.close()
        ctx.term()
    resp = server.http.post("/v1/chat/completions", json={**LONG, "max_tokens": 4})
    assert resp.status_code == 200, resp.text
    metrics = server.http.get("/admin/metrics").text
    (line,) = [x for x in metrics.splitlines()
               if x.startswith("lmx_router_malformed_frames_total")]
    assert float(line.split()[-1]) == 2
    assert server.http.get("/readyz").status_code == 200


def test_pdeathsig_kills_worker_when_pipe_reader_is_absent(tmp_path: Path) -> None:
    """Without the death pipe (as if its reader thread were blocked), the
    kernel still kills the worker when its parent is SIGKILLed."""
    child_code = ("from lmx_worker.process.main import die_with_parent; die_with_parent(); "
                  "import time; time.sleep(120)")
    parent_code = ("import subprocess, sys, time; "
                   f"p = subprocess.Popen([sys.executable, '-c', {child_code!r}]); "
                   "print(p.pid, flush=True); time.sleep(120)")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    parent = subprocess.Popen([sys.executable, "-c", parent_code], stdout=subprocess.PIPE,
                              env=env, text=True)
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        wait_until(lambda: "die_with_parent" in " ".join(psutil.Process(child).cmdline()),
                   timeout=10, what="the child running")
        time.sleep(1.0)  # the child imports lmx_worker and arms the signal
        parent.kill()
        parent.wait(10)
        wait_until(lambda: _gone(child), timeout=3, what="the orphan to die")
    finally:
        with contextlib.suppress(Exception):
            parent.kill()
        parent.wait(10)
        if parent.stdout is not None:
            parent.stdout.close()


def test_new_gateway_removes_runtime_dirs_of_a_killed_one(start_server: Any,
                                                          tmp_path: Path) -> None:
    runtime = tmp_path / "run"
    first: LMXServer = start_server(config={"workers": {"runtime_dir": str(runtime)}})
    first.wait_healthy()
    (old_dir,) = runtime.glob("lmx-*")
    first.stop(signal.SIGKILL)
    assert old_dir.exists()  # a SIGKILLed gateway cleans nothing
    foreign = runtime / "lmx-not-ours"
    foreign.mkdir()  # no owner file: never touched
    second: LMXServer = start_server(config={"workers": {"runtime_dir": str(runtime)}})
    second.wait_healthy()
    assert not old_dir.exists()
    assert foreign.exists()
    assert len([d for d in runtime.glob("lmx-*") if (d / "owner.pid").exists()]) == 1


def test_worker_environment_holds_no_secrets(start_server: Any) -> None:
    server: LMXServer = start_server(auto_load=[MODEL_ID], env={
        "HF_TOKEN": "hf-secret", "HUGGING_FACE_HUB_TOKEN": "hf-secret-2",
        "OPENAI_API_KEY": "sk-secret", "LMX_SECURITY__PROFILE": "lan"})
    server.wait_ready(MODEL_ID)
    environ = psutil.Process(server.worker_pid(MODEL_ID)).environ()
    leaked = {k for k in environ if k in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN",
                                          "OPENAI_API_KEY") or k.startswith("LMX_SECURITY")}
    assert not leaked
    assert psutil.Process(server.proc.pid).environ().get("HF_TOKEN") == "hf-secret"
