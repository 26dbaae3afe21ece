"""`python -m lmx_worker.jobs.convert_command SRC.gguf DEST_DIR ...`: turn a
llama-family GGUF into an MLX model directory (`gguf_to_mlx`). The `lmx
models convert` client command runs this as a child process, so the client
never imports MLX or any server-side code. Prints a JSON summary on stdout;
errors are one line on stderr and exit code 1."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

EXIT_OK = 0
EXIT_FAILED = 1


def convert(args: argparse.Namespace) -> int:
    try:
        from lmx_worker.mlx_support.gguf_to_mlx import ConversionError, convert_gguf
        from lmx_worker.mlx_support.gguf_tokenizer import UnsupportedTokenizer
    except ImportError as exc:
        print(f"converting needs mlx and mlx-lm installed ({exc})", file=sys.stderr)
        return EXIT_FAILED
    src, dest = Path(args.src).expanduser(), Path(args.dest).expanduser()
    started = time.monotonic()
    try:
        config = convert_gguf(src, dest, dtype=args.dtype, overwrite=args.force,
                              dequantize=args.dequantize)
    except (ConversionError, UnsupportedTokenizer, OSError) as exc:
        print(f"cannot convert {src}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(json.dumps({"source": str(src), "destination": str(dest.resolve()),
                      "model_type": config["model_type"], "layers": config["num_hidden_layers"],
                      "quantization": config.get("quantization"),
                      "tied_embeddings": config["tie_word_embeddings"],
                      "seconds": round(time.monotonic() - started, 2)}))
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lmx_worker.jobs.convert_command")
    parser.add_argument("src")
    parser.add_argument("dest")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    parser.add_argument("--dequantize", action="store_true")
    parser.add_argument("--force", action="store_true")
    return convert(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
