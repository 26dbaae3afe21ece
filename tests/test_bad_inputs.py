"""Bad input gets the exact 4xx and code, in OpenAI's error shape, and the
server stays healthy."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.conftest import MODEL_ID, LMXServer

pytestmark = pytest.mark.timeout(120)

MSG = [{"role": "user", "content": "hi"}]

# (description, path, body (dict, or raw bytes), status, code, param)
CASES: list[tuple[str, str, Any, int, str, str | None]] = [
    ("malformed json", "/v1/chat/completions", b"{not json", 400, "invalid_json", None),
    ("empty body", "/v1/chat/completions", b"", 400, "invalid_json", None),
    ("missing model", "/v1/chat/completions", {"messages": MSG}, 400,
     "missing_required_parameter", "model"),
    ("missing messages", "/v1/chat/completions", {"model": MODEL_ID}, 400,
     "missing_required_parameter", "messages"),
    ("empty messages", "/v1/chat/completions", {"model": MODEL_ID, "messages": []}, 400,
     "invalid_value", "messages"),
    ("bad role", "/v1/chat/completions",
     {"model": MODEL_ID, "messages": [{"role": "wizard", "content": "x"}]}, 400,
     "invalid_value", "messages[0].role"),
    ("temperature wrong type", "/v1/chat/completions",
     {"model": MODEL_ID, "messages": MSG, "temperature": "hot"}, 400, "invalid_type",
     "temperature"),
    ("negative temperature", "/v1/chat/completions",
     {"model": MODEL_ID, "messages": MSG, "temperature": -0.5}, 400, "invalid_value",
     "temperature"),
    ("max_tokens zero", "/v1/chat/completions",
     {"model": MODEL_ID, "messages": MSG, "max_tokens": 0}, 400, "invalid_value",
     "max_tokens"),
    ("top_p above one", "/v1/chat/completions",
     {"model": MODEL_ID, "messages": MSG, "top_p": 1.5}, 400, "invalid_value", "top_p"),
    ("n above models.max_n", "/v1/chat/completions",
     {"model": MODEL_ID, "messages": MSG, "n": 9}, 400, "invalid_value", "n"),
    ("logit_bias out of range", "/v1/chat/completions",
     {"model": MODEL_ID, "messages": MSG, "logit_bias": {"5": -101}}, 400, "invalid_value",
     "logit_bias"),
    ("stop wrong type", "/v1/chat/completions",
     {"model": MODEL_ID, "messages": MSG, "stop": 5}, 400, "invalid_type", "stop"),
    ("unknown model", "/v1/chat/completions", {"model": "nope", "messages": MSG}, 404,
     "model-not-found", "model"),
    ("completions missing prompt", "/v1/completions", {"model": MODEL_ID}, 400,
     "missing_required_parameter", "prompt"),
    ("completions unknown model", "/v1/completions", {"model": "nope", "prompt": "x"}, 404,
     "model-not-found", "model"),
    ("load missing model_id", "/admin/models/load", {}, 400, "missing_required_parameter",
     "model_id"),
    ("load unknown file", "/admin/models/load", {"model_id": "no-such-model"}, 404,
     "model-not-found", "model_id"),
    ("load unknown backend", "/admin/models/load",
     {"model_id": MODEL_ID, "backend": "tensorrt"}, 400, "invalid_value", "backend"),
    ("unload unknown model", "/admin/models/unload", {"model_id": "nope"}, 404,
     "model-not-found", "model"),
    ("prompt longer than context", "/v1/completions",
     {"model": MODEL_ID, "prompt": "word " * 3000}, 400, "context_length_exceeded", None),
]


@pytest.mark.parametrize(("path", "body", "status", "code", "param"),
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(shared_server: LMXServer, path: str, body: Any, status: int, code: str,
                   param: str | None) -> None:
    if isinstance(body, bytes):
        resp = shared_server.http.post(path, content=body,
                                       headers={"content-type": "application/json"})
    else:
        resp = shared_server.http.post(path, json=body)
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "code", "param"}
    assert error["code"] == code
    assert error["param"] == param
    assert error["message"]
    assert shared_server.http.get("/healthz").status_code == 200


def test_body_over_limit_is_413(start_server: Any) -> None:
    server: LMXServer = start_server(config={"server": {"max_request_body_bytes": 1000}})
    server.wait_healthy()
    resp = server.http.post("/v1/chat/completions", json={
        "model": "x", "messages": [{"role": "user", "content": "a" * 5000}]})
    assert resp.status_code == 413
    assert resp.json()["error"]["code"] == "request_too_large"


def test_nothing_loaded_is_503(start_server: Any) -> None:
    server: LMXServer = start_server()
    server.wait_healthy()
    assert server.http.get("/readyz").status_code == 503
    resp = server.http.post("/v1/chat/completions", json={"model": MODEL_ID, "messages": MSG})
    assert resp.status_code == 503
    assert resp.json()["error"]["code"] == "no-model-loaded"


def test_queue_timeout_is_429_and_inference_timeout_is_504(start_server: Any) -> None:
    server: LMXServer = start_server(
        auto_load=[MODEL_ID], max_concurrent_requests=1, semaphore_timeout_sec=0.5,
        inference_timeout_sec=3, env={"LMX_FAILPOINTS": f"{MODEL_ID}=slow_tokens:100"})
    server.wait_ready(MODEL_ID)
    body = {"model": MODEL_ID, "messages": MSG, "max_tokens": 200, "ignore_eos": True}
    with httpx.Client(base_url=server.url, timeout=30) as first, \
            first.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as long:
        assert long.status_code == 200
        busy = server.http.post("/v1/chat/completions", json=body)
        assert busy.status_code == 429
        assert busy.json()["error"]["code"] == "rate_limit_exceeded"
        assert busy.headers["retry-after"]
        lines = [line for line in long.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    assert '"lmx-timeout"' in lines[-2]
    timed_out = server.http.post("/v1/chat/completions", json=body)
    assert timed_out.status_code == 504
    assert timed_out.json()["error"]["code"] == "lmx-timeout"
    assert server.http.get("/healthz").status_code == 200
