"""The `lmx` client commands, run as real subprocesses (`python -m
lmx_gateway ...`) against a real server with keys on, a loopback hub for
`models pull`, and a dead port for the unreachable case."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import (
    MODEL_ID,
    LMXServer,
    base_config,
    running_server,
    wait_until,
)
from tests.fake_hub import FakeHub, HubFile
from tests.model_fixtures import mlx_files

pytestmark = pytest.mark.timeout(180)

ADMIN_KEY = "cli-admin-key-51d2"
API_KEY = "cli-api-key-0c7e"
SPARE = "spare"  # a second copy of the model on disk, for `models rm`
HUB_REPO = "lmx-test/cli-pull"
SLOW = "slow-b"  # served name with a slow_tokens failpoint


@pytest.fixture(scope="module")
def hub() -> Iterator[FakeHub]:
    server = FakeHub().start()
    files = mlx_files(n_floats=64 * 1024)  # a (tiny) model in MLX's layout, ~256 KB
    server.add_repo(HUB_REPO, [HubFile(name, data=data) for name, data in files.items()])
    yield server
    server.stop()


def _config(models: Path) -> dict[str, Any]:
    cfg = base_config(models, auto_load=[MODEL_ID])
    cfg["security"] = {"admin_key": ADMIN_KEY, "inference_api_key": API_KEY}
    cfg["server"] = {"sse_heartbeat_interval_sec": 0.5}
    return cfg


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, model_file: Path, hub: FakeHub
           ) -> Iterator[LMXServer]:
    def env(home: Path) -> dict[str, str]:
        return {"HF_ENDPOINT": hub.url, "HF_HUB_CACHE": str(home / "hf-cache"),
                "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
                "HF_HUB_OFFLINE": "0", "LMX_FAILPOINTS": f"{SLOW}=slow_tokens:150"}

    def spare_copy(home: Path) -> None:
        shutil.copyfile(model_file, home / "models" / f"{SPARE}.gguf")

    with running_server(tmp_path_factory, "cli", links=[model_file], config=_config, env=env,
                        prepare=spare_copy, wait_for=[MODEL_ID],
                        headers={"X-Admin-Key": ADMIN_KEY,
                                 "Authorization": f"Bearer {API_KEY}"}) as srv:
        yield srv


def cli_env(url: str, keys: bool = True) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LMX_")}
    env.update({"LMX_URL": url, "COLUMNS": "200"})
    if keys:
        env.update({"LMX_ADMIN_KEY": ADMIN_KEY, "LMX_API_KEY": API_KEY})
    return env


def lmx(url: str, *args: str, keys: bool = True, stdin: str | None = None,
        timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lmx_gateway", *args], env=cli_env(url, keys),
                          input=stdin, capture_output=True, text=True, timeout=timeout,
                          stdin=None if stdin is not None else subprocess.DEVNULL)


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, f"rc={result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("lmx: error: ")
    return lines[0]


def test_dead_server_is_one_line_and_exit_2() -> None:
    # Bound, never listening: connections are refused, and no other process
    # can start listening on the port while the test runs.
    with socket.socket() as dead:
        dead.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{dead.getsockname()[1]}"
        for args in (["status"], ["chat", "-m", "x", "hello"], ["events", "--json"]):
            result = lmx(url, *args)
            assert result.returncode == 2, (args, result.stdout, result.stderr)
            assert "cannot reach the LMX server at " + url in one_error_line(result)
            assert result.stdout == ""


def test_status_and_models_ls(server: LMXServer) -> None:
    status = json.loads(ok(lmx(server.url, "status", "--json")).stdout)
    assert status["models"] == [MODEL_ID] and status["version"]
    human = ok(lmx(server.url, "status")).stdout
    assert MODEL_ID in human and "ready" in human and "LMX " in human

    rows = json.loads(ok(lmx(server.url, "models", "ls", "--json")).stdout)["loaded"]
    assert [r["model_id"] for r in rows] == [MODEL_ID]
    table = ok(lmx(server.url, "models", "ls")).stdout
    assert re.search(rf"{re.escape(MODEL_ID)}\s+ready\s+llama_cpp\s+\d+", table), table

    denied = lmx(server.url, "models", "ls", keys=False)  # no LMX_ADMIN_KEY
    assert denied.returncode == 1 and "LMX_ADMIN_KEY" in one_error_line(denied)


def test_load_unload_with_live_events(server: LMXServer) -> None:
    tail = subprocess.Popen(
        [sys.executable, "-m", "lmx_gateway", "events", "--json", "--type", "model_loaded",
         "--type", "model_unloaded", "-n", "2"],
        env=cli_env(server.url), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # The tail is connected once its banner is out (stderr, before any event).
        assert tail.stderr is not None
        assert "Following events" in _read_until(tail.stderr.fileno(), r"\n", timeout=30)
        loaded = ok(lmx(server.url, "models", "load", MODEL_ID, "--served-name", "cli-b"))
        assert "Loaded: cli-b (llama_cpp" in loaded.stdout
        rows = json.loads(ok(lmx(server.url, "models", "ls", "--json")).stdout)["loaded"]
        assert {r["model_id"] for r in rows} == {MODEL_ID, "cli-b"}
        again = json.loads(ok(lmx(server.url, "models", "load", MODEL_ID, "--served-name",
                                  "cli-b", "--json")).stdout)
        assert again["already_loaded"] is True
        assert "Unloaded: cli-b" in ok(lmx(server.url, "models", "unload", "cli-b")).stdout
        out, _ = tail.communicate(timeout=30)
    finally:
        if tail.poll() is None:
            tail.kill()
            tail.communicate()
    assert tail.returncode == 0
    events = [json.loads(line) for line in out.splitlines()]
    assert [(e["type"], e["model_id"]) for e in events] == [
        ("model_loaded", "cli-b"), ("model_unloaded", "cli-b")]

    missing = lmx(server.url, "models", "unload", "ghost")
    assert missing.returncode == 1 and "[404 model-not-found]" in one_error_line(missing)


def test_chat_one_shot(server: LMXServer) -> None:
    result = ok(lmx(server.url, "chat", "-m", MODEL_ID, "--max-tokens", "5", "Say", "hello"))
    assert result.stdout.strip()  # the model's words
    assert re.search(r"\d+ prompt \+ [1-5] completion tokens", result.stderr), result.stderr
    body = json.loads(ok(lmx(server.url, "chat", "-m", MODEL_ID, "--max-tokens", "3",
                             "--json", "Say hello")).stdout)
    assert body["model"] == MODEL_ID and body["usage"]["completion_tokens"] <= 3
    assert isinstance(body["content"], str)
    # Without -m the first loaded model answers; the prompt may come on stdin.
    piped = ok(lmx(server.url, "chat", "--max-tokens", "2", "-", stdin="Hi there"))
    assert MODEL_ID in piped.stderr
    wrong = lmx(server.url, "chat", "-m", "ghost", "hi")
    assert wrong.returncode == 1 and "model-not-found" in one_error_line(wrong)


def _prompt_tokens(stats: str) -> list[tuple[int, int]]:
    return [(int(p), int(c)) for p, c in
            re.findall(r"(\d+) prompt \+ (\d+) completion tokens", stats)]


def test_chat_conversation_from_stdin_keeps_history(server: LMXServer) -> None:
    result = ok(lmx(server.url, "chat", "-m", MODEL_ID, "--max-tokens", "4",
                    "--temperature", "0", stdin="My name is Ada.\n\nWhat is my name?\n"))
    turns = _prompt_tokens(result.stderr)
    assert len(turns) == 2, result.stderr
    (p1, c1), (p2, _c2) = turns
    # The second request carried the first question and answer.
    assert p2 > p1 + c1, turns


def _read_until(fd: int, pattern: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    seen = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
            if re.search(pattern, seen.decode(errors="replace"), re.DOTALL):
                return seen.decode(errors="replace")
    raise AssertionError(f"no {pattern!r} in terminal output: {seen!r}")


def test_chat_interactive_in_a_terminal(server: LMXServer) -> None:
    # A model whose every token takes 150 ms, so Ctrl-C lands mid-answer.
    assert server.load(MODEL_ID, served_name=SLOW).status_code == 200
    controller, terminal = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "lmx_gateway", "chat", "-m", SLOW, "--max-tokens", "30"],
        env={**cli_env(server.url), "TERM": "dumb"}, stdin=terminal, stdout=terminal,
        stderr=terminal, close_fds=True,
        # As from a terminal: a test run started in the background (`cmd &` in a
        # script) inherits SIGINT ignored, and Python then keeps it ignored.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    os.close(terminal)
    try:
        _read_until(controller, r"you> ")
        os.write(controller, b"Tell me a long story about a dragon.\n")
        wait_until(lambda: server.admin_models()[SLOW]["in_flight"] >= 1, 30,
                   what="the answer being generated")
        proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
        _read_until(controller, r"interrupted.*you> ")  # the answer stops, the chat goes on
        os.write(controller, b"/reset\n")
        _read_until(controller, r"conversation cleared.*you> ")
        os.write(controller, b"/exit\n")
        assert proc.wait(timeout=30) == 0

        def aborted() -> bool:  # closing the stream stopped the generation in the worker
            stats = server.admin_models()[SLOW]["worker_stats"]
            return bool(stats and stats["requests_aborted"] >= 1)
        wait_until(aborted, 15, what="the interrupted generation aborted")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        os.close(controller)
        server.http.post("/admin/models/unload", json={"model_id": SLOW})


def test_bench(server: LMXServer) -> None:
    body = json.loads(ok(lmx(server.url, "bench", "-m", MODEL_ID, "--max-tokens", "3",
                             "--runs", "1", "--ignore-eos", "--json")).stdout)
    assert body["results"][0]["completion_tokens"] == 3 and body["avg_tokens_per_second"] > 0


def test_config_reload(server: LMXServer) -> None:
    cfg = _config(server.home / "models")
    cfg["routing"] = {"aliases": {"chat": [MODEL_ID]}}
    server.config_path.write_text(yaml.safe_dump(cfg))
    result = ok(lmx(server.url, "config", "reload"))
    assert "updated routing" in result.stdout
    answer = json.loads(ok(lmx(server.url, "chat", "-m", "chat", "--max-tokens", "2", "--json",
                               "hi")).stdout)
    assert answer["model"] == MODEL_ID  # the alias from the reloaded file

    cfg["routing"] = {"aliasez": {}}
    server.config_path.write_text(yaml.safe_dump(cfg))
    bad = lmx(server.url, "config", "reload")
    assert bad.returncode == 1
    line = one_error_line(bad)
    assert "routing.aliasez: unknown key" in line and "[400 invalid_config]" in line
    server.config_path.write_text(yaml.safe_dump(_config(server.home / "models")))
    assert "updated routing" in ok(lmx(server.url, "config", "reload")).stdout


def test_models_pull_available_and_rm(server: LMXServer) -> None:
    pulled = ok(lmx(server.url, "models", "pull", HUB_REPO))
    assert f"Downloaded: {HUB_REPO}" in pulled.stdout
    assert "100%" in pulled.stderr  # the progress bar's last frame
    available = json.loads(ok(lmx(server.url, "models", "available", "--json")).stdout)
    names = {row["repo_id"] for row in available}
    assert {HUB_REPO, SPARE, MODEL_ID} <= names
    table = ok(lmx(server.url, "models", "available")).stdout
    assert HUB_REPO in table and SPARE in table

    refused = lmx(server.url, "models", "rm", SPARE)  # no --yes and no terminal
    assert refused.returncode == 1 and "--yes" in one_error_line(refused)
    assert (server.home / "models" / f"{SPARE}.gguf").exists()
    busy = lmx(server.url, "models", "rm", MODEL_ID, "--yes")  # loaded (and a symlink out)
    assert busy.returncode == 1 and MODEL_ID in one_error_line(busy)
    assert (server.home / "models" / f"{MODEL_ID}.gguf").exists()
    removed = ok(lmx(server.url, "models", "rm", SPARE, "--yes"))
    assert f"Deleted: {SPARE}" in removed.stdout
    assert not (server.home / "models" / f"{SPARE}.gguf").exists()
    ok(lmx(server.url, "models", "rm", HUB_REPO, "--yes"))
    left = {row["repo_id"] for row in
            json.loads(ok(lmx(server.url, "models", "available", "--json")).stdout)}
    assert HUB_REPO not in left and SPARE not in left and MODEL_ID in left

    unknown = lmx(server.url, "models", "pull", "lmx-test/does-not-exist")
    assert unknown.returncode == 1 and "404" in one_error_line(unknown)
    wait_until(lambda: server.http.get("/healthz").status_code == 200, 5)
