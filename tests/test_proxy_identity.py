"""The promise: the proxy's greedy output is the target alone's.

20+ varied prompts x both endpoints x streamed and not, through the official
``openai`` client, with the Qwen2.5-Coder pair and a tiny pair:

* strict mode: token for token equal to the verifier generating alone;
* fast mode: equal, or the first divergence is a near-tie: the target's own
  logprob gap between its token and the proxy's is within twice the batch
  noise measured on the same prompts (and that noise is below 1.0).

The target-alone reference is the verifier's own one-token-at-a-time
generation, which ``test_verifier_numerics`` shows equals stock llama-server.
"""

from __future__ import annotations

import httpx
import openai
import pytest
from servers import free_port, proxy, write_proxy_config

PROMPTS = [
    "Write a Python function that reverses a string.",
    "def fibonacci(n):",
    "List the first five prime numbers, one per line.",
    "What is 12 times 13?",
    "Explain what a hash map is in one sentence.",
    "Translate 'good morning' into French and Spanish.",
    "Write a haiku about the sea.",
    "SELECT name FROM users WHERE",
    "Give three tips for writing clear commit messages.",
    "Once upon a time, in a small village,",
    "Convert 100 degrees Fahrenheit to Celsius, showing the formula.",
    "import numpy as np\n\n# compute the mean of each column\n",
    "Name the planets of the solar system in order.",
    "Write a bash one-liner that counts lines in all .py files.",
    "What does HTTP status 404 mean?",
    "Summarise the plot of Romeo and Juliet in two sentences.",
    "class Stack:\n    def __init__(self):",
    "Is 97 a prime number? Answer yes or no and explain.",
    "Write a JSON object describing a book with title, author and year.",
    "The quick brown fox",
    "Explain recursion to a five-year-old.",
    "1, 1, 2, 3, 5, 8,",
]
QWEN_MAX = 16
TINY_MAX = 40
NOISE_CEILING = 1.0
_divergences: dict[str, list] = {}


def tokenize(url: str, text: str, *, add_special: bool) -> list[int]:
    return httpx.post(f"{url}/tokenize", json={"content": text, "add_special": add_special}).json()["tokens"]


def prompt_tokens(target_url: str, prompt: str, chat: bool) -> list[int]:
    if not chat:
        return tokenize(target_url, prompt, add_special=True)
    text = httpx.post(f"{target_url}/apply-template",
                      json={"messages": [{"role": "user", "content": prompt}]}).json()["prompt"]
    return tokenize(target_url, text, add_special=False)


_references: dict[tuple, dict] = {}


def target_alone(target_url: str, tokens: list[int], max_tokens: int) -> dict:
    """The target generating alone, one token at a time (the same in strict and fast mode,
    so each prompt's reference is computed once per model and reused)."""
    model = httpx.get(f"{target_url}/v1/tightwad/info").json()["model_path"]
    key = (model, tuple(tokens), max_tokens)
    if key not in _references:
        r = httpx.post(f"{target_url}/v1/tightwad/generate",
                       json={"tokens": tokens, "max_tokens": max_tokens, "top_logprobs": 20}, timeout=600)
        r.raise_for_status()
        _references[key] = r.json()
    return _references[key]


def visible(reference: dict, eog: set[int]) -> list[int]:
    return [t for t in reference["tokens"] if t not in eog]


def via_proxy(client: openai.OpenAI, prompt: str, *, chat: bool, stream: bool, max_tokens: int) -> list[int]:
    extra = {"return_tokens": True}
    if chat:
        kwargs = dict(model="tightwad", messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
                      temperature=0, extra_body=extra)
        if not stream:
            r = client.chat.completions.create(**kwargs)
            return r.model_extra["tightwad"]["tokens"]
        tokens: list[int] = []
        for chunk in client.chat.completions.create(**kwargs, stream=True):
            tokens += (chunk.model_extra.get("tightwad") or {}).get("tokens", [])
        return tokens
    kwargs = dict(model="tightwad", prompt=prompt, max_tokens=max_tokens, temperature=0, extra_body=extra)
    if not stream:
        return client.completions.create(**kwargs).model_extra["tightwad"]["tokens"]
    tokens = []
    for chunk in client.completions.create(**kwargs, stream=True):
        tokens += (chunk.model_extra.get("tightwad") or {}).get("tokens", [])
    return tokens


_noise: dict[tuple, float] = {}


def batch_noise(fast_url: str, tokens: list[int], reference: dict) -> float:
    """Largest logprob difference between one batched verify and sequential generation."""
    key = (fast_url, tuple(tokens))
    if key not in _noise:
        _noise[key] = _batch_noise(fast_url, tokens, reference)
    return _noise[key]


def _batch_noise(fast_url: str, tokens: list[int], reference: dict) -> float:
    ref = reference["tokens"]
    r = httpx.post(f"{fast_url}/v1/tightwad/verify",
                   json={"tokens": tokens, "draft": ref[:-1], "top_logprobs": 20}, timeout=600).json()
    noise = 0.0
    for pos, seq in zip(r["positions"], reference["positions"], strict=False):
        a, b = dict(map(tuple, pos["top_logprobs"])), dict(map(tuple, seq["top_logprobs"]))
        noise = max([noise] + [abs(a[t] - b[t]) for t in a.keys() & b.keys()])
    return noise


class Stack:
    def __init__(self, servers, tmp_path_factory, draft_model, target_model, mode: str, name: str):
        self.draft = servers("llama-server", draft_model, "--parallel", "4")
        self.target = servers("verifier", target_model, "--parallel", "4",
                              *(["--strict"] if mode == "strict" else []))
        port = free_port()
        cfg = write_proxy_config(tmp_path_factory.mktemp(name) / "cluster.yaml", draft_url=self.draft.url,
                                 target_url=self.target.url, port=port, mode=mode)
        self.proxy = proxy(cfg, port=port).start()
        self.client = openai.OpenAI(base_url=f"{self.proxy.url}/v1", api_key="unused", timeout=600)
        info = httpx.get(f"{self.target.url}/v1/tightwad/info").json()
        self.eog = set(info["eog_token_ids"])

    def stop(self) -> None:
        self.proxy.stop()


@pytest.fixture(scope="module", params=["qwen", "tiny"])
def family(request):
    return request.param


@pytest.fixture(scope="module")
def models_for(request, qwen_draft, qwen_target):
    def get(family: str):
        if family == "qwen":
            return qwen_draft, qwen_target, QWEN_MAX
        from tightwad import tinymodels

        draft, target = tinymodels.write_pair("medium")
        return draft, target, TINY_MAX

    return get


@pytest.fixture(scope="module")
def stacks(servers, tmp_path_factory, models_for):
    made: dict[tuple[str, str], Stack] = {}

    def get(family: str, mode: str) -> tuple[Stack, int]:
        draft, target, max_tokens = models_for(family)
        if (family, mode) not in made:
            made[family, mode] = Stack(servers, tmp_path_factory, draft, target, mode, f"{family}-{mode}")
        return made[family, mode], max_tokens

    yield get
    for stack in made.values():
        stack.stop()


@pytest.mark.timeout(2400)  # 22 prompts through a 1.5B model on two CPU cores
@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize("family", ["qwen", "tiny"])
def test_strict_mode_is_token_for_token_the_target_alone(stacks, family, chat, stream):
    stack, max_tokens = stacks(family, "strict")
    for prompt in PROMPTS:
        tokens = prompt_tokens(stack.target.url, prompt, chat)
        want = visible(target_alone(stack.target.url, tokens, max_tokens), stack.eog)
        got = via_proxy(stack.client, prompt, chat=chat, stream=stream, max_tokens=max_tokens)
        assert got == want, f"{prompt!r}: proxy {got} != target alone {want}"


@pytest.mark.timeout(2400)
@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize("family", ["qwen", "tiny"])
def test_fast_mode_diverges_only_at_near_ties(stacks, family, chat, stream):
    stack, max_tokens = stacks(family, "fast")
    noise = 0.0
    divergences = []
    for prompt in PROMPTS:
        tokens = prompt_tokens(stack.target.url, prompt, chat)
        reference = target_alone(stack.target.url, tokens, max_tokens)
        noise = max(noise, batch_noise(stack.target.url, tokens, reference))
        want = visible(reference, stack.eog)
        got = via_proxy(stack.client, prompt, chat=chat, stream=stream, max_tokens=max_tokens)
        if got == want:
            continue
        i = next(i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b)
        top = dict(map(tuple, reference["positions"][i]["top_logprobs"]))
        assert got[i] in top, f"{prompt!r}: diverged at {i} to a token outside the target's top 20"
        divergences.append((prompt, i, top[want[i]] - top[got[i]]))
    assert noise < NOISE_CEILING, f"batch noise {noise} is beyond what llama.cpp batching explains"
    for prompt, i, gap in divergences:
        assert gap <= 2 * noise, f"{prompt!r}: divergence at token {i} with a real gap {gap:.3f} > 2 x {noise:.3f}"
    _divergences[f"{family}-{'chat' if chat else 'completions'}-{'stream' if stream else 'plain'}"] = divergences
    print(f"\n{family} fast: {len(divergences)}/{len(PROMPTS)} prompts diverged (noise {noise:.3f}); "
          f"gaps {[round(g, 3) for *_, g in divergences]}")


def test_a_broken_acceptance_rule_fails_the_identity_check(servers, models_for, monkeypatch):
    """Accepting every drafted token (the 'tokenizers agree, so accept' mistake) is caught."""
    from servers import InProcessProxy

    from tightwad.speculation import RoundResult, loop

    def accept_everything(draft_tokens, target):  # noqa: ANN001, ANN202
        return RoundResult(tokens=[*draft_tokens, target[len(draft_tokens)].token],
                           n_drafted=len(draft_tokens), n_accepted=len(draft_tokens),
                           accepted_mask=[True] * len(draft_tokens))

    draft_path, target_path, max_tokens = models_for("tiny")
    draft = servers("llama-server", draft_path, "--parallel", "4")
    target = servers("verifier", target_path, "--parallel", "4", "--strict")
    eog = set(httpx.get(f"{target.url}/v1/tightwad/info").json()["eog_token_ids"])
    monkeypatch.setattr(loop, "accept_greedy", accept_everything)
    with InProcessProxy({"mode": "strict", "draft": {"url": draft.url}, "target": {"url": target.url}}) as p:
        client = openai.OpenAI(base_url=f"{p.url}/v1", api_key="unused")
        mismatches = 0
        for prompt in PROMPTS[:5]:
            want = visible(target_alone(target.url, prompt_tokens(target.url, prompt, False), max_tokens), eog)
            got = via_proxy(client, prompt, chat=False, stream=False, max_tokens=max_tokens)
            mismatches += got != want
    assert mismatches > 0, "accepting every draft token went unnoticed"
