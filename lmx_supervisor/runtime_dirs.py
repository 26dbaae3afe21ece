"""Runtime directories (the supervisor's ipc socket) outlive a gateway that
is SIGKILLed. Each one records its owner (pid and process start time, so a
reused pid is not mistaken for the owner); a new gateway removes those whose
owner is dead. Only directories this user owns, named like ours and holding
an owner file are touched."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from pathlib import Path

import psutil

log = logging.getLogger("lmx.supervisor")

OWNER_FILE = "owner.pid"
PREFIX = "lmx-"


def _start_time(pid: int) -> float | None:
    try:
        return float(psutil.Process(pid).create_time())
    except (psutil.Error, ValueError):
        return None


def claim_runtime_dir(directory: Path) -> None:
    pid = os.getpid()
    (directory / OWNER_FILE).write_text(f"{pid} {_start_time(pid) or 0}\n")


def _owner_alive(text: str) -> bool:
    try:
        pid_text, started_text = text.split()
        pid, started = int(pid_text), float(started_text)
    except ValueError:
        return True  # not ours to judge: leave it
    current = _start_time(pid)
    return current is not None and abs(current - started) < 1.0


def remove_stale_runtime_dirs(base: Path) -> list[Path]:
    removed: list[Path] = []
    uid = os.getuid()
    with contextlib.suppress(OSError):
        for entry in base.iterdir():
            if not entry.name.startswith(PREFIX):
                continue
            owner = entry / OWNER_FILE
            try:
                if entry.is_symlink() or entry.stat().st_uid != uid or not owner.is_file():
                    continue
                text = owner.read_text()
            except OSError:
                continue
            if _owner_alive(text):
                continue
            shutil.rmtree(entry, ignore_errors=True)
            log.info("removed runtime dir %s left by a gateway that is gone", entry)
            removed.append(entry)
    return removed
