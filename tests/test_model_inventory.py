"""Models on disk: the inventory (GGUF files, MLX directories, hub-cache
snapshots; incomplete ones flagged and refused at load) and deletion (409
while loaded, traversal and symlinks out refused, bytes freed)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from huggingface_hub import hf_hub_download

from tests.conftest import MODEL_ID, LMXServer
from tests.fake_hub import FakeHub, HubFile
from tests.model_fixtures import mlx_files, sharded_dir_missing_shard, write_files

pytestmark = pytest.mark.timeout(120)

HUB_REPO = "tiny-org/tiny-mlx"


def _hub_snapshot(cache: Path) -> str:
    """Put a real snapshot in a hub cache with huggingface_hub itself, from a
    loopback hub; returns its commit."""
    hub = FakeHub().start()
    try:
        repo = hub.add_repo(HUB_REPO, [HubFile(name, data, lfs=name.endswith(".safetensors"))
                                       for name, data in mlx_files().items()])
        for name in mlx_files():
            hf_hub_download(HUB_REPO, name, cache_dir=cache, endpoint=hub.url)
        return repo.commit
    finally:
        hub.stop()


def _rows(server: LMXServer) -> dict[str, dict[str, Any]]:
    resp = server.http.get("/admin/models/available")
    assert resp.status_code == 200, resp.text
    rows = resp.json()
    assert isinstance(rows, list)
    return {row["repo_id"]: row for row in rows}


def _delete(server: LMXServer, model_id: str) -> Any:
    return server.http.delete(f"/admin/models/{model_id}")


def test_inventory_and_delete(start_server: Any, models_dir: Path, model_file: Path,
                              tmp_path: Path) -> None:
    cache = tmp_path / "hf-cache"
    commit = _hub_snapshot(cache)
    write_files(models_dir / "mlx-community" / "Tiny-4bit", mlx_files())
    sharded_dir_missing_shard(models_dir / "broken-hf")
    with model_file.open("rb") as src:  # header whole, tensor data cut off
        (models_dir / "truncated.gguf").write_bytes(src.read(2_000_000))
    shutil.copyfile(model_file, models_dir / "smol-copy.gguf")
    outside = tmp_path / "outside"
    write_files(outside, mlx_files())
    (models_dir / "escape").symlink_to(outside, target_is_directory=True)

    server: LMXServer = start_server(env={"HF_HUB_CACHE": str(cache)})
    server.wait_healthy()
    rows = _rows(server)

    smol = rows[MODEL_ID]
    assert smol["format"] == "gguf" and smol["backend"] == "llama_cpp"
    assert smol["complete"] is True and smol["size_bytes"] == model_file.stat().st_size
    assert smol["loaded"] is False and smol["source"] == "models_directory"

    mlx = rows["mlx-community/Tiny-4bit"]
    assert (mlx["format"], mlx["backend"], mlx["complete"]) == ("mlx", "mlx", True)
    assert mlx["size_bytes"] == sum(len(d) for d in mlx_files().values())
    assert mlx["backend_available"] is True  # mlx and mlx-lm are installed here

    broken = rows["broken-hf"]
    assert broken["format"] == "hf" and broken["complete"] is False
    assert any("model-00002-of-00002.safetensors" in p for p in broken["problems"])
    assert any("tokenizer" in p for p in broken["problems"])

    truncated = rows["truncated"]
    assert truncated["format"] == "gguf" and truncated["complete"] is False
    assert "truncated" in truncated["problems"][0]

    hub = rows[HUB_REPO]
    assert hub["source"] == "hub_cache" and hub["revision"] == commit
    assert hub["refs"] == ["main"] and hub["complete"] is True and hub["format"] == "mlx"
    assert Path(hub["local_path"]).is_relative_to(cache)

    # Incomplete models are refused before any worker starts.
    for model_id in ("truncated", "broken-hf"):
        resp = server.load(model_id)
        assert resp.status_code == 409, resp.text
        assert resp.json()["error"]["code"] == "model_incomplete"
    # Complete MLX models (on disk or in the hub cache by repo id) resolve to
    # the MLX backend; these tiny fakes hold no real model, so its worker
    # reports the load failure.
    for model_id in ("mlx-community/Tiny-4bit", HUB_REPO):
        resp = server.load(model_id)
        assert resp.status_code == 409, resp.text
        assert resp.json()["error"]["code"] == "model_loader_crashed"
        assert "ModelArgs" in resp.json()["error"]["message"]

    # --- delete ---------------------------------------------------------------------
    assert server.load("smol-copy").status_code == 200
    assert _rows(server)["smol-copy"]["loaded_as"] == ["smol-copy"]
    busy = _delete(server, "smol-copy")
    assert busy.status_code == 409 and busy.json()["error"]["code"] == "model_loaded"
    assert (models_dir / "smol-copy.gguf").exists()
    assert server.http.post("/admin/models/unload",
                            json={"model_id": "smol-copy"}).status_code == 200
    gone = _delete(server, "smol-copy")
    assert gone.status_code == 200, gone.text
    assert gone.json() == {**gone.json(), "success": True, "model_id": "smol-copy",
                           "freed_bytes": model_file.stat().st_size}
    assert not (models_dir / "smol-copy.gguf").exists()

    for bad in ("%2E%2E/outside", "escape", MODEL_ID, "mlx-community/..%2F..%2Foutside",
                "%2Fetc%2Fpasswd"):
        resp = _delete(server, bad)
        assert resp.status_code == 400, (bad, resp.text)
        assert resp.json()["error"]["param"] == "model_id"
    assert model_file.exists() and (outside / "config.json").exists()
    assert os.path.islink(models_dir / "escape")

    missing = _delete(server, "no-such/model")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model-not-found"

    freed = _delete(server, "mlx-community/Tiny-4bit")
    assert freed.status_code == 200 and freed.json()["freed_bytes"] == mlx["size_bytes"]
    assert not (models_dir / "mlx-community" / "Tiny-4bit").exists()

    cached = _delete(server, HUB_REPO)
    assert cached.status_code == 200, cached.text
    assert cached.json()["freed_bytes"] == sum(len(d) for d in mlx_files().values())
    assert not (cache / "models--tiny-org--tiny-mlx").exists()

    after = _rows(server)
    assert {"smol-copy", "mlx-community/Tiny-4bit", HUB_REPO}.isdisjoint(after)
    assert {MODEL_ID, "truncated", "broken-hf"} <= set(after)
