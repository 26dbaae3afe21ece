"""The `lmx` command. `lmx serve` starts the server; every other subcommand is
a client (`lmx_gateway.cli`) that drives a running server over HTTP."""

from __future__ import annotations

import argparse
import sys

from lmx_gateway.cli.commands import register as register_client_commands
from lmx_gateway.cli.nodes import register as register_node_commands


def _serve(args: argparse.Namespace) -> int:
    # Imported here: the client commands start in a fraction of the time
    # without the server stack (uvicorn, the supervisor, huggingface_hub).
    from lmx_gateway.serve import serve

    return serve(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmx", description="LMX inference server")
    sub = parser.add_subparsers(dest="command", required=True)
    p_serve = sub.add_parser("serve", help="run the server")
    p_serve.add_argument("--host")
    p_serve.add_argument("--port", type=int)
    p_serve.add_argument("--config", help="config YAML (default: ~/.opta-lmx/config.yaml, "
                                          "then the repo's config/default-config.yaml)")
    p_serve.add_argument("--log-level", choices=["debug", "info", "warning", "error",
                                                 "DEBUG", "INFO", "WARNING", "ERROR"])
    p_serve.set_defaults(func=_serve)
    # Client commands (status, models, chat, bench, events, config, presets).
    register_client_commands(sub)
    # Other hosts: `lmx nodes` (client), `lmx node --join` and `lmx keys new`.
    register_node_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
