"""One MLX model tensor-parallel across two local ranks over MLX's ring
backend on loopback (issue 16): real worker processes, the real SmolLM2
(9 query heads over 3 KV heads, so the ranks hold 2 + 1 KV groups), the
official openai SDK, real SIGKILL. Greedy output equals the unsharded
model's within the near-tie rule of the batching tests; batching works;
a dead rank takes the whole group down and the group comes back."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from tests.conftest import MLX_MODEL_ID, MODEL_ID, LMXServer, running_server, wait_until
from tests.test_batching import SUBJECTS, Rows, assert_same_or_near_tie
from tests.test_mlx_backend import CITY, async_client, greedy_rows

pytestmark = pytest.mark.timeout(300)

SHARDED = "smol-sharded"
HEARTBEAT_TIMEOUT = 5.0
NOTES = " ".join(f"Note {i}: the {thing} is on shelf {i}." for i, thing in
                 enumerate(["violin", "kettle", "lamp", "atlas", "clock", "drum", "kite"]))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, mlx_model_dir: Path,
           model_file: Path) -> Any:
    with running_server(tmp_path_factory, "sharded",
                        links=[(MLX_MODEL_ID, mlx_model_dir), model_file],
                        models={"auto_load": [MLX_MODEL_ID], "parallel_slots": 4,
                                "context_length": 1024, "max_concurrent_requests": 8,
                                "restart_backoff_initial_sec": 0.1, "n_threads": 1,
                                "worker_heartbeat_timeout_sec": HEARTBEAT_TIMEOUT},
                        wait_for=[MLX_MODEL_ID], timeout=180) as srv:
        resp = srv.http.post("/admin/models/load", json={
            "model_id": MLX_MODEL_ID, "served_name": SHARDED, "shards": ["local", "local"]},
            timeout=240)
        assert resp.status_code == 200, resp.text
        yield srv


def shards(server: LMXServer) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = server.admin_models()[SHARDED]["shards"]
    return rows


def story(model: str, subject: str, max_tokens: int = 16) -> dict[str, Any]:
    return {"model": model, "temperature": 0, "max_tokens": max_tokens,
            "logprobs": True, "top_logprobs": 5,
            "messages": [{"role": "user", "content": f"Write a short story about a {subject}."}]}


def test_group_is_listed_with_its_ranks(server: LMXServer) -> None:
    row = server.admin_models()[SHARDED]
    assert row["state"] == "ready" and row["backend"] == "mlx"
    assert "tensor-parallel rank 0 of 2" in row["backend_version"]
    ranks = row["shards"]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert all(r["node"] == "local" and psutil.pid_exists(r["pid"]) for r in ranks)
    assert ranks[0]["pid"] == row["pid"] != ranks[1]["pid"]
    assert all(r["ring_address"].startswith("127.0.0.1:") for r in ranks)
    assert server.admin_models()[MLX_MODEL_ID]["shards"] is None


def mapped_libraries(pid: int) -> set[str]:
    return {Path(m.path).name for m in psutil.Process(pid).memory_maps() if m.path}


def test_every_rank_computes_with_the_same_blas(server: LMXServer) -> None:
    # A follower once skipped the worker's MLX set-up and ran on MLX's bundled
    # reference BLAS: correct output, 8-stream steps 5x slower than rank 0's.
    pids = [r["pid"] for r in shards(server)]
    leader = {name for name in mapped_libraries(pids[0]) if "openblas" in name}
    if not leader:
        pytest.skip("no system OpenBLAS on this host: every rank keeps MLX's own BLAS")
    for pid in pids[1:]:
        assert leader <= mapped_libraries(pid), f"rank pid {pid} did not load {leader}"


def test_greedy_text_equals_the_unsharded_model(server: LMXServer) -> None:
    async def run() -> tuple[list[Rows], list[Rows]]:
        async with async_client(server) as client:
            whole = [await greedy_rows(client, story(MLX_MODEL_ID, s, 12)) for s in SUBJECTS[:3]]
            sharded = [await greedy_rows(client, story(SHARDED, s, 12)) for s in SUBJECTS[:3]]
            return whole, sharded

    whole, sharded = asyncio.run(run())
    for a, b in zip(whole, sharded, strict=True):
        assert len(b) == 12
        assert_same_or_near_tie(a, b)


def test_streamed_chat_and_seeded_sampling(server: LMXServer) -> None:
    client = server.openai(timeout=120)
    stream = client.chat.completions.create(
        model=SHARDED, temperature=0, max_tokens=16, stream=True,
        messages=[{"role": "user", "content": "What is the capital of France?"}])
    parts, finish = [], None
    for chunk in stream:
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    assert "Paris" in "".join(parts) and finish == "stop"
    # Each rank samples with the seed rank 0 drew: the ranks stay in step
    # (a disagreement would hang the group), and a given seed reproduces.
    texts = [client.completions.create(model=SHARDED, prompt="Once upon a time", max_tokens=10,
                                       temperature=0.9, seed=seed).choices[0].text
             for seed in (7, 7, None)]
    assert texts[0] == texts[1] and all(texts)


def test_concurrent_requests_batch_together(server: LMXServer) -> None:
    async def run() -> tuple[list[Rows], list[Rows]]:
        async with async_client(server) as client:
            alone = [await greedy_rows(client, story(SHARDED, s, 10)) for s in SUBJECTS[3:6]]
            together = await asyncio.gather(
                *(greedy_rows(client, story(SHARDED, s, 10)) for s in SUBJECTS[3:6]))
            return alone, list(together)

    alone, together = asyncio.run(run())
    for a, b in zip(alone, together, strict=True):
        assert len(b) == 10
        assert_same_or_near_tie(a, b)


def test_abort_mid_batch_keeps_the_ranks_in_step(server: LMXServer) -> None:
    """A client leaving mid-stream removes its sequence on every rank (rank
    0's order says so): the batch mates finish with the same tokens."""
    async def run() -> tuple[list[Rows], list[Rows]]:
        async with async_client(server) as client, \
                httpx.AsyncClient(base_url=server.url, timeout=120) as http:
            alone = [await greedy_rows(client, story(SHARDED, s, 10)) for s in SUBJECTS[:2]]

            async def abandoned() -> None:
                body = {**story(SHARDED, "volcano", 400), "stream": True, "ignore_eos": True}
                async with http.stream("POST", "/v1/chat/completions", json=body) as resp:
                    seen = 0
                    async for line in resp.aiter_lines():
                        seen += '"content"' in line
                        if seen >= 3:
                            return  # leaving the block closes the connection

            results = await asyncio.gather(
                abandoned(), *(greedy_rows(client, story(SHARDED, s, 10)) for s in SUBJECTS[:2]))
            return alone, [r for r in results if isinstance(r, list)]

    before = server.admin_models()[SHARDED]["worker_stats"]["requests_aborted"]
    alone, batched = asyncio.run(run())
    for a, b in zip(alone, batched, strict=True):
        assert len(b) == 10
        assert_same_or_near_tie(a, b)
    wait_until(lambda: server.admin_models()[SHARDED]["worker_stats"]["requests_aborted"]
               > before, 15, what="the abort reaching the worker")
    # And the group still serves (a rank out of step would hang here).
    assert len(asyncio.run(_one(server))) == 4


async def _one(server: LMXServer) -> Rows:
    async with async_client(server) as client:
        return await greedy_rows(client, story(SHARDED, "cat", 4))


def test_grammar_choices_and_prefix_cache_on_every_rank(server: LMXServer) -> None:
    """Constrained decoding (each rank masks with the same grammar), n
    choices (a running sequence's KV copied on every rank) and a follow-up
    turn served from the prefix cache."""
    client = server.openai(timeout=120)
    fmt: Any = {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY}}
    resp = client.chat.completions.create(
        model=SHARDED, response_format=fmt, max_tokens=48, temperature=0.9, seed=3, n=2,
        messages=[{"role": "user", "content": "Name a big city."}])
    assert len(resp.choices) == 2
    for choice in resp.choices:
        value = json.loads(choice.message.content or "")
        assert isinstance(value["city"], str) and isinstance(value["population"], int)
    history: list[Any] = [{"role": "user", "content": f"{NOTES} Which note mentions a violin?"}]
    first = client.chat.completions.create(model=SHARDED, max_tokens=8, temperature=0,
                                           messages=history)
    cached_before = server.admin_models()[SHARDED]["worker_stats"]["prompt_tokens_cached"]
    history += [{"role": "assistant", "content": first.choices[0].message.content or ""},
                {"role": "user", "content": "And which one mentions a kettle?"}]
    second = client.chat.completions.create(model=SHARDED, max_tokens=8, temperature=0,
                                            messages=history)
    assert second.choices[0].message.content
    cached = server.admin_models()[SHARDED]["worker_stats"]["prompt_tokens_cached"]
    assert first.usage is not None and cached - cached_before >= first.usage.prompt_tokens


def test_bad_shards_are_refused_naming_the_field(server: LMXServer) -> None:
    for body in ({"shards": ["local"]}, {"shards": ["local", "nowhere"]}, {"shards": []},
                 {"model_id": MODEL_ID, "shards": ["local", "local"]}):  # GGUF: not MLX
        resp = server.http.post("/admin/models/load",
                                json={"model_id": MLX_MODEL_ID, "served_name": "x", **body})
        assert resp.status_code == 400, resp.text
        assert resp.json()["error"]["param"] == "shards", resp.text
    assert "x" not in server.admin_models()
    # Already loaded whole: it cannot be sharded under the same id.
    resp = server.http.post("/admin/models/load",
                            json={"model_id": MLX_MODEL_ID, "shards": ["local", "local"]})
    assert resp.status_code == 409, resp.text
    assert resp.json()["error"]["param"] == "shards"


def test_rolling_restart_replaces_every_rank(server: LMXServer) -> None:
    """A rolling restart starts a second group beside the first (its own
    ring ports), switches to it once it is ready, then stops the old one."""
    before = shards(server)
    resp = server.http.post("/admin/models/restart", timeout=300, json={
        "model_id": SHARDED, "mode": "rolling", "settings": {"parallel_slots": 2}})
    assert resp.status_code == 200, resp.text
    assert resp.json()["old_pid"] == before[0]["pid"]
    row = server.admin_models()[SHARDED]
    assert row["state"] == "ready" and row["spawn_settings"]["parallel_slots"] == 2
    after = row["shards"]
    assert after[0]["pid"] == resp.json()["new_pid"] == row["pid"]
    assert {r["pid"] for r in after}.isdisjoint({r["pid"] for r in before})
    assert {r["ring_address"] for r in after}.isdisjoint({r["ring_address"] for r in before})
    for old in before:
        wait_until(lambda pid=old["pid"]: not _alive(pid), 30, what=f"old rank {old['rank']} gone")
    assert len(asyncio.run(_one(server))) == 4
    assert row["restarts"] == 0  # not a crash


def _alive(pid: int) -> bool:
    """A zombie counts as gone: the server reaps it when it awaits the exit."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def kill_mid_stream(http: httpx.Client, model: str, pid: int) -> tuple[float, list[str]]:
    """SIGKILL `pid` once a long greedy stream of `model` has sent 3 content
    chunks; returns the seconds from the kill to the stream's end and the
    SSE data lines that came after the kill."""
    body = {"model": model, "stream": True, "max_tokens": 400, "ignore_eos": True,
            "messages": [{"role": "user", "content": "Tell me a long story about a dragon."}]}
    with http.stream("POST", "/v1/chat/completions", json=body) as resp:
        assert resp.status_code == 200
        lines = resp.iter_lines()
        seen = 0
        for line in lines:
            seen += line.startswith("data: ") and '"content"' in line
            if seen >= 3:
                break
        killed_at = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        rest = [line for line in lines if line.startswith("data: ")]
        return time.monotonic() - killed_at, rest


def test_killing_a_follower_rank_restarts_the_whole_group(server: LMXServer) -> None:
    before = shards(server)
    follower = before[1]["pid"]
    with httpx.Client(base_url=server.url, timeout=60) as http:
        ended_after, rest = kill_mid_stream(http, SHARDED, follower)
    assert ended_after < 5.0, f"stream took {ended_after:.2f}s to end after the kill"
    assert rest[-1] == "data: [DONE]"
    error = httpx.Response(200, content=rest[-2][len("data: "):]).json()["error"]
    assert error["code"] == "worker_crashed", error
    # Rank 0 went down with its group, and both come back as new processes.
    wait_until(lambda: not psutil.pid_exists(before[0]["pid"]), 10, what="rank 0 to be killed")
    server.wait_ready(SHARDED, timeout=120)
    after = shards(server)
    assert {r["pid"] for r in after}.isdisjoint({r["pid"] for r in before})
    assert server.admin_models()[SHARDED]["restarts"] == 1
    ok = server.openai(timeout=120).chat.completions.create(
        model=SHARDED, temperature=0, max_tokens=8,
        messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert ok.choices[0].message.content
    # The other model never noticed.
    assert server.model_state(MLX_MODEL_ID) == "ready"


def test_a_stopped_follower_is_declared_unresponsive_and_the_group_replaced(
        server: LMXServer) -> None:
    """SIGSTOP on rank 1: rank 0 waits in a collective that never returns,
    but rank 1's heartbeats stop, so the group is killed and restarted
    within the heartbeat bound instead of hanging."""
    server.wait_ready(SHARDED, timeout=120)
    before = shards(server)
    restarts = server.admin_models()[SHARDED]["restarts"]
    follower = before[1]["pid"]
    out: dict[str, Any] = {}
    body = {"model": SHARDED, "max_tokens": 400, "ignore_eos": True,
            "messages": [{"role": "user", "content": "Tell me a long story."}]}

    def post() -> None:
        with httpx.Client(base_url=server.url, timeout=120) as http:
            resp = http.post("/v1/chat/completions", json=body)
            out["status"], out["body"], out["at"] = resp.status_code, resp.json(), \
                time.monotonic()

    thread = threading.Thread(target=post)
    thread.start()
    wait_until(lambda: server.admin_models()[SHARDED]["in_flight"] == 1, 30,
               what="the request running")
    stopped_at = time.monotonic()
    os.kill(follower, signal.SIGSTOP)
    try:
        thread.join(HEARTBEAT_TIMEOUT + 40)
        assert "status" in out, "request still hanging"
        assert out["status"] == 503, out
        assert out["body"]["error"]["code"] == "worker_unresponsive"
        assert out["at"] - stopped_at < HEARTBEAT_TIMEOUT + 10
        server.wait_ready(SHARDED, timeout=120)
        after = shards(server)
        assert {r["pid"] for r in after}.isdisjoint({r["pid"] for r in before})
        assert server.admin_models()[SHARDED]["restarts"] == restarts + 1
        wait_until(lambda: not psutil.pid_exists(follower), 10, what="the stopped rank gone")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(follower, signal.SIGCONT)
