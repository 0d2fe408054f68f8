"""The proxy's long-lived parts: backends, the target's facts, totals and metrics.

One ``ProxyRuntime`` lives on ``app.state`` for the app's lifetime (opened and
closed by the lifespan). Per-request state lives in ``Generation`` objects.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable, Sequence

from tightwad.backends.base import DraftBackend, TargetBackend, TargetInfo
from tightwad.config import ProxyConfig
from tightwad.errors import BackendError, BackendTimeout, BackendUnavailable
from tightwad.generation import Generation, GenerationRequest, RoundRecord, fallback_reason
from tightwad.metrics import ProxyMetrics
from tightwad.proxy_stats import ProxyStats
from tightwad.speculation.adaptive import AdaptiveK

log = logging.getLogger("tightwad.proxy")

PROBE_TEXTS = (
    "Hello, world! 123 + 456 = 579.",
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
    "Ünïcödé, 日本語, emoji 🚀 and   spaces.",
)
DEFAULT_K = 8


@dataclasses.dataclass
class DrafterState:
    backend: DraftBackend
    tokenizer: str = "unchecked"  # "shared" (token ids travel) | "retokenize" (text travels)
    healthy: bool = False
    # Why the last tokenizer check failed (the drafter was down or hung); None once checked.
    check_error: BackendError | None = None
    checks: int = 0  # tokenizer checks finished, so concurrent requests share one re-check
    lock: asyncio.Lock = dataclasses.field(default_factory=asyncio.Lock)
    # With max_draft_tokens "auto": this drafter's draft length, learnt from its rounds.
    # It is shared by the drafter's requests on purpose (costs and acceptance are
    # properties of the machines and the pair) and only updated between awaits.
    adaptive: AdaptiveK | None = None

    @property
    def usable(self) -> bool:
        return self.tokenizer in ("shared", "retokenize")


class PieceTable:
    """Token id -> bytes: from the verifier's vocabulary, else filled by detokenizing."""

    def __init__(self, target: TargetBackend, pieces: Sequence[bytes] | None):
        self._target = target
        self._table = list(pieces) if pieces is not None else None
        self._cache: dict[int, bytes] = {}

    def __call__(self, token: int) -> bytes:
        if self._table is not None:
            return self._table[token] if 0 <= token < len(self._table) else b""
        return self._cache.get(token, b"")

    async def ensure(self, tokens: Sequence[int]) -> None:
        if self._table is not None:
            return
        for t in set(tokens) - self._cache.keys():
            self._cache[t] = (await self._target.detokenize([t])).encode("utf-8")


class ProxyRuntime:
    def __init__(self, config: ProxyConfig, target: TargetBackend, drafters: Sequence[DraftBackend]):
        self.config = config
        self.target = target
        self.drafters = [DrafterState(d) for d in drafters]
        self.target_info: TargetInfo | None = None
        self.target_healthy = False
        self.pieces: PieceTable | None = None
        self.stats = ProxyStats()
        self.metrics = ProxyMetrics(model=config.target.model_name or "target", target_backend=target.kind)
        for d in self.drafters:
            self.metrics.init_drafter(d.backend.name)
        self._ready_lock = asyncio.Lock()

    @property
    def model_name(self) -> str:
        if self.config.target.model_name:
            return self.config.target.model_name
        return self.target_info.model if self.target_info else "target"

    async def ensure_ready(self) -> TargetInfo:
        """Fetch the target's facts once; until then requests get a 503 with Retry-After."""
        if self.target_info is not None:
            return self.target_info
        async with self._ready_lock:
            if self.target_info is None:
                try:
                    info = await self.target.info()
                except BackendError as exc:
                    self.target_healthy = False
                    raise BackendUnavailable(f"the target is not ready: {exc.message}") from exc
                self.pieces = PieceTable(self.target, info.pieces)
                self.target_info = info
                self.metrics.bind_model(self.model_name)
                self.target_healthy = True
                self.metrics.target_generate_only.labels(model=self.model_name, target=self.target.kind).set(
                    1 if info.verify_mode == "generate" else 0
                )
                await self.check_tokenizers()
        assert self.target_info is not None
        return self.target_info

    async def check_tokenizers(self) -> None:
        """Token ids travel only if draft and target split text identically.

        A llama-server drafter from another model family is switched to its
        OpenAI text endpoint, whose text the target's tokenizer re-tokenizes:
        the two id spaces are never mixed.
        """
        for state in self.drafters:
            await self._check_drafter(state)

    async def _check_drafter(self, state: DrafterState) -> None:
        """Decide how ``state`` talks to the target; a drafter that is down or hangs stays
        "unchecked" (with the error kept) and is checked again when it is next needed."""
        try:
            state.tokenizer = await self._tokenizer_mode(state.backend)
        except BackendError as exc:
            log.warning("drafter %s: tokenizer check failed: %s", state.backend.name, exc)
            state.check_error = exc
            return
        finally:
            state.checks += 1
        state.check_error = None
        if state.tokenizer == "retokenize" and state.backend.kind == "llamacpp":
            from tightwad.backends.openai_draft import OpenAIDraft

            old = state.backend
            cfg = next((d for d in self.config.drafters if d.name == old.name), None)
            state.backend = OpenAIDraft(
                old.url, name=old.name, model_name=cfg.model_name if cfg else None,
                timeout_s=cfg.timeout_s if cfg else self.config.draft_timeout_s,
                api_key=cfg.api_key if cfg else None,
            )
            await old.aclose()
        log.info("drafter %s: tokenizer %s", state.backend.name, state.tokenizer)

    async def _recheck(self, state: DrafterState) -> None:
        """Check an unchecked drafter again; requests waiting meanwhile share the result."""
        seen = state.checks
        async with state.lock:
            if state.checks == seen and not state.usable:
                await self._check_drafter(state)

    async def _tokenizer_mode(self, drafter: DraftBackend) -> str:
        """"shared" or "retokenize"; raises BackendError when the drafter cannot be asked."""
        if drafter.kind != "llamacpp":
            return "retokenize"  # these drafters speak text by construction
        assert self.target_info is not None
        if await drafter.vocab_size() not in (None, self.target_info.n_vocab):
            return "retokenize"
        for text in PROBE_TEXTS:
            theirs = await drafter.tokenize(text)
            ours = await self.target.tokenize(text, add_special=False)
            if theirs != ours:
                return "retokenize"
        return "shared"

    async def refresh_health(self) -> None:
        async def check(role: str, name: str, kind: str, probe) -> bool:  # noqa: ANN001
            try:
                ok = bool(await probe())
            except BackendError:
                ok = False
            self.metrics.backend_up.labels(model=self.model_name, role=role, name=name, backend=kind).set(int(ok))
            return ok

        self.target_healthy = await check("target", "target", self.target.kind, self.target.health)
        for d in self.drafters:
            d.healthy = await check("draft", d.backend.name, d.backend.kind, d.backend.health)
            if d.healthy and not d.usable and self.target_info is not None:
                await self._recheck(d)  # it came up since its check failed

    async def choose_drafter(self) -> tuple[DrafterState | None, DrafterState | None]:
        """(the drafter for a new request, or None; the drafter that failed, if that is why).

        The first drafter whose tokenizer check passed is used. When none has, those
        whose check failed (down or hung at start-up, say) are checked again, so a
        drafter that comes up later is used from then on.
        """
        for d in self.drafters:
            if d.usable:
                return d, None
        failed = None
        for d in self.drafters:
            await self._recheck(d)
            if d.usable:
                return d, None
            if d.check_error is not None and failed is None:
                failed = d
        return None, failed

    def choose_k(self, drafter: DrafterState | None) -> Callable[[], int] | int:
        if self.config.max_draft_tokens is not None:
            return self.config.max_draft_tokens
        if drafter is None:
            return DEFAULT_K
        if drafter.adaptive is None:
            drafter.adaptive = AdaptiveK(initial_k=DEFAULT_K)
        return drafter.adaptive.choose

    async def new_generation(self, request: GenerationRequest) -> Generation:
        """A generation with the drafter to use. When every drafter is failing, the request
        goes on with the target alone (a fallback, counted) or, with
        ``fallback_on_draft_failure`` off, fails with the drafter's error."""
        info = self.target_info
        assert info is not None and self.pieces is not None
        drafter, failed = await self.choose_drafter()
        if failed is not None and not self.config.fallback_on_draft_failure:
            exc = failed.check_error
            cls = BackendTimeout if isinstance(exc, BackendTimeout) else BackendUnavailable
            raise cls(f"the draft '{failed.backend.name}' is not usable (fallback_on_draft_failure "
                      f"is off): {exc.message if exc else 'unchecked'}") from exc
        name = (drafter or failed).backend.name if (drafter or failed) else "none"

        k = self.choose_k(drafter)
        adaptive = drafter.adaptive if drafter is not None else None

        def on_round(record: RoundRecord) -> None:
            self.stats.observe_round(record)
            self.metrics.observe_round(record)
            if adaptive is not None and record.result.n_drafted:
                adaptive.observe(accepted_mask=record.result.accepted_mask,
                                 draft_s=record.draft_s, verify_s=record.verify_s)

        generation = Generation(
            request,
            drafter=drafter.backend if drafter else None,
            target=self.target,
            eog_tokens=info.eog_token_ids,
            piece=self.pieces,
            choose_k=k,
            draft_timeout_s=self.config.draft_timeout_s,
            fallback_on_draft_failure=self.config.fallback_on_draft_failure,
            on_round=on_round,
            on_fallback=lambda reason: self.metrics.observe_fallback(name, reason),
            ensure_pieces=self.pieces.ensure,
        )
        if failed is not None and failed.check_error is not None:
            log.warning("draft %s is not usable (%s): this request uses the target alone",
                        name, failed.check_error)
            generation.note_fallback(fallback_reason(failed.check_error))
        return generation

    async def aclose(self) -> None:
        for d in self.drafters:
            await d.backend.aclose()
        await self.target.aclose()
