"""Build draft and target backends from configuration entries (``config.BackendConfig``)."""

from __future__ import annotations

from typing import Any, Protocol

from tightwad.backends.base import DraftBackend, TargetBackend
from tightwad.backends.llamacpp_draft import LlamaCppDraft
from tightwad.backends.llamacpp_target import LlamaCppTarget
from tightwad.backends.ollama import OllamaDraft
from tightwad.backends.openai_draft import OpenAIDraft
from tightwad.backends.openai_echo import OpenAIEchoTarget
from tightwad.backends.verifier import VerifierTarget
from tightwad.errors import ConfigError


class BackendSpec(Protocol):
    """What the factories read from a configuration entry."""

    name: str
    url: str
    backend: str
    model_name: str | None
    timeout_s: float
    api_key: str | None


DRAFT_KINDS = ("llamacpp", "ollama", "openai")
TARGET_KINDS = ("verifier", "openai-echo", "llamacpp")


def make_drafter(cfg: BackendSpec) -> DraftBackend:
    common: dict[str, Any] = {"name": cfg.name, "timeout_s": cfg.timeout_s, "api_key": cfg.api_key}
    if cfg.backend == "llamacpp":
        return LlamaCppDraft(cfg.url, **common)
    if cfg.backend == "ollama":
        return OllamaDraft(cfg.url, model_name=cfg.model_name, **common)
    if cfg.backend == "openai":
        return OpenAIDraft(cfg.url, model_name=cfg.model_name, **common)
    raise ConfigError(
        f"draft.{cfg.name}.backend", f"'{cfg.backend}' is not one of {', '.join(DRAFT_KINDS)}"
    )


def make_target(cfg: BackendSpec) -> TargetBackend:
    common: dict[str, Any] = {"timeout_s": cfg.timeout_s, "api_key": cfg.api_key}
    if cfg.backend == "verifier":
        return VerifierTarget(cfg.url, **common)
    if cfg.backend == "openai-echo":
        return OpenAIEchoTarget(cfg.url, model_name=cfg.model_name, **common)
    if cfg.backend == "llamacpp":
        return LlamaCppTarget(cfg.url, model_name=cfg.model_name, **common)
    raise ConfigError(
        "target.backend", f"'{cfg.backend}' is not one of {', '.join(TARGET_KINDS)}"
    )
