"""`lmx nodes`, `lmx node --join`, `lmx keys new`: other hosts.

`lmx nodes` talks HTTP like every client command. `lmx node` and `lmx keys`
run on a node's host, where no server runs: they replace this process with
the node agent (`python -m lmx_worker.node_agent`), so the gateway's code
imports nothing of the worker side."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from lmx_gateway.cli.http import EXIT_OK, LmxClient, add_common_options
from lmx_gateway.cli.output import Output, human_bytes, run_command, state_text

AGENT_MODULE = "lmx_worker.node_agent"


def nodes(args: argparse.Namespace, client: LmxClient, out: Output) -> int:
    result: dict[str, Any] = client.get("/admin/nodes")
    if out.as_json:
        out.json(result)
        return EXIT_OK
    rows = result.get("nodes") or []
    if not rows:
        out.line("No nodes have joined" + ("" if result.get("listening")
                                           else " (workers.listen is not set)"))
        return EXIT_OK
    for row in rows:
        models = ", ".join(row.get("loaded_models") or []) or "-"
        out.line(f"{row['name']}  {state_text(row['state'])}  {row.get('address') or '-'}  "
                 f"last beat {row.get('last_heartbeat_sec_ago')}s ago  "
                 f"{row.get('cpu_cores')} cores {row.get('accelerator')}  "
                 f"RAM {human_bytes(row.get('ram_available_bytes'))} free of "
                 f"{human_bytes(row.get('ram_total_bytes'))}  models: {models}")
    return EXIT_OK


def _exec_agent(argv: list[str]) -> int:
    os.execv(sys.executable, [sys.executable, "-m", AGENT_MODULE, *argv])


def node(args: argparse.Namespace) -> int:
    argv = ["join", "--join", args.join, "--key", args.key, "--server-key", args.server_key]
    for flag, value in (("--name", args.name), ("--models-dir", args.models_dir),
                        ("--advertise", args.advertise)):
        if value:
            argv += [flag, value]
    return _exec_agent(argv)


def keys_new(args: argparse.Namespace) -> int:
    return _exec_agent(["keys-new", args.name, *(["--dir", args.dir] if args.dir else [])])


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    help_ = "nodes that joined this server: state, last heartbeat, RAM, models"
    p = sub.add_parser("nodes", help=help_, description=help_)
    add_common_options(p)
    p.set_defaults(func=run_command, client_command=nodes)

    help_ = "run a node agent on this host: join a server's workers.listen endpoint"
    p = sub.add_parser("node", help=help_, description=help_)
    p.add_argument("--join", required=True, metavar="tcp://HOST:PORT")
    p.add_argument("--key", required=True, metavar="FILE",
                   help="this node's secret key file (NAME.key_secret from `lmx keys new`)")
    p.add_argument("--server-key", required=True, metavar="FILE",
                   help="the server's public key file (keys/server.key in its LMX home)")
    p.add_argument("--name", help="node name (default: the key file's name)")
    p.add_argument("--models-dir", metavar="DIR", help="where this node keeps models")
    p.add_argument("--advertise", metavar="ADDR",
                   help="address other hosts reach this one at (default: the route's)")
    p.set_defaults(func=node)

    keys = sub.add_parser("keys", help="CURVE key pairs for nodes")
    ksub = keys.add_subparsers(dest="keys_command", required=True, metavar="SUBCOMMAND")
    help_ = "write NAME.key and NAME.key_secret (default: <LMX home>/keys); prints the public key"
    p = ksub.add_parser("new", help=help_, description=help_)
    p.add_argument("name")
    p.add_argument("--dir", help="where to write them (default: <LMX home>/keys)")
    p.set_defaults(func=keys_new)
