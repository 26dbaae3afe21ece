"""Starting and stopping one worker OS process.

Each worker runs in its own session (so its own process group): a signal for
the worker reaches whatever it spawned too, and a Ctrl-C aimed at the gateway
does not hit the workers before the gateway has drained them. A death pipe
ties the worker's life to ours (see lmx_worker.process.main.watch_parent).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import Mapping

from lmx_worker.process.heartbeat import RECORD, latest_progress
from lmx_worker.process.spec import WorkerSpec, encode_spec

# Environment a worker never needs (it serves local files, answers no HTTP):
# API keys and hub tokens stay in the gateway, out of a worker's reach.
_SECRET_NAMES = frozenset({"HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"})


def worker_environment(env: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items()
            if k not in _SECRET_NAMES and not k.startswith("LMX_SECURITY__")
            and not k.upper().endswith("_API_KEY")}


class WorkerProcess:
    def __init__(self, proc: asyncio.subprocess.Process, death_write_fd: int,
                 heartbeat_read_fd: int | None = None) -> None:
        self.proc = proc
        self.pid = proc.pid
        self._death_write_fd: int | None = death_write_fd
        # The heartbeat: when a record last arrived, and the worker's
        # progress counter in it (see lmx_worker.process.heartbeat).
        self.last_beat = time.monotonic()
        self.progress = 0
        # None: a child without a heartbeat (a quantize job).
        self._heartbeat_fd: int | None = heartbeat_read_fd
        if heartbeat_read_fd is not None:
            os.set_blocking(heartbeat_read_fd, False)
            asyncio.get_running_loop().add_reader(heartbeat_read_fd, self._read_heartbeat)
        self.exited: asyncio.Task[int] = asyncio.create_task(proc.wait(), name=f"wait-{proc.pid}")
        self.exited.add_done_callback(lambda _task: self._close_pipes())

    @classmethod
    async def spawn(cls, spec: WorkerSpec, env: Mapping[str, str] | None = None
                    ) -> WorkerProcess:
        read_fd, write_fd = os.pipe()
        beat_read_fd, beat_write_fd = os.pipe()
        os.set_inheritable(read_fd, True)
        os.set_inheritable(beat_write_fd, True)
        spec.death_fd = read_fd
        spec.heartbeat_fd = beat_write_fd
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "lmx_worker", "--spec", encode_spec(spec),
                stdin=asyncio.subprocess.DEVNULL,
                pass_fds=(read_fd, beat_write_fd),
                start_new_session=True,
                env=worker_environment(os.environ if env is None else env),
            )
        except BaseException:
            os.close(write_fd)
            os.close(beat_read_fd)
            raise
        finally:
            os.close(read_fd)
            os.close(beat_write_fd)
        return cls(proc, write_fd, beat_read_fd)

    def _read_heartbeat(self) -> None:
        if self._heartbeat_fd is None:
            return
        try:
            data = os.read(self._heartbeat_fd, RECORD.size * 512)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:  # EOF: the worker is gone; its exit is reported by `exited`
            self._close_heartbeat()
            return
        progress = latest_progress(data)
        if progress is not None:
            self.progress = progress
            self.last_beat = time.monotonic()

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    @property
    def node(self) -> str:
        return "local"

    def signal_group(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)

    async def terminate(self, grace_sec: float) -> int:
        """SIGTERM the group, then SIGKILL it if it has not exited in time."""
        if self.returncode is None:
            self.signal_group(signal.SIGTERM)
            try:
                return await asyncio.wait_for(asyncio.shield(self.exited), grace_sec)
            except TimeoutError:
                self.signal_group(signal.SIGKILL)
        return await self.exited

    def _close_pipes(self) -> None:
        if self._death_write_fd is not None:
            os.close(self._death_write_fd)
            self._death_write_fd = None
        self._close_heartbeat()

    def _close_heartbeat(self) -> None:
        if self._heartbeat_fd is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._heartbeat_fd)
            os.close(self._heartbeat_fd)
            self._heartbeat_fd = None
