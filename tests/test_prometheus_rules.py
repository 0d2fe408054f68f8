"""Prometheus configuration and rules, checked by Prometheus's own promtool.

``promtool check config`` and ``check rules`` parse every file (and every
PromQL expression in it); ``promtool test rules`` runs the unit tests in
``images/prometheus/rules/tightwad.rules.test.yml``, which feed series in and
expect each alert to fire on a failure and to stay quiet when healthy. Whether
the recording rules return data from the real proxy, and agree with its status
endpoint, is checked in ``test_metrics.py``.

promtool comes with Debian's ``prometheus`` package; without it these tests
fail (they never skip).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PROM_DIR = ROOT / "images" / "prometheus"
CONFIG = PROM_DIR / "prometheus.yml"
RULES = PROM_DIR / "rules" / "tightwad.rules.yml"
RULE_TESTS = PROM_DIR / "rules" / "tightwad.rules.test.yml"
INSTALL_HINT = ("needs Prometheus's binaries: install Debian's `prometheus` package "
                "(apt-get install -y --no-install-recommends prometheus)")
# The Compose services Prometheus scrapes: job -> service:port.
JOBS = {"proxy": "proxy:8088", "target": "target:8090", "draft": "draft:8081",
        "orchestrator": "orchestrator:8095", "prometheus": "localhost:9090"}


def binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found: the suite {INSTALL_HINT}")
    return path


def promtool(*args: str, cwd: Path | None = None) -> str:
    r = subprocess.run([binary("promtool"), *args], capture_output=True, text=True, cwd=cwd, timeout=120)
    out = r.stdout + r.stderr
    assert r.returncode == 0, f"promtool {' '.join(args)} failed:\n{out}"
    return out


def alerts() -> dict[str, dict]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {r["alert"]: r for g in groups for r in g["rules"] if "alert" in r}


def recording_rules() -> dict[str, dict]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {r["record"]: r for g in groups for r in g["rules"] if "record" in r}


def test_config_is_valid_with_the_rules(tmp_path):
    promtool("check", "config", str(CONFIG))
    # The shipped rule_files glob points inside the container; check the pair together.
    cfg = yaml.safe_load(CONFIG.read_text())
    assert cfg["rule_files"] == ["/etc/prometheus/rules/*.rules.yml"]
    cfg["rule_files"] = [str(RULES)]
    copy = tmp_path / "prometheus.yml"
    copy.write_text(yaml.safe_dump(cfg))
    out = promtool("check", "config", str(copy))
    assert f"{len(alerts()) + len(recording_rules())} rules found" in out


def test_scrape_jobs_are_the_documented_ports():
    text = CONFIG.read_text()
    cfg = yaml.safe_load(text)
    jobs = {j["job_name"]: j["static_configs"][0]["targets"] for j in cfg["scrape_configs"]}
    assert jobs == {job: [addr] for job, addr in JOBS.items()}
    header = text.split("\nglobal:")[0]
    for addr in JOBS.values():
        assert addr in header, f"{addr} missing from the comment at the top of prometheus.yml"


def test_rules_are_valid():
    out = promtool("check", "rules", str(RULES))
    assert "SUCCESS" in out


def test_rules_unit_tests_pass():
    out = promtool("test", "rules", RULE_TESTS.name, cwd=RULE_TESTS.parent)
    assert "SUCCESS" in out


def test_alerts_are_the_ones_asked_for_and_well_formed():
    assert set(alerts()) == {"TightwadProxyDown", "TightwadDraftDown", "TightwadTargetDown",
                             "TightwadAcceptanceCollapse", "TightwadFallbacksRising"}
    for name, rule in alerts().items():
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        assert rule.get("for"), f"{name}: an alert needs `for:` so one bad scrape does not page"
        assert rule["annotations"].get("summary") and rule["annotations"].get("description"), name


def test_every_alert_is_tested_firing_and_quiet():
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in tests:
        for check in case.get("alert_rule_test", []):
            (firing if check["exp_alerts"] else quiet).add(check["alertname"])
    assert firing == set(alerts()), f"alerts never shown firing: {set(alerts()) - firing}"
    assert quiet == set(alerts()), f"alerts never shown quiet: {set(alerts()) - quiet}"


def test_every_recording_rule_is_named_and_unit_tested():
    recorded = set(recording_rules())
    assert {"tightwad:acceptance_rate:rate5m", "tightwad:mean_acceptance_length:rate5m",
            "tightwad:acceptance_rate_by_position:rate5m", "tightwad:tokens_saved_per_second:rate5m"} <= recorded
    for name in recorded:
        assert re.fullmatch(r"tightwad:[a-z_]+:rate(5m|1h)", name), f"{name}: use tightwad:<what>:<window>"
    tested = RULE_TESTS.read_text()
    # The rates the alerts use are exercised through the alerts themselves.
    for name in recorded - {"tightwad:acceptance_rate:rate1h", "tightwad:draft_tokens:rate5m",
                            "tightwad:fallbacks:rate5m"}:
        assert f"expr: {name}" in tested or f"({name})" in tested, f"{name} has no promql_expr_test"
