"""Which model serves an Ollama request, loading it from disk on first use
as Ollama does, and what its keep_alive does afterwards."""

from __future__ import annotations

from lmx_gateway.admin.model_files import model_files
from lmx_gateway.inference.presets import PRESET_PREFIX
from lmx_gateway.inference.routing import DEFAULT_MODEL_NAME
from lmx_gateway.ollama.names import resolve_name
from lmx_gateway.state import GatewayState
from lmx_supervisor.errors import ModelNotFound
from lmx_supervisor.lifecycle.managed_model import ManagedModel


def not_found(name: str) -> ModelNotFound:
    return ModelNotFound(f"model '{name}' not found", param="model")


async def disk_ids(state: GatewayState) -> set[str]:
    rows = await model_files(state).available(state.config.models_dir)
    return {str(r["repo_id"]) for r in rows if r["complete"]}


async def served_name(state: GatewayState, name: str) -> str:
    """The name the routing layer resolves: a loaded id, an alias, a preset,
    `default`; else a complete model on disk, loaded now (the request waits
    for the load, and gets the load's error if it fails)."""
    if name.startswith(PRESET_PREFIX) or name == DEFAULT_MODEL_NAME:
        return name
    routable = {m.model_id for m in state.supervisor.models()} | set(state.config.routing.aliases)
    resolved = resolve_name(name, routable)
    if resolved in routable:
        return resolved
    on_disk = await disk_ids(state)
    resolved = resolve_name(name, on_disk)
    if resolved not in on_disk:
        raise not_found(name)
    model, _already = await state.supervisor.load(resolved)
    return model.model_id


async def apply_keep_alive(state: GatewayState, model: ManagedModel,
                           seconds: float | None) -> None:
    """0: unload now (if no other request is using the model); otherwise the
    model's idle TTL from now on (negative: never unloaded for idleness)."""
    if seconds is None:
        return
    if seconds == 0:
        await state.supervisor.evict(model.model_id, "keep_alive: 0")
    else:
        model.keep_alive_sec = seconds
