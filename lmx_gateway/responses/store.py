"""Stored responses of `/v1/responses`, for `previous_response_id` chaining
and `GET /v1/responses/{id}`: in memory, bounded, least recently used out
first. A restart forgets them (a client then gets a clear 404)."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from lmx_gateway.openai.schemas import ChatMessageIn

DEFAULT_CAPACITY = 1000


@dataclass(frozen=True)
class StoredResponse:
    body: dict[str, Any]  # the response object as returned
    # The conversation so far (earlier turns, this input, this output),
    # without this request's `instructions`, which do not carry over.
    conversation: list[ChatMessageIn]


class ResponseStore:
    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, StoredResponse] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def put(self, response_id: str, stored: StoredResponse) -> None:
        self._items[response_id] = stored
        self._items.move_to_end(response_id)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def get(self, response_id: str) -> StoredResponse | None:
        stored = self._items.get(response_id)
        if stored is not None:
            self._items.move_to_end(response_id)
        return stored

    def delete(self, response_id: str) -> bool:
        return self._items.pop(response_id, None) is not None
