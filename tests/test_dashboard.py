"""The live dashboard, end to end in a real headless Chromium (Debian's
`chromium`, driven by Playwright) against a real `lmx serve`: live numbers,
loading and unloading from the page, a throughput point after a request, and
a crashed worker showing up in recent errors."""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import MODEL_ID, LMXServer

pytestmark = pytest.mark.timeout(120)

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
UI_TIMEOUT_MS = 30_000

playwright_api = pytest.importorskip("playwright.sync_api")
requires_chromium = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="/usr/bin/chromium is absent (lmx.sh installs Debian's chromium when run as root)")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with playwright_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def test_dashboard_page_is_self_contained(shared_server: LMXServer) -> None:
    resp = shared_server.http.get("/admin/dashboard")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/html")
    csp = resp.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp
    # Offline by construction: nothing is fetched from anywhere but this server.
    assert not re.search(r"https?://", resp.text), "the page references an external URL"
    assert "/admin/events" in resp.text


@requires_chromium
def test_dashboard_live_in_chromium(start_server: Any, browser: Any, tmp_path: Path) -> None:
    expect = playwright_api.expect
    server: LMXServer = start_server(config={"server": {"sse_heartbeat_interval_sec": 2}})
    server.wait_healthy()
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page_errors: list[str] = []
    page.on("pageerror", lambda exc: page_errors.append(str(exc)))
    try:
        page.goto(f"{server.url}/admin/dashboard")

        # Live numbers: memory percentage from the server, the event stream connected.
        expect(page.get_by_test_id("memory-percent")).to_have_text(
            re.compile(r"^\d+(\.\d)?%$"), timeout=UI_TIMEOUT_MS)
        expect(page.get_by_test_id("connection")).to_have_text("live", timeout=UI_TIMEOUT_MS)
        models = page.get_by_test_id("loaded-models")
        expect(models.locator("tr")).to_have_count(0)

        # Load from the page; the list updates to a ready row with a worker pid.
        form = page.get_by_test_id("load-form")
        form.locator("input[name=model_id]").fill(MODEL_ID)
        form.get_by_role("button", name="Load").click()
        row = models.locator(f'tr[data-model-id="{MODEL_ID}"]')
        expect(row).to_have_attribute("data-state", "ready", timeout=UI_TIMEOUT_MS)
        pid = server.worker_pid(MODEL_ID)
        expect(row.locator("td").nth(3)).to_have_text(str(pid), timeout=UI_TIMEOUT_MS)

        # A request runs: the throughput graph gets a point from the event stream.
        chart = page.get_by_test_id("throughput-chart")
        resp = server.http.post("/v1/chat/completions", json={
            "model": MODEL_ID, "max_tokens": 48, "ignore_eos": True, "stream": True,
            "messages": [{"role": "user", "content": "Count to twenty."}]})
        assert resp.status_code == 200, resp.text
        expect(chart).not_to_have_attribute("data-samples", "0", timeout=UI_TIMEOUT_MS)
        expect(chart).not_to_have_attribute("data-peak", "0", timeout=UI_TIMEOUT_MS)

        # A worker dies: it shows up in recent errors, and its restart in the table.
        os.kill(pid, signal.SIGKILL)
        errors = page.get_by_test_id("recent-errors")
        expect(errors.locator('li[data-kind="worker crashed"]')).to_have_count(
            1, timeout=UI_TIMEOUT_MS)
        expect(row.locator("td").nth(4)).to_have_text(re.compile(r"^1\b"),
                                                       timeout=UI_TIMEOUT_MS)
        expect(row).to_have_attribute("data-state", "ready", timeout=UI_TIMEOUT_MS)

        # Unload from the page; the row goes away and the server agrees.
        row.get_by_role("button", name="Unload").click()
        expect(row).to_have_count(0, timeout=UI_TIMEOUT_MS)
        assert server.admin_models() == {}
        assert page_errors == []
    except Exception:
        page.screenshot(path=str(tmp_path / "dashboard-failure.png"), full_page=True)
        raise
    finally:
        page.close()
