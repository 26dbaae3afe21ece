"""Constrained decoding with llguidance, independent of the backend.

A grammar is llguidance's serialised form (what `json_schema_grammar` and
`lark_grammar` return). `check_grammar` validates one without a tokenizer,
so the gateway can refuse a bad schema with a 400 before any worker sees it.
In the worker, a `TokenConstraint` follows one request: before each sample
it masks the request's logits row (disallowed tokens -> -inf, in place),
after it advances with the sampled token, and `done` says when the grammar
admits nothing more (the request then ends as if EOS had been sampled).

Tokenizers: `tokenizer_from_llama_vocab` (llama.cpp) and `tokenizer_from_hf`
(Hugging Face fast tokenizers, for MLX) each take ~0.5-1 s to build, so an
engine builds one lazily on its first constrained request and keeps it;
unconstrained requests never touch any of this.
"""

from __future__ import annotations

import json
import warnings
from typing import Any

import llguidance
import numpy as np
import numpy.typing as npt

# Compact, predictable JSON: flexible whitespace lets a small model emit
# newlines until it runs out of tokens. A schema's own "x-guidance" wins.
JSON_LAYOUT: dict[str, Any] = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
}


class ConstraintError(ValueError):
    """A grammar or schema llguidance cannot enforce (invalid, or using a
    feature it does not implement). The message names the problem."""


_OPEN_KEYS = ("additionalProperties", "patternProperties", "unevaluatedProperties")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUBSCHEMA_MAPS = ("properties", "$defs", "definitions")


def close_objects(schema: Any) -> Any:
    """A copy of `schema` where every object that lists `properties` and
    says nothing about other keys admits no other keys. The output still
    validates against the original schema; without this a small model
    tends to invent extra keys and run on inside them until max_tokens."""
    if isinstance(schema, list):
        return [close_objects(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in _SUBSCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {k: close_objects(v) for k, v in out[key].items()}
    for key in _SUBSCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = close_objects(out[key])
    for key in ("items", "additionalProperties", "not"):
        if isinstance(out.get(key), dict):
            out[key] = close_objects(out[key])
    if isinstance(out.get("properties"), dict) and not any(k in out for k in _OPEN_KEYS):
        out["additionalProperties"] = False
    return out


def json_schema_grammar(schema: dict[str, Any] | bool) -> str:
    """The llguidance grammar for a JSON schema (not yet validated), with
    objects closed (see `close_objects`) and compact layout by default."""
    try:
        return str(llguidance.LLMatcher.grammar_from_json_schema(
            json.dumps(close_objects(schema)), defaults=JSON_LAYOUT))  # type: ignore[arg-type]
    except ValueError as exc:
        raise ConstraintError(str(exc)) from exc


def lark_grammar(lark: str) -> str:
    """The llguidance grammar for a Lark grammar (llguidance's dialect,
    `%json {...}` inline schemas included; not yet validated)."""
    return str(llguidance.LLMatcher.grammar_from_lark(lark))


def check_grammar(grammar: str, tokenizer: llguidance.LLTokenizer | None = None) -> None:
    """Raise ConstraintError if llguidance reports an error or a warning
    (warnings are features it would otherwise not enforce)."""
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, tokenizer)
    if is_error or messages:
        raise ConstraintError("; ".join(m.strip() for m in messages) or "invalid grammar")


def tokenizer_from_llama_vocab(vocab: Any, eos_tokens: list[int]) -> llguidance.LLTokenizer:
    """llguidance's view of a llama.cpp vocabulary (`llama_vocab_p`).
    `eos_tokens`: every end-of-generation token, so a finished grammar lets
    the model end the way it was trained to."""
    from llguidance.llamacpp import lltokenizer_from_vocab

    with warnings.catch_warnings():
        # llguidance calls llama_token_get_attr, deprecated in llama-cpp-python:
        # one DeprecationWarning per vocabulary entry.
        warnings.simplefilter("ignore", DeprecationWarning)
        return lltokenizer_from_vocab(vocab, eos_token=eos_tokens)


def tokenizer_from_hf(tokenizer: Any, eos_tokens: list[int],
                      n_vocab: int | None = None) -> llguidance.LLTokenizer:
    """llguidance's view of a Hugging Face fast tokenizer (MLX models).
    `n_vocab`: the model's logits width when it exceeds the tokenizer's."""
    from llguidance.hf import from_tokenizer

    return from_tokenizer(tokenizer, n_vocab=n_vocab, eos_token=eos_tokens)


def special_token_id(tokenizer: llguidance.LLTokenizer, text: str) -> int | None:
    """The id of `text` when it is one special token of this vocabulary
    (e.g. `[TOOL_CALLS]`), else None. A grammar must name such a token by id:
    as a quoted string it would only match the text spelled out in pieces."""
    ids = tokenizer.tokenize_str(text, parse_special=True)
    if len(ids) == 1 and tokenizer.is_special_token(ids[0]):
        return int(ids[0])
    return None


class TokenConstraint:
    """One request's grammar state. Not thread-safe; one per request."""

    def __init__(self, tokenizer: llguidance.LLTokenizer, grammar: str) -> None:
        self._matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
        if self._matcher.is_error():
            raise ConstraintError(self._matcher.get_error())
        self._vocab = tokenizer.vocab_size
        self._bits = np.zeros((self._vocab + 31) // 32, dtype=np.int32)

    @property
    def done(self) -> bool:
        """The grammar admits no further token (only EOS)."""
        return bool(self._matcher.is_stopped())

    @property
    def error(self) -> str:
        """Why the matcher failed ("" while it has not)."""
        return str(self._matcher.get_error())

    def mask_logits(self, row: npt.NDArray[np.float32]) -> None:
        """Set the logits of every token the grammar forbids next to -inf,
        in place. `row` may be wider than the tokenizer's vocabulary (padded
        logits): the extra columns are never allowed."""
        self._matcher.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
        allowed = np.unpackbits(self._bits.view(np.uint8), bitorder="little")
        width = min(row.shape[0], self._vocab)
        row[:width][allowed[:width] == 0] = -np.inf
        row[width:] = -np.inf

    def forced(self, limit: int) -> list[int]:
        """Up to `limit` tokens the grammar now forces (e.g. the next JSON
        key), already fed to the matcher: the engine appends them without
        sampling, and decodes them in one batch step."""
        if limit <= 0:
            return []
        tokens = [int(t) for t in self._matcher.compute_ff_tokens()[:limit]]
        if tokens and not self._matcher.consume_tokens(tokens):
            return []
        return tokens

    def advance(self, token: int) -> bool:
        """Feed the sampled token. False: the grammar rejected it (the
        matcher is then in its error state; see `error`)."""
        return bool(self._matcher.consume_token(token))
