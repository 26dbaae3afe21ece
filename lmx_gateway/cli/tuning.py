"""`lmx models probe|quantize|autotune`: what a model costs before loading
it, quantized copies made by a server-side job, and performance profiles
measured on this host. HTTP only, like every client command."""

from __future__ import annotations

import argparse
from typing import Any

from rich import box
from rich.markup import escape
from rich.table import Table

from lmx_gateway.cli.http import EXIT_OK, LmxClient, add_common_options
from lmx_gateway.cli.output import Output, human_bytes, run_command

PROBE_TIMEOUT = 120.0  # reading a big GGUF header on a slow disk


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
         f"x {answer.get('parallel_slots')} slots (weights "
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


def register(msub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    help_ = "what a model on disk is and what loading it would cost (no worker started)"
    p = msub.add_parser("probe", help=help_, description=help_)
    add_common_options(p, PROBE_TIMEOUT)
    p.set_defaults(func=run_command, client_command=models_probe)
    p.add_argument("model")
    p.add_argument("--context-length", type=int, help="per-slot context (default: configured)")
    p.add_argument("--parallel-slots", type=int, help="slots (default: configured)")
