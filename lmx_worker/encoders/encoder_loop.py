"""The worker loop's handling of Embed and Rerank frames.

The loop collects every Embed and Rerank it drains from the socket and then
calls `serve_encoder_frames` once: all pending Embed frames run as one
batched forward pass (concurrent clients share it), each Rerank (itself a
batch of documents) after. Frames that arrive during a pass wait in the
socket and form the next batch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from lmx_protocol import (
    Embed,
    Embeddings,
    ErrorCode,
    Failed,
    Rerank,
    Scores,
    WorkerStats,
)
from lmx_protocol.messages import Frame
from lmx_worker.encoders.encoder_engine import EncoderEngine
from lmx_worker.engines.engine import Engine
from lmx_worker.process.failpoints import Failpoints

log = logging.getLogger("lmx.worker")

EncoderFrame = Embed | Rerank


def serve_encoder_frames(engine: Engine, frames: list[EncoderFrame], stats: WorkerStats,
                         send: Callable[[Frame], None], failpoints: Failpoints) -> None:
    if not frames:
        return
    failpoints.before_encode()
    if not isinstance(engine, EncoderEngine):
        for frame in frames:
            send(Failed(ErrorCode.UNSUPPORTED,
                        "this model makes no embeddings and does no reranking "
                        "(it is a text generation model)",
                        request_id=frame.request_id, param="model"))
        return
    stats.requests_started += len(frames)
    embeds = [f for f in frames if isinstance(f, Embed)]
    outputs: list[Embeddings | Scores | Failed] = []
    try:
        if embeds:
            stats.encoder_batches += 1
            outputs.extend(engine.embed(embeds))
        for frame in frames:
            if isinstance(frame, Rerank):
                outputs.append(engine.rerank(frame))
    except MemoryError:
        raise  # over the worker's cap: serve() reports it and exits
    except Exception:  # a backend bug fails these requests, not the worker
        log.exception("encoder batch failed")
        answered = {o.request_id for o in outputs}
        # Which request broke the shared pass is unknown: each unanswered one
        # runs alone, so only the one at fault fails.
        outputs.extend(_serve_alone(engine, f) for f in frames if f.request_id not in answered)
    for out in outputs:
        if not isinstance(out, Failed):
            stats.requests_finished += 1
            stats.prompt_tokens += out.prompt_tokens
        send(out)


def _serve_alone(engine: EncoderEngine, frame: EncoderFrame) -> Embeddings | Scores | Failed:
    try:
        if isinstance(frame, Embed):
            (answer,) = engine.embed([frame])
            return answer
        return engine.rerank(frame)
    except MemoryError:
        raise
    except Exception as exc:
        log.exception("encoder request %s failed", frame.request_id)
        return Failed(ErrorCode.INTERNAL,
                      f"internal error in request {frame.request_id} while encoding: "
                      f"{type(exc).__name__}: {exc}", request_id=frame.request_id)
