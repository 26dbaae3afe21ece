"""Request bodies of Ollama's API (unknown fields are ignored, as Ollama
itself does; fields LMX cannot honour are refused where they are read)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

ModelName = Annotated[str, Meta(min_length=1)]


class Message(msgspec.Struct, kw_only=True):
    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    images: list[str] | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_name: str | None = None
    thinking: str | None = None  # an earlier turn's reasoning: not part of the prompt


class ChatBody(msgspec.Struct, kw_only=True):
    model: ModelName
    messages: list[Message] = []
    tools: list[dict[str, Any]] | None = None
    format: Any = None
    options: dict[str, Any] | None = None
    stream: bool = True
    keep_alive: Any = None
    think: Any = None


class GenerateBody(msgspec.Struct, kw_only=True):
    model: ModelName
    prompt: str = ""
    suffix: str | None = None
    system: str | None = None
    template: str | None = None
    context: list[int] | None = None
    images: list[str] | None = None
    format: Any = None
    options: dict[str, Any] | None = None
    stream: bool = True
    raw: bool = False
    keep_alive: Any = None
    think: Any = None


class EmbedBody(msgspec.Struct, kw_only=True):
    model: ModelName
    input: str | Annotated[list[str], Meta(min_length=1)]
    truncate: bool = True
    dimensions: Annotated[int, Meta(ge=1)] | None = None
    options: dict[str, Any] | None = None
    keep_alive: Any = None


class LegacyEmbedBody(msgspec.Struct, kw_only=True):
    model: ModelName
    prompt: str
    options: dict[str, Any] | None = None
    keep_alive: Any = None


class ModelRef(msgspec.Struct, kw_only=True):
    """show / delete / pull: `model`, or `name` in older clients."""

    model: str | None = None
    name: str | None = None
    stream: bool = True
    insecure: bool = False
    verbose: bool = False

    @property
    def ref(self) -> str:
        return self.model or self.name or ""
