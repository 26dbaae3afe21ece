"""Splitting a loaded mlx-lm model's layers between the ranks of a group.

Megatron-style tensor parallelism, as mlx-lm's `Model.shard`: in every
layer, each rank computes a share of the attention heads and of the MLP's
intermediate columns, and the two output projections (o_proj, down_proj)
end in an all_sum, so every rank holds the full hidden state again after
each block. Embeddings, norms and the output head stay whole on every
rank (each computes the same logits).

Unlike `Model.shard`, the heads are split along key/value head groups and
need not divide evenly: SmolLM2-135M has 9 query heads over 3 KV heads,
which two ranks share as 2 + 1 KV groups (6 + 3 query heads). Layers are
sliced in place (float `nn.Linear` and `nn.QuantizedLinear` alike), before
LMX's weight plan and CPU layout run: those then see ordinary, smaller
linear layers and fuse/transpose/dequantize them as for a whole model.
A quantized projection whose input split would cut a quantization group
is dequantized first.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn

_nn: Any = nn  # mlx.nn has no type stubs


class ShardingUnsupported(ValueError):
    """The model's layout does not allow this split."""


class SumOverRanks(_nn.Module):  # type: ignore[misc]  # mlx.nn is untyped
    """A projection computing this rank's partial product, summed over the
    group: the rank's heads (or MLP columns) contribute their share of
    every output feature."""

    def __init__(self, inner: Any, group: Any) -> None:
        super().__init__()
        self.inner = inner
        self.group = group

    def __call__(self, x: mx.array) -> mx.array:
        return mx.distributed.all_sum(self.inner(x), group=self.group)


def shares(total: int, world: int) -> list[tuple[int, int]]:
    """[start, end) of each rank's part of `total` units, as even as can be
    (the first ranks take one more when it does not divide)."""
    base, extra = divmod(total, world)
    ranges, start = [], 0
    for rank in range(world):
        end = start + base + (1 if rank < extra else 0)
        ranges.append((start, end))
        start = end
    return ranges


def _quantized(layer: Any) -> bool:
    return isinstance(layer, _nn.QuantizedLinear)


def _dequantized(layer: Any) -> Any:
    weight = mx.dequantize(layer.weight, layer.scales, layer.get("biases"),
                           layer.group_size, layer.bits, layer.mode)
    linear = _nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in layer)
    linear.weight = weight
    if "bias" in layer:
        linear.bias = layer.bias
    return linear


def _keep_rows(layer: Any, start: int, end: int) -> Any:
    """Output features [start, end) of a linear layer."""
    if not (isinstance(layer, _nn.Linear) or _quantized(layer)):
        raise ShardingUnsupported(f"cannot split a {type(layer).__name__}")
    for name in ("weight", "scales", "biases", "bias"):
        if name in layer and layer[name] is not None:
            layer[name] = layer[name][start:end]
    return layer


def _keep_columns(layer: Any, start: int, end: int, keep_bias: bool) -> Any:
    """Input features [start, end) of a linear layer; its bias (added once,
    after the sum over ranks) stays on one rank only."""
    if _quantized(layer):
        per_word = 32 // layer.bits
        if start % layer.group_size or end % layer.group_size or start % per_word:
            layer = _dequantized(layer)
        else:
            layer.weight = layer.weight[:, start // per_word:end // per_word]
            for name in ("scales", "biases"):
                if name in layer and layer[name] is not None:
                    layer[name] = layer[name][:, start // layer.group_size:
                                              end // layer.group_size]
    if isinstance(layer, _nn.Linear):
        layer.weight = layer.weight[:, start:end]
    elif not _quantized(layer):
        raise ShardingUnsupported(f"cannot split a {type(layer).__name__}")
    if "bias" in layer and not keep_bias:
        del layer["bias"]
    return layer


def _input_width(layer: Any) -> int:
    width = int(layer.weight.shape[1])
    return width * 32 // int(layer.bits) if _quantized(layer) else width


def _shard_attention(attn: Any, group: Any) -> None:
    rank, world = group.rank(), group.size()
    heads, kv_heads = int(attn.n_heads), int(attn.n_kv_heads)
    if kv_heads < world or heads % kv_heads:
        raise ShardingUnsupported(f"{kv_heads} key/value heads cannot be shared by "
                                  f"{world} ranks")
    per_group = heads // kv_heads
    head_dim = _input_width(attn.o_proj) // heads
    first, last = shares(kv_heads, world)[rank]
    attn.q_proj = _keep_rows(attn.q_proj, first * per_group * head_dim,
                             last * per_group * head_dim)
    attn.k_proj = _keep_rows(attn.k_proj, first * head_dim, last * head_dim)
    attn.v_proj = _keep_rows(attn.v_proj, first * head_dim, last * head_dim)
    attn.o_proj = SumOverRanks(
        _keep_columns(attn.o_proj, first * per_group * head_dim, last * per_group * head_dim,
                      keep_bias=rank == 0), group)
    attn.n_heads = (last - first) * per_group
    attn.n_kv_heads = last - first


def _shard_mlp(mlp: Any, group: Any) -> None:
    rank, world = group.rank(), group.size()
    width = _input_width(mlp.down_proj)
    # Split on quantization groups, so the down projection's columns stay whole.
    unit = int(mlp.down_proj.group_size) if _quantized(mlp.down_proj) else 1
    if width % unit or width // unit < world:
        unit = 1
    first, last = shares(width // unit, world)[rank]
    start, end = first * unit, last * unit
    mlp.gate_proj = _keep_rows(mlp.gate_proj, start, end)
    mlp.up_proj = _keep_rows(mlp.up_proj, start, end)
    mlp.down_proj = SumOverRanks(_keep_columns(mlp.down_proj, start, end, keep_bias=rank == 0),
                                 group)


def shard_model(model: Any, group: Any) -> str:
    """Split `model` (mlx-lm, lazily loaded or not) for this rank of
    `group`; returns what this rank holds. Models whose blocks are not
    llama-shaped (self_attn q/k/v/o, mlp gate/up/down) are refused."""
    layers = getattr(model, "layers", None)
    if not layers:
        raise ShardingUnsupported(f"{type(model).__module__} has no layer list to shard")
    for i, layer in enumerate(layers):
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if not all(hasattr(attn, name) for name in
                   ("q_proj", "k_proj", "v_proj", "o_proj", "n_heads", "n_kv_heads")):
            raise ShardingUnsupported(f"layer {i}'s attention is not llama-shaped")
        if not all(hasattr(mlp, name) for name in ("gate_proj", "up_proj", "down_proj")):
            raise ShardingUnsupported(f"layer {i}'s MLP is not a gated (llama) MLP")
        _shard_attention(attn, group)
        _shard_mlp(mlp, group)
    attn = layers[0].self_attn
    return (f"tensor-parallel rank {group.rank()} of {group.size()}: {attn.n_heads} query "
            f"heads / {attn.n_kv_heads} KV heads of each layer")
