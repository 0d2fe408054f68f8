"""Load and check Tightwad's one configuration file, shared by the CLI, proxy and orchestrator.

    load_config(path=None, *, env=None) -> Config     a YAML file
    parse_config(data, *, source="<dict>") -> Config   an in-memory mapping

``configs/cluster.yaml`` documents every key. Defaults are filled in and every
rule is checked here, at load time, so the rest of Tightwad reads plain frozen
dataclasses (``tightwad.config_schema``, re-exported here). Each mistake raises
``ConfigError`` whose key is the full dotted path, e.g.
``workers[1].gpus[0].vram_gb: expected a number > 0, got -3``. Unknown keys are
errors, with a "did you mean" suggestion.

Environment overrides (applied by ``load_config``; ``parse_config`` only when
given ``env``): TIGHTWAD_CONFIG picks the file, TIGHTWAD_PROXY_PORT sets
proxy.port, TIGHTWAD_API_KEY sets proxy.api_key, TIGHTWAD_MODE sets proxy.mode
and verifier.mode.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from tightwad.config_schema import (
    _REQUIRED,
    BACKEND_ALIASES,
    BACKEND_VENDOR,
    BACKENDS,
    DEFAULT_CONFIG_PATH,
    DEFAULT_DOCKER,
    DEFAULT_RPC_PORT,
    DRAFT_BACKENDS,
    FLASH_ATTN,
    MODES,
    TARGET_BACKENDS,
    VENDOR_BACKEND,
    VENDORS,
    BackendConfig,
    BinariesConfig,
    Config,
    CoordinatorConfig,
    GpuConfig,
    HostConfig,
    ImagesConfig,
    ModelConfig,
    ProxyConfig,
    TlsConfig,
    VerifierConfig,
    WorkerConfig,
    _Reader,
    _show,
)
from tightwad.errors import ConfigError

__all__ = [
    "ENV_API_KEY",
    "ENV_CONFIG",
    "ENV_MODE",
    "ENV_PROXY_PORT",
    "BackendConfig",
    "BinariesConfig",
    "Config",
    "CoordinatorConfig",
    "GpuConfig",
    "HostConfig",
    "ImagesConfig",
    "ModelConfig",
    "ProxyConfig",
    "TlsConfig",
    "VerifierConfig",
    "WorkerConfig",
    "load_config",
    "parse_config",
]

ENV_CONFIG = "TIGHTWAD_CONFIG"
ENV_PROXY_PORT = "TIGHTWAD_PROXY_PORT"
ENV_API_KEY = "TIGHTWAD_API_KEY"
ENV_MODE = "TIGHTWAD_MODE"

_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\Z")  # hosts and drafter names (labels, containers)
_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]*\Z")
_ADDRESS = re.compile(r"[A-Za-z0-9._:%-]+\Z")  # a host name, IPv4 or IPv6 address
_GGUF = re.compile(r".+\.gguf\Z", re.IGNORECASE)
_ID_HELP = "a name of letters, digits, '.', '_' and '-'"
_MODEL_NAME_HELP = "a name of letters, digits, '.', '_', ':', '/' and '-'"


# --- sections ---------------------------------------------------------------


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
        key, f"expected unix:///path, tcp://host:port or ssh://user@host, got {_show(url)}"
    )


def _resolve_path(value: str, base_dir: Path | None) -> str:
    path = Path(value).expanduser()
    if base_dir is not None and not path.is_absolute():
        path = base_dir / path
    return str(path)


def _parse_hosts(root: _Reader, base_dir: Path | None) -> dict[str, HostConfig]:
    hosts: dict[str, HostConfig] = {}
    for name, h in root.entries("hosts", _ID, _ID_HELP):
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
            pattern=_ADDRESS,
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
    r: _Reader,
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
        vendor = g.enum("vendor", VENDORS, fallback or (_REQUIRED if vendor_required else None))
        if owner_vendor and vendor != owner_vendor:
            raise ConfigError(
                g.key("vendor"),
                f"{vendor} device under backend {backend}, which drives {owner_vendor} devices only",
            )
        gpus.append(
            GpuConfig(
                name=g.str("name", base.name if base else f"{vendor or 'device'} {index}"),
                vram_gb=g.number("vram_gb", base.vram_gb if base else _REQUIRED, max=65536),
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
    r: _Reader, hosts: Mapping[str, HostConfig], default: Any = _REQUIRED
) -> tuple[str, HostConfig | None]:
    host = r.str("host", default, pattern=_ADDRESS, expected="a hosts entry or an address")
    if host in hosts:
        return host, hosts[host]
    close = difflib.get_close_matches(host, list(hosts), n=1, cutoff=0.8)
    if close and not _is_ip(host):
        raise ConfigError(
            r.key("host"), f"{host!r} is not a hosts entry; did you mean {close[0]!r}?"
        )
    return host, None


def _backend(r: _Reader, entry: HostConfig | None, fallback: str | None) -> str | None:
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


def _parse_coordinator(root: _Reader, hosts: Mapping[str, HostConfig]) -> CoordinatorConfig | None:
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


def _parse_workers(root: _Reader, hosts: Mapping[str, HostConfig]) -> tuple[WorkerConfig, ...]:
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


def _check_cluster(
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


def _parse_models(root: _Reader) -> dict[str, ModelConfig]:
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


def _parse_backend(
    b: _Reader, role: str, *, name: str, timeout_s: float, name_required: bool = False
) -> BackendConfig:
    config = BackendConfig(
        name=b.str("name", _REQUIRED if name_required else name, pattern=_ID, expected=_ID_HELP),
        role=role,
        url=b.url("url"),
        backend=b.enum(
            "backend",
            DRAFT_BACKENDS if role == "draft" else TARGET_BACKENDS,
            "llamacpp" if role == "draft" else "verifier",
        ),
        model_name=b.str("model_name", None),
        timeout_s=b.number("timeout_s", timeout_s, max=86400),
        api_key=b.str("api_key", None),
    )
    b.done()
    return config


@dataclasses.dataclass(frozen=True)
class _Env:
    proxy_port: int | None = None
    api_key: str | None = None
    mode: str | None = None


def _override(from_env: Any, from_file: Any) -> Any:
    """The environment's value when set; the file's (read, and so checked, either way)."""
    return from_file if from_env is None else from_env


def _read_env(env: Mapping[str, str]) -> _Env:
    port = env.get(ENV_PROXY_PORT, "").strip()
    if port and not (port.isdigit() and 1 <= int(port) <= 65535):
        raise ConfigError(ENV_PROXY_PORT, f"expected an integer between 1 and 65535, got {port!r}")
    mode = env.get(ENV_MODE, "").strip().lower()
    if mode and mode not in MODES:
        raise ConfigError(ENV_MODE, f"expected one of {', '.join(MODES)}, got {env[ENV_MODE]!r}")
    api_key = env.get(ENV_API_KEY, "").strip()
    return _Env(int(port) if port else None, api_key or None, mode or None)


def _parse_proxy(root: _Reader, env: _Env) -> ProxyConfig | None:
    p = root.sub("proxy")
    if p is None:
        return None
    host = p.str("host", "127.0.0.1", pattern=_ADDRESS, expected="an address to bind")
    port = p.int("port", 8088, min=1, max=65535)
    if str(p.raw("max_draft_tokens", "")).strip().lower() == "auto":
        max_draft_tokens = None
    else:
        max_draft_tokens = p.int("max_draft_tokens", 8, min=1, max=256, extra=" or 'auto'")
    request_timeout_s = p.number("request_timeout_s", 300.0, max=86400)
    draft_timeout_s = p.number("draft_timeout_s", 10.0, max=3600)
    if p.has("draft") and p.has("drafters"):
        raise ConfigError(p.key("drafters"), "give either proxy.draft or proxy.drafters, not both")
    if (draft := p.sub("draft")) is not None:
        drafters = [_parse_backend(draft, "draft", name="draft", timeout_s=draft_timeout_s)]
    elif p.has("drafters"):
        drafters, seen = [], {}
        for d in p.items("drafters"):
            drafter = _parse_backend(
                d, "draft", name="", timeout_s=draft_timeout_s, name_required=True
            )
            if drafter.name in seen:
                raise ConfigError(
                    d.key("name"),
                    f"duplicate drafter name {drafter.name!r} (also {seen[drafter.name]})",
                )
            seen[drafter.name] = d.key("name")
            drafters.append(drafter)
        if not drafters:
            raise ConfigError(p.key("drafters"), "needs at least one drafter")
    else:
        p.missing("draft", " (or list several under proxy.drafters)")
    if (target := p.sub("target")) is None:
        p.missing("target")
    config = ProxyConfig(
        host=host,
        port=env.proxy_port or port,
        max_draft_tokens=max_draft_tokens,
        fallback_on_draft_failure=p.bool("fallback_on_draft_failure", True),
        mode=_override(env.mode, p.enum("mode", MODES, "fast")),
        max_tokens_limit=p.int("max_tokens_limit", 4096, min=1, max=1 << 20),
        max_request_bytes=p.int("max_request_bytes", 1 << 20, min=1024, max=1 << 30),
        request_timeout_s=request_timeout_s,
        draft_timeout_s=draft_timeout_s,
        drafters=tuple(drafters),
        target=_parse_backend(target, "target", name="target", timeout_s=request_timeout_s),
        api_key=_override(env.api_key, p.str("api_key", None)),
    )
    p.done()
    return config


def _parse_verifier(root: _Reader, proxy: ProxyConfig | None, env: _Env) -> VerifierConfig:
    v = root.sub("verifier") or _Reader({}, "verifier")
    inherited = proxy.mode if proxy else "fast"
    config = VerifierConfig(
        ctx_size=v.int("ctx_size", 4096, min=64, max=1 << 24),
        parallel=v.int("parallel", 4, min=1, max=256),
        mode=_override(env.mode, v.enum("mode", MODES, inherited)),
        top_logprobs_max=v.int("top_logprobs_max", 20, min=0, max=100),
        threads=v.int("threads", None, min=1, max=1024),
    )
    v.done()
    if proxy and proxy.mode == "strict" and config.mode == "fast":
        raise ConfigError(
            "verifier.mode",
            "is fast but proxy.mode is strict, whose output must equal the target's bit for bit; "
            "remove verifier.mode to inherit strict",
        )
    return config


def _parse_images(root: _Reader) -> ImagesConfig:
    i = root.sub("images") or _Reader({}, "images")
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


def _parse_binaries(root: _Reader) -> BinariesConfig:
    b = root.sub("binaries") or _Reader({}, "binaries")
    defaults = BinariesConfig()
    config = BinariesConfig(
        coordinator=b.str("coordinator", defaults.coordinator),
        rpc_server=b.str("rpc_server", defaults.rpc_server),
    )
    b.done()
    return config


# --- entry points -----------------------------------------------------------


def parse_config(
    data: Mapping[str, Any] | None,
    *,
    source: str = "<dict>",
    env: Mapping[str, str] | None = None,
    base_dir: str | os.PathLike[str] | None = None,
) -> Config:
    """Check an in-memory config. ``env`` (default: none) supplies the TIGHTWAD_* overrides;
    ``base_dir`` (default: leave as written) anchors relative TLS paths."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(source, f"expected a mapping at the top level, got {_show(data)}")
    root = _Reader(data, "")
    overrides = _read_env(env or {})
    hosts = _parse_hosts(root, Path(base_dir) if base_dir is not None else None)
    coordinator = _parse_coordinator(root, hosts)
    workers = _parse_workers(root, hosts)
    _check_cluster(coordinator, workers, hosts)
    models = _parse_models(root)
    proxy = _parse_proxy(root, overrides)
    config = Config(
        source=source,
        proxy=proxy,
        coordinator=coordinator,
        workers=workers,
        hosts=hosts,
        models=models,
        verifier=_parse_verifier(root, proxy, overrides),
        binaries=_parse_binaries(root),
        images=_parse_images(root),
    )
    root.done()
    return config


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects a key given twice in one mapping (PyYAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        first_line: dict[str, int] = {}
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                if key_node.value in first_line:
                    raise yaml.constructor.ConstructorError(
                        None,
                        None,
                        f"duplicate key {key_node.value!r} (first given at line "
                        f"{first_line[key_node.value]})",
                        key_node.start_mark,
                    )
                first_line[key_node.value] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def _read_yaml(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_StrictLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(source, f"invalid YAML{where}: {exc.problem or exc.context}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(source, f"invalid YAML: {exc}") from exc


def load_config(
    path: str | os.PathLike[str] | None = None, *, env: Mapping[str, str] | None = None
) -> Config:
    """Load the config at ``path``, else $TIGHTWAD_CONFIG, else ./configs/cluster.yaml.

    ``env`` (default ``os.environ``) supplies TIGHTWAD_CONFIG and the overrides.
    """
    env = os.environ if env is None else env
    if path is not None and str(path):
        origin = ""
    elif env.get(ENV_CONFIG, "").strip():
        path, origin = env[ENV_CONFIG].strip(), f" (named by {ENV_CONFIG})"
    else:
        path, origin = DEFAULT_CONFIG_PATH, f" (the default; pass a path or set {ENV_CONFIG})"
    file = Path(path).expanduser()
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(str(path), f"no such config file{origin}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(str(path), f"cannot read config file: {exc}") from exc
    data = _read_yaml(text, str(path))
    return parse_config(data, source=str(path), env=env, base_dir=file.absolute().parent)
