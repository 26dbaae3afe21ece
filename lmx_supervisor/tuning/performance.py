"""Performance settings of a model's worker: what autotune measures and
stores as the model's profile, and what a load's `performance_overrides`
may set. One schema for both, validated by msgspec, so a bad key or value
is a 400 naming it (`param: "performance_overrides.n_threads"`).

Layers, later wins: the config (`models.*`), the model's profile
(~/.opta-lmx/profiles/MODEL.yaml, written by autotune), the load's
overrides. `effective_settings(model_id, overrides)` merges the last two;
`apply_performance` writes the result onto a load's ModelSettings.

Profiles are YAML, one file per model id, meant to be read (and edited) by
people: the settings, and the measurements autotune based them on. A
profile that does not parse is ignored with a warning, never fatal.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
import yaml

from lmx_supervisor.errors import BadRequest
from lmx_supervisor.lifecycle.managed_model import ModelSettings
from lmx_supervisor.models.bundled_model import lmx_home
from lmx_supervisor.models.model_layout import LLAMA_CPP

log = logging.getLogger("lmx.performance")

PROFILES_DIR = "profiles"
KVCacheType = Literal["f16", "q8_0", "q4_0"]
KV_CACHE_TYPES: tuple[str, ...] = ("f16", "q8_0", "q4_0")
# Bytes per cached value (ggml block sizes: q8_0 34 B and q4_0 18 B per 32).
KV_BYTES_PER_VALUE: dict[str, float] = {"f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}
MAX_PROFILE_BYTES = 1024 * 1024
_AT_PATH = re.compile(r"at `\$\.?([^`]*)`")
_UNKNOWN = re.compile(r"unknown field `([^`]+)`")


class PerformanceSettings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True,
                          omit_defaults=True):
    """None: not set at this layer (the layer below decides)."""

    parallel_slots: Annotated[int, msgspec.Meta(ge=1, le=256)] | None = None
    context_length: Annotated[int, msgspec.Meta(ge=16, le=16 * 1024 * 1024)] | None = None
    n_threads: Annotated[int, msgspec.Meta(ge=1, le=1024)] | None = None
    n_threads_batch: Annotated[int, msgspec.Meta(ge=1, le=1024)] | None = None
    n_batch: Annotated[int, msgspec.Meta(ge=16, le=16384)] | None = None
    flash_attn: bool | None = None
    kv_cache_type: KVCacheType | None = None

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in msgspec.structs.asdict(self).items() if v is not None}


PERFORMANCE_KEYS = tuple(f.name for f in msgspec.structs.fields(PerformanceSettings))


def parse_settings(raw: Any, param: str) -> PerformanceSettings:
    """Validate a mapping of performance keys; a 400 names the bad key."""
    if raw is None:
        return PerformanceSettings()
    if not isinstance(raw, dict):
        raise BadRequest(f"{param} must be an object of performance settings "
                         f"({', '.join(PERFORMANCE_KEYS)})", param=param)
    try:
        return msgspec.convert(raw, PerformanceSettings)
    except msgspec.ValidationError as exc:
        text = str(exc)
        key = (_UNKNOWN.search(text) or _AT_PATH.search(text))
        where = f"{param}.{key.group(1)}" if key else param
        hint = (f" (known keys: {', '.join(PERFORMANCE_KEYS)})" if "unknown field" in text
                else "")
        raise BadRequest(f"{where}: {text}{hint}", param=where) from exc


def merge(*layers: PerformanceSettings) -> PerformanceSettings:
    merged: dict[str, Any] = {}
    for layer in layers:
        merged.update(layer.as_dict())
    return PerformanceSettings(**merged)


# --- profiles ----------------------------------------------------------------------------


@dataclass
class Profile:
    model_id: str
    settings: PerformanceSettings
    objective: str | None = None
    model_path: str | None = None
    created_at: str | None = None
    # What autotune ran: one entry per trial (settings, variant, tokens/s, error).
    measurements: list[dict[str, Any]] = field(default_factory=list)
    host: dict[str, Any] = field(default_factory=dict)
    # When another quantized file of the same model measured better.
    best_variant: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"model_id": self.model_id, "objective": self.objective,
                "model_path": self.model_path, "created_at": self.created_at,
                "settings": self.settings.as_dict(), "best_variant": self.best_variant,
                "host": self.host, "measurements": self.measurements}


def _file_name(model_id: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", model_id.replace("/", "__"))
    return f"{safe.lstrip('.') or 'model'}.yaml"


class ProfileStore:
    def __init__(self, directory: Path | None = None) -> None:
        self.directory = directory if directory is not None else lmx_home() / PROFILES_DIR

    def path_for(self, model_id: str) -> Path:
        return self.directory / _file_name(model_id)

    def load(self, model_id: str) -> Profile | None:
        path = self.path_for(model_id)
        try:
            if path.stat().st_size > MAX_PROFILE_BYTES:
                raise ValueError(f"larger than {MAX_PROFILE_BYTES} bytes")
            raw = yaml.safe_load(path.read_text())
            if not isinstance(raw, dict):
                raise ValueError("not a mapping")
            settings = parse_settings(raw.get("settings"), "settings")
        except FileNotFoundError:
            return None
        except (OSError, ValueError, yaml.YAMLError, BadRequest) as exc:
            log.warning("ignoring the performance profile %s: %s", path, exc)
            return None
        measurements, host = raw.get("measurements"), raw.get("host")
        return Profile(model_id=str(raw.get("model_id") or model_id), settings=settings,
                       objective=raw.get("objective"), model_path=raw.get("model_path"),
                       created_at=raw.get("created_at"),
                       measurements=measurements if isinstance(measurements, list) else [],
                       host=host if isinstance(host, dict) else {},
                       best_variant=raw.get("best_variant")
                       if isinstance(raw.get("best_variant"), dict) else None)

    def save(self, profile: Profile) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.path_for(profile.model_id)
        tmp = path.with_name(f".{path.name}.tmp")
        profile.created_at = profile.created_at or time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                 time.gmtime())
        header = (f"# LMX performance profile for {profile.model_id}, written by autotune.\n"
                  "# `settings` apply to every load of this model unless the load's\n"
                  "# performance_overrides say otherwise; edit or delete freely.\n")
        tmp.write_text(header + yaml.safe_dump(profile.as_dict(), sort_keys=False))
        tmp.replace(path)
        return path


# --- what a load uses ------------------------------------------------------------------------


@dataclass(frozen=True)
class EffectiveSettings:
    settings: PerformanceSettings
    # key -> "profile" or "override": where each set value came from.
    sources: dict[str, str]
    profile: Profile | None


def quantized_kv(settings: PerformanceSettings) -> bool:
    return settings.kv_cache_type not in (None, "f16")


def reconcile(settings: PerformanceSettings, winner: str) -> PerformanceSettings:
    """A quantized KV cache needs flash attention. When two layers disagree
    (one says q8_0, the other flash_attn: false), `winner` (the key the
    higher layer set) decides and the other value gives way."""
    if not (quantized_kv(settings) and settings.flash_attn is False):
        return settings
    if winner == "kv_cache_type":
        return merge(settings, PerformanceSettings(flash_attn=True))
    return merge(settings, PerformanceSettings(kv_cache_type="f16"))


def effective_settings(model_id: str, overrides: PerformanceSettings | dict[str, Any] | None,
                       store: ProfileStore | None = None) -> EffectiveSettings:
    """The model's profile with the load's overrides on top (overrides win).
    A dict is validated first (400 naming `performance_overrides.KEY`)."""
    if not isinstance(overrides, PerformanceSettings):
        overrides = parse_settings(overrides, "performance_overrides")
    profile = (store or ProfileStore()).load(model_id)
    base = profile.settings if profile is not None else PerformanceSettings()
    sources = dict.fromkeys(base.as_dict(), "profile")
    sources.update(dict.fromkeys(overrides.as_dict(), "override"))
    merged = merge(base, overrides)
    if sources.get("kv_cache_type") != sources.get("flash_attn"):  # layers disagree
        winner = "kv_cache_type" if sources.get("kv_cache_type") == "override" else "flash_attn"
        fixed = reconcile(merged, winner)
        for key in ("kv_cache_type", "flash_attn"):
            if getattr(fixed, key) != getattr(merged, key):
                sources[key] = f"implied by {winner}"
        merged = fixed
    return EffectiveSettings(merged, sources, profile)


def check_backend(effective: EffectiveSettings, backend: str,
                  overrides_param: str = "performance_overrides.") -> None:
    """Refuse what this backend cannot do (400 naming the key; a request's
    own values are named with `overrides_param` in front)."""
    perf = effective.settings
    source = effective.sources.get("kv_cache_type", "override")
    param = f"{overrides_param}kv_cache_type" if source == "override" else (
        "profile.kv_cache_type")
    if perf.kv_cache_type not in (None, "f16") and backend != LLAMA_CPP:
        raise BadRequest(f"kv_cache_type {perf.kv_cache_type} is for llama.cpp models; the "
                         f"{backend} backend keeps its KV cache unquantized", param=param)
    if quantized_kv(perf) and perf.flash_attn is False:  # both from one layer
        raise BadRequest(f"kv_cache_type {perf.kv_cache_type} needs flash_attn (llama.cpp "
                         "quantizes the V cache only with flash attention)", param=param)


def apply_performance(settings: ModelSettings, effective: EffectiveSettings) -> ModelSettings:
    """A copy of `settings` with the effective performance values set."""
    values = effective.settings.as_dict()
    return dataclasses.replace(settings, **values, performance_sources=dict(effective.sources))


def performance_view(settings: ModelSettings) -> dict[str, Any]:
    """What /admin/models shows: the values a worker was spawned with."""
    return {"parallel_slots": settings.parallel_slots,
            "context_length": settings.context_length,
            "n_threads": settings.n_threads, "n_threads_batch": settings.n_threads_batch,
            "n_batch": settings.n_batch, "flash_attn": settings.flash_attn,
            "kv_cache_type": settings.kv_cache_type,
            "sources": settings.performance_sources}
