"""The proxy's long-lived parts: backends, the target's facts, totals and metrics.

One ``ProxyRuntime`` lives on ``app.state`` for the app's lifetime (opened and
closed by the lifespan). Per-request state lives in ``Generation`` objects.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Sequence

from tightwad.backends.base import DraftBackend, TargetBackend, TargetInfo
from tightwad.config import ProxyConfig
from tightwad.drafting import fallback_reason
from tightwad.errors import BackendError, BackendTimeout, BackendUnavailable
from tightwad.generation import Generation, GenerationRequest, RoundRecord
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
DRAFTER_REST_S = 30.0
RELEASE_GRACE_S = 2.0  # on shutdown, how long session releases still in flight may take


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
    # After a draft fails mid-request, new requests leave this drafter out until then
    # (while another is usable), so a dead or hung box costs one failure, not one per request.
    resting_until: float = 0.0

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
        self._adaptive_by_set: dict[tuple[str, ...], AdaptiveK] = {}
        # Session releases sent after a request's last token: held here so they are
        # not garbage-collected mid-flight, and finished (briefly) on shutdown.
        self._releases: set[asyncio.Task[None]] = set()

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
            if d.healthy:
                d.resting_until = 0.0
            if d.healthy and not d.usable and self.target_info is not None:
                await self._recheck(d)  # it came up since its check failed

    async def choose_drafters(self) -> tuple[list[DrafterState], DrafterState | None]:
        """(the usable drafters for a new request, in configured order; the drafter that
        failed its check, if none is usable).

        When none has passed its tokenizer check, those whose check failed (down or
        hung at start-up, say) are checked again, so a drafter that comes up later is
        used from then on.
        """
        usable = [d for d in self.drafters if d.usable]
        awake = [d for d in usable if d.resting_until <= time.monotonic()]
        if awake or usable:
            return awake or usable, None
        failed = None
        for d in self.drafters:
            await self._recheck(d)
            if d.usable:
                usable.append(d)
            elif d.check_error is not None and failed is None:
                failed = d
        return usable, (None if usable else failed)

    def _adaptive(self, asked: list[DrafterState]) -> AdaptiveK:
        # Costs and acceptance are properties of the machines and the pair (or of the
        # set of drafters asked together), so one learner per set serves its requests.
        key = tuple(d.backend.name for d in asked)
        learner = self._adaptive_by_set.get(key)
        if learner is None:
            learner = self._adaptive_by_set[key] = AdaptiveK(initial_k=DEFAULT_K)
            if len(asked) == 1:
                asked[0].adaptive = learner
        return learner

    async def new_generation(self, request: GenerationRequest) -> Generation:
        """A generation with the drafters to use. When every drafter is failing, the request
        goes on with the target alone (a fallback, counted) or, with
        ``fallback_on_draft_failure`` off, fails with the drafter's error."""
        info = self.target_info
        assert info is not None and self.pieces is not None
        cfg = self.config
        usable, failed = await self.choose_drafters()
        if failed is not None and not cfg.fallback_on_draft_failure:
            exc = failed.check_error
            cls = BackendTimeout if isinstance(exc, BackendTimeout) else BackendUnavailable
            raise cls(f"the draft '{failed.backend.name}' is not usable (fallback_on_draft_failure "
                      f"is off): {exc.message if exc else 'unchecked'}") from exc
        several = cfg.parallel_drafters and request.sampling.greedy and len(usable) > 1
        # Asked together (greedy), or the first with the others standing by for it.
        asked = usable if several else usable[:1]
        first = usable[0] if usable else failed
        name = first.backend.name if first is not None else "none"

        adaptive = None
        if cfg.max_draft_tokens is not None:
            k: Callable[[], int] | int = cfg.max_draft_tokens
        elif not asked:
            k = DEFAULT_K
        else:
            adaptive = self._adaptive(asked)
            k = adaptive.choose

        def on_round(record: RoundRecord) -> None:
            self.stats.observe_round(record)
            self.metrics.observe_round(record)
            if adaptive is not None and record.result.n_drafted:
                adaptive.observe(accepted_mask=record.result.accepted_mask,
                                 draft_s=record.draft_s, verify_s=record.verify_s)

        generation = Generation(
            request,
            drafters=[d.backend for d in usable],
            target=self.target,
            eog_tokens=info.eog_token_ids,
            piece=self.pieces,
            choose_k=k,
            draft_timeout_s=cfg.draft_timeout_s,
            fallback_on_draft_failure=cfg.fallback_on_draft_failure,
            pipeline=cfg.pipeline_drafts,
            parallel_drafters=cfg.parallel_drafters,
            min_confidence=cfg.draft_min_confidence,
            on_round=on_round,
            on_fallback=lambda reason: self.metrics.observe_fallback(name, reason),
            on_drafter_error=self._drafter_failed,
            ensure_pieces=self.pieces.ensure,
            release=self._release_later,
        )
        if failed is not None and failed.check_error is not None:
            log.warning("draft %s is not usable (%s): this request uses the target alone",
                        name, failed.check_error)
            generation.note_fallback(fallback_reason(failed.check_error))
        return generation

    def _drafter_failed(self, name: str, reason: str) -> None:
        self.metrics.observe_drafter_error(name, reason)
        for d in self.drafters:
            if d.backend.name == name:
                d.healthy = False
                d.resting_until = time.monotonic() + DRAFTER_REST_S

    def _release_later(self, session: str) -> None:
        """Free the target's cache slot for ``session`` without holding up the answer."""

        async def release() -> None:
            try:
                await self.target.release(session)
            except Exception as exc:  # a lost release only costs the target a slot until reuse
                log.debug("releasing session %s failed: %s", session, exc)

        task = asyncio.get_running_loop().create_task(release())
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)

    async def aclose(self) -> None:
        if self._releases:
            await asyncio.wait(self._releases, timeout=RELEASE_GRACE_S)
        for d in self.drafters:
            await d.backend.aclose()
        await self.target.aclose()
