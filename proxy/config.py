"""Load and check Tightwad's one configuration file, shared by the CLI, proxy and orchestrator.

    load_config(path=None, *, env=None) -> Config     a YAML file
    parse_config(data, *, source="<dict>") -> Config   an in-memory mapping

``configs/cluster.yaml`` documents every key. Defaults are filled in and every
rule is checked here, at load time, so the rest of Tightwad reads plain frozen
dataclasses (``tightwad.config_schema``, re-exported here). Each mistake raises
``ConfigError`` whose key is the full dotted path, e.g.
``workers[1].gpus[0].vram_gb: expected a number > 0, got -3``. Unknown keys are
errors, with a "did you mean" suggestion.

Environment overrides (applied by ``load_config``; ``parse_config`` only when
given ``env``): TIGHTWAD_CONFIG picks the file, TIGHTWAD_PROXY_PORT sets
proxy.port, TIGHTWAD_API_KEY sets proxy.api_key, TIGHTWAD_MODE sets proxy.mode
and verifier.mode.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from tightwad.config_cluster import check_cluster, parse_coordinator, parse_hosts, parse_workers
from tightwad.config_env import ENV_API_KEY, ENV_CONFIG, ENV_MODE, ENV_PROXY_PORT, read_env
from tightwad.config_models import parse_binaries, parse_images, parse_models
from tightwad.config_proxy import parse_proxy, parse_verifier
from tightwad.config_reader import Reader, show
from tightwad.config_schema import (
    DEFAULT_CONFIG_PATH,
    BackendConfig,
    BinariesConfig,
    Config,
    CoordinatorConfig,
    GpuConfig,
    HostConfig,
    ImagesConfig,
    ModelConfig,
    ProxyConfig,
    TlsConfig,
    VerifierConfig,
    WorkerConfig,
)
from tightwad.errors import ConfigError

__all__ = [
    "ENV_API_KEY",
    "ENV_CONFIG",
    "ENV_MODE",
    "ENV_PROXY_PORT",
    "BackendConfig",
    "BinariesConfig",
    "Config",
    "CoordinatorConfig",
    "GpuConfig",
    "HostConfig",
    "ImagesConfig",
    "ModelConfig",
    "ProxyConfig",
    "TlsConfig",
    "VerifierConfig",
    "WorkerConfig",
    "load_config",
    "parse_config",
]


def parse_config(
    data: Mapping[str, Any] | None,
    *,
    source: str = "<dict>",
    env: Mapping[str, str] | None = None,
    base_dir: str | os.PathLike[str] | None = None,
) -> Config:
    """Check an in-memory config. ``env`` (default: none) supplies the TIGHTWAD_* overrides;
    ``base_dir`` (default: leave as written) anchors relative TLS paths."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(source, f"expected a mapping at the top level, got {show(data)}")
    root = Reader(data, "")
    overrides = read_env(env or {})
    hosts = parse_hosts(root, Path(base_dir) if base_dir is not None else None)
    coordinator = parse_coordinator(root, hosts)
    workers = parse_workers(root, hosts)
    check_cluster(coordinator, workers, hosts)
    models = parse_models(root)
    proxy = parse_proxy(root, overrides)
    config = Config(
        source=source,
        proxy=proxy,
        coordinator=coordinator,
        workers=workers,
        hosts=hosts,
        models=models,
        verifier=parse_verifier(root, proxy, overrides),
        binaries=parse_binaries(root),
        images=parse_images(root),
    )
    root.done()
    return config


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects a key given twice in one mapping (PyYAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        first_line: dict[str, int] = {}
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                if key_node.value in first_line:
                    raise yaml.constructor.ConstructorError(
                        None,
                        None,
                        f"duplicate key {key_node.value!r} (first given at line "
                        f"{first_line[key_node.value]})",
                        key_node.start_mark,
                    )
                first_line[key_node.value] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def _read_yaml(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_StrictLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(source, f"invalid YAML{where}: {exc.problem or exc.context}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(source, f"invalid YAML: {exc}") from exc


def load_config(
    path: str | os.PathLike[str] | None = None, *, env: Mapping[str, str] | None = None
) -> Config:
    """Load the config at ``path``, else $TIGHTWAD_CONFIG, else ./configs/cluster.yaml.

    ``env`` (default ``os.environ``) supplies TIGHTWAD_CONFIG and the overrides.
    """
    env = os.environ if env is None else env
    if path is not None and str(path):
        origin = ""
    elif env.get(ENV_CONFIG, "").strip():
        path, origin = env[ENV_CONFIG].strip(), f" (named by {ENV_CONFIG})"
    else:
        path, origin = DEFAULT_CONFIG_PATH, f" (the default; pass a path or set {ENV_CONFIG})"
    file = Path(path).expanduser()
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(str(path), f"no such config file{origin}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(str(path), f"cannot read config file: {exc}") from exc
    data = _read_yaml(text, str(path))
    return parse_config(data, source=str(path), env=env, base_dir=file.absolute().parent)
