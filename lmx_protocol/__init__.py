"""Wire protocol between the LMX supervisor and its worker processes.

Only message definitions and their codec live here: no sockets, no policy.
"""

from lmx_protocol.codec import (
    decode_from_supervisor,
    decode_from_worker,
    encode,
)
from lmx_protocol.messages import (
    PROTOCOL_VERSION,
    Abort,
    ChatMessage,
    Embed,
    Embeddings,
    EncoderInfo,
    ErrorCode,
    Failed,
    Finished,
    FinishReason,
    FromWorker,
    Generate,
    Ping,
    Pong,
    Ready,
    Rerank,
    SamplingParams,
    Scores,
    Shutdown,
    TokenLogprob,
    Tokens,
    ToWorker,
    WorkerStats,
)

__all__ = [
    "PROTOCOL_VERSION",
    "Abort",
    "ChatMessage",
    "Embed",
    "Embeddings",
    "EncoderInfo",
    "ErrorCode",
    "Failed",
    "FinishReason",
    "Finished",
    "FromWorker",
    "Generate",
    "Ping",
    "Pong",
    "Ready",
    "Rerank",
    "SamplingParams",
    "Scores",
    "Shutdown",
    "ToWorker",
    "TokenLogprob",
    "Tokens",
    "WorkerStats",
    "decode_from_supervisor",
    "decode_from_worker",
    "encode",
]
