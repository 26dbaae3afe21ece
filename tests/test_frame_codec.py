"""The supervisor <-> worker frame codec, in process: every frame type
survives encode/decode in its own direction with every field set, frames
sent the wrong way and garbage are refused with msgspec's errors, and the
append-only evolution rule holds on the wire (trailing fields a newer peer
adds are ignored; trailing defaults an older peer omits are filled in)."""

from __future__ import annotations

import typing

import msgspec
import pytest

from lmx_protocol import (
    PROTOCOL_VERSION,
    Abort,
    ChatMessage,
    Embed,
    Embeddings,
    EncoderInfo,
    ErrorCode,
    Failed,
    Finished,
    FinishReason,
    FromWorker,
    Generate,
    Ping,
    Pong,
    Ready,
    Rerank,
    SamplingParams,
    Scores,
    Shutdown,
    StepFrames,
    TokenLogprob,
    Tokens,
    ToWorker,
    WorkerStats,
    decode_from_supervisor,
    decode_from_worker,
    encode,
)
from lmx_protocol.messages import Frame

# One frame of each type, every field away from its default so that a field
# the codec dropped or reordered would show.
TO_WORKER: list[Frame] = [
    Generate(
        request_id="req-1",
        params=SamplingParams(max_tokens=7, temperature=0.3, top_p=0.9, top_k=40, min_p=0.05,
                              seed=11, stop=["\n\n", "END"], presence_penalty=0.5,
                              frequency_penalty=0.25, repetition_penalty=1.1, ignore_eos=True,
                              logprobs=True, top_logprobs=3, json_schema='{"type":"object"}'),
        messages=[ChatMessage(role="system", content="Be brief."),
                  ChatMessage(role="assistant", content=None, name="bot",
                              tool_calls=[{"id": "call_1", "type": "function",
                                           "function": {"name": "f", "arguments": "{}"}}]),
                  ChatMessage(role="tool", content="42", tool_call_id="call_1")],
        add_generation_prompt=False, count_only=True,
        tools='[{"type":"function","function":{"name":"f"}}]', tool_choice="named",
        tool_name="f", parallel_tool_calls=False),
    Generate(request_id="req-2", params=SamplingParams(), prompt="Once upon a time"),
    Abort(request_id="req-1"),
    Ping(nonce=99),
    Shutdown(drain=True),
    Embed(request_id="emb-1", texts=["a", "b"], dimensions=128, normalize=False),
    Embed(request_id="emb-2", token_ids=[[101, 7592, 102], [101, 102]]),
    Rerank(request_id="rr-1", query="snakes", documents=["python", "java", ""]),
]
FROM_WORKER: list[Frame] = [
    Ready(protocol_version=PROTOCOL_VERSION, worker_id="m#1-abc", model_id="m",
          backend="llama_cpp", pid=4242, capabilities=["chat", "completions"],
          memory_bytes=123_456_789, context_length=2048, backend_version="0.3.1",
          encoder=EncoderInfo(dimensions=384, max_tokens=256, vocab_size=30522,
                              rerank_mode="bi-encoder-cosine", matryoshka=True,
                              pooling="mean", normalized=True),
          tool_format="hermes"),
    Tokens(request_id="req-1", text="Hel", token_ids=[1, 2],
           logprobs=[TokenLogprob(token=b"He", logprob=-0.5, top=[(b"He", -0.5), (b"Hi", -1.5)]),
                     TokenLogprob(token=b"\xe2\x82", logprob=-0.01)],
           prompt_tokens=17),
    Finished(request_id="req-1", finish_reason=FinishReason.TOOL_CALLS, prompt_tokens=17,
             completion_tokens=9, text="lo", stop_sequence="END"),
    Failed(code=ErrorCode.CONTEXT_OVERFLOW, message="too long", fatal=True,
           request_id="req-1", param="messages"),
    Pong(nonce=99, stats=WorkerStats(requests_started=3, requests_finished=2,
                                     requests_aborted=1, tokens_generated=50, prompt_tokens=60,
                                     active_requests=1, queued_requests=2, rss_bytes=10_000,
                                     prompt_tokens_cached=30, encoder_batches=4)),
    Embeddings(request_id="emb-1", vectors=b"\x00\x00\x80?" * 6, count=2, dim=3,
               prompt_tokens=5),
    Scores(request_id="rr-1", scores=[0.25, -1.5, 3.0], prompt_tokens=12),
    StepFrames([Tokens(request_id="req-1", text="a", token_ids=[5], prompt_tokens=3),
                Finished(request_id="req-2", finish_reason=FinishReason.LENGTH,
                         prompt_tokens=4, completion_tokens=8),
                Failed(code=ErrorCode.INTERNAL, message="boom", request_id="req-3")]),
]


def test_every_frame_type_has_a_sample() -> None:
    """A frame type added to a direction must be added here too."""
    assert {type(f) for f in TO_WORKER} == set(typing.get_args(ToWorker))
    assert {type(f) for f in FROM_WORKER} == set(typing.get_args(FromWorker))


@pytest.mark.parametrize("frame", TO_WORKER, ids=lambda f: type(f).__name__)
def test_to_worker_round_trip(frame: Frame) -> None:
    decoded = decode_from_supervisor(encode(frame))
    assert type(decoded) is type(frame)
    assert decoded == frame


@pytest.mark.parametrize("frame", FROM_WORKER, ids=lambda f: type(f).__name__)
def test_from_worker_round_trip(frame: Frame) -> None:
    decoded = decode_from_worker(encode(frame))
    assert type(decoded) is type(frame)
    assert decoded == frame


def test_enums_decode_as_enums() -> None:
    finished = decode_from_worker(encode(FROM_WORKER[2]))
    assert isinstance(finished, Finished)
    assert finished.finish_reason is FinishReason.TOOL_CALLS
    failed = decode_from_worker(encode(FROM_WORKER[3]))
    assert isinstance(failed, Failed) and failed.code is ErrorCode.CONTEXT_OVERFLOW


def test_frames_are_tagged_positional_arrays() -> None:
    """The wire shape the evolution rule relies on: [tag, field1, field2, ...]
    in declaration order, defaults included."""
    assert msgspec.msgpack.decode(encode(Abort("r1"))) == ["abort", "r1"]
    assert msgspec.msgpack.decode(encode(Shutdown(drain=True))) == ["shutdown", True]
    assert msgspec.msgpack.decode(encode(Finished("r1", FinishReason.STOP, 3, 4))) == [
        "finished", "r1", "stop", 3, 4, "", None]


@pytest.mark.parametrize("frame", TO_WORKER, ids=lambda f: type(f).__name__)
def test_worker_bound_frame_refused_by_supervisor(frame: Frame) -> None:
    with pytest.raises(msgspec.ValidationError, match=r"Invalid value .* at `\$\[0\]`"):
        decode_from_worker(encode(frame))


@pytest.mark.parametrize("frame", FROM_WORKER, ids=lambda f: type(f).__name__)
def test_supervisor_bound_frame_refused_by_worker(frame: Frame) -> None:
    with pytest.raises(msgspec.ValidationError, match=r"Invalid value .* at `\$\[0\]`"):
        decode_from_supervisor(encode(frame))


GARBAGE = [
    pytest.param(b"", msgspec.DecodeError, "truncated", id="empty"),
    pytest.param(b"\xc1", msgspec.DecodeError, "malformed", id="invalid-opcode"),
    # Cut inside the tag, so neither decoder gets as far as refusing the tag.
    pytest.param(encode(Abort("r1"))[:3], msgspec.DecodeError, "truncated", id="truncated"),
    pytest.param(msgspec.msgpack.encode(42), msgspec.ValidationError, "Expected `array`",
                 id="not-an-array"),
    pytest.param(msgspec.msgpack.encode(["nope", "r1"]), msgspec.ValidationError,
                 "Invalid value 'nope'", id="unknown-tag"),
    pytest.param(msgspec.msgpack.encode([]), msgspec.ValidationError,
                 "Expected `array` of at least length 1, got 0", id="empty-array"),
]


@pytest.mark.parametrize(("data", "error", "message"), GARBAGE)
def test_garbage_refused_both_ways(data: bytes, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        decode_from_supervisor(data)
    with pytest.raises(error, match=message):
        decode_from_worker(data)


BAD_FIELDS = [
    pytest.param(decode_from_supervisor, ["abort"], "Expected `array` of at least length 2, got 1",
                 id="to-worker-missing-field"),
    pytest.param(decode_from_supervisor, ["abort", 7], r"Expected `str`, got `int` - at `\$\[1\]`",
                 id="to-worker-wrong-type"),
    pytest.param(decode_from_supervisor, ["generate", "r", {"max_tokens": "x"}],
                 r"Expected `int \| null`, got `str` - at `\$\[2\]\.max_tokens`",
                 id="to-worker-bad-nested-field"),
    pytest.param(decode_from_worker, ["tokens", "r1", 5, [1]],
                 r"Expected `str`, got `int` - at `\$\[2\]`", id="from-worker-wrong-type"),
    pytest.param(decode_from_worker, ["finished", "r1", "bogus", 1, 1],
                 "Invalid enum value 'bogus'", id="from-worker-bad-enum"),
    pytest.param(decode_from_worker, ["pong", 1, {"rss_bytes": -0.5}],
                 r"Expected `int`, got `float` - at `\$\[2\]\.rss_bytes`",
                 id="from-worker-bad-nested-field"),
]


@pytest.mark.parametrize(("decode", "wire", "message"), BAD_FIELDS)
def test_bad_fields_refused_naming_the_field(decode: typing.Callable[[bytes], object],
                                             wire: list[object], message: str) -> None:
    with pytest.raises(msgspec.ValidationError, match=message):
        decode(msgspec.msgpack.encode(wire))


def test_newer_peer_trailing_fields_are_ignored() -> None:
    """A field appended by a newer peer does not break an older decoder."""
    newer = msgspec.msgpack.encode(["abort", "r1", "a field from the future"])
    assert decode_from_supervisor(newer) == Abort("r1")
    newer_finished = msgspec.msgpack.encode(["finished", "r1", "stop", 3, 4, "", None, 1])
    assert decode_from_worker(newer_finished) == Finished("r1", FinishReason.STOP, 3, 4)


def test_older_peer_missing_trailing_defaults_are_filled() -> None:
    older = msgspec.msgpack.encode(["failed", "worker_internal_error", "boom"])
    assert decode_from_worker(older) == Failed(ErrorCode.INTERNAL, "boom", fatal=False,
                                               request_id=None, param=None)
