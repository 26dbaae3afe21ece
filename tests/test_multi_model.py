"""Several models at once, each routed by `model`; unloading one never
disturbs another's stream."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from tests.conftest import MODEL_ID, LMXServer

pytestmark = pytest.mark.timeout(120)


def test_two_models_routed_and_unload_while_other_streams(start_server: Any) -> None:
    server: LMXServer = start_server(auto_load=[MODEL_ID])
    server.wait_ready(MODEL_ID)
    loaded = server.load(MODEL_ID, served_name="smol-b")
    assert loaded.status_code == 200, loaded.text
    assert loaded.json()["model_id"] == "smol-b"
    rows = server.admin_models()
    assert set(rows) == {MODEL_ID, "smol-b"}
    assert rows[MODEL_ID]["pid"] != rows["smol-b"]["pid"]
    assert {m.id for m in server.openai().models.list().data} == {MODEL_ID, "smol-b"}

    client = server.openai()
    for model in (MODEL_ID, "smol-b"):
        resp = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
        assert resp.model == model

    before = server.admin_models()["smol-b"]["worker_stats"]["requests_finished"]
    streamed: list[str] = []
    finish: list[str | None] = []
    started = threading.Event()

    def consume() -> None:
        stream = server.openai().chat.completions.create(
            model="smol-b", messages=[{"role": "user", "content": "Count to fifty."}],
            max_tokens=120, temperature=0, stream=True,
            extra_body={"ignore_eos": True})
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                streamed.append(chunk.choices[0].delta.content)
                started.set()
            if chunk.choices and chunk.choices[0].finish_reason:
                finish.append(chunk.choices[0].finish_reason)

    thread = threading.Thread(target=consume)
    thread.start()
    assert started.wait(30)
    unload = server.http.post("/admin/models/unload", json={"model_id": MODEL_ID})
    assert unload.status_code == 200 and unload.json()["success"] is True
    thread.join(60)
    assert finish == ["length"]
    assert len(streamed) >= 100  # every token arrived (a few may carry no text)
    after = server.admin_models()
    assert set(after) == {"smol-b"}
    assert after["smol-b"]["worker_stats"]["requests_finished"] == before + 1

    gone = server.http.post("/v1/chat/completions",
                            json={"model": MODEL_ID, "messages": [{"role": "user",
                                                                   "content": "x"}]})
    assert gone.status_code == 404
    assert gone.json()["error"]["code"] == "model-not-found"
