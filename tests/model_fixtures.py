"""Small model directories for inventory and download tests: real file
formats (safetensors with a real header, JSON config and tokenizer), tiny
tensors. Plus a reader for /admin/events."""

from __future__ import annotations

import json
import struct
import threading
from pathlib import Path
from typing import Any

import httpx


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


class EventReader:
    """Collects /admin/events (type, data) pairs in a background thread. The
    server's heartbeat interval bounds how long close() waits."""

    def __init__(self, url: str) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []
        self._lock = threading.Lock()
        self._client = httpx.Client(base_url=url, timeout=httpx.Timeout(30, read=None))
        self._opened = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self._opened.wait(15), "event stream did not open"

    def _run(self) -> None:
        kind = None
        try:
            with self._client.stream("GET", "/admin/events") as stream:
                self._opened.set()
                for line in stream.iter_lines():
                    if self._stop.is_set():  # checked at least every heartbeat
                        return
                    if line.startswith("event: "):
                        kind = line[len("event: "):]
                    elif line.startswith("data: ") and kind is not None:
                        with self._lock:
                            self.events.append((kind, json.loads(line[len("data: "):])))
                        kind = None
        except (httpx.HTTPError, RuntimeError, ValueError):
            return  # closed by close() or the server went away

    def of(self, kind: str, **match: Any) -> list[dict[str, Any]]:
        with self._lock:
            return [d for k, d in self.events
                    if k == kind and all(d.get(key) == v for key, v in match.items())]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(15)
        self._client.close()
