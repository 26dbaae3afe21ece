"""Autotune (`POST /admin/models/autotune`): find the performance settings
that suit a model on this host, by measuring, and store them as the model's
profile (lmx_supervisor/tuning/performance.py), which every later load uses.

Each trial starts a throwaway worker (outside the registry: not routed to,
not remembered) with one candidate setting, warms it up, and measures
decode speed with the same request shape as the built-in benchmark
(greedy, `ignore_eos`, a fixed number of tokens): one stream, then as many
concurrent streams as the trial has slots. The objective picks the score:
`latency` = single-stream decode tokens/s, `throughput` = aggregate tokens/s
at N streams.

The search is coordinate descent within `budget_sec`: the current settings
first, then one dimension at a time from the best so far: the quantized
variants of the model present on disk, parallel_slots (throughput), threads,
flash attention, KV-cache type, batch size. A trial that would not fit in
memory now is skipped with the memory guard's reason. Serving workers are
not touched; they only share the CPU while a trial runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from lmx_protocol import Finished, Generate, SamplingParams, Tokens
from lmx_supervisor.errors import Conflict, LMXError, NotFound, UnsupportedModel
from lmx_supervisor.lifecycle.managed_model import ManagedModel, ModelSettings
from lmx_supervisor.memory.fit_plan import plan_fit
from lmx_supervisor.memory.memory_estimate import estimate_model_memory
from lmx_supervisor.models.lineage import read_lineage
from lmx_supervisor.models.model_layout import LLAMA_CPP, MLX, model_ggufs
from lmx_supervisor.models.model_resolver import ResolvedModel, resolve_model
from lmx_supervisor.supervisor import Supervisor, settings_from
from lmx_supervisor.tuning.performance import (
    KV_BYTES_PER_VALUE,
    EffectiveSettings,
    PerformanceSettings,
    Profile,
    ProfileStore,
    apply_performance,
    merge,
    reconcile,
)
from lmx_supervisor.tuning.quantize_jobs import strip_type_suffix

log = logging.getLogger("lmx.autotune")

EventEmitter = Callable[[str, dict[str, Any]], object]
KEEP_FINISHED = 20
DEFAULT_BUDGET_SEC = 120.0
TOKENS_PER_REQUEST = 32
BENCH_PROMPTS = ["Explain the concept of recursion in Python with examples.",
                 "Describe how a bicycle works.", "Write a short story about a lighthouse.",
                 "List the planets of the solar system and one fact about each."]
STOP_TIMEOUT_SEC = 10.0


@dataclass(frozen=True)
class TrialShape:
    """What each trial generates: `prompt` (None: a few built-in prompts),
    `max_tokens` per request, and `runs` measurements whose median counts."""

    prompt: str | None = None
    max_tokens: int = TOKENS_PER_REQUEST
    runs: int = 1


class AutotuneStatus(StrEnum):
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class Candidate:
    variant: str  # model id of the file measured
    path: Path
    settings: PerformanceSettings

    def key(self) -> tuple[str, str]:
        return self.variant, repr(sorted(self.settings.as_dict().items()))


@dataclass
class AutotuneJob:
    model_id: str
    objective: str
    budget_sec: float
    shape: TrialShape = field(default_factory=TrialShape)
    id: str = field(default_factory=lambda: f"tune-{uuid.uuid4().hex[:12]}")
    status: AutotuneStatus = AutotuneStatus.RUNNING
    stage: str = "starting"
    done: int = 0
    total: int = 0
    trials: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None
    profile_path: str | None = None
    error: str | None = None
    started_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    task: asyncio.Task[None] | None = None
    cancel_requested: bool = False

    @property
    def active(self) -> bool:
        return self.status is AutotuneStatus.RUNNING

    def snapshot(self) -> dict[str, Any]:
        return {"job_id": self.id, "model_id": self.model_id, "objective": self.objective,
                "budget_sec": self.budget_sec, "max_tokens": self.shape.max_tokens,
                "runs": self.shape.runs, "status": str(self.status), "stage": self.stage,
                "done": self.done, "total": self.total, "trials": self.trials,
                "best": self.best, "profile_path": self.profile_path, "error": self.error,
                "started_at": self.started_at, "finished_at": self.finished_at,
                "progress_url": f"/admin/models/autotune/{self.id}"}


# --- the grid ------------------------------------------------------------------------


def variants_on_disk(resolved: ResolvedModel, models_dir: Path) -> list[tuple[str, Path]]:
    """Other GGUF files of the same model beside it: the same name up to the
    type suffix, or a quantize job's output whose lineage names it."""
    if resolved.backend != LLAMA_CPP:
        return []
    base = strip_type_suffix(resolved.path.name.removesuffix(".gguf"))
    found: list[tuple[str, Path]] = []
    for directory in {resolved.path.parent, models_dir}:
        if not directory.is_dir():
            continue
        for path in model_ggufs(directory):
            if path.resolve() == resolved.path.resolve():
                continue
            stem = path.name.removesuffix(".gguf")
            lineage = read_lineage(path) or {}
            if strip_type_suffix(stem) == base or lineage.get("source") == resolved.model_id:
                found.append((stem, path))
    return sorted(set(found))


def dimensions(backend: str, objective: str, cpus: int) -> list[tuple[str, list[Any]]]:
    """(key, values) tried one at a time, most promising first."""
    threads = sorted({cpus, max(1, cpus - 1)}, reverse=True)
    dims: list[tuple[str, list[Any]]] = []
    if objective == "throughput":
        dims.append(("parallel_slots", [s for s in (8, 4, 2) if s <= 4 * cpus] or [2]))
    if backend == LLAMA_CPP:
        dims += [("n_threads", threads), ("flash_attn", [True, False]),
                 ("kv_cache_type", ["q8_0", "f16"]), ("n_batch", [256, 1024])]
    elif len(threads) > 1:
        dims.append(("n_threads", threads))
    return dims


# --- one trial ----------------------------------------------------------------------------


async def run_streams(model: ManagedModel, streams: int, tokens: int, tag: str,
                      prompt: str | None = None) -> dict[str, float]:
    """`streams` concurrent greedy generations of exactly `tokens` tokens.
    Returns aggregate tokens/s (all tokens over the wall time) and the median
    per-stream decode rate (tokens after the first over the time after it)."""
    async def one(i: int) -> tuple[int, float]:
        request = Generate(request_id=f"{tag}-{i}-{uuid.uuid4().hex[:6]}",
                           params=SamplingParams(max_tokens=tokens, temperature=0.0,
                                                 ignore_eos=True),
                           prompt=prompt or BENCH_PROMPTS[i % len(BENCH_PROMPTS)])
        count, first, last = 0, 0.0, 0.0
        async for item in model.generate(request):
            if isinstance(item, Tokens) and item.token_ids:
                now = time.monotonic()
                first = first or now
                last = now
                count += len(item.token_ids)
            elif isinstance(item, Finished):
                count = item.completion_tokens
        rate = (count - 1) / (last - first) if count > 1 and last > first else 0.0
        return count, rate

    started = time.monotonic()
    results = await asyncio.gather(*(one(i) for i in range(streams)))
    wall = time.monotonic() - started
    rates = sorted(rate for _count, rate in results)
    total = sum(count for count, _rate in results)
    return {"aggregate_tokens_per_sec": round(total / wall, 2) if wall > 0 else 0.0,
            "decode_tokens_per_sec": round(rates[len(rates) // 2], 2),
            "tokens": total, "streams": streams}


def _median_run(runs: list[dict[str, float]], key: str) -> dict[str, float]:
    """The run with the median `key` (runs of one setting vary with the host's load)."""
    return sorted(runs, key=lambda r: r[key])[len(runs) // 2]


class AutotuneJobs:
    def __init__(self, supervisor: Supervisor, emit: EventEmitter,
                 store: ProfileStore | None = None) -> None:
        self._supervisor = supervisor
        self._emit = emit
        self.store = store or ProfileStore()
        self._jobs: dict[str, AutotuneJob] = {}

    def get(self, job_id: str) -> AutotuneJob:
        job = self._jobs.get(job_id)
        if job is None:
            raise NotFound(f"No autotune job '{job_id}' (the last {KEEP_FINISHED} are kept)",
                           code="autotune_job_not_found", param="job_id")
        return job

    async def start(self, model_id: str, objective: str, budget_sec: float | None,
                    shape: TrialShape | None = None) -> AutotuneJob:
        self._refuse_if_running()
        config = self._supervisor.config
        resolved = await asyncio.to_thread(resolve_model, model_id, config.models_dir)
        if resolved.backend not in (LLAMA_CPP, MLX):
            raise UnsupportedModel(f"'{model_id}' is a {resolved.backend} model; autotune "
                                   "measures text generation", param="model_id")
        self._refuse_if_running()  # again: another start may have won during the await
        job = AutotuneJob(resolved.model_id, objective, budget_sec or DEFAULT_BUDGET_SEC,
                          shape or TrialShape())
        self._jobs[job.id] = job
        for old in [j for j in self._jobs.values() if not j.active][:-KEEP_FINISHED]:
            del self._jobs[old.id]
        self._emit("autotune_started", {"job_id": job.id, "model_id": job.model_id,
                                        "objective": objective, "budget_sec": job.budget_sec})
        job.task = asyncio.create_task(self._run(job, resolved), name=f"lmx-{job.id}")
        return job

    async def cancel(self, job_id: str) -> AutotuneJob:
        """Stop a running job: its throwaway worker is stopped (the trial's
        own cleanup) before this returns; no profile is written."""
        job = self.get(job_id)
        if not job.active:
            raise Conflict(f"Autotune job '{job.id}' already ended ({job.status})",
                           code="autotune_finished", param="job_id")
        job.cancel_requested = True
        if job.task is not None:
            job.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await job.task
        return job

    def _refuse_if_running(self) -> None:
        running = [j for j in self._jobs.values() if j.active]
        if running:
            raise Conflict(f"autotune job {running[0].id} is running; one at a time (each "
                           "measurement needs the CPU to itself)", code="autotune_busy")

    # --- the search -------------------------------------------------------------------

    def _base(self, resolved: ResolvedModel) -> PerformanceSettings:
        m = self._supervisor.config.models
        cpus = os.cpu_count() or 1
        base = PerformanceSettings(
            parallel_slots=m.parallel_slots, n_threads=m.n_threads or cpus,
            flash_attn=False if resolved.backend == LLAMA_CPP else None,
            kv_cache_type=m.kv_cache_type if resolved.backend == LLAMA_CPP else None,
            n_batch=512 if resolved.backend == LLAMA_CPP else None)
        return base

    def _score(self, job: AutotuneJob, trial: dict[str, Any]) -> float:
        key = ("decode_tokens_per_sec" if job.objective == "latency"
               else "aggregate_tokens_per_sec")
        measured = trial.get("single" if job.objective == "latency" else "concurrent") or {}
        return float(measured.get(key) or 0.0)

    async def _run(self, job: AutotuneJob, resolved: ResolvedModel) -> None:
        try:
            await self._search(job, resolved)
        except asyncio.CancelledError:
            if job.cancel_requested:
                job.status, job.error = AutotuneStatus.CANCELLED, "cancelled by the operator"
            else:
                job.status, job.error = AutotuneStatus.FAILED, "cancelled (server shutting down)"
            raise
        except Exception as exc:
            log.exception("autotune %s failed", job.id)
            job.status = AutotuneStatus.FAILED
            job.error = exc.message if isinstance(exc, LMXError) else f"{type(exc).__name__}: {exc}"
        finally:
            job.finished_at = time.time()
            self._emit(f"autotune_{job.status}", {
                "job_id": job.id, "model_id": job.model_id, "best": job.best,
                "profile_path": job.profile_path, "error": job.error})

    async def _search(self, job: AutotuneJob, resolved: ResolvedModel) -> None:
        deadline = time.monotonic() + job.budget_sec
        cpus = os.cpu_count() or 1
        base = self._base(resolved)
        variants = await asyncio.to_thread(variants_on_disk, resolved,
                                           self._supervisor.config.models_dir)
        dims = dimensions(resolved.backend, job.objective, cpus)
        job.total = 1 + len(variants) + sum(len(v) for _k, v in dims)
        best: tuple[float, Candidate, dict[str, Any]] | None = None
        tried: set[tuple[str, str]] = set()
        durations: list[float] = []

        async def attempt(candidate: Candidate) -> None:
            nonlocal best
            if candidate.key() in tried:
                job.total -= 1
                return
            tried.add(candidate.key())
            started = time.monotonic()
            trial = await self._trial(job, resolved, candidate)
            durations.append(time.monotonic() - started)
            job.trials.append(trial)
            job.done = len(job.trials)
            score = self._score(job, trial)
            trial["score"] = score
            if trial.get("error") is None and (best is None or score > best[0]):
                best = (score, candidate, trial)
            self._emit("autotune_progress", {"job_id": job.id, "done": job.done,
                                             "total": job.total, "trial": trial})

        def time_left() -> bool:
            expected = max(durations) if durations else 0.0
            return time.monotonic() + expected < deadline

        job.stage = "baseline"
        await attempt(Candidate(resolved.model_id, resolved.path, base))
        for stem, path in variants:
            if not time_left():
                break
            job.stage = f"variant {stem}"
            await attempt(Candidate(stem, path, base))
        for key, values in dims:
            for value in values:
                if not time_left():
                    break
                job.stage = f"{key}={value}"
                start_from = best[1] if best is not None else Candidate(
                    resolved.model_id, resolved.path, base)
                settings = reconcile(merge(start_from.settings,
                                           PerformanceSettings(**{key: value})), key)
                await attempt(Candidate(start_from.variant, start_from.path, settings))
        if best is None:
            raise LMXError("no trial succeeded: " + "; ".join(
                str(t.get("error")) for t in job.trials))
        self._save(job, resolved, best)

    def _save(self, job: AutotuneJob, resolved: ResolvedModel,
              best: tuple[float, Candidate, dict[str, Any]]) -> None:
        score, candidate, trial = best
        # The profile is this model's: the best settings measured on its own
        # file; when another variant won, it is named beside them.
        own = [t for t in job.trials if t.get("variant") == resolved.model_id
               and t.get("error") is None]
        own_best = max(own, key=lambda t: float(t.get("score") or 0.0), default=None)
        settings = (candidate.settings if candidate.variant == resolved.model_id
                    else PerformanceSettings(**(own_best or trial)["settings"]))
        best_variant = None if candidate.variant == resolved.model_id else {
            "model_id": candidate.variant, "path": str(candidate.path),
            "settings": candidate.settings.as_dict(), "score": score}
        profile = Profile(
            model_id=resolved.model_id, settings=settings, objective=job.objective,
            model_path=str(resolved.path), measurements=job.trials,
            host={"cpus": os.cpu_count(), "budget_sec": job.budget_sec,
                  "tokens_per_request": job.shape.max_tokens, "runs": job.shape.runs},
            best_variant=best_variant)
        job.profile_path = str(self.store.save(profile))
        if best_variant is not None:  # the winner gets its own profile too
            self.store.save(Profile(
                model_id=candidate.variant, settings=candidate.settings,
                objective=job.objective, model_path=str(candidate.path),
                measurements=[t for t in job.trials if t.get("variant") == candidate.variant],
                host=profile.host))
        job.best = {"variant": candidate.variant, "settings": candidate.settings.as_dict(),
                    "score": score, "objective": job.objective,
                    "profile_settings": settings.as_dict()}
        job.status, job.stage = AutotuneStatus.COMPLETED, "done"

    def _settings(self, resolved: ResolvedModel, candidate: Candidate) -> ModelSettings:
        settings = settings_from(self._supervisor.config, resolved.model_id)
        settings.warmup_on_load = False  # the trial warms up itself
        settings.crash_loop_max_crashes = 1
        effective = EffectiveSettings(candidate.settings,
                                      dict.fromkeys(candidate.settings.as_dict(), "autotune"),
                                      None)
        return apply_performance(settings, effective)

    async def _trial(self, job: AutotuneJob, resolved: ResolvedModel, candidate: Candidate
                     ) -> dict[str, Any]:
        trial: dict[str, Any] = {"variant": candidate.variant,
                                 "settings": candidate.settings.as_dict(), "error": None}
        settings = self._settings(resolved, candidate)
        slots = max(1, settings.parallel_slots)
        estimate = await asyncio.to_thread(
            estimate_model_memory, candidate.path, settings.context_length * slots,
            KV_BYTES_PER_VALUE[settings.kv_cache_type])
        plan = plan_fit(self._supervisor.memory, self._supervisor.models(),
                        f"autotune:{candidate.variant}", estimate.total_bytes)
        if not plan.fits or plan.evict:  # never evict a serving model for a measurement
            trial["error"] = f"skipped: does not fit without evicting ({plan.reason})"
            return trial
        worker_id = f"autotune-{job.id}-{len(job.trials) + 1}"
        model = self._supervisor.throwaway_model(
            worker_id, candidate.path, resolved.backend, settings,
            lambda event, data: log.debug("%s: %s %s", worker_id, event, data))
        model.memory_estimate = estimate
        model.memory_cap_bytes = self._supervisor.memory.worker_cap(estimate,
                                                                   settings.n_threads)
        try:
            await model.load()
            shape = job.shape
            await run_streams(model, 1, 4, f"{worker_id}-warmup", shape.prompt)
            singles, multis = [], []
            for _run in range(shape.runs):
                singles.append(await run_streams(model, 1, shape.max_tokens, worker_id,
                                                 shape.prompt))
                if job.objective == "throughput" and slots > 1:
                    multis.append(await run_streams(model, slots, shape.max_tokens, worker_id,
                                                    shape.prompt))
            trial["single"] = _median_run(singles, "decode_tokens_per_sec")
            trial["concurrent"] = (_median_run(multis, "aggregate_tokens_per_sec") if multis
                                   else trial["single"])
        except LMXError as exc:
            trial["error"] = exc.message
        finally:
            with contextlib.suppress(Exception):
                await model.stop(0, terminal=True)
        return trial

    async def shutdown(self) -> None:
        tasks = [j.task for j in self._jobs.values() if j.task is not None and j.active]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
