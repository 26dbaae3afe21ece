"""A BERT encoder in MLX, read from a transformers-layout checkpoint
(config.json + safetensors), for embeddings and cross-encoder reranking.

Written as plain functions over the checkpoint's own tensors (named as
transformers names them, with or without the `bert.` prefix) rather than
an `nn.Module` tree: loading is then a dictionary lookup per weight, and a
missing or misshapen tensor is reported by its checkpoint name.

Everything runs in float32: half-precision checkpoints are widened at load,
since on a CPU float16 is slower and less exact (MLX picks the device; this
module never names one).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx

# Activations BERT checkpoints name in `hidden_act`.
_ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "relu")
_NEG_INF = -1e30  # additive attention mask for padding (exp underflows to 0)


class CheckpointError(ValueError):
    """The checkpoint is not a BERT this module can run."""


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    hidden_act: str
    max_positions: int
    type_vocab_size: int
    layer_norm_eps: float
    architectures: tuple[str, ...]
    num_labels: int
    # sentence-transformers' CrossEncoder records its activation in config.json.
    activation_fn: str | None

    @property
    def is_classifier(self) -> bool:
        return any(a.endswith("ForSequenceClassification") for a in self.architectures)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> BertConfig:
        model_type = raw.get("model_type")
        if model_type != "bert":
            raise CheckpointError(f"model_type '{model_type}' is not supported by the MLX "
                                  "encoder (BERT checkpoints only)")
        position_type = raw.get("position_embedding_type", "absolute")
        if position_type != "absolute":
            raise CheckpointError(f"position_embedding_type '{position_type}' is not supported")
        act = str(raw.get("hidden_act", "gelu"))
        if act not in _ACTIVATIONS:
            raise CheckpointError(f"hidden_act '{act}' is not supported")
        labels = raw.get("id2label")
        num_labels = int(raw.get("num_labels", len(labels) if isinstance(labels, dict) else 2))
        st = raw.get("sentence_transformers")
        activation = st.get("activation_fn") if isinstance(st, dict) else None
        try:
            return cls(
                vocab_size=int(raw["vocab_size"]), hidden_size=int(raw["hidden_size"]),
                num_layers=int(raw["num_hidden_layers"]),
                num_heads=int(raw["num_attention_heads"]),
                intermediate_size=int(raw["intermediate_size"]), hidden_act=act,
                max_positions=int(raw.get("max_position_embeddings", 512)),
                type_vocab_size=int(raw.get("type_vocab_size", 2)),
                layer_norm_eps=float(raw.get("layer_norm_eps", 1e-12)),
                architectures=tuple(str(a) for a in raw.get("architectures") or ()),
                num_labels=num_labels,
                activation_fn=str(activation) if activation else None)
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"config.json lacks a usable {exc}") from None

    @classmethod
    def read(cls, directory: Path) -> BertConfig:
        try:
            raw = json.loads((directory / "config.json").read_text())
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"cannot read config.json: {exc}") from None
        if not isinstance(raw, dict):
            raise CheckpointError("config.json is not an object")
        return cls.from_dict(raw)


def _activation(name: str, x: mx.array) -> mx.array:
    if name == "gelu":  # the exact (erf) form, as transformers' "gelu"
        return x * (1.0 + mx.erf(x / math.sqrt(2.0))) * 0.5
    if name == "relu":
        return mx.maximum(x, 0.0)
    # gelu_new / gelu_pytorch_tanh / gelu_fast: the tanh approximation.
    return 0.5 * x * (1.0 + mx.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)))


def load_weights(directory: Path) -> dict[str, mx.array]:
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise CheckpointError("no *.safetensors weights (PyTorch .bin checkpoints are not "
                              "supported: convert them to safetensors)")
    weights: dict[str, mx.array] = {}
    for f in files:
        loaded = mx.load(str(f))
        assert isinstance(loaded, dict)
        weights.update(loaded)
    return weights


class Bert:
    """BertModel (+ pooler), and the sequence-classification head when the
    checkpoint has one."""

    def __init__(self, config: BertConfig, weights: dict[str, mx.array]) -> None:
        self.config = config
        if config.hidden_size % config.num_heads:
            raise CheckpointError("hidden_size is not a multiple of num_attention_heads")
        self.head_dim = config.hidden_size // config.num_heads
        self._w: dict[str, mx.array] = {}
        for name, value in weights.items():
            key = name.removeprefix("bert.")
            if value.dtype in (mx.float16, mx.bfloat16, mx.float64):
                value = value.astype(mx.float32)
            self._w[key] = value
        h, inter = config.hidden_size, config.intermediate_size
        self._expect("embeddings.word_embeddings.weight", (config.vocab_size, h))
        self._expect("embeddings.position_embeddings.weight", (config.max_positions, h))
        self._expect("embeddings.LayerNorm.weight", (h,))
        self.has_token_types = "embeddings.token_type_embeddings.weight" in self._w
        for i in range(config.num_layers):
            p = f"encoder.layer.{i}."
            for part in ("attention.self.query", "attention.self.key", "attention.self.value",
                         "attention.output.dense"):
                self._expect(f"{p}{part}.weight", (h, h))
            self._expect(f"{p}intermediate.dense.weight", (inter, h))
            self._expect(f"{p}output.dense.weight", (h, inter))
            self._expect(f"{p}attention.output.LayerNorm.weight", (h,))
            self._expect(f"{p}output.LayerNorm.weight", (h,))
        if config.is_classifier:
            self._expect("pooler.dense.weight", (h, h))
            self._expect("classifier.weight", (config.num_labels, h))
        mx.eval(list(self._w.values()))

    def _expect(self, name: str, shape: tuple[int, ...]) -> None:
        value = self._w.get(name)
        if value is None:
            raise CheckpointError(f"weight '{name}' is missing from the checkpoint")
        if tuple(value.shape) != shape:
            raise CheckpointError(f"weight '{name}' has shape {tuple(value.shape)}, "
                                  f"config.json implies {shape}")

    def parameter_bytes(self) -> int:
        return sum(v.nbytes for v in self._w.values())

    def _linear(self, name: str, x: mx.array) -> mx.array:
        y = x @ self._w[f"{name}.weight"].T
        bias = self._w.get(f"{name}.bias")
        return y if bias is None else y + bias

    def _norm(self, name: str, x: mx.array) -> mx.array:
        return mx.fast.layer_norm(x, self._w[f"{name}.weight"], self._w.get(f"{name}.bias"),
                                  self.config.layer_norm_eps)

    def hidden_states(self, input_ids: mx.array, attention_mask: mx.array,
                      token_type_ids: mx.array | None = None) -> mx.array:
        """Last layer's states, (batch, length, hidden). `attention_mask` is
        1 for real tokens, 0 for padding (right-padded)."""
        batch, length = input_ids.shape
        x = self._w["embeddings.word_embeddings.weight"][input_ids]
        x = x + self._w["embeddings.position_embeddings.weight"][:length][None]
        if self.has_token_types:
            types = self._w["embeddings.token_type_embeddings.weight"]
            x = x + (types[token_type_ids] if token_type_ids is not None else types[0])
        x = self._norm("embeddings.LayerNorm", x)
        mask = mx.where(attention_mask[:, None, None, :] > 0, 0.0, _NEG_INF).astype(x.dtype)
        scale = 1.0 / math.sqrt(self.head_dim)
        heads, dim = self.config.num_heads, self.head_dim
        for i in range(self.config.num_layers):
            p = f"encoder.layer.{i}."

            def split(t: mx.array) -> mx.array:
                return t.reshape(batch, length, heads, dim).transpose(0, 2, 1, 3)

            q = split(self._linear(f"{p}attention.self.query", x))
            k = split(self._linear(f"{p}attention.self.key", x))
            v = split(self._linear(f"{p}attention.self.value", x))
            attn = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
            attn = attn.transpose(0, 2, 1, 3).reshape(batch, length, heads * dim)
            x = self._norm(f"{p}attention.output.LayerNorm",
                           x + self._linear(f"{p}attention.output.dense", attn))
            inner = _activation(self.config.hidden_act,
                                self._linear(f"{p}intermediate.dense", x))
            x = self._norm(f"{p}output.LayerNorm", x + self._linear(f"{p}output.dense", inner))
        return x

    def classify(self, input_ids: mx.array, attention_mask: mx.array,
                 token_type_ids: mx.array | None = None) -> mx.array:
        """Sequence-classification logits, (batch, num_labels): the pooler
        (tanh of a dense layer over [CLS]) then the classifier."""
        states = self.hidden_states(input_ids, attention_mask, token_type_ids)
        pooled = mx.tanh(self._linear("pooler.dense", states[:, 0]))
        return self._linear("classifier", pooled)
