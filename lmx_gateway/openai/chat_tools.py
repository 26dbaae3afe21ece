"""Tool calls in /v1/chat/completions answers: the parser a request needs,
and OpenAI's shapes for what it finds (`message.tool_calls`, streamed
`delta.tool_calls`)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from lmx_gateway.inference.tool_calls import (
    ArgumentsDelta,
    CallStart,
    ContentDelta,
    ParseEvent,
    ToolCallParser,
    parse_tool_calls,
)
from lmx_protocol import FinishReason, Generate
from lmx_protocol.tool_formats import ToolFormat
from lmx_supervisor.lifecycle.managed_model import ManagedModel


def model_tool_format(model: ManagedModel) -> str:
    """The format the model's worker reported (Hermes when unknown: it is
    what LMX teaches templates that know no tools)."""
    fmt = model.ready.tool_format if model.ready is not None else ""
    return fmt or str(ToolFormat.HERMES)


def offered_names(frame: Generate) -> list[str]:
    if not frame.tools:
        return []
    return [t["function"]["name"] for t in json.loads(frame.tools)]


def tool_parser(model: ManagedModel, frame: Generate) -> ToolCallParser | None:
    """A streaming parser when the request offers tools, else None (the
    output is plain content)."""
    if not frame.tools:
        return None
    return ToolCallParser(model_tool_format(model), offered_names(frame))


def turn_watch(model: ManagedModel, frame: Generate) -> Callable[[str], bool] | None:
    """For a whole answer with tools: fed the text as it comes, True once a
    repeated call has ended the turn (so the generation can stop there)."""
    parser = tool_parser(model, frame)
    if parser is None:
        return None

    def ended(text: str) -> bool:
        parser.feed(text)
        return parser.ended
    return ended


def finish_reason(reason: FinishReason, called: bool) -> str:
    """`tool_calls` when the model ended normally after calling tools; a
    length cut keeps `length` (the calls may be incomplete)."""
    if called and reason == FinishReason.STOP:
        return str(FinishReason.TOOL_CALLS)
    return str(reason)


def chat_message(text: str, model: ManagedModel, frame: Generate) -> dict[str, Any]:
    """The assistant message of a non-streamed answer."""
    if not frame.tools:
        return {"role": "assistant", "content": text}
    content, calls = parse_tool_calls(text, model_tool_format(model), offered_names(frame))
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = [c.openai() for c in calls]
    return message


def event_delta(event: ParseEvent) -> dict[str, Any]:
    """One parser event as a chat.completion.chunk delta: the first chunk
    of a call carries index, id, type and name; later ones carry pieces of
    the arguments."""
    if isinstance(event, ContentDelta):
        return {"content": event.text}
    if isinstance(event, CallStart):
        return {"tool_calls": [{"index": event.index, "id": event.id, "type": "function",
                                "function": {"name": event.name, "arguments": ""}}]}
    assert isinstance(event, ArgumentsDelta)
    return {"tool_calls": [{"index": event.index, "function": {"arguments": event.text}}]}
