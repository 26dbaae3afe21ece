"""How models write tool calls: the format names and their marker strings.

Shared by both sides: the worker reads a model's format off its chat
template and builds the grammar that forces a call; the gateway parses calls
back out of generated text. The worker reports the format in `Ready.tool_format`.

- `hermes`: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`;
- `mistral`: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`, or in
  newer templates `[TOOL_CALLS]name[ARGS]{...}`;
- `llama3_json`: `{"name": ..., "parameters": {...}}`, optionally after
  `<|python_tag|>`;
- `json`: a bare JSON object `{"name": ..., "arguments": {...}}` (or a list).
"""

from __future__ import annotations

import enum


class ToolFormat(enum.StrEnum):
    HERMES = "hermes"
    MISTRAL = "mistral"
    LLAMA3_JSON = "llama3_json"
    JSON = "json"


HERMES_OPEN = "<tool_call>"
HERMES_CLOSE = "</tool_call>"
MISTRAL_MARKER = "[TOOL_CALLS]"
MISTRAL_ARGS = "[ARGS]"
PYTHON_TAG = "<|python_tag|>"


def argument_key(fmt: ToolFormat | str) -> str:
    """The key a call's arguments are written under in this format."""
    return "parameters" if fmt == ToolFormat.LLAMA3_JSON else "arguments"
