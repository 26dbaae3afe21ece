"""The LAN edge against real servers: every route has a scope and none
answers 200 without its key; the Host check (DNS rebinding) over a table of
Host headers; the browser Origin guard and CORS; 415 for non-JSON bodies;
named inference keys as the client identity (metrics, events), removed by a
config reload; HTTPS verified by the openai SDK; the cloud profile's refusal
to serve plain HTTP on the LAN; the OpenAPI document, validated."""

from __future__ import annotations

import json
import os
import re
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil
import pytest
import yaml
from openapi_spec_validator import validate as validate_openapi
from starlette.routing import Route

from lmx_gateway.access.scopes import RouteScope, ScopedRoute, build_routes
from lmx_gateway.app import create_app
from lmx_supervisor.config import Config, ConfigError, load_config
from tests.conftest import MODEL_ID, LMXServer, base_config, wait_until
from tests.event_reader import EventReader

pytestmark = pytest.mark.timeout(120)

ADMIN_KEY = "adm-edge-5d1f0c7a-secret"
API_KEY = "inf-edge-9a3e77b2-secret"
ALICE_KEY = "alice-key-1c9e2f44-secret"
BOB_KEY = "bob-key-7b20d9e1-secret"
SECRETS = (ADMIN_KEY, API_KEY, ALICE_KEY, BOB_KEY)
LISTED_HOST = "lmx.lan.example"
CHAT = {"model": MODEL_ID, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}


def app_routes() -> list[ScopedRoute]:
    routes = create_app(Config()).routes
    assert all(isinstance(r, ScopedRoute) for r in routes), [
        r for r in routes if not isinstance(r, ScopedRoute)]
    return [r for r in routes if isinstance(r, ScopedRoute)]


def machine_ipv4() -> str | None:
    for addrs in psutil.net_if_addrs().values():
        for addr in addrs:
            if addr.family == socket.AF_INET and not addr.address.startswith("127."):
                return str(addr.address)
    return None


@pytest.fixture(scope="module")
def edge_server(tmp_path_factory: pytest.TempPathFactory, model_file: Path
                ) -> Iterator[LMXServer]:
    """Bound to the wildcard address, every kind of key set, the model loaded."""
    root = tmp_path_factory.mktemp("edge")
    models = root / "models"
    models.mkdir()
    (models / model_file.name).symlink_to(model_file)
    config = base_config(models, auto_load=[MODEL_ID])
    config["server"] = {"host": "0.0.0.0", "allowed_hosts": [LISTED_HOST]}
    config["security"] = {"admin_key": ADMIN_KEY, "inference_api_key": API_KEY,
                          "inference_api_keys": {"alice": ALICE_KEY, "bob": BOB_KEY}}
    server = LMXServer(root, config)
    server.http.headers["X-Admin-Key"] = ADMIN_KEY
    server.wait_ready(MODEL_ID)
    yield server
    server.stop()


# --- every route has a scope ---------------------------------------------------------


def test_every_route_declares_a_scope() -> None:
    routes = app_routes()
    assert {r.scope for r in routes} == set(RouteScope)
    # Prefixes are not what decides, but the table must agree with them.
    for route in routes:
        if route.path.startswith("/v1/") and route.scope is not RouteScope.PUBLIC:
            assert route.scope is RouteScope.INFERENCE, route.path
        if route.path.startswith("/admin/") and route.scope is not RouteScope.PUBLIC:
            assert route.scope is RouteScope.ADMIN, route.path
    public = {r.path for r in routes if r.scope is RouteScope.PUBLIC}
    assert public == {"/healthz", "/readyz", "/v1/discovery", "/.well-known/opta-lmx",
                      "/admin/dashboard", "/openapi.json"}
    # A route without a scope cannot be added to the router.
    with pytest.raises(TypeError, match="has no scope"):
        build_routes([Route("/anything", lambda request: None, methods=["GET"])])
    with pytest.raises(TypeError, match="RouteScope"):
        ScopedRoute("admin", "/x", lambda request: None, methods=["GET"])  # type: ignore[arg-type]


def _concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "x", path)


def test_no_route_answers_without_its_key(edge_server: LMXServer) -> None:
    with httpx.Client(base_url=edge_server.url, timeout=60) as bare:
        for route in app_routes():
            path = _concrete(route.path)
            if route.path == "/admin/events":
                with bare.stream("GET", path) as resp:
                    status = resp.status_code
            else:
                status = bare.request(route.method, path, json={}).status_code
            if route.scope is RouteScope.PUBLIC:
                assert status == 200, (route.method, path, status)
            else:
                expected = 401 if route.scope is RouteScope.INFERENCE else 403
                assert status == expected, (route.method, path, status)
        # Unknown paths are 404 with or without keys, under any prefix.
        for keys in ({}, {"X-Admin-Key": ADMIN_KEY, "X-Api-Key": API_KEY}):
            for method, path in (("GET", "/nowhere"), ("GET", "/admin"), ("GET", "/v1"),
                                 ("GET", "/admin/nowhere"), ("POST", "/v1/nowhere"),
                                 ("GET", "/no/where/at/all"), ("DELETE", "/v1/nowhere")):
                resp = bare.request(method, path, headers=keys)
                assert resp.status_code == 404, (method, path, keys, resp.text)
                assert resp.json()["error"]["code"] == "not_found"


# --- Host ------------------------------------------------------------------------------


def raw_get(port: int, path: str, host: str | None) -> tuple[int, bytes]:
    """One request with exactly this Host header (None: no header at all)."""
    lines = [f"GET {path} HTTP/1.1"]
    if host is not None:
        lines.append(f"Host: {host}")
    lines += ["X-Admin-Key: " + ADMIN_KEY, "Connection: close", "", ""]
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall("\r\n".join(lines).encode("latin-1"))
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    status = int(data.split(b" ", 2)[1])
    return status, data.partition(b"\r\n\r\n")[2]


def test_host_header_table(edge_server: LMXServer) -> None:
    port = edge_server.port
    hostname = socket.gethostname().lower()
    rows: list[tuple[str | None, bool]] = [
        ("localhost", True), (f"localhost:{port}", True), ("LOCALHOST:80", True),
        ("127.0.0.1", True), (f"127.0.0.1:{port}", True), ("127.1.2.3", True),
        ("[::1]", True), (f"[::1]:{port}", True), ("app.localhost", True),
        (hostname, True), (f"{hostname}:{port}", True),
        (f"{hostname.split('.')[0]}.local:{port}", True),
        (LISTED_HOST, True), (f"{LISTED_HOST}:{port}", True),
        ("evil.example", False), (f"evil.example:{port}", False),
        ("127.0.0.1.evil.example", False), ("localhost.evil.example", False),
        (f"sub.{LISTED_HOST}", False), ("", False), (None, False),
        ("[::2]", False), ("evil.example:1234:5", False), ("user@localhost", False),
    ]
    address = machine_ipv4()
    if address is not None:
        rows += [(address, True), (f"{address}:{port}", True)]
    failures = []
    for host, accepted in rows:
        status, body = raw_get(port, "/admin/status", host)
        if status != (200 if accepted else 421):
            failures.append((host, status, body[:200]))
        if not accepted and status == 421:
            error = json.loads(body)["error"]
            assert error["code"] == "misdirected_request"
            assert "server.allowed_hosts" in error["message"]
    assert not failures, failures
    # Probes too: nothing runs before the Host check.
    assert raw_get(port, "/healthz", "evil.example")[0] == 421


def test_loopback_bound_server_accepts_only_loopback_names(shared_server: LMXServer) -> None:
    port = shared_server.port
    assert raw_get(port, "/healthz", f"localhost:{port}")[0] == 200
    assert raw_get(port, "/healthz", "evil.example")[0] == 421
    assert raw_get(port, "/healthz", socket.gethostname())[0] == 421
    address = machine_ipv4()
    if address is not None:
        assert raw_get(port, "/healthz", address)[0] == 421


# --- Origin, CORS, content types -----------------------------------------------------------


def loaded(server: LMXServer) -> bool:
    return server.model_state(MODEL_ID) == "ready"


def test_foreign_origin_is_refused_everywhere_but_the_probes(edge_server: LMXServer) -> None:
    evil = {"Origin": "http://evil.example", **edge_server.http.headers}
    keys = {"X-Api-Key": API_KEY}
    with httpx.Client(base_url=edge_server.url, timeout=60) as client:
        # With the right keys and a JSON body: still refused, before the handler.
        resp = client.post("/admin/models/unload", json={"model_id": MODEL_ID}, headers=evil)
        assert resp.status_code == 403
        assert resp.json()["error"]["code"] == "origin_not_allowed"
        assert "access-control-allow-origin" not in resp.headers
        assert client.post("/v1/chat/completions", json=CHAT,
                           headers={**evil, **keys}).status_code == 403
        anthropic = client.post("/v1/messages", headers={**evil, **keys},
                                json={"model": MODEL_ID, "max_tokens": 1,
                                      "messages": [{"role": "user", "content": "Hi"}]})
        assert anthropic.status_code == 403 and anthropic.json()["type"] == "error"
        assert client.get("/admin/status", headers=evil).status_code == 403
        assert client.get("/v1/discovery", headers=evil).status_code == 403
        assert client.get("/healthz", headers=evil).status_code == 200
        assert client.get("/readyz", headers=evil).status_code == 200
        # "null" (sandboxed frames, file:) and lookalikes are foreign too.
        for origin in ("null", f"http://127.0.0.1:{edge_server.port + 1}",
                       f"https://127.0.0.1:{edge_server.port}",
                       f"http://127.0.0.1:{edge_server.port}.evil.example"):
            assert client.get("/admin/status", headers={**evil, "Origin": origin}
                              ).status_code == 403, origin
        # A preflight from it gets no CORS approval.
        pre = client.options("/v1/chat/completions", headers={
            "Origin": "http://evil.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type,authorization"})
        assert pre.status_code == 403
        assert "access-control-allow-origin" not in pre.headers
        # Same origin (the dashboard's own POSTs carry Origin): allowed.
        own = {"Origin": f"http://127.0.0.1:{edge_server.port}", **edge_server.http.headers}
        assert client.get("/admin/status", headers=own).status_code == 200
    assert loaded(edge_server)


JSON_ROUTES = [("/admin/models/unload", {"model_id": MODEL_ID}),
               ("/v1/chat/completions", CHAT),
               ("/v1/completions", {"model": MODEL_ID, "prompt": "Hi", "max_tokens": 1})]
CONTENT_TYPES = [
    ("text/plain", 415), ("text/plain;charset=UTF-8", 415),
    ("application/x-www-form-urlencoded", 415), ("multipart/form-data; boundary=x", 415),
    (None, 415), ("application/xml", 415), ("application/jsonx", 415),
    ("application/json", 200), ("application/json; charset=utf-8", 200),
    ("APPLICATION/JSON", 200),
]


@pytest.mark.parametrize(("content_type", "expected"), CONTENT_TYPES,
                         ids=[str(c) for c, _ in CONTENT_TYPES])
def test_content_type_table(edge_server: LMXServer, content_type: str | None,
                            expected: int) -> None:
    for path, body in JSON_ROUTES:
        if path == "/admin/models/unload" and expected == 200:
            continue  # would unload the model the other tests use
        headers = {"X-Admin-Key": ADMIN_KEY, "X-Api-Key": API_KEY}
        if content_type is not None:
            headers["Content-Type"] = content_type
        with httpx.Client(base_url=edge_server.url, timeout=60) as client:
            resp = client.post(path, content=json.dumps(body).encode(), headers=headers)
        assert resp.status_code == expected, (path, content_type, resp.text)
        if expected == 415:
            error = resp.json()["error"]
            assert error["code"] == "unsupported_media_type"
            assert error["param"] == "Content-Type"
    assert loaded(edge_server)


# --- named keys -------------------------------------------------------------------------------


def test_named_keys_identity_and_reload(start_server: Any) -> None:
    security = {"inference_api_keys": {"alice": ALICE_KEY, "bob": BOB_KEY}}
    server: LMXServer = start_server(config={"security": security}, auto_load=[MODEL_ID])
    server.wait_ready(MODEL_ID)
    events = EventReader(server.url)
    try:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            # The key's name wins over a client-supplied X-Client-ID.
            ok = client.post("/v1/chat/completions", json=CHAT, headers={
                "Authorization": f"Bearer {ALICE_KEY}", "X-Client-ID": "mallory"})
            assert ok.status_code == 200, ok.text
            assert client.post("/v1/completions", headers={"X-Api-Key": BOB_KEY}, json={
                "model": MODEL_ID, "prompt": "Hi", "max_tokens": 1}).status_code == 200
            assert client.post("/v1/chat/completions", json=CHAT).status_code == 401
            completed = wait_until(lambda: len(events.of("request_completed")) >= 2
                                   and events.of("request_completed"), 30)
            # A request refused by auth leaves no event (issue 11: keyless junk
            # must not fill the series); the admitted ones carry the key's name.
            assert sorted(str(e.get("client")) for e in completed) == ["alice", "bob"]
            metrics = client.get("/admin/metrics").text
            assert 'lmx_client_requests_total{client="alice"} 1.0' in metrics
            assert 'lmx_client_requests_total{client="bob"} 1.0' in metrics
            assert "mallory" not in metrics
            # Reload without bob: his key stops working on the very next request.
            config = yaml.safe_load(server.config_path.read_text())
            config["security"] = {"inference_api_keys": {"alice": ALICE_KEY}}
            server.config_path.write_text(yaml.safe_dump(config))
            reload = client.post("/admin/config/reload")
            assert reload.status_code == 200 and "security" in reload.json()["updated"]
            refused = client.post("/v1/chat/completions", json=CHAT,
                                  headers={"X-Api-Key": BOB_KEY})
            assert refused.status_code == 401
            assert client.post("/v1/chat/completions", json=CHAT,
                               headers={"X-Api-Key": ALICE_KEY}).status_code == 200
            # Keys appear nowhere: admin output, events, errors, the log.
            discovery = client.get("/v1/discovery").json()
            assert discovery["auth"]["inference_key_required"] is True  # named keys count
            seen = [reload.text, refused.text, metrics, client.get("/admin/status").text,
                    client.get("/admin/metrics/json").text, str(discovery),
                    repr(events.snapshot())]
    finally:
        events.close()
    log = server.log()
    assert "client=alice" in log and "client=bob" in log
    seen.append(log)
    for text in seen:
        for secret in SECRETS:
            assert secret not in text


def test_named_key_config_errors_never_quote_a_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as same:
        load_config(None, {"LMX_SECURITY__INFERENCE_API_KEYS": f"{{a: {ALICE_KEY}, "
                                                                 f"b: {ALICE_KEY}}}"})
    assert "security.inference_api_keys.b" in str(same.value)
    with pytest.raises(ConfigError) as unparsable:
        load_config(None, {"LMX_SECURITY__INFERENCE_API_KEYS": f"{{a: [{ALICE_KEY}"})
    with pytest.raises(ConfigError) as bad_name:
        load_config(None, {"LMX_SECURITY__INFERENCE_API_KEYS": f"{{'a b': {ALICE_KEY}}}"})
    for info in (same, unparsable, bad_name):
        assert ALICE_KEY not in str(info.value)
    cloud = load_config(None, {"LMX_SECURITY__PROFILE": "cloud",
                               "LMX_SECURITY__ADMIN_KEY": ADMIN_KEY,
                               "LMX_SECURITY__INFERENCE_API_KEYS": f"{{a: {ALICE_KEY}}}"})
    assert cloud.security.inference_api_keys == {"a": ALICE_KEY}


# --- TLS and the cloud profile ------------------------------------------------------------------


def test_https_with_a_certificate_the_sdk_verifies(start_server: Any, tmp_path: Path) -> None:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert_file, key_file, ca_file = (tmp_path / "cert.pem", tmp_path / "key.pem",
                                    tmp_path / "ca.pem")
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    ca.cert_pem.write_to_path(str(ca_file))
    server: LMXServer = start_server(config={"server": {
        "tls_cert_file": str(cert_file), "tls_key_file": str(key_file)}}, auto_load=[MODEL_ID])
    https_url = f"https://127.0.0.1:{server.port}"
    verified = httpx.Client(base_url=https_url, verify=ssl.create_default_context(
        cafile=str(ca_file)), timeout=60)
    server.http.close()
    server.http = verified  # the fixture's helpers (wait_ready) go over HTTPS too
    server.url = https_url
    server.wait_ready(MODEL_ID)
    with openai.OpenAI(base_url=f"{https_url}/v1", api_key="unused", max_retries=0,
                       http_client=httpx.Client(verify=ssl.create_default_context(
                           cafile=str(ca_file)))) as client:
        answer = client.chat.completions.create(model=MODEL_ID, max_tokens=2,
                                                messages=[{"role": "user", "content": "Hi"}])
        assert answer.choices[0].message.content is not None
    # Without the CA the certificate is not trusted; plain HTTP is not served.
    with (openai.OpenAI(base_url=f"{https_url}/v1", api_key="unused", max_retries=0) as naive,
          pytest.raises(openai.APIConnectionError)):
        naive.models.list()
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{server.port}/healthz", timeout=10)
    assert "LMX listening on https://" in server.log()
    # The lmx client commands trust the CA through SSL_CERT_FILE (httpx reads it).
    env = {k: v for k, v in os.environ.items() if not k.startswith("LMX_")}
    cli = subprocess.run([sys.executable, "-m", "lmx_gateway", "status", "--json",
                          "--url", https_url], env={**env, "SSL_CERT_FILE": str(ca_file)},
                         capture_output=True, text=True, timeout=60)
    assert cli.returncode == 0, cli.stderr
    assert MODEL_ID in cli.stdout


def _serve_once(tmp_path: Path, config: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith("LMX_")}
    env.update(LMX_HOME=str(tmp_path), LMX_MODELS__AUTO_LOAD="[]")
    return subprocess.run([sys.executable, "-m", "lmx_gateway", "serve", "--config", str(cfg),
                           "--port", "0"], env=env, capture_output=True, text=True, timeout=30)


def test_cloud_profile_refuses_plaintext_on_the_lan(tmp_path: Path) -> None:
    security = {"profile": "cloud", "admin_key": ADMIN_KEY, "inference_api_key": API_KEY}
    result = _serve_once(tmp_path, {"security": security, "server": {"host": "0.0.0.0"}})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("lmx: error: server.host: the 'cloud' profile serves 0.0.0.0 "
                               "only over HTTPS")
    for secret in SECRETS:
        assert secret not in result.stderr
    # Loopback, TLS, or an explicit opt-out are accepted.
    base = {"LMX_SECURITY__PROFILE": "cloud", "LMX_SECURITY__ADMIN_KEY": ADMIN_KEY,
            "LMX_SECURITY__INFERENCE_API_KEY": API_KEY}
    assert load_config(None, base).server.host == "127.0.0.1"
    assert load_config(None, {**base, "LMX_SERVER__HOST": "0.0.0.0",
                              "LMX_SERVER__ALLOW_PLAINTEXT": "true"}).server.allow_plaintext
    assert load_config(None, {**base, "LMX_SERVER__HOST": "0.0.0.0",
                              "LMX_SERVER__TLS_CERT_FILE": "c.pem",
                              "LMX_SERVER__TLS_KEY_FILE": "k.pem"}).server.tls_cert_file
    with pytest.raises(ConfigError, match="needs both"):
        load_config(None, {"LMX_SERVER__TLS_CERT_FILE": "c.pem"})
    # A certificate that cannot be read is one line too.
    bad = _serve_once(tmp_path, {"server": {"tls_cert_file": str(tmp_path / "none.pem"),
                                            "tls_key_file": str(tmp_path / "none.key")}})
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    assert "server.tls_cert_file: cannot read" in bad.stderr


def test_edge_config_errors_name_the_key() -> None:
    for env, key in ((
            {"LMX_SERVER__ALLOWED_HOSTS": "['a.*.example']"}, "server.allowed_hosts.0"),
            ({"LMX_SERVER__CORS_ORIGINS": "['not an origin']"}, "server.cors_origins.0"),
            ({"LMX_SERVER__CORS_ORIGINS": "['http://x.example/path']"}, "server.cors_origins.0")):
        with pytest.raises(ConfigError, match=re.escape(key)):
            load_config(None, env)


# --- OpenAPI ------------------------------------------------------------------------------------


def test_openapi_document_is_valid_and_complete(edge_server: LMXServer) -> None:
    resp = httpx.get(f"{edge_server.url}/openapi.json", timeout=30)  # public: no key
    assert resp.status_code == 200
    document = resp.json()
    validate_openapi(document)
    assert document["openapi"].startswith("3.1")
    documented = {(method.upper(), path) for path, ops in document["paths"].items()
                  for method in ops}
    served = {(r.method, r.path_format) for r in app_routes()}
    assert documented == served
    ops = document["paths"]
    chat = ops["/v1/chat/completions"]["post"]
    schema_ref = chat["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    assert schema_ref == "#/components/schemas/ChatCompletionRequest"
    assert {"400", "401", "404", "413", "415", "421", "429"} <= set(chat["responses"])
    assert chat["security"] == [{"bearer": []}, {"apiKey": []}]
    assert ops["/admin/models/unload"]["post"]["security"] == [{"adminKey": []}, {"bearer": []}]
    assert ops["/healthz"]["get"]["security"] == []
    messages = ops["/v1/messages"]["post"]["responses"]["400"]["content"]
    assert messages["application/json"]["schema"]["$ref"].endswith("/AnthropicError")
    # The request schemas are msgspec's: a required field is required there too.
    components = document["components"]["schemas"]
    assert "messages" in components["ChatCompletionRequest"]["required"]
    assert components["UnloadRequest"]["required"] == ["model_id"]
    for secret in SECRETS:
        assert secret not in resp.text


def test_integers_beyond_64_bits_are_a_400(edge_server: LMXServer) -> None:
    # Found by the fuzzer: a free-form field (tool call arguments) holding an
    # integer msgpack cannot carry was a 500 on the way to the worker (tool calls
    # in messages are typed now; tool schemas stay free-form).
    body = {**CHAT, "messages": [
        {"role": "user", "content": "Hi"}],
        "tools": [{"type": "function", "function": {
            "name": "f", "parameters": {"type": "object", "default": {"x": 2**70}}}}]}
    resp = edge_server.http.post("/v1/chat/completions", json=body,
                                 headers={"X-Api-Key": API_KEY})
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == "tools.0.function.parameters.default.x"
