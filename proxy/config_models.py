"""The ``models`` section, and what runs them: ``images`` (in Docker) and ``binaries`` (local)."""

from __future__ import annotations

import re

from tightwad.config_reader import Reader
from tightwad.config_schema import (
    BACKENDS,
    FLASH_ATTN,
    BinariesConfig,
    ImagesConfig,
    ModelConfig,
)
from tightwad.errors import ConfigError

_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]*\Z")
_GGUF = re.compile(r".+\.gguf\Z", re.IGNORECASE)
_MODEL_NAME_HELP = "a name of letters, digits, '.', '_', ':', '/' and '-'"


def parse_models(root: Reader) -> dict[str, ModelConfig]:
    models: dict[str, ModelConfig] = {}
    default_key = None
    for name, m in root.entries("models", _MODEL_NAME, _MODEL_NAME_HELP):
        path = m.str("path", pattern=_GGUF, expected="a path to a .gguf file")
        ctx_size = m.int("ctx_size", 4096, min=0, max=1 << 24)
        predict = m.int("predict", -1, min=-1, max=1 << 24)
        flash_attn = m.raw("flash_attn", "auto")
        if isinstance(flash_attn, bool):
            flash_attn = "on" if flash_attn else "off"
        else:
            flash_attn = m.enum("flash_attn", FLASH_ATTN, "auto")
        default = m.bool("default", False)
        if default and default_key:
            raise ConfigError(
                m.key("default"),
                f"only one model may be the default, but {default_key} is true too",
            )
        default_key = m.key("default") if default else default_key
        m.done()
        models[name] = ModelConfig(name, path, ctx_size, predict, flash_attn, default)
    return models


def parse_images(root: Reader) -> ImagesConfig:
    i = root.sub("images") or Reader({}, "images")
    image = re.compile(r"[^\s]+\Z")
    prefix = i.str(
        "registry_prefix", "", pattern=image, expected="a registry path without spaces", empty=True
    )
    defaults = ImagesConfig()
    config = ImagesConfig(
        registry_prefix=prefix if not prefix or prefix.endswith("/") else prefix + "/",
        **{
            b: i.str(b, getattr(defaults, b), pattern=image, expected="an image name")
            for b in BACKENDS
        },
    )
    i.done()
    return config


def parse_binaries(root: Reader) -> BinariesConfig:
    b = root.sub("binaries") or Reader({}, "binaries")
    defaults = BinariesConfig()
    config = BinariesConfig(
        coordinator=b.str("coordinator", defaults.coordinator),
        rpc_server=b.str("rpc_server", defaults.rpc_server),
    )
    b.done()
    return config
