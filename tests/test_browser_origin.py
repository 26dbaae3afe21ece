"""A web page on another local origin, in a real headless Chromium, cannot
drive LMX through the visitor's browser: its `fetch`es to
`/admin/models/unload` and `/v1/chat/completions` (CORS mode and `no-cors`,
"simple" text/plain posts and JSON ones that need a preflight) change
nothing on the server. Once the operator lists that origin in
`server.cors_origins` (a config reload), the page's chat call works and the
page can read the answer."""

from __future__ import annotations

import functools
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import MODEL_ID, LMXServer, free_port
from tests.event_reader import EventReader
from tests.test_dashboard import CHROMIUM, CHROMIUM_ARGS, requires_chromium

pytestmark = pytest.mark.timeout(150)

playwright_api = pytest.importorskip("playwright.sync_api")

# Runs in the foreign page: every way a page may try, each outcome recorded
# ("status N", "opaque" for no-cors, or the error a blocked fetch raises).
ATTEMPTS_JS = """
async ([base, model]) => {
  const unload = JSON.stringify({model_id: model});
  const chat = JSON.stringify({model, max_tokens: 2,
                               messages: [{role: "user", content: "Hi"}]});
  const tries = [
    ["/admin/models/unload", "cors", "text/plain", unload],
    ["/admin/models/unload", "no-cors", "text/plain", unload],
    ["/admin/models/unload", "cors", "application/json", unload],
    ["/admin/models/unload", "no-cors", "application/json", unload],
    ["/admin/models/unload", "no-cors", null, new Blob([unload])],
    ["/v1/chat/completions", "cors", "text/plain", chat],
    ["/v1/chat/completions", "no-cors", "text/plain", chat],
    ["/v1/chat/completions", "cors", "application/json", chat],
    ["/v1/chat/completions", "no-cors", "application/json", chat],
  ];
  const out = [];
  for (const [path, mode, type, body] of tries) {
    const headers = type ? {"Content-Type": type} : {};
    try {
      const r = await fetch(base + path, {method: "POST", mode, headers, body});
      out.push(`${path} ${mode} ${type}: ` +
               (r.type === "opaque" ? "opaque" : `status ${r.status} ${await r.text()}`));
    } catch (e) {
      out.push(`${path} ${mode} ${type}: blocked ${e.name}`);
    }
  }
  return out;
}
"""

CHAT_JS = """
async ([base, model]) => {
  const r = await fetch(base + "/v1/chat/completions", {
    method: "POST", headers: {"Content-Type": "application/json",
                              "Authorization": "Bearer unused"},
    body: JSON.stringify({model, max_tokens: 2, messages: [{role: "user", content: "Hi"}]})});
  return {status: r.status, body: await r.json(),
          requestId: r.headers.get("x-request-id")};
}
"""

PLAIN_UNLOAD_JS = """
async ([base, model]) => {
  const r = await fetch(base + "/admin/models/unload", {
    method: "POST", headers: {"Content-Type": "text/plain"},
    body: JSON.stringify({model_id: model})});
  return {status: r.status, body: await r.json()};
}
"""


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def foreign_site(tmp_path: Path) -> Iterator[str]:
    """A second local web server: same machine, another port, another origin."""
    root = tmp_path / "site"
    root.mkdir()
    (root / "index.html").write_text("<!doctype html><title>elsewhere</title><p>hello</p>")
    handler = functools.partial(_Quiet, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(10)


@requires_chromium
def test_foreign_page_cannot_drive_the_server(start_server: Any, foreign_site: str) -> None:
    server: LMXServer = start_server(auto_load=[MODEL_ID])  # the default: no keys at all
    server.wait_ready(MODEL_ID)
    events = EventReader(server.url)
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(f"{foreign_site}/index.html")
            outcomes = page.evaluate(ATTEMPTS_JS, [server.url, MODEL_ID])
            assert len(outcomes) == 9
            for outcome in outcomes:
                # Nothing readable comes back: blocked, opaque, or never sent.
                assert "blocked" in outcome or outcome.endswith("opaque"), outcome
            # Nothing changed: the model is loaded, no chat ran, nothing was unloaded.
            assert server.model_state(MODEL_ID) == "ready"
            # No request got past the route guards: a refused request leaves no
            # event (issue 11), and none was admitted.
            completed = events.of("request_completed")
            assert completed == [], completed
            assert server.admin_models()[MODEL_ID]["worker_stats"]["requests_started"] == 0
            assert not events.of("model_unloaded")
            log = server.log()
            assert "Completion request model=" not in log

            # The operator lists the page's origin: its chat call works, readably.
            config = yaml.safe_load(server.config_path.read_text())
            config.setdefault("server", {})["cors_origins"] = [foreign_site]
            server.config_path.write_text(yaml.safe_dump(config))
            assert server.http.post("/admin/config/reload").status_code == 200
            answer = page.evaluate(CHAT_JS, [server.url, MODEL_ID])
            assert answer["status"] == 200, answer
            assert answer["body"]["choices"][0]["message"]["role"] == "assistant"
            assert answer["requestId"]  # exposed to the page by CORS
            # Even from a listed origin a "simple" text/plain post is refused (415).
            plain = page.evaluate(PLAIN_UNLOAD_JS, [server.url, MODEL_ID])
            assert plain["status"] == 415, plain
            assert plain["body"]["error"]["code"] == "unsupported_media_type"
            assert server.model_state(MODEL_ID) == "ready"
        finally:
            browser.close()
            events.close()
