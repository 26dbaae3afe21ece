"""Logits of an MLX model directory for given token sequences: mlx-lm's model
as the MLX worker runs it (weights planned by lmx_worker.mlx_support.mlx_weights), and,
for the first sequence, an independent numpy forward pass of a llama model
over the same (dequantized, float32) weights.

Run as `python -m tests.mlx_reference MODEL_DIR IN.json OUT.npz` in its own
process: OpenBLAS must be loaded before MLX (lmx_worker.mlx_support.system_blas), which a
test process that already imported MLX can no longer arrange.
"""

from __future__ import annotations

import json
import math
import sys
from typing import Any

import numpy as np


def numpy_llama(w: dict[str, np.ndarray], cfg: dict[str, Any], ids: list[int]
                ) -> np.ndarray:
    """HF llama (RMSNorm, rotate-half rope, GQA attention, SwiGLU) computed
    in the weights' dtype."""
    n_heads, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_heads
    eps, theta = cfg["rms_norm_eps"], cfg.get("rope_theta", 10000.0)
    count = len(ids)
    inv = theta ** (-np.arange(0, head_dim, 2) / head_dim)
    angles = np.arange(count)[:, None] * inv[None]
    dtype = w["model.norm.weight"].dtype
    cos, sin = np.cos(angles).astype(dtype), np.sin(angles).astype(dtype)

    def rms(x: np.ndarray, g: np.ndarray) -> np.ndarray:
        out: np.ndarray = x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * g
        return out

    def rope(x: np.ndarray) -> np.ndarray:
        a, b = x[..., :head_dim // 2], x[..., head_dim // 2:]
        return np.concatenate([a * cos - b * sin, b * cos + a * sin], -1)

    mask = np.triu(np.full((count, count), -np.inf, dtype=dtype), 1)
    x = w["model.embed_tokens.weight"][ids]
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        h = rms(x, w[p + "input_layernorm.weight"])

        def proj(name: str, heads: int, h: np.ndarray = h, p: str = p) -> np.ndarray:
            y: np.ndarray = h @ w[p + name].T
            return y.reshape(count, heads, head_dim).transpose(1, 0, 2)

        q = rope(proj("self_attn.q_proj.weight", n_heads))
        k = np.repeat(rope(proj("self_attn.k_proj.weight", n_kv)), n_heads // n_kv, 0)
        v = np.repeat(proj("self_attn.v_proj.weight", n_kv), n_heads // n_kv, 0)
        s = q @ k.transpose(0, 2, 1) / math.sqrt(head_dim) + mask
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        x = x + (s @ v).transpose(1, 0, 2).reshape(count, -1) @ w[p + "self_attn.o_proj.weight"].T
        h = rms(x, w[p + "post_attention_layernorm.weight"])
        gate = h @ w[p + "mlp.gate_proj.weight"].T
        up = h @ w[p + "mlp.up_proj.weight"].T
        x = x + (gate / (1 + np.exp(-gate)) * up) @ w[p + "mlp.down_proj.weight"].T
    head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
    logits: np.ndarray = rms(x, w["model.norm.weight"]) @ head.T
    return logits


def main(model_dir: str, inputs: str, output: str) -> None:
    from lmx_worker.mlx_support.system_blas import use_system_blas

    use_system_blas()
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm import load

    from lmx_worker.mlx_support.mlx_weights import apply_plan, plan_weights

    model, _tokenizer = load(model_dir)
    apply_plan(model, plan_weights(model, "auto"))
    weights = {k: np.array(v, dtype=np.float32) for k, v in tree_flatten(model.parameters())}
    with open(f"{model_dir}/config.json") as f:
        cfg = json.load(f)
    with open(inputs) as f:
        sequences: list[list[int]] = json.load(f)
    arrays: dict[str, np.ndarray] = {}
    for i, ids in enumerate(sequences):
        arrays[f"mlx{i}"] = np.array(model(mx.array([ids]))[0].astype(mx.float32))
    # One sequence is enough to show the math is the same; numpy is slow here.
    arrays["ref0"] = numpy_llama(weights, cfg, sequences[0])
    np.savez(output, **arrays)  # type: ignore[arg-type]


if __name__ == "__main__":
    main(*sys.argv[1:4])
