"""Authentication and rate limits from the request headers alone, before any of the body is read.

FastAPI reads and parses a request body before it runs a route's dependencies, so a key checked in a
dependency is checked only after the whole body arrived: a client without a key could make the gateway
take in (and buffer) up to the body cap. This ASGI middleware sits in front of the body cap and the
app: a request whose method may carry a body (anything but GET, HEAD, OPTIONS) needs an accepted
Bearer key, is counted against its key's rates and, for a submit, its submits in flight and its job
quota, and is refused with the JSON error (401 or 429) without a single ``receive()``; the refusal
closes the connection, so the server stops reading. Meanwhile the server itself holds at most its flow-control window (64 KiB in
uvicorn) of an unread body. An accepted request goes on with its owner id in ``scope["state"]``.

GET routes take no body; the GET routes that need a credential check it themselves: the result
download its token or key, the job list its key (and counts it against the key's rate).
"""

from __future__ import annotations

from collections import Counter

from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.core.auth import ApiKeys, bearer_key
from gateway.core.errors import ApiError, database_unavailable, send_error
from gateway.jobs.quotas import Quotas
from gateway.store import StoreUnavailable

BODILESS_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
SUBMIT_PATHS = frozenset({"/lipsync/submit", "/lipsync/upload"})
"""Routes that queue a job: they count against ``submit_rate_limit`` and ``max_active_jobs`` too."""
BATCH_PATHS = frozenset({"/v1/batches", "/v1/batches/upload"})
"""Routes that queue several jobs: checked here like a submit (submits in flight, ``max_active_jobs``);
once the body is read, each item counts as one submit against the rate (:meth:`Quotas.count_submits`)."""
OWNER = "owner"
"""Key in ``scope["state"]`` (``request.state.owner``) of the authenticated owner id."""

UNAUTHORIZED = "missing or invalid API key (Authorization: Bearer <key>)"


class RequestGuard:
    def __init__(self, app: ASGIApp, keys: ApiKeys, quotas: Quotas, store_retry_s: int) -> None:
        self.app = app
        self.keys = keys
        self.quotas = quotas
        self.store_retry_s = store_retry_s
        self._in_flight: Counter[str] = Counter()
        """Submits per owner between the guard and their answer (one event loop: no lock needed)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in BODILESS_METHODS:
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        owner = self.keys.owner(bearer_key(headers.get("authorization")))
        try:
            if owner is None:
                raise ApiError(401, UNAUTHORIZED, {"WWW-Authenticate": "Bearer"})
            single = scope["path"] in SUBMIT_PATHS
            submit = single or scope["path"] in BATCH_PATHS
            if submit and self._in_flight[owner] >= self.quotas.max_concurrent_submits:
                raise self.quotas.too_many_in_flight()
            self.quotas.count_request(owner, single)
            if submit:
                await run_in_threadpool(
                    self.quotas.check_active_jobs, owner, headers.get("idempotency-key"), not single
                )
        except ApiError as refused:
            await send_error(send, refused)
            return
        except StoreUnavailable:
            await send_error(send, database_unavailable(self.store_retry_s))
            return
        scope.setdefault("state", {})[OWNER] = owner
        if not submit:
            await self.app(scope, receive, send)
            return
        self._in_flight[owner] += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self._in_flight[owner] -= 1
            if not self._in_flight[owner]:
                del self._in_flight[owner]
