"""Starting and stopping one worker OS process.

Each worker runs in its own session (so its own process group): a signal for
the worker reaches whatever it spawned too, and a Ctrl-C aimed at the gateway
does not hit the workers before the gateway has drained them. A death pipe
ties the worker's life to ours (see lmx_worker.main.watch_parent).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys

from lmx_worker.spec import WorkerSpec, encode_spec


class WorkerProcess:
    def __init__(self, proc: asyncio.subprocess.Process, death_write_fd: int) -> None:
        self.proc = proc
        self.pid = proc.pid
        self._death_write_fd: int | None = death_write_fd
        self.exited: asyncio.Task[int] = asyncio.create_task(proc.wait(), name=f"wait-{proc.pid}")
        self.exited.add_done_callback(lambda _task: self._close_death_pipe())

    @classmethod
    async def spawn(cls, spec: WorkerSpec, env: dict[str, str] | None = None) -> WorkerProcess:
        read_fd, write_fd = os.pipe()
        os.set_inheritable(read_fd, True)
        spec.death_fd = read_fd
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "lmx_worker", "--spec", encode_spec(spec),
                stdin=asyncio.subprocess.DEVNULL,
                pass_fds=(read_fd,),
                start_new_session=True,
                env=env,
            )
        except BaseException:
            os.close(write_fd)
            raise
        finally:
            os.close(read_fd)
        return cls(proc, write_fd)

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

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

    def _close_death_pipe(self) -> None:
        if self._death_write_fd is not None:
            os.close(self._death_write_fd)
            self._death_write_fd = None
