"""From a validated OpenAI request to the worker's Generate frame: merge the
spellings clients use, refuse what would otherwise be silently ignored."""

from __future__ import annotations

import asyncio
from typing import Any

from lmx_gateway.inference.structured_output import response_schema, tool_settings
from lmx_gateway.openai.request_surface import UNSUPPORTED, check_chat_surface, logit_bias
from lmx_gateway.openai.schemas import (
    ChatCompletionRequest,
    ChatMessageIn,
    CompletionRequest,
    SamplingFields,
    TextPart,
    ToolCallIn,
)
from lmx_protocol import ChatMessage, Generate, SamplingParams
from lmx_supervisor.errors import BadRequest

__all__ = ["UNSUPPORTED", "chat_generate", "completion_generate", "sampling_params"]

MAX_TOP_LOGPROBS = 20


def _top_count(value: object, param: str) -> int:
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"{param} must be an integer", param=param, code="invalid_type")
    if not 0 <= value <= MAX_TOP_LOGPROBS:
        raise BadRequest(f"{param} must be between 0 and {MAX_TOP_LOGPROBS}", param=param)
    return value


def logprob_settings(req: SamplingFields, chat: bool) -> tuple[bool, int]:
    """Chat says `logprobs: true, top_logprobs: N`; legacy completions say
    `logprobs: N`. Both become (wanted, alternatives per position)."""
    if not chat:
        top = _top_count(req.logprobs, "logprobs")
        return req.logprobs is not None, top
    if req.logprobs is not None and not isinstance(req.logprobs, bool):
        raise BadRequest("logprobs must be a boolean", param="logprobs", code="invalid_type")
    top = _top_count(req.top_logprobs, "top_logprobs")
    if top and not req.logprobs:
        raise BadRequest("top_logprobs requires logprobs: true", param="top_logprobs")
    return bool(req.logprobs), top


def sampling_params(req: SamplingFields, max_tokens: int | None, chat: bool = True
                    ) -> SamplingParams:
    logprobs, top_logprobs = logprob_settings(req, chat)
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    repetition = req.repetition_penalty or req.repeat_penalty or 1.0
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=req.top_k or 0,
        min_p=req.min_p or 0.0,
        seed=req.seed,
        stop=[s for s in stop if s],
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        repetition_penalty=repetition,
        ignore_eos=req.ignore_eos,
        logprobs=logprobs,
        top_logprobs=top_logprobs,
        json_schema=response_schema(req.response_format),
        logit_bias=logit_bias(req.logit_bias),
    )


def _flatten(content: object, index: int) -> str | None:
    if content is None or isinstance(content, str):
        return content
    assert isinstance(content, list)
    texts = []
    for part in content:
        if not isinstance(part, TextPart):
            raise BadRequest("only text content parts are supported by this model",
                             param=f"messages[{index}].content", code=UNSUPPORTED)
        texts.append(part.text)
    return "".join(texts)


def _check_roles(messages: list[ChatMessageIn]) -> None:
    """What each role may carry (the shapes themselves are typed in schemas.py)."""
    for i, m in enumerate(messages):
        if m.tool_calls and m.role != "assistant":
            raise BadRequest(f"only assistant messages carry tool_calls (this one is {m.role})",
                             param=f"messages[{i}].tool_calls")
        if m.role == "tool" and m.tool_call_id is None:
            raise BadRequest("a tool message needs the tool_call_id it answers",
                             param=f"messages[{i}].tool_call_id",
                             code="missing_required_parameter")


def _calls(calls: list[ToolCallIn] | None) -> list[dict[str, Any]] | None:
    if not calls:
        return None
    return [{"id": c.id, "type": c.type,
             "function": {"name": c.function.name, "arguments": c.function.arguments}}
            for c in calls]


def chat_generate(req: ChatCompletionRequest, request_id: str) -> Generate:
    check_chat_surface(req)
    max_tokens = req.max_completion_tokens or req.max_tokens
    _check_roles(req.messages)
    messages = [
        ChatMessage(role="system" if m.role == "developer" else m.role,
                    content=_flatten(m.content, i), name=m.name,
                    tool_calls=_calls(m.tool_calls), tool_call_id=m.tool_call_id)
        for i, m in enumerate(req.messages)
    ]
    tools = tool_settings(req.tools, req.tool_choice, req.parallel_tool_calls)
    return Generate(request_id=request_id, params=sampling_params(req, max_tokens),
                    messages=messages, tools=tools.tools_json, tool_choice=tools.choice,
                    tool_name=tools.name, parallel_tool_calls=tools.parallel)


async def chat_generate_async(req: ChatCompletionRequest, request_id: str) -> Generate:
    """`chat_generate` on a thread when the request carries schemas: checking
    128 tools' parameters can take long enough to stall every other request
    (and /healthz) if done on the event loop."""
    if req.tools is None and req.response_format is None:
        return chat_generate(req, request_id)
    return await asyncio.to_thread(chat_generate, req, request_id)


def completion_generate(req: CompletionRequest, request_id: str) -> Generate:
    if req.echo and req.logprobs is not None:
        raise BadRequest("echo with logprobs is not supported (prompt tokens get no "
                         "logprobs here)", param="echo", code=UNSUPPORTED)
    if req.echo and req.suffix is not None:
        raise BadRequest("echo and suffix cannot be combined", param="echo", code=UNSUPPORTED)
    if req.tools is not None or req.tool_choice is not None:
        raise BadRequest("tools are only supported on /v1/chat/completions",
                         param="tools" if req.tools is not None else "tool_choice",
                         code=UNSUPPORTED)
    if req.best_of not in (None, 1):
        raise BadRequest("best_of > 1 is not supported", param="best_of", code=UNSUPPORTED)
    prompt = req.prompt if isinstance(req.prompt, str) else req.prompt[0]
    # OpenAI's legacy default is 16 tokens; keep it so clients get what they expect.
    max_tokens = req.max_tokens if req.max_tokens is not None else 16
    return Generate(request_id=request_id, params=sampling_params(req, max_tokens, chat=False),
                    prompt=prompt, suffix=req.suffix)
