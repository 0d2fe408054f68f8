"""Every draft and target backend through the whole proxy, against real servers.

Each proxy (``tightwad proxy serve``) must answer with exactly the target
alone's tokens whatever speaks to it: an Ollama drafter (the stand-in in
``ollama_standin.py``, forwarding to a real llama-server), an OpenAI
``/v1/completions`` drafter, a llama-server drafter of another model family
(switched to text), an ``openai-echo`` target and a stock llama-server target
(which can only confirm drafts by generating them). Status and ``/metrics``
must say how each drafter is spoken to and agree with the per-response
figures. SmolLM2-135M throughout; the cross-family case drafts for the Qwen
1.5B target.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from servers import ServerProcess, free_port
from test_proxy_api import (
    TIMEOUT,
    Reference,
    TargetAlone,
    client,
    gguf_chat_prompt,
    metric,
    proxy_factory,
    status,
)

PROMPTS = ["The capital of France is", "def add(a, b):"]
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def proxies(tmp_path_factory) -> Iterator[Callable[..., ServerProcess]]:
    with proxy_factory(tmp_path_factory) as start:
        yield start


@pytest.fixture(scope="module")
def smol_draft(servers, smollm) -> ServerProcess:
    return servers("llama-server", smollm, "--parallel", "4")


@pytest.fixture(scope="module")
def smol_target(servers, smollm) -> ServerProcess:
    return servers("verifier", smollm, "--parallel", "4", "--strict")


@pytest.fixture(scope="module")
def ollama(smol_draft) -> Iterator[ServerProcess]:
    port = free_port()
    argv = [sys.executable, str(Path(__file__).with_name("ollama_standin.py")), "--port", str(port),
            "--upstream", smol_draft.url, "--model", "smollm2:135m"]
    server = ServerProcess("ollama-standin", argv, port=port, health="/api/version").start(60)
    yield server
    server.stop()


def completions(server: ServerProcess, prompt: str, max_tokens: int = MAX_TOKENS) -> dict[str, Any]:
    r = client(server).completions.create(model="tightwad", prompt=prompt, max_tokens=max_tokens,
                                          temperature=0, extra_body={"return_tokens": True})
    return {"text": r.choices[0].text, "finish": r.choices[0].finish_reason, **r.model_extra["tightwad"]}


def assert_target_alone(server: ServerProcess, ref: TargetAlone, *, drafted: bool = True) -> list[dict]:
    """Every prompt through the proxy equals the target alone; returns the figures."""
    figures = []
    for prompt in PROMPTS:
        want = ref.complete(prompt, MAX_TOKENS)
        got = completions(server, prompt)
        assert got["tokens"] == want.tokens, f"{prompt!r}: {got['tokens']} != {want.tokens}"
        assert got["text"] == want.text and got["finish"] == want.finish
        assert got["fallbacks"] == []
        figures.append(got)
    if drafted:
        assert sum(f["drafted"] for f in figures) > 0, "the drafter was never used"
        assert sum(f["accepted"] for f in figures) > 0, "no draft was ever accepted"
    return figures


def drafter_status(server: ServerProcess) -> dict[str, Any]:
    (drafter,) = status(server)["drafters"]
    return drafter


# -- draft backends -------------------------------------------------------------------------


def test_llamacpp_draft_of_the_same_family_shares_token_ids(proxies, smol_draft, smol_target):
    server = proxies(smol_draft.url, smol_target.url)
    assert_target_alone(server, TargetAlone(smol_target.url))
    drafter = drafter_status(server)
    assert (drafter["backend"], drafter["tokenizer"], drafter["healthy"]) == ("llamacpp", "shared", True)


def test_ollama_draft_is_retokenized(proxies, ollama, smol_target):
    server = proxies(ollama.url, smol_target.url, draft_backend="ollama")
    assert_target_alone(server, TargetAlone(smol_target.url))
    drafter = drafter_status(server)
    assert (drafter["backend"], drafter["tokenizer"], drafter["healthy"]) == ("ollama", "retokenize", True)
    assert drafter["wins"] > 0


def test_openai_draft_is_retokenized(proxies, smol_draft, smol_target):
    server = proxies(smol_draft.url, smol_target.url, draft_backend="openai")
    assert_target_alone(server, TargetAlone(smol_target.url))
    drafter = drafter_status(server)
    assert (drafter["backend"], drafter["tokenizer"], drafter["healthy"]) == ("openai", "retokenize", True)


@pytest.mark.slow
def test_cross_family_draft_is_detected_and_retokenized(servers, proxies, smol_draft, qwen_target):
    """SmolLM2 cannot share ids with Qwen: its llama-server is spoken to in text."""
    target = servers("verifier", qwen_target, "--parallel", "4", "--strict")
    server = proxies(smol_draft.url, target.url)
    drafter = drafter_status(server)
    assert drafter["tokenizer"] == "retokenize" and drafter["backend"] == "openai"
    ref = TargetAlone(target.url)
    want = ref.complete(PROMPTS[0], 8)
    got = completions(server, PROMPTS[0], 8)
    assert got["tokens"] == want.tokens and got["text"] == want.text
    assert got["drafted"] > 0 and got["fallbacks"] == []


# -- target backends ------------------------------------------------------------------------


def test_openai_echo_target_equals_the_target_alone(proxies, smol_draft, smol_target):
    server = proxies(smol_draft.url, smol_target.url, target_backend="openai-echo")
    assert_target_alone(server, TargetAlone(smol_target.url))
    target = status(server)["target"]
    assert (target["backend"], target["verify_mode"]) == ("openai-echo", "one-pass")
    assert drafter_status(server)["tokenizer"] == "shared"
    assert metric(server.url, "tightwad_target_generate_only") == 0


def _llama_alone(url: str, prompt: list[int], n: int) -> list[int]:
    """A stock llama-server generating greedily on its own."""
    r = httpx.post(f"{url}/completion", json={
        "prompt": prompt, "n_predict": n, "temperature": 0, "top_k": 1, "samplers": ["top_k"],
        "return_tokens": True, "cache_prompt": False, "stop": [],
    }, timeout=TIMEOUT)
    r.raise_for_status()
    return r.json()["tokens"]


def test_llamacpp_target_is_exact_but_generate_only(servers, proxies, smollm, smol_draft, smol_target):
    target = servers("llama-server", smollm, "--parallel", "2")
    server = proxies(smol_draft.url, target.url, target_backend="llamacpp")
    ref = TargetAlone(smol_target.url)  # for tokenizing; the reference is the llama-server's own
    for prompt in PROMPTS:
        tokens = ref.tokenize(prompt, add_special=True)
        want = [t for t in _llama_alone(target.url, tokens, MAX_TOKENS) if t not in ref.eog]
        got = completions(server, prompt)
        assert got["tokens"] == want, f"{prompt!r}: {got['tokens']} != {want}"
        assert got["text"] == ref.detokenize(want) and got["drafted"] > 0
        # The text is worked out from pieces the proxy fetches: streamed too.
        chunks = list(client(server).completions.create(
            model="tightwad", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, stream=True))
        assert "".join(c.choices[0].text for c in chunks) == ref.detokenize(want)
    state = status(server)
    assert state["target"]["backend"] == "llamacpp" and state["target"]["verify_mode"] == "generate"
    assert "no speed-up" in state["target"]["note"]
    assert metric(server.url, "tightwad_target_generate_only") == 1


# -- figures --------------------------------------------------------------------------------


def test_status_and_metrics_agree_with_the_responses(proxies, smol_draft, smol_target, smollm):
    server = proxies(smol_draft.url, smol_target.url, max_draft_tokens=3)
    ref = TargetAlone(smol_target.url)
    api = client(server)
    figures = assert_target_alone(server, ref)
    messages = [{"role": "user", "content": "Name a colour."}]
    want: Reference = ref.chat(gguf_chat_prompt(smollm, messages), MAX_TOKENS)
    chunks = list(api.chat.completions.create(
        model="tightwad", messages=messages, max_tokens=MAX_TOKENS, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
    figures.append(chunks[-1].model_extra["tightwad"])

    drafted = sum(f["drafted"] for f in figures)
    accepted = sum(f["accepted"] for f in figures)
    rounds = sum(f["rounds"] for f in figures)
    state = status(server)
    assert state["requests"] == len(figures)
    assert (state["drafted_tokens"], state["accepted_tokens"], state["rounds"]) == (drafted, accepted, rounds)
    assert state["acceptance_rate"] == pytest.approx(accepted / drafted)
    assert state["drafters"][0]["wins"] == accepted
    for f in figures:
        assert f["acceptance_rate"] == pytest.approx(f["accepted"] / f["drafted"])
        assert (f["draft_n"], f["draft_n_accepted"]) == (f["drafted"], f["accepted"])
    assert metric(server.url, "tightwad_spec_decode_num_draft_tokens_total") == drafted
    assert metric(server.url, "tightwad_spec_decode_num_accepted_tokens_total") == accepted
    assert metric(server.url, "tightwad_rounds_total") == rounds
    per_position = sum(metric(server.url, "tightwad_spec_decode_num_accepted_tokens_per_pos_total",
                              position=str(i)) for i in range(3))
    assert per_position == accepted == sum(state["accepted_per_position"])
    completions_ok = metric(server.url, "tightwad_requests_total", endpoint="/v1/completions", status="200")
    assert completions_ok == len(PROMPTS)
