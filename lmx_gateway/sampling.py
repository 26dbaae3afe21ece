"""From a validated OpenAI request to the worker's Generate frame: merge the
spellings clients use, refuse what would otherwise be silently ignored."""

from __future__ import annotations

from lmx_gateway.schemas import ChatCompletionRequest, CompletionRequest, SamplingFields, TextPart
from lmx_protocol import ChatMessage, Generate, SamplingParams
from lmx_supervisor.errors import BadRequest

UNSUPPORTED = "unsupported_parameter"


def _refuse_unsupported(req: SamplingFields) -> None:
    if req.n != 1:
        raise BadRequest("n > 1 is not supported; send separate requests", param="n",
                         code=UNSUPPORTED)
    if req.tools:
        raise BadRequest("tool calling is not supported yet", param="tools", code=UNSUPPORTED)
    if req.tool_choice not in (None, "none", "auto"):
        raise BadRequest("tool_choice is not supported yet", param="tool_choice",
                         code=UNSUPPORTED)
    fmt = req.response_format
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise BadRequest("response_format other than text is not supported yet",
                         param="response_format", code=UNSUPPORTED)
    if req.logprobs not in (None, False) or req.top_logprobs not in (None, 0):
        raise BadRequest("logprobs are not supported yet", param="logprobs", code=UNSUPPORTED)
    if req.logit_bias:
        raise BadRequest("logit_bias is not supported", param="logit_bias", code=UNSUPPORTED)


def sampling_params(req: SamplingFields, max_tokens: int | None) -> SamplingParams:
    _refuse_unsupported(req)
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


def chat_generate(req: ChatCompletionRequest, request_id: str) -> Generate:
    max_tokens = req.max_completion_tokens or req.max_tokens
    messages = [
        ChatMessage(role="system" if m.role == "developer" else m.role,
                    content=_flatten(m.content, i), name=m.name,
                    tool_calls=m.tool_calls, tool_call_id=m.tool_call_id)
        for i, m in enumerate(req.messages)
    ]
    return Generate(request_id=request_id, params=sampling_params(req, max_tokens),
                    messages=messages)


def completion_generate(req: CompletionRequest, request_id: str) -> Generate:
    if req.echo:
        raise BadRequest("echo is not supported", param="echo", code=UNSUPPORTED)
    if req.suffix:
        raise BadRequest("suffix is not supported", param="suffix", code=UNSUPPORTED)
    if req.best_of not in (None, 1):
        raise BadRequest("best_of > 1 is not supported", param="best_of", code=UNSUPPORTED)
    prompt = req.prompt if isinstance(req.prompt, str) else req.prompt[0]
    # OpenAI's legacy default is 16 tokens; keep it so clients get what they expect.
    max_tokens = req.max_tokens if req.max_tokens is not None else 16
    return Generate(request_id=request_id, params=sampling_params(req, max_tokens),
                    prompt=prompt)
