"""Running one request on a model's worker, for every route: chat,
completions, Anthropic Messages, Responses, the benchmark route and the
encoders. This module owns what they all need, in one place:

- the inference deadline (`models.inference_timeout_sec`; running past it
  aborts the work and is a 504);
- the gateway's in-flight count (counted in when a run starts, out exactly
  once however it ends);
- the request's metrics record (bound to the model actually serving it);
- whole answers (`run_collect`) and streams whose first item is awaited
  before any header goes out (`StreamRun`), so an early failure (busy,
  timeout, dead worker) still reaches the client with its real status.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import TypeVar

from lmx_gateway.http.disconnect import abort_on_disconnect
from lmx_gateway.inference.prompt_size import check_prompt_size
from lmx_gateway.observability.inference_record import current_record
from lmx_gateway.state import GatewayState
from lmx_protocol import (
    Embed,
    Embeddings,
    Finished,
    FinishReason,
    Generate,
    Rerank,
    Scores,
    TokenLogprob,
    Tokens,
)
from lmx_supervisor.errors import InferenceTimeout, LMXError, WorkerError
from lmx_supervisor.lifecycle.managed_model import ManagedModel

T = TypeVar("T")


class _Run:
    """What every run shares: the deadline, the in-flight count and the
    request's metrics record."""

    def __init__(self, state: GatewayState, model: ManagedModel, stream: bool) -> None:
        self._state = state
        self.model = model
        self.timeout_sec = state.config.models.inference_timeout_sec
        self._deadline = time.monotonic() + self.timeout_sec
        self.started = time.monotonic()
        # The request's metrics account, if it came through the middleware.
        self.record = current_record.get()
        if self.record is not None:
            self.record.bind(model.model_id)
            self.record.stream = stream
        state.in_flight += 1
        self._counted = True
        # One timer for the whole run, not an asyncio.timeout per streamed
        # item (an object and a timer-heap entry per token, a sixth of the
        # gateway's CPU for a stream). It cancels the task waiting in
        # _within_deadline, or marks the run so the next wait fails at once.
        self._timer: asyncio.TimerHandle | None = None
        self._waiter: asyncio.Task[object] | None = None
        self._expired = False

    def _count_out(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._counted:
            self._counted = False
            self._state.in_flight -= 1

    def _expire(self) -> None:
        self._expired = True
        if self._waiter is not None:
            self._waiter.cancel()

    async def _within_deadline(self, step: Awaitable[T]) -> T:
        """`step` under the run's deadline; failures are recorded."""
        if self._expired:  # it passed while the caller was busy elsewhere
            if isinstance(step, Coroutine):
                step.close()
            raise self._timed_out()
        task = asyncio.current_task()
        assert task is not None, "a run is always awaited in a task"
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(
                self._deadline - time.monotonic(), self._expire)
        # As asyncio.timeout: a cancellation is ours only if nobody else's
        # is pending on the task too.
        cancelling = task.cancelling()
        self._waiter = task
        try:
            return await step
        except asyncio.CancelledError:
            # _expired was False when this wait began: if it is True now, the
            # timer fired during the wait and cancelled this task.
            if self._expired and task.uncancel() <= cancelling:
                raise self._timed_out() from None
            raise
        except LMXError as exc:
            self._fail(exc)
            raise
        finally:
            self._waiter = None

    def _timed_out(self) -> InferenceTimeout:
        error = InferenceTimeout(
            f"Request on '{self.model.model_id}' exceeded {self.timeout_sec:g}s "
            "(models.inference_timeout_sec)")
        self._fail(error)
        return error

    def _fail(self, error: LMXError) -> None:
        if self.record is not None:
            self.record.on_error(error.code, error.message)


class Generation(_Run):
    """A model's token stream under the run's deadline. `close()` aborts what
    the worker still runs and counts the request out; safe to call twice."""

    def __init__(self, state: GatewayState, model: ManagedModel, frame: Generate,
                 stream: bool) -> None:
        check_prompt_size(model, frame, state.config.server.max_prompt_chars_per_token)
        super().__init__(state, model, stream)
        self._stream: AsyncGenerator[Tokens | Finished, None] = model.generate(frame)
        self.first_token_at: float | None = None
        self._request_id = frame.request_id
        self._prompt_tokens = 0
        self._completion_tokens = 0

    async def next(self) -> Tokens | Finished:
        try:
            item = await self._within_deadline(self._stream.__anext__())
        except StopAsyncIteration:
            error = WorkerError("worker stream ended without a Finished frame")
            self._fail(error)
            raise error from None
        except InferenceTimeout:
            await self.close()
            raise
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()
        if isinstance(item, Tokens):
            self._prompt_tokens = item.prompt_tokens or self._prompt_tokens
            self._completion_tokens += len(item.token_ids)
        if self.record is not None:
            self.record.on_item(item)
        return item

    async def end_early(self) -> Finished:
        """The caller has all it needs (the turn is over: see
        tool_calls.ToolCallParser.ended): abort the rest in the worker and
        finish as a normal stop, counting the tokens generated so far."""
        await self.close()
        finished = Finished(self._request_id, FinishReason.STOP, self._prompt_tokens,
                            self._completion_tokens)
        if self.record is not None:
            self.record.on_item(finished)
        return finished

    async def close(self) -> None:
        self._count_out()
        await self._stream.aclose()


@dataclass
class Collected:
    text: str
    finished: Finished
    logprobs: list[TokenLogprob] = field(default_factory=list)


# Fed each piece of text as it arrives; True when the answer is complete
# before the model says so (a repeated tool call ended the turn).
TurnEnded = Callable[[str], bool]


async def collect(gen: Generation, turn_ended: TurnEnded | None = None) -> Collected:
    """Every item of `gen` up to its Finished frame (or until `turn_ended`);
    closes `gen`, at once if the client goes away first (ClientDisconnected)."""
    parts: list[str] = []
    logprobs: list[TokenLogprob] = []
    try:
        async with abort_on_disconnect():
            while True:
                item = await gen.next()
                parts.append(item.text)
                if isinstance(item, Finished):
                    return Collected("".join(parts), item, logprobs)
                if item.logprobs:
                    logprobs.extend(item.logprobs)
                if turn_ended is not None and turn_ended(item.text):
                    return Collected("".join(parts), await gen.end_early(), logprobs)
    finally:
        await gen.close()


async def run_collect(state: GatewayState, model: ManagedModel, frame: Generate,
                      turn_ended: TurnEnded | None = None) -> Collected:
    """A whole answer."""
    return await collect(Generation(state, model, frame, stream=False), turn_ended)


class StreamRun:
    """A generation whose first item has arrived; `items()` yields it and
    everything after, and releases the generation however the stream ends."""

    def __init__(self, gen: Generation, first: Tokens | Finished) -> None:
        self._gen = gen
        self.first = first

    @classmethod
    async def start(cls, state: GatewayState, model: ManagedModel, frame: Generate
                    ) -> StreamRun:
        gen = Generation(state, model, frame, stream=True)
        try:
            async with abort_on_disconnect():  # a client may leave while queued
                first = await gen.next()
        except BaseException:
            await gen.close()
            raise
        return cls(gen, first)

    async def items(self, turn_ended: Callable[[], bool] | None = None
                    ) -> AsyncGenerator[Tokens | Finished, None]:
        """The generation's items. `turn_ended` is asked after each Tokens
        item has been consumed; when it says the answer is complete, the
        generation is aborted and a Finished (stop) ends the items."""
        try:
            item = self.first
            yield item
            while not isinstance(item, Finished):
                if turn_ended is not None and turn_ended():
                    yield await self._gen.end_early()
                    return
                item = await self._gen.next()
                yield item
        finally:
            await self.release()

    async def release(self) -> None:
        """Count the request out and abort what the worker still runs. Safe to
        call twice; the response calls it too, because a client that leaves
        before the body starts means `items()` never runs (nor its finally)."""
        await self._gen.close()


class EncoderRun(_Run):
    """One embedding or rerank request, accounted in the metrics like a
    generation (prompt tokens, no output)."""

    async def run(self, frame: Embed | Rerank) -> Embeddings | Scores:
        try:
            result = await self._within_deadline(self.model.encode(frame))
        finally:
            self._count_out()
        if self.record is not None:
            self.record.on_item(Finished(frame.request_id, FinishReason.STOP,
                                         result.prompt_tokens, 0))
        return result


async def run_encoder(state: GatewayState, model: ManagedModel, frame: Embed | Rerank
                      ) -> Embeddings | Scores:
    return await EncoderRun(state, model, stream=False).run(frame)
