"""OpenAI's two logprobs shapes, built from the worker's TokenLogprob rows:
chat (`{"content": [{token, logprob, bytes, top_logprobs}]}`) and legacy
completions (`tokens`, `token_logprobs`, `top_logprobs`, `text_offset`)."""

from __future__ import annotations

from typing import Any

from lmx_protocol import TokenLogprob


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", errors="replace")


def chat_logprobs(rows: list[TokenLogprob]) -> dict[str, Any]:
    return {"content": [
        {"token": _text(r.token), "logprob": r.logprob, "bytes": list(r.token),
         "top_logprobs": [{"token": _text(t), "logprob": lp, "bytes": list(t)}
                          for t, lp in r.top]}
        for r in rows
    ]}


def completion_logprobs(rows: list[TokenLogprob], start_offset: int = 0) -> dict[str, Any]:
    offsets, offset = [], start_offset
    for r in rows:
        offsets.append(offset)
        offset += len(_text(r.token))
    return {
        "tokens": [_text(r.token) for r in rows],
        "token_logprobs": [r.logprob for r in rows],
        "top_logprobs": [{_text(t): lp for t, lp in r.top} for r in rows],
        "text_offset": offsets,
    }
