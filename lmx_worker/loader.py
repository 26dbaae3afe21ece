"""Picks and builds the engine a WorkerSpec asks for. Backends are imported
lazily: a worker only pays for the library it uses."""

from __future__ import annotations

from lmx_worker.engine import Engine
from lmx_worker.spec import WorkerSpec


def load_engine(spec: WorkerSpec) -> Engine:
    if spec.backend == "llama_cpp":
        from lmx_worker.llama_cpp_engine import LlamaCppEngine

        return LlamaCppEngine(spec)
    raise ValueError(f"backend '{spec.backend}' is not available in this worker")
