"""Concurrent serving benchmark: LMX against the servers people use today.

What it measures
----------------
A streaming client light on CPU (``lean_http.py``: a blocking reader thread a stream) fires
N concurrent ``POST /v1/chat/completions`` requests (distinct prompts, ``temperature=0``,
``max_tokens`` = ``--tokens``, end of sequence suppressed where the server allows it) at
each concurrency level (1, 2, 4, 8, 16), against one server at a time, all on the same model
file and the same cores:

* ``lmx-llama``: ``lmx serve``, llama.cpp backend on the GGUF (``models.parallel_slots`` =
  ``--slots``, ``max_concurrent_requests`` >= the highest level), ``ignore_eos: true``;
* ``lmx-mlx``: ``lmx serve``, MLX backend on the GGUF converted with ``lmx models convert``
  (skipped, with the reason printed, while the MLX backend is not in this tree);
* ``llama-cpp-server``: ``python -m llama_cpp.server --n_threads T --interrupt_requests False``;
  EOS suppressed with ``logit_bias`` -1e9 on every end-of-generation token id;
* ``llama-cpp-server-default``: the same with its default ``--interrupt_requests True``, at one
  level only (the highest <= 8), to show what its default does to concurrent streams;
* ``mlx-lm-server`` / ``mlx-lm-server-f32``: ``python -m mlx_lm.server`` with batching on
  (``--decode-concurrency`` = highest level, ``--prompt-concurrency 8``) on the converted
  4-bit directory and on a float32 (dequantized) copy of it; EOS suppressed with
  ``logit_bias`` (it keeps requests batchable; ``seed`` would not);
* ``inproc-llama`` / ``inproc-mlx`` / ``inproc-mlx-f32``: the libraries in this process,
  one stream at a time (the baseline of the single-stream target).

Per request: TTFT (request start to the first non-empty content delta), decode tok/s
((tokens - 1) / (last delta - first delta)), latency (start to end of stream), generated
tokens (the ``usage`` chunk where the server sends one, otherwise the number of content
deltas) and finish_reason. Per level (after one uncounted warm-up wave of 16-token requests
at the level's concurrency): aggregate generated tok/s (tokens of all answered requests / wall
time of the waves), aggregate decode tok/s (tokens after each request's first / the time from
each wave's first streamed token to its last: the issue's "aggregate decode", which leaves out
the prompt reading before the first stream starts), p50/p95 of TTFT and latency, errors. A
200 with 0 tokens or without a finish_reason counts as an error (a silent truncation). A
request that ended with ``stop`` before ``--tokens`` means the server did not suppress EOS.

The peers run from their own venv, ``benchmarks/.peers-venv`` (created on first use with
``llama-cpp-python[server]``, ``mlx[cpu]`` and ``mlx-lm`` at the project venv's versions);
nothing is installed into the project's venv. LMX runs from the project venv with a
temporary config and ``LMX_HOME``.

How to run
----------
::

    .venv/bin/python benchmarks/serve_bench.py                  # everything, 128 tokens
    .venv/bin/python benchmarks/serve_bench.py --quick          # levels 1 and 8, 32 tokens
    .venv/bin/python benchmarks/serve_bench.py --only lmx-llama,llama-cpp-server --json

Progress goes to stderr, the report (or JSON with ``--json``) to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import importlib.metadata
import json
import math
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import httpx
import psutil
import yaml
from lean_http import ChatStream, HttpError, stream_chat
from profile_settings import llama_kwargs, profile_settings

from lmx_supervisor.models.bundled_model import ensure_default_model

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
PEERS_VENV = BENCH_DIR / ".peers-venv"

ALL_TARGETS = (
    "inproc-llama", "lmx-llama", "llama-cpp-server", "llama-cpp-server-default",
    "inproc-mlx", "inproc-mlx-f32", "lmx-mlx", "mlx-lm-server", "mlx-lm-server-f32",
)
FULL_LEVELS = (1, 2, 4, 8, 16)
QUICK_LEVELS = (1, 8)
STARTUP_TIMEOUT = 300.0
REQUEST_TIMEOUT = 900.0
WARMUP_TOKENS = 16  # per request of the uncounted wave before each level
EOS_BIAS = -1e9  # JSON has no -inf; this is as good against logits of order 10

# The targets, as ratios measured side by side in one run.
# The "aggregate" targets compare aggregate *decode* rates (see _decode_window);
# the wall-time aggregates, prompt reading included, are printed beside them.
TARGET_LLAMA_SCALING = 2.0      # lmx-llama aggregate decode at 8 / its own at 1
TARGET_LLAMA_VS_PEER = 2.5      # lmx-llama aggregate decode at 8 / llama-cpp-server at 8
TARGET_MLX_VS_PEER = 1.2        # lmx-mlx aggregate decode at 8 / mlx-lm-server's best at 8
TARGET_MLX_SCALING = 3.5        # lmx-mlx aggregate decode at 8 / its own at 1
TARGET_SINGLE_VS_INPROC = 0.95  # single-stream decode tok/s / in-process library
TARGET_SINGLE_VS_PEER = 1.0     # single-stream decode tok/s / the peer server

TOPICS = [
    "Write a detailed story about a lighthouse keeper who finds a message in a bottle.",
    "Explain step by step how photosynthesis works in plants.",
    "Describe a walk through a busy city market early in the morning.",
    "Give a thorough history of the bicycle, from its invention to today.",
    "Explain how a compiler turns source code into machine code.",
    "Write a letter from a sailor to his family during a long voyage.",
    "Describe how bees communicate the location of flowers to the hive.",
    "Explain the water cycle to a curious ten-year-old.",
    "Tell the story of a robot that learns to paint.",
    "Describe the rules and strategy of chess for a beginner.",
    "Explain why the sky is blue and sunsets are red.",
    "Write a travel guide entry for an imaginary mountain village.",
    "Explain how vaccines train the immune system.",
    "Describe a thunderstorm from the point of view of a cat.",
    "Give advice to someone planting their first vegetable garden.",
    "Explain how trains stay on the rails when they go around a curve.",
]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def prompt_for(k: int) -> str:
    # The serial number makes every request of a run distinct, so no server gets prompt-cache
    # hits on a whole repeated prompt; every server sees the same sequence.
    return f"Request {k}. {TOPICS[k % len(TOPICS)]}"


def pct(values: list[float], q: int) -> float | None:
    """The q-th percentile (q in 1..99), linear interpolation; None without values."""
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- results -------------------------------------------------------------------------------


@dataclass
class RequestResult:
    index: int
    wave: int
    status: int | None
    tokens: int
    deltas: int
    ttft_s: float | None
    decode_tok_s: float | None
    latency_s: float
    finish_reason: str | None
    error: str | None = None       # None: answered and complete
    truncated: bool = False        # a 200 with 0 tokens or without finish_reason
    first_at: float | None = None  # perf_counter at the first content delta
    last_at: float | None = None   # ... and at the last one


@dataclass
class LevelResult:
    concurrency: int
    waves: int
    wall_s: float
    requests: list[RequestResult]
    peak_rss_bytes: int | None = None

    def summary(self, max_tokens: int) -> dict[str, Any]:
        answered = [r for r in self.requests if r.status == 200]
        ok = [r for r in self.requests if r.error is None]
        tokens = sum(r.tokens for r in answered)
        ttft = [r.ttft_s * 1000 for r in ok if r.ttft_s is not None]
        lat = [r.latency_s for r in ok]
        rate = [r.decode_tok_s for r in ok if r.decode_tok_s is not None
                and math.isfinite(r.decode_tok_s)]
        decoded, decode_span = self._decode_window(ok)
        return {
            "concurrency": self.concurrency,
            "requests": len(self.requests),
            "waves": self.waves,
            "wall_s": self.wall_s,
            "generated_tokens": tokens,
            "aggregate_tok_s": tokens / self.wall_s if self.wall_s > 0 else None,
            "decode_aggregate_tok_s": decoded / decode_span if decode_span > 0 else None,
            "request_decode_tok_s_median": statistics.median(rate) if rate else None,
            "ttft_ms_p50": pct(ttft, 50), "ttft_ms_p95": pct(ttft, 95),
            "latency_s_p50": pct(lat, 50), "latency_s_p95": pct(lat, 95),
            "errors": sum(r.error is not None for r in self.requests),
            "truncations": sum(r.truncated for r in self.requests),
            "stopped_early": sum(r.error is None and r.finish_reason == "stop"
                                 and r.tokens < max_tokens for r in self.requests),
            "finish_reasons": sorted({str(r.finish_reason) for r in self.requests}),
            "error_samples": sorted({r.error for r in self.requests if r.error})[:3],
            "peak_rss_bytes": self.peak_rss_bytes,
        }

    def _decode_window(self, ok: list[RequestResult]) -> tuple[int, float]:
        """Tokens decoded after each request's first, and the time the level
        spent decoding: per wave, from its first streamed token to its last (so
        the prompt reading before any stream starts is left out, and what runs
        while some streams decode is in). The aggregate decode rate is their
        quotient; at one stream it is the requests' mean decode rate."""
        decoded, span = 0, 0.0
        for wave in range(self.waves):
            timed = [(r.first_at, r.last_at, r.tokens) for r in ok
                     if r.wave == wave and r.first_at is not None and r.last_at is not None
                     and r.tokens > 1]
            if timed:
                decoded += sum(tokens - 1 for _, _, tokens in timed)
                span += max(last for _, last, _ in timed) - min(first for first, _, _ in timed)
        return decoded, span


@dataclass
class TargetResult:
    name: str
    description: str = ""
    skipped: str | None = None
    eos_method: str = ""
    token_source: str = ""
    levels: list[LevelResult] = field(default_factory=list)
    memory: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)

    def eos_verified(self, max_tokens: int) -> bool | None:
        ok = [r for lv in self.levels for r in lv.requests if r.error is None]
        if not ok:
            return None
        return all(r.finish_reason == "length" or r.tokens >= max_tokens for r in ok)


# --- streaming client ----------------------------------------------------------------------


@dataclass
class Endpoint:
    url: str
    model: str | None           # None: leave "model" out (single-model peers)
    extra_body: dict[str, Any]
    pid: int | None = None      # process whose RSS is sampled during each level


async def stream_one(ep: Endpoint, index: int, wave: int, max_tokens: int) -> RequestResult:
    body: dict[str, Any] = {
        "messages": [{"role": "user", "content": prompt_for(index)}],
        "temperature": 0,
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
        **ep.extra_body,
    }
    if ep.model is not None:
        body["model"] = ep.model
    start = time.perf_counter()
    try:
        async with asyncio.timeout(REQUEST_TIMEOUT):
            read = await stream_chat(f"{ep.url}/v1/chat/completions", body, REQUEST_TIMEOUT)
    except (HttpError, OSError, TimeoutError, ValueError, asyncio.IncompleteReadError) as exc:
        read = ChatStream(None, error=f"{type(exc).__name__}: {exc}"[:200])
    status, error, first, last, finish = read.status, read.error, read.first, read.last, read.finish
    end = time.perf_counter()
    tokens = read.usage_tokens if read.usage_tokens is not None else read.deltas
    truncated = False
    if error is None and (tokens == 0 or finish is None):
        truncated = True
        error = ("truncated: HTTP 200 with "
                 + ("0 tokens" if tokens == 0 else f"{tokens} tokens and no finish_reason"))
    rate = None
    if first is not None and last is not None and last > first and tokens > 1:
        rate = (tokens - 1) / (last - first)
    return RequestResult(index, wave, status, tokens, read.deltas,
                         None if first is None else first - start, rate, end - start,
                         finish, error, truncated, first, last)


async def _sample_rss(pid: int, stop: asyncio.Event) -> int | None:
    try:
        proc = psutil.Process(pid)
        peak = 0
        while not stop.is_set():
            peak = max(peak, proc.memory_info().rss)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.05)
        return max(peak, proc.memory_info().rss)
    except psutil.Error:
        return None


async def run_level(ep: Endpoint, concurrency: int, waves: int, first_index: int,
                    max_tokens: int) -> LevelResult:
    stop = asyncio.Event()
    sampler = asyncio.create_task(_sample_rss(ep.pid, stop)) if ep.pid else None
    results: list[RequestResult] = []
    wall = 0.0
    index = first_index
    for wave in range(waves):
        t0 = time.perf_counter()
        batch = await asyncio.gather(*(
            stream_one(ep, index + i, wave, max_tokens) for i in range(concurrency)))
        wall += time.perf_counter() - t0
        index += concurrency
        results.extend(batch)
    stop.set()
    peak = await sampler if sampler else None
    return LevelResult(concurrency, waves, wall, results, peak)


def waves_for(concurrency: int, min_requests: int) -> int:
    return max(1, math.ceil(min_requests / concurrency))


async def measure_endpoint(ep: Endpoint, levels: list[int], args: argparse.Namespace,
                           result: TargetResult) -> int | None:
    """Warm up with one short request, then every level in order, each after a
    short warm-up wave of its own concurrency (not counted: a server's first
    burst pays for what it learns about it, e.g. LMX's prompt budget starts
    cautious beside running streams). Returns the RSS of ep.pid at rest after
    the first warm-up."""
    warm_ep = Endpoint(ep.url, ep.model, ep.extra_body)
    warm_index = 10_000  # prompts of their own: no prompt-cache hits on measured ones
    warm = await run_level(warm_ep, 1, 1, warm_index, min(8, args.tokens))
    if warm.requests[0].error:
        raise RuntimeError(f"warm-up request failed: {warm.requests[0].error}")
    idle = psutil.Process(ep.pid).memory_info().rss if ep.pid else None
    index = 0
    for c in levels:
        warm_index += 100
        await run_level(warm_ep, c, 1, warm_index, min(WARMUP_TOKENS, args.tokens))
        waves = waves_for(c, args.requests)
        log(f"  {result.name}: concurrency {c} ({waves} wave(s) of {c}) ...")
        level = await run_level(ep, c, waves, index, args.tokens)
        index += c * waves
        s = level.summary(args.tokens)
        log(f"    aggregate {s['aggregate_tok_s'] or 0:.1f} tok/s (decode "
            f"{s['decode_aggregate_tok_s'] or 0:.1f}), errors {s['errors']}, "
            f"finish {s['finish_reasons']}")
        result.levels.append(level)
    return idle


# --- server processes ----------------------------------------------------------------------


class ServerProc:
    """A server in its own session, so Ctrl-C reaches only us and we stop it with SIGTERM."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_path: Path,
                 port: int, ready_path: str) -> None:
        self.name = name
        self.url = f"http://127.0.0.1:{port}"
        self.ready_path = ready_path
        self.log_path = log_path
        with log_path.open("wb") as log_file:
            self.proc = subprocess.Popen(argv, env=env, stdout=log_file,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    def log_tail(self, lines: int = 30) -> str:
        text = self.log_path.read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def wait_ready(self, timeout: float = STARTUP_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=5.0) as http:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n"
                                       f"{self.log_tail()}")
                with contextlib.suppress(httpx.HTTPError):
                    if http.get(self.url + self.ready_path).status_code == 200:
                        return
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.name} not ready after {timeout:.0f}s:\n"
                                       f"{self.log_tail()}")
                time.sleep(0.2)

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout)
        # Whatever is left of its process group (an LMX worker, a stuck server) goes too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


@contextlib.contextmanager
def running(server: ServerProc) -> Iterator[ServerProc]:
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def base_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("LMX_")}


# --- peers venv ----------------------------------------------------------------------------


def _project_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def peer_requirements() -> list[str]:
    """The peers at the versions the project venv has, so both sides run the same code."""
    reqs = []
    for dist, spec in (("llama_cpp_python", "llama-cpp-python[server]"),
                       ("mlx", "mlx[cpu]"), ("mlx-lm", "mlx-lm")):
        version = _project_version(dist)
        reqs.append(f"{spec}=={version}" if version else spec)
    return reqs


_peers_state: dict[str, Path | str] = {}


def peers_python() -> Path | str:
    """The peers venv's python, created on first use; or a string saying why not."""
    if "result" in _peers_state:
        return _peers_state["result"]
    python = PEERS_VENV / "bin" / "python"
    stamp = PEERS_VENV / ".requirements"
    reqs = peer_requirements()
    result: Path | str
    try:
        if not (python.exists() and stamp.exists() and stamp.read_text() == "\n".join(reqs)):
            log(f"preparing {PEERS_VENV} with {' '.join(reqs)} (first use; pip reuses its "
                "wheel cache) ...")
            if not python.exists():
                subprocess.run([sys.executable, "-m", "venv", str(PEERS_VENV)], check=True,
                               capture_output=True)
            pip = subprocess.run([str(python), "-m", "pip", "install", "-q", *reqs],
                                 capture_output=True, text=True)
            if pip.returncode != 0:
                raise RuntimeError(pip.stderr.strip().splitlines()[-1] if pip.stderr
                                   else f"pip exited with {pip.returncode}")
            stamp.write_text("\n".join(reqs))
        result = python
    except (OSError, subprocess.CalledProcessError, RuntimeError) as exc:
        result = f"cannot prepare {PEERS_VENV}: {exc}"
    _peers_state["result"] = result
    return result


# --- model files: EOG ids and MLX conversion -----------------------------------------------


def gguf_eog_ids(model: Path) -> list[int]:
    """Every end-of-generation token id of the GGUF's vocabulary (llama.cpp's own list)."""
    import llama_cpp
    from llama_cpp._utils import suppress_stdout_stderr

    with suppress_stdout_stderr(disable=False):  # llama.cpp logs the load on fd 2 regardless
        llm = llama_cpp.Llama(model_path=str(model), vocab_only=True, verbose=False)
    try:
        vocab = llm._model.vocab
        return [t for t in range(llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, t)]
    finally:
        llm.close()


def mlx_engine_missing() -> str | None:
    if not (REPO / "lmx_worker" / "engines" / "mlx_engine.py").is_file():
        return "lmx_worker/engines/mlx_engine.py is not in this tree yet (no MLX backend)"
    return None


def convert_help() -> str | None:
    """`lmx models convert --help`, or None while the command does not exist."""
    helped = subprocess.run([sys.executable, "-m", "lmx_gateway", "models", "convert", "--help"],
                            capture_output=True, text=True, cwd=REPO)
    return helped.stdout if helped.returncode == 0 else None


@dataclass
class MlxDirs:
    q4: Path | None = None
    f32: Path | None = None
    q4_reason: str = ""
    f32_reason: str = ""
    q4_how: str = ""
    f32_how: str = ""


class Conversions:
    """GGUF -> MLX directories, made once per run in the run's temp dir (or the quantized
    one given with --mlx-dir)."""

    def __init__(self, gguf: Path, root: Path, given: Path | None, want_f32: bool) -> None:
        self.gguf = gguf
        self.root = root / "mlx-models"
        self.given = given
        self.want_f32 = want_f32
        self._dirs: MlxDirs | None = None

    def dirs(self) -> MlxDirs:
        if self._dirs is None:
            self._dirs = self._convert()
        return self._dirs

    def _convert(self) -> MlxDirs:
        out = MlxDirs()
        self.root.mkdir(parents=True, exist_ok=True)
        help_text = convert_help()
        if self.given is not None:
            q4 = self.given
            out.q4_how = "given with --mlx-dir"
        elif help_text is None:
            out.q4_reason = out.f32_reason = (
                "`lmx models convert` is not available yet (or give a converted dir with "
                "--mlx-dir)")
            return out
        else:
            q4 = self.root / f"{self.gguf.name.removesuffix('.gguf')}-mlx"
            log(f"converting {self.gguf.name} -> {q4.name} (lmx models convert) ...")
            done = subprocess.run([sys.executable, "-m", "lmx_gateway", "models", "convert",
                                   str(self.gguf), str(q4)], capture_output=True, text=True,
                                  cwd=REPO)
            if done.returncode != 0:
                out.q4_reason = out.f32_reason = (
                    f"lmx models convert failed ({done.returncode}): "
                    f"{(done.stderr or done.stdout).strip()[-300:]}")
                return out
            out.q4_how = "lmx models convert"
        out.q4 = q4
        if not self.want_f32:
            out.f32_reason = "no float32 target selected"
            return out
        f32 = self.root / f"{q4.name}-f32"
        if self.given is None and help_text and "--dequantize" in help_text:
            argv = [sys.executable, "-m", "lmx_gateway", "models", "convert", str(self.gguf),
                    str(f32), "--dequantize"]
            out.f32_how = "lmx models convert --dequantize"
        else:
            # LMX's converter has no dequantized output: mlx-lm's own converter (peers venv)
            # expands every quantized module at its own bit width, in float32.
            py = peers_python()
            if isinstance(py, str):
                out.f32_reason = f"no float32 variant: {py}"
                return out
            argv = [str(py), "-m", "mlx_lm", "convert", "--hf-path", str(q4), "--mlx-path",
                    str(f32), "--dequantize", "--dtype", "float32"]
            out.f32_how = "mlx_lm convert --dequantize --dtype float32 (of the 4-bit dir)"
        log(f"making a float32 copy -> {f32.name} ({out.f32_how}) ...")
        done = subprocess.run(argv, capture_output=True, text=True, cwd=REPO)
        if done.returncode != 0:
            out.f32_reason = (f"float32 conversion failed ({done.returncode}): "
                              f"{(done.stderr or done.stdout).strip()[-300:]}")
        else:
            out.f32 = f32
        return out


def mlx_eos_ids(model_dir: Path, gguf_eog: list[int]) -> list[int]:
    """The GGUF's EOG ids plus whatever the converted config names as EOS."""
    ids = set(gguf_eog)
    for name in ("config.json", "generation_config.json"):
        with contextlib.suppress(OSError, ValueError):
            value = json.loads((model_dir / name).read_text()).get("eos_token_id")
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, list):
                ids.update(v for v in value if isinstance(v, int))
    return sorted(ids)


# --- the targets ---------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace, model: Path, tmp: Path) -> None:
        self.args = args
        self.model = model
        self.tmp = tmp
        self.levels: list[int] = args.levels
        self.eog = gguf_eog_ids(model)
        want_f32 = any(t.endswith("-f32") for t in args.only)
        self.conversions = Conversions(model, tmp, args.mlx_dir, want_f32)

    # LMX ------------------------------------------------------------------------------------

    def _lmx(self, name: str, model_path: Path, result: TargetResult) -> None:
        home = self.tmp / name
        models_dir = home / "models"
        models_dir.mkdir(parents=True)
        (models_dir / model_path.name).symlink_to(model_path.resolve())
        if self.args.profiles_dir is not None:
            # Performance profiles (autotune's): a load takes its settings
            # from them over the config's (see autotune_bench.py).
            shutil.copytree(self.args.profiles_dir, home / "profiles")
        model_id = model_path.name.removesuffix(".gguf")
        top = max(self.levels)
        config = {
            "models": {
                "models_directory": str(models_dir), "auto_load": [model_id],
                "context_length": self.args.ctx, "n_threads": self.args.threads,
                "parallel_slots": self.args.slots,
                "max_concurrent_requests": max(top, self.args.slots, 16),
                "semaphore_timeout_sec": REQUEST_TIMEOUT,
                "inference_timeout_sec": REQUEST_TIMEOUT,
            },
            "logging": {"level": "WARNING"},
        }
        config_path = home / "config.yaml"
        config_path.write_text(yaml.safe_dump(config))
        port = free_port()
        env = base_env()
        env["LMX_HOME"] = str(home)
        result.description = (f"lmx serve, parallel_slots={self.args.slots}, context_length="
                              f"{self.args.ctx}/slot, n_threads={self.args.threads}")
        result.eos_method = "ignore_eos: true"
        result.token_source = "usage"
        server = ServerProc(name, [sys.executable, "-m", "lmx_gateway", "serve", "--config",
                                   str(config_path), "--port", str(port)],
                            env, home / "server.log", port, "/readyz")
        with running(server):
            pid, kv_bytes, backend = lmx_worker_info(server.url, model_id)
            result.notes.append(f"worker backend: {backend}")
            if self.args.profiles_dir is not None:
                perf = httpx.get(f"{server.url}/admin/models/{model_id}/performance",
                                 timeout=10).json()
                result.notes.append(f"loaded with: {json.dumps(perf.get('loaded'))}")
            idle_at_load = psutil.Process(pid).memory_info().rss
            ep = Endpoint(server.url, model_id, {"ignore_eos": True}, pid)
            idle = asyncio.run(measure_endpoint(ep, self.levels, self.args, result))
            idle = idle_at_load if idle is None else idle
            top_level = result.levels[-1]
            peak = top_level.peak_rss_bytes
            result.memory = {
                "pid": pid, "idle_rss_at_load_bytes": idle_at_load,
                "idle_rss_bytes": idle, "configured_kv_bytes": kv_bytes,
                "peak_rss_bytes": peak, "at_concurrency": top_level.concurrency,
                "bound_bytes": idle + kv_bytes if kv_bytes is not None else None,
            }

    def lmx_llama(self, result: TargetResult) -> None:
        self._lmx("lmx-llama", self.model, result)

    def lmx_mlx(self, result: TargetResult) -> None:
        missing = mlx_engine_missing()
        if missing:
            result.skipped = missing
            return
        dirs = self.conversions.dirs()
        if dirs.q4 is None:
            result.skipped = dirs.q4_reason
            return
        result.notes.append(f"MLX dir from {dirs.q4_how}")
        self._lmx("lmx-mlx", dirs.q4, result)

    # llama_cpp.server -------------------------------------------------------------------------

    def _llama_cpp_server(self, result: TargetResult, interrupt: bool,
                          levels: list[int]) -> None:
        py = peers_python()
        if isinstance(py, str):
            result.skipped = py
            return
        port = free_port()
        settings = llama_kwargs(profile_settings(self.args.profiles_dir, self.model),
                                self.args.threads)
        argv = [str(py), "-m", "llama_cpp.server", "--model", str(self.model),
                "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048",
                "--interrupt_requests", str(interrupt)]
        for key, value in settings.items():  # the profile's settings, as LMX loads them
            argv += [f"--{key}", str(value)]
        result.description = " ".join(["python", *argv[1:]]).replace(str(self.model),
                                                                       self.model.name)
        result.eos_method = (f"logit_bias {EOS_BIAS:g} on every end-of-generation id "
                             f"{self.eog} (it has no ignore_eos; min_tokens covers only one id)")
        result.token_source = "content deltas (it sends no usage when streaming)"
        bias = {str(t): EOS_BIAS for t in self.eog}
        server = ServerProc(result.name, argv, base_env(), self.tmp / f"{result.name}.log",
                            port, "/v1/models")
        with running(server):
            ep = Endpoint(server.url, None, {"logit_bias": bias}, server.proc.pid)
            asyncio.run(measure_endpoint(ep, levels, self.args, result))

    def llama_cpp_server(self, result: TargetResult) -> None:
        self._llama_cpp_server(result, False, self.levels)

    def llama_cpp_server_default(self, result: TargetResult) -> None:
        level = max([c for c in self.levels if c <= 8] or [min(self.levels)])
        if level < 2:
            result.skipped = "needs a concurrency level >= 2"
            return
        self._llama_cpp_server(result, True, [level])
        result.notes.append("default --interrupt_requests True: a new request makes streams "
                            "in progress end early with [DONE] (measured at one level only)")

    # mlx_lm.server ----------------------------------------------------------------------------

    def _mlx_lm_server(self, result: TargetResult, model_dir: Path | None, reason: str) -> None:
        if model_dir is None:
            result.skipped = reason
            return
        py = peers_python()
        if isinstance(py, str):
            result.skipped = py
            return
        port = free_port()
        top = max(self.levels)
        argv = [str(py), "-m", "mlx_lm.server", "--model", str(model_dir), "--host", "127.0.0.1",
                "--port", str(port), "--decode-concurrency", str(max(top, 16)),
                "--prompt-concurrency", "8", "--log-level", "WARNING"]
        result.description = " ".join(["python", *argv[1:]]).replace(str(model_dir),
                                                                       model_dir.name)
        eos = mlx_eos_ids(model_dir, self.eog)
        result.eos_method = (f"logit_bias {EOS_BIAS:g} on {eos} (no ignore_eos; logit_bias "
                             "keeps a request batchable, seed would not)")
        result.token_source = "usage"
        bias = {str(t): EOS_BIAS for t in eos}
        server = ServerProc(result.name, argv, mlx_peer_env(), self.tmp / f"{result.name}.log",
                            port, "/health")
        with running(server):
            result.notes.append(blas_note(server.proc.pid))
            ep = Endpoint(server.url, "default_model", {"logit_bias": bias}, server.proc.pid)
            asyncio.run(measure_endpoint(ep, self.levels, self.args, result))

    def mlx_lm_server(self, result: TargetResult) -> None:
        d = self.conversions.dirs()
        if d.q4 is not None:
            result.notes.append(f"MLX dir from {d.q4_how}")
        self._mlx_lm_server(result, d.q4, d.q4_reason)

    def mlx_lm_server_f32(self, result: TargetResult) -> None:
        d = self.conversions.dirs()
        if d.f32 is not None:
            result.notes.append(f"float32 copy made with {d.f32_how}")
        self._mlx_lm_server(result, d.f32, d.f32_reason)

    # in-process -------------------------------------------------------------------------------

    def _inproc(self, result: TargetResult,
                run: Callable[[str, int], tuple[float, float, int, str | None]]) -> None:
        requests = []
        run(prompt_for(10_000), min(8, self.args.tokens))  # warm-up
        wall = 0.0
        for i in range(waves_for(1, self.args.requests)):
            t0 = time.perf_counter()
            ttft, rate, tokens, finish = run(prompt_for(i), self.args.tokens)
            latency = time.perf_counter() - t0
            wall += latency
            requests.append(RequestResult(i, i, 200, tokens, tokens, ttft, rate, latency,
                                          finish))
        result.levels.append(LevelResult(1, len(requests), wall, requests))

    def inproc_llama(self, result: TargetResult) -> None:
        # The in-process side of single_stream.py, reused as is.
        from single_stream import InProcess

        settings = llama_kwargs(profile_settings(self.args.profiles_dir, self.model),
                                self.args.threads)
        inproc = InProcess(self.model, self.args.threads, settings)
        result.description = (f"llama-cpp-python {_project_version('llama_cpp_python')} "
                              f"in this process, create_chat_completion(stream=True), "
                              + ", ".join(f"{k}={v}" for k, v in settings.items()))
        result.eos_method = "logits processor: every EOG id -> -inf"
        result.token_source = "sampled tokens"

        def run(prompt: str, n: int) -> tuple[float, float, int, str | None]:
            ttft, rate, tokens, finish, _ = inproc.run(prompt, n)
            return ttft, rate, tokens, finish

        try:
            self._inproc(result, run)
        finally:
            inproc.llm.close()

    def _inproc_mlx(self, result: TargetResult, model_dir: Path | None, reason: str) -> None:
        if model_dir is None:
            result.skipped = reason
            return
        from lmx_worker.mlx_support.system_blas import use_system_blas

        # Before mlx is imported, as LMX's worker does: OpenBLAS instead of the wheel's own
        # reference BLAS (see openblas_preload).
        use_system_blas(self.args.threads)
        from mlx_lm import load, stream_generate
        from mlx_lm.sample_utils import make_logits_processors, make_sampler

        # load() is typed as returning 2 or 3 items (the config with return_config).
        loaded = load(str(model_dir))
        model, tokenizer = loaded[0], loaded[1]
        template: Callable[..., str] = tokenizer.apply_chat_template  # untyped in mlx-lm
        eos = mlx_eos_ids(model_dir, self.eog)
        processors = make_logits_processors(logit_bias={t: EOS_BIAS for t in eos})
        sampler = make_sampler(0.0)
        result.description = (f"mlx-lm {_project_version('mlx-lm')} in this process, "
                              f"stream_generate on {model_dir.name}")
        result.eos_method = f"logits processor: logit_bias {EOS_BIAS:g} on {eos}"
        result.token_source = "generation_tokens"
        result.notes.append(blas_note())

        def run(prompt: str, n: int) -> tuple[float, float, int, str | None]:
            text = template([{"role": "user", "content": prompt}],
                                                 add_generation_prompt=True, tokenize=False)
            first = last = None
            tokens = 0
            finish: str | None = None
            start = time.perf_counter()
            for resp in stream_generate(model, tokenizer, text, max_tokens=n, sampler=sampler,
                                        logits_processors=processors):
                now = time.perf_counter()
                if first is None:
                    first = now
                last = now
                tokens = int(resp.generation_tokens)
                finish = resp.finish_reason or finish
            if first is None or last is None:
                raise RuntimeError("mlx-lm generated nothing")
            rate = (tokens - 1) / (last - first) if last > first else float("nan")
            return first - start, rate, tokens, finish

        self._inproc(result, run)

    def inproc_mlx(self, result: TargetResult) -> None:
        d = self.conversions.dirs()
        self._inproc_mlx(result, d.q4, d.q4_reason)

    def inproc_mlx_f32(self, result: TargetResult) -> None:
        d = self.conversions.dirs()
        self._inproc_mlx(result, d.f32, d.f32_reason)

    def run(self, name: str) -> TargetResult:
        result = TargetResult(name)
        method: Callable[[TargetResult], None] = getattr(self, name.replace("-", "_"))
        log(f"== {name}")
        try:
            method(result)
        except KeyboardInterrupt:
            raise
        except Exception as exc:
            # One server failing must not cost the others' numbers: report it and go on.
            result.skipped = f"failed: {type(exc).__name__}: {exc}"
        if result.skipped:
            log(f"   skipped: {result.skipped}")
        return result


def lmx_worker_info(url: str, model_id: str) -> tuple[int, int | None, str]:
    """(worker pid, KV cache bytes it was configured for, backend) from the admin API."""
    with httpx.Client(base_url=url, timeout=30.0) as http:
        loaded = http.get("/admin/models").json()["loaded"]
        model = next(m for m in loaded if m["model_id"] == model_id)
        memory = http.get("/admin/memory").json()
    estimate = (memory.get("models", {}).get(model_id) or {}).get("estimate") or {}
    kv = estimate.get("kv_cache_bytes")
    return int(model["pid"]), int(kv) if kv is not None else None, str(model.get("backend"))


def openblas_preload() -> str | None:
    """The OpenBLAS soname to preload into MLX peers, if the system has one.

    The Linux mlx-cpu wheel links its own reference BLAS (mlx_cpu.libs/libblas-*.so), so the
    system's libblas.so.3 alternative does not reach it; LD_PRELOAD puts OpenBLAS first in
    the global symbol scope, the same thing LMX's worker does with
    lmx_worker/mlx_support/system_blas.py.
    Without it mlx_lm.server's float32 matmuls run on the single-threaded reference BLAS and
    the comparison would flatter LMX."""
    for name in ("libopenblas.so.0", "libopenblas.so"):
        try:
            ctypes.CDLL(name)
        except OSError:
            continue
        return name
    return None


def mlx_peer_env() -> dict[str, str]:
    """OpenBLAS, and MLX's CPU kernels built for this CPU as LMX's worker
    builds them (lmx_worker/mlx_support/cpu_jit.py): the peer's fused silu
    gets the same code as LMX's."""
    from lmx_worker.mlx_support.cpu_jit import native_jit_environment

    env = base_env()
    lib = openblas_preload()
    if lib is not None:
        env["LD_PRELOAD"] = " ".join(filter(None, [env.get("LD_PRELOAD"), lib]))
    jit = native_jit_environment(on_cpu=True)
    if isinstance(jit, dict):
        env.update(jit)
    return env


def blas_note(pid: int | None = None) -> str:
    """Which BLAS a process running MLX really mapped (read from /proc/PID/maps)."""
    try:
        maps = Path(f"/proc/{pid or os.getpid()}/maps").read_text()
    except OSError:
        return "BLAS: unknown (no /proc)"
    libs = sorted({line.split()[-1] for line in maps.splitlines()
                   if "blas" in line.rsplit("/", 1)[-1].lower()})
    if not libs:
        return "BLAS: none mapped"
    first = "OpenBLAS" if any("openblas" in lib.lower() for lib in libs) else "reference BLAS"
    return f"BLAS: {first} first in scope; mapped: {', '.join(Path(x).name for x in libs)}"


# --- report --------------------------------------------------------------------------------


def level_of(results: dict[str, TargetResult], name: str, c: int,
             max_tokens: int) -> dict[str, Any] | None:
    r = results.get(name)
    if r is None or r.skipped:
        return None
    for lv in r.levels:
        if lv.concurrency == c:
            return lv.summary(max_tokens)
    return None


def stat(results: dict[str, TargetResult], name: str, c: int, n: int, key: str) -> float | None:
    """One figure (a key of LevelResult.summary) of `name` at concurrency `c`."""
    s = level_of(results, name, c, n)
    return s[key] if s else None


def agg(results: dict[str, TargetResult], name: str, c: int, n: int) -> float | None:
    return stat(results, name, c, n, "aggregate_tok_s")


def decode_agg(results: dict[str, TargetResult], name: str, c: int, n: int) -> float | None:
    return stat(results, name, c, n, "decode_aggregate_tok_s")


def single(results: dict[str, TargetResult], name: str, n: int) -> float | None:
    return stat(results, name, 1, n, "request_decode_tok_s_median")


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _best(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return max(present) if present else None


def targets(results: dict[str, TargetResult], n: int) -> list[dict[str, Any]]:
    mlx_peers = ("mlx-lm-server", "mlx-lm-server-f32")
    mlx_peer8 = _best([decode_agg(results, p, 8, n) for p in mlx_peers])
    mlx_peer1 = _best([single(results, p, n) for p in mlx_peers])
    mlx_inproc = _best([single(results, p, n) for p in ("inproc-mlx", "inproc-mlx-f32")])
    rows: list[tuple[str, float | None, float]] = [
        ("lmx-llama: aggregate decode at 8 / its own at 1",
         _ratio(decode_agg(results, "lmx-llama", 8, n), decode_agg(results, "lmx-llama", 1, n)),
         TARGET_LLAMA_SCALING),
        ("lmx-llama / llama-cpp-server, aggregate decode at 8",
         _ratio(decode_agg(results, "lmx-llama", 8, n),
                decode_agg(results, "llama-cpp-server", 8, n)),
         TARGET_LLAMA_VS_PEER),
        ("lmx-mlx / mlx-lm-server's best, aggregate decode at 8",
         _ratio(decode_agg(results, "lmx-mlx", 8, n), mlx_peer8), TARGET_MLX_VS_PEER),
        ("lmx-mlx: aggregate decode at 8 / its own at 1",
         _ratio(decode_agg(results, "lmx-mlx", 8, n), decode_agg(results, "lmx-mlx", 1, n)),
         TARGET_MLX_SCALING),
        ("lmx-llama single-stream decode / in-process",
         _ratio(single(results, "lmx-llama", n), single(results, "inproc-llama", n)),
         TARGET_SINGLE_VS_INPROC),
        ("lmx-llama single-stream decode / llama-cpp-server",
         _ratio(single(results, "lmx-llama", n), single(results, "llama-cpp-server", n)),
         TARGET_SINGLE_VS_PEER),
        ("lmx-mlx single-stream decode / in-process (best)",
         _ratio(single(results, "lmx-mlx", n), mlx_inproc), TARGET_SINGLE_VS_INPROC),
        ("lmx-mlx single-stream decode / mlx-lm-server (best)",
         _ratio(single(results, "lmx-mlx", n), mlx_peer1), TARGET_SINGLE_VS_PEER),
    ]
    out = [{"target": t, "measured": v, "min": m,
            "pass": None if v is None else v >= m} for t, v, m in rows]
    for name in ("lmx-llama", "lmx-mlx"):
        r = results.get(name)
        if r is None or r.skipped:
            continue
        bad = sum(lv.summary(n)["errors"] for lv in r.levels)
        out.append({"target": f"{name}: errors + truncations, all levels", "measured": bad,
                    "max": 0, "pass": bad == 0})
        mem = r.memory or {}
        peak, bound = mem.get("peak_rss_bytes"), mem.get("bound_bytes")
        out.append({
            "target": f"{name}: worker peak RSS at {mem.get('at_concurrency')} concurrent "
                      "<= idle + configured KV",
            "measured": peak, "max": bound,
            "pass": None if peak is None or bound is None else peak <= bound})
    return out


def _f(v: float | None, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)


def _mb(v: int | None) -> str:
    return "-" if v is None else f"{v / 2**20:.0f} MB"


def render(report: dict[str, Any]) -> str:
    cfg = report["config"]
    n = cfg["tokens"]
    load = cfg["loadavg_1m"]
    lines = [
        f"model: {cfg['model']}",
        f"{n} tokens/request, levels {cfg['levels']}, >= {cfg['min_requests']} requests/level, "
        f"threads={cfg['threads']}, cpus={cfg['cpus']}, LMX parallel_slots={cfg['slots']}, "
        f"context {cfg['ctx']}/slot",
        f"1-min load average: {load['start']:.2f} at start, {load['end']:.2f} at end"
        + ("  (WARNING: other processes competed for the CPUs; numbers are noisy)"
           if max(load["start"], load["end"]) > cfg["threads"] + 1.0 else ""),
        "",
        f"{'server':<25}{'conc':>5}{'reqs':>5}{'agg tok/s':>10}{'decode':>8}{'req tok/s':>10}"
        f"{'TTFT p50':>10}{'TTFT p95':>10}{'lat p50':>9}{'lat p95':>9}{'err':>5}{'trunc':>6}"
        f"{'stop<N':>7}{'peak RSS':>10}",
    ]
    for t in report["targets"]:
        if t["skipped"]:
            continue
        for s in t["levels"]:
            lines.append(
                f"{t['name']:<25}{s['concurrency']:>5}{s['requests']:>5}"
                f"{_f(s['aggregate_tok_s']):>10}{_f(s['decode_aggregate_tok_s']):>8}"
                f"{_f(s['request_decode_tok_s_median']):>10}"
                f"{_f(s['ttft_ms_p50'], '.0f') + 'ms':>10}{_f(s['ttft_ms_p95'], '.0f') + 'ms':>10}"
                f"{_f(s['latency_s_p50'], '.2f') + 's':>9}{_f(s['latency_s_p95'], '.2f') + 's':>9}"
                f"{s['errors']:>5}{s['truncations']:>6}{s['stopped_early']:>7}"
                f"{_mb(s['peak_rss_bytes']):>10}")
    lines.append("(agg tok/s: generated tokens of all answered requests / wall time; decode: "
                 "aggregate decode rate, tokens after each request's first / the time from a "
                 "wave's first streamed token to its last; req tok/s: "
                 "median per-request decode rate; stop<N: ended by EOS before N tokens; peak RSS: "
                 "the server process (LMX: its worker) during the level)")
    ratios = report["ratios"]
    if ratios:
        lines += ["", "ratios LMX / peer, aggregate tok/s (wall; decode):"]
        for r in ratios:
            lines.append(f"  {r['pair']:<52} at {r['concurrency']:>2}: {_f(r['ratio'], '.2f')}; "
                         f"{_f(r['decode_ratio'], '.2f')}")
    lines += ["", "targets (issue 3):"]
    for t in report["target_checks"]:
        verdict = {True: "PASS", False: "FAIL", None: "n/a"}[t["pass"]]
        if "min" in t:
            lines.append(f"  {t['target']:<62} {_f(t['measured'], '.2f'):>7}  "
                         f">= {t['min']:<5} {verdict}")
        elif isinstance(t.get("max"), int) and t["max"] > 0:
            lines.append(f"  {t['target']:<62} {_mb(t['measured']):>7}  "
                         f"<= {_mb(t['max'])} {verdict}")
        else:
            lines.append(f"  {t['target']:<62} {t['measured']!s:>7}  <= {t.get('max')!s:<5} "
                         f"{verdict}")
    lines += ["", "per server:"]
    for t in report["targets"]:
        lines.append(f"  {t['name']}: " + (f"SKIPPED: {t['skipped']}" if t["skipped"]
                                           else t["description"]))
        if t["skipped"]:
            continue
        verified = {True: "yes (every request reached N tokens)",
                    False: "NO (some requests stopped at EOS)", None: "unknown"}
        lines.append(f"      EOS suppression: {t['eos_method']}; effective: "
                     f"{verified[t['eos_verified']]}; tokens from {t['token_source']}")
        mem = t["memory"]
        if mem and "configured_kv_bytes" in mem:
            lines.append(f"      worker pid {mem['pid']}: RSS at load "
                         f"{_mb(mem['idle_rss_at_load_bytes'])}, idle "
                         f"{_mb(mem['idle_rss_bytes'])}, configured KV "
                         f"{_mb(mem['configured_kv_bytes'])}, peak at {mem['at_concurrency']} "
                         f"concurrent {_mb(mem['peak_rss_bytes'])}")
        for note in t["notes"]:
            lines.append(f"      {note}")
        for s in t["levels"]:
            for e in s["error_samples"]:
                lines.append(f"      at {s['concurrency']}: {e}")
    lines.append(f"\ntotal time: {report['elapsed_s']:.0f} s")
    return "\n".join(lines)


def build_report(results: dict[str, TargetResult], args: argparse.Namespace, model: Path,
                 load: dict[str, float], elapsed: float) -> dict[str, Any]:
    n = args.tokens
    ratios = []
    for lmx, peers in (("lmx-llama", ["llama-cpp-server"]),
                       ("lmx-mlx", ["mlx-lm-server", "mlx-lm-server-f32"])):
        for c in args.levels:
            best = _best([agg(results, p, c, n) for p in peers])
            mine = agg(results, lmx, c, n)
            best_decode = _best([decode_agg(results, p, c, n) for p in peers])
            if mine is not None and best is not None:
                ratios.append({"pair": f"{lmx} / {' or '.join(peers)} (best)"
                               if len(peers) > 1 else f"{lmx} / {peers[0]}",
                               "concurrency": c, "ratio": mine / best,
                               "decode_ratio": _ratio(decode_agg(results, lmx, c, n),
                                                      best_decode)})
    return {
        "config": {"model": str(model), "tokens": n, "levels": args.levels,
                   "min_requests": args.requests, "threads": args.threads, "slots": args.slots,
                   "ctx": args.ctx, "cpus": os.cpu_count(), "quick": args.quick,
                   "python": platform.python_version(), "loadavg_1m": load,
                   "versions": {d: _project_version(d)
                                for d in ("llama_cpp_python", "mlx", "mlx-lm")}},
        "targets": [{
            "name": r.name, "description": r.description, "skipped": r.skipped,
            "eos_method": r.eos_method, "eos_verified": r.eos_verified(n),
            "token_source": r.token_source, "memory": r.memory, "notes": r.notes,
            "levels": [lv.summary(n) for lv in r.levels],
            "requests": [{"concurrency": lv.concurrency, **asdict(q)}
                         for lv in r.levels for q in lv.requests],
        } for r in results.values()],
        "ratios": ratios,
        "target_checks": targets(results, n),
        "elapsed_s": elapsed,
    }


# --- main ----------------------------------------------------------------------------------


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true",
                        help="levels 1 and 8, 32 tokens, 2 requests per level (< 5 minutes)")
    parser.add_argument("--tokens", type=int, default=None,
                        help="max_tokens per request (default 128, --quick 32)")
    parser.add_argument("--levels", default=None,
                        help="comma-separated concurrency levels (default 1,2,4,8,16)")
    parser.add_argument("--requests", type=int, default=None,
                        help="at least this many requests per level, in waves of the level's "
                             "concurrency (default 4, --quick 2)")
    parser.add_argument("--only", default=None,
                        help=f"comma-separated servers, from: {','.join(ALL_TARGETS)}")
    parser.add_argument("--threads", type=int, default=2, help="threads, every server")
    parser.add_argument("--slots", type=int, default=16, help="LMX models.parallel_slots")
    parser.add_argument("--ctx", type=int, default=1024, help="LMX context_length per slot")
    parser.add_argument("--model", type=Path, default=None,
                        help="GGUF file (default: the bundled SmolLM2-135M-Instruct Q4_1)")
    parser.add_argument("--mlx-dir", type=Path, default=None,
                        help="an MLX directory converted from --model already (default: "
                             "convert with `lmx models convert` into a temp dir)")
    parser.add_argument("--profiles-dir", type=Path, default=None,
                        help="performance profiles (lmx autotune's) copied into each LMX "
                             "home: the model loads with its profile's settings")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    args = parser.parse_args(argv)
    if args.mlx_dir is not None and not (args.mlx_dir / "config.json").is_file():
        parser.error(f"--mlx-dir {args.mlx_dir}: no config.json there")
    if args.tokens is None:
        args.tokens = 32 if args.quick else 128
    if args.requests is None:
        args.requests = 2 if args.quick else 4
    if args.levels is None:
        args.levels = list(QUICK_LEVELS if args.quick else FULL_LEVELS)
    else:
        try:
            args.levels = sorted({int(x) for x in args.levels.split(",") if x.strip()})
        except ValueError:
            parser.error("--levels takes integers, e.g. 1,4,8")
    if not args.levels or min(args.levels) < 1:
        parser.error("--levels needs positive integers")
    if args.only:
        args.only = [x.strip() for x in args.only.split(",") if x.strip()]
        unknown = [x for x in args.only if x not in ALL_TARGETS]
        if unknown:
            parser.error(f"unknown server(s) {unknown}; choose from {', '.join(ALL_TARGETS)}")
    else:
        args.only = list(ALL_TARGETS)
    if args.tokens < 2 or args.requests < 1 or args.threads < 1 or args.slots < 1:
        parser.error("need --tokens >= 2, --requests >= 1, --threads >= 1, --slots >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    model: Path = args.model if args.model is not None else ensure_default_model()
    if not model.is_file():
        log(f"error: no such model file: {model}")
        return 2
    started = time.monotonic()
    load_start = os.getloadavg()[0]
    results: dict[str, TargetResult] = {}
    with tempfile.TemporaryDirectory(prefix="lmx-serve-bench-") as tmp:
        bench = Bench(args, model, Path(tmp))
        try:
            # One server at a time, in ALL_TARGETS order: never two on the same cores.
            for name in ALL_TARGETS:
                if name in args.only:
                    results[name] = bench.run(name)
        except KeyboardInterrupt:
            log("interrupted; servers stopped")
            return 130
    report = build_report(results, args, model,
                          {"start": load_start, "end": os.getloadavg()[0]},
                          time.monotonic() - started)
    print(json.dumps(report, indent=2) if args.json else render(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
