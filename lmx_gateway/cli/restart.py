"""`lmx models restart ID [--context-length N] [--parallel-slots N] ...` and
`lmx restart (ID | --all)`: replace a model's worker without downtime
(POST /admin/models/restart)."""

from __future__ import annotations

import argparse
from typing import Any

from rich.markup import escape

from lmx_gateway.cli.http import EXIT_FAILED, EXIT_OK, LmxClient, add_common_options
from lmx_gateway.cli.output import Output, error_line, run_command

RESTART_TIMEOUT = 1800.0  # a load, a canary and a drain, per model


def _dequantize(raw: str) -> str | bool:
    value = raw.strip().lower()
    if value == "auto":
        return "auto"
    if value in ("true", "false"):
        return value == "true"
    raise argparse.ArgumentTypeError("expected auto, true or false")


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    settings: dict[str, Any] = {}
    for name in ("context_length", "parallel_slots", "n_threads", "mlx_dequantize"):
        value = getattr(args, name, None)
        if value is not None:
            settings[name] = value
    return settings


def _line(row: dict[str, Any]) -> str:
    settings = ", ".join(f"{k}={v}" for k, v in (row.get("settings") or {}).items())
    if not row.get("success", True):
        return f"{row.get('model_id')}: FAILED ({row.get('code')}): {row.get('error')}"
    return (f"Restarted: {row.get('model_id')} ({row.get('mode')}, "
            f"pid {row.get('old_pid')} -> {row.get('new_pid')}, "
            f"{row.get('duration_sec')}s) [{settings}]")


def restart_one(args: argparse.Namespace, client: LmxClient, out: Output) -> int:
    body: dict[str, Any] = {"model_id": args.model}
    settings = _settings(args)
    if settings:
        body["settings"] = settings
    if args.mode:
        body["mode"] = args.mode
    with out.err.status(f"Restarting {escape(args.model)}...", spinner="dots"):
        result = client.post("/admin/models/restart", body, timeout=RESTART_TIMEOUT)
    if out.as_json:
        out.json(result)
    else:
        out.line(_line(result))
    return EXIT_OK


def restart_all(args: argparse.Namespace, client: LmxClient, out: Output) -> int:
    body: dict[str, Any] = {"all": True}
    if args.mode:
        body["mode"] = args.mode
    with out.err.status("Restarting every loaded model, one at a time...", spinner="dots"):
        result = client.post("/admin/models/restart", body, timeout=RESTART_TIMEOUT)
    if out.as_json:
        out.json(result)
    else:
        rows = result.get("results") or []
        if not rows:
            out.line("No models loaded: nothing to restart")
        for row in rows:
            out.line(_line(row))
    return EXIT_OK if result.get("success") else EXIT_FAILED


def restart_command(args: argparse.Namespace, client: LmxClient, out: Output) -> int:
    if args.all == bool(args.model):
        error_line("give a model id or --all (not both)")
        return EXIT_FAILED
    if args.all and _settings(args):
        error_line("--all restarts every model with its own settings: give a model id to "
                   "change settings")
        return EXIT_FAILED
    return restart_all(args, client, out) if args.all else restart_one(args, client, out)


def _options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mode", choices=("rolling", "drain"),
                   help="rolling: new worker beside the old (default when memory allows); "
                        "drain: pause, replace, resume")


def _setting_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--context-length", type=int, metavar="N")
    p.add_argument("--parallel-slots", type=int, metavar="N")
    p.add_argument("--n-threads", type=int, metavar="N")
    p.add_argument("--mlx-dequantize", type=_dequantize, metavar="auto|true|false")


def register_models(msub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`lmx models restart`."""
    help_ = "restart a model's worker without downtime, optionally with new settings"
    p = msub.add_parser("restart", help=help_, description=help_)
    add_common_options(p, RESTART_TIMEOUT)
    p.set_defaults(func=run_command, client_command=restart_one)
    p.add_argument("model")
    _setting_options(p)
    _options(p)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`lmx restart (ID | --all)`."""
    help_ = "restart one model (or --all, one at a time) without downtime"
    p = sub.add_parser("restart", help=help_, description=help_)
    add_common_options(p, RESTART_TIMEOUT)
    p.set_defaults(func=run_command, client_command=restart_command)
    p.add_argument("model", nargs="?")
    p.add_argument("--all", action="store_true", help="every loaded model, one at a time")
    _setting_options(p)
    _options(p)
