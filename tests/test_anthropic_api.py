"""The official `anthropic` SDK against a live `lmx serve` with the real
SmolLM2: /v1/messages (plain and streamed), count_tokens, stop reasons,
Anthropic's error shape, and the x-api-key header the SDK authenticates with."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import jsonschema
import pytest

from tests.conftest import MODEL_ID, LMXServer, running_server

pytestmark = pytest.mark.timeout(180)

API_KEY = "anthropic-test-key"
SYSTEM = "You are a concise assistant."
QUESTION = [{"role": "user", "content": "Name three colours."}]
# This SDK no longer has a `temperature` argument; the API still takes it.
GREEDY = {"temperature": 0}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, model_file: Path) -> Iterator[LMXServer]:
    """The bundled model behind an inference API key (so every request here
    also proves the SDK's x-api-key header is accepted)."""
    with running_server(tmp_path_factory, "anthropic", links=[model_file],
                        models={"auto_load": [MODEL_ID]},
                        config={"security": {"inference_api_key": API_KEY}},
                        wait_for=[MODEL_ID]) as srv:
        yield srv


@pytest.fixture
def client(server: LMXServer) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=server.url, api_key=API_KEY, max_retries=0) as c:
        yield c


def _post(server: LMXServer, path: str, body: dict[str, Any], key: str = API_KEY
          ) -> httpx.Response:
    return server.http.post(path, json=body, headers={"x-api-key": key})


def _text(message: anthropic.types.Message) -> str:
    return "".join(b.text for b in message.content if b.type == "text")


def test_create_with_system_and_usage(client: anthropic.Anthropic) -> None:
    msg = client.messages.create(model=MODEL_ID, max_tokens=12, system=SYSTEM,
                                 messages=QUESTION, extra_body=GREEDY)  # type: ignore[arg-type]
    assert msg.type == "message" and msg.role == "assistant"
    assert msg.id.startswith("msg_")
    assert msg.model == MODEL_ID
    assert [b.type for b in msg.content] == ["text"]
    assert _text(msg).strip()
    assert msg.stop_reason in ("end_turn", "max_tokens")
    assert msg.stop_sequence is None
    assert msg.usage.input_tokens > 10
    assert 0 < msg.usage.output_tokens <= 12
    # System given as text blocks is the same prompt as the string.
    blocks = client.messages.create(
        model=MODEL_ID, max_tokens=12, extra_body=GREEDY, messages=QUESTION,  # type: ignore[arg-type]
        system=[{"type": "text", "text": SYSTEM}])
    assert _text(blocks) == _text(msg)
    assert blocks.usage.input_tokens == msg.usage.input_tokens


def test_multi_turn_and_max_tokens_stop(client: anthropic.Anthropic) -> None:
    first = client.messages.create(model=MODEL_ID, max_tokens=3, messages=QUESTION,  # type: ignore[arg-type]
                                   extra_body=GREEDY)
    assert first.stop_reason == "max_tokens"
    assert first.usage.output_tokens == 3
    follow = [*QUESTION, {"role": "assistant", "content": _text(first)},
              {"role": "user", "content": [{"type": "text", "text": "And one more?"}]}]
    second = client.messages.create(model=MODEL_ID, max_tokens=4, messages=follow,  # type: ignore[arg-type]
                                    extra_body=GREEDY)
    # The earlier turns are in the prompt.
    assert second.usage.input_tokens > first.usage.input_tokens + 5
    assert _text(second)


def test_stop_sequence(client: anthropic.Anthropic) -> None:
    free = client.messages.create(model=MODEL_ID, max_tokens=12, messages=QUESTION,  # type: ignore[arg-type]
                                  extra_body=GREEDY)
    text = _text(free)
    words = text.split()
    assert len(words) >= 4, text
    stop = words[2]
    cut = client.messages.create(model=MODEL_ID, max_tokens=12, messages=QUESTION,  # type: ignore[arg-type]
                                 extra_body=GREEDY, stop_sequences=["never-appears", stop])
    assert cut.stop_reason == "stop_sequence"
    assert cut.stop_sequence == stop
    assert _text(cut) == text[:text.index(stop)]


def test_stream_matches_create(client: anthropic.Anthropic) -> None:
    whole = client.messages.create(model=MODEL_ID, max_tokens=10, system=SYSTEM,
                                   messages=QUESTION, extra_body=GREEDY)  # type: ignore[arg-type]
    with client.messages.stream(model=MODEL_ID, max_tokens=10, system=SYSTEM,
                                messages=QUESTION, extra_body=GREEDY) as stream:  # type: ignore[arg-type]
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert len(pieces) > 1
    assert "".join(pieces) == _text(whole) == _text(final)
    assert final.stop_reason == whole.stop_reason
    assert final.usage.input_tokens == whole.usage.input_tokens
    assert final.usage.output_tokens == whole.usage.output_tokens


def test_stream_raw_event_order(server: LMXServer) -> None:
    body = {"model": MODEL_ID, "max_tokens": 6, "messages": QUESTION, "stream": True,
            "temperature": 0}
    events: list[tuple[str, dict[str, Any]]] = []
    with server.http.stream("POST", "/v1/messages", json=body,
                            headers={"x-api-key": API_KEY}) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        name = None
        for line in resp.iter_lines():
            if line.startswith("event: "):
                name = line[len("event: "):]
            elif line.startswith("data: "):
                data = json.loads(line[len("data: "):])
                assert name == data["type"]  # every event names its own type
                events.append((name, data))
                name = None
    names = [n for n, _ in events]
    deltas = names[3:-3]
    assert names[:3] == ["message_start", "content_block_start", "ping"]
    assert deltas and set(deltas) == {"content_block_delta"}
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    start = events[0][1]["message"]
    assert start["usage"]["input_tokens"] > 10 and start["content"] == []
    assert events[1][1]["content_block"] == {"type": "text", "text": ""}
    assert all(d["delta"]["type"] == "text_delta" for n, d in events if n in deltas)
    end = events[-2][1]
    assert end["delta"]["stop_reason"] == "max_tokens"
    assert end["usage"]["output_tokens"] == 6


def test_count_tokens_matches_usage(client: anthropic.Anthropic) -> None:
    counted = client.messages.count_tokens(model=MODEL_ID, system=SYSTEM, messages=QUESTION)  # type: ignore[arg-type]
    used = client.messages.create(model=MODEL_ID, max_tokens=1, system=SYSTEM,
                                  messages=QUESTION)  # type: ignore[arg-type]
    assert counted.input_tokens == used.usage.input_tokens > 10


def test_sdk_errors_in_anthropic_shape(server: LMXServer, client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.NotFoundError) as missing:
        client.messages.create(model="no-such-model", max_tokens=4, messages=QUESTION)  # type: ignore[arg-type]
    assert missing.value.body["type"] == "error"  # type: ignore[index]
    assert missing.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
    assert "no-such-model" in missing.value.body["error"]["message"]  # type: ignore[index]
    with (anthropic.Anthropic(base_url=server.url, api_key="wrong", max_retries=0) as bad,
          pytest.raises(anthropic.AuthenticationError) as denied):
        bad.messages.create(model=MODEL_ID, max_tokens=4, messages=QUESTION)  # type: ignore[arg-type]
    assert denied.value.body == {"type": "error", "error": {  # type: ignore[comparison-overlap]
        "type": "authentication_error", "message": "Invalid or missing API key"}}


TOOL = {"name": "get_weather", "description": "Weather for a city",
        "input_schema": {"type": "object", "properties": {"city": {"type": "string"}},
                         "required": ["city"]}}


@pytest.mark.parametrize(("body", "path", "named"), [
    ({"messages": QUESTION}, "/v1/messages", "max_tokens"),
    ({"max_tokens": 4, "messages": []}, "/v1/messages", "messages"),
    ({"max_tokens": 4, "messages": "hello"}, "/v1/messages", "messages"),
    ({"max_tokens": 4, "messages": [{"role": "user", "content": []}]}, "/v1/messages",
     "messages[0].content"),
    ({"max_tokens": "4", "messages": QUESTION}, "/v1/messages", "max_tokens"),
    ({"max_tokens": 0, "messages": QUESTION}, "/v1/messages", "max_tokens"),
    ({"max_tokens": 4, "messages": QUESTION, "temperature": 1.5}, "/v1/messages",
     "temperature"),
    ({"max_tokens": 4, "messages": [{"role": "system", "content": "x"}]}, "/v1/messages",
     "role"),
    ({"max_tokens": 4, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {}}]}]}, "/v1/messages", "type"),
    ({"max_tokens": 4, "messages": [{"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "toolu_x", "content": "1"}]}]},
     "/v1/messages", "tool_use_id"),
    ({"max_tokens": 4, "messages": QUESTION, "tools": [TOOL],
      "tool_choice": {"type": "tool", "name": "other"}}, "/v1/messages", "other"),
    ({"max_tokens": 4, "messages": QUESTION, "tool_choice": {"type": "any"}},
     "/v1/messages", "tool_choice"),
    ({"max_tokens": 4, "messages": QUESTION,
      "tools": [{**TOOL, "input_schema": {"type": "string"}}]}, "/v1/messages",
     "input_schema"),
    ({"max_tokens": 4, "messages": QUESTION, "tools": [{"name": "x"}]}, "/v1/messages",
     "input_schema"),
    ({"max_tokens": 4, "messages": [*QUESTION, {"role": "assistant", "content": "Sure"}]},
     "/v1/messages", "prefill"),
    ({"messages": QUESTION, "system": 5}, "/v1/messages/count_tokens", "system"),
    ({"messages": []}, "/v1/messages/count_tokens", "messages"),
])
def test_bad_requests_name_the_problem(server: LMXServer, body: dict[str, Any], path: str,
                                       named: str) -> None:
    resp = _post(server, path, {"model": MODEL_ID, **body})
    assert resp.status_code == 400, resp.text
    payload = resp.json()
    assert payload["type"] == "error"
    assert payload["error"]["type"] == "invalid_request_error"
    assert named in payload["error"]["message"]


def test_non_json_and_unknown_model_for_count(server: LMXServer) -> None:
    resp = server.http.post("/v1/messages", content=b"{not json",
                            headers={"x-api-key": API_KEY, "content-type": "application/json"})
    assert resp.status_code == 400
    assert resp.json()["error"]["type"] == "invalid_request_error"
    resp = _post(server, "/v1/messages/count_tokens", {"model": "nope", "messages": QUESTION})
    assert resp.status_code == 404
    assert resp.json()["error"]["type"] == "not_found_error"
    # Bearer works on these routes as well as x-api-key.
    resp = server.http.post("/v1/messages/count_tokens",
                            json={"model": MODEL_ID, "messages": QUESTION},
                            headers={"authorization": f"Bearer {API_KEY}"})
    assert resp.status_code == 200 and resp.json()["input_tokens"] > 0


# --- tools and structured output (constrained decoding) ---------------------------

WEATHER = {"name": "get_weather", "description": "Current weather for a city",
           "input_schema": {"type": "object", "additionalProperties": False,
                            "properties": {"city": {"type": "string"},
                                           "unit": {"type": "string", "enum": ["c", "f"]}},
                            "required": ["city", "unit"]}}
ASK_WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]
FORCE_WEATHER = {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True}


def test_forced_tool_use_and_tool_result_round_trip(client: anthropic.Anthropic) -> None:
    msg = client.messages.create(model=MODEL_ID, max_tokens=60, tools=[WEATHER],  # type: ignore[list-item]
                                 tool_choice=FORCE_WEATHER, messages=ASK_WEATHER,  # type: ignore[arg-type]
                                 extra_body=GREEDY)
    assert msg.stop_reason == "tool_use"
    uses = [b for b in msg.content if b.type == "tool_use"]
    assert len(uses) == 1 and uses[0].name == "get_weather"
    assert uses[0].id.startswith("toolu_")
    jsonschema.validate(uses[0].input, WEATHER["input_schema"])
    # The call and its result go back as the next turn's history.
    def turns(result: str) -> list[dict[str, Any]]:
        return [*ASK_WEATHER, {"role": "assistant", "content": msg.content},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": uses[0].id,
                                              "content": result}]}]
    answer = client.messages.create(model=MODEL_ID, max_tokens=4, tools=[WEATHER],  # type: ignore[list-item]
                                    messages=turns("18 degrees and sunny"),  # type: ignore[arg-type]
                                    extra_body=GREEDY)
    assert answer.usage.input_tokens > msg.usage.input_tokens + msg.usage.output_tokens
    short = client.messages.count_tokens(model=MODEL_ID, tools=[WEATHER],  # type: ignore[list-item]
                                         messages=turns("18 degrees and sunny"))  # type: ignore[arg-type]
    longer = client.messages.count_tokens(
        model=MODEL_ID, tools=[WEATHER], messages=turns("18 degrees and sunny, " * 5))  # type: ignore[list-item,arg-type]
    assert short.input_tokens == answer.usage.input_tokens
    assert longer.input_tokens > short.input_tokens + 10  # the result is in the prompt


def test_streamed_tool_use_events(server: LMXServer, client: anthropic.Anthropic) -> None:
    body = {"model": MODEL_ID, "max_tokens": 60, "tools": [WEATHER], "stream": True,
            "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
            "messages": ASK_WEATHER, **GREEDY}
    events: list[dict[str, Any]] = []
    with server.http.stream("POST", "/v1/messages", json=body,
                            headers={"x-api-key": API_KEY}) as resp:
        assert resp.status_code == 200
        events = [json.loads(line[len("data: "):]) for line in resp.iter_lines()
                  if line.startswith("data: ")]
    names = [e["type"] for e in events]
    assert names[:3] == ["message_start", "content_block_start", "ping"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(names[3:-3]) == {"content_block_delta"}
    block = events[1]["content_block"]
    assert block["type"] == "tool_use" and block["name"] == "get_weather"
    assert block["input"] == {}
    deltas = [e["delta"] for e in events[3:-3]]
    assert all(d["type"] == "input_json_delta" for d in deltas) and len(deltas) > 1
    arguments = json.loads("".join(d["partial_json"] for d in deltas))
    jsonschema.validate(arguments, WEATHER["input_schema"])
    assert events[-2]["delta"]["stop_reason"] == "tool_use"
    # The SDK assembles the same call from the same stream.
    with client.messages.stream(model=MODEL_ID, max_tokens=60, tools=[WEATHER],  # type: ignore[list-item]
                                tool_choice=body["tool_choice"], messages=ASK_WEATHER,  # type: ignore[arg-type]
                                extra_body=GREEDY) as stream:
        final = stream.get_final_message()
    assert [b.type for b in final.content] == ["tool_use"]
    assert final.content[0].input == arguments  # type: ignore[union-attr]


def test_output_config_json_schema(client: anthropic.Anthropic) -> None:
    schema = {"type": "object", "additionalProperties": False,
              "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
              "required": ["name", "age"]}
    msg = client.messages.create(model=MODEL_ID, max_tokens=40, extra_body=GREEDY,
                                 messages=[{"role": "user", "content": "Invent a person."}],
                                 output_config={"format": {"type": "json_schema",
                                                           "schema": schema}})
    assert msg.stop_reason == "end_turn"
    jsonschema.validate(json.loads(_text(msg)), schema)


@pytest.mark.parametrize(("body", "named"), [
    ({"tools": [{**WEATHER, "input_schema": {"type": "object", "properties": 5}}]},
     "tools[0].input_schema"),
    ({"tools": [{**WEATHER, "input_schema": {"type": "object", "properties": {
        "city": {"type": "strin"}}}}]}, "tools[0].input_schema"),
    ({"output_config": {"format": {"type": "json_schema", "schema": {"type": "wrong"}}}},
     "output_config.format.schema"),
    ({"output_config": {"format": {"type": "xml"}}}, "output_config.format.type"),
])
def test_invalid_schemas_are_refused(server: LMXServer, body: dict[str, Any],
                                     named: str) -> None:
    resp = _post(server, "/v1/messages", {"model": MODEL_ID, "max_tokens": 4,
                                          "messages": ASK_WEATHER, **body})
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["type"] == "invalid_request_error"
    assert named in resp.json()["error"]["message"]
