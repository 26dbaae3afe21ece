"""POST /api/chat and POST /api/generate, translated onto the chat and
completions path (routing, presets, sampling, tools, constrained decoding
and the worker are the ones /v1 uses). Answers stream as NDJSON by default
(one JSON object a line, the last with `done: true` and the counts), or
come whole with `stream: false`."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import AsyncGenerator
from datetime import UTC, datetime
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from lmx_gateway.http.body import read_json
from lmx_gateway.http.sse import EventStreamResponse
from lmx_gateway.inference.generation import StreamRun, run_collect
from lmx_gateway.inference.param_rename import rename_params
from lmx_gateway.inference.routing import resolve_model, route_request
from lmx_gateway.inference.tool_calls import ContentDelta
from lmx_gateway.inference.turn_output import TurnOutput, arguments_object, content_of
from lmx_gateway.ollama.errors import error_text
from lmx_gateway.ollama.options import (
    UNSUPPORTED,
    SamplingOptions,
    keep_alive_seconds,
    response_format,
    sampling_fields,
    sampling_options,
    tool_choice,
)
from lmx_gateway.ollama.schemas import ChatBody, GenerateBody, Message
from lmx_gateway.ollama.serving import apply_keep_alive, served_name
from lmx_gateway.openai.sampling import chat_generate, completion_generate
from lmx_gateway.openai.schemas import (
    ChatCompletionRequest,
    ChatMessageIn,
    CompletionRequest,
    FunctionCallIn,
    ToolCallIn,
)
from lmx_gateway.state import GatewayState, gateway_state
from lmx_protocol import Finished, FinishReason, Generate
from lmx_supervisor.errors import BadRequest, LMXError
from lmx_supervisor.lifecycle.managed_model import ManagedModel

NDJSON = "application/x-ndjson"
_encode = msgspec.json.Encoder().encode
# Errors from the chat path name OpenAI's fields; say Ollama's.
_RENAMES = ((r"response_format(\.json_schema\.schema)?", "format"),
            (r"^tool_choice", "options.tool_choice"),
            (r"^max_tokens", "options.num_predict"),
            (r"^(temperature|top_p|top_k|min_p|seed|stop)$", r"options.\1"))


def now_iso() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def line(body: dict[str, Any]) -> bytes:
    return _encode(body) + b"\n"


def _call_id() -> str:
    return "call_" + secrets.token_hex(8)


def chat_messages(messages: list[Message]) -> list[ChatMessageIn]:
    """Ollama turns as chat messages: calls get ids (Ollama has none), and
    each tool result answers the earliest open call of its tool_name."""
    out: list[ChatMessageIn] = []
    open_calls: list[tuple[str, str]] = []  # (id, name)
    for i, msg in enumerate(messages):
        if msg.images:
            raise BadRequest("images are not supported by the models this server runs",
                             param=f"messages[{i}].images", code=UNSUPPORTED)
        if msg.role == "assistant" and msg.tool_calls:
            calls = []
            for j, call in enumerate(msg.tool_calls):
                fn = call.get("function")
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                    raise BadRequest("a tool call needs function.name",
                                     param=f"messages[{i}].tool_calls[{j}].function")
                args = fn.get("arguments") or {}
                cid = str(call.get("id") or _call_id())
                calls.append(ToolCallIn(id=cid, function=FunctionCallIn(
                    name=fn["name"],
                    arguments=args if isinstance(args, str) else json.dumps(args))))
                open_calls.append((cid, fn["name"]))
            out.append(ChatMessageIn(role="assistant", content=msg.content or None,
                                     tool_calls=calls))
        elif msg.role == "tool":
            match = next((k for k, (_, name) in enumerate(open_calls)
                          if msg.tool_name in (None, name)), None)
            cid = open_calls.pop(match)[0] if match is not None else _call_id()
            out.append(ChatMessageIn(role="tool", content=msg.content, tool_call_id=cid,
                                     name=msg.tool_name))
        else:
            out.append(ChatMessageIn(role=msg.role, content=msg.content))
    return out


def _refuse_think(think: Any) -> None:
    if think not in (None, False):
        raise BadRequest("thinking is not supported by the models this server runs",
                         param="think", code=UNSUPPORTED)


def _checked(model: ManagedModel, opts: SamplingOptions) -> None:
    context = model.ready.context_length if model.ready is not None else 0
    if context:
        sampling_fields(opts, context)  # refuses num_ctx beyond the loaded window


def _stats(finished: Finished, started: float, first: float) -> dict[str, Any]:
    end = time.monotonic()
    return {"done_reason": "length" if finished.finish_reason is FinishReason.LENGTH
            else "stop",
            "total_duration": int((end - started) * 1e9), "load_duration": 0,
            "prompt_eval_count": finished.prompt_tokens,
            "prompt_eval_duration": int((first - started) * 1e9),
            "eval_count": finished.completion_tokens,
            "eval_duration": int((end - first) * 1e9)}


class _Turn:
    """One request's answer in Ollama's shape: chat `message`s or generate
    `response`s."""

    def __init__(self, name: str, chat: bool, output: TurnOutput) -> None:
        self.name = name
        self.chat = chat
        self.output = output

    def piece(self, text: str, done: bool, **extra: Any) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.name, "created_at": now_iso()}
        if self.chat:
            body["message"] = {"role": "assistant", "content": text, **extra}
        else:
            body["response"] = text
        body["done"] = done
        return body

    def calls(self) -> list[dict[str, Any]]:
        return [{"function": {"name": c.name, "arguments": arguments_object(c.arguments)}}
                for c in self.output.calls]


async def _lines(run: StreamRun, turn: _Turn, started: float, first: float
                 ) -> AsyncGenerator[bytes, None]:
    try:
        async for item in run.items():
            events = turn.output.feed(item.text)
            if isinstance(item, Finished):
                events += turn.output.finish()
            text = "".join(e.text for e in events if isinstance(e, ContentDelta))
            if text:
                yield line(turn.piece(text, False))
            if isinstance(item, Finished):
                if turn.output.calls:
                    yield line(turn.piece("", False, tool_calls=turn.calls()))
                yield line({**turn.piece("", True), **_stats(item, started, first)})
    except LMXError as exc:
        yield line({"error": error_text(exc)})


async def _answer(state: GatewayState, model: ManagedModel, frame: Generate, turn: _Turn,
                  stream: bool, keep_alive: float | None) -> Response:
    started = time.monotonic()
    if not stream:
        try:
            result = await run_collect(state, model, frame)
        finally:
            await apply_keep_alive(state, model, keep_alive)
        content = content_of(turn.output.segments(result.text))
        extra = {"tool_calls": turn.calls()} if turn.output.calls else {}
        body = {**turn.piece(content, True, **extra),
                **_stats(result.finished, started, started)}
        return JSONResponse(body)
    try:
        run = await StreamRun.start(state, model, frame)
    except BaseException:
        await apply_keep_alive(state, model, keep_alive)
        raise
    first = time.monotonic()

    async def release() -> None:
        await run.release()
        await apply_keep_alive(state, model, keep_alive)

    return EventStreamResponse(_lines(run, turn, started, first),
                               headers={"content-type": NDJSON}, on_close=release)


async def _load_only(state: GatewayState, name: str, chat: bool, keep_alive: float | None
                     ) -> Response:
    """An empty request loads the model (or, with keep_alive 0, unloads it),
    as Ollama's clients use it to warm a model up."""
    model = resolve_model(state, name)
    await apply_keep_alive(state, model, keep_alive)
    reason = "unload" if keep_alive == 0 else "load"
    body: dict[str, Any] = {"model": model.model_id, "created_at": now_iso()}
    if chat:
        body["message"] = {"role": "assistant", "content": ""}
    else:
        body["response"] = ""
    return JSONResponse({**body, "done": True, "done_reason": reason})


async def chat(request: Request) -> Response:
    state = gateway_state(request)
    body = await read_json(request, ChatBody, state.config.server.max_request_body_bytes,
                          untyped_ok_without_origin=True)
    keep_alive = keep_alive_seconds(body.keep_alive)
    _refuse_think(body.think)
    opts = sampling_options(body.options)
    name = await served_name(state, body.model)
    if not body.messages:
        return await _load_only(state, name, True, keep_alive)
    req = ChatCompletionRequest(model=name, messages=chat_messages(body.messages),
                                tools=body.tools or None,
                                tool_choice=tool_choice(body.options, bool(body.tools)),
                                response_format=response_format(body.format),
                                **sampling_fields(opts, 1 << 62))
    try:
        req, model = route_request(state, req)
        _checked(model, opts)
        frame = chat_generate(req, secrets.token_hex(12))
    except BadRequest as exc:
        raise rename_params(exc, _RENAMES) from None
    turn = _Turn(req.model, True, TurnOutput(model, frame, _call_id))
    return await _answer(state, model, frame, turn, body.stream, keep_alive)


def _generate_frame(state: GatewayState, body: GenerateBody, name: str, opts: SamplingOptions
                    ) -> tuple[ManagedModel, Generate, str]:
    fields = sampling_fields(opts, 1 << 62)
    rid = secrets.token_hex(12)
    if body.raw or body.suffix is not None:
        if body.system:
            raise BadRequest("system does not apply to raw or suffix prompts", param="system")
        completion, model = route_request(state, CompletionRequest(
            model=name, prompt=body.prompt, suffix=body.suffix, **fields))
        if completion.max_tokens is None:  # Ollama: no limit but the context
            room = model.ready.context_length if model.ready is not None else 4096
            completion = msgspec.structs.replace(completion, max_tokens=room)
        capabilities = model.ready.capabilities if model.ready is not None else []
        if body.suffix is not None and "fill_in_middle" not in capabilities:
            raise BadRequest(f"model '{model.model_id}' has no fill-in-the-middle tokens, so "
                             "suffix cannot be honoured", param="suffix", code=UNSUPPORTED)
        _checked(model, opts)
        return model, completion_generate(completion, rid), completion.model
    messages = [ChatMessageIn(role="user", content=body.prompt)]
    if body.system:
        messages.insert(0, ChatMessageIn(role="system", content=body.system))
    req, model = route_request(state, ChatCompletionRequest(
        model=name, messages=messages, response_format=response_format(body.format),
        **fields))
    _checked(model, opts)
    return model, chat_generate(req, rid), req.model


async def generate(request: Request) -> Response:
    state = gateway_state(request)
    body = await read_json(request, GenerateBody, state.config.server.max_request_body_bytes,
                          untyped_ok_without_origin=True)
    keep_alive = keep_alive_seconds(body.keep_alive)
    _refuse_think(body.think)
    for field, value in (("template", body.template), ("context", body.context),
                         ("images", body.images)):
        if value:
            why = {"template": "LMX applies the model's own chat template (use raw for a "
                               "prompt of your own)",
                   "context": "context token arrays are not kept; send the conversation "
                              "to /api/chat",
                   "images": "images are not supported by the models this server runs"}[field]
            raise BadRequest(why, param=field, code=UNSUPPORTED)
    if body.raw and body.format:
        raise BadRequest("format is not supported with raw prompts", param="format",
                         code=UNSUPPORTED)
    opts = sampling_options(body.options)
    tool_choice(body.options, False)  # no tools here: refused if asked for
    name = await served_name(state, body.model)
    if not body.prompt and body.suffix is None:
        return await _load_only(state, name, False, keep_alive)
    try:
        model, frame, served = _generate_frame(state, body, name, opts)
    except BadRequest as exc:
        raise rename_params(exc, _RENAMES) from None
    turn = _Turn(served, False, TurnOutput(model, frame, _call_id))
    return await _answer(state, model, frame, turn, body.stream, keep_alive)
