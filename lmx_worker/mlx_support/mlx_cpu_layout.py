"""Float32 weight layout and decode attention tuned for MLX on a CPU.

On a CPU, MLX hands float32 matmuls to the BLAS (OpenBLAS, see
system_blas), and a decode step multiplies a handful of rows (one per
sequence in the batch) by every weight matrix. mlx-lm stores a linear
layer's weight as (out, in) and computes `x @ W.T`; OpenBLAS then repacks the
whole weight on every call. Measured here on SmolLM2's shapes (2 threads,
OpenBLAS 0.3.21), storing the transpose contiguously and computing `x @ Wt`
is faster at every batch size from 1 to 16, by 1.3-1.6x for the tied output
head (49152 x 576), the single largest matmul of a step.

So, on a CPU with float32 weights only (GPUs keep mlx-lm's layout and its
quantized kernels):

- every float `nn.Linear` becomes a `_Projection` holding W^T contiguously;
- llama-family attention computes q, k and v with one matmul, the MLP gate
  and up with one (fewer BLAS calls, each bigger);
- decode steps (one new token per sequence) run attention as grouped
  matmuls, the query heads that share a KV head stacked into one matrix,
  instead of the generic fused kernel that expands grouped heads;
- a tied output head is stored transposed; the embedding lookup reads rows
  of a transposed view of the same memory.

The arithmetic is the same dot products in another order, so logits agree
with the stock layout to float32 rounding.

It is OFF unless LMX_MLX_CPU_LAYOUT=1: measured again with mlx 0.32.4 /
mlx-lm 0.32.2 (SmolLM2 float32, OpenBLAS, 2 threads, the engine in one
process, 128 tokens, A/B twice), the stock layout decodes faster: 15.3 /
16.5 tok/s against 12.7 / 14.5 for one stream, 75.5 / 73.4 against 58.5 /
60.1 for 8 (mlx's own CPU matmul and fused attention caught up with what
this layout saved).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import llama
from mlx_lm.models.activations import swiglu
from mlx_lm.models.base import scaled_dot_product_attention

# mlx.nn has no type stubs: mypy sees none of its classes.
_nn: Any = nn


def _transposed(weights: list[mx.array]) -> mx.array:
    return mx.contiguous(mx.concatenate(weights, axis=0).T)


class _Projection(_nn.Module):  # type: ignore[misc]  # mlx.nn is untyped
    """`x @ W^T (+ b)` with W^T stored contiguously (in x out)."""

    def __init__(self, linear: Any) -> None:
        super().__init__()
        self.wt = _transposed([linear.weight])
        if "bias" in linear:
            self.bias = linear.bias
        mx.eval(self.wt)  # now, so the stock weight can be freed before the next

    def __call__(self, x: mx.array) -> mx.array:
        y = x @ self.wt
        return y + self.bias if "bias" in self else y


def _fused(linears: list[Any]) -> tuple[mx.array, mx.array | None, list[int]]:
    """W^T of several projections of the same input side by side, their
    biases (if all have one) and where each one's columns end."""
    wt = _transposed([lin.weight for lin in linears])
    biases = [lin.bias for lin in linears if "bias" in lin]
    bias = mx.concatenate(biases) if len(biases) == len(linears) else None
    ends, total = [], 0
    for lin in linears[:-1]:
        total += lin.weight.shape[0]
        ends.append(total)
    return wt, bias, ends


def _decode_attention(queries: mx.array, keys: mx.array, values: mx.array, scale: float,
                      mask: mx.array | None) -> mx.array:
    """Attention for one query position per sequence: (B, H, 1, D) queries
    against (B, KV, T, D) keys and values, H = KV * groups."""
    b, h, _, d = queries.shape
    kv_heads = keys.shape[1]
    q = (queries * scale).reshape(b, kv_heads, h // kv_heads, d)
    scores = q @ keys.swapaxes(-1, -2)  # (B, KV, groups, T)
    if mask is not None:
        if mask.dtype == mx.bool_:
            scores = mx.where(mask, scores, mx.finfo(scores.dtype).min)
        else:
            scores = scores + mask
    weights = mx.softmax(scores, axis=-1, precise=True)
    return (weights @ values).reshape(b, h, 1, d)


class _CpuLlamaAttention(llama.Attention):
    fused_t: mx.array  # q, k and v projections side by side
    fused_bias: mx.array | None
    fused_ends: list[int]

    def __call__(self, x: mx.array, mask: Any = None, cache: Any = None) -> mx.array:
        b, n, _ = x.shape
        qkv = x @ self.fused_t
        if self.fused_bias is not None:
            qkv = qkv + self.fused_bias
        queries, keys, values = mx.split(qkv, self.fused_ends, axis=-1)
        queries = queries.reshape(b, n, self.n_heads, -1).transpose(0, 2, 1, 3)
        keys = keys.reshape(b, n, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        values = values.reshape(b, n, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        if cache is not None:
            queries = self.rope(queries, offset=cache.offset)
            keys = self.rope(keys, offset=cache.offset)
            keys, values = cache.update_and_fetch(keys, values)
        else:
            queries = self.rope(queries)
            keys = self.rope(keys)
        if n == 1 and not isinstance(mask, str) and not hasattr(cache, "bits"):
            output = _decode_attention(queries, keys, values, self.scale, mask)
        else:
            output = scaled_dot_product_attention(queries, keys, values, cache=cache,
                                                  scale=self.scale, mask=mask)
        output = output.transpose(0, 2, 1, 3).reshape(b, n, -1)
        result: mx.array = self.o_proj(output)
        return result


class _CpuLlamaMLP(llama.MLP):
    fused_t: mx.array  # gate and up projections side by side
    fused_bias: mx.array | None
    fused_ends: list[int]

    def __call__(self, x: mx.array) -> mx.array:
        gate_up = x @ self.fused_t
        if self.fused_bias is not None:
            gate_up = gate_up + self.fused_bias
        gate, up = mx.split(gate_up, self.fused_ends, axis=-1)
        result: mx.array = self.down_proj(swiglu(gate, up))
        return result


def _float_linear(module: Any) -> bool:
    return type(module) is _nn.Linear and module.weight.dtype == mx.float32


def _fuse(module: Any, kind: type, names: tuple[str, ...], cpu_class: type) -> bool:
    """Replace `module`'s projections `names` (same input) by one fused W^T
    and switch it to `cpu_class`, which reads fused_t/fused_bias/fused_ends."""
    if module.__class__ is not kind:  # exactly mlx-lm's class: its __call__ is replaced
        return False
    parts = [getattr(module, name) for name in names]
    if not all(_float_linear(p) for p in parts):
        return False
    wt, bias, ends = _fused(parts)
    mx.eval(wt)
    target: Any = module  # (the class test above narrowed `module` for mypy)
    target.fused_t = wt
    # Plain attributes: nn.Module would file a list or None among its parameters.
    object.__setattr__(module, "fused_bias", bias)
    object.__setattr__(module, "fused_ends", ends)
    for name in names:
        delattr(module, name)
    module.__class__ = cpu_class
    return True


def _transpose_linears(module: Any) -> int:
    """Swap every float nn.Linear below `module` for a _Projection."""
    count = 0
    for name, child in list(module.children().items()):
        if isinstance(child, list):
            for i, item in enumerate(child):
                if _float_linear(item):
                    child[i] = _Projection(item)
                    count += 1
                elif isinstance(item, _nn.Module):
                    count += _transpose_linears(item)
        elif _float_linear(child):
            setattr(module, name, _Projection(child))
            count += 1
        elif isinstance(child, _nn.Module):
            count += _transpose_linears(child)
    return count


def _transpose_tied_head(model: Any) -> bool:
    inner: Any = getattr(model, "model", None)
    embed: Any = getattr(inner, "embed_tokens", None)
    args = getattr(model, "args", None)
    if (type(embed) is not _nn.Embedding or embed.weight.dtype != mx.float32
            or not getattr(args, "tie_word_embeddings", False)):
        return False
    head_t = mx.contiguous(embed.weight.T)
    mx.eval(head_t)
    # One copy serves both uses: the lookup gathers rows of a transposed view.
    embed.weight = head_t.T
    # The instance attribute shadows Embedding.as_linear for this model only.
    embed.as_linear = lambda x: x @ head_t
    return True


def _trim_heap() -> None:
    """Hand the freed stock weights back to the OS: glibc keeps freed heap
    memory (its mmap threshold grows after large frees), which would show as
    a few hundred MB of RSS the worker never uses again."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)


def optimize_for_cpu(model: Any) -> str:
    """Apply the CPU layout to a loaded float32 mlx-lm model; says what changed."""
    if os.environ.get("LMX_MLX_CPU_LAYOUT") != "1":
        return "stock layout (LMX_MLX_CPU_LAYOUT=1 for the CPU layout)"
    fused = 0
    for _, module in model.named_modules():
        fused += (_fuse(module, llama.Attention, ("q_proj", "k_proj", "v_proj"),
                        _CpuLlamaAttention)
                  or _fuse(module, llama.MLP, ("gate_proj", "up_proj"), _CpuLlamaMLP))
    count = _transpose_linears(model)
    head = _transpose_tied_head(model)
    mx.eval(model.parameters())
    mx.clear_cache()  # MLX keeps freed buffers for reuse: return the stock weights' memory
    _trim_heap()
    return (f"CPU layout: {fused} fused projections, {count} transposed linears"
            + (", transposed tied head" if head else ""))
