"""The orchestrator's exceptions.

    TightwadError                   (tightwad.errors; the CLI prints any of these as one line)
    └── OrchestratorError
        ├── HostUnreachable         a host's Docker daemon did not answer (names host and endpoint)
        ├── ImageMissing            a role's image is not on a host and cannot be pulled
        ├── UnknownModel            the model is not under models: (lists the known ones)
        ├── DoesNotFit              the model needs more memory than the pool has free (by how much)
        ├── WorkerDown              a worker's container is not running, or its RPC port is closed
        ├── StartFailed             a container exited or stayed unhealthy (carries its log tail)
        ├── SwapFailed              a swap failed and the old model was put back
        ├── InvalidTransition       a lifecycle change that the transitions table forbids
        ├── Busy                    another start, stop or swap is running
        └── GgufError               the model file is not a GGUF this reader understands

Docker SDK and socket errors are mapped to these at the host boundary
(``tightwad.orchestrator.hosts``) with ``raise ... from exc``. ``status_code``
is what the orchestrator's HTTP API answers with.
"""

from __future__ import annotations

from tightwad.errors import TightwadError


class OrchestratorError(TightwadError):
    status_code = 500
    error_type = "orchestrator_error"


class HostUnreachable(OrchestratorError):
    status_code = 503

    def __init__(self, host: str, endpoint: str, reason: str):
        super().__init__(f"host {host!r}: the Docker daemon at {endpoint} is unreachable: {reason}",
                         code="host_unreachable")
        self.host = host
        self.endpoint = endpoint


class ImageMissing(OrchestratorError):
    status_code = 409


class UnknownModel(OrchestratorError):
    status_code = 404

    def __init__(self, name: str | None, known: list[str]):
        listed = ", ".join(known) or "none configured"
        what = f"no model named {name!r}" if name is not None else \
            "no model given and none is the default (give one, e.g. -m NAME)"
        super().__init__(f"{what}; known models: {listed}", param="model", code="model_not_found")
        self.name = name
        self.known = known


class DoesNotFit(OrchestratorError):
    status_code = 409

    def __init__(self, message: str, *, short_bytes: int = 0):
        super().__init__(message, code="does_not_fit")
        self.short_bytes = short_bytes


class WorkerDown(OrchestratorError):
    status_code = 409

    def __init__(self, message: str, *, workers: list[str]):
        super().__init__(message, code="worker_down")
        self.workers = workers


class StartFailed(OrchestratorError):
    status_code = 502


class SwapFailed(OrchestratorError):
    status_code = 502


class InvalidTransition(OrchestratorError):
    status_code = 409


class Busy(OrchestratorError):
    status_code = 409


class GgufError(OrchestratorError):
    status_code = 422
