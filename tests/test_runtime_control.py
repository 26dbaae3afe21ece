"""Runtime control against one real server (keys on, lan profile): config
hot reload (aliases, logging level, keys, presets; a bad file is refused
and changes nothing), alias routing to the first ready model, presets,
quarantine lifted by a config change, the benchmark, open discovery."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.conftest import MODEL_ID, LMXServer, base_config, running_server, wait_until

pytestmark = pytest.mark.timeout(180)

ADMIN_KEY = "adm-secret-6f1c"
API_KEY = "inf-secret-93ab"
CRASHY = "crashy"  # a served name whose worker always fails to load (failpoint)
PIRATE_PROMPT = (
    "You are a pirate captain of the seven seas. Answer every question as a pirate "
    "would, with nautical slang, many arrs and ahoys, tales of buried treasure, the "
    "sea, the wind, the crew and the ship, and never break character for any reason.")


def _config(models_dir: Path, **routing: Any) -> dict[str, Any]:
    cfg = base_config(models_dir, auto_load=[MODEL_ID], crash_loop_max_crashes=1)
    cfg["security"] = {"profile": "lan", "admin_key": ADMIN_KEY, "inference_api_key": API_KEY}
    cfg["routing"] = {"aliases": {"code": ["ghost", "smol-b", MODEL_ID]}, **routing}
    return cfg


def _write_preset(home: Path, name: str, body: dict[str, Any] | str) -> None:
    text = body if isinstance(body, str) else yaml.safe_dump(body)
    (home / "presets" / f"{name}.yaml").write_text(text)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, model_file: Path) -> Iterator[LMXServer]:
    def presets(home: Path) -> None:  # read at startup: written before the server starts
        (home / "presets").mkdir()
        _write_preset(home, "terse", {"model": MODEL_ID, "max_tokens": 3})
        _write_preset(home, "pirate", {"model": "code", "system_prompt": PIRATE_PROMPT,
                                       "description": "arr"})
        _write_preset(home, "broken", {"model": MODEL_ID, "temperature": 9})

    with running_server(tmp_path_factory, "control", links=[model_file], config=_config,
                        env={"LMX_FAILPOINTS": f"{CRASHY}=crash_on_load"}, prepare=presets,
                        headers={"X-Admin-Key": ADMIN_KEY, "Authorization": f"Bearer {API_KEY}"},
                        wait_for=[MODEL_ID]) as srv:
        yield srv


def reload_with(server: LMXServer, cfg: dict[str, Any] | str) -> httpx.Response:
    text = cfg if isinstance(cfg, str) else yaml.safe_dump(cfg)
    server.config_path.write_text(text)
    return server.http.post("/admin/config/reload")


def base(server: LMXServer, **routing: Any) -> dict[str, Any]:
    """The module's config (models live in the server's home), routing varied."""
    return _config(server.home / "models", **routing)


def chat(server: LMXServer, model: str, content: str = "Hi", **extra: Any) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": content}],
            "max_tokens": 2, **extra}
    return server.http.post("/v1/chat/completions", json=body, timeout=60)


def served_by(server: LMXServer, model: str) -> str:
    resp = chat(server, model)
    assert resp.status_code == 200, resp.text
    return str(resp.json()["model"])


def test_discovery_is_open_and_names_no_key(server: LMXServer) -> None:
    with httpx.Client(base_url=server.url, timeout=10) as anonymous:
        assert anonymous.get("/admin/presets").status_code == 403  # auth is on...
        for path in ("/v1/discovery", "/.well-known/opta-lmx"):
            resp = anonymous.get(path)  # ...and discovery stays open
            assert resp.status_code == 200, resp.text
            body = resp.json()
            assert body["base_url"] == server.url
            assert body["openai_base_url"] == f"{server.url}/v1"
            assert body["auth"]["admin_key_required"] is True
            assert body["auth"]["inference_key_required"] is True
            assert body["version"]
            assert body["endpoints"]["chat_completions"] == "/v1/chat/completions"
            assert ADMIN_KEY not in resp.text and API_KEY not in resp.text


def test_alias_routes_to_first_ready_model_and_follows_reload(server: LMXServer) -> None:
    loaded = server.load(MODEL_ID, served_name="smol-b")
    assert loaded.status_code == 200, loaded.text
    try:
        # code: [ghost, smol-b, MODEL_ID]: ghost is not loaded, smol-b is ready.
        assert served_by(server, "code") == "smol-b"
        stream = server.http.post("/v1/chat/completions", json={
            "model": "code", "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 2, "stream": True})
        assert stream.status_code == 200 and '"model":"smol-b"' in stream.text

        resp = reload_with(server, base(server, aliases={"code": [MODEL_ID, "smol-b"],
                                                         "lost": ["ghost"]},
                                        default_model="code"))
        assert resp.status_code == 200, resp.text
        assert resp.json()["success"] is True and resp.json()["updated"] == ["routing"]
        assert served_by(server, "code") == MODEL_ID
        assert served_by(server, "default") == MODEL_ID
        lost = chat(server, "lost")
        assert lost.status_code == 404 and lost.json()["error"]["code"] == "model-not-found"
        assert "ghost" in lost.json()["error"]["message"]
    finally:
        unload = server.http.post("/admin/models/unload", json={"model_id": "smol-b"})
        assert unload.status_code == 200, unload.text
    resp = reload_with(server, base(server))  # code: [ghost, smol-b, MODEL_ID] again
    assert resp.status_code == 200 and resp.json()["updated"] == ["routing"]
    assert served_by(server, "code") == MODEL_ID  # smol-b is gone: next in the list
    unknown = chat(server, "default")  # no default_model any more: just an unknown name
    assert unknown.status_code == 404


def test_bad_config_is_refused_and_old_config_kept(server: LMXServer) -> None:
    good = base(server, aliases={"code": [MODEL_ID]})
    assert reload_with(server, good).status_code == 200
    bad_value = copy.deepcopy(good)
    bad_value["memory"] = {"max_memory_percent": "lots"}
    resp = reload_with(server, bad_value)
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert err["param"] == "memory.max_memory_percent" and err["code"] == "invalid_config"
    assert "memory.max_memory_percent" in err["message"]

    typo = copy.deepcopy(good)
    typo["routing"] = {"aliasez": {"code": ["ghost"]}}
    resp = reload_with(server, typo)
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "routing.aliasez"
    resp = reload_with(server, "routing: [unclosed\n")
    assert resp.status_code == 400 and "YAML" in resp.json()["error"]["message"]
    cloud = copy.deepcopy(good)
    cloud["security"] = {"profile": "cloud", "admin_key": ADMIN_KEY}
    resp = reload_with(server, cloud)
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "security.profile"

    # Nothing of the refused files was applied: the alias and the keys still work.
    assert served_by(server, "code") == MODEL_ID
    # The same good file again: no section differs from what is running.
    resp = reload_with(server, good)
    assert resp.status_code == 200 and resp.json()["updated"] == []


def test_reload_changes_logging_level_and_keys_live(server: LMXServer) -> None:
    def reload_lines() -> int:
        return server.log().count("config reloaded from")

    before = reload_lines()
    quiet = base(server)
    quiet["logging"] = {"level": "WARNING", "format": "text"}
    resp = reload_with(server, quiet)
    assert resp.status_code == 200 and "logging" in resp.json()["updated"]
    loud = base(server)
    resp = reload_with(server, loud)
    assert resp.status_code == 200 and resp.json()["updated"] == ["logging"]
    # The INFO line of the reload that set WARNING was not written; this one is.
    wait_until(lambda: reload_lines() == before + 1, 10, what="INFO line after reload")
    assert reload_lines() == before + 1

    rotated = base(server)
    rotated["security"]["admin_key"] = "adm-rotated"
    resp = reload_with(server, rotated)
    assert resp.status_code == 200 and resp.json()["updated"] == ["security"]
    assert ADMIN_KEY not in resp.text and "adm-rotated" not in resp.text
    assert server.http.get("/admin/presets").status_code == 403  # the old key is refused
    server.http.headers["X-Admin-Key"] = "adm-rotated"
    try:
        assert server.http.get("/admin/presets").status_code == 200
        resp = reload_with(server, base(server))
        assert resp.status_code == 200 and resp.json()["updated"] == ["security"]
    finally:
        server.http.headers["X-Admin-Key"] = ADMIN_KEY
    assert server.http.get("/admin/presets").status_code == 200


def test_presets_apply_defaults_and_system_prompt(server: LMXServer) -> None:
    listing = server.http.get("/admin/presets").json()
    assert {p["name"] for p in listing["presets"]} == {"terse", "pirate"}
    assert [e["file"] for e in listing["errors"]] == ["broken.yaml"]
    assert "temperature" in listing["errors"][0]["error"]

    terse = chat(server, "preset:terse", max_tokens=None, ignore_eos=True)
    assert terse.status_code == 200, terse.text
    assert terse.json()["model"] == MODEL_ID
    assert terse.json()["usage"]["completion_tokens"] == 3  # the preset's max_tokens
    explicit = chat(server, "preset:terse", max_tokens=2, ignore_eos=True).json()
    assert explicit["usage"]["completion_tokens"] == 2  # the request's own value wins
    legacy = server.http.post("/v1/completions", json={
        "model": "preset:terse", "prompt": "Once upon a time", "ignore_eos": True})
    assert legacy.status_code == 200 and legacy.json()["usage"]["completion_tokens"] == 3

    plain = chat(server, MODEL_ID, "Where is the gold?").json()["usage"]["prompt_tokens"]
    pirate = chat(server, "preset:pirate", "Where is the gold?").json()
    assert pirate["model"] == MODEL_ID  # via the alias `code`
    assert pirate["usage"]["prompt_tokens"] > plain + 25  # the system prompt was added
    own_system = [{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": "Where is the gold?"}]
    mine = [server.http.post("/v1/chat/completions", json={
        "model": model, "messages": own_system, "max_tokens": 2}).json()
        for model in (MODEL_ID, "preset:pirate")]
    # A conversation with its own system prompt keeps it alone.
    assert mine[0]["usage"]["prompt_tokens"] == mine[1]["usage"]["prompt_tokens"]

    missing = chat(server, "preset:nope")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "model-not-found"


def test_presets_reload_and_config_reload_pick_up_changes(server: LMXServer) -> None:
    _write_preset(server.home, "terse", {"model": MODEL_ID, "max_tokens": 5})
    resp = server.http.post("/admin/presets/reload")
    assert resp.status_code == 200, resp.text
    assert resp.json()["success"] is True and resp.json()["presets_loaded"] == 2
    got = chat(server, "preset:terse", max_tokens=None, ignore_eos=True).json()
    assert got["usage"]["completion_tokens"] == 5

    _write_preset(server.home, "terse", {"model": MODEL_ID, "max_tokens": 4})
    resp = reload_with(server, base(server))
    assert resp.status_code == 200 and "presets" in resp.json()["updated"]
    got = chat(server, "preset:terse", max_tokens=None, ignore_eos=True).json()
    assert got["usage"]["completion_tokens"] == 4

    _write_preset(server.home, "terse", "model: [unclosed\n")  # now broken: skipped, not fatal
    resp = server.http.post("/admin/presets/reload")
    assert resp.status_code == 200 and resp.json()["presets_loaded"] == 1
    assert {e["file"] for e in resp.json()["errors"]} == {"terse.yaml", "broken.yaml"}
    assert chat(server, "preset:terse").status_code == 404
    assert server.http.get("/healthz").status_code == 200


def test_config_change_lifts_quarantine(server: LMXServer) -> None:
    first = server.load(MODEL_ID, served_name=CRASHY)
    assert first.status_code == 409 and first.json()["error"]["code"] == "model_loader_crashed"
    assert server.model_state(CRASHY) == "quarantined"  # crash_loop_max_crashes: 1
    again = server.load(MODEL_ID, served_name=CRASHY)
    assert again.status_code == 409 and again.json()["error"]["code"] == "model_unstable"

    unrelated = base(server)
    unrelated["memory"] = {"max_memory_percent": 89}
    resp = reload_with(server, unrelated)
    assert resp.status_code == 200 and resp.json()["quarantine_lifted"] == []
    assert server.load(MODEL_ID, served_name=CRASHY).json()["error"]["code"] == "model_unstable"

    changed = base(server)
    changed["models"]["crash_loop_max_crashes"] = 2
    resp = reload_with(server, changed)
    assert resp.status_code == 200, resp.text
    assert resp.json()["quarantine_lifted"] == [CRASHY] and "models" in resp.json()["updated"]
    # The load is attempted again (and fails for its own reason, not quarantine).
    retry = server.load(MODEL_ID, served_name=CRASHY)
    assert retry.status_code == 409 and retry.json()["error"]["code"] == "model_loader_crashed"
    assert served_by(server, MODEL_ID) == MODEL_ID  # the healthy model never noticed


def test_benchmark_reports_numbers(server: LMXServer) -> None:
    resp = server.http.post("/admin/benchmark", json={
        "model_id": MODEL_ID, "prompt": "Count to ten.", "max_tokens": 4, "runs": 2,
        "temperature": 0, "ignore_eos": True}, timeout=120)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["model_id"] == MODEL_ID and body["runs"] == 2
    assert len(body["results"]) == 2
    for run in body["results"]:
        assert run["completion_tokens"] == 4 and run["finish_reason"] == "length"
        assert 0 < run["time_to_first_token_ms"] <= run["total_time_ms"]
        assert run["tokens_per_second"] > 0
    for key in ("avg_tokens_per_second", "avg_time_to_first_token_ms", "avg_total_time_ms"):
        assert body[key] > 0

    bad = server.http.post("/admin/benchmark", json={"model_id": MODEL_ID, "runs": 0})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "runs"
    missing = server.http.post("/admin/benchmark", json={"model_id": "ghost"})
    assert missing.status_code == 404


def test_reload_resizes_per_model_concurrency(server: LMXServer) -> None:
    limited = base(server)
    limited["models"]["per_model_concurrency_limits"] = {MODEL_ID: 1}
    resp = reload_with(server, limited)
    assert resp.status_code == 200 and "models" in resp.json()["updated"]
    assert server.admin_models()[MODEL_ID]["max_concurrent_requests"] == 1
    assert served_by(server, MODEL_ID) == MODEL_ID  # the one slot admits and frees
    resp = reload_with(server, base(server))
    assert resp.status_code == 200
    assert server.admin_models()[MODEL_ID]["max_concurrent_requests"] == 4
