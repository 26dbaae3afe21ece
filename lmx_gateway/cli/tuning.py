"""`lmx models probe|quantize|autotune`: what a model costs before loading
it, quantized copies made by a server-side job, and performance profiles
measured on this host. HTTP only, like every client command."""

from __future__ import annotations

import argparse
import time
from typing import Any
from urllib.parse import quote

from rich import box
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from lmx_gateway.cli.http import EXIT_FAILED, EXIT_OK, ApiError, LmxClient, add_common_options
from lmx_gateway.cli.output import Output, error_line, human_bytes, run_command

PROBE_TIMEOUT = 120.0  # reading a big GGUF header on a slow disk
POLL_SEC = 0.5
JOB_DONE = {"completed", "failed", "cancelled"}


def _params(n: Any) -> str:
    if not isinstance(n, int):
        return "-"
    for unit, size in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def _quantization(q: dict[str, Any]) -> str:
    if q.get("file_type"):
        types = ", ".join(f"{k}: {v}" for k, v in (q.get("tensor_types") or {}).items())
        return f"{q['file_type']} (tensors: {types})"
    if q.get("bits"):
        return f"{q['bits']}-bit, group size {q.get('group_size')}"
    dtypes = ", ".join(f"{k}: {v}" for k, v in (q.get("tensor_dtypes") or {}).items())
    return f"unquantized ({dtypes})" if dtypes else "-"


def models_probe(args: argparse.Namespace, client: LmxClient, out: Output) -> int:
    body: dict[str, Any] = {"model_id": args.model}
    if args.context_length:
        body["context_length"] = args.context_length
    if args.parallel_slots:
        body["parallel_slots"] = args.parallel_slots
    if args.kv_cache_type:
        body["kv_cache_type"] = args.kv_cache_type
    answer: dict[str, Any] = client.post("/admin/models/probe", body, timeout=args.timeout)
    if out.as_json:
        out.json(answer)
        return EXIT_OK
    memory = answer.get("memory_estimate") or {}
    fit = answer.get("fit") or {}
    tools = answer.get("tool_calls")
    table = Table(title=f"Probe: {escape(str(answer.get('model_id')))}", title_justify="left",
                  box=box.SIMPLE_HEAD, show_header=False)
    table.add_column("", style="bold", no_wrap=True)
    table.add_column("", overflow="fold")
    rows = [
        ("path", answer.get("path")),
        ("backend", f"{answer.get('backend')} ({answer.get('format')})"),
        ("architecture", answer.get("architecture")),
        ("parameters", _params(answer.get("parameter_count"))),
        ("quantization", _quantization(answer.get("quantization") or {})),
        ("file size", human_bytes(answer.get("size_bytes"))),
        ("max context", answer.get("max_context")),
        ("memory estimate",
         f"{human_bytes(memory.get('total_bytes'))} at {answer.get('context_length')} tokens "
         f"x {answer.get('parallel_slots')} slots, KV {answer.get('kv_cache_type')} (weights "
         f"{human_bytes(memory.get('weights_bytes'))}, KV "
         f"{human_bytes(memory.get('kv_cache_bytes'))})"),
        ("chat template", "yes" if answer.get("chat_template") else "no"),
        ("tool calls", f"{tools['format']} (tools via {tools['tools_via']})" if tools else "-"),
        ("capabilities", ", ".join(answer.get("capabilities") or [])),
        ("fits now", ("yes" if fit.get("fits") else "no") + f": {fit.get('reason')}"),
    ]
    for name, value in rows:
        table.add_row(name, escape(str(value if value is not None else "-")))
    out.console.print(table)
    return EXIT_OK


def follow_job(client: LmxClient, out: Output, path: str, label: str) -> dict[str, Any]:
    """Poll a job's status under a live bar (stderr) until it ends."""
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), TaskProgressColumn(),
               TimeElapsedColumn()]
    with Progress(*columns, console=out.err, transient=False,
                  disable=out.as_json) as progress:
        task = progress.add_task(escape(label), total=None)
        while True:
            snap: dict[str, Any] = client.get(path)
            total = snap.get("total") or None
            progress.update(task, completed=snap.get("done") or 0, total=total,
                            description=f"{escape(label)} [dim]({snap.get('stage')})[/]")
            if str(snap.get("status")) in JOB_DONE:
                if snap.get("status") == "completed" and total:
                    progress.update(task, completed=total)
                return snap
            time.sleep(POLL_SEC)


def models_quantize(args: argparse.Namespace, client: LmxClient, out: Output) -> int:
    body: dict[str, Any] = {"source": args.model, "type": args.type}
    if args.output:
        body["output"] = args.output
    if args.group_size:
        body["group_size"] = args.group_size
    started: dict[str, Any] = client.post("/admin/quantize", body, timeout=args.timeout)
    job_id = started.get("job_id")
    if not job_id:
        raise ApiError(0, f"the server did not start a quantize job: {started}")
    if args.no_wait:
        if out.as_json:
            out.json(started)
        else:
            out.line(f"Quantize job started: {job_id} -> {started.get('output')}")
        return EXIT_OK
    path = f"/admin/quantize/{quote(str(job_id), safe='')}"
    try:
        final = follow_job(client, out, path, f"{args.model} -> {args.type}")
    except KeyboardInterrupt:
        out.note(f"stopped watching; the job continues on the server ({job_id}); cancel it "
                 f"with DELETE {path}", style="yellow")
        return EXIT_OK
    if out.as_json:
        out.json(final)
    if final.get("status") != "completed":
        error_line(f"quantize job {job_id} {final.get('status')}: "
                   f"{final.get('error') or 'no reason'}")
        return EXIT_FAILED
    if not out.as_json:
        result = final.get("result") or {}
        note = f" ({result['note']})" if result.get("note") else ""
        out.line(f"Quantized: {final.get('output')} in {result.get('seconds', '?')} s{note}. "
                 f"Load it with: lmx models load {final.get('model_id')}")
    return EXIT_OK


def _trials_table(job: dict[str, Any]) -> Table:
    table = Table(title=f"Autotune {escape(str(job.get('model_id')))} ({job.get('objective')})",
                  title_justify="left", box=box.SIMPLE_HEAD)
    for col in ("#", "VARIANT", "SETTINGS", "1 STREAM tok/s", "N STREAMS tok/s", "SCORE"):
        table.add_column(col, justify="right" if col[0] in "#1NS" and col != "SETTINGS"
                         else "left", overflow="fold")
    for i, trial in enumerate(job.get("trials") or [], 1):
        single, multi = trial.get("single") or {}, trial.get("concurrent") or {}
        settings = " ".join(f"{k}={v}" for k, v in (trial.get("settings") or {}).items())
        many = (f"{multi.get('aggregate_tokens_per_sec')} ({multi.get('streams')})"
                if multi else "-")
        table.add_row(str(i), escape(str(trial.get("variant"))), escape(settings),
                      str(single.get("decode_tokens_per_sec", "-")), many,
                      escape(str(trial.get("error") or trial.get("score"))))
    return table


def models_autotune(args: argparse.Namespace, client: LmxClient, out: Output) -> int:
    body: dict[str, Any] = {"model_id": args.model, "objective": args.objective}
    if args.budget_sec:
        body["budget_sec"] = args.budget_sec
    started: dict[str, Any] = client.post("/admin/models/autotune", body, timeout=args.timeout)
    job_id = started.get("job_id")
    if not job_id:
        raise ApiError(0, f"the server did not start autotune: {started}")
    path = f"/admin/models/autotune/{quote(str(job_id), safe='')}"
    try:
        final = follow_job(client, out, path, f"autotune {args.model}")
    except KeyboardInterrupt:
        out.note(f"stopped watching; autotune continues on the server ({job_id}); cancel "
                 f"it with DELETE {path}", style="yellow")
        return EXIT_OK
    if out.as_json:
        out.json(final)
    else:
        out.console.print(_trials_table(final))
    if final.get("status") != "completed":
        error_line(f"autotune {job_id} {final.get('status')}: {final.get('error') or ''}")
        return EXIT_FAILED
    if not out.as_json:
        best = final.get("best") or {}
        settings = " ".join(f"{k}={v}" for k, v in (best.get("settings") or {}).items())
        out.line(f"Best for {final.get('objective')}: {best.get('variant')} with {settings} "
                 f"({best.get('score')} tok/s). Profile: {final.get('profile_path')} (used by "
                 "every later load)")
    return EXIT_OK


def register(msub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    help_ = "what a model on disk is and what loading it would cost (no worker started)"
    p = msub.add_parser("probe", help=help_, description=help_)
    add_common_options(p, PROBE_TIMEOUT)
    p.set_defaults(func=run_command, client_command=models_probe)
    p.add_argument("model")
    p.add_argument("--context-length", type=int, help="per-slot context (default: configured)")
    p.add_argument("--parallel-slots", type=int, help="slots (default: configured)")
    p.add_argument("--kv-cache-type", choices=["f16", "q8_0", "q4_0"],
                   help="llama.cpp KV cache type (default: profile or configured)")

    help_ = "make a quantized copy of a model on disk (a server-side job, with progress)"
    p = msub.add_parser("quantize", help=help_, description=help_)
    add_common_options(p, PROBE_TIMEOUT)
    p.set_defaults(func=run_command, client_command=models_quantize)
    p.add_argument("model", help="the source: a GGUF file or MLX directory (id or path)")
    p.add_argument("--type", required=True,
                   help="GGUF: Q8_0, Q4_0, Q4_K_M, ...; MLX: Q4, Q8, float16, float32")
    p.add_argument("--output", help="name in the models directory (default: SOURCE.TYPE)")
    p.add_argument("--group-size", type=int, help="MLX Q2..Q8: 32, 64 (default) or 128")
    p.add_argument("--no-wait", action="store_true", help="start it and return")

    help_ = "measure settings on this host and store the best as the model's profile"
    p = msub.add_parser("autotune", help=help_, description=help_)
    add_common_options(p, PROBE_TIMEOUT)
    p.set_defaults(func=run_command, client_command=models_autotune)
    p.add_argument("model")
    p.add_argument("--objective", choices=["latency", "throughput"], default="throughput")
    p.add_argument("--budget-sec", type=float, help="time to spend measuring (default 120)")
