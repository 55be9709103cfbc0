"""Progress as a server streams it: every report, plus a repeat when a stage runs long, each with an ETA.

The pipeline reports ``(fraction, stage)`` from several threads, the UNet's batching thread among
them, so :class:`ProgressReporter` only queues a report and sends it from a thread of its own: a
slow client never slows a shared DDIM loop. When nothing was reported for ``heartbeat_s`` (a long
VAE decode, the final encode), the last report is sent again with a fresh ETA, so a client can
tell a busy job from a stuck one.

Streamed fractions stay below 1: a job is done when its result is delivered, so 1.0 belongs to the
response that carries the result.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

LAST_BEFORE_DONE = 0.99
"""The highest fraction streamed before the result."""


@dataclass(frozen=True)
class ProgressReport:
    fraction: float
    """Done so far, in [0, :data:`LAST_BEFORE_DONE`]."""
    stage: str
    eta_s: float | None
    """Estimated seconds until the result; ``None`` until the job has made enough progress to tell."""


ProgressSink = Callable[[ProgressReport], None]


class EtaEstimate:
    """Seconds left, extrapolated from the rate since the first report of the ``paced_stage``.

    The stages before it (audio, face analysis) run at rates unrelated to the rest, so until the
    paced stage has moved, the estimate uses the rate since the job started.
    """

    def __init__(self, paced_stage: str = "generate", clock: Callable[[], float] = time.monotonic) -> None:
        self.paced_stage, self.clock = paced_stage, clock
        self.started = clock()
        self.paced_from: tuple[float, float] | None = None
        """``(time, fraction)`` of the first report of the paced stage."""

    def __call__(self, fraction: float, stage: str) -> float | None:
        now = self.clock()
        if stage == self.paced_stage and self.paced_from is None:
            self.paced_from = (now, fraction)
        since, base = self.paced_from if self.paced_from is not None and fraction > self.paced_from[1] else (self.started, 0.0)
        if fraction <= base or now <= since:
            return None
        rate = (fraction - base) / (now - since)
        return max(0.0, (1.0 - fraction) / rate)


class ProgressReporter:
    """Hands every ``(fraction, stage)`` report to ``sink`` on its own thread, with an ETA.

    Use it as a context manager: leaving it sends what is still queued, so the caller's next message
    (the result) comes after every progress report.
    """

    def __init__(self, sink: ProgressSink, heartbeat_s: float, eta: EtaEstimate | None = None) -> None:
        self.sink, self.heartbeat_s = sink, heartbeat_s
        self.eta = eta or EtaEstimate()
        self._reports: queue.Queue[tuple[float, str] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._send, name="progress", daemon=True)

    def __enter__(self) -> ProgressReporter:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._reports.put(None)
        self._thread.join()

    def __call__(self, fraction: float, stage: str) -> None:
        """A :data:`~lipsync.pipeline.ProgressCallback`: cheap, never blocks, never raises."""
        self._reports.put((min(fraction, LAST_BEFORE_DONE), stage))

    def _send(self) -> None:
        last: tuple[float, str] | None = None
        while True:
            try:
                report = self._reports.get(timeout=self.heartbeat_s)
            except queue.Empty:
                report = last  # a heartbeat: the same progress, a newer ETA
                if report is None:
                    continue
            if report is None:  # the context was left
                return
            last = report
            self.sink(ProgressReport(report[0], report[1], self.eta(*report)))
