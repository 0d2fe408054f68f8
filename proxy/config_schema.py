"""The configuration's types, and the values and names they may hold.

The frozen dataclasses hold values that are already defaulted and validated, so
the proxy, the verifier and the orchestrator read fields and never re-check
them. ``configs/cluster.yaml`` documents each key; keep the two in step. The
section parsers that fill them in are the ``tightwad.config_*`` modules.

Durations are float seconds (``*_s``), sizes are int bytes, memory is float GiB
(``vram_gb``).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping

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

# Names of hosts and drafters (they end up in container names and labels).
ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\Z")
ID_HELP = "a name of letters, digits, '.', '_' and '-'"
ADDRESS_PATTERN = re.compile(r"[A-Za-z0-9._:%-]+\Z")  # a host name, IPv4 or IPv6 address


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
    # While the target verifies a round, draft the next one as if it were accepted.
    # Off by default: it gains only where draft and target do not share CPUs.
    pipeline_drafts: bool = False
    # With several drafters: greedy requests ask them all and keep the best proposal.
    parallel_drafters: bool = True
    # Stop a draft before the first token the draft itself is less sure of than this.
    draft_min_confidence: float = 0.0

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
