"""Metrics end to end: the exporters' shape, then a real Prometheus on real traffic.

The unit tests use fresh registries and ``get_sample_value``. The live tests
start a draft llama-server (``--metrics``), the verifier and the proxy on a
tiny medium-acceptance pair, a stand-in serving ``OrchestratorMetrics`` (the
orchestrator does not exist yet; its names are fixed in
``orchestrator/metrics.py``) and Debian's ``prometheus`` with
``images/prometheus/prometheus.yml`` (every job kept, its targets pointed at
127.0.0.1, 1 s scrapes) and the real rule file. Then, after a little real
speculative traffic through the OpenAI client:

* every PromQL expression of every dashboard panel, every recording rule and
  every alert parses and (for panels and recordings) returns data, and every
  ``{{label}}`` in a panel's legend is on the series it returns;
* the recorded acceptance rate and mean acceptance length agree with
  ``GET /v1/tightwad/status`` within 2%, and the cumulative counters equal it;
* every metric name a dashboard or rule reads is exported by the code (the
  live ``/metrics`` of proxy, verifier and draft, and ``OrchestratorMetrics``),
  and every label a selector matches on exists.

Run with ``-s`` to see each panel's query and the value it returned.
"""

from __future__ import annotations

import contextlib
import math
import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest, start_http_server
from servers import ServerProcess, free_port, proxy, write_proxy_config
from test_dashboards import (
    DASHBOARDS,
    PROMETHEUS_NAMES,
    dashboard_queries,
    metric_names,
    selectors,
    substitute,
)
from test_dashboards import load as load_dashboard
from test_prometheus_rules import CONFIG, RULES, alerts, binary, recording_rules

from tightwad.generation import RoundRecord
from tightwad.metrics import ENDPOINTS, ProxyMetrics
from tightwad.orchestrator.metrics import GIB, MODEL_STATES, OrchestratorMetrics
from tightwad.speculation.types import RoundResult
from tightwad.verifier.service import VerifierMetrics

RATE_INTERVAL = "15s"  # $__rate_interval for 1 s scrapes, with room for a slow machine
PROMPTS = [
    "Write a Python function that reverses a string.",
    "def fibonacci(n):",
    "List the first five prime numbers, one per line.",
    "The quick brown fox",
    "Explain what a hash map is in one sentence.",
    "SELECT name FROM users WHERE",
    "Once upon a time, in a small village,",
    "class Stack:\n    def __init__(self):",
]
MAX_TOKENS = 32


# --------------------------------------------------------------------------------- unit


def _round(drafter: str | None, mask: list[bool], n_emitted: int) -> RoundRecord:
    n_accepted = next((i for i, ok in enumerate(mask) if not ok), len(mask))
    result = RoundResult(tokens=list(range(n_accepted + 1)), n_drafted=len(mask), n_accepted=n_accepted,
                         accepted_mask=mask)
    return RoundRecord(drafter=drafter, result=result,
                       n_emitted=n_emitted, draft_s=0.01 if drafter else None, verify_s=0.02, round_s=0.03)


def test_round_counters_follow_vllms_shape():
    m = ProxyMetrics(model="m", target_backend="verifier", registry=CollectorRegistry())
    m.init_drafter("d")
    get = m.registry.get_sample_value
    assert get("tightwad_spec_decode_num_drafts_total", {"model": "m", "drafter": "d"}) == 0
    assert get("tightwad_fallbacks_total", {"model": "m", "drafter": "d", "reason": "timeout"}) == 0
    m.observe_round(_round("d", [True, True, False, False], 3))
    m.observe_round(_round("d", [True, False, False, False], 2))
    m.observe_round(_round(None, [], 1))  # the drafter was down: the target alone
    d = {"model": "m", "drafter": "d"}
    assert get("tightwad_spec_decode_num_drafts_total", d) == 2
    assert get("tightwad_spec_decode_num_draft_tokens_total", d) == 8
    assert get("tightwad_spec_decode_num_accepted_tokens_total", d) == 3
    assert get("tightwad_spec_decode_num_accepted_tokens_per_pos_total", {**d, "position": "0"}) == 2
    assert get("tightwad_spec_decode_num_accepted_tokens_per_pos_total", {**d, "position": "1"}) == 1
    assert get("tightwad_spec_decode_num_accepted_tokens_per_pos_total", {**d, "position": "2"}) is None
    assert get("tightwad_spec_decode_num_emitted_tokens_total", d) == 5
    assert get("tightwad_rounds_total", {"model": "m", "drafter": "none"}) == 1
    assert get("tightwad_tokens_per_round_bucket", {**d, "le": "2.0"}) == 1
    assert get("tightwad_draft_latency_seconds_count", d) == 2
    assert get("tightwad_verify_latency_seconds_count", {"model": "m", "target": "verifier"}) == 3


def test_bind_model_relabels_and_drops_only_empty_series():
    m = ProxyMetrics(model="target", target_backend="verifier", registry=CollectorRegistry())
    m.init_drafter("d")
    m.backend_up.labels(model="target", role="target", name="target", backend="verifier").set(0)
    m.observe_request("/v1/completions", 503)  # refused while the target was loading
    m.bind_model("qwen")
    get = m.registry.get_sample_value
    assert get("tightwad_backend_up", {"model": "target", "role": "target", "name": "target",
                                       "backend": "verifier"}) is None
    assert get("tightwad_spec_decode_num_drafts_total", {"model": "target", "drafter": "d"}) is None
    assert get("tightwad_spec_decode_num_drafts_total", {"model": "qwen", "drafter": "d"}) == 0
    assert get("tightwad_fallbacks_total", {"model": "qwen", "drafter": "d", "reason": "error"}) == 0
    # A count is history: it stays under the name it was made with.
    assert get("tightwad_requests_total", {"model": "target", "endpoint": "/v1/completions",
                                           "status": "503"}) == 1
    m.observe_round(_round("d", [True], 2))
    assert get("tightwad_rounds_total", {"model": "qwen", "drafter": "d"}) == 1


def test_label_values_stay_bounded():
    m = ProxyMetrics(model="m", target_backend="verifier", registry=CollectorRegistry())
    for path in (*ENDPOINTS, "/v1/nope-1", "/v1/nope-2", "/admin"):
        m.observe_request(path, 404)
    m.observe_fallback("d", "something new")
    m.observe_round(_round("d", [True] * 100, 101))
    text = generate_latest(m.registry).decode()
    endpoints = set(re.findall(r'endpoint="([^"]*)"', text))
    assert endpoints == {*ENDPOINTS, "other"}
    assert set(re.findall(r'reason="([^"]*)"', text)) == {"error"}
    assert len(set(re.findall(r'position="([^"]*)"', text))) == 64

    v = VerifierMetrics(CollectorRegistry(), "t")
    v.observe_request("/v1/tightwad/verify", 200)
    v.observe_request("/random", 404)
    assert v.registry.get_sample_value(
        "tightwad_verifier_requests_total", {"model": "t", "endpoint": "other", "status": "404"}) == 1


def test_orchestrator_metrics():
    o = OrchestratorMetrics()
    o.init_model("big")
    o.init_gpu("gaming-pc", "RTX 4070 Ti Super", "nvidia", 16)
    get = o.registry.get_sample_value
    assert get("tightwad_orchestrator_swaps_total", {"model": "big", "result": "failed"}) == 0
    assert get("tightwad_orchestrator_model_state", {"model": "big", "state": "stopped"}) == 1
    assert get("tightwad_orchestrator_gpu_vram_total_bytes",
               {"host": "gaming-pc", "gpu": "RTX 4070 Ti Super", "vendor": "nvidia"}) == 16 * GIB
    o.set_model_state("big", "ready")
    assert [get("tightwad_orchestrator_model_state", {"model": "big", "state": s}) for s in MODEL_STATES] \
        == [0, 0, 1, 0, 0]
    o.observe_swap("big", 42.0, ok=True)
    assert get("tightwad_orchestrator_swaps_total", {"model": "big", "result": "ok"}) == 1
    assert get("tightwad_orchestrator_swap_duration_seconds_bucket", {"model": "big", "le": "60.0"}) == 1
    with pytest.raises(ValueError, match="state must be one of"):
        o.set_model_state("big", "loading")
    # Two instances never share series (no global registry).
    assert OrchestratorMetrics().registry is not o.registry


# --------------------------------------------------------------------------------- live


def exported_names(text: str) -> set[str]:
    """Every sample name an exposition can carry: TYPE'd families and the samples present."""
    names = set()
    for line in text.splitlines():
        if m := re.match(r"# TYPE (\S+) (\w+)", line):
            name, kind = m.groups()
            names.add(name)
            if kind == "counter":
                names |= {name + "_total", name + "_created"}
            elif kind == "histogram":
                names |= {name + s for s in ("_bucket", "_sum", "_count", "_created")}
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


class Prometheus:
    def __init__(self, server: ServerProcess):
        self.server = server
        self.url = server.url

    def _get(self, path: str, **params: object) -> dict:
        r = httpx.get(f"{self.url}{path}", params=params, timeout=30)
        body = r.json()
        assert body.get("status") == "success", f"{path} {params}: {body.get('error', body)}"
        return body["data"]

    def query(self, expr: str, at: float) -> list[dict]:
        return self._get("/api/v1/query", query=expr, time=at)["result"]

    def query_range(self, expr: str, start: float, end: float, step: float = 1.0) -> list[dict]:
        return self._get("/api/v1/query_range", query=expr, start=start, end=end, step=step)["result"]

    def value(self, expr: str, at: float) -> float:
        result = self.query(expr, at)
        assert len(result) == 1, f"{expr}: expected one series, got {result}"
        return float(result[0]["value"][1])


class Live:
    """The monitored stack after its traffic: what every live test reads."""

    prom: Prometheus
    proxy: ServerProcess
    draft: ServerProcess
    target: ServerProcess
    model: str
    start: float  # Prometheus's first scrape of the proxy (before any traffic)
    end: float  # every count scraped and recorded
    status: dict


def _prometheus_config(path: Path, rules: Path, targets: dict[str, str]) -> Path:
    cfg = yaml.safe_load(CONFIG.read_text())
    jobs = {j["job_name"] for j in cfg["scrape_configs"]}
    assert jobs == set(targets), f"prometheus.yml jobs {jobs} changed: update this test's targets"
    cfg["global"] = {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"}
    cfg["rule_files"] = [str(rules)]
    for job in cfg["scrape_configs"]:
        job["static_configs"] = [{"targets": [targets[job["job_name"]]]}]
    path.write_text(yaml.safe_dump(cfg))
    return path


def _orchestrator_standin() -> tuple[OrchestratorMetrics, object, int]:
    o = OrchestratorMetrics()
    port = free_port()
    server, _thread = start_http_server(port, addr="127.0.0.1", registry=o.registry)
    for model in ("qwen2.5-coder-32b-instruct", "qwen2.5-coder-1.5b-instruct"):
        o.init_model(model)
    for host, gpu, vendor, gb in (("nas", "Ryzen 7 5700G (RAM)", "cpu", 24),
                                  ("gaming-pc", "RTX 4070 Ti Super", "nvidia", 16),
                                  ("workstation", "RX 7900 XTX", "amd", 24)):
        o.init_gpu(host, gpu, vendor, gb)
        o.hosts_up.labels(host=host).set(1)
        o.workers_up.labels(host=host, worker=f"{host}-rpc").set(1)
    o.set_model_state("qwen2.5-coder-32b-instruct", "starting")
    return o, server, port


def _traffic(client: openai.OpenAI, orchestrator: OrchestratorMetrics, proxy_url: str) -> None:
    for i, prompt in enumerate(PROMPTS):
        chat, stream = bool(i % 2), bool(i // 2 % 2)
        sampled = {"temperature": 0.8, "seed": i} if i in (5, 6) else {"temperature": 0}
        if chat:
            kwargs = dict(model="tightwad", messages=[{"role": "user", "content": prompt}], max_tokens=MAX_TOKENS,
                          **sampled)
            if stream:
                assert list(client.chat.completions.create(**kwargs, stream=True))
            else:
                assert client.chat.completions.create(**kwargs).choices[0].message.content is not None
        else:
            kwargs = dict(model="tightwad", prompt=prompt, max_tokens=MAX_TOKENS, **sampled)
            if stream:
                assert list(client.completions.create(**kwargs, stream=True))
            else:
                assert client.completions.create(**kwargs).choices[0].text is not None
        if i == 2:  # the orchestrator's part, while the proxy works
            orchestrator.observe_swap("qwen2.5-coder-32b-instruct", 41.5, ok=True)
            orchestrator.set_model_state("qwen2.5-coder-32b-instruct", "ready")
            orchestrator.gpu_vram_used.labels(host="gaming-pc", gpu="RTX 4070 Ti Super",
                                              vendor="nvidia").set(13.2 * GIB)
        if i == 5:
            orchestrator.observe_swap("qwen2.5-coder-1.5b-instruct", 7.0, ok=False)
            orchestrator.workers_up.labels(host="workstation", worker="workstation-rpc").set(0)
    client.models.list()
    bad = httpx.post(f"{proxy_url}/v1/completions", json={"prompt": "x", "max_tokens": 0}, timeout=30)
    assert bad.status_code == 400


def _wait(what: str, check, timeout: float = 60.0):  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def live(servers, tmp_path_factory) -> Iterator[Live]:
    binary("prometheus")
    from tightwad import tinymodels

    draft_model, target_model = tinymodels.write_pair("medium")
    lv = Live()
    lv.draft = servers("llama-server", draft_model, "--parallel", "4", "--metrics")
    lv.target = servers("verifier", target_model, "--parallel", "4")
    tmp = tmp_path_factory.mktemp("metrics")
    with contextlib.ExitStack() as cleanup:
        port = free_port()
        cfg = write_proxy_config(tmp / "cluster.yaml", draft_url=lv.draft.url, target_url=lv.target.url,
                                 port=port)
        lv.proxy = proxy(cfg, port=port)
        cleanup.callback(lv.proxy.stop)
        lv.proxy.start()
        orchestrator, orch_server, orch_port = _orchestrator_standin()
        cleanup.callback(orch_server.shutdown)
        prom_port = free_port()
        host = lambda url: url.removeprefix("http://")  # noqa: E731
        prom_cfg = _prometheus_config(tmp / "prometheus.yml", RULES, {
            "proxy": host(lv.proxy.url), "target": host(lv.target.url), "draft": host(lv.draft.url),
            "orchestrator": f"127.0.0.1:{orch_port}", "prometheus": f"127.0.0.1:{prom_port}",
        })
        server = ServerProcess("prometheus", [
            binary("prometheus"), f"--config.file={prom_cfg}", f"--storage.tsdb.path={tmp / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=warn",
        ], port=prom_port, health="/-/ready")
        cleanup.callback(server.stop)
        server.start(timeout=60)
        lv.prom = Prometheus(server)

        def all_up() -> bool:
            targets = lv.prom._get("/api/v1/targets")["activeTargets"]
            return len(targets) == 5 and all(t["health"] == "up" for t in targets)

        _wait("every scrape target up", all_up)
        lv.start = time.time()
        client = openai.OpenAI(base_url=f"{lv.proxy.url}/v1", api_key="unused", timeout=600)
        _traffic(client, orchestrator, lv.proxy.url)
        lv.status = httpx.get(f"{lv.proxy.url}/v1/tightwad/status", timeout=30).json()
        (lv.model,) = lv.status["models"]

        # Wait until Prometheus holds the final counts, then for a rule evaluation after that.
        final = str(lv.status["models"][lv.model]["drafted_tokens"])
        _wait("the final counts in Prometheus", lambda: lv.prom.query(
            "sum(tightwad_spec_decode_num_draft_tokens_total)", time.time())[0]["value"][1] == final)
        time.sleep(3)
        lv.end = time.time()
        yield lv


def _finite(series: dict) -> list[float]:
    points = series.get("values") or [series["value"]]
    return [float(v) for _, v in points if math.isfinite(float(v))]


def _legend(fmt: str, labels: dict) -> str:
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), "?"), fmt)


def test_traffic_was_speculative_with_varied_acceptance(live):
    s = live.status["models"][live.model]
    print(f"\nstatus: {s['requests']} requests, {s['rounds']} rounds, acceptance {s['acceptance_rate']:.3f}, "
          f"mean acceptance length {s['mean_acceptance_length']:.3f}, tokens saved {s['tokens_saved']}, "
          f"per position {s['accepted_per_position']}")
    assert s["requests"] == len(PROMPTS)
    assert 0 < s["acceptance_rate"] < 0.95, "the medium pair should accept some drafts, not all"
    assert len(set(s["accepted_per_position"])) >= 3, "per-position acceptance should vary"


def test_proxy_exports_the_issue_metrics(live):
    text = httpx.get(f"{live.proxy.url}/metrics", timeout=30).text
    names = exported_names(text)
    for name in (
        "tightwad_spec_decode_num_drafts_total", "tightwad_spec_decode_num_draft_tokens_total",
        "tightwad_spec_decode_num_accepted_tokens_total", "tightwad_spec_decode_num_accepted_tokens_per_pos_total",
        "tightwad_tokens_per_round_bucket", "tightwad_draft_latency_seconds_bucket",
        "tightwad_verify_latency_seconds_bucket", "tightwad_round_latency_seconds_bucket",
        "tightwad_time_to_first_token_seconds_bucket", "tightwad_inter_token_latency_seconds_bucket",
        "tightwad_e2e_request_latency_seconds_bucket", "tightwad_requests_total", "tightwad_fallbacks_total",
        "tightwad_backend_up", "tightwad_requests_in_flight",
    ):
        assert name in names, f"the proxy does not export {name}"
    statuses = {(r["metric"]["endpoint"], r["metric"]["status"])
                for r in live.prom.query('tightwad_requests_total{job="proxy"}', live.end)}
    assert {("/v1/completions", "200"), ("/v1/chat/completions", "200"), ("/v1/models", "200"),
            ("/v1/completions", "400")} <= statuses
    up = {(r["metric"]["role"], r["value"][1]) for r in live.prom.query("tightwad_backend_up", live.end)}
    assert up == {("draft", "1"), ("target", "1")}
    labels = {k for r in live.prom.query('{job="proxy", __name__=~"tightwad_.*"}', live.end)
              for k in r["metric"]} - {"__name__", "job", "instance", "le"}
    assert labels <= {"model", "drafter", "target", "backend", "role", "name", "position", "reason",
                      "endpoint", "status"}, "a label beyond the few the dashboards know"


def test_every_proxy_series_carries_the_same_model(live):
    models = {r["metric"]["model"] for r in live.prom.query('count by (model) ({job="proxy", model!=""})', live.end)}
    assert models == {live.model}, (
        f"the proxy labels its series with models {sorted(models)}, its status says {live.model!r}: "
        "ProxyRuntime.ensure_ready must call self.metrics.bind_model(self.model_name) once the target's "
        "info is known, or the dashboards' $model variable splits one model in two")


def test_verifier_and_draft_export_their_metrics(live):
    get = live.prom.query
    verify = get('tightwad_verifier_requests_total{endpoint="/v1/tightwad/verify", status="200"}', live.end)
    assert verify and float(verify[0]["value"][1]) > 0
    assert not get('tightwad_verifier_requests_total{endpoint=~"/health|/metrics"}', live.end)
    assert float(get("tightwad_verifier_tokens_evaluated_total", live.end)[0]["value"][1]) > 0
    assert get("tightwad_verifier_requests_in_flight", live.end)[0]["value"][1] == "0"
    assert float(get('llamacpp:tokens_predicted_total{job="draft"}', live.end)[0]["value"][1]) > 0


def test_recorded_acceptance_agrees_with_the_status_endpoint(live):
    assert live.end - live.start < 280, "the test window outgrew the 5-minute recording windows"
    s = live.status["models"][live.model]
    at = live.end
    # One model and one drafter served the traffic: one recorded series each.
    recorded = live.prom.value("tightwad:acceptance_rate:rate5m", at)
    length = live.prom.value("tightwad:mean_acceptance_length:rate5m", at)
    print(f"\nacceptance rate: recorded {recorded:.4f}, status {s['acceptance_rate']:.4f}; "
          f"mean acceptance length: recorded {length:.4f}, status {s['mean_acceptance_length']:.4f}")
    assert recorded == pytest.approx(s["acceptance_rate"], rel=0.02)
    assert length == pytest.approx(s["mean_acceptance_length"], rel=0.02)
    # The cumulative counters are the status endpoint's totals, exactly.
    total = lambda metric: live.prom.value(f"sum({metric})", at)  # noqa: E731
    assert total("tightwad_spec_decode_num_draft_tokens_total") == s["drafted_tokens"]
    assert total("tightwad_spec_decode_num_accepted_tokens_total") == s["accepted_tokens"]
    assert total("tightwad_rounds_total") == s["rounds"]
    assert total("tightwad_spec_decode_num_emitted_tokens_total") - total("tightwad_rounds_total") \
        == s["tokens_saved"]
    per_pos = {int(r["metric"]["position"]): float(r["value"][1]) for r in live.prom.query(
        "sum by (position) (tightwad_spec_decode_num_accepted_tokens_per_pos_total)", at)}
    assert [per_pos.get(i, 0) for i in range(len(s["accepted_per_position"]))] == s["accepted_per_position"]
    assert all(v == 0 for i, v in per_pos.items() if i >= len(s["accepted_per_position"]))


def test_recording_rules_return_data(live):
    print()
    for name, rule in recording_rules().items():
        direct = live.prom.query(rule["expr"], live.end)
        recorded = live.prom.query(name, live.end)
        assert direct, f"{name}: its expression returns nothing on live data"
        assert recorded, f"{name}: nothing recorded"
        values = [v for r in recorded for v in _finite(r)]
        assert values, f"{name}: only NaN recorded"
        print(f"rule {name} = {', '.join(f'{v:.4g}' for v in values[:4])}")


def test_alerts_stay_quiet_on_the_live_stack(live):
    """Backends up and acceptance steady: those alert expressions return nothing. A
    fallback is real traffic's doing, so its ratio is checked against the status."""
    for name, rule in alerts().items():
        result = live.prom.query(rule["expr"], live.end)
        if name != "TightwadFallbacksRising":
            assert result == [], f"{name} would fire on a healthy stack: {result}"
            continue
        fallbacks = live.status["models"][live.model]["fallbacks"]
        print(f"\nfallbacks in the status: {fallbacks}; alert expression: {result}")
        assert bool(result) == bool(fallbacks), f"{name}: {result} against the status's {fallbacks}"
    firing = live.prom.query('ALERTS{alertname=~"Tightwad.*", alertstate="firing"}', live.end)
    assert firing == [], "an alert fired within minutes, past its `for:`"


@pytest.mark.parametrize("dashboard", sorted(DASHBOARDS))
def test_every_panel_query_returns_data(live, dashboard):
    range_ = f"{math.ceil(live.end - live.start) + 2}s"
    print()
    empty = []
    for panel, target in dashboard_queries(load_dashboard(dashboard)):
        expr = substitute(target["expr"], rate_interval=RATE_INTERVAL, range_=range_)
        if target.get("instant"):
            result = live.prom.query(expr, live.end)
        else:
            result = live.prom.query_range(expr, live.start, live.end)
        shown = []
        for series in result:
            legend = target.get("legendFormat", "")
            for label in re.findall(r"\{\{\s*(\w+)\s*\}\}", legend):
                assert label in series["metric"], \
                    f"{dashboard}/{panel['title']!r}: legend {{{{{label}}}}} is not a label of {series['metric']}"
            values = _finite(series)
            if values:
                peak = "" if target.get("instant") else f" (max {max(values):.4g})"
                shown.append(f"{_legend(legend, series['metric'])}={values[-1]:.4g}{peak}")
        print(f"{dashboard} | {panel['title']} | {target['refId']} | {target['expr']} | "
              f"{'; '.join(shown[:6]) or 'NO DATA'}")
        if not shown:
            empty.append(f"{panel['title']!r} {target['refId']}: {expr}")
    assert not empty, f"{dashboard}: panel queries without data:\n" + "\n".join(empty)


def _used_names() -> tuple[set[str], list[tuple[str, list[str]]]]:
    exprs = [t["expr"] for name in DASHBOARDS for _, t in dashboard_queries(load_dashboard(name))]
    exprs += [r["expr"] for r in (*recording_rules().values(), *alerts().values())]
    for name in DASHBOARDS:
        for var in load_dashboard(name)["templating"]["list"]:
            if m := re.match(r"label_values\((\w+)", str(var.get("query", ""))):
                exprs.append(m.group(1))
    names = set().union(*(metric_names(e) for e in exprs))
    return names, [sel for e in exprs for sel in selectors(e)]


def test_dashboards_and_rules_read_only_exported_names(live):
    exported = set(PROMETHEUS_NAMES) | set(recording_rules())
    for url in (live.proxy.url, live.target.url, live.draft.url):
        exported |= exported_names(httpx.get(f"{url}/metrics", timeout=30).text)
    # The orchestrator's names from its class: a fresh instance, nothing observed.
    exported |= exported_names(generate_latest(OrchestratorMetrics().registry).decode())
    used, _ = _used_names()
    missing = sorted(used - exported)
    assert not missing, f"dashboards or rules read metrics no code exports: {missing}"
    assert any(n.startswith("llamacpp:") for n in used) and any(n.startswith("tightwad_orchestrator_")
                                                                for n in used)


def test_every_selector_label_exists(live):
    _, sels = _used_names()
    for metric, labels in sels:
        for label in labels:
            found = live.prom.query(f'count({{__name__="{metric}", {label}!=""}})', live.end)
            assert found, f"no {metric} series has a {label!r} label"
