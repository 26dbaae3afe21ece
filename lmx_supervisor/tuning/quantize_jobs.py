"""Quantize jobs (`POST /admin/quantize`): make a quantized copy of a model
on disk in a child process (`python -m lmx_worker.jobs.quantize_command`), never
in the gateway, with progress events, cancel, and lineage.

- Before starting: the source must resolve and read as a whole GGUF file or
  MLX directory (422 otherwise), the type must exist for its format (400),
  the output must be a plain name in the models directory that does not
  exist yet (400/409), and the estimated output must fit on the disk (507
  storage-full, checked like downloads).
- The child writes to a hidden partial path in the models directory (the
  inventory skips dot entries); success renames it to the output and writes
  the lineage sidecar. Cancel, failure, a crash or a kill of the child
  (SIGKILL included) remove the partial output: nothing half-written is
  ever listed.
- The child holds a death pipe like a worker: if the gateway dies, it exits.
- One job runs at a time (quantizing takes every core); a second is 429
  quantize_busy. The last KEEP_FINISHED jobs stay queryable.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import re
import shutil
import signal
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from lmx_supervisor.config import Config
from lmx_supervisor.errors import (
    BadRequest,
    Conflict,
    InsufficientStorage,
    LMXError,
    NotFound,
    RateLimited,
    UnsupportedModel,
)
from lmx_supervisor.models.downloads import free_bytes
from lmx_supervisor.models.lineage import write_lineage
from lmx_supervisor.models.model_layout import LLAMA_CPP, MLX
from lmx_supervisor.tuning.probe import FILE_TYPES, FileFacts, describe_files, resolve_for_probe
from lmx_supervisor.workers.worker_process import WorkerProcess

log = logging.getLogger("lmx.quantize")

EventEmitter = Callable[[str, dict[str, Any]], object]
KEEP_FINISHED = 100
PROGRESS_EVENT_INTERVAL_SEC = 0.25
STDERR_LINES = 20
CANCEL_GRACE_SEC = 5.0
# Bits per weight of llama.cpp's types (ggml block sizes), for the disk
# check. The i-quants below 4 bits need an importance matrix: not offered.
GGUF_TYPE_BPW: dict[str, float] = {
    "F16": 16, "BF16": 16, "Q8_0": 8.5, "Q6_K": 6.5625, "Q5_0": 5.5, "Q5_1": 6.0,
    "Q5_K_S": 5.5, "Q5_K_M": 5.7, "Q4_0": 4.5, "Q4_1": 5.0, "Q4_K_S": 4.5, "Q4_K_M": 4.85,
    "IQ4_NL": 4.5, "IQ4_XS": 4.25, "Q3_K_S": 3.44, "Q3_K_M": 3.9, "Q3_K_L": 4.3,
    "Q2_K": 2.63, "Q2_K_S": 2.63, "TQ1_0": 1.69, "TQ2_0": 2.06,
}
MLX_BITS = {"Q2": 2, "Q3": 3, "Q4": 4, "Q5": 5, "Q6": 6, "Q8": 8}
MLX_FLOAT_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}
MLX_GROUP_SIZES = (32, 64, 128)
# Tokenizer, metadata, and the F32 norms every type keeps: a margin on top.
OUTPUT_MARGIN_BYTES = 64 * 1024 * 1024
_PLAIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
# A type already in the source's name (".Q4_1", "-f16", "-q4"): replaced, not stacked.
_TYPE_SUFFIX = re.compile(r"[.-](?:[QqFf]\d+(?:_[A-Za-z0-9]+)*|I?Q\d\w*|[Bb][Ff]16|float\d+)$")


class QuantizeStatus(StrEnum):
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass
class QuantizeJob:
    source: str
    source_path: Path
    format: str  # "gguf" or "mlx"
    type: str
    output: Path
    group_size: int | None
    source_quantization: dict[str, Any]
    estimated_bytes: int
    id: str = field(default_factory=lambda: f"q-{uuid.uuid4().hex[:12]}")
    status: QuantizeStatus = QuantizeStatus.RUNNING
    stage: str = "starting"
    done: int = 0
    total: int = 0
    result: dict[str, Any] | None = None
    error: str | None = None
    pid: int | None = None
    started_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    cancel_requested: bool = False
    process: WorkerProcess | None = None
    task: asyncio.Task[None] | None = None

    @property
    def partial(self) -> Path:
        return self.output.with_name(f".{self.output.name}.partial-{self.id}")

    @property
    def active(self) -> bool:
        return self.status is QuantizeStatus.RUNNING

    def snapshot(self) -> dict[str, Any]:
        percent = 100.0 if self.status is QuantizeStatus.COMPLETED else (
            round(100.0 * self.done / self.total, 1) if self.total else 0.0)
        return {
            "job_id": self.id, "status": str(self.status), "source": self.source,
            "source_path": str(self.source_path), "format": self.format, "type": self.type,
            "group_size": self.group_size, "output": str(self.output),
            "model_id": self.output.name.removesuffix(".gguf"),
            "stage": self.stage, "done": self.done, "total": self.total,
            "progress_percent": percent, "estimated_bytes": self.estimated_bytes,
            "result": self.result, "error": self.error, "pid": self.pid,
            "started_at": self.started_at, "finished_at": self.finished_at,
            "progress_url": f"/admin/quantize/{self.id}",
        }


@dataclass(frozen=True)
class QuantizeArgs:
    source: str
    type: str | None  # None: from `bits`
    output: str | None = None
    group_size: int | None = None
    bits: int | None = None  # the runbook's way of asking: 4 -> Q4_K_M (GGUF) / Q4 (MLX)


# `bits` as the runbook asks for it -> the usual llama.cpp type of that size.
GGUF_TYPE_FOR_BITS = {2: "Q2_K", 3: "Q3_K_M", 4: "Q4_K_M", 5: "Q5_K_M", 6: "Q6_K", 8: "Q8_0"}


def _normalise_type(fmt: str, raw: str | None, bits: int | None) -> str:
    if raw is None:
        table = GGUF_TYPE_FOR_BITS if fmt == "gguf" else {v: k for k, v in MLX_BITS.items()}
        if bits not in table:
            raise BadRequest(f"bits must be one of {sorted(table)} for a {fmt} model",
                             param="bits")
        return table[bits]
    if fmt == "gguf":
        name = raw.upper()
        if name not in GGUF_TYPE_BPW:
            raise BadRequest(f"unknown GGUF quantization type '{raw}' (use one of: "
                             f"{', '.join(GGUF_TYPE_BPW)})", param="type")
        return name
    if raw.lower() in MLX_FLOAT_BYTES:
        return raw.lower()
    if raw.upper() in MLX_BITS:
        return raw.upper()
    raise BadRequest(f"unknown MLX type '{raw}' (use one of: "
                     f"{', '.join([*MLX_BITS, *MLX_FLOAT_BYTES])})", param="type")


def strip_type_suffix(stem: str) -> str:
    """"SmolLM2.Q4_1" -> "SmolLM2": the model's name without its type."""
    return _TYPE_SUFFIX.sub("", stem) or stem


def _default_output(source_path: Path, fmt: str, type_name: str) -> str:
    stem = source_path.name.removesuffix(".gguf") if fmt == "gguf" else source_path.name
    stem = strip_type_suffix(stem)
    return f"{stem}.{type_name}.gguf" if fmt == "gguf" else f"{stem}-{type_name.lower()}"


def _output_path(args: QuantizeArgs, models_dir: Path, source_path: Path, fmt: str,
                 type_name: str) -> Path:
    name = args.output or _default_output(source_path, fmt, type_name)
    if not _PLAIN_NAME.match(name) or name.endswith(".partial"):
        raise BadRequest(f"output '{name}' must be a plain name (letters, digits, '.', '_', "
                         "'-', '+'; no path): it is created in the models directory",
                         param="output")
    if fmt == "gguf" and not name.endswith(".gguf"):
        name += ".gguf"
    if fmt == "mlx" and name.endswith(".gguf"):
        raise BadRequest("an MLX model is a directory: the output name must not end in .gguf",
                         param="output")
    path = models_dir / name
    if os.path.lexists(path):
        raise Conflict(f"output '{name}' already exists in {models_dir}; pick another name "
                       "or delete it first", code="output_exists", param="output")
    return path


def _estimate_bytes(facts: FileFacts, fmt: str, type_name: str, group_size: int | None,
                    source_size: int) -> int:
    params = facts.parameter_count or 0
    if fmt == "gguf":
        body = params * GGUF_TYPE_BPW[type_name] / 8
    elif type_name in MLX_FLOAT_BYTES:
        body = params * MLX_FLOAT_BYTES[type_name]
    else:  # packed values plus a float32 scale and bias per group
        body = params * (MLX_BITS[type_name] + 64 / (group_size or 64)) / 8
    if not params:  # unknown shape: assume no smaller than the source
        body = source_size
    return int(body) + OUTPUT_MARGIN_BYTES


@dataclass(frozen=True)
class _Plan:
    source_path: Path
    fmt: str
    type_name: str
    output: Path
    group_size: int | None
    facts: FileFacts
    estimated: int


def plan_job(args: QuantizeArgs, models_dir: Path) -> _Plan:
    """Everything checked before a job starts (blocking: run in a thread)."""
    resolved = resolve_for_probe(args.source, models_dir, None)
    if resolved.backend == LLAMA_CPP:
        fmt = "gguf"
    elif resolved.backend == MLX:
        fmt = "mlx"
    else:
        raise UnsupportedModel(f"'{args.source}' is a {resolved.backend} model; quantize jobs "
                               "take text-generation GGUF files and MLX directories",
                               param="source")
    type_name = _normalise_type(fmt, args.type, args.bits)
    group_size = None
    if fmt == "mlx" and type_name in MLX_BITS:
        group_size = args.group_size or 64
        if group_size not in MLX_GROUP_SIZES:
            raise BadRequest(f"group_size must be one of {MLX_GROUP_SIZES}",
                             param="group_size")
    elif args.group_size is not None:
        raise BadRequest("group_size applies to MLX Q2..Q8 only", param="group_size")
    facts, size, _fmt = describe_files(resolved)
    output = _output_path(args, models_dir, resolved.path, fmt, type_name)
    estimated = _estimate_bytes(facts, fmt, type_name, group_size, size)
    free = free_bytes(models_dir)
    if estimated > free:
        raise InsufficientStorage(
            f"Not enough disk space for the quantized copy: it needs ~{estimated} bytes, "
            f"{free} are free in {models_dir}", param="output")
    return _Plan(resolved.path, fmt, type_name, output, group_size, facts, estimated)


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def _exit_reason(rc: int, stderr: collections.deque[str]) -> str:
    if rc < 0:
        try:
            name = signal.Signals(-rc).name
        except ValueError:
            name = f"signal {-rc}"
        return f"the quantizer process was killed by {name}"
    last = stderr[-1] if stderr else ""
    return last or f"the quantizer process exited with code {rc}"


class QuantizeJobs:
    def __init__(self, emit: EventEmitter) -> None:
        self._emit = emit
        self._jobs: collections.OrderedDict[str, QuantizeJob] = collections.OrderedDict()
        self._lock = asyncio.Lock()

    def get(self, job_id: str) -> QuantizeJob:
        job = self._jobs.get(job_id)
        if job is None:
            raise NotFound(f"No quantize job '{job_id}' (the last {KEEP_FINISHED} jobs of "
                           "this process are kept)", code="quantize_job_not_found",
                           param="job_id")
        return job

    def jobs(self) -> list[QuantizeJob]:
        return list(self._jobs.values())

    async def start(self, args: QuantizeArgs, config: Config) -> QuantizeJob:
        async with self._lock:  # one check-and-start at a time: no two jobs slip through
            running = [j for j in self._jobs.values() if j.active]
            if running:
                raise RateLimited(f"quantize job {running[0].id} is running; one job runs at "
                                  "a time (it uses every core)", code="quantize_busy",
                                  retry_after_sec=30)
            plan = await asyncio.to_thread(plan_job, args, config.models_dir)
            facts = plan.facts
            job = QuantizeJob(args.source, plan.source_path, plan.fmt, plan.type_name,
                              plan.output, plan.group_size, facts.quantization, plan.estimated)
            threads = config.models.n_threads or os.cpu_count() or 1
            await self._spawn(job, threads)
            self._remember(job)
        self._emit("quantize_started", {"job_id": job.id, "source": job.source,
                                        "type": job.type, "output": str(job.output)})
        job.task = asyncio.create_task(self._follow(job), name=f"lmx-quantize-{job.id}")
        return job

    def _remember(self, job: QuantizeJob) -> None:
        self._jobs[job.id] = job
        while len(self._jobs) > KEEP_FINISHED:
            oldest = next((j for j in self._jobs.values() if not j.active), None)
            if oldest is None:
                break
            del self._jobs[oldest.id]

    async def _spawn(self, job: QuantizeJob, threads: int) -> None:
        file_type = job.source_quantization.get("file_type")
        argv = [sys.executable, "-m", "lmx_worker.jobs.quantize_command", str(job.source_path),
                str(job.partial), "--type", job.type, "--format", job.format,
                "--threads", str(threads)]
        if job.group_size:
            argv += ["--group-size", str(job.group_size)]
        if job.format == "gguf" and file_type is not None:
            code = next((k for k, v in FILE_TYPES.items() if v == file_type), None)
            if code is not None:
                argv += ["--source-file-type", str(code)]
        read_fd, write_fd = os.pipe()
        os.set_inheritable(read_fd, True)
        argv += ["--death-fd", str(read_fd)]
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, pass_fds=(read_fd,), start_new_session=True)
        except BaseException:
            os.close(write_fd)
            raise
        finally:
            os.close(read_fd)
        job.process = WorkerProcess(proc, write_fd)
        job.pid = proc.pid
        log.info("quantize job %s: %s -> %s (%s), pid %d", job.id, job.source, job.output,
                 job.type, proc.pid)

    async def _follow(self, job: QuantizeJob) -> None:
        process = job.process
        assert process is not None
        proc = process.proc
        assert proc.stdout is not None and proc.stderr is not None
        stderr: collections.deque[str] = collections.deque(maxlen=STDERR_LINES)

        async def drain_stderr() -> None:
            assert proc.stderr is not None
            async for raw in proc.stderr:
                line = raw.decode(errors="replace").strip()
                if line:
                    stderr.append(line[:500])

        drainer = asyncio.create_task(drain_stderr())
        last_event = 0.0
        try:
            async for raw in proc.stdout:
                try:
                    message = json.loads(raw)
                except ValueError:
                    continue  # library chatter on stdout
                if not isinstance(message, dict):
                    continue
                if message.get("event") == "progress":
                    done, total = message.get("done"), message.get("total")
                    if not (isinstance(done, int) and isinstance(total, int)):
                        continue  # not a line this job understands: ignore it
                    job.stage = str(message.get("stage") or job.stage)
                    job.done, job.total = done, total
                    now = time.monotonic()
                    if now - last_event >= PROGRESS_EVENT_INTERVAL_SEC or job.done == job.total:
                        last_event = now
                        self._emit("quantize_progress", {
                            "job_id": job.id, "stage": job.stage, "done": job.done,
                            "total": job.total})
                elif message.get("event") == "done":
                    job.result = {k: v for k, v in message.items() if k != "event"}
            rc = await process.exited
            await drainer
        except asyncio.CancelledError:
            await process.terminate(CANCEL_GRACE_SEC)
            _remove(job.partial)
            raise
        try:
            await asyncio.to_thread(self._finish, job, rc, stderr)
        except Exception as exc:  # never leave a job "running" forever
            log.exception("quantize job %s: finishing failed", job.id)
            job.status, job.error = QuantizeStatus.FAILED, f"{type(exc).__name__}: {exc}"
            job.finished_at = time.time()
        event = {"job_id": job.id, "status": str(job.status), "output": str(job.output),
                 "error": job.error}
        self._emit(f"quantize_{job.status}", event)

    def _finish(self, job: QuantizeJob, rc: int, stderr: collections.deque[str]) -> None:
        job.finished_at = time.time()
        if job.cancel_requested:
            _remove(job.partial)
            job.status, job.error = QuantizeStatus.CANCELLED, "cancelled"
            return
        if rc != 0 or job.result is None or not job.partial.exists():
            _remove(job.partial)
            job.status = QuantizeStatus.FAILED
            job.error = _exit_reason(rc, stderr) if rc != 0 else (
                "the quantizer ended without a result")
            log.warning("quantize job %s failed: %s", job.id, job.error)
            return
        try:
            if os.path.lexists(job.output):
                raise OSError(f"{job.output} appeared while the job ran")
            os.rename(job.partial, job.output)
            write_lineage(job.output, {
                "source": job.source, "source_path": str(job.source_path),
                "source_quantization": job.source_quantization, "type": job.type,
                "group_size": job.group_size, "format": job.format,
                "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "requantized": bool(job.result.get("requantized")),
                "tool": "llama.cpp llama_model_quantize" if job.format == "gguf" else "mlx-lm",
                "job_id": job.id})
        except OSError as exc:
            _remove(job.partial)
            job.status, job.error = QuantizeStatus.FAILED, f"cannot place the output: {exc}"
            return
        job.status = QuantizeStatus.COMPLETED
        job.stage = "done"

    async def cancel(self, job_id: str) -> QuantizeJob:
        job = self.get(job_id)
        if not job.active:
            raise Conflict(f"Quantize job '{job.id}' already ended ({job.status})",
                           code="quantize_finished", param="job_id")
        job.cancel_requested = True
        if job.process is not None:
            await job.process.terminate(CANCEL_GRACE_SEC)
        if job.task is not None:  # wait for the cleanup: no partial file once we answer
            with contextlib.suppress(asyncio.CancelledError, LMXError):
                await job.task
        return job

    async def shutdown(self) -> None:
        for job in self._jobs.values():
            if job.active and job.task is not None:
                job.cancel_requested = True
                job.task.cancel()
        await asyncio.gather(*(j.task for j in self._jobs.values() if j.task is not None),
                             return_exceptions=True)
