"""Several candidate drafts of one context, scored in one call (``VerifierEngine.verify_many``).

Greedy only. Each candidate gets the ``len(d) + 1`` positions that ``verify``
returns for it alone. Logits rows are keyed by the draft prefix they follow
(the row after ``context + d[:i]``), so a prefix that several candidates share
is evaluated and scored once.

strict: a depth-first walk through the candidates' prefix tree, each node
    evaluated once by ``_evaluate`` on the strict plan (every position after the
    prompt in a ubatch of its own), the cache truncated back to the branch point
    between subtrees. On that plan a row is a function of its token prefix alone,
    so a shared row, and the cache reused up to a shared planned start, are
    bitwise what a single ``verify`` computes. At each branch the child that the
    target confirms is walked last, so the cache ends holding the winner's
    accepted prefix, which the next round's context extends.
fast: ONE batch (split only at ``n_batch``) holding every node of the
    candidates' prefix tree once: the context's new tokens on every sequence,
    then each drafted token on the sequences of the candidates (tree leaves)
    below it, one llama.cpp sequence id per leaf (0, and copies of sequence 0's
    cached prefix, in the unified cache). Afterwards sequence 0 keeps the leaf
    the target confirms furthest and the other sequences are dropped. The
    cache then has holes where the other leaves were, which changes only the
    order of llama.cpp's attention sums: the next call is exact up to fast-mode
    noise. Where the context has no room for every branch at once, or the model's
    state cannot branch (recurrent), the strict walk runs instead, on the fast plan.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from tightwad.errors import InvalidRequest
from tightwad.verifier.engine import MAX_CANDIDATES, EvalStats, PositionScore, _score

if TYPE_CHECKING:
    from tightwad.verifier.engine import Slot, VerifierEngine

Rows = dict[tuple[int, ...], np.ndarray]  # draft prefix -> the logits row after context + prefix


def verify_many(
    engine: VerifierEngine,
    tokens: Sequence[int],
    drafts: Sequence[Sequence[int]],
    *,
    n_prompt: int | None,
    session: str | None,
    top_k: int,
) -> tuple[list[list[PositionScore]], EvalStats]:
    tokens = list(tokens)
    drafts = [list(d) for d in drafts]
    n_prompt = engine._check(tokens, [], n_prompt)
    if not drafts:
        raise InvalidRequest("drafts must hold at least one candidate draft", param="drafts")
    if len(drafts) > MAX_CANDIDATES:
        raise InvalidRequest(
            f"drafts holds {len(drafts)} candidates; at most {MAX_CANDIDATES} are scored in one call",
            param="drafts",
        )
    for j, d in enumerate(drafts):
        engine._check_ids(d, f"drafts[{j}]", "drafts")
    total = len(tokens) + max(map(len, drafts))
    if total > engine.n_ctx:
        raise InvalidRequest(
            f"tokens + longest draft = {total} tokens exceeds the context size {engine.n_ctx} (--ctx-size)",
            param="tokens",
            code="context_length_exceeded",
        )
    slot = engine._slot(session)
    stats = EvalStats()
    leaves = _leaves(drafts)
    cells = len(tokens) + len({leaf[: i + 1] for leaf in leaves for i in range(len(leaf))})
    if engine.multi_seq and cells <= engine.n_ctx:
        rows = _one_batch(engine, slot, tokens, leaves, n_prompt, stats)
    else:
        rows = _tree_walk(engine, slot, tokens, drafts, n_prompt, stats)
    return _scores(rows, drafts, top_k), stats


def _leaves(drafts: list[list[int]]) -> list[tuple[int, ...]]:
    """The distinct candidates that are no prefix of another: the prefix tree's leaves."""
    distinct = sorted(set(map(tuple, drafts)), reverse=True)  # an extension sorts before its prefix
    leaves: list[tuple[int, ...]] = []
    for d in distinct:
        if not (leaves and leaves[-1][: len(d)] == d):
            leaves.append(d)
    return leaves


def _lcp(a: Sequence[int], b: Sequence[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def _scores(rows: Rows, drafts: list[list[int]], top_k: int) -> list[list[PositionScore]]:
    scored: dict[tuple[int, ...], tuple[PositionScore, np.ndarray]] = {}
    out = []
    for d in drafts:
        positions = []
        for i in range(len(d) + 1):
            key = tuple(d[:i])
            if key not in scored:
                scored[key] = _score(rows[key], None, top_k)
            base, lp = scored[key]
            positions.append(dataclasses.replace(
                base,
                draft_logprob=float(lp[d[i]]) if i < len(d) else None,
                top_logprobs=list(base.top_logprobs),
            ))
        out.append(positions)
    return out


def _accepted(rows: Rows, draft: Sequence[int]) -> int:
    """How many leading draft tokens the target's greedy choices confirm."""
    a = 0
    while a < len(draft) and int(np.argmax(rows[tuple(draft[:a])])) == draft[a]:
        a += 1
    return a


def _tree_walk(
    engine: VerifierEngine, slot: Slot, tokens: list[int], drafts: list[list[int]],
    n_prompt: int, stats: EvalStats,
) -> Rows:
    """Depth first through the candidates' prefix tree, each node evaluated once.

    At a branch the children the target's argmax rejects go first and the one it
    confirms last, so the walk ends on the path of the confirmed prefix: the cache
    holds the winner's accepted tokens, which the next round's context extends.
    A chain without branches is one ``_evaluate`` call.
    """
    n = len(tokens)
    children: dict[tuple[int, ...], list[int]] = {}
    for d in drafts:
        for i, t in enumerate(d):
            kids = children.setdefault(tuple(d[:i]), [])
            if t not in kids:
                kids.append(t)
    rows: Rows = {}
    first = True
    stack: list[tuple[int, ...]] = [()]
    while stack:
        key = stack.pop()
        end = key  # evaluate key's last token (the root: the context's) down its chain
        while len(children.get(end, ())) == 1:
            end += (children[end][0],)
        sub = EvalStats()
        got = engine._evaluate(slot, tokens + list(end), n_prompt, n - 1 + len(key), sub)
        for i, row in enumerate(got, start=len(key)):
            rows[end[:i]] = row
        if first:
            stats.n_cached, first = sub.n_cached, False
        stats.n_evaluated += sub.n_evaluated
        stats.n_decode_calls += sub.n_decode_calls
        stats.eval_s += sub.eval_s
        kids = children.get(end, [])
        if kids:
            best = int(np.argmax(rows[end]))
            # LIFO: the confirmed child is pushed first, so it is walked last.
            stack.extend(end + (t,) for t in sorted(kids, key=lambda t: t != best))
    return rows


def _one_batch(
    engine: VerifierEngine, slot: Slot, tokens: list[int], leaves: list[tuple[int, ...]],
    n_prompt: int, stats: EvalStats,
) -> Rows:
    ctx = slot.ctx
    n, k = len(tokens), len(leaves)
    keep = engine._reusable(slot, tokens, n - 1, engine._plan(n_prompt, n, None))
    for s in range(1, k):
        ctx.seq_rm(s)  # empty already: every call drops its extra sequences before returning
    ctx.truncate(keep)
    del slot.tokens[keep:]
    slot.ubatch_starts = [p for p in slot.ubatch_starts if p < keep]
    stats.n_cached = keep
    for s in range(1, k):
        ctx.seq_cp(0, s)  # the cached prefix [0, keep): bookkeeping in the unified cache
    # (token, position, sequence ids, key of the row it yields or None): the context's
    # new tokens on every sequence, then each node of the candidates' prefix tree once,
    # on the sequences of the leaves below it. Insertion order keeps every sequence's
    # positions increasing, as llama.cpp requires.
    everyone = tuple(range(k))
    items = [(tokens[p], p, everyone, () if p == n - 1 else None) for p in range(keep, n)]
    node: dict[tuple[int, ...], int] = {}
    for s, leaf in enumerate(leaves):
        for i, t in enumerate(leaf):
            key = leaf[: i + 1]
            if key in node:
                items[node[key]][2].append(s)
            else:
                node[key] = len(items)
                items.append((t, n + i, [s], key))
    rows: Rows = {}
    t0 = time.perf_counter()
    try:
        for a in range(0, len(items), engine.n_batch):
            chunk = items[a : a + engine.n_batch]
            outputs = [i for i, item in enumerate(chunk) if item[3] is not None]
            got = ctx.decode_seqs([c[0] for c in chunk], [c[1] for c in chunk],
                                  [c[2] for c in chunk], outputs)
            stats.n_decode_calls += 1
            for i, row in zip(outputs, got, strict=True):
                rows[chunk[i][3]] = row
    except Exception:
        for s in range(1, k):
            ctx.seq_rm(s)
        ctx.truncate(keep)
        raise
    stats.n_evaluated += len(items)
    stats.eval_s += time.perf_counter() - t0

    # Sequence 0 keeps the leaf the target confirms furthest (the next round's context
    # extends its accepted prefix), unless leaf 0 already holds that accepted prefix.
    accepted = [_accepted(rows, leaf) for leaf in leaves]
    best = max(range(k), key=lambda s: accepted[s])
    chosen = 0 if accepted[best] <= _lcp(leaves[0], leaves[best]) else best
    if chosen != 0:
        ctx.seq_rm(0, keep)
        ctx.seq_cp(chosen, 0, keep)
    for s in range(1, k):
        ctx.seq_rm(s)
    slot.tokens.extend(tokens[keep:] + list(leaves[chosen]))
    # Where llama.cpp began a ubatch (every n_ubatch items) holding tokens now in sequence 0.
    seen: set[int] = set()
    for idx, item in enumerate(items):
        u = idx // engine.n_ubatch
        if chosen in item[2] and u not in seen:
            seen.add(u)
            slot.ubatch_starts.append(item[1])
    return rows
