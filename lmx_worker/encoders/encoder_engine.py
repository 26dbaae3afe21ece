"""What embedding and rerank backends share: the contract the worker loop
uses for them, input checks, and the vector post-processing (Matryoshka
truncation, normalisation, the raw float32 frame).

An encoder worker never generates text: its `add` refuses Generate frames,
so a chat request routed to it fails cleanly instead of hanging. The loop
hands it every pending Embed at once (`embed`) so concurrent requests share
one forward pass.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, TypeVar, runtime_checkable

import numpy as np
import numpy.typing as npt

from lmx_protocol import (
    Embed,
    Embeddings,
    EncoderInfo,
    ErrorCode,
    Failed,
    Generate,
    Rerank,
    Scores,
    WorkerStats,
)
from lmx_worker.engines.engine import RequestError, StepOutput

Vectors = npt.NDArray[np.float32]
EmbedOutput = Embeddings | Failed
RerankOutput = Scores | Failed
# One input row as a backend tokenizes it.
Row = TypeVar("Row")


@runtime_checkable
class EncoderEngine(Protocol):
    encoder_info: EncoderInfo

    def embed(self, requests: list[Embed]) -> list[EmbedOutput]:
        """Answer every request (one frame each, in any order), computing
        all their inputs together."""

    def rerank(self, request: Rerank) -> RerankOutput: ...


class InputError(Exception):
    """One request's input is unusable; other requests in the batch go on."""

    def __init__(self, message: str, param: str = "input",
                 code: ErrorCode = ErrorCode.BAD_REQUEST) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code

    def failed(self, request_id: str) -> Failed:
        return Failed(self.code, self.message, request_id=request_id, param=self.param)


class NoGeneration:
    """The generation half of the Engine protocol for a model that cannot
    generate: Generate frames are refused, nothing is ever in progress."""

    model_kind = "embedding"

    def add(self, request: Generate) -> None:
        raise RequestError(str(ErrorCode.UNSUPPORTED),
                           f"this is an {self.model_kind} model: it cannot generate text "
                           "(use /v1/embeddings or /v1/rerank)")

    def abort(self, request_id: str) -> list[StepOutput]:
        return []

    def has_work(self) -> bool:
        return False

    def step(self) -> list[StepOutput]:
        return []

    def fill_stats(self, stats: WorkerStats) -> None:
        stats.active_requests = 0
        stats.queued_requests = 0

    def reset(self) -> None:
        """Nothing to forget: an encoder keeps no state between batches."""


def check_token_ids(ids: list[int], index: int, vocab_size: int, max_tokens: int) -> None:
    where = f"input[{index}]"
    if not ids:
        raise InputError(f"{where} is an empty list of token ids")
    low, high = min(ids), max(ids)
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise InputError(f"{where} holds token id {bad}, outside the model's vocabulary "
                         f"[0, {vocab_size})")
    if len(ids) > max_tokens:
        raise InputError(f"{where} has {len(ids)} tokens; the model takes at most "
                         f"{max_tokens}", code=ErrorCode.CONTEXT_OVERFLOW)


def l2_normalize(v: Vectors) -> Vectors:
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    out: Vectors = (v / np.maximum(norms, 1e-12)).astype(np.float32)
    return out


def finish_vectors(request: Embed, pooled: Vectors, info: EncoderInfo,
                   prompt_tokens: int) -> EmbedOutput:
    """Normalise as the model says (or the request asks), cut to the
    requested Matryoshka width and renormalise, and pack the raw bytes."""
    normalize = info.normalized if request.normalize is None else request.normalize
    vectors = pooled
    dims = request.dimensions
    if dims is not None and dims != info.dimensions:
        if dims < 1 or dims > info.dimensions:
            return InputError(f"dimensions must be between 1 and {info.dimensions}",
                              param="dimensions").failed(request.request_id)
        if not info.matryoshka:
            return InputError(f"the model's vectors have {info.dimensions} dimensions and it "
                              "is not Matryoshka-trained, so they cannot be shortened",
                              param="dimensions").failed(request.request_id)
        vectors = vectors[:, :dims]
    if normalize:
        vectors = l2_normalize(vectors)
    data = np.ascontiguousarray(vectors, dtype="<f4")
    return Embeddings(request.request_id, data.tobytes(), int(data.shape[0]),
                      int(data.shape[1]), prompt_tokens)


def embed_together(requests: list[Embed], rows_of: Callable[[Embed], list[Row]],
                   pool: Callable[[list[Row]], Vectors], row_tokens: Callable[[Row], int],
                   info: EncoderInfo) -> list[EmbedOutput]:
    """Every request's rows (`rows_of`, which raises InputError for a bad
    input: that request alone fails) pooled in one go, then each request's
    vectors finished with its own options."""
    outputs: list[EmbedOutput] = []
    accepted: list[tuple[Embed, int, int]] = []  # request, first row, row count
    rows: list[Row] = []
    for request in requests:
        try:
            mine = rows_of(request)
        except InputError as exc:
            outputs.append(exc.failed(request.request_id))
            continue
        accepted.append((request, len(rows), len(mine)))
        rows.extend(mine)
    if not rows:
        return outputs
    pooled = pool(rows)
    for request, first, count in accepted:
        tokens = sum(row_tokens(r) for r in rows[first:first + count])
        outputs.append(finish_vectors(request, pooled[first:first + count], info, tokens))
    return outputs


def cosine_scores(query: Vectors, documents: Vectors) -> list[float]:
    q = l2_normalize(query)[0]
    d = l2_normalize(documents)
    return [float(x) for x in d @ q]


def length_chunks(lengths: list[int], max_tokens: int = 8192, max_rows: int = 128
                  ) -> list[list[int]]:
    """Group sequence indices for padded forward passes: sorted by length,
    each group within `max_tokens` padded tokens, and a new group once the
    longest would be over twice the shortest (padding is computed like real
    tokens: one long text must not make a dozen short ones cost as much)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    chunks: list[list[int]] = []
    current: list[int] = []
    for i in order:
        longest = lengths[i]  # sorted: the newcomer is the longest
        if current and ((len(current) + 1) * longest > max_tokens or len(current) >= max_rows
                        or longest > 2 * lengths[current[0]] + 8):
            chunks.append(current)
            current = []
        current.append(i)
    if current:
        chunks.append(current)
    return chunks
