"""What a job would cost here before it is submitted: run seconds, GPU-seconds and when it would start.

The rates are the ones the servers measured on this deployment's own recent jobs: every succeeded job's
INFO carries the seconds each progress stage took on its server and its size (frames, steps), as the
server's ETA learns them (:class:`lipsync.progress.StageRates`). An estimate feeds the newest
``estimate_history_jobs`` succeeded jobs of the same weights and sampling mode into a fresh
:class:`StageRates` (those with the same steps when there are any, ``basis: same_options``; else those
of other steps, whose generation time scales with frames × steps, ``other_steps``) and asks it for each
stage of a job of the requested size. Before any such job ran there is nothing to go by: ``basis: none``
and no seconds. Reading them from the job table makes every gateway on one database answer alike, and
the answer survives restarts.

The expected start is the work ahead divided over this gateway's ``concurrency``: what the running jobs'
servers last estimated they have left, plus each queued job at the mean run time of the recent jobs.
The picture size is checked against the media limits but does not change the rates: generation works
on fixed-size face crops, and the stages that scale with pixels (decoding, pasting, encoding) are a
small share of a job's time.
"""

from __future__ import annotations

from collections.abc import Sequence
from statistics import fmean

from gateway.backends.served import ServedWeights, served_defaults
from gateway.core.settings import GatewaySettings
from gateway.jobs.schemas import Estimate, SubmitOptions
from gateway.store import IN_PROGRESS, IN_QUEUE, Job, JobStore
from lipsync.media import MediaSettings
from lipsync.progress import STAGES, EtaSettings, JobSize, StageRates


def output_frames(seconds: float, media: MediaSettings) -> int:
    """Frames of a result ``seconds`` long (one per 1/fps s of audio, at least one)."""
    return max(1, round(seconds * media.fps))


def _size(job: Job) -> JobSize | None:
    """The size a succeeded job's server measured its stages for; None for a job without stage times."""
    info = job.info or {}
    if not info.get("stages") or not isinstance(info.get("steps"), int) or not isinstance(info.get("frames"), int):
        return None
    return JobSize(info["frames"], info["steps"])


def _run_seconds(job: Job) -> float:
    return float(sum((job.info or {})["stages"].values()))


class Estimator:
    def __init__(
        self, settings: GatewaySettings, store: JobStore, weights: ServedWeights, media: MediaSettings
    ) -> None:
        self.settings = settings
        self.store = store
        self.weights = weights
        self.media = media

    def estimate(self, frames: int, options: SubmitOptions) -> Estimate:
        defaults = served_defaults(self.weights.value, self.media)
        steps = options.inference_steps or defaults.get("inference_steps")
        mode = options.mode or defaults["mode"]
        recent = [job for job in self.store.recent_succeeded(self.settings.estimate_history_jobs) if _size(job)]
        alike = [
            job
            for job in recent
            if self._same_weights(job, options.version) and (job.params.get("mode") or defaults["mode"]) == mode
        ]
        same_steps = [job for job in alike if (job.info or {})["steps"] == steps]
        basis_jobs = same_steps or alike
        run_s = gpu_s = None
        if basis_jobs and steps is not None:
            run_s = self._seconds(basis_jobs, JobSize(frames, steps))
            gpu_s = run_s * fmean(_devices_on_gpu(job) for job in basis_jobs) if run_s is not None else None
        counts = self.store.counts()
        return Estimate(
            frames=frames,
            inference_steps=steps,
            mode=mode,
            weights=options.version or self.weights.value,
            run_s=_rounded(run_s),
            gpu_s=_rounded(gpu_s),
            start_in_s=_rounded(self._start_in(counts[IN_QUEUE], recent)),
            queued_jobs=counts[IN_QUEUE],
            running_jobs=counts[IN_PROGRESS],
            basis="same_options" if same_steps else "other_steps" if alike else "none",
            basis_jobs=len(basis_jobs),
        )

    def _same_weights(self, job: Job, version: str | None) -> bool:
        """Whether ``job`` ran on the weights asked for: the ``version`` named, else those served now."""
        info = job.info or {}
        if version is not None:
            return info.get("version") == version
        return self.weights.value is None or info.get("weights") == self.weights.value

    @staticmethod
    def _seconds(jobs: Sequence[Job], size: JobSize) -> float | None:
        rates = StageRates(len(jobs), EtaSettings.load().fixed_share)
        for job in reversed(jobs):  # oldest first, as a server learns them
            rates.learn((job.info or {})["stages"], _size(job))  # type: ignore[arg-type]
        stages = [rates.seconds(stage, size) for stage in STAGES]
        return None if any(seconds is None for seconds in stages) else float(sum(stages))  # type: ignore[arg-type]

    def _start_in(self, queued: int, recent: Sequence[Job]) -> float | None:
        """Seconds until a job submitted now would start (None: a queue, but no finished job to time it by)."""
        etas = self.store.running_etas()
        slots = self.settings.concurrency
        if queued == 0 and len(etas) < slots:
            return 0.0
        if not recent:
            return None
        typical = fmean(_run_seconds(job) for job in recent)
        ahead = sum(typical if eta is None else eta for eta in etas) + queued * typical
        return ahead / slots


def _devices_on_gpu(job: Job) -> float:
    """GPUs the job's windows were spread over; 0 for a job that ran on the CPU."""
    info = job.info or {}
    return float(info.get("devices") or 1) if info.get("device") == "cuda" else 0.0


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 2)
