"""Request bodies of the Anthropic Messages API (`/v1/messages`,
`/v1/messages/count_tokens`), validated by msgspec.

Unknown fields are ignored, as for the OpenAI routes; a content block type
this server cannot honour fails validation by name (`messages[0].content[1].type`)
rather than disappearing from the prompt."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from lmx_gateway.openai.schemas import (
    MAX_STOP_STRINGS,
    ModelName,
    NonNegativeInt,
    PositiveInt,
    StopString,
)

ToolName = Annotated[str, Meta(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]


class TextBlock(msgspec.Struct, tag_field="type", tag="text", kw_only=True):
    text: str
    cache_control: Any = None
    citations: Any = None


class ToolUseBlock(msgspec.Struct, tag_field="type", tag="tool_use", kw_only=True):
    id: Annotated[str, Meta(min_length=1)]
    name: Annotated[str, Meta(min_length=1)]
    input: dict[str, Any]
    cache_control: Any = None


class ToolResultBlock(msgspec.Struct, tag_field="type", tag="tool_result", kw_only=True):
    tool_use_id: Annotated[str, Meta(min_length=1)]
    content: str | list[TextBlock] | None = None
    is_error: bool = False
    cache_control: Any = None


class ThinkingBlock(msgspec.Struct, tag_field="type", tag="thinking", kw_only=True):
    """A previous turn's reasoning sent back by a client; not part of the
    prompt (the model here produced none of its own)."""

    thinking: str = ""
    signature: str | None = None


class RedactedThinkingBlock(msgspec.Struct, tag_field="type", tag="redacted_thinking",
                            kw_only=True):
    data: str = ""


ContentBlock = TextBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock | RedactedThinkingBlock


class MessageIn(msgspec.Struct, kw_only=True):
    role: Literal["user", "assistant"]
    content: str | list[ContentBlock]


class ToolIn(msgspec.Struct, kw_only=True):
    name: ToolName
    input_schema: dict[str, Any]
    description: str | None = None
    type: Literal["custom"] | None = None
    cache_control: Any = None


class ToolChoiceAuto(msgspec.Struct, tag_field="type", tag="auto", kw_only=True):
    disable_parallel_tool_use: bool = False


class ToolChoiceAny(msgspec.Struct, tag_field="type", tag="any", kw_only=True):
    disable_parallel_tool_use: bool = False


class ToolChoiceTool(msgspec.Struct, tag_field="type", tag="tool", kw_only=True):
    name: Annotated[str, Meta(min_length=1)]
    disable_parallel_tool_use: bool = False


class ToolChoiceNone(msgspec.Struct, tag_field="type", tag="none", kw_only=True):
    pass


ToolChoice = ToolChoiceAuto | ToolChoiceAny | ToolChoiceTool | ToolChoiceNone


class Metadata(msgspec.Struct, kw_only=True):
    user_id: str | None = None


class Thinking(msgspec.Struct, kw_only=True):
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: int | None = None


class JsonOutputFormat(msgspec.Struct, tag_field="type", tag="json_schema", kw_only=True):
    schema: dict[str, Any]


class OutputConfig(msgspec.Struct, kw_only=True):
    format: JsonOutputFormat | None = None
    effort: str | None = None  # a reasoning budget: nothing to spend it on here


class CountTokensRequest(msgspec.Struct, kw_only=True):
    model: ModelName
    messages: Annotated[list[MessageIn], Meta(min_length=1)]
    system: str | list[TextBlock] | None = None
    tools: list[ToolIn] | None = None
    tool_choice: ToolChoice | None = None
    thinking: Thinking | None = None
    # Structured output: `output_config.format`, or the older `output_format`.
    output_config: OutputConfig | None = None
    output_format: JsonOutputFormat | None = None


class MessagesRequest(CountTokensRequest, kw_only=True):
    max_tokens: PositiveInt
    stop_sequences: Annotated[list[StopString], Meta(max_length=MAX_STOP_STRINGS)] | None = None
    stream: bool = False
    temperature: Annotated[float, Meta(ge=0, le=1)] | None = None
    top_p: Annotated[float, Meta(gt=0, le=1)] | None = None
    top_k: NonNegativeInt | None = None
    metadata: Metadata | None = None
