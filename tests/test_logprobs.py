"""logprobs / top_logprobs on chat and completions, through the openai SDK."""

from __future__ import annotations

import math

import pytest

from tests.conftest import MODEL_ID, LMXServer

pytestmark = pytest.mark.timeout(120)

MESSAGES = [{"role": "user", "content": "Name a fruit."}]


def test_chat_logprobs_non_stream_and_stream(shared_server: LMXServer) -> None:
    client = shared_server.openai()
    resp = client.chat.completions.create(model=MODEL_ID, messages=MESSAGES,  # type: ignore[arg-type]
                                          max_tokens=12, temperature=0, logprobs=True,
                                          top_logprobs=3)
    choice = resp.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content
    rows = choice.logprobs.content
    assert resp.usage is not None and len(rows) == resp.usage.completion_tokens
    text = b"".join(bytes(r.bytes or []) for r in rows).decode()
    assert text == choice.message.content
    for row in rows:
        assert len(row.top_logprobs) == 3
        lps = [t.logprob for t in row.top_logprobs]
        assert lps == sorted(lps, reverse=True)
        assert sum(math.exp(lp) for lp in lps) <= 1.0 + 1e-4
        # Greedy decoding picks the most likely token.
        assert row.token == row.top_logprobs[0].token
        assert row.logprob == pytest.approx(lps[0])
    streamed = client.chat.completions.create(
        model=MODEL_ID, messages=MESSAGES, max_tokens=12, temperature=0,  # type: ignore[arg-type]
        logprobs=True, top_logprobs=3, stream=True)
    stream_rows = [r for c in streamed if c.choices and c.choices[0].logprobs
                   for r in (c.choices[0].logprobs.content or [])]
    assert [r.token for r in stream_rows] == [r.token for r in rows]
    assert [r.logprob for r in stream_rows] == pytest.approx([r.logprob for r in rows])


def test_completion_logprobs(shared_server: LMXServer) -> None:
    resp = shared_server.openai().completions.create(
        model=MODEL_ID, prompt="One, two, three,", max_tokens=6, temperature=0, logprobs=2)
    lp = resp.choices[0].logprobs
    assert lp is not None and lp.tokens and lp.token_logprobs and lp.top_logprobs
    assert "".join(lp.tokens) == resp.choices[0].text
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    assert all(len(top) == 2 for top in lp.top_logprobs)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]


@pytest.mark.parametrize(("path", "extra", "param"), [
    ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 50}, "top_logprobs"),
    ("/v1/chat/completions", {"logprobs": "yes"}, "logprobs"),
    ("/v1/completions", {"logprobs": 99}, "logprobs"),
])
def test_bad_logprob_requests(shared_server: LMXServer, path: str, extra: dict[str, object],
                              param: str) -> None:
    body: dict[str, object] = {"model": MODEL_ID, **extra}
    body.update({"messages": MESSAGES} if "chat" in path else {"prompt": "x"})
    resp = shared_server.http.post(path, json=body)
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == param
