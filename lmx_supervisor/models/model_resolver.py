"""Turns what an operator typed (`model_id` of a load) into a file on disk,
the backend that can serve it, and the id clients will route by."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import TYPE_CHECKING

from lmx_supervisor.errors import (
    BadRequest,
    Conflict,
    Forbidden,
    ModelNotFound,
    UnsupportedModel,
)
from lmx_supervisor.models import hub_cache
from lmx_supervisor.models.encoder_models import (
    LLAMA_CPP_ENCODER,
    MLX_ENCODER,
    gguf_encoder_kind,
    hf_encoder_kind,
)
from lmx_supervisor.models.model_layout import LLAMA_CPP, MLX, inspect_path

if TYPE_CHECKING:
    from lmx_supervisor.config import Config

# What a model id may be: clients route by it, it names the worker's ZeroMQ
# identity (at most 255 bytes) and shows up in logs and metrics labels.
MAX_MODEL_ID_LENGTH = 128
_MODEL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@+/-]*")

# Accepted spellings of backend names ("gguf" is the common name for llama.cpp).
BACKEND_ALIASES = {
    "gguf": LLAMA_CPP,
    "llama_cpp": LLAMA_CPP,
    "llama.cpp": LLAMA_CPP,
    "llamacpp": LLAMA_CPP,
    "mlx": MLX,
    "mlx_encoder": MLX_ENCODER,
    "llama_cpp_encoder": LLAMA_CPP_ENCODER,
}
# An embedding/rerank model asked for by its generic backend name.
_ENCODER_OF = {MLX: MLX_ENCODER, LLAMA_CPP: LLAMA_CPP_ENCODER}


def _mlx_installed() -> bool:
    """mlx and mlx-lm are installed (found, not imported: importing MLX in the
    supervisor would cost memory and time for nothing; a worker imports it)."""
    return find_spec("mlx") is not None and find_spec("mlx_lm") is not None


# Backends this build can run in a worker.
AVAILABLE_BACKENDS = frozenset({LLAMA_CPP, LLAMA_CPP_ENCODER}
                               | ({MLX} if _mlx_installed() else set())
                               | ({MLX_ENCODER} if find_spec("mlx") is not None
                                  and find_spec("tokenizers") is not None else set()))


@dataclass(frozen=True)
class LoadRoots:
    """Directories a load may read a model from: the models directory, the
    hub cache and `models.allowed_paths`."""

    roots: tuple[Path, ...]

    @classmethod
    def from_config(cls, config: Config) -> LoadRoots:
        dirs = [config.models_dir, hub_cache.cache_dir(),
                *(Path(p).expanduser() for p in config.models.allowed_paths)]
        return cls(tuple(Path(os.path.abspath(d)) for d in dirs))

    def allows(self, path: Path) -> bool:
        """`path` lies under a root, as written (a symlink an operator put in
        the models directory is theirs to place) or once resolved."""
        seen = {Path(os.path.abspath(path)), path.resolve()}
        resolved_roots = {r.resolve() for r in self.roots} | set(self.roots)
        return any(p == r or r in p.parents for p in seen for r in resolved_roots)


def check_model_id(model_id: str, param: str) -> None:
    if len(model_id) > MAX_MODEL_ID_LENGTH:
        raise BadRequest(f"{param} is {len(model_id)} characters; at most "
                         f"{MAX_MODEL_ID_LENGTH} are allowed", param=param,
                         code="invalid_model_id")
    if not _MODEL_ID.fullmatch(model_id) or ".." in model_id.split("/"):
        raise BadRequest(f"{param} {model_id[:64]!r} may only hold letters, digits and "
                         "._:@+/- (starting with a letter or digit)", param=param,
                         code="invalid_model_id")


def _inside(path: Path, root: Path) -> bool:
    """Lexically (no symlinks followed): `name/../../x` is outside."""
    p, r = Path(os.path.normpath(path)), Path(os.path.normpath(root))
    return p == r or r in p.parents


@dataclass(frozen=True)
class ResolvedModel:
    model_id: str
    path: Path
    backend: str


def _served_id(ref: str, path: Path, is_path_ref: bool) -> str:
    if is_path_ref:
        return path.name.removesuffix(".gguf")
    return ref.removesuffix(".gguf")


def _locate(ref: str, models_dir: Path, roots: LoadRoots | None) -> tuple[Path, bool]:
    raw = Path(ref).expanduser()
    if raw.is_absolute() or ref.startswith(("./", "../", "~")):
        if roots is not None and not roots.allows(raw):
            raise Forbidden(
                f"Model path '{ref}' is outside the directories models may be loaded from "
                "(models.models_directory, the hub cache, models.allowed_paths)",
                param="model_id", code="model_path_not_allowed")
        if raw.exists():
            return raw.resolve(), True
        raise ModelNotFound(f"Model path '{ref}' does not exist", param="model_id")
    for candidate in (models_dir / ref, models_dir / f"{ref}.gguf"):
        if not _inside(candidate, models_dir):
            raise Forbidden(f"Model name '{ref}' leads outside the models directory",
                            param="model_id", code="model_path_not_allowed")
        if candidate.exists():
            return candidate.resolve(), False
    # A hub repo id (org/name, or org/name/file.gguf) downloaded into the hub cache.
    # Not resolved: snapshot files are symlinks to extension-less blobs.
    cached = hub_cache.locate(ref)
    if cached is not None:
        return cached.path.absolute(), False
    raise ModelNotFound(
        f"Model '{ref}' not found in {models_dir} (give a name there or a path)",
        param="model_id",
    )


def _detect_backend(path: Path) -> str | None:
    if path.is_file() and path.suffix == ".gguf":
        return LLAMA_CPP
    if path.is_dir():
        if (path / "config.json").is_file():
            return MLX
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return LLAMA_CPP
    return None


def _detect_encoder(path: Path, detected: str | None) -> str | None:
    """The encoder backend for an embedding/rerank model, else `detected`."""
    if detected == LLAMA_CPP and path.is_file():
        kind = gguf_encoder_kind(path)
    elif detected == MLX and path.is_dir():
        kind = hf_encoder_kind(path)
    else:
        return detected
    if kind is None:
        return detected
    if kind.unsupported:
        raise UnsupportedModel(kind.unsupported)
    return kind.backend


def resolve_model(
    ref: str, models_dir: Path, backend: str | None = None, served_name: str | None = None,
    roots: LoadRoots | None = None,
) -> ResolvedModel:
    """`roots`: where loads are confined, and a client's served_name is
    checked (None: for what LMX itself recorded, e.g. a previous run's models)."""
    if not ref.strip():
        raise BadRequest("model_id must not be empty", param="model_id")
    if served_name is not None and roots is not None:
        check_model_id(served_name, "served_name")
    path, is_path_ref = _locate(ref, models_dir, roots)
    if path.is_dir() and _detect_backend(path) == LLAMA_CPP:
        path = sorted(path.glob("*.gguf"))[0]
    wanted = None
    if backend is not None:
        wanted = BACKEND_ALIASES.get(backend.lower())
        if wanted is None:
            raise BadRequest(
                f"unknown backend '{backend}' (use one of: {', '.join(sorted(BACKEND_ALIASES))})",
                param="backend",
            )
    detected = _detect_encoder(path, _detect_backend(path))
    if wanted is not None and _ENCODER_OF.get(wanted) == detected:
        wanted = detected
    layout = inspect_path(path)
    if layout is not None and not layout.complete:
        raise Conflict(
            f"Model '{ref}' is incomplete on disk: {'; '.join(layout.problems)}. Re-download "
            "or delete it",
            code="model_incomplete", param="model_id")
    chosen = wanted or detected
    if chosen is None:
        raise UnsupportedModel(f"'{ref}' is neither a GGUF file nor a model directory")
    if detected is not None and wanted is not None and wanted != detected:
        raise UnsupportedModel(f"backend '{backend}' cannot serve '{ref}' ({detected} model)")
    if chosen not in AVAILABLE_BACKENDS:
        raise UnsupportedModel(f"backend '{chosen}' is not available in this build")
    model_id = served_name or _served_id(ref, path, is_path_ref)
    if len(model_id) > MAX_MODEL_ID_LENGTH:  # a file's own name: only its length matters
        raise BadRequest(f"the model's name is {len(model_id)} characters; at most "
                         f"{MAX_MODEL_ID_LENGTH} are allowed: give a shorter served_name",
                         param="served_name", code="invalid_model_id")
    return ResolvedModel(model_id, path, chosen)
