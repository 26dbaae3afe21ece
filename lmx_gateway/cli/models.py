"""`lmx models ls|available|load|unload|restart|pull|rm` (and convert, probe,
quantize, autotune, restart from their own modules)."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any
from urllib.parse import quote

from rich import box
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from lmx_gateway.cli import convert as cli_convert
from lmx_gateway.cli import restart as cli_restart
from lmx_gateway.cli import tuning as cli_tuning
from lmx_gateway.cli.http import EXIT_FAILED, EXIT_OK, ApiError, LmxClient, add_common_options
from lmx_gateway.cli.output import Output, error_line, human_bytes, run_command, state_text

DOWNLOAD_DONE = {"completed", "failed", "cancelled", "error"}
POLL_SEC = 0.5
LOAD_TIMEOUT = 900.0  # a load may include a canary and a big model's mmap


def models_ls(args: argparse.Namespace, client: LmxClient, out: Output) -> int:
    body = client.get("/admin/models")
    if out.as_json:
        out.json(body)
        return EXIT_OK
    rows: list[dict[str, Any]] = body.get("loaded", [])
    if not rows:
        out.line("No models loaded. Load one with: lmx models load NAME")
        return EXIT_OK
    table = Table(title=f"Loaded models ({len(rows)})", title_justify="left",
                  box=box.SIMPLE_HEAD)
    for col in ("MODEL", "STATE", "BACKEND", "PID", "MEMORY", "BUSY", "RESTARTS", "CONTEXT"):
        table.add_column(col, no_wrap=True,
                         justify="right" if col in ("PID", "MEMORY", "RESTARTS") else "left")
    for row in rows:
        limit = row.get("max_concurrent_requests")
        busy = f"{row.get('in_flight', 0)}/{limit}" if limit else str(row.get("in_flight", 0))
        if row.get("queued"):
            busy += f" (+{row['queued']} queued)"
        memory = row.get("memory_gb")
        table.add_row(escape(str(row.get("model_id"))), state_text(row.get("state")),
                      escape(str(row.get("backend") or "-")), str(row.get("pid") or "-"),
                      f"{memory:.2f} GB" if isinstance(memory, (int, float)) else "-", busy,
                      str(row.get("restarts", 0)), str(row.get("context_length") or "-"))
    out.console.print(table)
    return EXIT_OK


def models_available(args: argparse.Namespace, client: LmxClient, out: Output) -> int:
    body = client.get("/admin/models/available")
    rows: list[dict[str, Any]] = body if isinstance(body, list) else (
        body.get("models") or body.get("available") or body.get("data") or [])
    if out.as_json:
        out.json(body)
        return EXIT_OK
    if not rows:
        out.line("No models on disk. Fetch one with: lmx models pull REPO_ID")
        return EXIT_OK
    table = Table(title=f"Models on disk ({len(rows)})", title_justify="left",
                  box=box.SIMPLE_HEAD)
    table.add_column("MODEL", no_wrap=True)
    table.add_column("SIZE", justify="right")
    table.add_column("FORMAT")
    table.add_column("LOADED")
    table.add_column("PATH", overflow="fold")
    for row in rows:
        name = row.get("repo_id") or row.get("model_id") or row.get("name") or "?"
        loaded = row.get("loaded_as") or ([name] if row.get("loaded") else [])
        problems = row.get("problems") or []
        fmt = str(row.get("format") or row.get("backend") or "-")
        if row.get("complete") is False or problems:
            fmt += " [red](incomplete)[/]" if row.get("complete") is False else " [red](!)[/]"
        table.add_row(escape(str(name)), human_bytes(row.get("size_bytes")), fmt,
                      escape(", ".join(loaded)) if loaded else "-",
                      escape(str(row.get("local_path") or "-")))
    out.console.print(table)
    return EXIT_OK


def _load_body(args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {"model_id": args.model}
    if args.served_name:
        body["served_name"] = args.served_name
    if args.backend:
        body["backend"] = args.backend
    if args.force:
        body["allow_unsupported_runtime"] = True
    if args.download:
        body["auto_download"] = True
    if args.shards:
        body["shards"] = [name.strip() for name in args.shards.split(",")]
    return body


def models_load(args: argparse.Namespace, client: LmxClient, out: Output) -> int:
    started = time.monotonic()
    with out.err.status(f"Loading {escape(args.model)}...", spinner="dots"):
        body = client.post("/admin/models/load", _load_body(args), timeout=LOAD_TIMEOUT,
                           ok=(202,))
    download_id = body.get("download_id")
    if download_id and not body.get("success"):
        # 202: the model must be fetched first; follow it, then load.
        out.note(f"{args.model} is not on disk: downloading ({download_id})", style="yellow")
        final = _follow_download(client, out, str(download_id), args.model)
        if final.get("status") != "completed":
            error_line(f"download {final.get('status')}: {final.get('error') or ''}")
            return EXIT_FAILED
        with out.err.status(f"Loading {escape(args.model)}...", spinner="dots"):
            body = client.post("/admin/models/load", _load_body(args), timeout=LOAD_TIMEOUT)
    if out.as_json:
        out.json(body)
        return EXIT_OK
    if body.get("status_code") == 202 or (not body.get("success") and "model_id" not in body):
        out.line(f"Load not started: {body}")
        return EXIT_FAILED
    took = body.get("load_time_sec", round(time.monotonic() - started, 1))
    verb = "Already loaded" if body.get("already_loaded") else "Loaded"
    memory = body.get("memory_gb")
    size = f", {memory:.2f} GB" if isinstance(memory, (int, float)) and memory else ""
    out.line(f"{verb}: {body.get('model_id')} ({body.get('backend')}{size}, {took}s)")
    return EXIT_OK


def models_unload(args: argparse.Namespace, client: LmxClient, out: Output) -> int:
    with out.err.status(f"Unloading {escape(args.model)}...", spinner="dots"):
        body = client.post("/admin/models/unload", {"model_id": args.model}, timeout=300)
    if out.as_json:
        out.json(body)
    else:
        out.line(f"Unloaded: {body.get('model_id')} (freed {body.get('memory_freed_gb', 0)} GB)")
    return EXIT_OK


def _progress_numbers(p: dict[str, Any]) -> tuple[float, float | None]:
    done = p.get("bytes_downloaded", p.get("downloaded_bytes"))
    total = p.get("bytes_total", p.get("total_bytes"))
    if isinstance(done, (int, float)) and isinstance(total, (int, float)) and total > 0:
        return float(done), float(total)
    return float(p.get("progress_percent") or 0.0), 100.0


def _follow_download(client: LmxClient, out: Output, download_id: str, label: str
                     ) -> dict[str, Any]:
    """Poll the progress endpoint under a live bar until the job ends."""
    path = f"/admin/models/download/{quote(download_id, safe='')}/progress"
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), TaskProgressColumn(),
               DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=out.err, transient=False) as progress:
        task = progress.add_task(escape(label), total=None)
        while True:
            snap: dict[str, Any] = client.get(path)
            done, total = _progress_numbers(snap)
            files = snap.get("files_total")
            desc = escape(label)
            if files:
                desc += f" [dim]({snap.get('files_completed', 0)}/{files} files)[/]"
            progress.update(task, completed=done, total=total, description=desc)
            if str(snap.get("status")) in DOWNLOAD_DONE:
                return snap
            time.sleep(POLL_SEC)


def models_pull(args: argparse.Namespace, client: LmxClient, out: Output) -> int:
    body: dict[str, Any] = {"repo_id": args.repo_id}
    if args.revision:
        body["revision"] = args.revision
    if args.include:
        body["allow_patterns"] = args.include
    started = client.post("/admin/models/download", body, timeout=120)
    download_id = started.get("download_id")
    if not download_id:
        raise ApiError(0, f"the server did not start a download: {started}")
    if args.no_wait:
        if out.as_json:
            out.json(started)
        else:
            out.line(f"Download started: {download_id} ({args.repo_id})")
        return EXIT_OK
    try:
        final = (_follow_download(client, out, str(download_id), args.repo_id)
                 if not out.as_json else _wait_download(client, str(download_id)))
    except KeyboardInterrupt:
        out.note(f"stopped watching; the download continues on the server ({download_id})",
                 style="yellow")
        return EXIT_OK
    if out.as_json:
        out.json(final)
    status = str(final.get("status"))
    if status != "completed":
        error_line(f"download of {args.repo_id} {status}: {final.get('error') or 'no reason'}")
        return EXIT_FAILED
    if not out.as_json:
        out.line(f"Downloaded: {args.repo_id} -> {final.get('local_path') or '?'} "
                 f"({human_bytes(final.get('bytes_total'))})")
    return EXIT_OK


def _wait_download(client: LmxClient, download_id: str) -> dict[str, Any]:
    path = f"/admin/models/download/{quote(download_id, safe='')}/progress"
    while True:
        snap: dict[str, Any] = client.get(path)
        if str(snap.get("status")) in DOWNLOAD_DONE:
            return snap
        time.sleep(POLL_SEC)


def models_rm(args: argparse.Namespace, client: LmxClient, out: Output) -> int:
    if not args.yes:
        if not sys.stdin.isatty():
            error_line(f"refusing to delete {args.model} without confirmation: pass --yes")
            return EXIT_FAILED
        answer = out.err.input(f"Delete [bold]{escape(args.model)}[/] from disk? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            out.note("nothing deleted")
            return EXIT_FAILED
    body = client.request("DELETE", f"/admin/models/{quote(args.model, safe='/')}")
    if out.as_json:
        out.json(body)
    else:
        out.line(f"Deleted: {body.get('model_id', args.model)} "
                 f"(freed {human_bytes(body.get('freed_bytes'))})")
    return EXIT_OK


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    models = sub.add_parser("models", help="list, load, unload, download and delete models")
    msub = models.add_subparsers(dest="models_command", required=True, metavar="SUBCOMMAND")

    def leaf(name: str, func: Any, help_: str, timeout: float = 30.0) -> argparse.ArgumentParser:
        p = msub.add_parser(name, help=help_, description=help_)
        add_common_options(p, timeout)
        p.set_defaults(func=run_command, client_command=func)
        return p

    leaf("ls", models_ls, "models loaded now (state, memory, requests)")
    leaf("available", models_available, "models on disk that can be loaded")
    p = leaf("load", models_load, "load a model (a name in the models directory, or a path)")
    p.add_argument("model")
    p.add_argument("--served-name", help="id clients route by (default: the file name)")
    p.add_argument("--backend", help="backend to use (e.g. gguf)")
    p.add_argument("--force", action="store_true",
                   help="load even if quarantined (allow_unsupported_runtime)")
    p.add_argument("--download", action="store_true",
                   help="download it first if it is not on disk (auto_download)")
    p.add_argument("--shards", metavar="HOSTS",
                   help="MLX only: run it tensor-parallel, one rank per host, comma-separated "
                        "(e.g. local,studio; 'local' is this host)")
    p = leaf("unload", models_unload, "unload a model (in-flight requests drain first)")
    p.add_argument("model")
    cli_restart.register_models(msub)
    p = leaf("pull", models_pull, "download a model from the hub, with a progress bar")
    p.add_argument("repo_id")
    p.add_argument("--revision")
    p.add_argument("--include", action="append", metavar="GLOB",
                   help="only files matching GLOB (repeatable), e.g. '*Q4_K_M.gguf'")
    p.add_argument("--no-wait", action="store_true", help="start it and return")
    p = leaf("rm", models_rm, "delete a model from disk (it must be unloaded)")
    p.add_argument("model")
    p.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")
    cli_convert.register(msub)
    cli_tuning.register(msub)
