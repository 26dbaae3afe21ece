"""API keys (runbook §3.8) against a real server: every route family with no
key, a wrong key and the right key; the OpenAI SDK with its api_key; the
cloud profile's refusal to start without keys; keys never in logs."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from lmx_supervisor.config import ConfigError, load_config
from tests.conftest import MODEL_ID, LMXServer, base_config, running_server

pytestmark = pytest.mark.timeout(90)

ADMIN_KEY = "adm-7f3c9e1d-secret-admin"
API_KEY = "inf-42b8a6c0-secret-inference"
WRONG = "not-the-key-0000"

CHAT = {"model": MODEL_ID, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
COMPLETION = {"model": MODEL_ID, "prompt": "Hello", "max_tokens": 1}


@pytest.fixture(scope="module")
def cloud_server(tmp_path_factory: pytest.TempPathFactory, model_file: Path
                 ) -> Iterator[LMXServer]:
    with running_server(tmp_path_factory, "cloud", links=[model_file],
                        models={"auto_load": [MODEL_ID]},
                        config={"security": {"profile": "cloud", "admin_key": ADMIN_KEY,
                                             "inference_api_key": API_KEY}},
                        headers={"X-Admin-Key": ADMIN_KEY},  # for the fixture's own helpers
                        wait_for=[MODEL_ID]) as server:
        yield server


# (method, path, body, family) for every route family.
ROUTES = [
    ("POST", "/v1/chat/completions", CHAT, "inference"),
    ("POST", "/v1/completions", COMPLETION, "inference"),
    ("GET", "/v1/models", None, "inference"),
    ("GET", "/admin/models", None, "admin"),
    ("GET", "/admin/status", None, "admin"),
    ("GET", "/admin/metrics", None, "admin"),
    ("GET", "/admin/metrics/json", None, "admin"),
    ("GET", "/admin/health", None, "admin"),
    ("GET", "/admin/stack", None, "admin"),
    ("POST", "/admin/models/load", {"model_id": MODEL_ID}, "admin"),
]


def call(server: LMXServer, method: str, path: str, body: Any, headers: dict[str, str]
         ) -> httpx.Response:
    with httpx.Client(base_url=server.url, timeout=60) as client:
        return client.request(method, path, json=body, headers=headers)


def assert_refused(resp: httpx.Response, family: str) -> None:
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "code", "param"}
    if family == "inference":
        assert resp.status_code == 401
        assert error["code"] == "authentication_error"
        assert error["message"] == "Invalid or missing API key"
        assert resp.headers["www-authenticate"] == "Bearer"
    else:
        assert resp.status_code == 403
        assert error["code"] == "permission_denied"
        assert error["message"] == "Invalid or missing admin key"
    for secret in (ADMIN_KEY, API_KEY, WRONG):
        assert secret not in resp.text


@pytest.mark.parametrize(("method", "path", "body", "family"), ROUTES,
                         ids=[f"{m} {p}" for m, p, _, _ in ROUTES])
def test_route_family_keys(cloud_server: LMXServer, method: str, path: str, body: Any,
                           family: str) -> None:
    if family == "inference":
        right = [{"Authorization": f"Bearer {API_KEY}"}, {"X-Api-Key": API_KEY}]
        wrong = [{"Authorization": f"Bearer {WRONG}"}, {"X-Api-Key": WRONG},
                 {"Authorization": f"Bearer {ADMIN_KEY}"}]  # the other family's key
    else:
        right = [{"X-Admin-Key": ADMIN_KEY}, {"Authorization": f"Bearer {ADMIN_KEY}"}]
        wrong = [{"X-Admin-Key": WRONG}, {"Authorization": f"Bearer {WRONG}"},
                 {"X-Admin-Key": API_KEY}, {"Authorization": f"Basic {ADMIN_KEY}"}]
    assert_refused(call(cloud_server, method, path, body, {}), family)
    for headers in wrong:
        assert_refused(call(cloud_server, method, path, body, headers), family)
    for headers in right[:1] if method == "POST" else right:
        resp = call(cloud_server, method, path, body, headers)
        assert resp.status_code == 200, resp.text


def test_ollama_routes_take_the_inference_key(cloud_server: LMXServer) -> None:
    import ollama

    for headers in ({}, {"Authorization": f"Bearer {WRONG}"},
                    {"Authorization": f"Bearer {ADMIN_KEY}"}):
        for method, path in (("GET", "/api/tags"), ("POST", "/api/pull"),
                             ("DELETE", "/api/delete")):
            resp = call(cloud_server, method, path, {"model": "x/y"}, headers)
            assert resp.status_code == 401  # Ollama's shape, nothing else
            assert resp.json() == {"error": "Invalid or missing API key"}
    client = ollama.Client(host=cloud_server.url, headers={"Authorization": f"Bearer {API_KEY}"})
    try:
        assert MODEL_ID in {m.model for m in client.list().models}
    finally:
        client._client.close()


def test_events_stream_needs_the_admin_key(cloud_server: LMXServer) -> None:
    with httpx.Client(base_url=cloud_server.url, timeout=10) as client:
        for headers in ({}, {"X-Admin-Key": WRONG}):
            refused = client.get("/admin/events", headers=headers)
            assert_refused(refused, "admin")
        with client.stream("GET", "/admin/events", headers={"X-Admin-Key": ADMIN_KEY}) as ok:
            assert ok.status_code == 200
            assert ok.headers["content-type"].startswith("text/event-stream")


def test_probes_stay_open(cloud_server: LMXServer) -> None:
    with httpx.Client(base_url=cloud_server.url, timeout=10) as client:
        assert client.get("/healthz").json()["status"] == "ok"
        assert client.get("/readyz").json()["status"] == "ready"
        # Paths outside both families are not guarded (and simply 404).
        assert client.get("/nowhere").status_code == 404


def test_openai_sdk_with_api_key(cloud_server: LMXServer) -> None:
    with openai.OpenAI(base_url=f"{cloud_server.url}/v1", api_key=API_KEY,
                       max_retries=0) as good:
        resp = good.chat.completions.create(model=MODEL_ID, max_tokens=2,
                                            messages=[{"role": "user", "content": "Hi"}])
        assert resp.choices[0].message.content is not None
        assert [m.id for m in good.models.list().data] == [MODEL_ID]
    with openai.OpenAI(base_url=f"{cloud_server.url}/v1", api_key=WRONG,
                       max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError) as info:
            bad.models.list()
        assert info.value.status_code == 401
        assert info.value.code == "authentication_error"


def test_keys_never_logged(cloud_server: LMXServer) -> None:
    # Runs after the tests above sent every key right and wrong many times.
    with httpx.Client(base_url=cloud_server.url, timeout=30) as client:
        client.post("/v1/chat/completions", json=CHAT, headers={"X-Api-Key": API_KEY})
        client.get("/admin/status", headers={"X-Admin-Key": WRONG})
    log = cloud_server.log()
    assert "Completion request model=" in log  # the log did record the requests
    for secret in (ADMIN_KEY, API_KEY, WRONG):
        assert secret not in log


def test_lan_profile_guards_only_what_has_a_key(tmp_path: Path, models_dir: Path) -> None:
    config = base_config(models_dir)
    config["security"] = {"profile": "lan", "admin_key": ADMIN_KEY}
    server = LMXServer(tmp_path, config)
    try:
        server.wait_healthy()
        assert server.http.get("/v1/models").status_code == 200  # no inference key: open
        assert_refused(server.http.get("/admin/status"), "admin")
        ok = server.http.get("/admin/status", headers={"X-Admin-Key": ADMIN_KEY})
        assert ok.status_code == 200
        assert server.http.get("/v1/discovery").status_code == 200  # open whatever the keys
        # A config reload swaps the keys for the very next request.
        config["security"] = {"profile": "lan", "admin_key": "rotated-admin-key",
                              "inference_api_key": API_KEY}
        server.config_path.write_text(yaml.safe_dump(config))
        reload = server.http.post("/admin/config/reload", headers={"X-Admin-Key": ADMIN_KEY})
        assert reload.status_code == 200, reload.text
        assert "security" in reload.json()["updated"]
        for secret in (ADMIN_KEY, API_KEY, "rotated-admin-key"):
            assert secret not in reload.text
        assert_refused(server.http.get("/admin/status", headers={"X-Admin-Key": ADMIN_KEY}),
                       "admin")
        rotated = server.http.get("/admin/status", headers={"X-Admin-Key": "rotated-admin-key"})
        assert rotated.status_code == 200
        assert_refused(server.http.get("/v1/models"), "inference")
        assert server.http.get("/v1/models", headers={"X-Api-Key": API_KEY}).status_code == 200
        assert "rotated-admin-key" not in server.log()
    finally:
        server.stop()


def test_cloud_profile_without_keys_refuses_to_start(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"security:\n  profile: cloud\n  admin_key: {ADMIN_KEY}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("LMX_")}
    env.update(LMX_HOME=str(tmp_path), LMX_MODELS__AUTO_LOAD="[]")
    result = subprocess.run([sys.executable, "-m", "lmx_gateway", "serve", "--config",
                             str(cfg)], env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("lmx: error: security.profile: 'cloud' requires")
    assert ADMIN_KEY not in result.stderr


def test_config_errors_never_quote_a_key(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"security:\n  admin_key: [{ADMIN_KEY}\n")  # a YAML syntax error
    with pytest.raises(ConfigError) as info:
        load_config(str(cfg), {})
    assert "not valid YAML" in str(info.value) and "line 3" in str(info.value)
    assert ADMIN_KEY not in str(info.value)


def test_env_keys_are_taken_verbatim() -> None:
    # Parsed as YAML these would become an int, a list error and None.
    config = load_config(None, {"LMX_SECURITY__ADMIN_KEY": "0123",
                                "LMX_SECURITY__INFERENCE_API_KEY": "[x",
                                "LMX_SECURITY__PROFILE": "cloud"})
    assert config.security.admin_key == "0123"
    assert config.security.inference_api_key == "[x"
    assert load_config(None, {"LMX_SECURITY__ADMIN_KEY": "null"}).security.admin_key == "null"
