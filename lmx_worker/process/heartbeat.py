"""The worker's heartbeat: proof of life sent independently of the decode loop.

A thread of its own writes, every `interval` seconds, one fixed-size record
to a pipe only the supervisor reads: the loop's progress counter (bumped
after every decode step and every frame handled). The supervisor tells
"alive" from "dead" by whether records keep coming (a SIGSTOPped worker, or
native code spinning while it holds the GIL, sends none), and "busy" from
"stuck" by whether the counter moves while it has requests in flight. A
pipe rather than the ZeroMQ socket because zmq sockets are not thread-safe
and the decode thread owns that one.
"""

from __future__ import annotations

import os
import struct
import threading
import time

# One record: the progress counter, as an unsigned 64-bit little-endian int.
RECORD = struct.Struct("<Q")


class Progress:
    """A counter the decode loop bumps and the heartbeat thread reads (an int
    attribute: reads and writes are atomic under the GIL)."""

    def __init__(self) -> None:
        self.count = 0

    def tick(self) -> None:
        self.count += 1


def start_heartbeat(fd: int, interval_sec: float, progress: Progress) -> None:
    def beat() -> None:
        try:
            while True:
                os.write(fd, RECORD.pack(progress.count & 0xFFFFFFFFFFFFFFFF))
                time.sleep(interval_sec)
        except OSError:
            pass  # the supervisor is gone: the death pipe ends this process

    threading.Thread(target=beat, name="heartbeat", daemon=True).start()


def latest_progress(data: bytes) -> int | None:
    """The counter of the last complete record in `data` (None if none)."""
    whole = len(data) // RECORD.size
    if not whole:
        return None
    start = (whole - 1) * RECORD.size
    (count,) = RECORD.unpack_from(data, start)
    return int(count)
