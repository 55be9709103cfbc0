"""``Annotated`` dependencies of the routes: the runtime's parts, the caller's owner id, the Idempotency-Key.

They are ``async def``: none waits for anything, and FastAPI runs a plain ``def`` dependency on its thread
pool, a hand-off to another thread and back for each of them on every request.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header, Request

from gateway.api.guard import OWNER, UNAUTHORIZED
from gateway.api.runtime import Runtime
from gateway.core.auth import bearer_key
from gateway.core.errors import ApiError
from gateway.core.settings import GatewaySettings
from gateway.jobs.service import JobService

MAX_IDEMPOTENCY_KEY = 200


async def get_runtime(request: Request) -> Runtime:
    return request.app.state.runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


async def get_settings(runtime: RuntimeDep) -> GatewaySettings:
    return runtime.settings


async def get_jobs(runtime: RuntimeDep) -> JobService:
    return runtime.jobs


SettingsDep = Annotated[GatewaySettings, Depends(get_settings)]
JobServiceDep = Annotated[JobService, Depends(get_jobs)]


async def get_owner(request: Request, runtime: RuntimeDep) -> str:
    """The owner id the guard found for the request's Bearer key (checked again should a route be reached
    without the guard); 401 without an accepted key."""
    found = getattr(request.state, OWNER, None)
    if found is None:
        found = runtime.keys.owner(bearer_key(request.headers.get("authorization")))
    if found is None:
        raise ApiError(401, UNAUTHORIZED, {"WWW-Authenticate": "Bearer"})
    return found


async def get_idempotency_key(idempotency_key: Annotated[str | None, Header()] = None) -> str | None:
    if idempotency_key is not None and not (0 < len(idempotency_key) <= MAX_IDEMPOTENCY_KEY):
        raise ApiError(422, f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} characters")
    return idempotency_key


ApiKeyOwner = Annotated[str, Depends(get_owner)]
IdempotencyKey = Annotated[str | None, Depends(get_idempotency_key)]
