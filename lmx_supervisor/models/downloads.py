"""Model downloads from a Hugging Face-compatible hub, with progress,
cancellation, resume and verification.

Built on huggingface_hub, so it honours ``HF_ENDPOINT`` (a mirror, or the
loopback hub the tests run), ``HF_TOKEN`` and the hub cache location
(``HF_HUB_CACHE`` / ``HF_HOME``). Files go into the hub cache with
`hf_hub_download`, one file at a time: the cache is where other tools look
too, the inventory finds the snapshot there, and a file already in the cache
for that commit is never fetched again.

- Plan (in the request): `model_info(files_metadata=True)` pins the revision
  to a commit and lists the files with sizes and, for LFS files, sha256.
  Free space at the cache is compared with the bytes still missing before
  any byte is written (507 storage-full).
- Transfer (in a thread): the blocking download runs in one thread per job.
  A progress hook (the `tqdm_class` huggingface_hub calls per chunk) counts
  bytes and raises when the job is cancelled, which aborts the transfer at
  the next chunk (at most `CHUNK_BYTES` later; a stalled connection is only
  noticed when the next chunk or the read timeout arrives). Threads cannot
  be killed; this is the earliest point a cancel can take effect.
- Resume: a connection dropped mid-file is resumed by huggingface_hub with a
  Range request from the bytes already received. Finished files are kept in
  the cache, so a cancelled, failed or interrupted job started again fetches
  only what is missing. (huggingface_hub 2.x discards the partial file of an
  *aborted* call, so the file in flight at a cancel starts over.)
- Verification: every fetched file is hashed; LFS files must match the
  sha256 the hub publishes, other files their git blob id. A mismatch
  removes the file and fails the job with the reason.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fnmatch
import hashlib
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, cast

from huggingface_hub import HfApi, hf_hub_download, try_to_load_from_cache
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from lmx_supervisor.errors import BadRequest, HubUnavailable, InsufficientStorage, ModelNotFound
from lmx_supervisor.models import hub_cache

log = logging.getLogger("lmx.downloads")

# Bytes huggingface_hub reads before it calls the progress hook (its default
# is 10 MiB): the granularity of progress reports and of cancellation.
CHUNK_BYTES = 512 * 1024
PROGRESS_EVENT_INTERVAL_SEC = 0.25  # at most 4 download_progress events per second
SPEED_WINDOW_SEC = 5.0
KEEP_FINISHED = 100
HASH_BLOCK = 4 * 1024 * 1024
STALE_PARTIAL_SEC = 600
# Test hook, read only by free_bytes(): pretend the disk has this many free
# bytes. Lets tests hit the storage-full path where no tmpfs can be mounted.
FREE_BYTES_OVERRIDE_ENV = "LMX_TEST_FREE_BYTES"

EventEmitter = Callable[[str, dict[str, Any]], object]


class DownloadStatus(StrEnum):
    DOWNLOADING = "downloading"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


class DownloadCancelled(Exception):
    pass


class VerificationFailed(Exception):
    pass


@dataclass(frozen=True)
class RemoteFile:
    name: str
    size: int
    sha256: str | None
    blob_id: str | None


@dataclass(frozen=True)
class DownloadPlan:
    repo_id: str
    revision: str
    commit: str
    files: tuple[RemoteFile, ...]
    missing_bytes: int


def free_bytes(directory: Path) -> int:
    """Free space on the filesystem that holds (or will hold) `directory`.
    The one place the OS is asked, so a test can fake the answer here."""
    override = os.environ.get(FREE_BYTES_OVERRIDE_ENV)
    if override:
        return int(override)
    probe = directory
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free


def git_blob_sha1(path: Path, size: int, cancelled: threading.Event | None = None) -> str:
    digest = hashlib.sha1(f"blob {size}\0".encode())  # git's object id, not security
    return _hash_file(path, digest, cancelled)


def file_sha256(path: Path, cancelled: threading.Event | None = None) -> str:
    return _hash_file(path, hashlib.sha256(), cancelled)


def _hash_file(path: Path, digest: Any, cancelled: threading.Event | None) -> str:
    with path.open("rb") as f:
        while block := f.read(HASH_BLOCK):
            if cancelled is not None and cancelled.is_set():
                raise DownloadCancelled
            digest.update(block)
    return str(digest.hexdigest())


class _ProgressHook:
    """Stands in for huggingface_hub's tqdm bar: it is created per file with
    the bar's keyword arguments and told every chunk received."""

    def __init__(self, job: DownloadJob, **_bar_kwargs: Any) -> None:
        self.job = job

    def __enter__(self) -> _ProgressHook:
        return self

    def __exit__(self, *_exc: object) -> None:
        return None

    def update(self, n: float | None = 1) -> None:
        self.job.file_bytes(int(n or 0))

    def close(self) -> None:
        return None


class DownloadJob:
    def __init__(self, plan: DownloadPlan, cache: Path, emit: EventEmitter,
                 allow_patterns: list[str] | None) -> None:
        self.id = f"dl-{uuid.uuid4().hex[:12]}"
        self.plan = plan
        self.repo_id = plan.repo_id
        self.cache = cache
        self.allow_patterns = allow_patterns
        self.status = DownloadStatus.DOWNLOADING
        self.bytes_total = sum(f.size for f in plan.files)
        self.files_total = len(plan.files)
        self.files_done = 0
        self.bytes_reused = 0
        self.current_file: str | None = None
        self.error: str | None = None
        self.local_path: Path | None = None
        self.started_at = time.time()
        self.finished_at: float | None = None
        # Set by the caller of an auto_download load: what happens after.
        self.auto_load: dict[str, Any] | None = None
        self.cancel_requested = threading.Event()
        self._emit = emit
        self._lock = threading.Lock()
        self._done_bytes = 0   # files finished (fetched and verified, or reused)
        self._file_bytes = 0   # the file in flight
        self._samples: collections.deque[tuple[float, int]] = collections.deque()
        self._last_event = 0.0
        self._thread: threading.Thread | None = None
        self._callbacks: list[Callable[[DownloadJob], None]] = []
        self._ended = False

    # --- numbers ------------------------------------------------------------------

    @property
    def bytes_done(self) -> int:
        with self._lock:
            return self._done_bytes + self._file_bytes

    @property
    def active(self) -> bool:
        return self.status is DownloadStatus.DOWNLOADING

    def _speed(self) -> float:
        with self._lock:
            if len(self._samples) < 2:
                return 0.0
            (t0, b0), (t1, b1) = self._samples[0], self._samples[-1]
        return (b1 - b0) / (t1 - t0) if t1 > t0 else 0.0

    def snapshot(self) -> dict[str, Any]:
        done = self.bytes_done
        total = self.bytes_total
        if self.status is DownloadStatus.COMPLETED:
            percent = 100.0
        else:
            percent = round(min(100.0, 100.0 * done / total), 2) if total else 0.0
        speed = self._speed() if self.active else 0.0
        remaining = max(0, total - done)
        eta = round(remaining / speed, 1) if self.active and speed > 0 else None
        return {
            "download_id": self.id,
            "repo_id": self.repo_id,
            "revision": self.plan.revision,
            "commit": self.plan.commit,
            "status": str(self.status),
            "progress_percent": percent,
            "bytes_downloaded": done,
            "bytes_total": total,
            "bytes_reused": self.bytes_reused,
            "speed_bytes_per_sec": round(speed, 1),
            "eta_seconds": eta,
            "files_completed": self.files_done,
            "files_total": self.files_total,
            "current_file": self.current_file,
            "error": self.error,
            "local_path": str(self.local_path) if self.local_path else None,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "auto_load": self.auto_load,
        }

    # --- progress (called from the download thread) -----------------------------------

    def file_bytes(self, n: int) -> None:
        if self.cancel_requested.is_set():
            raise DownloadCancelled
        with self._lock:
            self._file_bytes = max(0, self._file_bytes + n)
        self._progressed()

    def _progressed(self) -> None:
        now = time.monotonic()
        done = self.bytes_done
        with self._lock:
            self._samples.append((now, done))
            while len(self._samples) > 2 and now - self._samples[0][0] > SPEED_WINDOW_SEC:
                self._samples.popleft()
            due = now - self._last_event >= PROGRESS_EVENT_INTERVAL_SEC
            if due:
                self._last_event = now
        if due:
            self._emit("download_progress", self._event_data())

    def _event_data(self) -> dict[str, Any]:
        snap = self.snapshot()
        keys = ("download_id", "repo_id", "status", "progress_percent", "bytes_downloaded",
                "bytes_total", "speed_bytes_per_sec", "eta_seconds", "files_completed",
                "files_total", "current_file", "error", "local_path")
        return {k: snap[k] for k in keys}

    # --- the transfer (runs in the job's thread) ------------------------------------------

    def run(self) -> None:
        try:
            self._sweep_stale_partials()
            for remote in self.plan.files:
                if self.cancel_requested.is_set():
                    raise DownloadCancelled
                self._fetch(remote)
            self._record_ref()
            self.local_path = (hub_cache.repo_folder(self.repo_id, self.cache) / "snapshots"
                               / self.plan.commit)
            self._finish(DownloadStatus.COMPLETED, None)
        except DownloadCancelled:
            self._finish(DownloadStatus.CANCELLED, "cancelled by request")
        except VerificationFailed as exc:
            self._finish(DownloadStatus.FAILED, str(exc))
        except Exception as exc:
            log.warning("download %s of %s failed", self.id, self.repo_id, exc_info=True)
            self._finish(DownloadStatus.FAILED, describe_hub_error(exc))

    def _sweep_stale_partials(self) -> None:
        """Remove partial files a killed process left in this repo's blobs.
        huggingface_hub names them per process and cannot resume them; a live
        download writes its own at least every chunk, so an old one is dead."""
        blobs = hub_cache.repo_folder(self.repo_id, self.cache) / "blobs"
        horizon = time.time() - STALE_PARTIAL_SEC
        for partial in blobs.glob("*.incomplete") if blobs.is_dir() else []:
            with contextlib.suppress(OSError):
                if partial.stat().st_mtime < horizon:
                    partial.unlink()
                    log.info("removed stale partial download %s", partial)

    def _fetch(self, remote: RemoteFile) -> None:
        cached = try_to_load_from_cache(self.repo_id, remote.name, cache_dir=self.cache,
                                        revision=self.plan.commit)
        if isinstance(cached, str):  # finished earlier: never fetched twice
            with self._lock:
                self._done_bytes += remote.size
                self.bytes_reused += remote.size
                self.files_done += 1
            self._progressed()
            return
        self.current_file = remote.name
        with self._lock:
            self._file_bytes = 0
        path = Path(hf_hub_download(
            self.repo_id, remote.name, revision=self.plan.commit, cache_dir=self.cache,
            tqdm_class=cast(Any, lambda **kw: _ProgressHook(self, **kw))))
        self._verify(remote, path)
        with self._lock:
            self._done_bytes += remote.size
            self._file_bytes = 0
            self.files_done += 1
        self._progressed()

    def _verify(self, remote: RemoteFile, path: Path) -> None:
        try:
            problem = self._check(remote, path)
        except DownloadCancelled:
            # Never leave a file in the cache that was not verified: a later
            # download would reuse it as finished.
            self._discard(path)
            raise
        if problem is None:
            return
        self._discard(path)
        raise VerificationFailed(
            f"verification failed for {remote.name}: {problem}; the file was removed")

    @staticmethod
    def _discard(path: Path) -> None:
        """Remove a cached file: the snapshot link and the blob behind it."""
        blob = path.resolve()
        path.unlink(missing_ok=True)
        blob.unlink(missing_ok=True)

    def _check(self, remote: RemoteFile, path: Path) -> str | None:
        size = path.stat().st_size
        problem = None
        if size != remote.size:
            problem = f"size {size} bytes, the hub lists {remote.size}"
        elif remote.sha256:
            actual = file_sha256(path, self.cancel_requested)
            if actual != remote.sha256.lower():
                problem = f"sha256 {actual} does not match the published {remote.sha256}"
        elif remote.blob_id and len(remote.blob_id) == 40:
            actual = git_blob_sha1(path, size, self.cancel_requested)
            if actual != remote.blob_id.lower():
                problem = f"git blob id {actual} does not match the published {remote.blob_id}"
        return problem

    def _record_ref(self) -> None:
        """Point refs/<revision> at the commit, as huggingface_hub does when
        given a branch: files were fetched by commit hash (so one job never
        mixes two commits), which records no ref by itself."""
        if self.plan.revision == self.plan.commit:
            return
        ref = hub_cache.repo_folder(self.repo_id, self.cache) / "refs" / self.plan.revision
        ref.parent.mkdir(parents=True, exist_ok=True)
        tmp = ref.with_name(f".{ref.name}.{uuid.uuid4().hex[:6]}")
        tmp.write_text(self.plan.commit)
        os.replace(tmp, ref)

    def _finish(self, status: DownloadStatus, error: str | None) -> None:
        self.status = status
        self.error = error
        self.current_file = None if status is DownloadStatus.COMPLETED else self.current_file
        with self._lock:
            self._file_bytes = 0  # a partial file is discarded, never counted as done
        self.finished_at = time.time()
        data = self._event_data()
        if status is DownloadStatus.COMPLETED:
            self._emit("download_completed", data)
        else:
            data["reason"] = error
            self._emit("download_failed", data)
        log.info("download %s of %s: %s%s", self.id, self.repo_id, status,
                 f" ({error})" if error else "")
        with self._lock:
            self._ended = True
            callbacks = list(self._callbacks)
        for callback in callbacks:
            try:
                callback(self)
            except Exception:
                log.exception("download %s: completion callback failed", self.id)

    def add_done_callback(self, callback: Callable[[DownloadJob], None]) -> bool:
        """Call `callback(job)` from the job's thread when it ends; False
        (and no call) when it has already ended."""
        with self._lock:
            if self._ended:
                return False
            self._callbacks.append(callback)
            return True

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name=f"lmx-{self.id}", daemon=True)
        self._thread.start()

    def join(self, timeout: float) -> None:
        if self._thread is not None:
            self._thread.join(timeout)


def describe_hub_error(exc: BaseException) -> str:
    if isinstance(exc, GatedRepoError):
        return f"gated repository: access not granted ({exc})"
    if isinstance(exc, RepositoryNotFoundError):
        return "repository not found on the hub (or private and no valid HF_TOKEN)"
    if isinstance(exc, RevisionNotFoundError):
        return "revision not found on the hub"
    if isinstance(exc, HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else "?"
        return f"hub answered HTTP {status}: {str(exc).splitlines()[0]}"
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": ")


def matches(name: str, patterns: list[str] | None) -> bool:
    """allow_patterns as huggingface_hub reads them: fnmatch globs, and a
    pattern ending in "/" selects that folder."""
    if not patterns:
        return True
    return any(fnmatch.fnmatch(name, p + "*" if p.endswith("/") else p) for p in patterns)


def _remote_files(info: Any, allow_patterns: list[str] | None) -> list[RemoteFile]:
    files = []
    for sibling in info.siblings or []:
        if not matches(sibling.rfilename, allow_patterns):
            continue
        lfs = sibling.lfs
        size = lfs.size if lfs is not None else sibling.size
        files.append(RemoteFile(sibling.rfilename, int(size or 0),
                                lfs.sha256 if lfs is not None else None, sibling.blob_id))
    return files


class DownloadManager:
    """Every download of this process; lives on the event loop that created it.

    Jobs run in threads; their events and completion callbacks are handed to
    the loop with call_soon_threadsafe (the event bus is not thread-safe)."""

    def __init__(self, emit: EventEmitter, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._emit_on_loop = emit
        self._loop = loop or asyncio.get_running_loop()
        self._jobs: dict[str, DownloadJob] = {}
        # huggingface_hub reads this module constant on each download.
        hf_constants.DOWNLOAD_CHUNK_SIZE = CHUNK_BYTES

    @property
    def cache(self) -> Path:
        return hub_cache.cache_dir()

    def _emit(self, event: str, data: dict[str, Any]) -> None:
        with contextlib.suppress(RuntimeError):  # loop already closed at shutdown
            self._loop.call_soon_threadsafe(self._emit_on_loop, event, data)

    def get(self, download_id: str) -> DownloadJob | None:
        return self._jobs.get(download_id)

    def jobs(self) -> list[DownloadJob]:
        return list(self._jobs.values())

    def active_for(self, repo_id: str) -> DownloadJob | None:
        for job in self._jobs.values():
            if job.active and job.repo_id == repo_id:
                return job
        return None

    def plan(self, repo_id: str, revision: str | None,
             allow_patterns: list[str] | None) -> DownloadPlan:
        """Ask the hub what the download is (blocking: run it in a thread)."""
        try:
            info = HfApi().model_info(repo_id, revision=revision, files_metadata=True)
        except (RepositoryNotFoundError, RevisionNotFoundError) as exc:
            raise ModelNotFound(f"'{repo_id}' on the hub: {describe_hub_error(exc)}",
                                param="repo_id") from None
        except HfHubHTTPError as exc:
            if exc.response is not None and exc.response.status_code == 404:
                raise ModelNotFound(f"'{repo_id}' was not found on the hub",
                                    param="repo_id") from None
            raise HubUnavailable(f"model hub error for '{repo_id}': "
                                 f"{describe_hub_error(exc)}") from None
        except Exception as exc:  # connection refused, timeouts, malformed answers
            raise HubUnavailable(
                f"model hub unreachable at {hf_constants.ENDPOINT}: "
                f"{describe_hub_error(exc)}") from None
        commit = info.sha
        if not commit:
            raise HubUnavailable(f"the hub gave no commit for '{repo_id}'")
        files = _remote_files(info, allow_patterns)
        if not files:
            raise BadRequest(f"no file of '{repo_id}' matches allow_patterns {allow_patterns}",
                             param="allow_patterns")
        missing = sum(f.size for f in files if not isinstance(
            try_to_load_from_cache(repo_id, f.name, cache_dir=self.cache, revision=commit), str))
        return DownloadPlan(repo_id, revision or "main", commit, tuple(files), missing)

    async def start(self, repo_id: str, revision: str | None = None,
                    allow_patterns: list[str] | None = None) -> DownloadJob:
        if not hub_cache.valid_repo_id(repo_id):
            raise BadRequest(f"'{repo_id}' is not a hub repo id (expected 'org/name')",
                             param="repo_id")
        if revision is not None and (revision.startswith("/") or any(
                part in ("", ".", "..") for part in revision.split("/"))):
            # It names a file under refs/ in the cache: no way out of it.
            raise BadRequest(f"'{revision}' is not a valid revision", param="revision")
        existing = self.active_for(repo_id)
        if existing is not None and existing.allow_patterns == allow_patterns and (
                revision in (None, existing.plan.revision)):
            return existing
        plan = await asyncio.to_thread(self.plan, repo_id, revision, allow_patterns)
        self._check_space(plan)
        job = DownloadJob(plan, self.cache, self._emit, allow_patterns)
        self._jobs[job.id] = job
        self._forget_old()
        job.start()
        self._emit("download_progress", job._event_data())
        return job

    def _check_space(self, plan: DownloadPlan) -> None:
        # Bytes other running downloads are still going to write are as good as used.
        reserved = sum(max(0, j.bytes_total - j.bytes_done) for j in self._jobs.values()
                       if j.active)
        free = free_bytes(self.cache) - reserved
        if plan.missing_bytes > free:
            raise InsufficientStorage(
                f"Not enough disk space for '{plan.repo_id}': needs {plan.missing_bytes} bytes, "
                f"{max(free, 0)} free at {self.cache}")

    def when_finished(self, job: DownloadJob, callback: Callable[[DownloadJob], None]) -> None:
        """Run `callback(job)` on the event loop once the job ends (soon, if it has)."""
        def hand_over(done: DownloadJob) -> None:
            with contextlib.suppress(RuntimeError):  # loop closed at shutdown
                self._loop.call_soon_threadsafe(callback, done)

        if not job.add_done_callback(hand_over):
            self._loop.call_soon(callback, job)

    def cancel(self, download_id: str) -> DownloadJob | None:
        job = self._jobs.get(download_id)
        if job is not None and job.active:
            job.cancel_requested.set()
        return job

    def _forget_old(self) -> None:
        finished = [j for j in self._jobs.values() if not j.active]
        for job in finished[:-KEEP_FINISHED] if len(finished) > KEEP_FINISHED else []:
            self._jobs.pop(job.id, None)

    async def shutdown(self, timeout: float = 5.0) -> None:
        """On shutdown: cancel active downloads and let them stop."""
        active = [j for j in self._jobs.values() if j.active]
        for job in active:
            job.cancel_requested.set()
        if active:
            def join_all() -> None:
                for job in active:
                    job.join(timeout)

            await asyncio.to_thread(join_all)
