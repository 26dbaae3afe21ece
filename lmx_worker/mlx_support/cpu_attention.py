"""Decode-step attention for MLX on a CPU.

MLX has no CPU kernel for `mx.fast.scaled_dot_product_attention`; it runs a
fallback that repeats each KV head for its query heads (one small BLAS call
per query head and sequence, twice) and a built-in softmax whose `exp` is
scalar on x86. Timed inside a SmolLM2 decode step here (float32, 2 cores,
8 sequences): the attention took 9 ms of an 80 ms step at 128 tokens of
context and 51 ms of 120 ms at 1024, most of it in that softmax.

For a step that reads one new token per sequence this module computes the
same attention as:

- the query heads that share a KV head stacked as rows of one matrix, so a
  (group x D) @ (D x T) product per KV head and sequence;
- the softmax's exponentials in one `mx.compile`d elementwise kernel (built
  for this CPU, see cpu_jit), the division by their sum done on the (group x
  D) output rather than on the T weights.

Prompt reads (several query positions), quantized KV caches and attention
sinks keep mlx-lm's path. The arithmetic is the same sums in another order:
logits agree with the stock path to float32 rounding.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

import mlx.core as mx

Attention = Callable[..., mx.array]


@mx.compile
def _weights(scores: mx.array, peak: mx.array) -> mx.array:
    return mx.exp(scores - peak)


@mx.compile
def _masked_weights(scores: mx.array, keep: mx.array, peak: mx.array) -> mx.array:
    return mx.where(keep, mx.exp(scores - peak), 0.0)


def decode_attention(queries: mx.array, keys: mx.array, values: mx.array, scale: float,
                     mask: mx.array | None) -> mx.array:
    """Softmax attention of (B, H, 1, D) queries over (B, KV, T, D) keys and
    values, H a multiple of KV; `mask` boolean (True: attend) or additive,
    broadcastable to (B, KV-or-H, 1, T)."""
    b, h, _, d = queries.shape
    kv_heads = keys.shape[1]
    group = h // kv_heads
    q = (queries * scale).reshape(b, kv_heads, group, d)
    scores = q @ keys.swapaxes(-1, -2)  # (B, KV, group, T)
    if mask is None:
        weights = _weights(scores, scores.max(axis=-1, keepdims=True))
    else:
        mask = _grouped_mask(mask, b, kv_heads, group)
        if mask.dtype == mx.bool_:
            masked = mx.where(mask, scores, -mx.inf)
            weights = _masked_weights(scores, mask, masked.max(axis=-1, keepdims=True))
        else:
            scores = scores + mask
            weights = _weights(scores, scores.max(axis=-1, keepdims=True))
    out = (weights @ values) / weights.sum(axis=-1, keepdims=True)
    return out.reshape(b, h, 1, d)


def _grouped_mask(mask: mx.array, b: int, kv_heads: int, group: int) -> mx.array:
    """A (.., H or 1, 1, T) mask as (B, KV, group or 1, T)."""
    if mask.ndim < 4:
        mask = mask.reshape((1,) * (4 - mask.ndim) + tuple(mask.shape))
    heads = mask.shape[1]
    if heads == 1:
        return mask  # (B or 1, 1, 1, T) broadcasts over KV and group
    return mask.reshape(mask.shape[0], kv_heads, group, mask.shape[-1])


def _with_decode_path(stock: Attention) -> Attention:
    def attention(queries: mx.array, keys: mx.array, values: mx.array, cache: Any,
                  scale: float, mask: Any, sinks: Any = None) -> mx.array:
        if (queries.shape[2] == 1 and sinks is None and not hasattr(cache, "bits")
                and (mask is None or isinstance(mask, mx.array))
                and queries.shape[1] % keys.shape[1] == 0):
            return decode_attention(queries, keys, values, scale, mask)
        return stock(queries, keys, values, cache=cache, scale=scale, mask=mask, sinks=sinks)

    attention.stock = stock  # type: ignore[attr-defined]  # kept for a second call
    return attention


def use_cpu_decode_attention(model: Any) -> str:
    """Route the decode steps of `model`'s attention layers through
    decode_attention (on a CPU device; LMX_MLX_CPU_ATTENTION=0 turns it off)."""
    if mx.default_device().type != mx.cpu or os.environ.get("LMX_MLX_CPU_ATTENTION") == "0":
        return "stock attention"
    patched = set()
    for _, module in model.named_modules():
        source = sys.modules.get(type(module).__module__)
        stock = getattr(source, "scaled_dot_product_attention", None)
        if source is None or stock is None or source.__name__ in patched:
            continue
        if getattr(stock, "stock", None) is None:  # not patched by an earlier worker load
            source.scaled_dot_product_attention = _with_decode_path(stock)  # type: ignore[attr-defined]
        patched.add(source.__name__)
    if not patched:
        return "stock attention (the architecture calls no scaled_dot_product_attention)"
    return f"CPU decode attention ({', '.join(sorted(m.rsplit('.', 1)[-1] for m in patched))})"
