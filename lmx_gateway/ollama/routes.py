"""The Ollama routes. Their scope is the inference one, like /v1: the
inference keys guard every `/api/` path, pull and delete included, as
Ollama's own API has no separate admin scope."""

from __future__ import annotations

from lmx_gateway.access.scopes import INFERENCE, JSON, ScopedRoute
from lmx_gateway.ollama import catalog
from lmx_gateway.ollama.chat import chat, generate
from lmx_gateway.ollama.embed import embed, embeddings
from lmx_gateway.ollama.errors import ollama_errors
from lmx_gateway.ollama.schemas import ChatBody, EmbedBody, GenerateBody, LegacyEmbedBody, ModelRef

PATH_PREFIX = "/api/"
NDJSON = "application/x-ndjson"
# What any of them may answer besides 200 (a model to load, busy, a worker failure).
ERRORS = (404, 409, 429, 500, 503, 504)

ROUTES = [
    ScopedRoute(INFERENCE, "/api/chat", ollama_errors(chat),
                methods=["POST"], body=ChatBody, produces=(NDJSON, JSON), errors=ERRORS),
    ScopedRoute(INFERENCE, "/api/generate", ollama_errors(generate),
                methods=["POST"], body=GenerateBody, produces=(NDJSON, JSON), errors=ERRORS),
    ScopedRoute(INFERENCE, "/api/embed", ollama_errors(embed),
                methods=["POST"], body=EmbedBody, errors=ERRORS),
    ScopedRoute(INFERENCE, "/api/embeddings", ollama_errors(embeddings),
                methods=["POST"], body=LegacyEmbedBody, errors=ERRORS),
    ScopedRoute(INFERENCE, "/api/tags", ollama_errors(catalog.tags),
                methods=["GET"], errors=ERRORS),
    ScopedRoute(INFERENCE, "/api/show", ollama_errors(catalog.show),
                methods=["POST"], body=ModelRef, errors=ERRORS),
    ScopedRoute(INFERENCE, "/api/ps", ollama_errors(catalog.ps),
                methods=["GET"], errors=ERRORS),
    ScopedRoute(INFERENCE, "/api/version", ollama_errors(catalog.version),
                methods=["GET"], errors=ERRORS),
    ScopedRoute(INFERENCE, "/api/pull", ollama_errors(catalog.pull),
                methods=["POST"], body=ModelRef, produces=(NDJSON, JSON),
                errors=(*ERRORS, 502, 507)),
    ScopedRoute(INFERENCE, "/api/delete", ollama_errors(catalog.delete),
                methods=["DELETE"], body=ModelRef, errors=ERRORS),
]
