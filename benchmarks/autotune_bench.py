"""Autotune on this host, then the winner against the peers (run by hand).

    .venv/bin/python benchmarks/autotune_bench.py                 # ~30-40 minutes
    .venv/bin/python benchmarks/autotune_bench.py --budget 300 --tokens 64

What it does, in one run and on a quiet machine:

1. Starts `lmx serve` on a temporary LMX home holding the bundled GGUF and
   makes its quantized variants with LMX's own quantize jobs
   (`POST /admin/quantize`, `--types`, default Q8_0 and Q4_0).
2. Runs `POST /admin/models/autotune` for the bundled model twice, objective
   `throughput` and then `latency`, each within `--budget` seconds, and
   prints every trial (variant x settings -> single-stream and N-stream tok/s).
3. Stops that server and measures each winner with the autotune profiles
   copied into its LMX home (so the load uses them): `serve_bench.py`, the
   throughput winner at 1 and 8 streams against `llama_cpp.server` on the
   same file; then `single_stream.py` on the latency winner: one stream
   against in-process llama-cpp-python on the same file, request by request
   in ABBA order (`--latency-reps`). The peers get the winner's settings
   too (flash attention, KV type, threads, n_batch; serve_bench reads them
   from the profile), and each winner is served with the profile its own
   autotune job wrote (the second job rewrites the model's profile).
4. Prints the issue's ratios: throughput winner's aggregate decode rate at 8
   vs its own single stream (>= 2x) and vs llama_cpp.server at 8 (>= 2.5x),
   with the wall-time aggregates beside them; latency winner's single-stream
   decode vs in-process (>= 0.97x).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lmx_supervisor.models.bundled_model import DEFAULT_MODEL_FILE, ensure_default_model

HERE = Path(__file__).resolve().parent
MODEL_ID = DEFAULT_MODEL_FILE.removesuffix(".gguf")


def log(message: str) -> None:
    print(f"[autotune-bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr,
          flush=True)


class Server:
    def __init__(self, home: Path, threads: int, slots: int, ctx: int) -> None:
        self.home = home
        models = home / "models"
        models.mkdir(parents=True)
        (models / DEFAULT_MODEL_FILE).symlink_to(ensure_default_model().resolve())
        config = {"models": {"models_directory": str(models), "n_threads": threads,
                             "parallel_slots": slots, "context_length": ctx,
                             "max_concurrent_requests": 32},
                  "logging": {"level": "WARNING"}}
        (home / "config.yaml").write_text(yaml.safe_dump(config))
        env = {**os.environ, "LMX_HOME": str(home)}
        self._log = (home / "server.log").open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lmx_gateway", "serve", "--config",
             str(home / "config.yaml"), "--port", "0"],
            env=env, stdout=self._log, stderr=subprocess.STDOUT)
        self.url = self._announced_url()

    def _announced_url(self) -> str:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            for line in (self.home / "server.log").read_text().splitlines():
                if line.startswith("LMX listening on http://"):
                    url = line.removeprefix("LMX listening on ").strip()
                    with httpx.Client() as client:
                        try:
                            if client.get(f"{url}/healthz", timeout=2).status_code == 200:
                                return url
                        except httpx.HTTPError:
                            pass
            if self.proc.poll() is not None:
                break
            time.sleep(0.3)
        raise RuntimeError(f"server did not start:\n{(self.home / 'server.log').read_text()}")

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        r = httpx.post(f"{self.url}{path}", json=body, timeout=60)
        if r.status_code >= 400:
            raise RuntimeError(f"{path}: {r.status_code} {r.text}")
        result: dict[str, Any] = r.json()
        return result

    def wait_job(self, url: str, what: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            job: dict[str, Any] = httpx.get(f"{self.url}{url}", timeout=30).json()
            status = f"{job.get('status')} {job.get('stage')} {job.get('done')}/{job.get('total')}"
            if status != last:
                log(f"{what}: {status}")
                last = status
            if job.get("status") != "running":
                return job
            time.sleep(2)
        raise RuntimeError(f"{what} still running after {timeout:.0f} s")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._log.close()


def serve_bench(model: Path, only: str, levels: str, args: argparse.Namespace,
                profiles: Path) -> dict[str, Any]:
    argv = [sys.executable, str(HERE / "serve_bench.py"), "--model", str(model), "--only", only,
            "--levels", levels, "--tokens", str(args.tokens), "--threads", str(args.threads),
            "--requests", str(args.requests), "--profiles-dir", str(profiles), "--json"]
    log("running " + " ".join(argv[1:]))
    out = subprocess.run(argv, capture_output=True, text=True, check=True)
    report: dict[str, Any] = json.loads(out.stdout)
    return report


def single_stream(model: Path, args: argparse.Namespace, profiles: Path) -> dict[str, Any]:
    """single_stream.py on `model` with `profiles`: LMX against in-process
    llama-cpp-python request by request in ABBA order, both with the profile's
    settings. Interleaving is what a ratio near 1 needs on a host whose speed
    drifts by more than the margin between two runs a few minutes apart."""
    argv = [sys.executable, str(HERE / "single_stream.py"), "--model", str(model),
            "--tokens", str(args.tokens), "--threads", str(args.threads),
            "--reps", str(args.latency_reps), "--profiles-dir", str(profiles), "--json"]
    log("running " + " ".join(argv[1:]))
    out = subprocess.run(argv, capture_output=True, text=True, check=True)
    report: dict[str, Any] = json.loads(out.stdout)
    return report


def level(report: dict[str, Any], target: str, concurrency: int) -> dict[str, Any] | None:
    for t in report["targets"]:
        if t["name"] == target and not t.get("skipped"):
            for lv in t["levels"]:
                if lv["concurrency"] == concurrency:
                    found: dict[str, Any] = lv
                    return found
    return None


def _r(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def trial_table(job: dict[str, Any]) -> str:
    rows = [f"{'variant':40} {'settings':58} {'1 stream':>9} {'N streams':>9}  note"]
    for t in job.get("trials", []):
        settings = ",".join(f"{k}={v}" for k, v in sorted(t.get("settings", {}).items()))
        single = t.get("single") or {}
        multi = t.get("concurrent") or {}
        one = single.get("decode_tokens_per_sec") if isinstance(single, dict) else single
        many = multi.get("aggregate_tokens_per_sec") if isinstance(multi, dict) else multi
        rows.append(f"{t.get('variant', '?'):40} {settings[:58]:58} "
                    f"{one if one is not None else '-':>9} {many if many is not None else '-':>9}"
                    f"  {t.get('error') or ''}")
    best = job.get("best") or {}
    rows.append(f"winner ({job.get('objective')}): {best.get('variant')} "
                f"{json.dumps(best.get('settings'))} score {best.get('score')}")
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--budget", type=float, default=600, help="seconds per autotune job")
    parser.add_argument("--types", default="Q8_0,Q4_0", help="variants to quantize first")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--slots", type=int, default=8, help="parallel_slots before tuning")
    parser.add_argument("--ctx", type=int, default=1024, help="context_length per slot")
    parser.add_argument("--tokens", type=int, default=128, help="max_tokens in serve_bench")
    parser.add_argument("--trial-tokens", type=int, default=64, help="max_tokens per trial")
    # One 64-token run per trial let this VM's drift pick the winner: two
    # runs of the same bench chose different latency settings.
    parser.add_argument("--trial-runs", type=int, default=3,
                        help="measurements per trial; the median counts")
    parser.add_argument("--requests", type=int, default=8, help="per level, in serve_bench")
    parser.add_argument("--latency-reps", type=int, default=4,
                        help="single_stream.py repetitions per prompt (latency winner)")
    parser.add_argument("--json", type=Path, help="also write the whole report here")
    args = parser.parse_args()
    load_start = os.getloadavg()[0]
    report: dict[str, Any] = {"config": vars(args) | {"json": str(args.json)}}
    with tempfile.TemporaryDirectory(prefix="lmx-autotune-bench-") as tmp:
        home = Path(tmp) / "home"
        server = Server(home, args.threads, args.slots, args.ctx)
        try:
            for qtype in [t for t in args.types.split(",") if t]:
                job = server.post("/admin/quantize", {"source": MODEL_ID, "type": qtype})
                done = server.wait_job(job["progress_url"], f"quantize {qtype}", 900)
                if done["status"] != "completed":
                    raise RuntimeError(f"quantize {qtype}: {done.get('error')}")
            jobs: dict[str, dict[str, Any]] = {}
            for objective in ("throughput", "latency"):
                job = server.post("/admin/models/autotune", {
                    "model_id": MODEL_ID, "objective": objective, "budget_sec": args.budget,
                    "max_tokens": args.trial_tokens, "runs": args.trial_runs})
                jobs[objective] = server.wait_job(job["progress_url"], f"autotune {objective}",
                                                  args.budget * 3 + 300)
                # The next objective's job rewrites the same model's profile:
                # each winner is served with the profile its own job wrote.
                shutil.copytree(home / "profiles", Path(tmp) / f"profiles-{objective}")
                print(f"\n## autotune, objective {objective}\n{trial_table(jobs[objective])}",
                      flush=True)
            report["autotune"] = jobs
            models_dir = home / "models"
        finally:
            server.stop()

        def winner_file(objective: str) -> Path:
            best = jobs[objective].get("best") or {}
            return models_dir / f"{best.get('variant', MODEL_ID)}.gguf"

        through = serve_bench(winner_file("throughput"), "lmx-llama,llama-cpp-server", "1,8",
                              args, Path(tmp) / "profiles-throughput")
        latency = single_stream(winner_file("latency"), args, Path(tmp) / "profiles-latency")
        report["serve_bench"] = {"throughput": through}
        report["single_stream"] = latency

    def agg(rep: dict[str, Any], target: str, c: int, key: str = "decode_aggregate_tok_s"
            ) -> float | None:
        lv = level(rep, target, c)
        return lv[key] if lv else None

    # The targets are on aggregate decode rates (serve_bench's "decode"
    # column); the wall-time aggregates, prompt reading included, are printed too.
    lmx1, lmx8 = agg(through, "lmx-llama", 1), agg(through, "lmx-llama", 8)
    peer8 = agg(through, "llama-cpp-server", 8)
    wall = {(t, c): agg(through, t, c, "aggregate_tok_s")
            for t, c in (("lmx-llama", 1), ("lmx-llama", 8), ("llama-cpp-server", 8))}
    lat_lmx = latency["sides"]["lmx"]["decode_tok_s"]["median"]
    lat_inproc = latency["sides"]["in-process"]["decode_tok_s"]["median"]
    checks = [
        ("throughput winner: 8 streams / own single stream", lmx8, lmx1, 2.0),
        ("throughput winner: 8 streams / llama_cpp.server at 8", lmx8, peer8, 2.5),
        ("latency winner: single stream / in-process llama-cpp-python", lat_lmx, lat_inproc,
         0.97),
    ]
    print("\n## the winners against the peers (same run)")
    print(f"throughput winner {winner_file('throughput').name}, aggregate decode: LMX 1 stream "
          f"{_r(lmx1)} tok/s, 8 streams {_r(lmx8)} tok/s; llama_cpp.server at 8: {_r(peer8)} "
          f"tok/s (wall-time aggregates: {_r(wall['lmx-llama', 1])}, {_r(wall['lmx-llama', 8])}, "
          f"{_r(wall['llama-cpp-server', 8])})")
    print(f"latency winner {winner_file('latency').name}: LMX single-stream decode "
          f"{_r(lat_lmx)} tok/s; in-process {_r(lat_inproc)} tok/s")
    report["checks"] = []
    for name, a, b, target in checks:
        ratio = a / b if a is not None and b else None
        verdict = "n/a" if ratio is None else ("PASS" if ratio >= target else "FAIL")
        print(f"{name}: {ratio and round(ratio, 2)}x (target >= {target}x) {verdict}")
        report["checks"].append({"check": name, "ratio": ratio, "target": target})
    report["loadavg"] = {"start": load_start, "end": os.getloadavg()[0]}
    print(f"load average: {load_start:.2f} at start, {os.getloadavg()[0]:.2f} at end")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
