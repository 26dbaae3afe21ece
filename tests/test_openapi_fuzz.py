"""Schemathesis over every operation of `GET /openapi.json`, against real
servers with the bundled model loaded and every kind of key set: no 5xx, no
status, content type or body the document does not declare, invalid input
refused with a 4xx, no hang (each request has a deadline).

Bounded: a fixed number of examples per operation, derandomized (the same
cases every run). Operations that destroy state (unload, delete, load,
download, config reload) run against a throwaway server of their own; the
event stream (`/admin/events`, endless by design) is not fuzzed (its auth is
covered in test_lan_edge and test_security). A summary of what was sent is
written to the log at the end of the module (`-s` shows it)."""

from __future__ import annotations

import collections
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import MODEL_ID, LMXServer, base_config
from tests.fake_hub import FakeHub

schemathesis = pytest.importorskip("schemathesis")
hypothesis = pytest.importorskip("hypothesis")

ADMIN_KEY = "fuzz-admin-key-0b7f"
API_KEY = "fuzz-api-key-51ce"
KEYS = {"X-Admin-Key": ADMIN_KEY, "X-Api-Key": API_KEY}
EXAMPLES_PER_OPERATION = 8
REQUEST_TIMEOUT_SEC = 90
# The operations that change what the server holds, fuzzed on a throwaway server.
DESTRUCTIVE = {
    "post_admin_models_unload", "post_admin_models_load", "delete_admin_models_model_id",
    "post_admin_models_download", "delete_admin_models_download_download_id",
    "post_admin_config_reload", "post_admin_presets_reload",
}
ENDLESS = {"get_admin_events"}
# A positive case aimed at the loaded model generates only a few tokens.
_SHORT: dict[str, dict[str, Any]] = {
    "post_v1_chat_completions": {"max_tokens": 4}, "post_v1_completions": {"max_tokens": 4},
    "post_v1_messages": {"max_tokens": 4}, "post_v1_responses": {"max_output_tokens": 16},
    "post_admin_benchmark": {"max_tokens": 2, "runs": 1},
    # An autotune job measures in throwaway workers in the background until
    # its budget (up to 6 h) is spent; uncapped, one ran beside the rest of
    # the module and slowed the model until generations hit the 90 s deadline.
    "post_admin_models_autotune": {"budget_sec": 2, "max_tokens": 2, "runs": 1},
    # Ollama's endpoints take the limit inside `options`; without one a
    # request generates until the context is full.
    "post_api_generate": {"options": {"num_predict": 4}},
    "post_api_chat": {"options": {"num_predict": 4}},
}
# Not applied: the server refuses some schema-valid requests for reasons the
# schema cannot say (a model without the capability asked for, a tool_choice
# naming no tool, a repo id the hub would not take); those are 400s the
# document declares, not contradictions of it.
EXCLUDED_CHECKS = ("positive_data_acceptance",)

SENT: collections.Counter[str] = collections.Counter()
STATUSES: collections.Counter[int] = collections.Counter()


def _start(tmp_path_factory: pytest.TempPathFactory, model_file: Path, hub: FakeHub,
           name: str) -> LMXServer:
    root = tmp_path_factory.mktemp(name)
    models = root / "models"
    models.mkdir()
    (models / model_file.name).symlink_to(model_file)
    config = base_config(models, auto_load=[MODEL_ID])
    config["security"] = {"admin_key": ADMIN_KEY, "inference_api_key": API_KEY,
                          "inference_api_keys": {"fuzzer": "fuzz-named-key-93aa"}}
    env = {"HF_ENDPOINT": hub.url, "HF_HUB_CACHE": str(root / "hf-cache"),
           "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_OFFLINE": "0"}
    server = LMXServer(root, config, env=env)
    server.http.headers.update(KEYS)
    server.wait_ready(MODEL_ID)
    return server


@pytest.fixture(scope="module")
def hub() -> Iterator[FakeHub]:
    server = FakeHub().start()  # no repos: every download is a 404 from the "hub"
    yield server
    server.stop()


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory, model_file: Path,
                hub: FakeHub) -> Iterator[LMXServer]:
    started = time.monotonic()
    server = _start(tmp_path_factory, model_file, hub, "fuzz")
    yield server
    print(f"\nfuzz summary: {sum(SENT.values())} requests over {len(SENT)} operations in "
          f"{time.monotonic() - started:.0f}s; statuses {dict(sorted(STATUSES.items()))}",
          file=sys.stderr)
    assert "Traceback" not in server.log(), server.log()[-3000:]
    server.stop()


@pytest.fixture(scope="module")
def throwaway_server(tmp_path_factory: pytest.TempPathFactory, model_file: Path,
                     hub: FakeHub) -> Iterator[LMXServer]:
    server = _start(tmp_path_factory, model_file, hub, "fuzz-throwaway")
    yield server
    assert "Traceback" not in server.log(), server.log()[-3000:]
    server.stop()


@pytest.fixture(scope="module")
def schemas(fuzz_server: LMXServer, throwaway_server: LMXServer) -> dict[str, Any]:
    """operationId -> (schemathesis operation, the URL of the server it is fuzzed on)."""
    found: dict[str, Any] = {}
    for server, wanted in ((fuzz_server, False), (throwaway_server, True)):
        document = server.http.get("/openapi.json").json()
        schema = schemathesis.openapi.from_dict(document)
        for result in schema.get_all_operations():
            operation = result.ok()
            op_id = operation.definition.raw["operationId"]
            if (op_id in DESTRUCTIVE) == wanted:
                found[op_id] = (operation, server.url)
    return found


def _aim_at_the_model(case: Any, op_id: str) -> None:
    """Every other positive case that names a model names the loaded one
    (random names only ever reach the 404 path), with a short generation."""
    body = case.body
    if not isinstance(body, dict):
        return
    key = "model" if "model" in body else "model_id" if "model_id" in body else None
    if key is None or not isinstance(body[key], str):
        return
    SENT["_aimed_seen"] += 1
    if SENT["_aimed_seen"] % 2:
        body[key] = MODEL_ID
        body.pop("max_completion_tokens", None)
        for name, value in _SHORT.get(op_id, {}).items():
            inner = body.get(name)
            # A nested limit joins what the case already had there.
            body[name] = ({**inner, **value} if isinstance(value, dict)
                          and isinstance(inner, dict) else value)


SETTINGS = hypothesis.settings(
    max_examples=EXAMPLES_PER_OPERATION, deadline=None, derandomize=True, database=None,
    suppress_health_check=list(hypothesis.HealthCheck), print_blob=False)


def _operation_ids() -> list[str]:
    from lmx_gateway.app import create_app
    from lmx_supervisor.config import Config

    return sorted(f"{r.method.lower()}_" + "_".join(re.findall(r"[A-Za-z0-9]+", r.path_format))
                  for r in create_app(Config()).routes if hasattr(r, "method"))


MODES = ("positive", "negative")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("op_id", [o for o in _operation_ids() if o not in ENDLESS])
def test_fuzz_operation(schemas: dict[str, Any], op_id: str, mode: str) -> None:
    operation, base_url = schemas[op_id]
    if mode == "negative" and not operation.definition.raw.get("parameters") \
            and "requestBody" not in operation.definition.raw:
        pytest.skip("nothing to make invalid: no parameters, no body")
    generation_mode = schemathesis.GenerationMode(mode)
    scope = operation.definition.raw["tags"][0]
    key = {"admin": ADMIN_KEY, "inference": API_KEY}.get(scope)
    # The scope's key in both of its headers, so no credential is left for
    # schemathesis to make up (it then checks that made-up ones are refused).
    headers = {**KEYS, "Authorization": f"Bearer {key}"} if key else {}
    excluded = [getattr(schemathesis.checks, name, None) for name in EXCLUDED_CHECKS]

    @hypothesis.given(case=operation.as_strategy(generation_mode=generation_mode))
    @SETTINGS
    def run(case: Any) -> None:
        if mode == "positive" and op_id not in DESTRUCTIVE:
            _aim_at_the_model(case, op_id)
        response = case.call(base_url=base_url, headers=headers, timeout=REQUEST_TIMEOUT_SEC)
        SENT[f"{op_id} {mode}"] += 1
        STATUSES[response.status_code] += 1
        case.validate_response(response, excluded_checks=[c for c in excluded if c])

    run()
