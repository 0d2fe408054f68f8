"""The verifier's core: slots of llama.cpp contexts, one-pass scoring, generation.

Numerics, and why the evaluation plan matters
---------------------------------------------
llama.cpp splits every ``llama_decode`` call into micro-batches (ubatches) of
``n_ubatch`` tokens, and a token's KV entries and logits depend, in the last
bits, on the shape of the ubatch it was computed in. Generating one token at a
time evaluates each generated token in a ubatch of its own, so:

* **strict mode** evaluates every position after the prompt in a ubatch of one
  (one ``llama_decode`` per token) and the prompt in ``n_ubatch`` chunks
  aligned to position 0, exactly as target-alone generation does. Choices are
  then bitwise equal to generating with the target alone.
* **fast mode** evaluates everything new (the last accepted token plus all
  drafted tokens) in one batch: one forward pass, and choices that can differ
  from generation only at numerical near-ties.

Each slot remembers where the ubatches of its cached tokens started. A cached
prefix is reused only up to a point where that record agrees with the plan a
cold evaluation of the same request would follow, so a warm cache gives the
same bits as a cold one in strict mode.

Several candidate drafts of the same context (``verify_many``, candidates.py)
form a prefix tree whose every node is evaluated once: in strict mode by a
depth-first walk on the strict plan (bitwise what ``verify`` gives each
candidate), in fast mode in one batch with one llama.cpp sequence id per leaf.
Fast-mode contexts are therefore created with a unified cache and
``MAX_CANDIDATES`` sequences; strict ones keep the single-sequence setup that
generation uses.

Every method here is synchronous and not thread-safe: the HTTP layer runs them
on a single worker thread, which serialises all access to llama.cpp.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import numpy as np

from tightwad.errors import InvalidRequest
from tightwad.verifier.llama import LlamaContext, LlamaModel
from tightwad.verifier.sampling import (
    SamplingParams,
    log_softmax,
    rng_for,
    target_distribution,
    top_logprobs,
)

ECHO_CHUNK = 64  # rows of logits per decode when every position is scored
MAX_CANDIDATES = 8  # candidate drafts per verify_many call


@dataclasses.dataclass(slots=True)
class PositionScore:
    """The target's view of one position: the distribution after ``tokens[:pos+1]``."""

    token: int  # argmax
    logprob: float
    draft_logprob: float | None = None
    top_logprobs: list[tuple[int, float]] = dataclasses.field(default_factory=list)
    probs: dict[int, float] | None = None
    tail_sample: int | None = None
    tail_logprob: float | None = None  # raw-model logprob of tail_sample


@dataclasses.dataclass(slots=True)
class Slot:
    index: int
    ctx: LlamaContext
    tokens: list[int] = dataclasses.field(default_factory=list)
    ubatch_starts: list[int] = dataclasses.field(default_factory=list)
    session: str | None = None
    last_used: float = 0.0


@dataclasses.dataclass(slots=True)
class EvalStats:
    n_cached: int = 0
    n_evaluated: int = 0
    n_decode_calls: int = 0
    eval_s: float = 0.0


class VerifierEngine:
    def __init__(
        self,
        model: LlamaModel,
        *,
        n_ctx: int,
        parallel: int,
        strict: bool,
        n_threads: int,
        n_batch: int = 2048,
        n_ubatch: int = 512,
    ):
        assert n_batch % n_ubatch == 0
        self.model = model
        self.n_ctx = n_ctx
        self.strict = strict
        self.n_batch = n_batch
        self.n_ubatch = n_ubatch
        # Fast mode scores several candidates in one batch, one sequence id each.
        self.multi_seq = not strict and not model.is_recurrent
        n_seq = MAX_CANDIDATES if self.multi_seq else 1
        self._slots = [
            Slot(i, LlamaContext(model, n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_ubatch,
                                 n_threads=n_threads, n_seq_max=n_seq))
            for i in range(parallel)
        ]
        self._by_session: dict[str, Slot] = {}

    @property
    def parallel(self) -> int:
        return len(self._slots)

    def close(self) -> None:
        for slot in self._slots:
            slot.ctx.close()

    # -- requests ----------------------------------------------------------------

    def verify(
        self,
        tokens: Sequence[int],
        draft: Sequence[int],
        *,
        n_prompt: int | None = None,
        session: str | None = None,
        top_k: int = 0,
        sampling: SamplingParams | None = None,
        support: Sequence[Sequence[int]] | None = None,
    ) -> tuple[list[PositionScore], EvalStats]:
        """Score ``draft`` after ``tokens`` in one pass: ``len(draft) + 1`` positions."""
        tokens = list(tokens)
        draft = list(draft)
        n_prompt = self._check(tokens, draft, n_prompt)
        if support is not None and len(support) != len(draft):
            raise InvalidRequest(
                f"sampling.support has {len(support)} entries but draft has {len(draft)}",
                param="sampling.support",
            )
        slot = self._slot(session)
        stats = EvalStats()
        rows = self._evaluate(slot, tokens + draft, n_prompt, len(tokens) - 1, stats)
        scores = []
        for i, row in enumerate(rows):
            nxt = draft[i] if i < len(draft) else None
            score, lp = _score(row, nxt, top_k)
            if sampling is not None and not sampling.greedy:
                dist = target_distribution(row, sampling)
                sup = set(support[i]) if support is not None and i < len(draft) else set()
                if nxt is not None:
                    sup.add(nxt)
                score.probs = dist.prob_of(sup)
                score.tail_sample = dist.sample(rng_for(sampling.seed, len(tokens) + i), sup)
                if score.tail_sample is not None:
                    score.tail_logprob = float(lp[score.tail_sample])
            scores.append(score)
        return scores, stats

    def verify_many(
        self,
        tokens: Sequence[int],
        drafts: Sequence[Sequence[int]],
        *,
        n_prompt: int | None = None,
        session: str | None = None,
        top_k: int = 0,
    ) -> tuple[list[list[PositionScore]], EvalStats]:
        """Greedy scores of several candidate drafts after ``tokens``: for each, the
        ``len(d) + 1`` positions ``verify(tokens, d)`` returns (strict: bitwise)."""
        from tightwad.verifier.candidates import verify_many

        return verify_many(self, tokens, drafts, n_prompt=n_prompt, session=session, top_k=top_k)

    def generate(
        self,
        tokens: Sequence[int],
        *,
        max_tokens: int,
        n_prompt: int | None = None,
        session: str | None = None,
        top_k: int = 0,
        sampling: SamplingParams | None = None,
        stop_at_eog: bool = True,
    ) -> tuple[list[PositionScore], str, EvalStats]:
        """Generate up to ``max_tokens`` one token at a time: the target alone."""
        tokens = list(tokens)
        n_prompt = self._check(tokens, [], n_prompt)
        if max_tokens < 1:
            raise InvalidRequest("max_tokens must be at least 1", param="max_tokens")
        slot = self._slot(session)
        stats = EvalStats()
        out: list[PositionScore] = []
        context = tokens
        finish = "length"
        while len(out) < max_tokens:
            if len(context) >= self.n_ctx:
                break
            (row,) = self._evaluate(slot, context, n_prompt, len(context) - 1, stats)
            if sampling is None or sampling.greedy:
                score, _ = _score(row, None, top_k)
            else:
                chosen = target_distribution(row, sampling).sample(rng_for(sampling.seed, len(context)))
                assert chosen is not None
                score, _ = _score(row, chosen, top_k)
                score.token, score.logprob = chosen, score.draft_logprob  # type: ignore[assignment]
                score.draft_logprob = None
            out.append(score)
            context = context + [score.token]
            if stop_at_eog and score.token in self.model.eog_tokens:
                finish = "stop"
                break
        return out, finish, stats

    def score_all(self, tokens: Sequence[int], *, top_k: int) -> tuple[list[PositionScore], EvalStats]:
        """Score every position of ``tokens`` (for echo): entry j is the row after tokens[:j+1]."""
        tokens = list(tokens)
        self._check(tokens, [], len(tokens))
        slot = self._slot(None)
        stats = EvalStats()
        scores: list[PositionScore] = []
        start = 0
        while start < len(tokens):
            end = min(len(tokens), start + ECHO_CHUNK)
            rows = self._evaluate(slot, tokens[:end], end, start, stats, chunk=ECHO_CHUNK)
            for j, row in enumerate(rows):
                pos = start + j
                nxt = tokens[pos + 1] if pos + 1 < len(tokens) else None
                scores.append(_score(row, nxt, top_k)[0])
            start = end
        return scores, stats

    # -- internals -----------------------------------------------------------------

    def _check(self, tokens: list[int], draft: list[int], n_prompt: int | None) -> int:
        if not tokens:
            raise InvalidRequest("tokens must hold at least one token", param="tokens")
        self._check_ids(tokens, "tokens", "tokens")
        self._check_ids(draft, "draft", "draft")
        total = len(tokens) + len(draft)
        if total > self.n_ctx:
            raise InvalidRequest(
                f"tokens + draft = {total} tokens exceeds the context size {self.n_ctx} (--ctx-size)",
                param="tokens",
                code="context_length_exceeded",
            )
        if n_prompt is None:
            return len(tokens)
        if not 1 <= n_prompt <= len(tokens):
            raise InvalidRequest(
                f"n_prompt must be between 1 and len(tokens) = {len(tokens)}, got {n_prompt}",
                param="n_prompt",
            )
        return n_prompt

    def _check_ids(self, seq: Sequence[int], name: str, param: str) -> None:
        n_vocab = self.model.n_vocab
        for i, t in enumerate(seq):
            if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < n_vocab:
                raise InvalidRequest(
                    f"{name}[{i}] = {t!r} is not a token id of this model (0..{n_vocab - 1})",
                    param=param,
                )

    def _slot(self, session: str | None) -> Slot:
        now = time.monotonic()
        if session is not None and session in self._by_session:
            slot = self._by_session[session]
        else:
            # An unbound slot first, else the least recently used: its owner's next
            # request will simply be evaluated cold, which is slower but not wrong.
            slot = min(self._slots, key=lambda s: (s.session is not None, s.last_used))
            if slot.session is not None:
                self._by_session.pop(slot.session, None)
                slot.session = None
            if session is not None:
                slot.session = session
                self._by_session[session] = slot
        slot.last_used = now
        return slot

    def release(self, session: str) -> None:
        slot = self._by_session.pop(session, None)
        if slot is not None:
            slot.session = None

    def _plan(self, n_prompt: int, end: int, chunk: int | None) -> list[int]:
        """Ubatch start positions that a cold evaluation of [0, end) uses."""
        u = chunk or self.n_ubatch
        starts = list(range(0, min(n_prompt, end), u))
        if self.strict and chunk is None:
            starts.extend(range(n_prompt, end))
        else:
            starts.extend(range(n_prompt, end, u))
        return starts

    def _reusable(self, slot: Slot, tokens: list[int], limit: int, plan: list[int]) -> int:
        common = 0
        cached = slot.tokens
        n = min(len(cached), len(tokens), limit)
        if cached[:n] == tokens[:n]:
            common = n
        else:
            while common < n and cached[common] == tokens[common]:
                common += 1
        if not self.strict:
            return common
        # Reuse only up to a ubatch start that the cached record and the cold
        # plan share, with identical ubatches before it.
        best = 0
        starts = slot.ubatch_starts + [len(cached)]
        for a, b in zip(starts, plan, strict=False):
            if a != b or a > common:
                break
            best = a
        return best

    def _evaluate(
        self,
        slot: Slot,
        tokens: list[int],
        n_prompt: int,
        logits_from: int,
        stats: EvalStats,
        *,
        chunk: int | None = None,
    ) -> list[np.ndarray]:
        """Bring the slot's cache to ``tokens``; return logits rows for [logits_from, len)."""
        end = len(tokens)
        plan = self._plan(n_prompt, end, chunk)
        keep = self._reusable(slot, tokens, logits_from, plan)
        slot.ctx.truncate(keep)
        del slot.tokens[keep:]
        slot.ubatch_starts = [s for s in slot.ubatch_starts if s < keep]
        stats.n_cached = keep
        rows: list[np.ndarray] = []
        if self.strict:
            todo = [s for s in plan if s >= keep]  # keep is itself a planned start
        else:
            todo = list(range(keep, end, chunk or self.n_ubatch))
        bounds = todo + [end]
        t0 = time.perf_counter()
        i = 0
        while i < len(todo):
            # One decode call: consecutive full ubatches (llama.cpp splits them
            # back at the same points), ending at a partial one or n_batch.
            a = bounds[i]
            j = i + 1
            size = self.n_ubatch if chunk is None else chunk
            while (
                j < len(todo)
                and bounds[j] - bounds[j - 1] == size
                and bounds[j + 1] - a <= self.n_batch
                and size == self.n_ubatch
            ):
                j += 1
            b = bounds[j]
            outputs = [p - a for p in range(max(a, logits_from), b)]
            try:
                got = slot.ctx.decode(tokens[a:b], a, outputs)
            except Exception:
                slot.ctx.truncate(a)
                raise
            slot.tokens.extend(tokens[a:b])
            slot.ubatch_starts.extend(bounds[i:j])
            stats.n_decode_calls += 1
            if outputs:
                rows.extend(got)
            i = j
        stats.n_evaluated += end - keep
        stats.eval_s += time.perf_counter() - t0
        return rows


def _score(row: np.ndarray, next_token: int | None, top_k: int) -> tuple[PositionScore, np.ndarray]:
    lp = log_softmax(row)
    best = int(np.argmax(row))
    score = PositionScore(
        token=best,
        logprob=float(lp[best]),
        draft_logprob=None if next_token is None else float(lp[next_token]),
        top_logprobs=top_logprobs(lp, top_k),
    )
    return score, lp
