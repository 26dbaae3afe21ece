"""Stall-free batching: what running streams see while a long prompt is read.

For each backend (llama.cpp on the GGUF, MLX on its `lmx models convert` copy),
two `lmx serve` processes run side by side on the same model: one with the
stall-free budget (`models.max_inter_token_ms`, default 250) and one with it
disabled (`max_inter_token_ms: 0`, the behaviour before issue 17). Each case
is run on both, alternating, so drift hits both alike:

1. N greedy streams decode (chat, `ignore_eos`, N = 1, 4, 8);
2. once each has tokens, their inter-token gaps are recorded for a while
   ("before");
3. a completion request with a P-token prompt arrives (P = 1k, 4k; a
   fresh number list per request, so the prefix cache cannot serve it); the
   streams' gaps until its first token are the "during" figures, and its time
   to first token (TTFT) is reported;
4. the streams are cut and the next case starts.

Reported per case and mode: stream gap p50/p99/max before and during the
read, the long request's TTFT and real prompt size, the worker's budget
(prompt tokens per step) and step time from `/admin/models`. Then the issue's
targets on llama.cpp, for 4 streams and the 4k prompt: gap p99 during the
read <= max_inter_token_ms, TTFT <= 1.5x the unbudgeted TTFT.

    .venv/bin/python benchmarks/stall_bench.py               # both backends, N=1,4,8, 1k+4k
    .venv/bin/python benchmarks/stall_bench.py --quick       # N=4, 1k only, 1 s before
    .venv/bin/python benchmarks/stall_bench.py --backends llama --levels 4 --prompts 4000 --json

The servers get temporary homes and configs; they are stopped with SIGTERM
at the end, on Ctrl-C and on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import httpx
import yaml

from lmx_supervisor.models.bundled_model import ensure_default_model

REPO = Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT = 300.0
TTFT_RATIO_TARGET = 1.5
SUBJECTS = ["lighthouse", "market", "bicycle", "glacier", "orchestra", "volcano", "harbor",
            "library"]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


class Server:
    """`lmx serve` in its own session (Ctrl-C reaches only us; we SIGTERM it)."""

    def __init__(self, home: Path, model: Path, model_id: str, args: argparse.Namespace,
                 budget_ms: float) -> None:
        models_dir = home / "models"
        models_dir.mkdir(parents=True)
        (models_dir / model.name).symlink_to(model.resolve())
        self.model_id = model_id
        slots = max(args.levels) + 1
        config = {
            "models": {"models_directory": str(models_dir), "auto_load": [model_id],
                       "context_length": args.ctx, "n_threads": args.threads,
                       "parallel_slots": slots, "max_concurrent_requests": slots,
                       "max_inter_token_ms": budget_ms, "inference_timeout_sec": 3600},
            "logging": {"level": "WARNING"},
        }
        (home / "config.yaml").write_text(yaml.safe_dump(config))
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log_path = home / "server.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("LMX_")}
        env["LMX_HOME"] = str(home)
        with self.log_path.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "lmx_gateway", "serve", "--config",
                 str(home / "config.yaml"), "--port", self.url.rsplit(":", 1)[1]],
                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        with httpx.Client(base_url=self.url, timeout=5) as http:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"lmx serve exited {self.proc.returncode}:\n"
                                       f"{self.log_path.read_text(errors='replace')[-2000:]}")
                with contextlib.suppress(httpx.HTTPError):
                    if http.get("/readyz").status_code == 200:
                        return
                if time.monotonic() > deadline:
                    raise RuntimeError("lmx serve not ready in time")
                time.sleep(0.2)

    def worker_stats(self) -> dict[str, Any]:
        with httpx.Client(base_url=self.url, timeout=30) as http:
            for row in http.get("/admin/models").json()["loaded"]:
                if row["model_id"] == self.model_id:
                    return dict(row.get("worker_stats") or {})
        return {}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


@dataclass
class CaseResult:
    backend: str
    streams: int
    prompt_target: int
    mode: str  # "budget" or "off"
    budget_ms: float
    prompt_tokens: int = 0
    ttft_s: float | None = None
    before_ms: dict[str, float | None] = field(default_factory=dict)
    during_ms: dict[str, float | None] = field(default_factory=dict)
    budget_tokens: int | None = None  # worker stats after the read
    step_time_ms: float | None = None
    error: str = ""


def summary_ms(gaps: list[float]) -> dict[str, float | None]:
    def ms(v: float | None) -> float | None:
        return None if v is None else round(1000 * v, 1)
    return {"p50": ms(pct(gaps, 50)), "p99": ms(pct(gaps, 99)),
            "max": ms(max(gaps) if gaps else None), "n": float(len(gaps))}


def long_prompt(tokens: int, salt: int) -> str:
    """About `tokens` tokens of 4-digit numbers (4 digits + ", " = 6 tokens
    with SmolLM2's digit-split tokenizer), starting at a number of its own."""
    start = 1000 + (salt * 997) % 3000
    return ", ".join(str(1000 + (start + i) % 9000) for i in range(max(1, tokens // 6))) + ","


async def stream(client: httpx.AsyncClient, model: str, subject: str,
                 arrivals: list[float]) -> None:
    body = {"model": model, "temperature": 0, "max_tokens": 100000, "ignore_eos": True,
            "stream": True,
            "messages": [{"role": "user", "content": f"Write a long story about a {subject}."}]}
    async with client.stream("POST", "/v1/chat/completions", json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"stream: HTTP {resp.status_code}: {await resp.aread()!r}")
        async for line in resp.aiter_lines():
            if line.startswith("data: {") and '"content"' in line:
                arrivals.append(time.monotonic())


async def read_long(client: httpx.AsyncClient, model: str, prompt: str
                    ) -> tuple[float, float, int]:
    """(sent, first token time, prompt tokens) of one completion request."""
    body = {"model": model, "prompt": prompt, "temperature": 0, "max_tokens": 8,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    sent, first, prompt_tokens = time.monotonic(), 0.0, 0
    async with client.stream("POST", "/v1/completions", json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"long prompt: HTTP {resp.status_code}: {await resp.aread()!r}")
        async for line in resp.aiter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                prompt_tokens = int(event["usage"]["prompt_tokens"])
            if not first and any(c.get("text") for c in event.get("choices") or []):
                first = time.monotonic()
    return sent, first, prompt_tokens


async def run_case(server: Server, result: CaseResult, salt: int, before_sec: float) -> None:
    arrivals: list[list[float]] = [[] for _ in range(result.streams)]
    async with httpx.AsyncClient(base_url=server.url, timeout=3600) as client:
        tasks = [asyncio.create_task(stream(client, server.model_id,
                                            SUBJECTS[i % len(SUBJECTS)], arrivals[i]))
                 for i in range(result.streams)]
        try:
            deadline = time.monotonic() + 600
            while min(len(a) for a in arrivals) < 3:
                for task in tasks:
                    if task.done():
                        task.result()
                        raise RuntimeError("a stream ended early")
                if time.monotonic() > deadline:
                    raise RuntimeError("streams did not start")
                await asyncio.sleep(0.05)
            window_start = time.monotonic()
            await asyncio.sleep(before_sec)
            sent, first, result.prompt_tokens = await read_long(
                client, server.model_id, long_prompt(result.prompt_target, salt))
            await asyncio.sleep(0.5)  # the gap that spans the end of the read lands
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    result.ttft_s = round(first - sent, 3) if first else None
    before, during = [], []
    for times in arrivals:
        for earlier, later in itertools.pairwise(times):
            if window_start <= earlier and later <= sent:
                before.append(later - earlier)
            elif later > sent and earlier < first:
                during.append(later - earlier)
    result.before_ms = summary_ms(before)
    result.during_ms = summary_ms(during)
    stats = server.worker_stats()
    result.budget_tokens = stats.get("prompt_budget_tokens")
    result.step_time_ms = stats.get("step_time_ms")


def mlx_model(args: argparse.Namespace, gguf: Path, tmp: Path) -> Path:
    if args.mlx_dir:
        return Path(args.mlx_dir)
    dest = tmp / f"{gguf.name.removesuffix('.gguf')}-mlx"
    log(f"converting {gguf.name} for MLX (lmx models convert) ...")
    done = subprocess.run([sys.executable, "-m", "lmx_gateway", "models", "convert", str(gguf),
                           str(dest)], capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        raise RuntimeError(f"lmx models convert failed: {done.stderr[-500:]}")
    return dest


@contextlib.contextmanager
def servers(tmp: Path, model: Path, model_id: str, args: argparse.Namespace
            ) -> Iterator[dict[str, Server]]:
    pair = {"budget": Server(tmp / f"{model_id}-budget", model, model_id, args, args.target_ms),
            "off": Server(tmp / f"{model_id}-off", model, model_id, args, 0)}
    try:
        for server in pair.values():
            server.wait_ready()
        yield pair
    finally:
        for server in pair.values():
            server.stop()


def run(args: argparse.Namespace) -> list[CaseResult]:
    gguf = Path(args.model) if args.model else ensure_default_model()
    results: list[CaseResult] = []
    with tempfile.TemporaryDirectory(prefix="lmx-stall-") as tmp_name:
        tmp = Path(tmp_name)
        salt = 0
        for backend in args.backends:
            model = gguf if backend == "llama" else mlx_model(args, gguf, tmp)
            model_id = model.name.removesuffix(".gguf")
            with servers(tmp, model, model_id, args) as pair:
                for n in args.levels:
                    for p in args.prompts:
                        for mode in ("budget", "off"):
                            salt += 1
                            result = CaseResult(backend, n, p, mode,
                                                args.target_ms if mode == "budget" else 0)
                            log(f"{backend}: {n} streams, {p}-token prompt, {mode} ...")
                            try:
                                asyncio.run(run_case(pair[mode], result, salt, args.before_sec))
                            except Exception as exc:  # report it, go on with the rest
                                result.error = f"{type(exc).__name__}: {exc}"[:300]
                                log(f"  failed: {result.error}")
                            results.append(result)
    return results


def _f(v: Any) -> str:
    return "-" if v is None else (f"{v:.0f}" if isinstance(v, float) else str(v))


def _gaps(g: dict[str, float | None]) -> str:
    return f"{_f(g.get('p50'))}/{_f(g.get('p99'))}/{_f(g.get('max'))}"


def targets(results: list[CaseResult], target_ms: float) -> list[str]:
    def find(mode: str) -> CaseResult | None:
        return next((r for r in results if r.backend == "llama" and r.streams == 4
                     and r.prompt_target == 4000 and r.mode == mode and not r.error), None)
    on, off = find("budget"), find("off")
    if on is None or off is None:
        return ["targets: need llama.cpp, 4 streams, 4000-token prompt in both modes"]
    p99 = on.during_ms.get("p99")
    lines = [f"llama.cpp 4 streams + 4k prompt: gap p99 during read {_f(p99)} ms "
             f"<= {target_ms:.0f} ms: {'PASS' if p99 is not None and p99 <= target_ms else 'FAIL'}"]
    if on.ttft_s and off.ttft_s:
        ratio = on.ttft_s / off.ttft_s
        lines.append(f"llama.cpp 4 streams + 4k prompt: TTFT {on.ttft_s:.2f} s vs {off.ttft_s:.2f}"
                     f" s unbudgeted = {ratio:.2f}x <= {TTFT_RATIO_TARGET}x: "
                     f"{'PASS' if ratio <= TTFT_RATIO_TARGET else 'FAIL'}")
    return lines


def render(results: list[CaseResult], args: argparse.Namespace, load: tuple[float, float]
           ) -> str:
    out = [f"stall_bench: target {args.target_ms:.0f} ms, {args.threads} threads, context "
           f"{args.ctx}, load average {load[0]:.2f} at start, {load[1]:.2f} at end", "",
           "gaps in ms as p50/p99/max; budget = prompt tokens per step (worker stats)", "",
           f"{'backend':8} {'N':>2} {'prompt':>6} {'mode':6} {'before':>16} {'during':>18} "
           f"{'TTFT s':>7} {'on/off':>6} {'budget':>6} {'step ms':>7}"]
    for r in results:
        if r.error:
            out.append(f"{r.backend:8} {r.streams:>2} {r.prompt_tokens or r.prompt_target:>6} "
                       f"{r.mode:6} error: {r.error}")
            continue
        ratio = ""
        if r.mode == "off":
            on = next((x for x in results if (x.backend, x.streams, x.prompt_target, x.mode)
                       == (r.backend, r.streams, r.prompt_target, "budget")), None)
            if on and on.ttft_s and r.ttft_s:
                ratio = f"{on.ttft_s / r.ttft_s:.2f}"
        out.append(f"{r.backend:8} {r.streams:>2} {r.prompt_tokens:>6} {r.mode:6} "
                   f"{_gaps(r.before_ms):>16} {_gaps(r.during_ms):>18} "
                   f"{_f(r.ttft_s and round(r.ttft_s, 2)):>7} {ratio:>6} "
                   f"{_f(r.budget_tokens) if r.mode == 'budget' else '':>6} "
                   f"{_f(r.step_time_ms):>7}")
    return "\n".join([*out, "", *targets(results, args.target_ms)])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="4 streams, a 1k prompt, 1 s before the read")
    ap.add_argument("--backends", default="llama,mlx", help="llama,mlx")
    ap.add_argument("--levels", default=None, help="streams decoding, e.g. 1,4,8")
    ap.add_argument("--prompts", default=None, help="long prompt sizes in tokens, e.g. 1000,4000")
    ap.add_argument("--target-ms", type=float, default=250.0,
                    help="max_inter_token_ms of the budgeted server")
    ap.add_argument("--before-sec", type=float, default=None,
                    help="seconds of decode-only gaps recorded before the prompt")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=4608, help="context_length per slot")
    ap.add_argument("--model", default=None, help="GGUF (default: the bundled model)")
    ap.add_argument("--mlx-dir", default=None, help="an MLX directory converted already")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    args.levels = [int(x) for x in (args.levels or ("4" if args.quick else "1,4,8")).split(",")]
    args.prompts = [int(x) for x in
                    (args.prompts or ("1000" if args.quick else "1000,4000")).split(",")]
    if args.before_sec is None:
        args.before_sec = 1.0 if args.quick else 3.0
    return args


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    start_load = os.getloadavg()[0]
    results = run(args)
    load = (start_load, os.getloadavg()[0])
    if args.json:
        print(json.dumps({"load_average": load, "target_ms": args.target_ms,
                          "cases": [asdict(r) for r in results]}, indent=2))
    else:
        print(render(results, args, load))
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
