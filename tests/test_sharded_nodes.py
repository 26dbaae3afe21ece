"""A sharded MLX model whose rank 1 runs on a node in another network
namespace (tests/netns.py): rank 0 is the gateway's local worker, rank 1
is started by the node's agent, the ranks' ring runs over the namespaces'
veth link. Greedy output equals the unsharded model's (near-tie rule);
SIGKILL of the remote rank restarts the whole group."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from tests.conftest import MLX_MODEL_ID, LMXServer, running_server, wait_until
from tests.netns import Lan, skip_reason
from tests.test_batching import SUBJECTS, Rows, assert_same_or_near_tie
from tests.test_mlx_backend import async_client, greedy_rows
from tests.test_nodes import PORT, Cluster, _lmx
from tests.test_sharded_mlx import kill_mid_stream, story

_WHY_NOT = skip_reason()
pytestmark = [pytest.mark.skipif(_WHY_NOT is not None, reason=_WHY_NOT or ""),
              pytest.mark.timeout(400)]

SHARDED = "smol-across"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, mlx_model_dir: Path) -> Iterator[Cluster]:
    keys = tmp_path_factory.mktemp("shard-node-keys")
    made = _lmx("keys", "new", "n1", "--dir", str(keys))
    assert made.returncode == 0, made.stderr
    log_dir = tmp_path_factory.mktemp("shard-node-logs")
    with Lan(["gw", "n1"]) as lan:
        gw = lan.addresses["gw"]
        config = {"server": {"host": gw, "allowed_hosts": ["*"]},
                  "workers": {"listen": f"tcp://{gw}:{PORT}"},
                  "nodes": {"heartbeat_timeout_sec": 5, "authorized_keys_dir": str(keys)},
                  "models": {"auto_load": [MLX_MODEL_ID], "parallel_slots": 4,
                             "context_length": 1024, "n_threads": 1,
                             "restart_backoff_initial_sec": 0.1}}
        with running_server(tmp_path_factory, "shard-nodes",
                            links=[(MLX_MODEL_ID, mlx_model_dir)], config=config,
                            prefix=lan.prefix_for("gw"), host=gw, wait_for=[MLX_MODEL_ID],
                            timeout=180) as server:
            cluster = Cluster(lan, server, keys, log_dir)
            try:
                cluster.start_agent("n1")
                cluster.wait_node("n1", "connected")
                resp = server.http.post("/admin/models/load", json={
                    "model_id": MLX_MODEL_ID, "served_name": SHARDED,
                    "shards": ["local", "n1"]}, timeout=300)
                assert resp.status_code == 200, resp.text
                yield cluster
            finally:
                for agent in cluster.agents.values():
                    agent.stop()


def test_sharded_across_namespaces_equals_the_unsharded_model(cluster: Cluster) -> None:
    server: LMXServer = cluster.server
    ranks = server.admin_models()[SHARDED]["shards"]
    assert [r["node"] for r in ranks] == ["local", "n1"]
    assert ranks[0]["ring_address"].startswith(cluster.lan.addresses["gw"] + ":")
    assert ranks[1]["ring_address"].startswith(cluster.lan.addresses["n1"] + ":")

    async def run() -> tuple[list[Rows], list[Rows]]:
        async with async_client(server) as client:
            whole = [await greedy_rows(client, story(MLX_MODEL_ID, s, 12)) for s in SUBJECTS[:2]]
            sharded = [await greedy_rows(client, story(SHARDED, s, 12)) for s in SUBJECTS[:2]]
            return whole, sharded

    whole, sharded = asyncio.run(run())
    for a, b in zip(whole, sharded, strict=True):
        assert len(b) == 12
        assert_same_or_near_tie(a, b)


def test_killing_the_remote_rank_restarts_the_group(cluster: Cluster) -> None:
    server: LMXServer = cluster.server
    before = server.admin_models()[SHARDED]["shards"]
    remote = before[1]["pid"]  # the namespaces share this host's pid space
    assert psutil.pid_exists(remote)
    with httpx.Client(base_url=server.url, timeout=60) as http:
        ended_after, rest = kill_mid_stream(http, SHARDED, remote)
    assert ended_after < 5.0, f"stream took {ended_after:.2f}s to end after the kill"
    assert rest[-1] == "data: [DONE]"
    error = httpx.Response(200, content=rest[-2][len("data: "):]).json()["error"]
    assert error["code"] == "worker_crashed", error
    server.wait_ready(SHARDED, timeout=180)
    after = server.admin_models()[SHARDED]["shards"]
    assert [r["node"] for r in after] == ["local", "n1"]
    assert {r["pid"] for r in after}.isdisjoint({r["pid"] for r in before})
    wait_until(lambda: not psutil.pid_exists(before[0]["pid"]), 10, what="old rank 0 gone")
    ok = server.openai(timeout=120).chat.completions.create(
        model=SHARDED, temperature=0, max_tokens=6,
        messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert ok.choices[0].message.content
