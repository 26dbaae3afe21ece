"""Request body of the OpenAI Responses API (`POST /v1/responses`),
validated by msgspec.

`input` items are checked one by one (a message item may omit its `type`,
which a tagged union cannot express), with errors naming `input[i]...`."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from lmx_gateway.openai.schemas import ModelName, PositiveInt, Temperature
from lmx_supervisor.errors import BadRequest

FunctionName = Annotated[str, Meta(pattern=r"^[a-zA-Z0-9_-]{1,128}$")]
NonEmpty = Annotated[str, Meta(min_length=1)]


class InputText(msgspec.Struct, tag_field="type", tag="input_text", kw_only=True):
    text: str


class OutputText(msgspec.Struct, tag_field="type", tag="output_text", kw_only=True):
    text: str
    annotations: Any = None
    logprobs: Any = None


class Refusal(msgspec.Struct, tag_field="type", tag="refusal", kw_only=True):
    refusal: str


ContentPart = InputText | OutputText | Refusal


class MessageItem(msgspec.Struct, kw_only=True):
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[ContentPart]
    type: Literal["message"] = "message"
    id: str | None = None
    status: str | None = None


class FunctionCallItem(msgspec.Struct, kw_only=True):
    type: Literal["function_call"]
    call_id: NonEmpty
    name: NonEmpty
    arguments: str
    id: str | None = None
    status: str | None = None


class FunctionCallOutputItem(msgspec.Struct, kw_only=True):
    type: Literal["function_call_output"]
    call_id: NonEmpty
    output: str | list[InputText]
    id: str | None = None
    status: str | None = None


class ReasoningItem(msgspec.Struct, kw_only=True):
    """A reasoning item sent back by a client; not part of the prompt."""

    type: Literal["reasoning"]


InputItem = MessageItem | FunctionCallItem | FunctionCallOutputItem | ReasoningItem
_ITEM_TYPES: dict[str, type[InputItem]] = {
    "message": MessageItem, "function_call": FunctionCallItem,
    "function_call_output": FunctionCallOutputItem, "reasoning": ReasoningItem,
}


class FunctionTool(msgspec.Struct, tag_field="type", tag="function", kw_only=True):
    name: FunctionName
    parameters: dict[str, Any] | None = None
    description: str | None = None
    strict: bool | None = None


class FunctionChoice(msgspec.Struct, tag_field="type", tag="function", kw_only=True):
    name: NonEmpty


class FormatText(msgspec.Struct, tag_field="type", tag="text", kw_only=True):
    pass


class FormatJsonObject(msgspec.Struct, tag_field="type", tag="json_object", kw_only=True):
    pass


class FormatJsonSchema(msgspec.Struct, tag_field="type", tag="json_schema", kw_only=True):
    name: Annotated[str, Meta(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]
    schema: dict[str, Any]
    description: str | None = None
    strict: bool | None = None


TextFormat = FormatText | FormatJsonObject | FormatJsonSchema


class TextConfig(msgspec.Struct, kw_only=True):
    format: TextFormat | None = None
    verbosity: Any = None


class ResponsesRequest(msgspec.Struct, kw_only=True):
    model: ModelName
    input: str | Annotated[list[dict[str, Any]], Meta(min_length=1)]
    instructions: str | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["auto", "none", "required"] | FunctionChoice | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    max_output_tokens: PositiveInt | None = None
    temperature: Temperature | None = None
    top_p: Annotated[float, Meta(gt=0, le=1)] | None = None
    store: bool = True
    previous_response_id: NonEmpty | None = None
    stream: bool = False
    metadata: dict[str, str] | None = None
    user: str | None = None


def input_items(raw: list[dict[str, Any]]) -> list[InputItem]:
    """Each item validated as the type it says it is (a message if it says none)."""
    items: list[InputItem] = []
    for i, item in enumerate(raw):
        kind = item.get("type", "message")
        struct = _ITEM_TYPES.get(kind) if isinstance(kind, str) else None
        if struct is None:
            raise BadRequest(
                f"input[{i}].type {kind!r} is not supported (expected one of: "
                f"{', '.join(_ITEM_TYPES)})", param=f"input[{i}].type")
        try:
            items.append(msgspec.convert(item, struct))
        except msgspec.ValidationError as exc:
            text = str(exc)
            where = text.rsplit(" - at `$", 1)
            path = f"input[{i}]{where[1].rstrip('`')}" if len(where) == 2 else f"input[{i}]"
            raise BadRequest(f"Invalid request: {where[0]} - at `{path}`", param=path,
                             code="invalid_value") from None
    return items
