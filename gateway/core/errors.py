"""The gateway's one error shape, ``{"status": "Failed", "reason": …}``, for routes and for ASGI middleware.

Routes raise :class:`ApiError` (a job error's status comes from its kind, :meth:`ApiError.of`); middleware that answers before the app runs (authentication, rate
limits, the body cap) sends the same JSON with :func:`send_error`. A response sent before the request
body was read closes the connection, so the client stops sending and the server reads no more of it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.types import Send

from lipsync.contract import FAILURES
from lipsync.errors import LipSyncError


class ApiError(Exception):
    """A request the gateway refuses: the status code, a reason safe to show, and extra headers."""

    def __init__(self, status_code: int, reason: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(reason)
        self.status_code = status_code
        self.reason = reason
        self.headers = dict(headers or {})

    @classmethod
    def of(cls, error: LipSyncError) -> ApiError:
        """``error`` with the HTTP status of its kind (:data:`lipsync.contract.FAILURES`)."""
        return cls(FAILURES[error.kind].http_status, str(error))


def database_unavailable(retry_s: int) -> ApiError:
    """503 for a request that needs the job database while it is out of reach; nothing was changed."""
    return ApiError(
        503,
        f"the job database is unavailable for now; nothing was changed, retry in {retry_s} s",
        {"Retry-After": str(retry_s)},
    )


class ErrorBody(BaseModel):
    """Every error answer (4xx and 5xx), as ``/openapi.json`` describes it."""

    status: Literal["Failed"]
    reason: str


def error_body(reason: str) -> dict[str, str]:
    return ErrorBody(status="Failed", reason=reason).model_dump()


def error_response(status_code: int, reason: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(reason), status_code=status_code, headers=dict(headers or {}))


async def send_error(send: Send, error: ApiError, *, close: bool = True) -> None:
    """Send ``error`` as a whole response from ASGI middleware; ``close``: end the connection after it
    (for answers given before the request body was read)."""
    body = json.dumps(error_body(error.reason)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in error.headers.items()]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": error.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": body})
