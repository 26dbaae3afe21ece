"""Running one Generate for a route that is a translation (Anthropic
Messages, Responses): the in-flight count, a whole answer, or a stream whose
first item is awaited before any header goes out, so an early failure
(busy, timeout, dead worker) still reaches the client with its real status."""

from __future__ import annotations

from collections.abc import AsyncGenerator

from lmx_gateway.generation import Collected, Generation, collect
from lmx_gateway.state import GatewayState
from lmx_protocol import Finished, Generate, Tokens
from lmx_supervisor.managed_model import ManagedModel


def _generation(state: GatewayState, model: ManagedModel, frame: Generate, stream: bool
                ) -> Generation:
    gen = Generation(model, frame, state.config.models.inference_timeout_sec)
    if gen.record is not None:
        gen.record.stream = stream
    return gen


async def run_collect(state: GatewayState, model: ManagedModel, frame: Generate) -> Collected:
    gen = _generation(state, model, frame, stream=False)
    state.in_flight += 1
    try:
        return await collect(gen)
    finally:
        state.in_flight -= 1


class StreamRun:
    """A generation whose first item has arrived; `items()` yields it and
    everything after, and releases the generation however the stream ends."""

    def __init__(self, state: GatewayState, gen: Generation, first: Tokens | Finished) -> None:
        self._state = state
        self._gen = gen
        self.first = first
        self._released = False

    @classmethod
    async def start(cls, state: GatewayState, model: ManagedModel, frame: Generate
                    ) -> StreamRun:
        gen = _generation(state, model, frame, stream=True)
        state.in_flight += 1
        try:
            first = await gen.next()
        except BaseException:
            state.in_flight -= 1
            await gen.close()
            raise
        if first is None:
            state.in_flight -= 1
            await gen.close()
            raise RuntimeError("worker stream ended without a Finished frame")
        return cls(state, gen, first)

    async def items(self) -> AsyncGenerator[Tokens | Finished, None]:
        try:
            item: Tokens | Finished | None = self.first
            while item is not None:
                yield item
                if isinstance(item, Finished):
                    return
                item = await self._gen.next()
            raise RuntimeError("worker stream ended without a Finished frame")
        finally:
            await self.release()

    async def release(self) -> None:
        """Count the request out and abort what the worker still runs. Safe to
        call twice; the response calls it too, because a client that leaves
        before the body starts means `items()` never runs (nor its finally)."""
        if self._released:
            return
        self._released = True
        self._state.in_flight -= 1
        await self._gen.close()
