"""The `lmx` client commands' side of HTTP: one httpx client per command,
keys from the environment, server errors turned into one-line messages, and
a small Server-Sent Events reader for streams (`/admin/events`, chat).

Exit codes shared by every client command: 0 done, 1 the server answered
with an error, 2 the server could not be reached (or went away)."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx

DEFAULT_URL = "http://127.0.0.1:1234"
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_UNREACHABLE = 2
EXIT_INTERRUPTED = 130

ADMIN_KEY_ENV = "LMX_ADMIN_KEY"
API_KEY_ENV = "LMX_API_KEY"
URL_ENV = "LMX_URL"


class ServerUnreachable(Exception):
    """No answer at all: refused, unresolvable, timed out connecting, or the
    connection dropped mid-answer."""


class ApiError(Exception):
    """The server answered with an error in OpenAI's shape."""

    def __init__(self, status: int, message: str, code: str | None = None,
                 path: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.path = path

    def one_line(self) -> str:
        hint = ""
        if self.status == 403:
            hint = f" (set {ADMIN_KEY_ENV} to the server's security.admin_key)"
        elif self.status == 401:
            hint = f" (set {API_KEY_ENV} to the server's security.inference_api_key)"
        elif self.status in (404, 405) and self.code in ("not_found", "method_not_allowed"):
            hint = f" (this server has no {self.path or 'such endpoint'}; an older LMX?)"
        status = [str(self.status)] if self.status else []  # 0: no HTTP status
        code = " [" + " ".join(status + ([self.code] if self.code else [])) + "]"
        code = "" if code == " []" else code
        return " ".join(f"{self.message}{code}{hint}".split())


def _error_from(resp: httpx.Response) -> ApiError:
    try:
        err = resp.json().get("error", {})
        message, code = str(err.get("message") or resp.reason_phrase), err.get("code")
    except (ValueError, AttributeError):
        message, code = (resp.text.strip() or resp.reason_phrase)[:300], None
    return ApiError(resp.status_code, message, code, resp.request.url.path)


@dataclass
class SseEvent:
    event: str
    data: str

    def json(self) -> Any:
        return json.loads(self.data)


class LmxClient:
    def __init__(self, url: str, admin_key: str | None = None, api_key: str | None = None,
                 timeout: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self._admin_key = admin_key
        self._api_key = api_key
        self.http = httpx.Client(base_url=self.url,
                                 timeout=httpx.Timeout(timeout, connect=min(timeout, 5.0)))

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> LmxClient:
        url = args.url or os.environ.get(URL_ENV) or DEFAULT_URL
        if "://" not in url:
            url = f"http://{url}"
        return cls(url, os.environ.get(ADMIN_KEY_ENV) or None,
                   os.environ.get(API_KEY_ENV) or None, args.timeout)

    def close(self) -> None:
        self.http.close()

    def _headers(self, path: str) -> dict[str, str]:
        if path.startswith("/admin") and self._admin_key:
            return {"X-Admin-Key": self._admin_key}
        if path.startswith("/v1") and self._api_key:
            return {"Authorization": f"Bearer {self._api_key}"}
        return {}

    @contextmanager
    def _translate(self) -> Iterator[None]:
        try:
            yield
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            reason = str(exc).split("] ")[-1] or type(exc).__name__
            raise ServerUnreachable(
                f"cannot reach the LMX server at {self.url} ({reason}); is it running? "
                f"Start it with `lmx serve`, or point --url / {URL_ENV} at it") from None
        except (httpx.RemoteProtocolError, httpx.ReadError) as exc:
            raise ServerUnreachable(
                f"the LMX server at {self.url} closed the connection ({exc})") from None
        except httpx.TimeoutException:
            raise ApiError(0, f"no answer from {self.url} in time "
                              "(raise --timeout for slow operations)", "timeout") from None

    def request(self, method: str, path: str, body: Any = None,
                timeout: float | httpx.Timeout | None = None,
                ok: tuple[int, ...] = ()) -> Any:
        """JSON in, JSON out; any non-2xx (except `ok`) raises ApiError."""
        kwargs: dict[str, Any] = {"headers": self._headers(path)}
        if body is not None:
            kwargs["json"] = body
        if timeout is not None:
            kwargs["timeout"] = timeout
        with self._translate():
            resp = self.http.request(method, path, **kwargs)
        if resp.is_error and resp.status_code not in ok:
            raise _error_from(resp)
        try:
            return resp.json()
        except ValueError:
            return {"status_code": resp.status_code, "text": resp.text}

    def get(self, path: str, **kwargs: Any) -> Any:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, body: Any = None, **kwargs: Any) -> Any:
        return self.request("POST", path, {} if body is None else body, **kwargs)

    @contextmanager
    def stream(self, method: str, path: str, body: Any = None,
               read_timeout: float | None = None) -> Iterator[Iterator[SseEvent]]:
        """An SSE response as events. Errors before the stream starts raise
        ApiError; a dropped connection raises ServerUnreachable."""
        timeout = httpx.Timeout(self.http.timeout.connect, read=read_timeout,
                                connect=self.http.timeout.connect)
        kwargs: dict[str, Any] = {"headers": self._headers(path), "timeout": timeout}
        if body is not None:
            kwargs["json"] = body
        with self._translate(), self.http.stream(method, path, **kwargs) as resp:
            if resp.is_error:
                resp.read()
                raise _error_from(resp)
            yield self._events(resp)

    def _events(self, resp: httpx.Response) -> Iterator[SseEvent]:
        with self._translate():
            event = "message"
            data: list[str] = []
            for line in resp.iter_lines():
                if not line:
                    if data:
                        yield SseEvent(event, "\n".join(data))
                    event, data = "message", []
                elif line.startswith(":"):
                    continue  # comment / keep-alive
                else:
                    name, _, value = line.partition(":")
                    value = value[1:] if value.startswith(" ") else value
                    if name == "event":
                        event = value
                    elif name == "data":
                        data.append(value)
            if data:
                yield SseEvent(event, "\n".join(data))


def add_common_options(parser: argparse.ArgumentParser, timeout: float = 30.0) -> None:
    parser.add_argument("--url", help=f"server URL (env {URL_ENV}; default {DEFAULT_URL})")
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")
    parser.add_argument("--timeout", type=float, default=timeout,
                        help=f"seconds to wait for an answer (default {timeout:g})")
