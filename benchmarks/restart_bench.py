"""Restarting a model under load: what clients see.

Starts ``lmx serve`` (temporary config and ``LMX_HOME``, a free 127.0.0.1 port) with the bundled
model, runs ``--clients`` streaming clients (the official openai SDK) back to back, and once a
steady-state window is measured, restarts the model ``--rolling`` times in rolling mode
(alternating ``parallel_slots`` between ``--slots`` values) and ``--drain`` times in drain
mode, with a short steady pause between restarts.

It reports, per mode, each restart's total duration (the ``POST /admin/models/restart`` call:
spawn, load, canary, and for rolling the old worker's drain), and the p50/p99/max time to first
token of requests that started during restarts against requests that started in steady state,
and every failed request (there should be none).

::

    .venv/bin/python benchmarks/restart_bench.py                # 8 clients, 5 rolling, 3 drain
    .venv/bin/python benchmarks/restart_bench.py --rolling 2 --drain 1 --json

Progress goes to stderr, the report (or JSON with ``--json``) to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lmx_supervisor.models.bundled_model import DEFAULT_MODEL_FILE, ensure_default_model  # noqa: E402

MODEL_ID = DEFAULT_MODEL_FILE.removesuffix(".gguf")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def percentile(values: list[float], p: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1))))
    return round(ordered[rank] * 1000, 1)


class Clients:
    def __init__(self, url: str, count: int, max_tokens: int) -> None:
        self.records: list[tuple[float, float | None, str | None]] = []
        self.failures: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(url, i, max_tokens),
                                          daemon=True) for i in range(count)]
        for t in self._threads:
            t.start()

    def _run(self, url: str, index: int, max_tokens: int) -> None:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0,
                               timeout=600)
        n = 0
        while not self._stop.is_set():
            n += 1
            started, first, finish = time.monotonic(), None, None
            try:
                for chunk in client.chat.completions.create(
                        model=MODEL_ID, stream=True, max_tokens=max_tokens,
                        messages=[{"role": "user", "content": f"Tell me a fact, #{index}.{n}"}]):
                    if first is None and chunk.choices and chunk.choices[0].delta.content:
                        first = time.monotonic()
                    if chunk.choices and chunk.choices[0].finish_reason:
                        finish = chunk.choices[0].finish_reason
            except openai.APIError as exc:
                with self._lock:
                    self.failures.append(f"{type(exc).__name__}: {exc}")
                continue
            with self._lock:
                self.records.append((started, first, finish))
                if finish not in ("stop", "length"):
                    self.failures.append(f"finish_reason {finish!r}")
        client.close()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(600)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--rolling", type=int, default=5)
    ap.add_argument("--drain", type=int, default=3)
    ap.add_argument("--slots", default="2,4", help="parallel_slots values to alternate")
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--threads", type=int, default=1, help="llama.cpp threads per worker")
    ap.add_argument("--steady-sec", type=float, default=10.0,
                    help="steady-state window before the restarts and between them")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    slots = [int(s) for s in args.slots.split(",")]
    model = ensure_default_model()

    home = Path(tempfile.mkdtemp(prefix="lmx-restart-bench-"))
    models_dir = home / "models"
    models_dir.mkdir()
    (models_dir / model.name).symlink_to(model)
    config = {"models": {"models_directory": str(models_dir), "auto_load": [MODEL_ID],
                         "context_length": 2048, "n_threads": args.threads,
                         "parallel_slots": slots[0], "max_concurrent_requests": 4,
                         "semaphore_timeout_sec": 300, "unload_drain_timeout_sec": 120},
              "logging": {"level": "WARNING"}}
    (home / "config.yaml").write_text(yaml.safe_dump(config))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LMX_")}
    env.update(LMX_HOME=str(home), PYTHONPATH=str(ROOT))
    with (home / "server.log").open("wb") as server_log:
        server = subprocess.Popen([sys.executable, "-m", "lmx_gateway", "serve", "--config",
                                   str(home / "config.yaml"), "--port", str(port)],
                                  env=env, stdout=server_log, stderr=subprocess.STDOUT)
    http = httpx.Client(base_url=url, timeout=600)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                rows = http.get("/admin/models").json()["loaded"]
                if rows and rows[0]["state"] == "ready":
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                log((home / "server.log").read_text())
                return 1
            time.sleep(0.2)
        log(f"server ready at {url}; {args.clients} clients")
        clients = Clients(url, args.clients, args.max_tokens)
        windows: list[tuple[float, float]] = []
        restarts: list[dict[str, Any]] = []
        time.sleep(args.steady_sec)
        plan = [("rolling", slots[(i + 1) % len(slots)]) for i in range(args.rolling)]
        plan += [("drain", slots[(args.rolling + i + 1) % len(slots)])
                 for i in range(args.drain)]
        for mode, slot in plan:
            began = time.monotonic()
            resp = http.post("/admin/models/restart", json={
                "model_id": MODEL_ID, "mode": mode, "settings": {"parallel_slots": slot}})
            ended = time.monotonic()
            windows.append((began, ended))
            body = resp.json()
            restarts.append({"mode": mode, "parallel_slots": slot, "status": resp.status_code,
                             "duration_sec": round(ended - began, 3),
                             "old_pid": body.get("old_pid"), "new_pid": body.get("new_pid")})
            log(f"{mode} restart -> parallel_slots {slot}: {resp.status_code} "
                f"in {ended - began:.2f}s")
            time.sleep(args.steady_sec / 2)
        clients.stop()
    finally:
        http.close()
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        shutil.rmtree(home, ignore_errors=True)

    def during(started: float, mode: str | None = None) -> bool:
        return any(b <= started <= e and (mode is None or r["mode"] == mode)
                   for (b, e), r in zip(windows, restarts, strict=True))

    ttft = [(s, f - s) for s, f, _ in clients.records if f is not None]
    report: dict[str, Any] = {"clients": args.clients, "requests": len(clients.records),
                              "failed": len(clients.failures),
                              "failures": clients.failures[:20], "restarts": restarts}
    steady = [t for s, t in ttft if not during(s)]
    report["ttft_ms"] = {"steady": _summary(steady)}
    for mode in ("rolling", "drain"):
        report["ttft_ms"][f"during_{mode}"] = _summary([t for s, t in ttft if during(s, mode)])
        durations = [r["duration_sec"] for r in restarts if r["mode"] == mode]
        report[f"{mode}_duration_sec"] = {
            "mean": round(sum(durations) / len(durations), 3) if durations else None,
            "max": max(durations, default=None)}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{report['requests']} requests by {args.clients} clients, "
              f"{report['failed']} failed")
        for mode in ("rolling", "drain"):
            print(f"{mode}: restart duration {report[f'{mode}_duration_sec']}")
        for name, summary in report["ttft_ms"].items():
            print(f"TTFT {name:<15} {summary}")
        for failure in report["failures"]:
            print(f"  failed: {failure}")
    return 0 if not clients.failures else 1


def _summary(values: list[float]) -> dict[str, Any]:
    return {"n": len(values), "p50": percentile(values, 50), "p99": percentile(values, 99),
            "max": percentile(values, 100)}


if __name__ == "__main__":
    sys.exit(main())
