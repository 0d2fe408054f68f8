"""Where the pinned llama.cpp build lives (images/llama.cpp/pin.env and build.sh)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tightwad.errors import TightwadError

REPO_ROOT = Path(__file__).resolve().parents[1]
BUILD_SCRIPT = REPO_ROOT / "images" / "llama.cpp" / "build.sh"
# llama-server flags for a drafter behind the proxy. No host-RAM prompt cache: every
# proxied request is a new prompt, each added an entry that later requests searched,
# and drafting grew ~50x slower over 10,000 requests (4 -> 200 ms/token). The slots'
# own prefix reuse stays on. compose.yaml's drafter carries the same flags.
DRAFT_SERVER_FLAGS = ("--cache-ram", "0")


class LlamaBuildMissing(TightwadError):
    pass


def bin_dir(*, build_if_missing: bool = False) -> Path:
    """The bin directory holding llama-server, ggml-rpc-server and libllama.so.

    ``TIGHTWAD_LLAMA_BIN`` wins (container images set it); otherwise the cached
    build of the pinned commit that ``images/llama.cpp/build.sh`` made.
    """
    env = os.environ.get("TIGHTWAD_LLAMA_BIN")
    if env:
        path = Path(env)
        if not (path / "libllama.so").exists():
            raise LlamaBuildMissing(f"TIGHTWAD_LLAMA_BIN={env} holds no libllama.so")
        return path
    if not BUILD_SCRIPT.exists():
        raise LlamaBuildMissing(
            "no pinned llama.cpp build found: set TIGHTWAD_LLAMA_BIN to a directory with "
            "llama-server and libllama.so"
        )
    args = [str(BUILD_SCRIPT)] if build_if_missing else [str(BUILD_SCRIPT), "--print-dir"]
    proc = subprocess.run(args, stdout=subprocess.PIPE, text=True)
    path = Path(proc.stdout.strip().splitlines()[-1]) if proc.stdout.strip() else None
    if proc.returncode != 0 or path is None:
        raise LlamaBuildMissing(
            "the pinned llama.cpp is not built yet: run `make llama` "
            f"(or {BUILD_SCRIPT.relative_to(REPO_ROOT)})"
        )
    return path


def binary(name: str) -> Path:
    path = bin_dir() / name
    if not path.exists():
        raise LlamaBuildMissing(f"{path} does not exist")
    return path
