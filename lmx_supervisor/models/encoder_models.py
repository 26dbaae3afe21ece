"""Which models on disk are embedding or rerank models, and which backend
serves them: an HF-layout BERT encoder runs on MLX (`mlx_encoder`), a GGUF
embedding model on llama.cpp (`llama_cpp_encoder`). Everything else is left
to the text-generation backends.

HF layout: an encoder architecture in config.json (BERT and its relatives)
or a sentence-transformers pipeline (modules.json) means an embedding model;
a `*ForSequenceClassification` architecture of an encoder means a
cross-encoder (reranker). GGUF: an encoder architecture, or a
`{arch}.pooling_type` key (llama.cpp's converter writes it for embedding
models; 4 = rank means a reranker).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmx_supervisor.models.gguf_header import GGUFError, read_gguf_metadata

MLX_ENCODER = "mlx_encoder"
LLAMA_CPP_ENCODER = "llama_cpp_encoder"

EMBEDDING = "embedding"
CROSS_ENCODER = "cross-encoder"

# transformers model_type values of encoder-only families.
_HF_ENCODER_TYPES = frozenset({
    "bert", "roberta", "xlm-roberta", "distilbert", "mpnet", "electra", "albert",
    "camembert", "deberta", "deberta-v2", "modernbert", "nomic_bert", "new", "xlm",
})
# The ones the MLX encoder (lmx_worker.encoders.mlx_bert) runs.
_HF_SUPPORTED_TYPES = frozenset({"bert"})
# llama.cpp architectures that are encoders (no text generation).
_GGUF_ENCODER_ARCHS = frozenset({
    "bert", "nomic-bert", "nomic-bert-moe", "jina-bert-v2", "jina-bert-v3", "t5encoder",
    "modern-bert", "neo-bert", "eurobert",
})
_GGUF_POOLING_RANK = 4


@dataclass(frozen=True)
class EncoderKind:
    role: str  # EMBEDDING or CROSS_ENCODER
    backend: str  # MLX_ENCODER or LLAMA_CPP_ENCODER
    # Why this build cannot serve it, or None when it can.
    unsupported: str | None = None


def hf_encoder_kind(directory: Path, config: dict[str, Any] | None = None
                    ) -> EncoderKind | None:
    """The encoder a transformers-layout directory holds, or None for a
    model of another kind (or an unreadable config: the layout check
    reports that)."""
    if config is None:
        try:
            raw = json.loads((directory / "config.json").read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(raw, dict):
            return None
        config = raw
    model_type = str(config.get("model_type", ""))
    archs = [str(a) for a in config.get("architectures") or []]
    classifier = any(a.endswith("ForSequenceClassification") for a in archs)
    sentence = (directory / "modules.json").is_file()
    encoder_type = model_type in _HF_ENCODER_TYPES
    if classifier and encoder_type:
        role = CROSS_ENCODER
    elif encoder_type or sentence:
        role = EMBEDDING
    else:
        return None
    unsupported = None
    if model_type not in _HF_SUPPORTED_TYPES:
        unsupported = (f"{role} models of type '{model_type or 'unknown'}' are not supported "
                       "(the MLX encoder runs BERT checkpoints)")
    return EncoderKind(role, MLX_ENCODER, unsupported)


def gguf_encoder_kind_from(meta: dict[str, Any]) -> EncoderKind | None:
    arch = meta.get("general.architecture")
    if not isinstance(arch, str):
        return None
    pooling = meta.get(f"{arch}.pooling_type")
    if pooling == _GGUF_POOLING_RANK:
        return EncoderKind(CROSS_ENCODER, LLAMA_CPP_ENCODER,
                           "GGUF rerankers (pooling type rank) are not supported; serve the "
                           "cross-encoder's transformers checkpoint on MLX instead")
    if arch in _GGUF_ENCODER_ARCHS or (isinstance(pooling, int) and pooling > 0):
        return EncoderKind(EMBEDDING, LLAMA_CPP_ENCODER)
    return None


@functools.lru_cache(maxsize=512)
def _gguf_kind_cached(path: Path, _size: int, _mtime_ns: int) -> EncoderKind | None:
    try:
        return gguf_encoder_kind_from(read_gguf_metadata(path))
    except (GGUFError, OSError, ValueError):
        return None  # the layout check reports an unreadable file


def gguf_encoder_kind(path: Path) -> EncoderKind | None:
    """Reading a header costs ~0.1 s with a large vocabulary: a file with the
    same size and mtime is not read twice."""
    try:
        st = path.stat()
    except OSError:
        return None
    return _gguf_kind_cached(path, st.st_size, st.st_mtime_ns)
