"""Decode-step matmuls for MLX on a CPU, without the BLAS's packing.

On a CPU, MLX hands every float32 matmul to the BLAS (OpenBLAS here). A
decode step multiplies a few rows, one per sequence, by every weight matrix,
and a GEMM packs the whole weight into its own tile layout on every call
before it multiplies: the step reads each weight from memory twice and
writes it once. The weights are the step's memory traffic (SmolLM2-135M:
538 MB of float32 a step), so the packing is most of its cost.

`small_gemm.cpp` is an MLX primitive on the CPU stream that reads each
weight row once, straight from MLX's (out, in) layout, and multiplies it by
the rows of x four at a time, in registers; the compiler vectorizes it for
the host (-march=native, see build.py) and OpenMP splits the weight rows
over the worker's threads. Measured here (2 cores, AVX-512; all 211 matmuls
of a SmolLM2 step; OpenBLAS 0.3.21 with 2 threads against this with 2): 1
row 37-39 -> 18-19 ms, 4 rows 47 -> 28 ms, 8 rows 48-50 -> 37-38 ms, 12 rows
65-67 -> 46-47 ms, 14 rows 60 -> 60 ms, 16 rows 55 -> 57 ms. So rows up to
MAX_ROWS take this path and prompt reads keep the BLAS. Whole decode step
(forward pass, 200 tokens of context): 1 sequence 52 -> 32 ms, 8 sequences
76 -> 63 ms; logits agree with the BLAS path to float32 rounding (largest
difference 4e-5).

`use_small_gemm(model, threads)` routes the model's float32 `nn.Linear`
layers (and a tied output head, `Embedding.as_linear`) through it. Not on a
GPU (MLX's own kernels are the fast path there), not when the build fails
(no compiler, no nanobind, an ABI mismatch with mlx.core: the worker logs
why and keeps the BLAS), not when LMX_MLX_SMALL_GEMM=0.
"""

from __future__ import annotations

import logging
import os
from types import ModuleType
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from lmx_worker.mlx_support.cpu_gemm.build import BuildError, load

log = logging.getLogger("lmx.worker")

MAX_ROWS = 12  # above this OpenBLAS's packed GEMM catches up (measured above)

# mlx.nn has no type stubs: mypy sees none of its classes.
_nn: Any = nn


class _Kernel:
    """The loaded extension and the thread count its calls use."""

    def __init__(self, module: ModuleType, threads: int) -> None:
        self.module, self.threads = module, threads
        self.lanes = int(module.LANES)

    def takes_weight(self, weight: mx.array) -> bool:
        """Checked once per layer, when it is routed."""
        return (weight.dtype == mx.float32 and weight.ndim == 2
                and weight.shape[1] % self.lanes == 0)

    @staticmethod
    def takes_input(x: mx.array) -> bool:
        """Checked on every call (the layer's weight passed takes_weight):
        few rows, float32. Kept short: it runs 211 times a SmolLM2 step."""
        return x.dtype == mx.float32 and 0 < x.size <= MAX_ROWS * x.shape[-1]

    def matmul_wt(self, x: mx.array, weight: mx.array) -> mx.array:
        out: mx.array = self.module.matmul_wt(x, weight, self.threads)
        return out


def _linear_class(kernel: _Kernel) -> type:
    class SmallBatchLinear(_nn.Linear):  # type: ignore[misc]  # mlx.nn is untyped
        """nn.Linear whose decode-step calls skip the BLAS's packing."""

        def __call__(self, x: mx.array) -> mx.array:
            if not kernel.takes_input(x):
                return super().__call__(x)  # type: ignore[no-any-return]
            y = kernel.matmul_wt(x, self.weight)
            return y + self.bias if "bias" in self else y

    return SmallBatchLinear


def _embedding_class(kernel: _Kernel) -> type:
    class SmallBatchEmbedding(_nn.Embedding):  # type: ignore[misc]  # mlx.nn is untyped
        """nn.Embedding whose use as a tied output head skips the packing."""

        def as_linear(self, x: mx.array) -> mx.array:
            if not kernel.takes_input(x):
                return super().as_linear(x)  # type: ignore[no-any-return]
            return kernel.matmul_wt(x, self.weight)

    return SmallBatchEmbedding


def _self_check(kernel: _Kernel) -> None:
    """One small product against MLX's: catches an extension that loads but
    cannot take mx.array (another nanobind ABI) or computes wrongly."""
    x = mx.arange(3 * kernel.lanes, dtype=mx.float32).reshape(3, kernel.lanes) / 7.0
    w = mx.cos(mx.arange(5 * kernel.lanes, dtype=mx.float32)).reshape(5, kernel.lanes)
    try:
        got = kernel.matmul_wt(x, w)
        agrees = mx.allclose(got, x @ w.T, rtol=1e-5, atol=1e-5).item()
    except TypeError as exc:  # nanobind could not convert mx.array
        raise BuildError(f"the extension cannot take mlx arrays: {exc}") from exc
    except Exception as exc:  # an optional kernel: anything wrong means the BLAS
        raise BuildError(f"the extension failed its check: {exc!r}") from exc
    if not agrees:
        raise BuildError("the extension's product disagrees with MLX's")


def load_kernel(threads: int) -> _Kernel:
    """The extension, built if needed and checked; BuildError says why not."""
    kernel = _Kernel(load(), threads)
    _self_check(kernel)
    return kernel


def use_small_gemm(model: Any, threads: int | None) -> str:
    """Route `model`'s float32 linear layers' decode-step matmuls through the
    small-batch kernel (on a CPU device); says what it did, for the log."""
    if mx.default_device().type != mx.cpu:
        return "MLX matmuls"
    if os.environ.get("LMX_MLX_SMALL_GEMM") == "0":
        return "BLAS for every matmul (LMX_MLX_SMALL_GEMM=0)"
    try:
        kernel = load_kernel(threads or os.cpu_count() or 1)  # as the llama.cpp engine
    except BuildError as exc:
        log.warning("small-batch matmul kernel unavailable, the BLAS does every matmul: %s",
                    exc)
        return f"BLAS for every matmul ({exc})"
    linear, embedding = _linear_class(kernel), _embedding_class(kernel)
    routed: list[Any] = []
    for _, module in model.named_modules():
        # Exact types only: quantized layers and wrappers are other classes.
        if type(module) is _nn.Linear and kernel.takes_weight(module.weight):
            module.__class__ = linear
            routed.append(module)
        elif type(module) is _nn.Embedding and kernel.takes_weight(module.weight):
            module.__class__ = embedding
            routed.append(module)
    # The kernel reads weights row by row: a strided one (a column share of
    # a sharded model's projection) would be copied on every call, so copy
    # it once now (an already contiguous weight keeps its memory).
    for module in routed:
        module.weight = mx.contiguous(module.weight)
    mx.eval([module.weight for module in routed])
    layers = sum(1 for module in routed if isinstance(module, linear))
    return (f"decode matmuls of {layers} linear layers through the small-batch kernel "
            f"(up to {MAX_ROWS} rows, {kernel.threads} threads)")
