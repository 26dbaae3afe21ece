"""`python -m lmx_worker.jobs.quantize_command SRC OUT --type T`: one quantization
job, in its own process (the supervisor's quantize jobs start it; a crash or
a kill here never touches the gateway).

- GGUF -> GGUF through llama.cpp's own quantizer (`llama_model_quantize`).
  Requantizing an already quantized file is allowed (llama.cpp's
  `allow_requantize`) and the result says so: quality is bounded by the
  source's quantization, not the original weights.
- MLX -> MLX through mlx-lm: `Q2`..`Q8` (affine, `--group-size`), or
  `float16` / `bfloat16` / `float32` (what a CPU runs fastest). A quantized
  source is dequantized first (again: a requantization).

Progress goes to stdout as JSON lines (`{"event": "progress", "done": i,
"total": n, "stage": ...}`), the result as a last `{"event": "done", ...}`
line; an error is one line on stderr and exit code 1. The output is written
where the caller says (the supervisor gives a hidden partial path and renames
it when the job succeeds).

`LMX_QUANTIZE_TENSOR_DELAY_MS` (a test hook, like LMX_FAILPOINTS) sleeps
that long per tensor, so a test can cancel or kill a job mid-way.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

EXIT_OK = 0
EXIT_FAILED = 1
DELAY_ENV = "LMX_QUANTIZE_TENSOR_DELAY_MS"
MLX_FLOAT_TYPES = ("float16", "bfloat16", "float32")
MLX_BITS = {"Q2": 2, "Q3": 3, "Q4": 4, "Q5": 5, "Q6": 6, "Q8": 8}
# "[  12/ 272] blk.0.attn_q.weight ..." : llama.cpp logs one line per tensor.
_TENSOR_LINE = re.compile(r"^\[\s*(\d+)/\s*(\d+)\]")
# Unquantized GGUF file types: quantizing from these is not a requantization.
_FLOAT_FILE_TYPES = {0, 1, 32}


class QuantizeError(Exception):
    pass


def emit(event: str, **data: Any) -> None:
    sys.stdout.write(json.dumps({"event": event, **data}) + "\n")
    sys.stdout.flush()


def _delay() -> float:
    raw = os.environ.get(DELAY_ENV, "")
    return float(raw) / 1000 if raw else 0.0


# --- GGUF -------------------------------------------------------------------------


def quantize_gguf(src: Path, out: Path, type_name: str, threads: int,
                  source_file_type: int | None) -> dict[str, Any]:
    import llama_cpp

    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{type_name}", None)
    if ftype is None:
        raise QuantizeError(f"llama.cpp has no quantization type {type_name}")
    delay = _delay()

    def on_log(_level: int, text: bytes, _user: ctypes.c_void_p) -> None:
        match = _TENSOR_LINE.match(text.decode(errors="replace"))
        if match:
            emit("progress", stage="quantizing", done=int(match.group(1)),
                 total=int(match.group(2)))
            if delay:
                time.sleep(delay)

    callback = llama_cpp.llama_log_callback(on_log)  # kept referenced until the call returns
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.allow_requantize = True
    params.nthread = threads
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(),
                                        ctypes.byref(params))
    if rc != 0:
        raise QuantizeError(f"llama_model_quantize failed (return code {rc})")
    requantized = source_file_type is not None and source_file_type not in _FLOAT_FILE_TYPES
    return {"requantized": requantized, "backend": "llama_cpp",
            "note": "requantized from an already quantized file: quality is bounded by the "
                    "source's quantization" if requantized else None}


# --- MLX ------------------------------------------------------------------------------


def quantize_mlx(src: Path, out: Path, type_name: str, group_size: int) -> dict[str, Any]:
    import mlx.core as mx
    from mlx.utils import tree_map_with_path
    from mlx_lm.utils import dequantize_model, load, quantize_model, save

    delay = _delay()
    stages = ["loading", "dequantizing", "converting", "saving"]

    def stage(name: str) -> None:
        emit("progress", stage=name, done=stages.index(name), total=len(stages))
        if delay:
            time.sleep(delay)

    stage("loading")
    loaded: tuple[Any, Any, dict[str, Any]] = load(  # type: ignore[assignment]
        str(src), return_config=True, lazy=True)
    model, tokenizer, config = loaded
    requantized = isinstance(config.get("quantization"), dict)
    if requantized:
        stage("dequantizing")
        model = dequantize_model(model)
        config.pop("quantization", None)
        config.pop("quantization_config", None)
    stage("converting")
    if type_name in MLX_FLOAT_TYPES:
        dtype = getattr(mx, type_name)

        def cast(_path: str, value: Any) -> Any:
            return value.astype(dtype) if mx.issubdtype(value.dtype, mx.floating) else value

        model.update(tree_map_with_path(cast, model.parameters()))
        config["torch_dtype"] = type_name
    else:
        model, config = quantize_model(model, config, group_size, MLX_BITS[type_name])
    stage("saving")
    save(out, src, model, tokenizer, config)
    return {"requantized": requantized and type_name not in MLX_FLOAT_TYPES,
            "dequantized": requantized and type_name in MLX_FLOAT_TYPES, "backend": "mlx",
            "group_size": group_size if type_name in MLX_BITS else None,
            "note": "requantized from an already quantized model: quality is bounded by the "
                    "source's quantization" if requantized else None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lmx_worker.jobs.quantize_command")
    parser.add_argument("src")
    parser.add_argument("out")
    parser.add_argument("--type", required=True)
    parser.add_argument("--format", choices=["gguf", "mlx"], required=True)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--source-file-type", type=int, default=None)
    parser.add_argument("--death-fd", type=int, default=None)
    args = parser.parse_args(argv)
    if args.death_fd is not None:
        from lmx_worker.process.main import watch_parent

        watch_parent(args.death_fd)
    started = time.monotonic()
    src, out = Path(args.src), Path(args.out)
    try:
        if args.format == "gguf":
            result = quantize_gguf(src, out, args.type, args.threads, args.source_file_type)
        else:
            result = quantize_mlx(src, out, args.type, args.group_size)
    except (QuantizeError, ImportError, OSError, ValueError) as exc:
        print(f"cannot quantize {src}: {exc}", file=sys.stderr, flush=True)
        return EXIT_FAILED
    emit("done", seconds=round(time.monotonic() - started, 2), **result)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
