"""Shared fixtures: the real bundled model, and real `lmx serve` processes
on free loopback ports, each with its own temporary LMX home."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from lmx_supervisor.models.bundled_model import DEFAULT_MODEL_FILE, ensure_default_model

MODEL_ID = DEFAULT_MODEL_FILE.removesuffix(".gguf")
STARTUP_TIMEOUT = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(predicate: Any, timeout: float, interval: float = 0.05, what: str = "") -> Any:
    """Poll `predicate` until it returns something truthy; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(interval)


# What `lmx serve` prints once its socket is bound.
LISTENING = re.compile(rb"^LMX listening on https?://[^\s]+:(\d+)$", re.M)


class LMXServer:
    """A real `python -m lmx_gateway serve` subprocess. It binds port 0 and
    the test reads the port it got: a port picked here and handed over could
    be taken by another process in between (many test runs share the host)."""

    def __init__(self, home: Path, config: dict[str, Any], env: dict[str, str] | None = None,
                 prefix: Sequence[str] = (), host: str = "127.0.0.1") -> None:
        """`prefix`: run it under this (`ip netns exec NS`: on another
        host, tests/netns.py); `host`: where the test reaches it."""
        self.home = home
        self.config_path = home / "config.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = home / "server.log"
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("LMX_")}
        full_env.update({"LMX_HOME": str(home), **(env or {})})
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "lmx_gateway", "serve",
             "--config", str(self.config_path), "--port", "0"],
            env=full_env, stdout=self._log, stderr=subprocess.STDOUT,
        )
        try:
            self.port = self._bound_port()
        except AssertionError:
            self.proc.kill()
            self.proc.wait()
            self._log.close()
            raise
        self.url = f"http://{host}:{self.port}"
        self.http = httpx.Client(base_url=self.url, timeout=30)
        self._clients: list[openai.OpenAI] = []

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _bound_port(self, timeout: float = STARTUP_TIMEOUT) -> int:
        """The port the server announced; 0 if it exited first (wait_healthy
        then reports the exit with the log)."""
        def announced() -> int | None:
            found = LISTENING.search(self.log_path.read_bytes())
            if found:
                return int(found.group(1))
            return 0 if self.proc.poll() is not None else None
        port = wait_until(lambda: (p := announced()) is not None and (p,), timeout,
                          what="the server to bind its port")
        return int(port[0])

    def wait_healthy(self, timeout: float = STARTUP_TIMEOUT) -> None:
        def healthy() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited {self.proc.returncode}:\n{self.log()}")
            with contextlib.suppress(httpx.HTTPError):
                return self.http.get("/healthz").status_code == 200
            return False
        wait_until(healthy, timeout, what="/healthz")

    def wait_ready(self, model_id: str | None = None, timeout: float = STARTUP_TIMEOUT) -> None:
        self.wait_healthy(timeout)

        def ready() -> bool:
            if model_id is None:
                return self.http.get("/readyz").status_code == 200
            return self.model_state(model_id) == "ready"
        wait_until(ready, timeout, what=f"model {model_id or 'any'} ready")

    def admin_models(self) -> dict[str, dict[str, Any]]:
        rows = self.http.get("/admin/models").json()["loaded"]
        return {row["model_id"]: row for row in rows}

    def model_state(self, model_id: str) -> str | None:
        row = self.admin_models().get(model_id)
        return None if row is None else str(row["state"])

    def worker_pid(self, model_id: str) -> int:
        pid = self.admin_models()[model_id]["pid"]
        assert isinstance(pid, int)
        return pid

    def load(self, model_id: str, **extra: Any) -> httpx.Response:
        return self.http.post("/admin/models/load", json={"model_id": model_id, **extra},
                              timeout=120)

    def openai(self, **kwargs: Any) -> openai.OpenAI:
        client = openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0,
                               **kwargs)
        self._clients.append(client)  # closed in stop(): no socket left to the GC
        return client

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 40) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.http.close()
        for client in self._clients:
            client.close()
        self._log.close()
        return int(self.proc.returncode)


def base_config(models_dir: Path, **models: Any) -> dict[str, Any]:
    return {
        "models": {"models_directory": str(models_dir), "auto_load": [],
                   "context_length": 2048, "n_threads": 2, **models},
        "logging": {"level": "INFO", "format": "text"},
    }


# A model to place in the server's models directory: a path (linked under
# its own name) or (name, path).
Link = Path | tuple[str, Path]
Sections = Mapping[str, Mapping[str, Any]]


@contextlib.contextmanager
def running_server(tmp_path_factory: pytest.TempPathFactory, name: str, *,
                   links: Sequence[Link] = (), models: Mapping[str, Any] | None = None,
                   config: Sections | Callable[[Path], dict[str, Any]] | None = None,
                   env: dict[str, str] | Callable[[Path], dict[str, str]] | None = None,
                   headers: Mapping[str, str] | None = None,
                   prepare: Callable[[Path], None] | None = None,
                   wait_for: Sequence[str] = (), timeout: float = STARTUP_TIMEOUT,
                   prefix: Sequence[str] = (), host: str = "127.0.0.1",
                   ) -> Iterator[LMXServer]:
    """A real server in a fresh LMX home (a `name`-prefixed temporary
    directory), for module-scoped fixtures:

        @pytest.fixture(scope="module")
        def server(tmp_path_factory, model_file):
            with running_server(tmp_path_factory, "mine", links=[model_file],
                                models={"auto_load": [MODEL_ID]}, wait_for=[MODEL_ID]) as srv:
                yield srv

    `home/models` holds a symlink to each of `links`. The config is
    base_config with `models` merged into its models section and each of
    `config`'s sections merged in, or, when `config` is a function, what it
    returns for the models directory. `env` (or `env(home)`) is added to
    the server's environment. `prepare(home)` runs before the server
    starts (files it must find at startup). `headers` go on
    `server.http` before the first request. `prefix` runs the server under
    a command (`ip netns exec NS`: on another host, tests/netns.py) and
    `host` is where the test then reaches it. The block starts once every
    model in `wait_for` is ready (just /healthz when there is none), and
    the server is stopped however it ends, a failed start included."""
    home = tmp_path_factory.mktemp(name)
    models_dir = home / "models"
    models_dir.mkdir()
    for link in links:
        link_name, target = link if isinstance(link, tuple) else (link.name, link)
        (models_dir / link_name).symlink_to(target, target_is_directory=target.is_dir())
    if callable(config):
        assert models is None, "models= is merged into base_config only"
        cfg = config(models_dir)
    else:
        cfg = base_config(models_dir, **(models or {}))
        for section, values in (config or {}).items():
            cfg.setdefault(section, {}).update(values)
    if prepare is not None:
        prepare(home)
    server = LMXServer(home, cfg, env(home) if callable(env) else env, prefix, host)
    try:
        server.http.headers.update(headers or {})
        if not wait_for:
            server.wait_healthy(timeout)
        for model_id in wait_for:
            server.wait_ready(model_id, timeout)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def model_file() -> Path:
    return ensure_default_model()


MLX_MODEL_ID = "SmolLM2-135M-Instruct-mlx"


@pytest.fixture(scope="session")
def mlx_model_dir(tmp_path_factory: pytest.TempPathFactory, model_file: Path) -> Path:
    """The bundled GGUF converted to an MLX directory by `lmx models convert`."""
    dest = tmp_path_factory.mktemp("mlx-model") / MLX_MODEL_ID
    done = subprocess.run([sys.executable, "-m", "lmx_gateway", "models", "convert",
                           str(model_file), str(dest)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    return dest


@pytest.fixture
def models_dir(tmp_path: Path, model_file: Path) -> Path:
    directory = tmp_path / "models"
    directory.mkdir()
    (directory / model_file.name).symlink_to(model_file)
    return directory


@pytest.fixture
def start_server(tmp_path: Path, models_dir: Path) -> Iterator[Any]:
    """Factory: start_server(env=..., **models_section_overrides)."""
    servers: list[LMXServer] = []

    def start(env: dict[str, str] | None = None, config: dict[str, Any] | None = None,
              **models: Any) -> LMXServer:
        home = tmp_path / f"home{len(servers)}"
        home.mkdir()
        cfg = base_config(models_dir, **models)
        for section, values in (config or {}).items():
            cfg.setdefault(section, {}).update(values)
        server = LMXServer(home, cfg, env)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop(signal.SIGKILL if server.proc.poll() is None else signal.SIGTERM)


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory: pytest.TempPathFactory, model_file: Path
                  ) -> Iterator[LMXServer]:
    """One server with the bundled model loaded, for tests that only read."""
    with running_server(tmp_path_factory, "shared", links=[model_file],
                        models={"auto_load": [MODEL_ID]}, wait_for=[MODEL_ID]) as server:
        yield server
