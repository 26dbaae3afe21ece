"""The MLX backend serving the bundled SmolLM2 converted from GGUF (real
worker, real model, official openai SDK): features, continuous batching
(batching does not change greedy tokens, an abort leaves batch mates alone,
16 streams complete) and the prefix cache (hits in the worker's stats, and a
follow-up turn's time to first token at most half a cold prompt's)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest

from tests.conftest import MLX_MODEL_ID, LMXServer, running_server
from tests.test_batching import SUBJECTS, Rows, assert_same_or_near_tie

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def mlx_server(tmp_path_factory: pytest.TempPathFactory, mlx_model_dir: Path) -> Any:
    with running_server(tmp_path_factory, "mlx-serve", links=[(MLX_MODEL_ID, mlx_model_dir)],
                        models={"auto_load": [MLX_MODEL_ID], "parallel_slots": 8,
                                "context_length": 1024, "max_concurrent_requests": 16},
                        wait_for=[MLX_MODEL_ID], timeout=180) as server:
        yield server


def stats(server: LMXServer) -> dict[str, Any]:
    worker: dict[str, Any] = server.admin_models()[MLX_MODEL_ID]["worker_stats"]
    return worker


def story(subject: str, max_tokens: int = 12) -> dict[str, Any]:
    return {"model": MLX_MODEL_ID, "temperature": 0, "max_tokens": max_tokens,
            "logprobs": True, "top_logprobs": 2,
            "messages": [{"role": "user", "content": f"Write a short story about a {subject}."}]}


async def greedy_rows(client: openai.AsyncOpenAI, body: dict[str, Any]) -> Rows:
    resp = await client.chat.completions.create(**body)
    logprobs = resp.choices[0].logprobs
    assert logprobs is not None and logprobs.content is not None
    return [row.model_dump() for row in logprobs.content]


def async_client(server: LMXServer) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0,
                              timeout=180)


def test_serves_converted_model_on_mlx(mlx_server: LMXServer) -> None:
    row = mlx_server.admin_models()[MLX_MODEL_ID]
    assert row["backend"] == "mlx"
    client = mlx_server.openai()
    resp = client.chat.completions.create(
        model=MLX_MODEL_ID, temperature=0, max_tokens=16,
        messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert "Paris" in (resp.choices[0].message.content or "")
    assert resp.usage is not None and resp.usage.prompt_tokens == 37  # SmolLM2's template
    assert resp.choices[0].finish_reason == "stop"
    # A seed makes sampling reproducible; a stop string cuts the text.
    texts = [client.completions.create(model=MLX_MODEL_ID, prompt="Once upon a time",
                                       max_tokens=10, temperature=0.9, seed=7).choices[0].text
             for _ in range(2)]
    assert texts[0] == texts[1] and texts[0]
    stopped = client.completions.create(model=MLX_MODEL_ID, prompt="Count: 1, 2, 3,",
                                        max_tokens=20, temperature=0, stop=["6"])
    assert stopped.choices[0].finish_reason == "stop"
    assert "6" not in stopped.choices[0].text and "5" in stopped.choices[0].text


def test_batching_does_not_change_greedy_tokens(mlx_server: LMXServer) -> None:
    async def run() -> tuple[list[Rows], list[Rows]]:
        async with async_client(mlx_server) as client:
            alone = [await greedy_rows(client, story(s)) for s in SUBJECTS]
            together = await asyncio.gather(*(greedy_rows(client, story(s)) for s in SUBJECTS))
            return alone, list(together)

    alone, together = asyncio.run(run())
    for a, b in zip(alone, together, strict=True):
        assert len(a) == 12
        assert_same_or_near_tie(a, b)


def test_abort_mid_batch_leaves_others_untouched(mlx_server: LMXServer) -> None:
    async def run() -> tuple[list[Rows], list[Rows]]:
        async with async_client(mlx_server) as client:
            alone = [await greedy_rows(client, story(s, 16)) for s in SUBJECTS[:3]]

            async def abandoned() -> None:
                stream = await client.chat.completions.create(
                    model=MLX_MODEL_ID, stream=True, max_tokens=400, temperature=0,
                    extra_body={"ignore_eos": True},
                    messages=[{"role": "user", "content": "Write a story about a volcano."}])
                seen = 0
                async for chunk in stream:
                    seen += bool(chunk.choices and chunk.choices[0].delta.content)
                    if seen >= 3:
                        break
                await stream.close()  # drops the connection: the server aborts

            results = await asyncio.gather(
                abandoned(), *(greedy_rows(client, story(s, 16)) for s in SUBJECTS[:3]))
            return alone, [r for r in results if isinstance(r, list)]

    before = stats(mlx_server)["requests_aborted"]
    alone, batched = asyncio.run(run())
    assert len(batched) == 3
    for a, b in zip(alone, batched, strict=True):
        assert_same_or_near_tie(a, b)
    assert stats(mlx_server)["requests_aborted"] == before + 1


def test_sixteen_concurrent_streams_complete(mlx_server: LMXServer) -> None:
    async def one(client: openai.AsyncOpenAI, i: int) -> tuple[str, str | None]:
        stream = await client.chat.completions.create(
            model=MLX_MODEL_ID, stream=True, max_tokens=8, temperature=0.7, seed=i,
            extra_body={"ignore_eos": True},
            messages=[{"role": "user", "content": f"Tell me about {SUBJECTS[i % 8]}s."}])
        text, finish = "", None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
        return text, finish

    async def run() -> list[tuple[str, str | None]]:
        async with async_client(mlx_server) as client:
            return list(await asyncio.gather(*(one(client, i) for i in range(16))))

    results = asyncio.run(run())
    assert [finish for _, finish in results] == ["length"] * 16
    assert all(text for text, _ in results)


LONG_TEXT = " ".join(
    f"Note {i}: the {w} in the {place} was {adj}."
    for i, (w, place, adj) in enumerate(
        (w, p, a) for w in ("lamp", "clock", "kettle", "mirror", "ladder", "violin")
        for p in ("hall", "attic", "garden", "kitchen") for a in ("blue", "old")))


def time_to_first_token(client: openai.OpenAI, messages: list[dict[str, str]]) -> float:
    started = time.perf_counter()
    stream = client.chat.completions.create(model=MLX_MODEL_ID, stream=True, max_tokens=2,
                                            temperature=0, messages=messages)  # type: ignore[arg-type]
    first = None
    for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - started
    stream.close()
    assert first is not None
    return first


def test_follow_up_turn_reuses_prefix_cache(mlx_server: LMXServer) -> None:
    client = mlx_server.openai()
    history = [{"role": "system", "content": "You keep notes."},
               {"role": "user", "content": f"{LONG_TEXT} Which note mentions a violin?"}]
    first = client.chat.completions.create(model=MLX_MODEL_ID, max_tokens=12, temperature=0,
                                           messages=history)  # type: ignore[arg-type]
    assert first.usage is not None and first.usage.prompt_tokens > 400
    cached_before = stats(mlx_server)["prompt_tokens_cached"]
    history += [{"role": "assistant", "content": first.choices[0].message.content or ""},
                {"role": "user", "content": "And which one mentions a kettle?"}]
    warm = time_to_first_token(client, history)
    cached = stats(mlx_server)["prompt_tokens_cached"] - cached_before
    # The whole first turn (prompt and reply) came from the cache.
    assert cached >= first.usage.prompt_tokens + first.usage.completion_tokens - 1
    # As long, and parting from everything cached a few tokens in.
    cold_history = [{"role": "system", "content": "You keep lists."}, *history[1:]]
    cold = time_to_first_token(client, cold_history)
    assert warm <= cold / 2, f"warm TTFT {warm:.3f}s vs cold {cold:.3f}s"


CITY = {"type": "object",
        "properties": {"city": {"type": "string", "maxLength": 20},
                       "population": {"type": "integer", "minimum": 0,
                                      "maximum": 100_000_000}},
        "required": ["city", "population"]}
WEATHER_TOOL: Any = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}


def test_structured_output_and_tool_call_in_one_batch(mlx_server: LMXServer) -> None:
    """Grammar-constrained requests decode in the same batch as a free one."""
    fmt: Any = {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY}}

    async def run() -> list[Any]:
        async with async_client(mlx_server) as client:
            jobs: list[Any] = [client.chat.completions.create(
                model=MLX_MODEL_ID, response_format=fmt, max_tokens=64, temperature=0.9,
                seed=i, messages=[{"role": "user", "content": "Name a big city."}])
                for i in range(3)]
            jobs.append(client.chat.completions.create(
                model=MLX_MODEL_ID, max_tokens=48, temperature=0, tools=[WEATHER_TOOL],
                tool_choice={"type": "function", "function": {"name": "get_weather"}},
                messages=[{"role": "user", "content": "What's the weather in Paris?"}]))
            jobs.append(client.chat.completions.create(
                model=MLX_MODEL_ID, max_tokens=8, temperature=0,
                messages=[{"role": "user", "content": "Say hello."}]))
            return list(await asyncio.gather(*jobs))

    *structured, tool, free = asyncio.run(run())
    for resp in structured:
        assert resp.choices[0].finish_reason == "stop"
        value = json.loads(resp.choices[0].message.content or "")
        jsonschema.validate(value, CITY)
    call = tool.choices[0].message.tool_calls
    assert call and call[0].function.name == "get_weather"
    assert "city" in json.loads(call[0].function.arguments)
    assert free.choices[0].message.content
