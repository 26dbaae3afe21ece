"""Worker nodes across real network namespaces (tests/netns.py): the
gateway runs in one namespace, node agents (`lmx node --join`) in others,
all over ZeroMQ tcp with CURVE. Real processes, real signals, a real cut
link; the model is the bundled one, driven by the `openai` SDK."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil
import pytest
import yaml
import zmq
import zmq.auth

from lmx_protocol import encode
from lmx_protocol.node_messages import NODE_PROTOCOL_VERSION, HostInfo, NodeHello
from tests.conftest import MODEL_ID, LMXServer, running_server, wait_until
from tests.netns import Lan, skip_reason

_WHY_NOT = skip_reason()
pytestmark = [pytest.mark.skipif(_WHY_NOT is not None, reason=_WHY_NOT or ""),
              pytest.mark.timeout(180)]

PORT = 5710
HEARTBEAT_TIMEOUT = 3.0
# Detection may take the timeout plus one monitor tick and a loaded
# machine's scheduling: the bound the tests hold it to.
DETECTION_BOUND = HEARTBEAT_TIMEOUT + 3.0
CHAT = {"messages": [{"role": "user", "content": "Tell me a long story about a dragon."}]}


class Agent:
    """`lmx node --join` run on one namespace's host."""

    def __init__(self, lan: Lan, host: str, join: str, key: Path, server_key: Path,
                 log_dir: Path, models_dir: Path, name: str | None = None) -> None:
        self.log_path = log_dir / f"agent-{name or host}-{time.monotonic_ns()}.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [*lan.prefix_for(host), sys.executable, "-m", "lmx_gateway", "node",
             "--join", join, "--key", str(key), "--server-key", str(server_key),
             "--name", name or host, "--models-dir", str(models_dir)],
            stdout=self._log, stderr=subprocess.STDOUT)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self._log.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


class Cluster:
    def __init__(self, lan: Lan, server: LMXServer, keys: Path, log_dir: Path) -> None:
        self.lan, self.server, self.keys, self.log_dir = lan, server, keys, log_dir
        self.join = f"tcp://{lan.addresses['gw']}:{PORT}"
        self.server_key = server.home / "keys" / "server.key"
        self.agents: dict[str, Agent] = {}

    def start_agent(self, host: str, key: Path | None = None, name: str | None = None) -> Agent:
        agent = Agent(self.lan, host, self.join, key or self.keys / f"{host}.key_secret",
                      self.server_key, self.log_dir, self.server.home / "models", name)
        self.agents[name or host] = agent
        return agent

    def nodes(self) -> dict[str, dict[str, Any]]:
        rows = self.server.http.get("/admin/nodes").json()["nodes"]
        return {row["name"]: row for row in rows}

    def wait_node(self, name: str, state: str, timeout: float = 60) -> None:
        wait_until(lambda: self.nodes().get(name, {}).get("state") == state, timeout,
                   interval=0.1, what=f"node {name} {state}")


def _lmx(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lmx_gateway", *args], capture_output=True,
                          text=True, timeout=60, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, model_file: Path) -> Iterator[Cluster]:
    keys = tmp_path_factory.mktemp("node-keys")
    for host in ("n1", "n2"):
        made = _lmx("keys", "new", host, "--dir", str(keys))
        assert made.returncode == 0, made.stderr
        assert len(made.stdout.strip()) == 40  # the public key, Z85
    log_dir = tmp_path_factory.mktemp("node-logs")
    with Lan(["gw", "n1", "n2"]) as lan:
        gw = lan.addresses["gw"]
        config = {"server": {"host": gw, "allowed_hosts": ["*"]},
                  "workers": {"listen": f"tcp://{gw}:{PORT}"},
                  "nodes": {"heartbeat_timeout_sec": HEARTBEAT_TIMEOUT,
                            "authorized_keys_dir": str(keys)}}
        with running_server(tmp_path_factory, "nodes", links=[model_file], config=config,
                            prefix=lan.prefix_for("gw"), host=gw) as server:
            cluster = Cluster(lan, server, keys, log_dir)
            try:
                for host in ("n1", "n2"):
                    cluster.start_agent(host)
                # Every test may start with both nodes in (run alone too).
                for host in ("n1", "n2"):
                    cluster.wait_node(host, "connected")
                yield cluster
            finally:
                for agent in cluster.agents.values():
                    agent.stop()


def _stream_until_content(server: LMXServer, body: dict[str, Any]) -> Iterator[str]:
    """Lines of a streamed chat, from after its first content chunks."""
    with server.http.stream("POST", "/v1/chat/completions", json=body, timeout=60) as resp:
        assert resp.status_code == 200, resp.read()
        seen = 0
        for line in resp.iter_lines():
            if line.startswith("data: ") and '"content"' in line:
                seen += 1
                if seen == 3:
                    yield "started"
            elif seen >= 3 and line.startswith("data: "):
                yield line


def _error_of(lines: list[str]) -> dict[str, Any]:
    assert lines[-1] == "data: [DONE]", lines[-3:]
    error: dict[str, Any] = httpx.Response(200, content=lines[-2][len("data: "):]).json()["error"]
    return error


def _workers_of(model_id: str) -> list[psutil.Process]:
    """Worker processes of `model_id` on any namespace's host (one pid space)."""
    marker = f'"model_id":"{model_id}"'
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if "lmx_worker" in cmdline and any(marker in part for part in cmdline):
            found.append(proc)
    return found


def _reconfigure(cluster: Cluster, section: str, values: dict[str, Any]) -> None:
    """Rewrite the server's config file and reload it (POST /admin/config/reload)."""
    config = yaml.safe_load(cluster.server.config_path.read_text())
    config.setdefault(section, {}).update(values)
    cluster.server.config_path.write_text(yaml.safe_dump(config))
    reloaded = cluster.server.http.post("/admin/config/reload", json={})
    assert reloaded.status_code == 200, reloaded.text


def _model_row(cluster: Cluster, model_id: str) -> dict[str, Any]:
    return cluster.server.admin_models()[model_id]


def test_nodes_join_with_authorized_keys(cluster: Cluster) -> None:
    cluster.wait_node("n1", "connected")
    cluster.wait_node("n2", "connected")
    row = cluster.nodes()["n1"]
    assert row["address"] == cluster.lan.addresses["n1"]
    assert row["cpu_cores"] >= 1 and row["ram_total_bytes"] > 0
    assert row["last_heartbeat_sec_ago"] < HEARTBEAT_TIMEOUT
    assert f"{MODEL_ID}.gguf" in row["models"]  # what it has on disk
    listed = _lmx("nodes", "--url", cluster.server.url)
    assert listed.returncode == 0, listed.stderr
    assert "n1" in listed.stdout and "n2" in listed.stdout and "connected" in listed.stdout


def test_unknown_key_cannot_join_or_talk(cluster: Cluster, tmp_path: Path) -> None:
    made = _lmx("keys", "new", "intruder", "--dir", str(tmp_path))
    assert made.returncode == 0, made.stderr
    intruder = cluster.start_agent("n2", key=tmp_path / "intruder.key_secret", name="intruder")
    # The supervisor logs each refused handshake: wait for one, then check
    # the intruder never appears.
    wait_until(lambda: "refused a CURVE client" in cluster.server.log(), 30, interval=0.1,
               what="the refused handshake")
    intruder.stop()
    assert "intruder" not in cluster.nodes()
    # A DEALER with an unauthorized key (from the root namespace, over the
    # bridge) that says Hello as a node hears nothing back.
    public, secret = zmq.curve_keypair()
    ctx = zmq.Context()
    try:
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IDENTITY, b"node:spy")
        sock.curve_publickey, sock.curve_secretkey = public, secret
        sock.curve_serverkey = zmq.auth.load_certificate(cluster.server_key)[0]
        sock.connect(cluster.join)
        hello = NodeHello("spy", NODE_PROTOCOL_VERSION, HostInfo(1, 1, 1, "cpu", 1))
        sock.send(encode(hello))
        assert sock.poll(2000) == 0, "a peer with an unknown key got a frame"
    finally:
        ctx.destroy(linger=0)
    assert "spy" not in cluster.nodes()


def test_a_node_cannot_speak_as_another(cluster: Cluster) -> None:
    # "ghost" joins with n1's key and leaves; its name stays bound to that key.
    ghost = cluster.start_agent("n1", name="ghost")
    cluster.wait_node("ghost", "connected")
    ghost.stop()
    cores = cluster.nodes()["ghost"]["cpu_cores"]
    # n2's key is authorized, but not for the name "ghost".
    public, secret = zmq.auth.load_certificate(cluster.keys / "n2.key_secret")
    assert secret is not None
    ctx = zmq.Context()
    try:
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IDENTITY, b"node:ghost")
        sock.curve_publickey, sock.curve_secretkey = public, secret
        sock.curve_serverkey = zmq.auth.load_certificate(cluster.server_key)[0]
        sock.connect(cluster.join)
        sock.send(encode(NodeHello("ghost", NODE_PROTOCOL_VERSION,
                                   HostInfo(1, 1, 999, "fake", 1))))
        wait_until(lambda: "not its own" in cluster.server.log(), 30, interval=0.1,
                   what="the impostor's frame dropped")
        assert sock.poll(500) == 0
    finally:
        ctx.destroy(linger=0)
    assert cluster.nodes()["ghost"]["cpu_cores"] == cores != 999


def test_model_on_node_serves_a_streamed_chat(cluster: Cluster) -> None:
    cluster.wait_node("n1", "connected")
    resp = cluster.server.load(MODEL_ID, node="n1")
    assert resp.status_code == 200, resp.text
    assert resp.json()["node"] == "n1"
    client = cluster.server.openai(timeout=60)
    stream = client.chat.completions.create(model=MODEL_ID, stream=True, max_tokens=12,
                                            messages=CHAT["messages"])
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text.strip()
    assert _model_row(cluster, MODEL_ID)["node"] == "n1"
    assert MODEL_ID in cluster.nodes()["n1"]["loaded_models"]


def test_load_on_unknown_node_names_the_field(cluster: Cluster) -> None:
    resp = cluster.server.load(MODEL_ID, node="nowhere", served_name="elsewhere")
    assert resp.status_code == 404, resp.text
    error = resp.json()["error"]
    assert error["param"] == "node" and "nowhere" in error["message"]
    bad = cluster.server.load(MODEL_ID, node="no spaces allowed")
    assert bad.status_code == 400 and "node" in bad.text


def test_sigkill_of_remote_worker_mid_stream(cluster: Cluster) -> None:
    row = _model_row(cluster, MODEL_ID)
    assert row["state"] == "ready" and row["node"] == "n1"
    pid = row["pid"]
    body = {"model": MODEL_ID, **CHAT, "stream": True, "max_tokens": 2000, "ignore_eos": True}
    lines = _stream_until_content(cluster.server, body)
    assert next(lines) == "started"
    killed_at = time.monotonic()
    os.kill(pid, signal.SIGKILL)  # the namespaces share the pid space: it is that process
    rest = list(lines)
    ended_after = time.monotonic() - killed_at
    assert ended_after < 2.0, f"stream took {ended_after:.2f}s to end after the kill"
    error = _error_of(rest)
    assert error["code"] == "worker_crashed" and "SIGKILL" in error["message"]
    wait_until(lambda: (r := _model_row(cluster, MODEL_ID))["state"] == "ready"
               and r["pid"] != pid, 60, interval=0.1, what="the restart on n1")
    assert _model_row(cluster, MODEL_ID)["node"] == "n1"


def test_link_down_makes_models_unavailable_until_the_node_returns(cluster: Cluster) -> None:
    resp = cluster.server.load(MODEL_ID, node="n2", served_name="on-n2")
    assert resp.status_code == 200, resp.text
    body = {"model": "on-n2", **CHAT, "stream": True, "max_tokens": 2000, "ignore_eos": True}
    lines = _stream_until_content(cluster.server, body)
    assert next(lines) == "started"
    cut_at = time.monotonic()
    cluster.lan.link("n2", up=False)
    try:
        rest = list(lines)
        ended_after = time.monotonic() - cut_at
        assert ended_after < DETECTION_BOUND, f"{ended_after:.1f}s to notice the cut link"
        assert _error_of(rest)["code"] == "node_unreachable"
        assert cluster.nodes()["n2"]["state"] == "unreachable"
        assert _model_row(cluster, "on-n2")["state"] == "unavailable"
        ready = cluster.server.http.get("/readyz").json()
        assert ready["unavailable_models"] == ["on-n2"]
        # New requests fail fast (no wait for a worker that cannot come),
        # as the SDK's 503 with the code that says why.
        started = time.monotonic()
        with pytest.raises(openai.InternalServerError) as refused:
            cluster.server.openai(timeout=30).chat.completions.create(
                model="on-n2", max_tokens=5, messages=CHAT["messages"])
        assert time.monotonic() - started < 2.0
        assert refused.value.status_code == 503
        assert isinstance(refused.value.body, dict)
        assert refused.value.body["code"] == "node_unreachable"
        # The model on n1 serves on.
        ok = cluster.server.http.post("/v1/chat/completions", json={
            "model": MODEL_ID, **CHAT, "max_tokens": 3})
        assert ok.status_code == 200, ok.text
    finally:
        cluster.lan.link("n2", up=True)
    cluster.wait_node("n2", "connected")
    try:
        wait_until(lambda: _model_row(cluster, "on-n2")["state"] == "ready", 90, interval=0.2,
                   what="on-n2 back on n2")
    except AssertionError as exc:  # what the gateway and n2's agent said meanwhile
        agent_log = cluster.agents["n2"].log_path.read_text(errors="replace")
        raise AssertionError(f"{exc}\nmodel: {_model_row(cluster, 'on-n2')}\n"
                             f"gateway log (end):\n{cluster.server.log()[-6000:]}\n"
                             f"n2 agent log (end):\n{agent_log[-3000:]}") from None
    assert _model_row(cluster, "on-n2")["node"] == "n2"
    assert "unavailable_models" not in cluster.server.http.get("/readyz").json()
    # The agent, cut off, stopped the old worker: one worker serves on-n2.
    wait_until(lambda: len(_workers_of("on-n2")) == 1, 30, interval=0.2,
               what="a single worker of on-n2")


def test_a_model_that_does_not_fit_here_goes_to_a_node(cluster: Cluster) -> None:
    # No model runs on this host now; a budget smaller than the model
    # leaves no room here, so placement picks a node with free RAM.
    assert all(row["node"] != "local" for row in cluster.server.admin_models().values())
    _reconfigure(cluster, "memory", {"budget_bytes": 1024})
    try:
        resp = cluster.server.load(MODEL_ID, served_name="placed")
        assert resp.status_code == 200, resp.text
        assert resp.json()["node"] in ("n1", "n2")
    finally:
        _reconfigure(cluster, "memory", {"budget_bytes": None})
    unloaded = cluster.server.http.post("/admin/models/unload", json={"model_id": "placed"})
    assert unloaded.status_code == 200, unloaded.text


def test_agent_sigkill_detected_and_model_replaced(cluster: Cluster) -> None:
    _reconfigure(cluster, "nodes", {"replace_on_loss": True})
    row = _model_row(cluster, MODEL_ID)
    assert row["node"] == "n1" and row["state"] == "ready"
    body = {"model": MODEL_ID, **CHAT, "stream": True, "max_tokens": 2000, "ignore_eos": True}
    lines = _stream_until_content(cluster.server, body)
    assert next(lines) == "started"
    killed_at = time.monotonic()
    cluster.agents["n1"].kill()
    rest = list(lines)
    ended_after = time.monotonic() - killed_at
    assert ended_after < DETECTION_BOUND, f"{ended_after:.1f}s to notice the dead agent"
    assert _error_of(rest)["code"] == "node_unreachable"
    # Re-placed on a host with room (this one first).
    wait_until(lambda: (r := _model_row(cluster, MODEL_ID))["state"] == "ready"
               and r["node"] != "n1", 90, interval=0.2, what="the model re-placed")
    ok = cluster.server.openai(timeout=60).chat.completions.create(
        model=MODEL_ID, max_tokens=3, messages=CHAT["messages"])
    assert ok.choices[0].message.content is not None
    # The node comes back when its agent does.
    cluster.start_agent("n1")
    cluster.wait_node("n1", "connected")
