"""`GET /admin/dashboard`: the live operations page.

One self-contained HTML file (inline CSS and JS, no CDN, no build step) shipped
as package data. The page itself is public: the admin key is typed into it and
sent by its scripts to the `/admin/*` data endpoints, which stay protected."""

from __future__ import annotations

from functools import cache
from importlib import resources

from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

from lmx_gateway.access.scopes import PUBLIC, ScopedRoute

DASHBOARD_PATH = "/admin/dashboard"

# The page may talk to this origin only: no third-party script, style, font or
# beacon can load, which also proves in a browser that it works offline.
CONTENT_SECURITY_POLICY = "; ".join([
    "default-src 'none'",
    "script-src 'unsafe-inline'",
    "style-src 'unsafe-inline'",
    "connect-src 'self'",
    "img-src data:",
    "base-uri 'none'",
    "form-action 'none'",
    "frame-ancestors 'none'",
])

HEADERS = {
    "content-security-policy": CONTENT_SECURITY_POLICY,
    "cache-control": "no-store",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
}


@cache
def dashboard_html() -> str:
    return resources.files("lmx_gateway.admin").joinpath("static/dashboard.html").read_text("utf-8")


async def dashboard(_request: Request) -> Response:
    return HTMLResponse(dashboard_html(), headers=HEADERS)


ROUTES = [
    ScopedRoute(PUBLIC, DASHBOARD_PATH, dashboard, methods=["GET"], produces=("text/html",)),
]
