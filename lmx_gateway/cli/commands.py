"""The `lmx` client commands: a running server driven over HTTP.

    lmx status                   server, models, memory, requests
    lmx models ls|available|load|unload|pull|rm
    lmx chat [-m MODEL] [PROMPT] interactive or one-shot chat
    lmx bench -m MODEL           POST /admin/benchmark
    lmx events                   live tail of /admin/events
    lmx config reload [--apply rolling]  POST /admin/config/reload
    lmx restart (ID | --all)     POST /admin/models/restart
    lmx presets ls|reload

Every command takes `--url` (env LMX_URL, default http://127.0.0.1:1234) and
`--json`; keys come from LMX_ADMIN_KEY (admin routes) and LMX_API_KEY
(inference routes), never from the command line where `ps` would show them.
A server that cannot be reached is one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from rich import box
from rich.markup import escape
from rich.table import Table

from lmx_gateway.cli import chat as cli_chat
from lmx_gateway.cli import models as cli_models
from lmx_gateway.cli import restart as cli_restart
from lmx_gateway.cli.http import EXIT_FAILED, EXIT_OK, LmxClient, add_common_options
from lmx_gateway.cli.output import (
    Output,
    human_duration,
    run_command,
    state_text,
)

# --- status -------------------------------------------------------------------------


def status(args: argparse.Namespace, client: LmxClient, out: Output) -> int:
    body = client.get("/admin/status")
    if out.as_json:
        out.json(body)
        return EXIT_OK
    memory = body.get("memory") or {}
    states: dict[str, str] = body.get("model_states") or {
        m: "ready" for m in body.get("models") or []}
    out.console.print(f"[bold]LMX {escape(str(body.get('version', '?')))}[/] at "
                      f"{escape(client.url)}  up {human_duration(body.get('uptime_seconds'))}")
    limit = body.get("max_concurrent_requests")
    out.console.print(
        f"Requests: {body.get('in_flight_requests', 0)} in flight, "
        f"{body.get('queued_requests', 0)} queued"
        + (f" (limit {limit} per model)" if limit else ""))
    if memory:
        used, total = memory.get("used_gb"), memory.get("total_gb")
        pct = memory.get("percent", memory.get("usage_percent"))
        out.console.print(f"Memory: {used} / {total} GB" + (f" ({pct}%)" if pct is not None
                                                            else ""))
    if not states:
        out.console.print("Models: none loaded (lmx models load NAME)")
        return EXIT_OK
    table = Table(title=f"Models ({body.get('loaded_models', 0)} ready)", title_justify="left",
                  box=box.SIMPLE_HEAD)
    table.add_column("MODEL", no_wrap=True)
    table.add_column("STATE")
    for model_id, state in states.items():
        table.add_row(escape(model_id), state_text(str(state)))
    out.console.print(table)
    return EXIT_OK


# --- config and presets -----------------------------------------------------------------


def config_reload(args: argparse.Namespace, client: LmxClient, out: Output) -> int:
    body = client.post("/admin/config/reload",
                       {"apply": args.apply} if getattr(args, "apply", None) else None)
    if out.as_json:
        out.json(body)
        return EXIT_OK
    updated = body.get("updated") or []
    source = body.get("source") or "defaults"
    out.line(f"Config reloaded from {source}: "
             + (f"updated {', '.join(updated)}" if updated else "no changes"))
    for key in body.get("restart_required") or []:
        out.note(f"  {key} changed: takes effect after a restart", style="yellow")
    for model_id in body.get("quarantine_lifted") or []:
        out.note(f"  {model_id}: quarantine lifted, it may be loaded again", style="yellow")
    for err in body.get("preset_errors") or []:
        out.note(f"  preset {err.get('file')} skipped: {err.get('error')}", style="yellow")
    for model_id, pending in (body.get("models_restart_pending") or {}).items():
        out.note(f"  {model_id}: {', '.join(pending)} changed: apply with "
                 "lmx config reload --apply rolling", style="yellow")
    failed = False
    for row in body.get("restarts") or []:
        failed |= not row.get("success")
        out.line(f"  {row.get('model_id')}: "
                 + ("restarted" if row.get("success") else f"FAILED: {row.get('error')}"))
    return EXIT_FAILED if failed else EXIT_OK


def presets_ls(args: argparse.Namespace, client: LmxClient, out: Output) -> int:
    body = client.get("/admin/presets")
    if out.as_json:
        out.json(body)
        return EXIT_OK
    presets: list[dict[str, Any]] = body.get("presets") or []
    if not presets:
        out.line(f"No presets (put YAML files in {body.get('directory') or '~/.opta-lmx/presets'})")
    else:
        table = Table(title=f"Presets ({len(presets)})", title_justify="left",
                  box=box.SIMPLE_HEAD)
        for col in ("NAME", "MODEL", "DEFAULTS", "SYSTEM PROMPT"):
            table.add_column(col, overflow="fold")
        for p in presets:
            defaults = ", ".join(f"{k}={v}" for k, v in (p.get("defaults") or {}).items())
            prompt = str(p.get("system_prompt") or "-")
            table.add_row(escape(f"preset:{p.get('name')}"), escape(str(p.get("model"))),
                          escape(defaults or "-"),
                          escape(prompt if len(prompt) <= 60 else prompt[:57] + "..."))
        out.console.print(table)
    for err in body.get("errors") or []:
        out.note(f"preset {err.get('file')} skipped: {err.get('error')}", style="yellow")
    return EXIT_OK


def presets_reload(args: argparse.Namespace, client: LmxClient, out: Output) -> int:
    body = client.post("/admin/presets/reload")
    if out.as_json:
        out.json(body)
        return EXIT_OK
    out.line(f"Presets reloaded: {body.get('presets_loaded', 0)} loaded")
    for err in body.get("errors") or []:
        out.note(f"preset {err.get('file')} skipped: {err.get('error')}", style="yellow")
    return EXIT_FAILED if body.get("errors") else EXIT_OK


# --- bench ------------------------------------------------------------------------------


def bench(args: argparse.Namespace, client: LmxClient, out: Output) -> int:
    req: dict[str, Any] = {"model_id": args.model, "max_tokens": args.max_tokens,
                           "runs": args.runs, "temperature": args.temperature,
                           "ignore_eos": args.ignore_eos}
    if args.prompt:
        req["prompt"] = args.prompt
    with out.err.status(f"Benchmarking {escape(args.model)} ({args.runs} runs)...",
                        spinner="dots"):
        body = client.post("/admin/benchmark", req, timeout=args.timeout)
    if out.as_json:
        out.json(body)
        return EXIT_OK
    table = Table(title=f"Benchmark: {escape(str(body.get('model_id')))}", title_justify="left",
                  box=box.SIMPLE_HEAD)
    for col in ("RUN", "PROMPT TOK", "GEN TOK", "FIRST TOKEN", "TOTAL", "TOK/S"):
        table.add_column(col, justify="right")
    for r in body.get("results") or []:
        table.add_row(str(r.get("run")), str(r.get("prompt_tokens")),
                      str(r.get("completion_tokens")), f"{r.get('time_to_first_token_ms')} ms",
                      f"{r.get('total_time_ms')} ms", str(r.get("tokens_per_second")))
    table.add_section()
    table.add_row("[bold]avg[/]", "", str(body.get("avg_completion_tokens", "")),
                  f"[bold]{body.get('avg_time_to_first_token_ms')} ms[/]",
                  f"[bold]{body.get('avg_total_time_ms')} ms[/]",
                  f"[bold]{body.get('avg_tokens_per_second')}[/]")
    out.console.print(table)
    return EXIT_OK


# --- events -----------------------------------------------------------------------------

EVENT_STYLES = {
    "worker_crashed": "bold red", "model_quarantined": "bold red", "download_failed": "red",
    "memory_warning": "yellow", "worker_restarted": "yellow", "model_loaded": "green",
    "model_unloaded": "cyan", "download_completed": "green", "config_reloaded": "magenta",
    "request_completed": "blue", "heartbeat": "dim",
    "model_restarting": "yellow", "model_restarted": "green", "model_restart_failed": "red",
}
_SKIP_KEYS = {"type", "ts"}


def _event_summary(data: dict[str, Any]) -> str:
    parts = []
    for key, value in data.items():
        if key in _SKIP_KEYS or value is None or value == [] or value == {}:
            continue
        shown = value if isinstance(value, (str, int, float, bool)) else json.dumps(value)
        parts.append(f"{key}={shown}")
    return " ".join(parts)


def events(args: argparse.Namespace, client: LmxClient, out: Output) -> int:
    wanted = set(args.type or [])
    seen = 0
    with client.stream("GET", "/admin/events", read_timeout=None) as stream:
        # On stderr even with --json: it also tells a script the tail is connected.
        out.note(f"Following events at {client.url}/admin/events (Ctrl-C to stop)")
        for event in stream:
            try:
                data = event.json()
            except ValueError:
                data = {"raw": event.data}
            kind = str(data.get("type") or event.event)
            if kind == "heartbeat" and not args.heartbeats:
                continue
            if wanted and kind not in wanted:
                continue
            if out.as_json:
                sys.stdout.write(json.dumps({"type": kind, **data}) + "\n")
                sys.stdout.flush()
            else:
                ts = data.get("ts")
                clock = time.strftime("%H:%M:%S", time.localtime(
                    ts if isinstance(ts, (int, float)) else time.time()))
                style = EVENT_STYLES.get(kind, "white")
                out.console.print(f"[dim]{clock}[/] [{style}]{kind:<20}[/] "
                                  f"{escape(_event_summary(data))}", soft_wrap=True)
            seen += 1
            if args.count and seen >= args.count:
                return EXIT_OK
    out.note("event stream ended (the server closed it)", style="yellow")
    return EXIT_OK


# --- wiring -------------------------------------------------------------------------------


def _leaf(sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str, func: Any,
          help_: str, timeout: float = 30.0) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help_, description=help_)
    add_common_options(p, timeout)
    p.set_defaults(func=run_command, client_command=func)
    return p


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the client commands to the `lmx` parser."""
    _leaf(sub, "status", status, "server status: version, uptime, models, memory, requests")
    cli_models.register(sub)
    cli_chat.register(sub)

    p = _leaf(sub, "bench", bench, "benchmark a loaded model (POST /admin/benchmark)",
              timeout=600.0)
    p.add_argument("-m", "--model", required=True, help="model id, alias or preset")
    p.add_argument("--prompt")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--ignore-eos", action="store_true",
                   help="always generate max_tokens (comparable runs)")

    p = _leaf(sub, "events", events, "live tail of the server's events (/admin/events)")
    p.add_argument("--type", action="append", metavar="TYPE",
                   help="only this event type (repeatable), e.g. model_loaded")
    p.add_argument("-n", "--count", type=int, help="exit after this many events")
    p.add_argument("--heartbeats", action="store_true", help="show heartbeats too")

    config = sub.add_parser("config", help="server configuration")
    csub = config.add_subparsers(dest="config_command", required=True, metavar="SUBCOMMAND")
    p = _leaf(csub, "reload", config_reload,
              "re-read the server's config file and apply it (no model reload unless "
              "--apply rolling)", timeout=1800.0)
    p.add_argument("--apply", choices=("rolling",),
                   help="also restart, one at a time, models whose spawn-time settings changed")
    cli_restart.register(sub)

    presets = sub.add_parser("presets", help="request presets (preset:NAME)")
    psub = presets.add_subparsers(dest="presets_command", required=True, metavar="SUBCOMMAND")
    _leaf(psub, "ls", presets_ls, "presets the server has loaded")
    _leaf(psub, "reload", presets_reload, "re-read the presets directory")
