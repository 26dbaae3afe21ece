"""llama.cpp backend for GGUF embedding models (BERT, nomic-bert, jina,
and decoder models converted with a pooling type).

The context runs in embedding mode with the pooling the GGUF metadata names
(`{arch}.pooling_type`; mean when it names none). Pending requests are
packed into as few `llama_decode` calls as fit the batch (one KV sequence
per input, up to `_MAX_SEQUENCES` inputs per call); each input's pooled
vector is read back with `llama_get_embeddings_seq`. Vectors are
L2-normalised by default, as llama-server does.
"""

from __future__ import annotations

import ctypes
import os

import llama_cpp
import numpy as np
import psutil
from llama_cpp import _internals as internals
from llama_cpp._logger import set_verbose

from lmx_protocol import Embed, EncoderInfo, Rerank, Scores
from lmx_worker.encoders.encoder_engine import (
    EmbedOutput,
    InputError,
    NoGeneration,
    RerankOutput,
    Vectors,
    check_token_ids,
    cosine_scores,
    embed_together,
)
from lmx_worker.process.spec import WorkerSpec

_MAX_SEQUENCES = 64
_MIN_BATCH = 512
_MAX_BATCH = 8192
_POOLING_NAMES = {
    llama_cpp.LLAMA_POOLING_TYPE_MEAN: "mean",
    llama_cpp.LLAMA_POOLING_TYPE_CLS: "cls",
    llama_cpp.LLAMA_POOLING_TYPE_LAST: "last_token",
}


class LlamaCppEncoderEngine(NoGeneration):
    backend = "llama_cpp_encoder"

    def __init__(self, spec: WorkerSpec) -> None:
        llama_cpp.llama_backend_init()
        verbose = os.environ.get("LMX_WORKER_LOG_LEVEL") == "DEBUG"
        set_verbose(verbose)
        self.model = internals.LlamaModel(path_model=spec.model_path,
                                          params=llama_cpp.llama_model_default_params(),
                                          verbose=verbose)
        meta: dict[str, str] = self.model.metadata()
        arch = meta.get("general.architecture", "")
        train_ctx = self.model.n_ctx_train() or spec.context_length
        # A whole input must sit in one micro-batch (encoders attend both ways).
        self.n_batch = max(_MIN_BATCH, min(train_ctx, _MAX_BATCH))
        params = llama_cpp.llama_context_default_params()
        params.embeddings = True
        params.n_ctx = self.n_batch
        params.n_batch = self.n_batch
        params.n_ubatch = self.n_batch
        params.n_seq_max = _MAX_SEQUENCES
        # One pool for all sequences: a decoder-based embedding model's KV
        # cache is then not split into n_seq_max slivers of n_ctx.
        params.kv_unified = True
        if f"{arch}.pooling_type" not in meta:
            params.pooling_type = llama_cpp.LLAMA_POOLING_TYPE_MEAN
        threads = spec.n_threads or os.cpu_count() or 1
        params.n_threads = threads
        params.n_threads_batch = threads
        self.ctx = internals.LlamaContext(model=self.model, params=params, verbose=verbose)
        pooling = self.ctx.pooling_type()
        if pooling not in _POOLING_NAMES:
            raise ValueError(f"pooling type {pooling} cannot make sentence embeddings "
                             "(mean, cls or last are needed)")
        self._batch = internals.LlamaBatch(n_tokens=self.n_batch, embd=0,
                                           n_seq_max=_MAX_SEQUENCES, verbose=verbose)
        self._vocab = self.model.vocab
        self._vocab_size = int(llama_cpp.llama_vocab_n_tokens(self._vocab))
        self._end_tokens = {t for t in (self.model.token_eos(), self.model.token_sep()) if t >= 0}
        self._dim = self.model.n_embd()
        self.max_tokens = min(train_ctx, self.n_batch)
        self.context_length = self.max_tokens
        self.capabilities = ["embeddings", "rerank"]
        self.backend_version = str(llama_cpp.__version__)
        self.encoder_info = EncoderInfo(
            dimensions=self._dim, max_tokens=self.max_tokens, vocab_size=self._vocab_size,
            rerank_mode="bi-encoder-cosine", pooling=_POOLING_NAMES[pooling], normalized=True)

    def memory_bytes(self) -> int:
        return int(psutil.Process().memory_info().rss)

    def _tokens(self, text: str) -> list[int]:
        """The text with the model's special tokens; cut to the model's
        limit keeping the closing SEP/EOS, as a transformers tokenizer's
        truncation does."""
        tokens: list[int] = self.model.tokenize(text.encode("utf-8"), True, False)
        if len(tokens) > self.max_tokens:
            tail = [tokens[-1]] if tokens[-1] in self._end_tokens else []
            tokens = tokens[:self.max_tokens - len(tail)] + tail
        if not tokens:
            raise InputError("an input produced no tokens")
        return tokens

    def _sequences(self, request: Embed) -> list[list[int]]:
        if request.token_ids is not None:
            for i, ids in enumerate(request.token_ids):
                check_token_ids(ids, i, self._vocab_size, self.max_tokens)
            return [list(ids) for ids in request.token_ids]
        if not request.texts:
            raise InputError("input must not be empty")
        return [self._tokens(t) for t in request.texts]

    def _pooled(self, seqs: list[list[int]]) -> Vectors:
        out = np.zeros((len(seqs), self._dim), dtype=np.float32)
        start = 0
        while start < len(seqs):
            end, total = start, 0
            while (end < len(seqs) and end - start < _MAX_SEQUENCES
                   and total + len(seqs[end]) <= self.n_batch):
                total += len(seqs[end])
                end += 1
            self._decode(seqs[start:end], out[start:end])
            start = end
        return out

    def _decode(self, seqs: list[list[int]], out: Vectors) -> None:
        self._batch.batch.n_tokens = 0
        for seq_id, tokens in enumerate(seqs):
            self._batch.add_sequence(tokens, seq_id, True)
        # Encoders keep no KV cache (memory is NULL); a decoder's is cleared.
        memory = llama_cpp.llama_get_memory(self.ctx.ctx)
        if memory:
            llama_cpp.llama_memory_clear(memory, True)
        self.ctx.decode(self._batch)
        for seq_id in range(len(seqs)):
            ptr = self.ctx.get_embeddings_seq(seq_id)
            if not ptr:
                raise RuntimeError(f"llama.cpp returned no embedding for sequence {seq_id}")
            values = ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float))
            out[seq_id] = np.ctypeslib.as_array(values, shape=(self._dim,))

    def embed(self, requests: list[Embed]) -> list[EmbedOutput]:
        return embed_together(requests, self._sequences, self._pooled, len, self.encoder_info)

    def rerank(self, request: Rerank) -> RerankOutput:
        if not request.documents:
            return InputError("documents must not be empty",
                              param="documents").failed(request.request_id)
        seqs = [self._tokens(t) for t in [request.query, *request.documents]]
        pooled = self._pooled(seqs)
        return Scores(request.request_id, cosine_scores(pooled[:1], pooled[1:]),
                      sum(len(s) for s in seqs))
