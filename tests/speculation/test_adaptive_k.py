"""AdaptiveK against simulated environments whose best k is known."""

from __future__ import annotations

import random

import pytest

from tightwad.speculation.adaptive import AdaptiveK


def throughput(k: int, accept: float, draft_tok: float, verify_base: float, verify_tok: float,
               rtt: float) -> float:
    expected = sum(accept**i for i in range(k + 1))
    return expected / (2 * rtt + draft_tok * k + verify_base + verify_tok * (k + 1))


def simulate(policy: AdaptiveK, rounds: int, seed: int, **env: float) -> list[int]:
    rng = random.Random(seed)
    ks = []
    for _ in range(rounds):
        k = policy.choose()
        ks.append(k)
        mask = []
        for _ in range(k):
            ok = rng.random() < env["accept"]
            mask.append(ok)
            if not ok:
                mask.extend([False] * (k - len(mask)))
                break
        noise = 1 + rng.uniform(-0.05, 0.05)
        draft_s = (env["rtt"] + env["draft_tok"] * k) * noise
        verify_s = (env["rtt"] + env["verify_base"] + env["verify_tok"] * (k + 1)) * noise
        policy.observe(accepted_mask=mask, draft_s=draft_s, verify_s=verify_s)
    return ks


ENVIRONMENTS = {
    # A GPU target: verifying more tokens is nearly free; a cheap, accurate drafter.
    "gpu-lan": dict(accept=0.9, draft_tok=0.004, verify_base=0.030, verify_tok=0.0005, rtt=0.0003),
    # The same over a WAN: round trips dominate, so long drafts pay.
    "gpu-wan": dict(accept=0.9, draft_tok=0.004, verify_base=0.030, verify_tok=0.0005, rtt=0.025),
    # Two CPU boxes: verify costs grow with k, the draft is not much cheaper.
    "cpu-lan": dict(accept=0.7, draft_tok=0.020, verify_base=0.020, verify_tok=0.012, rtt=0.0003),
    # A poor drafter: short drafts.
    "poor-draft": dict(accept=0.3, draft_tok=0.004, verify_base=0.030, verify_tok=0.001, rtt=0.003),
}


@pytest.mark.parametrize("name", sorted(ENVIRONMENTS))
def test_converges_near_the_best_fixed_k(name):
    env = ENVIRONMENTS[name]
    best = max(range(1, 33), key=lambda k: throughput(k, **env))
    ks = simulate(AdaptiveK(), 300, seed=1, **env)
    settled = ks[100:]
    achieved = sum(throughput(k, **env) for k in settled) / len(settled)
    assert achieved >= 0.95 * throughput(best, **env), (name, best, sorted(set(settled)))


def test_long_drafts_when_round_trips_dominate_short_when_drafts_fail():
    wan = simulate(AdaptiveK(), 200, seed=2, **ENVIRONMENTS["gpu-wan"])[100:]
    poor = simulate(AdaptiveK(), 200, seed=2, **ENVIRONMENTS["poor-draft"])[100:]
    assert min(wan) > max(poor)


def test_starts_at_initial_k_and_stays_in_bounds():
    policy = AdaptiveK(k_min=2, k_max=5, initial_k=4)
    assert policy.choose() == 4
    ks = simulate(policy, 100, seed=3, **ENVIRONMENTS["gpu-wan"])
    assert all(2 <= k <= 5 for k in ks)


def test_acceptance_after_a_rejection_is_not_counted_as_tested():
    policy = AdaptiveK(prior_acceptance=0.5)
    for _ in range(20):
        policy.observe(accepted_mask=[False, False, False], draft_s=0.01, verify_s=0.02)
    assert policy._acceptance(0) < 0.05
    assert policy._acceptance(1) == 0.5  # never reached: still the prior
