"""Ollama's API through the official `ollama` Python client, against a real
server with the real SmolLM2 (and MiniLM for embeddings, and a loopback
fake hub for pull)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import jsonschema
import numpy as np
import ollama
import pytest

from tests.conftest import MODEL_ID, LMXServer, base_config, wait_until
from tests.encoder_fixtures import cosine, minilm_dir, reference
from tests.fake_hub import FakeHub, HubFile

pytestmark = pytest.mark.timeout(300)

MINILM = "all-MiniLM-L6-v2"
MESSAGES = [{"role": "user", "content": "Name three colours."}]
GREEDY = {"temperature": 0, "num_predict": 12}


@pytest.fixture(scope="module")
def hub() -> Iterator[FakeHub]:
    server = FakeHub().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, model_file: Path, hub: FakeHub
           ) -> Iterator[LMXServer]:
    root = tmp_path_factory.mktemp("ollama")
    models = root / "models"
    models.mkdir()
    (models / model_file.name).symlink_to(model_file)
    (models / MINILM).symlink_to(minilm_dir())
    env = {"HF_ENDPOINT": hub.url, "HF_HUB_CACHE": str(root / "hf-cache"),
           "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_OFFLINE": "0"}
    lmx = LMXServer(root, base_config(models, auto_load=[MODEL_ID]), env=env)
    lmx.wait_ready(MODEL_ID)
    yield lmx
    lmx.stop()


@pytest.fixture
def client(server: LMXServer) -> Iterator[ollama.Client]:
    c = ollama.Client(host=server.url, timeout=120)
    yield c
    c._client.close()


def test_chat_streamed_and_not_equals_openai(server: LMXServer, client: ollama.Client) -> None:
    whole = client.chat(model=MODEL_ID, messages=MESSAGES, options=GREEDY, stream=False)
    assert whole.done and whole.done_reason in ("stop", "length")
    assert whole.message.role == "assistant" and whole.message.content
    assert whole.eval_count and 0 < whole.eval_count <= 12
    parts = list(client.chat(model=MODEL_ID, messages=MESSAGES, options=GREEDY, stream=True))
    assert len(parts) > 2 and parts[-1].done and not any(p.done for p in parts[:-1])
    assert "".join(p.message.content or "" for p in parts) == whole.message.content
    assert parts[-1].eval_count == whole.eval_count
    # The same request through /v1: the same greedy text and prompt size.
    openai_answer = server.openai().chat.completions.create(
        model=MODEL_ID, messages=MESSAGES, max_tokens=12, temperature=0)  # type: ignore[arg-type]
    assert openai_answer.choices[0].message.content == whole.message.content
    assert openai_answer.usage is not None
    assert whole.prompt_eval_count == openai_answer.usage.prompt_tokens
    # name:tag spelling of the same model.
    tagged = client.chat(model=MODEL_ID + ":latest", messages=MESSAGES, options=GREEDY)
    assert tagged.message.content == whole.message.content


def test_generate(client: ollama.Client) -> None:
    whole = client.generate(model=MODEL_ID, prompt="Name three colours.", options=GREEDY)
    chat = client.chat(model=MODEL_ID, messages=MESSAGES, options=GREEDY)
    assert whole.response == chat.message.content  # templated like a chat turn
    parts = list(client.generate(model=MODEL_ID, prompt="Name three colours.", options=GREEDY,
                                 stream=True))
    assert "".join(p.response for p in parts) == whole.response and parts[-1].done
    raw = client.generate(model=MODEL_ID, prompt="The capital of France is", raw=True,
                          options={"temperature": 0, "num_predict": 5})
    assert raw.response and raw.eval_count == 5 and raw.done_reason == "length"
    stopped = client.generate(model=MODEL_ID, prompt="Count: 1, 2, 3,", raw=True,
                              options={"temperature": 0, "num_predict": 20, "stop": [","]})
    assert "," not in stopped.response and stopped.done_reason == "stop"


def test_list_show_ps(client: ollama.Client) -> None:
    listed = {m.model: m for m in client.list().models}
    smol = listed[MODEL_ID]
    assert smol.size and smol.size > 50_000_000 and smol.digest and len(smol.digest) == 64
    assert smol.details is not None and smol.details.format == "gguf"
    assert smol.details.family == "llama" and smol.details.quantization_level == "Q4_1"
    assert MINILM in listed  # on disk, not loaded
    shown = client.show(MODEL_ID)
    assert shown.capabilities is not None and "completion" in shown.capabilities
    assert shown.template and "im_start" in shown.template
    assert shown.modelinfo is not None and shown.modelinfo["llama.context_length"] == 2048
    assert client.show(MODEL_ID + ":latest").details == shown.details
    running = {m.model: m for m in client.ps().models}
    assert MODEL_ID in running
    row = running[MODEL_ID]
    assert row.size and row.size > 50_000_000 and row.expires_at is not None
    assert row.expires_at.year == 9999  # no TTL configured: never unloaded for idleness
    version = client._client.get("/api/version").json()
    assert version["version"].count(".") == 2


def test_embed_minilm_matches_sentence_transformers(client: ollama.Client) -> None:
    ref = reference()
    # MiniLM is on disk but not loaded: the first request loads it, as Ollama does.
    result = client.embed(model=MINILM, input=ref["texts"])
    assert len(result.embeddings) == len(ref["texts"])
    for got, want in zip(result.embeddings, ref["vectors"], strict=True):
        assert cosine(np.array(got, dtype=np.float32), np.array(want, dtype=np.float32)) \
            >= 0.999
    single = client.embed(model=MINILM, input=ref["texts"][0])
    assert len(single.embeddings) == 1 and len(single.embeddings[0]) == 384
    legacy = client.embeddings(model=MINILM, prompt=ref["texts"][0])
    assert np.allclose(legacy.embedding, single.embeddings[0], atol=1e-5)
    with pytest.raises(ollama.ResponseError) as err:
        client.embed(model=MODEL_ID, input="hi")
    assert err.value.status_code == 400


def test_format_json_schema_and_json(client: ollama.Client) -> None:
    schema = {"type": "object", "properties": {"colour": {"type": "string"},
                                               "count": {"type": "integer"}},
              "required": ["colour", "count"]}
    forced = client.chat(model=MODEL_ID, messages=MESSAGES, format=schema,
                         options={"temperature": 0, "num_predict": 60})
    jsonschema.validate(json.loads(forced.message.content or ""), schema)
    anything = client.generate(model=MODEL_ID, prompt="A colour as JSON.", format="json",
                               options={"temperature": 0, "num_predict": 60})
    # JSON mode: an object from the first token (a 135M model may not close it in time).
    assert anything.response.startswith("{")
    if anything.done_reason == "stop":
        assert isinstance(json.loads(anything.response), dict)


WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}


def test_tool_call_round_trip(client: ollama.Client) -> None:
    question = {"role": "user", "content": "What is the weather in Paris?"}
    # Ollama's API has no tool_choice; LMX takes it in options (a 135M model
    # left to decide answers in prose).
    forced = {"temperature": 0, "num_predict": 60, "tool_choice": "required"}
    answer = client.chat(model=MODEL_ID, messages=[question], tools=[WEATHER_TOOL],
                         options=forced)
    calls = answer.message.tool_calls
    assert calls, answer.message.content
    assert calls[0].function.name == "get_weather"
    assert isinstance(calls[0].function.arguments, dict)
    assert (answer.message.content or "").find("<tool_call>") == -1
    streamed = list(client.chat(model=MODEL_ID, messages=[question], tools=[WEATHER_TOOL],
                                options=forced, stream=True))
    streamed_calls = [c for p in streamed for c in (p.message.tool_calls or [])]
    assert [c.function.name for c in streamed_calls] == [c.function.name for c in calls]
    # The call and its result go back in Ollama's shape.
    follow = client.chat(model=MODEL_ID, tools=[WEATHER_TOOL], options=GREEDY, messages=[
        question, {"role": "assistant", "content": "", "tool_calls": [
            {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "tool_name": "get_weather", "content": "18 degrees and sunny"}])
    assert follow.done and follow.message.content is not None


def test_errors_in_ollama_shape(server: LMXServer, client: ollama.Client) -> None:
    for call in (lambda: client.chat(model="no-such-model", messages=MESSAGES),
                 lambda: client.generate(model="no-such-model", prompt="hi"),
                 lambda: client.show("no-such-model"),
                 lambda: client.delete("no-such-model")):
        with pytest.raises(ollama.ResponseError) as err:
            call()
        assert err.value.status_code == 404 and "not found" in err.value.error
    bad = [({"temperature": 5}, "options.temperature"), ({"mirostat": 2}, "options.mirostat"),
           ({"num_ctx": 100000}, "options.num_ctx")]
    for options, param in bad:
        with pytest.raises(ollama.ResponseError) as err:
            client.chat(model=MODEL_ID, messages=MESSAGES, options=options)
        assert err.value.status_code == 400 and param in err.value.error
    with pytest.raises(ollama.ResponseError) as err:
        client.chat(model=MODEL_ID, messages=MESSAGES, think=True)
    assert err.value.status_code == 400 and "think" in err.value.error
    resp = server.http.post("/api/chat", content=b"{not json")
    assert resp.status_code == 400 and set(resp.json()) == {"error"}
    # Runtime options are LMX's config: accepted, no effect.
    fine = client.chat(model=MODEL_ID, messages=MESSAGES,
                       options={**GREEDY, "num_gpu": 0, "num_thread": 2, "num_ctx": 1024})
    assert fine.message.content


def test_pull_with_progress_then_delete(server: LMXServer, hub: FakeHub, model_file: Path,
                                        client: ollama.Client) -> None:
    repo_id = f"lmx-test/ollama-pull-{uuid.uuid4().hex[:6]}"
    hub.add_repo(repo_id, [HubFile("README.md", b"# tiny\n"),
                           HubFile(model_file.name, path=model_file)])
    hub.bytes_per_sec = 40_000_000  # a few progress lines for the ~100 MB file
    try:
        lines = list(client.pull(repo_id, stream=True))
    finally:
        hub.bytes_per_sec = None
    statuses = [p.status for p in lines]
    assert statuses[0] == "pulling manifest" and statuses[-1] == "success"
    progress = [p for p in lines if p.total]
    assert progress and progress[-1].completed == progress[-1].total
    completed = [p.completed or 0 for p in progress]
    assert completed == sorted(completed)
    assert repo_id in {m.model for m in client.list().models}
    # Pulled models chat like any other (loaded on first use).
    answer = client.chat(model=repo_id, messages=MESSAGES, options=GREEDY)
    assert answer.message.content
    with pytest.raises(ollama.ResponseError) as err:
        client.delete(repo_id)  # loaded: unload first
    assert err.value.status_code == 409
    client.generate(model=repo_id, keep_alive=0)
    wait_until(lambda: repo_id not in {m.model for m in client.ps().models}, 30,
               what="unload by keep_alive 0")
    assert client.delete(repo_id).status == "success"
    assert repo_id not in {m.model for m in client.list().models}
    with pytest.raises(ollama.ResponseError) as err:
        client.pull("lmx-test/does-not-exist")
    assert err.value.status_code in (404, 500)


def test_keep_alive_sets_expiry_and_zero_unloads(client: ollama.Client) -> None:
    client.generate(model=MODEL_ID, prompt="Hi", keep_alive="10m",
                    options={"num_predict": 1})
    row = {m.model: m for m in client.ps().models}[MODEL_ID]
    assert row.expires_at is not None
    expected = datetime.now(UTC) + timedelta(minutes=10)
    assert abs((row.expires_at - expected).total_seconds()) < 60
    unloaded = client.generate(model=MODEL_ID, keep_alive=0)
    assert unloaded.done_reason == "unload"
    wait_until(lambda: MODEL_ID not in {m.model for m in client.ps().models}, 30,
               what="unload")
    # The next request loads it from disk again.
    again = client.chat(model=MODEL_ID, messages=MESSAGES, options=GREEDY)
    assert again.message.content
