"""How client commands print: rich tables for people, JSON for scripts,
errors as one plain line on stderr, and the runner that maps failures to
exit codes."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console

from lmx_gateway.cli.http import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_UNREACHABLE,
    ApiError,
    LmxClient,
    ServerUnreachable,
)


def _stdout_console() -> Console:
    # Piped output has no terminal width; rich would squeeze tables into 80
    # columns and wrap model ids. Keep lines whole unless COLUMNS says otherwise.
    wide = not sys.stdout.isatty() and "COLUMNS" not in os.environ
    return Console(highlight=False, width=200 if wide else None)


@dataclass
class Output:
    as_json: bool = False
    console: Console = field(default_factory=_stdout_console)
    err: Console = field(default_factory=lambda: Console(stderr=True, highlight=False))

    def json(self, data: Any) -> None:
        sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
        sys.stdout.flush()

    def line(self, text: str, style: str | None = None) -> None:
        self.console.print(text, style=style, markup=False, soft_wrap=True)

    def note(self, text: str, style: str = "dim") -> None:
        """Side information (progress, stats) on stderr, so stdout stays clean."""
        self.err.print(text, style=style, markup=False, soft_wrap=True)


def error_line(message: str) -> None:
    # Plain print: one line whatever the terminal width (rich would wrap it).
    print(f"lmx: error: {' '.join(message.split())}", file=sys.stderr, flush=True)


Command = Callable[[argparse.Namespace, LmxClient, Output], int]


def run_command(args: argparse.Namespace) -> int:
    """Entry point of every client subcommand (set as `func`)."""
    command: Command = args.client_command
    client = LmxClient.from_args(args)
    out = Output(as_json=bool(getattr(args, "json", False)))
    try:
        return command(args, client, out)
    except ServerUnreachable as exc:
        error_line(str(exc))
        return EXIT_UNREACHABLE
    except ApiError as exc:
        error_line(exc.one_line())
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        client.close()


def human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(value) < 1024 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TB"


def human_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    if days:
        return f"{days}d {hours}h {minutes}m"
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m {s}s"
    return f"{seconds:.1f}s"


STATE_STYLES = {"ready": "green", "starting": "yellow", "backoff": "yellow",
                "stopping": "yellow", "quarantined": "bold red", "stopped": "dim",
                "shutdown": "dim"}


def state_text(state: str | None) -> str:
    state = state or "-"
    style = STATE_STYLES.get(state)
    return f"[{style}]{state}[/]" if style else state
