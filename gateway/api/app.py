"""The gateway's FastAPI app: the runtime (:mod:`gateway.api.runtime`) around a job backend, the guard and
body cap in front, the error handlers, and the routes of :mod:`gateway.api`.

Every error is ``{"status": "Failed", "reason": …}`` with a 4xx/5xx code (:mod:`gateway.api.handlers`).
Requests that may carry a body are authenticated and rate-limited from their headers before the body
is read (:mod:`gateway.api.guard`); bodies are validated strictly (:mod:`gateway.jobs.schemas`, :mod:`gateway.jobs.forms`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.api.body_limit import BodyLimit
from gateway.api.guard import BATCH_PATHS, RequestGuard
from gateway.api.handlers import add_error_handlers
from gateway.api.main import api_router
from gateway.api.runtime import Runtime
from gateway.backends.base import JobBackend, TritonBackend
from gateway.backends.triton_pool import TritonPool
from gateway.core.auth import ApiKeys
from gateway.core.metrics import Metrics
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
    app = FastAPI(
        title="lipsync-serve gateway",
        summary="Lip-sync jobs over REST (docs/gateway-api.md)",
        lifespan=lifespan,
        docs_url="/docs",
        redoc_url=None,
        openapi_url="/openapi.json",
        redirect_slashes=False,
    )
    app.state.runtime = runtime
    batch_cap = (settings.max_batch_body_bytes, "max_batch_body_mb")
    app.add_middleware(
        BodyLimit, limit=settings.max_body_bytes, setting="max_body_mb", paths=dict.fromkeys(BATCH_PATHS, batch_cap)
    )
    app.add_middleware(  # outside the body cap: it reads no body
        RequestGuard,
        keys=keys,
        quotas=runtime.quotas,
        store_retry_s=settings.store_retry_s,
    )
    add_error_handlers(app)

    app.add_middleware(ResponseCounter, metrics=runtime.metrics)
    app.include_router(api_router)
    return app


class ResponseCounter:
    """Counts every response by route and status code, those of the guard and the body cap included.

    Plain ASGI, not ``@app.middleware``: Starlette's ``BaseHTTPMiddleware`` would run every request in a
    task of its own and stream its response through a memory channel."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = ""

        async def noting_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = str(message["status"])
            await send(message)

        await self.app(scope, receive, noting_send)
        if status:  # the route is known once the router ran
            self.metrics.requests.labels(getattr(scope.get("route"), "path", "unmatched"), status).inc()


def triton_backend(settings: GatewaySettings) -> JobBackend:
    """One endpoint (possibly a Service that balances by itself): :class:`TritonBackend`; several: :class:`TritonPool`."""
    endpoints = settings.triton_endpoints
    if len(endpoints) == 1:
        return TritonBackend(endpoints[0], poll_s=settings.cancel_poll_s, timeout_s=settings.job_timeout_s)
    return TritonPool(
        endpoints,
        poll_s=settings.cancel_poll_s,
        timeout_s=settings.job_timeout_s,
        health_ttl_s=settings.triton_health_ttl_s,
    )
