"""Performance settings on a real server with real llama.cpp workers: a
load's `performance_overrides` are validated (a bad key or value is a 400
naming it) and applied (KV-cache type, threads, batch, flash attention,
slots: visible in /admin/models and in the memory estimate); a model's
profile in ~/.opta-lmx/profiles/ applies to every load and overrides win
over it; autotune with a small budget measures in throwaway workers,
writes the profile, and the next load uses it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import MODEL_ID, LMXServer, base_config, wait_until
from tests.event_reader import EventReader

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


def wait_autotune(server: LMXServer, job_id: str) -> dict[str, Any]:
    def ended() -> dict[str, Any] | None:
        snap: dict[str, Any] = server.http.get(f"/admin/models/autotune/{job_id}").json()
        return snap if snap["status"] != "running" else None
    result: dict[str, Any] = wait_until(ended, 360, interval=0.5, what=f"autotune {job_id}")
    return result


def test_autotune_writes_a_profile_that_the_next_load_uses(server: LMXServer) -> None:
    events = EventReader(server.url)
    try:
        resp = server.http.post("/admin/models/autotune", json={
            "model_id": MODEL_ID, "objective": "throughput", "budget_sec": 15}, timeout=60)
        assert resp.status_code == 202, resp.text
        job = resp.json()
        busy = server.http.post("/admin/models/autotune", json={"model_id": MODEL_ID})
        assert busy.status_code == 409 and busy.json()["error"]["code"] == "autotune_busy"
        final = wait_autotune(server, job["job_id"])
        assert final["status"] == "completed", final
        wait_until(lambda: events.of("autotune_completed", job_id=job["job_id"]), 15)
        assert events.of("autotune_progress", job_id=job["job_id"])
    finally:
        events.close()
    trials = final["trials"]
    assert trials and all(t["error"] is None for t in trials), trials
    assert all(t["single"]["tokens"] == 32 for t in trials)  # ignore_eos: exactly N tokens
    assert trials[0]["concurrent"]["streams"] == 2  # the configured slots, measured at 2
    assert final["best"]["score"] > 0
    # The throwaway workers are gone and were never listed.
    assert server.admin_models() == {}
    path = Path(final["profile_path"])
    assert path == server.home / "profiles" / f"{MODEL_ID}.yaml"
    stored = yaml.safe_load(path.read_text())
    assert stored["objective"] == "throughput" and stored["measurements"] == trials
    settings = stored["settings"]
    assert settings == final["best"]["profile_settings"]
    assert {"parallel_slots", "n_threads", "flash_attn", "kv_cache_type"} <= set(settings)

    assert server.load(MODEL_ID).status_code == 200
    try:
        perf = server.admin_models()[MODEL_ID]["performance"]
        for key, value in settings.items():
            assert perf[key] == value and perf["sources"][key] == "profile", key
        assert chat(server)
        shown = server.http.get(f"/admin/models/{MODEL_ID}/performance").json()
        assert shown["profile"]["measurements"] == trials
        assert shown["loaded"]["sources"] == perf["sources"]
    finally:
        unload(server)
    resp = server.load(MODEL_ID, performance_overrides={"parallel_slots": 1,
                                                        "kv_cache_type": "q8_0"})
    assert resp.status_code == 200, resp.text
    try:
        perf = server.admin_models()[MODEL_ID]["performance"]
        assert (perf["parallel_slots"], perf["kv_cache_type"]) == (1, "q8_0")
        assert perf["sources"]["parallel_slots"] == perf["sources"]["kv_cache_type"] == "override"
        if settings["flash_attn"] is False:  # the profile's value gives way to the override
            assert perf["flash_attn"] is True
            assert perf["sources"]["flash_attn"] == "implied by kv_cache_type"
        assert chat(server)
    finally:
        unload(server)


def _worker_processes(server: LMXServer) -> int:
    import psutil

    return sum(1 for p in psutil.Process(server.proc.pid).children(recursive=True)
               if "lmx_worker" in " ".join(p.cmdline()))


def test_autotune_cancel_stops_its_worker_and_writes_no_profile(server: LMXServer) -> None:
    events = EventReader(server.url)
    baseline = _worker_processes(server)
    try:
        resp = server.http.post("/admin/models/autotune", json={
            "model_id": MODEL_ID, "budget_sec": 3600}, timeout=60)
        assert resp.status_code == 202, resp.text
        job_id = resp.json()["job_id"]
        # Cancel while a trial's throwaway worker is up.
        wait_until(lambda: _worker_processes(server) > baseline, 60, interval=0.1,
                   what="the first trial's worker")
        cancelled = server.http.delete(f"/admin/models/autotune/{job_id}", timeout=60)
        assert cancelled.status_code == 200, cancelled.text
        body = cancelled.json()
        assert body["success"] is True and body["status"] == "cancelled", body
        assert body["profile_path"] is None and body["finished_at"] is not None
        wait_until(lambda: _worker_processes(server) == baseline, 30, interval=0.2,
                   what="the throwaway worker's exit")
        assert server.http.get(f"/admin/models/autotune/{job_id}").json()["status"] == \
            "cancelled"
        wait_until(lambda: events.of("autotune_cancelled", job_id=job_id), 15)
    finally:
        events.close()
    again = server.http.delete(f"/admin/models/autotune/{job_id}")
    assert again.status_code == 409 and again.json()["error"]["code"] == "autotune_finished"
    unknown = server.http.delete("/admin/models/autotune/tune-000000000000")
    assert unknown.status_code == 404
    assert unknown.json()["error"]["code"] == "autotune_job_not_found"
    # The next job may start: the cancelled one no longer holds the CPU.
    resp = server.http.post("/admin/models/autotune", json={
        "model_id": MODEL_ID, "budget_sec": 2, "max_tokens": 2}, timeout=60)
    assert resp.status_code == 202, resp.text
    assert wait_autotune(server, resp.json()["job_id"])["status"] == "completed"


def test_autotune_takes_the_runbook_request_shape(server: LMXServer) -> None:
    resp = server.http.post("/admin/models/autotune", json={
        "model_id": MODEL_ID, "prompt": "Write a Python function to sort a list.",
        "max_tokens": 8, "runs": 2, "budget_sec": 1}, timeout=60)
    assert resp.status_code == 202, resp.text
    final = wait_autotune(server, resp.json()["job_id"])
    assert final["status"] == "completed", final
    assert (final["max_tokens"], final["runs"]) == (8, 2)
    assert len(final["trials"]) == 1  # the budget is spent after the baseline
    assert final["trials"][0]["single"]["tokens"] == 8
    bad = server.http.post("/admin/models/autotune", json={"model_id": MODEL_ID, "runs": 0})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "runs"


def test_cli_autotune(server: LMXServer) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "lmx_gateway", "models", "autotune", MODEL_ID, "--objective",
         "latency", "--budget-sec", "5", "--url", server.url],
        capture_output=True, text=True, timeout=360)
    assert done.returncode == 0, done.stderr
    assert "Best for latency" in done.stdout and "Profile:" in done.stdout
    unknown = subprocess.run(
        [sys.executable, "-m", "lmx_gateway", "models", "autotune", "nope", "--url", server.url],
        capture_output=True, text=True, timeout=60)
    assert unknown.returncode == 1 and "404" in unknown.stderr


def test_variants_on_disk_are_found_by_name_and_lineage(tmp_path: Path, model_file: Path
                                                        ) -> None:
    from lmx_supervisor.models.lineage import write_lineage
    from lmx_supervisor.models.model_resolver import resolve_model
    from lmx_supervisor.tuning.autotune import variants_on_disk

    # Separate files (a symlink would resolve to the one source file).
    for name in ("SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct.Q8_0.gguf",
                 "renamed-copy.gguf", "unrelated.gguf"):
        try:
            os.link(model_file, tmp_path / name)
        except OSError:  # another filesystem
            shutil.copyfile(model_file, tmp_path / name)
    write_lineage(tmp_path / "renamed-copy.gguf", {"source": MODEL_ID, "type": "Q4_0"})
    resolved = resolve_model(MODEL_ID, tmp_path)
    found = [stem for stem, _path in variants_on_disk(resolved, tmp_path)]
    assert found == ["SmolLM2-135M-Instruct.Q8_0", "renamed-copy"]
