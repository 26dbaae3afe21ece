"""Exit statuses a worker uses on purpose, so the supervisor can tell a
deliberate exit from a crash."""

from __future__ import annotations

EXIT_LOAD_FAILED = 3
# The worker ran out of memory under its cap and exited after telling the
# supervisor (a Failed frame with ErrorCode.OUT_OF_MEMORY).
EXIT_OUT_OF_MEMORY = 4
# A rank of a sharded model lost its group (a peer died, a collective
# failed): the group's state is gone, only a restart of every rank helps.
EXIT_SHARD_GROUP_BROKEN = 5
