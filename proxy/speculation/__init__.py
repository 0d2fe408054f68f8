"""The pure core of speculative decoding: acceptance rules, round statistics and the loop.

Standard library only, no I/O: the backends plug into ``speculate`` as async callables.
"""

from tightwad.speculation.acceptance import accept_greedy, accept_sampled
from tightwad.speculation.loop import (
    DraftFn,
    DraftManyFn,
    FinishReason,
    RoundOutcome,
    VerifyFn,
    VerifyManyFn,
    speculate,
)
from tightwad.speculation.stats import SpecDecodingStats
from tightwad.speculation.types import EMPTY, DraftToken, RoundResult, TargetPosition

__all__ = [
    "EMPTY",
    "DraftFn",
    "DraftManyFn",
    "DraftToken",
    "FinishReason",
    "RoundOutcome",
    "RoundResult",
    "SpecDecodingStats",
    "TargetPosition",
    "VerifyFn",
    "VerifyManyFn",
    "accept_greedy",
    "accept_sampled",
    "speculate",
]
