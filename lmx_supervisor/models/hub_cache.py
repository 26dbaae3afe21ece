"""The huggingface_hub cache as a source of models.

Downloads land in the standard hub cache (``$HF_HUB_CACHE``, else
``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``), so models fetched by
other tools are found too and vice versa. The cache is read only through
huggingface_hub's own scanner (`scan_cache_dir`) and deleted through its own
deletion strategy, which removes snapshot links before blobs."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import CachedRepoInfo, CachedRevisionInfo, CacheNotFound, scan_cache_dir
from huggingface_hub import constants as hf_constants

log = logging.getLogger("lmx.hub_cache")

# org/name as the hub spells repo ids (a bare name is a legacy root-level repo).
REPO_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}$")


def cache_dir() -> Path:
    # Read at call time from huggingface_hub, which resolved HF_HUB_CACHE /
    # HF_HOME when it was imported: the same directory its downloads use.
    return Path(hf_constants.HF_HUB_CACHE).expanduser()


def valid_repo_id(repo_id: str) -> bool:
    return bool(REPO_ID.match(repo_id)) and ".." not in repo_id and "--" not in repo_id


def cached_model_repos() -> list[CachedRepoInfo]:
    try:
        info = scan_cache_dir(cache_dir())
    except (CacheNotFound, ValueError, OSError):
        return []
    for warning in info.warnings:
        log.debug("hub cache: %s", warning)
    return sorted((r for r in info.repos if r.repo_type == "model"), key=lambda r: r.repo_id)


def find_repo(repo_id: str) -> CachedRepoInfo | None:
    for repo in cached_model_repos():
        if repo.repo_id == repo_id:
            return repo
    return None


def preferred_revision(repo: CachedRepoInfo) -> CachedRevisionInfo | None:
    """The revision `main` points at, else the most recently written one."""
    if not repo.revisions:
        return None
    for rev in repo.revisions:
        if "main" in rev.refs:
            return rev
    return max(repo.revisions, key=lambda r: r.last_modified)


@dataclass(frozen=True)
class HubLocation:
    repo_id: str
    snapshot: Path
    # Path inside the snapshot when the reference named a file (org/repo/x.gguf).
    path: Path


def locate(ref: str) -> HubLocation | None:
    """`org/name` or `org/name/sub/path` that names a cached repo."""
    parts = ref.split("/")
    if len(parts) < 2:
        candidates = [(ref, "")]
    else:
        candidates = [("/".join(parts[:2]), "/".join(parts[2:])), (parts[0], "/".join(parts[1:]))]
    for repo_id, rest in candidates:
        if not valid_repo_id(repo_id):
            continue
        repo = find_repo(repo_id)
        rev = preferred_revision(repo) if repo is not None else None
        if rev is None:
            continue
        if rest and (".." in Path(rest).parts or Path(rest).is_absolute()):
            continue
        if not rest:
            return HubLocation(repo_id, rev.snapshot_path, rev.snapshot_path)
        # org/name/file names one GGUF of a repo that holds several.
        for target in (rev.snapshot_path / rest, rev.snapshot_path / f"{rest}.gguf"):
            if target.exists():
                return HubLocation(repo_id, rev.snapshot_path, target)
    return None


def repo_folder(repo_id: str, cache: Path | None = None) -> Path:
    """Where huggingface_hub keeps a model repo (its documented cache layout)."""
    return (cache or cache_dir()) / f"models--{repo_id.replace('/', '--')}"
