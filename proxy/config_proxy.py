"""The speculation sections: ``proxy`` (its drafters and target) and ``verifier``.

Both read TIGHTWAD_MODE (and the proxy TIGHTWAD_PROXY_PORT and
TIGHTWAD_API_KEY) through tightwad.config_env; the verifier inherits
proxy.mode and may not be looser than a strict proxy.
"""

from __future__ import annotations

from tightwad.config_env import EnvOverrides, override
from tightwad.config_reader import REQUIRED, Reader
from tightwad.config_schema import (
    ADDRESS_PATTERN,
    DRAFT_BACKENDS,
    ID_HELP,
    ID_PATTERN,
    MODES,
    TARGET_BACKENDS,
    BackendConfig,
    ProxyConfig,
    VerifierConfig,
)
from tightwad.errors import ConfigError


def _parse_backend(
    b: Reader, role: str, *, name: str, timeout_s: float, name_required: bool = False
) -> BackendConfig:
    config = BackendConfig(
        name=b.str(
            "name", REQUIRED if name_required else name, pattern=ID_PATTERN, expected=ID_HELP
        ),
        role=role,
        url=b.url("url"),
        backend=b.enum(
            "backend",
            DRAFT_BACKENDS if role == "draft" else TARGET_BACKENDS,
            "llamacpp" if role == "draft" else "verifier",
        ),
        model_name=b.str("model_name", None),
        timeout_s=b.number("timeout_s", timeout_s, max=86400),
        api_key=b.str("api_key", None),
    )
    b.done()
    return config


def parse_proxy(root: Reader, env: EnvOverrides) -> ProxyConfig | None:
    p = root.sub("proxy")
    if p is None:
        return None
    host = p.str("host", "127.0.0.1", pattern=ADDRESS_PATTERN, expected="an address to bind")
    port = p.int("port", 8088, min=1, max=65535)
    # "auto" (the default): the proxy adapts the draft length to what it measures.
    if str(p.raw("max_draft_tokens", "auto")).strip().lower() == "auto":
        max_draft_tokens = None
    else:
        max_draft_tokens = p.int("max_draft_tokens", REQUIRED, min=1, max=256, extra=" or 'auto'")
    request_timeout_s = p.number("request_timeout_s", 300.0, max=86400)
    draft_timeout_s = p.number("draft_timeout_s", 10.0, max=3600)
    if p.has("draft") and p.has("drafters"):
        raise ConfigError(p.key("drafters"), "give either proxy.draft or proxy.drafters, not both")
    if (draft := p.sub("draft")) is not None:
        drafters = [_parse_backend(draft, "draft", name="draft", timeout_s=draft_timeout_s)]
    elif p.has("drafters"):
        drafters, seen = [], {}
        for d in p.items("drafters"):
            drafter = _parse_backend(
                d, "draft", name="", timeout_s=draft_timeout_s, name_required=True
            )
            if drafter.name in seen:
                raise ConfigError(
                    d.key("name"),
                    f"duplicate drafter name {drafter.name!r} (also {seen[drafter.name]})",
                )
            seen[drafter.name] = d.key("name")
            drafters.append(drafter)
        if not drafters:
            raise ConfigError(p.key("drafters"), "needs at least one drafter")
    else:
        p.missing("draft", " (or list several under proxy.drafters)")
    if (target := p.sub("target")) is None:
        p.missing("target")
    config = ProxyConfig(
        host=host,
        port=env.proxy_port or port,
        max_draft_tokens=max_draft_tokens,
        fallback_on_draft_failure=p.bool("fallback_on_draft_failure", True),
        mode=override(env.mode, p.enum("mode", MODES, "fast")),
        max_tokens_limit=p.int("max_tokens_limit", 4096, min=1, max=1 << 20),
        max_request_bytes=p.int("max_request_bytes", 1 << 20, min=1024, max=1 << 30),
        request_timeout_s=request_timeout_s,
        draft_timeout_s=draft_timeout_s,
        drafters=tuple(drafters),
        target=_parse_backend(target, "target", name="target", timeout_s=request_timeout_s),
        api_key=override(env.api_key, p.str("api_key", None)),
        pipeline_drafts=p.bool("pipeline_drafts", False),
        parallel_drafters=p.bool("parallel_drafters", True),
        draft_min_confidence=p.number("draft_min_confidence", 0.0, gt=-1e-12, max=1.0),
    )
    p.done()
    return config


def parse_verifier(root: Reader, proxy: ProxyConfig | None, env: EnvOverrides) -> VerifierConfig:
    v = root.sub("verifier") or Reader({}, "verifier")
    inherited = proxy.mode if proxy else "fast"
    config = VerifierConfig(
        ctx_size=v.int("ctx_size", 4096, min=64, max=1 << 24),
        parallel=v.int("parallel", 4, min=1, max=256),
        mode=override(env.mode, v.enum("mode", MODES, inherited)),
        top_logprobs_max=v.int("top_logprobs_max", 20, min=0, max=100),
        threads=v.int("threads", None, min=1, max=1024),
    )
    v.done()
    if proxy and proxy.mode == "strict" and config.mode == "fast":
        raise ConfigError(
            "verifier.mode",
            "is fast but proxy.mode is strict, whose output must equal the target's bit for bit; "
            "remove verifier.mode to inherit strict",
        )
    return config
