"""Feeds queued jobs to the backend (Triton): ``concurrency`` threads, each running one job at a time.

A thread claims the oldest queued job (committed as ``InProgress``), runs it on the
:class:`~gateway.backend.JobBackend` (the job id as the Triton request id), writes progress into the table as it arrives, and has the
backend check the table between responses: a job that left ``InProgress`` (cancelled through the API)
has its Triton stream cancelled. When Triton is unavailable the job waits for it to come back and is
re-queued if it has an attempt left. Every ending is committed before the finish callback (webhook) runs.

A lease thread renews the leases of this gateway's running jobs every third of ``lease_s`` and re-queues
jobs of any gateway whose lease ran out (that gateway died), or fails them when out of attempts.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from gateway.backend import JobBackend
from gateway.metrics import Metrics
from gateway.settings import GatewaySettings
from gateway.storage import DataDir
from gateway.store import Job, JobStore
from gateway.triton_client import JobRequest, TritonJobError
from lipsync.contract import OPTIONS
from lipsync.errors import ErrorKind

log = logging.getLogger(__name__)

WAITING_FOR_TRITON = "waiting for Triton"
"""The stage a job shows while its worker waits for Triton to come back."""


class Worker:
    def __init__(
        self, settings: GatewaySettings, store: JobStore, data: DataDir, metrics: Metrics, backend: JobBackend,
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
            job = self.store.claim_next()
            if job is None:
                self._wake.wait(timeout=1.0)
                self._wake.clear()
                continue
            try:
                self._run(job)
            except Exception:
                log.exception("job %s failed in the gateway", job.id)
                self._finish(job, self.store.fail(job.id, "internal error in the gateway"))

    def _run(self, job: Job) -> None:
        self.metrics.queue_wait.observe(time.time() - job.created_at)
        request = JobRequest(
            video=self.data.video(job.id).read_bytes(), audio=self.data.audio(job.id).read_bytes(), job_id=job.id,
            **{option.name: job.params.get(option.name) for option in OPTIONS if option.rest},
        )
        started = time.monotonic()
        try:
            result = self.backend.run(
                request,
                on_progress=lambda fraction, stage, eta_s: self.store.set_progress(job.id, fraction, stage, eta_s),
                should_cancel=lambda: self._stop.is_set() or not self.store.is_running(job.id),
            )
        except TritonJobError as exc:
            self._failed(job, exc)
            return
        inference_s = time.monotonic() - started
        self.data.write_result(job.id, result.video)
        if self.store.succeed(job.id, inference_s, result.info):
            self.metrics.inference.observe(inference_s)
            self._finish(job, True)
        else:  # cancelled while the last response was on its way
            self.data.result(job.id).unlink(missing_ok=True)

    def _failed(self, job: Job, error: TritonJobError) -> None:
        if error.retry and job.attempts < self.settings.max_attempts:
            self.store.set_progress(job.id, 0.0, WAITING_FOR_TRITON)
            if self._await_triton():
                self.store.requeue(job.id, "re-queued: Triton was unavailable")
                self._wake.set()
                return
        if self._stop.is_set() and (error.retry or error.kind is ErrorKind.CANCELLED):  # stopping: the next start reruns it
            self.store.requeue(job.id, "re-queued: the gateway stopped while the job ran", refund=True)
            return
        if error.kind is ErrorKind.CANCELLED:  # through the API (committed as Cancelled: fail() changes nothing), or by Triton
            self._finish(job, self.store.fail(job.id, "cancelled by Triton"))
            return
        if error.retry:
            self._finish(job, self.store.fail(job.id, "Triton was unavailable"))
            return
        reason = str(error) if error.kind is ErrorKind.BAD_INPUT else f"inference failed: {error}"
        self._finish(job, self.store.fail(job.id, reason))

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
            except OSError:
                log.exception("retention cleanup failed")

    def _keep_leases(self) -> None:
        while True:
            try:
                self.store.renew_leases()
                self._recover()
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
