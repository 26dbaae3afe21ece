"""The memory guard with real workers: admission against a budget sized
from the model's real estimate, LRU eviction that never touches a busy
model, 507 when eviction is off, load shedding, and TTL unloading."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import openai
import pytest

from tests.conftest import MODEL_ID, LMXServer, wait_until
from tests.lifecycle_support import LIGHT, Streamer, model_estimate

pytestmark = pytest.mark.timeout(120)

SLOW = {"LMX_FAILPOINTS": "busy=slow_tokens:50"}


def budget(model_file: Path, models: float, **extra: Any) -> dict[str, Any]:
    """A memory budget that holds `models` copies of the test model."""
    return {"memory": {"budget_bytes": int(model_estimate(model_file) * models),
                       "max_memory_percent": 100, "load_shedding_percent": 100, **extra}}


def test_second_load_evicts_idle_lru_never_busy(start_server: Any, model_file: Path) -> None:
    server: LMXServer = start_server(env=SLOW, **LIGHT,
                                     config=budget(model_file, 2.5))
    server.wait_healthy()
    assert server.load(MODEL_ID, served_name="busy").status_code == 200
    stream = Streamer(server.url, "busy")
    try:
        stream.wait_first_token()
        # "busy" is now the least recently used model, but it is streaming.
        assert server.load(MODEL_ID, served_name="idle").status_code == 200
        third = server.load(MODEL_ID, served_name="third")
        assert third.status_code == 200, third.text
        models = server.admin_models()
        assert set(models) == {"busy", "third"}
        assert models["busy"]["state"] == "ready" and models["busy"]["in_flight"] == 1
        before = stream.chunks
        wait_until(lambda: stream.chunks > before, 30, what="busy keeps streaming")
        assert stream.error is None and not stream.done.is_set()
        memory = server.http.get("/admin/memory").json()
        assert set(memory["models"]) == {"busy", "third"}
        assert memory["budget_used_gb"] <= memory["budget_gb"]
        assert "evicting model idle (lru: room for third)" in server.log()
    finally:
        stream.close()


def test_second_load_without_eviction_is_507(start_server: Any, model_file: Path) -> None:
    server: LMXServer = start_server(
        **LIGHT, config=budget(model_file, 1.5, auto_evict_lru=False))
    server.wait_healthy()
    assert server.load(MODEL_ID, served_name="first").status_code == 200
    refused = server.load(MODEL_ID, served_name="second")
    assert refused.status_code == 507, refused.text
    error = refused.json()["error"]
    assert error["code"] == "insufficient_memory"
    assert "auto_evict_lru is off" in error["message"]
    assert set(server.admin_models()) == {"first"}
    assert server.model_state("first") == "ready"


def test_system_memory_threshold_refuses_load(start_server: Any) -> None:
    # 1 % of RAM is less than this machine already uses: nothing may load,
    # and with nothing loaded there is nothing to evict.
    server: LMXServer = start_server(
        config={"memory": {"max_memory_percent": 1, "load_shedding_percent": 100}})
    server.wait_healthy()
    refused = server.load(MODEL_ID)
    assert refused.status_code == 507, refused.text
    assert refused.json()["error"]["code"] == "insufficient_memory"
    assert "max_memory_percent=1%" in refused.json()["error"]["message"]
    memory = server.http.get("/admin/memory").json()
    assert memory["threshold_percent"] == 1
    assert memory["used_gb"] + memory["available_gb"] == pytest.approx(
        memory["total_unified_memory_gb"], abs=0.01)


def test_load_shedding_spares_health_probes(start_server: Any, model_file: Path) -> None:
    # Shedding starts at 1 % used: always, here. The budget lets the model
    # load at startup (auto_load does not go through HTTP).
    server: LMXServer = start_server(
        auto_load=[MODEL_ID], **LIGHT,
        config={"memory": {"budget_bytes": model_estimate(model_file) * 200,
                           "max_memory_percent": 1, "load_shedding_percent": 1}})
    server.wait_ready()  # /readyz is exempt
    for method, path in [("GET", "/v1/models"), ("POST", "/v1/chat/completions"),
                         ("GET", "/admin/memory"), ("POST", "/admin/models/load")]:
        resp = server.http.request(method, path, json={"model": MODEL_ID})
        assert resp.status_code == 503, (path, resp.text)
        assert resp.headers["retry-after"] == "30"
        assert resp.json()["error"] == {"message": "Server under memory pressure",
                                        "type": "server_error", "code": "overloaded",
                                        "param": None}
    with pytest.raises(openai.InternalServerError) as caught:
        server.openai().chat.completions.create(
            model=MODEL_ID, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    assert caught.value.status_code == 503
    assert caught.value.response.headers["retry-after"] == "30"
    assert server.http.get("/healthz").status_code == 200
    ready = server.http.get("/readyz")
    assert ready.status_code == 200 and ready.json()["models_loaded"] == 1
    assert server.http.get("/admin/health").status_code != 503


def test_ttl_unloads_idle_model_not_busy_one(start_server: Any) -> None:
    server: LMXServer = start_server(
        env=SLOW, **LIGHT,
        config={"memory": {"ttl_enabled": True, "ttl_seconds": 3}})
    server.wait_healthy()
    assert server.load(MODEL_ID, served_name="busy").status_code == 200
    stream = Streamer(server.url, "busy")
    try:
        stream.wait_first_token()
        assert server.load(MODEL_ID, served_name="idle").status_code == 200
        wait_until(lambda: "idle" not in server.admin_models(), 30, what="TTL unloads idle")
        # Well past its TTL since it loaded, but streaming: still there.
        assert server.model_state("busy") == "ready"
        before = stream.chunks
        wait_until(lambda: stream.chunks > before, 30, what="busy keeps streaming")
        assert stream.error is None and not stream.done.is_set()
    finally:
        stream.close()
    wait_until(lambda: "busy" not in server.admin_models(), 30,
               what="TTL unloads busy once idle")
    assert "evicting model busy (ttl: idle for more than 3s)" in server.log()
