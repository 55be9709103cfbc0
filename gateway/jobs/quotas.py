"""Per-key request rates and the per-key job quota, answered with 429 and ``Retry-After``.

Rates use the ``limits`` package (moving windows in memory, one counter per key and limit): every
request that needs a key counts against ``rate_limit``, submits also against ``submit_rate_limit``.
At most ``max_concurrent_submits`` submits of a key may be in flight (body being received or
checked) at once, so the memory one key can make the gateway hold is bounded by that many bodies.
The quota is ``max_active_jobs`` queued and running jobs per key: checked from the headers before a
submit's body is read (a replay of an ``Idempotency-Key`` this key already used is let through, it
creates nothing), and again in the transaction that queues the job, so concurrent submits cannot
overshoot it.
"""

from __future__ import annotations

import math
import time

from limits import RateLimitItem, parse
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter

from gateway.core.errors import ApiError
from gateway.core.settings import GatewaySettings
from gateway.store import JobStore


class Quotas:
    def __init__(self, settings: GatewaySettings, store: JobStore) -> None:
        self._store = store
        self._limiter = MovingWindowRateLimiter(MemoryStorage())
        self._requests = parse(settings.rate_limit)
        self._submits = parse(settings.submit_rate_limit)
        self.max_active_jobs = settings.max_active_jobs
        self.max_concurrent_submits = settings.max_concurrent_submits
        self._quota_retry_after_s = settings.quota_retry_after_s

    def count_request(self, owner: str, submit: bool) -> None:
        """Count one request of ``owner``; raise a 429 :class:`ApiError` when a rate is used up."""
        self._hit(self._requests, owner, "rate_limit", "requests")
        if submit:
            self._hit(self._submits, owner, "submit_rate_limit", "submits")

    def count_submits(self, owner: str, submits: int) -> None:
        """Count a batch's items as ``submits`` submits of ``owner`` at once (429 when the rate has not that many left)."""
        self._hit(self._submits, owner, "submit_rate_limit", "submits", submits)

    def check_active_jobs(self, owner: str, idempotency_key: str | None, batch: bool = False) -> None:
        """Raise a 429 :class:`ApiError` when ``owner`` may queue no more jobs now (reads the job table).
        ``batch``: the request is a batch, whose ``idempotency_key`` names a batch."""
        find = self._store.find_idempotent_batch if batch else self._store.find_idempotent
        if idempotency_key is not None and find(owner, idempotency_key) is not None:
            return
        if self._store.active_jobs(owner) >= self.max_active_jobs:
            raise self.too_many_jobs()

    def too_many_in_flight(self) -> ApiError:
        return ApiError(
            429,
            f"this API key already has {self.max_concurrent_submits} submits in progress "
            "(max_concurrent_submits); wait for one to be answered",
            {"Retry-After": "1"},
        )

    def too_many_jobs(self) -> ApiError:
        return ApiError(
            429,
            f"this API key already has {self.max_active_jobs} queued or running jobs (max_active_jobs); "
            "wait for one to end or cancel one",
            {"Retry-After": str(self._quota_retry_after_s)},
        )

    def _hit(self, item: RateLimitItem, owner: str, setting: str, what: str, cost: int = 1) -> None:
        if self._limiter.hit(item, setting, owner, cost=cost):
            return
        reset_at, _ = self._limiter.get_window_stats(item, setting, owner)
        retry_after = max(1, math.ceil(reset_at - time.time()))
        raise ApiError(
            429,
            f"too many {what}: at most {item} per API key ({setting}); retry in {retry_after} s",
            {"Retry-After": str(retry_after)},
        )
