"""The contract between the worker's step loop and a model backend.

A backend never touches sockets. The loop hands it requests, asks it to make
one step of progress (one token per running sequence), and forwards the
frames it returns. Checking for aborts between steps is what makes a
cancelled stream stop within one token.
"""

from __future__ import annotations

from typing import Protocol

from lmx_protocol import Failed, Finished, FinishReason, Generate, Tokens, WorkerStats

StepOutput = Tokens | Finished | Failed


class RequestError(Exception):
    """A request the backend cannot serve (bad input, too long prompt)."""

    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param  # the request field at fault, when one is


def admit(request: Generate, prompt: list[int], context: int,
          counted: list[StepOutput]) -> int | None:
    """How many tokens `request` may generate after `prompt` in a context of
    `context` tokens: its max_tokens, capped by the room left. None when the
    request only counts its prompt: its answer is appended to `counted` and
    nothing is decoded. Raises RequestError for an empty prompt or one that
    leaves no room."""
    if not prompt:
        raise RequestError("invalid_request", "the prompt is empty")
    if request.count_only:
        counted.append(Finished(request.request_id, FinishReason.STOP, len(prompt), 0))
        return None
    if len(prompt) >= context:
        raise RequestError("context_length_exceeded",
                           f"prompt is {len(prompt)} tokens; the context holds {context}")
    room = context - len(prompt)
    max_tokens = request.params.max_tokens
    max_new = min(max_tokens, room) if max_tokens is not None else room
    if max_new <= 0:
        raise RequestError("invalid_request", "max_tokens must be at least 1",
                           param="max_tokens")
    return max_new


class Engine(Protocol):
    backend: str
    backend_version: str
    context_length: int
    capabilities: list[str]

    def memory_bytes(self) -> int: ...

    def add(self, request: Generate) -> None:
        """Queue a request; it starts at a later step."""

    def abort(self, request_id: str) -> list[StepOutput]:
        """Stop a request now, freeing its resources; returns its final frame
        (an empty list if the request is unknown or already finished)."""

    def has_work(self) -> bool: ...

    def step(self) -> list[StepOutput]:
        """Advance every running request by one token."""

    def fill_stats(self, stats: WorkerStats) -> None:
        """Write backend-owned counters (active/queued) into `stats`."""

    def reset(self) -> None:
        """Forget every request, running or queued, and any batch state a
        failed step may have left half-updated (the loop has already failed
        those requests): the next request starts from a clean engine."""
