"""What the supervisor tells a worker to be, passed as JSON on the command
line so a worker can be started by hand for debugging."""

from __future__ import annotations

from typing import Literal

import msgspec


class ShardSpec(msgspec.Struct, forbid_unknown_fields=True):
    """This worker's place in a tensor-parallel group of one MLX model
    (lmx_worker.sharding): its rank and every rank's ring address
    ("ip:port", MLX's ring backend), rank order. Rank 0 talks to the
    supervisor; the others talk only to the group."""

    rank: int
    ring_hosts: list[str]


class WorkerSpec(msgspec.Struct, forbid_unknown_fields=True):
    worker_id: str
    model_id: str
    model_path: str
    backend: str
    address: str
    context_length: int = 4096
    n_threads: int | None = None
    # Read end of a pipe whose write end only the parent holds: EOF on it
    # means the parent is gone, so the worker must exit and free its memory.
    death_fd: int | None = None
    # RLIMIT_DATA the worker sets on itself before loading (None: no cap).
    memory_cap_bytes: int | None = None
    # Concurrent sequences decoded together (llama.cpp parallel slots).
    parallel_slots: int = 1
    # MLX: dequantize weights ("auto": on a CPU yes, on a GPU no; see mlx_weights).
    mlx_dequantize: Literal["auto"] | bool = "auto"
    # llama.cpp: threads for prompt batches (None: n_threads), logical batch
    # size (None: 512), flash attention (None: off unless the KV cache is
    # quantized, which needs it), and the K/V cache type.
    n_threads_batch: int | None = None
    n_batch: int | None = None
    flash_attn: bool | None = None
    kv_cache_type: Literal["f16", "q8_0", "q4_0"] = "f16"
    # Write end of the heartbeat pipe (see lmx_worker.process.heartbeat), and how
    # often the worker writes to it. None: no heartbeat (a worker run by hand).
    heartbeat_fd: int | None = None
    heartbeat_interval_sec: float = 1.0
    # Step time the running streams may see while a new prompt is read: the
    # worker sizes each step's prompt chunk to it (lmx_worker.engines.step_budget).
    # 0: no budget (prompts are read in full batches beside the streams).
    max_inter_token_ms: float = 250.0
    # Set for one rank of a sharded MLX model; None: the whole model here.
    shard: ShardSpec | None = None
    # A worker on a node (tcp address): the supervisor's CURVE public key
    # (Z85) and the 0600 file holding the node's key pair the DEALER uses.
    curve_server_key: str | None = None
    curve_key_file: str | None = None


def encode_spec(spec: WorkerSpec) -> str:
    return msgspec.json.encode(spec).decode()


def decode_spec(text: str) -> WorkerSpec:
    return msgspec.json.decode(text, type=WorkerSpec)
