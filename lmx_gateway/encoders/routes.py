"""POST /v1/embeddings (OpenAI's shape) and POST /v1/rerank (Cohere's and
Jina's shape), served by embedding and rerank workers.

The gateway checks what it can before a request reaches a worker, from the
model's Ready frame: that it has the capability, that `dimensions` fits,
that token ids lie in the vocabulary. The worker checks again.
"""

from __future__ import annotations

import base64
import secrets
import struct
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from lmx_gateway.access.scopes import GENERATION_ERRORS, INFERENCE, ScopedRoute
from lmx_gateway.encoders.schemas import (
    EmbeddingRequest,
    RerankDocument,
    RerankRequest,
    embedding_inputs,
)
from lmx_gateway.http.body import read_json
from lmx_gateway.inference.generation import run_encoder
from lmx_gateway.inference.routing import resolve_model
from lmx_gateway.state import gateway_state
from lmx_protocol import (
    Embed,
    Embeddings,
    EncoderInfo,
    Ready,
    Rerank,
    Scores,
)
from lmx_supervisor.errors import BadRequest, LMXError
from lmx_supervisor.lifecycle.managed_model import ManagedModel

LACKS_CAPABILITY = "model_lacks_capability"


def encoder_listing(ready: Ready | None) -> dict[str, Any]:
    """Extra fields of an embedding/rerank model's row in /v1/models and
    /admin/models (empty for other models)."""
    info = ready.encoder if ready is not None else None
    if info is None:
        return {}
    row: dict[str, Any] = {}
    if info.dimensions:
        row["embedding_dimensions"] = info.dimensions
        row["embedding_pooling"] = info.pooling
        row["embedding_normalized"] = info.normalized
        row["dimensions_adjustable"] = info.matryoshka
    if info.rerank_mode:
        row["rerank_mode"] = info.rerank_mode
    row["max_input_tokens"] = info.max_tokens
    return row


def _require(model: ManagedModel, capability: str, what: str) -> EncoderInfo | None:
    """The model's encoder description; a 400 naming `model` when the model
    is known (ready once) and lacks the capability. None while it has not
    reported yet: the worker then refuses by itself if it must."""
    ready = model.ready
    if ready is None:
        return None
    if capability not in ready.capabilities:
        kinds = ", ".join(ready.capabilities) or "none"
        raise BadRequest(f"Model '{model.model_id}' does not support {what} "
                         f"(its capabilities: {kinds})", param="model", code=LACKS_CAPABILITY)
    return ready.encoder


def _json(body: dict[str, Any]) -> Response:
    return Response(msgspec.json.encode(body), media_type="application/json")


def _check_embedding_request(req: EmbeddingRequest, info: EncoderInfo | None,
                             token_ids: list[list[int]] | None) -> None:
    if info is None:
        return
    if req.dimensions is not None and req.dimensions != info.dimensions:
        if req.dimensions > info.dimensions:
            raise BadRequest(f"dimensions {req.dimensions} exceeds the model's "
                             f"{info.dimensions}", param="dimensions")
        if not info.matryoshka:
            raise BadRequest(f"The model's vectors have {info.dimensions} dimensions and it is "
                             "not Matryoshka-trained, so they cannot be shortened",
                             param="dimensions")
    for i, ids in enumerate(token_ids or []):
        bad = next((t for t in ids if not 0 <= t < info.vocab_size), None)
        if bad is not None:
            raise BadRequest(f"input[{i}] holds token id {bad}, outside the model's vocabulary "
                             f"[0, {info.vocab_size})", param="input")
        if len(ids) > info.max_tokens:
            raise BadRequest(f"input[{i}] has {len(ids)} tokens; the model takes at most "
                             f"{info.max_tokens}", param="input", code="context_length_exceeded")


async def embeddings(request: Request) -> Response:
    state = gateway_state(request)
    req = await read_json(request, EmbeddingRequest, state.config.server.max_request_body_bytes)
    texts, token_ids = embedding_inputs(req.input)
    model = resolve_model(state, req.model)
    info = _require(model, "embeddings", "embeddings")
    _check_embedding_request(req, info, token_ids)
    rid = secrets.token_hex(12)
    result = await run_encoder(state, model, Embed(rid, texts=texts, token_ids=token_ids,
                                            dimensions=req.dimensions))
    assert isinstance(result, Embeddings)
    row_bytes = 4 * result.dim
    data: list[dict[str, Any]] = []
    if req.encoding_format == "base64":
        # The raw bytes already are OpenAI's base64 payload: little-endian float32.
        for i in range(result.count):
            chunk = result.vectors[i * row_bytes:(i + 1) * row_bytes]
            data.append({"object": "embedding", "index": i,
                         "embedding": base64.b64encode(chunk).decode("ascii")})
    else:
        # struct, not numpy: the gateway process stays free of array libraries.
        row = struct.Struct(f"<{result.dim}f")
        data = [{"object": "embedding", "index": i, "embedding": list(values)}
                for i, values in enumerate(row.iter_unpack(result.vectors))]
    return _json({"object": "list", "data": data, "model": model.model_id,
                  "usage": {"prompt_tokens": result.prompt_tokens,
                            "total_tokens": result.prompt_tokens}})


def _text(doc: str | RerankDocument) -> str:
    return doc if isinstance(doc, str) else doc.text


async def rerank(request: Request) -> Response:
    state = gateway_state(request)
    req = await read_json(request, RerankRequest, state.config.server.max_request_body_bytes)
    model = resolve_model(state, req.model)
    _require(model, "rerank", "reranking")
    documents = [_text(d) for d in req.documents]
    rid = secrets.token_hex(12)
    result = await run_encoder(state, model, Rerank(rid, req.query, documents))
    assert isinstance(result, Scores)
    if len(result.scores) != len(documents):
        raise LMXError(f"the worker returned {len(result.scores)} scores for "
                       f"{len(documents)} documents")
    # Stable sort: equal scores keep the documents' order.
    order = sorted(range(len(documents)), key=lambda i: -result.scores[i])
    results: list[dict[str, Any]] = []
    for i in order[:req.top_n or len(order)]:
        entry: dict[str, Any] = {"index": i, "relevance_score": result.scores[i]}
        if req.return_documents:
            entry["document"] = {"text": documents[i]}
        results.append(entry)
    return _json({"id": f"rerank-{rid}", "object": "list", "results": results,
                  "model": model.model_id,
                  "usage": {"prompt_tokens": result.prompt_tokens,
                            "total_tokens": result.prompt_tokens}})


ROUTES = [
    ScopedRoute(INFERENCE, "/v1/embeddings", embeddings, methods=["POST"], body=EmbeddingRequest,
                errors=GENERATION_ERRORS),
    ScopedRoute(INFERENCE, "/v1/rerank", rerank, methods=["POST"], body=RerankRequest,
                errors=GENERATION_ERRORS),
]
