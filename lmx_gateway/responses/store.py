"""Stored responses of `/v1/responses`, for `previous_response_id` chaining
and `GET /v1/responses/{id}`: in memory, bounded in entries and in bytes
(`server.responses_store_max_entries` / `_max_bytes`), least recently used
out first. A restart forgets them (a client then gets a clear 404); so is a
single response larger than the whole byte budget never kept."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import msgspec

from lmx_gateway.openai.schemas import ChatMessageIn

DEFAULT_CAPACITY = 1000
DEFAULT_MAX_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class StoredResponse:
    body: dict[str, Any]  # the response object as returned
    # The conversation so far (earlier turns, this input, this output),
    # without this request's `instructions`, which do not carry over.
    conversation: list[ChatMessageIn]
    # What it holds, as JSON bytes (body and conversation): what the byte
    # budget counts.
    size: int = field(default=0, compare=False)

    @classmethod
    def of(cls, body: dict[str, Any], conversation: list[ChatMessageIn]) -> StoredResponse:
        size = len(msgspec.json.encode(body)) + len(msgspec.json.encode(conversation))
        return cls(body, conversation, size)


class ResponseStore:
    def __init__(self, capacity: int = DEFAULT_CAPACITY,
                 max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.capacity = capacity
        self.max_bytes = max_bytes
        self.bytes = 0
        self._items: OrderedDict[str, StoredResponse] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def put(self, response_id: str, stored: StoredResponse) -> None:
        self.delete(response_id)
        if stored.size > self.max_bytes:
            return  # could never fit: keeping it would evict everything else
        self._items[response_id] = stored
        self.bytes += stored.size
        while len(self._items) > self.capacity or self.bytes > self.max_bytes:
            _, evicted = self._items.popitem(last=False)
            self.bytes -= evicted.size

    def get(self, response_id: str) -> StoredResponse | None:
        stored = self._items.get(response_id)
        if stored is not None:
            self._items.move_to_end(response_id)
        return stored

    def delete(self, response_id: str) -> bool:
        stored = self._items.pop(response_id, None)
        if stored is None:
            return False
        self.bytes -= stored.size
        return True
