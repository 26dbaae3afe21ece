"""One model's worker, supervised: spawn, wait for Ready, route frames to the
requests waiting on them, restart after crashes, quarantine crash loops,
stop on request. All state changes go through the transition table."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import secrets
import signal
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lmx_protocol import (
    PROTOCOL_VERSION,
    Abort,
    Embed,
    Embeddings,
    ErrorCode,
    Failed,
    Finished,
    FromWorker,
    Generate,
    Ping,
    Pong,
    Ready,
    Rerank,
    SamplingParams,
    Scores,
    Shutdown,
    Tokens,
    WorkerStats,
)
from lmx_supervisor.errors import (
    BadRequest,
    LMXError,
    LoadFailed,
    ModelUnavailable,
    NodeUnreachable,
    QueueFull,
    RateLimited,
    RequestQuarantined,
    WorkerCrashed,
    WorkerError,
    WorkerUnresponsive,
)
from lmx_supervisor.lifecycle.admission import AdmissionGate, AdmissionQueueFull, AdmissionTimeout
from lmx_supervisor.lifecycle.exit_causes import describe_exit
from lmx_supervisor.lifecycle.poison import PoisonRegistry, fingerprint
from lmx_supervisor.lifecycle.restart_policy import CrashHistory, backoff_delay
from lmx_supervisor.lifecycle.restart_progress import RestartProgress
from lmx_supervisor.lifecycle.states import ModelState, check_transition
from lmx_supervisor.memory.memory_estimate import MemoryEstimate
from lmx_supervisor.memory.process_memory import WorkerMemory
from lmx_supervisor.workers.transport import PeerGone, RouterHub
from lmx_supervisor.workers.worker_handle import HostUnreachable, Placement, WorkerHandle
from lmx_worker.process.exit_codes import EXIT_OUT_OF_MEMORY
from lmx_worker.process.spec import WorkerSpec

log = logging.getLogger("lmx.supervisor")

EventSink = Callable[[str, dict[str, Any]], object]
# What a request's queue carries: worker frames, or the error that ends it.
Item = Tokens | Finished | Failed | LMXError | Embeddings | Scores

# Worker-side request failures that are the client's fault.
CLIENT_ERROR_CODES = {"invalid_request", "context_length_exceeded", "unsupported_feature"}

# Deaths that, close to the worker's memory cap, mean it ran out of memory:
# the kernel's OOM kill, or a failed allocation in C code (abort/segfault).
OOM_SIGNALS = frozenset({signal.SIGKILL, signal.SIGSEGV, signal.SIGABRT, signal.SIGBUS})
NEAR_CAP = 0.9
WARMUP_PROMPT = "Hello"


@dataclass
class ModelSettings:
    loader_timeout_sec: float = 120
    max_concurrent_requests: int = 4
    semaphore_timeout_sec: float = 30
    crash_loop_max_crashes: int = 3
    crash_loop_window_sec: float = 60
    restart_backoff_initial_sec: float = 0.25
    restart_backoff_max_sec: float = 10
    stop_grace_sec: float = 5
    # One-token generation before the model is marked ready (a restart too).
    warmup_on_load: bool = False
    context_length: int = 4096
    n_threads: int | None = None
    parallel_slots: int = 1
    mlx_dequantize: Literal["auto"] | bool = "auto"
    # Performance settings (lmx_supervisor/tuning/performance.py): None = backend default.
    n_threads_batch: int | None = None
    n_batch: int | None = None
    flash_attn: bool | None = None
    kv_cache_type: Literal["f16", "q8_0", "q4_0"] = "f16"
    # Which values came from the model's profile or the load's overrides.
    performance_sources: dict[str, str] = field(default_factory=dict)
    max_queued_requests: int = 64
    worker_heartbeat_timeout_sec: float = 10
    worker_stall_timeout_sec: float = 300
    max_inter_token_ms: float = 250.0


@dataclass
class _Exchange:
    queue: asyncio.Queue[Item]
    done: bool = False  # the worker sent its final answer: nothing to abort


def _failure(item: Item) -> LMXError:
    """The error for a worker answer that is not the one asked for."""
    if isinstance(item, LMXError):
        return item
    if isinstance(item, Failed):
        if item.code in CLIENT_ERROR_CODES:
            return BadRequest(item.message, code=str(item.code), param=item.param)
        return WorkerError(item.message, code=str(item.code))
    return WorkerError(f"worker answered with a {type(item).__name__} frame")


class ManagedModel:
    _spawn_counter = itertools.count(1)

    def __init__(
        self,
        model_id: str,
        path: Path,
        backend: str,
        settings: ModelSettings,
        placement: Placement,
        history: CrashHistory,
        emit: EventSink,
        worker_env: dict[str, str] | None = None,
        poison: PoisonRegistry | None = None,
    ) -> None:
        self.model_id = model_id
        self.path = path
        self.backend = backend
        self.settings = settings
        self.history = history
        # Where this model's workers start (this host or a node agent's);
        # the supervisor may change it before a load (placement, re-placement).
        self.placement = placement
        self.worker_hub: RouterHub = placement.hub
        self._emit = emit
        self._worker_env = worker_env
        self.state = ModelState.STOPPED
        self.reason: str | None = None
        self.worker: WorkerHandle | None = None
        self.worker_id: str | None = None
        self.ready: Ready | None = None
        self.restarts = 0
        self.loaded_at: float | None = None
        self.last_used = time.monotonic()
        # Idle seconds before the TTL unloads this model, set by a client
        # (Ollama's keep_alive); negative: never. None: memory.ttl_* decide.
        self.keep_alive_sec: float | None = None
        self.gate = AdmissionGate(settings.max_concurrent_requests,
                                  settings.max_queued_requests)
        self.poison = poison or PoisonRegistry(settings.crash_loop_window_sec, 600, 256)
        self._changed = asyncio.Event()
        self._inflight: dict[str, asyncio.Queue[Item]] = {}
        # The fingerprint of each request sent to the worker and not yet
        # answered: recorded if the worker dies; what the stall check waits on.
        self._fingerprints: dict[str, str] = {}
        self._monitor_task: asyncio.Task[None] | None = None
        # Set when the heartbeat monitor kills a hung worker: why, and what
        # was in flight then (those requests have already been failed).
        self._hung_cause: str | None = None
        self._hung_fingerprints: set[str] = set()
        # Background tasks of this model that failed (for /readyz); cleared
        # when a new worker becomes ready.
        self.task_failures: list[str] = []
        self._idle = asyncio.Event()
        self._idle.set()
        self._startup: asyncio.Future[Ready | Failed] | None = None
        self._pings: dict[int, asyncio.Future[WorkerStats]] = {}
        self._ping_nonce = itertools.count(1)
        self._watch_task: asyncio.Task[None] | None = None
        self._restart_task: asyncio.Task[None] | None = None
        # Set by the supervisor's memory guard before load(): what the model
        # should need, the RLIMIT_DATA its workers run under, and the last
        # sample of the worker's memory the guard took.
        self.memory_estimate: MemoryEstimate | None = None
        self.memory_cap_bytes: int | None = None
        self.memory_sample: WorkerMemory | None = None
        self._oom_reported = False
        # A restart in progress (lmx_supervisor.lifecycle.restart): shown in
        # /admin/models, keeps TTL/LRU eviction away. While set, a crash of
        # the serving worker goes to `crash_hook`, which may hand the model
        # to the replacement instead of restarting the old settings.
        self.restart: RestartProgress | None = None
        self.crash_hook: Callable[[str], bool] | None = None
        # Spawn-time settings the operator chose for this model (load
        # performance_overrides, restart settings); kept across restarts
        # of the server by the runtime state file.
        self.spawn_overrides: dict[str, Any] = {}

    # --- state ------------------------------------------------------------

    def _set_state(self, target: ModelState, reason: str | None = None) -> None:
        check_transition(self.state, target)
        previous, self.state, self.reason = self.state, target, reason
        log.info("model %s: %s -> %s%s", self.model_id, previous, target,
                 f" ({reason})" if reason else "")
        self._emit("model_state", {"model_id": self.model_id, "from": previous,
                                   "to": target, "reason": reason})
        # Wake every waiter on every settled transition, then arm a new event.
        self._changed.set()
        self._changed = asyncio.Event()

    @property
    def in_flight(self) -> int:
        return len(self._inflight)

    @property
    def pid(self) -> int | None:
        return self.worker.pid if self.worker and self.worker.returncode is None else None

    # --- loading ----------------------------------------------------------

    async def load(self) -> None:
        """Explicit load: start the worker and wait for it. A failure counts
        as a crash; too many crashes quarantine the model."""
        try:
            await self._launch()
        except LoadFailed as exc:
            self._after_failed_start(exc)
            raise

    def _after_failed_start(self, exc: LoadFailed) -> None:
        crashes = self.history.record()
        if crashes >= self.settings.crash_loop_max_crashes:
            self._set_state(ModelState.QUARANTINED, f"crash_loop:{crashes}")
            self._emit("model_quarantined", {"model_id": self.model_id, "reason": exc.message})
        else:
            self._set_state(ModelState.STOPPED, exc.message)

    async def _launch(self) -> None:
        self._set_state(ModelState.STARTING)
        self._oom_reported = False
        self.memory_sample = None
        try:
            await self._spawn_and_wait()
        except asyncio.CancelledError:
            # Cancelled mid-load (unload during a restart): never leak a
            # half-loaded worker.
            await self._discard_worker()
            raise
        except LoadFailed as exc:
            self.ready = None
            self._emit("model_load_failed", {"model_id": self.model_id, "backend": self.backend,
                                             "path": str(self.path), "code": exc.code,
                                             "reason": exc.message})
            raise

    async def _spawn_and_wait(self) -> None:
        worker_id = f"{self.model_id}#{next(self._spawn_counter)}-{secrets.token_hex(3)}"
        self.worker_id = worker_id
        loop = asyncio.get_running_loop()
        startup: asyncio.Future[Ready | Failed] = loop.create_future()
        self._startup = startup
        # Frames go to (and the id is later unregistered from) the hub this
        # worker connected to, even after the placement has changed.
        self.worker_hub = self.placement.hub
        self.worker_hub.register(worker_id, self._on_frame)
        spec = WorkerSpec(
            worker_id=worker_id, model_id=self.model_id, model_path=str(self.path),
            backend=self.backend, address=self.placement.hub.address,
            context_length=self.settings.context_length, n_threads=self.settings.n_threads,
            memory_cap_bytes=self.memory_cap_bytes,
            parallel_slots=self.settings.parallel_slots,
            mlx_dequantize=self.settings.mlx_dequantize,
            n_threads_batch=self.settings.n_threads_batch, n_batch=self.settings.n_batch,
            flash_attn=self.settings.flash_attn, kv_cache_type=self.settings.kv_cache_type,
            # Several beats per timeout: one late beat on a loaded machine
            # must not read as a hang.
            heartbeat_interval_sec=min(1.0, self.settings.worker_heartbeat_timeout_sec / 5),
            max_inter_token_ms=self.settings.max_inter_token_ms,
        )
        started = time.monotonic()
        try:
            worker = await self.placement.spawn(spec, self._worker_env)
        except HostUnreachable as exc:
            raise LoadFailed(f"cannot start a worker: {exc}", code="node_unreachable") from exc
        except OSError as exc:
            raise LoadFailed(f"cannot start a worker: {exc}") from exc
        self.worker = worker
        # Wait on the socket and the process together: a segfault while
        # loading is reported at once, with its signal, not as a timeout.
        waiters: set[asyncio.Future[Any]] = {startup, worker.exited}
        done, _ = await asyncio.wait(
            waiters, timeout=self.settings.loader_timeout_sec,
            return_when=asyncio.FIRST_COMPLETED,
        )
        if startup in done and isinstance(startup.result(), Ready):
            ready = startup.result()
            assert isinstance(ready, Ready)
            if ready.protocol_version != PROTOCOL_VERSION:
                await self._discard_worker()
                raise LoadFailed(f"worker speaks protocol {ready.protocol_version}, "
                                   f"supervisor {PROTOCOL_VERSION}", code="model_probe_failed")
            if self.settings.warmup_on_load:
                await self._warm_up(worker, ready.capabilities)
            self.ready = ready
            self.task_failures = []
            self.loaded_at = time.time()
            self.last_used = time.monotonic()  # idle (TTL, LRU) counts from ready
            self._set_state(ModelState.READY)
            self._watch_task = asyncio.create_task(self._watch(worker), name=f"watch-{worker_id}")
            self._monitor_task = asyncio.create_task(self._monitor(worker),
                                                     name=f"heartbeat-{worker_id}")
            for task in (self._watch_task, self._monitor_task):
                task.add_done_callback(self._note_task_failure)
            self._emit("model_loaded", {"model_id": self.model_id, "pid": worker.pid,
                                        "backend": self.backend,
                                        "load_time_sec": round(time.monotonic() - started, 3),
                                        "memory_bytes": ready.memory_bytes,
                                        "backend_version": ready.backend_version,
                                        "path": str(self.path),
                                        "memory_estimate_bytes": self.memory_estimate.total_bytes
                                        if self.memory_estimate else None,
                                        "memory_cap_bytes": self.memory_cap_bytes})
            return
        if not done:
            await self._discard_worker()
            raise LoadFailed(
                f"Model '{self.model_id}' did not load within "
                f"{self.settings.loader_timeout_sec:g}s (worker killed)",
                code="model_load_timeout")
        detail = ""
        if startup.done() and isinstance(startup.result(), Failed):
            failed = startup.result()
            assert isinstance(failed, Failed)
            detail = f": {failed.message}"
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(worker.exited), self.settings.stop_grace_sec)
        await self._discard_worker()
        raise LoadFailed(
            f"Loader for '{self.model_id}' crashed: worker {describe_exit(worker.returncode)}"
            f"{detail}", code="model_loader_crashed")

    async def _warm_up(self, worker: WorkerHandle, capabilities: list[str]) -> None:
        """The canary: one token from the freshly loaded worker before any
        client is routed to it. A model that loads but cannot generate is
        refused here (409 model_canary_failed) and its worker stopped."""
        request = Generate(request_id=f"warmup-{secrets.token_hex(4)}",
                           params=SamplingParams(max_tokens=1, temperature=0.0),
                           prompt=WARMUP_PROMPT)

        async def one_token() -> None:
            # An encoder has no tokens to give: one embedding or one score.
            if "embeddings" in capabilities:
                await self._call(Embed(request.request_id, texts=[WARMUP_PROMPT]))
            elif "rerank" in capabilities:
                await self._call(Rerank(request.request_id, WARMUP_PROMPT, [WARMUP_PROMPT]))
            else:
                async for _item in self._run(request):
                    pass

        task = asyncio.create_task(one_token(), name=f"warmup-{self.model_id}")
        problem: str | None = None
        try:
            done, _ = await asyncio.wait({task, worker.exited},
                                         timeout=self.settings.loader_timeout_sec,
                                         return_when=asyncio.FIRST_COMPLETED)
            if task in done:
                task.result()
            elif worker.exited in done:
                problem = f"worker {describe_exit(worker.returncode)}"
            else:
                problem = f"no token within {self.settings.loader_timeout_sec:g}s"
        except LMXError as exc:
            problem = exc.message
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, LMXError):
                await task
        if problem is not None:
            await self._discard_worker()
            raise LoadFailed(f"Model '{self.model_id}' loaded but its warm-up generation "
                               f"failed: {problem}", code="model_canary_failed")

    async def _discard_worker(self) -> None:
        worker, self.worker = self.worker, None
        if worker is not None:
            await worker.terminate(self.settings.stop_grace_sec)
        if self.worker_id is not None:
            self.worker_hub.unregister(self.worker_id)
        self._startup = None

    # --- crashes and restarts ---------------------------------------------

    async def _watch(self, worker: WorkerHandle) -> None:
        returncode = await worker.exited
        if self.worker is not worker or self.state is not ModelState.READY:
            return  # an intended stop
        hung, self._hung_cause = self._hung_cause, None
        suspects = set(self._fingerprints.values()) | self._hung_fingerprints
        self._hung_fingerprints = set()
        cause = describe_exit(returncode) if hung is None else hung
        oom = hung is None and self._died_of_oom(returncode)
        if oom:
            cause = f"exceeded its memory cap of {self.memory_cap_bytes} bytes ({cause})"
        log.error("model %s: worker pid %d %s", self.model_id, worker.pid, cause)
        if oom:
            self._fail_inflight(WorkerCrashed(
                f"Model '{self.model_id}' was unloaded: its worker {cause}",
                code="oom-unloaded"))
        else:
            self._fail_inflight(WorkerCrashed(f"Worker for model '{self.model_id}' {cause}"))
        await self._discard_worker()
        self._emit("worker_crashed", {"model_id": self.model_id, "pid": worker.pid,
                                      "cause": cause, "returncode": returncode, "oom": oom})
        if oom:
            self._unload_after_oom(worker.pid, cause)
            return
        if self.crash_hook is not None and self.crash_hook(cause):
            return
        now = time.monotonic()
        self._handle_crash(cause, self._blame_requests(suspects, now), now)

    def _blame_requests(self, suspects: set[str], now: float) -> bool:
        """Record the crash against the requests in flight; True if it is a
        poison request's (then it does not count against the model)."""
        newly, earlier = self.poison.record_crash(self.model_id, suspects, now)
        if not newly:
            return False
        self.history.forget(earlier)
        for entry in newly:
            log.error("model %s: request %s quarantined for %gs (in flight at %d crashes)",
                      self.model_id, entry.fingerprint, self.poison.quarantine_sec,
                      entry.crashes)
            self._emit("request_quarantined", {
                "model_id": self.model_id, "fingerprint": entry.fingerprint,
                "crashes": entry.crashes, "quarantine_sec": self.poison.quarantine_sec})
        return True

    async def _monitor(self, worker: WorkerHandle) -> None:
        """Tell a hung worker from a busy one: its heartbeat thread writes
        every second or so whatever the decode loop does, and its progress
        counter moves with every step. Silent past the heartbeat timeout, or
        no progress with requests in flight past the stall timeout: its
        requests end with 503 worker_unresponsive and it is SIGKILLed (a
        SIGSTOPped process ignores SIGTERM); _watch then restarts it."""
        progress, moved_at = worker.progress, time.monotonic()
        while self.worker is worker and worker.returncode is None:
            timeout = self.settings.worker_heartbeat_timeout_sec
            await asyncio.sleep(min(1.0, timeout / 4))
            if self.worker is not worker or self.state is not ModelState.READY:
                return
            now = time.monotonic()
            if worker.progress != progress or not self._fingerprints:
                progress, moved_at = worker.progress, now
            silent = now - worker.last_beat
            if silent > timeout:
                self._declare_hung(worker, f"stopped answering its heartbeat ({silent:.1f}s)")
                return
            stalled = now - moved_at
            if stalled > self.settings.worker_stall_timeout_sec:
                self._declare_hung(worker, f"made no progress for {stalled:.0f}s with "
                                           f"{len(self._fingerprints)} requests in flight")
                return

    def _note_task_failure(self, task: asyncio.Task[None]) -> None:
        """The crash watcher and the heartbeat monitor must not die
        silently: a failure is logged and kept for /readyz (the model's
        crashes or hangs would go unnoticed until its next load)."""
        if task.cancelled() or task.exception() is None:
            return
        exc = task.exception()
        log.error("model %s: %s failed", self.model_id, task.get_name(), exc_info=exc)
        self.task_failures.append(f"model {self.model_id}: {task.get_name()} failed: "
                                  f"{type(exc).__name__}: {exc}")
        del self.task_failures[:-5]

    def _declare_hung(self, worker: WorkerHandle, why: str) -> None:
        cause = f"was unresponsive: {why}; killed"
        log.error("model %s: worker pid %d %s", self.model_id, worker.pid, cause)
        self._hung_cause = cause
        self._hung_fingerprints = set(self._fingerprints.values())
        self._fail_inflight(WorkerUnresponsive(
            f"Worker for model '{self.model_id}' {cause} and is being restarted; retry shortly",
            retry_after_sec=2))
        self._emit("worker_unresponsive", {"model_id": self.model_id, "pid": worker.pid,
                                           "reason": why})
        worker.signal_group(signal.SIGKILL)

    def _died_of_oom(self, returncode: int | None) -> bool:
        if self._oom_reported or returncode == EXIT_OUT_OF_MEMORY:
            return True
        cap, sample = self.memory_cap_bytes, self.memory_sample
        if cap is None or sample is None or returncode is None or returncode >= 0:
            return False
        return -returncode in OOM_SIGNALS and sample.data >= NEAR_CAP * cap

    def _unload_after_oom(self, pid: int, cause: str) -> None:
        """A runaway is not restarted (it would run away again): the model
        is unloaded and the operator told, and the other models go on."""
        self._emit("memory_warning", {"reason": "worker_out_of_memory",
                                      "model_id": self.model_id, "pid": pid,
                                      "memory_cap_bytes": self.memory_cap_bytes,
                                      "detail": cause})
        self._set_state(ModelState.STOPPING, "oom-unloaded")
        self._set_state(ModelState.STOPPED, "oom-unloaded")
        self._emit("model_unloaded", {"model_id": self.model_id, "reason": "oom"})

    def _handle_crash(self, cause: str, poison: bool = False, now: float | None = None
                      ) -> None:
        # A quarantined poison request's crash is not the model's: not counted.
        crashes = self.history.recent(now) if poison else self.history.record(now)
        if crashes >= self.settings.crash_loop_max_crashes:
            self._set_state(ModelState.QUARANTINED, f"crash_loop:{crashes}")
            self._emit("model_quarantined", {"model_id": self.model_id, "reason": cause})
            return
        self._set_state(ModelState.BACKOFF, cause)
        delay = backoff_delay(crashes, self.settings.restart_backoff_initial_sec,
                              self.settings.restart_backoff_max_sec)
        self._restart_task = asyncio.create_task(self._restart_after(delay),
                                                 name=f"restart-{self.model_id}")

    async def _restart_after(self, delay: float) -> None:
        await asyncio.sleep(delay)
        try:
            await self._launch()
        except LoadFailed as exc:
            log.error("model %s: restart failed: %s", self.model_id, exc.message)
            self._after_failed_relaunch(exc)
            return
        self.restarts += 1
        self._emit("worker_restarted", {"model_id": self.model_id, "restarts": self.restarts})

    # --- frames -------------------------------------------------------------

    def _on_frame(self, frame: FromWorker) -> None:
        if isinstance(frame, (Finished, Embeddings, Scores, Failed)) and frame.request_id:
            # Answered: the worker owes it nothing more, so it is neither a
            # crash suspect nor work the stall check waits on (its client
            # may still be reading the queued frames slowly).
            self._fingerprints.pop(frame.request_id, None)
        if isinstance(frame, (Tokens, Finished, Embeddings, Scores)):
            queue = self._inflight.get(frame.request_id)
            if queue is not None:
                queue.put_nowait(frame)
        elif isinstance(frame, Failed):
            if frame.request_id is not None:
                queue = self._inflight.get(frame.request_id)
                if queue is not None:
                    queue.put_nowait(frame)
            elif self._startup is not None and not self._startup.done():
                self._startup.set_result(frame)
            else:
                if frame.code == ErrorCode.OUT_OF_MEMORY:
                    self._oom_reported = True  # its exit follows; _watch unloads
                log.error("model %s: worker reported %s: %s", self.model_id, frame.code,
                          frame.message)
        elif isinstance(frame, Ready):
            if self._startup is not None and not self._startup.done():
                self._startup.set_result(frame)
        elif isinstance(frame, Pong):
            fut = self._pings.pop(frame.nonce, None)
            if fut is not None and not fut.done():
                fut.set_result(frame.stats)

    def _fail_inflight(self, error: LMXError) -> None:
        for queue in self._inflight.values():
            queue.put_nowait(error)

    # --- requests -----------------------------------------------------------

    async def _wait_ready(self, deadline: float) -> None:
        while self.state is not ModelState.READY:
            if self.state is ModelState.UNAVAILABLE:
                raise NodeUnreachable(
                    f"Model '{self.model_id}' is unavailable: node '{self.placement.node}' "
                    "it runs on is unreachable", retry_after_sec=5)
            if self.state not in (ModelState.STARTING, ModelState.BACKOFF):
                raise ModelUnavailable(
                    f"Model '{self.model_id}' is {self.state}"
                    + (f" ({self.reason})" if self.reason else ""),
                    code="model_unstable" if self.state is ModelState.QUARANTINED
                    else "model_unavailable")
            remaining = deadline - time.monotonic()
            changed = self._changed
            try:
                await asyncio.wait_for(changed.wait(), max(remaining, 0))
            except TimeoutError:
                raise ModelUnavailable(
                    f"Model '{self.model_id}' is still {self.state}; try again shortly",
                    retry_after_sec=5) from None

    @contextlib.asynccontextmanager
    async def _admitted(self) -> AsyncIterator[None]:
        """Admission (a gate slot within `semaphore_timeout_sec`) and a ready
        worker, for one request's whole life."""
        deadline = time.monotonic() + self.settings.semaphore_timeout_sec
        try:
            await self.gate.acquire(self.settings.semaphore_timeout_sec)
        except AdmissionQueueFull:
            raise QueueFull(
                f"Model '{self.model_id}' is busy: {self.gate.queued} requests already wait "
                f"for it (models.max_queued_requests); retry later",
                retry_after_sec=2) from None
        except AdmissionTimeout:
            raise RateLimited(
                f"Model '{self.model_id}' is busy: no slot freed within "
                f"{self.settings.semaphore_timeout_sec:g}s",
                retry_after_sec=5) from None
        try:
            await self._wait_ready(deadline)
            yield
        finally:
            self.gate.release()

    @contextlib.contextmanager
    def _exchange(self, request: Generate | Embed | Rerank) -> Iterator[_Exchange]:
        """Send `request` to the worker; its answers arrive on the exchange's
        queue. Leaving before the final answer (client gone, deadline, error)
        tells the worker to drop the request."""
        exchange = _Exchange(asyncio.Queue())
        rid = request.request_id
        self._inflight[rid] = exchange.queue
        self._fingerprints[rid] = fingerprint(self.model_id, request)
        self._idle.clear()
        self.last_used = time.monotonic()
        worker_id = self.worker_id
        try:
            assert worker_id is not None
            try:
                self.worker_hub.send(worker_id, request)
            except PeerGone as exc:
                raise WorkerCrashed(str(exc)) from None
            yield exchange
        finally:
            del self._inflight[rid]
            self.last_used = time.monotonic()
            if not self._inflight:
                self._idle.set()
            self._fingerprints.pop(rid, None)
            # To the worker the request went to, even if a restart has put
            # another beside it since.
            if not exchange.done and worker_id is not None:
                with contextlib.suppress(PeerGone):
                    self.worker_hub.send(worker_id, Abort(rid))

    async def generate(self, request: Generate) -> AsyncGenerator[Tokens | Finished, None]:
        """Run one request; yields Tokens then one Finished. Raises an
        LMXError for any failure. Closing the iterator early aborts the
        generation in the worker."""
        self._refuse_if_quarantined(request)
        # aclosing: closing this generator closes the inner one at once (its
        # exchange then sends the Abort), not whenever it is garbage-collected.
        async with self._admitted(), contextlib.aclosing(self._run(request)) as items:
            async for item in items:
                yield item

    async def _run(self, request: Generate) -> AsyncGenerator[Tokens | Finished, None]:
        with self._exchange(request) as exchange:
            while True:
                item = await exchange.queue.get()
                if isinstance(item, Tokens):
                    yield item
                    continue
                exchange.done = True
                if isinstance(item, Finished):
                    yield item
                    return
                raise _failure(item)

    async def encode(self, request: Embed | Rerank) -> Embeddings | Scores:
        """One embedding or rerank request: admission and readiness as for a
        generation, then the worker's single answer. Cancelling the call
        (client gone, deadline) tells the worker to drop the request."""
        self._refuse_if_quarantined(request)
        async with self._admitted():
            return await self._call(request)

    def quarantined_requests(self) -> list[dict[str, Any]]:
        """Poison requests refused for this model now, for /admin/models."""
        now = time.monotonic()
        return [{"fingerprint": e.fingerprint, "crashes": e.crashes,
                 "quarantined_at": e.quarantined_at,
                 "expires_in_sec": round(e.remaining(now), 1)}
                for e in self.poison.quarantined(self.model_id, now)]

    def _refuse_if_quarantined(self, request: Generate | Embed | Rerank) -> None:
        entry = self.poison.check(fingerprint(self.model_id, request))
        if entry is None:
            return
        remaining = entry.remaining(time.monotonic())
        raise RequestQuarantined(
            f"This request was in flight at {entry.crashes} crashes of the worker of model "
            f"'{self.model_id}' within {self.poison.window_sec:g}s, so it is refused "
            f"for another {remaining:.0f}s (quarantine {self.poison.quarantine_sec:g}s) "
            "instead of crashing the model again; change the request, or retry later",
            retry_after_sec=max(1, int(remaining)))

    async def _call(self, request: Embed | Rerank) -> Embeddings | Scores:
        with self._exchange(request) as exchange:
            item = await exchange.queue.get()
            exchange.done = True
            if isinstance(item, (Embeddings, Scores)):
                return item
            raise _failure(item)

    async def worker_stats(self, timeout: float = 3.0) -> WorkerStats | None:
        if self.state is not ModelState.READY or self.worker_id is None:
            return None
        nonce = next(self._ping_nonce)
        fut: asyncio.Future[WorkerStats] = asyncio.get_running_loop().create_future()
        self._pings[nonce] = fut
        try:
            self.worker_hub.send(self.worker_id, Ping(nonce))
            return await asyncio.wait_for(fut, timeout)
        except (PeerGone, TimeoutError):
            return None
        finally:
            self._pings.pop(nonce, None)

    # --- stopping -------------------------------------------------------------

    async def stop(self, drain_timeout: float, terminal: bool = False) -> None:
        """Stop accepting, drain in-flight work (bounded), ask the worker to
        exit, then SIGTERM and finally SIGKILL its process group."""
        if self._restart_task is not None:
            self._restart_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._restart_task
            self._restart_task = None
        final = ModelState.SHUTDOWN if terminal else ModelState.STOPPED
        if self.state in (ModelState.STOPPED, ModelState.SHUTDOWN, ModelState.QUARANTINED):
            if self.state is not final:
                self._set_state(final)
            return
        self._set_state(ModelState.STOPPING)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), drain_timeout)
        self._fail_inflight(ModelUnavailable(f"Model '{self.model_id}' was unloaded",
                                             code="model_unloaded"))
        if self.worker is not None and self.worker_id is not None:
            with contextlib.suppress(PeerGone):
                self.worker_hub.send(self.worker_id, Shutdown(drain=False))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self.worker.exited),
                                       self.settings.stop_grace_sec)
        await self._discard_worker()
        if self._watch_task is not None:
            await self._watch_task
            self._watch_task = None
        if self._monitor_task is not None:
            self._monitor_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._monitor_task
            self._monitor_task = None
        self._set_state(final)
        self._emit("model_unloaded", {"model_id": self.model_id})

    # --- nodes ------------------------------------------------------------------

    def node_lost(self, node: str) -> bool:
        """The node this model's worker runs on stopped answering: its
        requests end now with 503 node_unreachable (no waiting for a
        heartbeat timeout of the worker's own) and the model is unavailable
        until it is started again (`relaunch`). False: nothing to do (the
        model was not serving or waiting to restart there)."""
        if self.placement.node != node or self.state not in (ModelState.READY,
                                                             ModelState.BACKOFF):
            return False
        if self._restart_task is not None:
            self._restart_task.cancel()
            self._restart_task = None
        self._set_state(ModelState.UNAVAILABLE, f"node_unreachable:{node}")
        self._fail_inflight(NodeUnreachable(
            f"Node '{node}' running model '{self.model_id}' stopped answering its heartbeat; "
            "the request was ended", retry_after_sec=5))
        self._emit("model_unavailable", {"model_id": self.model_id, "node": node})
        if self._monitor_task is not None:
            self._monitor_task.cancel()
            self._monitor_task = None
        return True

    async def release_lost_worker(self) -> None:
        """After `node_lost`: forget the worker (its node has been told to
        stop it, if it ever hears)."""
        if self.state is ModelState.UNAVAILABLE:
            await self._discard_worker()

    async def relaunch(self, placement: Placement) -> None:
        """Start an unavailable model again on `placement` (its node came
        back, or another host has room). A failure counts as a crash."""
        if self.state is not ModelState.UNAVAILABLE:
            return
        self.placement = placement
        try:
            await self._launch()
        except LoadFailed as exc:
            log.error("model %s: relaunch on %s failed: %s", self.model_id, placement.node,
                      exc.message)
            self._after_failed_relaunch(exc)

    def _after_failed_relaunch(self, exc: LoadFailed) -> None:
        """A restart that failed: a crash, unless its node is unreachable
        (then the model waits for the node, or for re-placement)."""
        if exc.code == "node_unreachable":
            self._set_state(ModelState.UNAVAILABLE, f"node_unreachable:{self.placement.node}")
            self._emit("model_unavailable", {"model_id": self.model_id,
                                             "node": self.placement.node})
            return
        self._handle_crash(exc.message)

    def force_unquarantine(self) -> None:
        self.history.clear()
        self.poison.clear(self.model_id)
