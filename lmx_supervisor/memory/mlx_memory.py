"""The memory an MLX worker really holds, for the memory guard's estimate.

The generic estimate counts weight files at their size on disk and a float16
KV cache. An MLX worker on a CPU differs (lmx_worker.mlx_support.mlx_weights): it computes
in float32, so it dequantizes quantized layers to float32 (4-bit weights grow
~6x) when they fit in half the available memory, casts float16 tensors to
float32, and its KV cache is float32. On a GPU it keeps the weights as stored.

The supervisor does not import MLX to ask for its device (that costs memory
for nothing); MLX has a GPU on Apple Silicon and where the mlx-cuda package
is installed, otherwise it runs on the CPU.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import struct
import sys
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path
from typing import Any

import psutil

from lmx_supervisor.memory.memory_estimate import MemoryEstimate

# mlx, mlx-lm, transformers' tokenizer and the compute buffers of a batch:
# measured ~260 MB of data before any weight is loaded.
MLX_RUNTIME_OVERHEAD_BYTES = 256 * 1024 * 1024
_FLOAT_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}


def mlx_has_gpu() -> bool:
    if sys.platform == "darwin" and platform.machine() == "arm64":
        return True
    for name in ("mlx-cuda", "mlx_cuda"):
        try:
            distribution(name)
            return True
        except PackageNotFoundError:
            continue
    return False


def _headers(directory: Path) -> list[dict[str, Any]]:
    headers: list[dict[str, Any]] = []
    for path in sorted(directory.glob("*.safetensors")):
        try:
            with path.open("rb") as f:
                (length,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(length))
        except (OSError, ValueError, struct.error):
            continue
        if isinstance(header, dict):
            headers.append(header)
    return headers


def _group_size(config: dict[str, Any], module: str) -> int:
    quant = config.get("quantization") or config.get("quantization_config") or {}
    if not isinstance(quant, dict):
        return 64
    own = quant.get(module)
    if isinstance(own, dict) and "group_size" in own:
        return int(own["group_size"])
    return int(quant.get("group_size", 64))


def cpu_weight_bytes(directory: Path) -> tuple[int, int] | None:
    """(bytes with quantized layers dequantized to float32, bytes with them
    kept packed), every float tensor counted as float32; None if unreadable."""
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError):
        config = {}
    if not isinstance(config, dict):
        config = {}
    tensors: dict[str, dict[str, Any]] = {}
    for header in _headers(directory):
        tensors.update({k: v for k, v in header.items()
                        if k != "__metadata__" and isinstance(v, dict)})
    if not tensors:
        return None
    floats = dequantized = packed = 0
    for name, info in tensors.items():
        shape = [int(d) for d in info.get("shape", [])]
        count = 1
        for d in shape:
            count *= d
        module, _, param = name.rpartition(".")
        quantized = f"{module}.scales" in tensors and f"{module}.weight" in tensors
        if not quantized:
            floats += count * 4
        elif param == "weight":  # packed uint32: rows x (in_dims * bits / 32)
            groups = int(tensors[f"{module}.scales"]["shape"][-1])
            rows = count // shape[-1] if shape else 0
            dequantized += rows * groups * _group_size(config, module) * 4
            packed += count * 4
        else:  # scales, biases (float32 on a CPU)
            packed += count * 4
    return floats + dequantized, floats + packed


def mlx_estimate(estimate: MemoryEstimate, directory: Path,
                 dequantize: bool | str = "auto") -> MemoryEstimate:
    """The generic estimate adjusted to what an MLX worker will hold."""
    overhead = estimate.overhead_bytes + MLX_RUNTIME_OVERHEAD_BYTES
    if mlx_has_gpu():
        return dataclasses.replace(estimate, overhead_bytes=overhead)
    sizes = cpu_weight_bytes(directory)
    weights = estimate.weights_bytes
    if sizes is not None:
        as_float32, kept_packed = sizes
        # The worker's own rule (lmx_worker.mlx_support.mlx_weights.plan_weights).
        expand = dequantize is True or (
            dequantize == "auto"
            and as_float32 - kept_packed <= psutil.virtual_memory().available // 2)
        weights = as_float32 if expand else kept_packed
    kv = estimate.kv_cache_bytes * 2  # float32 instead of float16
    return dataclasses.replace(estimate, weights_bytes=weights, kv_cache_bytes=kv,
                               overhead_bytes=overhead)
