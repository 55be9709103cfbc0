"""All routes of the gateway in one router, with the error answers each group may give (for OpenAPI)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from gateway.api.routes import batches, health, info, jobs, metrics, page
from gateway.core.errors import ErrorBody


def _errors(**codes: str) -> dict[int | str, dict[str, Any]]:
    return {int(code[1:]): {"model": ErrorBody, "description": text} for code, text in codes.items()}


INTERNAL = _errors(e500="a fault in the gateway (logged)")
JOB_ERRORS = (
    _errors(
        e400="a request_id not of our shape; a webhook_url the gateway will not call",
        e401="no or unknown API key on a request that may carry a body",
        e404="a job the caller may not see (unknown, another key's; for a download: no or wrong token or key)",
        e409="cancelling a job that already ended; an Idempotency-Key reused with a different request",
        e413="the body is over the cap",
        e422="invalid fields, types or query parameters, inputs that are not media or are over a media limit",
        e429="over a rate limit or the job quota; Retry-After says when to retry",
        e503="the job database is unavailable for now; Retry-After says when to retry",
        e507="a submit while the data folder is short of space",
    )
    | INTERNAL
)

api_router = APIRouter()
for routes in (jobs, batches):
    api_router.include_router(routes.router, responses=JOB_ERRORS)
for routes in (info, health, metrics, page):
    api_router.include_router(routes.router, responses=INTERNAL)
