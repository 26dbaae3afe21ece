"""`lmx models convert SRC.gguf DEST_DIR`: a local command (no server) that
turns a llama-family GGUF into an MLX model directory (lmx_worker.gguf_to_mlx).
MLX is imported only when the command runs: the rest of the CLI stays light."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from lmx_gateway.cli_http import EXIT_FAILED, EXIT_OK
from lmx_gateway.cli_output import error_line


def convert(args: argparse.Namespace) -> int:
    try:
        from lmx_worker.gguf_to_mlx import ConversionError, convert_gguf
        from lmx_worker.gguf_tokenizer import UnsupportedTokenizer
    except ImportError as exc:
        error_line(f"converting needs mlx and mlx-lm installed ({exc})")
        return EXIT_FAILED
    src, dest = Path(args.src).expanduser(), Path(args.dest).expanduser()
    started = time.monotonic()
    try:
        config = convert_gguf(src, dest, dtype=args.dtype, overwrite=args.force,
                              dequantize=args.dequantize)
    except (ConversionError, UnsupportedTokenizer, OSError) as exc:
        error_line(f"cannot convert {src}: {exc}")
        return EXIT_FAILED
    summary = {"source": str(src), "destination": str(dest.resolve()),
               "model_type": config["model_type"], "layers": config["num_hidden_layers"],
               "quantization": config.get("quantization"),
               "tied_embeddings": config["tie_word_embeddings"],
               "seconds": round(time.monotonic() - started, 2)}
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"Converted {src.name} -> {summary['destination']} "
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
