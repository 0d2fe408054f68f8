"""The two roles a backend plays, as small interfaces (like httpx's transports).

A *draft* backend proposes tokens; a *target* backend verifies them and owns
the tokenizer, the chat template and the stopping tokens. The speculation loop
and the HTTP app see only these protocols; each server kind is one module:

    draft:  llamacpp (llama-server, token ids), ollama (/api/generate, text),
            openai (any /v1/completions, text)
    target: verifier (Tightwad's one-pass scorer), openai-echo (vLLM-style
            echo + logprobs), llamacpp (stock llama-server: can only confirm a
            draft by generating it, so verify_mode is "generate")

Backends raise only ``tightwad.errors.BackendError`` subclasses, mapped from
httpx errors at their boundary.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Literal, Protocol

from tightwad.speculation.types import DraftToken, TargetPosition

VerifyMode = Literal["one-pass", "generate"]


@dataclasses.dataclass(frozen=True, slots=True)
class Sampling:
    """The request's sampling parameters; temperature <= 0 means greedy."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    def to_json(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
                "seed": self.seed}


@dataclasses.dataclass(frozen=True)
class TargetInfo:
    model: str
    n_vocab: int
    n_ctx: int
    eog_token_ids: frozenset[int]
    verify_mode: VerifyMode
    mode: str | None = None  # the verifier's "fast" or "strict"; None where unknown
    # Each token's bytes, for detokenising locally; None where the server offers none.
    pieces: Sequence[bytes] | None = None
    # How sampled (temperature > 0) requests are verified, when it differs from
    # verify_mode: an openai-echo target scores greedy drafts in one pass but can
    # only confirm sampled ones by generating. None: the same as verify_mode.
    sampled_verify_mode: VerifyMode | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class GeneratedToken:
    token: int
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] = ()


@dataclasses.dataclass(slots=True)
class DraftRequest:
    context: Sequence[int]  # prompt + output so far, target token ids
    k: int  # propose at most this many
    sampling: Sampling
    session: str  # one id per generation, for cache reuse on the draft server
    # For drafters that speak text: the context as text, and the target's tokenizer
    # to turn their text back into target ids. Both are the target's, never the draft's.
    context_text: Callable[[], Awaitable[str]] | None = None
    retokenize: Callable[[str], Awaitable[list[int]]] | None = None
    # Early cut: stop drafting before the first token whose top probability (the
    # draft's own confidence at that position) is below this; 0 never cuts. Drafters
    # that cannot see their probabilities ignore it. Cutting depends on the draft's
    # own values only, so the output stays the target's.
    min_confidence: float = 0.0


class DraftBackend(Protocol):
    name: str  # the configured drafter name
    kind: str  # "llamacpp" | "ollama" | "openai"
    url: str

    async def health(self) -> bool: ...

    async def tokenize(self, text: str) -> list[int] | None:
        """The draft's own token ids for ``text``, or None if it cannot tell."""
        ...

    async def vocab_size(self) -> int | None: ...

    async def draft(self, request: DraftRequest) -> list[DraftToken]: ...

    async def aclose(self) -> None: ...


class TargetBackend(Protocol):
    kind: str  # "verifier" | "openai-echo" | "llamacpp"
    url: str

    async def health(self) -> bool: ...

    async def info(self) -> TargetInfo: ...

    async def tokenize(self, text: str, *, add_special: bool) -> list[int]: ...

    async def detokenize(self, tokens: Sequence[int]) -> str: ...

    async def render_chat(self, messages: list[dict[str, Any]]) -> str: ...

    async def verify(
        self,
        context: Sequence[int],
        draft: Sequence[DraftToken],
        *,
        n_prompt: int,
        sampling: Sampling,
        session: str,
        top_logprobs: int = 0,
    ) -> list[TargetPosition]:
        """``len(draft) + 1`` positions: the target's view of each drafted slot and the next."""
        ...

    async def verify_many(
        self,
        context: Sequence[int],
        drafts: Sequence[Sequence[DraftToken]],
        *,
        n_prompt: int,
        session: str,
        top_logprobs: int = 0,
    ) -> list[list[TargetPosition]]:
        """Greedy only: each candidate draft scored after ``context``, ``len(d) + 1``
        positions each, in one call where the server can share the prefix. Targets
        without it are served by ``verify_candidates``, one ``verify`` per draft."""
        ...

    async def generate(
        self,
        context: Sequence[int],
        *,
        n_prompt: int,
        max_tokens: int,
        sampling: Sampling,
        session: str,
        top_logprobs: int = 0,
    ) -> list[GeneratedToken]:
        """The target alone, for fallback when no draft is available."""
        ...

    async def release(self, session: str) -> None: ...

    async def aclose(self) -> None: ...


def positions_from_generation(
    generated: Sequence[int], draft: Sequence[DraftToken], sampling: Sampling
) -> list[TargetPosition]:
    """``len(draft) + 1`` positions for a target that confirms a draft by generating.

    ``generated`` is what the target produced on its own after the context (greedy
    or sampled with the request's parameters); it may stop early at an eog token,
    whose id then fills the positions after it (the loop ends the round there).
    For sampled requests each position reports the target's draw as a point mass:
    ``probs`` is 1 on the drawn token (0 on the rest of the draft's support) and
    ``tail_sample`` is the draw when it lies outside the support. ``accept_sampled``
    then accepts exactly the drafts that equal the draws and emits the first draw
    that differs, so the output is the target's own sample: exact, with no speedup.
    """
    assert generated, "the target generated nothing"
    out: list[TargetPosition] = []
    for i in range(len(draft) + 1):
        y = generated[i] if i < len(generated) else generated[-1]
        if sampling.greedy:
            out.append(TargetPosition(token=y))
            continue
        support = draft[i].dist if i < len(draft) else {}
        probs = {t: (1.0 if t == y else 0.0) for t in support}
        out.append(TargetPosition(token=y, probs=probs, tail_sample=None if y in support else y))
    return out


# Token texts that llama.cpp itself marks end-of-generation (src/llama-vocab.cpp,
# the pinned commit): its eog list, then its FIM pad / repo / file-separator
# texts, which it adds to the eog set too. A target that does not list its eog
# ids is asked to tokenize each; those that come back as one token of exactly
# that text are its eog tokens. (Eog ids that a GGUF sets by metadata alone,
# under some other text, are missed; the eos token is looked up separately.)
EOG_TEXTS = (
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
    "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
    "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
    "<\uff5cend\u2581of\u2581sentence\uff5c>", "[e~[",
    "<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]",
    "<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>",
    "<|file_sep|>",
)


async def verify_candidates(
    target: TargetBackend,
    context: Sequence[int],
    drafts: Sequence[Sequence[DraftToken]],
    *,
    n_prompt: int,
    sampling: Sampling,
    session: str,
    top_logprobs: int = 0,
) -> list[list[TargetPosition]]:
    """Score several greedy candidate drafts: in one ``verify_many`` call where the target
    has it, else one ``verify`` per candidate, in turn (they share the session's cache)."""
    assert sampling.greedy or len(drafts) == 1, "several candidates are scored for greedy requests only"
    if len(drafts) > 1 and hasattr(target, "verify_many"):
        return await target.verify_many(context, drafts, n_prompt=n_prompt, session=session,
                                        top_logprobs=top_logprobs)
    return [
        await target.verify(context, d, n_prompt=n_prompt, sampling=sampling, session=session,
                            top_logprobs=top_logprobs)
        for d in drafts
    ]
