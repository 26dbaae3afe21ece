"""Every route declares who may call it. The app's router is built only from
`ScopedRoute`s (`build_routes` refuses anything else), so a route cannot
exist without a scope, and auth is decided from the matched route's scope,
never from its path:

- `PUBLIC`: no key ever (probes, discovery, the dashboard page, the API
  document);
- `INFERENCE`: `security.inference_api_key` / `security.inference_api_keys`;
- `ADMIN`: `security.admin_key`.

Adding a route is one line in its module's `ROUTES` list:

    ScopedRoute(ADMIN, "/admin/thing", handler, methods=["POST"], body=ThingRequest)

`body` (the msgspec type the handler reads with `read_json`), `query`,
`ok` (success statuses), `errors` and `produces` describe the route in `GET /openapi.json`. A path
that matches no route is 404 whatever the keys.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from starlette.routing import BaseRoute, Route
from starlette.types import Receive, Scope, Send

from lmx_gateway.access.guards import guard_route


class RouteScope(enum.StrEnum):
    PUBLIC = "public"
    INFERENCE = "inference"
    ADMIN = "admin"


PUBLIC = RouteScope.PUBLIC
INFERENCE = RouteScope.INFERENCE
ADMIN = RouteScope.ADMIN

JSON = "application/json"
SSE = "text/event-stream"

# Error statuses beyond what every route (and every route of its scope, and
# every route with a body) may answer; listed in the API document.
# A generation: unknown model (404), not loaded yet / loading (409), a model
# without the capability (400/422), queue full (429), worker failure (500,
# 503), deadline (504).
GENERATION_ERRORS = (404, 409, 422, 429, 500, 503, 504)
# A load: unknown or incomplete model (404, 409), unsupported (422), no
# memory (507), download started instead (202 is a success).
LOAD_ERRORS = (404, 409, 422, 500, 503, 504, 507)


@dataclass(frozen=True)
class QueryParam:
    name: str
    schema: dict[str, Any]
    description: str = ""


class ScopedRoute(Route):
    """A Starlette `Route` that knows its scope. Before the handler (and
    before the method check) it refuses cross-origin browser requests and
    requests without the scope's key."""

    def __init__(self, scope: RouteScope, path: str, endpoint: Callable[..., Any], *,
                 methods: Sequence[str], body: type | None = None,
                 query: Sequence[QueryParam] = (), ok: Sequence[int] = (200,),
                 errors: Iterable[int] = (),
                 produces: Sequence[str] = (JSON,), any_origin: bool = False,
                 summary: str | None = None) -> None:
        if not isinstance(scope, RouteScope):
            raise TypeError(f"route {path}: scope must be a RouteScope, not {scope!r}")
        if len(methods) != 1:
            # One operation per route keeps the API document one-to-one with the table.
            raise ValueError(f"route {path}: declare one method per ScopedRoute")
        super().__init__(path, endpoint, methods=list(methods))
        self.scope = scope
        self.method = methods[0].upper()
        self.body = body
        self.query = tuple(query)
        self.ok = tuple(ok)  # success statuses
        self.errors = frozenset(errors)
        self.produces = tuple(produces)
        # Only the health probes answer browsers of any origin (they reveal nothing).
        self.any_origin = any_origin
        self.summary = summary or _first_line(endpoint.__doc__) or endpoint.__name__

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            refusal = guard_route(scope, self.scope.value, any_origin=self.any_origin)
            if refusal is not None:
                await refusal(scope, receive, send)
                return
        await super().handle(scope, receive, send)


def _first_line(doc: str | None) -> str | None:
    if not doc:
        return None
    return doc.strip().splitlines()[0].strip() or None


def build_routes(*tables: Iterable[BaseRoute]) -> list[ScopedRoute]:
    """The router's route list: every route must be a ScopedRoute, and no
    (method, path) may be declared twice."""
    routes: list[ScopedRoute] = []
    seen: set[tuple[str, str]] = set()
    for table in tables:
        for route in table:
            if not isinstance(route, ScopedRoute):
                raise TypeError(f"{route!r} has no scope: declare it as a ScopedRoute")
            key = (route.method, route.path)
            if key in seen:
                raise ValueError(f"{route.method} {route.path} is declared twice")
            seen.add(key)
            routes.append(route)
    return routes
