"""The speculation loop against fake draft/target callables built from toy models.

Greedy: the toy target is a deterministic function of the context, so the loop's
output must equal target-alone generation token for token, whatever the draft does.
Sampled: a toy Markov target, and the emitted sequences must follow its distribution.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pytest
from scipy.stats import chisquare

import tightwad.speculation.loop as loop_module
from tightwad.speculation import (
    DraftToken,
    RoundOutcome,
    RoundResult,
    SpecDecodingStats,
    TargetPosition,
    speculate,
)

VOCAB = 50
PROMPT = (3, 14, 15, 92)


def _target_next(ctx: Sequence[int]) -> int:
    """The toy target's greedy token after ``ctx``."""
    return (ctx[-1] * 7 + len(ctx) * 3 + 1) % VOCAB


def _target_alone(
    prompt: Sequence[int], max_tokens: int, eog: frozenset[int] = frozenset()
) -> list[int]:
    ctx, out = list(prompt), []
    while len(out) < max_tokens:
        out.append(_target_next(ctx))
        ctx.append(out[-1])
        if out[-1] in eog:
            break
    return out


def _first_new_token_at(index_ok: Callable[[int], bool]) -> tuple[int, int]:
    """(index, token) of a target-alone token not seen before it, at an accepted index."""
    seq = _target_alone(PROMPT, 200)
    for i, token in enumerate(seq):
        if i >= 5 and token not in seq[:i] and index_ok(i):
            return i, token
    raise AssertionError("the toy target has no suitable eog candidate")


@dataclass
class _GreedyFakes:
    """A greedy draft that is right with probability ``accuracy`` and a perfect verifier."""

    accuracy: float = 0.7
    short: bool = True  # sometimes propose fewer than k tokens
    seed: int = 0
    draft_calls: list[tuple[tuple[int, ...], int]] = field(default_factory=list)
    verify_calls: list[tuple[tuple[int, ...], list[int]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    async def draft(self, ctx: tuple[int, ...], k: int) -> list[DraftToken]:
        self.draft_calls.append((ctx, k))
        running, out = list(ctx), []
        for _ in range(self.rng.randint(0, k) if self.short else k):
            token = _target_next(running)
            if self.rng.random() >= self.accuracy:
                token = (token + 1) % VOCAB
            out.append(DraftToken(token, {token: 1.0}))
            running.append(token)
        return out

    async def verify(
        self, ctx: tuple[int, ...], draft: Sequence[DraftToken]
    ) -> list[TargetPosition]:
        self.verify_calls.append((ctx, [d.token for d in draft]))
        running = list(ctx)
        positions = []
        for d in [*draft, None]:
            positions.append(TargetPosition(_target_next(running)))
            if d is not None:
                running.append(d.token)
        return positions


def _run(
    fakes: _GreedyFakes, prompt: Sequence[int] = PROMPT, **kwargs: object
) -> list[RoundOutcome]:
    async def collect() -> list[RoundOutcome]:
        params: dict[str, object] = {"greedy": True, "choose_k": 4, "max_tokens": 20}
        params.update(kwargs)
        gen = speculate(draft=fakes.draft, verify=fakes.verify, context=prompt, **params)  # type: ignore[arg-type]
        return [outcome async for outcome in gen]

    return asyncio.run(collect())


def _emitted(outcomes: list[RoundOutcome]) -> list[int]:
    return [t for outcome in outcomes for t in outcome.tokens]


def _check_matches_target_alone(
    k: int | Callable[[], int], max_tokens: int, eog: frozenset[int] = frozenset(), seed: int = 0
) -> list[RoundOutcome]:
    outcomes = _run(_GreedyFakes(seed=seed), choose_k=k, max_tokens=max_tokens, eog_tokens=eog)
    expected = _target_alone(PROMPT, max_tokens, eog)
    assert _emitted(outcomes) == expected
    assert [o.finished for o in outcomes[:-1]] == [None] * (len(outcomes) - 1)
    assert outcomes[-1].finished == ("stop" if expected[-1] in eog else "length")
    return outcomes


@pytest.mark.parametrize("max_tokens", [1, 2, 3, 7, 40])
@pytest.mark.parametrize("k", [0, 1, 2, 3, 5, 8, 32])
def test_greedy_matches_target_alone(k: int, max_tokens: int) -> None:
    for seed in range(3):
        _check_matches_target_alone(k, max_tokens, seed=seed)


def test_choose_k_is_asked_every_round() -> None:
    ks = iter([0, 4, 1, 7, 2] * 20)
    outcomes = _check_matches_target_alone(lambda: next(ks), 60)
    assert [o.k for o in outcomes[:5]] == [0, 4, 1, 7, 2]


def test_max_tokens_one_never_calls_the_draft() -> None:
    fakes = _GreedyFakes()
    outcomes = _run(fakes, choose_k=8, max_tokens=1)
    assert fakes.draft_calls == []
    assert fakes.verify_calls == [(PROMPT, [])]
    assert len(outcomes) == 1
    assert (outcomes[0].tokens, outcomes[0].k, outcomes[0].finished) == (
        _target_alone(PROMPT, 1),
        0,
        "length",
    )


def test_k_is_capped_by_the_remaining_tokens() -> None:
    fakes = _GreedyFakes(accuracy=0.8)
    outcomes = _run(fakes, choose_k=32, max_tokens=25)
    assert _emitted(outcomes) == _target_alone(PROMPT, 25)
    for ctx, k in fakes.draft_calls:
        assert k == min(32, 25 - (len(ctx) - len(PROMPT)) - 1)
    assert all(o.truncated == 0 for o in outcomes)  # the cap leaves nothing to cut


def test_perfect_draft_finishes_in_one_round() -> None:
    outcomes = _run(_GreedyFakes(accuracy=1.0, short=False), choose_k=32, max_tokens=10)
    assert len(outcomes) == 1
    assert outcomes[0].result.n_accepted == 9  # k was capped at 9; the target adds the 10th
    assert (_emitted(outcomes), outcomes[0].finished) == (_target_alone(PROMPT, 10), "length")


def test_empty_draft_degrades_to_target_alone() -> None:
    class _SilentDraft(_GreedyFakes):
        async def draft(self, ctx: tuple[int, ...], k: int) -> list[DraftToken]:
            self.draft_calls.append((ctx, k))
            return []

    fakes = _SilentDraft()
    outcomes = _run(fakes, choose_k=5, max_tokens=12)
    assert _emitted(outcomes) == _target_alone(PROMPT, 12)
    assert [len(o.tokens) for o in outcomes] == [1] * 12
    assert all(draft == [] for _, draft in fakes.verify_calls)


def test_draft_beyond_k_is_ignored() -> None:
    class _Overeager(_GreedyFakes):
        async def draft(self, ctx: tuple[int, ...], k: int) -> list[DraftToken]:
            return await super().draft(ctx, k + 3)

    fakes = _Overeager(accuracy=1.0, short=False)
    outcomes = _run(fakes, choose_k=3, max_tokens=9)
    assert _emitted(outcomes) == _target_alone(PROMPT, 9)
    assert max(len(draft) for _, draft in fakes.verify_calls) == 3


@pytest.mark.parametrize("k", [0, 1, 4, 8])
def test_stops_after_eog(k: int) -> None:
    _, eog = _first_new_token_at(lambda i: True)
    outcomes = _check_matches_target_alone(k, 200, eog=frozenset({eog}))
    assert outcomes[-1].tokens[-1] == eog


def test_drafted_eog_ends_the_round_and_drops_the_rest() -> None:
    # A perfect draft with k=8 emits 9 tokens a round; pick an eog it drafts (not a bonus).
    index, eog = _first_new_token_at(lambda i: i % 9 != 8)
    fakes = _GreedyFakes(accuracy=1.0, short=False)
    outcomes = _run(fakes, choose_k=8, max_tokens=200, eog_tokens=frozenset({eog}))
    assert _emitted(outcomes) == _target_alone(PROMPT, 200, frozenset({eog}))
    assert len(_emitted(outcomes)) == index + 1
    _, last_draft = fakes.verify_calls[-1]
    assert last_draft[-1] == eog and len(last_draft) == index % 9 + 1  # nothing after eog
    assert (outcomes[-1].finished, outcomes[-1].truncated) == ("stop", 1)  # the bonus is cut


def test_context_is_prompt_plus_emitted_and_private() -> None:
    prompt = list(PROMPT)

    class _Meddling(_GreedyFakes):
        async def draft(self, ctx: tuple[int, ...], k: int) -> list[DraftToken]:
            prompt.append(999)  # the caller's list changes under the loop's feet
            return await super().draft(ctx, k)

    fakes = _Meddling()
    outcomes = _run(fakes, prompt=prompt, choose_k=3, max_tokens=15)
    emitted = _emitted(outcomes)
    assert emitted == _target_alone(PROMPT, 15)
    for (draft_ctx, _), (verify_ctx, _) in zip(fakes.draft_calls, fakes.verify_calls, strict=False):
        assert isinstance(draft_ctx, tuple) and draft_ctx == verify_ctx
        assert draft_ctx == PROMPT + tuple(emitted[: len(draft_ctx) - len(PROMPT)])


@pytest.mark.parametrize("failing", ["draft", "verify"])
def test_backend_errors_propagate(failing: str) -> None:
    fakes = _GreedyFakes()

    async def boom(*args: object) -> list:
        raise RuntimeError(f"{failing} is down")

    setattr(fakes, failing, boom)
    with pytest.raises(RuntimeError, match=f"{failing} is down"):
        _run(fakes)


def test_bad_arguments() -> None:
    with pytest.raises(AssertionError):
        _run(_GreedyFakes(), max_tokens=0)
    with pytest.raises(AssertionError):
        _run(_GreedyFakes(), greedy=False, rng=None)
    with pytest.raises(AssertionError):
        _run(_GreedyFakes(), choose_k=-1)


def test_stats_from_the_loop() -> None:
    def stats_for(fakes: _GreedyFakes) -> tuple[SpecDecodingStats, int]:
        outcomes = _run(fakes, choose_k=4, max_tokens=40)
        stats = SpecDecodingStats()
        for outcome in outcomes:
            stats.observe(outcome.result, n_emitted=len(outcome.tokens))
        return stats, len(_emitted(outcomes))

    perfect, emitted = stats_for(_GreedyFakes(accuracy=1.0, short=False))
    assert perfect.acceptance_rate == 1.0 and perfect.num_emitted_tokens == emitted == 40
    hopeless, emitted = stats_for(_GreedyFakes(accuracy=0.0, short=False))
    assert hopeless.acceptance_rate == 0.0 and hopeless.num_emitted_tokens == emitted == 40
    assert hopeless.rounds == 40 and hopeless.mean_acceptance_length == 1.0


def _accept_everything(
    draft_tokens: Sequence[int], target: Sequence[TargetPosition]
) -> RoundResult:
    """WRONG: trusts the draft blindly."""
    k = len(draft_tokens)
    return RoundResult([*draft_tokens, target[k].token], k, k, [True] * k)


def test_broken_greedy_rule_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loop_module, "accept_greedy", _accept_everything)
    with pytest.raises(AssertionError):
        _check_matches_target_alone(4, 40)


# --- sampled requests --------------------------------------------------------

SAMPLED_VOCAB = 3
P_BASE = (0.5, 0.3, 0.2)
Q_BASE = (0.2, 0.0, 0.8)  # smaller support than p, and much more mass on token 2


def _rotated(base: Sequence[float], last: int) -> list[float]:
    return [base[(v - last - 1) % SAMPLED_VOCAB] for v in range(SAMPLED_VOCAB)]


@dataclass
class _SampledFakes:
    """Markov toys: p(.|last token) for the target, q(.|last token) for the draft."""

    world: random.Random

    def _draw(self, weights: dict[int, float]) -> int | None:
        if sum(weights.values()) <= 0.0:
            return None
        return self.world.choices(list(weights), list(weights.values()))[0]

    async def draft(self, ctx: tuple[int, ...], k: int) -> list[DraftToken]:
        out, last = [], ctx[-1]
        for _ in range(k):
            q = _rotated(Q_BASE, last)
            dist = {v: w for v, w in enumerate(q) if w > 0.0}
            last = self._draw(dist)  # type: ignore[assignment]
            out.append(DraftToken(last, dist))
        return out

    async def verify(
        self, ctx: tuple[int, ...], draft: Sequence[DraftToken]
    ) -> list[TargetPosition]:
        positions, last = [], ctx[-1]
        for d in draft:
            p = _rotated(P_BASE, last)
            tail = {v: w for v, w in enumerate(p) if v not in d.dist}
            positions.append(
                TargetPosition(
                    max(range(SAMPLED_VOCAB), key=p.__getitem__),
                    probs={v: p[v] for v in d.dist},
                    tail_sample=self._draw(tail),
                )
            )
            last = d.token
        p = _rotated(P_BASE, last)
        positions.append(TargetPosition(0, tail_sample=self._draw(dict(enumerate(p)))))
        return positions


def _sampled_runs(trials: int, max_tokens: int, seed: int) -> list[tuple[int, ...]]:
    fakes, rng = _SampledFakes(random.Random(seed)), random.Random(seed + 1)

    async def collect() -> list[tuple[int, ...]]:
        runs = []
        for _ in range(trials):
            gen = speculate(
                draft=fakes.draft,
                verify=fakes.verify,
                context=[0],
                max_tokens=max_tokens,
                choose_k=4,
                greedy=False,
                rng=rng,
            )
            runs.append(tuple(_emitted([o async for o in gen])))
        return runs

    return asyncio.run(collect())


def _sampled_p_value(runs: list[tuple[int, ...]], max_tokens: int) -> float:
    expected: dict[tuple[int, ...], float] = {(): 1.0}
    for _ in range(max_tokens):
        expected = {
            seq + (v,): prob * _rotated(P_BASE, (seq or (0,))[-1])[v]
            for seq, prob in expected.items()
            for v in range(SAMPLED_VOCAB)
        }
    counts = {seq: 0 for seq in expected}
    for seq in runs:
        counts[seq] += 1
    cells = list(expected)
    return float(
        chisquare([counts[c] for c in cells], [expected[c] * len(runs) for c in cells]).pvalue
    )


def test_sampled_loop_follows_target_distribution() -> None:
    # max_tokens=3: the first round drafts 2 and the whole 3-token sequence is checked.
    runs = _sampled_runs(6_000, 3, seed=5)
    assert all(len(seq) == 3 for seq in runs)
    assert _sampled_p_value(runs, 3) > 1e-3


def test_broken_sampled_rule_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    def accept_everything(
        draft: Sequence[DraftToken], target: Sequence[TargetPosition], rng: random.Random
    ) -> RoundResult:
        k = len(draft)
        return RoundResult([d.token for d in draft] + [target[k].tail_sample], k, k, [True] * k)  # type: ignore[list-item]

    monkeypatch.setattr(loop_module, "accept_sampled", accept_everything)
    assert _sampled_p_value(_sampled_runs(3_000, 3, seed=5), 3) < 1e-6


def test_sampled_loop_seeded_runs_repeat() -> None:
    assert _sampled_runs(200, 5, seed=11) == _sampled_runs(200, 5, seed=11)
    assert _sampled_runs(200, 5, seed=11) != _sampled_runs(200, 5, seed=12)
