"""How much memory a model will need once loaded, worked out before a worker
is started: weights (the files' sizes) plus the KV cache its context
allocates up front, plus a fixed runtime overhead.

KV cache per token = 2 (K and V) x n_layer x n_head_kv x head_dim x 2 bytes
(f16), head_dim = n_embd / n_head unless the model states key/value lengths.
llama.cpp allocates it for the whole context at load, so the figure is what
the worker will really hold, not a worst case.
"""

from __future__ import annotations

import functools
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmx_supervisor.models.gguf_header import GGUFError, read_gguf_metadata

log = logging.getLogger("lmx.memory")

# Python, llama.cpp's code and its compute buffers for a small batch.
# Measured: SmolLM2-135M at n_ctx 2048 has RSS 209 MB = 98 MB weights +
# 47 MB KV + ~64 MB runtime; 128 MiB leaves room for larger vocabularies.
RUNTIME_OVERHEAD_BYTES = 128 * 1024 * 1024
KV_BYTES_PER_VALUE = 2  # f16 cache, llama.cpp's default type

_SPLIT = re.compile(r"^(?P<stem>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})\.gguf$")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".npz", ".gguf")


@dataclass(frozen=True)
class MemoryEstimate:
    weights_bytes: int
    kv_cache_bytes: int
    overhead_bytes: int
    context_tokens: int
    # False when the model's shape could not be read: the KV term is then 0.
    shape_known: bool

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_cache_bytes + self.overhead_bytes

    def as_dict(self) -> dict[str, Any]:
        return {"total_bytes": self.total_bytes, "weights_bytes": self.weights_bytes,
                "kv_cache_bytes": self.kv_cache_bytes, "overhead_bytes": self.overhead_bytes,
                "context_tokens": self.context_tokens, "shape_known": self.shape_known}


@dataclass(frozen=True)
class ModelShape:
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    key_length: int | None = None
    value_length: int | None = None

    def kv_bytes_per_token(self, bytes_per_value: float = KV_BYTES_PER_VALUE) -> int:
        head_dim = self.n_embd // self.n_head if self.n_head else 0
        k = self.key_length or head_dim
        v = self.value_length or head_dim
        return int(bytes_per_value * self.n_layer * self.n_head_kv * (k + v))


def _as_int(value: Any) -> int | None:
    """GGUF allows per-layer arrays for head counts; the largest layer bounds
    the cache."""
    if isinstance(value, list):
        ints = [v for v in value if isinstance(v, int)]
        return max(ints) if ints else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def gguf_shape(meta: dict[str, Any]) -> ModelShape | None:
    arch = meta.get("general.architecture")
    if not isinstance(arch, str):
        return None
    n_layer = _as_int(meta.get(f"{arch}.block_count"))
    n_embd = _as_int(meta.get(f"{arch}.embedding_length"))
    n_head = _as_int(meta.get(f"{arch}.attention.head_count"))
    n_head_kv = _as_int(meta.get(f"{arch}.attention.head_count_kv")) or n_head
    if not (n_layer and n_embd and n_head and n_head_kv):
        return None
    return ModelShape(n_layer, n_embd, n_head, n_head_kv,
                      _as_int(meta.get(f"{arch}.attention.key_length")),
                      _as_int(meta.get(f"{arch}.attention.value_length")))


def hf_shape(config: dict[str, Any]) -> ModelShape | None:
    cfg = config.get("text_config", config)  # multimodal configs nest the LM
    n_layer = _as_int(cfg.get("num_hidden_layers"))
    n_embd = _as_int(cfg.get("hidden_size"))
    n_head = _as_int(cfg.get("num_attention_heads"))
    n_head_kv = _as_int(cfg.get("num_key_value_heads")) or n_head
    if not (n_layer and n_embd and n_head and n_head_kv):
        return None
    head_dim = _as_int(cfg.get("head_dim"))
    return ModelShape(n_layer, n_embd, n_head, n_head_kv, head_dim, head_dim)


def gguf_files(path: Path) -> list[Path]:
    """The file itself, or every shard of a `name-0000i-of-0000N.gguf` set."""
    split = _SPLIT.match(path.name)
    if split is None:
        return [path]
    count = int(split.group("count"))
    return [path.with_name(f"{split.group('stem')}-{i:05d}-of-{count:05d}.gguf")
            for i in range(1, count + 1)]


def _size(paths: list[Path]) -> int:
    total = 0
    for p in paths:
        try:
            total += p.stat().st_size
        except OSError:
            continue
    return total


@functools.lru_cache(maxsize=256)
def _gguf_shape_cached(path: Path, _size: int, _mtime_ns: int) -> ModelShape | None:
    """Parsing a header with a large vocabulary costs ~0.1 s of CPU; a file
    with the same size and mtime has the same header."""
    try:
        return gguf_shape(read_gguf_metadata(path))
    except (GGUFError, OSError, ValueError) as exc:
        log.warning("cannot read the GGUF header of %s: %s", path, exc)
        return None


def estimate_model_memory(path: Path, context_tokens: int,
                          kv_bytes_per_value: float = KV_BYTES_PER_VALUE) -> MemoryEstimate:
    """`context_tokens` is the whole KV cache the worker allocates (the
    per-request context times the number of parallel slots);
    `kv_bytes_per_value` follows the cache type (a quantized llama.cpp cache
    takes less than f16's 2 bytes, see performance.KV_BYTES_PER_VALUE)."""
    shape: ModelShape | None = None
    if path.is_file():
        weights = _size(gguf_files(path))
        try:
            st = path.stat()
        except OSError as exc:
            log.warning("cannot stat %s: %s", path, exc)
        else:
            shape = _gguf_shape_cached(path, st.st_size, st.st_mtime_ns)
    else:
        weights = _size([p for p in path.rglob("*") if p.suffix in _WEIGHT_SUFFIXES])
        try:
            config = json.loads((path / "config.json").read_text())
            shape = hf_shape(config) if isinstance(config, dict) else None
        except (OSError, ValueError) as exc:
            log.warning("cannot read %s/config.json: %s", path, exc)
    kv = shape.kv_bytes_per_token(kv_bytes_per_value) * context_tokens if shape else 0
    return MemoryEstimate(weights, kv, RUNTIME_OVERHEAD_BYTES, context_tokens, shape is not None)
