"""What a node tells the supervisor about its host."""

from __future__ import annotations

import os
import platform
import shutil
from pathlib import Path

import psutil

from lmx_protocol.node_messages import HostInfo

# Entries listed at most (a Hello must stay small).
_MAX_MODELS = 200
_MODEL_SUFFIXES = (".gguf",)


def accelerator() -> str:
    if platform.system() == "Darwin" and platform.machine() == "arm64":
        return "apple-silicon"
    if shutil.which("nvidia-smi"):
        return "nvidia"
    return "cpu"


def models_on_disk(models_dir: Path | None) -> list[str]:
    """GGUF files and MLX directories (a config.json inside) directly in
    the models directory: what this node could serve without a download."""
    if models_dir is None or not models_dir.is_dir():
        return []
    found: list[str] = []
    for entry in sorted(models_dir.iterdir()):
        gguf = entry.is_file() and entry.name.endswith(_MODEL_SUFFIXES)
        if gguf or (entry.is_dir() and (entry / "config.json").is_file()):
            found.append(entry.name)
        if len(found) >= _MAX_MODELS:
            break
    return found


def free_disk(models_dir: Path | None) -> int:
    where = models_dir if models_dir is not None and models_dir.is_dir() else Path.home()
    return shutil.disk_usage(where).free


def host_info(models_dir: Path | None) -> HostInfo:
    memory = psutil.virtual_memory()
    return HostInfo(ram_total_bytes=memory.total, ram_available_bytes=memory.available,
                    cpu_cores=os.cpu_count() or 1, accelerator=accelerator(),
                    free_disk_bytes=free_disk(models_dir), models=models_on_disk(models_dir))
