"""Temperature > 0: the proxy's tokens follow the target's distribution exactly.

At a fixed context on a tiny draft/target pair whose distributions differ, we
draw many seeded samples of the first token through the proxy (so every one
went through a draft, a one-pass verify and the rejection rule) and compare
them with the target's exact distribution at that context (read from the
verifier) by a chi-square goodness-of-fit test. Two deliberately wrong rules,
patched into the running proxy, must fail the very same test:

* accept every drafted token (the output then follows the draft);
* on rejection, resample from the target instead of the residual.

The proxy runs in this process (uvicorn in a thread) so the rule can be patched;
its backends are the real llama-server and verifier.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import httpx
import pytest
from scipy.stats import chisquare
from servers import InProcessProxy

from tightwad import tinymodels
from tightwad.speculation import RoundResult, loop

N_SAMPLES = 600
TOP_K = 6  # both sides sample from their own top 6, so the categories are few
TEMPERATURE = 1.0


@pytest.fixture(scope="module")
def pair_servers(servers):
    draft_path, target_path = tinymodels.write_pair("medium")
    return servers("llama-server", draft_path, "--parallel", "2"), servers("verifier", target_path, "--parallel", "2")


@pytest.fixture(scope="module")
def proxy_url(pair_servers) -> Iterator[str]:
    draft, target = pair_servers
    with InProcessProxy({"max_draft_tokens": 4, "draft": {"url": draft.url, "backend": "llamacpp"},
                         "target": {"url": target.url, "backend": "verifier"}}) as proxy:
        yield proxy.url


def target_distribution(target_url: str, context: list[int]) -> dict[int, float]:
    greedy = httpx.post(f"{target_url}/v1/tightwad/verify",
                        json={"tokens": context, "draft": [], "top_logprobs": TOP_K}).json()
    top = [t for t, _ in greedy["positions"][0]["top_logprobs"]]
    r = httpx.post(f"{target_url}/v1/tightwad/verify", json={
        "tokens": context, "draft": [top[0]],
        "sampling": {"temperature": TEMPERATURE, "top_k": TOP_K, "seed": 0, "support": [top]},
    }).json()
    probs = dict(map(tuple, r["positions"][0]["probs"]))
    assert abs(sum(probs.values()) - 1) < 1e-6  # the whole support: top_k = TOP_K
    return probs


def draft_distribution(draft_url: str, context: list[int]) -> dict[int, float]:
    r = httpx.post(f"{draft_url}/completion", json={
        "prompt": context, "n_predict": 1, "temperature": TEMPERATURE, "top_k": TOP_K,
        "samplers": ["temperature", "top_k"], "n_probs": TOP_K, "post_sampling_probs": True,
    }).json()
    return {p["id"]: p["prob"] for p in r["completion_probabilities"][0]["top_probs"]}


@pytest.fixture(scope="module")
def context(pair_servers) -> list[int]:
    """The context (of a few candidates) where draft and target disagree the most."""
    draft, target = pair_servers
    best, best_tv = None, -1.0
    for text in ("Once upon a time", "The weather today is", "def main():", "1, 2, 3,", "Hello"):
        ctx = httpx.post(f"{target.url}/tokenize", json={"content": text}).json()["tokens"]
        p, q = target_distribution(target.url, ctx), draft_distribution(draft.url, ctx)
        tv = 0.5 * sum(abs(p.get(t, 0) - q.get(t, 0)) for t in p.keys() | q.keys())
        if tv > best_tv:
            best, best_tv = ctx, tv
    assert best_tv > 0.2, f"the tiny pair agrees too well (TV {best_tv:.3f}) for this test to have power"
    return best


def first_tokens(proxy_url: str, context: list[int]) -> list[int]:
    out = []
    with httpx.Client(timeout=60) as client:
        for seed in range(N_SAMPLES):
            r = client.post(f"{proxy_url}/v1/completions", json={
                "prompt": context, "max_tokens": 2, "temperature": TEMPERATURE, "top_k": TOP_K,
                "seed": seed, "return_tokens": True,
            })
            r.raise_for_status()
            body = r.json()
            assert body["tightwad"]["drafted"] >= 1  # every sample went through the rejection rule
            out.append(body["tightwad"]["tokens"][0])
    return out


def goodness_of_fit(samples: list[int], p: dict[int, float]) -> float:
    outside = sum(1 for s in samples if s not in p)
    if outside:
        return 0.0  # a token the target can never produce at this context
    cats = sorted(p, key=p.get, reverse=True)
    observed = [sum(1 for s in samples if s == c) for c in cats]
    expected = [p[c] * len(samples) for c in cats]
    # Merge the rare categories so that every expected count is at least 5.
    while len(expected) > 2 and expected[-1] < 5:
        expected[-2] += expected.pop()
        observed[-2] += observed.pop()
    return float(chisquare(observed, expected).pvalue)


def accept_everything(draft, target, rng: random.Random) -> RoundResult:  # noqa: ANN001
    tokens = [d.token for d in draft] + [target[len(draft)].tail_sample]
    return RoundResult(tokens=tokens, n_drafted=len(draft), n_accepted=len(draft),
                       accepted_mask=[True] * len(draft))


def resample_from_target(draft, target, rng: random.Random) -> RoundResult:  # noqa: ANN001
    """The classic mistake: on rejection, draw from p_target rather than the residual."""
    for i, d in enumerate(draft):
        p, q = target[i].probs.get(d.token, 0.0), d.dist[d.token]
        if rng.random() >= min(1.0, p / q):
            support = list(target[i].probs.items())
            tail = 1.0 - sum(v for _, v in support)
            u = rng.random() * (sum(v for _, v in support) + tail)
            for tok, v in support:  # noqa: B007 - tok is the pick after the break
                if u < v:
                    break
                u -= v
            else:
                tok = target[i].tail_sample
            return RoundResult(tokens=[x.token for x in draft[:i]] + [tok], n_drafted=len(draft),
                               n_accepted=i, accepted_mask=[True] * i + [False] * (len(draft) - i))
    return accept_everything(draft, target, rng)


def test_sampling_matches_the_target_alone(proxy_url, pair_servers, context):
    _, target = pair_servers
    p = target_distribution(target.url, context)
    pvalue = goodness_of_fit(first_tokens(proxy_url, context), p)
    print(f"\nproxy vs target alone: chi-square p-value {pvalue:.4f} over {N_SAMPLES} samples")
    assert pvalue > 1e-3


@pytest.mark.parametrize("wrong_rule", [accept_everything, resample_from_target])
def test_a_wrong_rule_fails_the_same_test(proxy_url, pair_servers, context, monkeypatch, wrong_rule):
    _, target = pair_servers
    p = target_distribution(target.url, context)
    monkeypatch.setattr(loop, "accept_sampled", wrong_rule)
    pvalue = goodness_of_fit(first_tokens(proxy_url, context), p)
    print(f"\n{wrong_rule.__name__}: chi-square p-value {pvalue:.2e}")
    assert pvalue < 1e-6
