"""Telling a client's ``webhook_url`` that its job finished: a JSON POST, retried with back-off.

Deliveries run on their own small thread pool so a slow receiver never holds a worker slot. The
outcome (``delivered`` or ``failed: …``) is recorded in the job's ``webhook_state``.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx2

from gateway.store import JobStore

log = logging.getLogger(__name__)


class Webhooks:
    def __init__(self, store: JobStore, attempts: int, backoff_s: float, timeout_s: float) -> None:
        self.store = store
        self.attempts = attempts
        self.backoff_s = backoff_s
        self.timeout_s = timeout_s
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="webhook")

    def send(self, job_id: str, url: str, payload: dict[str, Any]) -> None:
        self._pool.submit(self._deliver, job_id, url, payload)

    def _deliver(self, job_id: str, url: str, payload: dict[str, Any]) -> None:
        wait = self.backoff_s
        problem = ""
        for attempt in range(1, self.attempts + 1):
            try:
                response = httpx2.post(url, json=payload, timeout=self.timeout_s)
                if response.status_code < 300:
                    self.store.set_webhook_state(job_id, "delivered")
                    return
                problem = f"HTTP {response.status_code}"
            except httpx2.HTTPError as exc:
                problem = type(exc).__name__
            log.warning("webhook for job %s, attempt %d/%d: %s", job_id, attempt, self.attempts, problem)
            if attempt < self.attempts:
                time.sleep(wait)
                wait *= 2
        self.store.set_webhook_state(job_id, f"failed: {problem}")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
