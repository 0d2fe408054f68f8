"""What Tightwad runs on each host, as ContainerSpecs (pure: no Docker calls here).

    worker_spec(...)        one llama.cpp RPC server per worker GPU
    coordinator_spec(...)   llama-server, or Tightwad's verifier when it is a speculation target
    probe_spec(...)         a one-shot nvidia-smi / rocm-smi for free VRAM
    placement_label(state)  a coordinator's placement summary, read back from its label

The image contract (images/llama.cpp): its entrypoint takes the role as the
first argument, ``rpc-server ARGS`` (with SIGPIPE ignored), ``llama-server
ARGS`` or ``verifier ARGS``, and runs anything else as given.

Every container carries labels, so the orchestrator keeps no state of its own
and finds its containers again after a restart:

    io.tightwad.managed=true          io.tightwad.cluster=<cluster name>
    io.tightwad.role=rpc-worker | coordinator | probe
    io.tightwad.host, io.tightwad.gpu (device index), io.tightwad.gpu-name,
    io.tightwad.vendor, io.tightwad.rpc-port          (workers)
    io.tightwad.model, io.tightwad.kind, io.tightwad.placement (JSON)   (coordinators)

Ports are published on the host's ``cluster_address`` only, never on every
interface: the RPC server has no authentication. Workers and coordinators join
the cluster's own bridge network on each host (``network_name``), not Docker's
default bridge, where any container could reach their unpublished ports; the
network is removed by ``tightwad stop``.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

from tightwad.config import Config, GpuConfig, ModelConfig, WorkerConfig
from tightwad.config_schema import BACKEND_VENDOR, VENDOR_BACKEND
from tightwad.orchestrator.hosts import ContainerSpec, ContainerState, gpu_flags
from tightwad.orchestrator.placement import Placement

LABEL_MANAGED = "io.tightwad.managed"
LABEL_CLUSTER = "io.tightwad.cluster"
LABEL_ROLE = "io.tightwad.role"
LABEL_HOST = "io.tightwad.host"
LABEL_GPU = "io.tightwad.gpu"
LABEL_GPU_NAME = "io.tightwad.gpu-name"
LABEL_VENDOR = "io.tightwad.vendor"
LABEL_RPC_PORT = "io.tightwad.rpc-port"
LABEL_MODEL = "io.tightwad.model"
LABEL_KIND = "io.tightwad.kind"
LABEL_PLACEMENT = "io.tightwad.placement"

ROLE_WORKER = "rpc-worker"
ROLE_COORDINATOR = "coordinator"
ROLE_PROBE = "probe"
KINDS = ("llama-server", "verifier")

RPC_PORT_IN_CONTAINER = 50052
HTTP_PORT_IN_CONTAINER = 8080
# The model's folder is mounted here, read-only: a neutral path that the image's
# unprivileged user can reach (the host path may sit under a private home).
MODELS_IN_CONTAINER = "/models"
DEFAULT_CLUSTER = "default"
ENV_CLUSTER = "TIGHTWAD_CLUSTER"

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def cluster_name() -> str:
    """Containers of one Tightwad cluster share this label (``$TIGHTWAD_CLUSTER``, default
    "default"); two clusters, e.g. a test run, can share a daemon without touching each other."""
    return os.environ.get(ENV_CLUSTER, "").strip() or DEFAULT_CLUSTER


def _prefix(cluster: str) -> str:
    return "tightwad-" if cluster == DEFAULT_CLUSTER else f"tightwad-{_UNSAFE.sub('-', cluster)}-"


def base_labels(cluster: str, role: str) -> dict[str, str]:
    return {LABEL_MANAGED: "true", LABEL_CLUSTER: cluster, LABEL_ROLE: role}


def network_name(cluster: str) -> str:
    """Tightwad's own bridge network on each host: its containers stay off Docker's default
    bridge, where any other container could reach an RPC server's unpublished port."""
    return f"{_prefix(cluster)}net"


def worker_name(cluster: str, host: str, gpu: GpuConfig) -> str:
    return f"{_prefix(cluster)}rpc-{_UNSAFE.sub('-', host)}-{gpu.index}"


def coordinator_name(cluster: str, model: str) -> str:
    return f"{_prefix(cluster)}coordinator-{_UNSAFE.sub('-', model)}"


def worker_backend(worker: WorkerConfig, gpu: GpuConfig) -> str:
    if worker.backend:
        return worker.backend
    return VENDOR_BACKEND.get(gpu.vendor or "cpu", "cpu")


def worker_spec(config: Config, cluster: str, worker: WorkerConfig, gpu: GpuConfig, *,
                threads: int | None = None) -> ContainerSpec:
    assert gpu.rpc_port is not None, "workers[].gpus have rpc_port set by the config loader"
    address = config.address_of(worker.host)
    backend = worker_backend(worker, gpu)
    vendor = gpu.vendor or BACKEND_VENDOR[backend]
    flags = gpu_flags(vendor, [gpu.index])
    command = ["rpc-server", "-H", "0.0.0.0", "-p", str(RPC_PORT_IN_CONTAINER)]
    if threads:
        command += ["-t", str(threads)]
    return ContainerSpec(
        name=worker_name(cluster, worker.host, gpu),
        image=config.images.for_backend(backend),
        # 0.0.0.0 is inside the container's own network namespace; the host side of
        # the port is published on the cluster address only.
        command=tuple(command),
        labels={
            **base_labels(cluster, ROLE_WORKER),
            LABEL_HOST: worker.host,
            LABEL_GPU: str(gpu.index),
            LABEL_GPU_NAME: gpu.name,
            LABEL_VENDOR: vendor,
            LABEL_RPC_PORT: str(gpu.rpc_port),
        },
        ports={f"{RPC_PORT_IN_CONTAINER}/tcp": (address, gpu.rpc_port)},
        environment={"TIGHTWAD_HEALTH_URL": f"tcp://127.0.0.1:{RPC_PORT_IN_CONTAINER}",
                     **flags.get("environment", {})},
        gpu_requests=flags.get("gpu_requests", ()),
        devices=flags.get("devices", ()),
        group_add=flags.get("group_add", ()),
        restart="unless-stopped",
        network=network_name(cluster),
    )


def coordinator_kind(config: Config) -> str:
    """``verifier`` when the proxy's target is a verifier on the coordinator's port (a
    speculation target), else ``llama-server`` (plain serving)."""
    proxy, coordinator = config.proxy, config.coordinator
    if proxy is None or coordinator is None or proxy.target.backend != "verifier":
        return "llama-server"
    from urllib.parse import urlsplit

    port = urlsplit(proxy.target.url).port
    return "verifier" if port == coordinator.port else "llama-server"


def model_in_container(path: str) -> str:
    return f"{MODELS_IN_CONTAINER}/{os.path.basename(path)}"


def model_volume(path: str) -> dict[str, tuple[str, str]]:
    return {os.path.dirname(path) or "/": (MODELS_IN_CONTAINER, "ro")}


def coordinator_command(config: Config, model: ModelConfig, placement: Placement, kind: str, *,
                        threads: int | None = None) -> list[str]:
    port = str(HTTP_PORT_IN_CONTAINER)
    if kind == "verifier":
        v = config.verifier
        command = ["verifier", "--model", model_in_container(model.path), "--host", "0.0.0.0",
                   "--port", port,
                   "--ctx-size", str(model.ctx_size or v.ctx_size), "--parallel", str(v.parallel),
                   "--alias", model.name, "--n-gpu-layers", str(placement.n_gpu_layers)]
        if placement.rpc_endpoints:
            command += ["--rpc", ",".join(placement.rpc_endpoints)]
        # The verifier takes no --tensor-split yet: llama.cpp then splits by the
        # devices' reported free memory.
        if v.mode == "strict":
            command.append("--strict")
        if threads or v.threads:
            command += ["--threads", str(threads or v.threads)]
        return command
    command = ["llama-server", "-m", model_in_container(model.path), "--host", "0.0.0.0",
               "--port", port,
               "--alias", model.name, "-c", str(model.ctx_size), "-n", str(model.predict),
               "-fa", model.flash_attn, "--metrics", "--no-webui",
               # The placement below is the whole plan: do not let llama.cpp re-fit it.
               "--fit", "off", *placement.llama_args()]
    if threads:
        command += ["-t", str(threads)]
    return command


def coordinator_spec(config: Config, cluster: str, model: ModelConfig, placement: Placement, *,
                     kind: str, host_port: int | None, threads: int | None = None) -> ContainerSpec:
    """``host_port`` None publishes on a port Docker picks (a second coordinator during an
    overlapping swap); otherwise the coordinator's configured port."""
    coordinator = config.require_cluster()
    address = config.address_of(coordinator.host)
    flags = gpu_flags(BACKEND_VENDOR[coordinator.backend] if coordinator.gpus else "cpu",
                      [g.index for g in coordinator.gpus])
    summary = {
        "ngl": placement.n_gpu_layers,
        "split": list(placement.tensor_split),
        "rpc": list(placement.rpc_endpoints),
        "use": placement.usage_by_device(),
    }
    return ContainerSpec(
        name=coordinator_name(cluster, model.name),
        image=config.images.for_backend(coordinator.backend),
        command=tuple(coordinator_command(config, model, placement, kind, threads=threads)),
        labels={
            **base_labels(cluster, ROLE_COORDINATOR),
            LABEL_HOST: coordinator.host,
            LABEL_MODEL: model.name,
            LABEL_KIND: kind,
            LABEL_PLACEMENT: json.dumps(summary, separators=(",", ":")),
        },
        ports={f"{HTTP_PORT_IN_CONTAINER}/tcp": (address, host_port)},
        environment={"TIGHTWAD_HEALTH_URL": f"http://127.0.0.1:{HTTP_PORT_IN_CONTAINER}/health",
                     **flags.get("environment", {})},
        volumes=model_volume(model.path),
        gpu_requests=flags.get("gpu_requests", ()),
        devices=flags.get("devices", ()),
        group_add=flags.get("group_add", ()),
        restart="on-failure",
        restart_retries=3,
        network=network_name(cluster),
    )


def placement_label(c: ContainerState) -> dict[str, Any]:
    """The summary coordinator_spec put in LABEL_PLACEMENT ({} if absent or unreadable)."""
    try:
        return json.loads(c.labels.get(LABEL_PLACEMENT, "{}"))
    except ValueError:
        return {}


def probe_spec(config: Config, cluster: str, host: str, vendor: str,
               indices: list[int]) -> ContainerSpec | None:
    """nvidia-smi or rocm-smi in the vendor's image, with those devices; None for cpu."""
    if vendor == "nvidia":
        tool = ("nvidia-smi", "--query-gpu=index,memory.free,memory.total",
                "--format=csv,noheader,nounits")
    elif vendor == "amd":
        tool = ("rocm-smi", "--showmeminfo", "vram", "--json")
    else:
        return None
    flags = gpu_flags(vendor, indices)
    return ContainerSpec(
        name=f"{_prefix(cluster)}probe-{_UNSAFE.sub('-', host)}-{vendor}-{os.getpid()}",
        image=config.images.for_backend(VENDOR_BACKEND[vendor]),
        command=tool[1:],
        entrypoint=(tool[0],),
        labels=base_labels(cluster, ROLE_PROBE),
        environment=flags.get("environment", {}),
        gpu_requests=flags.get("gpu_requests", ()),
        devices=flags.get("devices", ()),
        group_add=flags.get("group_add", ()),
        restart="no",
        network="none",
    )
