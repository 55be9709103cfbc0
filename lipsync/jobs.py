"""One job from in-memory media: what a server receives (file bytes) and sends back (mp4 bytes + info).

Servers hand over whole files as bytes; the pipeline streams from and to files, so a job lives in its
own temporary folder, removed when the job ends however it ends. Every error a caller can fix (not a
video, no speech, no face, an option out of range) is a ``ValueError``; ``JobCancelled`` means the
cancellation check fired; anything else is the server's fault.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

from lipsync.pipeline import LipSyncPipeline, LipSyncResult, ProgressCallback
from lipsync.sampling import CancelCheck
from lipsync.timeline import LoopMode


@dataclass(frozen=True)
class JobOptions:
    """Per-job knobs; ``None`` takes the model config's default (20 steps, guidance 1.5, seed 1247)."""

    steps: int | None = None
    guidance_scale: float | None = None
    seed: int | None = None
    loop_mode: LoopMode = LoopMode.PINGPONG
    mode: str = "exact"
    """Sampling mode of ``configs/sampling_modes.yaml``: ``exact`` (official) or ``fast`` (feature caching)."""
    devices: int | None = None
    """Devices the job's windows are spread over (at most the pipeline's); ``None``: by length (``split_min_seconds``)."""


@dataclass(frozen=True)
class JobOutput:
    video: bytes
    """The lip-synced H.264/AAC mp4."""
    result: LipSyncResult

    def info(self) -> dict[str, Any]:
        """Frames, face-less frames and seconds per stage, as JSON-ready values."""
        return {
            "frames": self.result.frames,
            "faceless_frames": self.result.faceless_frames,
            "devices": self.result.devices,
            "seconds": self.result.seconds,
        }


def run_job(
    pipeline: LipSyncPipeline,
    video: bytes,
    audio: bytes,
    options: JobOptions,
    progress: ProgressCallback | None = None,
    should_cancel: CancelCheck | None = None,
) -> JobOutput:
    """Lip-sync ``video`` (any container the decoder reads) to ``audio`` (an audio file or a video with sound)."""
    if not video:
        raise ValueError("the video is empty")
    if not audio:
        raise ValueError("the audio is empty")
    with TemporaryDirectory(prefix="lipsync-job-") as folder:
        video_path, audio_path, output = Path(folder, "video"), Path(folder, "audio"), Path(folder, "out.mp4")
        video_path.write_bytes(video)
        audio_path.write_bytes(audio)
        try:
            result = pipeline.run(
                video_path, audio_path, output, steps=options.steps, guidance_scale=options.guidance_scale,
                seed=options.seed, loop_mode=options.loop_mode, mode=options.mode, devices=options.devices, progress=progress, should_cancel=should_cancel,
            )
        except ValueError as exc:  # say "the video", not the server's temporary path
            message = str(exc).replace(str(video_path), "the video").replace(str(audio_path), "the audio")
            raise ValueError(message) from exc
        return JobOutput(output.read_bytes(), result)
