"""Turns a worker's exit status into words an operator can act on."""

from __future__ import annotations

import signal


def describe_exit(returncode: int | None) -> str:
    """A negative return code is the signal that killed the process; SIGKILL
    from nobody we know of is, on a model host, almost always the kernel's
    OOM killer."""
    if returncode is None:
        return "still running"
    if returncode >= 0:
        return f"exited with code {returncode}"
    signum = -returncode
    try:
        name = signal.Signals(signum).name
    except ValueError:
        name = f"signal {signum}"
    if signum == signal.SIGKILL:
        return f"killed by {name} (probable out-of-memory kill)"
    return f"killed by {name}"


def killed_by_signal(returncode: int | None) -> bool:
    return returncode is not None and returncode < 0
