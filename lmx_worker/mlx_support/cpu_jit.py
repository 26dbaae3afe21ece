"""Let MLX's CPU kernel compiler use this CPU's instructions, from a private cache.

On a CPU stream, `mx.compile`d functions (mlx.nn's silu, mlx-lm's swiglu,
LMX's decode softmax in cpu_attention) are fused into C++ that MLX writes to
`$TMPDIR/mlx/<version>/cpu/` and builds with a fixed command, `g++ -std=c++17
-O3 -fPIC -shared`: baseline x86-64, so every `fma` in MLX's polynomial `exp`
is a call into libm and nothing is vectorized. Measured here (SmolLM2 shapes,
2 cores, AVX-512): swiglu over 8 x 1536 took 210 us a call, 67 us built for
the host; an exp-heavy softmax row set 1050 us, 375 us.

The build command is found on PATH, so a worker on a CPU puts a private
directory first on its own PATH holding a `g++` that runs the real one with
`-march=native` (the kernels are built and run on this same machine), and
points TMPDIR at a private cache next to it. The cache matters twice: kernels
built with and without the flag have the same file name, and MLX dlopen()s
whatever library it finds there, so a shared world-writable /tmp/mlx would
let another local user hand the worker code to run.

The results are the same numbers: `-std=c++17` keeps GCC from contracting
a*b+c into FMAs the source does not ask for (ISO mode), so only the explicit
`fma` calls change, from libm's exactly rounded fmaf to the instruction.

Skipped (MLX keeps its defaults) off Linux, when MLX computes on a GPU, when
there is no g++ or it rejects -march=native, or when LMX_MLX_NATIVE_JIT=0.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path

log = logging.getLogger("lmx.worker")

_COMPILER = "g++"  # the name MLX's JIT runs (mlx/backend/cpu/jit_compiler.cpp)
_FLAGS = ("-march=native",)


def lmx_cache_dir() -> Path:
    """Per-user: what a worker builds is reused by every later worker of this user."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "lmx"


def jit_cache_dir() -> Path:
    return lmx_cache_dir() / "mlx-jit"


def private_dir(path: Path) -> bool:
    """Created 0700 if missing; refused if someone else could write in it or
    swap it: every folder above must belong to us or root and be writable
    only by its owner, or be sticky like /tmp."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    info = path.stat()
    if info.st_uid != os.getuid() or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return False
    for parent in path.resolve().parents:
        info = parent.stat()
        shared = info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        if info.st_uid not in (0, os.getuid()) or (shared and not info.st_mode & stat.S_ISVTX):
            return False
    return True


def _accepts_flags(compiler: str) -> bool:
    try:
        done = subprocess.run([compiler, *_FLAGS, "-x", "c++", "-fsyntax-only", "/dev/null"],
                              capture_output=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def native_jit_environment(on_cpu: bool) -> dict[str, str] | str:
    """The PATH and TMPDIR under which MLX's CPU kernels are built for this
    CPU in a private cache (writing the g++ wrapper if needed), or why not.
    Benchmarks give a peer running MLX the same, so a ratio measures the
    servers, not the compiler flags."""
    if not sys.platform.startswith("linux") or not on_cpu:
        return "not a Linux CPU"
    if os.environ.get("LMX_MLX_NATIVE_JIT") == "0":
        return "LMX_MLX_NATIVE_JIT=0"
    compiler = shutil.which(_COMPILER)
    if compiler is None:
        return "no g++: compiled functions run unfused"
    root = jit_cache_dir()
    try:
        if not (private_dir(root) and private_dir(root / "bin")
                and private_dir(root / "kernels")):
            log.warning("%s is writable by others: MLX's kernel JIT keeps its defaults", root)
            return "cache directory not private"
        if not _accepts_flags(compiler):
            return f"{compiler} rejects {' '.join(_FLAGS)}"
        wrapper = root / "bin" / _COMPILER
        script = (f"#!/bin/sh\nexec {shlex.quote(compiler)} "
                  f"{' '.join(_FLAGS)} \"$@\"\n")
        if not wrapper.exists() or wrapper.read_text() != script:
            staged = wrapper.with_suffix(f".{os.getpid()}")
            staged.write_text(script)
            staged.chmod(0o700)
            staged.replace(wrapper)  # atomic: a concurrent worker never runs half a file
    except OSError as exc:
        log.warning("MLX kernel JIT set-up failed (%s): MLX defaults", exc)
        return "set-up failed"
    return {"PATH": f"{root / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
            "TMPDIR": str(root / "kernels")}


def use_native_cpu_jit(on_cpu: bool) -> str:
    """Set this process's PATH and TMPDIR for MLX's CPU kernel builds (before
    the first compiled function runs); says what it did."""
    env = native_jit_environment(on_cpu)
    if isinstance(env, str):
        return f"MLX kernel JIT: MLX defaults ({env})"
    os.environ.update(env)
    return f"MLX kernel JIT: {' '.join(_FLAGS)}, kernels in {env['TMPDIR']}"
