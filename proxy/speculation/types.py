"""The values that one speculation round passes between draft, target and acceptance rule.

Vocabulary (as in vLLM's ``RejectionSampler`` and Leviathan et al. 2023, arXiv 2211.17192):

- *accepted* tokens: the prefix of the draft's proposal that the target agreed with;
- the *recovered* token: what the target emits at the first rejected position instead
  of the draft's token;
- the *bonus* token: the target's extra token after the last draft position, emitted
  only when every draft token was accepted.

Every round therefore emits ``n_accepted + 1`` tokens: the accepted prefix plus exactly
one recovered or bonus token.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

# Shared read-only empty mapping, so that positions without probabilities (greedy
# requests, the bonus position) cost no allocation.
EMPTY: Mapping[int, float] = MappingProxyType({})


def _empty() -> Mapping[int, float]:
    # dataclasses refuse an unhashable default, even an immutable one; a factory that
    # returns the one shared instance still allocates nothing.
    return EMPTY


@dataclass(frozen=True, slots=True)
class DraftToken:
    """One token the draft proposed, with the exact distribution it was drawn from."""

    token: int
    # The draft's exact sampling distribution at this position, sparse: {token_id: prob}.
    # It must contain `token`. A greedy draft is {token: 1.0}. Probabilities sum to 1 (±1e-4).
    dist: Mapping[int, float]


@dataclass(frozen=True, slots=True)
class TargetPosition:
    """The target's view of one position of the round (a draft position or the bonus one)."""

    token: int  # the target's greedy choice (argmax) at this position
    logprob: float | None = None  # target logprob of `token` (informational)
    # Sampling only. Target probabilities (after the request's temperature/top_k/top_p) for
    # every token in the draft support at this position (the keys of the DraftToken.dist);
    # empty at the bonus position.
    probs: Mapping[int, float] = field(default_factory=_empty)
    # Sampling only. One token drawn from the target distribution conditioned on NOT being
    # in the draft support at this position (None when that tail has zero mass). At the
    # bonus position (support empty) it is a draw from the full target distribution.
    tail_sample: int | None = None
    # For the client's logprobs only (the acceptance rules never read them): the raw
    # model's logprob of the drafted token at this position, of ``tail_sample``, and
    # the top alternatives, most likely first.
    draft_logprob: float | None = None
    tail_logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] = ()


@dataclass(slots=True)
class RoundResult:
    """The verdict of an acceptance rule on one round.

    ``tokens`` is ``draft[:n_accepted]`` followed by one recovered token (on a
    rejection) or one bonus token (when all ``n_drafted`` were accepted).
    ``accepted_mask[i]`` is True where draft position ``i`` was accepted; only a
    prefix can be True.
    """

    tokens: list[int]
    n_drafted: int
    n_accepted: int
    accepted_mask: list[bool]

    @property
    def n_emitted(self) -> int:
        return len(self.tokens)

    @property
    def all_accepted(self) -> bool:
        """True when the last token is a bonus token rather than a recovered one."""
        return self.n_accepted == self.n_drafted
