"""The one reader of a server's `/admin/events` stream that tests use."""

from __future__ import annotations

import json
import threading
from types import TracebackType
from typing import Any

import httpx

Received = tuple[str, dict[str, Any]]


class EventReader:
    """Collects /admin/events (type, data) pairs in a background thread, in
    the order the server sent them.

    The constructor returns once the server has subscribed this reader: it
    waits for the stream's first line (the `: connected` comment), which
    the server writes just before it subscribes, with no other task running
    in between; so no event published after the constructor returns is
    missed. close() waits for the next line to arrive (at the latest the
    next heartbeat, `server.sse_heartbeat_interval_sec`)."""

    def __init__(self, url: str, headers: dict[str, str] | None = None,
                 open_timeout: float = 15) -> None:
        self._events: list[Received] = []
        self._lock = threading.Lock()
        self._client = httpx.Client(base_url=url, headers=headers,
                                    timeout=httpx.Timeout(30, read=None))
        self.status_code: int | None = None
        self._opened = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self._opened.wait(open_timeout), "event stream did not open"

    def _run(self) -> None:
        kind = None
        try:
            with self._client.stream("GET", "/admin/events") as stream:
                self.status_code = stream.status_code
                for line in stream.iter_lines():
                    self._opened.set()
                    if self._stop.is_set():  # checked at least every heartbeat
                        return
                    if line.startswith("event: "):
                        kind = line[len("event: "):]
                    elif line.startswith("data: ") and kind is not None:
                        with self._lock:
                            self._events.append((kind, json.loads(line[len("data: "):])))
                        kind = None
        except (httpx.HTTPError, RuntimeError, ValueError):
            return  # closed by close() or the server went away

    def snapshot(self) -> list[Received]:
        """Every event received so far, oldest first."""
        with self._lock:
            return list(self._events)

    def kinds(self) -> list[str]:
        return [kind for kind, _ in self.snapshot()]

    def of(self, kind: str, **match: Any) -> list[dict[str, Any]]:
        """The payloads of `kind` events whose fields equal `match`."""
        return [d for k, d in self.snapshot()
                if k == kind and all(d.get(key) == v for key, v in match.items())]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(15)
        self._client.close()

    def __enter__(self) -> EventReader:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
