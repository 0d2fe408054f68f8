"""The TIGHTWAD_* environment overrides, read and checked once.

TIGHTWAD_CONFIG picks the file (tightwad.config.load_config); the others
override values from it: TIGHTWAD_PROXY_PORT sets proxy.port,
TIGHTWAD_API_KEY sets proxy.api_key, TIGHTWAD_MODE sets proxy.mode and
verifier.mode.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from tightwad.config_schema import MODES
from tightwad.errors import ConfigError

ENV_CONFIG = "TIGHTWAD_CONFIG"
ENV_PROXY_PORT = "TIGHTWAD_PROXY_PORT"
ENV_API_KEY = "TIGHTWAD_API_KEY"
ENV_MODE = "TIGHTWAD_MODE"


@dataclasses.dataclass(frozen=True)
class EnvOverrides:
    proxy_port: int | None = None
    api_key: str | None = None
    mode: str | None = None


def override(from_env: Any, from_file: Any) -> Any:
    """The environment's value when set; the file's (read, and so checked, either way)."""
    return from_file if from_env is None else from_env


def read_env(env: Mapping[str, str]) -> EnvOverrides:
    port = env.get(ENV_PROXY_PORT, "").strip()
    if port and not (port.isdigit() and 1 <= int(port) <= 65535):
        raise ConfigError(ENV_PROXY_PORT, f"expected an integer between 1 and 65535, got {port!r}")
    mode = env.get(ENV_MODE, "").strip().lower()
    if mode and mode not in MODES:
        raise ConfigError(ENV_MODE, f"expected one of {', '.join(MODES)}, got {env[ENV_MODE]!r}")
    api_key = env.get(ENV_API_KEY, "").strip()
    return EnvOverrides(int(port) if port else None, api_key or None, mode or None)
