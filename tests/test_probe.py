"""`POST /admin/models/probe` and `lmx models probe` against a real server:
the bundled GGUF, its MLX conversion, MiniLM (an encoder), and files that
are not whole (truncated, a forged tensor count, a forged string length),
which are 422s naming what is wrong while the gateway keeps serving. No
worker is started by a probe; the memory guard's reasoning is checked with
a budget that fits one copy of the model but not two."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lmx_supervisor.memory.memory_estimate import estimate_model_memory
from tests.conftest import MODEL_ID, LMXServer, base_config
from tests.encoder_fixtures import minilm_dir

pytestmark = pytest.mark.timeout(240)

SLOTS = 2
CONTEXT = 2048


def _forged(path: Path, tensors: int, kv: int, payload: bytes = b"") -> Path:
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, tensors, kv) + payload + bytes(64))
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, model_file: Path, mlx_model_dir: Path
           ) -> Iterator[LMXServer]:
    root = tmp_path_factory.mktemp("probe")
    models = root / "models"
    models.mkdir()
    (models / model_file.name).symlink_to(model_file)
    (models / "copy.gguf").symlink_to(model_file)
    (models / "smol-mlx").symlink_to(mlx_model_dir)
    data = model_file.read_bytes()
    (models / "truncated.gguf").write_bytes(data[: len(data) // 2])
    _forged(models / "forged-tensors.gguf", tensors=2**62, kv=0)
    # One metadata entry whose key claims to be 2^60 bytes long.
    _forged(models / "forged-string.gguf", tensors=0, kv=1, payload=struct.pack("<Q", 2**60))
    _forged(models / "forged-kv.gguf", tensors=1, kv=2**40)
    # A metadata array (u32 items) claiming 2^61 entries; and an array of arrays.
    key = struct.pack("<Q", 1) + b"a"
    _forged(models / "forged-array.gguf", tensors=0, kv=1,
            payload=key + struct.pack("<IIQ", 9, 4, 2**61))
    _forged(models / "nested-array.gguf", tensors=0, kv=1,
            payload=key + struct.pack("<IIQ", 9, 9, 1))
    # Budget: one copy of the model fits under max_memory_percent, two do not.
    one = estimate_model_memory(model_file, CONTEXT * SLOTS).total_bytes
    cfg = base_config(models, parallel_slots=SLOTS)
    cfg["memory"] = {"budget_bytes": int(one * 1.5 / 0.9), "max_memory_percent": 90}
    srv = LMXServer(root, cfg)
    srv.wait_healthy()
    yield srv
    srv.stop()


def probe(server: LMXServer, model_id: str, **extra: Any) -> Any:
    return server.http.post("/admin/models/probe", json={"model_id": model_id, **extra},
                            timeout=120)


def test_bundled_gguf(server: LMXServer, model_file: Path) -> None:
    resp = probe(server, MODEL_ID)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["backend"] == "llama_cpp" and body["format"] == "gguf"
    assert body["architecture"] == "llama"
    assert 130_000_000 < body["parameter_count"] < 140_000_000  # SmolLM2-135M
    assert body["quantization"]["file_type"] == "Q4_1"
    assert body["quantization"]["tensor_types"]["Q4_1"] > 100
    assert body["size_bytes"] == model_file.stat().st_size
    assert body["max_context"] == 8192
    assert (body["context_length"], body["parallel_slots"]) == (CONTEXT, SLOTS)
    memory = body["memory_estimate"]
    assert memory["context_tokens"] == CONTEXT * SLOTS
    assert memory["weights_bytes"] == model_file.stat().st_size
    assert memory["kv_cache_bytes"] > 0
    assert body["chat_template"] is True
    # SmolLM2's template takes no tools: they reach it in a system prompt.
    assert body["tool_calls"] == {"format": "hermes", "template_takes_tools": False,
                                  "tools_via": "system_prompt"}
    assert body["capabilities"] == ["chat", "completions", "structured_output", "tools"]
    assert body["loaded"] is False
    assert body["fit"]["fits"] is True and body["fit"]["would_evict"] == []
    # Nothing was started.
    assert server.admin_models() == {}


def test_given_context_and_slots_scale_the_kv_estimate(server: LMXServer) -> None:
    base = probe(server, MODEL_ID).json()["memory_estimate"]
    bigger = probe(server, MODEL_ID, context_length=CONTEXT * 2, parallel_slots=SLOTS * 2)
    assert bigger.status_code == 200, bigger.text
    body = bigger.json()
    assert body["memory_estimate"]["kv_cache_bytes"] == 4 * base["kv_cache_bytes"]
    assert body["memory_estimate"]["weights_bytes"] == base["weights_bytes"]
    # 4x the KV no longer fits the budget, and evicting nothing helps.
    assert body["fit"]["fits"] is False
    assert "Not enough memory" in body["fit"]["reason"]
    bad = probe(server, MODEL_ID, parallel_slots=0)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "parallel_slots"


def test_kv_cache_type_shrinks_the_kv_estimate(server: LMXServer) -> None:
    f16 = probe(server, MODEL_ID).json()
    assert f16["kv_cache_type"] == "f16"
    for kind, ratio in (("q8_0", 34 / 64), ("q4_0", 18 / 64)):
        body = probe(server, MODEL_ID, kv_cache_type=kind).json()
        assert body["kv_cache_type"] == kind
        kv = body["memory_estimate"]["kv_cache_bytes"]
        assert abs(kv - f16["memory_estimate"]["kv_cache_bytes"] * ratio) <= 64, (kind, kv)
    mlx = probe(server, "smol-mlx", kv_cache_type="q8_0")
    assert mlx.status_code == 400, mlx.text
    assert mlx.json()["error"]["param"] == "kv_cache_type"


def test_converted_mlx_directory(server: LMXServer) -> None:
    resp = probe(server, "smol-mlx")
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["backend"] == "mlx" and body["format"] == "mlx"
    assert body["architecture"] == "LlamaForCausalLM"
    assert 130_000_000 < body["parameter_count"] < 140_000_000
    assert body["quantization"]["bits"] == 4
    assert body["max_context"] == 8192
    assert body["chat_template"] is True and body["tool_calls"]["format"] == "hermes"
    assert "tools" in body["capabilities"]
    assert body["memory_estimate"]["kv_cache_bytes"] > 0


def test_minilm_encoder(server: LMXServer) -> None:
    resp = probe(server, str(minilm_dir()))
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["backend"] == "mlx_encoder"
    assert body["architecture"] == "BertModel"
    assert 20_000_000 < body["parameter_count"] < 25_000_000  # MiniLM-L6: 22.7M
    assert body["max_context"] == 512
    assert body["chat_template"] is False and body["tool_calls"] is None
    assert body["capabilities"] == ["embeddings", "rerank"]


@pytest.mark.parametrize(("name", "words"), [
    ("truncated", "truncated"),
    ("forged-tensors", "tensor count"),
    ("forged-string", "string length"),
    ("forged-kv", "metadata entry count"),
    ("forged-array", "array length"),
    ("nested-array", "array of arrays"),
])
def test_bad_files_are_422_and_the_gateway_stays_healthy(server: LMXServer, name: str,
                                                         words: str) -> None:
    resp = probe(server, name)
    assert resp.status_code == 422, resp.text
    error = resp.json()["error"]
    assert error["code"] == "invalid_model_file" and error["param"] == "model_id"
    assert words in error["message"], error["message"]
    assert server.http.get("/healthz").status_code == 200
    assert probe(server, MODEL_ID).status_code == 200


def test_runbook_timeout_sec_is_accepted(server: LMXServer) -> None:
    resp = probe(server, MODEL_ID, timeout_sec=60)
    assert resp.status_code == 200, resp.text
    bad = probe(server, MODEL_ID, timeout_sec=0)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "timeout_sec"


def test_unknown_model_is_404(server: LMXServer) -> None:
    resp = probe(server, "no-such-model")
    assert resp.status_code == 404, resp.text


def test_fit_names_what_would_be_evicted(server: LMXServer) -> None:
    assert server.load(MODEL_ID).status_code == 200
    try:
        body = probe(server, "copy").json()
        fit = body["fit"]
        # Two copies exceed the budget; evicting the idle loaded one makes room.
        assert fit["fits"] is True, fit
        assert fit["would_evict"] == [MODEL_ID]
        assert "memory budget" in fit["basis"]
        # A dry run: the loaded model is still there.
        assert server.model_state(MODEL_ID) == "ready"
        assert probe(server, MODEL_ID).json()["loaded"] is True
    finally:
        server.http.post("/admin/models/unload", json={"model_id": MODEL_ID}, timeout=60)


def test_cli_probe(server: LMXServer) -> None:
    cmd = [sys.executable, "-m", "lmx_gateway", "models", "probe", MODEL_ID, "--url", server.url]
    done = subprocess.run([*cmd, "--json"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["quantization"]["file_type"] == "Q4_1"
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Q4_1" in done.stdout and "hermes" in done.stdout and "fits now" in done.stdout
    bad = subprocess.run([sys.executable, "-m", "lmx_gateway", "models", "probe",
                          "forged-tensors", "--url", server.url],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1
    assert "422" in bad.stderr and "tensor count" in bad.stderr


