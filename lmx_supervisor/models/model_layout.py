"""What a path on disk holds as a model: its format, the backend that can
serve it, and whether every file it needs is there and whole.

Formats:
- ``gguf``: one GGUF file, or a split set ``name-00001-of-0000N.gguf`` (the
  first shard is what llama.cpp opens; it finds the others beside it).
- ``mlx``: a transformers-layout directory written by mlx-lm (its safetensors
  carry ``{"format": "mlx"}`` metadata, or config.json has mlx-lm's
  ``quantization`` block).
- ``hf``: any other transformers-layout directory (config.json + safetensors);
  the MLX backend loads these too.

"Complete" means: config.json parses, a tokenizer file exists, every shard
the safetensors index names exists, and no weight file ends before its own
header says it should (a truncated download). A GGUF file is complete when
its header parses and the tensor data it describes fits in the file.
"""

from __future__ import annotations

import json
import re
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path

from lmx_supervisor.models.encoder_models import gguf_encoder_kind, hf_encoder_kind
from lmx_supervisor.models.gguf_header import gguf_problem

# Backend names (model_resolver re-exports them; it imports this module).
LLAMA_CPP = "llama_cpp"
MLX = "mlx"

GGUF = "gguf"
MLX_FORMAT = "mlx"
HF_FORMAT = "hf"

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model", "sentencepiece.bpe.model", "tiktoken.model")
_SPLIT = re.compile(r"^(?P<stem>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})\.gguf$")
# Vision projectors ship beside GGUF models but are not models themselves.
_NOT_A_MODEL = re.compile(r"^mmproj", re.IGNORECASE)
_SAFETENSORS_HEADER_LIMIT = 100 * 1024 * 1024


@dataclass(frozen=True)
class Layout:
    format: str
    backend: str | None
    # What a worker opens: the GGUF file (first shard) or the model directory.
    weights: Path
    problems: tuple[str, ...] = ()
    # Every file that belongs to the model (for sizes).
    files: tuple[Path, ...] = field(default=())

    @property
    def complete(self) -> bool:
        return not self.problems

    @property
    def size_bytes(self) -> int:
        total = 0
        for f in self.files:
            try:
                total += f.stat().st_size
            except OSError:
                continue
        return total


# GGUF header parsing costs ~0.1 s for a large vocabulary; files do not change
# under the same (size, mtime), so remember the verdict.
_gguf_cache: dict[tuple[str, int, int], str | None] = {}
_gguf_lock = threading.Lock()


def cached_gguf_problem(path: Path) -> str | None:
    try:
        st = path.stat()
    except OSError as exc:
        return f"cannot read: {exc.strerror or exc}"
    key = (str(path), st.st_size, st.st_mtime_ns)
    with _gguf_lock:
        if key in _gguf_cache:
            return _gguf_cache[key]
    problem = gguf_problem(path)
    with _gguf_lock:
        if len(_gguf_cache) > 4096:
            _gguf_cache.clear()
        _gguf_cache[key] = problem
    return problem


def is_model_gguf(path: Path) -> bool:
    """A GGUF file that is a model entry point (not a projector, not shard 2+)."""
    if path.suffix != ".gguf" or _NOT_A_MODEL.match(path.name):
        return False
    split = _SPLIT.match(path.name)
    return split is None or int(split.group("index")) == 1


def gguf_layout(path: Path) -> Layout:
    split = _SPLIT.match(path.name)
    files = [path]
    problems: list[str] = []
    if split is not None:
        count = int(split.group("count"))
        files = [path.with_name(f"{split.group('stem')}-{i:05d}-of-{count:05d}.gguf")
                 for i in range(1, count + 1)]
    for f in files:
        if not f.exists():
            problems.append(f"missing shard {f.name}")
            continue
        problem = cached_gguf_problem(f)
        if problem is not None:
            problems.append(f"{f.name}: {problem}")
    kind = None if problems else gguf_encoder_kind(path)  # embedding models
    return Layout(GGUF, kind.backend if kind else LLAMA_CPP, path, tuple(problems),
                  tuple(files))


def _safetensors_header(path: Path) -> tuple[dict[str, object], int]:
    """The JSON header and the byte count the file must have."""
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError("header is cut off (file truncated)")
        (length,) = struct.unpack("<Q", raw)
        if length > _SAFETENSORS_HEADER_LIMIT:
            raise ValueError("implausible header length (corrupt file)")
        text = f.read(length)
        if len(text) != length:
            raise ValueError("header is cut off (file truncated)")
    header = json.loads(text)
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    end = 0
    for name, entry in header.items():
        if name == "__metadata__" or not isinstance(entry, dict):
            continue
        offsets = entry.get("data_offsets")
        if isinstance(offsets, list) and len(offsets) == 2:
            end = max(end, int(offsets[1]))
    return header, 8 + length + end


def _check_safetensors(path: Path) -> tuple[str | None, bool]:
    """(problem or None, whether mlx-lm wrote it)."""
    try:
        header, required = _safetensors_header(path)
        size = path.stat().st_size
    except (OSError, ValueError) as exc:
        return f"{path.name}: unreadable safetensors ({exc})", False
    meta = header.get("__metadata__")
    is_mlx = isinstance(meta, dict) and meta.get("format") == "mlx"
    if size < required:
        return f"{path.name}: truncated: {size} of {required} bytes present", is_mlx
    return None, is_mlx


def _index_shards(directory: Path) -> tuple[list[str] | None, str | None]:
    indexes = sorted(directory.glob("*.safetensors.index.json"))
    if not indexes:
        return None, None
    try:
        data = json.loads(indexes[0].read_text())
        weight_map = data["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return [], f"{indexes[0].name}: unreadable ({exc})"
    return sorted({str(v) for v in weight_map.values()}), None


def directory_layout(directory: Path) -> Layout:
    """A transformers-layout directory (one with config.json, or meant to be)."""
    problems: list[str] = []
    config: object = None
    config_path = directory / "config.json"
    if not config_path.is_file():
        problems.append("config.json is missing")
    else:
        try:
            config = json.loads(config_path.read_text())
        except (OSError, ValueError) as exc:
            problems.append(f"config.json is unreadable ({exc})")
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        problems.append("tokenizer is missing (none of " + ", ".join(TOKENIZER_FILES) + ")")
    shards, index_problem = _index_shards(directory)
    if index_problem:
        problems.append(index_problem)
    weight_names = shards if shards is not None else sorted(
        p.name for p in directory.glob("*.safetensors"))
    if not weight_names and index_problem is None:
        problems.append("no weight files (*.safetensors)")
    is_mlx = isinstance(config, dict) and isinstance(config.get("quantization"), dict)
    for name in weight_names:
        path = directory / name
        if not path.is_file():
            problems.append(f"missing shard {name}")
            continue
        problem, mlx_written = _check_safetensors(path)
        is_mlx = is_mlx or mlx_written
        if problem:
            problems.append(problem)
    files = tuple(p for p in directory.rglob("*") if p.is_file())
    fmt = MLX_FORMAT if is_mlx else HF_FORMAT
    kind = hf_encoder_kind(directory, config) if isinstance(config, dict) else None
    return Layout(fmt, kind.backend if kind else MLX, directory, tuple(problems), files)


def model_ggufs(directory: Path) -> list[Path]:
    return sorted(p for p in directory.glob("*.gguf") if is_model_gguf(p))


def dir_models(directory: Path) -> list[tuple[str | None, Layout]]:
    """The models a directory holds: [(None, layout)] when the directory is one
    model; [(file stem, layout), ...] for a folder of several GGUF files; []
    when it holds neither."""
    try:
        has_weights = any(directory.glob("*.safetensors")) or any(
            directory.glob("*.safetensors.index.json"))
        ggufs = model_ggufs(directory)
    except OSError:
        return []
    if has_weights or (not ggufs and (directory / "config.json").exists()):
        return [(None, directory_layout(directory))]
    if len(ggufs) == 1:
        return [(None, gguf_layout(ggufs[0]))]
    return [(g.name.removesuffix(".gguf"), gguf_layout(g)) for g in ggufs]


def inspect_path(path: Path) -> Layout | None:
    """The model at `path`, or None when it holds no model (or several GGUF
    files, which are loaded one by one)."""
    if path.is_file():
        return gguf_layout(path) if path.suffix == ".gguf" else None
    if not path.is_dir():
        return None
    found = dir_models(path)
    if len(found) == 1 and found[0][0] is None:
        return found[0][1]
    return None
