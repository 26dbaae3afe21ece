"""OpenAI Responses API: `POST /v1/responses`, `GET` and `DELETE
/v1/responses/{id}`.

A thin translation onto the chat path: `instructions` + the stored
conversation of `previous_response_id` + this `input` become chat
messages (function calls and their outputs as assistant tool_calls and
`tool` messages), `text.format` and `tools` become `response_format` and
`tools`, and the answer comes back as output items. Stored responses live
in a bounded in-memory LRU (`store.py`)."""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from lmx_gateway.access.scopes import GENERATION_ERRORS, INFERENCE, JSON, SSE, ScopedRoute
from lmx_gateway.http.body import read_json
from lmx_gateway.http.sse import EventStreamResponse, sse_event
from lmx_gateway.inference.generation import StreamRun, run_collect
from lmx_gateway.inference.param_rename import rename_params
from lmx_gateway.inference.routing import route_request
from lmx_gateway.inference.tool_calls import (
    CallStart,
    ContentDelta,
    ParseEvent,
    ToolCall,
    new_call_id,
)
from lmx_gateway.inference.turn_output import TurnOutput, content_of
from lmx_gateway.openai.chat_tools import turn_watch
from lmx_gateway.openai.sampling import chat_generate_async
from lmx_gateway.openai.schemas import ChatCompletionRequest, ChatMessageIn, tool_call_in
from lmx_gateway.responses.schemas import (
    FormatJsonObject,
    FormatJsonSchema,
    FunctionCallItem,
    FunctionCallOutputItem,
    FunctionChoice,
    InputItem,
    InputText,
    MessageItem,
    OutputText,
    ResponsesRequest,
    input_items,
)
from lmx_gateway.responses.store import StoredResponse
from lmx_gateway.state import GatewayState, gateway_state
from lmx_protocol import Finished, FinishReason, Generate
from lmx_supervisor.errors import BadRequest, LMXError, NotFound
from lmx_supervisor.lifecycle.managed_model import ManagedModel

# --- request translation --------------------------------------------------------


def _part_text(content: str | list[Any]) -> str:
    if isinstance(content, str):
        return content
    return "".join(p.text if isinstance(p, InputText | OutputText) else p.refusal
                   for p in content)


def _turns(items: list[InputItem], known_calls: set[str]) -> list[ChatMessageIn]:
    out: list[ChatMessageIn] = []
    for i, item in enumerate(items):
        if isinstance(item, MessageItem):
            out.append(ChatMessageIn(role=item.role, content=_part_text(item.content)))
        elif isinstance(item, FunctionCallItem):
            call = tool_call_in(item.call_id, item.name, item.arguments)
            known_calls.add(item.call_id)
            last = out[-1] if out else None
            # Calls made in one turn belong to one assistant message.
            if last is not None and last.role == "assistant":
                out[-1] = msgspec.structs.replace(last, tool_calls=[*(last.tool_calls or []),
                                                                    call])
            else:
                out.append(ChatMessageIn(role="assistant", tool_calls=[call]))
        elif isinstance(item, FunctionCallOutputItem):
            if item.call_id not in known_calls:
                raise BadRequest(
                    f"function_call_output refers to call_id '{item.call_id}', which no "
                    "function_call in this input or the previous response made",
                    param=f"input[{i}].call_id")
            out.append(ChatMessageIn(role="tool", tool_call_id=item.call_id,
                                     content=_part_text(item.output)))
        # reasoning items: not part of the prompt
    return out


def _response_format(req: ResponsesRequest) -> dict[str, Any] | None:
    fmt = req.text.format if req.text else None
    if isinstance(fmt, FormatJsonObject):
        return {"type": "json_object"}
    if isinstance(fmt, FormatJsonSchema):
        spec: dict[str, Any] = {"name": fmt.name, "schema": fmt.schema}
        if fmt.strict is not None:
            spec["strict"] = fmt.strict
        if fmt.description is not None:
            spec["description"] = fmt.description
        return {"type": "json_schema", "json_schema": spec}
    return None


def _tools(req: ResponsesRequest) -> tuple[Any, Any]:
    if not req.tools:
        if req.tool_choice not in (None, "none", "auto"):
            raise BadRequest("tool_choice needs a non-empty tools list", param="tool_choice")
        return None, None
    names = [t.name for t in req.tools]
    tools = []
    for i, tool in enumerate(req.tools):
        if names.count(tool.name) > 1:
            raise BadRequest(f"tool name '{tool.name}' is used twice", param=f"tools[{i}].name")
        function: dict[str, Any] = {"name": tool.name, "description": tool.description or "",
                                    "parameters": tool.parameters or {"type": "object"}}
        if tool.strict is not None:
            function["strict"] = tool.strict
        tools.append({"type": "function", "function": function})
    choice = req.tool_choice
    if isinstance(choice, FunctionChoice):
        if choice.name not in names:
            raise BadRequest(f"tool_choice names function '{choice.name}', which is not in "
                             f"tools ({', '.join(names)})", param="tool_choice.name")
        return tools, {"type": "function", "function": {"name": choice.name}}
    return tools, choice or "auto"


@dataclass
class _Prepared:
    chat: ChatCompletionRequest
    model: ManagedModel
    frame: Generate
    conversation: list[ChatMessageIn]  # without instructions


async def _prepare(state: GatewayState, req: ResponsesRequest) -> _Prepared:
    conversation: list[ChatMessageIn] = []
    if req.previous_response_id is not None:
        previous = state.responses.get(req.previous_response_id)
        if previous is None:
            raise NotFound(f"Previous response with id '{req.previous_response_id}' not found "
                           "(responses are kept in memory, up to "
                           f"{state.responses.capacity} and {state.responses.max_bytes} bytes, "
                           "and only with store: true)",
                           param="previous_response_id", code="previous_response_not_found")
        conversation = list(previous.conversation)
    known_calls = {c.id for m in conversation for c in (m.tool_calls or [])}
    if isinstance(req.input, str):
        conversation.append(ChatMessageIn(role="user", content=req.input))
    else:
        conversation.extend(_turns(input_items(req.input), known_calls))
    messages = list(conversation)
    if req.instructions:
        messages.insert(0, ChatMessageIn(role="system", content=req.instructions))
    tools, tool_choice = _tools(req)
    chat = ChatCompletionRequest(
        model=req.model, messages=messages, max_tokens=req.max_output_tokens,
        temperature=req.temperature, top_p=req.top_p, tools=tools, tool_choice=tool_choice,
        parallel_tool_calls=req.parallel_tool_calls, response_format=_response_format(req),
        user=req.user)
    # Aliases, presets and `default` resolve here; `chat.model` becomes the real id.
    chat, model = route_request(state, chat)
    try:
        frame = await chat_generate_async(chat, secrets.token_hex(12))
    except BadRequest as exc:
        raise rename_params(exc, _RENAMES) from None
    return _Prepared(chat, model, frame, conversation)


# The chat path validates tools and schemas under OpenAI's names.
_RENAMES = ((r"tools\[(\d+)\]\.function\.", r"tools[\1]."),
            (r"response_format(\.json_schema)?(\.schema)?", r"text.format\2"))


# --- the response object --------------------------------------------------------


def _item_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _message_item(item_id: str, text: str | None, status: str) -> dict[str, Any]:
    return {"id": item_id, "type": "message", "status": status, "role": "assistant",
            "content": [] if text is None else [_text_part(text)]}


def _call_item(item_id: str, call: ToolCall, status: str) -> dict[str, Any]:
    return {"id": item_id, "type": "function_call", "status": status, "call_id": call.id,
            "name": call.name, "arguments": call.arguments}


class _Shape:
    """One response's fixed fields."""

    def __init__(self, req: ResponsesRequest, prepared: _Prepared) -> None:
        self.req = req
        self.prepared = prepared
        self.id = "resp_" + prepared.frame.request_id
        self.created_at = int(time.time())

    def body(self, status: str, output: list[dict[str, Any]],
             finished: Finished | None = None, error: dict[str, Any] | None = None
             ) -> dict[str, Any]:
        req = self.req
        fmt = req.text.format if req.text and req.text.format else None
        usage = None
        if finished is not None:
            usage = {"input_tokens": finished.prompt_tokens,
                     "input_tokens_details": {"cached_tokens": 0},
                     "output_tokens": finished.completion_tokens,
                     "output_tokens_details": {"reasoning_tokens": 0},
                     "total_tokens": finished.prompt_tokens + finished.completion_tokens}
        incomplete = ({"reason": "max_output_tokens"} if status == "incomplete" else None)
        return {
            "id": self.id, "object": "response", "created_at": self.created_at,
            "status": status, "error": error, "incomplete_details": incomplete,
            "instructions": req.instructions, "max_output_tokens": req.max_output_tokens,
            "model": self.prepared.chat.model, "output": output,
            "parallel_tool_calls": (True if req.parallel_tool_calls is None
                                    else req.parallel_tool_calls),
            "previous_response_id": req.previous_response_id,
            "reasoning": {"effort": None, "summary": None}, "store": req.store,
            "temperature": 1.0 if req.temperature is None else req.temperature,
            "text": {"format": msgspec.to_builtins(fmt) if fmt else {"type": "text"}},
            "tool_choice": (msgspec.to_builtins(req.tool_choice)
                            if req.tool_choice is not None else "auto"),
            "tools": msgspec.to_builtins(req.tools or []),
            "top_p": 1.0 if req.top_p is None else req.top_p,
            "truncation": "disabled", "usage": usage, "user": req.user,
            "metadata": req.metadata or {},
        }


def _status(finished: Finished) -> str:
    return "incomplete" if finished.finish_reason is FinishReason.LENGTH else "completed"


def _remember(state: GatewayState, shape: _Shape, body: dict[str, Any], text: str,
              calls: list[ToolCall]) -> None:
    """Keep the response, and the conversation it ends, for previous_response_id."""
    if not shape.req.store:
        return
    reply = ChatMessageIn(role="assistant", content=text or None,
                          tool_calls=[tool_call_in(c.id, c.name, c.arguments or "{}")
                                      for c in calls] or None)
    state.responses.put(shape.id, StoredResponse.of(body, [*shape.prepared.conversation, reply]))


class _Sequenced:
    """Streaming events, each `event: <type>` + data with `type` and
    `sequence_number` (counted from 0 across the stream)."""

    def __init__(self) -> None:
        self.number = 0

    def __call__(self, type_: str, **fields: Any) -> bytes:
        payload = {"type": type_, "sequence_number": self.number, **fields}
        self.number += 1
        return sse_event(type_, payload)


class _Items:
    """Streamed output items: a message while text comes (one output_text
    part), a function_call per call; each added, filled by deltas, done."""

    def __init__(self, event: _Sequenced) -> None:
        self.event = event
        self.items: list[dict[str, Any]] = []  # done items, in output order
        self.kind: str | None = None  # the open item's type
        self.item_id = ""
        self.parts: list[str] = []
        self.call: ToolCall | None = None
        self.text = ""  # all message text so far, for the stored conversation

    @property
    def index(self) -> int:
        return len(self.items)

    def _where(self) -> dict[str, Any]:
        return {"item_id": self.item_id, "output_index": self.index, "content_index": 0}

    def open_message(self) -> list[bytes]:
        out = self.close("completed")
        self.kind, self.item_id, self.parts = "message", _item_id("msg"), []
        out.append(self.event("response.output_item.added", output_index=self.index,
                              item=_message_item(self.item_id, None, "in_progress")))
        out.append(self.event("response.content_part.added", **self._where(),
                              part=_text_part("")))
        return out

    def on(self, events: list[ParseEvent], calls: list[ToolCall]) -> list[bytes]:
        out: list[bytes] = []
        for ev in events:
            if isinstance(ev, ContentDelta):
                if self.kind != "message":
                    out += self.open_message()
                self.parts.append(ev.text)
                out.append(self.event("response.output_text.delta", **self._where(),
                                      delta=ev.text, logprobs=[]))
            elif isinstance(ev, CallStart):
                out += self.close("completed")
                self.kind, self.item_id, self.call = "call", _item_id("fc"), calls[ev.index]
                out.append(self.event("response.output_item.added", output_index=self.index,
                                      item=_call_item(self.item_id, ToolCall(
                                          ev.id, ev.name), "in_progress")))
            else:
                out.append(self.event("response.function_call_arguments.delta",
                                      item_id=self.item_id, output_index=self.index,
                                      delta=ev.text))
        return out

    def close(self, status: str) -> list[bytes]:
        out: list[bytes] = []
        if self.kind == "message":
            text = "".join(self.parts)
            self.text += text
            out.append(self.event("response.output_text.done", **self._where(), text=text,
                                  logprobs=[]))
            out.append(self.event("response.content_part.done", **self._where(),
                                  part=_text_part(text)))
            item = _message_item(self.item_id, text, status)
        elif self.kind == "call":
            assert self.call is not None
            out.append(self.event("response.function_call_arguments.done",
                                  item_id=self.item_id, output_index=self.index,
                                  name=self.call.name, arguments=self.call.arguments))
            item = _call_item(self.item_id, self.call, "completed")
        else:
            return out
        out.append(self.event("response.output_item.done", output_index=self.index, item=item))
        self.items.append(item)
        self.kind = None
        return out


async def _stream(state: GatewayState, run: StreamRun, shape: _Shape, output: TurnOutput
                  ) -> AsyncGenerator[bytes, None]:
    event = _Sequenced()
    yield event("response.created", response=shape.body("in_progress", []))
    yield event("response.in_progress", response=shape.body("in_progress", []))
    items = _Items(event)
    if not output.parses_tools:
        for chunk in items.open_message():  # plain text: the one message opens at once
            yield chunk
    try:
        async for item in run.items(lambda: output.ended):
            for chunk in items.on(output.feed(item.text), output.calls):
                yield chunk
            if not isinstance(item, Finished):
                continue
            for chunk in items.on(output.finish(), output.calls):
                yield chunk
            if not items.items and items.kind is None:
                for chunk in items.open_message():  # nothing at all was said
                    yield chunk
            status = _status(item)
            for chunk in items.close(status):
                yield chunk
            body = shape.body(status, items.items, item)
            _remember(state, shape, body, items.text, output.calls)
            yield event(f"response.{status}", response=body)
    except LMXError as exc:
        failed = shape.body("failed", items.items,
                            error={"code": exc.code, "message": exc.message})
        yield event("response.failed", response=failed)


async def create_response(request: Request) -> Response:
    state = gateway_state(request)
    req = await read_json(request, ResponsesRequest, state.config.server.max_request_body_bytes)
    prepared = await _prepare(state, req)
    shape = _Shape(req, prepared)
    model = prepared.model
    output = TurnOutput(model, prepared.frame, new_call_id)
    if req.stream:
        run = await StreamRun.start(state, model, prepared.frame)
        return EventStreamResponse(_stream(state, run, shape, output), on_close=run.release)
    result = await run_collect(state, model, prepared.frame, turn_watch(model, prepared.frame))
    status = _status(result.finished)
    segments = output.segments(result.text)
    items = [_message_item(_item_id("msg"), s, status) if isinstance(s, str) else
             _call_item(_item_id("fc"), s, "completed") for s in segments]
    body = shape.body(status, items or [_message_item(_item_id("msg"), "", status)],
                      result.finished)
    _remember(state, shape, body, content_of(segments), output.calls)
    return JSONResponse(body)


def _stored(request: Request) -> tuple[GatewayState, str, StoredResponse]:
    state = gateway_state(request)
    response_id = request.path_params["response_id"]
    stored = state.responses.get(response_id)
    if stored is None:
        raise NotFound(f"Response with id '{response_id}' not found", param="response_id")
    return state, response_id, stored


async def get_response(request: Request) -> Response:
    _, _, stored = _stored(request)
    return JSONResponse(stored.body)


async def delete_response(request: Request) -> Response:
    state, response_id, _ = _stored(request)
    state.responses.delete(response_id)
    return JSONResponse({"id": response_id, "object": "response", "deleted": True})


ROUTES = [
    ScopedRoute(INFERENCE, "/v1/responses", create_response, methods=["POST"],
                body=ResponsesRequest, produces=(JSON, SSE), errors=GENERATION_ERRORS),
    ScopedRoute(INFERENCE, "/v1/responses/{response_id}", get_response, methods=["GET"],
                errors=(404,)),
    ScopedRoute(INFERENCE, "/v1/responses/{response_id}", delete_response, methods=["DELETE"],
                errors=(404,)),
]
