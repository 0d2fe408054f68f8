"""Where a model's layers go: the pure core of the orchestrator (no Docker, no HTTP).

    footprint(header, ctx_size) -> Footprint     bytes per layer, from the GGUF header
    place(footprint, devices, ...) -> Placement  layers per device, or DoesNotFit

How llama.cpp lays a model out (src/llama-model.cpp, ``load_tensors``), which
this module mirrors so that its per-device figures are llama.cpp's:

* The units are the ``n_layer`` repeating blocks plus the output layer, in
  that order (``n_layer + 1`` units). The input layer (``token_embd``) always
  stays on the CPU.
* ``-ngl N`` offloads the *last* N units; the first ``n_layer + 1 - N`` stay
  on the CPU.
* The offloaded units are spread over the devices in llama.cpp's order: the
  ``--rpc`` servers first (in the order given), then local GPUs.
  ``--tensor-split`` gives each device's share; we pass whole layer counts,
  so unit ``j`` of the offloaded run goes to device ``k`` exactly when the
  counts of devices ``0..k-1`` sum to at most ``j`` and of ``0..k`` to more.
* Each layer's KV cache lives with the layer (``n_ctx`` x (K + V widths) x
  2 bytes: f16). With tied embeddings (no ``output.weight``) a copy of
  ``token_embd`` goes wherever the output layer is offloaded.

So a placement is one contiguous run of units per device, in the order
``[coordinator CPU] + RPC workers + coordinator GPUs``, sized in proportion to
each device's free memory (the pool is the sum of them). Compute buffers are
estimated, not measured: ``COMPUTE_RESERVE_BYTES`` per device in use, plus the
logits buffer (``N_UBATCH`` x vocabulary x 4 bytes) on the device that holds
the output layer.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

from tightwad.orchestrator.errors import DoesNotFit
from tightwad.orchestrator.gguf import GgufHeader

GIB = 1024**3
MIB = 1024**2
COMPUTE_RESERVE_BYTES = 64 * MIB  # activations and scratch, per device that holds layers
N_UBATCH = 512  # llama.cpp's default micro-batch: the logits buffer is N_UBATCH x n_vocab floats
KV_BYTES_PER_ELEMENT = 2  # f16 cache (llama.cpp's default cache type)

_BLOCK = re.compile(r"blk\.(\d+)\.")


def gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


@dataclasses.dataclass(frozen=True)
class Footprint:
    """A model's memory, in the units llama.cpp places (see the module docstring)."""

    n_layer: int
    n_ctx: int
    n_vocab: int
    layer_weights: tuple[int, ...]  # per repeating block
    layer_kv: tuple[int, ...]  # KV cache per block for n_ctx tokens
    input_bytes: int  # token_embd and anything else outside the blocks: always on the CPU
    output_bytes: int  # output.weight, output_norm.* (+ token_embd's copy when tied and offloaded)
    output_tied_bytes: int  # the part of output_bytes that is token_embd's copy (0 if not tied)
    file_tensor_bytes: int

    @property
    def n_units(self) -> int:
        return self.n_layer + 1

    def unit_weights(self, unit: int, *, on_cpu: bool) -> int:
        if unit < self.n_layer:
            return self.layer_weights[unit]
        return self.output_bytes - (self.output_tied_bytes if on_cpu else 0)

    def unit_kv(self, unit: int) -> int:
        return self.layer_kv[unit] if unit < self.n_layer else 0

    @property
    def logits_bytes(self) -> int:
        return N_UBATCH * self.n_vocab * 4

    @property
    def weights_bytes(self) -> int:
        return self.input_bytes + sum(self.layer_weights) + self.output_bytes - self.output_tied_bytes

    @property
    def kv_bytes(self) -> int:
        return sum(self.layer_kv)


def footprint(header: GgufHeader, ctx_size: int = 0) -> Footprint:
    """Bytes per unit from the header; ``ctx_size`` 0 means the model's trained context."""
    n_layer = int(header.arch("block_count", 0) or 0)
    if n_layer <= 0:
        raise DoesNotFit(f"the GGUF header has no {header.architecture}.block_count; "
                         "cannot place a model whose layers are unknown")
    n_ctx = ctx_size or int(header.arch("context_length", 4096) or 4096)
    layer_weights = [0] * n_layer
    input_bytes = output_bytes = 0
    has_output = False
    embd_bytes = 0
    for t in header.tensors:
        m = _BLOCK.match(t.name)
        if m and int(m.group(1)) < n_layer:
            layer_weights[int(m.group(1))] += t.n_bytes
        elif t.name.startswith("output"):
            output_bytes += t.n_bytes
            has_output = has_output or t.name == "output.weight"
        else:
            input_bytes += t.n_bytes
            if t.name == "token_embd.weight":
                embd_bytes = t.n_bytes
    tied = 0 if has_output else embd_bytes
    n_embd = int(header.arch("embedding_length", 0) or 0)
    n_head = int(header.arch("attention.head_count", 1) or 1)
    k_len = int(header.arch("attention.key_length", 0) or (n_embd // n_head if n_head else 0))
    v_len = int(header.arch("attention.value_length", 0) or k_len)
    kv_heads = header.arch("attention.head_count_kv", n_head)
    per_layer_heads = (list(kv_heads) + [0] * n_layer)[:n_layer] if isinstance(kv_heads, list) \
        else [int(kv_heads)] * n_layer
    layer_kv = tuple(n_ctx * (k_len + v_len) * h * KV_BYTES_PER_ELEMENT for h in per_layer_heads)
    return Footprint(
        n_layer=n_layer,
        n_ctx=n_ctx,
        n_vocab=header.n_vocab,
        layer_weights=tuple(layer_weights),
        layer_kv=layer_kv,
        input_bytes=input_bytes,
        output_bytes=output_bytes + tied,
        output_tied_bytes=tied,
        file_tensor_bytes=header.tensor_bytes,
    )


@dataclasses.dataclass(frozen=True)
class Device:
    """One place layers can go, with the memory it offers now.

    ``kind``: ``cpu`` (the coordinator's own RAM: holds the first layers and the
    input layer), ``rpc`` (a worker's RPC server) or ``gpu`` (a GPU of the
    coordinator itself).
    """

    id: str  # "<host>/<index>", unique in the cluster
    host: str
    name: str
    vendor: str  # nvidia | amd | cpu
    kind: str  # cpu | rpc | gpu
    total_bytes: int  # what the config offers (vram_gb)
    free_bytes: int  # measured where a vendor tool answered, else total_bytes
    source: str = "configured"  # configured | nvidia-smi | rocm-smi
    endpoint: str | None = None  # address:port, for kind rpc

    def __post_init__(self) -> None:
        assert self.kind in ("cpu", "rpc", "gpu"), self.kind
        assert self.kind != "rpc" or self.endpoint, "an rpc device needs its endpoint"


@dataclasses.dataclass(frozen=True)
class DeviceShare:
    device: Device
    first_unit: int  # the first unit (layer) it holds; meaningless when n_units is 0
    n_units: int
    weights_bytes: int
    kv_bytes: int
    reserve_bytes: int  # compute buffers (estimate), incl. logits on the output's device
    holds_output: bool = False

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_bytes + self.reserve_bytes

    @property
    def headroom_bytes(self) -> int:
        return self.device.free_bytes - self.total_bytes

    @property
    def layers(self) -> str:
        """The blocks it holds, as ``a-b`` (``+out`` for the output layer)."""
        if self.n_units == 0:
            return "-"
        last_block = self.first_unit + self.n_units - 1 - (1 if self.holds_output else 0)
        blocks = "" if last_block < self.first_unit else (
            f"{self.first_unit}" if last_block == self.first_unit else f"{self.first_unit}-{last_block}")
        return blocks + ("+out" if self.holds_output else "") if blocks else "out"


@dataclasses.dataclass(frozen=True)
class Placement:
    model: str
    path: str
    footprint: Footprint
    shares: tuple[DeviceShare, ...]  # llama.cpp order: [cpu], rpc..., gpu...
    host_ram_bytes: int  # input layer on a coordinator whose RAM is not in the pool (else 0)

    @property
    def n_gpu_layers(self) -> int:
        return sum(s.n_units for s in self.shares if s.device.kind != "cpu")

    @property
    def offload_shares(self) -> tuple[DeviceShare, ...]:
        return tuple(s for s in self.shares if s.device.kind != "cpu")

    @property
    def tensor_split(self) -> tuple[int, ...]:
        """Layer counts per RPC/GPU device, in llama.cpp's device order."""
        return tuple(s.n_units for s in self.offload_shares)

    @property
    def rpc_endpoints(self) -> tuple[str, ...]:
        return tuple(s.device.endpoint or "" for s in self.shares if s.device.kind == "rpc")

    @property
    def required_bytes(self) -> int:
        return sum(s.total_bytes for s in self.shares)

    @property
    def pooled_free_bytes(self) -> int:
        return sum(s.device.free_bytes for s in self.shares)

    def llama_args(self) -> list[str]:
        """``-ngl``, ``--tensor-split`` and ``--rpc`` for llama-server (and the verifier)."""
        args = ["-ngl", str(self.n_gpu_layers)]
        if self.n_gpu_layers and len(self.offload_shares) > 1:
            args += ["--tensor-split", ",".join(str(n) for n in self.tensor_split)]
        if self.rpc_endpoints:
            args += ["--rpc", ",".join(self.rpc_endpoints)]
        return args

    def usage_by_device(self) -> dict[str, int]:
        return {s.device.id: s.total_bytes for s in self.shares}


def order_devices(devices: Sequence[Device]) -> list[Device]:
    """llama.cpp's layer order: the coordinator's CPU (first layers), RPC servers, local GPUs.
    Several cpu entries of the coordinator are one RAM pool: they are merged."""
    cpus = [d for d in devices if d.kind == "cpu"]
    ordered: list[Device] = []
    if cpus:
        first = cpus[0]
        ordered.append(dataclasses.replace(
            first,
            name=" + ".join(d.name for d in cpus) if len(cpus) > 1 else first.name,
            total_bytes=sum(d.total_bytes for d in cpus),
            free_bytes=sum(d.free_bytes for d in cpus),
        ))
    ordered += [d for d in devices if d.kind == "rpc"]
    ordered += [d for d in devices if d.kind == "gpu"]
    return ordered


def place(fp: Footprint, devices: Sequence[Device], *, model: str, path: str = "") -> Placement:
    """Spread ``fp`` over ``devices`` in proportion to their free memory.

    Raises DoesNotFit, saying by how much, when the pool is too small; the
    check is made before any layer is assigned, so nothing is half-planned.
    """
    devs = order_devices(devices)
    if not devs:
        raise DoesNotFit(f"{model}: no devices to place it on (configure coordinator and workers)")
    has_cpu = devs[0].kind == "cpu"
    fixed = fp.input_bytes if has_cpu else 0  # the input layer always sits on the CPU
    units = fp.n_units
    # The least this model can need: everything, on one device (one compute reserve).
    need = (fixed + sum(fp.unit_weights(u, on_cpu=False) for u in range(units)) + fp.kv_bytes
            + COMPUTE_RESERVE_BYTES + fp.logits_bytes)
    pooled = sum(d.free_bytes for d in devs)
    if need > pooled:
        raise DoesNotFit(
            f"{model} does not fit: it needs at least {gib(need)} (weights {gib(fp.weights_bytes)}, "
            f"KV cache {gib(fp.kv_bytes)} for {fp.n_ctx} tokens, compute buffers "
            f"{gib(COMPUTE_RESERVE_BYTES + fp.logits_bytes)}), but the pool has {gib(pooled)} free "
            f"on {len(devs)} device{'s' if len(devs) != 1 else ''} "
            f"({', '.join(f'{d.id} {gib(d.free_bytes)}' for d in devs)}): "
            f"short by {gib(need - pooled)}",
            short_bytes=need - pooled,
        )
    counts = _proportional(fp, devs, has_cpu)
    shares = _shares(fp, devs, counts)
    if any(s.headroom_bytes < 0 for s in shares):
        # Whole layers and a heavy output layer (weights + logits) can defeat the
        # proportional split; pack from the back (the output first), else the front.
        counts = _greedy(fp, devs, backwards=True) or _greedy(fp, devs, backwards=False)
        if counts is None:
            over = min(_shares(fp, devs, _proportional(fp, devs, has_cpu)), key=lambda s: s.headroom_bytes)
            raise DoesNotFit(
                f"{model} does not fit: the pool has {gib(pooled)} free, enough in total, but "
                f"whole layers cannot be packed into the devices' free memory (with a proportional "
                f"split {over.device.id} would be short by {gib(-over.headroom_bytes)})",
                short_bytes=-over.headroom_bytes,
            )
        shares = _shares(fp, devs, counts)
    return Placement(model, path, fp, tuple(shares), 0 if has_cpu else fp.input_bytes)


def _usable(d: Device, fp: Footprint, has_cpu: bool) -> int:
    fixed = fp.input_bytes if d.kind == "cpu" else 0
    return max(0, d.free_bytes - fixed - COMPUTE_RESERVE_BYTES)


def _proportional(fp: Footprint, devs: list[Device], has_cpu: bool) -> list[int]:
    """Units per device: each unit goes where the middle of its byte range falls on the
    devices' cumulative share of usable memory."""
    usable = [_usable(d, fp, has_cpu) for d in devs]
    # The last device holds the output layer and, with it, the logits buffer.
    usable[-1] = max(0, usable[-1] - fp.logits_bytes)
    total_usable = sum(usable) or 1
    costs = [fp.unit_weights(u, on_cpu=False) + fp.unit_kv(u) for u in range(fp.n_units)]
    total_cost = sum(costs) or 1
    bounds, acc = [], 0
    for u in usable:
        acc += u
        bounds.append(acc / total_usable)
    counts = [0] * len(devs)
    done = 0
    k = 0
    for cost in costs:
        middle = (done + cost / 2) / total_cost
        while k < len(devs) - 1 and middle > bounds[k]:
            k += 1
        counts[k] += 1
        done += cost
    return counts


def _greedy(fp: Footprint, devs: list[Device], *, backwards: bool) -> list[int] | None:
    """Fill devices up to their free memory, in layer order or (``backwards``) from the
    last device and the output layer down; None when units are left over."""
    counts = [0] * len(devs)
    order = range(len(devs) - 1, -1, -1) if backwards else range(len(devs))
    units = list(range(fp.n_units))
    if backwards:
        units.reverse()
    i = 0
    for k in order:
        d = devs[k]
        used = COMPUTE_RESERVE_BYTES + (fp.input_bytes if d.kind == "cpu" else 0)
        while i < len(units):
            unit = units[i]
            cost = fp.unit_weights(unit, on_cpu=d.kind == "cpu") + fp.unit_kv(unit)
            cost += fp.logits_bytes if unit == fp.n_units - 1 else 0
            if used + cost > d.free_bytes:
                break
            used += cost
            counts[k] += 1
            i += 1
    return counts if i == len(units) else None


def _shares(fp: Footprint, devs: list[Device], counts: list[int]) -> list[DeviceShare]:
    shares = []
    unit = 0
    for d, n in zip(devs, counts, strict=True):
        on_cpu = d.kind == "cpu"
        weights = sum(fp.unit_weights(u, on_cpu=on_cpu) for u in range(unit, unit + n))
        kv = sum(fp.unit_kv(u) for u in range(unit, unit + n))
        holds_output = n > 0 and unit + n == fp.n_units
        used = n > 0 or on_cpu
        reserve = (COMPUTE_RESERVE_BYTES if used else 0) + (fp.logits_bytes if holds_output else 0)
        if on_cpu:
            weights += fp.input_bytes
        shares.append(DeviceShare(d, unit, n, weights, kv, reserve, holds_output))
        unit += n
    return shares


def placement_dict(p: Placement) -> dict:
    """A JSON-able view of a placement (the HTTP API and ``tightwad plan --json``)."""
    fp = p.footprint
    return {
        "model": p.model,
        "path": p.path,
        "n_layer": fp.n_layer,
        "n_ctx": fp.n_ctx,
        "n_vocab": fp.n_vocab,
        "weights_bytes": fp.weights_bytes,
        "kv_bytes": fp.kv_bytes,
        "required_bytes": p.required_bytes,
        "pooled_free_bytes": p.pooled_free_bytes,
        "host_ram_bytes": p.host_ram_bytes,
        "n_gpu_layers": p.n_gpu_layers,
        "tensor_split": list(p.tensor_split),
        "rpc": list(p.rpc_endpoints),
        "llama_args": p.llama_args(),
        "devices": [{
            "id": s.device.id, "host": s.device.host, "name": s.device.name,
            "vendor": s.device.vendor, "kind": s.device.kind, "endpoint": s.device.endpoint,
            "source": s.device.source, "free_bytes": s.device.free_bytes,
            "total_bytes": s.device.total_bytes, "layers": s.layers, "n_units": s.n_units,
            "weights_bytes": s.weights_bytes, "kv_bytes": s.kv_bytes,
            "reserve_bytes": s.reserve_bytes, "use_bytes": s.total_bytes,
            "headroom_bytes": s.headroom_bytes,
        } for s in p.shares],
    }
