"""A sharded MLX model vs. the same model whole, in one server (run by hand).

    python benchmarks/sharded_bench.py                      # bundled SmolLM2, converted to MLX
    python benchmarks/sharded_bench.py --model /path/to/mlx-dir --tokens 64 --reps 2

Starts its own `lmx serve` (temporary LMX home) with the model loaded twice:
whole ("whole") and tensor-parallel over two local ranks on loopback
("sharded", `shards: ["local", "local"]`). Both run at the same time, but
are measured in turns (ABAB), so outside load hits both alike. Reports:

- single-stream decode tok/s (median over reps): (tokens - 1) / (first to
  last content delta) of one greedy stream of exactly --tokens tokens;
- 8-stream aggregate tok/s: 8 such streams at once, all tokens / wall time;
- the bytes that crossed the ring between the ranks, measured with the
  kernel's per-socket TCP counters (`ss -tin`, bytes_received summed over
  every end of every connection touching a rank's ring port), per
  generated token, next to the all_sum payload the model's shape implies
  (2 all_sums per layer of hidden_size floats per token, plus rank 0's
  step order: 1 KiB per step);
- what that traffic costs on a real link: per decode step, 2 x layers
  collectives, each paying about one link round trip (--rtt-us, for
  10 GbE and Thunderbolt) plus its bytes at the link's rate. On loopback
  on one 2-core box the sharded model is SLOWER than the whole one (two
  processes share the same two cores and each step waits on 60 round
  trips); the point of sharding is a model too big for one host.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from lmx_supervisor.models.bundled_model import ensure_default_model  # noqa: E402

STARTUP_TIMEOUT = 300
SUBJECTS = ["lighthouse", "market", "bicycle", "glacier", "orchestra", "volcano", "harbor",
            "library"]
# (name, usable bytes per second, round trip in microseconds: typical TCP
# over the link, not the wire's own latency)
LINKS = [("10 GbE", 10e9 / 8 * 0.94, 60.0), ("Thunderbolt 4 (IP)", 20e9 / 8 * 0.9, 40.0)]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def mlx_model(args: argparse.Namespace, scratch: Path) -> Path:
    if args.model:
        return Path(args.model).resolve()
    dest = scratch / "SmolLM2-135M-Instruct-mlx"
    gguf = ensure_default_model()
    subprocess.run([sys.executable, "-m", "lmx_gateway", "models", "convert", str(gguf),
                    str(dest)], check=True, capture_output=True, cwd=REPO, timeout=600)
    return dest


class Server:
    def __init__(self, home: Path, model: Path, threads: int) -> None:
        models_dir = home / "models"
        models_dir.mkdir(parents=True)
        (models_dir / model.name).symlink_to(model)
        self.model_dir = model
        config = {"models": {"models_directory": str(models_dir), "parallel_slots": 8,
                             "max_concurrent_requests": 16, "context_length": 1024,
                             "n_threads": threads, "inference_timeout_sec": 3600,
                             "loader_timeout_sec": 600},
                  "logging": {"level": "WARNING"}}
        (home / "config.yaml").write_text(yaml.safe_dump(config))
        self.url = f"http://127.0.0.1:{free_port()}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("LMX_")}
        env["LMX_HOME"] = str(home)
        self.log_path = home / "server.log"
        with self.log_path.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "lmx_gateway", "serve", "--config",
                 str(home / "config.yaml"), "--port", self.url.rsplit(":", 1)[1]],
                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO)

    def wait_healthy(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        with httpx.Client(base_url=self.url, timeout=5) as http:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"lmx serve exited {self.proc.returncode}:\n"
                                       f"{self.log_path.read_text(errors='replace')[-2000:]}")
                with contextlib.suppress(httpx.HTTPError):
                    if http.get("/healthz").status_code == 200:
                        return
                if time.monotonic() > deadline:
                    raise RuntimeError("lmx serve not healthy in time")
                time.sleep(0.2)

    def load(self, served_name: str, shards: list[str] | None) -> dict[str, Any]:
        body: dict[str, Any] = {"model_id": self.model_dir.name, "served_name": served_name}
        if shards:
            body["shards"] = shards
        with httpx.Client(base_url=self.url, timeout=STARTUP_TIMEOUT) as http:
            resp = http.post("/admin/models/load", json=body)
            if resp.status_code != 200:
                raise RuntimeError(f"load {served_name}: {resp.status_code} {resp.text}")
            rows = {r["model_id"]: r for r in http.get("/admin/models").json()["loaded"]}
        return dict(rows[served_name])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def ring_bytes(ports: set[int]) -> int:
    """Bytes received so far on every TCP socket end touching `ports`."""
    out = subprocess.run(["ss", "-tinH", "state", "established"], capture_output=True,
                         text=True, check=True).stdout
    total, touching = 0, False
    for line in out.splitlines():
        if not line.startswith(("\t", " ")):  # a socket line: addresses
            ends = re.findall(r":(\d+)\s", line + " ")
            touching = any(int(p) in ports for p in ends)
            continue
        if touching:
            found = re.search(r"bytes_received:(\d+)", line)
            total += int(found.group(1)) if found else 0
    return total


async def stream(client: httpx.AsyncClient, model: str, subject: str, tokens: int
                 ) -> tuple[int, float, float]:
    """(content deltas, first delta time, last delta time) of one greedy stream."""
    body = {"model": model, "temperature": 0, "max_tokens": tokens, "ignore_eos": True,
            "stream": True,
            "messages": [{"role": "user", "content": f"Write a story about a {subject}."}]}
    count, first, last = 0, 0.0, 0.0
    async with client.stream("POST", "/v1/chat/completions", json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"{model}: {resp.status_code} {await resp.aread()!r}")
        async for line in resp.aiter_lines():
            if line.startswith("data: {") and '"content"' in line:
                now = time.perf_counter()
                first = first or now
                last = now
                count += 1
    return count, first, last


async def single(url: str, model: str, tokens: int, rep: int) -> float:
    async with httpx.AsyncClient(base_url=url, timeout=3600) as client:
        count, first, last = await stream(client, model, SUBJECTS[rep % len(SUBJECTS)], tokens)
    return (count - 1) / (last - first) if last > first else 0.0


async def aggregate(url: str, model: str, tokens: int, streams: int) -> tuple[float, int]:
    async with httpx.AsyncClient(base_url=url, timeout=3600) as client:
        started = time.perf_counter()
        results = await asyncio.gather(*(stream(client, model, SUBJECTS[i % len(SUBJECTS)],
                                                tokens) for i in range(streams)))
        wall = time.perf_counter() - started
    total = sum(count for count, _, _ in results)
    return total / wall, total


def model_shape(model: Path) -> tuple[int, int]:
    config = json.loads((model / "config.json").read_text())
    text = config.get("text_config") or config
    return int(text["num_hidden_layers"]), int(text["hidden_size"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="an MLX model dir (default: bundled SmolLM2, converted)")
    parser.add_argument("--tokens", type=int, default=64, help="tokens per stream")
    parser.add_argument("--reps", type=int, default=3, help="single-stream runs per side")
    parser.add_argument("--streams", type=int, default=8, help="streams of the aggregate run")
    parser.add_argument("--threads", type=int, default=1, help="n_threads per worker/rank")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lmx-sharded-bench-") as scratch:
        model = mlx_model(args, Path(scratch))
        layers, hidden = model_shape(model)
        server = Server(Path(scratch) / "home", model, args.threads)
        try:
            server.wait_healthy()
            log("loading whole and sharded ...")
            server.load("whole", None)
            row = server.load("sharded", ["local", "local"])
            ports = {int(r["ring_address"].rsplit(":", 1)[1]) for r in row["shards"]}
            log(f"ranks: {row['shards']}")
            for name in ("whole", "sharded"):  # warm-up, discarded
                asyncio.run(single(server.url, name, 8, 0))
            speeds: dict[str, list[float]] = {"whole": [], "sharded": []}
            ring_before = ring_bytes(ports)
            sharded_tokens = 0
            for rep in range(args.reps):
                for name in ("whole", "sharded"):
                    speeds[name].append(asyncio.run(single(server.url, name, args.tokens, rep)))
                    sharded_tokens += args.tokens if name == "sharded" else 0
                log(f"rep {rep}: whole {speeds['whole'][-1]:.1f} tok/s, "
                    f"sharded {speeds['sharded'][-1]:.1f} tok/s")
            single_bytes = ring_bytes(ports) - ring_before
            agg: dict[str, float] = {}
            for name in ("whole", "sharded"):
                before = ring_bytes(ports)
                agg[name], total = asyncio.run(aggregate(server.url, name, args.tokens,
                                                         args.streams))
                if name == "sharded":
                    multi_bytes, multi_tokens = ring_bytes(ports) - before, total
                log(f"{args.streams} streams, {name}: {agg[name]:.1f} tok/s")
        finally:
            server.stop()
    itemsize = 4  # float32 activations on a CPU (a GPU would sum float16: half)
    sums_per_token = 2 * layers * hidden * itemsize
    single_step_s = 1 / statistics.median(speeds["sharded"])
    per_token_single = single_bytes / max(1, sharded_tokens)
    per_token_multi = multi_bytes / max(1, multi_tokens)
    links = []
    for name, rate, rtt_us in LINKS:
        # One stream: every token is one step of 2 x layers collectives; the
        # counted bytes are both directions, a full-duplex link carries each
        # direction at its rate.
        wire_s = per_token_single / 2 / rate
        comm_s = 2 * layers * rtt_us * 1e-6 + wire_s
        links.append({"link": name, "comm_ms_per_step": round(comm_s * 1000, 2),
                      "bandwidth_ms_per_token": round(wire_s * 1000, 4),
                      "max_tok_s_from_comm": round(1 / comm_s, 1)})
    result = {
        "model": str(model), "layers": layers, "hidden_size": hidden,
        "tokens_per_stream": args.tokens, "reps": args.reps, "threads": args.threads,
        "single_stream_tok_s": {k: round(statistics.median(v), 2) for k, v in speeds.items()},
        f"aggregate_{args.streams}_streams_tok_s": {k: round(v, 2) for k, v in agg.items()},
        "ring_bytes_per_token_single_stream": round(per_token_single),
        f"ring_bytes_per_token_{args.streams}_streams": round(per_token_multi),
        "all_sum_payload_bytes_per_token": sums_per_token,
        "sharded_step_ms_measured": round(single_step_s * 1000, 2),
        "links": links,
        "load_average": os.getloadavg(),
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"model {model.name}: {layers} layers, hidden {hidden}; {args.tokens} tokens/stream, "
          f"{args.threads} thread(s) per worker/rank; load average {os.getloadavg()[0]:.2f}")
    print(f"single stream (median of {args.reps}): whole "
          f"{result['single_stream_tok_s']['whole']} tok/s, sharded "
          f"{result['single_stream_tok_s']['sharded']} tok/s")
    print(f"{args.streams} streams aggregate: whole {agg['whole']:.1f} tok/s, "
          f"sharded {agg['sharded']:.1f} tok/s")
    print(f"ring traffic per generated token: {per_token_single:,.0f} B (1 stream), "
          f"{per_token_multi:,.0f} B ({args.streams} streams; prompts included); all_sum "
          f"payload alone: {sums_per_token:,} B")
    for link in links:
        print(f"  on {link['link']}: ~{link['comm_ms_per_step']} ms of collectives per decode "
              f"step (bandwidth part {link['bandwidth_ms_per_token']} ms), so at most "
              f"{link['max_tok_s_from_comm']} tok/s per stream from the link alone "
              "(latency-bound; compute on each host comes on top)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
