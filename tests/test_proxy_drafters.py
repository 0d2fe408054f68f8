"""Several drafters and pipelined drafting through the whole proxy, against real servers.

Two real llama-server drafters (the tiny medium pair's draft, and a second one
running the target model itself, which agrees with the target almost always)
draft in parallel for a strict-mode verifier. Output must equal the target alone;
wins must be counted per drafter; killing one drafter mid-stream must cost only
speed. Pipelining must give the same output and report its prefetch hits.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from servers import ServerProcess, free_port, llama_server, proxy
from test_proxy_api import (
    LONG_PROMPT,
    PROMPTS,
    TIMEOUT,
    TargetAlone,
    client,
    metric,
    status,
)

MAX_TOKENS = 24


def write_config(path: Path, *, drafters: dict[str, str], target_url: str, port: int,
                 extra: str = "") -> Path:
    listed = "".join(f"    - name: {name}\n      url: {url}\n" for name, url in drafters.items())
    path.write_text(f"""proxy:
  host: 127.0.0.1
  port: {port}
  mode: strict
  max_draft_tokens: 4
  draft_timeout_s: 20
{extra}  drafters:
{listed}  target:
    url: {target_url}
""")
    return path


@pytest.fixture(scope="module")
def pair() -> tuple[Path, Path]:
    from tightwad import tinymodels

    return tinymodels.write_pair("medium")


@pytest.fixture(scope="module")
def target(servers, pair) -> ServerProcess:
    return servers("verifier", pair[1], "--parallel", "4", "--strict")


@pytest.fixture(scope="module")
def ref(target) -> TargetAlone:
    return TargetAlone(target.url)


@pytest.fixture()
def start_proxy(tmp_path) -> Iterator:
    started: list[ServerProcess] = []

    def start(drafters: dict[str, str], target_url: str, extra: str = "") -> ServerProcess:
        port = free_port()
        cfg = write_config(tmp_path / f"cluster-{port}.yaml", drafters=drafters, target_url=target_url,
                           port=port, extra=extra)
        server = ServerProcess("proxy", proxy(cfg, port=port).argv, port=port)
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()


def _complete(server: ServerProcess, prompt: str, max_tokens: int = MAX_TOKENS) -> dict:
    r = client(server).completions.create(model="tightwad", prompt=prompt, max_tokens=max_tokens,
                                          temperature=0, extra_body={"return_tokens": True})
    return r.model_extra["tightwad"]


def test_drafters_in_parallel_equal_the_target_alone_and_wins_are_counted(servers, pair, target, ref,
                                                                           start_proxy):
    weak = servers("llama-server", pair[0], "--parallel", "4")
    strong = servers("llama-server", pair[1], "--parallel", "4")  # the target model itself
    server = start_proxy({"weak": weak.url, "strong": strong.url}, target.url)
    for prompt in PROMPTS[:4]:
        got = _complete(server, prompt)
        assert got["tokens"] == ref.complete(prompt, MAX_TOKENS).tokens, prompt
        assert got["fallbacks"] == []
    state = status(server)
    won = state["drafter_rounds_won"]
    # Both were asked every round; the target model drafting for itself wins nearly all.
    assert won.get("strong", 0) > 3 * won.get("weak", 0) and won["strong"] > 0
    assert state["drafter_wins"]["strong"] > 0
    for name in ("weak", "strong"):
        assert metric(server.url, "tightwad_drafter_rounds_won_total", drafter=name) == won.get(name, 0)
    # Alone, the weak drafter accepts far less: the strong one's wins are real.
    weak_only = start_proxy({"weak": weak.url}, target.url)
    alone = [_complete(weak_only, p) for p in PROMPTS[:4]]
    together = status(server)
    assert (together["accepted_tokens"] / together["drafted_tokens"]
            > sum(a["accepted"] for a in alone) / sum(a["drafted"] for a in alone))


def test_sampled_requests_draft_with_the_first_drafter_only(servers, pair, target, start_proxy):
    weak = servers("llama-server", pair[0], "--parallel", "4")
    strong = servers("llama-server", pair[1], "--parallel", "4")
    server = start_proxy({"weak": weak.url, "strong": strong.url}, target.url)
    r = client(server).completions.create(model="tightwad", prompt=PROMPTS[0], max_tokens=MAX_TOKENS,
                                          temperature=0.8, seed=3, extra_body={"return_tokens": True})
    assert r.model_extra["tightwad"]["drafted"] > 0
    assert status(server)["drafter_rounds_won"] == {}
    assert metric(server.url, "tightwad_spec_decode_num_draft_tokens_total", drafter="strong") == 0


def test_killing_one_drafter_mid_stream_costs_only_speed(servers, pair, target, ref, start_proxy):
    doomed = llama_server(pair[1], "--parallel", "2").start()
    try:
        other = servers("llama-server", pair[0], "--parallel", "4")
        server = start_proxy({"doomed": doomed.url, "other": other.url}, target.url)
        want = ref.complete(LONG_PROMPT, 96)
        body = {"prompt": LONG_PROMPT, "max_tokens": 96, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}, "return_tokens": True}
        chunks = []
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=TIMEOUT) as r:
            lines = (line for line in r.iter_lines() if line)
            for line in lines:
                chunks.append(line[len("data: "):])
                if len(chunks) == 2:
                    doomed.kill()
                    break
            chunks += [line[len("data: "):] for line in lines]
        assert chunks[-1] == "[DONE]"
        events = [json.loads(c) for c in chunks[:-1]]
        tokens = [t for e in events for t in e.get("tightwad", {}).get("tokens", [])]
        assert tokens == want.tokens
        figures = events[-1]["tightwad"]
        # The request went on with the other drafter: no fallback to the target alone.
        assert figures["fallbacks"] == []
        assert metric(server.url, "tightwad_drafter_errors_total", drafter="doomed") == 1
        assert metric(server.url, "tightwad_spec_decode_num_draft_tokens_total", drafter="other") > 0
        # And the next request simply uses the one that is left.
        again = _complete(server, PROMPTS[1])
        assert again["tokens"] == ref.complete(PROMPTS[1], MAX_TOKENS).tokens
        assert again["fallbacks"] == [] and again["drafted"] > 0
    finally:
        doomed.stop()


@pytest.mark.parametrize("pipeline", [True, False])
def test_pipelined_drafting_is_exact_and_reports_its_hits(servers, pair, target, ref, start_proxy,
                                                          pipeline):
    draft = servers("llama-server", pair[1], "--parallel", "4")  # agrees often: prefetches hit
    server = start_proxy({"draft": draft.url}, target.url, extra=f"  pipeline_drafts: {str(pipeline).lower()}\n")
    for prompt in PROMPTS[:3]:
        assert _complete(server, prompt)["tokens"] == ref.complete(prompt, MAX_TOKENS).tokens
    hits = status(server)["pipeline_hits"]
    assert hits == metric(server.url, "tightwad_pipeline_hits_total")
    assert (hits > 0) if pipeline else (hits == 0)
