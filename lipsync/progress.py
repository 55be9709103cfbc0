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

import fcntl
import json
import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
from pydantic import Field, NonNegativeFloat, NonNegativeInt, PositiveInt, TypeAdapter, ValidationError, field_validator
from pydantic.dataclasses import dataclass as pydantic_dataclass

from lipsync.config import PIPELINE_CONFIG, SCHEMA, load_settings

log = logging.getLogger(__name__)

LAST_BEFORE_DONE = 0.99
"""The highest fraction streamed before the result."""
STAGE_SPANS: dict[str, tuple[float, float]] = {
    "audio": (0.0, 0.05),
    "analyse": (0.05, 0.2),
    "generate": (0.2, 0.95),
    "encode": (0.95, 1.0),
}
"""Each stage's share of the [0, 1] progress scale, in the order a job runs them. ``generate`` moves after
every DDIM step; ``encode`` is the last batch's paste-back and encoding, after the last window is generated."""
STAGES = tuple(STAGE_SPANS)
PACED_STAGE = "generate"
"""The stage that dominates a job's time and whose progress moves evenly (one report per DDIM step)."""


@pydantic_dataclass(frozen=True, config=SCHEMA)
class EtaSettings:
    """How a server's ETA learns its stage times: the ``eta`` section of ``configs/pipeline.yaml``."""

    history_jobs: PositiveInt
    """Finished jobs the stage times are fitted over (the newest)."""
    fixed_share: dict[str, Annotated[float, Field(ge=0, le=1)]]
    """Per stage, the share of its time that does not grow with the job's size, assumed while every
    finished job had the same size (one size cannot tell the two apart); 0: the stage has no fixed
    cost, its time always scales in proportion (:class:`StageRates`)."""

    @field_validator("fixed_share")
    @classmethod
    def _every_stage(cls, shares: dict[str, float]) -> dict[str, float]:
        if set(shares) != set(STAGES):
            raise ValueError(f"needs a share for each of {', '.join(STAGES)} and no other")
        return shares

    @classmethod
    def load(cls, path: str | Path = PIPELINE_CONFIG) -> EtaSettings:
        """The section alone, for a process that does not run the pipeline (the gateway's estimates)."""
        return load_settings(cls, path, "pipeline config", "eta")


@dataclass(frozen=True)
class ProgressReport:
    fraction: float
    """Done so far, in [0, :data:`LAST_BEFORE_DONE`]."""
    stage: str
    eta_s: float | None
    """Estimated seconds until the result; ``None`` until the job has made enough progress to tell."""


ProgressSink = Callable[[ProgressReport], None]


@dataclass(frozen=True)
class JobSize:
    """How much work a job is, known once its audio is read: what the stages' durations scale with."""

    frames: int
    """Output frames."""
    steps: int
    """DDIM steps per window."""

    def units(self, stage: str) -> int:
        """Work units of ``stage``: frames × steps for generation, frames for the others."""
        return self.frames * self.steps if stage == PACED_STAGE else self.frames


Samples = dict[str, deque[tuple[int, float]]]
"""Per stage, the newest finished jobs' ``(units, seconds)``."""
_STORED = TypeAdapter(dict[str, list[tuple[NonNegativeInt, NonNegativeFloat]]])
"""A stage rates file: ``{stage: [[units, seconds], …]}``, oldest first."""
FileIdentity = tuple[int, int, int]
"""``(inode, size, mtime_ns)`` of a stage rates file: a file replaced or rewritten since it was read differs."""


class StageRates:
    """Each stage's expected seconds for a job of a given size, learned from this server's finished jobs.

    A stage's time is the wall time from its first report to the next stage's first report (the
    analysis overlaps generation, so its stage ends when generation reports). Per stage, the last
    ``history`` jobs' ``(units, seconds)`` are fitted with a fixed cost plus a cost per unit
    (:meth:`JobSize.units`) by least squares: loading Whisper, opening the encoder and the first
    batch's start cost the same whatever the clip, the rest scales with it. While every job seen had
    one size, the stage's configured ``fixed_share`` of their time is taken as fixed. A stage whose
    share is 0 (generation: its stage starts after the first DDIM step, and everything after it is
    per window) is always fitted in proportion, through the origin: with the few jobs of a history,
    a server whose speed drifts between jobs would otherwise fit a fixed cost out of the drift.
    Keeping only the newest jobs lets the fit follow a server whose speed changes (jobs sharing the
    UNet, a compiled UNet taking over). Thread-safe.

    Without ``path`` the samples live in this object. With it they live in that JSON file, shared by
    every process given the same path (a server's job processes) and kept across restarts:
    :meth:`learn` merges its job into the file under an exclusive lock on ``<path>.lock`` and replaces
    the file atomically, so concurrent learners lose nothing and readers need no lock; :meth:`seconds`
    reads the file again whenever it changed since last read (one ``stat`` per call). A missing, empty
    or malformed file holds no samples.
    """

    def __init__(self, history: int, fixed_share: Mapping[str, float], path: Path | None = None) -> None:
        self.history, self.fixed_share, self.path = history, fixed_share, path
        self._samples = self._empty()
        self._read_file: FileIdentity | None = None
        """The file's identity when its samples were last taken (``None``: no file, no samples from it)."""
        self._lock = threading.Lock()

    def seconds(self, stage: str, size: JobSize) -> float | None:
        """Expected wall time of ``stage`` in a job of ``size``; ``None`` before a job finished it."""
        with self._lock:
            if self.path is not None and _identity(self.path) != self._read_file:
                self._read_file, self._samples = self._read(self.path)
            samples = list(self._samples[stage])
        if not samples:
            return None
        units = np.array([max(1, done) for done, _ in samples], dtype=float)
        seconds = np.array([taken for _, taken in samples])
        wanted = size.units(stage)
        share = self.fixed_share[stage]
        in_proportion = float(seconds @ units / (units @ units) * wanted)
        if share == 0:
            return in_proportion
        if np.ptp(units) == 0:
            return float(seconds.mean() * (share + (1 - share) * wanted / units[0]))
        slope = float(np.cov(units, seconds, bias=True)[0, 1] / units.var())
        if slope <= 0:  # no growth with size seen: the typical time
            return float(seconds.mean())
        fixed = float(seconds.mean() - slope * units.mean())
        return in_proportion if fixed < 0 else fixed + slope * wanted

    def learn(self, durations: dict[str, float], size: JobSize) -> None:
        """Add one finished job's stage durations (to the file, with a path). A file that cannot be written
        is logged and leaves the job's sample to this object only: a finished job never fails for it."""
        with self._lock:
            self._add(self._samples, durations, size)
            if self.path is None:
                return
            try:
                with _exclusive(self.path):
                    _, samples = self._read(self.path)
                    self._add(samples, durations, size)
                    _replace(self.path, samples)
                    self._read_file, self._samples = _identity(self.path), samples
            except OSError as exc:
                log.warning("stage rates not saved to %s: %s", self.path, exc)

    def _empty(self) -> Samples:
        return {stage: deque(maxlen=self.history) for stage in STAGES}

    @staticmethod
    def _add(samples: Samples, durations: dict[str, float], size: JobSize) -> None:
        for stage, seconds in durations.items():
            samples[stage].append((size.units(stage), seconds))

    def _read(self, path: Path) -> tuple[FileIdentity | None, Samples]:
        """The file's identity and its newest ``history`` samples per stage (none when it is absent or malformed)."""
        samples = self._empty()
        try:
            with path.open("rb") as file:
                identity = _identity_of(os.fstat(file.fileno()))
                text = file.read()
        except OSError:
            return None, samples
        try:
            stored = _STORED.validate_json(text)
        except ValidationError:
            return identity, samples
        for stage in STAGES:
            samples[stage].extend(stored.get(stage, ()))
        return identity, samples


def _identity_of(stat: os.stat_result) -> FileIdentity:
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


def _identity(path: Path) -> FileIdentity | None:
    """The identity of the file at ``path`` now; ``None`` when there is none."""
    try:
        return _identity_of(path.stat())
    except OSError:
        return None


@contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``<path>.lock`` (across processes) for the block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.with_name(f"{path.name}.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        yield


def _replace(path: Path, samples: Samples) -> None:
    """Write ``samples`` to a temporary file beside ``path`` and rename it over ``path`` (readers see the
    old file or the new one, never a part). Under :func:`_exclusive`: one writer at a time."""
    temp = path.with_name(f".{path.name}.new")
    temp.write_text(
        json.dumps({stage: list(stage_samples) for stage, stage_samples in samples.items()}), encoding="utf-8"
    )
    os.replace(temp, path)


class EtaEstimate:
    """Seconds left in one job, from the server's learned stage rates and the job's own pace.

    Seconds left = what remains of the current stage + the learned durations of the stages after it.
    In the paced stage (generation) the remainder blends the learned duration left with the job's
    own pace since the stage began, each weighted by the share of the stage it speaks for: the own
    pace by the stage's fraction done (what it was measured over), the learned one by the rest. A
    server whose speed changed since the jobs it learned from (other work sharing it) is thus
    followed within the stage, while a few early steps, which on the CPU may share it with the
    analysis of the rest of the video, do not decide the estimate alone. Before
    :meth:`plan` or before any job finished a stage, that stage falls back to the job's own pace
    over the whole progress scale, except generation: a job that has not generated yet on a server
    that never finished a job gets ``None`` (no way to tell how fast the UNet runs here).
    """

    def __init__(self, rates: StageRates, clock: Callable[[], float] = time.monotonic) -> None:
        self.rates, self.clock = rates, clock
        self.started = clock()
        self.size: JobSize | None = None
        self.entered: dict[str, tuple[float, float]] = {}
        """``(time, stage fraction)`` of each stage's first report, in the order of the stages."""
        self.moved: tuple[float, float] | None = None
        """``(time, stage fraction)`` of the paced stage's last report that moved it."""
        self.durations: dict[str, float] = {}
        """Seconds each stage took, once :meth:`finish` ran (what the job taught the rates)."""

    def plan(self, size: JobSize) -> None:
        """The job's size, once known (after its audio is read)."""
        self.size = size

    def __call__(self, fraction: float, stage: str) -> float | None:
        now = self.clock()
        low, high = STAGE_SPANS[stage]
        done = min(max((fraction - low) / (high - low), 0.0), 1.0)
        since, done_then = self.entered.setdefault(stage, (now, done))
        elapsed = now - since
        expected = self._learned(stage)
        left = None if expected is None else max(0.0, expected - elapsed)
        if stage == PACED_STAGE:
            if self.moved is None or done > self.moved[1]:
                self.moved = (now, done)
            moved_at, moved_to = self.moved
            if moved_to > done_then:
                # The pace counts from the stage's first report (which comes after its first DDIM step)
                # to its last move; a repeated report only spends time on the step in progress.
                pace = (moved_at - since) / (moved_to - done_then)
                own = max(0.0, pace * (1 - moved_to) - (now - moved_at))
                left = own if left is None else done * own + (1 - done) * left
        if left is None:
            left = self._from_overall_pace(stage, 1 - done, now, fraction)
        for later in STAGES[STAGES.index(stage) + 1 :]:
            seconds = self._learned(later)
            if seconds is None:
                seconds = self._from_overall_pace(later, 1.0, now, fraction)
            if left is None or seconds is None:
                return None
            left += seconds
        return left

    def _learned(self, stage: str) -> float | None:
        return None if self.size is None else self.rates.seconds(stage, self.size)

    def _from_overall_pace(self, stage: str, left: float, now: float, fraction: float) -> float | None:
        """``left`` of ``stage``'s span at the job's pace over the whole scale so far (none for generation)."""
        if stage == PACED_STAGE or fraction <= 0:
            return None
        low, high = STAGE_SPANS[stage]
        return (now - self.started) / fraction * (high - low) * left

    def finish(self) -> None:
        """The job succeeded: teach the shared rates how long each of its stages took."""
        if self.size is None or not self.entered:
            return
        stages = sorted(self.entered, key=lambda stage: self.entered[stage][0])
        times = [self.entered[stage][0] for stage in stages] + [self.clock()]
        self.durations = {stage: end - start for stage, start, end in zip(stages, times, times[1:], strict=False)}
        self.rates.learn(self.durations, self.size)


class ProgressReporter:
    """Hands every ``(fraction, stage)`` report to ``sink`` on its own thread, with an ETA.

    Use it as a context manager: leaving it sends what is still queued, so the caller's next message
    (the result) comes after every progress report; leaving it without an error teaches the ETA's
    shared rates this job's stage times.
    """

    def __init__(self, sink: ProgressSink, heartbeat_s: float, eta: EtaEstimate) -> None:
        self.sink, self.heartbeat_s, self.eta = sink, heartbeat_s, eta
        self._reports: queue.Queue[tuple[float, str] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._send, name="progress", daemon=True)

    def __enter__(self) -> ProgressReporter:
        self._thread.start()
        return self

    def __exit__(self, error: type[BaseException] | None, *_: object) -> None:
        self._reports.put(None)
        self._thread.join()
        if error is None:
            self.eta.finish()

    def plan(self, size: JobSize) -> None:
        """The job's size, for the ETA (``LipSyncPipeline.run``'s ``on_plan``)."""
        self.eta.plan(size)

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
