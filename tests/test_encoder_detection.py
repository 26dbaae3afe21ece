"""Which backend a model on disk gets: embedding and rerank models are told
apart from chat models by their files, and the encoders this build cannot
run are refused by name (422) before any worker starts. In-process: the
resolver reads files only."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from lmx_gateway.http.errors import status_of
from lmx_supervisor.errors import UnsupportedModel
from lmx_supervisor.models.model_resolver import resolve_model
from tests.model_fixtures import safetensors_bytes, write_files

pytestmark = pytest.mark.timeout(60)


def hf_dir(root: Path, name: str, config: dict[str, Any], sentence: bool = False) -> Path:
    files = {"config.json": json.dumps(config).encode(),
             "model.safetensors": safetensors_bytes(16),
             "tokenizer.json": b"{}"}
    if sentence:
        files["modules.json"] = json.dumps([
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling",
             "type": "sentence_transformers.models.Pooling"}]).encode()
    return write_files(root / name, files)


@pytest.mark.parametrize(("config", "sentence", "backend"), [
    ({"model_type": "bert", "architectures": ["BertModel"]}, False, "mlx_encoder"),
    ({"model_type": "bert", "architectures": ["BertModel"]}, True, "mlx_encoder"),
    ({"model_type": "bert", "architectures": ["BertForSequenceClassification"]}, False,
     "mlx_encoder"),
    ({"model_type": "bert", "architectures": ["BertForMaskedLM"]}, True, "mlx_encoder"),
    ({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}, False, "mlx"),
], ids=["bert", "sentence-bert", "cross-encoder", "masked-lm-sentence", "chat"])
def test_hf_backend(tmp_path: Path, config: dict[str, Any], sentence: bool,
                    backend: str) -> None:
    path = hf_dir(tmp_path, "m", config, sentence)
    try:
        resolved = resolve_model(str(path), tmp_path)
    except UnsupportedModel as exc:  # a build without MLX (chat) support
        assert backend == "mlx" and "not available" in exc.message
        return
    assert resolved.backend == backend
    if backend == "mlx_encoder":  # "mlx" names the encoder backend for such a model
        assert resolve_model(str(path), tmp_path, backend="mlx").backend == backend


@pytest.mark.parametrize(("config", "sentence", "named"), [
    ({"model_type": "roberta", "architectures": ["RobertaModel"]}, True, "roberta"),
    ({"model_type": "xlm-roberta", "architectures": ["XLMRobertaForSequenceClassification"]},
     False, "xlm-roberta"),
    ({"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"]}, True, "qwen3"),
], ids=["roberta", "xlm-roberta-reranker", "decoder-embedding"])
def test_unsupported_encoders_are_refused_by_name(tmp_path: Path, config: dict[str, Any],
                                                  sentence: bool, named: str) -> None:
    path = hf_dir(tmp_path, "m", config, sentence)
    with pytest.raises(UnsupportedModel) as refused:
        resolve_model(str(path), tmp_path)
    assert status_of(refused.value) == 422
    assert f"'{named}'" in refused.value.message


def _gguf(path: Path, arch: str, pooling: int | None) -> Path:
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    if pooling is not None:
        writer.add_pooling_type(gguf.PoolingType(pooling))
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_backend(tmp_path: Path) -> None:
    assert resolve_model(str(_gguf(tmp_path / "e.gguf", "bert", 1)),
                         tmp_path).backend == "llama_cpp_encoder"
    # A decoder converted as an embedding model (pooling "last").
    assert resolve_model(str(_gguf(tmp_path / "q.gguf", "qwen3", 3)),
                         tmp_path).backend == "llama_cpp_encoder"
    assert resolve_model(str(_gguf(tmp_path / "c.gguf", "llama", None)),
                         tmp_path).backend == "llama_cpp"
    with pytest.raises(UnsupportedModel) as refused:
        resolve_model(str(_gguf(tmp_path / "r.gguf", "bert", 4)), tmp_path)
    assert "rank" in refused.value.message
