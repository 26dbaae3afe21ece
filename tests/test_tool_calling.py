"""Tool calling on /v1/chat/completions through the openai SDK, against a
live server with SmolLM2-135M (whose template knows no tools: LMX describes
them in a system prompt and reads Hermes-style calls back). `required` and
named tool_choice are enforced by constrained decoding, so even this model
returns calls whose arguments validate."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from tests.conftest import MODEL_ID, LMXServer, running_server

pytestmark = pytest.mark.timeout(600)

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 30},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "unit", "days"],
}
ADD = {
    "type": "object",
    "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
    "required": ["a", "b"],
}
TOOLS: Any = [
    {"type": "function", "function": {"name": "get_weather",
                                      "description": "Weather forecast for a city",
                                      "parameters": WEATHER}},
    {"type": "function", "function": {"name": "add", "description": "Add two integers",
                                      "parameters": ADD}},
]
SCHEMAS = {"get_weather": WEATHER, "add": ADD}
WEATHER_Q: Any = [{"role": "user", "content": "What will the weather be in Paris tomorrow?"}]
MARKUP = ("<tool_call>", "</tool_call>", '"arguments"', "<tool")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, model_file: Path) -> Iterator[LMXServer]:
    with running_server(tmp_path_factory, "tools", links=[model_file],
                        models={"auto_load": [MODEL_ID], "parallel_slots": 4,
                                "max_concurrent_requests": 4, "semaphore_timeout_sec": 400,
                                "inference_timeout_sec": 400},
                        wait_for=[MODEL_ID]) as lmx:
        yield lmx


def _check_call(call: Any, name: str | None = None) -> dict[str, Any]:
    assert call.type == "function"
    assert call.id.startswith("call_")
    assert call.function.name in SCHEMAS
    if name is not None:
        assert call.function.name == name
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, SCHEMAS[call.function.name])
    return dict(arguments)


def test_named_tool_choice(server: LMXServer) -> None:
    resp = server.openai().chat.completions.create(
        model=MODEL_ID, messages=[{"role": "user", "content": "What is 2 plus 40?"}],
        tools=TOOLS, tool_choice={"type": "function", "function": {"name": "add"}},
        max_tokens=60, temperature=0)
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    calls = choice.message.tool_calls or []
    assert len(calls) == 1  # a named function is called once
    _check_call(calls[0], "add")


def _reassemble(stream: Any) -> tuple[str, dict[int, dict[str, str]], str | None]:
    content, calls, finish = "", {}, None
    for chunk in stream:
        if not chunk.choices:
            continue
        delta, finish = chunk.choices[0].delta, chunk.choices[0].finish_reason or finish
        content += delta.content or ""
        for piece in delta.tool_calls or []:
            if piece.index not in calls:
                # The first delta of a call carries its id, type and name.
                assert piece.id and piece.id.startswith("call_")
                assert piece.type == "function"
                assert piece.function and piece.function.name
                calls[piece.index] = {"id": piece.id, "name": piece.function.name,
                                      "arguments": piece.function.arguments or ""}
            else:
                assert piece.id is None and (piece.function is None or not piece.function.name)
                calls[piece.index]["arguments"] += (piece.function.arguments or ""
                                                    if piece.function else "")
    return content, calls, finish


def test_required_streamed(server: LMXServer) -> None:
    stream = server.openai().chat.completions.create(
        model=MODEL_ID, messages=WEATHER_Q, tools=TOOLS, tool_choice="required",
        parallel_tool_calls=False, max_tokens=80, temperature=0, stream=True)
    content, calls, finish = _reassemble(stream)
    assert finish == "tool_calls"
    assert not any(mark in content for mark in MARKUP), content
    assert content.strip() == ""
    assert list(calls) == [0]
    arguments = json.loads(calls[0]["arguments"])
    jsonschema.validate(arguments, SCHEMAS[calls[0]["name"]])


def test_required_parallel_and_sampled(server: LMXServer) -> None:
    """Several sampled requests at once (batched), parallel calls allowed:
    every complete call is valid; the stream never shows markup."""
    client = server.openai(timeout=400)

    def one(seed: int) -> Any:
        return client.chat.completions.create(
            model=MODEL_ID, messages=WEATHER_Q, tools=TOOLS, tool_choice="required",
            max_tokens=60, temperature=0.8, seed=seed)

    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(one, range(3)))
    for resp in results:
        choice = resp.choices[0]
        calls = choice.message.tool_calls or []
        assert calls, choice
        assert choice.finish_reason in ("tool_calls", "length")
        complete = calls if choice.finish_reason == "tool_calls" else calls[:-1]
        for call in complete:
            _check_call(call)
        assert len({c.id for c in calls}) == len(calls)
        assert not any(mark in (choice.message.content or "") for mark in MARKUP)


def test_round_trip(server: LMXServer) -> None:
    """Assistant tool_calls and a tool result go back through the template
    and the model answers."""
    client = server.openai()
    first = client.chat.completions.create(
        model=MODEL_ID, messages=WEATHER_Q, tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=60, temperature=0)
    call = (first.choices[0].message.tool_calls or [])[0]
    _check_call(call, "get_weather")
    history: Any = [
        *WEATHER_Q,
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id,
         "content": json.dumps({"forecast": "sunny", "high": 24})},
    ]
    final = client.chat.completions.create(model=MODEL_ID, messages=history, tools=TOOLS,
                                           max_tokens=30, temperature=0)
    assert final.choices[0].finish_reason in ("stop", "length", "tool_calls")
    message = final.choices[0].message
    assert message.content or message.tool_calls
    for c in message.tool_calls or []:
        assert c.function.name in SCHEMAS
    # The call and its result were in the prompt.
    assert first.usage is not None and final.usage is not None
    assert final.usage.prompt_tokens > first.usage.prompt_tokens + 20
    # Without tools offered the same history still renders (calls as text).
    plain = client.chat.completions.create(model=MODEL_ID, messages=history, max_tokens=8,
                                           temperature=0)
    assert plain.choices[0].message.tool_calls is None


def test_auto_and_none(server: LMXServer) -> None:
    client = server.openai()
    resp = client.chat.completions.create(model=MODEL_ID, messages=WEATHER_Q, tools=TOOLS,
                                          tool_choice="auto", max_tokens=40, temperature=0)
    choice = resp.choices[0]
    assert choice.finish_reason in ("stop", "length", "tool_calls")
    assert choice.message.content or choice.message.tool_calls
    if choice.message.tool_calls and choice.finish_reason == "tool_calls":
        for call in choice.message.tool_calls:
            _check_call(call)
    content, calls, finish = _reassemble(client.chat.completions.create(
        model=MODEL_ID, messages=WEATHER_Q, tools=TOOLS, max_tokens=40, temperature=0,
        stream=True))
    assert finish == choice.finish_reason
    assert content == (choice.message.content or "")
    assert len(calls) == len(choice.message.tool_calls or [])
    none = client.chat.completions.create(model=MODEL_ID, messages=WEATHER_Q, tools=TOOLS,
                                          tool_choice="none", max_tokens=12, temperature=0)
    assert none.choices[0].message.tool_calls is None
    assert none.choices[0].finish_reason in ("stop", "length")


def _fn(name: Any = "f", parameters: Any = None) -> dict[str, Any]:
    function: dict[str, Any] = {"name": name} if name is not None else {}
    if parameters is not None:
        function["parameters"] = parameters
    return {"type": "function", "function": function}


@pytest.mark.parametrize(("extra", "param", "needle"), [
    ({"tools": {"type": "function"}}, "tools", "list"),
    ({"tools": ["get_weather"]}, "tools[0]", "object"),
    ({"tools": [{"type": "function"}]}, "tools[0].function", "function"),
    ({"tools": [_fn(name=None)]}, "tools[0].function.name", "name"),
    ({"tools": [_fn(name="has space")]}, "tools[0].function.name", "name"),
    ({"tools": [_fn(), _fn()]}, "tools[1].function.name", "two tools"),
    ({"tools": [{"type": "retrieval"}]}, "tools[0].type", "function"),
    ({"tools": [_fn(parameters="object")]}, "tools[0].function.parameters", "schema"),
    ({"tools": [_fn(), _fn("g", {"type": "objekt"})]}, "tools[1].function.parameters",
     "objekt"),
    ({"tools": [_fn(parameters={"type": "object", "not": {}})]},
     "tools[0].function.parameters", "not"),
    ({"tools": [_fn()], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice", "nope"),
    ({"tools": [_fn()], "tool_choice": "sometimes"}, "tool_choice", "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice", "tools"),
    ({"tools": [_fn()], "parallel_tool_calls": "yes"}, "parallel_tool_calls", "boolean"),
])
def test_bad_tool_requests(server: LMXServer, extra: dict[str, Any], param: str,
                           needle: str) -> None:
    resp = server.http.post("/v1/chat/completions", json={
        "model": MODEL_ID, "messages": WEATHER_Q, "max_tokens": 4, **extra})
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["param"] == param
    assert needle in error["message"]


def test_tools_refused_on_completions(server: LMXServer) -> None:
    resp = server.http.post("/v1/completions", json={
        "model": MODEL_ID, "prompt": "x", "max_tokens": 4, "tools": [_fn()]})
    assert resp.status_code == 400
    assert resp.json()["error"]["param"] == "tools"
