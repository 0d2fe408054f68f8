"""Tiny self-made draft/target pairs: same bytes every run, real llama.cpp
models with SmolLM2's tokenizer, and greedy acceptance in each pair's band."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tightwad import llamacpp, models, tinymodels
from tightwad.errors import ModelFetchError

PROBE_TEXT = "Hello, world! def f(x):\n    return x ** 2  # naïve 🚀 <|im_start|>user\n"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="session")
def libllama_dir() -> Path:
    """The pinned llama.cpp build (``images/llama.cpp/build.sh --print-dir``)."""
    try:
        return llamacpp.bin_dir()
    except llamacpp.LlamaBuildMissing as exc:
        pytest.skip(f"llama.cpp is not built, so tiny models cannot be run: {exc.message}")


@pytest.fixture(scope="session")
def llama_cpp(libllama_dir: Path) -> ModuleType:
    if "llama_cpp" not in sys.modules:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("LLAMA_CPP_LIB_PATH", str(libllama_dir))
            import llama_cpp
    import llama_cpp

    return llama_cpp


@pytest.fixture(scope="session")
def smollm_path() -> Path:
    return models.fetch(tinymodels.TOKENIZER_SOURCE)


def _load(llama_cpp: ModuleType, path: Path, **kwargs):
    # One thread for both decode kinds: with two, ggml's workers spin-wait and
    # a tiny model slows tenfold on a busy 2-core machine.
    return llama_cpp.Llama(
        model_path=str(path), n_ctx=256, logits_all=False, verbose=False, seed=0,
        n_threads=1, n_threads_batch=1, **kwargs,
    )


def test_three_named_pairs_with_separated_bands() -> None:
    assert list(tinymodels.PAIRS) == ["high", "medium", "near-zero"]
    high, medium, low = (tinymodels.PAIRS[n].acceptance for n in tinymodels.PAIRS)
    assert high[0] >= 0.8
    assert low[1] <= 0.1
    assert low[1] < medium[0] and medium[1] < high[0]
    for spec in tinymodels.PAIRS.values():
        assert spec.draft_layers < spec.target_layers


def test_cache_key_follows_the_generator(monkeypatch: pytest.MonkeyPatch) -> None:
    import dataclasses

    spec = tinymodels.PAIRS["medium"]
    keys = {p.key for p in tinymodels.PAIRS.values()}
    assert len(keys) == 3
    assert dataclasses.replace(spec, acceptance=(0.0, 1.0)).key == spec.key
    assert dataclasses.replace(spec, layer_scale=spec.layer_scale + 0.01).key != spec.key
    assert dataclasses.replace(spec, seed=spec.seed + 1).key != spec.key
    assert dataclasses.replace(spec, target_layers=spec.target_layers + 1).key != spec.key
    monkeypatch.setattr(tinymodels, "GENERATOR_VERSION", tinymodels.GENERATOR_VERSION + 1)
    assert spec.key not in keys


def test_write_pair_is_byte_for_byte_deterministic(tmp_path: Path) -> None:
    first = tinymodels.write_pair("medium", tmp_path / "a")
    second = tinymodels.write_pair("medium", tmp_path / "b")
    assert [_sha256(p) for p in first] == [_sha256(p) for p in second]
    draft, target = first
    assert _sha256(draft) != _sha256(target)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [
        "medium-draft.gguf", "medium-target.gguf",
    ], "no temporary files may be left behind"


def test_cached_pair_is_only_written_when_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tinymodels, "cache_dir", lambda: tmp_path)
    draft, target = tinymodels.write_pair("high")
    assert draft.parent == tmp_path / tinymodels.PAIRS["high"].key
    stamps = {p: p.stat().st_mtime_ns for p in (draft, target)}
    target_sha = _sha256(target)
    draft.unlink()
    assert tinymodels.write_pair("high") == (draft, target)
    assert draft.exists()
    assert target.stat().st_mtime_ns == stamps[target]
    assert _sha256(target) == target_sha


def test_cli_prints_the_paths(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert tinymodels.main(["--out", str(tmp_path), "near-zero"]) == 0
    out = capsys.readouterr().out
    assert str(tmp_path / "near-zero-draft.gguf") in out
    assert str(tmp_path / "near-zero-target.gguf") in out
    with pytest.raises(SystemExit):
        tinymodels.main(["no-such-pair"])
    with pytest.raises(ModelFetchError, match="known pairs: high, medium, near-zero"):
        tinymodels.write_pair("no-such-pair")


def test_models_load_and_share_smollm2_tokenizer(
    llama_cpp: ModuleType, smollm_path: Path
) -> None:
    spec = tinymodels.PAIRS["high"]
    draft, target = tinymodels.write_pair("high")
    reference = _load(llama_cpp, smollm_path, vocab_only=True)
    try:
        expected = reference.tokenize(PROBE_TEXT.encode(), add_bos=False, special=True)
        template = reference.metadata["tokenizer.chat_template"]
    finally:
        reference.close()
    assert len(expected) > 10
    for path, layers in ((draft, spec.draft_layers), (target, spec.target_layers)):
        llm = _load(llama_cpp, path)
        try:
            assert llm.n_vocab() == tinymodels.N_VOCAB
            assert llm.n_embd() == tinymodels.N_EMBD
            assert llama_cpp.llama_model_n_layer(llm.model) == layers
            assert llm.metadata["general.architecture"] == "llama"
            assert llm.metadata["tokenizer.chat_template"] == template
            assert llm.tokenize(PROBE_TEXT.encode(), add_bos=False, special=True) == expected
        finally:
            llm.close()


@pytest.mark.parametrize("name", list(tinymodels.PAIRS))
def test_greedy_acceptance_is_in_band(llama_cpp: ModuleType, name: str) -> None:
    draft, target = tinymodels.write_pair(name)
    rate = tinymodels.measure_greedy_acceptance(draft, target, tinymodels.PROBE_PROMPTS, 48)
    lo, hi = tinymodels.PAIRS[name].acceptance
    assert lo <= rate <= hi, f"{name}: greedy acceptance {rate:.3f} outside [{lo}, {hi}]"


def test_module_imports_without_numpy_or_llama_cpp() -> None:
    import subprocess

    code = (
        "import sys, tightwad.tinymodels; "
        "assert not {'numpy', 'gguf', 'llama_cpp'} & set(sys.modules), sorted(sys.modules)"
    )
    env = {k: v for k, v in os.environ.items() if k != "LLAMA_CPP_LIB_PATH"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
