"""How a model writes tool calls, and how tools reach its prompt.

Backend-independent (both engines render through `ChatTemplate`). The
format is read off the chat template's source:

- `hermes`: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`
  (Hermes, Qwen 2/2.5/3, and every template that does not take tools: those
  get the tools and this format described in a system prompt);
- `mistral`: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`, or in
  newer templates `[TOOL_CALLS]name[ARGS]{...}`;
- `llama3_json`: `{"name": ..., "parameters": {...}}`, optionally after
  `<|python_tag|>` (Llama 3.1+);
- `json`: a bare JSON object `{"name": ..., "arguments": {...}}` (or a list
  of them), for templates that take tools but show no known marker.

The format names and markers live in `lmx_protocol.tool_formats`, which
the gateway's parser shares;
`call_grammar` builds the Lark grammar that forces a valid call when
`tool_choice` is `required` or names a function.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any

from lmx_protocol.tool_formats import (
    HERMES_CLOSE,
    HERMES_OPEN,
    MISTRAL_ARGS,
    MISTRAL_MARKER,
    ToolFormat,
)
from lmx_worker.text.constraints import JSON_LAYOUT, close_objects

# Re-exported: the engines and tests know them from here.
from lmx_worker.text.template_inspection import ToolSupport, inspect_template

__all__ = ["ToolFormat", "ToolSupport", "call_body_schema", "call_grammar", "inspect_template",
           "prepare_chat", "tools_system_prompt"]


# --- prompt -------------------------------------------------------------------


def tools_system_prompt(tools: list[dict[str, Any]], choice: str, forced: str | None,
                        parallel: bool) -> str:
    """For templates that do not take tools: describe them, and the Hermes
    call format the output parser expects."""
    lines = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    if forced:
        rule = f"You must call the function {forced}."
    elif choice == "required":
        rule = "You must call at least one function."
    else:
        rule = "Call a function only when it helps; otherwise answer normally."
    if not parallel:
        rule += " Call at most one function."
    return (
        "You can call functions. Their signatures, one JSON object per line, are "
        f"inside <tools></tools>:\n<tools>\n{lines}\n</tools>\n\n"
        "To call a function, write a JSON object with its name and arguments between "
        f"{HERMES_OPEN} and {HERMES_CLOSE} tags:\n"
        f'{HERMES_OPEN}\n{{"name": "function_name", "arguments": {{"argument": "value"}}}}\n'
        f"{HERMES_CLOSE}\n{rule}"
    )


def _arguments_object(raw: Any) -> Any:
    """OpenAI sends arguments as a JSON string; templates (HF convention)
    expect a mapping they can `tojson`."""
    if isinstance(raw, str):
        try:
            return json.loads(raw)
        except ValueError:
            return raw
    return raw


def _mistral_id(call_id: str) -> str:
    """Mistral templates insist on 9-character alphanumeric call ids."""
    return hashlib.sha256(call_id.encode()).hexdigest()[:9]


def _call_text(call: dict[str, Any]) -> str:
    function = call.get("function") or {}
    body = {"name": function.get("name", ""),
            "arguments": _arguments_object(function.get("arguments", {}))}
    return f"{HERMES_OPEN}\n{json.dumps(body, ensure_ascii=False)}\n{HERMES_CLOSE}"


def _inline_history(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For templates that know nothing of tools: assistant calls become
    Hermes text, tool results become user turns (runs of them merged, since
    many templates insist on alternating roles)."""
    out: list[dict[str, Any]] = []
    for message in messages:
        role = message.get("role")
        if role == "assistant" and message.get("tool_calls"):
            parts = [message.get("content") or ""]
            parts += [_call_text(c) for c in message["tool_calls"]]
            out.append({"role": "assistant", "content": "\n".join(p for p in parts if p)})
        elif role == "tool":
            text = f"<tool_response>\n{message.get('content') or ''}\n</tool_response>"
            if out and out[-1].get("role") == "user" and out[-1].get("_tool_results"):
                out[-1]["content"] += "\n" + text
            else:
                out.append({"role": "user", "content": text, "_tool_results": True})
        else:
            out.append(dict(message))
    for message in out:
        message.pop("_tool_results", None)
    return out


def _template_history(messages: list[dict[str, Any]], support: ToolSupport
                      ) -> list[dict[str, Any]]:
    """For templates that take tools: arguments as mappings, content never
    missing on assistant calls, and Mistral's id rule."""
    mistral = support.format is ToolFormat.MISTRAL
    out: list[dict[str, Any]] = []
    for message in messages:
        message = dict(message)
        if message.get("tool_calls"):
            calls = []
            for call in message["tool_calls"]:
                call = dict(call)
                function = dict(call.get("function") or {})
                function["arguments"] = _arguments_object(function.get("arguments", {}))
                call["function"] = function
                if mistral and "id" in call:
                    call["id"] = _mistral_id(str(call["id"]))
                calls.append(call)
            message["tool_calls"] = calls
            message.setdefault("content", "")
        if mistral and message.get("tool_call_id"):
            message["tool_call_id"] = _mistral_id(str(message["tool_call_id"]))
        out.append(message)
    return out


def prepare_chat(messages: list[dict[str, Any]], support: ToolSupport,
                 tools: list[dict[str, Any]] | None, choice: str = "auto",
                 forced: str | None = None, parallel: bool = True
                 ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Messages and extra template variables for one request. `tools` None:
    no tools offered (the history may still hold calls and results)."""
    if support.takes_tools:
        extra = {"tools": tools} if tools else {}
        return _template_history(messages, support), extra
    prepared = _inline_history(messages)
    if tools:
        prompt = tools_system_prompt(tools, choice, forced, parallel)
        if prepared and prepared[0].get("role") == "system":
            first = dict(prepared[0])
            first["content"] = f"{first.get('content') or ''}\n\n{prompt}".lstrip()
            prepared[0] = first
        else:
            prepared.insert(0, {"role": "system", "content": prompt})
    return prepared, {}


# --- grammar ------------------------------------------------------------------


def _call_schema(tool: dict[str, Any], argument_key: str) -> dict[str, Any]:
    function = tool["function"]
    parameters = close_objects(function.get("parameters") or {"type": "object"})
    return {
        "type": "object",
        "properties": {"name": {"const": function["name"]}, argument_key: parameters},
        "required": ["name", argument_key],
        "additionalProperties": False,
    }


def call_body_schema(tools: list[dict[str, Any]], argument_key: str = "arguments"
                     ) -> dict[str, Any]:
    """JSON schema of one call object: a name among the tools' names, and
    arguments matching that tool's `parameters`."""
    options = [_call_schema(t, argument_key) for t in tools]
    schema: dict[str, Any] = options[0] if len(options) == 1 else {"anyOf": options}
    return {**schema, "x-guidance": JSON_LAYOUT}


def _lark_literal(text: str, special: Callable[[str], int | None]) -> str:
    token = special(text)
    return f"<[{token}]>" if token is not None else json.dumps(text)


def call_grammar(tools: list[dict[str, Any]], support: ToolSupport, parallel: bool,
                 special: Callable[[str], int | None] = lambda _text: None,
                 answer_schema: dict[str, Any] | None = None) -> str:
    """A Lark grammar (llguidance dialect) admitting only tool calls in the
    model's format: one, or several when `parallel`. `tools` should already
    be narrowed to the named function for a named tool_choice. `special`
    maps a marker to its special-token id when the vocabulary has one.
    `answer_schema`: a JSON answer matching it is also admitted (tool_choice
    auto with response_format)."""
    key = support.argument_key
    body = json.dumps(call_body_schema(tools, key), ensure_ascii=False)
    rules = [f"body: %json {body}"]
    if support.format is ToolFormat.HERMES:
        rules.append(f"call: {_lark_literal(HERMES_OPEN, special)} \"\\n\" body "
                     f"\"\\n\" {_lark_literal(HERMES_CLOSE, special)}")
        calls = 'call ("\\n" call)*' if parallel else "call"
    elif support.format is ToolFormat.MISTRAL:
        marker = _lark_literal(MISTRAL_MARKER, special)
        if support.mistral_args:
            args = _lark_literal(MISTRAL_ARGS, special)
            options = []
            for i, tool in enumerate(tools):
                params = close_objects(tool["function"].get("parameters") or {"type": "object"})
                schema = json.dumps({**params, "x-guidance": JSON_LAYOUT}, ensure_ascii=False)
                rules.append(f"args_{i}: %json {schema}")
                options.append(f'{json.dumps(tool["function"]["name"])} {args} args_{i}')
            rules.append("call: " + " | ".join(f"({o})" for o in options))
            calls = f"{marker} call ({marker} call)*" if parallel else f"{marker} call"
        else:
            more = ' (", " body)*' if parallel else ""
            calls = f'{marker} "[" body{more} "]"'
    elif support.format is ToolFormat.LLAMA3_JSON:
        calls = 'body ("; " body)*' if parallel else "body"
    else:
        calls = 'body | "[" body (", " body)* "]"' if parallel else "body"
    rules.insert(0, f"calls: {calls}")
    if answer_schema is not None:
        answer = json.dumps({"x-guidance": JSON_LAYOUT, **close_objects(answer_schema)},
                            ensure_ascii=False)
        rules.insert(0, "start: calls | answer")
        rules.append(f"answer: %json {answer}")
    else:
        rules.insert(0, "start: calls")
    return "%llguidance {}\n" + "\n".join(rules) + "\n"
