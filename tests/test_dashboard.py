"""The live dashboard, end to end in a real headless Chromium (Debian's
`chromium`, driven by Playwright) against a real `lmx serve` with an admin
key: the key asked once, live numbers, loading and unloading from the page, a
throughput point after a request, and a crashed worker in recent errors."""

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
ADMIN_KEY = "dashboard-test-admin-key"

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
    resp = shared_server.http.get("/admin/dashboard", headers={"X-Admin-Key": "wrong"})
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/html")
    csp = resp.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp
    # Offline by construction: nothing is fetched from anywhere but this server.
    assert not re.search(r"https?://", resp.text), "the page references an external URL"
    assert "/admin/events" in resp.text


def enter_key(page: Any, key: str) -> None:
    dialog = page.locator("#auth-dialog")
    playwright_api.expect(dialog).to_be_visible(timeout=UI_TIMEOUT_MS)
    dialog.locator("input[name=key]").fill(key)
    dialog.get_by_role("button", name="Connect").click()


@requires_chromium
def test_dashboard_live_in_chromium(start_server: Any, browser: Any, tmp_path: Path) -> None:
    expect = playwright_api.expect
    server: LMXServer = start_server(config={"security": {"admin_key": ADMIN_KEY}})
    server.http.headers["X-Admin-Key"] = ADMIN_KEY  # for the fixture's own helpers
    server.wait_healthy()
    # The page is public; what it shows is not.
    assert server.http.get("/admin/dashboard", headers={"X-Admin-Key": ""}).status_code == 200
    assert server.http.get("/admin/status", headers={"X-Admin-Key": ""}).status_code == 403
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page_errors: list[str] = []
    page.on("pageerror", lambda exc: page_errors.append(str(exc)))
    try:
        page.goto(f"{server.url}/admin/dashboard")
        # The server answers 403: the key is asked for; a wrong one is asked for again.
        enter_key(page, "not-the-key")
        expect(page.locator("#auth-notice")).to_have_text("That key was rejected.",
                                                          timeout=UI_TIMEOUT_MS)
        enter_key(page, ADMIN_KEY)

        # Live numbers: memory percentage from the server, the event stream connected.
        expect(page.get_by_test_id("memory-percent")).to_have_text(
            re.compile(r"^\d+(\.\d)?%$"), timeout=UI_TIMEOUT_MS)
        expect(page.get_by_test_id("connection")).to_have_text("live", timeout=UI_TIMEOUT_MS)
        models = page.get_by_test_id("loaded-models")
        expect(models.locator("tr")).to_have_count(0)

        # The key is kept for the browser session: a reload does not ask again.
        page.reload()
        expect(page.get_by_test_id("connection")).to_have_text("live", timeout=UI_TIMEOUT_MS)
        expect(page.locator("#auth-dialog")).to_be_hidden()

        # Load the model listed as available on disk; the list updates to a ready row.
        available = page.get_by_test_id("available-models").locator(
            f'tr[data-model-id="{MODEL_ID}"]')
        available.get_by_role("button", name="Load").click()
        row = models.locator(f'tr[data-model-id="{MODEL_ID}"]')
        expect(row).to_have_attribute("data-state", "ready", timeout=UI_TIMEOUT_MS)
        expect(available.locator(".badge")).to_have_text("loaded", timeout=UI_TIMEOUT_MS)
        pid = server.worker_pid(MODEL_ID)
        expect(row.locator("td").nth(3)).to_have_text(str(pid), timeout=UI_TIMEOUT_MS)

        # A second copy by id and served name through the load form.
        form = page.get_by_test_id("load-form")
        form.locator("input[name=model_id]").fill(MODEL_ID)
        form.locator("input[name=served_name]").fill("dash-copy")
        form.get_by_role("button", name="Load").click()
        copy = models.locator('tr[data-model-id="dash-copy"]')
        expect(copy).to_have_attribute("data-state", "ready", timeout=UI_TIMEOUT_MS)

        # A request runs: the throughput graph gets a point from the event stream.
        chart = page.get_by_test_id("throughput-chart")
        resp = server.http.post("/v1/chat/completions", json={
            "model": MODEL_ID, "max_tokens": 16, "ignore_eos": True, "stream": True,
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

        # Unload from the page; the rows go away and the server agrees.
        copy.get_by_role("button", name="Unload").click()
        row.get_by_role("button", name="Unload").click()
        expect(models.locator("tr")).to_have_count(0, timeout=UI_TIMEOUT_MS)
        assert server.admin_models() == {}
        assert page_errors == []
    except Exception:
        page.screenshot(path=str(tmp_path / "dashboard-failure.png"), full_page=True)
        raise
    finally:
        page.close()
