"""Frames exchanged between supervisor and worker.

Evolution rule: append-only. New fields go at the end of a Struct with a
default, so an older peer still decodes what a newer one sends (frames are
array-like, so field order is the wire order). Bump PROTOCOL_VERSION when a
change is not backwards compatible; the supervisor refuses a worker whose
`Ready.protocol_version` differs.
"""

from __future__ import annotations

import enum
from typing import Any

import msgspec

# 2: StepFrames (one message for a decode step's frames of several requests).
PROTOCOL_VERSION = 2


class Frame(
    msgspec.Struct,
    tag_field="t",
    array_like=True,
    omit_defaults=True,
    gc=False,
):
    """Base of every frame: a tagged, positional msgpack array."""


class FinishReason(enum.StrEnum):
    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"
    TOOL_CALLS = "tool_calls"


class ErrorCode(enum.StrEnum):
    """Failure causes a worker reports; the gateway maps them to HTTP codes."""

    LOAD_FAILED = "model_load_failed"
    BAD_REQUEST = "invalid_request"
    CONTEXT_OVERFLOW = "context_length_exceeded"
    INTERNAL = "worker_internal_error"
    UNSUPPORTED = "unsupported_feature"
    PROTOCOL = "protocol_error"
    # The worker hit its memory cap (MemoryError); sent as its last, fatal
    # frame before it exits with EXIT_OUT_OF_MEMORY.
    OUT_OF_MEMORY = "out_of_memory"


# --- request payload pieces --------------------------------------------------


class ChatMessage(msgspec.Struct, omit_defaults=True, gc=False):
    role: str
    content: str | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class SamplingParams(msgspec.Struct, omit_defaults=True, gc=False):
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: list[str] = []
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0  # alternatives per position, when logprobs is set
    # JSON text of a JSON schema the output must match (response_format
    # json_object / json_schema), enforced by constrained decoding.
    json_schema: str = ""
    # OpenAI's logit_bias: token id -> value added to that token's logit
    # (-100..100; -100 bans the token), in this request's own logits row.
    logit_bias: dict[int, float] = {}


# --- supervisor -> worker ----------------------------------------------------


class Generate(Frame, tag="generate"):
    """Start one generation. Exactly one of `messages` / `prompt` is set:
    chat requests are templated by the worker, which owns the tokenizer."""

    request_id: str
    params: SamplingParams
    messages: list[ChatMessage] | None = None
    prompt: str | None = None
    add_generation_prompt: bool = True
    # Tokenize only: the worker answers Finished with prompt_tokens and
    # decodes nothing (Anthropic's count_tokens).
    count_only: bool = False
    # Tools offered to the model: a JSON array in OpenAI's shape ("" = none).
    # The worker renders them into the prompt; tool_choice "required" or
    # "named" (tool_name) makes it force calls by constrained decoding.
    tools: str = ""
    tool_choice: str = "auto"
    tool_name: str = ""
    parallel_tool_calls: bool = True
    # Fill-in-the-middle (completions `suffix`): the model writes what goes
    # between `prompt` and this text, with its own FIM tokens.
    suffix: str | None = None


class Abort(Frame, tag="abort"):
    request_id: str


class Ping(Frame, tag="ping"):
    nonce: int


class Shutdown(Frame, tag="shutdown"):
    """Finish or abort what is running, then exit 0."""

    drain: bool = False


class Embed(Frame, tag="embed"):
    """Embed a batch of inputs: `texts`, or `token_ids` (one list per input,
    taken as the model's complete input, special tokens included). A worker
    runs every Embed it has pending as one forward pass."""

    request_id: str
    texts: list[str] | None = None
    token_ids: list[list[int]] | None = None
    # Matryoshka truncation (then renormalised); None: the model's width.
    dimensions: int | None = None
    # None: what the model's sentence-transformers config says.
    normalize: bool | None = None


class Rerank(Frame, tag="rerank"):
    """Score every document against the query (cross-encoder, or cosine
    similarity of embeddings for a bi-encoder)."""

    request_id: str
    query: str
    documents: list[str]


ToWorker = Generate | Abort | Ping | Shutdown | Embed | Rerank


# --- worker -> supervisor ----------------------------------------------------


class EncoderInfo(msgspec.Struct, omit_defaults=True, gc=False):
    """What an embedding or rerank model is, so the gateway can validate a
    request before it reaches the worker and list the model honestly."""

    dimensions: int = 0  # embedding width (0 for a cross-encoder)
    max_tokens: int = 0  # longest input per text; longer texts are truncated
    vocab_size: int = 0  # token ids must lie in [0, vocab_size)
    # "cross-encoder", "bi-encoder-cosine", or "" (no rerank)
    rerank_mode: str = ""
    # Trained for truncated vectors (Matryoshka): `dimensions` below the width.
    matryoshka: bool = False
    pooling: str = ""  # e.g. "mean", "cls"
    normalized: bool = False  # vectors are L2-normalised by default


class Ready(Frame, tag="ready"):
    """First frame a worker sends: a ROUTER cannot address a silent peer."""

    protocol_version: int
    worker_id: str
    model_id: str
    backend: str
    pid: int
    capabilities: list[str]
    memory_bytes: int
    context_length: int
    backend_version: str = ""
    encoder: EncoderInfo | None = None  # set by embedding/rerank workers
    # How the model writes tool calls (lmx_worker.text.tool_format.ToolFormat),
    # so the gateway parses them back; "" when it has no chat template.
    tool_format: str = ""


class TokenLogprob(msgspec.Struct, array_like=True, gc=False):
    """One token's log-probability under the model's distribution (before
    sampling transforms), with its raw bytes, and the top alternatives."""

    token: bytes
    logprob: float
    top: list[tuple[bytes, float]] = []


class Tokens(Frame, tag="tokens"):
    """One or more generated tokens. `text` is the newly visible text; it may
    be empty while a possible stop string or a partial UTF-8 sequence is held
    back."""

    request_id: str
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None  # one per token id, when asked for
    # Set on a request's first Tokens frame, so a stream can report its input
    # size before the end (Anthropic's message_start usage).
    prompt_tokens: int | None = None


class Finished(Frame, tag="finished"):
    request_id: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    text: str = ""  # text released at the end (held-back tail)
    # The stop string that ended the generation (finish_reason stop), if one did.
    stop_sequence: str | None = None


class Failed(Frame, tag="failed"):
    """A request failed (`request_id` set) or the worker itself is going
    down (`fatal`); a fatal Failed is the last frame before exit."""

    code: ErrorCode
    message: str
    fatal: bool = False
    request_id: str | None = None
    param: str | None = None  # the request field at fault, for a client error


class WorkerStats(msgspec.Struct, omit_defaults=True, gc=False):
    requests_started: int = 0
    requests_finished: int = 0
    requests_aborted: int = 0
    tokens_generated: int = 0
    prompt_tokens: int = 0
    active_requests: int = 0
    queued_requests: int = 0
    rss_bytes: int = 0
    prompt_tokens_cached: int = 0  # prompt tokens served from the prefix cache
    encoder_batches: int = 0  # forward passes that served Embed frames
    # Prompt tokens the latest step could read (stall-free budget while
    # sequences decode; the full chunk when none do), and the moving average
    # of measured step time.
    prompt_budget_tokens: int = 0
    step_time_ms: float = 0.0


class Pong(Frame, tag="pong"):
    nonce: int
    stats: WorkerStats


class Embeddings(Frame, tag="embeddings"):
    """The answer to an Embed: `count` vectors of `dim` little-endian float32
    values, row-major, as raw bytes (a list of floats would cost ~4x the
    bytes and a Python object per value)."""

    request_id: str
    vectors: bytes
    count: int
    dim: int
    prompt_tokens: int


class Scores(Frame, tag="scores"):
    """The answer to a Rerank: one relevance score per document, in the
    documents' order."""

    request_id: str
    scores: list[float]
    prompt_tokens: int


class StepFrames(Frame, tag="step"):
    """What one decode step produced for several requests, in order, as one
    message. At 8 streams a step is then one socket message instead of 8: one
    wake-up of each side's ZeroMQ I/O thread and of the gateway's event loop,
    one decode, on a host where that CPU is taken from the model's threads."""

    frames: list[Tokens | Finished | Failed]


FromWorker = Ready | Tokens | Finished | Failed | Pong | Embeddings | Scores | StepFrames
