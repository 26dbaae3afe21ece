"""How an MLX worker holds its weights: the one device-dependent choice.

MLX runs the same code on every device; what differs is which kernels are
fast. On a GPU (Metal on Apple Silicon, CUDA with mlx[cuda]) quantized
matmuls are the fast path and keep memory low. On a CPU, MLX's quantized
kernels are slow (SmolLM2 4-bit: ~9 tok/s decode) while float32 matmuls go
through the system BLAS (OpenBLAS: ~17 tok/s), and float16/bfloat16 math runs
at well under 1 tok/s. So, with `models.mlx_dequantize: auto`:

- GPU: keep the weights as stored (quantized, float16/bfloat16).
- CPU: compute in float32; dequantize quantized layers to float32 when the
  dequantized weights fit in half of the memory available now (otherwise
  keep them quantized, slower but loadable).

`true` always dequantizes (to the scales' dtype on a GPU), `false` never
does (on a CPU the float parameters and scales still become float32).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import mlx.core as mx
import mlx.nn as nn
import psutil
from mlx_lm.utils import dequantize_model

DequantizeSetting = Literal["auto"] | bool


@dataclass(frozen=True)
class WeightsPlan:
    device: str  # "cpu" or "gpu"
    dequantize: bool
    float32: bool
    reason: str

    def describe(self) -> str:
        form = "dequantized" if self.dequantize else "as stored"
        dtype = "float32" if self.float32 else "native dtype"
        return f"{self.device}, weights {form}, {dtype} ({self.reason})"


def on_gpu() -> bool:
    return bool(mx.default_device().type == mx.gpu)


# mlx.nn has no type stubs: its classes are Any to mypy.
_QUANTIZED: tuple[type, ...] = (nn.QuantizedLinear, nn.QuantizedEmbedding)  # type: ignore[attr-defined]


def _quantized_modules(model: Any) -> list[Any]:
    return [m for _, m in model.named_modules() if isinstance(m, _QUANTIZED)]


def dequantized_bytes(model: Any, itemsize: int = 4) -> int:
    """Size of the quantized layers once expanded to floats of `itemsize`."""
    total = 0
    for module in _quantized_modules(model):
        rows, packed = module.weight.shape[0], module.weight.shape[-1]
        total += rows * packed * (32 // module.bits) * itemsize
    return total


def plan_weights(model: Any, setting: DequantizeSetting) -> WeightsPlan:
    gpu = on_gpu()
    device = "gpu" if gpu else "cpu"
    float32 = not gpu
    quantized = bool(_quantized_modules(model))
    if not quantized:
        return WeightsPlan(device, False, float32, "model is not quantized")
    if setting is True:
        return WeightsPlan(device, True, float32, "mlx_dequantize: true")
    if setting is False:
        return WeightsPlan(device, False, float32, "mlx_dequantize: false")
    if gpu:
        return WeightsPlan(device, False, False, "auto: quantized kernels are fast on a GPU")
    need = dequantized_bytes(model)
    room = psutil.virtual_memory().available // 2
    if need > room:
        return WeightsPlan(device, False, True,
                           f"auto: float32 weights ({need >> 20} MiB) exceed half the "
                           f"available memory ({room >> 20} MiB)")
    return WeightsPlan(device, True, True, "auto: float32 BLAS beats quantized CPU kernels")


def apply_plan(model: Any, plan: WeightsPlan) -> None:
    if plan.dequantize:
        dequantize_model(model)
    if plan.float32:
        model.set_dtype(mx.float32)  # only floating parameters change
    mx.eval(model.parameters())
