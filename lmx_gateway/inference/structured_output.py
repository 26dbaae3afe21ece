"""Validating `response_format` and tool definitions before they reach a
worker: the schema a request asks for must lie in the subset constrained
decoding can enforce (`lmx_protocol.json_schema_subset`), or the request is
refused with a 400 naming the problem. Reusable by every
route that takes tools or schemas (chat, completions, Anthropic, Responses).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from lmx_protocol.json_schema_subset import SchemaError
from lmx_protocol.json_schema_subset import check_schema as check_subset
from lmx_supervisor.errors import BadRequest

INVALID_TYPE = "invalid_type"
MAX_TOOLS = 128
_FUNCTION_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def check_schema(schema: object, param: str) -> None:
    """400 unless `schema` is a JSON schema constrained decoding can enforce
    whole (an unimplemented keyword or format is an error, never ignored)."""
    if not isinstance(schema, dict | bool):
        raise BadRequest(f"{param} must be a JSON schema object", param=param,
                         code=INVALID_TYPE)
    try:
        check_subset(schema)
    except SchemaError as exc:
        raise BadRequest(f"{param} cannot be enforced: {exc}", param=param) from None


def response_schema(response_format: object) -> str:
    """The JSON schema (as JSON text) a `response_format` asks the output to
    follow; "" for plain text."""
    param = "response_format"
    if response_format is None:
        return ""
    if not isinstance(response_format, dict):
        raise BadRequest("response_format must be an object", param=param, code=INVALID_TYPE)
    kind = response_format.get("type")
    if kind == "text":
        return ""
    if kind == "json_object":
        return json.dumps({"type": "object"})
    if kind != "json_schema":
        raise BadRequest("response_format.type must be one of text, json_object, json_schema",
                         param="response_format.type")
    spec = response_format.get("json_schema")
    if not isinstance(spec, dict):
        raise BadRequest("response_format.json_schema must be an object with a 'schema'",
                         param="response_format.json_schema",
                         code=INVALID_TYPE if spec is not None else "missing_required_parameter")
    name = spec.get("name")
    if name is not None and not (isinstance(name, str) and _FUNCTION_NAME.match(name)):
        raise BadRequest("response_format.json_schema.name must be 1-64 letters, digits, "
                         "_ or -", param="response_format.json_schema.name")
    if "strict" in spec and not isinstance(spec["strict"], bool | None):
        raise BadRequest("response_format.json_schema.strict must be a boolean",
                         param="response_format.json_schema.strict", code=INVALID_TYPE)
    if "schema" not in spec:
        raise BadRequest("response_format.json_schema.schema is required",
                         param="response_format.json_schema.schema",
                         code="missing_required_parameter")
    check_schema(spec["schema"], param)
    return json.dumps(spec["schema"])


@dataclass
class ToolSettings:
    """A request's tools, ready for the Generate frame. `tools_json` is ""
    when no tool is offered (none given, or tool_choice none)."""

    tools_json: str = ""
    choice: str = "auto"  # auto | required | named
    name: str = ""  # the function a named tool_choice forces
    parallel: bool = True
    names: list[str] = field(default_factory=list)  # offered function names

    @property
    def offered(self) -> bool:
        return bool(self.tools_json)


def _check_tool(tool: object, i: int) -> dict[str, Any]:
    where = f"tools[{i}]"
    if not isinstance(tool, dict):
        raise BadRequest(f"{where} must be an object", param=where, code=INVALID_TYPE)
    if tool.get("type", "function") != "function":
        raise BadRequest(f"{where}.type must be 'function'", param=f"{where}.type")
    function = tool.get("function")
    if not isinstance(function, dict):
        raise BadRequest(f"{where}.function must be an object", param=f"{where}.function",
                         code=INVALID_TYPE if function is not None
                         else "missing_required_parameter")
    name = function.get("name")
    if not isinstance(name, str) or not _FUNCTION_NAME.match(name):
        raise BadRequest(f"{where}.function.name must be 1-64 letters, digits, _ or -",
                         param=f"{where}.function.name",
                         code="missing_required_parameter" if name is None else "invalid_value")
    description = function.get("description")
    if description is not None and not isinstance(description, str):
        raise BadRequest(f"{where}.function.description must be a string",
                         param=f"{where}.function.description", code=INVALID_TYPE)
    parameters = function.get("parameters")
    if parameters is not None:
        if not isinstance(parameters, dict):
            raise BadRequest(f"{where}.function.parameters must be a JSON schema object",
                             param=f"{where}.function.parameters", code=INVALID_TYPE)
        check_schema(parameters, f"{where}.function.parameters")
    clean: dict[str, Any] = {"name": name}
    if description is not None:
        clean["description"] = description
    if parameters is not None:
        clean["parameters"] = parameters
    return {"type": "function", "function": clean}


def tool_settings(tools: object, tool_choice: object, parallel: object) -> ToolSettings:
    """Validate OpenAI's `tools`, `tool_choice` and `parallel_tool_calls`."""
    if parallel is not None and not isinstance(parallel, bool):
        raise BadRequest("parallel_tool_calls must be a boolean", param="parallel_tool_calls",
                         code=INVALID_TYPE)
    if tools is None:
        tools = []
    if not isinstance(tools, list):
        raise BadRequest("tools must be a list of function tools", param="tools",
                         code=INVALID_TYPE)
    if len(tools) > MAX_TOOLS:
        raise BadRequest(f"at most {MAX_TOOLS} tools are allowed", param="tools")
    checked = [_check_tool(t, i) for i, t in enumerate(tools)]
    names = [t["function"]["name"] for t in checked]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise BadRequest(f"two tools are named '{name}'", param=f"tools[{i}].function.name")
    settings = ToolSettings(parallel=parallel is not False, names=names)
    choice = tool_choice if tool_choice is not None else "auto"
    if isinstance(choice, dict):
        function = choice.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if choice.get("type") != "function" or not isinstance(name, str):
            raise BadRequest("tool_choice must be none, auto, required or "
                             '{"type": "function", "function": {"name": ...}}',
                             param="tool_choice")
        if name not in names:
            raise BadRequest(f"tool_choice names '{name}', which is not among the tools",
                             param="tool_choice")
        settings.choice, settings.name = "named", name
    elif choice in ("auto", "none", "required"):
        if choice == "required" and not names:
            raise BadRequest("tool_choice required needs tools", param="tool_choice")
        settings.choice = str(choice)
    else:
        raise BadRequest("tool_choice must be none, auto, required or a function",
                         param="tool_choice")
    if settings.choice != "none" and checked:
        settings.tools_json = json.dumps(checked, ensure_ascii=False)
    else:
        settings.choice = "auto"  # nothing offered: free text
    return settings
