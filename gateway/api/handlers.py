"""Every error as ``{"status": "Failed", "reason": …}``: refusals, validation errors (field and message,
never the input), Starlette's 404/405, a 503 with ``Retry-After`` while the job database is out of reach,
and a bare 500 for anything unexpected (logged)."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from gateway.core.errors import ApiError, database_unavailable, error_response
from gateway.store import StoreUnavailable

log = logging.getLogger(__name__)


async def api_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)  # registered for ApiError only
    return error_response(exc.status_code, exc.reason, exc.headers)


async def invalid_request(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, (RequestValidationError, ValidationError))  # registered for these only
    problems = []
    for error in exc.errors():  # field and message only: never echo the (possibly huge) input
        where = ".".join(str(part) for part in error["loc"] if part not in ("body", "query", "header"))
        problems.append(f"{where}: {error['msg']}" if where else error["msg"])
    return error_response(422, "; ".join(problems) or "invalid request")


async def http_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)  # registered for it only
    return error_response(exc.status_code, str(exc.detail), exc.headers)


async def store_unavailable(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StoreUnavailable)  # registered for it only
    log.warning("%s %s: the job database is unavailable: %s", request.method, request.url.path, exc)
    error = database_unavailable(request.app.state.runtime.settings.store_retry_s)
    return error_response(error.status_code, error.reason, error.headers)


async def internal_error(_: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled error", exc_info=exc)
    return error_response(500, "internal error")


def add_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(ValidationError, invalid_request)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(StoreUnavailable, store_unavailable)
    app.add_exception_handler(Exception, internal_error)
