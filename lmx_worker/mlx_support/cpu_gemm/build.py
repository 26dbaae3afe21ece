"""Build `small_gemm.cpp` for this host, once per user, and load it.

The extension is compiled on the machine that runs it, with -march=native
(the compiler picks the vector instructions: AVX-512, AVX2, NEON), against
the installed MLX's headers and libmlx, and nanobind's sources from the
`nanobind` package. It must share nanobind's ABI with `mlx.core` (its array
type is looked up in nanobind's registry under MLX's domain, "mlx"): a
mismatch shows as a TypeError at the first call, which the package's
self-check (cpu_gemm.load_kernel) provokes and reports as a reason to fall
back.

The library lands in a private per-user cache (the same rules as MLX's JIT
kernels, lmx_worker.mlx_support.cpu_jit: code there is dlopen()ed, so nobody
else may write it), under a name that changes with everything the binary
depends on: the source and this recipe, MLX, nanobind, Python, the compiler
and the CPU's feature flags (a home directory shared between two machines
must not hand one the other's instructions). Concurrent workers build under
a file lock; the result is moved into place whole; the cache keeps the few
most recently used builds.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import sysconfig
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from types import ModuleType

from lmx_worker.mlx_support.cpu_jit import lmx_cache_dir, private_dir

log = logging.getLogger("lmx.worker")

SOURCE = Path(__file__).with_name("small_gemm.cpp")
MODULE = "_small_gemm"
BUILD_TIMEOUT_SEC = 300
KEEP_BUILDS = 3  # ~330 KB each
# -ffp-contract=fast: multiply-adds as FMA instructions (ISO C++ mode would
# forbid the contraction); -funroll-loops: ~10 % at 8 rows, measured.
FLAGS = ("-std=c++20", "-O3", "-march=native", "-ffp-contract=fast", "-funroll-loops",
         "-fPIC", "-shared", "-fvisibility=hidden", "-fopenmp", "-DNDEBUG",
         "-DNB_DOMAIN=mlx")


class BuildError(Exception):
    """Why the extension is not available (the caller falls back)."""


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return os.uname().machine


def _compiler() -> str:
    name = os.environ.get("CXX", "g++")
    found = shutil.which(name)
    if found is None:
        raise BuildError(f"no C++ compiler ({name} not on PATH)")
    return found


def _compiler_id(compiler: str) -> str:
    try:
        done = subprocess.run([compiler, "--version"], capture_output=True, text=True,
                              timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BuildError(f"{compiler} does not run: {exc}") from exc
    return done.stdout.splitlines()[0] if done.stdout else compiler


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    # mlx is a namespace package: no __init__.py, so no origin; its folder.
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    if not folders:
        raise BuildError(f"the {name} package is not installed")
    return Path(folders[0])


def _build_key(compiler_id: str) -> str:
    try:
        versions = f"mlx {version('mlx')} nanobind {version('nanobind')}"
    except PackageNotFoundError as exc:
        raise BuildError(f"{exc.name} is not installed") from exc
    # This file too: a change to how the library is built is a new library.
    parts = [SOURCE.read_bytes(), Path(__file__).read_bytes(), versions.encode(),
             sys.version.encode(), compiler_id.encode(), _cpu_flags().encode()]
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part + b"\0")
    return digest.hexdigest()[:16]


def _compile(compiler: str, target: Path) -> None:
    mlx_dir, nb_dir = _package_dir("mlx"), _package_dir("nanobind")
    command = [
        compiler, *FLAGS,
        f"-I{nb_dir / 'include'}", f"-I{nb_dir / 'ext' / 'robin_map' / 'include'}",
        f"-I{sysconfig.get_paths()['include']}", f"-I{mlx_dir / 'include'}",
        str(SOURCE), str(nb_dir / "src" / "nb_combined.cpp"),
        # No rpath: the library is shared by every venv with the same MLX
        # version, and its libmlx.so is the one mlx.core has already loaded
        # (same soname) by the time load() imports it.
        f"-L{mlx_dir / 'lib'}", "-lmlx",
        "-o", str(target),
    ]
    try:
        done = subprocess.run(command, capture_output=True, text=True,
                              timeout=BUILD_TIMEOUT_SEC, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BuildError(f"compiling small_gemm failed: {exc}") from exc
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise BuildError(f"compiling small_gemm failed: {' / '.join(tail)}")


def _remove_old_builds(root: Path) -> None:
    """The cache keeps the KEEP_BUILDS most recently used libraries (a new MLX
    or source version builds a new one; two installs of different versions
    side by side must not rebuild in turn). A worker that loaded a removed
    one keeps its mapping."""
    builds = sorted(root.glob(f"{MODULE}-*"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in builds[KEEP_BUILDS:]:
        old.unlink(missing_ok=True)


def library_path() -> Path:
    """The built extension for this host, compiling it first if needed."""
    compiler = _compiler()
    key = _build_key(_compiler_id(compiler))
    root = lmx_cache_dir() / "mlx-gemm"
    try:
        if not private_dir(root):
            raise BuildError(f"{root} is writable by others")
        target = root / f"{MODULE}-{key}{sysconfig.get_config_var('EXT_SUFFIX')}"
        if target.exists():
            with contextlib.suppress(OSError):
                os.utime(target)  # used now: the last to be removed
            return target
        with open(root / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another worker may be building it
            if not target.exists():
                staged = target.with_name(f".{target.name}.{os.getpid()}")
                log.info("building the small-batch matmul kernel for this CPU (%s)", target)
                try:
                    _compile(compiler, staged)
                    staged.replace(target)
                finally:
                    staged.unlink(missing_ok=True)
                _remove_old_builds(root)
        return target
    except OSError as exc:
        raise BuildError(f"cache {root}: {exc}") from exc


def load() -> ModuleType:
    """Import the extension built for this host; BuildError says why not."""
    path = library_path()
    spec = importlib.util.spec_from_file_location(MODULE, path)
    if spec is None or spec.loader is None:
        raise BuildError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # ImportError, or the module's init raising
        raise BuildError(f"importing {path.name} failed: {exc!r}") from exc
    return module
