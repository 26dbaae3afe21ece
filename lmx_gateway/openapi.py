"""`GET /openapi.json`: an OpenAPI 3.1 document of every route, built from
the route table itself (`access.scopes.ScopedRoute`), so it cannot drift from
what is served: each route's scope becomes its security requirement, the
msgspec type its handler validates the body with becomes the request schema
(`msgspec.json.schema_components`, JSON Schema 2020-12 as OpenAPI 3.1 takes
it), and the statuses it can refuse with become its error responses.

Public (no key): it describes the open-source API, holds nothing of the
config (no keys, no model names, no paths), and a client or a fuzzer needs it
before it has a key to know how to present one; `/v1/discovery` is public
for the same reason.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute

from lmx_gateway import __version__
from lmx_gateway.access.guards import OLLAMA_PATH_PREFIX
from lmx_gateway.access.scopes import JSON, PUBLIC, RouteScope, ScopedRoute
from lmx_gateway.http.anthropic_errors import is_messages_path

OPENAPI_PATH = "/openapi.json"
REF = "#/components/schemas/{name}"

# Every route may answer these: a wrong Host (421), a browser Origin not
# allowed (403), memory pressure (503 overloaded).
_EVERY_ROUTE = (403, 421, 503)
_OF_SCOPE = {RouteScope.PUBLIC: (), RouteScope.INFERENCE: (401,), RouteScope.ADMIN: (403,)}
# Reading a JSON body: invalid (400), too large (413), not JSON (415).
_WITH_BODY = (400, 413, 415)
_SECURITY: dict[RouteScope, list[dict[str, list[str]]]] = {
    RouteScope.PUBLIC: [],
    RouteScope.INFERENCE: [{"bearer": []}, {"apiKey": []}],
    RouteScope.ADMIN: [{"adminKey": []}, {"bearer": []}],
}
_SECURITY_SCHEMES = {
    "bearer": {"type": "http", "scheme": "bearer",
               "description": "`Authorization: Bearer <key>`: the inference key on /v1 routes, "
                              "the admin key on /admin routes"},
    "apiKey": {"type": "apiKey", "in": "header", "name": "X-Api-Key"},
    "adminKey": {"type": "apiKey", "in": "header", "name": "X-Admin-Key"},
}
_ERROR_SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object", "required": ["error"],
        "properties": {"error": {
            "type": "object", "required": ["message", "type", "code", "param"],
            "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                           "code": {"type": ["string", "null"]},
                           "param": {"type": ["string", "null"]}}}},
    },
    "OllamaError": {
        "type": "object", "required": ["error"],
        "properties": {"error": {"type": "string"}},
    },
    "AnthropicError": {
        "type": "object", "required": ["type", "error"],
        "properties": {"type": {"const": "error"}, "error": {
            "type": "object", "required": ["type", "message"],
            "properties": {"type": {"type": "string"}, "message": {"type": "string"}}}},
    },
}
_REASONS = {
    400: "Invalid request (the body or a parameter; `param` names it)",
    401: "Missing or wrong API key",
    403: "Missing or wrong admin key, or a browser Origin not in server.cors_origins",
    404: "Not found", 405: "Method not allowed", 409: "Conflict with the model's state",
    413: "Request body too large", 415: "Content-Type is not application/json",
    421: "Host header is not a name of this server", 422: "Model not supported",
    429: "Queue full (Retry-After)", 500: "Internal or worker error",
    502: "The model hub failed", 503: "Unavailable (no model, overloaded, worker crashed)",
    504: "Timed out", 507: "Not enough memory or disk",
}


def _success_content(route: ScopedRoute) -> dict[str, Any]:
    content: dict[str, Any] = {}
    for media in route.produces:
        schema: dict[str, Any] = ({"type": ["object", "array"]} if media == JSON
                                  else {"type": "string"})
        content[media] = {"schema": schema}
    return content


def _operation(route: ScopedRoute, body_refs: dict[type, dict[str, Any]]) -> dict[str, Any]:
    op: dict[str, Any] = {
        "operationId": f"{route.method.lower()}_{_slug(route.path_format)}",
        "summary": route.summary,
        "tags": [route.scope.value],
        "security": _SECURITY[route.scope],
    }
    params = [{"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
              for name in route.param_convertors]
    params += [{"name": q.name, "in": "query", "required": False, "schema": q.schema,
                "description": q.description} for q in route.query]
    if params:
        op["parameters"] = params
    statuses = {*_EVERY_ROUTE, *_OF_SCOPE[route.scope], *route.errors}
    if route.body is not None:
        op["requestBody"] = {"required": True,
                             "content": {JSON: {"schema": body_refs[route.body]}}}
        statuses.update(_WITH_BODY)
    error_ref = {"$ref": REF.format(name=_error_schema_name(route.path))}
    responses: dict[str, Any] = {
        str(status): {"description": "OK" if status == 200 else "Accepted",
                      "content": _success_content(route)} for status in route.ok}
    for status in sorted(statuses):
        responses[str(status)] = {"description": _REASONS.get(status, "Error"),
                                  "content": {JSON: {"schema": error_ref}}}
    op["responses"] = responses
    return op


def _error_schema_name(path: str) -> str:
    """Each route family's own error shape (its clients parse that one)."""
    if is_messages_path(path):
        return "AnthropicError"
    if path.startswith(OLLAMA_PATH_PREFIX):
        return "OllamaError"
    return "Error"


def _slug(path: str) -> str:
    """`/admin/models/{model_id}` -> `admin_models_model_id`."""
    return "_".join(re.findall(r"[A-Za-z0-9]+", path))


def build_document(routes: Iterable[BaseRoute]) -> dict[str, Any]:
    scoped = [r for r in routes if isinstance(r, ScopedRoute)]
    bodies = sorted({r.body for r in scoped if r.body is not None}, key=lambda t: t.__name__)
    refs, components = msgspec.json.schema_components(bodies, ref_template=REF)
    body_refs = dict(zip(bodies, refs, strict=True))
    paths: dict[str, dict[str, Any]] = {}
    for route in scoped:
        paths.setdefault(route.path_format, {})[route.method.lower()] = \
            _operation(route, body_refs)
    return {
        "openapi": "3.1.0",
        "info": {"title": "LMX", "version": __version__,
                 "description": "Self-hosted inference server: OpenAI, Anthropic and "
                                "Responses APIs, plus administration."},
        "paths": paths,
        "components": {"schemas": {**components, **_ERROR_SCHEMAS},
                       "securitySchemes": _SECURITY_SCHEMES},
    }


async def openapi_document(request: Request) -> Response:
    """The OpenAPI 3.1 document of this server"""
    # Built once per app: the route table never changes while it runs.
    document = getattr(request.app.state, "openapi_document", None)
    if document is None:
        document = build_document(request.app.routes)
        request.app.state.openapi_document = document
    return JSONResponse(document)


ROUTES = [ScopedRoute(PUBLIC, OPENAPI_PATH, openapi_document, methods=["GET"])]
