"""Every model on disk: GGUF files and model directories under the models
directory, and the snapshots in the huggingface_hub cache.

Each row carries the id to load it by (`repo_id`), where it is, its size,
its format, the backend that can serve it, and whether it is complete. The
ids are exactly what `POST /admin/models/load` accepts:
- models directory: the file name without `.gguf`, the directory name, or
  `org/name` for a two-level layout; `dir/file` for a folder of GGUF files;
- hub cache: the repo id (`org/name`), or `org/name/file` when the repo holds
  several GGUF files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmx_supervisor.models import hub_cache
from lmx_supervisor.models.model_layout import Layout, dir_models, gguf_layout, is_model_gguf
from lmx_supervisor.models.model_resolver import AVAILABLE_BACKENDS

MODELS_DIRECTORY = "models_directory"
HUB_CACHE = "hub_cache"


@dataclass(frozen=True)
class InventoryRow:
    repo_id: str
    local_path: Path
    layout: Layout
    source: str
    size_bytes: int
    revision: str | None = None
    refs: tuple[str, ...] = ()

    def to_json(self, loaded_as: list[str]) -> dict[str, Any]:
        layout = self.layout
        return {
            "repo_id": self.repo_id,
            "local_path": str(self.local_path),
            "size_bytes": self.size_bytes,
            "format": layout.format,
            "backend": layout.backend,
            "backend_available": layout.backend in AVAILABLE_BACKENDS,
            "complete": layout.complete,
            "problems": list(layout.problems),
            "source": self.source,
            "revision": self.revision,
            "refs": list(self.refs),
            "loaded": bool(loaded_as),
            "loaded_as": loaded_as,
        }

    def serves(self, model_path: Path) -> bool:
        """Whether a worker loaded from `model_path` is running this model."""
        target = _real(model_path)
        mine = _real(self.layout.weights)
        if target == mine:
            return True
        if self.layout.weights.is_dir():
            return target.is_relative_to(mine)
        return any(_real(f) == target for f in self.layout.files)


def _real(path: Path) -> Path:
    try:
        return path.resolve()
    except OSError:
        return path.absolute()


def _rows_in_dir(directory: Path, repo_id: str, nested: bool) -> list[InventoryRow]:
    found = dir_models(directory)
    if not found:
        if not nested:
            return []
        # org/name layout: look one level down.
        rows: list[InventoryRow] = []
        for sub in sorted(directory.iterdir()):
            if sub.is_dir() and not sub.name.startswith("."):
                rows.extend(_rows_in_dir(sub, f"{repo_id}/{sub.name}", nested=False))
        return rows
    return [InventoryRow(repo_id if stem is None else f"{repo_id}/{stem}",
                         directory if stem is None else layout.weights,
                         layout, MODELS_DIRECTORY, layout.size_bytes)
            for stem, layout in found]


def scan_models_dir(models_dir: Path) -> list[InventoryRow]:
    if not models_dir.is_dir():
        return []
    rows: list[InventoryRow] = []
    for entry in sorted(models_dir.iterdir()):
        if entry.name.startswith("."):  # temp files of copies in progress
            continue
        if entry.is_file() and is_model_gguf(entry):
            layout = gguf_layout(entry)
            rows.append(InventoryRow(entry.name.removesuffix(".gguf"), entry, layout,
                                     MODELS_DIRECTORY, layout.size_bytes))
        elif entry.is_dir():
            rows.extend(_rows_in_dir(entry, entry.name, nested=True))
    return rows


def scan_hub_cache() -> list[InventoryRow]:
    rows: list[InventoryRow] = []
    for repo in hub_cache.cached_model_repos():
        for rev in sorted(repo.revisions, key=lambda r: r.last_modified, reverse=True):
            found = dir_models(rev.snapshot_path)
            if not found:
                # Files of an unknown kind (or nothing yet): still a cached repo
                # the operator may want to see and delete.
                continue
            for stem, layout in found:
                whole = stem is None
                rows.append(InventoryRow(
                    repo.repo_id if whole else f"{repo.repo_id}/{stem}",
                    rev.snapshot_path if whole else layout.weights,
                    layout, HUB_CACHE,
                    rev.size_on_disk if whole else layout.size_bytes,
                    rev.commit_hash, tuple(sorted(rev.refs))))
    return rows


def scan_all(models_dir: Path) -> list[InventoryRow]:
    return scan_models_dir(models_dir) + scan_hub_cache()
