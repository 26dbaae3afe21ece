"""Models as files: the inventory with what is loaded from where, deleting a
model from disk, and "download, then load" for `auto_download`.

Deletion only ever removes something the id names inside the models
directory or the hub cache: absolute paths and `..` are refused, and so is a
symlink whose target lies outside (deleting it would not free anything and
following it could remove files LMX does not own). A model a worker is
running from is never deleted (409): unload it first.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from huggingface_hub import scan_cache_dir

from lmx_supervisor.errors import BadRequest, Conflict, LMXError, ModelNotFound
from lmx_supervisor.models import hub_cache, inventory
from lmx_supervisor.models.downloads import DownloadJob, DownloadManager, DownloadStatus
from lmx_supervisor.models.lineage import read_lineage
from lmx_supervisor.models.model_layout import gguf_layout
from lmx_supervisor.supervisor import Supervisor

log = logging.getLogger("lmx.model_files")

_WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:")


@dataclass(frozen=True)
class Deleted:
    model_id: str
    path: Path
    freed_bytes: int
    source: str


def _real(path: Path) -> Path:
    try:
        return path.resolve()
    except OSError:
        return path.absolute()


def check_model_id(model_id: str) -> None:
    """Refuse ids that are paths out of the model stores (400)."""
    if not model_id.strip() or "\0" in model_id:
        raise BadRequest("model id must be a non-empty name without NUL bytes", param="model_id")
    normalised = model_id.replace("\\", "/")
    if normalised.startswith(("/", "~")) or _WINDOWS_DRIVE.match(normalised):
        raise BadRequest(
            f"'{model_id}' is an absolute path; give the model's id as the inventory "
            "lists it", code="invalid_model_id", param="model_id")
    if any(part in ("..", ".") for part in normalised.split("/")):
        raise BadRequest(f"'{model_id}' contains '.' or '..' path segments",
                         code="invalid_model_id", param="model_id")
    if PurePosixPath(normalised).is_absolute():
        raise BadRequest(f"'{model_id}' is an absolute path", code="invalid_model_id",
                         param="model_id")


def _regular_size(path: Path) -> int:
    """Bytes of regular files under `path`, not following symlinks (they are
    removed as links; their targets stay)."""
    if path.is_symlink():
        return 0
    if path.is_file():
        return path.stat().st_size
    total = 0
    for root, _dirs, files in os.walk(path, followlinks=False):
        for name in files:
            st = os.lstat(os.path.join(root, name))
            if not os.path.islink(os.path.join(root, name)):
                total += st.st_size
    return total


def _in_use(paths: list[Path], loaded: list[Path]) -> bool:
    targets = {_real(p) for p in paths}
    for model_path in loaded:
        real = _real(model_path)
        if real in targets or any(real.is_relative_to(t) for t in targets if t.is_dir()):
            return True
    return False


def delete_from_models_dir(model_id: str, models_dir: Path,
                           loaded: list[Path]) -> Deleted | None:
    """Delete the entry `model_id` names in the models directory; None when
    there is no such entry."""
    root = _real(models_dir)
    for candidate in (models_dir / model_id, models_dir / f"{model_id}.gguf"):
        if not os.path.lexists(candidate):
            continue
        real = _real(candidate)
        if not real.is_relative_to(root) or real == root:
            raise BadRequest(
                f"'{model_id}' resolves to {real}, outside the models directory {root}; "
                "refusing to delete", code="invalid_model_id", param="model_id")
        if candidate.is_symlink():
            victims = [candidate]
        elif candidate.is_file() and candidate.suffix == ".gguf":
            victims = [f for f in gguf_layout(candidate).files if f.exists()]
        else:
            victims = [candidate]
        if _in_use(victims, loaded):
            raise Conflict(f"Model '{model_id}' is loaded; unload it before deleting",
                               code="model_loaded", param="model_id")
        freed = sum(_regular_size(v) for v in victims)
        for victim in victims:
            if victim.is_dir() and not victim.is_symlink():
                shutil.rmtree(victim)
            else:
                victim.unlink()
        log.info("deleted %s from the models directory (%d bytes)", model_id, freed)
        return Deleted(model_id, candidate, freed, inventory.MODELS_DIRECTORY)
    return None


def delete_from_hub_cache(model_id: str, loaded: list[Path],
                          downloading: bool) -> Deleted | None:
    repo = hub_cache.find_repo(model_id)
    if repo is None:
        located = hub_cache.locate(model_id)
        if located is not None:
            raise BadRequest(
                f"'{model_id}' is one file of the cached repo '{located.repo_id}'; delete "
                "the repo as a whole", code="invalid_model_id", param="model_id")
        return None
    if downloading:
        raise Conflict(f"'{model_id}' is being downloaded; cancel the download first",
                       code="download_in_progress", param="model_id")
    if _in_use([repo.repo_path], loaded):
        raise Conflict(f"Model '{model_id}' is loaded; unload it before deleting",
                           code="model_loaded", param="model_id")
    # Scan again right before deleting: the strategy must match the disk now.
    info = scan_cache_dir(hub_cache.cache_dir())
    current = next((r for r in info.repos if r.repo_type == "model" and r.repo_id == model_id),
                   None)
    if current is None:
        return None
    strategy = info.delete_revisions(*(rev.commit_hash for rev in current.revisions))
    freed = strategy.expected_freed_size
    strategy.execute()
    if current.repo_path.exists():  # no revision left: drop refs, locks and partial files
        shutil.rmtree(current.repo_path, ignore_errors=True)
    log.info("deleted %s from the hub cache (%d bytes)", model_id, freed)
    return Deleted(model_id, current.repo_path, freed, inventory.HUB_CACHE)


def split_repo_ref(model_id: str) -> tuple[str, list[str] | None] | None:
    """`org/name` -> the whole repo; `org/name/file[.gguf]` -> one file of it."""
    parts = model_id.split("/")
    if len(parts) < 2:
        return None
    repo_id = "/".join(parts[:2])
    if not hub_cache.valid_repo_id(repo_id):
        return None
    rest = "/".join(parts[2:])
    if not rest:
        return repo_id, None
    return repo_id, [rest] if rest.endswith(".gguf") else [rest, f"{rest}.gguf"]


@dataclass(frozen=True)
class LoadArgs:
    model_id: str
    backend: str | None
    served_name: str | None
    allow_unsupported_runtime: bool
    # Validated spawn-time settings (load performance_overrides).
    overrides: dict[str, Any] = field(default_factory=dict)


class ModelFiles:
    """Inventory, downloads and deletion for one gateway."""

    def __init__(self, supervisor: Supervisor, downloads: DownloadManager) -> None:
        self.supervisor = supervisor
        self.downloads = downloads
        self._tasks: set[asyncio.Task[None]] = set()

    def _loaded_paths(self) -> list[tuple[str, Path]]:
        return [(m.model_id, Path(m.path)) for m in self.supervisor.models()]

    async def available(self, models_dir: Path) -> list[dict[str, Any]]:
        rows = await asyncio.to_thread(inventory.scan_all, models_dir)
        loaded = self._loaded_paths()
        listed = []
        for row in rows:
            entry = row.to_json([mid for mid, path in loaded if row.serves(path)])
            # A snapshot still being written is incomplete for a reason.
            repo_id = "/".join(row.repo_id.split("/")[:2])  # org/name of org/name/file
            job = (self.downloads.active_for(repo_id) if row.source == inventory.HUB_CACHE
                   else None)
            entry["download_id"] = job.id if job is not None else None
            # Models LMX made (quantize jobs): source, type, date.
            entry["lineage"] = read_lineage(row.layout.weights)
            listed.append(entry)
        return listed

    async def delete(self, model_id: str, models_dir: Path) -> Deleted:
        check_model_id(model_id)
        loaded = [path for _mid, path in self._loaded_paths()]
        done = await asyncio.to_thread(delete_from_models_dir, model_id, models_dir, loaded)
        if done is None:
            downloading = self.downloads.active_for(model_id) is not None
            done = await asyncio.to_thread(delete_from_hub_cache, model_id, loaded, downloading)
        if done is None:
            raise ModelNotFound(f"Model '{model_id}' is not on disk", param="model_id")
        return done

    async def download_then_load(self, args: LoadArgs) -> DownloadJob:
        ref = split_repo_ref(args.model_id)
        if ref is None:
            raise ModelNotFound(
                f"Model '{args.model_id}' is not on disk and is not a hub repo id "
                "('org/name') that auto_download could fetch", param="model_id")
        repo_id, allow = ref
        job = await self.downloads.start(repo_id, None, allow)
        job.auto_load = {"model_id": args.model_id, "status": "pending", "error": None}
        self.downloads.when_finished(job, lambda done: self._after_download(done, args))
        return job

    def _after_download(self, job: DownloadJob, args: LoadArgs) -> None:
        assert job.auto_load is not None
        if job.status is not DownloadStatus.COMPLETED:
            job.auto_load.update(status="abandoned", error=job.error)
            return
        task = asyncio.get_running_loop().create_task(self._load(job, args),
                                                      name=f"lmx-auto-load-{job.id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _load(self, job: DownloadJob, args: LoadArgs) -> None:
        assert job.auto_load is not None
        job.auto_load["status"] = "loading"
        try:
            model, _already = await self.supervisor.load(
                args.model_id, backend=args.backend, served_name=args.served_name,
                allow_unsupported_runtime=args.allow_unsupported_runtime,
                overrides=args.overrides)
        except LMXError as exc:
            job.auto_load.update(status="failed", error=exc.message)
            self.supervisor.emit("model_load_failed", {
                "model_id": args.model_id, "download_id": job.id,
                "error": {"code": exc.code, "message": exc.message}})
            return
        except Exception as exc:
            log.exception("auto_download load of %s failed", args.model_id)
            job.auto_load.update(status="failed", error=f"{type(exc).__name__}: {exc}")
            self.supervisor.emit("model_load_failed", {
                "model_id": args.model_id, "download_id": job.id,
                "error": {"code": "internal_error", "message": str(exc)}})
            return
        job.auto_load.update(status="loaded", served_as=model.model_id)

    async def shutdown(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.downloads.shutdown()
