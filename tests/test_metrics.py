"""`/admin/metrics` and `/admin/metrics/json` against a real server: the
runbook's series exist and their values move with real requests."""

from __future__ import annotations

import threading

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from lmx_gateway.observability.metrics import MAX_CLIENTS
from tests.conftest import MODEL_ID, LMXServer, wait_until

pytestmark = pytest.mark.timeout(90)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

RUNBOOK_SERIES = [
    "lmx_requests_total", "lmx_errors_total", "lmx_stream_requests_total",
    "lmx_prompt_tokens_total", "lmx_completion_tokens_total", "lmx_loaded_models",
    "lmx_memory_used_gb", "lmx_memory_total_gb", "lmx_in_flight_requests",
    "lmx_concurrent_limit", "lmx_queued_requests", "lmx_uptime_seconds",
]


def scrape(server: LMXServer) -> Samples:
    resp = server.http.get("/admin/metrics")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/plain")
    samples: Samples = {}
    for family in text_string_to_metric_families(resp.text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def chat(server: LMXServer, client_id: str | None, stream: bool, max_tokens: int = 5
         ) -> dict[str, int]:
    """One chat request; returns its usage."""
    headers = {"X-Client-ID": client_id} if client_id else {}
    body = {"model": MODEL_ID, "messages": [{"role": "user", "content": "Count to ten."}],
            "max_tokens": max_tokens, "ignore_eos": True, "stream": stream}
    if not stream:
        resp = server.http.post("/v1/chat/completions", json=body, headers=headers)
        assert resp.status_code == 200, resp.text
        return dict(resp.json()["usage"])
    body["stream_options"] = {"include_usage": True}
    resp = server.http.post("/v1/chat/completions", json=body, headers=headers)
    assert resp.status_code == 200
    chunks = [httpx.Response(200, content=line[6:]).json()
              for line in resp.text.splitlines()
              if line.startswith("data: {")]
    return dict(chunks[-1]["usage"])


def test_runbook_series_exist(shared_server: LMXServer) -> None:
    samples = scrape(shared_server)
    names = {name for name, _ in samples}
    for series in RUNBOOK_SERIES:
        assert series in names, series
    # Per-model series exist from the moment the model loads, at zero.
    assert ("lmx_model_errors_total", frozenset({("model", MODEL_ID)})) in samples
    assert value(samples, "lmx_loaded_models") == 1
    assert value(samples, "lmx_concurrent_limit") == 4
    assert value(samples, "lmx_memory_total_gb") > value(samples, "lmx_memory_used_gb") > 0
    assert value(samples, "lmx_model_state", model=MODEL_ID, state="ready") == 1
    assert value(samples, "lmx_uptime_seconds") > 0


def test_counters_move_with_requests(shared_server: LMXServer) -> None:
    before = scrape(shared_server)
    json_before = shared_server.http.get("/admin/metrics/json").json()
    usages = [chat(shared_server, "client-a", stream=False),
              chat(shared_server, "client-a", stream=True)]
    after = scrape(shared_server)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    prompt = sum(u["prompt_tokens"] for u in usages)
    completion = sum(u["completion_tokens"] for u in usages)
    assert completion == 10
    assert delta("lmx_requests_total") == 2
    assert delta("lmx_stream_requests_total") == 1
    assert delta("lmx_errors_total") == 0
    assert delta("lmx_prompt_tokens_total") == prompt
    assert delta("lmx_completion_tokens_total") == completion
    assert delta("lmx_model_requests_total", model=MODEL_ID) == 2
    assert delta("lmx_model_completion_tokens_total", model=MODEL_ID) == completion
    assert value(after, "lmx_client_requests_total", client="client-a") == 2
    assert value(after, "lmx_client_tokens_total", client="client-a") == prompt + completion
    assert value(after, "lmx_client_errors_total", client="client-a") == 0
    assert delta("lmx_request_duration_seconds_count", model=MODEL_ID) == 2
    assert delta("lmx_request_duration_seconds_sum", model=MODEL_ID) > 0
    assert delta("lmx_time_to_first_token_seconds_count", model=MODEL_ID) == 2
    # One gap between each pair of consecutive token frames.
    assert 0 < delta("lmx_inter_token_seconds_count", model=MODEL_ID) <= completion - 2

    summary = shared_server.http.get("/admin/metrics/json").json()
    assert summary["total_requests"] - json_before["total_requests"] == 2
    assert summary["total_errors"] == json_before["total_errors"]
    assert summary["per_client"]["client-a"] == {"requests": 2, "tokens": prompt + completion,
                                                 "errors": 0}
    model = summary["per_model"][MODEL_ID]
    assert model["requests"] - json_before["per_model"].get(MODEL_ID, {"requests": 0})[
        "requests"] == 2
    assert model["avg_time_to_first_token_ms"] > 0
    assert summary["uptime_seconds"] > 0
    assert summary["events"] == {"subscribers": 0, "dropped_total": 0}


def test_errors_counted_per_client(shared_server: LMXServer) -> None:
    before = scrape(shared_server)
    headers = {"X-Client-ID": "client-b"}
    missing = shared_server.http.post("/v1/chat/completions", headers=headers, json={
        "model": "no-such-model", "messages": [{"role": "user", "content": "x"}]})
    assert missing.status_code == 404
    bad = shared_server.http.post("/v1/chat/completions", headers=headers,
                                  json={"model": MODEL_ID, "messages": "not a list"})
    assert bad.status_code == 400
    after = scrape(shared_server)
    assert value(after, "lmx_errors_total") - value(before, "lmx_errors_total") == 2
    assert value(after, "lmx_requests_total") - value(before, "lmx_requests_total") == 2
    assert value(after, "lmx_client_errors_total", client="client-b") == 2
    assert value(after, "lmx_client_requests_total", client="client-b") == 2
    # Neither reached a model: no per-model error, no label for the unknown name.
    assert (value(after, "lmx_model_errors_total", model=MODEL_ID)
            == value(before, "lmx_model_errors_total", model=MODEL_ID))
    assert ("lmx_model_requests_total", frozenset({("model", "no-such-model")})) not in after


def test_client_label_cardinality_is_bounded(shared_server: LMXServer) -> None:
    known = set(shared_server.http.get("/admin/metrics/json").json()["per_client"])
    extra = MAX_CLIENTS + 5
    with httpx.Client(base_url=shared_server.url, timeout=30) as client:
        for i in range(extra):
            resp = client.post("/v1/chat/completions", headers={"X-Client-ID": f"c-{i:03d}"},
                               json={"model": "no-such-model", "messages": []})
            assert resp.status_code in (400, 404)
    per_client = shared_server.http.get("/admin/metrics/json").json()["per_client"]
    named = set(per_client) - {"other"}
    assert len(named) == MAX_CLIENTS
    assert per_client["other"]["requests"] == len(known) + extra - MAX_CLIENTS
    labels = {dict(lbl)["client"] for name, lbl in scrape(shared_server)
              if name == "lmx_client_requests_total"}
    assert len(labels) == MAX_CLIENTS + 1


def test_in_flight_gauge_is_live(shared_server: LMXServer) -> None:
    started = threading.Event()
    done = threading.Event()

    def stream() -> None:
        body = {"model": MODEL_ID, "messages": [{"role": "user", "content": "Go on."}],
                "max_tokens": 400, "ignore_eos": True, "stream": True}
        with httpx.Client(base_url=shared_server.url, timeout=60) as client, \
                client.stream("POST", "/v1/chat/completions", json=body) as resp:
            for line in resp.iter_lines():
                if '"content"' in line:
                    started.set()
                if done.is_set():
                    break  # leaving early aborts the generation

    thread = threading.Thread(target=stream)
    thread.start()
    try:
        assert started.wait(30)
        live = scrape(shared_server)
        assert value(live, "lmx_in_flight_requests") == 1
        assert value(live, "lmx_model_in_flight_requests", model=MODEL_ID) == 1
    finally:
        done.set()
        thread.join(30)
    wait_until(lambda: value(scrape(shared_server), "lmx_in_flight_requests") == 0, 10,
               what="in-flight back to 0")
