"""The files in deploy/: Prometheus alert rules (promtool check + promtool unit
tests), the Grafana dashboard (valid PromQL over metrics a live server really
exports), the systemd unit (systemd-analyze verify) and the launchd plist."""

from __future__ import annotations

import json
import plistlib
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.conftest import MODEL_ID, LMXServer, free_port, wait_until

pytestmark = pytest.mark.timeout(120)

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
ALERTS = DEPLOY / "prometheus" / "lmx-alerts.yaml"
ALERT_TESTS = DEPLOY / "prometheus" / "lmx-alerts.test.yaml"
PROMETHEUS_EXAMPLE = DEPLOY / "prometheus" / "prometheus.example.yml"
GRAFANA = DEPLOY / "grafana" / "lmx-dashboard.json"
SYSTEMD_UNIT = DEPLOY / "systemd" / "lmx.service"
LAUNCHD_PLIST = DEPLOY / "launchd" / "com.lmx.server.plist"

# Runbook §4.8, less OptaLMXAgentFailureRatioHigh: LMX has no agents runtime.
RUNBOOK_ALERTS = {
    "OptaLMXHighErrorRate", "OptaLMXHighP95Latency", "OptaLMXQueueSaturation",
    "OptaLMXMemoryPressure", "OptaLMXQuarantinedModelPresent", "OptaLMXCanaryPendingStuck",
    "OptaLMXPerModelHighErrorRate", "OptaLMXPerModelThroughputDrop",
    "OptaLMXPerModelEvictionThrash",
}

PROMTOOL = shutil.which("promtool")
requires_promtool = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool is absent (lmx.sh installs Debian's prometheus package when run as root)")
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
PROMETHEUS = shutil.which("prometheus")

METRIC = re.compile(r"\b(lmx_[a-z0-9_]+)\b")


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60,
                          cwd=cwd)


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def grafana_exprs() -> list[str]:
    dashboard = json.loads(GRAFANA.read_text())
    exprs = [target["expr"] for panel in dashboard["panels"]
             for target in panel.get("targets", [])]
    assert exprs, "the dashboard has no queries"
    return exprs


def as_plain_promql(expr: str) -> str:
    """Grafana's variables replaced by what they expand to, so promtool can parse it."""
    return (expr.replace("$__rate_interval", "5m")
            .replace('"$job"', '".*"').replace('"$instance"', '".*"'))


# --- Prometheus alerts ------------------------------------------------------------------


def test_alerts_have_the_runbook_names() -> None:
    names = {rule["alert"] for rule in alert_rules()}
    assert names >= RUNBOOK_ALERTS, f"missing: {sorted(RUNBOOK_ALERTS - names)}"
    for rule in alert_rules():
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
    # The one runbook alert left out is explained where an operator would look for it.
    assert "OptaLMXAgentFailureRatioHigh" in ALERTS.read_text()


@requires_promtool
def test_alert_rules_pass_promtool_check() -> None:
    result = promtool("check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout


@requires_promtool
def test_example_prometheus_config(tmp_path: Path) -> None:
    # As installed: the key in its own file, the rules next to the config.
    key_file = tmp_path / "lmx-admin-key"
    key_file.write_text("secret\n")
    config = PROMETHEUS_EXAMPLE.read_text()
    assert "credentials_file: /etc/prometheus/lmx-admin-key" in config
    (tmp_path / "prometheus.yml").write_text(
        config.replace("/etc/prometheus/lmx-admin-key", str(key_file)))
    shutil.copy(ALERTS, tmp_path / ALERTS.name)
    result = promtool("check", "config", "prometheus.yml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 1 rule files found" in result.stdout
    scrape = yaml.safe_load(config)["scrape_configs"][0]
    assert scrape["job_name"] == "lmx" and scrape["metrics_path"] == "/admin/metrics"


@requires_promtool
def test_alert_rules_fire_on_synthetic_series() -> None:
    # Synthetic series for every alert: each fires when it should and stays quiet otherwise
    # (a second instance or model that must not alert is in most cases).
    tested = set(re.findall(r"alertname: (\w+)", ALERT_TESTS.read_text()))
    assert tested >= RUNBOOK_ALERTS
    result = promtool("test", "rules", ALERT_TESTS.name, cwd=ALERT_TESTS.parent)
    assert result.returncode == 0, result.stdout + result.stderr


# --- Grafana ------------------------------------------------------------------------------


def test_grafana_dashboard_shape() -> None:
    dashboard = json.loads(GRAFANA.read_text())
    assert dashboard["uid"] and dashboard["title"]
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "job", "instance"} <= variables
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            # Every query follows the instance picker.
            assert '"$instance"' in target["expr"], target["expr"]
            assert target["datasource"]["uid"] == "${datasource}"


@requires_promtool
def test_grafana_queries_are_valid_promql(tmp_path: Path) -> None:
    # promtool parses rule expressions: one recording rule per dashboard query.
    rules = {"groups": [{"name": "grafana", "rules": [
        {"record": f"lmx_grafana_query_{i}", "expr": as_plain_promql(expr)}
        for i, expr in enumerate(grafana_exprs())]}]}
    path = tmp_path / "grafana-queries.yaml"
    path.write_text(yaml.safe_dump(rules))
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def exported_metric_names(text: str) -> set[str]:
    names: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(maxsplit=3)
            names.add(name)
            if kind == "histogram":
                names.update(f"{name}_{suffix}" for suffix in ("bucket", "sum", "count"))
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def test_alerts_and_grafana_use_only_exported_metrics(shared_server: LMXServer) -> None:
    # One request (with a client id) so that per-model and per-client series exist too.
    resp = shared_server.http.post(
        "/v1/chat/completions", headers={"X-Client-ID": "deploy-test"},
        json={"model": MODEL_ID, "max_tokens": 1,
              "messages": [{"role": "user", "content": "Hi"}]})
    assert resp.status_code == 200, resp.text
    scrape = shared_server.http.get("/admin/metrics")
    assert scrape.status_code == 200
    exported = exported_metric_names(scrape.text)
    used = {name: source
            for source, exprs in (("alert rules", [r["expr"] for r in alert_rules()]),
                                  ("grafana", grafana_exprs()))
            for expr in exprs for name in METRIC.findall(expr)}
    assert len(used) > 15
    unknown = {name: source for name, source in used.items() if name not in exported}
    assert not unknown, f"not exported by /admin/metrics: {unknown}"


@pytest.mark.skipif(PROMETHEUS is None, reason="the prometheus server binary is absent")
def test_real_prometheus_scrapes_lmx_and_evaluates_everything(
        shared_server: LMXServer, tmp_path: Path) -> None:
    """A real Prometheus scraping the live server: every alert rule evaluates without
    error and every Grafana query runs (matching errors only show at query time)."""
    assert PROMETHEUS is not None
    port = free_port()
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ALERTS)],
        "scrape_configs": [{"job_name": "lmx", "metrics_path": "/admin/metrics",
                            "static_configs": [{"targets": [f"127.0.0.1:{shared_server.port}"]}]}],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    with (tmp_path / "prometheus.log").open("wb") as log:
        proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}",
             f"--storage.tsdb.path={tmp_path / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=log, stderr=subprocess.STDOUT)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as prom:
            def query(expr: str) -> list[Any]:
                body = prom.get("/api/v1/query", params={"query": expr}).json()
                assert body["status"] == "success", (expr, body)
                result: list[Any] = body["data"]["result"]
                return result

            def scraped_twice() -> bool:
                if proc.poll() is not None:
                    raise AssertionError((tmp_path / "prometheus.log").read_text())
                try:
                    rows = query('count_over_time(lmx_uptime_seconds{job="lmx"}[1m])')
                except httpx.HTTPError:
                    return False
                return bool(rows) and float(rows[0]["value"][1]) >= 2

            wait_until(scraped_twice, 30, interval=0.2, what="two scrapes of /admin/metrics")
            assert query('up{job="lmx"}')[0]["value"][1] == "1"

            def rules_evaluated() -> list[dict[str, Any]] | None:
                groups = prom.get("/api/v1/rules").json()["data"]["groups"]
                rules = [rule for group in groups for rule in group["rules"]]
                if len(rules) == len(alert_rules()) and all(
                        r["health"] != "unknown" for r in rules):
                    return rules
                return None

            rules = wait_until(rules_evaluated, 30, interval=0.2, what="alert rule evaluation")
            bad = {r["name"]: r.get("lastError") for r in rules if r["health"] != "ok"}
            assert not bad, bad
            # A healthy idle server fires nothing.
            assert not [r["name"] for r in rules if r["state"] == "firing"]

            for expr in grafana_exprs():
                query(as_plain_promql(expr))
            # The simple ones have data already.
            assert query(as_plain_promql(
                'lmx_model_state{job=~"$job",instance=~"$instance"} == 1'))
    finally:
        proc.terminate()
        proc.wait(30)


# --- service managers ------------------------------------------------------------------------


def unit_settings(text: str) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def test_systemd_unit_restarts_and_sandboxes() -> None:
    s = unit_settings(SYSTEMD_UNIT.read_text())
    assert s["ExecStart"] == ["/opt/lmx/.venv/bin/lmx serve"]
    assert s["Restart"] == ["on-failure"]
    for key, value in {"ProtectSystem": "strict", "ProtectHome": "read-only",
                       "PrivateTmp": "yes", "NoNewPrivileges": "yes",
                       "ReadWritePaths": "/var/lib/lmx"}.items():
        assert s.get(key) == [value], key
    assert s["Environment"].count("LMX_HOME=/var/lib/lmx") == 1
    # Long enough for the server's own drain before systemd's SIGKILL.
    assert int(s["TimeoutStopSec"][0]) > 30


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is absent")
def test_systemd_unit_verifies(tmp_path: Path) -> None:
    # verify insists that ExecStart exists: point it at this checkout's lmx.
    lmx = Path(sys.executable).with_name("lmx")
    assert lmx.exists()
    unit = tmp_path / "lmx.service"
    unit.write_text(SYSTEMD_UNIT.read_text().replace("/opt/lmx/.venv/bin/lmx", str(lmx)))
    assert SYSTEMD_ANALYZE is not None
    result = subprocess.run([SYSTEMD_ANALYZE, "verify", str(unit)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    complaints = [line for line in result.stderr.splitlines() if "lmx.service" in line]
    assert not complaints, complaints


def test_launchd_plist() -> None:
    plist = plistlib.loads(LAUNCHD_PLIST.read_bytes())
    assert plist["Label"] == "com.lmx.server"
    program = plist["ProgramArguments"]
    assert program[0].endswith("/bin/lmx") and program[1:] == ["serve"]
    assert plist["RunAtLoad"] is True
    assert plist["KeepAlive"] == {"SuccessfulExit": False}
    assert plist["StandardOutPath"] == "/tmp/lmx.stdout.log"
    assert plist["StandardErrorPath"] == "/tmp/lmx.stderr.log"
    assert plist["UserName"] != "root"
    assert plist["ExitTimeOut"] > 30
