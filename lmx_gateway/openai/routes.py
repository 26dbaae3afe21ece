"""OpenAI-compatible inference routes: /v1/chat/completions, /v1/completions,
/v1/models."""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncGenerator, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from lmx_gateway.access.scopes import GENERATION_ERRORS, INFERENCE, JSON, SSE, ScopedRoute
from lmx_gateway.encoders.routes import encoder_listing
from lmx_gateway.http.body import read_json
from lmx_gateway.http.errors import error_payload
from lmx_gateway.http.sse import DONE, EventStreamResponse, sse_data
from lmx_gateway.inference.generation import Collected, StreamRun, run_collect
from lmx_gateway.inference.routing import route_request
from lmx_gateway.inference.tool_calls import ParseEvent, ToolCallParser
from lmx_gateway.observability.inference_record import current_record
from lmx_gateway.openai.chat_tools import (
    chat_message,
    event_delta,
    finish_reason,
    tool_parser,
    turn_watch,
)
from lmx_gateway.openai.choices import (
    choice_frames,
    collect_choices,
    interleave,
    start_choices,
    usage,
)
from lmx_gateway.openai.logprobs import chat_logprobs, completion_logprobs
from lmx_gateway.openai.request_surface import UNSUPPORTED, check_n, log_tags
from lmx_gateway.openai.sampling import chat_generate_async, completion_generate
from lmx_gateway.openai.schemas import ChatCompletionRequest, CompletionRequest, SamplingFields
from lmx_gateway.state import gateway_state
from lmx_protocol import Finished, Generate, TokenLogprob, Tokens
from lmx_supervisor.errors import BadRequest, LMXError
from lmx_supervisor.lifecycle.managed_model import ManagedModel


class ChunkShape:
    """How one route's stream chunks look (chat deltas or completion text)."""

    def __init__(self, kind: str, completion_id: str, model: str, include_usage: bool,
                 tools: ToolCallParser | None = None, index: int = 0, echo: str = "") -> None:
        self.kind = kind
        self.index = index  # the choice these chunks belong to
        self.echo = echo  # completions `echo`: the prompt, sent before the output
        self.finished: Finished | None = None
        self.tools = tools  # set when the request offers tools: output goes through it
        self.base: dict[str, Any] = {
            "id": completion_id,
            "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
            "created": int(time.time()),
            "model": model,
        }
        self.include_usage = include_usage
        self.text_offset = 0  # completions logprobs count characters across chunks

    def choice(self, text: str | None, finish_reason: str | None, first: bool = False,
               logprobs: list[TokenLogprob] | None = None) -> dict[str, Any]:
        if self.kind == "chat":
            delta: dict[str, Any] = {}
            if first:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            return {"index": self.index, "delta": delta, "finish_reason": finish_reason,
                    "logprobs": chat_logprobs(logprobs) if logprobs else None}
        rendered = None
        if logprobs:
            rendered = completion_logprobs(logprobs, self.text_offset)
            self.text_offset += sum(len(t) for t in rendered["tokens"])
        return {"index": self.index, "text": text or "", "logprobs": rendered,
                "finish_reason": finish_reason}

    def tool_chunks(self, events: list[ParseEvent], logprobs: list[TokenLogprob] | None = None
                    ) -> list[bytes]:
        """Chat chunks for tool-parser events; the tokens' logprobs ride on
        the first (or on an empty delta when the text is still held back)."""
        rendered = chat_logprobs(logprobs) if logprobs else None
        out = []
        for event in events:
            out.append(self.chunk([{"index": self.index, "delta": event_delta(event),
                                    "finish_reason": None, "logprobs": rendered}]))
            rendered = None
        if rendered is not None:
            out.append(self.chunk([{"index": self.index, "delta": {}, "finish_reason": None,
                                    "logprobs": rendered}]))
        return out

    def chunk(self, choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> bytes:
        body = {**self.base, "choices": choices}
        if self.include_usage:
            body["usage"] = usage
        return sse_data(body)


async def _choice_chunks(run: StreamRun, shape: ChunkShape) -> AsyncGenerator[bytes, None]:
    """One choice's items as chunks: deltas, then its finish chunk."""
    if shape.kind == "chat":
        yield shape.chunk([shape.choice("", None, first=True)])
    elif shape.echo:
        yield shape.chunk([shape.choice(shape.echo, None)])
    # A tool call repeating an earlier one ends the turn (the parser says so).
    async for item in run.items(lambda: shape.tools is not None and shape.tools.ended):
        if isinstance(item, Tokens) and shape.tools is not None:
            for chunk in shape.tool_chunks(shape.tools.feed(item.text), item.logprobs):
                yield chunk
        elif isinstance(item, Tokens):
            # A token whose text is held back (stop-string prefix) still
            # carries its logprobs when they were asked for.
            if item.text or item.logprobs:
                yield shape.chunk([shape.choice(item.text, None, logprobs=item.logprobs)])
        else:
            shape.finished = item
            reason = str(item.finish_reason)
            if shape.tools is not None:
                events = shape.tools.feed(item.text) + shape.tools.finish()
                for chunk in shape.tool_chunks(events):
                    yield chunk
                reason = finish_reason(item.finish_reason, bool(shape.tools.calls))
            elif item.text:
                yield shape.chunk([shape.choice(item.text, None)])
            yield shape.chunk([shape.choice(None if shape.kind == "chat" else "", reason)])


async def _stream(runs: list[StreamRun], shapes: list[ChunkShape]
                  ) -> AsyncGenerator[bytes, None]:
    """Every choice's chunks, interleaved by index, then usage and DONE. A
    failure once headers are out becomes a final error chunk, then DONE."""
    streams = [_choice_chunks(r, s) for r, s in zip(runs, shapes, strict=True)]
    # One choice (nearly every request) needs no interleaving: a generator
    # hop fewer per token.
    chunks = streams[0] if len(streams) == 1 else interleave(streams)
    try:
        async for chunk in chunks:
            yield chunk
        if shapes[0].include_usage:
            yield shapes[0].chunk([], usage([s.finished for s in shapes if s.finished]))
    except LMXError as exc:
        yield sse_data(error_payload(exc))
    finally:
        await chunks.aclose()
    yield DONE


Render = Callable[[Collected], dict[str, Any]]


def _prepare(state: Any, req: SamplingFields) -> None:
    check_n(req.n, state.config.models.max_n)
    record = current_record.get()
    if record is not None:
        record.tags.update(log_tags(req))


async def _respond(request: Request, req: SamplingFields, model: ManagedModel, frame: Generate,
                   kind: str, render: Render, echo: str = "") -> Response:
    """`render` makes one choice (its index set here); the body around the
    choices is the same for chat and completions."""
    state = gateway_state(request)
    completion_id = ("chatcmpl-" if kind == "chat" else "cmpl-") + frame.request_id
    frames = choice_frames(frame, req.n)
    if not req.stream:
        if len(frames) == 1:
            results = [await run_collect(state, model, frame,
                                         turn_watch(model, frame) if kind == "chat" else None)]
        else:
            runs = await start_choices(state, model, frames)
            record = current_record.get()
            if record is not None:  # the choices ran as streams, the answer is whole
                record.stream = False
            results = await collect_choices(runs)
        return JSONResponse({
            "id": completion_id, "object": "chat.completion" if kind == "chat"
            else "text_completion", "created": int(time.time()), "model": req.model,
            "choices": [{"index": i, **render(r)} for i, r in enumerate(results)],
            "usage": usage([r.finished for r in results])})
    # The first token arrives before any header goes out: a request that
    # fails early (busy, timeout, dead worker) still gets its real status.
    runs = await start_choices(state, model, frames)
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    shapes = [ChunkShape(kind, completion_id, model.model_id, include_usage,
                         tool_parser(model, f) if kind == "chat" else None, index=i, echo=echo)
              for i, f in enumerate(frames)]

    async def release() -> None:
        for run in runs:
            await run.release()

    return EventStreamResponse(_stream(runs, shapes), on_close=release)


def _request_id() -> str:
    return secrets.token_hex(12)


async def chat_completions(request: Request) -> Response:
    state = gateway_state(request)
    limit = state.config.server.max_request_body_bytes
    # Aliases, presets and `default` resolve here; `req.model` becomes the real id.
    req, model = route_request(state, await read_json(request, ChatCompletionRequest, limit))
    _prepare(state, req)
    frame = await chat_generate_async(req, _request_id())

    def render(result: Collected) -> dict[str, Any]:
        message = chat_message(result.text, model, frame)
        return {"message": message,
                "logprobs": chat_logprobs(result.logprobs) if frame.params.logprobs else None,
                "finish_reason": finish_reason(result.finished.finish_reason,
                                               "tool_calls" in message)}

    return await _respond(request, req, model, frame, "chat", render)


async def completions(request: Request) -> Response:
    state = gateway_state(request)
    req = await read_json(request, CompletionRequest, state.config.server.max_request_body_bytes)
    req, model = route_request(state, req)
    _prepare(state, req)
    frame = completion_generate(req, _request_id())
    capabilities = model.ready.capabilities if model.ready is not None else []
    if frame.suffix is not None and "fill_in_middle" not in capabilities:
        raise BadRequest(f"Model '{model.model_id}' has no fill-in-the-middle tokens, so "
                         "suffix cannot be honoured", param="suffix", code=UNSUPPORTED)
    echo = frame.prompt or "" if req.echo else ""

    def render(result: Collected) -> dict[str, Any]:
        return {"text": echo + result.text,
                "logprobs": (completion_logprobs(result.logprobs)
                             if frame.params.logprobs else None),
                "finish_reason": str(result.finished.finish_reason)}

    return await _respond(request, req, model, frame, "completion", render, echo)


async def list_models(request: Request) -> Response:
    state = gateway_state(request)
    data = [
        {"id": m.model_id, "object": "model",
         "created": int(m.loaded_at or state.supervisor.started_at), "owned_by": "lmx",
         "backend": m.backend,
         "capabilities": m.ready.capabilities if m.ready else [],
         **encoder_listing(m.ready)}
        for m in state.supervisor.ready_models()
    ]
    return JSONResponse({"object": "list", "data": data})


ROUTES = [
    ScopedRoute(INFERENCE, "/v1/chat/completions", chat_completions, methods=["POST"],
                body=ChatCompletionRequest, produces=(JSON, SSE), errors=GENERATION_ERRORS),
    ScopedRoute(INFERENCE, "/v1/completions", completions, methods=["POST"],
                body=CompletionRequest, produces=(JSON, SSE), errors=GENERATION_ERRORS),
    ScopedRoute(INFERENCE, "/v1/models", list_models, methods=["GET"]),
]
