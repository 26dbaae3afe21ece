"""The official `openai` SDK's Responses client against a live `lmx serve`
with the real SmolLM2: create, instructions, previous_response_id chaining
through the in-memory store, retrieve/delete, streaming events, bad input."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import openai
import pytest

from tests.conftest import MODEL_ID, LMXServer

pytestmark = pytest.mark.timeout(180)

SHORT = "Answer yes or no: is the sky blue?"  # SmolLM2 answers in two tokens and stops


def test_create_string_input_and_instructions(shared_server: LMXServer) -> None:
    client = shared_server.openai()
    resp = client.responses.create(model=MODEL_ID, input=SHORT, max_output_tokens=16,
                                   temperature=0)
    assert resp.id.startswith("resp_") and resp.object == "response"
    assert resp.model == MODEL_ID
    assert resp.status == "completed" and resp.incomplete_details is None
    assert [item.type for item in resp.output] == ["message"]
    assert resp.output_text.strip()
    assert resp.usage is not None
    assert resp.usage.input_tokens > 5 and resp.usage.output_tokens > 0
    assert resp.usage.total_tokens == resp.usage.input_tokens + resp.usage.output_tokens
    cut = client.responses.create(model=MODEL_ID, input="Tell me a long story.",
                                  max_output_tokens=3, temperature=0,
                                  instructions="You are a pirate. Talk like one.")
    assert cut.status == "incomplete"
    assert cut.incomplete_details is not None
    assert cut.incomplete_details.reason == "max_output_tokens"
    assert cut.usage is not None and cut.usage.output_tokens == 3
    assert cut.instructions == "You are a pirate. Talk like one."
    plain = client.responses.create(model=MODEL_ID, input="Tell me a long story.",
                                    max_output_tokens=1, temperature=0)
    assert plain.usage is not None
    # The instructions replaced the template's default system prompt: a different prompt.
    assert cut.usage.input_tokens != plain.usage.input_tokens


def test_previous_response_id_chains_turns(shared_server: LMXServer) -> None:
    client = shared_server.openai()
    first = client.responses.create(model=MODEL_ID, input="My name is Ada.",
                                    max_output_tokens=6, temperature=0)
    second = client.responses.create(model=MODEL_ID, input="What is my name?",
                                     previous_response_id=first.id, max_output_tokens=4,
                                     temperature=0)
    assert first.usage is not None and second.usage is not None
    assert second.previous_response_id == first.id
    # The second prompt holds the first turn's input and output, then the new question.
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
    # ...exactly as if the client had sent the whole conversation itself.
    explicit = client.responses.create(
        model=MODEL_ID, max_output_tokens=4, temperature=0, store=False,
        input=[{"role": "user", "content": "My name is Ada."},
               {"type": "message", "role": "assistant",
                "content": [{"type": "output_text", "text": first.output_text}]},
               {"role": "user", "content": [{"type": "input_text",
                                             "text": "What is my name?"}]}])
    assert explicit.usage is not None
    assert explicit.usage.input_tokens == second.usage.input_tokens
    # Stored responses can be read back and deleted; store=False ones are not kept.
    fetched = client.responses.retrieve(second.id)
    assert fetched.id == second.id and fetched.output_text == second.output_text
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(explicit.id)
    client.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError) as gone:
        client.responses.create(model=MODEL_ID, input="Again?", previous_response_id=first.id,
                                max_output_tokens=2)
    assert gone.value.code == "previous_response_not_found"
    assert first.id in gone.value.message


def test_stream_events_in_order(shared_server: LMXServer) -> None:
    client = shared_server.openai()
    with client.responses.stream(model=MODEL_ID, input="What is 2+2? Answer with a number "
                                 "only.", max_output_tokens=16, temperature=0) as stream:
        events = list(stream)
        final = stream.get_final_response()
    types = [e.type for e in events]
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    head = ["response.created", "response.in_progress", "response.output_item.added",
            "response.content_part.added"]
    tail = ["response.output_text.done", "response.content_part.done",
            "response.output_item.done", "response.completed"]
    assert types[:4] == head and types[-4:] == tail
    assert set(types[4:-4]) == {"response.output_text.delta"} and len(deltas) > 1
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(deltas)
    done = next(e for e in events if e.type == "response.output_text.done")
    assert done.text == text == final.output_text
    assert final.status == "completed" and final.usage is not None
    assert final.usage.output_tokens >= len(deltas)
    whole = client.responses.create(model=MODEL_ID, input="What is 2+2? Answer with a number "
                                    "only.", max_output_tokens=16, temperature=0)
    assert whole.output_text == text
    # A streamed response is stored like any other.
    assert client.responses.retrieve(final.id).output_text == text


def test_stream_cut_by_max_output_tokens_ends_incomplete(shared_server: LMXServer) -> None:
    body = {"model": MODEL_ID, "input": "Tell me a long story.", "max_output_tokens": 2,
            "stream": True}
    events: list[dict[str, Any]] = []
    with shared_server.http.stream("POST", "/v1/responses", json=body) as resp:
        assert resp.status_code == 200
        name = None
        for line in resp.iter_lines():
            if line.startswith("event: "):
                name = line[len("event: "):]
            elif line.startswith("data: "):
                data = json.loads(line[len("data: "):])
                assert data["type"] == name
                events.append(data)
    assert events[-1]["type"] == "response.incomplete"
    assert events[-1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    assert events[-1]["response"]["usage"]["output_tokens"] == 2


TOOLS = [{"type": "function", "name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]


@pytest.mark.parametrize(("body", "status", "named"), [
    ({"input": []}, 400, "input"),
    ({"input": 5}, 400, "input"),
    ({}, 400, "input"),
    ({"input": "hi", "max_output_tokens": 0}, 400, "max_output_tokens"),
    ({"input": "hi", "max_output_tokens": "8"}, 400, "max_output_tokens"),
    ({"input": "hi", "temperature": 3}, 400, "temperature"),
    ({"input": [{"type": "input_image", "image_url": "x"}]}, 400, "input[0].type"),
    ({"input": [{"role": "user", "content": [{"type": "input_image"}]}]}, 400,
     "input[0].content[0].type"),
    ({"input": [{"role": "robot", "content": "hi"}]}, 400, "input[0].role"),
    ({"input": [{"type": "function_call_output", "call_id": "call_x", "output": "1"}]}, 400,
     "call_x"),
    ({"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]}, 400, "call_id"),
    ({"input": "hi", "tools": TOOLS, "tool_choice": {"type": "function", "name": "nope"}},
     400, "nope"),
    ({"input": "hi", "tool_choice": "required"}, 400, "tool_choice"),
    ({"input": "hi", "tools": [{"type": "web_search"}]}, 400, "tools"),
    ({"input": "hi", "text": {"format": {"type": "json_schema", "name": "x"}}}, 400,
     "schema"),
    ({"input": "hi", "text": {"format": {"type": "yaml"}}}, 400, "format"),
    ({"input": "hi", "previous_response_id": "resp_unknown"}, 404, "resp_unknown"),
])
def test_bad_requests_name_the_problem(shared_server: LMXServer, body: dict[str, Any],
                                       status: int, named: str) -> None:
    resp = shared_server.http.post("/v1/responses", json={"model": MODEL_ID, **body})
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert named in f"{error['message']} {error['param']}"


def test_unknown_ids_and_model(shared_server: LMXServer) -> None:
    assert shared_server.http.get("/v1/responses/resp_nope").status_code == 404
    assert shared_server.http.delete("/v1/responses/resp_nope").status_code == 404
    resp = shared_server.http.post("/v1/responses", json={"model": "nope", "input": "hi"})
    assert resp.status_code == 404
    assert resp.json()["error"]["code"] == "model-not-found"


# --- function tools and text.format (constrained decoding) ------------------------

WEATHER = {"type": "function", "name": "get_weather", "description": "Weather for a city",
           "parameters": {"type": "object", "additionalProperties": False,
                          "properties": {"city": {"type": "string"}}, "required": ["city"]}}
ASK = "What is the weather in Paris?"


def test_function_call_and_output_round_trip(shared_server: LMXServer) -> None:
    client = shared_server.openai()
    first = client.responses.create(model=MODEL_ID, input=ASK, tools=[WEATHER],  # type: ignore[list-item]
                                    tool_choice={"type": "function", "name": "get_weather"},
                                    parallel_tool_calls=False, max_output_tokens=40,
                                    temperature=0)
    assert first.status == "completed"
    calls = [o for o in first.output if o.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather"
    assert calls[0].call_id.startswith("call_") and calls[0].id.startswith("fc_")
    jsonschema.validate(json.loads(calls[0].arguments), WEATHER["parameters"])
    second = client.responses.create(
        model=MODEL_ID, previous_response_id=first.id, tools=[WEATHER],  # type: ignore[list-item]
        input=[{"type": "function_call_output", "call_id": calls[0].call_id,
                "output": "18 degrees and sunny"}], max_output_tokens=2, temperature=0)
    assert first.usage is not None and second.usage is not None
    # The call and its output are in the second prompt.
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
    assert [o.type for o in second.output] == ["message"]


def test_streamed_function_call_events(shared_server: LMXServer) -> None:
    client = shared_server.openai()
    with client.responses.stream(model=MODEL_ID, input=ASK, tools=[WEATHER],  # type: ignore[list-item]
                                 tool_choice="required", parallel_tool_calls=False,
                                 max_output_tokens=40, temperature=0) as stream:
        events = list(stream)
        final = stream.get_final_response()
    types = [e.type for e in events]
    assert types[:3] == ["response.created", "response.in_progress",
                         "response.output_item.added"]
    assert types[-3:] == ["response.function_call_arguments.done",
                          "response.output_item.done", "response.completed"]
    assert set(types[3:-3]) == {"response.function_call_arguments.delta"}
    assert [e.sequence_number for e in events] == list(range(len(events)))
    added = events[2].item  # type: ignore[union-attr]
    assert added.type == "function_call" and added.name == "get_weather"
    arguments = "".join(e.delta for e in events  # type: ignore[union-attr]
                        if e.type == "response.function_call_arguments.delta")
    jsonschema.validate(json.loads(arguments), WEATHER["parameters"])
    assert [o.type for o in final.output] == ["function_call"]
    assert final.output[0].arguments == arguments  # type: ignore[union-attr]


def test_text_format_json_schema(shared_server: LMXServer) -> None:
    schema = {"type": "object", "additionalProperties": False,
              "properties": {"name": {"type": "string"},
                             "colour": {"type": "string", "enum": ["red", "blue"]}},
              "required": ["name", "colour"]}
    client = shared_server.openai()
    resp = client.responses.create(model=MODEL_ID, input="Invent a person.", temperature=0,
                                   max_output_tokens=40,
                                   text={"format": {"type": "json_schema", "name": "person",
                                                    "schema": schema, "strict": True}})
    assert resp.status == "completed"
    jsonschema.validate(json.loads(resp.output_text), schema)
    assert resp.text is not None and resp.text.format is not None
    assert resp.text.format.type == "json_schema"


@pytest.mark.parametrize(("body", "named"), [
    ({"tools": [{**WEATHER, "parameters": {"type": "object", "properties": 5}}]},
     "tools[0].parameters"),
    ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "wrong"}}}},
     "text.format"),
])
def test_invalid_schemas_are_refused(shared_server: LMXServer, body: dict[str, Any],
                                     named: str) -> None:
    resp = shared_server.http.post("/v1/responses",
                                   json={"model": MODEL_ID, "input": "hi", **body})
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert named in error["message"] and named in str(error["param"])
