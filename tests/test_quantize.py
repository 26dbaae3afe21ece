"""Quantize jobs against a real server and real llama.cpp: the bundled Q4_1
model requantized to Q8_0 loads, serves, and predicts what the source
predicts (teacher-forced top-1, the conversion tests' tolerance); the copy
is listed with its lineage; `lmx models quantize` shows a bar; a cancel
leaves no partial file; a quantizer killed with SIGKILL is a failed job
while the gateway keeps serving; no disk space is a 507 before anything is
written. Slow jobs for cancel/kill come from LMX_QUANTIZE_TENSOR_DELAY_MS
(per tensor, inside llama.cpp's own quantize loop)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np
import pytest

from tests.conftest import MODEL_ID, LMXServer, base_config, wait_until
from tests.event_reader import EventReader

pytestmark = pytest.mark.timeout(300)

Q8_ID = "SmolLM2-135M-Instruct.Q8_0"
PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.",
           "List three prime numbers.", "Name a famous painter and one of their works."]
GREEDY_TOKENS = 16


def _server(root: Path, model_file: Path, env: dict[str, str] | None = None) -> LMXServer:
    models = root / "models"
    models.mkdir()
    (models / model_file.name).symlink_to(model_file)
    data = model_file.read_bytes()
    (models / "truncated.gguf").write_bytes(data[: len(data) // 3])
    cfg = base_config(models, parallel_slots=1)
    cfg["server"] = {"sse_heartbeat_interval_sec": 0.5}
    srv = LMXServer(root, cfg, env)
    srv.wait_healthy()
    return srv


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, model_file: Path) -> Iterator[LMXServer]:
    srv = _server(tmp_path_factory.mktemp("quantize"), model_file)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def slow_server(tmp_path_factory: pytest.TempPathFactory, model_file: Path
                ) -> Iterator[LMXServer]:
    # 272 tensors x 100 ms: a job runs ~30 s unless stopped.
    srv = _server(tmp_path_factory.mktemp("quantize-slow"), model_file,
                  {"LMX_QUANTIZE_TENSOR_DELAY_MS": "100"})
    yield srv
    srv.stop()


def start_job(server: LMXServer, **body: Any) -> Any:
    return server.http.post("/admin/quantize", json=body, timeout=120)


def wait_job(server: LMXServer, job_id: str, timeout: float = 240) -> dict[str, Any]:
    def ended() -> dict[str, Any] | None:
        snap: dict[str, Any] = server.http.get(f"/admin/quantize/{job_id}").json()
        return snap if snap["status"] != "running" else None
    result: dict[str, Any] = wait_until(ended, timeout, interval=0.2, what=f"job {job_id}")
    return result


def models_dir(server: LMXServer) -> Path:
    return server.home / "models"


def leftovers(server: LMXServer) -> list[str]:
    return sorted(p.name for p in models_dir(server).iterdir() if ".partial" in p.name)


def teacher_forced_agreement(source: Path, other: Path) -> tuple[int, int]:
    """Greedy tokens of `source`, fed to both; how often their argmax agrees
    at the positions that predicted them (as tests/test_gguf_convert.py)."""
    kw: dict[str, Any] = {"logits_all": True, "n_ctx": 512, "n_threads": 1, "verbose": False}
    ref, cmp = llama_cpp.Llama(model_path=str(source), **kw), llama_cpp.Llama(
        model_path=str(other), **kw)
    agree = total = 0
    try:
        for question in PROMPTS:
            text = f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
            prompt = ref.tokenize(text.encode(), add_bos=False, special=True)
            ref.reset()
            ref.eval(prompt)
            generated: list[int] = []
            while len(generated) < GREEDY_TOKENS:
                token = int(np.argmax(ref.scores[ref.n_tokens - 1]))
                if token == ref.token_eos():
                    break
                generated.append(token)
                ref.eval([token])
            sequence = prompt + generated
            cmp.reset()
            cmp.eval(sequence)
            for row in range(len(prompt) - 1, len(sequence) - 1):
                agree += int(np.argmax(ref.scores[row]) == np.argmax(cmp.scores[row]))
                total += 1
    finally:
        ref.close()
        cmp.close()
    return agree, total


def test_q4_1_to_q8_0_loads_serves_and_agrees(server: LMXServer, model_file: Path) -> None:
    events = EventReader(server.url)
    try:
        resp = start_job(server, source=MODEL_ID, type="q8_0")
        assert resp.status_code == 202, resp.text
        job = resp.json()
        assert job["status"] == "running" and job["type"] == "Q8_0"
        assert job["output"].endswith(f"{Q8_ID}.gguf")
        final = wait_job(server, job["job_id"])
        assert final["status"] == "completed", final
        assert final["result"]["requantized"] is True  # from Q4_1: said so
        assert "requantized" in final["result"]["note"]
        wait_until(lambda: events.of("quantize_completed", job_id=job["job_id"]), 15)
        progress = events.of("quantize_progress", job_id=job["job_id"])
        assert progress and progress[-1]["done"] == progress[-1]["total"] == 272
    finally:
        events.close()
    output = Path(final["output"])
    assert output.is_file() and leftovers(server) == []

    rows = {r["repo_id"]: r for r in server.http.get("/admin/models/available").json()}
    lineage = rows[Q8_ID]["lineage"]
    assert lineage["source"] == MODEL_ID and lineage["type"] == "Q8_0"
    assert lineage["requantized"] is True and lineage["created_at"]
    assert lineage["source_quantization"]["file_type"] == "Q4_1"
    assert rows[MODEL_ID]["lineage"] is None
    probe = server.http.post("/admin/models/probe", json={"model_id": Q8_ID}, timeout=60).json()
    assert probe["quantization"]["file_type"] == "Q8_0"

    agree, total = teacher_forced_agreement(model_file, output)
    assert total >= 40 and agree / total >= 0.9, (agree, total)

    assert server.load(Q8_ID).status_code == 200
    try:
        reply = server.openai().chat.completions.create(
            model=Q8_ID, messages=[{"role": "user", "content": "Say hello."}], max_tokens=8,
            temperature=0)
        assert reply.choices[0].message.content
        assert reply.model == Q8_ID
    finally:
        server.http.post("/admin/models/unload", json={"model_id": Q8_ID}, timeout=60)


def test_bad_requests(server: LMXServer) -> None:
    bad_type = start_job(server, source=MODEL_ID, type="Q9_9")
    assert bad_type.status_code == 400 and bad_type.json()["error"]["param"] == "type"
    bad_name = start_job(server, source=MODEL_ID, type="Q8_0", output="../escape")
    assert bad_name.status_code == 400 and bad_name.json()["error"]["param"] == "output"
    (models_dir(server) / "taken.gguf").write_bytes(b"x")
    taken = start_job(server, source=MODEL_ID, type="Q8_0", output="taken")
    assert taken.status_code == 409 and taken.json()["error"]["code"] == "output_exists"
    truncated = start_job(server, source="truncated", type="Q8_0")
    assert truncated.status_code == 422, truncated.text
    assert "truncated" in truncated.json()["error"]["message"]
    missing = start_job(server, source="nope", type="Q8_0")
    assert missing.status_code == 404
    unknown = server.http.get("/admin/quantize/q-doesnotexist")
    assert unknown.status_code == 404
    assert leftovers(server) == []


def test_cli_quantize_with_progress_bar(server: LMXServer) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "lmx_gateway", "models", "quantize", MODEL_ID, "--type", "Q4_0",
         "--output", "cli-q4", "--url", server.url],
        capture_output=True, text=True, timeout=240, env={**os.environ, "COLUMNS": "120"})
    assert done.returncode == 0, done.stderr
    assert "Quantized:" in done.stdout and "cli-q4" in done.stdout
    assert "100%" in done.stderr  # the bar reached its end
    assert (models_dir(server) / "cli-q4.gguf").is_file()
    bad = subprocess.run(
        [sys.executable, "-m", "lmx_gateway", "models", "quantize", MODEL_ID, "--type", "Q9",
         "--url", server.url], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "400" in bad.stderr


def _running_job(server: LMXServer, output: str) -> dict[str, Any]:
    resp = start_job(server, source=MODEL_ID, type="Q8_0", output=output)
    assert resp.status_code == 202, resp.text
    job_id = resp.json()["job_id"]

    def started() -> dict[str, Any] | None:
        snap: dict[str, Any] = server.http.get(f"/admin/quantize/{job_id}").json()
        return snap if snap["done"] >= 3 else None
    job: dict[str, Any] = wait_until(started, 60, interval=0.1, what="quantizing started")
    return job


def test_cancel_removes_the_partial_output(slow_server: LMXServer) -> None:
    job = _running_job(slow_server, "to-cancel")
    assert job["status"] == "running"
    assert leftovers(slow_server), "the job writes a partial file while it runs"
    busy = start_job(slow_server, source=MODEL_ID, type="Q4_0", output="second")
    assert busy.status_code == 429 and busy.json()["error"]["code"] == "quantize_busy"
    resp = slow_server.http.request("DELETE", f"/admin/quantize/{job['job_id']}", timeout=60)
    assert resp.status_code == 200, resp.text
    assert resp.json()["status"] == "cancelled"
    assert leftovers(slow_server) == []
    assert not (models_dir(slow_server) / "to-cancel.gguf").exists()
    again = slow_server.http.request("DELETE", f"/admin/quantize/{job['job_id']}")
    assert again.status_code == 409
    names = [r["repo_id"] for r in slow_server.http.get("/admin/models/available").json()]
    assert "to-cancel" not in names


def test_sigkill_of_the_quantizer_is_a_failed_job(slow_server: LMXServer) -> None:
    job = _running_job(slow_server, "to-kill")
    os.kill(job["pid"], signal.SIGKILL)
    final = wait_job(slow_server, job["job_id"], timeout=60)
    assert final["status"] == "failed"
    assert "SIGKILL" in final["error"]
    assert leftovers(slow_server) == []
    assert not (models_dir(slow_server) / "to-kill.gguf").exists()
    assert slow_server.http.get("/healthz").status_code == 200
    # The next job may start: the killed one no longer counts as running.
    listing = slow_server.http.get("/admin/quantize").json()
    assert all(j["status"] != "running" for j in listing["jobs"])


def test_no_disk_space_is_507_before_writing(tmp_path: Path, model_file: Path) -> None:
    srv = _server(tmp_path, model_file, {"LMX_TEST_FREE_BYTES": "1000000"})
    try:
        resp = start_job(srv, source=MODEL_ID, type="Q8_0")
        assert resp.status_code == 507, resp.text
        assert resp.json()["error"]["code"] == "storage-full"
        assert sorted(p.name for p in models_dir(srv).iterdir()) == sorted(
            [model_file.name, "truncated.gguf"])
    finally:
        srv.stop()




def test_mlx_to_mlx_q8(server: LMXServer, mlx_model_dir: Path) -> None:
    resp = start_job(server, source=str(mlx_model_dir), type="q8", group_size=64)
    assert resp.status_code == 202, resp.text
    final = wait_job(server, resp.json()["job_id"])
    assert final["status"] == "completed", final
    assert final["result"]["requantized"] is True  # the source is 4-bit
    output = Path(final["output"])
    assert output.name == "SmolLM2-135M-Instruct-mlx-q8" and output.is_dir()
    assert leftovers(server) == []
    rows = {r["repo_id"]: r for r in server.http.get("/admin/models/available").json()}
    row = rows[output.name]
    assert row["complete"] is True and row["format"] == "mlx"
    assert row["lineage"]["type"] == "Q8" and row["lineage"]["group_size"] == 64
    probe = server.http.post("/admin/models/probe", json={"model_id": output.name},
                             timeout=60).json()
    assert probe["quantization"]["bits"] == 8 and probe["quantization"]["group_size"] == 64
    assert 130_000_000 < probe["parameter_count"] < 140_000_000
    assert server.load(output.name).status_code == 200
    try:
        reply = server.openai().chat.completions.create(
            model=output.name, messages=[{"role": "user", "content": "Say hello."}],
            max_tokens=8, temperature=0)
        assert reply.choices[0].message.content
    finally:
        server.http.post("/admin/models/unload", json={"model_id": output.name}, timeout=60)
    bad = start_job(server, source=str(mlx_model_dir), type="Q8_0")
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "type"


def test_runbook_request_shape(server: LMXServer) -> None:
    both = start_job(server, source=MODEL_ID, source_model=MODEL_ID, type="Q8_0")
    assert both.status_code == 400 and both.json()["error"]["param"] == "source"
    neither = start_job(server, source_model=MODEL_ID)
    assert neither.status_code == 400 and neither.json()["error"]["param"] == "type"
    resp = start_job(server, source_model=MODEL_ID, bits=8, output="by-bits")
    assert resp.status_code == 202, resp.text
    assert resp.json()["type"] == "Q8_0"
    final = wait_job(server, resp.json()["job_id"])
    assert final["status"] == "completed", final
    assert (models_dir(server) / "by-bits.gguf").is_file()
