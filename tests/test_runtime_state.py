"""~/.opta-lmx/runtime-state.json with real restarts: models come back after
a restart, three SIGKILLed starts within 60 s give safe mode, a clean
SIGTERM resets it, corrupt files are moved aside, and the file parses at
every instant while the gateway is SIGKILLed in the middle of loads."""

from __future__ import annotations

import json
import random
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import MODEL_ID, LMXServer, base_config, wait_until
from tests.lifecycle_support import LIGHT

pytestmark = pytest.mark.timeout(180)

STATE = "runtime-state.json"


@pytest.fixture
def home(tmp_path: Path) -> Path:
    directory = tmp_path / "home"
    directory.mkdir()
    return directory


@pytest.fixture
def servers() -> Iterator[list[LMXServer]]:
    """Servers sharing one LMX home, started one after another; any still
    running at the end is killed."""
    started: list[LMXServer] = []
    yield started
    for server in started:
        server.stop(signal.SIGKILL)


def start(servers: list[LMXServer], home: Path, config: dict[str, Any]) -> LMXServer:
    server = LMXServer(home, config)
    servers.append(server)
    return server


def state(home: Path) -> dict[str, Any]:
    data = json.loads((home / STATE).read_text())
    assert isinstance(data, dict)
    return data


def test_restart_restores_models(home: Path, models_dir: Path,
                                 servers: list[LMXServer]) -> None:
    config = base_config(models_dir, **LIGHT)
    first = start(servers, home, config)
    first.wait_healthy()
    assert first.load(MODEL_ID, served_name="kept").status_code == 200
    assert first.load(MODEL_ID, served_name="dropped").status_code == 200
    assert first.http.post("/admin/models/unload",
                           json={"model_id": "dropped"}).status_code == 200
    assert first.stop() == 0  # SIGTERM: a clean shutdown
    saved = state(home)
    assert saved["last_clean_shutdown"] is True and saved["startup_count"] == 0
    assert [m["model_id"] for m in saved["loaded_models"]] == ["kept"]

    second = start(servers, home, config)
    second.wait_ready("kept")
    assert set(second.admin_models()) == {"kept"}
    reply = second.http.post("/v1/chat/completions", json={
        "model": "kept", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3})
    assert reply.status_code == 200, reply.text
    # Restored after a crash of the gateway too.
    second.stop(signal.SIGKILL)
    assert state(home)["last_clean_shutdown"] is False
    third = start(servers, home, config)
    third.wait_ready("kept")
    assert state(home)["startup_count"] == 2


def test_three_unclean_starts_enter_safe_mode(home: Path, models_dir: Path,
                                              servers: list[LMXServer]) -> None:
    config = base_config(models_dir, auto_load=[MODEL_ID], **LIGHT)
    for count in (1, 2, 3):
        server = start(servers, home, config)
        server.wait_healthy()  # the lifespan has counted this start by now
        server.stop(signal.SIGKILL)
        saved = state(home)
        assert saved["startup_count"] == count and saved["last_clean_shutdown"] is False
        assert saved["safe_mode"] is False
    fourth = start(servers, home, config)
    fourth.wait_healthy()
    wait_until(lambda: "auto_load_skipped_safe_mode" in fourth.log(), 15,
               what="safe-mode log line")
    assert "crash_loop_detected" in fourth.log()
    assert fourth.admin_models() == {}
    assert fourth.http.get("/readyz").status_code == 503
    saved = state(home)
    assert saved["safe_mode"] is True and saved["startup_count"] == 4

    assert fourth.stop() == 0  # a clean stop clears the counter (runbook §3.3)
    saved = state(home)
    assert saved["last_clean_shutdown"] is True and saved["startup_count"] == 0
    fifth = start(servers, home, config)
    fifth.wait_ready(MODEL_ID)
    assert "crash_loop_detected" not in fifth.log()


def test_corrupt_files_are_moved_aside(home: Path, models_dir: Path,
                                       servers: list[LMXServer]) -> None:
    (home / STATE).write_text('{"loaded_models": [{"model_id": ')
    (home / "compatibility-registry.json").write_text('{"rows": "not a list"}')
    server = start(servers, home, base_config(models_dir, **LIGHT))
    server.wait_healthy()
    assert len(list(home.glob(f"{STATE}.corrupt-*"))) == 1
    assert len(list(home.glob("compatibility-registry.json.corrupt-*"))) == 1
    assert "is corrupt" in server.log()
    assert state(home)["startup_count"] == 1
    assert server.load(MODEL_ID).status_code == 200
    rows = json.loads((home / "compatibility-registry.json").read_text())["rows"]
    assert [r["outcome"] for r in rows] == ["pass"]


class StateChecker:
    """Reads and parses the state file as fast as it can, in a thread."""

    def __init__(self, path: Path, names: set[str]) -> None:
        self.path = path
        self.names = names
        self.reads = 0
        self.problems: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                raw = self.path.read_bytes()
            except FileNotFoundError:
                continue
            try:
                data = json.loads(raw)
                ids = {m["model_id"] for m in data["loaded_models"]}
                assert isinstance(data["startup_count"], int)
                assert ids <= self.names, ids
            except (ValueError, KeyError, TypeError, AssertionError) as exc:
                self.problems.append(f"{exc!r}: {raw[:200]!r}")
            self.reads += 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)


def cycle(url: str, name: str, times: int, tolerate_errors: bool = False) -> list[int]:
    statuses: list[int] = []
    with httpx.Client(base_url=url, timeout=120) as client:
        for _ in range(times):
            try:
                for path, body in (("/admin/models/load",
                                    {"model_id": MODEL_ID, "served_name": name}),
                                   ("/admin/models/unload", {"model_id": name})):
                    statuses.append(client.post(path, json=body).status_code)
            except httpx.HTTPError:
                if tolerate_errors:
                    return statuses  # the gateway was killed under us
                raise
    return statuses


def test_state_file_always_parses(home: Path, models_dir: Path,
                                  servers: list[LMXServer]) -> None:
    """100 load/unload cycles (5 clients x 20, one server), then 5 gateway
    SIGKILLs at random moments while loads and unloads run, with restarts;
    a checker parses the file throughout."""
    config = base_config(models_dir, context_length=256, **LIGHT)
    names = {f"c{i}" for i in range(5)} | {"k"}
    checker = StateChecker(home / STATE, names)
    try:
        server = start(servers, home, config)
        server.wait_healthy()
        results: dict[str, list[int]] = {}

        def run(name: str) -> None:
            results[name] = cycle(server.url, name, 20)

        threads = [threading.Thread(target=run, args=(f"c{i}",)) for i in range(5)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(150)
        assert sorted(results) == sorted(f"c{i}" for i in range(5))
        assert all(s == [200] * 40 for s in results.values()), results
        assert state(home)["loaded_models"] == []
        server.stop(signal.SIGKILL)

        rng = random.Random()
        seed = rng.randrange(1 << 30)
        rng.seed(seed)
        for _ in range(5):
            server = start(servers, home, config)
            server.wait_healthy()
            cycler = threading.Thread(target=cycle, args=(server.url, "k", 1000, True))
            cycler.start()
            # Not synchronisation: the kill lands at a random point of the
            # load/unload cycles (seed printed on failure).
            time.sleep(rng.uniform(0.1, 2.0))
            server.stop(signal.SIGKILL)
            cycler.join(60)
            assert not cycler.is_alive()
            saved = state(home)
            assert {m["model_id"] for m in saved["loaded_models"]} <= names, (seed, saved)
    finally:
        checker.close()
    assert checker.problems == [], checker.problems[:3]
    assert checker.reads > 100
