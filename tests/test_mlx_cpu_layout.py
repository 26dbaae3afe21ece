"""The CPU layout (transposed float32 weights, fused projections, grouped
decode attention) computes the same logits as mlx-lm's stock model: the
bundled SmolLM2 converted from GGUF, two left-padded prompts in one
BatchKVCache (prefill, then decode steps through the grouped-attention
path with a padding mask), and a single-sequence KVCache."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lmx_worker.mlx_support.system_blas import use_system_blas

use_system_blas()  # before mlx is imported (a no-op if another test imported it)

import mlx.core as mx  # noqa: E402
from mlx_lm import load  # noqa: E402
from mlx_lm.models.cache import BatchKVCache, KVCache  # noqa: E402

from lmx_worker.mlx_support.mlx_cpu_layout import optimize_for_cpu  # noqa: E402
from lmx_worker.mlx_support.mlx_weights import apply_plan, plan_weights  # noqa: E402

pytestmark = pytest.mark.timeout(300)

PROMPTS = ["Write a haiku about the sea.", "What is 17 times 23? Answer briefly."]
DECODE_STEPS = 4


def float32_model(model_dir: Path) -> tuple[Any, Any]:
    model, tokenizer = load(str(model_dir))[:2]
    apply_plan(model, plan_weights(model, True))
    return model, tokenizer


def batched_logits(model: Any, rows: list[list[int]]) -> list[np.ndarray]:
    """Prefill left-padded rows, then greedy decode steps; every step's logits."""
    width = max(len(r) for r in rows)
    padding = [width - len(r) for r in rows]
    padded = mx.array([[0] * p + r for p, r in zip(padding, rows, strict=True)])
    cache = [BatchKVCache(padding) for _ in model.layers]
    logits = model(padded, cache=cache)[:, -1, :]
    out = [np.array(logits)]
    for _ in range(DECODE_STEPS):
        token = mx.argmax(logits, axis=-1)
        logits = model(token[:, None], cache=cache)[:, -1, :]
        out.append(np.array(logits))
    return out


def single_logits(model: Any, row: list[int]) -> list[np.ndarray]:
    cache = [KVCache() for _ in model.layers]
    logits = model(mx.array([row]), cache=cache)[:, -1, :]
    out = [np.array(logits)]
    for _ in range(DECODE_STEPS):
        logits = model(mx.argmax(logits, axis=-1)[:, None], cache=cache)[:, -1, :]
        out.append(np.array(logits))
    return out


Reference = tuple[list[list[int]], list[np.ndarray], list[np.ndarray]]


def stock_reference(model_dir: Path) -> Reference:
    """The stock float32 model's logits on PROMPTS: the prompts' tokens, the
    left-padded batch's steps and the first prompt's steps alone."""
    stock, tokenizer = float32_model(model_dir)
    rows = [list(tokenizer.encode(p)) for p in PROMPTS]
    assert len(rows[0]) != len(rows[1])  # so the batch really is padded
    return rows, batched_logits(stock, rows), single_logits(stock, rows[0])


def assert_matches_reference(model: Any, reference: Reference) -> None:
    rows, expected, expected_single = reference
    for ours, theirs in zip(batched_logits(model, rows), expected, strict=True):
        assert np.abs(ours - theirs).max() < 1e-3
        assert (ours.argmax(-1) == theirs.argmax(-1)).all()
    for ours, theirs in zip(single_logits(model, rows[0]), expected_single, strict=True):
        assert np.abs(ours - theirs).max() < 1e-3


def test_cpu_layout_matches_stock_model(mlx_model_dir: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    # Opt-in: see lmx_worker/mlx_support/mlx_cpu_layout.
    monkeypatch.setenv("LMX_MLX_CPU_LAYOUT", "1")
    reference = stock_reference(mlx_model_dir)

    tuned, _ = float32_model(mlx_model_dir)
    described = optimize_for_cpu(tuned)
    assert "60 fused projections" in described and "tied head" in described, described
    names = {type(m).__name__ for _, m in tuned.named_modules()}
    assert {"_CpuLlamaAttention", "_CpuLlamaMLP", "_Projection"} <= names, names

    assert_matches_reference(tuned, reference)
