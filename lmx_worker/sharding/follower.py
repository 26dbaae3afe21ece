"""A rank > 0 of a sharded group: connects to nothing but the group, takes
each step rank 0 orders (lmx_worker.sharding.orders) and writes heartbeats
to the supervisor's pipe (through its node agent when remote). It never
decides anything on its own: which requests run, their prompt tokens and
seeds, how much of a prompt a step reads and which sequences end all come
from rank 0, so its collectives always match rank 0's."""

from __future__ import annotations

import logging
import traceback

import msgspec

from lmx_protocol import Generate
from lmx_worker.process.exit_codes import EXIT_LOAD_FAILED, EXIT_SHARD_GROUP_BROKEN
from lmx_worker.process.heartbeat import Progress, start_heartbeat
from lmx_worker.process.main import apply_memory_cap, die_with_parent, watch_parent
from lmx_worker.process.spec import WorkerSpec
from lmx_worker.sharding.group_engine import GroupEngine, group_broken
from lmx_worker.sharding.orders import Admit, StepOrder

log = logging.getLogger("lmx.worker.sharding")


class ShardFollowerEngine(GroupEngine):
    def __init__(self, spec: WorkerSpec) -> None:
        self._given_prompt: list[int] = []  # the prompt of the Admit being applied
        super().__init__(spec)

    def _prompt_tokens(self, request: Generate) -> list[int]:
        return list(self._given_prompt)  # rank 0's, not re-templated here

    def follow(self, order: StepOrder) -> None:
        if order.retired:
            self._retire(order.retired)
        for command in order.commands:
            if isinstance(command, Admit):
                self._given_prompt = command.prompt
                # Logprobs are rank 0's to report; they change no token.
                request = msgspec.structs.replace(
                    command.request, params=msgspec.structs.replace(command.request.params,
                                                                    logprobs=False))
                super().add(request)
            else:
                super().abort(command.request_id)
        self._admit()
        self._gen.prefill_batch_size = order.prefill_batch_size
        self._gen.prefill_step_size = order.prefill_step_size
        progress, responses = self._gen.next()
        self._track_reading(progress)
        for response in responses:
            job = self._active.get(response.uid)
            if job is not None:  # rank 0 decides when it ends (order.retired)
                job.generated.append(int(response.token))


def serve_follower(spec: WorkerSpec) -> int:
    if spec.death_fd is not None:
        watch_parent(spec.death_fd)
        die_with_parent()
    progress = Progress()
    if spec.heartbeat_fd is not None:
        start_heartbeat(spec.heartbeat_fd, spec.heartbeat_interval_sec, progress)
    apply_memory_cap(spec.memory_cap_bytes)
    try:
        engine = ShardFollowerEngine(spec)
    except Exception as exc:
        log.error("load failed: %s", "".join(traceback.format_exception_only(exc)).strip())
        return EXIT_LOAD_FAILED
    while True:
        try:
            order = engine.channel.receive()
        except RuntimeError as exc:  # rank 0 or a neighbour is gone
            group_broken(f"waiting for the next step: {exc}")
        progress.tick()
        try:
            engine.follow(order)
        except Exception as exc:  # this rank cannot keep step with the others
            log.exception("following a step failed")
            group_broken(f"{type(exc).__name__}: {exc}")
        progress.tick()
    return EXIT_SHARD_GROUP_BROKEN  # not reached: the loop ends the process
