"""The gateway's FastAPI app: the runtime (:mod:`gateway.api.runtime`) around a job backend, the guard and
body cap in front, the error handlers, and the routes of :mod:`gateway.api`.

Every error is ``{"status": "Failed", "reason": …}`` with a 4xx/5xx code (:mod:`gateway.api.handlers`).
Requests that may carry a body are authenticated and rate-limited from their headers before the body
is read (:mod:`gateway.api.guard`); bodies are validated strictly (:mod:`gateway.jobs.schemas`, :mod:`gateway.jobs.forms`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response

from gateway.api.body_limit import BodyLimit
from gateway.api.guard import BATCH_PATHS, RequestGuard
from gateway.api.handlers import add_error_handlers
from gateway.api.main import api_router
from gateway.api.runtime import Runtime
from gateway.backends.base import JobBackend, TritonBackend
from gateway.backends.triton_pool import TritonPool
from gateway.core.auth import ApiKeys
from gateway.core.settings import GatewaySettings


def create_app(settings: GatewaySettings, keys: ApiKeys, backend: JobBackend | None = None) -> FastAPI:
    """The app; its jobs run on ``backend``, by default the Triton endpoints of the settings."""
    runtime = Runtime(settings, keys, backend if backend is not None else triton_backend(settings))

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        runtime.start()
        yield
        runtime.stop()

    # No redirect to the slash-less path: Starlette builds its Location from the Host header, and every
    # URL the gateway gives out comes from ``public_url``; such a path is a 404 like any unknown one.
    app = FastAPI(title="lipsync-serve gateway", lifespan=lifespan, docs_url=None, redoc_url=None,
                  redirect_slashes=False)
    app.state.runtime = runtime
    batch_cap = (settings.max_batch_body_bytes, "max_batch_body_mb")
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes, setting="max_body_mb",
                       paths=dict.fromkeys(BATCH_PATHS, batch_cap))
    app.add_middleware(RequestGuard, keys=keys, quotas=runtime.quotas)  # outside the body cap: it reads no body
    add_error_handlers(app)

    @app.middleware("http")
    async def count_responses(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        response = await call_next(request)
        route = request.scope.get("route")
        runtime.metrics.requests.labels(getattr(route, "path", "unmatched"), str(response.status_code)).inc()
        return response

    app.include_router(api_router)
    return app


def triton_backend(settings: GatewaySettings) -> JobBackend:
    """One endpoint (possibly a Service that balances by itself): :class:`TritonBackend`; several: :class:`TritonPool`."""
    endpoints = settings.triton_endpoints
    if len(endpoints) == 1:
        return TritonBackend(endpoints[0], poll_s=settings.cancel_poll_s, timeout_s=settings.job_timeout_s)
    return TritonPool(endpoints, poll_s=settings.cancel_poll_s, timeout_s=settings.job_timeout_s,
                      health_ttl_s=settings.triton_health_ttl_s)
