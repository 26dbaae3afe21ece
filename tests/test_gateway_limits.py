"""The gateway's own bounds: the Responses store in bytes, how deep a body
may nest (and which field a too-deep body is blamed on), and the connection
cap from `server.max_connections`."""

from __future__ import annotations

import json
import socket
from typing import Any

import pytest

from lmx_gateway.http.body import decode_json
from lmx_gateway.http.json_depth import MAX_JSON_DEPTH, too_deep_raw, too_deep_value
from lmx_gateway.openai.schemas import ChatCompletionRequest, ChatMessageIn
from lmx_gateway.responses.store import ResponseStore, StoredResponse
from lmx_supervisor.errors import BadRequest
from tests.conftest import LMXServer

pytestmark = pytest.mark.timeout(120)


def _stored(text: str) -> StoredResponse:
    return StoredResponse.of({"id": "r", "output": text},
                             [ChatMessageIn(role="user", content=text)])


def test_response_store_bounded_in_bytes() -> None:
    one = _stored("x" * 1000)
    store = ResponseStore(capacity=100, max_bytes=3 * one.size)
    for i in range(5):
        store.put(f"r{i}", _stored("x" * 1000))
    assert len(store) == 3 and store.bytes <= store.max_bytes
    assert store.get("r0") is None and store.get("r4") is not None
    store.put("huge", _stored("y" * 10_000))  # larger than the whole budget: not kept
    assert store.get("huge") is None and len(store) == 3
    assert store.delete("r4") and store.bytes == 2 * one.size
    store.put("r3", _stored("x" * 1000))  # replacing an entry does not count it twice
    assert store.bytes == 2 * one.size


def _body(field: str, value: str) -> bytes:
    return ('{"model": "m", "messages": [{"role": "user", "content": "a\\"[{"}], "'
            + field + '": ' + value + "}").encode()


@pytest.mark.parametrize(("levels", "expected"), [
    (MAX_JSON_DEPTH - 10, None),
    (MAX_JSON_DEPTH + 10, "tools[0][0][0][0][0]"),
    (5000, "tools[0][0][0][0][0]"),
])
def test_depth_bound_names_the_field(levels: int, expected: str | None) -> None:
    raw = _body("tools", "[" * levels + "]" * levels)
    if expected is None:
        decode_json(raw, ChatCompletionRequest)
        return
    with pytest.raises(BadRequest) as refused:
        decode_json(raw, ChatCompletionRequest)
    assert refused.value.param == expected
    assert refused.value.code == "too_deeply_nested"


def test_depth_scans_agree_and_stop_at_a_schema() -> None:
    schema: Any = {}
    for _ in range(MAX_JSON_DEPTH):
        schema = {"properties": {"a": schema}}
    body = {"tools": [{"type": "function", "function": {"name": "f", "parameters": schema}}]}
    assert too_deep_value(body) == "tools[0].function.parameters"
    assert too_deep_raw(json.dumps(body).encode()) == "tools[0].function.parameters"
    # A string holding brackets and escaped quotes is not structure.
    assert too_deep_raw(json.dumps({"s": "[" * 5000 + '\\"'}).encode()) is None


def _get_healthz(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
        conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        return conn.recv(1024)


def test_connections_capped(start_server: Any) -> None:
    # uvicorn refuses a request when its connection makes `max_connections`
    # (itself included); the test client may hold one keep-alive connection.
    server: LMXServer = start_server(config={"server": {"max_connections": 3}})
    server.wait_healthy()
    assert _get_healthz(server.port).startswith(b"HTTP/1.1 200")
    idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(2)]
    try:
        reply = _get_healthz(server.port)
        assert reply.startswith(b"HTTP/1.1 503"), reply
    finally:
        for sock in idle:
            sock.close()
