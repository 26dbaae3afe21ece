"""Configuration: search order, env overrides, validation, busy port."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from lmx_supervisor.config import ConfigError, load_config
from tests.conftest import free_port, wait_until

pytestmark = pytest.mark.timeout(60)


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_env_overrides_typed_values(tmp_path: Path) -> None:
    cfg = write(tmp_path / "c.yaml", "server:\n  port: 1234\nmodels:\n  auto_load: [a, b]\n")
    config = load_config(cfg, {
        "LMX_SERVER__PORT": "8080",
        "LMX_MODELS__AUTO_LOAD": "[]",
        "LMX_MEMORY__MAX_MEMORY_PERCENT": "85",
        "LMX_SECURITY__ADMIN_KEY": "secret",
        "LMX_HOME": "/ignored/not/config",
    })
    assert config.server.port == 8080
    assert config.models.auto_load == []
    assert config.memory.max_memory_percent == 85
    assert config.security.admin_key == "secret"


def test_search_order_prefers_explicit_then_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                 ) -> None:
    monkeypatch.setenv("LMX_HOME", str(tmp_path))
    write(tmp_path / "config.yaml", "server:\n  port: 2222\n")
    assert load_config(None, {}).server.port == 2222
    explicit = write(tmp_path / "other.yaml", "server:\n  port: 3333\n")
    assert load_config(explicit, {}).server.port == 3333
    (tmp_path / "config.yaml").unlink()
    assert load_config(None, {}).server.port == 1234  # the repo's default file


@pytest.mark.parametrize(("text", "env", "message"), [
    ("server:\n  bogus: 1\n", {}, "server.bogus: unknown key"),
    ("nonsense: {}\n", {}, "nonsense: unknown key"),
    ("server:\n  port: high\n", {}, "server.port: expected `int`, got `str`"),
    ("server:\n  port: 99999\n", {}, "server.port: expected `int` <= 65535"),
    ("memory:\n  max_memory_percent: 0\n", {}, "memory.max_memory_percent: expected `float` > 0"),
    ("logging:\n  level: LOUD\n", {}, "logging.level: invalid enum value 'LOUD'"),
    ("", {"LMX_MODELS__LOADER_TIMEOUT_SEC": "soon"}, "models.loader_timeout_sec: expected"),
    ("security:\n  profile: cloud\n", {}, "requires security.admin_key"),
    ("server: [1, 2\n", {}, "not valid YAML"),
])
def test_bad_config_is_one_clear_line(tmp_path: Path, text: str, env: dict[str, str],
                                      message: str) -> None:
    cfg = write(tmp_path / "c.yaml", text)
    with pytest.raises(ConfigError) as info:
        load_config(cfg, env)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def run_cli(args: list[str], env: dict[str, str], timeout: float = 20
            ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lmx_gateway", *args], env=env,
                          capture_output=True, text=True, timeout=timeout)


def clean_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LMX_")}
    env.update({"LMX_HOME": str(tmp_path), "LMX_MODELS__AUTO_LOAD": "[]", **extra})
    return env


def test_cli_bad_key_exits_with_one_line(tmp_path: Path) -> None:
    cfg = write(tmp_path / "c.yaml", "models:\n  max_concurent_requests: 4\n")
    result = run_cli(["serve", "--config", cfg], clean_env(tmp_path))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"lmx: error: models.max_concurent_requests: unknown key (in {cfg})"]


def test_cli_busy_port_is_one_line(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_cli(["serve", "--port", str(port)], clean_env(tmp_path))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"lmx: error: port {port} on 127.0.0.1 is already in use "
        "(set --port or LMX_SERVER__PORT)"]


def test_env_port_override_is_used_by_the_server(tmp_path: Path) -> None:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "lmx_gateway", "serve"],
                            env=clean_env(tmp_path, LMX_SERVER__PORT=str(port)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def up() -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200
            except httpx.HTTPError:
                return False
        wait_until(up, 20, what="server on the env-configured port")
        assert httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 503
    finally:
        proc.terminate()
        assert proc.wait(20) == 0
