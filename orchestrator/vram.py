"""Free device memory: measured by the vendor's tool on the host where it runs, else configured.

    probe(host, config, cluster, vendor, gpus) -> {index: Measurement}

nvidia: ``nvidia-smi --query-gpu=index,memory.free,memory.total`` in the CUDA
image with those GPUs requested; amd: ``rocm-smi --showmeminfo vram --json`` in
the ROCm image with /dev/kfd and /dev/dri. A missing image, a missing tool or
output we cannot parse gives no measurement (and a reason): the caller falls
back to the configured ``vram_gb``. A ``cpu`` device is always its configured
figure: it is the RAM the owner chose to offer.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence

from tightwad.config import Config, GpuConfig
from tightwad.orchestrator.containers import probe_spec
from tightwad.orchestrator.errors import HostUnreachable, OrchestratorError
from tightwad.orchestrator.hosts import Host

log = logging.getLogger("tightwad.orchestrator.vram")
MIB = 1024**2


@dataclasses.dataclass(frozen=True)
class Measurement:
    free_bytes: int
    total_bytes: int
    source: str  # nvidia-smi | rocm-smi


def parse_nvidia_smi(output: str, indices: Sequence[int]) -> dict[int, Measurement]:
    """CSV rows ``index, free MiB, total MiB``. Inside the container the requested GPUs are
    renumbered 0..n-1 in the order of their host indices."""
    rows = []
    for line in output.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 3 or not all(p.isdigit() for p in parts):
            raise ValueError(f"unexpected nvidia-smi line {line!r}")
        rows.append((int(parts[0]), int(parts[1]) * MIB, int(parts[2]) * MIB))
    rows.sort()
    ordered = sorted(indices)
    if len(rows) != len(ordered):
        raise ValueError(f"nvidia-smi listed {len(rows)} GPUs, {len(ordered)} were requested")
    return {host_index: Measurement(free, total, "nvidia-smi")
            for host_index, (_, free, total) in zip(ordered, rows, strict=True)}


def parse_rocm_smi(output: str, indices: Sequence[int]) -> dict[int, Measurement]:
    """``{"card0": {"VRAM Total Memory (B)": "...", "VRAM Total Used Memory (B)": "..."}}``."""
    start = output.find("{")
    data = json.loads(output[start:] if start >= 0 else output)
    found: dict[int, Measurement] = {}
    for card, values in data.items():
        if not card.startswith("card") or not card[4:].isdigit():
            continue
        total = int(values["VRAM Total Memory (B)"])
        used = int(values["VRAM Total Used Memory (B)"])
        found[int(card[4:])] = Measurement(total - used, total, "rocm-smi")
    return {i: found[i] for i in indices if i in found}


def probe(host: Host, config: Config, cluster: str, vendor: str,
          gpus: Sequence[GpuConfig]) -> tuple[dict[int, Measurement], str | None]:
    """Measurements by device index, and why some are missing (None when none are)."""
    indices = sorted({g.index for g in gpus})
    spec = probe_spec(config, cluster, host.name, vendor, indices)
    if spec is None or not indices:
        return {}, None
    tool = spec.entrypoint[0] if spec.entrypoint else vendor
    if not host.has_image(spec.image):
        return {}, f"{tool}: image {spec.image} is not on host {host.name}"
    try:
        code, raw = host.run_once(spec, timeout_s=60)
        output = raw.decode("utf-8", errors="replace")
    except HostUnreachable:
        raise
    except OrchestratorError as exc:
        return {}, f"{tool} could not run on {host.name}: {exc.message}"
    if code != 0:
        return {}, f"{tool} exited with {code} on {host.name}: {output.strip()[-200:]}"
    try:
        if vendor == "nvidia":
            found = parse_nvidia_smi(output, indices)
        else:
            found = parse_rocm_smi(output, indices)
    except (ValueError, KeyError, json.JSONDecodeError) as exc:
        return {}, f"{tool} output on {host.name} not understood: {exc}"
    missing = [i for i in indices if i not in found]
    return found, (f"{tool} did not report device(s) {missing} on {host.name}" if missing else None)
