"""The OpenAI request surface: logit_bias, n, echo, suffix and the fields
LMX refuses or accepts as no-ops, through the official openai SDK against a
real server with the real SmolLM2 (and MLX for n). The README's field table
is checked against the SDK's own request types."""

from __future__ import annotations

import asyncio
import re
import typing
from pathlib import Path
from typing import Any

import openai
import pytest
from llama_cpp import Llama
from openai.types import completion_create_params as completion_params
from openai.types.chat import completion_create_params as chat_params

from tests.conftest import MLX_MODEL_ID, MODEL_ID, LMXServer, wait_until
from tests.event_reader import EventReader

pytestmark = pytest.mark.timeout(300)

README = Path(__file__).resolve().parent.parent / "README.md"
QUESTION = [{"role": "user", "content": "Tell me a story about a dragon."}]
# Long enough (with the template's system prompt) that a KV copy pays off.
LONG_QUESTION = [{"role": "user", "content":
                  "Here is a list of fruits: apple, banana, cherry, damson, elderberry, fig, "
                  "grape, honeydew, kiwi, lemon, mango, nectarine, orange, papaya. Which "
                  "one is the most yellow? Answer with one word."}]


@pytest.fixture(scope="module")
def vocab(model_file: Path) -> Llama:
    return Llama(model_path=str(model_file), vocab_only=True, verbose=False)


def token_id(vocab: Llama, piece: bytes) -> int:
    ids = vocab.tokenize(piece, add_bos=False, special=True)
    assert len(ids) == 1, (piece, ids)
    return int(ids[0])


def first_token(client: openai.OpenAI, model: str = MODEL_ID, **extra: Any
                ) -> tuple[bytes, str]:
    resp = client.chat.completions.create(model=model, messages=QUESTION,  # type: ignore[arg-type]
                                          max_tokens=6, temperature=0, logprobs=True, **extra)
    choice = resp.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content
    first = choice.logprobs.content[0]
    assert first.bytes is not None
    return bytes(first.bytes), choice.message.content or ""


# --- logit_bias -------------------------------------------------------------------


def test_logit_bias_ban_changes_only_that_request_in_a_batch(
        shared_server: LMXServer, vocab: Llama) -> None:
    client = shared_server.openai()
    piece, baseline = first_token(client)
    banned = token_id(vocab, piece)

    async def batch() -> list[str]:
        aclient = openai.AsyncOpenAI(base_url=f"{shared_server.url}/v1", api_key="unused",
                                     max_retries=0)
        async with aclient:
            async def one(i: int) -> str:
                extra = {"logit_bias": {str(banned): -100}} if i == 3 else {}
                resp = await aclient.chat.completions.create(
                    model=MODEL_ID, messages=QUESTION, max_tokens=6,  # type: ignore[arg-type]
                    temperature=0, **extra)
                return resp.choices[0].message.content or ""
            return list(await asyncio.gather(*(one(i) for i in range(8))))

    texts = asyncio.run(batch())
    assert texts[3] != baseline
    banned_piece, banned_text = first_token(client, logit_bias={str(banned): -100})
    assert banned_piece != piece and banned_text == texts[3]
    assert [t for i, t in enumerate(texts) if i != 3] == [baseline] * 7


def test_logit_bias_plus_100_forces_a_token(shared_server: LMXServer, vocab: Llama) -> None:
    client = shared_server.openai()
    forced = token_id(vocab, b" banana")
    piece, text = first_token(client, logit_bias={str(forced): 100})
    assert piece == b" banana"
    assert text.startswith("banana") or text.startswith(" banana")


def test_logit_bias_bad_values_are_400s(shared_server: LMXServer) -> None:
    client = shared_server.openai()
    for bias in ({"12": 101}, {"x": 1}, {"999999": 5}):
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model=MODEL_ID, messages=QUESTION,  # type: ignore[arg-type]
                                           max_tokens=2, logit_bias=bias)
        assert err.value.body["param"] == "logit_bias"  # type: ignore[index]


# --- n ----------------------------------------------------------------------------


def check_n_choices(server: LMXServer, model: str) -> None:
    client = server.openai()
    question = LONG_QUESTION
    single = client.chat.completions.create(model=model, messages=question,  # type: ignore[arg-type]
                                            max_tokens=8, temperature=1, seed=5)
    assert single.usage is not None
    cached_before = server.admin_models()[model]["worker_stats"]["prompt_tokens_cached"]
    resp = client.chat.completions.create(model=model, messages=question,  # type: ignore[arg-type]
                                          max_tokens=8, temperature=1, seed=5, n=3)
    assert [c.index for c in resp.choices] == [0, 1, 2]
    assert all(c.message.content for c in resp.choices)
    assert len({c.message.content for c in resp.choices}) > 1  # seed + i per choice
    assert resp.usage is not None
    # The prompt is counted once: as long as the same prompt alone.
    prompt = resp.usage.prompt_tokens
    assert prompt == single.usage.prompt_tokens
    assert resp.usage.completion_tokens <= 24
    assert resp.usage.completion_tokens > 8
    # Choices 1 and 2 started from choice 0's KV: the worker read the prompt once.
    wait_until(lambda: server.admin_models()[model]["worker_stats"]["prompt_tokens_cached"]
               - cached_before >= 2 * (prompt - 1), 10, what="shared prefill")
    # Same request again: the seed reproduces all three choices.
    again = client.chat.completions.create(model=model, messages=question,  # type: ignore[arg-type]
                                           max_tokens=8, temperature=1, seed=5, n=3)
    assert [c.message.content for c in again.choices] == [c.message.content
                                                           for c in resp.choices]


def test_n_choices_llama_cpp(shared_server: LMXServer) -> None:
    check_n_choices(shared_server, MODEL_ID)


def test_n_streamed_interleaved_and_bounded(shared_server: LMXServer) -> None:
    client = shared_server.openai()
    stream = client.chat.completions.create(
        model=MODEL_ID, messages=QUESTION, max_tokens=10, temperature=0, n=2,  # type: ignore[arg-type]
        stream=True, stream_options={"include_usage": True})
    order: list[int] = []
    texts = ["", ""]
    usage = None
    for chunk in stream:
        for choice in chunk.choices:
            order.append(choice.index)
            texts[choice.index] += choice.delta.content or ""
        usage = chunk.usage or usage
    assert set(order) == {0, 1}
    assert order.index(1) < len(order) - 1 - order[::-1].index(0)  # interleaved
    assert texts[0] == texts[1] and texts[0]  # greedy: the same text twice
    single = client.chat.completions.create(model=MODEL_ID, messages=QUESTION,  # type: ignore[arg-type]
                                            max_tokens=10, temperature=0)
    assert single.usage is not None and texts[0] == single.choices[0].message.content
    assert usage is not None and usage.completion_tokens == 2 * single.usage.completion_tokens
    assert usage.prompt_tokens == single.usage.prompt_tokens
    completion = client.completions.create(model=MODEL_ID, prompt="Once upon a time",
                                           max_tokens=4, n=2, temperature=0)
    assert [c.index for c in completion.choices] == [0, 1]
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL_ID, messages=QUESTION,  # type: ignore[arg-type]
                                       max_tokens=2, n=9)
    assert err.value.body["param"] == "n"  # type: ignore[index]


def test_n_choices_and_logit_bias_mlx(start_server: Any, mlx_model_dir: Path,
                                      models_dir: Path, vocab: Llama) -> None:
    (models_dir / MLX_MODEL_ID).symlink_to(mlx_model_dir, target_is_directory=True)
    server = start_server(auto_load=[MLX_MODEL_ID])
    server.wait_ready(MLX_MODEL_ID, timeout=180)
    check_n_choices(server, MLX_MODEL_ID)
    # logit_bias on MLX (the converted model keeps the GGUF's token ids).
    client = server.openai()
    piece, baseline = first_token(client, MLX_MODEL_ID)
    banned_piece, banned_text = first_token(
        client, MLX_MODEL_ID, logit_bias={str(token_id(vocab, piece)): -100})
    assert banned_piece != piece and banned_text != baseline
    forced_piece, _ = first_token(client, MLX_MODEL_ID,
                                  logit_bias={str(token_id(vocab, b" banana")): 100})
    assert forced_piece == b" banana"


# --- echo, suffix, user/metadata, refusals -----------------------------------------


def test_echo_and_suffix(shared_server: LMXServer) -> None:
    client = shared_server.openai()
    plain = client.completions.create(model=MODEL_ID, prompt="The sky is", max_tokens=5,
                                      temperature=0)
    echoed = client.completions.create(model=MODEL_ID, prompt="The sky is", max_tokens=5,
                                       temperature=0, echo=True)
    assert echoed.choices[0].text == "The sky is" + plain.choices[0].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL_ID, prompt="The sky is", max_tokens=5, temperature=0, echo=True,
        stream=True) if c.choices)
    assert streamed == echoed.choices[0].text
    for extra in ({"suffix": " and that is all."}, {"echo": True, "logprobs": 2}):
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(model=MODEL_ID, prompt="The sky is", max_tokens=5,
                                      **extra)
        body = err.value.body
        assert isinstance(body, dict)
        assert body["param"] == next(iter(extra)) and body["code"] == "unsupported_parameter"


def test_user_and_metadata_reach_the_request_log(shared_server: LMXServer) -> None:
    client = shared_server.openai()
    watcher = EventReader(shared_server.url)
    client.chat.completions.create(model=MODEL_ID, messages=QUESTION, max_tokens=2,  # type: ignore[arg-type]
                                   user="alice-7", metadata={"app": "notes-9"},
                                   service_tier="auto", store=False,
                                   prediction={"type": "content", "content": "x"},
                                   prompt_cache_key="k1", modalities=["text"])
    try:
        done = wait_until(lambda: [e for e in watcher.of("request_completed")
                                   if e.get("user") == "alice-7"], 10, what="request_completed")
    finally:
        watcher.close()
    assert done[0]["metadata"] == {"app": "notes-9"}


# Values for every field the README says is refused; a new refused row
# without a value here fails the table test.
REFUSED_SAMPLES: dict[str, Any] = {
    "audio": {"voice": "alloy", "format": "wav"},
    "functions": [{"name": "f", "parameters": {"type": "object"}}],
    "function_call": "auto",
    "reasoning_effort": "low",
    "verbosity": "low",
    "moderation": {"policy": {}},
    "web_search_options": {},
    "best_of": 3,
}

STATUSES = {"works", "works*", "no-op", "refused", "-"}


def readme_table() -> dict[str, tuple[str, str]]:
    text = README.read_text()
    section = text.split("### OpenAI request fields", 1)[1].split("\n### ", 1)[0]
    rows: dict[str, tuple[str, str]] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 4 or not cells[0].startswith("`"):
            continue
        assert cells[1] in STATUSES and cells[2] in STATUSES, line
        for name in re.findall(r"`([a-z_]+)`", cells[0]):
            rows[name] = (cells[1], cells[2])
    return rows


def sdk_fields(module: Any, cls: str) -> set[str]:
    fields: set[str] = set()
    for variant in ("Streaming", "NonStreaming"):
        fields |= set(typing.get_type_hints(getattr(module, cls + variant)))
    return fields


def test_readme_table_covers_every_sdk_field(shared_server: LMXServer) -> None:
    rows = readme_table()
    chat = sdk_fields(chat_params, "CompletionCreateParams")
    completion = sdk_fields(completion_params, "CompletionCreateParams")
    assert {f for f, (c, _) in rows.items() if c != "-"} == chat
    assert {f for f, (_, c) in rows.items() if c != "-"} == completion
    client = shared_server.openai()
    refused = [(f, kind) for f, cells in rows.items()
               for kind, cell in zip(("chat", "completions"), cells, strict=True)
               if cell == "refused"]
    assert refused
    for field, kind in refused:
        value = REFUSED_SAMPLES[field]
        with pytest.raises(openai.BadRequestError) as err:
            if kind == "chat":
                client.chat.completions.create(model=MODEL_ID, messages=QUESTION,  # type: ignore[arg-type]
                                               max_tokens=2, extra_body={field: value})
            else:
                client.completions.create(model=MODEL_ID, prompt="Hi", max_tokens=2,
                                          extra_body={field: value})
        assert err.value.body["param"] == field, field  # type: ignore[index]

