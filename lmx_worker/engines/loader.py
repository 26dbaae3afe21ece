"""Picks and builds the engine a WorkerSpec asks for. Backends are imported
lazily: a worker only pays for the library it uses."""

from __future__ import annotations

import logging

from lmx_worker.engines.engine import Engine
from lmx_worker.process.spec import WorkerSpec

log = logging.getLogger("lmx.worker")


def prepare_mlx(spec: WorkerSpec) -> None:
    """OpenBLAS before MLX loads, then MLX's kernel JIT set up for this CPU."""
    from lmx_worker.mlx_support.system_blas import use_system_blas

    use_system_blas(spec.n_threads)  # before MLX loads: see system_blas
    import mlx.core as mx

    from lmx_worker.mlx_support.cpu_jit import use_native_cpu_jit

    on_cpu = mx.default_device().type == mx.cpu
    log.info("%s", use_native_cpu_jit(on_cpu))


def load_engine(spec: WorkerSpec) -> Engine:
    if spec.backend == "llama_cpp":
        from lmx_worker.engines.llama_cpp_engine import LlamaCppEngine

        return LlamaCppEngine(spec)
    if spec.backend == "mlx":
        prepare_mlx(spec)
        if spec.shard is not None:  # rank 0 of a sharded group (the others follow it)
            from lmx_worker.sharding.leader import ShardLeaderEngine

            return ShardLeaderEngine(spec)
        from lmx_worker.engines.mlx_engine import MlxEngine

        return MlxEngine(spec)
    if spec.backend == "mlx_encoder":
        prepare_mlx(spec)
        from lmx_worker.encoders.mlx_encoder_engine import MlxEncoderEngine

        return MlxEncoderEngine(spec)
    if spec.backend == "llama_cpp_encoder":
        from lmx_worker.encoders.llama_cpp_encoder_engine import LlamaCppEncoderEngine

        return LlamaCppEncoderEngine(spec)
    raise ValueError(f"backend '{spec.backend}' is not available in this worker")
