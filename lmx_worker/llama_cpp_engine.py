"""llama.cpp backend (llama-cpp-python) for GGUF models.

One context, one running request at a time for now; further requests wait
in FIFO order. Each `step()` samples exactly one token, so the worker loop
sees Aborts between tokens. Prompt templating uses the chat template stored
in the GGUF metadata; llama.cpp's own KV prefix reuse makes a follow-up turn
recompute only its new suffix.
"""

from __future__ import annotations

import ctypes
import os
import random
from collections import deque
from collections.abc import Generator
from dataclasses import dataclass, field

import llama_cpp
import msgspec
import psutil

from lmx_protocol import (
    ErrorCode,
    Failed,
    Finished,
    FinishReason,
    Generate,
    Tokens,
    WorkerStats,
)
from lmx_worker.chat_template import ChatTemplate
from lmx_worker.engine import RequestError, StepOutput
from lmx_worker.spec import WorkerSpec
from lmx_worker.text_stream import TextStream

_PIECE_BUFFER = 256


@dataclass
class _Running:
    request: Generate
    prompt_tokens: int
    max_new: int
    tokens: Generator[int, None, None]
    stream: TextStream
    generated: list[int] = field(default_factory=list)


class LlamaCppEngine:
    backend = "llama_cpp"
    def __init__(self, spec: WorkerSpec) -> None:
        self.capabilities = ["chat", "completions"]
        self.backend_version = str(llama_cpp.__version__)
        self.llm = llama_cpp.Llama(
            model_path=spec.model_path,
            n_ctx=spec.context_length,
            n_threads=spec.n_threads or None,
            n_batch=512,
            verbose=os.environ.get("LMX_WORKER_LOG_LEVEL") == "DEBUG",
        )
        self.context_length = self.llm.n_ctx()
        model = self.llm._model
        self._vocab = model.vocab
        self._add_bos = bool(model.add_bos_token())
        self._piece = ctypes.create_string_buffer(_PIECE_BUFFER)
        template = self.llm.metadata.get("tokenizer.chat_template")
        self.chat_template = None
        if template:
            eos, bos = self.llm.token_eos(), self.llm.token_bos()
            self.chat_template = ChatTemplate(
                template,
                bos_token=model.token_get_text(bos) if bos != -1 else "",
                eos_token=model.token_get_text(eos) if eos != -1 else "",
            )
        self._pending: deque[tuple[Generate, list[int]]] = deque()
        self._running: _Running | None = None

    def memory_bytes(self) -> int:
        return int(psutil.Process().memory_info().rss)

    # --- requests -------------------------------------------------------------

    def _prompt_tokens(self, request: Generate) -> list[int]:
        if request.messages is not None:
            if self.chat_template is None:
                raise RequestError("unsupported_feature",
                                   "this model has no chat template; use /v1/completions")
            messages = [msgspec.structs.asdict(m) for m in request.messages]
            for message in messages:
                for key in [k for k, v in message.items() if v is None]:
                    del message[key]
            text = self.chat_template.render(messages, request.add_generation_prompt)
            # The template writes BOS itself when the model wants one.
            return list(self.llm.tokenize(text.encode(), add_bos=False, special=True))
        prompt = request.prompt or ""
        return list(self.llm.tokenize(prompt.encode(), add_bos=self._add_bos, special=True))

    def add(self, request: Generate) -> None:
        tokens = self._prompt_tokens(request)
        if not tokens:
            raise RequestError("invalid_request", "the prompt is empty")
        if len(tokens) >= self.context_length:
            raise RequestError(
                "context_length_exceeded",
                f"prompt is {len(tokens)} tokens; the context holds {self.context_length}")
        self._pending.append((request, tokens))

    def abort(self, request_id: str) -> list[StepOutput]:
        running = self._running
        if running is not None and running.request.request_id == request_id:
            running.tokens.close()
            self._running = None
            return [self._finish(running, FinishReason.ABORT, "")]
        for item in self._pending:
            if item[0].request_id == request_id:
                self._pending.remove(item)
                return [Finished(request_id, FinishReason.ABORT, len(item[1]), 0)]
        return []

    def has_work(self) -> bool:
        return self._running is not None or bool(self._pending)

    def fill_stats(self, stats: WorkerStats) -> None:
        stats.active_requests = 1 if self._running else 0
        stats.queued_requests = len(self._pending)

    # --- decoding -------------------------------------------------------------

    def _start(self, request: Generate, prompt: list[int]) -> _Running:
        p = request.params
        # Per-request seed; without one, a fresh random seed per request so
        # two unseeded requests do not produce the same "random" text.
        self.llm.set_seed(p.seed if p.seed is not None else random.getrandbits(31))
        room = self.context_length - len(prompt)
        max_new = min(p.max_tokens, room) if p.max_tokens is not None else room
        tokens = self.llm.generate(
            prompt, top_k=p.top_k, top_p=p.top_p, min_p=p.min_p, typical_p=1.0,
            temp=p.temperature, repeat_penalty=p.repetition_penalty,
            frequency_penalty=p.frequency_penalty, presence_penalty=p.presence_penalty,
            reset=True)
        return _Running(request, len(prompt), max_new, tokens, TextStream(p.stop))

    def _token_bytes(self, token: int) -> bytes:
        n = llama_cpp.llama_token_to_piece(self._vocab, token, self._piece, _PIECE_BUFFER, 0,
                                           False)
        if n < 0:  # piece longer than the buffer
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, -n, 0, False)
            return buf.raw[:n]
        return self._piece.raw[:n]

    def _finish(self, running: _Running, reason: FinishReason, text: str) -> Finished:
        return Finished(running.request.request_id, reason, running.prompt_tokens,
                        len(running.generated), text)

    def step(self) -> list[StepOutput]:
        if self._running is None:
            if not self._pending:
                return []
            request, prompt = self._pending.popleft()
            try:
                self._running = self._start(request, prompt)
            except (RequestError, ValueError, RuntimeError) as exc:
                return [Failed(ErrorCode.INTERNAL, str(exc), request_id=request.request_id)]
        running = self._running
        token = next(running.tokens)
        ignore_eos = running.request.params.ignore_eos
        if not ignore_eos and llama_cpp.llama_vocab_is_eog(self._vocab, token):
            return [self._end(running, FinishReason.STOP)]
        running.generated.append(token)
        text = running.stream.feed(self._token_bytes(token))
        if running.stream.stopped:
            return [Tokens(running.request.request_id, text, [token]),
                    self._end(running, FinishReason.STOP)]
        if len(running.generated) >= running.max_new:
            return [Tokens(running.request.request_id, text, [token]),
                    self._end(running, FinishReason.LENGTH)]
        return [Tokens(running.request.request_id, text, [token])]

    def _end(self, running: _Running, reason: FinishReason) -> Finished:
        running.tokens.close()
        self._running = None
        return self._finish(running, reason, running.stream.flush())
