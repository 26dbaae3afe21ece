"""llama.cpp backend (llama-cpp-python's low-level API) for GGUF models.

Concurrent requests decode together in one context, the way llama-server's
parallel slots do: each request owns a KV sequence (a slot), and every
`step()` decodes the next token of every decoding sequence and reads a chunk
of any prompt still being read (two `llama_decode` calls when it does both,
see step), and samples one token per sequence with that request's own
sampler chain.
While sequences are decoding, the prompt tokens a step may read are bounded
by a budget (lmx_worker.engines.step_budget) so the running streams keep their
pace; prompts are read in the order their requests arrived.

A slot keeps the tokens of its last request in the KV cache after it ends; a
new request goes to the free slot sharing the longest prefix with its prompt
and only decodes the rest (prefix cache). Aborts free the slot at once.
"""

from __future__ import annotations

import ctypes
import os
import random
import time
from collections import deque
from dataclasses import dataclass, field

import llama_cpp
import numpy as np
import psutil
from llama_cpp import _internals as internals
from llama_cpp._logger import set_verbose
from llguidance import LLTokenizer

from lmx_protocol import (
    ErrorCode,
    Failed,
    Finished,
    FinishReason,
    Generate,
    TokenLogprob,
    Tokens,
    WorkerStats,
)
from lmx_worker.engines.engine import RequestError, StepOutput, admit
from lmx_worker.engines.step_budget import PromptBudget, StepLoad
from lmx_worker.process.spec import WorkerSpec
from lmx_worker.text.chat_request import chat_prompt, request_constraint, request_tools
from lmx_worker.text.chat_template import ChatTemplate
from lmx_worker.text.constraints import (
    TokenConstraint,
    tokenizer_from_llama_vocab,
)
from lmx_worker.text.logit_bias import LogitBias
from lmx_worker.text.text_stream import TextStream

_PIECE_BUFFER = 256
# kv_cache_type -> ggml type of llama.cpp's K and V cache.
KV_CACHE_TYPES = {"f16": llama_cpp.GGML_TYPE_F16, "q8_0": llama_cpp.GGML_TYPE_Q8_0,
                  "q4_0": llama_cpp.GGML_TYPE_Q4_0}

_PENALTY_LAST_N = 64
_MIN_PREFIX_COPY = 32  # tokens a KV copy from another slot must save
_backend_ready = False


def uses_flash_attention(flash_attn: bool | None, kv_cache_type: str) -> bool:
    """Off unless asked for, or unless the KV cache is quantized (which needs it)."""
    return bool(flash_attn) or (flash_attn is None and kv_cache_type != "f16")


def _init_backend() -> None:
    global _backend_ready
    if not _backend_ready:
        llama_cpp.llama_backend_init()
        _backend_ready = True


@dataclass
class _Job:
    request: Generate
    prompt: list[int]
    sampler: internals.LlamaSampler
    stream: TextStream
    max_new: int
    constraint: TokenConstraint | None = None  # grammar the output must follow
    bias: LogitBias | None = None  # the request's logit_bias
    special_text: bool = False  # show control tokens (tool-call markers) as text
    to_prefill: list[int] = field(default_factory=list)
    arrival: int = 0  # admission order: prompts are read first come, first served
    generated: list[int] = field(default_factory=list)
    # Sampled (and grammar-forced) tokens not yet in the KV cache.
    next_tokens: list[int] = field(default_factory=list)


@dataclass
class _Slot:
    seq_id: int
    cached: list[int] = field(default_factory=list)  # tokens whose KV is in the cache
    job: _Job | None = None


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class LlamaCppEngine:
    backend = "llama_cpp"

    def __init__(self, spec: WorkerSpec) -> None:
        _init_backend()
        verbose = os.environ.get("LMX_WORKER_LOG_LEVEL") == "DEBUG"
        set_verbose(verbose)  # llama.cpp logs every context detail otherwise
        self.capabilities = ["chat", "completions", "structured_output"]
        self.backend_version = str(llama_cpp.__version__)
        self.slot_context = spec.context_length
        self.n_batch = spec.n_batch or 512
        slots = max(1, spec.parallel_slots)
        self.model = internals.LlamaModel(path_model=spec.model_path,
                                          params=llama_cpp.llama_model_default_params(),
                                          verbose=verbose)
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = self.slot_context * slots
        params.n_batch = self.n_batch
        params.n_ubatch = self.n_batch
        params.n_seq_max = slots
        # One KV stream per sequence (not a unified pool): attention then runs
        # over exactly the same cells whether a request decodes alone or in a
        # batch, so batching does not change its tokens (measured: with a
        # unified pool, 6 of 8 greedy texts drifted on near-ties).
        params.kv_unified = False
        # llama-cpp-python's Llama disables flash attention by default; match
        # it so a request computes the same logits here as in-process.
        # A quantized V cache needs flash attention; a performance profile
        # may also turn it on where it measured faster.
        params.flash_attn_type = (
            llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
            if uses_flash_attention(spec.flash_attn, spec.kv_cache_type)
            else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        params.type_k = params.type_v = KV_CACHE_TYPES[spec.kv_cache_type]
        threads = spec.n_threads or os.cpu_count() or 1
        params.n_threads = threads
        params.n_threads_batch = spec.n_threads_batch or threads
        self.ctx = internals.LlamaContext(model=self.model, params=params, verbose=verbose)
        self.context_length = self.slot_context
        self._vocab = self.model.vocab
        self._n_vocab = self.model.n_vocab()
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, slots)
        self._piece = ctypes.create_string_buffer(_PIECE_BUFFER)
        self._add_bos = bool(self.model.add_bos_token())
        self._eog = {t for t in range(self._n_vocab)
                     if llama_cpp.llama_vocab_is_eog(self._vocab, t)}
        self.chat_template = self._load_template()
        if self.chat_template is not None:
            self.capabilities.append("tools")
        self._fim = (llama_cpp.llama_vocab_fim_pre(self._vocab),
                     llama_cpp.llama_vocab_fim_suf(self._vocab),
                     llama_cpp.llama_vocab_fim_mid(self._vocab))
        if min(self._fim) >= 0:
            self.capabilities.append("fill_in_middle")  # completions `suffix`
        self._llg_tokenizer: LLTokenizer | None = None  # built on first constrained request
        self._slots = [_Slot(i) for i in range(slots)]
        # Grammar-forced tokens one sequence may add in a step; bounded so
        # every slot's share still fits the batch.
        self._forced_per_step = max(0, min(16, self.n_batch // slots - 1))
        self._pending: deque[_Job] = deque()
        self._counted: list[StepOutput] = []  # count_only answers, sent at the next step
        self.cached_prompt_tokens = 0
        self._budget = PromptBudget(spec.max_inter_token_ms)
        self._last_step_end: float | None = None
        self._arrivals = 0

    def _load_template(self) -> ChatTemplate | None:
        template = self.model.metadata().get("tokenizer.chat_template")
        if not template:
            return None
        eos, bos = self.model.token_eos(), self.model.token_bos()
        return ChatTemplate(
            template,
            bos_token=self.model.token_get_text(bos) if bos != -1 else "",
            eos_token=self.model.token_get_text(eos) if eos != -1 else "",
        )

    def memory_bytes(self) -> int:
        return int(psutil.Process().memory_info().rss)

    # --- requests -------------------------------------------------------------

    def _prompt_tokens(self, request: Generate) -> list[int]:
        if request.messages is not None:
            if self.chat_template is None:
                raise RequestError("unsupported_feature",
                                   "this model has no chat template; use /v1/completions")
            text = chat_prompt(self.chat_template, request)
            # The template writes BOS itself when the model wants one.
            return list(self.model.tokenize(text.encode(), add_bos=False, special=True))
        prompt = (request.prompt or "").encode()
        if request.suffix is not None:
            return self._infill_tokens(prompt, request.suffix.encode())
        return list(self.model.tokenize(prompt, add_bos=self._add_bos, special=True))

    def _infill_tokens(self, prefix: bytes, suffix: bytes) -> list[int]:
        """llama-server's infill layout: [BOS] PRE prefix SUF suffix MID."""
        pre, suf, mid = self._fim
        if min(self._fim) < 0:
            raise RequestError("unsupported_feature", "this model has no fill-in-the-middle "
                               "tokens, so suffix cannot be honoured", param="suffix")
        bos = [self.model.token_bos()] if self._add_bos else []
        return [*bos, pre, *self.model.tokenize(prefix, add_bos=False, special=False),
                suf, *self.model.tokenize(suffix, add_bos=False, special=False), mid]

    def _sampler(self, request: Generate) -> internals.LlamaSampler:
        p = request.params
        sampler = internals.LlamaSampler()
        if p.ignore_eos:
            sampler.add_logit_bias(self._n_vocab, {t: float("-inf") for t in self._eog})
        if (p.repetition_penalty, p.frequency_penalty, p.presence_penalty) != (1.0, 0.0, 0.0):
            sampler.add_penalties(self._n_vocab, _PENALTY_LAST_N, p.repetition_penalty,
                                  p.frequency_penalty, p.presence_penalty)
        if p.temperature == 0:
            sampler.add_greedy()
            return sampler
        if p.top_k > 0:
            sampler.add_top_k(p.top_k)
        if p.top_p < 1.0:
            sampler.add_top_p(p.top_p, 1)
        if p.min_p > 0.0:
            sampler.add_min_p(p.min_p, 1)
        sampler.add_temp(p.temperature)
        # Without a seed, a fresh one per request: two unseeded requests must
        # not produce the same "random" text.
        sampler.add_dist(p.seed if p.seed is not None else random.getrandbits(31))
        return sampler

    def _tokenizer(self) -> LLTokenizer:
        if self._llg_tokenizer is None:
            self._llg_tokenizer = tokenizer_from_llama_vocab(self._vocab, sorted(self._eog))
        return self._llg_tokenizer

    def add(self, request: Generate) -> None:
        prompt = self._prompt_tokens(request)
        max_new = admit(request, prompt, self.slot_context, self._counted)
        if max_new is None:  # no slot, no decode: the count is the answer
            return
        p = request.params
        job = _Job(request, prompt, self._sampler(request), TextStream(p.stop), max_new)
        job.constraint = request_constraint(request, self.chat_template, self._tokenizer)
        if p.logit_bias:
            job.bias = LogitBias(p.logit_bias, self._n_vocab)
        job.special_text = request.messages is not None and request_tools(request) is not None
        self._pending.append(job)

    def abort(self, request_id: str) -> list[StepOutput]:
        for slot in self._slots:
            if slot.job is not None and slot.job.request.request_id == request_id:
                job = slot.job
                slot.job = None
                return [self._finished(job, FinishReason.ABORT, "")]
        for job in self._pending:
            if job.request.request_id == request_id:
                self._pending.remove(job)
                return [Finished(request_id, FinishReason.ABORT, len(job.prompt), 0)]
        return []

    def has_work(self) -> bool:
        return bool(self._pending or self._counted) or any(s.job for s in self._slots)

    def reset(self) -> None:
        self._pending.clear()
        self._counted = []
        self._fail_all("reset")  # the frames are dropped: the loop failed them

    def fill_stats(self, stats: WorkerStats) -> None:
        stats.active_requests = sum(1 for s in self._slots if s.job)
        stats.queued_requests = len(self._pending)
        stats.prompt_tokens_cached = self.cached_prompt_tokens
        stats.prompt_budget_tokens = self._budget.tokens
        stats.step_time_ms = round(1000 * self._budget.step_sec, 2)

    # --- scheduling -----------------------------------------------------------

    def _admit(self) -> None:
        """Give each waiting request the free slot whose cached tokens share
        the longest prefix with its prompt; drop the rest of that slot's KV."""
        while self._pending:
            free = [s for s in self._slots if s.job is None]
            if not free:
                return
            job = self._pending.popleft()
            slot = max(free, key=lambda s: _common_prefix(s.cached, job.prompt))
            keep = _common_prefix(slot.cached, job.prompt)
            keep = self._copy_longer_prefix(slot, job.prompt, keep)
            if keep == len(job.prompt):
                keep -= 1  # at least one token must be decoded to get logits
            llama_cpp.llama_memory_seq_rm(self.ctx.memory, slot.seq_id, keep, -1)
            slot.cached = slot.cached[:keep]
            job.to_prefill = job.prompt[keep:]
            self._arrivals += 1
            job.arrival = self._arrivals
            self.cached_prompt_tokens += keep
            slot.job = job

    def _copy_longer_prefix(self, slot: _Slot, prompt: list[int], keep: int) -> int:
        """If another slot (running or not) holds a longer prefix of `prompt`
        than `slot` does, copy that slot's KV into `slot` instead of reading
        the prompt again: this is how the n choices of one request (and
        identical prompts in general) share one prefill. A copy moves the
        whole KV stream, so short gains are not worth it."""
        donor, best = None, keep
        for other in self._slots:
            if other is not slot:
                shared = _common_prefix(other.cached, prompt)
                if shared > best:
                    donor, best = other, shared
        if donor is None or best - keep < _MIN_PREFIX_COPY:
            return keep
        llama_cpp.llama_memory_seq_cp(self.ctx.memory, donor.seq_id, slot.seq_id, -1, -1)
        slot.cached = list(donor.cached)
        return best

    def _reading(self) -> list[_Slot]:
        """Slots with prompt tokens left to read, first-arrived first."""
        slots = [s for s in self._slots if s.job is not None and s.job.to_prefill]
        return sorted(slots, key=lambda s: s.job.arrival if s.job else 0)

    @staticmethod
    def _load(decoding: list[_Slot], reading: list[_Slot], prompt_tokens: int) -> StepLoad:
        """What a step computes when it decodes `decoding` and reads
        `prompt_tokens` of the prompts in `reading` (in that order). The
        decodes go to llama.cpp in their own call (see step), where every
        stream is viewed at the deepest decoding sequence's length, so each
        decode token attends over that many cells; a prompt chunk attends
        over its own context."""
        decode_tokens = 0
        deepest = 0
        for slot in decoding:
            assert slot.job is not None
            decode_tokens += len(slot.job.next_tokens)
            deepest = max(deepest, len(slot.cached) + len(slot.job.next_tokens))
        attention = 0.0
        left = prompt_tokens
        for slot in reading:
            assert slot.job is not None
            take = min(left, len(slot.job.to_prefill))
            if take <= 0:
                break
            attention += take * (len(slot.cached) + take)
            left -= take
        return StepLoad(decode_tokens, prompt_tokens - left, attention + decode_tokens * deepest)

    def _fill_batch(self, decoding: list[_Slot], reading: list[_Slot],
                    prompt_tokens: int) -> list[tuple[_Slot, int]]:
        """Decoding sequences first (their next tokens), then up to
        `prompt_tokens` of the prompts in `reading`, in order. Returns
        (slot, batch index) for each sequence whose logits this batch
        produces."""
        batch = self._batch
        n = 0
        sample_at: list[tuple[_Slot, int]] = []

        def put(slot: _Slot, token: int, logits: bool) -> None:
            nonlocal n
            batch.token[n] = token
            batch.pos[n] = len(slot.cached)
            batch.n_seq_id[n] = 1
            batch.seq_id[n][0] = slot.seq_id
            batch.logits[n] = logits
            slot.cached.append(token)
            if logits:
                sample_at.append((slot, n))
            n += 1

        for slot in decoding:
            job = slot.job
            assert job is not None
            for i, token in enumerate(job.next_tokens):
                put(slot, token, i == len(job.next_tokens) - 1)
            job.next_tokens = []
        room = min(prompt_tokens, self.n_batch - n)
        for slot in reading:
            job = slot.job
            assert job is not None
            take = min(len(job.to_prefill), room)
            if take <= 0:
                break
            chunk, job.to_prefill = job.to_prefill[:take], job.to_prefill[take:]
            for i, token in enumerate(chunk):
                put(slot, token, not job.to_prefill and i == take - 1)
            room -= take
        batch.n_tokens = n
        return sample_at

    def step(self) -> list[StepOutput]:
        started = time.perf_counter()
        if self._last_step_end is not None:
            self._budget.note_outside(started - self._last_step_end)
        self._last_step_end = None
        out, self._counted = self._counted, []
        self._admit()
        decoding = [s for s in self._slots if s.job is not None and s.job.next_tokens]
        reading = self._reading()
        prompt_tokens = 0
        if reading:
            decode_tokens = self._load(decoding, [], 0).decode_tokens
            prompt_tokens = self._budget.allow(
                bool(decoding), self.n_batch - decode_tokens,
                lambda n: self._load(decoding, reading, n))
        load = self._load(decoding, reading, prompt_tokens)
        # Decodes and a prompt chunk go to llama.cpp as two calls. In one
        # batch, llama.cpp's split over per-sequence KV streams puts the
        # decodes in a micro-batch with the prompt's next token, and every
        # stream in a micro-batch is viewed at the deepest one's length: each
        # decoding stream would then attend over the whole prompt read so far
        # (measured: 16-token chunks beside 4 streams at 4k depth cost
        # ~220 ms a step that way, most of it that attention).
        parts = ([(decoding, [], 0), ([], reading, prompt_tokens)]
                 if decoding and prompt_tokens else [(decoding, reading, prompt_tokens)])
        ran = False
        for part_decoding, part_reading, part_prompt in parts:
            sample_at = self._fill_batch(part_decoding, part_reading, part_prompt)
            if self._batch.n_tokens == 0:
                continue
            ran = True
            status = llama_cpp.llama_decode(self.ctx.ctx, self._batch)
            if status != 0:
                return out + self._fail_all(f"llama_decode failed with status {status}")
            out.extend(self._sample_all(sample_at))
        if ran:
            ended = time.perf_counter()
            self._budget.observe(load, ended - started)
            # Streams that decoded wait for the next step: the time until it
            # starts is part of their gap.
            self._last_step_end = ended if decoding else None
        return out

    def _sample_all(self, sample_at: list[tuple[_Slot, int]]) -> list[StepOutput]:
        out: list[StepOutput] = []
        for slot, index in sample_at:
            job = slot.job
            assert job is not None
            try:
                out.extend(self._sample(slot, job, index))
            except MemoryError:
                raise
            except Exception as exc:  # this sequence's sampler or grammar: it alone fails
                slot.job = None
                out.append(Failed(ErrorCode.INTERNAL,
                                  f"internal error in request {job.request.request_id} while "
                                  f"sampling: {type(exc).__name__}: {exc}",
                                  request_id=job.request.request_id))
        return out

    def _sample(self, slot: _Slot, job: _Job, index: int) -> list[StepOutput]:
        """Pick `job`'s next token from batch row `index`."""
        out: list[StepOutput] = []
        wants_logprobs = job.request.params.logprobs
        raw = None
        if job.constraint is not None or job.bias is not None:
            # The sampler chain reads the context's logits row, so
            # biasing and masking that row in place steers what it picks.
            row = self._logits_row(index)
            raw = row.copy() if wants_logprobs else None  # logprobs: the model's view
            if job.bias is not None:
                job.bias.apply(row)
        if job.constraint is not None:
            job.constraint.mask_logits(row)
            if job.constraint.error:
                out.append(self._fail(slot, job, job.constraint.error))
                return out
        token = job.sampler.sample(self.ctx, index)
        logprob = None
        if wants_logprobs:
            logprob = self._logprob(raw if raw is not None else self._logits_row(index),
                                    token, job)
        out.extend(self._on_token(slot, job, token, logprob))
        return out

    def _logits_row(self, index: int) -> np.ndarray:
        """The logits at batch row `index`, as a view on llama.cpp's buffer."""
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.ctx.ctx, index),
                                     shape=(self._n_vocab,))

    def _fail(self, slot: _Slot, job: _Job, why: str) -> Failed:
        slot.job = None
        return Failed(ErrorCode.INTERNAL, f"constrained decoding failed: {why}",
                      request_id=job.request.request_id)

    def _logprob(self, row: np.ndarray, token: int, job: _Job) -> TokenLogprob:
        """Log-softmax of the raw logits `row`: only computed for requests
        that asked, since it touches the whole vocabulary."""
        peak = float(row.max())
        log_z = peak + float(np.log(np.exp(row - peak).sum()))
        top: list[tuple[bytes, float]] = []
        k = job.request.params.top_logprobs
        if k > 0:
            best = np.argpartition(row, -k)[-k:]
            best = best[np.argsort(row[best])[::-1]]
            top = [(self._token_bytes(int(t)), float(row[t]) - log_z) for t in best]
        return TokenLogprob(self._token_bytes(token), float(row[token]) - log_z, top)

    def _on_token(self, slot: _Slot, job: _Job, token: int,
                  logprob: TokenLogprob | None = None) -> list[StepOutput]:
        rid = job.request.request_id
        if token in self._eog and not job.request.params.ignore_eos:
            return [self._end(slot, job, FinishReason.STOP)]
        forced: list[int] = []
        if job.constraint is not None:
            if not job.constraint.advance(token):
                return [self._fail(slot, job, job.constraint.error or "token rejected")]
            if logprob is None:  # forced tokens have no sampled distribution to report
                room = min(job.max_new - len(job.generated) - 1, self._forced_per_step)
                forced = job.constraint.forced(room)
        first = not job.generated
        job.generated.append(token)
        text = job.stream.feed(self._token_bytes(token, job.special_text))
        taken = [token]
        for extra in forced:
            if job.stream.stopped:
                break
            taken.append(extra)
            job.generated.append(extra)
            job.sampler.accept(extra)  # penalties see forced tokens too
            text += job.stream.feed(self._token_bytes(extra, job.special_text))
        tokens = Tokens(rid, text, taken, None if logprob is None else [logprob],
                        len(job.prompt) if first else None)
        if job.stream.stopped or (job.constraint is not None and job.constraint.done):
            return [tokens, self._end(slot, job, FinishReason.STOP)]
        if len(job.generated) >= job.max_new:
            return [tokens, self._end(slot, job, FinishReason.LENGTH)]
        job.next_tokens = taken
        return [tokens]

    def _fail_all(self, message: str) -> list[StepOutput]:
        """A failed decode leaves the batch's KV state unknown: fail the
        running requests and forget every slot's cache."""
        out: list[StepOutput] = []
        for slot in self._slots:
            if slot.job is not None:
                out.append(Failed(ErrorCode.INTERNAL, message,
                                  request_id=slot.job.request.request_id))
                slot.job = None
            llama_cpp.llama_memory_seq_rm(self.ctx.memory, slot.seq_id, 0, -1)
            slot.cached = []
        return out

    def _token_bytes(self, token: int, special: bool = False) -> bytes:
        n = llama_cpp.llama_token_to_piece(self._vocab, token, self._piece, _PIECE_BUFFER, 0,
                                           special)
        if n < 0:  # piece longer than the buffer
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, -n, 0, special)
            return buf.raw[:n]
        return self._piece.raw[:n]

    def _finished(self, job: _Job, reason: FinishReason, text: str) -> Finished:
        return Finished(job.request.request_id, reason, len(job.prompt), len(job.generated),
                        text)

    def _end(self, slot: _Slot, job: _Job, reason: FinishReason) -> Finished:
        slot.job = None
        finished = self._finished(job, reason, job.stream.flush())
        finished.stop_sequence = job.stream.matched
        return finished
