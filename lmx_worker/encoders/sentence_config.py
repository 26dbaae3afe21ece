"""How a sentence-transformers model turns token states into one vector:
read from the model directory (modules.json, the Pooling module's
config.json, a Normalize module, sentence_bert_config.json), so the worker
computes what `SentenceTransformer(path).encode()` computes.

A directory without modules.json (a bare transformers encoder) gets mean
pooling and L2 normalisation, the usual convention for such models.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Pooling config keys in the order sentence-transformers concatenates them.
POOLING_MODES = (
    ("pooling_mode_cls_token", "cls"),
    ("pooling_mode_max_tokens", "max"),
    ("pooling_mode_mean_tokens", "mean"),
    ("pooling_mode_mean_sqrt_len_tokens", "mean_sqrt_len"),
    ("pooling_mode_weightedmean_tokens", "weighted_mean"),
    ("pooling_mode_lasttoken", "last_token"),
)
_TRANSFORMER = "sentence_transformers.models.Transformer"
_POOLING = "sentence_transformers.models.Pooling"
_NORMALIZE = "sentence_transformers.models.Normalize"


class SentenceConfigError(ValueError):
    """A sentence-transformers pipeline this worker cannot reproduce."""


@dataclass(frozen=True)
class SentenceConfig:
    pooling: tuple[str, ...]  # modes from POOLING_MODES, concatenated in order
    normalize: bool
    max_seq_length: int | None  # None: the tokenizer's/model's own limit
    from_modules: bool  # False: defaults for a directory without modules.json
    # Trained with a Matryoshka loss: prefixes of a vector are themselves
    # usable embeddings, so `dimensions` may cut it.
    matryoshka: bool = False

    @property
    def pooling_name(self) -> str:
        return "+".join(self.pooling)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SentenceConfigError(f"cannot read {path.name}: {exc}") from None


def _mentions_matryoshka(directory: Path) -> bool:
    """sentence-transformers writes the training loss into the model card
    (`MatryoshkaLoss`, `matryoshka_dims`); hand-written cards of Matryoshka
    models say so too. No config file records it."""
    try:
        card = (directory / "README.md").read_text(errors="replace")
    except OSError:
        return False
    return "matryoshka" in card.lower()


def read_sentence_config(directory: Path) -> SentenceConfig:
    matryoshka = _mentions_matryoshka(directory)
    max_len: int | None = None
    bert_cfg = directory / "sentence_bert_config.json"
    if bert_cfg.is_file():
        raw = _read_json(bert_cfg)
        if isinstance(raw, dict) and isinstance(raw.get("max_seq_length"), int):
            max_len = int(raw["max_seq_length"])
    modules_path = directory / "modules.json"
    if not modules_path.is_file():
        return SentenceConfig(("mean",), True, max_len, False, matryoshka)
    modules = _read_json(modules_path)
    if not isinstance(modules, list):
        raise SentenceConfigError("modules.json is not a list")
    pooling: tuple[str, ...] | None = None
    normalize = False
    for module in modules:
        kind = str(module.get("type", "")) if isinstance(module, dict) else ""
        if kind == _TRANSFORMER:
            continue
        if kind == _POOLING:
            pooling = _read_pooling(directory / str(module.get("path", "")))
        elif kind == _NORMALIZE:
            normalize = True
        else:
            raise SentenceConfigError(f"sentence-transformers module '{kind or module}' is not "
                                      "supported (Transformer, Pooling and Normalize are)")
    if pooling is None:
        raise SentenceConfigError("modules.json has no Pooling module")
    return SentenceConfig(pooling, normalize, max_len, True, matryoshka)


def _read_pooling(module_dir: Path) -> tuple[str, ...]:
    raw = _read_json(module_dir / "config.json")
    if not isinstance(raw, dict):
        raise SentenceConfigError("the Pooling config is not an object")
    modes = tuple(name for key, name in POOLING_MODES if raw.get(key))
    if not modes:
        raise SentenceConfigError("the Pooling config enables no pooling mode")
    if raw.get("include_prompt") is False:
        raise SentenceConfigError("Pooling with include_prompt=false is not supported")
    return modes
