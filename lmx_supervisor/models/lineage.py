"""Where a model on disk came from, for models LMX made itself (quantize
jobs): a small JSON sidecar beside a GGUF file (`NAME.gguf.lineage.json`)
or inside a model directory (`lmx-lineage.json`). The inventory shows it
under `lineage`; a missing or unreadable sidecar is simply no lineage."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmx_supervisor.atomic_json import write_json_atomic

DIR_SIDECAR = "lmx-lineage.json"
FILE_SUFFIX = ".lineage.json"
MAX_SIDECAR_BYTES = 64 * 1024


def sidecar_path(model_path: Path) -> Path:
    if model_path.is_dir():
        return model_path / DIR_SIDECAR
    return model_path.with_name(model_path.name + FILE_SUFFIX)


def write_lineage(model_path: Path, lineage: dict[str, Any]) -> None:
    write_json_atomic(sidecar_path(model_path), lineage)


def read_lineage(model_path: Path) -> dict[str, Any] | None:
    path = sidecar_path(model_path)
    try:
        if path.stat().st_size > MAX_SIDECAR_BYTES:
            return None
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
