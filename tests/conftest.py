"""Shared fixtures: the pinned llama.cpp build, real model files, real servers.

Servers are session-scoped and keyed by their arguments, so each distinct
configuration starts once per test run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from servers import ServerProcess, llama_server, verifier

from tightwad import llamacpp, models

QWEN_DRAFT = "qwen2.5-coder-0.5b-instruct-q4_k_m"
QWEN_TARGET = "qwen2.5-coder-1.5b-instruct-q4_k_m"
SMOLLM = "smollm2-135m-instruct-q4_1"


@pytest.fixture(scope="session")
def llama_bin() -> Path:
    try:
        return llamacpp.bin_dir()
    except llamacpp.LlamaBuildMissing as exc:
        pytest.fail(f"{exc.message} (the suite needs the real llama.cpp)")


def _model(name: str) -> Path:
    path = models.model_path(name)
    if not path.exists():
        pytest.fail(f"model {name} is not fetched: run `make models`")
    return path


@pytest.fixture(scope="session")
def qwen_target() -> Path:
    return _model(QWEN_TARGET)


@pytest.fixture(scope="session")
def qwen_draft() -> Path:
    return _model(QWEN_DRAFT)


@pytest.fixture(scope="session")
def smollm() -> Path:
    return _model(SMOLLM)


@pytest.fixture(scope="session")
def servers(llama_bin: Path) -> Iterator[Callable[..., ServerProcess]]:
    """``servers(kind, model, *args)`` starts (once) and returns a healthy server."""
    started: dict[tuple, ServerProcess] = {}
    factories = {"verifier": verifier, "llama-server": llama_server}

    def get(kind: str, model: Path | str, *args: str) -> ServerProcess:
        key = (kind, str(model), args)
        server = started.get(key)
        if server is None or server.proc is None or server.proc.poll() is not None:
            server = factories[kind](model, *args).start()
            started[key] = server
        return server

    yield get
    for server in started.values():
        server.stop()
