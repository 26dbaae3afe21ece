"""Running one generation for a route: the inference deadline, collecting a
whole answer, and the streaming pre-flight that turns early failures into
proper HTTP statuses."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field

from lmx_gateway.inference_record import current_record
from lmx_protocol import Finished, Generate, TokenLogprob, Tokens
from lmx_supervisor.errors import InferenceTimeout, LMXError
from lmx_supervisor.managed_model import ManagedModel


class Generation:
    """A model's token stream with an overall deadline
    (`models.inference_timeout_sec`). Timing out aborts the work."""

    def __init__(self, model: ManagedModel, frame: Generate, timeout_sec: float) -> None:
        self.model = model
        self.timeout_sec = timeout_sec
        self._deadline = time.monotonic() + timeout_sec
        self._stream: AsyncGenerator[Tokens | Finished, None] = model.generate(frame)
        self.started = time.monotonic()
        self.first_token_at: float | None = None
        # The request's metrics account, if it came through the middleware.
        self.record = current_record.get()
        if self.record is not None:
            self.record.bind(model.model_id)

    async def next(self) -> Tokens | Finished | None:
        try:
            async with asyncio.timeout(self._deadline - time.monotonic()):
                item = await self._stream.__anext__()
        except StopAsyncIteration:
            return None
        except TimeoutError:
            await self.close()
            error = InferenceTimeout(
                f"Generation on '{self.model.model_id}' exceeded "
                f"{self.timeout_sec:g}s (models.inference_timeout_sec)")
            if self.record is not None:
                self.record.on_error(error.code, error.message)
            raise error from None
        except LMXError as exc:
            if self.record is not None:
                self.record.on_error(exc.code, exc.message)
            raise
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()
        if self.record is not None:
            self.record.on_item(item)
        return item

    async def close(self) -> None:
        await self._stream.aclose()


@dataclass
class Collected:
    text: str
    finished: Finished
    logprobs: list[TokenLogprob] = field(default_factory=list)


async def collect(gen: Generation) -> Collected:
    parts: list[str] = []
    logprobs: list[TokenLogprob] = []
    try:
        while True:
            item = await gen.next()
            if item is None:
                raise RuntimeError("worker stream ended without a Finished frame")
            parts.append(item.text)
            if isinstance(item, Finished):
                return Collected("".join(parts), item, logprobs)
            if item.logprobs:
                logprobs.extend(item.logprobs)
    finally:
        await gen.close()
