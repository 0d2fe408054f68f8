"""The cluster sections: ``hosts``, ``coordinator`` and ``workers``, and the rules across them.

A hosts entry is a Docker daemon Tightwad drives; the coordinator and each
worker name one (or, unmanaged, a plain address) and by default take its
devices. ``check_cluster`` then checks what no single section can see: ports
and devices used once per host, and RPC addresses the coordinator can reach.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tightwad.config_reader import REQUIRED, Reader, show
from tightwad.config_schema import (
    ADDRESS_PATTERN,
    BACKEND_ALIASES,
    BACKEND_VENDOR,
    BACKENDS,
    DEFAULT_DOCKER,
    DEFAULT_RPC_PORT,
    ID_HELP,
    ID_PATTERN,
    VENDOR_BACKEND,
    VENDORS,
    CoordinatorConfig,
    GpuConfig,
    HostConfig,
    TlsConfig,
    WorkerConfig,
)
from tightwad.errors import ConfigError


def _is_ip(address: str) -> bool:
    try:
        ipaddress.ip_address(address)
    except ValueError:
        return False
    return True


def _is_loopback(address: str) -> bool:
    return address == "localhost" or (_is_ip(address) and ipaddress.ip_address(address).is_loopback)


def _docker_endpoint(key: str, url: str) -> tuple[str, str | None]:
    """(scheme, host name or None for unix://) of a Docker daemon URL."""
    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018 -- raises ValueError on a bad port
    except ValueError:
        parts, host = None, None
    if parts and parts.scheme == "unix" and parts.path and not parts.netloc:
        return "unix", None
    if parts and parts.scheme in ("tcp", "ssh") and host:
        return parts.scheme, host
    raise ConfigError(
        key, f"expected unix:///path, tcp://host:port or ssh://user@host, got {show(url)}"
    )


def _resolve_path(value: str, base_dir: Path | None) -> str:
    path = Path(value).expanduser()
    if base_dir is not None and not path.is_absolute():
        path = base_dir / path
    return str(path)


def parse_hosts(root: Reader, base_dir: Path | None) -> dict[str, HostConfig]:
    hosts: dict[str, HostConfig] = {}
    for name, h in root.entries("hosts", ID_PATTERN, ID_HELP):
        docker = h.str("docker", DEFAULT_DOCKER)
        scheme, address = _docker_endpoint(h.key("docker"), docker)
        insecure = h.bool("insecure", False)
        tls = None
        if (t := h.sub("tls")) is not None:
            tls = TlsConfig(*(_resolve_path(t.str(k), base_dir) for k in ("ca", "cert", "key")))
            t.done()
        if scheme == "tcp" and tls is None and not insecure:
            raise ConfigError(
                h.key("tls"),
                "is required for a tcp:// docker endpoint: give ca, cert and key, or set "
                "insecure: true (then anyone who reaches the port controls this daemon)",
            )
        if scheme == "tcp" and tls is not None and insecure:
            raise ConfigError(h.key("insecure"), "contradicts tls; remove one of them")
        if scheme != "tcp" and (tls is not None or insecure):
            which = "tls" if tls is not None else "insecure"
            raise ConfigError(h.key(which), f"only applies to tcp:// endpoints, not {scheme}://")
        cluster_address = h.str(
            "cluster_address",
            address or "127.0.0.1",
            pattern=ADDRESS_PATTERN,
            expected="an IP address or host name",
        )
        if _is_ip(cluster_address) and ipaddress.ip_address(cluster_address).is_unspecified:
            raise ConfigError(
                h.key("cluster_address"),
                f"{cluster_address} is not an address the coordinator can connect to, and would "
                "expose the unauthenticated RPC servers on every interface; give this host's IP",
            )
        gpus = _parse_gpus(h, backend=None, vendor_required=True, inherit={}, rpc=False)
        h.done()
        hosts[name] = HostConfig(name, docker, tls, insecure, cluster_address, gpus)
    return hosts


def _parse_gpus(
    r: Reader,
    *,
    backend: str | None,
    vendor_required: bool,
    inherit: Mapping[int, GpuConfig],
    rpc: bool,
) -> tuple[GpuConfig, ...]:
    gpus: list[GpuConfig] = []
    seen: dict[int, str] = {}
    owner_vendor = BACKEND_VENDOR[backend] if backend else None
    for pos, g in enumerate(r.items("gpus")):
        index = g.int("index", pos, min=0, max=255)
        if index in seen:
            raise ConfigError(g.key("index"), f"device {index} is already listed as {seen[index]}")
        seen[index] = g.path
        base = inherit.get(index)
        if inherit and base is None:
            have = ", ".join(str(i) for i in sorted(inherit))
            raise ConfigError(g.key("index"), f"the host has no device {index} (it has {have})")
        fallback = base.vendor if base else owner_vendor
        vendor = g.enum("vendor", VENDORS, fallback or (REQUIRED if vendor_required else None))
        if owner_vendor and vendor != owner_vendor:
            raise ConfigError(
                g.key("vendor"),
                f"{vendor} device under backend {backend}, which drives {owner_vendor} devices only",
            )
        gpus.append(
            GpuConfig(
                name=g.str("name", base.name if base else f"{vendor or 'device'} {index}"),
                vram_gb=g.number("vram_gb", base.vram_gb if base else REQUIRED, max=65536),
                vendor=vendor,
                index=index,
                rpc_port=g.int("rpc_port", DEFAULT_RPC_PORT + pos, min=1, max=65535)
                if rpc
                else None,
            )
        )
        g.done()
    return tuple(gpus)


def _host_gpus(entry: HostConfig, backend: str | None, rpc: bool) -> tuple[GpuConfig, ...]:
    """The devices of a hosts entry that ``backend`` drives, as the default ``gpus``."""
    usable = [g for g in entry.gpus if backend is None or g.vendor == BACKEND_VENDOR[backend]]
    return tuple(
        dataclasses.replace(g, rpc_port=DEFAULT_RPC_PORT + i if rpc else None)
        for i, g in enumerate(usable)
    )


def _lookup_host(
    r: Reader, hosts: Mapping[str, HostConfig], default: Any = REQUIRED
) -> tuple[str, HostConfig | None]:
    host = r.str("host", default, pattern=ADDRESS_PATTERN, expected="a hosts entry or an address")
    if host in hosts:
        return host, hosts[host]
    close = difflib.get_close_matches(host, list(hosts), n=1, cutoff=0.8)
    if close and not _is_ip(host):
        raise ConfigError(
            r.key("host"), f"{host!r} is not a hosts entry; did you mean {close[0]!r}?"
        )
    return host, None


def _backend(r: Reader, entry: HostConfig | None, fallback: str | None) -> str | None:
    """``backend``, defaulting to what the hosts entry's devices need."""
    default: Any = fallback
    if entry is not None:
        vendors = {g.vendor for g in entry.gpus}
        if len(vendors) > 1 and not r.has("backend"):
            several = ", ".join(sorted(vendors))
            raise ConfigError(
                r.key("backend"), f"is required: hosts.{entry.name} has {several} devices"
            )
        default = VENDOR_BACKEND[vendors.pop()] if len(vendors) == 1 else "cpu"
    return r.enum("backend", BACKENDS, default, aliases=BACKEND_ALIASES)


def parse_coordinator(root: Reader, hosts: Mapping[str, HostConfig]) -> CoordinatorConfig | None:
    c = root.sub("coordinator")
    if c is None:
        return None
    host, entry = _lookup_host(c, hosts, "127.0.0.1")
    port = c.int("port", 8080, min=1, max=65535)
    backend = _backend(c, entry, "cpu")
    inherit = {g.index: g for g in entry.gpus} if entry else {}
    if c.has("gpus"):
        gpus = _parse_gpus(c, backend=backend, vendor_required=True, inherit=inherit, rpc=False)
    else:
        gpus = _host_gpus(entry, backend, rpc=False) if entry else ()
    c.done()
    return CoordinatorConfig(host, port, backend, gpus)


def parse_workers(root: Reader, hosts: Mapping[str, HostConfig]) -> tuple[WorkerConfig, ...]:
    workers = []
    for w in root.items("workers"):
        host, entry = _lookup_host(w, hosts)
        backend = _backend(w, entry, None)
        inherit = {g.index: g for g in entry.gpus} if entry else {}
        if w.has("gpus"):
            gpus = _parse_gpus(w, backend=backend, vendor_required=False, inherit=inherit, rpc=True)
        elif entry is None:
            raise ConfigError(w.key("gpus"), "is required when host is not a hosts entry")
        else:
            gpus = _host_gpus(entry, backend, rpc=True)
        if not gpus:
            raise ConfigError(w.key("gpus"), "needs at least one device (vendor: cpu offers RAM)")
        w.done()
        workers.append(WorkerConfig(host, backend, gpus))
    return tuple(workers)


def check_cluster(
    coordinator: CoordinatorConfig | None,
    workers: Sequence[WorkerConfig],
    hosts: Mapping[str, HostConfig],
) -> None:
    """Rules across sections: ports and devices used once per host, reachable RPC addresses."""
    ports: dict[tuple[str, int], str] = {}
    devices: dict[tuple[str, int], str] = {}
    if coordinator is not None:
        ports[coordinator.host, coordinator.port] = "coordinator.port"
        for j, gpu in enumerate(coordinator.gpus):
            devices[coordinator.host, gpu.index] = f"coordinator.gpus[{j}]"
    for i, worker in enumerate(workers):
        for j, gpu in enumerate(worker.gpus):
            gpu_key = f"workers[{i}].gpus[{j}]"
            for table, what, item, key in (
                (ports, "port", gpu.rpc_port, f"{gpu_key}.rpc_port"),
                (devices, "device", gpu.index, gpu_key),
            ):
                if (used_by := table.get((worker.host, item))) is not None:
                    raise ConfigError(
                        key, f"{what} {item} on host {worker.host!r} is already used by {used_by}"
                    )
                table[worker.host, item] = key
        entry = hosts.get(worker.host)
        if coordinator is None or entry is None or not _is_loopback(entry.cluster_address):
            continue
        local = coordinator.host not in hosts and entry.docker.startswith("unix://")
        if coordinator.host != worker.host and not local:
            raise ConfigError(
                f"hosts.{entry.name}.cluster_address",
                f"{entry.cluster_address} is a loopback address, but the coordinator on "
                f"{coordinator.host!r} must reach workers[{i}] here; give this host's LAN address",
            )
