"""Route MLX's CPU matmuls to OpenBLAS when the system has it.

The Linux `mlx-cpu` wheel carries its own copy of the reference BLAS
(mlx_cpu.libs/libblas-*.so, found through libmlx.so's RPATH), whose sgemm is
single-threaded and unblocked: measured here ~15x slower than OpenBLAS for
a BERT layer's matmuls. Loading OpenBLAS into the process's global symbol
scope *before* libmlx.so is loaded makes the dynamic linker bind libmlx's
`cblas_sgemm` to it (the global scope is searched before a library's own
dependencies). The arithmetic is the same GEMM, so results agree to float32
rounding.

Nothing happens off Linux (macOS builds use Accelerate), when MLX is already
imported, or when OpenBLAS is absent (lmx.sh installs Debian's
libopenblas0-pthread as root). LMX_MLX_SYSTEM_BLAS=0 turns it off.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
from typing import Any

log = logging.getLogger("lmx.worker")

_CANDIDATES = ("libopenblas.so.0", "libopenblas.so")
_loaded: str | None = None
_setter: Any = None  # openblas_set_num_threads, once OpenBLAS is loaded


def batch_blas_threads(n_threads: int | None, batch: int) -> int:
    """OpenBLAS threads for an MLX decode step over `batch` sequences: every
    thread of the worker's share, whatever the batch. (One fewer for batches
    was measured faster with LMX's CPU layout, which is off now; with the
    stock layout, the engine in one process, SmolLM2 float32 on 2 cores:
    8 sequences 89.6 / 82.1 tok/s with 2 threads against 75.3 / 74.2 with 1.)"""
    del batch  # kept in the signature: the choice may depend on it on other hosts
    return n_threads or os.cpu_count() or 1


def set_blas_threads(n: int) -> bool:
    """Change OpenBLAS's thread count for later calls (it only stores the
    number when n does not exceed the threads it started with). False when
    OpenBLAS is not the BLAS in use."""
    if _setter is None:
        return False
    _setter(ctypes.c_int(n))
    return True


def use_system_blas(n_threads: int | None = None) -> str | None:
    """Load OpenBLAS globally; returns the library name, or None."""
    global _loaded, _setter
    if _loaded is not None:
        return _loaded
    if not sys.platform.startswith("linux") or os.environ.get("LMX_MLX_SYSTEM_BLAS") == "0":
        return None
    if "mlx.core" in sys.modules:
        log.warning("MLX already loaded: its bundled reference BLAS stays in use")
        return None
    for name in _CANDIDATES:
        try:
            lib = ctypes.CDLL(name, mode=os.RTLD_NOW | os.RTLD_GLOBAL)
        except OSError:
            continue
        _setter = getattr(lib, "openblas_set_num_threads", None)
        if n_threads and _setter is not None:
            _setter(ctypes.c_int(n_threads))
        _loaded = name
        return name
    log.info("OpenBLAS not found: MLX uses its bundled reference BLAS (slow on CPU)")
    return None
