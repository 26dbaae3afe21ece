"""The worker process: connect, load, announce Ready, then run the step loop.

Single-threaded on purpose: the ZeroMQ socket is only touched from this
thread, and between two decode steps the loop drains every pending frame
without blocking, so an Abort is seen within one token.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import traceback

import msgspec
import psutil
import zmq

from lmx_protocol import (
    PROTOCOL_VERSION,
    Abort,
    ErrorCode,
    Failed,
    Generate,
    Ping,
    Pong,
    Ready,
    Shutdown,
    Tokens,
    WorkerStats,
    decode_from_supervisor,
    encode,
)
from lmx_protocol.messages import Frame
from lmx_worker.engine import Engine, RequestError, StepOutput
from lmx_worker.failpoints import Failpoints
from lmx_worker.loader import load_engine
from lmx_worker.spec import WorkerSpec

log = logging.getLogger("lmx.worker")

IDLE_POLL_MS = 1000
EXIT_LOAD_FAILED = 3


def watch_parent(death_fd: int) -> None:
    """Exit as soon as the parent dies, so no orphan keeps gigabytes of
    weights resident. The parent holds the only write end of the pipe; the
    kernel closes it when the parent dies however it dies, even SIGKILL."""

    def wait_for_eof() -> None:
        try:
            while os.read(death_fd, 1):
                pass
        except OSError:
            pass
        os._exit(0)

    threading.Thread(target=wait_for_eof, name="death-pipe", daemon=True).start()


class WorkerLoop:
    def __init__(self, spec: WorkerSpec, sock: zmq.Socket[bytes], engine: Engine) -> None:
        self.spec = spec
        self.sock = sock
        self.engine = engine
        self.stats = WorkerStats()
        self.failpoints = Failpoints.from_env(spec.model_id)
        self.shutting_down = False
        self._emitted: dict[str, int] = {}
        self._process = psutil.Process()

    def send(self, frame: Frame) -> None:
        self.sock.send(encode(frame), copy=False)

    def run(self) -> None:
        while True:
            busy = self.engine.has_work()
            if self.shutting_down and not busy:
                return
            if self.sock.poll(0 if busy else IDLE_POLL_MS):
                self._drain_inbox()
            if self.engine.has_work():
                self._step()

    def _drain_inbox(self) -> None:
        while True:
            try:
                raw = self.sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                frame = decode_from_supervisor(raw)
            except msgspec.DecodeError as exc:
                self.send(Failed(ErrorCode.PROTOCOL, f"undecodable frame: {exc}"))
                continue
            self._handle(frame)

    def _handle(self, frame: Generate | Abort | Ping | Shutdown) -> None:
        if isinstance(frame, Generate):
            if self.shutting_down:
                self.send(Failed(ErrorCode.INTERNAL, "worker is shutting down",
                                 request_id=frame.request_id))
                return
            try:
                self.engine.add(frame)
            except RequestError as exc:
                self.send(Failed(ErrorCode(exc.code), exc.message, request_id=frame.request_id))
                return
            self.stats.requests_started += 1
            self._emitted[frame.request_id] = 0
        elif isinstance(frame, Abort):
            outputs = self.engine.abort(frame.request_id)
            if outputs:
                self.stats.requests_aborted += 1
            self._forward(outputs)
        elif isinstance(frame, Ping):
            self.send(Pong(frame.nonce, self._snapshot()))
        else:
            self.shutting_down = True
            if not frame.drain:
                for request_id in list(self._emitted):
                    self._forward(self.engine.abort(request_id))

    def _step(self) -> None:
        if self.failpoints:
            self.failpoints.before_token(max(self._emitted.values(), default=0))
        try:
            outputs = self.engine.step()
        except Exception as exc:  # a backend bug must not kill other requests silently
            log.exception("engine step failed")
            outputs = []
            for request_id in list(self._emitted):
                outputs.extend(self.engine.abort(request_id))
                outputs.append(Failed(ErrorCode.INTERNAL, f"engine step failed: {exc}",
                                      request_id=request_id))
        self._forward(outputs)

    def _forward(self, outputs: list[StepOutput]) -> None:
        for out in outputs:
            if isinstance(out, Failed):
                if out.request_id is not None:
                    self._emitted.pop(out.request_id, None)
            elif out.request_id in self._emitted:
                if isinstance(out, Tokens):
                    self._emitted[out.request_id] += len(out.token_ids)
                    self.stats.tokens_generated += len(out.token_ids)
                else:
                    self.stats.requests_finished += 1
                    self.stats.prompt_tokens += out.prompt_tokens
                    del self._emitted[out.request_id]
            self.send(out)

    def _snapshot(self) -> WorkerStats:
        self.engine.fill_stats(self.stats)
        self.stats.rss_bytes = self._process.memory_info().rss
        return msgspec.structs.replace(self.stats)


def serve(spec: WorkerSpec) -> int:
    if spec.death_fd is not None:
        watch_parent(spec.death_fd)
    ctx = zmq.Context()
    sock: zmq.Socket[bytes] = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, spec.worker_id.encode())
    sock.setsockopt(zmq.LINGER, 2000)
    sock.connect(spec.address)
    try:
        Failpoints.from_env(spec.model_id).on_load()
        engine = load_engine(spec)
    except Exception as exc:
        log.error("load failed: %s", exc)
        detail = "".join(traceback.format_exception_only(exc)).strip()
        sock.send(encode(Failed(ErrorCode.LOAD_FAILED, detail, fatal=True)))
        sock.close()
        ctx.term()
        return EXIT_LOAD_FAILED
    sock.send(encode(Ready(
        protocol_version=PROTOCOL_VERSION,
        worker_id=spec.worker_id,
        model_id=spec.model_id,
        backend=engine.backend,
        pid=os.getpid(),
        capabilities=engine.capabilities,
        memory_bytes=engine.memory_bytes(),
        context_length=engine.context_length,
        backend_version=engine.backend_version,
    )))
    WorkerLoop(spec, sock, engine).run()
    sock.close()
    ctx.term()
    return 0


def configure_logging() -> None:
    logging.basicConfig(
        stream=sys.stderr,
        level=os.environ.get("LMX_WORKER_LOG_LEVEL", "WARNING"),
        format=f"%(asctime)s worker[{os.getpid()}] %(levelname)s %(message)s",
    )
