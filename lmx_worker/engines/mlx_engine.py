"""MLX backend (mlx + mlx-lm) for transformers-layout model directories.

Continuous batching comes from mlx-lm's BatchGenerator: every `step()` runs
one decode step for all generating sequences (each with its own KV cache row
in a left-padded BatchKVCache, its own sampler and logits processors), plus
a chunk of prompt processing for requests that joined since the last step.
A request joins at the next step and leaves when it finishes or is aborted
(`BatchGenerator.remove`), without disturbing the others. While sequences
decode, the generator reads one prompt at a time (arrival order) and its
per-step chunk is set from the stall-free budget (lmx_worker.engines.step_budget);
with nothing decoding, prompts are read PREFILL_STEP tokens at a time, several
together. The generator pipelines one step ahead (token t+1 is computed
while t is handed out), so the KV cache of a sequence always holds every
token it has returned.

Prefix cache: when a request ends normally, its KV cache (prompt and reply)
goes into mlx-lm's LRUPromptCache, a token trie; a later request starts from
the cached entry sharing the longest prefix with its prompt (trimmed where
they part) and only computes the rest. The cache holds at most
`2 * parallel_slots` entries and, together with the running sequences'
caches, no more bytes than `parallel_slots * context_length` tokens of KV.

Stop conditions are decided here, not by the generator: end-of-generation
ids, stop strings (TextStream), max_tokens, a finished grammar and aborts all
remove the sequence the same way.

Per-request logits processors (mlx-lm's hook) carry what changes a
request's distribution: ignore_eos, llama.cpp-style penalties, and the
llguidance grammar of structured output / forced tool calls
(lmx_worker.text.constraints), which only that request waits for.
"""

from __future__ import annotations

import logging
import random
import time
from collections import deque
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any, cast

import mlx.core as mx
import numpy as np
import psutil
from llguidance import LLTokenizer
from mlx_lm import load as mlx_load
from mlx_lm.generate import BatchGenerator, StopSequences
from mlx_lm.models.cache import LRUPromptCache, can_trim_prompt_cache, trim_prompt_cache
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p, greedy_sampler

from lmx_protocol import (
    ErrorCode,
    Failed,
    Finished,
    FinishReason,
    Generate,
    SamplingParams,
    TokenLogprob,
    Tokens,
    WorkerStats,
)
from lmx_worker.engines.engine import RequestError, StepOutput, admit
from lmx_worker.engines.step_budget import PromptBudget, StepLoad
from lmx_worker.mlx_support.cpu_attention import use_cpu_decode_attention
from lmx_worker.mlx_support.cpu_gemm import use_small_gemm
from lmx_worker.mlx_support.cpu_rope import use_table_rope
from lmx_worker.mlx_support.mlx_cpu_layout import optimize_for_cpu
from lmx_worker.mlx_support.mlx_weights import WeightsPlan, apply_plan, plan_weights
from lmx_worker.process.spec import WorkerSpec
from lmx_worker.text.chat_request import chat_prompt, request_constraint, request_tools
from lmx_worker.text.chat_template import ChatTemplate
from lmx_worker.text.constraints import (
    TokenConstraint,
    tokenizer_from_hf,
)
from lmx_worker.text.logit_bias import bias_row, check_logit_bias
from lmx_worker.text.text_stream import TextStream
from lmx_worker.text.token_bytes import token_byte_table

log = logging.getLogger("lmx.worker.mlx")

# Prompt tokens read per sequence and step with nothing decoding (an abort
# still lands within a fraction of a second on CPU); while sequences decode,
# the stall-free budget decides.
PREFILL_STEP = 256
PENALTY_LAST_N = 64  # as the llama.cpp backend
MIN_PREFIX_COPY = 32  # prompt tokens a copy of a running sequence's KV must save
_CACHE_KEY = "model"  # one model per worker: the trie needs only one key

Sampler = Any  # mlx-lm's Callable[[mx.array], mx.array]
Processor = Any  # mlx-lm's Callable[[mx.array, mx.array], mx.array]


@dataclass
class _Job:
    request: Generate
    prompt: list[int]
    stream: TextStream
    max_new: int
    uid: int | None = None
    generated: list[int] = field(default_factory=list)
    constraint: TokenConstraint | None = None  # grammar the output must follow
    constraint_failure: str = ""  # an exception raised while masking
    special_text: bool = False  # show control tokens (tool-call markers) as text
    # Raw logits rows (before penalties, masks, grammar), one per token not
    # yet handed out, kept only when logprobs are asked for and processors
    # would otherwise change what the generator reports.
    raw_rows: deque[mx.array] = field(default_factory=deque)
    # Prompt tokens the generator still has to read before the last one,
    # which it feeds as the first decode step (from its progress reports).
    to_read: int = 0
    reading: bool = False  # in the generator's prompt batch
    decoding: bool = False  # in its generation batch


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _seeded_sampler(p: SamplingParams, vocab: int) -> Sampler:
    """top_k -> top_p -> min_p -> temperature -> draw, with a PRNG key owned
    by the request: a seed reproduces the text whatever else is running."""
    key = [mx.random.key(p.seed if p.seed is not None else random.getrandbits(31))]
    top_k, top_p, min_p, inv_temp = p.top_k, p.top_p, p.min_p, 1.0 / p.temperature

    def sample(logprobs: mx.array) -> mx.array:
        keys = mx.random.split(key[0])
        key[0] = keys[0]
        if 0 < top_k < vocab:
            logprobs = apply_top_k(logprobs, top_k)
        if 0.0 < top_p < 1.0:
            logprobs = apply_top_p(logprobs, top_p)
        if min_p > 0.0:
            logprobs = apply_min_p(logprobs, min_p)
        return mx.random.categorical(logprobs * inv_temp, key=keys[1])

    return sample


def _penalties(p: SamplingParams, prompt_len: int, vocab: int) -> Processor:
    """llama.cpp's penalties: over the last PENALTY_LAST_N generated tokens,
    divide positive / multiply negative logits of seen tokens by the
    repetition penalty, subtract frequency * count and presence * seen."""
    rep, freq, pres = p.repetition_penalty, p.frequency_penalty, p.presence_penalty

    def apply(tokens: mx.array, logits: mx.array) -> mx.array:
        window = tokens[prompt_len:][-PENALTY_LAST_N:]
        if window.size == 0:
            return logits
        counts = mx.zeros((vocab,), dtype=logits.dtype).at[window].add(1.0)
        seen = counts > 0
        if rep != 1.0:
            logits = mx.where(seen, mx.where(logits <= 0, logits * rep, logits / rep), logits)
        return logits - counts * freq - seen.astype(logits.dtype) * pres

    return apply


class MlxEngine:
    backend = "mlx"

    def __init__(self, spec: WorkerSpec) -> None:
        self.capabilities = ["chat", "completions", "structured_output"]
        path = Path(spec.model_path)
        model, tokenizer, config = cast(tuple[Any, Any, dict[str, Any]],
                                        mlx_load(str(path), lazy=True, return_config=True))
        # A rank of a sharded group keeps its share of every layer; the
        # weight plan and CPU layout then apply to that share as to a model.
        sharding = self._shard(model)
        self.plan = self._plan_weights(model, spec)
        apply_plan(model, self.plan)
        limit = config.get("max_position_embeddings")
        self.context_length = min(spec.context_length, int(limit)) if limit else \
            spec.context_length
        layout = optimize_for_cpu(model) if self.plan.float32 else "stock layout"
        # On a CPU: decode steps' attention and RoPE without MLX's scalar
        # fallbacks (cpu_attention, cpu_rope); no-ops on a GPU.
        layout = (f"{layout}; {use_cpu_decode_attention(model)}; "
                  f"{use_table_rope(model, self.context_length + 1)}")
        if self.plan.float32:  # on a CPU: decode matmuls without the BLAS's packing
            layout = f"{layout}; {use_small_gemm(model, spec.n_threads)}"
        if sharding:
            layout = f"{layout}; {sharding}"
        log.info("weights: %s; %s", self.plan.describe(), layout)
        self.model = model
        self.tokenizer = tokenizer
        self.backend_version = (f"mlx-lm {version('mlx-lm')}, mlx {version('mlx')}; "
                                f"{self.plan.describe()}; {layout}")
        self.slots = max(1, spec.parallel_slots)
        hf = tokenizer._tokenizer
        self._vocab = int(config.get("vocab_size") or len(hf))
        self._eog = {int(t) for t in tokenizer.eos_token_ids}
        self._eog_mask = mx.zeros((self._vocab,), dtype=mx.bool_)
        if self._eog:
            self._eog_mask[mx.array(sorted(self._eog))] = True
        self._bytes = self._byte_table(hf)
        # Control tokens are invisible in text, except in tool-call replies
        # where they mark the calls for the gateway's parser.
        self._special_bytes = {i: str(t).encode() for i, t in self._added_special(hf).items()}
        self._add_bos = self._adds_bos(hf)
        self.chat_template = self._load_template(tokenizer)
        if self.chat_template is not None:
            self.capabilities.append("tools")
        self._llg_tokenizer: LLTokenizer | None = None  # built on first constrained request
        self._gen = self._new_generator()
        self._prefix = LRUPromptCache(max_size=2 * self.slots)
        self._kv_budget = self._kv_bytes_per_token(config) * self.context_length * self.slots
        self._pending: deque[_Job] = deque()
        self._active: dict[int, _Job] = {}
        self._counted: list[StepOutput] = []  # count_only answers, sent at the next step
        self.cached_prompt_tokens = 0
        self._budget = PromptBudget(spec.max_inter_token_ms)

    # --- loading helpers ------------------------------------------------------

    def _shard(self, model: Any) -> str:
        """Split the model between a group's ranks (lmx_worker.sharding);
        says what this worker holds ("": all of it)."""
        return ""

    def _plan_weights(self, model: Any, spec: WorkerSpec) -> WeightsPlan:
        return plan_weights(model, spec.mlx_dequantize)

    def _new_generator(self) -> Any:  # mlx-lm is untyped
        return BatchGenerator(self.model, completion_batch_size=self.slots,
                              prefill_batch_size=self.slots, prefill_step_size=PREFILL_STEP)

    @staticmethod
    def _kv_bytes_per_token(config: dict[str, Any]) -> int:
        text = config.get("text_config") or config
        layers = int(text.get("num_hidden_layers", 1))
        heads = int(text.get("num_attention_heads", 1))
        kv_heads = int(text.get("num_key_value_heads") or heads)
        head_dim = int(text.get("head_dim") or int(text.get("hidden_size", 64)) // heads)
        itemsize = 4 if mx.default_device().type == mx.cpu else 2
        return layers * 2 * kv_heads * head_dim * itemsize

    def _byte_table(self, hf: Any) -> list[bytes]:
        backend = getattr(hf, "backend_tokenizer", None)
        special = {int(i) for i in getattr(hf, "all_special_ids", [])}
        return token_byte_table(
            backend.to_str() if backend is not None else None, self._vocab,
            hf.convert_ids_to_tokens, special, lambda i: hf.decode([i]))

    @staticmethod
    def _added_special(hf: Any) -> dict[int, str]:
        backend = getattr(hf, "backend_tokenizer", None)
        if backend is None:
            return {}
        added = backend.get_added_tokens_decoder()
        return {int(i): str(t.content) for i, t in added.items() if t.special}

    @staticmethod
    def _adds_bos(hf: Any) -> bool:
        bos = getattr(hf, "bos_token_id", None)
        if bos is None:
            return False
        probe = hf.encode("a", add_special_tokens=True)
        return bool(probe) and probe[0] == bos

    @staticmethod
    def _load_template(tokenizer: Any) -> ChatTemplate | None:
        source = getattr(tokenizer, "chat_template", None)
        if not isinstance(source, str) or not source:
            return None
        hf = tokenizer._tokenizer
        return ChatTemplate(source, bos_token=str(getattr(hf, "bos_token", None) or ""),
                            eos_token=str(getattr(hf, "eos_token", None) or ""))

    def memory_bytes(self) -> int:
        return int(psutil.Process().memory_info().rss)

    # --- requests -------------------------------------------------------------

    def _prompt_tokens(self, request: Generate) -> list[int]:
        hf = self.tokenizer._tokenizer
        if request.messages is not None:
            if self.chat_template is None:
                raise RequestError("unsupported_feature",
                                   "this model has no chat template; use /v1/completions")
            text = chat_prompt(self.chat_template, request)
            # The template writes BOS itself when the model wants one.
            return list(hf.encode(text, add_special_tokens=False))
        return list(hf.encode(request.prompt or "", add_special_tokens=self._add_bos))

    def _tokenizer(self) -> LLTokenizer:
        if self._llg_tokenizer is None:
            self._llg_tokenizer = tokenizer_from_hf(self.tokenizer._tokenizer,
                                                    sorted(self._eog), self._vocab)
        return self._llg_tokenizer

    def _grammar_mask(self, job: _Job) -> Processor:
        """Masks the logits with the job's grammar. The generator builds
        step t+1 before it hands out token t (pipelining), so the matcher is
        advanced here, with the token the context has just gained (reading
        it waits for that one token; unconstrained batch mates do not care).
        Never raises: a failure is recorded and ends the request."""
        constraint = job.constraint
        assert constraint is not None
        consumed = [len(job.prompt)]
        row = np.zeros(self._vocab, dtype=np.float32)
        ends = set() if job.request.params.ignore_eos else self._eog

        def apply(tokens: mx.array, logits: mx.array) -> mx.array:
            try:
                if tokens.size > consumed[0]:
                    new = cast(list[int], tokens[consumed[0]:].tolist())
                    consumed[0] = tokens.size
                    for token in new:
                        if token in ends or not constraint.advance(token):
                            return logits  # the request ends at this token
                if constraint.error or constraint.done:
                    return logits
                row[:] = 0.0
                constraint.mask_logits(row)
                return logits + mx.array(row)
            except Exception as exc:  # must not fail the batch mates' step
                job.constraint_failure = f"{type(exc).__name__}: {exc}"
                return logits

        return apply

    def _processors(self, job: _Job) -> list[Processor]:
        p = job.request.params
        processors: list[Processor] = []
        if p.ignore_eos and self._eog:
            mask = self._eog_mask
            processors.append(lambda _tokens, logits: mx.where(mask, -mx.inf, logits))
        if (p.repetition_penalty, p.frequency_penalty, p.presence_penalty) != (1.0, 0.0, 0.0):
            processors.append(_penalties(p, len(job.prompt), self._vocab))
        if p.logit_bias:  # this request's row only (see lmx_worker.text.logit_bias)
            bias = mx.array(bias_row(p.logit_bias, self._vocab))
            processors.append(lambda _tokens, logits: logits + bias)
        if job.constraint is not None:
            processors.append(self._grammar_mask(job))
        if processors and p.logprobs:
            rows = job.raw_rows

            def record(_tokens: mx.array, logits: mx.array) -> mx.array:
                rows.append(logits[0])
                return logits

            processors.insert(0, record)
        return processors

    def add(self, request: Generate) -> None:
        prompt = self._prompt_tokens(request)
        max_new = admit(request, prompt, self.context_length, self._counted)
        if max_new is None:  # no decode: the count is the answer
            return
        p = request.params
        if request.suffix is not None:
            raise RequestError("unsupported_feature", "fill-in-the-middle (suffix) is only "
                               "implemented on the llama.cpp backend", param="suffix")
        check_logit_bias(p.logit_bias, self._vocab)
        job = _Job(request, prompt, TextStream(p.stop), max_new)
        job.constraint = request_constraint(request, self.chat_template, self._tokenizer)
        job.special_text = request.messages is not None and request_tools(request) is not None
        self._pending.append(job)

    def abort(self, request_id: str) -> list[StepOutput]:
        for uid, job in self._active.items():
            if job.request.request_id == request_id:
                del self._active[uid]
                self._gen.remove([uid])
                return [self._finished(job, FinishReason.ABORT, "")]
        for job in self._pending:
            if job.request.request_id == request_id:
                self._pending.remove(job)
                return [Finished(request_id, FinishReason.ABORT, len(job.prompt), 0)]
        return []

    def has_work(self) -> bool:
        return bool(self._pending or self._active or self._counted)

    def reset(self) -> None:
        self._pending.clear()
        self._counted = []
        self._fail_all("reset")  # the frames are dropped: the loop failed them

    def fill_stats(self, stats: WorkerStats) -> None:
        stats.active_requests = len(self._active)
        stats.queued_requests = len(self._pending)
        stats.prompt_tokens_cached = self.cached_prompt_tokens
        stats.prompt_budget_tokens = self._budget.tokens
        stats.step_time_ms = round(1000 * self._budget.step_sec, 2)

    # --- scheduling -----------------------------------------------------------

    def _cached_start(self, prompt: list[int]) -> tuple[list[Any] | None, int]:
        """A copy of the longest cached KV prefix of `prompt` and its length
        (at least one prompt token is left to compute, for the logits)."""
        cache, rest = self._prefix.fetch_nearest_cache(_CACHE_KEY, prompt)
        if cache is None:
            return None, 0
        if not rest:  # the whole prompt is cached: recompute its last token
            if not can_trim_prompt_cache(cache):
                return None, 0
            trim_prompt_cache(cache, 1)
            rest = prompt[-1:]
        return cache, len(prompt) - len(rest)

    def _running_prefix(self, prompt: list[int], have: int) -> tuple[list[Any] | None, int]:
        """A copy of the KV of a running sequence that shares a longer prefix
        with `prompt` than the prefix cache does (the n choices of one request
        share one prefill this way), trimmed to that prefix, and its length.
        Only sequences that have produced a token qualify: their prompt is
        wholly in their cache."""
        donor, best = None, have
        for uid, other in self._active.items():
            if other.generated:
                shared = min(_common_prefix(other.prompt, prompt), len(prompt) - 1)
                if shared > best:
                    donor, best = uid, shared
        if donor is None or best - have < MIN_PREFIX_COPY:
            return None, have
        cache = self._gen.extract_cache([donor])[donor][0]
        if not can_trim_prompt_cache(cache):
            return None, have
        trim_prompt_cache(cache, cache[0].offset - best)
        return cache, best

    def _admit(self) -> None:
        while self._pending and len(self._active) < self.slots:
            job = self._pending.popleft()
            p = job.request.params
            cache, cached = self._cached_start(job.prompt)
            running, shared = self._running_prefix(job.prompt, cached)
            if running is not None:
                cache, cached = running, shared
            sampler = greedy_sampler if p.temperature == 0 else \
                _seeded_sampler(p, self._vocab)
            (uid,) = self._gen.insert(
                [job.prompt[cached:]],
                # One more than we allow: the generator must never end a
                # sequence on its own, so every ending goes through _retire.
                max_tokens=[job.max_new + 1],
                caches=[cache] if cache is not None else None,
                all_tokens=[job.prompt[:cached]],
                samplers=[sampler],
                logits_processors=[self._processors(job)],
                stop_sequences=[StopSequences()],
            )
            self.cached_prompt_tokens += cached
            job.to_read = len(job.prompt) - cached - 1
            job.uid = uid
            self._active[uid] = job

    def step(self) -> list[StepOutput]:
        counted, self._counted = self._counted, []
        if counted:
            return counted
        self._admit()
        if not self._active:
            return []
        load = self._plan_prompt_reading()
        started = time.perf_counter()
        try:
            progress, responses = self._gen.next()
        except MemoryError:
            raise
        except Exception as exc:  # the batch state is unknown now
            log.exception("MLX batch step failed")
            return self._fail_all(f"MLX step failed: {exc}")
        self._budget.observe(load, time.perf_counter() - started)
        self._track_reading(progress)
        out: list[StepOutput] = []
        ended: list[int] = []
        for r in responses:
            job = self._active.get(r.uid)
            if job is None:
                continue
            try:
                frames, done = self._on_token(job, int(r.token), r.logprobs)
            except MemoryError:
                raise
            except Exception as exc:  # this sequence's text or logprobs: it alone fails
                log.exception("MLX request %s failed", job.request.request_id)
                frames, done = [Failed(ErrorCode.INTERNAL,
                                       f"internal error in request {job.request.request_id} "
                                       f"while sampling: {type(exc).__name__}: {exc}",
                                       request_id=job.request.request_id)], True
            out.extend(frames)
            if done:
                ended.append(r.uid)
        if ended:
            self._retire(ended)
        return out

    def _plan_prompt_reading(self) -> StepLoad:
        """Set how the generator reads prompts in the coming step and return
        what that step will compute. With nothing decoding: PREFILL_STEP
        tokens of up to `slots` prompts together. Otherwise one prompt at a
        time, in arrival order, its chunk sized by the budget."""
        jobs = list(self._active.values())
        decoding = [j for j in jobs if j.decoding]
        in_batch = [j for j in jobs if j.reading]
        waiting = [j for j in jobs if not j.reading and not j.decoding]  # arrival order
        gen = self._gen
        if not decoding or not self._budget.enabled:
            gen.prefill_batch_size = self.slots
            gen.prefill_step_size = PREFILL_STEP
            readers = (in_batch + waiting)[:self.slots]
            self._budget.tokens = PREFILL_STEP
            return self._load(decoding, readers, PREFILL_STEP)
        gen.prefill_batch_size = 1
        readers = in_batch or waiting[:1]
        per_reader = [j.to_read for j in readers if j.to_read > 0]
        if not per_reader:
            return self._load(decoding, [], 0)
        most = min(PREFILL_STEP, max(per_reader)) * len(per_reader)
        total = self._budget.allow(True, most,
                                   lambda n: self._load(decoding, readers, n // len(per_reader)))
        gen.prefill_step_size = max(1, total // len(per_reader))
        return self._load(decoding, readers, gen.prefill_step_size)

    @staticmethod
    def _load(decoding: list[_Job], readers: list[_Job], chunk: int) -> StepLoad:
        """A step that decodes `decoding` and reads up to `chunk` tokens of
        each of `readers`. The generator pads: decode attention runs over the
        longest sequence for every row, a prompt chunk over the deepest
        reader's context plus the chunk, at the widest reader's chunk."""
        longest = max((len(j.prompt) + len(j.generated) for j in decoding), default=0)
        chunks = [min(chunk, j.to_read) for j in readers if j.to_read > 0]
        widest = max(chunks, default=0)
        prompt_tokens = widest * len(chunks)
        deepest = max((len(j.prompt) - 1 - j.to_read for j in readers), default=0)
        attention = len(decoding) * longest + prompt_tokens * (deepest + widest)
        return StepLoad(len(decoding), prompt_tokens, float(attention))

    def _track_reading(self, progress: list[Any]) -> None:
        """Follow the generator's prompt progress reports: (read, total) per
        prompt, and end_of_prompt once a sequence moves to decoding."""
        for report in progress:
            job = self._active.get(report.uid)
            if job is None:
                continue
            if report.end_of_prompt:
                job.reading, job.decoding, job.to_read = False, True, 0
            else:
                done, total = report.progress
                job.reading, job.to_read = True, max(0, total - 1 - done)

    def _retire(self, uids: list[int]) -> None:
        """Remove finished sequences and keep their KV for later prompts."""
        for uid in uids:
            self._active.pop(uid, None)
        caches = self._gen.remove(uids, return_prompt_caches=True)
        for cache, tokens in caches.values():
            self._prefix.insert_cache(_CACHE_KEY, list(tokens), cache)
        # Cached entries and running sequences together stay within the KV
        # memory the worker was configured for.
        self._prefix.trim_to(n_bytes=self._kv_budget - self._gen.prompt_cache_nbytes)

    def _on_token(self, job: _Job, token: int, logprobs: mx.array
                  ) -> tuple[list[StepOutput], bool]:
        rid = job.request.request_id
        p = job.request.params
        raw = job.raw_rows.popleft() if job.raw_rows else None
        if token in self._eog and not p.ignore_eos:
            return [self._finished(job, FinishReason.STOP, job.stream.flush())], True
        failure = job.constraint_failure or (job.constraint.error if job.constraint else "")
        if failure:
            return [Failed(ErrorCode.INTERNAL, f"constrained decoding failed: {failure}",
                           request_id=rid)], True
        job.generated.append(token)
        text = job.stream.feed(self._token_bytes(token, job.special_text))
        logprob = None
        if p.logprobs:  # the model's own distribution, before processors
            row = logprobs if raw is None else raw - mx.logsumexp(raw)
            logprob = self._logprob(token, row, p.top_logprobs)
        tokens = Tokens(rid, text, [token], None if logprob is None else [logprob],
                        len(job.prompt) if len(job.generated) == 1 else None)
        if job.stream.stopped or (job.constraint is not None and job.constraint.done):
            return [tokens, self._finished(job, FinishReason.STOP, job.stream.flush())], True
        if len(job.generated) >= job.max_new:
            return [tokens, self._finished(job, FinishReason.LENGTH, job.stream.flush())], True
        return [tokens], False

    def _logprob(self, token: int, logprobs: mx.array, k: int) -> TokenLogprob:
        """`token`'s entry of a log-softmax row, and the row's top `k`."""
        top: list[tuple[bytes, float]] = []
        if k > 0:
            best = mx.argpartition(-logprobs, kth=k - 1)[:k]
            ids = cast(list[int], best.tolist())
            values = cast(list[float], logprobs[best].tolist())
            pairs = sorted(zip(ids, values, strict=True), key=lambda x: -x[1])
            top = [(self._token_bytes(t), v) for t, v in pairs]
        chosen = cast(float, logprobs[token].item())
        return TokenLogprob(self._token_bytes(token), float(chosen), top)

    def _token_bytes(self, token: int, special: bool = False) -> bytes:
        if special and token in self._special_bytes:
            return self._special_bytes[token]
        return self._bytes[token] if 0 <= token < len(self._bytes) else b""

    def _fail_all(self, message: str) -> list[StepOutput]:
        out: list[StepOutput] = [Failed(ErrorCode.INTERNAL, message,
                                        request_id=job.request.request_id)
                                 for job in self._active.values()]
        self._active.clear()
        self._gen.close()
        self._gen = self._new_generator()
        return out

    def _finished(self, job: _Job, reason: FinishReason, text: str) -> Finished:
        return Finished(job.request.request_id, reason, len(job.prompt), len(job.generated),
                        text, job.stream.matched)
