"""Request bodies of the admin model routes (`/admin/models/load`, `/unload`)."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from msgspec import Meta

from lmx_gateway.openai.schemas import ModelName


class LoadRequest(msgspec.Struct, kw_only=True):
    model_id: ModelName
    backend: str | None = None
    served_name: Annotated[str, Meta(min_length=1, pattern=r"^[^\s]+$")] | None = None
    allow_unsupported_runtime: bool = False
    auto_download: bool = False
    performance_overrides: dict[str, Any] | None = None
    # An MLX model tensor-parallel across these hosts ("local", node names),
    # one rank each, rank 0 first (see lmx_supervisor.workers.shard_group).
    shards: list[Annotated[str, Meta(min_length=1)]] | None = None
    # Where the worker runs: "local" or a joined node's name (GET
    # /admin/nodes); None: this host if the model fits, else a node with room.
    node: Annotated[str, Meta(min_length=1, max_length=64,
                              pattern=r"^[A-Za-z0-9._-]+$")] | None = None


class UnloadRequest(msgspec.Struct, kw_only=True):
    model_id: ModelName
