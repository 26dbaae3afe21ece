"""Downloads from a loopback hub (tests/fake_hub.py) through the real
huggingface_hub code in a real `lmx serve`: progress to 100 % with SSE
events, a dropped connection resumed without fetching finished files again,
cancel, sha256 verification, 507 before any byte when the disk is too small,
and `auto_download` that ends with a loaded model serving a chat request."""

from __future__ import annotations

import contextlib
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import LMXServer, base_config, running_server, wait_until
from tests.event_reader import EventReader
from tests.fake_hub import FakeHub, HubFile
from tests.model_fixtures import mlx_files, safetensors_bytes

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def hub() -> Iterator[FakeHub]:
    server = FakeHub().start()
    yield server
    server.stop()


def hub_env(hub: FakeHub, cache: Path) -> dict[str, str]:
    return {"HF_ENDPOINT": hub.url, "HF_HUB_CACHE": str(cache), "HF_HUB_DISABLE_XET": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_OFFLINE": "0"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, hub: FakeHub) -> Iterator[LMXServer]:
    with running_server(tmp_path_factory, "downloads",
                        config={"server": {"sse_heartbeat_interval_sec": 0.5}},
                        env=lambda home: hub_env(hub, home / "hf-cache")) as lmx:
        yield lmx


@pytest.fixture
def events(server: LMXServer) -> Iterator[EventReader]:
    reader = EventReader(server.url)
    yield reader
    reader.close()


def unique_repo(stem: str) -> str:
    return f"lmx-test/{stem}-{uuid.uuid4().hex[:6]}"


def progress(server: LMXServer, download_id: str) -> dict[str, Any]:
    resp = server.http.get(f"/admin/models/download/{download_id}/progress")
    assert resp.status_code == 200, resp.text
    body: dict[str, Any] = resp.json()
    return body


def start(server: LMXServer, repo_id: str, cached: bool = False) -> str:
    resp = server.http.post("/admin/models/download", json={"repo_id": repo_id})
    assert resp.status_code == 202, resp.text
    body = resp.json()
    # With every file already in the cache the job may be done before the answer.
    assert body["repo_id"] == repo_id
    assert body["status"] in (("downloading", "completed") if cached else ("downloading",))
    assert body["download_id"].startswith("dl-")
    return str(body["download_id"])


def finish(server: LMXServer, download_id: str, timeout: float = 60) -> dict[str, Any]:
    return dict(wait_until(lambda: (p := progress(server, download_id))["status"] != "downloading"
                           and p, timeout, interval=0.1, what=f"{download_id} to end"))


def test_progress_events_and_resume_after_dropped_connection(
        server: LMXServer, hub: FakeHub, events: EventReader) -> None:
    repo_id = unique_repo("resume")
    files = {**mlx_files(), "model.safetensors": safetensors_bytes(1_000_000, {"format": "mlx"})}
    hub.add_repo(repo_id, [HubFile(n, d, lfs=n.endswith(".safetensors"))
                           for n, d in files.items()])
    hub.bytes_per_sec = 2_000_000  # ~2 s for the 4 MB weights: progress is observable
    hub.drop_once["model.safetensors"] = 1_500_000  # the connection dies mid-file once
    try:
        download_id = start(server, repo_id)
        seen: list[dict[str, Any]] = []

        def ended() -> bool:
            seen.append(progress(server, download_id))
            return bool(seen[-1]["status"] != "downloading")

        wait_until(ended, 60, interval=0.1, what="download to end")
    finally:
        hub.bytes_per_sec = None
    final = seen[-1]
    assert final["status"] == "completed", final
    total = sum(len(d) for d in files.values())
    assert final["bytes_total"] == total and final["bytes_downloaded"] == total
    percents = [p["progress_percent"] for p in seen]
    assert percents == sorted(percents) and percents[-1] == 100.0
    assert any(0 < p < 100 for p in percents)  # seen mid-way, not only at the ends
    assert any(p["speed_bytes_per_sec"] > 0 and p["eta_seconds"] is not None for p in seen)

    # The dropped file was resumed from where it broke, not restarted.
    weights = hub.gets(repo_id, "model.safetensors")
    assert len(weights) == 2 and weights[0].range is None
    assert weights[1].range is not None and int(weights[1].range[6:].split("-")[0]) > 0
    for name in files.keys() - {"model.safetensors"}:
        assert len(hub.gets(repo_id, name)) == 1

    wait_until(lambda: events.of("download_completed", download_id=download_id), 10,
               what="download_completed event")
    updates = events.of("download_progress", download_id=download_id)
    assert len(updates) >= 2
    # Throttled: at most 4 a second (plus the one announcing the start).
    assert len(updates) <= 4 * (final["finished_at"] - final["started_at"]) + 2
    event_percents = [u["progress_percent"] for u in updates]
    assert event_percents == sorted(event_percents)

    # Again: everything is in the cache, nothing is fetched twice.
    again = finish(server, start(server, repo_id, cached=True))
    assert again["status"] == "completed" and again["bytes_reused"] == total
    assert len(hub.gets(repo_id, "model.safetensors")) == 2
    assert all(len(hub.gets(repo_id, name)) == 1 for name in files.keys() - {"model.safetensors"})

    row = {r["repo_id"]: r for r in server.http.get("/admin/models/available").json()}[repo_id]
    assert row["complete"] is True and row["source"] == "hub_cache"
    assert row["local_path"] == final["local_path"]


def test_cancel_stops_the_transfer_and_a_restart_fetches_only_what_is_missing(
        server: LMXServer, hub: FakeHub, events: EventReader) -> None:
    repo_id = unique_repo("cancel")
    big = safetensors_bytes(2_000_000, {"format": "mlx"})  # 8 MB
    hub.add_repo(repo_id, [HubFile("config.json", mlx_files()["config.json"]),
                           HubFile("model.safetensors", big, lfs=True),
                           HubFile("tokenizer.json", mlx_files()["tokenizer.json"])])
    hub.bytes_per_sec = 1_000_000
    try:
        download_id = start(server, repo_id)
        wait_until(lambda: progress(server, download_id)["bytes_downloaded"] > 1_000_000, 30,
                   interval=0.05, what="transfer under way")
        # The half-written snapshot is listed as incomplete, with its download.
        rows = {r["repo_id"]: r for r in server.http.get("/admin/models/available").json()}
        assert rows[repo_id]["complete"] is False
        assert rows[repo_id]["download_id"] == download_id
        cancel = server.http.delete(f"/admin/models/download/{download_id}")
        assert cancel.status_code == 200 and cancel.json()["success"] is True
        ended = finish(server, download_id, timeout=15)
    finally:
        hub.bytes_per_sec = None
    assert ended["status"] == "cancelled"
    assert ended["bytes_downloaded"] < len(big)
    # The transfer itself stopped: the hub saw the client hang up mid-file.
    wait_until(lambda: any(p.startswith(f"/{repo_id}/") and p.endswith("/model.safetensors")
                           for p in hub.aborted), 15, what="hub to see the transfer abort")
    failed = wait_until(lambda: events.of("download_failed", download_id=download_id), 10,
                        what="download_failed event")
    assert failed[0]["status"] == "cancelled"
    # Cancelling again is a conflict, not a second cancel.
    again = server.http.delete(f"/admin/models/download/{download_id}")
    assert again.status_code == 409 and again.json()["error"]["code"] == "download_finished"
    # No partial file is left behind, and the model is not listed as usable.
    cache = server.home / "hf-cache" / f"models--{repo_id.replace('/', '--')}"
    assert not list(cache.rglob("*.incomplete"))
    rows = {r["repo_id"]: r for r in server.http.get("/admin/models/available").json()}
    assert repo_id not in rows or rows[repo_id]["complete"] is False

    done = finish(server, start(server, repo_id))
    assert done["status"] == "completed"
    assert done["bytes_reused"] == len(mlx_files()["config.json"])  # config.json was kept
    assert len(hub.gets(repo_id, "config.json")) == 1
    assert len(hub.gets(repo_id, "model.safetensors")) == 2


def test_corrupted_file_fails_sha256_verification(
        server: LMXServer, hub: FakeHub, events: EventReader) -> None:
    repo_id = unique_repo("corrupt")
    hub.add_repo(repo_id, [HubFile(n, d, lfs=n.endswith(".safetensors"))
                           for n, d in mlx_files().items()])
    hub.corrupt.add("model.safetensors")
    try:
        ended = finish(server, start(server, repo_id))
    finally:
        hub.corrupt.discard("model.safetensors")
    assert ended["status"] == "failed"
    assert "model.safetensors" in ended["error"] and "sha256" in ended["error"]
    failed = wait_until(lambda: events.of("download_failed", download_id=ended["download_id"]),
                        10, what="download_failed event")
    assert "sha256" in failed[0]["reason"]
    snapshot = (server.home / "hf-cache" / f"models--{repo_id.replace('/', '--')}" /
                "snapshots" / ended["commit"])
    assert not (snapshot / "model.safetensors").exists()
    # Loading it is refused as incomplete, not attempted.
    resp = server.load(repo_id)
    assert resp.status_code == 409 and resp.json()["error"]["code"] == "model_incomplete"

    # A regular (non-LFS) file is checked against its git blob id.
    plain = unique_repo("corrupt-plain")
    hub.add_repo(plain, [HubFile(n, d) for n, d in mlx_files().items()])
    hub.corrupt.add("tokenizer.json")
    try:
        ended = finish(server, start(server, plain))
    finally:
        hub.corrupt.discard("tokenizer.json")
    assert ended["status"] == "failed"
    assert "tokenizer.json" in ended["error"] and "git blob id" in ended["error"]


def test_unknown_repo_and_bad_input(server: LMXServer) -> None:
    missing = server.http.post("/admin/models/download", json={"repo_id": "lmx-test/nope"})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model-not-found"
    bad = server.http.post("/admin/models/download", json={"repo_id": "../../etc"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "repo_id"
    escape = server.http.post("/admin/models/download",
                              json={"repo_id": "lmx-test/x", "revision": "../../../tmp/x"})
    assert escape.status_code == 400 and escape.json()["error"]["param"] == "revision"
    unknown = server.http.get("/admin/models/download/dl-000000000000/progress")
    assert unknown.status_code == 404


@contextlib.contextmanager
def tiny_disk(path: Path, size: str) -> Iterator[bool]:
    """A tmpfs of `size` at `path` when this process may mount one."""
    path.mkdir(parents=True)
    mounted = os.geteuid() == 0 and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True, check=False).returncode == 0
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(path)], check=False)


def test_not_enough_disk_is_507_before_any_byte(tmp_path: Path, hub: FakeHub) -> None:
    repo_id = unique_repo("toobig")
    weights = safetensors_bytes(750_000, {"format": "mlx"})  # 3 MB on a 1 MiB disk
    hub.add_repo(repo_id, [HubFile("config.json", mlx_files()["config.json"]),
                           HubFile("model.safetensors", weights, lfs=True)])
    cache = tmp_path / "small-disk"
    with tiny_disk(cache, "1m") as mounted:
        env = hub_env(hub, cache)
        if not mounted:  # not root: fake the free-space figure where the OS is asked
            env["LMX_TEST_FREE_BYTES"] = str(1024 * 1024)
        (tmp_path / "models").mkdir()
        lmx = LMXServer(tmp_path, base_config(tmp_path / "models"), env=env)
        try:
            lmx.wait_healthy()
            resp = lmx.http.post("/admin/models/download", json={"repo_id": repo_id})
            assert resp.status_code == 507, resp.text
            error = resp.json()["error"]
            needed = len(weights) + len(mlx_files()["config.json"])
            assert error["code"] == "storage-full" and f"needs {needed} bytes" in error["message"]
            # Refused before any file was requested or written.
            assert [r.method for r in hub.touched(repo_id)] == ["GET"]  # model_info only
            assert [p for p in cache.rglob("*") if p.is_file()] == []
        finally:
            lmx.stop()


def test_auto_download_load_then_serve_then_delete(
        server: LMXServer, hub: FakeHub, model_file: Path, events: EventReader) -> None:
    repo_id = unique_repo("smol-gguf")
    hub.add_repo(repo_id, [HubFile("README.md", b"# tiny\n"),
                           HubFile(model_file.name, path=model_file)])
    resp = server.load(repo_id, auto_download=True)
    assert resp.status_code == 202, resp.text
    body = resp.json()
    assert body["status"] == "downloading" and body["model_id"] == repo_id
    download_id = body["download_id"]

    server.wait_ready(repo_id, timeout=90)
    assert events.of("download_completed", download_id=download_id)
    assert events.of("model_loaded", model_id=repo_id)
    assert progress(server, download_id)["auto_load"]["status"] == "loaded"
    chat = server.openai().chat.completions.create(
        model=repo_id, messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    assert chat.model == repo_id and chat.choices[0].message.content is not None

    row = {r["repo_id"]: r for r in server.http.get("/admin/models/available").json()}[repo_id]
    assert row["loaded_as"] == [repo_id] and row["format"] == "gguf"
    busy = server.http.delete(f"/admin/models/{repo_id}")
    assert busy.status_code == 409 and busy.json()["error"]["code"] == "model_loaded"
    assert server.http.post("/admin/models/unload", json={"model_id": repo_id}).status_code == 200
    gone = server.http.delete(f"/admin/models/{repo_id}")
    assert gone.status_code == 200, gone.text
    assert gone.json()["freed_bytes"] == model_file.stat().st_size + len(b"# tiny\n")
    assert server.load(repo_id).status_code == 404


def test_shutdown_cancels_active_downloads(tmp_path: Path, hub: FakeHub) -> None:
    repo_id = unique_repo("shutdown")
    hub.add_repo(repo_id, [HubFile("model.safetensors",
                                   safetensors_bytes(2_000_000, {"format": "mlx"}), lfs=True)])
    cache = tmp_path / "hf-cache"
    # A partial file a killed process left an hour ago: swept when the repo downloads again.
    stale = cache / f"models--{repo_id.replace('/', '--')}" / "blobs" / "0a1b.5c6d7e8f.incomplete"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"x" * 1000)
    os.utime(stale, (stale.stat().st_atime - 3600, stale.stat().st_mtime - 3600))
    (tmp_path / "models").mkdir()
    lmx = LMXServer(tmp_path, base_config(tmp_path / "models"), env=hub_env(hub, cache))
    hub.bytes_per_sec = 1_000_000
    try:
        lmx.wait_healthy()
        download_id = start(lmx, repo_id)
        wait_until(lambda: progress(lmx, download_id)["bytes_downloaded"] > 0, 30,
                   interval=0.05, what="transfer under way")
        assert not stale.exists()
        assert lmx.stop() == 0  # SIGTERM: a clean exit, not a hang on the download thread
    finally:
        hub.bytes_per_sec = None
        lmx.stop()
    wait_until(lambda: any(p.startswith(f"/{repo_id}/") for p in hub.aborted), 15,
               what="hub to see the transfer abort")
    assert f"download {download_id} of {repo_id}: cancelled" in lmx.log()
    assert not list(cache.rglob("*.incomplete"))
