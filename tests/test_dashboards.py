"""The Grafana files: provisioning, and both dashboards' structure.

Each dashboard is validated against the JSON Schema of Grafana's dashboard
model (``tests/grafana/dashboard.schema.json``, generated once from npm
``@grafana/schema`` by ``tests/grafana/make-schema.sh``; strict about unknown
keys), then checked for what the schema cannot see: unique ids, a grid
without overlaps, every query on the ``datasource`` variable, the ``model``
variable applied to every proxy metric. Whether each panel's PromQL returns
data from a real Prometheus scraping the real proxy, and whether every metric
name exists in the code, is checked in ``test_metrics.py``.

The PromQL helpers here (``dashboard_queries``, ``metric_names``,
``selectors``, ``substitute``) are shared with ``test_metrics.py``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
GRAFANA = ROOT / "grafana"
DASHBOARDS = {p.stem: p for p in sorted((GRAFANA / "dashboards").glob("*.json"))}
SCHEMA = Path(__file__).resolve().parent / "grafana" / "dashboard.schema.json"
DATASOURCE_REF = {"type": "prometheus", "uid": "${datasource}"}

# PromQL words that look like metric names but are not.
_KEYWORDS = {
    "and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
    "offset", "bool", "inf", "nan", "atan2",
}
# Names Prometheus makes itself (not exported by any of our services).
PROMETHEUS_NAMES = {"up", "scrape_duration_seconds", "scrape_samples_scraped", "ALERTS", "ALERTS_FOR_STATE"}


def load(name: str) -> dict:
    return json.loads(DASHBOARDS[name].read_text())


def panels(dashboard: dict) -> Iterator[dict]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def dashboard_queries(dashboard: dict) -> Iterator[tuple[dict, dict]]:
    """(panel, target) for every Prometheus query of every panel."""
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            yield panel, target


def substitute(expr: str, *, rate_interval: str, range_: str) -> str:
    """Grafana's variables as a test query needs them: every model, fixed windows."""
    out = expr.replace("$__rate_interval", rate_interval).replace("$__range", range_)
    out = re.sub(r"\$\{?(model|host)\}?", ".*", out)
    assert "$" not in out, f"unsubstituted variable in {out}"
    return out


def _strip(expr: str) -> str:
    """The expression without strings, label matchers, ranges and label lists."""
    out = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    out = re.sub(r"\{[^}]*\}", " ", out)
    out = re.sub(r"\[[^\]]*\]", " ", out)
    return re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", out)


def metric_names(expr: str) -> set[str]:
    """Metric names an expression reads (identifiers that are not functions or keywords)."""
    names = set()
    for m in re.finditer(r"(?<![\w.:$])([a-zA-Z_:][\w:]*)(\s*\()?", _strip(expr)):
        name, call = m.group(1), m.group(2)
        if call or name.lower() in _KEYWORDS or re.fullmatch(r"\d+[smhdwy]", name):
            continue
        names.add(name)
    return names


def selectors(expr: str) -> Iterator[tuple[str, list[str]]]:
    """(metric, label names matched) for every ``metric{...}`` selector."""
    for m in re.finditer(r"([a-zA-Z_:][\w:]*)\{([^}]*)\}", expr):
        labels = re.findall(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)", m.group(2))
        yield m.group(1), labels


def rule_groups() -> list[dict]:
    return yaml.safe_load((ROOT / "images/prometheus/rules/tightwad.rules.yml").read_text())["groups"]


def test_helpers_read_promql():
    expr = ('1 + sum by (model, drafter) (rate(tightwad_a_total{model=~"$model"}[$__rate_interval]))'
            ' / ignoring (position) group_left sum(rate(llamacpp:b_total[5m] offset 5m)) > bool 0.5'
            ' and on (model) tightwad:c:rate5m{drafter="x"} or vector(1)')
    assert metric_names(expr) == {"tightwad_a_total", "llamacpp:b_total", "tightwad:c:rate5m"}
    assert list(selectors(expr)) == [("tightwad_a_total", ["model"]), ("tightwad:c:rate5m", ["drafter"])]
    assert substitute("rate(x{model=~\"$model\"}[$__rate_interval])", rate_interval="10s", range_="60s") == \
        'rate(x{model=~".*"}[10s])'


@pytest.mark.parametrize("name", sorted(DASHBOARDS))
def test_dashboard_matches_grafana_schema(name):
    schema = json.loads(SCHEMA.read_text())
    validator = jsonschema.Draft7Validator(schema)
    errors = []
    for error in validator.iter_errors(load(name)):
        where = "/".join(map(str, error.absolute_path))
        # A panel fails an anyOf (panel | row): show why it fits neither.
        reasons = sorted({e.message[:160] for e in error.context or []})
        errors.append(f"{where}: {error.message[:160]}" + "".join(f"\n    {r}" for r in reasons))
    assert not errors, f"{name}.json does not match @grafana/schema's Dashboard:\n" + "\n".join(errors)


def test_both_dashboards_exist():
    assert set(DASHBOARDS) == {"speculation", "cluster"}


@pytest.mark.parametrize("name", sorted(DASHBOARDS))
def test_dashboard_layout_and_queries(name):
    d = load(name)
    assert d["uid"] == f"tightwad-{name}" and d["title"].startswith("Tightwad")
    ids = [p["id"] for p in panels(d)]
    assert len(ids) == len(set(ids)), f"duplicate panel ids in {name}"
    cells: set[tuple[int, int]] = set()
    for p in panels(d):
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, f"{p['title']!r} leaves the 24-column grid"
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not mine & cells, f"{p['title']!r} overlaps another panel"
        cells |= mine
        if p["type"] == "row":
            continue
        assert p.get("title") and p.get("description"), f"a {p['type']} panel needs a title and a description"
        assert p["datasource"] == DATASOURCE_REF, f"{p['title']!r}: use the datasource variable"
        refs = [t["refId"] for t in p["targets"]]
        assert p["targets"] and len(refs) == len(set(refs)), f"{p['title']!r}: targets need unique refIds"
        for t in p["targets"]:
            assert t["datasource"] == DATASOURCE_REF and t["expr"].strip(), p["title"]
            assert metric_names(t["expr"]), f"{p['title']!r}: no metric in {t['expr']}"


def test_model_variable_filters_every_proxy_query():
    d = load("speculation")
    variables = {v["name"]: v for v in d["templating"]["list"]}
    model = variables["model"]
    assert model["type"] == "query" and model["includeAll"] and model["allValue"] == ".*"
    assert "tightwad_spec_decode_num_drafts_total" in model["query"]
    for panel, target in dashboard_queries(d):
        for metric, labels in selectors(target["expr"]):
            assert "model" in labels, f"{panel['title']!r}: {metric} is not filtered by $model"
        bare = metric_names(re.sub(r"[a-zA-Z_:][\w:]*\{[^}]*\}", "", target["expr"]))
        assert not bare, f"{panel['title']!r}: {sorted(bare)} not filtered by $model"


def test_speculation_dashboard_covers_the_issue():
    """The panels the issue asks for, by the metric each must read."""
    exprs = {p["title"]: " ".join(t["expr"] for t in p["targets"])
             for p in panels(load("speculation")) if p["type"] != "row"}
    needs = {
        "Acceptance rate by model and drafter": "tightwad_spec_decode_num_accepted_tokens_total",
        "Mean acceptance length and tokens per round": "tightwad_tokens_per_round_count",
        "Acceptance by draft position": "tightwad_spec_decode_num_accepted_tokens_per_pos_total",
        "Tokens saved per second": "tightwad_rounds_total",
        "Draft latency vs verify latency": "tightwad_verify_latency_seconds_bucket",
        "Fallbacks to the target alone": "tightwad_fallbacks_total",
        "Time to first token": "tightwad_time_to_first_token_seconds_bucket",
        "Inter-token latency": "tightwad_inter_token_latency_seconds_bucket",
    }
    for title, metric in needs.items():
        assert metric in exprs.get(title, ""), f"speculation dashboard: {title!r} should read {metric}"
    cluster = " ".join(t["expr"] for _, t in dashboard_queries(load("cluster")))
    for metric in ("tightwad_orchestrator_hosts_up", "tightwad_orchestrator_workers_up",
                   "tightwad_orchestrator_gpu_vram_used_bytes", "tightwad_orchestrator_swaps_total",
                   "tightwad_orchestrator_swap_duration_seconds_bucket", "tightwad_verifier_tokens_evaluated_total",
                   "llamacpp:tokens_predicted_total"):
        assert metric in cluster, f"cluster dashboard should read {metric}"


def test_provisioning_points_at_prometheus_and_the_dashboards():
    ds = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yml").read_text())
    (source,) = ds["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    prom = yaml.safe_load((ROOT / "images/prometheus/prometheus.yml").read_text())
    assert source["jsonData"]["timeInterval"] == prom["global"]["scrape_interval"]
    for name in DASHBOARDS:
        (var,) = [v for v in load(name)["templating"]["list"] if v["name"] == "datasource"]
        assert var["type"] == "datasource" and var["query"] == "prometheus"
        assert var["current"]["value"] == source["uid"], f"{name}: default datasource is not the provisioned one"
    provider = yaml.safe_load((GRAFANA / "provisioning/dashboards/tightwad.yml").read_text())
    (p,) = provider["providers"]
    assert p["type"] == "file" and p["options"]["path"].startswith("/var/lib/grafana/dashboards")
