"""A minimal GGUF header reader: metadata and tensor infos, never the weights.

    read_header(path) -> GgufHeader      a local file (memory-mapped; reads only the header)
    parse_header(data) -> GgufHeader     bytes that start at the file's beginning; raises
                                         NeedMoreBytes(n) when the header runs past them

The orchestrator needs two things before it touches a cluster: how many bytes
each tensor takes (to check the model fits the pooled free memory) and a few
hyper-parameters (layers, heads, context) for the KV cache. Both are in the
header. Layout (GGUF v2/v3, little-endian):

    magic "GGUF" | u32 version | u64 tensor_count | u64 kv_count
    kv_count x (string key, u32 value_type, value)
    tensor_count x (string name, u32 n_dims, n_dims x u64 dim, u32 ggml_type, u64 offset)
    padding to general.alignment (default 32), then the tensor data

A string is a u64 length and UTF-8 bytes; an array is a u32 element type, a
u64 count and the elements. Large string arrays (the vocabulary) are walked,
not kept: only their length is recorded.
"""

from __future__ import annotations

import dataclasses
import math
import mmap
import os
import struct
from collections.abc import Mapping
from typing import Any

from tightwad.orchestrator.errors import GgufError

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

# ggml type id -> (name, elements per block, bytes per block); ggml.h / gguf-py constants.
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 40),
    10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50), 20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136), 24: ("I8", 1, 1), 25: ("I16", 1, 2),
    26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8), 29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66), 39: ("MXFP4", 32, 17),
}

# GGUF metadata value types: id -> struct format (None: string / array)
_SCALARS: dict[int, str] = {
    0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q",
    12: "<d",
}
_STRING, _ARRAY = 8, 9
_KEEP_ARRAY_MAX = 4096  # numeric arrays up to this length are kept (per-layer head counts)


class NeedMoreBytes(GgufError):
    """The header continues past the bytes given; ``needed`` is a lower bound."""

    def __init__(self, needed: int):
        super().__init__(f"the GGUF header needs more than {needed} bytes")
        self.needed = needed


@dataclasses.dataclass(frozen=True)
class ArrayInfo:
    """A metadata array that was walked but not kept (e.g. the vocabulary)."""

    element_type: int
    count: int


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int  # from the start of the data section
    n_bytes: int

    @property
    def type_name(self) -> str:
        known = GGML_TYPES.get(self.ggml_type)
        return known[0] if known else f"type{self.ggml_type}"


@dataclasses.dataclass(frozen=True)
class GgufHeader:
    version: int
    metadata: Mapping[str, Any]
    tensors: tuple[TensorInfo, ...]
    data_offset: int  # where the tensor data starts in the file
    file_size: int | None = None

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", "llama"))

    def arch(self, suffix: str, default: Any = None) -> Any:
        """``{architecture}.{suffix}``, e.g. ``arch("block_count")``."""
        return self.metadata.get(f"{self.architecture}.{suffix}", default)

    @property
    def tensor_bytes(self) -> int:
        return sum(t.n_bytes for t in self.tensors)

    @property
    def n_vocab(self) -> int:
        tokens = self.metadata.get("tokenizer.ggml.tokens")
        if isinstance(tokens, ArrayInfo):
            return tokens.count
        if isinstance(tokens, list):
            return len(tokens)
        return int(self.arch("vocab_size", 0) or 0)


class _Cursor:
    def __init__(self, data: bytes | mmap.mmap | memoryview):
        self.data = data
        self.pos = 0

    def need(self, n: int) -> None:
        if self.pos + n > len(self.data):
            raise NeedMoreBytes(self.pos + n)

    def unpack(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        self.need(size)
        value = struct.unpack_from(fmt, self.data, self.pos)[0]
        self.pos += size
        return value

    def string(self) -> str:
        n = self.unpack("<Q")
        self.need(n)
        raw = bytes(self.data[self.pos : self.pos + n])
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def skip_strings(self, count: int) -> None:
        data, pos, end = self.data, self.pos, len(self.data)
        for _ in range(count):
            if pos + 8 > end:
                raise NeedMoreBytes(pos + 8)
            pos += 8 + struct.unpack_from("<Q", data, pos)[0]
        if pos > end:
            raise NeedMoreBytes(pos)
        self.pos = pos

    def value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype = self.unpack("<I")
            count = self.unpack("<Q")
            if etype in _SCALARS and count <= _KEEP_ARRAY_MAX:
                return [self.value(etype) for _ in range(count)]
            if etype in _SCALARS:
                size = struct.calcsize(_SCALARS[etype]) * count
                self.need(size)
                self.pos += size
            elif etype == _STRING:
                self.skip_strings(count)
            else:
                for _ in range(count):  # nested arrays: rare; walk them
                    self.value(etype)
            return ArrayInfo(etype, count)
        raise GgufError(f"unknown GGUF metadata value type {vtype} at byte {self.pos}")


def parse_header(data: bytes | mmap.mmap | memoryview, *, file_size: int | None = None) -> GgufHeader:
    c = _Cursor(data)
    c.need(4)
    if bytes(data[:4]) != MAGIC:
        raise GgufError(f"not a GGUF file (magic {bytes(data[:4])!r}, expected {MAGIC!r})")
    c.pos = 4
    version = c.unpack("<I")
    if version not in (2, 3):
        raise GgufError(f"GGUF version {version} is not supported (2 and 3 are)")
    n_tensors = c.unpack("<Q")
    n_kv = c.unpack("<Q")
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = c.string()
        metadata[key] = c.value(c.unpack("<I"))
    raw: list[tuple[str, tuple[int, ...], int, int]] = []
    for _ in range(n_tensors):
        name = c.string()
        n_dims = c.unpack("<I")
        if n_dims > 8:
            raise GgufError(f"tensor {name!r} has {n_dims} dimensions; the file looks corrupt")
        shape = tuple(c.unpack("<Q") for _ in range(n_dims))
        ggml_type = c.unpack("<I")
        offset = c.unpack("<Q")
        raw.append((name, shape, ggml_type, offset))
    alignment = int(metadata.get("general.alignment", DEFAULT_ALIGNMENT) or DEFAULT_ALIGNMENT)
    data_offset = -(-c.pos // alignment) * alignment
    return GgufHeader(version, metadata, _sized(raw, data_offset, file_size), data_offset, file_size)


def _sized(
    raw: list[tuple[str, tuple[int, ...], int, int]], data_offset: int, file_size: int | None
) -> tuple[TensorInfo, ...]:
    """Each tensor's size from its type and shape; for a type this reader does not know,
    the distance to the next tensor's offset (which includes padding)."""
    next_offset: dict[int, int] = {}
    offsets = sorted({r[3] for r in raw})
    for a, b in zip(offsets, offsets[1:], strict=False):
        next_offset[a] = b
    tensors = []
    for name, shape, ggml_type, offset in raw:
        n_elements = math.prod(shape) if shape else 1
        if ggml_type in GGML_TYPES:
            _, block, size = GGML_TYPES[ggml_type]
            if n_elements % block:
                raise GgufError(f"tensor {name!r}: {n_elements} elements is not a multiple of {block}")
            n_bytes = n_elements // block * size
        elif offset in next_offset:
            n_bytes = next_offset[offset] - offset
        elif file_size is not None:
            n_bytes = file_size - data_offset - offset
        else:
            raise GgufError(f"tensor {name!r} has ggml type {ggml_type}, which this reader does not know")
        tensors.append(TensorInfo(name, shape, ggml_type, offset, n_bytes))
    return tuple(tensors)


def read_header(path: str | os.PathLike[str]) -> GgufHeader:
    """The header of a local GGUF file; only the pages it spans are read."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 24:
                raise GgufError(f"{path}: {size} bytes is too short for a GGUF file")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                try:
                    return parse_header(mm, file_size=size)
                except NeedMoreBytes as exc:
                    raise GgufError(f"{path}: the GGUF header runs past the end of the file "
                                    f"({size} bytes); the file is truncated") from exc
    except OSError as exc:
        raise GgufError(f"cannot read {path}: {exc.strerror or exc}") from exc
