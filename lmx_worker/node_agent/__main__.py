"""`python -m lmx_worker.node_agent (join|keys-new) ...`: what `lmx node` and
`lmx keys new` run (the gateway's CLI starts this module rather than
importing the worker side)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from lmx_worker.node_agent.agent import AgentOptions, run_agent
from lmx_worker.node_agent.keys import create_key_pair, public_key_of, read_server_key


def default_keys_dir() -> Path:
    home = os.environ.get("LMX_HOME")
    return (Path(home).expanduser() if home else Path.home() / ".opta-lmx") / "keys"


def join(args: argparse.Namespace) -> int:
    key = Path(args.key).expanduser().resolve()
    if not key.is_file():
        print(f"lmx node: key file {key} not found (make one with `lmx keys new NAME`)",
              file=sys.stderr)
        return 1
    try:
        server_key = read_server_key(Path(args.server_key).expanduser())
    except (OSError, ValueError) as exc:
        print(f"lmx node: --server-key: {exc}", file=sys.stderr)
        return 1
    name = args.name or key.name.split(".")[0]
    models_dir = Path(args.models_dir).expanduser() if args.models_dir else None
    return run_agent(AgentOptions(args.join, name, key, server_key, models_dir, args.advertise))


def keys_new(args: argparse.Namespace) -> int:
    directory = Path(args.dir).expanduser() if args.dir else default_keys_dir()
    try:
        public, secret = create_key_pair(directory, args.name)
    except (OSError, ValueError) as exc:
        print(f"lmx keys new: {exc}", file=sys.stderr)
        return 1
    print(public_key_of(public))
    print(f"public key: {public}\nsecret key: {secret} (0600; give it to `lmx node --key`)",
          file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lmx_worker.node_agent")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("join")
    p.add_argument("--join", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--server-key", required=True)
    p.add_argument("--name")
    p.add_argument("--models-dir")
    p.add_argument("--advertise")
    p.set_defaults(func=join)
    p = sub.add_parser("keys-new")
    p.add_argument("name")
    p.add_argument("--dir")
    p.set_defaults(func=keys_new)
    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
