"""MLX backend for BERT encoders in the transformers layout: sentence
embeddings (pooling and normalisation as the model's sentence-transformers
config says) and reranking, by a cross-encoder's classifier head
(`BertForSequenceClassification`) or, for a bi-encoder, by the cosine
similarity of query and document embeddings.
"""

from __future__ import annotations

import json
import math
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from tokenizers import Encoding, Tokenizer
from tokenizers.implementations.bert_wordpiece import BertWordPieceTokenizer

from lmx_protocol import Embed, EncoderInfo, ErrorCode, Failed, Rerank, Scores
from lmx_worker.encoders.encoder_engine import (
    EmbedOutput,
    InputError,
    NoGeneration,
    RerankOutput,
    Vectors,
    check_token_ids,
    cosine_scores,
    embed_together,
    length_chunks,
)
from lmx_worker.encoders.mlx_bert import Bert, BertConfig, CheckpointError, load_weights
from lmx_worker.encoders.sentence_config import SentenceConfig, read_sentence_config
from lmx_worker.process.spec import WorkerSpec

_MAX_SANE_LENGTH = 1_000_000  # tokenizer_config's "no limit" is 1e30


def _load_tokenizer(directory: Path) -> Tokenizer:
    if (directory / "tokenizer.json").is_file():
        return Tokenizer.from_file(str(directory / "tokenizer.json"))
    if (directory / "vocab.txt").is_file():
        lower = True
        cfg = directory / "tokenizer_config.json"
        if cfg.is_file():
            raw = json.loads(cfg.read_text())
            if isinstance(raw, dict) and raw.get("do_lower_case") is False:
                lower = False
        wordpiece = BertWordPieceTokenizer(str(directory / "vocab.txt"), lowercase=lower)
        tokenizer: Tokenizer = wordpiece._tokenizer
        return tokenizer
    raise CheckpointError("no tokenizer.json or vocab.txt")


def _mlx_version() -> str:
    try:
        return f"mlx {version('mlx')}"
    except PackageNotFoundError:
        return "mlx"


def _model_max_length(directory: Path) -> int | None:
    cfg = directory / "tokenizer_config.json"
    try:
        raw = json.loads(cfg.read_text()) if cfg.is_file() else None
    except (OSError, ValueError):
        return None
    value = raw.get("model_max_length") if isinstance(raw, dict) else None
    if isinstance(value, (int, float)) and 0 < value < _MAX_SANE_LENGTH:
        return int(value)
    return None


def _pool(states: mx.array, mask: mx.array, modes: tuple[str, ...]) -> mx.array:
    """sentence-transformers' Pooling, over right-padded states."""
    m = mask[:, :, None].astype(states.dtype)
    counts = mx.maximum(m.sum(axis=1), 1e-9)
    parts: list[mx.array] = []
    for mode in modes:
        if mode == "cls":
            parts.append(states[:, 0])
        elif mode == "max":
            parts.append(mx.where(m > 0, states, -1e9).max(axis=1))
        elif mode == "mean":
            parts.append((states * m).sum(axis=1) / counts)
        elif mode == "mean_sqrt_len":
            parts.append((states * m).sum(axis=1) / mx.sqrt(counts))
        elif mode == "weighted_mean":
            positions = mx.arange(1, states.shape[1] + 1, dtype=states.dtype)
            w = m * positions[None, :, None]
            parts.append((states * w).sum(axis=1) / mx.maximum(w.sum(axis=1), 1e-9))
        else:  # last_token
            last = mask.astype(mx.int32).sum(axis=1) - 1
            parts.append(states[mx.arange(states.shape[0]), last])
    return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=1)


class _Sequence:
    __slots__ = ("ids", "types")

    def __init__(self, ids: list[int], types: list[int] | None = None) -> None:
        self.ids = ids
        self.types = types


def _batch_arrays(seqs: list[_Sequence], pad_id: int
                  ) -> tuple[mx.array, mx.array, mx.array]:
    length = max(len(s.ids) for s in seqs)
    ids = np.full((len(seqs), length), pad_id, dtype=np.int32)
    mask = np.zeros((len(seqs), length), dtype=np.int32)
    types = np.zeros((len(seqs), length), dtype=np.int32)
    for row, s in enumerate(seqs):
        n = len(s.ids)
        ids[row, :n] = s.ids
        mask[row, :n] = 1
        if s.types is not None:
            types[row, :n] = s.types
    return mx.array(ids), mx.array(mask), mx.array(types)


class MlxEncoderEngine(NoGeneration):
    backend = "mlx_encoder"

    def __init__(self, spec: WorkerSpec) -> None:
        directory = Path(spec.model_path)
        self.config = BertConfig.read(directory)
        self.bert = Bert(self.config, load_weights(directory))
        self.tokenizer = _load_tokenizer(directory)
        self.tokenizer.no_padding()
        self.backend_version = _mlx_version()
        pad = self.tokenizer.token_to_id("[PAD]")
        self.pad_id = pad if pad is not None else 0
        limit = min(self.config.max_positions,
                    _model_max_length(directory) or self.config.max_positions)
        self.sentence: SentenceConfig | None = None
        if self.config.is_classifier:
            self.model_kind = "rerank"
            self.capabilities = ["rerank"]
            info = EncoderInfo(rerank_mode="cross-encoder", max_tokens=limit,
                               vocab_size=self.config.vocab_size)
        else:
            self.sentence = read_sentence_config(directory)
            if self.sentence.max_seq_length:
                limit = min(limit, self.sentence.max_seq_length)
            dims = self.config.hidden_size * len(self.sentence.pooling)
            self.capabilities = ["embeddings", "rerank"]
            info = EncoderInfo(dimensions=dims, max_tokens=limit,
                               vocab_size=self.config.vocab_size,
                               rerank_mode="bi-encoder-cosine",
                               matryoshka=self.sentence.matryoshka,
                               pooling=self.sentence.pooling_name,
                               normalized=self.sentence.normalize)
        self.encoder_info = info
        self.context_length = limit
        self.tokenizer.enable_truncation(limit)

    def memory_bytes(self) -> int:
        return self.bert.parameter_bytes()

    # --- embeddings ----------------------------------------------------------

    def _sequences(self, request: Embed) -> list[_Sequence]:
        if request.token_ids is not None:
            for i, ids in enumerate(request.token_ids):
                check_token_ids(ids, i, self.config.vocab_size, self.encoder_info.max_tokens)
            return [_Sequence(list(ids)) for ids in request.token_ids]
        texts = request.texts or []
        if not texts:
            raise InputError("input must not be empty")
        encodings: list[Encoding] = self.tokenizer.encode_batch(texts)
        return [_Sequence(e.ids, e.type_ids) for e in encodings]

    def _pooled(self, seqs: list[_Sequence]) -> Vectors:
        assert self.sentence is not None
        out = np.zeros((len(seqs), self.encoder_info.dimensions), dtype=np.float32)
        for chunk in length_chunks([len(s.ids) for s in seqs]):
            ids, mask, types = _batch_arrays([seqs[i] for i in chunk], self.pad_id)
            states = self.bert.hidden_states(ids, mask, types)
            pooled = _pool(states, mask, self.sentence.pooling)
            out[chunk] = np.array(pooled, dtype=np.float32)
        return out

    def embed(self, requests: list[Embed]) -> list[EmbedOutput]:
        if self.sentence is None:
            return [Failed(ErrorCode.UNSUPPORTED, "this is a cross-encoder (rerank) model: it "
                           "makes no embeddings", request_id=r.request_id, param="model")
                    for r in requests]
        return embed_together(requests, self._sequences, self._pooled, lambda s: len(s.ids),
                              self.encoder_info)

    # --- rerank ----------------------------------------------------------------

    def rerank(self, request: Rerank) -> RerankOutput:
        if not request.documents:
            return InputError("documents must not be empty",
                              param="documents").failed(request.request_id)
        if self.sentence is not None:
            seqs = [_Sequence(e.ids, e.type_ids) for e in
                    self.tokenizer.encode_batch([request.query, *request.documents])]
            pooled = self._pooled(seqs)
            scores = cosine_scores(pooled[:1], pooled[1:])
            return Scores(request.request_id, scores, sum(len(s.ids) for s in seqs))
        pairs: list[Any] = [(request.query, doc) for doc in request.documents]
        seqs = [_Sequence(e.ids, e.type_ids) for e in self.tokenizer.encode_batch(pairs)]
        logits = np.zeros((len(seqs), self.config.num_labels), dtype=np.float32)
        for chunk in length_chunks([len(s.ids) for s in seqs]):
            ids, mask, types = _batch_arrays([seqs[i] for i in chunk], self.pad_id)
            logits[chunk] = np.array(self.bert.classify(ids, mask, types), dtype=np.float32)
        return Scores(request.request_id, self._relevance(logits),
                      sum(len(s.ids) for s in seqs))

    def _relevance(self, logits: Vectors) -> list[float]:
        """As sentence-transformers' CrossEncoder.predict: sigmoid of a single
        logit (unless config.json names an identity activation); for several
        labels, the softmax probability of the last one."""
        activation = self.config.activation_fn or ""
        if logits.shape[1] == 1:
            if activation.endswith("Identity"):
                return [float(x) for x in logits[:, 0]]
            return [1.0 / (1.0 + math.exp(-float(x))) for x in logits[:, 0]]
        shifted = logits - logits.max(axis=1, keepdims=True)
        probs = np.exp(shifted) / np.exp(shifted).sum(axis=1, keepdims=True)
        return [float(x) for x in probs[:, -1]]
