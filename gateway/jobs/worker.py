"""Feeds queued jobs to the backend (Triton): ``concurrency`` threads, each running one job at a time.

A thread claims the oldest queued job (committed as ``InProgress``), runs it on the
:class:`~gateway.backends.base.JobBackend` (the job id as the Triton request id), writes progress into the table as it arrives, and has the
backend check the table between responses: a job that left ``InProgress`` (cancelled through the API)
has its Triton stream cancelled. When Triton is unavailable the job waits for it to come back and is
re-queued if it has an attempt left. Every ending is committed before the finish callback (webhook) runs.

A lease thread renews the leases of this gateway's running jobs every third of ``lease_s`` and re-queues
jobs of any gateway whose lease ran out (that gateway died), or fails them when out of attempts.

While the job database is out of reach (:class:`~gateway.store.StoreUnavailable`) the threads wait it out:
no job is claimed, a running job goes on (its progress is not recorded, a cancel is noticed once the
database is back) and its ending is committed as soon as the database answers again. A worker stopping
during the outage leaves its jobs ``InProgress``; their lease runs out and they are re-queued.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from gateway.backends.base import JobBackend
from gateway.backends.triton_client import JobRequest, TritonJobError
from gateway.core.metrics import Metrics
from gateway.core.settings import GatewaySettings
from gateway.jobs.storage import DataDir, DataDirFull
from gateway.store import CANCELLED, IN_QUEUE, SUCCEED, Job, JobStore, StoreUnavailable
from lipsync.contract import OPTIONS
from lipsync.errors import ErrorKind

log = logging.getLogger(__name__)

WAITING_FOR_TRITON = "waiting for Triton"
"""The stage a job shows while its worker waits for Triton to come back."""
INPUTS_GONE = "the job's input files are gone from the data folder (deleted while it was queued); submit it again"


def human_duration(seconds: float) -> str:
    """``"0.4 s"``, ``"12 s"``, ``"6 min 48 s"``, ``"2 h 05 min"``: a duration as a person reads it."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    whole = round(seconds)
    if whole < 60:
        return f"{whole} s"
    if whole < 3600:
        return f"{whole // 60} min {whole % 60} s"
    return f"{whole // 3600} h {whole % 3600 // 60:02d} min"


class Worker:
    def __init__(
        self,
        settings: GatewaySettings,
        store: JobStore,
        data: DataDir,
        metrics: Metrics,
        backend: JobBackend,
        on_finished: Callable[[str], None],
    ) -> None:
        self.settings = settings
        self.backend = backend
        self.store = store
        self.data = data
        self.metrics = metrics
        self.on_finished = on_finished
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        for index in range(self.settings.concurrency):
            thread = threading.Thread(target=self._loop, name=f"job-worker-{index}", daemon=True)
            thread.start()
            self._threads.append(thread)
        for target, name in ((self._clean, "retention"), (self._keep_leases, "leases")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def wake(self) -> None:
        """A job was queued: let an idle thread look now rather than at its next poll."""
        self._wake.set()

    def stop(self, timeout_s: float = 30) -> None:
        """Cancel running Triton streams and put their jobs back in the queue (the next start resumes them)."""
        self._stop.set()
        self._wake.set()
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                job = self.store.claim_next()
            except StoreUnavailable as exc:
                log.warning("no job claimed: the job database is unavailable (%s)", exc)
                self._stop.wait(self.settings.store_retry_s)
                continue
            if job is None:
                self._wake.wait(timeout=1.0)
                self._wake.clear()
                continue
            log.info("job %s started", job.id)
            started = time.monotonic()
            try:
                try:
                    self._run(job)
                except StoreUnavailable:
                    raise
                except Exception:
                    log.exception("job %s failed in the gateway", job.id)
                    self._finish(job, self._committed(self.store.fail, job.id, "internal error in the gateway"))
            except StoreUnavailable as exc:  # stopping (_committed), or after the ending was committed
                log.warning("job %s: the job database is unavailable (%s)", job.id, exc)
                continue
            self._say_ended(job.id, time.monotonic() - started)

    def _committed(self, write: Callable[..., bool], *args: Any, **kwargs: Any) -> bool:
        """``write(*args, **kwargs)``, one of the store's changes of a running job, tried until the database
        answers; raises :class:`StoreUnavailable` if the worker stops first."""
        while True:
            try:
                return write(*args, **kwargs)
            except StoreUnavailable as exc:
                log.warning(
                    "the job database is unavailable (%s); trying again in %d s", exc, self.settings.store_retry_s
                )
                if self._stop.wait(self.settings.store_retry_s):
                    raise

    def _progress(self, job_id: str, fraction: float, stage: str, eta_s: float | None = None) -> None:
        """Record a running job's progress, if the database answers (the next report does otherwise)."""
        with contextlib.suppress(StoreUnavailable):
            self.store.set_progress(job_id, fraction, stage, eta_s)

    def _cancelled(self, job_id: str) -> bool:
        """Whether the job left ``InProgress`` under this store (cancelled, taken over); a database out of reach
        answers no: the job goes on, and is stopped once the database says so."""
        try:
            return not self.store.is_running(job_id)
        except StoreUnavailable:
            return False

    def _say_ended(self, job_id: str, seconds: float) -> None:
        """One log line with how the job's run ended: what ``lipsync-serve up`` shows per job."""
        try:
            job = self.store.get(job_id)
        except StoreUnavailable:
            return
        if job is None:
            return
        took = human_duration(seconds)
        if job.status == SUCCEED:
            log.info("job %s succeeded in %s", job_id, took)
        elif job.status == CANCELLED:
            log.info("job %s cancelled after %s", job_id, took)
        elif job.status == IN_QUEUE:
            log.info("job %s stopped after %s and %s", job_id, took, job.reason)
        else:
            log.info("job %s failed after %s: %s", job_id, took, job.reason)

    def _run(self, job: Job) -> None:
        self.metrics.queue_wait.observe(time.time() - job.created_at)
        try:
            video, audio = self.data.video(job.id).read_bytes(), self.data.audio(job.id).read_bytes()
        except FileNotFoundError:
            self._finish(job, self._committed(self.store.fail, job.id, INPUTS_GONE))
            return
        request = JobRequest(
            video=video,
            audio=audio,
            job_id=job.id,
            **{option.name: job.params.get(option.name) for option in OPTIONS if option.rest},
        )
        started = time.monotonic()
        try:
            result = self.backend.run(
                request,
                on_progress=lambda fraction, stage, eta_s: self._progress(job.id, fraction, stage, eta_s),
                should_cancel=lambda: self._stop.is_set() or self._cancelled(job.id),
            )
        except TritonJobError as exc:
            self._failed(job, exc)
            return
        inference_s = time.monotonic() - started
        try:
            self.data.write_result(job.id, result.video)
        except DataDirFull as exc:
            self._finish(job, self._committed(self.store.fail, job.id, f"the result could not be stored: {exc}"))
            return
        if self._committed(self.store.succeed, job.id, inference_s, result.info):
            self.metrics.inference.observe(inference_s)
            self._finish(job, True)
        else:  # cancelled while the last response was on its way
            self.data.result(job.id).unlink(missing_ok=True)

    def _failed(self, job: Job, error: TritonJobError) -> None:
        if error.retry and job.attempts < self.settings.max_attempts:
            self._progress(job.id, 0.0, WAITING_FOR_TRITON)
            if self._await_triton():
                self._committed(self.store.requeue, job.id, "re-queued: Triton was unavailable")
                self._wake.set()
                return
        if self._stop.is_set() and (
            error.retry or error.kind is ErrorKind.CANCELLED
        ):  # stopping: the next start reruns it
            self._committed(self.store.requeue, job.id, "re-queued: the gateway stopped while the job ran", refund=True)
            return
        if (
            error.kind is ErrorKind.CANCELLED
        ):  # through the API (committed as Cancelled: fail() changes nothing), or by Triton
            self._finish(job, self._committed(self.store.fail, job.id, "cancelled by Triton"))
            return
        if error.retry:
            self._finish(job, self._committed(self.store.fail, job.id, "Triton was unavailable"))
            return
        reason = str(error) if error.kind is ErrorKind.BAD_INPUT else f"inference failed: {error}"
        self._finish(job, self._committed(self.store.fail, job.id, reason))

    def _await_triton(self) -> bool:
        deadline = time.monotonic() + self.settings.triton_wait_s
        while time.monotonic() < deadline and not self._stop.is_set():
            if self.backend.ready():
                return True
            time.sleep(1.0)
        return False

    def _finish(self, job: Job, changed: bool) -> None:
        """After a committed ending (``changed``): drop the inputs, count it, call back."""
        self.data.drop_inputs(job.id)
        if not changed:
            return
        finished = self.store.get(job.id)
        if finished is not None:
            self.metrics.finished.labels(finished.status).inc()
            self.metrics.latency.labels(finished.status).observe(time.time() - finished.created_at)
        self.on_finished(job.id)

    def _clean(self) -> None:
        while not self._stop.wait(self.settings.cleanup_interval_s):
            try:
                self.data.cleanup(self.store, self.settings.retention_h * 3600)
            except StoreUnavailable as exc:
                log.warning("retention cleanup skipped: the job database is unavailable (%s)", exc)
            except OSError:
                log.exception("retention cleanup failed")

    def _keep_leases(self) -> None:
        while True:
            try:
                self.store.renew_leases()
                self._recover()
            except StoreUnavailable as exc:
                log.warning("job leases not renewed: the job database is unavailable (%s)", exc)
            except Exception:
                log.exception("renewing job leases failed")
            if self._stop.wait(self.settings.lease_s / 3):
                return

    def _recover(self) -> None:
        requeued, failed = self.store.recover(self.settings.max_attempts)
        for job_id in failed:
            self.data.drop_inputs(job_id)
            self.on_finished(job_id)
        if requeued or failed:
            log.warning("jobs of a stopped gateway: %d re-queued, %d failed", len(requeued), len(failed))
            self._wake.set()
