"""Tiny self-made llama-architecture GGUF pairs for fast tests.

A pair is a draft and a target that share SmolLM2's tokenizer (every
``tokenizer.*`` key, chat template included, is copied byte for byte from the
real SmolLM2-135M GGUF) and the same seeded ``token_embd``/``output`` weights.
They differ only in depth: the draft has fewer layers than the target, and
layer ``i`` of both is drawn from the same seed, so the draft is the target
cut short. With small layer weights the residual stream is dominated by the
shared embedding and the two models agree on the next token; as the weights
grow the extra target layers pull the predictions apart. The scale of the
layer weights is therefore the one knob that sets the greedy acceptance rate.

Every file is F32 with n_embd 64, 4 heads, 2 KV heads and n_ff 128: about
27 MB, and thousands of tokens per second on a CPU. Generation is
deterministic (same bytes on every run) and files are written atomically.
Pairs are cached under ``~/.cache/tightwad/tiny/<key>/`` (``TIGHTWAD_CACHE``
moves the root), where the key hashes the pair's spec, the architecture, the
tokenizer source and ``GENERATOR_VERSION``; a change to any of them lands in a
new directory.

    python -m tightwad.tinymodels [--out DIR] [pair ...]

``measure_greedy_acceptance`` is the yardstick the pinned scales were chosen
with: it runs both models through llama-cpp-python against the pinned
libllama. The module imports only the standard library; ``numpy`` and
``gguf`` are imported when a model is written, ``llama_cpp`` when one is
measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import mmap
import os
import struct
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from tightwad.errors import ModelFetchError
from tightwad.models import MODELS, fetch

if TYPE_CHECKING:
    import numpy as np

# Bump when the bytes written for an unchanged PairSpec change (weight layout,
# metadata, initialisation); the cache key includes it.
GENERATOR_VERSION = 1

TOKENIZER_SOURCE = "smollm2-135m-instruct-q4_1"

ARCH = "llama"
N_EMBD = 64
N_HEAD = 4
N_HEAD_KV = 2
N_FF = 128
N_VOCAB = 49152
CONTEXT_LENGTH = 8192
ROPE_FREQ_BASE = 10000.0
RMS_EPS = 1e-5
HEAD_DIM = N_EMBD // N_HEAD


@dataclasses.dataclass(frozen=True)
class PairSpec:
    """One named draft/target pair.

    ``layer_scale`` multiplies the standard deviation ``1/sqrt(fan_in)`` of
    every layer weight matrix. ``acceptance`` is the band the measured greedy
    acceptance of the pair is promised (and tested) to fall in; it does not
    affect the bytes, so it is not part of the cache key.
    """

    name: str
    layer_scale: float
    draft_layers: int = 2
    target_layers: int = 8
    seed: int = 20260101
    acceptance: tuple[float, float] = (0.0, 1.0)

    def generator_params(self) -> dict:
        return {
            "layer_scale": self.layer_scale,
            "draft_layers": self.draft_layers,
            "target_layers": self.target_layers,
            "seed": self.seed,
        }

    @property
    def key(self) -> str:
        """Cache directory name; changes whenever the written bytes could."""
        blob = json.dumps(
            {
                "generator_version": GENERATOR_VERSION,
                "pair": self.generator_params(),
                "arch": [ARCH, N_EMBD, N_HEAD, N_HEAD_KV, N_FF, CONTEXT_LENGTH,
                         ROPE_FREQ_BASE, RMS_EPS],
                "tokenizer": [TOKENIZER_SOURCE, MODELS[TOKENIZER_SOURCE].sha256],
            },
            sort_keys=True,
        )
        digest = hashlib.sha256(blob.encode()).hexdigest()[:12]
        return f"{self.name}-v{GENERATOR_VERSION}-{digest}"


# Greedy acceptance measured with measure_greedy_acceptance(draft, target,
# PROBE_PROMPTS, 48): 192 positions, libllama 0c1e570 (CPU, GGML_NATIVE=OFF);
# scoring the draft token by token instead of in one batch gave the same rates.
# Draft 2 layers, target 8; the same scales give similar rates with other
# seeds (0.96/0.59/0.02 with seed 7) and other prompts (0.94/0.51/0.02).
PAIRS: dict[str, PairSpec] = {
    p.name: p
    for p in (
        # measured 0.948
        PairSpec(name="high", layer_scale=0.2, acceptance=(0.8, 1.0)),
        # measured 0.568
        PairSpec(name="medium", layer_scale=0.5, acceptance=(0.3, 0.75)),
        # measured 0.021 ("full scale": the layers swamp the shared embedding)
        PairSpec(name="near-zero", layer_scale=1.0, acceptance=(0.0, 0.1)),
    )
}

# Prompts the pinned acceptances were measured with.
PROBE_PROMPTS: tuple[str, ...] = (
    "The quick brown fox jumps over the lazy dog.",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Speculative decoding lets a small draft model propose tokens that a larger",
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
)


def cache_dir() -> Path:
    root = os.environ.get("TIGHTWAD_CACHE") or os.path.expanduser("~/.cache/tightwad")
    return Path(root) / "tiny"


def _rng(seed: int, *stream: int) -> np.random.Generator:
    import numpy as np

    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, *stream])))


def _normal(rng: np.random.Generator, shape: tuple[int, int], std: float) -> np.ndarray:
    # float64 draws, then scale and cast: stable across numpy's float32 paths.
    return (rng.standard_normal(shape) * std).astype("<f4")


_EMBD_STREAM = 1_000_000
_OUTPUT_STREAM = 1_000_001


_SCALAR_FORMATS = {  # GGUFValueType -> struct format (little-endian)
    0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q",
    12: "<d",
}
_STRING, _ARRAY = 8, 9


def _tokenizer_kv(source: Path) -> list[tuple[str, object, int, int | None]]:
    """Every ``tokenizer.*`` key of ``source`` as (key, value, type, sub_type), exact bytes.

    A minimal reader of the GGUF metadata section: ``gguf.GGUFReader`` builds a
    numpy view per array item and takes seconds on SmolLM2's 98k vocab strings.
    """
    import numpy as np

    with source.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        magic, version, _n_tensors, n_kv = struct.unpack_from("<4sIQQ", buf, 0)
        if magic != b"GGUF" or version < 2:
            raise ValueError(f"{source}: not a GGUF v2+ file")
        pos = 24

        def string() -> bytes:
            nonlocal pos
            (n,) = struct.unpack_from("<Q", buf, pos)
            pos += 8 + n
            return bytes(buf[pos - n : pos])

        def scalar(vtype: int) -> object:
            nonlocal pos
            fmt = _SCALAR_FORMATS[vtype]
            (v,) = struct.unpack_from(fmt, buf, pos)
            pos += struct.calcsize(fmt)
            return v

        out: list[tuple[str, object, int, int | None]] = []
        for _ in range(n_kv):
            key = string().decode()
            (vtype,) = struct.unpack_from("<I", buf, pos)
            pos += 4
            sub: int | None = None
            if vtype == _STRING:
                value: object = string()
            elif vtype == _ARRAY:
                sub, count = struct.unpack_from("<IQ", buf, pos)
                pos += 12
                if sub == _STRING:
                    value = [string() for _ in range(count)]
                elif sub in _SCALAR_FORMATS:
                    fmt = _SCALAR_FORMATS[sub]
                    size = struct.calcsize(fmt)
                    value = np.frombuffer(buf, np.dtype(fmt), count, pos).tolist()
                    pos += size * count
                else:
                    raise ValueError(f"{source}: nested array in key {key}")
            else:
                value = scalar(vtype)
            if key.startswith("tokenizer."):
                out.append((key, value, vtype, sub))
    return out


def write_model(
    path: Path | str,
    *,
    n_layers: int,
    layer_scale: float,
    seed: int,
    tokenizer_source: Path,
    name: str | None = None,
) -> Path:
    """Write one tiny llama GGUF to ``path`` atomically and return the path.

    ``token_embd`` and ``output`` depend only on ``seed``; layer ``i`` depends
    on ``seed`` and ``i``, so models with the same seed share their first
    layers. Each layer matrix has standard deviation ``layer_scale/sqrt(fan_in)``.
    """
    import gguf
    import numpy as np

    assert n_layers >= 1, "n_layers must be at least 1"
    assert layer_scale >= 0, "layer_scale must not be negative"
    path = Path(path)
    tok_kv = _tokenizer_kv(Path(tokenizer_source))
    tokens = next(v for k, v, _, _ in tok_kv if k == "tokenizer.ggml.tokens")
    assert isinstance(tokens, list), f"{tokenizer_source} has no tokenizer.ggml.tokens array"
    n_vocab = len(tokens)

    writer = gguf.GGUFWriter(None, ARCH)
    writer.add_type("model")
    writer.add_name(name or f"tightwad-tiny-{n_layers}l-s{layer_scale:g}")
    writer.add_context_length(CONTEXT_LENGTH)
    writer.add_embedding_length(N_EMBD)
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(N_FF)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_HEAD_KV)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_rope_freq_base(ROPE_FREQ_BASE)
    writer.add_layer_norm_rms_eps(RMS_EPS)
    writer.add_vocab_size(n_vocab)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    for key, value, vtype, sub in tok_kv:
        writer.add_key_value(
            key, value, gguf.GGUFValueType(vtype), None if sub is None else gguf.GGUFValueType(sub)
        )

    # numpy shapes are (out, in): the reverse of ggml's ne order.
    embd = _normal(_rng(seed, _EMBD_STREAM), (n_vocab, N_EMBD), 1.0)
    writer.add_tensor("token_embd.weight", embd)
    ones = np.ones(N_EMBD, dtype="<f4")
    kv_dim = N_HEAD_KV * HEAD_DIM
    for i in range(n_layers):
        rng = _rng(seed, i)
        s_embd = layer_scale / np.sqrt(N_EMBD)
        s_ff = layer_scale / np.sqrt(N_FF)
        writer.add_tensor(f"blk.{i}.attn_norm.weight", ones)
        writer.add_tensor(f"blk.{i}.attn_q.weight", _normal(rng, (N_EMBD, N_EMBD), s_embd))
        writer.add_tensor(f"blk.{i}.attn_k.weight", _normal(rng, (kv_dim, N_EMBD), s_embd))
        writer.add_tensor(f"blk.{i}.attn_v.weight", _normal(rng, (kv_dim, N_EMBD), s_embd))
        writer.add_tensor(f"blk.{i}.attn_output.weight", _normal(rng, (N_EMBD, N_EMBD), s_embd))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", ones)
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", _normal(rng, (N_FF, N_EMBD), s_embd))
        writer.add_tensor(f"blk.{i}.ffn_up.weight", _normal(rng, (N_FF, N_EMBD), s_embd))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", _normal(rng, (N_EMBD, N_FF), s_ff))
    writer.add_tensor("output_norm.weight", ones)
    writer.add_tensor(
        "output.weight", _normal(_rng(seed, _OUTPUT_STREAM), (n_vocab, N_EMBD), 1 / np.sqrt(N_EMBD))
    )

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        writer.write_header_to_file(tmp)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        writer.close()
        tmp.unlink(missing_ok=True)
    return path


def pair_paths(name: str, out_dir: Path | None = None) -> tuple[Path, Path]:
    """Where ``write_pair`` puts (draft, target), without writing anything."""
    spec = _spec(name)
    directory = out_dir if out_dir is not None else cache_dir() / spec.key
    return directory / f"{name}-draft.gguf", directory / f"{name}-target.gguf"


def write_pair(name: str, out_dir: Path | None = None) -> tuple[Path, Path]:
    """Return (draft, target) paths of pair ``name``, generating missing files.

    With ``out_dir`` None the pair lives in the versioned cache and is only
    written when absent; with ``out_dir`` given both files are (re)written there.
    """
    spec = _spec(name)
    draft, target = pair_paths(name, out_dir)
    todo = [
        (path, layers)
        for path, layers in ((draft, spec.draft_layers), (target, spec.target_layers))
        if out_dir is not None or not path.exists()
    ]
    if todo:
        source = fetch(TOKENIZER_SOURCE)
        for path, layers in todo:
            write_model(
                path,
                n_layers=layers,
                layer_scale=spec.layer_scale,
                seed=spec.seed,
                tokenizer_source=source,
                name=f"tightwad-tiny-{name}-{'draft' if path == draft else 'target'}",
            )
    return draft, target


def _spec(name: str) -> PairSpec:
    if name not in PAIRS:
        raise ModelFetchError(f"unknown tiny pair '{name}'; known pairs: {', '.join(PAIRS)}")
    return PAIRS[name]


_MEASURE_CTX = 256


def measure_greedy_acceptance(
    draft_path: Path | str,
    target_path: Path | str,
    prompts: Sequence[Sequence[int] | str],
    n_tokens: int = 48,
    *,
    lib_dir: Path | str | None = None,
    n_threads: int = 1,
) -> float:
    """Fraction of positions where the draft's greedy token equals the target's.

    For each prompt the target generates ``n_tokens`` greedy tokens; at every
    one of those positions the draft, given the same prefix, predicts its own
    greedy token. String prompts are tokenized with the target's tokenizer
    (no BOS, special tokens parsed). ``lib_dir`` is the directory of libllama
    (default: the pinned build, ``tightwad.llamacpp.bin_dir()``); it is applied
    through ``LLAMA_CPP_LIB_PATH`` when ``llama_cpp`` has not been imported
    yet in this process.
    """
    if "llama_cpp" not in sys.modules:
        if lib_dir is None and "LLAMA_CPP_LIB_PATH" not in os.environ:
            from tightwad.llamacpp import bin_dir

            lib_dir = bin_dir()
        if lib_dir is not None:
            os.environ["LLAMA_CPP_LIB_PATH"] = str(lib_dir)
    import llama_cpp
    import numpy as np

    # n_threads_batch defaults to every core; with more than one thread ggml's
    # workers spin-wait, which slows these tiny models tenfold on a busy host.
    def load(path: Path | str, logits_all: bool) -> llama_cpp.Llama:
        return llama_cpp.Llama(
            model_path=str(path), n_ctx=_MEASURE_CTX, logits_all=logits_all, verbose=False,
            seed=0, n_threads=n_threads, n_threads_batch=n_threads,
        )

    # The target decodes one token at a time (it has to: each token is its own
    # argmax); the draft then scores the whole sequence in one batch.
    draft, target = load(draft_path, True), load(target_path, False)
    try:
        agree = total = 0
        for prompt in prompts:
            if isinstance(prompt, str):
                ids = target.tokenize(prompt.encode(), add_bos=False, special=True)
            else:
                ids = list(prompt)
            assert ids, "prompts must not be empty"
            assert len(ids) + n_tokens <= _MEASURE_CTX, f"prompt + n_tokens exceed {_MEASURE_CTX}"
            target.reset()
            generated: list[int] = []
            feed = ids
            for _ in range(n_tokens):
                target.eval(feed)
                logits = np.ctypeslib.as_array(
                    llama_cpp.llama_get_logits(target.ctx), shape=(target.n_vocab(),)
                )
                feed = [int(np.argmax(logits))]
                generated.append(feed[0])
            draft.reset()
            draft.eval(ids + generated[:-1])
            # Row i of the scores predicts the token after position i.
            predicted = np.argmax(draft.scores[len(ids) - 1 : len(ids) - 1 + n_tokens], axis=1)
            agree += int(np.sum(predicted == np.asarray(generated)))
            total += n_tokens
        return agree / total if total else 0.0
    finally:
        draft.close()
        target.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tightwad.tinymodels",
        description="Generate tiny draft/target GGUF pairs and print their paths.",
    )
    parser.add_argument("--out", type=Path, default=None,
                        help="write here instead of the versioned cache (always rewrites)")
    parser.add_argument("pairs", nargs="*", metavar="pair",
                        help=f"pairs to write (default: all of {', '.join(PAIRS)})")
    args = parser.parse_args(argv)
    names = args.pairs or list(PAIRS)
    unknown = [n for n in names if n not in PAIRS]
    if unknown:
        parser.error(f"unknown pair(s) {', '.join(unknown)}; known pairs: {', '.join(PAIRS)}")
    for name in names:
        draft, target = write_pair(name, args.out)
        spec = PAIRS[name]
        lo, hi = spec.acceptance
        print(f"{name}\tdraft={draft}\ttarget={target}\tacceptance={lo:g}..{hi:g}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
