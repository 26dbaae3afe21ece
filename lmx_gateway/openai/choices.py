"""`n` choices of one OpenAI request.

The choices run as n generations on the same worker, which decodes them in
one batch. They share the prompt's prefill: choice 0 starts alone, and the
others are only sent once its first token has arrived, i.e. once its prompt
is in the worker's KV cache; the worker then starts them from a copy of
that KV (llama.cpp copies the slot's KV stream, MLX the running sequence's
cache) instead of reading the prompt again. With a seed, choice i samples
with seed + i, so the choices differ and the request stays reproducible.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

import msgspec

from lmx_gateway.inference.generation import Collected, StreamRun
from lmx_gateway.state import GatewayState
from lmx_protocol import Finished, Generate, TokenLogprob
from lmx_supervisor.errors import LMXError, WorkerError
from lmx_supervisor.lifecycle.managed_model import ManagedModel


def choice_frames(frame: Generate, n: int) -> list[Generate]:
    if n == 1:
        return [frame]
    seed = frame.params.seed
    return [msgspec.structs.replace(
        frame, request_id=f"{frame.request_id}-{i}",
        params=(frame.params if seed is None
                else msgspec.structs.replace(frame.params, seed=seed + i)))
        for i in range(n)]


async def start_choices(state: GatewayState, model: ManagedModel, frames: list[Generate]
                        ) -> list[StreamRun]:
    """Every choice started (first item arrived); if one fails to start, the
    others are released and its error is raised."""
    lead = await StreamRun.start(state, model, frames[0])
    if len(frames) == 1:
        return [lead]
    started = await asyncio.gather(*(StreamRun.start(state, model, f) for f in frames[1:]),
                                   return_exceptions=True)
    runs = [lead] + [r for r in started if isinstance(r, StreamRun)]
    failure = next((r for r in started if isinstance(r, BaseException)), None)
    if failure is not None:
        for run in runs:
            await run.release()
        raise failure
    return runs


async def collect_run(run: StreamRun) -> Collected:
    parts: list[str] = []
    logprobs: list[TokenLogprob] = []
    async for item in run.items():
        parts.append(item.text)
        if isinstance(item, Finished):
            return Collected("".join(parts), item, logprobs)
        if item.logprobs:
            logprobs.extend(item.logprobs)
    raise WorkerError("worker stream ended without a Finished frame")


async def collect_choices(runs: list[StreamRun]) -> list[Collected]:
    """Every choice's whole answer; the first failure fails the request (the
    other choices are cancelled, which releases them)."""
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(collect_run(run)) for run in runs]
    except BaseExceptionGroup as failures:
        first = failures.exceptions[0]
        raise first if isinstance(first, LMXError) else failures from None
    finally:
        for run in runs:
            await run.release()
    return [task.result() for task in tasks]


async def interleave(streams: list[AsyncGenerator[bytes, None]]
                     ) -> AsyncGenerator[bytes, None]:
    """The choices' chunks in turn, one at a time from each unfinished
    choice (they decode in the same batch steps, so they advance together),
    as OpenAI interleaves choices by index."""
    live = list(streams)
    try:
        while live:
            for stream in list(live):
                try:
                    yield await anext(stream)
                except StopAsyncIteration:
                    live.remove(stream)
    finally:
        for stream in streams:
            await stream.aclose()


def usage(finished: list[Finished]) -> dict[str, int]:
    """The prompt counts once (it was read once); completions add up."""
    prompt = finished[0].prompt_tokens
    completion = sum(f.completion_tokens for f in finished)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}
