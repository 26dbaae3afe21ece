"""MLX decode steps on a CPU: LMX's decode attention and RoPE table compute
what mlx-lm's stock path computes (kernels against kernels on random input
with padding masks, and the bundled SmolLM2 end to end: left-padded batch and
single sequence), and the worker's kernel JIT builds into a private cache
with the host's instructions."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lmx_worker.mlx_support.system_blas import use_system_blas

use_system_blas()  # before mlx is imported (a no-op if another test imported it)

import mlx.core as mx  # noqa: E402
import mlx.nn as nn_untyped  # noqa: E402
from mlx_lm.models import llama as llama_untyped  # noqa: E402

from lmx_worker.mlx_support.cpu_attention import (  # noqa: E402
    decode_attention,
    use_cpu_decode_attention,
)
from lmx_worker.mlx_support.cpu_jit import native_jit_environment  # noqa: E402
from lmx_worker.mlx_support.cpu_rope import TableRoPE, use_table_rope  # noqa: E402
from tests.test_mlx_cpu_layout import (  # noqa: E402
    assert_matches_reference,
    float32_model,
    stock_reference,
)

pytestmark = pytest.mark.timeout(300)

# mlx.nn and mlx-lm's model modules have no type stubs.
nn: Any = nn_untyped
llama: Any = llama_untyped


def padding_mask(left_padding: list[int], length: int) -> mx.array:
    """BatchKVCache's decode mask: (B, 1, 1, T), False on left padding."""
    return mx.expand_dims(mx.array(left_padding), (1, 2, 3)) <= mx.arange(length)[None]


@pytest.mark.parametrize("heads,kv_heads", [(9, 3), (4, 4), (8, 1)])
def test_decode_attention_matches_mlx_attention(heads: int, kv_heads: int) -> None:
    mx.random.seed(7)
    b, t, d = 4, 41, 64
    q = mx.random.normal((b, heads, 1, d))
    k = mx.random.normal((b, kv_heads, t, d)) * 3  # peaked rows: the shift matters
    v = mx.random.normal((b, kv_heads, t, d))
    keep = padding_mask([0, 5, 17, 40], t)
    for mask in (None, keep, mx.where(keep, 0.0, -1e9), keep[:1]):
        expected = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125, mask=mask)
        ours = decode_attention(q, k, v, 0.125, mask)
        assert ours.shape == expected.shape
        assert float(mx.abs(ours - expected).max().item()) < 1e-5


def test_rope_table_matches_rope_kernel() -> None:
    stock = nn.RoPE(64, base=100000.0)
    module = nn.Module()
    module.rope, module.head_dim = stock, 64
    assert use_table_rope(module, 4096) == "RoPE table (1 layers)"
    table = module.rope
    assert isinstance(table, TableRoPE)
    x = mx.random.normal((4, 9, 1, 64))
    for offset in (0, 7, 1000, mx.array([3, 100, 2000, 4095])):
        ours, theirs = table(x, offset=offset), stock(x, offset=offset)
        assert float(mx.abs(ours - theirs).max().item()) < 1e-3  # float32 angles at 4k: ~2e-4
    # Left padding while a prompt is read a token at a time: negative positions
    # (masked out later) must not read outside the table.
    assert mx.isfinite(table(x, offset=mx.array([-3, -1, 0, 5]))).all().item()
    # A prompt read (several positions) is the kernel's.
    prompt = mx.random.normal((2, 9, 5, 64))
    assert mx.array_equal(table(prompt, offset=3), stock(prompt, offset=3)).item()
    traditional = nn.Module()
    traditional.rope = nn.RoPE(64, traditional=True)
    assert use_table_rope(traditional, 4096) == "stock RoPE"


def test_decode_path_matches_stock_model(mlx_model_dir: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # The patch replaces a module-level function: put the stock one back after.
    monkeypatch.setattr(llama, "scaled_dot_product_attention",
                        llama.scaled_dot_product_attention)
    reference = stock_reference(mlx_model_dir)

    ours_model, _ = float32_model(mlx_model_dir)
    assert use_cpu_decode_attention(ours_model) == "CPU decode attention (llama)"
    assert use_table_rope(ours_model, 2048) == "RoPE table (30 layers)"
    calls: list[int] = []
    patched = llama.scaled_dot_product_attention

    def counted(q: mx.array, *args: Any, **kwargs: Any) -> mx.array:
        calls.append(q.shape[2])
        result: mx.array = patched(q, *args, **kwargs)
        return result

    monkeypatch.setattr(llama, "scaled_dot_product_attention", counted)

    assert_matches_reference(ours_model, reference)
    assert 1 in calls  # decode steps went through the patched function


def test_kernel_jit_builds_for_this_cpu_in_a_private_cache(tmp_path: Path) -> None:
    if not sys.platform.startswith("linux") or shutil.which("g++") is None:
        pytest.skip("MLX's CPU kernel JIT needs Linux and g++")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path / "cache")
    try:
        env = native_jit_environment(on_cpu=True)
        (tmp_path / "shared").mkdir(mode=0o777)
        (tmp_path / "shared").chmod(0o777)  # (mkdir's mode is masked by umask)
        os.environ["XDG_CACHE_HOME"] = str(tmp_path / "shared")
        assert native_jit_environment(on_cpu=True) == "cache directory not private"
    finally:
        del os.environ["XDG_CACHE_HOME"]
    assert isinstance(env, dict), env
    root = tmp_path / "cache" / "lmx" / "mlx-jit"
    wrapper = root / "bin" / "g++"
    assert "-march=native" in wrapper.read_text()
    for path in (root, root / "bin", root / "kernels", wrapper):
        assert path.stat().st_mode & 0o077 == 0, path
    assert env["PATH"].split(os.pathsep)[0] == str(root / "bin")

    code = ("import mlx.core as mx\n"
            "f = mx.compile(lambda x, y: mx.exp(x) * y + 1)\n"
            "print(f(mx.ones((64,)), mx.ones((64,))).sum().item())\n")
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert abs(float(done.stdout) - 64 * (np.e + 1)) < 1e-3
    kernels = list(Path(env["TMPDIR"]).glob("mlx/*/cpu/*.so"))
    assert kernels, "no kernel built in the private cache"
    flags = Path("/proc/cpuinfo").read_text()
    if " fma " in flags and shutil.which("objdump"):
        listing = subprocess.run(["objdump", "-d", str(kernels[0])], capture_output=True,
                                 text=True, timeout=60, check=True).stdout
        assert "vfmadd" in listing  # built for this CPU: MLX's fma is an instruction
