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

log = logging.getLogger("lmx.worker")

_CANDIDATES = ("libopenblas.so.0", "libopenblas.so")
_loaded: str | None = None


def use_system_blas(n_threads: int | None = None) -> str | None:
    """Load OpenBLAS globally; returns the library name, or None."""
    global _loaded
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
        # The worker's thread share, for every batch size: one thread fewer
        # while several sequences decode measured faster only with LMX's old
        # CPU layout (lmx_worker/mlx_support/mlx_cpu_layout); with the stock layout, the
        # engine in one process, SmolLM2 float32 on 2 cores, 8 sequences ran
        # 89.6 / 82.1 tok/s with 2 threads against 75.3 / 74.2 with 1.
        setter = getattr(lib, "openblas_set_num_threads", None)
        if n_threads and setter is not None:
            setter(ctypes.c_int(n_threads))
        _loaded = name
        return name
    log.info("OpenBLAS not found: MLX uses its bundled reference BLAS (slow on CPU)")
    return None
