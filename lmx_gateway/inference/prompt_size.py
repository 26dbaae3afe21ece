"""Refusing a prompt that cannot fit the model's context before a worker
tokenizes it.

A worker finds an oversized prompt only after templating and tokenizing it
all, and a 9 MB prompt keeps it busy for seconds while every other stream on
it waits. The gateway has no tokenizer, but it has a sound lower bound on the
token count: a token's text is at most `server.max_prompt_chars_per_token`
characters long (64 by default; the longest tokens of common vocabularies
are runs of spaces or punctuation well under that), so a prompt of N
characters needs at least N / 64 tokens. Beyond context_length x 64
characters the request can only fail, and fails at once with the worker's
own error, 400 `context_length_exceeded`. Characters, not bytes: a character
is at least one byte, so counting them never refuses a prompt that fits, and
it costs nothing (no encoding of a 9 MB string).
"""

from __future__ import annotations

from lmx_protocol import Generate
from lmx_supervisor.errors import BadRequest
from lmx_supervisor.lifecycle.managed_model import ManagedModel


def prompt_chars(frame: Generate) -> int:
    """Characters the worker would template: prompt or messages (content,
    earlier calls' names and arguments) plus the offered tools."""
    total = len(frame.prompt or "") + len(frame.tools)
    for message in frame.messages or ():
        total += len(message.content or "") + len(message.name or "")
        for call in message.tool_calls or ():
            function = call.get("function") or {}
            total += len(str(function.get("name", ""))) + len(str(function.get("arguments", "")))
    return total


def check_prompt_size(model: ManagedModel, frame: Generate, chars_per_token: int) -> None:
    ready = model.ready
    if ready is None or ready.context_length <= 0:
        return  # not up yet: the worker checks it itself
    limit = ready.context_length * chars_per_token
    chars = prompt_chars(frame)
    if chars > limit:
        raise BadRequest(
            f"The prompt is {chars} characters long; '{model.model_id}' has a context of "
            f"{ready.context_length} tokens, which no prompt over {limit} characters fits "
            "(server.max_prompt_chars_per_token)",
            param="prompt" if frame.prompt is not None else "messages",
            code="context_length_exceeded")
