"""Anthropic Messages and Responses on the MLX backend (the bundled SmolLM2
converted from GGUF): the pieces the engine itself provides — count_only
token counts, the matched stop string, the prompt size on the first streamed
token, constrained tool calls — reach both APIs as they do on llama.cpp."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import jsonschema
import pytest

from tests.conftest import MLX_MODEL_ID, LMXServer, running_server

pytest.importorskip("mlx.core")
pytestmark = pytest.mark.timeout(300)

QUESTION = [{"role": "user", "content": "Name three colours."}]
GREEDY = {"temperature": 0}
WEATHER = {"name": "get_weather", "description": "Current weather for a city",
           "input_schema": {"type": "object", "additionalProperties": False,
                            "properties": {"city": {"type": "string"}}, "required": ["city"]}}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, mlx_model_dir: Path
           ) -> Iterator[LMXServer]:
    with running_server(tmp_path_factory, "translated-mlx", links=[(MLX_MODEL_ID, mlx_model_dir)],
                        models={"auto_load": [MLX_MODEL_ID], "context_length": 1024},
                        wait_for=[MLX_MODEL_ID], timeout=180) as srv:
        yield srv


def test_anthropic_messages_on_mlx(server: LMXServer) -> None:
    with anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0) as client:
        free = client.messages.create(model=MLX_MODEL_ID, max_tokens=10, messages=QUESTION,  # type: ignore[arg-type]
                                      extra_body=GREEDY)
        counted = client.messages.count_tokens(model=MLX_MODEL_ID, messages=QUESTION)  # type: ignore[arg-type]
        assert counted.input_tokens == free.usage.input_tokens > 10
        text = "".join(b.text for b in free.content if b.type == "text")
        stop = text.split()[1]
        cut = client.messages.create(model=MLX_MODEL_ID, max_tokens=10, messages=QUESTION,  # type: ignore[arg-type]
                                     stop_sequences=[stop], extra_body=GREEDY)
        assert (cut.stop_reason, cut.stop_sequence) == ("stop_sequence", stop)
        forced = client.messages.create(
            model=MLX_MODEL_ID, max_tokens=40, tools=[WEATHER],  # type: ignore[list-item]
            tool_choice={"type": "tool", "name": "get_weather",
                         "disable_parallel_tool_use": True},
            messages=[{"role": "user", "content": "Weather in Rome?"}], extra_body=GREEDY)
        assert forced.stop_reason == "tool_use"
        uses = [b for b in forced.content if b.type == "tool_use"]
        assert len(uses) == 1
        jsonschema.validate(uses[0].input, WEATHER["input_schema"])
    body = {"model": MLX_MODEL_ID, "max_tokens": 3, "messages": QUESTION, "stream": True}
    with server.http.stream("POST", "/v1/messages", json=body) as resp:
        events = [json.loads(line[6:]) for line in resp.iter_lines()
                  if line.startswith("data: ")]
    assert events[0]["message"]["usage"]["input_tokens"] == counted.input_tokens
    assert events[-2]["usage"] == {"input_tokens": counted.input_tokens, "output_tokens": 3}


def test_responses_chaining_on_mlx(server: LMXServer) -> None:
    client = server.openai()
    first = client.responses.create(model=MLX_MODEL_ID, input="My name is Ada.",
                                    max_output_tokens=4, temperature=0)
    second = client.responses.create(model=MLX_MODEL_ID, input="What is my name?",
                                     previous_response_id=first.id, max_output_tokens=2,
                                     temperature=0)
    assert first.usage is not None and second.usage is not None
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
    events: list[Any] = []
    with client.responses.stream(model=MLX_MODEL_ID, input="Say hi.", max_output_tokens=3,
                                 temperature=0) as stream:
        events = list(stream)
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert events[-1].type == "response.incomplete"
    assert events[-1].response.output_text == deltas
