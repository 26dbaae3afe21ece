"""LMX's configuration: the schema ,
the search order for the YAML file, and `LMX_SECTION__KEY` env overrides.

Everything is validated once at startup by msgspec; a bad file becomes one
`ConfigError` line naming the key, never a traceback.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
import yaml

from lmx_supervisor.models.bundled_model import lmx_home

REPO_DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "config" / "default-config.yaml"
ENV_PREFIX = "LMX_"

Percent = Annotated[float, msgspec.Meta(gt=0, le=100)]
PositiveFloat = Annotated[float, msgspec.Meta(gt=0)]
PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]
# A key's name shows in metric labels and logs: a tame shape only.
KeyName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9._:\-]{1,64}$")]


class Section(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class ServerConfig(Section):
    host: str = "127.0.0.1"
    port: Port = 1234
    timeout_sec: PositiveFloat = 300
    websocket_enabled: bool = False
    sse_events_enabled: bool = True
    sse_heartbeat_interval_sec: PositiveFloat = 30
    max_request_body_bytes: PositiveInt = 10 * 1024 * 1024
    # uvicorn's graceful-shutdown window: in-flight requests get this long.
    shutdown_drain_timeout_sec: PositiveFloat = 30
    # Host names (or `*.domain` patterns, `*` for any) accepted in the Host
    # header beyond loopback and the machine's own names (read live).
    allowed_hosts: list[str] = []
    # Browser origins (`http://host:port`) allowed to call the API, with CORS
    # answers; requests from any other origin are refused (read live).
    cors_origins: list[str] = []
    # HTTPS: both set, or neither (startup only).
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    # The cloud profile refuses plain HTTP on a non-loopback address unless this is set.
    allow_plaintext: bool = False
    # Open connections (uvicorn limit_concurrency); beyond it new ones get 503.
    max_connections: PositiveInt = 1000
    # A prompt longer than context_length x this many characters cannot fit
    # (no token of a real vocabulary is longer) and is refused at the gateway
    # with 400 context_length_exceeded before any tokenizing.
    max_prompt_chars_per_token: PositiveInt = 64
    # /v1/responses kept for previous_response_id: entries and total bytes
    # (the least recently used go first when either is exceeded).
    responses_store_max_entries: PositiveInt = 1000
    responses_store_max_bytes: PositiveInt = 64 * 1024 * 1024


class ModelsConfig(Section):
    default_model: str | None = None
    # None: $LMX_HOME/models, i.e. ~/.opta-lmx/models.
    models_directory: str | None = None
    auto_load: list[str] = []
    max_concurrent_requests: PositiveInt = 4
    per_model_concurrency_limits: dict[str, PositiveInt] = {}
    inference_timeout_sec: PositiveFloat = 300
    loader_isolation_enabled: bool = True
    loader_timeout_sec: PositiveFloat = 120
    warmup_on_load: bool = False
    semaphore_timeout_sec: PositiveFloat = 30
    adaptive_concurrency_enabled: bool = False
    adaptive_latency_target_ms: PositiveFloat = 2500
    # LMX's own keys: how workers are run and supervised.
    context_length: PositiveInt = 4096
    # Requests one worker decodes together (llama.cpp sequences sharing a
    # batch); each slot may use up to context_length tokens.
    parallel_slots: PositiveInt = 4
    # Most choices one OpenAI request may ask for (`n`); they decode
    # together and share the prompt's prefill.
    max_n: PositiveInt = 8
    # MLX weights: "auto" dequantizes to float32 on a CPU (BLAS beats MLX's
    # quantized CPU kernels) and keeps them quantized on a GPU; true/false force it.
    mlx_dequantize: Literal["auto"] | bool = "auto"
    n_threads: PositiveInt | None = None
    # llama.cpp K/V cache type: q8_0 halves the cache's memory (and turns
    # flash attention on, which llama.cpp needs for it), q4_0 quarters it.
    # Per model: a performance profile or a load's performance_overrides.
    kv_cache_type: Literal["f16", "q8_0", "q4_0"] = "f16"
    # Stall-free batching: the longest step (so the largest inter-token gap)
    # running streams should see while a new prompt is read beside them;
    # each worker sizes the prompt chunk per step from its measured step
    # cost. 0 disables the budget (prompts go in full 512-token chunks).
    max_inter_token_ms: Annotated[float, msgspec.Meta(ge=0)] = 250
    crash_loop_max_crashes: PositiveInt = 3
    crash_loop_window_sec: PositiveFloat = 60
    restart_backoff_initial_sec: PositiveFloat = 0.25
    restart_backoff_max_sec: PositiveFloat = 10
    unload_drain_timeout_sec: PositiveFloat = 30
    stop_grace_sec: PositiveFloat = 5
    # Requests that may wait for a busy model's admission; past it, 429 queue_full.
    max_queued_requests: PositiveInt = 64
    # A worker whose heartbeat thread is silent this long is unresponsive
    # (SIGSTOP, native code holding the GIL): its requests end with 503
    # worker_unresponsive and it is killed and restarted (counts as a crash).
    worker_heartbeat_timeout_sec: PositiveFloat = 10
    # A worker alive but making no progress (no step, no frame handled) with
    # requests in flight this long is stuck and treated the same. Generous:
    # one prefill step of a big model can legitimately take minutes.
    worker_stall_timeout_sec: PositiveFloat = 300
    # Poison requests: one in flight at two crashes of the same model within
    # crash_loop_window_sec is refused (422 request_quarantined) this long,
    # instead of the model being quarantined. At most this many fingerprints
    # (suspects and quarantined) are remembered.
    request_quarantine_sec: PositiveFloat = 600
    request_quarantine_max_entries: PositiveInt = 256
    # Directories (besides models_directory and the hub cache) a load may
    # read a model from; a path anywhere else is refused (403).
    allowed_paths: list[str] = []


class MemoryConfig(Section):
    max_memory_percent: Percent = 90
    auto_evict_lru: bool = True
    load_shedding_percent: Percent = 95
    ttl_enabled: bool = False
    ttl_seconds: PositiveFloat = 3600
    # LMX's own keys. None: the guard counts the whole machine's used memory
    # against max_memory_percent of RAM. A byte count: LMX's models get this
    # budget and the guard counts their estimates against max_memory_percent
    # of it (see lmx_supervisor/memory/memory_guard.py).
    budget_bytes: PositiveInt | None = None
    # Each worker runs under RLIMIT_DATA = estimate x factor + headroom, so a
    # runaway model dies alone (503 oom-unloaded). 0 disables the cap.
    worker_memory_cap_factor: Annotated[float, msgspec.Meta(ge=0)] = 2.0
    worker_memory_cap_headroom_bytes: Annotated[int, msgspec.Meta(ge=0)] = 512 * 1024 * 1024


class SecurityConfig(Section):
    profile: Literal["lan", "cloud"] = "lan"
    admin_key: str | None = None
    inference_api_key: str | None = None
    # Named inference keys, {name: key}; the name is the client's identity in
    # metrics, logs and events.
    inference_api_keys: dict[KeyName, Annotated[str, msgspec.Meta(min_length=1)]] = {}


class LoggingConfig(Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    format: Literal["structured", "text"] = "text"
    file: str | None = None


class RoutingConfig(Section):
    aliases: dict[str, list[str]] = {}
    default_model: str | None = None


class WorkersConfig(Section):
    # ZeroMQ endpoint the supervisor binds. None: ipc:// in a fresh 0700
    # runtime directory. A tcp:// address lets workers live elsewhere.
    address: str | None = None
    runtime_dir: str | None = None
    # Largest message the supervisor's socket accepts (ZMQ_MAXMSGSIZE); a
    # peer sending more is disconnected. Embedding batches are the big ones.
    max_message_bytes: PositiveInt = 256 * 1024 * 1024
    # Ports a rank of a sharded MLX model on a node binds MLX's ring backend
    # on (one per start, picked at random from this range; ranks on this host
    # take a port the OS says is free).
    ring_port_min: Port = 47100
    ring_port_max: Port = 47199
    # tcp:// endpoint (e.g. tcp://0.0.0.0:5710) where node agents and their
    # workers connect, CURVE-encrypted; None: no tcp endpoint, no nodes.
    listen: Annotated[str, msgspec.Meta(pattern=r"^tcp://[^\s/]+:\d+$")] | None = None


class NodesConfig(Section):
    # A node silent this long (no heartbeat) is unreachable: its models'
    # requests end with 503 node_unreachable and the models are unavailable.
    heartbeat_timeout_sec: PositiveFloat = 5.0
    # Re-place a lost node's models on another host with room.
    replace_on_loss: bool = False
    # Public keys allowed to connect (Z85 text, 40 chars), and/or a directory
    # of public key files (`lmx keys new` writes NAME.key); None: only the list.
    authorized_keys: list[str] = []
    authorized_keys_dir: str | None = None
    # The supervisor's own key pair; None: <LMX home>/keys/server.key_secret.
    server_key_file: str | None = None


class Config(Section):
    server: ServerConfig = msgspec.field(default_factory=ServerConfig)
    models: ModelsConfig = msgspec.field(default_factory=ModelsConfig)
    memory: MemoryConfig = msgspec.field(default_factory=MemoryConfig)
    security: SecurityConfig = msgspec.field(default_factory=SecurityConfig)
    logging: LoggingConfig = msgspec.field(default_factory=LoggingConfig)
    routing: RoutingConfig = msgspec.field(default_factory=RoutingConfig)
    workers: WorkersConfig = msgspec.field(default_factory=WorkersConfig)
    nodes: NodesConfig = msgspec.field(default_factory=NodesConfig)

    @property
    def models_dir(self) -> Path:
        if self.models.models_directory is None:
            return lmx_home() / "models"
        return Path(self.models.models_directory).expanduser()


class ConfigError(Exception):
    """A configuration problem, worded as the one line the operator sees."""


def find_config_file(explicit: str | None) -> Path | None:
    """`--config`, then ~/.opta-lmx/config.yaml, then the repo default."""
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        return path
    for candidate in (lmx_home() / "config.yaml", REPO_DEFAULT_CONFIG):
        if candidate.is_file():
            return candidate
    return None


# Secrets: taken verbatim from the environment (a key like `0123` or `[x`
# must not turn into a number or a parse error) and never echoed.
SECRET_KEYS = frozenset({("security", "admin_key"), ("security", "inference_api_key")})


def yaml_problem(exc: yaml.YAMLError) -> str:
    """What is wrong and where, without pyyaml's quote of the offending
    line: that line may hold an API key."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        what = exc.problem or exc.context or type(exc).__name__
        return f"{what} (line {mark.line + 1}, column {mark.column + 1})"
    return type(exc).__name__


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {yaml_problem(exc)}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    return data


def apply_env_overrides(data: dict[str, Any], environ: dict[str, str]) -> dict[str, Any]:
    """`LMX_SERVER__PORT=8080` sets server.port. Values are parsed as YAML
    scalars/flow collections so `8080` is an int and `[]` an empty list."""
    sections = set(Config.__struct_fields__)
    for name, raw in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        path = name[len(ENV_PREFIX):].lower().split("__")
        if path[0] not in sections:
            continue  # LMX_HOME, LMX_FAILPOINTS and friends are not config
        try:
            if tuple(path) in SECRET_KEYS or raw == "":
                value: Any = raw
            else:
                value = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            # The security section holds keys (inference_api_keys): never quoted.
            shown = "" if path[0] == "security" else f" {raw!r}"
            raise ConfigError(f"{name}: cannot parse value{shown}: "
                              f"{yaml_problem(exc)}") from exc
        node = data
        for key in path[:-1]:
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{name}: {'.'.join(path[:-1])} is not a section")
            node = child
        node[path[-1]] = value
    return data


_AT_PATH = re.compile(r" - at `\$\.?(.*)`$")


def _explain(exc: msgspec.ValidationError) -> str:
    """msgspec says 'Expected `int`, got `str` - at `$.server.port`'; the
    operator wants 'server.port: expected `int`, got `str`'."""
    text = str(exc)
    match = _AT_PATH.search(text)
    where = match.group(1) if match else ""
    where = where.replace("[", ".").replace("]", "").replace("'", "")
    what = text[: match.start()] if match else text
    unknown = re.match(r"Object contains unknown field `(.+)`", what)
    if unknown:
        key = f"{where}.{unknown.group(1)}" if where else unknown.group(1)
        return f"{key}: unknown key"
    return f"{where or 'config'}: {what[0].lower()}{what[1:]}"


def load_config(explicit: str | None = None, environ: dict[str, str] | None = None) -> Config:
    env = dict(os.environ) if environ is None else environ
    path = find_config_file(explicit)
    data = _read_yaml(path) if path else {}
    data = apply_env_overrides(data, env)
    try:
        config = msgspec.convert(data, Config)
    except msgspec.ValidationError as exc:
        source = f" (in {path})" if path else ""
        raise ConfigError(_explain(exc) + source) from exc
    if config.memory.load_shedding_percent < config.memory.max_memory_percent:
        raise ConfigError(
            "memory.load_shedding_percent: must be >= memory.max_memory_percent"
        )
    if config.security.profile == "cloud" and not (
        config.security.admin_key
        and (config.security.inference_api_key or config.security.inference_api_keys)
    ):
        raise ConfigError(
            "security.profile: 'cloud' requires security.admin_key and "
            "security.inference_api_key (or security.inference_api_keys) to be set"
        )
    check_edge(config)
    return config


_LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1", "[::1]"})
_ORIGIN = re.compile(r"^[a-z][a-z0-9+.\-]*://[^/\s?#]+$")


def check_edge(config: Config) -> None:
    """The HTTP edge's keys: host patterns, origins, TLS, named keys."""
    server, security = config.server, config.security
    for i, pattern in enumerate(server.allowed_hosts):
        if not pattern or "*" in pattern[1:] or (pattern.startswith("*")
                                                 and pattern not in ("*",)
                                                 and not pattern.startswith("*.")):
            raise ConfigError(f"server.allowed_hosts.{i}: {pattern!r} is not a host name "
                              "or a '*.domain' pattern")
    for i, origin in enumerate(server.cors_origins):
        if origin != "*" and not _ORIGIN.match(origin.rstrip("/").lower()):
            raise ConfigError(f"server.cors_origins.{i}: {origin!r} is not an origin "
                              "like 'http://host:port'")
    if (server.tls_cert_file is None) != (server.tls_key_file is None):
        raise ConfigError("server.tls_cert_file: HTTPS needs both server.tls_cert_file "
                          "and server.tls_key_file")
    if (security.profile == "cloud" and server.tls_cert_file is None
            and not server.allow_plaintext
            and server.host.strip().lower() not in _LOOPBACK_HOSTS):
        raise ConfigError(f"server.host: the 'cloud' profile serves {server.host} only over "
                          "HTTPS: set server.tls_cert_file and server.tls_key_file (or "
                          "server.allow_plaintext: true)")
    seen: dict[str, str] = {}
    for name, key in sorted(security.inference_api_keys.items()):
        if key in seen:
            raise ConfigError(f"security.inference_api_keys.{name}: the same key as "
                              f"security.inference_api_keys.{seen[key]}")
        if key in (security.inference_api_key, security.admin_key):
            raise ConfigError(f"security.inference_api_keys.{name}: the same key as "
                              "security.inference_api_key or security.admin_key")
        seen[key] = name


@dataclass(frozen=True)
class ConfigSource:
    """Where the running config came from, so `POST /admin/config/reload`
    reads the same place: the `--config` path (or, without one, the search
    order again) and the env overrides the server started with, CLI flags
    such as `--port` included (they keep their precedence over the file)."""

    explicit: str | None = None
    environ: Mapping[str, str] | None = None  # None: os.environ at load time

    def path(self) -> Path | None:
        return find_config_file(self.explicit)

    def load(self) -> Config:
        return load_config(self.explicit, None if self.environ is None else dict(self.environ))
