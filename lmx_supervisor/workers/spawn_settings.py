"""Settings baked into a worker when it is spawned (context length, threads,
slots, MLX dequantization, and the performance settings autotune tunes:
batch sizes, flash attention, KV-cache type): a running worker cannot change them, so they
change only by starting a new worker: a load, or a restart.

`parse_overrides` validates what an operator sends (`settings` of
`POST /admin/models/restart`, `performance_overrides` of a load) into
plain values; an unknown key or a bad value is a 400 naming it."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from lmx_supervisor.errors import BadRequest
from lmx_supervisor.tuning.performance import parse_settings

if TYPE_CHECKING:
    from lmx_supervisor.lifecycle.managed_model import ModelSettings

# ModelSettings fields fixed when a worker is spawned: a config reload leaves
# them alone for running models (a restart after a crash must not change them).
SPAWN_TIME_SETTINGS = ("context_length", "n_threads", "parallel_slots", "mlx_dequantize",
                       "n_threads_batch", "n_batch", "flash_attn", "kv_cache_type",
                       "max_inter_token_ms")

Overrides = dict[str, Any]
# Validated here; the other performance keys by performance.PerformanceSettings.
_SIMPLE_COUNTS = ("context_length", "n_threads", "parallel_slots")


def _positive_int(value: Any, param: str, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        what = "a positive integer or null" if allow_none else "a positive integer"
        raise BadRequest(f"{param} must be {what}, not {value!r}", param=param,
                         code="invalid_value")
    return value


def _dequantize(value: Any, param: str) -> str | bool:
    if value == "auto" or isinstance(value, bool):
        return value  # type: ignore[no-any-return]
    raise BadRequest(f"{param} must be \"auto\", true or false, not {value!r}", param=param,
                     code="invalid_value")


def parse_overrides(raw: Any, where: str) -> Overrides:
    """Validate `raw` (a JSON object) into spawn-time overrides; `where` is
    the request field it came from, so an error names `where.key`."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise BadRequest(f"{where} must be an object of spawn-time settings "
                         f"({', '.join(SPAWN_TIME_SETTINGS)})", param=where, code="invalid_type")
    parsed: Overrides = {}
    for key, value in raw.items():
        param = f"{where}.{key}"
        if key not in SPAWN_TIME_SETTINGS:
            raise BadRequest(f"Unknown setting '{key}' in {where}: the settings fixed at spawn "
                             f"are {', '.join(SPAWN_TIME_SETTINGS)}", param=param,
                             code="invalid_value")
        if key == "mlx_dequantize":
            parsed[key] = _dequantize(value, param)
        elif key == "max_inter_token_ms":
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise BadRequest(f"{param} must be a number of milliseconds >= 0 (0: no "
                                 f"budget), not {value!r}", param=param, code="invalid_value")
            parsed[key] = float(value)
        elif key in _SIMPLE_COUNTS:
            parsed[key] = _positive_int(value, param, allow_none=key == "n_threads")
    # The performance keys' ranges and types: one schema with profiles.
    tuned = {k: v for k, v in raw.items()
             if k not in ("mlx_dequantize", "max_inter_token_ms", *_SIMPLE_COUNTS)}
    parsed.update(parse_settings(tuned, where).as_dict())
    return parsed


def spawn_values(settings: ModelSettings) -> Overrides:
    return {name: getattr(settings, name) for name in SPAWN_TIME_SETTINGS}


def with_overrides(settings: ModelSettings, overrides: Overrides) -> ModelSettings:
    return dataclasses.replace(settings, **overrides)


def changed(settings: ModelSettings, target: Overrides) -> Overrides:
    """The entries of `target` that differ from what `settings` runs with."""
    return {k: v for k, v in target.items() if getattr(settings, k) != v}
