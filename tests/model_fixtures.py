"""Small model directories for inventory and download tests: real file
formats (safetensors with a real header, JSON config and tokenizer), tiny
tensors."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any


def safetensors_bytes(n_floats: int, metadata: dict[str, str] | None = None) -> bytes:
    """A valid safetensors file holding one F32 tensor of `n_floats` values."""
    header: dict[str, Any] = {"w": {"dtype": "F32", "shape": [n_floats],
                                    "data_offsets": [0, 4 * n_floats]}}
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header to 8 bytes
    return struct.pack("<Q", len(raw)) + raw + struct.pack(f"<{n_floats}f", *range(n_floats))


def mlx_files(n_floats: int = 1024) -> dict[str, bytes]:
    """What mlx-lm writes for a (tiny) quantized model."""
    config = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 1,
              "quantization": {"group_size": 64, "bits": 4}}
    return {
        "config.json": json.dumps(config).encode(),
        "model.safetensors": safetensors_bytes(n_floats, {"format": "mlx"}),
        "tokenizer.json": json.dumps({"version": "1.0", "model": {"type": "BPE"}}).encode(),
        "tokenizer_config.json": b"{}",
    }


def write_files(directory: Path, files: dict[str, bytes]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (directory / name).write_bytes(data)
    return directory


def sharded_dir_missing_shard(directory: Path) -> Path:
    """A transformers-layout model whose index names two shards, one absent,
    and which has no tokenizer."""
    shard = safetensors_bytes(256, {"format": "pt"})
    index = {"metadata": {"total_size": 2048},
             "weight_map": {"a": "model-00001-of-00002.safetensors",
                            "b": "model-00002-of-00002.safetensors"}}
    return write_files(directory, {
        "config.json": b'{"model_type": "llama"}',
        "model.safetensors.index.json": json.dumps(index).encode(),
        "model-00001-of-00002.safetensors": shard,
    })
