"""The Ollama routes. Their scope is the inference one, like /v1: the
inference keys guard every `/api/` path, pull and delete included, as
Ollama's own API has no separate admin scope."""

from __future__ import annotations

from lmx_gateway.access.scopes import INFERENCE, ScopedRoute
from lmx_gateway.ollama import catalog
from lmx_gateway.ollama.chat import chat, generate
from lmx_gateway.ollama.embed import embed, embeddings
from lmx_gateway.ollama.errors import ollama_errors

PATH_PREFIX = "/api/"

ROUTES = [
    ScopedRoute(INFERENCE, "/api/chat", ollama_errors(chat),
                methods=["POST"], errors=(404, 409, 429, 500, 503, 504)),
    ScopedRoute(INFERENCE, "/api/generate", ollama_errors(generate),
                methods=["POST"], errors=(404, 409, 429, 500, 503, 504)),
    ScopedRoute(INFERENCE, "/api/embed", ollama_errors(embed),
                methods=["POST"], errors=(404, 409, 429, 500, 503, 504)),
    ScopedRoute(INFERENCE, "/api/embeddings", ollama_errors(embeddings),
                methods=["POST"], errors=(404, 409, 429, 500, 503, 504)),
    ScopedRoute(INFERENCE, "/api/tags", ollama_errors(catalog.tags),
                methods=["GET"], errors=(404, 409, 429, 500, 503, 504)),
    ScopedRoute(INFERENCE, "/api/show", ollama_errors(catalog.show),
                methods=["POST"], errors=(404, 409, 429, 500, 503, 504)),
    ScopedRoute(INFERENCE, "/api/ps", ollama_errors(catalog.ps),
                methods=["GET"], errors=(404, 409, 429, 500, 503, 504)),
    ScopedRoute(INFERENCE, "/api/version", ollama_errors(catalog.version),
                methods=["GET"], errors=(404, 409, 429, 500, 503, 504)),
    ScopedRoute(INFERENCE, "/api/pull", ollama_errors(catalog.pull),
                methods=["POST"], errors=(404, 409, 429, 500, 503, 504)),
    ScopedRoute(INFERENCE, "/api/delete", ollama_errors(catalog.delete),
                methods=["DELETE"], errors=(404, 409, 429, 500, 503, 504)),
]
