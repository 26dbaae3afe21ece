"""The workers one node agent runs: each in its own session (process
group), with a death pipe (EOF: the agent is gone, so the worker exits) and
a heartbeat pipe the agent reads and relays, as the supervisor does for
its local children (lmx_supervisor.workers.worker_process)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Callable, Mapping

from lmx_worker.process.heartbeat import RECORD, latest_progress
from lmx_worker.process.spec import WorkerSpec, encode_spec

BeatSink = Callable[[str, int], None]
ExitSink = Callable[[str, int], None]


class Child:
    def __init__(self, worker_id: str, proc: asyncio.subprocess.Process, death_write_fd: int,
                 beat_read_fd: int, on_beat: BeatSink, on_exit: ExitSink) -> None:
        self.worker_id = worker_id
        self.proc = proc
        self._death_fd: int | None = death_write_fd
        self._beat_fd: int | None = beat_read_fd
        self._on_beat = on_beat
        os.set_blocking(beat_read_fd, False)
        asyncio.get_running_loop().add_reader(beat_read_fd, self._read_beat)
        self.exited: asyncio.Task[int] = asyncio.create_task(proc.wait(),
                                                             name=f"node-wait-{proc.pid}")
        self.exited.add_done_callback(lambda task: self._finish(task, on_exit))

    def _read_beat(self) -> None:
        if self._beat_fd is None:
            return
        try:
            data = os.read(self._beat_fd, RECORD.size * 512)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._close_beat()
            return
        progress = latest_progress(data)
        if progress is not None:
            self._on_beat(self.worker_id, progress)

    def signal_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)

    async def terminate(self, grace_sec: float) -> None:
        if self.proc.returncode is None:
            self.signal_group(signal.SIGTERM)
            try:
                await asyncio.wait_for(asyncio.shield(self.exited), grace_sec)
            except TimeoutError:
                self.signal_group(signal.SIGKILL)
        await self.exited

    def _finish(self, task: asyncio.Task[int], on_exit: ExitSink) -> None:
        if self._death_fd is not None:
            os.close(self._death_fd)
            self._death_fd = None
        self._close_beat()
        on_exit(self.worker_id, task.result() if not task.cancelled() else -signal.SIGKILL)

    def _close_beat(self) -> None:
        if self._beat_fd is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._beat_fd)
            os.close(self._beat_fd)
            self._beat_fd = None


async def start_child(spec: WorkerSpec, env: Mapping[str, str], on_beat: BeatSink,
                      on_exit: ExitSink) -> Child:
    death_read, death_write = os.pipe()
    beat_read, beat_write = os.pipe()
    spec.death_fd = death_read
    spec.heartbeat_fd = beat_write
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "lmx_worker", "--spec", encode_spec(spec),
            stdin=asyncio.subprocess.DEVNULL, pass_fds=(death_read, beat_write),
            start_new_session=True, env=dict(env))
    except BaseException:
        os.close(death_write)
        os.close(beat_read)
        raise
    finally:
        os.close(death_read)
        os.close(beat_write)
    return Child(spec.worker_id, proc, death_write, beat_read, on_beat, on_exit)
