"""The MLX worker's decode-step matmul kernel on a CPU
(lmx_worker/mlx_support/cpu_gemm): built for this host with the real
compiler into a private cache that keeps a few builds, it computes what MLX's matmul computes (odd
shapes, batched and strided inputs), the bundled SmolLM2 routed through it
gives the stock model's logits, and without a compiler the worker keeps the
BLAS and says why."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

from lmx_worker.mlx_support.system_blas import use_system_blas

use_system_blas()  # before mlx is imported (a no-op if another test imported it)

import mlx.core as mx  # noqa: E402
from mlx_lm.models import llama as llama_untyped  # noqa: E402

from lmx_worker.mlx_support import cpu_gemm  # noqa: E402
from lmx_worker.mlx_support.cpu_gemm import MAX_ROWS, load_kernel, use_small_gemm  # noqa: E402
from lmx_worker.mlx_support.cpu_gemm.build import KEEP_BUILDS  # noqa: E402
from tests.test_mlx_cpu_layout import (  # noqa: E402
    assert_matches_reference,
    float32_model,
    stock_reference,
)

pytestmark = [
    pytest.mark.timeout(600),
    pytest.mark.skipif(not sys.platform.startswith("linux") or shutil.which("g++") is None,
                       reason="the kernel is built with g++ on Linux"),
]

llama: Any = llama_untyped


def test_kernel_matches_mlx_matmul() -> None:
    kernel = load_kernel(threads=2)
    lanes = kernel.lanes
    mx.random.seed(3)
    # Row counts around the 4-row register block; weight row counts that leave
    # the 3-row block a remainder; K from one vector to MiniLM/SmolLM sizes.
    for rows in (1, 3, 4, 5, 8, 9, MAX_ROWS):
        for n, k in ((1, lanes), (7, 2 * lanes), (577, 576), (4099, 64), (1536, 1536)):
            x = mx.random.normal((rows, k))
            w = mx.random.normal((n, k))
            got = kernel.matmul_wt(x, w)
            assert got.shape == (rows, n)
            assert mx.allclose(got, x @ w.T, rtol=1e-4, atol=1e-4).item(), (rows, n, k)
    w = mx.random.normal((100, 576))
    batched = mx.random.normal((2, 4, 576))  # (batch, positions, features)
    assert mx.allclose(kernel.matmul_wt(batched, w), batched @ w.T, atol=1e-4).item()
    strided = mx.random.normal((576, 8)).T  # not row-contiguous: gathered in the kernel
    assert mx.allclose(kernel.matmul_wt(strided, w), strided @ w.T, atol=1e-4).item()
    strided_w = mx.random.normal((576, 100)).T  # a weight view, as a direct call may pass
    assert mx.allclose(kernel.matmul_wt(strided, strided_w), strided @ strided_w.T,
                       atol=1e-4).item()
    # What stays with the BLAS: prompt reads, other dtypes, ragged K.
    assert kernel.takes_weight(w) and kernel.takes_input(mx.zeros((MAX_ROWS, 576)))
    assert not kernel.takes_input(mx.zeros((MAX_ROWS + 1, 576)))
    assert not kernel.takes_input(mx.zeros((1, 576), dtype=mx.float16))
    assert not kernel.takes_weight(w.astype(mx.float16))
    assert not kernel.takes_weight(mx.zeros((4, lanes + 1)))
    with pytest.raises(ValueError, match="K %"):
        kernel.module.matmul_wt(mx.zeros((1, lanes + 1)), mx.zeros((4, lanes + 1)), 2)


def test_model_through_the_kernel_matches_stock_model(
        mlx_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(llama, "scaled_dot_product_attention",
                        llama.scaled_dot_product_attention)
    reference = stock_reference(mlx_model_dir)

    ours, _ = float32_model(mlx_model_dir)
    described = use_small_gemm(ours, threads=2)
    # SmolLM2: 30 layers x 7 projections; its output head is the tied embedding.
    assert described.startswith("decode matmuls of 210 linear layers"), described
    names = {type(m).__name__ for _, m in ours.named_modules()}
    assert {"SmallBatchLinear", "SmallBatchEmbedding"} <= names, names

    rows_seen: list[int] = []
    product = cpu_gemm._Kernel.matmul_wt

    def counted(self: Any, x: mx.array, weight: mx.array) -> mx.array:
        rows_seen.append(x.size // x.shape[-1])
        return product(self, x, weight)

    monkeypatch.setattr(cpu_gemm._Kernel, "matmul_wt", counted)
    assert_matches_reference(ours, reference)
    # Decode steps (one row per sequence) took the kernel; prompt reads not.
    assert rows_seen and max(rows_seen) <= MAX_ROWS and 1 in rows_seen


def test_built_in_a_private_cache_and_without_a_compiler_the_blas_stays(
        mlx_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    root = tmp_path / "cache" / "lmx" / "mlx-gemm"
    root.mkdir(parents=True, mode=0o700)
    stale = [root / f"_small_gemm-{n:016x}.so" for n in range(KEEP_BUILDS)]
    for age, path in enumerate(stale):  # builds for older versions, the first oldest
        path.write_bytes(b"old")
        os.utime(path, (1_000_000 + age, 1_000_000 + age))
    load_kernel(threads=1)
    built = set(root.glob("_small_gemm-*"))
    assert len(built) == KEEP_BUILDS and stale[0] not in built, built
    assert root.stat().st_mode & 0o077 == 0

    shared = tmp_path / "shared"
    (shared / "lmx" / "mlx-gemm").mkdir(parents=True)
    (shared / "lmx" / "mlx-gemm").chmod(0o777)
    monkeypatch.setenv("XDG_CACHE_HOME", str(shared))
    model, _ = float32_model(mlx_model_dir)
    assert "writable by others" in use_small_gemm(model, threads=1)

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "empty"))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    described = use_small_gemm(model, threads=1)
    assert described.startswith("BLAS for every matmul (no C++ compiler"), described
    assert not any(type(m).__name__.startswith("SmallBatch") for _, m in model.named_modules())
    out = model(mx.array([[1, 2, 3]]))  # the stock layers still run
    assert out.shape[:2] == (1, 3)

    monkeypatch.delenv("CXX")
    monkeypatch.setenv("LMX_MLX_SMALL_GEMM", "0")
    assert use_small_gemm(model, threads=1) == "BLAS for every matmul (LMX_MLX_SMALL_GEMM=0)"
    assert not os.path.exists(tmp_path / "empty" / "lmx" / "mlx-gemm")
