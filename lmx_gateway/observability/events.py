"""The admin event bus behind `/admin/events`.

Publishing never blocks and never slows inference: each subscriber has a
bounded queue, and when a slow reader lets it fill, the oldest event is
dropped and counted (the subscriber is told how many it missed)."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

DEFAULT_QUEUE_SIZE = 256

log = logging.getLogger("lmx.gateway")

Listener = Callable[[str, dict[str, Any]], None]


@dataclass
class Event:
    id: int
    type: str
    data: dict[str, Any]
    ts: float = field(default_factory=time.time)

    def payload(self) -> dict[str, Any]:
        return {"type": self.type, "ts": self.ts, **self.data}


class Subscription:
    def __init__(self, bus: EventBus, size: int) -> None:
        self._bus = bus
        self._queue: asyncio.Queue[Event] = asyncio.Queue(size)
        self.dropped = 0

    def offer(self, event: Event) -> None:
        while True:
            try:
                self._queue.put_nowait(event)
                return
            except asyncio.QueueFull:
                self._queue.get_nowait()  # drop the oldest: the newest matters most
                self.dropped += 1
                self._bus.dropped_total += 1

    async def get(self, timeout: float) -> Event | None:
        try:
            return await asyncio.wait_for(self._queue.get(), timeout)
        except TimeoutError:
            return None

    def close(self) -> None:
        self._bus._subscribers.discard(self)


class EventBus:
    def __init__(self, queue_size: int = DEFAULT_QUEUE_SIZE) -> None:
        self._ids = itertools.count(1)
        self._subscribers: set[Subscription] = set()
        self.queue_size = queue_size
        self.dropped_total = 0
        self._listeners: list[Listener] = []

    def add_listener(self, listener: Listener) -> None:
        """Called synchronously for every published event (metrics, logs):
        it must be quick and must not block."""
        self._listeners.append(listener)

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    def publish(self, type_: str, data: dict[str, Any]) -> Event:
        event = Event(next(self._ids), type_, data)
        for listener in self._listeners:
            try:
                listener(type_, data)
            except Exception:  # an observer's bug must not stop the event
                log.exception("event listener failed on %s", type_)
        for sub in list(self._subscribers):
            sub.offer(event)
        return event

    def subscribe(self) -> Subscription:
        sub = Subscription(self, self.queue_size)
        self._subscribers.add(sub)
        return sub

    async def stream(self, heartbeat_sec: float) -> AsyncIterator[Event]:
        """Events as they come, and a heartbeat when none came for a while."""
        sub = self.subscribe()
        try:
            while True:
                event = await sub.get(heartbeat_sec)
                yield event if event is not None else Event(0, "heartbeat",
                                                            {"dropped": sub.dropped})
        finally:
            sub.close()
