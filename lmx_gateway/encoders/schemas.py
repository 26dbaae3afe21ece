"""Request bodies of /v1/embeddings (OpenAI's shape) and /v1/rerank
(Cohere's and Jina's shape), and the checks msgspec cannot express."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from lmx_gateway.openai.schemas import ModelName, PositiveInt
from lmx_supervisor.errors import BadRequest

MAX_INPUTS = 2048  # OpenAI's limit on inputs per embeddings request
MAX_DOCUMENTS = 1000  # Cohere's limit on documents per rerank request


class EmbeddingRequest(msgspec.Struct, kw_only=True):
    model: ModelName
    # A string, a list of strings, a list of token ids, or a list of such
    # lists: one union msgspec cannot type (several array shapes), so it is
    # checked by `embedding_inputs`.
    input: Any
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: PositiveInt | None = None
    user: str | None = None


class RerankDocument(msgspec.Struct):
    text: str


class RerankRequest(msgspec.Struct, kw_only=True):
    model: ModelName
    query: Annotated[str, Meta(min_length=1)]
    documents: Annotated[list[str | RerankDocument], Meta(min_length=1,
                                                          max_length=MAX_DOCUMENTS)]
    top_n: PositiveInt | None = None
    return_documents: bool = False
    # Cohere's chunking knob: accepted, documents are never split.
    max_chunks_per_doc: int | None = None


_SHAPES = ("input must be a string, a list of strings, a list of token ids (integers) "
           "or a list of token-id lists")


def _is_token(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def embedding_inputs(raw: Any) -> tuple[list[str] | None, list[list[int]] | None]:
    """(texts, None) or (None, token id lists), or a 400 naming `input`."""
    if isinstance(raw, str):
        raw = [raw]
    elif not isinstance(raw, list):
        raise BadRequest(_SHAPES, param="input", code="invalid_type")
    if not raw:
        raise BadRequest("input must not be empty", param="input")
    if len(raw) > MAX_INPUTS:
        raise BadRequest(f"input holds {len(raw)} items; at most {MAX_INPUTS} are allowed",
                         param="input")
    if all(isinstance(x, str) for x in raw):
        for i, text in enumerate(raw):
            if not text:
                raise BadRequest(f"input[{i}] is an empty string", param="input")
        return raw, None
    if all(_is_token(x) for x in raw):
        return None, [raw]
    if all(isinstance(x, list) for x in raw):
        for i, ids in enumerate(raw):
            if not ids:
                raise BadRequest(f"input[{i}] is an empty list of token ids", param="input")
            if not all(_is_token(t) for t in ids):
                raise BadRequest(f"input[{i}] must hold only integer token ids",
                                 param="input", code="invalid_type")
        return None, raw
    raise BadRequest(_SHAPES, param="input", code="invalid_type")
