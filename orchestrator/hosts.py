"""The Docker SDK behind a small host interface: everything the orchestrator asks of a machine.

    Host                  the protocol: ping, find/list/create/start/stop/remove containers,
                          logs, run a one-shot command, check or pull an image, networks
    DockerHost            the implementation over the ``docker`` SDK (unix://, tcp:// + TLS, ssh://)
    connect(entry)        a DockerHost for a ``hosts:`` entry, or HostUnreachable
    ContainerSpec         what to run (pure data; tightwad.orchestrator.containers builds them)
    ContainerState        what is there (pure data, read from ``docker inspect``)

Every SDK or socket error is mapped here, at the boundary, to an OrchestratorError
that names the host (HostUnreachable when the daemon does not answer), with
``raise ... from exc``; nothing above this module imports ``docker``.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol

import docker
import docker.errors
import docker.tls
import docker.types
import requests

from tightwad.config import HostConfig
from tightwad.orchestrator.errors import HostUnreachable, ImageMissing, OrchestratorError

DEFAULT_TIMEOUT_S = 30.0


@dataclasses.dataclass(frozen=True)
class ContainerSpec:
    name: str
    image: str
    command: tuple[str, ...]
    labels: Mapping[str, str]
    ports: Mapping[str, tuple[str, int | None]] = dataclasses.field(default_factory=dict)
    environment: Mapping[str, str] = dataclasses.field(default_factory=dict)
    volumes: Mapping[str, tuple[str, str]] = dataclasses.field(default_factory=dict)  # host: (bind, mode)
    gpu_requests: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (driver, device ids)
    devices: tuple[str, ...] = ()  # /dev paths passed through as is
    group_add: tuple[str, ...] = ()
    restart: str = "unless-stopped"  # no | on-failure | unless-stopped | always
    restart_retries: int = 0  # for on-failure
    entrypoint: tuple[str, ...] | None = None  # None: the image's
    network: str | None = None  # a network name, "none", or None for Docker's default bridge


@dataclasses.dataclass(frozen=True)
class ContainerState:
    id: str
    name: str
    image: str
    status: str  # created | running | restarting | paused | exited | dead | removing
    exit_code: int
    labels: Mapping[str, str]
    ports: Mapping[str, tuple[tuple[str, int], ...]]  # "8080/tcp" -> ((host ip, host port), ...)
    restart_count: int = 0
    error: str = ""

    @property
    def running(self) -> bool:
        return self.status == "running"

    @property
    def short_id(self) -> str:
        return self.id[:12]

    def describe(self) -> str:
        if self.status in ("exited", "dead"):
            return f"{self.status} (code {self.exit_code})" + (f": {self.error}" if self.error else "")
        return self.status

    def published(self, port: str) -> tuple[str, int] | None:
        bindings = self.ports.get(port) or ()
        return bindings[0] if bindings else None


class Host(Protocol):
    """What the orchestrator needs from one machine. Tests may fake it; the real tests
    use real daemons through DockerHost."""

    name: str
    endpoint: str

    def ping(self) -> None: ...
    def find(self, name: str) -> ContainerState | None: ...
    def list(self, labels: Mapping[str, str]) -> list[ContainerState]: ...
    def create(self, spec: ContainerSpec) -> ContainerState: ...
    def start(self, container: str) -> ContainerState: ...
    def stop(self, container: str, *, timeout_s: float = 10.0) -> None: ...
    def remove(self, container: str) -> None: ...
    def logs(self, container: str, *, tail: int = 30) -> str: ...
    def has_image(self, image: str) -> bool: ...
    def pull(self, image: str) -> None: ...
    def ensure_network(self, name: str, labels: Mapping[str, str]) -> None: ...
    def remove_network(self, name: str) -> None: ...
    def run_once(self, spec: ContainerSpec, *, timeout_s: float = 60.0) -> tuple[int, bytes]: ...
    def close(self) -> None: ...


class DockerHost:
    def __init__(self, name: str, endpoint: str, client: docker.DockerClient):
        self.name = name
        self.endpoint = endpoint
        self._client = client

    def __repr__(self) -> str:
        return f"DockerHost({self.name!r}, {self.endpoint!r})"

    @contextlib.contextmanager
    def _call(self, what: str) -> Iterator[None]:
        try:
            yield
        except docker.errors.APIError as exc:
            if exc.response is not None and exc.response.status_code >= 500 and _is_connection(exc):
                raise HostUnreachable(self.name, self.endpoint, _reason(exc)) from exc
            detail = exc.explanation or str(exc)
            raise OrchestratorError(f"host {self.name!r}: {what}: {detail}") from exc
        except (requests.exceptions.ConnectionError, requests.exceptions.Timeout, OSError) as exc:
            raise HostUnreachable(self.name, self.endpoint, _reason(exc)) from exc
        except docker.errors.DockerException as exc:
            raise HostUnreachable(self.name, self.endpoint, _reason(exc)) from exc

    def ping(self) -> None:
        with self._call("ping"):
            self._client.ping()

    def find(self, name: str) -> ContainerState | None:
        with self._call(f"inspect {name}"):
            try:
                return _state(self._client.containers.get(name))
            except docker.errors.NotFound:
                return None

    def list(self, labels: Mapping[str, str]) -> list[ContainerState]:
        with self._call("list containers"):
            found = self._client.containers.list(
                all=True, filters={"label": [f"{k}={v}" for k, v in labels.items()]})
            return sorted((_state(c) for c in found), key=lambda s: s.name)

    def create(self, spec: ContainerSpec) -> ContainerState:
        if not self.has_image(spec.image):
            self.pull(spec.image)
        kwargs: dict[str, Any] = {
            "name": spec.name,
            "command": list(spec.command),
            "labels": dict(spec.labels),
            "environment": dict(spec.environment),
            "ports": {port: binding for port, binding in spec.ports.items()},
            "volumes": {src: {"bind": bind, "mode": mode} for src, (bind, mode) in spec.volumes.items()},
            "restart_policy": {"Name": spec.restart, **(
                {"MaximumRetryCount": spec.restart_retries} if spec.restart == "on-failure" else {})},
            "detach": True,
        }
        if spec.entrypoint is not None:
            kwargs["entrypoint"] = list(spec.entrypoint)
        if spec.network is not None:
            kwargs["network"] = spec.network
        if spec.gpu_requests:
            kwargs["device_requests"] = [
                docker.types.DeviceRequest(driver=driver, device_ids=list(ids), capabilities=[["gpu"]])
                for driver, ids in spec.gpu_requests
            ]
        if spec.devices:
            kwargs["devices"] = [f"{d}:{d}:rwm" for d in spec.devices]
        if spec.group_add:
            kwargs["group_add"] = list(spec.group_add)
        with self._call(f"create container {spec.name}"):
            return _state(self._client.containers.create(spec.image, **kwargs))

    def start(self, container: str) -> ContainerState:
        with self._call(f"start {container}"):
            c = self._client.containers.get(container)
            c.start()
            c.reload()
            return _state(c)

    def stop(self, container: str, *, timeout_s: float = 10.0) -> None:
        with self._call(f"stop {container}"):
            try:
                self._client.containers.get(container).stop(timeout=int(timeout_s))
            except docker.errors.NotFound:
                pass

    def remove(self, container: str) -> None:
        with self._call(f"remove {container}"):
            try:
                self._client.containers.get(container).remove(force=True)
            except docker.errors.NotFound:
                pass

    def logs(self, container: str, *, tail: int = 30) -> str:
        with self._call(f"logs of {container}"):
            try:
                raw = self._client.containers.get(container).logs(tail=tail)
            except docker.errors.NotFound:
                return ""
            return raw.decode("utf-8", errors="replace")

    def ensure_network(self, name: str, labels: Mapping[str, str]) -> None:
        """A bridge network of this name (created if missing, with these labels)."""
        with self._call(f"create network {name}"):
            if not self._client.networks.list(names=[name]):
                self._client.networks.create(name, driver="bridge", labels=dict(labels))

    def remove_network(self, name: str) -> None:
        with self._call(f"remove network {name}"):
            for n in self._client.networks.list(names=[name]):
                if n.name == name:
                    with contextlib.suppress(docker.errors.NotFound):
                        n.remove()

    def has_image(self, image: str) -> bool:
        with self._call(f"inspect image {image}"):
            try:
                self._client.images.get(image)
                return True
            except docker.errors.ImageNotFound:
                return False

    def pull(self, image: str) -> None:
        """Pull ``image``; ImageMissing (with what to do) when that fails."""
        try:
            with self._call(f"pull {image}"):
                self._client.images.pull(image)
        except HostUnreachable:
            raise
        except OrchestratorError as exc:
            raise ImageMissing(
                f"host {self.name!r} has no image {image} and cannot pull it ({exc.message}); build "
                "it there (images/llama.cpp) or set images.registry_prefix to a registry it can reach"
            ) from exc

    def run_once(self, spec: ContainerSpec, *, timeout_s: float = 60.0) -> tuple[int, bytes]:
        """Run a short command to completion; (exit code, its stdout and stderr as bytes).
        The container is removed afterwards."""
        state = self.create(dataclasses.replace(spec, restart="no"))
        try:
            with self._call(f"run {spec.name}"):
                c = self._client.containers.get(state.id)
                c.start()
                try:
                    code = int(c.wait(timeout=timeout_s).get("StatusCode", -1))
                except requests.exceptions.ReadTimeout:
                    code = -1
                return code, c.logs()
        finally:
            with contextlib.suppress(OrchestratorError):
                self.remove(state.id)

    def close(self) -> None:
        self._client.close()


def connect(entry: HostConfig, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> DockerHost:
    """A client for ``entry``'s daemon; HostUnreachable (naming the host) when it does not answer."""
    tls: docker.tls.TLSConfig | bool = False
    if entry.tls is not None:
        tls = docker.tls.TLSConfig(client_cert=(entry.tls.cert, entry.tls.key), ca_cert=entry.tls.ca,
                                   verify=True)
    base_url = entry.docker
    try:
        client = docker.DockerClient(base_url=base_url, tls=tls, timeout=int(timeout_s),
                                     use_ssh_client=base_url.startswith("ssh://"))
    except (docker.errors.DockerException, requests.exceptions.RequestException, OSError) as exc:
        raise HostUnreachable(entry.name, entry.docker, _reason(exc)) from exc
    return DockerHost(entry.name, entry.docker, client)


def _state(c: Any) -> ContainerState:
    attrs = c.attrs
    state = attrs.get("State") or {}
    config = attrs.get("Config") or {}
    ports: dict[str, tuple[tuple[str, int], ...]] = {}
    live = (attrs.get("NetworkSettings") or {}).get("Ports") or {}
    wanted = (attrs.get("HostConfig") or {}).get("PortBindings") or {}
    for port in set(live) | set(wanted):
        bindings = live.get(port) or wanted.get(port) or []
        ports[port] = tuple((b.get("HostIp") or "0.0.0.0", int(b["HostPort"]))
                            for b in bindings if b.get("HostPort"))
    return ContainerState(
        id=c.id,
        name=(attrs.get("Name") or c.name or "").lstrip("/"),
        image=config.get("Image", ""),
        status=state.get("Status", "unknown"),
        exit_code=int(state.get("ExitCode") or 0),
        labels=dict(config.get("Labels") or {}),
        ports=ports,
        restart_count=int(attrs.get("RestartCount") or 0),
        error=state.get("Error") or "",
    )


def _is_connection(exc: docker.errors.APIError) -> bool:
    text = str(exc).lower()
    return "connection" in text and "refused" in text


def _reason(exc: BaseException) -> str:
    """A one-line cause, without the urllib3 object reprs."""
    seen: set[int] = set()
    while exc.__cause__ is not None or exc.__context__ is not None:
        if id(exc) in seen:
            break
        seen.add(id(exc))
        nxt = exc.__cause__ or exc.__context__
        assert nxt is not None
        exc = nxt
    text = str(exc) or type(exc).__name__
    for marker in ("Connection refused", "No such file or directory", "timed out",
                   "Name or service not known", "certificate verify failed", "Permission denied"):
        if marker.lower() in text.lower():
            return marker.lower()
    return text.splitlines()[0][:200]


def gpu_flags(vendor: str | None, indices: Sequence[int]) -> dict[str, Any]:
    """ContainerSpec fields that give a container these devices of one vendor.

    nvidia: a device request (driver nvidia, the GPU indices); amd: /dev/kfd and
    /dev/dri with the video and render groups, and HIP_VISIBLE_DEVICES; cpu: none.
    """
    if vendor == "nvidia":
        return {"gpu_requests": (("nvidia", tuple(str(i) for i in indices)),)}
    if vendor == "amd":
        return {
            "devices": ("/dev/kfd", "/dev/dri"),
            "group_add": ("video", "render"),
            "environment": {"HIP_VISIBLE_DEVICES": ",".join(str(i) for i in indices)},
        }
    return {}
