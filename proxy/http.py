"""HTTP plumbing shared by the proxy and the verifier: one place turns errors into bodies."""

from __future__ import annotations

import logging

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse

from tightwad.errors import BackendUnavailable, TightwadError

log = logging.getLogger("tightwad.http")


def error_body(message: str, *, type_: str, param: str | None = None, code: str | int | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


async def tightwad_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, TightwadError)
    headers = {"Retry-After": "2"} if isinstance(exc, BackendUnavailable) else None
    return JSONResponse(exc.to_dict(), status_code=exc.status_code, headers=headers)


async def http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return JSONResponse(
        error_body(str(exc.detail), type_=type_, code=exc.status_code),
        status_code=exc.status_code,
        headers=exc.headers,
    )


async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return JSONResponse(
        error_body(f"internal error: {type(exc).__name__}", type_="server_error", code=500),
        status_code=500,
    )


EXCEPTION_HANDLERS = {
    TightwadError: tightwad_error,
    HTTPException: http_error,
    Exception: unexpected_error,
}
