"""Several Triton endpoints behind one :class:`~gateway.backends.base.JobBackend`: :class:`TritonPool`.

Each job goes to the ready endpoint with the fewest jobs this gateway has running on it; ties go
round-robin (:func:`least_loaded`). Readiness is asked of each endpoint at most once per ``health_ttl_s``
(:class:`HealthCache`), so a burst of jobs does not turn into a burst of health checks, and an endpoint
whose job failed as unavailable counts as not ready until its next check. Other gateways' jobs are not
seen: each gateway balances its own share, and Triton queues the rest.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence

from gateway.backends.base import TritonBackend
from gateway.backends.triton_client import (
    JobRequest,
    JobResult,
    ProgressListener,
    TritonJobError,
)
from lipsync.errors import ErrorKind


def least_loaded(candidates: Sequence[str], running: Mapping[str, int], start: int) -> str:
    """The candidate with the fewest ``running`` jobs; among equals, the first from position ``start`` on
    (wrapping), so that a ``start`` advanced on every pick spreads ties round-robin."""
    if not candidates:
        raise ValueError("no candidates")
    count = len(candidates)
    rotated = [candidates[(start + offset) % count] for offset in range(count)]
    return min(rotated, key=lambda url: running.get(url, 0))  # min keeps the first of equals


class HealthCache:
    """``probe(url)`` answers, each kept for ``ttl_s``."""

    def __init__(self, probe: Callable[[str], bool], ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.probe, self.ttl_s, self.clock = probe, ttl_s, clock
        self._answers: dict[str, tuple[bool, float]] = {}
        self._lock = threading.Lock()

    def ready(self, url: str) -> bool:
        with self._lock:
            answer = self._answers.get(url)
        if answer is not None and self.clock() - answer[1] < self.ttl_s:
            return answer[0]
        ready = self.probe(url)
        self.mark(url, ready)
        return ready

    def mark(self, url: str, ready: bool) -> None:
        """Record an answer learnt otherwise (a job that found the endpoint unavailable)."""
        with self._lock:
            self._answers[url] = (ready, self.clock())


class TritonPool:
    """Triton's ``lipsync`` model at several gRPC endpoints (``host:port``), jobs spread by load."""

    def __init__(
        self, urls: Sequence[str], poll_s: float = 0.5, timeout_s: float = 3600.0, health_ttl_s: float = 2.0
    ) -> None:
        if not urls:
            raise ValueError("a Triton pool needs at least one endpoint")
        self.urls = tuple(dict.fromkeys(urls))
        self.backends = {url: TritonBackend(url, poll_s=poll_s, timeout_s=timeout_s) for url in self.urls}
        self.health = HealthCache(lambda url: self.backends[url].ready(), health_ttl_s)
        self.running = dict.fromkeys(self.urls, 0)
        self._next = 0
        self._lock = threading.Lock()

    def ready_urls(self) -> list[str]:
        return [url for url in self.urls if self.health.ready(url)]

    def run(self, job: JobRequest, on_progress: ProgressListener, should_cancel: Callable[[], bool]) -> JobResult:
        url = self._acquire()
        try:
            return self.backends[url].run(job, on_progress, should_cancel)
        except TritonJobError as exc:
            if exc.kind is ErrorKind.UNAVAILABLE:
                self.health.mark(url, False)
            raise
        finally:
            with self._lock:
                self.running[url] -= 1

    def _acquire(self) -> str:
        """Pick the endpoint for a job and count the job on it; unavailable when none is ready."""
        candidates = self.ready_urls()  # outside the lock: a check may wait on the network
        if not candidates:
            raise TritonJobError(f"no Triton endpoint is ready ({', '.join(self.urls)})", ErrorKind.UNAVAILABLE)
        with self._lock:
            url = least_loaded(candidates, self.running, self._next)
            self._next += 1
            self.running[url] += 1
        return url

    def ready(self) -> bool:
        """At least one endpoint takes jobs."""
        return any(self.health.ready(url) for url in self.urls)

    def weights(self) -> str:
        """The weights of the first ready endpoint (all endpoints are meant to serve the same set)."""
        candidates = self.ready_urls()
        if not candidates:
            raise TritonJobError("no Triton endpoint is ready", ErrorKind.UNAVAILABLE)
        return self.backends[candidates[0]].weights()
