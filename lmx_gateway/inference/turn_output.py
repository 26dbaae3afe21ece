"""One assistant turn's output as content and tool calls, for the routes
that render it in another API's shape (Anthropic Messages, Responses).

When the request offers tools the text goes through the chat route's
tool-call parser (`tool_calls.ToolCallParser`, in the model's own call
format); otherwise every piece of text is content. Either way the route
sees the same events: `ContentDelta`, `CallStart`, `ArgumentsDelta`."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from lmx_gateway.inference.tool_calls import (
    CallStart,
    ContentDelta,
    ParseEvent,
    ToolCall,
    ToolCallParser,
)
from lmx_gateway.openai.chat_tools import model_tool_format, offered_names
from lmx_protocol import FinishReason, Generate
from lmx_supervisor.lifecycle.managed_model import ManagedModel


class TurnOutput:
    def __init__(self, model: ManagedModel, frame: Generate, new_id: Callable[[], str]) -> None:
        self.parser = (ToolCallParser(model_tool_format(model), offered_names(frame),
                                      id_factory=new_id)
                       if frame.tools else None)

    @property
    def calls(self) -> list[ToolCall]:
        return self.parser.calls if self.parser is not None else []

    @property
    def ended(self) -> bool:
        """A repeated call ended the turn (tool_calls.ToolCallParser.ended)."""
        return self.parser is not None and self.parser.ended

    @property
    def parses_tools(self) -> bool:
        return self.parser is not None

    def feed(self, text: str) -> list[ParseEvent]:
        if self.parser is None:
            return [ContentDelta(text)] if text else []
        return self.parser.feed(text)

    def finish(self) -> list[ParseEvent]:
        return self.parser.finish() if self.parser is not None else []

    def segments(self, text: str) -> list[str | ToolCall]:
        """A complete output as its pieces in the order the model wrote them:
        runs of content, and calls."""
        out: list[str | ToolCall] = []
        for event in self.feed(text) + self.finish():
            if isinstance(event, ContentDelta):
                if out and isinstance(out[-1], str):
                    out[-1] += event.text
                else:
                    out.append(event.text)
            elif isinstance(event, CallStart):
                out.append(self.calls[event.index])
        return out

    def called_tools(self, reason: FinishReason) -> bool:
        """The model ended its turn by calling tools (a length cut is not that:
        the calls may be incomplete)."""
        return bool(self.calls) and reason is FinishReason.STOP


def content_of(segments: list[str | ToolCall]) -> str:
    return "".join(s for s in segments if isinstance(s, str))


def arguments_object(arguments: str) -> dict[str, Any]:
    """A call's arguments as an object. A call cut short by the token limit
    has unfinished JSON: it becomes {} (the stop reason says it was cut)."""
    try:
        value = json.loads(arguments or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
