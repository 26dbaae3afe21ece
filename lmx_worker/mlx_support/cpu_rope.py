"""Rotary position embedding for MLX decode steps on a CPU, from a table.

`mx.fast.rope` on a CPU computes a cosine and a sine per element on every
call, scalar on x86: 3.9 ms of an 80 ms SmolLM2 decode step for 8 sequences
here (60 calls, two per layer). The angles only depend on the position, so a
worker computes cos and sin once per position up to its context length and
a decode step gathers each sequence's row once per layer (one new token per
sequence; queries and keys share it): the rotation is then a multiply-add,
fused by `mx.compile`.

Only mlx.nn's plain RoPE in the usual half-split layout is replaced, and
only for one-token steps; prompt reads, the interleaved ("traditional")
layout and the scaled variants (Llama 3, YaRN, ...) keep mlx-lm's path. The
angles are float32 products as in the kernel; against float64 angles the
rotated values err by at most 2e-4 at position 8000 from the table and 5e-4
from the kernel (1e-4 / 2.4e-4 at 4000), so the two paths agree to float32
rounding of the angle.
"""

from __future__ import annotations

import os
from typing import Any

import mlx.core as mx
import mlx.nn as nn

# mlx.nn has no type stubs: mypy sees none of its classes.
_nn: Any = nn


@mx.compile
def _rotate(x: mx.array, swapped: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    return x * cos + swapped * sin


class _Table:
    """cos and signed sin per position, each (positions, dims); a plain
    object so nn.Module does not count the tables among the weights."""

    def __init__(self, dims: int, base: float, scale: float, positions: int) -> None:
        self.positions = positions
        inv_freq = mx.power(base, -mx.arange(0, dims, 2, dtype=mx.float32) / dims)
        theta = (mx.arange(positions, dtype=mx.float32) * scale)[:, None] * inv_freq[None]
        cos, sin = mx.cos(theta), mx.sin(theta)
        self.cos = mx.concatenate([cos, cos], axis=-1)
        self.sin = mx.concatenate([-sin, sin], axis=-1)  # x*cos + rotate_half(x)*sin
        mx.eval(self.cos, self.sin)


class TableRoPE(_nn.Module):  # type: ignore[misc]  # mlx.nn is untyped
    def __init__(self, stock: Any, table: _Table) -> None:
        super().__init__()
        object.__setattr__(self, "_stock", stock)
        object.__setattr__(self, "_table", table)
        # The layer rotates its queries, then its keys, at the same positions
        # (the cache's offset): the rows gathered for one are kept for the other.
        object.__setattr__(self, "_gathered", None)
        self.half = stock.dims // 2

    def __call__(self, x: mx.array, offset: int | mx.array = 0) -> mx.array:
        if x.ndim != 4 or x.shape[2] != 1:
            return self._stock(x, offset=offset)  # type: ignore[no-any-return]
        if isinstance(offset, mx.array) and (offset.ndim != 1
                                             or offset.size not in (1, x.shape[0])):
            return self._stock(x, offset=offset)  # type: ignore[no-any-return]
        cos, sin = self._rows(offset)
        swapped = mx.concatenate([x[..., self.half:], x[..., :self.half]], axis=-1)
        return _rotate(x, swapped, cos, sin)

    def _rows(self, offset: int | mx.array) -> tuple[mx.array, mx.array]:
        """cos and sin at `offset`, (B or 1, 1, 1, D): one row per sequence
        (an int: the same position for every sequence)."""
        last = self._gathered
        if last is not None and (last[0] is offset or (
                isinstance(offset, int) and isinstance(last[0], int) and last[0] == offset)):
            return last[1], last[2]
        rows = mx.array([offset]) if isinstance(offset, int) else offset
        # Left padding has negative positions while a prompt is read one token
        # at a time (its rows are masked out); a gather must stay in the table.
        rows = mx.clip(rows, 0, self._table.positions - 1)
        cos = self._table.cos[rows].reshape(rows.size, 1, 1, -1)
        sin = self._table.sin[rows].reshape(rows.size, 1, 1, -1)
        object.__setattr__(self, "_gathered", (offset, cos, sin))
        return cos, sin


def use_table_rope(model: Any, positions: int) -> str:
    """Swap the plain RoPE of every attention layer of `model` (on a CPU;
    LMX_MLX_CPU_ROPE=0 turns it off) for a TableRoPE over `positions`."""
    if mx.default_device().type != mx.cpu or os.environ.get("LMX_MLX_CPU_ROPE") == "0":
        return "stock RoPE"
    tables: dict[tuple[int, float, float], _Table] = {}
    swapped = 0
    for _, module in model.named_modules():
        rope: Any = getattr(module, "rope", None)
        if (type(rope) is not _nn.RoPE or rope.traditional
                or rope.dims != getattr(module, "head_dim", rope.dims) or rope.dims % 2):
            continue
        key = (rope.dims, float(rope.base), float(rope.scale))
        if key not in tables:  # one table serves every layer
            tables[key] = _Table(rope.dims, rope.base, rope.scale, positions)
        module.rope = TableRoPE(rope, tables[key])
        swapped += 1
    return f"RoPE table ({swapped} layers)" if swapped else "stock RoPE"
