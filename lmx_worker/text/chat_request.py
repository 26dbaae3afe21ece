"""From a Generate frame to what an engine decodes: the prompt text (tools
rendered the way the chat template wants them) and the grammar, if any, the
output must follow. Shared by every backend."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import msgspec
from llguidance import LLTokenizer

from lmx_protocol import Generate
from lmx_worker.engines.engine import RequestError
from lmx_worker.text.chat_template import ChatTemplate
from lmx_worker.text.constraints import (
    ConstraintError,
    TokenConstraint,
    json_schema_grammar,
    lark_grammar,
    special_token_id,
)
from lmx_worker.text.tool_format import ToolSupport, call_grammar, prepare_chat

# Generate.tool_choice values
AUTO, REQUIRED, NAMED = "auto", "required", "named"


def request_tools(request: Generate) -> list[dict[str, Any]] | None:
    """The tools offered to the model (OpenAI's shape), or None."""
    if not request.tools:
        return None
    try:
        tools = json.loads(request.tools)
    except ValueError as exc:
        raise RequestError("invalid_request", f"tools is not valid JSON: {exc}",
                           "tools") from exc
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise RequestError("invalid_request", "tools must be an array of objects", "tools")
    return tools or None


def _client_fault(exc: Exception) -> str:
    """Why the client's input broke templating, for its 400 (the exception
    type says more than a bare message such as `'str' object has no
    attribute 'get'`)."""
    return f"{type(exc).__name__}: {exc}"


def chat_prompt(template: ChatTemplate, request: Generate) -> str:
    """The templated prompt for a chat request (`request.messages` set)."""
    assert request.messages is not None
    messages = [{k: v for k, v in msgspec.structs.asdict(m).items() if v is not None}
                for m in request.messages]
    tools = request_tools(request)
    # Whatever a message's shape does to the tool formatting or the Jinja
    # template (a tool call whose `function` is a string, a template's
    # raise_exception on roles), it is this request's fault alone: a 400
    # naming `messages`, never an exception that reaches the worker loop.
    try:
        messages, extra = prepare_chat(
            messages, template.tool_support, tools, request.tool_choice,
            request.tool_name or None, request.parallel_tool_calls)
        return template.render(messages, request.add_generation_prompt, **extra)
    except RequestError:
        raise
    except MemoryError:
        raise
    except Exception as exc:
        raise RequestError("invalid_request",
                           f"cannot format the chat messages: {_client_fault(exc)}",
                           "messages") from exc


def request_grammar(request: Generate, support: ToolSupport | None,
                    special: Callable[[str], int | None]) -> str | None:
    """The llguidance grammar this request decodes under, or None (free
    text). `required` / named tool_choice force calls in the model's format;
    a response_format schema forces the answer (still letting the model call
    a tool instead when tools are offered with tool_choice auto).
    Raises ConstraintError for a grammar that cannot be built."""
    schema = json.loads(request.params.json_schema) if request.params.json_schema else None
    tools = request_tools(request) if support is not None else None
    if tools and support is not None and request.tool_choice in (REQUIRED, NAMED):
        parallel = request.parallel_tool_calls
        if request.tool_choice == NAMED:
            # A named function is called once: small models otherwise repeat
            # the same call until max_tokens.
            tools = [t for t in tools if t["function"]["name"] == request.tool_name]
            parallel = False
        return lark_grammar(call_grammar(tools, support, parallel, special))
    if schema is None:
        return None
    if tools and support is not None and isinstance(schema, dict):
        return lark_grammar(call_grammar(tools, support, request.parallel_tool_calls, special,
                                         answer_schema=schema))
    return json_schema_grammar(schema)


def request_constraint(request: Generate, template: ChatTemplate | None,
                       tokenizer: Callable[[], LLTokenizer]) -> TokenConstraint | None:
    """The grammar matcher a request's output must follow (response_format,
    forced tool calls), or None. `tokenizer` builds the engine's llguidance
    tokenizer, only when a grammar needs it. Raises RequestError (400) for a
    format that cannot be enforced."""
    chat_template = template if request.messages is not None else None
    support = chat_template.tool_support if chat_template is not None else None
    try:
        grammar = request_grammar(request, support,
                                  lambda text: special_token_id(tokenizer(), text))
        if grammar is None:
            return None
        return TokenConstraint(tokenizer(), grammar)
    except ConstraintError as exc:
        raise RequestError("invalid_request",
                           f"cannot enforce the requested output format: {exc}",
                           "tools" if request.tools else "response_format") from exc
    except (RequestError, MemoryError):
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        # A tool without function.name, a schema of the wrong type: the
        # grammar cannot be built from what the client sent.
        raise RequestError("invalid_request",
                           f"cannot enforce the requested output format: {_client_fault(exc)}",
                           "tools" if request.tools else "response_format") from exc
