"""Anthropic Messages API: `POST /v1/messages` and `/v1/messages/count_tokens`.

A thin translation: the request becomes an OpenAI chat request (system
prompt, turns, tool calls and tool results as the chat template expects
them), which then takes the same road as `/v1/chat/completions` (routing,
presets, sampling, the worker). The answer is rendered back as Anthropic
content blocks and stop reasons. Errors on these routes use Anthropic's
shape, `{"type": "error", "error": {"type", "message"}}`.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from lmx_gateway.access.scopes import GENERATION_ERRORS, INFERENCE, JSON, SSE, ScopedRoute
from lmx_gateway.anthropic.schemas import (
    CountTokensRequest,
    MessageIn,
    MessagesRequest,
    TextBlock,
    ToolChoiceAny,
    ToolChoiceNone,
    ToolChoiceTool,
    ToolResultBlock,
    ToolUseBlock,
)
from lmx_gateway.http.anthropic_errors import anthropic_error_body
from lmx_gateway.http.body import read_json
from lmx_gateway.http.errors import headers_of, message_of, status_of
from lmx_gateway.http.sse import EventStreamResponse, sse_event
from lmx_gateway.inference.generation import StreamRun, run_collect
from lmx_gateway.inference.param_rename import rename_params
from lmx_gateway.inference.routing import route_request
from lmx_gateway.inference.tool_calls import CallStart, ContentDelta, ParseEvent
from lmx_gateway.inference.turn_output import TurnOutput, arguments_object
from lmx_gateway.openai.chat_tools import turn_watch
from lmx_gateway.openai.sampling import UNSUPPORTED, chat_generate_async
from lmx_gateway.openai.schemas import (
    ChatCompletionRequest,
    ChatMessageIn,
    ToolCallIn,
    tool_call_in,
)
from lmx_gateway.state import GatewayState, gateway_state
from lmx_protocol import Finished, FinishReason, Generate, Tokens
from lmx_supervisor.errors import BadRequest, LMXError
from lmx_supervisor.lifecycle.managed_model import ManagedModel

log = logging.getLogger("lmx.gateway")

# --- errors ---------------------------------------------------------------------


def _error_response(exc: LMXError) -> JSONResponse:
    text = message_of(exc)
    message = (f"{exc.param}: {text}" if exc.param
               and exc.param.lower() not in text.lower() else text)
    return JSONResponse(anthropic_error_body(status_of(exc), message), status_code=status_of(exc),
                        headers=headers_of(exc))


Handler = Callable[[Request], Awaitable[Response]]


def _anthropic_errors(handler: Handler) -> Handler:
    async def wrapped(request: Request) -> Response:
        try:
            return await handler(request)
        except LMXError as exc:
            return _error_response(exc)
        except Exception as exc:
            log.exception("unhandled error", exc_info=exc)
            return JSONResponse(anthropic_error_body(500, f"Internal error: {type(exc).__name__}"),
                                status_code=500)
    return wrapped


# --- request translation --------------------------------------------------------


def _text_of(blocks: str | list[TextBlock] | None) -> str:
    if blocks is None or isinstance(blocks, str):
        return blocks or ""
    return "\n".join(b.text for b in blocks)


def _tool_call(block: ToolUseBlock) -> ToolCallIn:
    return tool_call_in(block.id, block.name, json.dumps(block.input))


def _turns(messages: list[MessageIn]) -> list[ChatMessageIn]:
    """Anthropic turns to chat messages: tool_use blocks become the assistant
    message's tool_calls, each tool_result its own `tool` message."""
    out: list[ChatMessageIn] = []
    tool_use_ids: set[str] = set()
    for i, msg in enumerate(messages):
        if isinstance(msg.content, str):
            out.append(ChatMessageIn(role=msg.role, content=msg.content))
            continue
        if not msg.content:
            raise BadRequest("message content must not be empty",
                             param=f"messages[{i}].content")
        texts: list[str] = []
        calls: list[ToolCallIn] = []
        results: list[ChatMessageIn] = []
        for j, block in enumerate(msg.content):
            where = f"messages[{i}].content[{j}]"
            if isinstance(block, TextBlock):
                texts.append(block.text)
            elif isinstance(block, ToolUseBlock):
                if msg.role != "assistant":
                    raise BadRequest("tool_use blocks belong in assistant messages",
                                     param=f"{where}.type")
                tool_use_ids.add(block.id)
                calls.append(_tool_call(block))
            elif isinstance(block, ToolResultBlock):
                if msg.role != "user":
                    raise BadRequest("tool_result blocks belong in user messages",
                                     param=f"{where}.type")
                if block.tool_use_id not in tool_use_ids:
                    raise BadRequest(
                        f"tool_result refers to tool_use id '{block.tool_use_id}', which no "
                        "earlier assistant message contains", param=f"{where}.tool_use_id")
                text = _text_of(block.content)
                results.append(ChatMessageIn(
                    role="tool", tool_call_id=block.tool_use_id,
                    content=f"Error: {text}" if block.is_error else text))
            # thinking blocks: a previous turn's reasoning, not part of the prompt
        # Tool results answer the previous assistant turn, so they come first.
        out.extend(results)
        if calls:
            out.append(ChatMessageIn(role="assistant", content="".join(texts) or None,
                                     tool_calls=calls))
        elif texts or not results:
            out.append(ChatMessageIn(role=msg.role, content="".join(texts)))
    return out


def _tools(req: CountTokensRequest) -> tuple[Any, Any]:
    """Anthropic tools and tool_choice in the OpenAI spelling chat_generate reads."""
    if not req.tools:
        if req.tool_choice is not None and not isinstance(req.tool_choice, ToolChoiceNone):
            raise BadRequest("tool_choice needs a non-empty tools list", param="tool_choice")
        return None, None
    names = [t.name for t in req.tools]
    for i, tool in enumerate(req.tools):
        if tool.input_schema.get("type") != "object":
            raise BadRequest("input_schema must be a JSON Schema with type 'object'",
                             param=f"tools[{i}].input_schema.type")
        if names.count(tool.name) > 1:
            raise BadRequest(f"tool name '{tool.name}' is used twice", param=f"tools[{i}].name")
    tools = [{"type": "function",
              "function": {"name": t.name, "description": t.description or "",
                           "parameters": t.input_schema}}
             for t in req.tools]
    choice = req.tool_choice
    if choice is None:
        return tools, "auto"
    if isinstance(choice, ToolChoiceTool):
        if choice.name not in names:
            raise BadRequest(f"tool_choice names tool '{choice.name}', which is not in tools "
                             f"({', '.join(names)})", param="tool_choice.name")
        return tools, {"type": "function", "function": {"name": choice.name}}
    if isinstance(choice, ToolChoiceAny):
        return tools, "required"
    if isinstance(choice, ToolChoiceNone):
        return tools, "none"
    return tools, "auto"


def _output_schema(req: CountTokensRequest) -> dict[str, Any] | None:
    fmt = req.output_config.format if req.output_config else None
    fmt = fmt or req.output_format
    if fmt is None:
        return None
    return {"type": "json_schema", "json_schema": {"name": "output", "schema": fmt.schema}}


def _chat_request(req: CountTokensRequest) -> ChatCompletionRequest:
    if req.thinking is not None and req.thinking.type != "disabled":
        raise BadRequest("extended thinking is not supported by this server",
                         param="thinking.type", code=UNSUPPORTED)
    if req.messages[-1].role == "assistant":
        raise BadRequest("a final assistant message (response prefill) is not supported; "
                         "end with a user message", param=f"messages[{len(req.messages) - 1}]",
                         code=UNSUPPORTED)
    messages = _turns(req.messages)
    system = _text_of(req.system)
    if system:
        messages.insert(0, ChatMessageIn(role="system", content=system))
    tools, tool_choice = _tools(req)
    parallel = None
    if req.tool_choice is not None and not isinstance(req.tool_choice, ToolChoiceNone):
        parallel = not req.tool_choice.disable_parallel_tool_use
    chat = ChatCompletionRequest(model=req.model, messages=messages, tools=tools,
                                 tool_choice=tool_choice, parallel_tool_calls=parallel,
                                 response_format=_output_schema(req))
    if isinstance(req, MessagesRequest):
        chat = msgspec.structs.replace(
            chat, max_tokens=req.max_tokens, temperature=req.temperature, top_p=req.top_p,
            top_k=req.top_k, stop=req.stop_sequences,
            user=req.metadata.user_id if req.metadata else None)
    return chat


# The chat path validates tools and schemas under OpenAI's names.
_RENAMES = ((r"tools\[(\d+)\]\.function\.parameters", r"tools[\1].input_schema"),
            (r"tools\[(\d+)\]\.function\.", r"tools[\1]."),
            (r"response_format(\.json_schema\.schema)?", "output_config.format.schema"))


async def _prepare(state: GatewayState, req: CountTokensRequest
                   ) -> tuple[ChatCompletionRequest, ManagedModel, Generate]:
    # Aliases, presets and `default` resolve here; `chat.model` becomes the real id.
    chat, model = route_request(state, _chat_request(req))
    try:
        return chat, model, await chat_generate_async(chat, secrets.token_hex(12))
    except BadRequest as exc:
        raise rename_params(exc, _RENAMES) from None


# --- responses ------------------------------------------------------------------


def _tool_use_id() -> str:
    return "toolu_" + secrets.token_hex(12)


def _stop_reason(finished: Finished, output: TurnOutput) -> tuple[str, str | None]:
    if finished.finish_reason is FinishReason.LENGTH:
        return "max_tokens", None
    if output.called_tools(finished.finish_reason):
        return "tool_use", None
    if finished.stop_sequence is not None:
        return "stop_sequence", finished.stop_sequence
    return "end_turn", None


def _message(message_id: str, model: str, content: list[dict[str, Any]],
             stop: tuple[str | None, str | None], input_tokens: int, output_tokens: int
             ) -> dict[str, Any]:
    return {"id": message_id, "type": "message", "role": "assistant", "model": model,
            "content": content, "stop_reason": stop[0], "stop_sequence": stop[1],
            "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens}}


def _event(type_: str, **fields: Any) -> bytes:
    return sse_event(type_, {"type": type_, **fields})


class _Blocks:
    """Streamed content blocks: a text block while text comes, a tool_use
    block per call; each opened with content_block_start and closed with
    content_block_stop, indexed in order. The first start is followed by
    the ping, as Anthropic's own streams do."""

    def __init__(self) -> None:
        self.count = 0
        self.open: str | None = None  # "text" or "tool_use"

    def _start(self, block: dict[str, Any]) -> list[bytes]:
        out = self.close()
        out.append(_event("content_block_start", index=self.count, content_block=block))
        if self.count == 0:
            out.append(_event("ping"))
        self.open = block["type"]
        return out

    def close(self) -> list[bytes]:
        if self.open is None:
            return []
        self.open = None
        self.count += 1
        return [_event("content_block_stop", index=self.count - 1)]

    def text(self, text: str) -> list[bytes]:
        out = [] if self.open == "text" else self._start({"type": "text", "text": ""})
        if text:
            out.append(_event("content_block_delta", index=self.count,
                              delta={"type": "text_delta", "text": text}))
        return out

    def events(self, events: list[ParseEvent]) -> list[bytes]:
        out: list[bytes] = []
        for event in events:
            if isinstance(event, ContentDelta):
                out += self.text(event.text)
            elif isinstance(event, CallStart):
                out += self._start({"type": "tool_use", "id": event.id, "name": event.name,
                                    "input": {}})
            else:
                out.append(_event("content_block_delta", index=self.count,
                                  delta={"type": "input_json_delta", "partial_json": event.text}))
        return out


async def _stream(run: StreamRun, output: TurnOutput, message_id: str, model: str
                  ) -> AsyncGenerator[bytes, None]:
    yield _event("message_start", message=_message(
        message_id, model, [], (None, None), run.first.prompt_tokens or 0, 0))
    blocks = _Blocks()
    if not output.parses_tools:
        for chunk in blocks.text(""):  # plain text: the one block opens at once
            yield chunk
    try:
        async for item in run.items(lambda: output.ended):
            for chunk in blocks.events(output.feed(item.text)):
                yield chunk
            if isinstance(item, Tokens):
                continue
            for chunk in blocks.events(output.finish()):
                yield chunk
            if blocks.count == 0 and blocks.open is None:
                for chunk in blocks.text(""):  # nothing at all was said: one empty block
                    yield chunk
            for chunk in blocks.close():
                yield chunk
            reason, sequence = _stop_reason(item, output)
            yield _event("message_delta", delta={"stop_reason": reason, "stop_sequence": sequence},
                         usage={"input_tokens": item.prompt_tokens,
                                "output_tokens": item.completion_tokens})
            yield _event("message_stop")
    except LMXError as exc:
        yield sse_event("error", anthropic_error_body(status_of(exc), message_of(exc)))


def _content(output: TurnOutput, text: str) -> list[dict[str, Any]]:
    blocks = [{"type": "text", "text": s} if isinstance(s, str) else
              {"type": "tool_use", "id": s.id, "name": s.name,
               "input": arguments_object(s.arguments)}
              for s in output.segments(text)]
    return blocks or [{"type": "text", "text": ""}]


async def create_message(request: Request) -> Response:
    state = gateway_state(request)
    req = await read_json(request, MessagesRequest, state.config.server.max_request_body_bytes)
    chat, model, frame = await _prepare(state, req)
    message_id = "msg_" + frame.request_id
    output = TurnOutput(model, frame, _tool_use_id)
    if req.stream:
        run = await StreamRun.start(state, model, frame)
        return EventStreamResponse(_stream(run, output, message_id, chat.model),
                                   on_close=run.release)
    result = await run_collect(state, model, frame, turn_watch(model, frame))
    fin = result.finished
    content = _content(output, result.text)
    return JSONResponse(_message(message_id, chat.model, content, _stop_reason(fin, output),
                                 fin.prompt_tokens, fin.completion_tokens))


async def count_tokens(request: Request) -> Response:
    state = gateway_state(request)
    req = await read_json(request, CountTokensRequest,
                          state.config.server.max_request_body_bytes)
    _, model, frame = await _prepare(state, req)
    frame = msgspec.structs.replace(frame, count_only=True)
    result = await run_collect(state, model, frame)
    return JSONResponse({"input_tokens": result.finished.prompt_tokens})


ROUTES = [
    ScopedRoute(INFERENCE, "/v1/messages", _anthropic_errors(create_message), methods=["POST"],
                body=MessagesRequest, produces=(JSON, SSE), errors=GENERATION_ERRORS,
                summary="Anthropic Messages"),
    ScopedRoute(INFERENCE, "/v1/messages/count_tokens", _anthropic_errors(count_tokens),
                methods=["POST"], body=CountTokensRequest, errors=GENERATION_ERRORS,
                summary="Anthropic token count"),
]
