"""The Ollama routes. Their auth scope is the inference one, like /v1:
`security.inference_api_key` guards every `/api/` path (see
lmx_gateway.http.auth), pull and delete included, as Ollama's own API has
no separate admin scope."""

from __future__ import annotations

from starlette.routing import Route

from lmx_gateway.ollama import catalog
from lmx_gateway.ollama.chat import chat, generate
from lmx_gateway.ollama.embed import embed, embeddings
from lmx_gateway.ollama.errors import ollama_errors

AUTH_SCOPE = "inference"
PATH_PREFIX = "/api/"

ROUTES = [
    Route("/api/chat", ollama_errors(chat), methods=["POST"]),
    Route("/api/generate", ollama_errors(generate), methods=["POST"]),
    Route("/api/embed", ollama_errors(embed), methods=["POST"]),
    Route("/api/embeddings", ollama_errors(embeddings), methods=["POST"]),
    Route("/api/tags", ollama_errors(catalog.tags), methods=["GET"]),
    Route("/api/show", ollama_errors(catalog.show), methods=["POST"]),
    Route("/api/ps", ollama_errors(catalog.ps), methods=["GET"]),
    Route("/api/version", ollama_errors(catalog.version), methods=["GET"]),
    Route("/api/pull", ollama_errors(catalog.pull), methods=["POST"]),
    Route("/api/delete", ollama_errors(catalog.delete), methods=["DELETE"]),
]
