"""The browser-facing edge, as two ASGI middlewares.

**Host** (`HostCheckMiddleware`), before any handler: a request whose
`Host` is not one of this server's own names is refused with 421, so a
DNS-rebinding page (whose requests carry the attacker's host name) never
reaches a route.

Accepted: loopback names and addresses (`localhost`, `*.localhost`,
127.0.0.0/8, ::1) always; the address the server is bound to; when bound to
a wildcard or a non-loopback address, the machine's own addresses and host
names (plus `NAME.local`); plus `server.allowed_hosts` (read live, so a
config reload applies at once; `*.example.com` patterns and `*` for "any",
as Starlette's TrustedHostMiddleware understands them). The port is not
checked.

Starlette's TrustedHostMiddleware takes a fixed list and answers a plain-text
400; this one follows config reloads and the machine's addresses (DHCP) and
answers in OpenAI's error shape.

**CORS** (`LiveCORSMiddleware`) for the browser origins the operator lists
in `server.cors_origins` (default none): Starlette's CORSMiddleware answers
their preflights and adds the `Access-Control-*` headers, so a browser chat UI on another origin can
call the API. The list is read live (a config reload applies at once). A
preflight from any other origin gets 403; what such an origin sends anyway
is refused by the route guard (`guards.origin_allowed`)."""

from __future__ import annotations

import ipaddress
import re
import socket
import time

import psutil
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from lmx_gateway.access.guards import refusal
from lmx_supervisor.config import Config

WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::", "[::]"})
LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain"})
# The machine's addresses are read again after this long (DHCP, new interfaces).
ADDRESSES_TTL_SEC = 30.0
_HOST_HEADER = re.compile(r"(\[[0-9a-fA-F:.]+\]|[^\s:\[\]/@]+)(?::\d{1,5})?")


def host_of_header(value: str | None) -> str | None:
    """The host part of a Host header, lowercased, brackets kept for IPv6."""
    if value is None:
        return None
    match = _HOST_HEADER.fullmatch(value.strip())
    if match is None:
        return None
    return match.group(1).lower().rstrip(".") or None


def _is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _as_host(address: str) -> str:
    address = address.split("%", 1)[0].lower()  # drop an IPv6 zone id
    return f"[{address}]" if ":" in address else address


def machine_names() -> set[str]:
    """This machine's interface addresses and host names."""
    names: set[str] = set()
    for addrs in psutil.net_if_addrs().values():
        for addr in addrs:
            if addr.family in (socket.AF_INET, socket.AF_INET6):
                names.add(_as_host(addr.address))
    for name in {socket.gethostname(), socket.getfqdn()}:
        name = name.lower().rstrip(".")
        if name:
            names.add(name)
            names.add(f"{name.split('.', 1)[0]}.local")
    return names


def host_allowed(host: str, own: set[str], patterns: list[str]) -> bool:
    if _is_loopback(host) or host in own:
        return True
    for pattern in patterns:
        pattern = pattern.lower()
        if pattern == "*" or host == _as_host(pattern) or (
                pattern.startswith("*.") and host.endswith(pattern[1:])):
            return True
    return False


class HostCheckMiddleware:
    def __init__(self, app: ASGIApp, initial_config: Config) -> None:
        self.app = app
        self._initial = initial_config
        bind = initial_config.server.host.strip().lower()
        self._bind = _as_host(bind.strip("[]")) if bind not in WILDCARD_HOSTS else ""
        self._with_machine = bind in WILDCARD_HOSTS or not _is_loopback(self._bind)
        self._machine: set[str] = set()
        self._machine_at = float("-inf")

    def _own_names(self) -> set[str]:
        if not self._with_machine:
            return {self._bind}
        now = time.monotonic()
        if now - self._machine_at > ADDRESSES_TTL_SEC:
            self._machine = machine_names() | ({self._bind} if self._bind else set())
            self._machine_at = now
        return self._machine

    def _config(self, scope: Scope) -> Config:
        state = getattr(getattr(scope.get("app"), "state", None), "lmx", None)
        config = getattr(state, "config", None)
        return config if isinstance(config, Config) else self._initial

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        raw = None
        for key, value in scope["headers"]:
            if key == b"host":
                raw = bytes(value).decode("latin-1")
                break
        host = host_of_header(raw)
        patterns = self._config(scope).server.allowed_hosts
        if host is not None and host_allowed(host, self._own_names(), patterns):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        shown = "(none)" if not raw else repr(raw[:100])
        response = refusal(scope, 421, f"Host {shown} is not a name of this server (list it "
                           "in server.allowed_hosts)", "invalid_request_error",
                           "misdirected_request")
        await response(scope, receive, send)


ALLOWED_METHODS = ("GET", "POST", "DELETE")
# Browsers may read these on a cross-origin answer.
EXPOSED_HEADERS = ("X-Request-ID", "Retry-After")


def _is_preflight(scope: Scope) -> bool:
    if scope["method"] != "OPTIONS":
        return False
    names = {key for key, _ in scope["headers"]}
    return b"origin" in names and b"access-control-request-method" in names


class LiveCORSMiddleware:
    def __init__(self, app: ASGIApp, initial_config: Config) -> None:
        self.app = app
        self._initial = initial_config
        self._origins: tuple[str, ...] | None = None
        self._cors: CORSMiddleware | None = None

    def _config(self, scope: Scope) -> Config:
        state = getattr(getattr(scope.get("app"), "state", None), "lmx", None)
        config = getattr(state, "config", None)
        return config if isinstance(config, Config) else self._initial

    def _middleware(self, origins: tuple[str, ...]) -> CORSMiddleware:
        if self._cors is None or origins != self._origins:
            self._cors = CORSMiddleware(
                self.app, allow_origins=[o.rstrip("/").lower() for o in origins],
                allow_methods=ALLOWED_METHODS,
                # The SDKs send their own headers (x-stainless-*, anthropic-version).
                allow_headers=["*"], expose_headers=EXPOSED_HEADERS, max_age=600)
            self._origins = origins
        return self._cors

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        origins = tuple(self._config(scope).server.cors_origins)
        if not origins:
            if _is_preflight(scope):
                await self._refuse(scope, receive, send)
                return
            await self.app(scope, receive, send)
            return
        cors = self._middleware(origins)
        if _is_preflight(scope):
            origin = next(bytes(v).decode("latin-1") for k, v in scope["headers"]
                          if k == b"origin")
            if not cors.is_allowed_origin(origin.rstrip("/")):
                await self._refuse(scope, receive, send)
                return
        await cors(scope, receive, send)

    @staticmethod
    async def _refuse(scope: Scope, receive: Receive, send: Send) -> None:
        await refusal(scope, 403, "Cross-origin request refused: this Origin is not in "
                      "server.cors_origins", "permission_error",
                      "origin_not_allowed")(scope, receive, send)
