"""The configuration's types, and the reader that ``tightwad.config`` checks them with.

The frozen dataclasses hold values that are already defaulted and validated, so
the proxy, the verifier and the orchestrator read fields and never re-check
them. ``configs/cluster.yaml`` documents each key; keep the two in step.
``_Reader`` (at the end) is the small typed-getter layer the section parsers in
``tightwad.config`` are written with, so every error names its dotted key.

Durations are float seconds (``*_s``), sizes are int bytes, memory is float GiB
(``vram_gb``).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn
from urllib.parse import urlsplit

from tightwad.errors import ConfigError

DEFAULT_CONFIG_PATH = "configs/cluster.yaml"
DEFAULT_DOCKER = "unix:///var/run/docker.sock"
DEFAULT_RPC_PORT = 50052  # workers[].gpus[j].rpc_port defaults to DEFAULT_RPC_PORT + j

MODES = ("fast", "strict")
BACKENDS = ("cpu", "cuda", "rocm")  # llama.cpp builds; "hip" is read as "rocm"
BACKEND_ALIASES = {"hip": "rocm"}
VENDORS = ("nvidia", "amd", "cpu")
BACKEND_VENDOR = {"cpu": "cpu", "cuda": "nvidia", "rocm": "amd"}
VENDOR_BACKEND = {vendor: backend for backend, vendor in BACKEND_VENDOR.items()}
DRAFT_BACKENDS = ("llamacpp", "ollama", "openai")
TARGET_BACKENDS = ("verifier", "openai-echo", "llamacpp")
FLASH_ATTN = ("auto", "on", "off")  # llama-server --flash-attn values; YAML true/false = on/off


@dataclasses.dataclass(frozen=True)
class TlsConfig:
    """Client certificates for a tcp:// Docker daemon (paths on the machine running Tightwad)."""

    ca: str
    cert: str
    key: str


@dataclasses.dataclass(frozen=True)
class GpuConfig:
    """One device that llama.cpp can offload layers to (a ``cpu`` device offers RAM)."""

    name: str
    vram_gb: float
    # nvidia | amd | cpu. None only for a worker that Tightwad does not manage
    # (its host is a plain address) and that names no backend.
    vendor: str | None
    index: int  # device index on its host (CUDA_VISIBLE_DEVICES / HIP_VISIBLE_DEVICES)
    rpc_port: int | None = None  # set for workers[].gpus only: one rpc-server per device


@dataclasses.dataclass(frozen=True)
class HostConfig:
    """A machine whose Docker daemon Tightwad drives (``hosts.<name>``)."""

    name: str
    docker: str  # unix:///path | tcp://host[:port] | ssh://[user@]host[:port]
    tls: TlsConfig | None  # set only for tcp://
    insecure: bool  # tcp:// without TLS, explicitly allowed
    cluster_address: str  # RPC servers bind here and the coordinator connects here
    gpus: tuple[GpuConfig, ...]


@dataclasses.dataclass(frozen=True)
class CoordinatorConfig:
    """The llama-server (or Tightwad verifier) that loads the model and drives the workers.

    ``host`` is a ``hosts`` entry (run in Docker there) or, as in older
    configs, the address to bind when run locally from ``binaries.coordinator``.
    """

    host: str
    port: int
    backend: str  # cpu | cuda | rocm
    gpus: tuple[GpuConfig, ...]


@dataclasses.dataclass(frozen=True)
class WorkerConfig:
    """RPC servers on one host, one per GPU (``workers[i]``).

    When ``host`` is a ``hosts`` entry Tightwad starts them there; otherwise
    ``host`` is the address of rpc-servers someone else runs, and ``backend``
    may be None.
    """

    host: str
    backend: str | None  # cpu | cuda | rocm
    gpus: tuple[GpuConfig, ...]  # every one has rpc_port set


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    name: str
    path: str  # a .gguf path on the host that loads it; not checked at load time
    ctx_size: int  # 0 = the model's trained context
    predict: int  # -1 = until the context is full
    flash_attn: str  # auto | on | off
    default: bool


@dataclasses.dataclass(frozen=True)
class BackendConfig:
    """One draft or target server the proxy talks to."""

    name: str  # unique among drafters; "target" for the target
    role: str  # draft | target
    url: str  # http(s)://host:port[/path], no trailing slash
    backend: str  # draft: DRAFT_BACKENDS; target: TARGET_BACKENDS
    model_name: str | None
    timeout_s: float  # defaults to proxy.draft_timeout_s / proxy.request_timeout_s
    api_key: str | None = dataclasses.field(default=None, repr=False)


@dataclasses.dataclass(frozen=True)
class ProxyConfig:
    host: str
    port: int
    max_draft_tokens: int | None  # None = "auto": the proxy adapts the draft length
    fallback_on_draft_failure: bool
    mode: str  # fast | strict
    max_tokens_limit: int
    max_request_bytes: int
    request_timeout_s: float
    draft_timeout_s: float
    drafters: tuple[BackendConfig, ...]  # at least one; `draft:` is a one-element list
    target: BackendConfig
    api_key: str | None = dataclasses.field(default=None, repr=False)

    @property
    def draft(self) -> BackendConfig:
        """The first (with ``draft:``, the only) drafter."""
        return self.drafters[0]

    @property
    def adaptive_draft(self) -> bool:
        return self.max_draft_tokens is None


@dataclasses.dataclass(frozen=True)
class VerifierConfig:
    ctx_size: int = 4096
    parallel: int = 4
    mode: str = "fast"  # resolved: inherits proxy.mode when not given
    top_logprobs_max: int = 20
    threads: int | None = None  # None = llama.cpp's default


@dataclasses.dataclass(frozen=True)
class BinariesConfig:
    coordinator: str = "llama-server"
    rpc_server: str = "rpc-server"


@dataclasses.dataclass(frozen=True)
class ImagesConfig:
    registry_prefix: str = ""  # normalised to "" or "registry/path/"
    cpu: str = "tightwad/llama.cpp:cpu"
    cuda: str = "tightwad/llama.cpp:cuda"
    rocm: str = "tightwad/llama.cpp:rocm"

    def for_backend(self, backend: str) -> str:
        """The full image reference for a llama.cpp backend (cpu, cuda, rocm)."""
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
        return self.registry_prefix + getattr(self, backend)


@dataclasses.dataclass(frozen=True)
class Config:
    source: str  # the file it came from, or "<dict>"
    proxy: ProxyConfig | None = None
    coordinator: CoordinatorConfig | None = None
    workers: tuple[WorkerConfig, ...] = ()
    hosts: Mapping[str, HostConfig] = dataclasses.field(default_factory=dict)
    models: Mapping[str, ModelConfig] = dataclasses.field(default_factory=dict)
    verifier: VerifierConfig = VerifierConfig()
    binaries: BinariesConfig = BinariesConfig()
    images: ImagesConfig = ImagesConfig()

    def require_proxy(self, purpose: str = "the proxy") -> ProxyConfig:
        if self.proxy is None:
            raise ConfigError("proxy", f"section is required for {purpose} ({self.source})")
        return self.proxy

    def require_cluster(self, purpose: str = "the cluster commands") -> CoordinatorConfig:
        """Check that the coordinator and at least one model are configured."""
        if self.coordinator is None:
            raise ConfigError("coordinator", f"section is required for {purpose} ({self.source})")
        if not self.models:
            raise ConfigError("models", f"at least one model is required for {purpose}")
        return self.coordinator

    def model(self, name: str) -> ModelConfig:
        try:
            return self.models[name]
        except KeyError:
            known = ", ".join(self.models) or "none configured"
            raise ConfigError("models", f"no model named {name!r}; known models: {known}") from None

    @property
    def default_model(self) -> ModelConfig | None:
        """The model marked ``default: true``, else the only model, else None."""
        for model in self.models.values():
            if model.default:
                return model
        if len(self.models) == 1:
            return next(iter(self.models.values()))
        return None

    def host_entry(self, host: str) -> HostConfig | None:
        """The ``hosts`` entry that ``host`` (a coordinator or worker host) names, if any."""
        return self.hosts.get(host)

    def address_of(self, host: str) -> str:
        """Where to reach ``host``: its ``cluster_address`` if it is a hosts entry, else itself."""
        entry = self.hosts.get(host)
        return entry.cluster_address if entry else host

    def rpc_endpoints(self) -> tuple[str, ...]:
        """``address:port`` of every worker RPC server, in file order (llama-server --rpc)."""
        endpoints = []
        for worker in self.workers:
            address = self.address_of(worker.host)
            if ":" in address:  # IPv6
                address = f"[{address}]"
            endpoints.extend(f"{address}:{gpu.rpc_port}" for gpu in worker.gpus)
        return tuple(endpoints)


# --- the reader the parsers in tightwad.config are written with ---------------

_REQUIRED: Any = object()  # default= for keys that must be given


def _show(value: Any) -> str:
    """A value as the error message quotes it, in YAML's words."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    return repr(value) if isinstance(value, str) else str(value)


class _Reader:
    """One YAML mapping at a dotted path. Each getter records the key it read, checks
    its type and returns ``default`` when the key is absent or null; ``done()``
    then rejects the keys nobody read."""

    def __init__(self, data: Any, path: str, *, expected: str = "a mapping"):
        if not isinstance(data, Mapping):
            raise ConfigError(path, f"expected {expected}, got {_show(data)}")
        self.data = data
        self.path = path
        self._read: dict[str, None] = {}  # ordered set

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def has(self, name: str) -> bool:
        self._read[name] = None
        return self.data.get(name) is not None

    def raw(self, name: str, default: Any = _REQUIRED) -> Any:
        self._read[name] = None
        value = self.data.get(name)
        if value is None:
            if default is _REQUIRED:
                self.missing(name)
            return default
        return value

    def missing(self, name: str, hint: str = "") -> NoReturn:
        """Raise that ``name`` is required, or that a key next to it is its misspelling."""
        for other in self.data:  # a misspelt key is likelier than a forgotten one
            if other in self._read or not isinstance(other, str):
                continue
            if difflib.get_close_matches(name, [other], cutoff=0.6):
                raise ConfigError(self.key(other), f"unknown key; did you mean {name!r}?")
        raise ConfigError(self.key(name), "is required" + hint)

    def _fail(self, name: str, expected: str, value: Any) -> NoReturn:
        raise ConfigError(self.key(name), f"expected {expected}, got {_show(value)}")

    def str(
        self,
        name: str,
        default: Any = _REQUIRED,
        *,
        pattern: re.Pattern[str] | None = None,
        expected: str = "a non-empty string",
        empty: bool = False,
    ) -> Any:
        value = self.raw(name, default)
        if value is default or (empty and value == ""):
            return value
        if (
            not isinstance(value, str)
            or not value.strip()
            or (pattern and not pattern.match(value))
        ):
            self._fail(name, expected, value)
        return value

    def int(
        self,
        name: str,
        default: Any = _REQUIRED,
        *,
        min: int | None = None,
        max: int | None = None,
        extra: str = "",
    ) -> Any:
        value = self.raw(name, default)
        if value is default:
            return value
        if (
            isinstance(value, bool)
            or not isinstance(value, int)
            or (min is not None and value < min)
            or (max is not None and value > max)
        ):
            if min is not None and max is not None:
                expected = f"an integer between {min} and {max}"
            else:
                expected = "an integer" + (f" >= {min}" if min is not None else "")
            self._fail(name, expected + extra, value)
        return value

    def number(
        self, name: str, default: Any = _REQUIRED, *, gt: float = 0, max: float | None = None
    ) -> Any:
        value = self.raw(name, default)
        if value is default:
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            self._fail(name, f"a number > {gt}", value)
        if value <= gt:
            self._fail(name, f"a number > {gt}", value)
        if max is not None and value > max:
            self._fail(name, f"a number <= {max}", value)
        return float(value)

    def bool(self, name: str, default: Any = _REQUIRED) -> Any:
        value = self.raw(name, default)
        if value is not default and not isinstance(value, bool):
            self._fail(name, "true or false", value)
        return value

    def enum(
        self,
        name: str,
        choices: Sequence[str],
        default: Any = _REQUIRED,
        *,
        aliases: Mapping[str, str] | None = None,
    ) -> Any:
        value = self.raw(name, default)
        if value is default:
            return value
        canonical = value.strip().lower() if isinstance(value, str) else value
        canonical = (aliases or {}).get(canonical, canonical)
        if canonical not in choices:
            self._fail(name, "one of " + ", ".join(choices), value)
        return canonical

    def url(self, name: str, default: Any = _REQUIRED) -> Any:
        value = self.raw(name, default)
        if value is default:
            return value
        ok = False
        if isinstance(value, str):
            try:
                parts = urlsplit(value)
                parts.port  # noqa: B018 -- raises ValueError on a bad port
                ok = parts.scheme in ("http", "https") and bool(parts.hostname)
                ok = ok and not parts.query and not parts.fragment
            except ValueError:
                ok = False
        if not ok:
            self._fail(name, "a URL like http://host:port", value)
        return value.rstrip("/")

    def sub(self, name: str) -> _Reader | None:
        value = self.raw(name, None)
        return None if value is None else _Reader(value, self.key(name))

    def items(self, name: str) -> list[_Reader]:
        value = self.raw(name, [])
        if not isinstance(value, list):
            self._fail(name, "a list", value)
        return [_Reader(item, f"{self.key(name)}[{i}]") for i, item in enumerate(value)]

    def entries(
        self, name: str, pattern: re.Pattern[str], expected: str
    ) -> list[tuple[str, _Reader]]:
        value = self.raw(name, {})
        if not isinstance(value, Mapping):
            self._fail(name, "a mapping of names to settings", value)
        out = []
        for entry, item in value.items():
            key = f"{self.key(name)}.{entry}"
            if not isinstance(entry, str) or not pattern.match(entry):
                raise ConfigError(key, f"expected {expected} as the name, got {_show(entry)}")
            out.append((entry, _Reader({} if item is None else item, key)))  # null: defaults
        return out

    def done(self) -> None:
        for name in self.data:
            if name in self._read:
                continue
            close = difflib.get_close_matches(str(name), list(self._read), n=1, cutoff=0.6)
            hint = (
                f"did you mean {close[0]!r}?" if close else "valid keys: " + ", ".join(self._read)
            )
            raise ConfigError(self.key(str(name)), f"unknown key; {hint}")
