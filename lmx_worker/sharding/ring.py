"""Joining MLX's ring backend from a ShardSpec.

MLX reads the group from its environment: MLX_RANK and MLX_HOSTFILE, a
JSON file listing, per rank, the "ip:port" addresses that rank listens on
(its left neighbour connects to them). `init` blocks until the ring is
closed, so a worker that returns from here is part of a complete group.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from typing import Any

import mlx.core as mx

from lmx_worker.process.spec import ShardSpec

log = logging.getLogger("lmx.worker.sharding")


def join_ring(shard: ShardSpec) -> Any:  # mx.distributed.Group (mlx is untyped here)
    if not 0 <= shard.rank < len(shard.ring_hosts) or len(shard.ring_hosts) < 2:
        raise ValueError(f"rank {shard.rank} does not fit a group of "
                         f"{len(shard.ring_hosts)} ranks")
    fd, hostfile = tempfile.mkstemp(prefix="lmx-ring-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as out:
            json.dump([[host] for host in shard.ring_hosts], out)
        os.environ["MLX_RANK"] = str(shard.rank)
        os.environ["MLX_HOSTFILE"] = hostfile
        group = mx.distributed.init(strict=True, backend="ring")
    finally:
        os.unlink(hostfile)
    if group.size() != len(shard.ring_hosts) or group.rank() != shard.rank:
        raise RuntimeError(f"ring joined as rank {group.rank()} of {group.size()}, "
                           f"not {shard.rank} of {len(shard.ring_hosts)}")
    log.info("rank %d of %d joined the ring %s", shard.rank, group.size(), shard.ring_hosts)
    return group
