"""The official openai SDK against a live `lmx serve` with the real SmolLM2."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from llama_cpp import Llama

from tests.conftest import MODEL_ID, LMXServer

pytestmark = pytest.mark.timeout(180)

MESSAGES = [
    {"role": "system", "content": "You are a concise assistant."},
    {"role": "user", "content": "Name three colours."},
]


def test_chat_non_stream(shared_server: LMXServer) -> None:
    client = shared_server.openai()
    resp = client.chat.completions.create(model=MODEL_ID, messages=MESSAGES,  # type: ignore[arg-type]
                                          max_tokens=24, temperature=0)
    choice = resp.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content and choice.message.content.strip()
    assert choice.finish_reason in ("stop", "length")
    assert resp.model == MODEL_ID
    assert resp.usage is not None
    assert resp.usage.prompt_tokens > 10
    assert 0 < resp.usage.completion_tokens <= 24
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens


def test_chat_stream_with_usage(shared_server: LMXServer) -> None:
    client = shared_server.openai()
    stream = client.chat.completions.create(
        model=MODEL_ID, messages=MESSAGES, max_tokens=16, temperature=0,  # type: ignore[arg-type]
        stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and
                c.choices[0].finish_reason]
    assert finishes == ["length"] or finishes == ["stop"]
    usage = chunks[-1].usage
    assert usage is not None and chunks[-1].choices == []
    assert usage.completion_tokens <= 16
    # Stream and non-stream agree under greedy decoding.
    whole = client.chat.completions.create(model=MODEL_ID, messages=MESSAGES,  # type: ignore[arg-type]
                                           max_tokens=16, temperature=0)
    assert whole.choices[0].message.content == text
    assert whole.usage is not None and whole.usage.completion_tokens == usage.completion_tokens


def test_completions(shared_server: LMXServer) -> None:
    client = shared_server.openai()
    resp = client.completions.create(model=MODEL_ID, prompt="The capital of France is",
                                     max_tokens=8, temperature=0)
    assert resp.choices[0].text
    assert resp.usage is not None and resp.usage.completion_tokens <= 8
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL_ID, prompt="The capital of France is", max_tokens=8, temperature=0,
        stream=True) if c.choices)
    assert streamed == resp.choices[0].text


def test_models_list(shared_server: LMXServer) -> None:
    models = shared_server.openai().models.list()
    ids = [m.id for m in models.data]
    assert ids == [MODEL_ID]


def test_stop_sequence_and_seed(shared_server: LMXServer) -> None:
    client = shared_server.openai()
    base = client.chat.completions.create(model=MODEL_ID, messages=MESSAGES,  # type: ignore[arg-type]
                                          max_tokens=24, temperature=0)
    text = base.choices[0].message.content or ""
    assert len(text) > 4
    stop = text[3:6]
    cut = client.chat.completions.create(model=MODEL_ID, messages=MESSAGES,  # type: ignore[arg-type]
                                         max_tokens=24, temperature=0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == text[: text.index(stop)]
    seeded = [client.chat.completions.create(
        model=MODEL_ID, messages=MESSAGES, max_tokens=12, temperature=1.0,  # type: ignore[arg-type]
        seed=1234).choices[0].message.content for _ in range(2)]
    assert seeded[0] == seeded[1]


def test_greedy_matches_in_process_llama_cpp(start_server: Any, model_file: Path) -> None:
    # Same settings on both sides: one sequence in a 2048-token context. (A
    # larger multi-slot KV cache sums attention in another order, which may
    # legitimately flip near-ties; test_batching covers that case.)
    server: LMXServer = start_server(auto_load=[MODEL_ID], parallel_slots=1)
    server.wait_ready(MODEL_ID)
    prompts = [
        [{"role": "user", "content": "What is 2 + 2?"}],
        MESSAGES,
        [{"role": "user", "content": "Write a haiku about the sea."}],
    ]
    llm = Llama(model_path=str(model_file), n_ctx=2048, n_threads=2, verbose=False,
                chat_format="chat_template.default")
    client = server.openai()
    for messages in prompts:
        expected = llm.create_chat_completion(messages=messages, temperature=0,  # type: ignore[arg-type]
                                              max_tokens=40)
        got = client.chat.completions.create(model=MODEL_ID, messages=messages,  # type: ignore[arg-type]
                                             temperature=0, max_tokens=40)
        assert got.choices[0].message.content == expected["choices"][0]["message"]["content"]
        assert got.usage is not None
        assert got.usage.prompt_tokens == expected["usage"]["prompt_tokens"]
        assert got.usage.completion_tokens == expected["usage"]["completion_tokens"]
