"""From the `model` a client asked for to the model that serves it.

One place for every route family (chat, completions, Anthropic, Responses,
encoders, the benchmark), in this order:

1. a loaded model's id: that model (an id always wins over an alias);
2. `preset:NAME`: the preset's model (itself an id or an alias), plus the
   preset for the caller to apply (`presets.apply_preset`);
3. a routing alias (`routing.aliases: {code: [a, b]}`): the first READY
   model of the list; if none is ready, the first one still loaded (starting
   or restarting: the request waits for it, or gets its 503);
4. `default`: `routing.default_model` (or `models.default_model`), an id or
   an alias, when one is configured.

Anything else is 404 `model-not-found` (503 `no-model-loaded` when nothing
is loaded at all): an unknown name is never silently sent elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

import msgspec

from lmx_gateway.inference.presets import PRESET_PREFIX, Preset, apply_preset
from lmx_gateway.openai.schemas import SamplingFields
from lmx_gateway.state import GatewayState
from lmx_supervisor.errors import BadRequest, ModelNotFound, NoModelLoaded
from lmx_supervisor.lifecycle.managed_model import ManagedModel
from lmx_supervisor.lifecycle.states import ModelState

DEFAULT_MODEL_NAME = "default"
# Still coming up or restarting: worth waiting for when nothing is ready.
_WAITABLE = (ModelState.STARTING, ModelState.BACKOFF)


@dataclass(frozen=True)
class RouteTarget:
    model: ManagedModel
    preset: Preset | None = None
    # How the name was resolved: "alias:code", "preset:x", "default"; None if direct.
    via: str | None = None


def resolve_route(state: GatewayState, name: str) -> RouteTarget:
    if name.startswith(PRESET_PREFIX):
        preset_name = name[len(PRESET_PREFIX):]
        preset = state.presets.get(preset_name)
        if preset is None:
            known = ", ".join(sorted(state.presets.presets)) or "none"
            raise ModelNotFound(f"Preset '{preset_name}' not found (presets: {known})",
                                param="model")
        model, _ = _resolve_name(state, preset.model)
        return RouteTarget(model, preset, f"preset:{preset.name}")
    model, via = _resolve_name(state, name)
    return RouteTarget(model, None, via)


def resolve_model(state: GatewayState, name: str) -> ManagedModel:
    return resolve_route(state, name).model


R = TypeVar("R", bound=SamplingFields)


def route_request(state: GatewayState, req: R) -> tuple[R, ManagedModel]:
    """An OpenAI-shaped request ready for its model: preset applied and
    `model` replaced by the id actually serving it (which the response names),
    with that model."""
    target = resolve_route(state, req.model)
    ready = target.model.ready
    if ready is not None and ready.encoder is not None:  # embedding/rerank models
        raise BadRequest(f"Model '{target.model.model_id}' cannot generate text (its "
                         f"capabilities: {', '.join(ready.capabilities)})", param="model",
                         code="model_lacks_capability")
    routed = msgspec.structs.replace(apply_preset(req, target.preset),
                                     model=target.model.model_id)
    return routed, target.model


def _resolve_name(state: GatewayState, name: str) -> tuple[ManagedModel, str | None]:
    loaded = {m.model_id: m for m in state.supervisor.models()}
    if name in loaded:
        return loaded[name], None
    config = state.config
    candidates = config.routing.aliases.get(name)
    if candidates is not None:
        return _first_ready(name, candidates, loaded), f"alias:{name}"
    default = config.routing.default_model or config.models.default_model
    if name == DEFAULT_MODEL_NAME and default and default != DEFAULT_MODEL_NAME:
        if default in loaded:
            return loaded[default], "default"
        if default in config.routing.aliases:
            return _first_ready(default, config.routing.aliases[default], loaded), "default"
        name = default  # report the configured default as the missing model
    if not loaded:
        raise NoModelLoaded("No model is loaded; load one with POST /admin/models/load",
                            param="model")
    raise ModelNotFound(
        f"Model '{name}' is not loaded (loaded: {', '.join(sorted(loaded))})", param="model")


def _first_ready(alias: str, candidates: list[str], loaded: dict[str, ManagedModel]
                 ) -> ManagedModel:
    present = [loaded[c] for c in candidates if c in loaded]
    for model in present:
        if model.state is ModelState.READY:
            return model
    for model in present:
        if model.state in _WAITABLE:
            return model
    if present:  # quarantined or stopping: its own 503 says more than a 404
        return present[0]
    if not loaded:
        raise NoModelLoaded(f"No model is loaded; alias '{alias}' needs one of: "
                            f"{', '.join(candidates) or '(empty list)'}", param="model")
    raise ModelNotFound(
        f"Alias '{alias}' has no loaded model (candidates: "
        f"{', '.join(candidates) or 'none'}; loaded: {', '.join(sorted(loaded))})",
        param="model")
