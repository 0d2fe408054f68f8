"""Tightwad's exceptions.

    TightwadError
    ├── ConfigError            a configuration key is missing or wrong
    ├── ModelFetchError        a model fixture could not be fetched or failed its hash
    ├── InvalidRequest         a client sent something we refuse (400/413/422)
    │   └── ModelNotFound      the request names a model we do not serve (404)
    └── BackendError           a draft or target server failed us (502)
        ├── BackendTimeout     it did not answer in time (504)
        ├── BackendUnavailable it is down, loading or swapping (503)
        └── BackendProtocolError it answered with something we cannot use (502)

Backends map httpx errors to BackendError subclasses at their boundary with
``raise ... from exc``; the apps turn every TightwadError into one OpenAI-style
JSON error body in a single handler.
"""

from __future__ import annotations


class TightwadError(Exception):
    status_code = 500
    error_type = "server_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code

    def to_dict(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }


class ConfigError(TightwadError):
    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}", param=key)
        self.key = key


class ModelFetchError(TightwadError):
    pass


class InvalidRequest(TightwadError):
    status_code = 400
    error_type = "invalid_request_error"

    def __init__(
        self, message: str, *, param: str | None = None, code: str | None = None, status_code: int = 400
    ):
        super().__init__(message, param=param, code=code)
        self.status_code = status_code


class ModelNotFound(InvalidRequest):
    def __init__(self, message: str, *, param: str = "model"):
        super().__init__(message, param=param, code="model_not_found", status_code=404)


class BackendError(TightwadError):
    status_code = 502
    error_type = "backend_error"


class BackendTimeout(BackendError):
    status_code = 504


class BackendUnavailable(BackendError):
    status_code = 503


class BackendProtocolError(BackendError):
    status_code = 502
