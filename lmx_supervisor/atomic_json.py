"""JSON files that survive a crash at any instant: written to a temp file in
the same directory, fsynced, renamed over the old file (rename is atomic on
POSIX), and the directory fsynced so the rename itself is durable. A reader
therefore sees the old file or the new one, never half of either.

A file that does not parse anyway (edited by hand, disk trouble) is moved
aside with a warning rather than crashing the server that reads it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import msgspec

log = logging.getLogger("lmx.state")

T = TypeVar("T")
_TMP_MARK = ".tmp-"


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = msgspec.json.format(msgspec.json.encode(data), indent=2) + b"\n"
    tmp = path.with_name(f".{path.name}{_TMP_MARK}{os.getpid()}-{threading.get_ident()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(payload)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


def remove_stale_temp_files(path: Path) -> None:
    """Temp files left by a process killed mid-write (never the live file)."""
    for stale in path.parent.glob(f".{path.name}{_TMP_MARK}*"):
        with contextlib.suppress(OSError):
            stale.unlink()


def set_aside(path: Path, why: str) -> Path | None:
    aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}")
    try:
        os.replace(path, aside)
    except OSError as exc:
        log.warning("%s is unreadable (%s) and could not be moved aside: %s", path, why, exc)
        return None
    log.warning("%s is corrupt (%s); moved aside to %s, starting fresh", path, why, aside.name)
    return aside


def read_json_or_set_aside(path: Path, convert: Callable[[Any], T]) -> T | None:
    """The file's content converted by `convert`, or None when there is no
    file. A file that is not JSON, or whose content `convert` rejects, is
    moved aside to `<name>.corrupt-<time>-<pid>` and None is returned."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("cannot read %s: %s", path, exc)
        return None
    try:
        return convert(msgspec.json.decode(raw))
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError, TypeError) as exc:
        set_aside(path, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return None
