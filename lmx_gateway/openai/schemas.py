"""Request bodies of the OpenAI-compatible routes, validated by msgspec.

Unknown fields are ignored, as OpenAI clients send fields a local server may
not know; every field of the SDK's request types is declared here, and
those whose silent ignoring would change the answer are decided explicitly
in `request_surface.py` and `sampling.py` (tools and response_format in
`inference/structured_output.py`); README.md's table lists every decision."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

Temperature = Annotated[float, Meta(ge=0, le=2)]
Probability = Annotated[float, Meta(ge=0, le=1)]
Penalty = Annotated[float, Meta(ge=-2, le=2)]
PositiveInt = Annotated[int, Meta(ge=1)]
NonNegativeInt = Annotated[int, Meta(ge=0)]
ModelName = Annotated[str, Meta(min_length=1)]
# Stop strings are matched against every decoded token's tail, so both their
# number and their length are bounded.
MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 512
StopString = Annotated[str, Meta(max_length=MAX_STOP_LENGTH)]
Stop = StopString | Annotated[list[StopString], Meta(max_length=MAX_STOP_STRINGS)] | None
# Names, call ids and calls per message: generous for any real client, small
# enough that history cannot smuggle in unbounded structure.
MAX_NAME_LENGTH = 256
MAX_ID_LENGTH = 256
MAX_CALLS_PER_MESSAGE = 128


class TextPart(msgspec.Struct, tag_field="type", tag="text"):
    text: str


class ImagePart(msgspec.Struct, tag_field="type", tag="image_url"):
    image_url: Any


ContentPart = TextPart | ImagePart


class FunctionCallIn(msgspec.Struct, kw_only=True):
    """An earlier call's function: arguments are JSON text, as OpenAI sends
    them (templates parse them back; text that is not JSON is kept as is)."""

    name: Annotated[str, Meta(min_length=1, max_length=MAX_NAME_LENGTH)]
    arguments: str


class ToolCallIn(msgspec.Struct, kw_only=True):
    """A call in an assistant message of the history. Typed so a malformed
    call is a 400 naming its field here, never an exception in a worker."""

    id: Annotated[str, Meta(min_length=1, max_length=MAX_ID_LENGTH)]
    function: FunctionCallIn
    type: Literal["function"] = "function"


def tool_call_in(call_id: str, name: str, arguments: str) -> ToolCallIn:
    return ToolCallIn(id=call_id, function=FunctionCallIn(name=name, arguments=arguments))


class ChatMessageIn(msgspec.Struct, kw_only=True):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: Annotated[str, Meta(max_length=MAX_NAME_LENGTH)] | None = None
    tool_calls: Annotated[list[ToolCallIn], Meta(max_length=MAX_CALLS_PER_MESSAGE)] | None = None
    tool_call_id: Annotated[str, Meta(min_length=1, max_length=MAX_ID_LENGTH)] | None = None


class StreamOptions(msgspec.Struct, kw_only=True):
    include_usage: bool = False


class SamplingDefaults(msgspec.Struct, kw_only=True):
    """The sampling fields a preset may give defaults for: one declaration,
    so a preset can never hold a value a request could not."""

    max_tokens: PositiveInt | None = None
    temperature: Temperature | None = None
    top_p: Annotated[float, Meta(gt=0, le=1)] | None = None
    top_k: NonNegativeInt | None = None
    min_p: Probability | None = None
    seed: int | None = None
    stop: Stop = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    repetition_penalty: Annotated[float, Meta(gt=0)] | None = None


class SamplingFields(SamplingDefaults, kw_only=True):
    model: ModelName
    stream: bool = False
    stream_options: StreamOptions | None = None
    repeat_penalty: Annotated[float, Meta(gt=0)] | None = None  # llama.cpp spelling
    n: PositiveInt = 1
    ignore_eos: bool = False
    user: str | None = None
    # Typed loosely so bad values are refused with a precise param (sampling.py,
    # inference/structured_output.py) rather than a generic decode error.
    logprobs: Any = None
    top_logprobs: Any = None
    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: Any = None
    response_format: Any = None
    logit_bias: Any = None


class ChatCompletionRequest(SamplingFields, kw_only=True):
    messages: Annotated[list[ChatMessageIn], Meta(min_length=1)]
    max_completion_tokens: PositiveInt | None = None
    # Decided in request_surface.py: refused, no-ops, or carried to the logs.
    audio: Any = None
    function_call: Any = None
    functions: Any = None
    metadata: Any = None
    modalities: Any = None
    moderation: Any = None
    prediction: Any = None
    prompt_cache_key: str | None = None
    prompt_cache_options: Any = None
    prompt_cache_retention: Any = None
    reasoning_effort: Any = None
    safety_identifier: str | None = None
    service_tier: str | None = None
    store: bool | None = None
    verbosity: Any = None
    web_search_options: Any = None


class CompletionRequest(SamplingFields, kw_only=True):
    prompt: str | Annotated[list[str], Meta(min_length=1, max_length=1)]
    echo: bool = False
    suffix: str | None = None
    best_of: PositiveInt | None = None
