"""POST /api/embed (`input`: a string or a list; `embeddings` back) and the
older POST /api/embeddings (`prompt`; `embedding` back), served by the
embedding workers /v1/embeddings uses. Texts are truncated to the model's
input length, as `truncate: true` (Ollama's default) asks; `truncate:
false` is refused, since LMX cannot tell the client instead."""

from __future__ import annotations

import secrets
import struct
import time
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from lmx_gateway.http.body import read_json
from lmx_gateway.inference.generation import run_encoder
from lmx_gateway.inference.routing import resolve_model
from lmx_gateway.ollama.options import UNSUPPORTED, keep_alive_seconds
from lmx_gateway.ollama.schemas import EmbedBody, LegacyEmbedBody
from lmx_gateway.ollama.serving import apply_keep_alive, served_name
from lmx_gateway.state import GatewayState, gateway_state
from lmx_protocol import Embed, Embeddings
from lmx_supervisor.errors import BadRequest


async def _vectors(state: GatewayState, name: str, texts: list[str], dimensions: int | None,
                   keep_alive: Any) -> tuple[str, list[list[float]], int]:
    seconds = keep_alive_seconds(keep_alive)
    model = resolve_model(state, await served_name(state, name))
    if model.ready is not None and "embeddings" not in model.ready.capabilities:
        raise BadRequest(f"model '{model.model_id}' does not support embeddings",
                         param="model", code="model_lacks_capability")
    try:
        result = await run_encoder(state, model, Embed(secrets.token_hex(12), texts=texts,
                                                       dimensions=dimensions))
    finally:
        await apply_keep_alive(state, model, seconds)
    assert isinstance(result, Embeddings)
    row = struct.Struct(f"<{result.dim}f")
    return model.model_id, [list(v) for v in row.iter_unpack(result.vectors)], \
        result.prompt_tokens


async def embed(request: Request) -> Response:
    state = gateway_state(request)
    started = time.monotonic()
    body = await read_json(request, EmbedBody, state.config.server.max_request_body_bytes,
                          untyped_ok_without_origin=True)
    if not body.truncate:
        raise BadRequest("truncate: false is not supported (inputs longer than the model "
                         "takes are truncated)", param="truncate", code=UNSUPPORTED)
    texts = [body.input] if isinstance(body.input, str) else body.input
    model_id, vectors, tokens = await _vectors(state, body.model, texts, body.dimensions,
                                               body.keep_alive)
    return JSONResponse({"model": model_id, "embeddings": vectors,
                         "total_duration": int((time.monotonic() - started) * 1e9),
                         "load_duration": 0, "prompt_eval_count": tokens})


async def embeddings(request: Request) -> Response:
    state = gateway_state(request)
    body = await read_json(request, LegacyEmbedBody, state.config.server.max_request_body_bytes,
                          untyped_ok_without_origin=True)
    _, vectors, _ = await _vectors(state, body.model, [body.prompt], None, body.keep_alive)
    return JSONResponse({"embedding": vectors[0]})
