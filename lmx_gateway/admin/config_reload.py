"""Hot reload of the config file.

Everything that can fail (reading, parsing, validating the file and the
presets directory) happens first, off the event loop; then the new config is
applied in one synchronous step, so no request ever sees half of it. A bad
file changes nothing.

What is applied: routing (aliases, default model), memory thresholds,
security keys and profile, logging level (and format/file), presets,
per-model concurrency, admission wait, timeouts and crash-loop limits.
What is not: the bind address and port and the worker socket (a restart is
needed; the running values are kept and listed under `restart_required`),
and no model is loaded, unloaded or restarted. Settings fixed when a worker
is spawned (context length, threads) apply to the next load of a model.
"""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass, field

import msgspec

from lmx_gateway.http.logging_setup import setup_logging
from lmx_gateway.inference.presets import PresetSet, load_presets
from lmx_gateway.state import GatewayState
from lmx_supervisor.config import Config, ConfigError, LoggingConfig
from lmx_supervisor.errors import BadRequest

log = logging.getLogger("lmx.gateway")

# Keys that only take effect at startup; a reload keeps the running value.
_RESTART_ONLY = {"server": ("host", "port", "tls_cert_file", "tls_key_file", "allow_plaintext",
                            "max_connections", "responses_store_max_entries",
                            "responses_store_max_bytes"),
                 "workers": ("address", "runtime_dir")}
_UVICORN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi")
_KEY_PREFIX = re.compile(r"^([a-z_]+(?:\.[\w-]+)*): ")


@dataclass
class ReloadResult:
    updated: list[str]
    source: str | None
    restart_required: list[str] = field(default_factory=list)
    quarantine_lifted: list[str] = field(default_factory=list)
    preset_errors: list[dict[str, str]] = field(default_factory=list)
    presets_loaded: int = 0


def _keep_restart_only(old: Config, new: Config) -> tuple[Config, list[str]]:
    """The new config with the running values of startup-only keys, and the
    keys whose file value differs (they need a restart)."""
    pending: list[str] = []
    sections: dict[str, object] = {}
    for section, keys in _RESTART_ONLY.items():
        old_sec, new_sec = getattr(old, section), getattr(new, section)
        changed = [k for k in keys if getattr(old_sec, k) != getattr(new_sec, k)]
        if changed:
            pending += [f"{section}.{k}" for k in changed]
            sections[section] = msgspec.structs.replace(
                new_sec, **{k: getattr(old_sec, k) for k in changed})
    return (msgspec.structs.replace(new, **sections) if sections else new), pending


def changed_sections(old: Config, new: Config) -> list[str]:
    return [name for name in Config.__struct_fields__
            if getattr(old, name) != getattr(new, name)]


def apply_logging(old: LoggingConfig, new: LoggingConfig) -> None:
    if (old.format, old.file) != (new.format, new.file):
        setup_logging(new.level, new.format, new.file)
    else:
        logging.getLogger().setLevel(new.level)
    for name in _UVICORN_LOGGERS:
        logging.getLogger(name).setLevel(new.level)


def _config_error(exc: ConfigError) -> BadRequest:
    message = str(exc)
    match = _KEY_PREFIX.match(message)
    return BadRequest(f"Config not reloaded (old config kept): {message}",
                      param=match.group(1) if match else None, code="invalid_config")


def _read_everything(state: GatewayState) -> tuple[Config, PresetSet, str | None]:
    source = state.config_source
    path = source.path()
    config = source.load()
    presets = load_presets(state.presets.directory)
    return config, presets, (str(path) if path else None)


async def reload_config(state: GatewayState) -> ReloadResult:
    """Re-read and apply; raises BadRequest (400 naming the key) and keeps
    the running config when the file is invalid."""
    async with state.reload_lock:  # a slow read must not apply after a newer one
        try:
            fresh, presets, source = await asyncio.to_thread(_read_everything, state)
        except ConfigError as exc:
            log.warning("config reload refused: %s", exc)
            raise _config_error(exc) from None
        return apply_config(state, fresh, presets, source)


def apply_config(state: GatewayState, fresh: Config, presets: PresetSet,
                 source: str | None) -> ReloadResult:
    """The synchronous, all-or-nothing step (no await: no request can run
    between the first and the last assignment)."""
    old = state.config
    fresh, restart_required = _keep_restart_only(old, fresh)
    updated = changed_sections(old, fresh)
    if not presets.same_presets(state.presets):
        updated.append("presets")
    lifted = state.supervisor.reconfigure(fresh)
    state.config = fresh
    state.presets = presets
    if old.logging != fresh.logging:
        apply_logging(old.logging, fresh.logging)
    result = ReloadResult(updated=updated, source=source, restart_required=restart_required,
                          quarantine_lifted=lifted, preset_errors=presets.errors,
                          presets_loaded=len(presets.presets))
    state.events.publish("config_reloaded", {
        "updated": updated, "source": source, "restart_required": restart_required,
        "quarantine_lifted": lifted, "presets_loaded": result.presets_loaded})
    log.info("config reloaded from %s: %s%s", source or "defaults",
             ", ".join(updated) or "no changes",
             f" (restart needed for {', '.join(restart_required)})" if restart_required else "")
    for model_id in lifted:
        log.info("model %s: quarantine lifted by the config change; it may be loaded again",
                 model_id)
    return result
