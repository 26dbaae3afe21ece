"""Chaos and soak runs against one real LMX server (run by hand).

    python benchmarks/chaos_soak.py chaos --faults 100 --clients 8
    python benchmarks/chaos_soak.py soak --clients 16 --duration 1800

Starts its own `lmx serve` (a temporary LMX home, the bundled model) and
streams chat completions from C client threads the whole time.

chaos: N worker faults chosen at random among SIGKILL, SIGSEGV, SIGTERM and
SIGSTOP, each sent `--spacing` seconds after the model is ready again from the
previous one. The server runs with a crash-loop window of
`--window` seconds and that many crashes per window would need faults closer
than spacing allows: the crash-loop rule is not what is measured. Reports
per fault: requests hit (ended with an error), the longest time from the
fault to a hit stream's end, the time until the model is ready again; and
the gateway's RSS and open fds at start and end, and any hung request (no
byte for `--hang-after` seconds).

soak: the same clients for `--duration` seconds without faults; reports
requests, errors, and the gateway's RSS over time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lmx_supervisor.models.bundled_model import DEFAULT_MODEL_FILE, ensure_default_model

MODEL_ID = DEFAULT_MODEL_FILE.removesuffix(".gguf")
FAULTS = {"SIGKILL": signal.SIGKILL, "SIGSEGV": signal.SIGSEGV, "SIGTERM": signal.SIGTERM,
          "SIGSTOP": signal.SIGSTOP}


@dataclass
class RequestRecord:
    started: float
    ended: float = 0.0
    ok: bool = False
    code: str = ""
    tokens: int = 0
    hung: bool = False


@dataclass
class Clients:
    url: str
    count: int
    max_tokens: int
    hang_after: float
    records: list[RequestRecord] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> list[threading.Thread]:
        threads = [threading.Thread(target=self._run, args=(n,), daemon=True)
                   for n in range(self.count)]
        for t in threads:
            t.start()
        return threads

    def _run(self, n: int) -> None:
        timeout = httpx.Timeout(10.0, read=self.hang_after)
        with httpx.Client(base_url=self.url, timeout=timeout) as http:
            i = 0
            while not self.stop.is_set():
                record = RequestRecord(time.monotonic())
                body = {"model": MODEL_ID, "stream": True, "max_tokens": self.max_tokens,
                        "messages": [{"role": "user",
                                      "content": f"Client {n}, story {i}: tell a story."}]}
                try:
                    self._stream(http, body, record)
                except httpx.ReadTimeout:
                    record.hung, record.code = True, "hung"
                except httpx.HTTPError as exc:
                    record.code = f"transport:{type(exc).__name__}"
                record.ended = time.monotonic()
                with self.lock:
                    self.records.append(record)
                if not record.ok:
                    time.sleep(0.2)  # a refused client backs off a little, as SDKs do
                i += 1

    @staticmethod
    def _stream(http: httpx.Client, body: dict[str, Any], record: RequestRecord) -> None:
        with http.stream("POST", "/v1/chat/completions", json=body) as resp:
            if resp.status_code != 200:
                resp.read()
                try:
                    record.code = str(resp.json()["error"].get("code"))
                except ValueError:
                    record.code = f"http:{resp.status_code}"
                return
            for line in resp.iter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: "):]
                if data == "[DONE]":
                    record.ok = not record.code
                    return
                event = json.loads(data)
                if "error" in event:
                    record.code = str(event["error"].get("code"))
                elif event.get("choices") and event["choices"][0]["delta"].get("content"):
                    record.tokens += 1


class EventLog:
    """/admin/events, timestamped as they arrive: when a new worker was
    loaded, without polling /admin/models (whose worker ping waits up to 3 s
    on a worker that is dead or stopped)."""

    def __init__(self, url: str) -> None:
        self.events: list[tuple[float, str, dict[str, Any]]] = []
        self._url = url
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        with contextlib.suppress(httpx.HTTPError):  # the server stopped at the end
            self._follow()

    def _follow(self) -> None:
        with httpx.Client(base_url=self._url, timeout=httpx.Timeout(10, read=None)) as http, \
                http.stream("GET", "/admin/events") as resp:
            kind = ""
            for line in resp.iter_lines():
                if line.startswith("event: "):
                    kind = line[len("event: "):]
                elif line.startswith("data: ") and kind:
                    try:
                        data = json.loads(line[len("data: "):])
                    except ValueError:
                        continue
                    self.events.append((time.monotonic(), kind, data))

    def loaded_after(self, since: float, old_pid: int) -> float | None:
        for at, kind, data in list(self.events):
            payload = data.get("data", data)
            if at >= since and kind == "model_loaded" and payload.get("pid") != old_pid:
                return at
        return None


class Server:
    def __init__(self, window: float, heartbeat: float, parallel: int) -> None:
        self.home = Path(tempfile.mkdtemp(prefix="lmx-chaos-"))
        models = self.home / "models"
        models.mkdir()
        model = ensure_default_model()
        (models / model.name).symlink_to(model)
        config = {
            "models": {"models_directory": str(models), "auto_load": [MODEL_ID],
                       "context_length": 1024, "parallel_slots": parallel,
                       "max_concurrent_requests": parallel,
                       "crash_loop_max_crashes": 3, "crash_loop_window_sec": window,
                       "restart_backoff_initial_sec": 0.1, "restart_backoff_max_sec": 1,
                       "worker_heartbeat_timeout_sec": heartbeat},
            "logging": {"level": "WARNING", "format": "text"},
        }
        (self.home / "config.yaml").write_text(yaml.safe_dump(config))
        with socket_port() as port:
            self.url = f"http://127.0.0.1:{port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("LMX_")}
        env["LMX_HOME"] = str(self.home)
        self._log = (self.home / "server.log").open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lmx_gateway", "serve", "--config",
             str(self.home / "config.yaml"), "--port", self.url.rsplit(":", 1)[1]],
            env=env, stdout=self._log, stderr=subprocess.STDOUT)
        self.http = httpx.Client(base_url=self.url, timeout=30)

    def model(self) -> dict[str, Any] | None:
        try:
            rows = self.http.get("/admin/models").json()["loaded"]
        except (httpx.HTTPError, ValueError):
            return None
        return next((r for r in rows if r["model_id"] == MODEL_ID), None)

    def wait_ready(self, timeout: float, not_pid: int | None = None) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"server exited {self.proc.returncode}")
            row = self.model()
            if row and row["state"] == "ready" and row["pid"] and row["pid"] != not_pid:
                return int(row["pid"])
            time.sleep(0.05)
        raise SystemExit(f"model not ready within {timeout}s: {self.model()}")

    def usage(self) -> dict[str, float]:
        p = psutil.Process(self.proc.pid)
        return {"rss_mb": round(p.memory_info().rss / 2**20, 1), "fds": p.num_fds()}

    def close(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.http.close()
        self._log.close()


class socket_port:
    """A free loopback port (closed again before the server binds it)."""

    def __enter__(self) -> int:
        import socket
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])

    def __exit__(self, *_exc: object) -> None:
        return None


def run_chaos(args: argparse.Namespace) -> dict[str, Any]:
    server = Server(args.window, args.heartbeat, args.clients)
    rng = random.Random(args.seed)
    try:
        pid = server.wait_ready(120)
        events = EventLog(server.url)
        clients = Clients(server.url, args.clients, args.max_tokens, args.hang_after)
        threads = clients.start()
        time.sleep(3)  # clients streaming before the first fault
        start_usage = server.usage()
        faults: list[dict[str, Any]] = []
        last = 0.0
        for n in range(args.faults):
            # Spaced from the moment the model was ready again, which is after
            # the previous crash was recorded (a SIGSTOP's only when the
            # heartbeat timeout declares it): crashes are >= spacing apart.
            time.sleep(max(0.0, last + args.spacing - time.monotonic()))
            name = rng.choice(args.kinds)
            at = time.monotonic()
            os.kill(pid, FAULTS[name])
            new_pid = server.wait_ready(args.heartbeat + 120, not_pid=pid)
            loaded_at = events.loaded_after(at, pid) or time.monotonic()
            ready_after = loaded_at - at
            if name == "SIGSTOP":  # the stopped process must be gone (SIGKILLed)
                time.sleep(0.5)
                leftover = psutil.pid_exists(pid) and \
                    psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
            else:
                leftover = False
            faults.append({"n": n, "fault": name, "at": at, "pid": pid,
                           "ready_after_sec": round(ready_after, 3), "leftover": leftover})
            print(f"fault {n + 1}/{args.faults}: {name:8s} ready again after "
                  f"{ready_after:.2f}s", flush=True)
            pid, last = new_pid, time.monotonic()
        time.sleep(args.spacing)
        clients.stop.set()
        stopped_at = time.monotonic()
        # Requests still running end normally (their clients stop after
        # them); the gateway is measured once they are done.
        for t in threads:
            t.join(args.hang_after + 30)
        end_usage = server.usage()
        state = server.model()
    finally:
        server.close()
    with clients.lock:
        records = list(clients.records)
    for i, fault in enumerate(faults):
        until = faults[i + 1]["at"] if i + 1 < len(faults) else stopped_at
        hit = [r for r in records if not r.ok and fault["at"] <= r.ended < until
               and r.started < fault["at"] + fault["ready_after_sec"]]
        fault["requests_hit"] = len(hit)
        fault["hit_codes"] = sorted({r.code for r in hit})
        fault["longest_fault_to_end_sec"] = round(max((r.ended - fault["at"] for r in hit),
                                                      default=0.0), 3)
        del fault["at"]
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for f in faults:
        by_kind.setdefault(f["fault"], []).append(f)
    return {
        "mode": "chaos", "faults": len(faults), "clients": args.clients,
        "requests": len(records), "ok": sum(r.ok for r in records),
        "hung_requests": sum(r.hung for r in records),
        "leftover_processes": sum(f["leftover"] for f in faults),
        "gateway_start": start_usage, "gateway_end": end_usage,
        "final_model_state": state and {k: state[k] for k in ("state", "restarts",
                                                               "recent_crashes")},
        "per_kind": {kind: {
            "count": len(fs),
            "requests_hit_mean": round(statistics.mean(f["requests_hit"] for f in fs), 2),
            "requests_hit_max": max(f["requests_hit"] for f in fs),
            "longest_fault_to_end_sec": max(f["longest_fault_to_end_sec"] for f in fs),
            "ready_again_mean_sec": round(statistics.mean(f["ready_after_sec"] for f in fs), 3),
            "ready_again_max_sec": max(f["ready_after_sec"] for f in fs),
            "hit_codes": sorted({c for f in fs for c in f["hit_codes"]}),
        } for kind, fs in sorted(by_kind.items())},
        "fault_log": faults,
    }


def run_soak(args: argparse.Namespace) -> dict[str, Any]:
    server = Server(args.window, args.heartbeat, args.clients)
    samples: list[dict[str, float]] = []
    try:
        server.wait_ready(120)
        clients = Clients(server.url, args.clients, args.max_tokens, args.hang_after)
        threads = clients.start()
        time.sleep(5)  # warm: first allocations are not growth
        started = time.monotonic()
        while time.monotonic() - started < args.duration:
            samples.append({"t": round(time.monotonic() - started, 1), **server.usage()})
            time.sleep(min(10.0, args.duration / 20))
        clients.stop.set()
        for t in threads:
            t.join(args.hang_after + 30)
        samples.append({"t": round(time.monotonic() - started, 1), **server.usage()})
        state = server.model()
    finally:
        server.close()
    with clients.lock:
        records = list(clients.records)
    errors: dict[str, int] = {}
    for r in records:
        if not r.ok:
            errors[r.code] = errors.get(r.code, 0) + 1
    return {
        "mode": "soak", "duration_sec": args.duration, "clients": args.clients,
        "requests": len(records), "ok": sum(r.ok for r in records), "errors": errors,
        "hung_requests": sum(r.hung for r in records),
        "tokens": sum(r.tokens for r in records),
        "gateway_rss_mb_start": samples[0]["rss_mb"], "gateway_rss_mb_end": samples[-1]["rss_mb"],
        "gateway_rss_mb_max": max(s["rss_mb"] for s in samples),
        "gateway_fds_start": samples[0]["fds"], "gateway_fds_end": samples[-1]["fds"],
        "final_model_state": state and {k: state[k] for k in ("state", "restarts")},
        "samples": samples,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["chaos", "soak"])
    parser.add_argument("--faults", type=int, default=100)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--duration", type=float, default=1800, help="soak seconds")
    parser.add_argument("--spacing", type=float, default=6.0,
                        help="seconds between faults (> window / 2 keeps under the loop rule)")
    parser.add_argument("--window", type=float, default=10.0, help="crash_loop_window_sec")
    parser.add_argument("--heartbeat", type=float, default=3.0,
                        help="worker_heartbeat_timeout_sec (bounds SIGSTOP detection)")
    parser.add_argument("--kinds", nargs="+", default=list(FAULTS), choices=list(FAULTS))
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--hang-after", type=float, default=60.0,
                        help="a stream silent this long counts as hung")
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--json", type=Path, help="also write the full report here")
    args = parser.parse_args()
    if args.mode == "chaos" and args.spacing <= args.window / 2:
        parser.error("--spacing must exceed --window / 2, or the crash-loop rule "
                     "(3 crashes per window) quarantines the model")
    report = run_chaos(args) if args.mode == "chaos" else run_soak(args)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    brief = {k: v for k, v in report.items() if k not in ("fault_log", "samples")}
    print(json.dumps(brief, indent=2))


if __name__ == "__main__":
    main()
