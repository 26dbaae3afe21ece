"""Helpers for the memory / runtime-state tests: a chat stream kept open in
a background thread, and the model's memory
estimate (the same figure the server computes, so budgets can be sized to
fit exactly one or two models)."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import httpx

from lmx_supervisor.memory.memory_estimate import estimate_model_memory

CONTEXT = 2048  # base_config's context_length
# One KV sequence, one compute thread: small workers that stay quick on a
# busy 2-core machine (spinning llama.cpp threads suffer most from sharing).
LIGHT = {"parallel_slots": 1, "n_threads": 1}


def model_estimate(model_file: Path) -> int:
    return estimate_model_memory(model_file, CONTEXT).total_bytes


class Streamer:
    """A streaming chat completion read in a thread until it ends or
    close() is called. `chunks` counts content chunks; `error` holds an
    error event's payload if the stream carried one."""

    def __init__(self, url: str, model: str, max_tokens: int = 2000) -> None:
        self.chunks = 0
        self.error: dict[str, Any] | None = None
        self.status: int | None = None
        self.done = threading.Event()
        self._first = threading.Event()
        self._stop = threading.Event()
        self._client = httpx.Client(base_url=url, timeout=httpx.Timeout(60, read=60))
        self._body = {"model": model, "stream": True, "max_tokens": max_tokens,
                      "ignore_eos": True,
                      "messages": [{"role": "user", "content": "Tell me a long story."}]}
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            with self._client.stream("POST", "/v1/chat/completions", json=self._body) as resp:
                self.status = resp.status_code
                for line in resp.iter_lines():
                    if self._stop.is_set():
                        return
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    payload = json.loads(line[len("data: "):])
                    if "error" in payload:
                        self.error = payload["error"]
                    elif payload.get("choices") and payload["choices"][0]["delta"].get("content"):
                        self.chunks += 1
                        self._first.set()
        except httpx.HTTPError:
            return
        finally:
            self._first.set()
            self.done.set()

    def wait_first_token(self, timeout: float = 30) -> None:
        assert self._first.wait(timeout), "no token streamed"
        assert self.chunks > 0, f"stream ended without tokens: {self.status} {self.error}"

    def close(self) -> None:
        self._stop.set()
        self._thread.join(30)
        self._client.close()
