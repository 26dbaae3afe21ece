"""`lmx models convert SRC.gguf DEST_DIR`: a local command (no server) that
turns a llama-family GGUF into an MLX model directory. The conversion is
worker code (it needs MLX), so it runs as a child process
(`python -m lmx_worker.jobs.convert_command`): the client imports none of it."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from lmx_gateway.cli.http import EXIT_FAILED, EXIT_OK
from lmx_gateway.cli.output import error_line


def convert(args: argparse.Namespace) -> int:
    argv = [sys.executable, "-m", "lmx_worker.jobs.convert_command", args.src, args.dest,
            "--dtype", args.dtype]
    argv += ["--dequantize"] if args.dequantize else []
    argv += ["--force"] if args.force else []
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        error_line(done.stderr.strip().splitlines()[-1] if done.stderr.strip()
                   else f"conversion failed (exit {done.returncode})")
        return EXIT_FAILED
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"Converted {args.src} -> {summary['destination']} "
              f"({summary['layers']} layers, quantization {summary['quantization']}, "
              f"{summary['seconds']} s). Load it with: lmx models load {summary['destination']}")
    return EXIT_OK


def register(msub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    help_ = "convert a llama-family GGUF file into an MLX model directory (local, no server)"
    p = msub.add_parser("convert", help=help_, description=help_)
    p.add_argument("src", help="the .gguf file")
    p.add_argument("dest", help="the directory to create")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                   help="dtype of scales and float tensors (float32: lossless, fast on CPU)")
    p.add_argument("--dequantize", action="store_true",
                   help="write float weights (of --dtype) instead of quantized blocks")
    p.add_argument("--force", action="store_true", help="replace DEST if it exists")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    p.set_defaults(func=convert)
