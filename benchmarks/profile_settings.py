"""The llama.cpp settings a performance profile (lmx autotune's) gives a model,
as keyword arguments for an in-process `llama_cpp.Llama` or a peer server:
the benchmarks give every peer the settings LMX loads the model with, so a
ratio compares servers, not settings."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def profile_settings(profiles_dir: Path | None, model: Path) -> dict[str, Any]:
    """The llama.cpp settings an autotune profile gives `model` (empty without
    one): the peers run with the same ones, so a ratio compares servers, not
    settings."""
    if profiles_dir is None:
        return {}
    from lmx_supervisor.tuning.performance import ProfileStore

    profile = ProfileStore(profiles_dir).load(model.name.removesuffix(".gguf"))
    if profile is None:
        return {}
    return {k: v for k, v in profile.settings.as_dict().items()
            if k in ("n_threads", "n_threads_batch", "n_batch", "flash_attn", "kv_cache_type")}


def llama_kwargs(settings: dict[str, Any], threads: int) -> dict[str, Any]:
    """llama_cpp.Llama keyword arguments for those settings, by the worker's
    own rules (its KV type ids and when flash attention is on)."""
    from lmx_worker.engines.llama_cpp_engine import KV_CACHE_TYPES, uses_flash_attention

    kv = settings.get("kv_cache_type") or "f16"
    out: dict[str, Any] = {
        "n_threads": settings.get("n_threads") or threads,
        "n_threads_batch": settings.get("n_threads_batch") or settings.get("n_threads")
        or threads,
        "flash_attn": uses_flash_attention(settings.get("flash_attn"), kv),
        "type_k": KV_CACHE_TYPES[kv], "type_v": KV_CACHE_TYPES[kv]}
    if settings.get("n_batch"):
        out["n_batch"] = settings["n_batch"]
    return out
