"""Performance settings on a real server with real llama.cpp workers: a
load's `performance_overrides` are validated (a bad key or value is a 400
naming it) and applied (KV-cache type, threads, batch, flash attention,
slots: visible in /admin/models and in the memory estimate); a model's
profile in ~/.opta-lmx/profiles/ applies to every load and overrides win
over it; autotune with a small budget measures in throwaway workers,
writes the profile, and the next load uses it."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import MODEL_ID, LMXServer, base_config, wait_until
from tests.model_fixtures import EventReader

pytestmark = pytest.mark.timeout(400)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, model_file: Path) -> Iterator[LMXServer]:
    root = tmp_path_factory.mktemp("performance")
    models = root / "models"
    models.mkdir()
    (models / model_file.name).symlink_to(model_file)
    cfg = base_config(models, parallel_slots=2)
    cfg["server"] = {"sse_heartbeat_interval_sec": 0.5}
    srv = LMXServer(root, cfg)
    srv.wait_healthy()
    yield srv
    srv.stop()


def unload(server: LMXServer, model_id: str = MODEL_ID) -> None:
    server.http.post("/admin/models/unload", json={"model_id": model_id}, timeout=60)


def chat(server: LMXServer, model_id: str = MODEL_ID) -> str:
    reply = server.openai().chat.completions.create(
        model=model_id, messages=[{"role": "user", "content": "Say hello."}], max_tokens=8,
        temperature=0)
    return reply.choices[0].message.content or ""


def kv_estimate(server: LMXServer, model_id: str = MODEL_ID) -> int:
    estimate = server.http.get("/admin/memory").json()["models"][model_id]["estimate"]
    return int(estimate["kv_cache_bytes"])


@pytest.mark.parametrize(("overrides", "param"), [
    ({"n_thread": 2}, "performance_overrides.n_thread"),
    ({"n_threads": "two"}, "performance_overrides.n_threads"),
    ({"kv_cache_type": "q3_k"}, "performance_overrides.kv_cache_type"),
    ({"parallel_slots": 0}, "performance_overrides.parallel_slots"),
    ({"kv_cache_type": "q8_0", "flash_attn": False}, "performance_overrides.kv_cache_type"),
])
def test_bad_override_is_400_naming_the_key(server: LMXServer, overrides: dict[str, Any],
                                            param: str) -> None:
    resp = server.load(MODEL_ID, performance_overrides=overrides)
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == param, resp.json()
    assert MODEL_ID not in server.admin_models()


@pytest.mark.parametrize("kv", ["q8_0", "q4_0"])
def test_quantized_kv_cache_loads_serves_and_shrinks_the_estimate(server: LMXServer,
                                                                  kv: str) -> None:
    assert server.load(MODEL_ID).status_code == 200
    f16 = kv_estimate(server)
    unload(server)
    resp = server.load(MODEL_ID, performance_overrides={"kv_cache_type": kv,
                                                        "n_threads_batch": 1, "n_batch": 256})
    assert resp.status_code == 200, resp.text
    try:
        perf = server.admin_models()[MODEL_ID]["performance"]
        assert perf["kv_cache_type"] == kv and perf["n_batch"] == 256
        assert perf["n_threads_batch"] == 1
        assert perf["sources"] == {"kv_cache_type": "override", "n_threads_batch": "override",
                                   "n_batch": "override"}
        assert chat(server)
        ratio = {"q8_0": 34 / 64, "q4_0": 18 / 64}[kv]
        assert abs(kv_estimate(server) - f16 * ratio) <= 64
    finally:
        unload(server)


def test_profile_applies_and_overrides_win(server: LMXServer) -> None:
    profiles = server.home / "profiles"
    profiles.mkdir(exist_ok=True)
    path = profiles / f"{MODEL_ID}.yaml"
    path.write_text(yaml.safe_dump({"model_id": MODEL_ID, "settings": {
        "parallel_slots": 3, "n_threads": 1, "flash_attn": True}}))
    try:
        assert server.load(MODEL_ID).status_code == 200
        perf = server.admin_models()[MODEL_ID]["performance"]
        assert (perf["parallel_slots"], perf["n_threads"], perf["flash_attn"]) == (3, 1, True)
        assert perf["sources"] == {"parallel_slots": "profile", "n_threads": "profile",
                                   "flash_attn": "profile"}
        assert chat(server)
        unload(server)
        resp = server.load(MODEL_ID, performance_overrides={"parallel_slots": 1})
        assert resp.status_code == 200, resp.text
        perf = server.admin_models()[MODEL_ID]["performance"]
        assert perf["parallel_slots"] == 1 and perf["sources"]["parallel_slots"] == "override"
        assert perf["n_threads"] == 1 and perf["sources"]["n_threads"] == "profile"
        shown = server.http.get(f"/admin/models/{MODEL_ID}/performance").json()
        assert shown["profile"]["settings"] == {"parallel_slots": 3, "n_threads": 1,
                                                "flash_attn": True}
    finally:
        unload(server)
        path.unlink()
    # A broken profile is ignored (logged), never fatal.
    path.write_text("settings: [not, a, mapping")
    try:
        assert server.load(MODEL_ID).status_code == 200
        assert server.admin_models()[MODEL_ID]["performance"]["sources"] == {}
    finally:
        unload(server)
        path.unlink()
