"""The worker process: connect, load, announce Ready, then run the step loop.

Single-threaded on purpose: the ZeroMQ socket is only touched from this
thread, and between two decode steps the loop drains every pending frame
without blocking, so an Abort is seen within one token.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import os
import resource
import signal
import sys
import threading
import traceback

import msgspec
import psutil
import zmq
import zmq.auth

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
    StepFrames,
    Tokens,
    WorkerStats,
    decode_from_supervisor,
    encode,
)
from lmx_protocol.messages import Frame
from lmx_worker.encoders.encoder_loop import EncoderFrame, serve_encoder_frames
from lmx_worker.engines.engine import Engine, RequestError, StepOutput
from lmx_worker.engines.loader import load_engine
from lmx_worker.process.exit_codes import EXIT_LOAD_FAILED, EXIT_OUT_OF_MEMORY
from lmx_worker.process.failpoints import Failpoints
from lmx_worker.process.heartbeat import Progress, start_heartbeat
from lmx_worker.process.spec import WorkerSpec

log = logging.getLogger("lmx.worker")

IDLE_POLL_MS = 1000
# Set aside at start and freed on MemoryError: with the cap reached, this is
# what lets the worker still encode and send its last frame.
BALLAST_BYTES = 8 * 1024 * 1024


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


PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Linux backstop to the death pipe: the kernel SIGKILLs this process
    when its parent dies, even if the pipe's reader thread is blocked (say,
    behind native code holding the GIL) and so never sees the EOF."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
        log.warning("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
        return
    if os.getppid() != parent or parent == 1:
        os._exit(0)  # the parent died before the signal was armed


class WorkerLoop:
    def __init__(self, spec: WorkerSpec, sock: zmq.Socket[bytes], engine: Engine,
                 progress: Progress | None = None) -> None:
        self.spec = spec
        # Bumped after every step and every frame: the heartbeat reports it,
        # so the supervisor can tell a busy worker from a stuck one.
        self.progress = progress or Progress()
        self.sock = sock
        self.engine = engine
        self.stats = WorkerStats()
        self.failpoints = Failpoints.for_spec(spec)
        self.shutting_down = False
        self._emitted: dict[str, int] = {}
        self._process = psutil.Process()
        # Embed/Rerank frames drained but not yet run (one batch per drain).
        self._encoder_frames: list[EncoderFrame] = []

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
                frames, self._encoder_frames = self._encoder_frames, []
                serve_encoder_frames(self.engine, frames, self.stats, self.send,
                                     self.failpoints)
                if frames:
                    self.progress.tick()
                return
            self.progress.tick()
            try:
                frame = decode_from_supervisor(raw)
            except msgspec.DecodeError as exc:
                self.send(Failed(ErrorCode.PROTOCOL, f"undecodable frame: {exc}"))
                continue
            try:
                self._handle(frame)
            except MemoryError:
                raise  # over the cap: serve() reports it and exits
            except Exception as exc:  # one frame's trouble is that request's alone
                rid = getattr(frame, "request_id", None)
                log.exception("handling a %s frame for %s failed", type(frame).__name__, rid)
                if isinstance(rid, str):
                    self._emitted.pop(rid, None)
                    self.send(_internal_failure(rid, "handling the request", exc))

    def _handle(self, frame: Generate | Abort | Ping | Shutdown | EncoderFrame) -> None:
        if isinstance(frame, EncoderFrame):
            if self.shutting_down:
                self.send(Failed(ErrorCode.INTERNAL, "worker is shutting down",
                                 request_id=frame.request_id))
            else:
                self._encoder_frames.append(frame)
            return
        if isinstance(frame, Generate):
            if self.shutting_down:
                self.send(Failed(ErrorCode.INTERNAL, "worker is shutting down",
                                 request_id=frame.request_id))
                return
            if self.failpoints:
                if self.failpoints.fails_generate:
                    self.send(Failed(ErrorCode.INTERNAL, "failpoint fail_generate",
                                     request_id=frame.request_id))
                    return
                self.failpoints.on_generate(frame)
            try:
                self.engine.add(frame)
            except RequestError as exc:
                self.send(Failed(ErrorCode(exc.code), exc.message, request_id=frame.request_id,
                                 param=exc.param))
                return
            except MemoryError:
                raise
            except Exception as exc:  # templating, tokenizing, constraining: this request only
                log.exception("admitting request %s failed", frame.request_id)
                self.send(_internal_failure(frame.request_id, "admitting the request", exc))
                return
            self.stats.requests_started += 1
            self._emitted[frame.request_id] = 0
        elif isinstance(frame, Abort):
            # A client gone before its batch ran: drop it, nothing to answer.
            self._encoder_frames = [f for f in self._encoder_frames
                                    if f.request_id != frame.request_id]
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
        try:
            if self.failpoints:
                self.failpoints.before_token(max(self._emitted.values(), default=0))
            outputs = self.engine.step()
        except MemoryError:
            raise  # the worker is over its cap: serve() reports it and exits
        except Exception as exc:  # not attributable to one request: fail the step's
            log.exception("engine step failed")
            outputs = [_internal_failure(request_id, "running a batched decode step", exc)
                       for request_id in self._emitted]
            # The batch's state (KV cache, sequences) is unknown now: start
            # clean in-process rather than let the next step build on it.
            self.engine.reset()
        self.progress.tick()
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
        if len(outputs) == 1:
            self.send(outputs[0])
        elif outputs:  # a batched step: one message for all its sequences
            self.send(StepFrames(outputs))

    def _snapshot(self) -> WorkerStats:
        self.engine.fill_stats(self.stats)
        self.stats.rss_bytes = self._process.memory_info().rss
        return msgspec.structs.replace(self.stats)


def _internal_failure(request_id: str, during: str, exc: Exception) -> Failed:
    return Failed(ErrorCode.INTERNAL,
                  f"internal error in request {request_id} while {during}: "
                  f"{type(exc).__name__}: {exc}", request_id=request_id)


def apply_memory_cap(cap_bytes: int | None) -> None:
    """Cap this process's private writable memory (RLIMIT_DATA: heap,
    anonymous mappings, thread stacks; not the read-only mapped model file).
    Past it, allocations fail: Python raises MemoryError, which serve()
    reports as out_of_memory before exiting, so only this model dies."""
    if cap_bytes is None:
        return
    _soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    if hard != resource.RLIM_INFINITY:
        cap_bytes = min(cap_bytes, hard)
    resource.setrlimit(resource.RLIMIT_DATA, (cap_bytes, hard))


def secure_dealer(sock: zmq.Socket[bytes], spec: WorkerSpec) -> None:
    """A worker on a node speaks CURVE to the supervisor with its node's keys."""
    if spec.curve_key_file is None or spec.curve_server_key is None:
        return
    public, secret = zmq.auth.load_certificate(spec.curve_key_file)
    if secret is None:
        raise ValueError(f"{spec.curve_key_file} holds no secret key")
    sock.curve_publickey = public
    sock.curve_secretkey = secret
    sock.curve_serverkey = spec.curve_server_key.encode()


def report_out_of_memory(sock: zmq.Socket[bytes], ballast: list[bytearray],
                         cap_bytes: int | None) -> int:
    ballast.clear()
    gc.collect()
    log.error("out of memory under the cap of %s bytes", cap_bytes)
    try:
        sock.send(encode(Failed(
            ErrorCode.OUT_OF_MEMORY,
            f"worker exceeded its memory cap ({cap_bytes} bytes)" if cap_bytes
            else "worker ran out of memory", fatal=True)))
    except Exception:  # nothing more to be done: the exit status still says it
        log.exception("could not send the out_of_memory frame")
    return EXIT_OUT_OF_MEMORY


def tool_format(engine: Engine) -> str:
    """How the model writes tool calls, read off its chat template (an
    engine without one, e.g. an encoder, has none)."""
    template = getattr(engine, "chat_template", None)
    return str(template.tool_support.format) if template is not None else ""


def serve(spec: WorkerSpec) -> int:
    if spec.death_fd is not None:
        watch_parent(spec.death_fd)
        die_with_parent()
    progress = Progress()
    if spec.heartbeat_fd is not None:
        start_heartbeat(spec.heartbeat_fd, spec.heartbeat_interval_sec, progress)
    apply_memory_cap(spec.memory_cap_bytes)
    ballast = [bytearray(BALLAST_BYTES)]
    ctx = zmq.Context()
    sock: zmq.Socket[bytes] = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, spec.worker_id.encode())
    sock.setsockopt(zmq.LINGER, 2000)
    secure_dealer(sock, spec)
    sock.connect(spec.address)
    try:
        Failpoints.for_spec(spec).on_load()
        engine = load_engine(spec)
    except Exception as exc:
        log.error("load failed: %s", exc)
        if isinstance(exc, MemoryError):
            ballast.clear()
        detail = "".join(traceback.format_exception_only(exc)).strip()
        code = ErrorCode.OUT_OF_MEMORY if isinstance(exc, MemoryError) else ErrorCode.LOAD_FAILED
        sock.send(encode(Failed(code, detail, fatal=True)))
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
        encoder=getattr(engine, "encoder_info", None),
        tool_format=tool_format(engine),
    )))
    try:
        WorkerLoop(spec, sock, engine, progress).run()
    except MemoryError:
        status = report_out_of_memory(sock, ballast, spec.memory_cap_bytes)
        sock.close(linger=2000)  # let the frame leave before the process does
        os._exit(status)  # no cleanup that could allocate: the exit says enough
    sock.close()
    ctx.term()
    return 0


def configure_logging() -> None:
    logging.basicConfig(
        stream=sys.stderr,
        level=os.environ.get("LMX_WORKER_LOG_LEVEL", "WARNING"),
        format=f"%(asctime)s worker[{os.getpid()}] %(levelname)s %(message)s",
    )
