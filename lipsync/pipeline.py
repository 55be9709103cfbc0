"""``LipSyncPipeline``: one object that loads the models once and lip-syncs many videos.

A job runs in two passes over the video so that memory does not grow with its length:

1. *analyse* — decode at 25 fps, detect the face and compute each frame's smoothed alignment
   (only the 2×3 affine is kept per frame);
2. *generate* — decode again in output order (looping when the audio is longer), warp the faces
   with the stored affines, generate a batch of windows, paste back and encode, batch by batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKL

from lipsync.audio import AudioFeatureExtractor, load_audio, window_count
from lipsync.batching import BatchingSettings, BatchObserver, WindowBatcher
from lipsync.config import load_config
from lipsync.faces import DetectorPool, FaceAligner, FaceLandmarks, FacePaster, FaceSettings, MediaPipeFaceDetector, load_mask
from lipsync.frames import frames_in_order
from lipsync.media import VideoInfo, VideoReader, VideoWriter
from lipsync.models import load_unet
from lipsync.sampling import (
    CancelCheck, Denoiser, DirectDenoiser, FaceGenerator, JobCancelled, SamplingSettings, initial_noise, load_scheduler,
)
from lipsync.timeline import LoopMode, source_frames
from lipsync.timing import StageTimer
from lipsync.vae import load_vae
from lipsync.weights import WeightPaths

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
"""Precision names the CLI, the Triton model config and the benchmarks accept."""

ProgressCallback = Callable[[float, str], None]
"""Called with (fraction done in [0, 1], stage name)."""

_ANALYSIS_CHUNK = 16
"""Frames detected in parallel between two cancellation checks of the analysis pass."""
_PROGRESS_SPAN = {"audio": (0.0, 0.05), "analyse": (0.05, 0.2), "generate": (0.2, 1.0)}


class NoFaceError(ValueError):
    """No frame of the video shows a face the detector accepts."""


@dataclass
class LipSyncResult:
    """What a finished job produced."""

    output: Path
    frames: int
    faceless_frames: int
    """Output frames passed through unchanged because no face was found in their source frame."""
    seconds: dict[str, float] = field(default_factory=dict)
    """Wall time per stage: audio, decode, detect_align, vae_encode, denoise, vae_decode, paste, encode."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"output": str(self.output)}


@dataclass(frozen=True)
class _Analysis:
    affines: list[np.ndarray]
    """One frame→crop affine per analysed frame; face-less frames borrow the nearest face's."""
    has_face: list[bool]


class LipSyncPipeline:
    """Loaded models plus settings; :meth:`run` processes one job.

    Several threads may call :meth:`run` at once when the denoiser is a ``WindowBatcher``: each job
    borrows its own face detector, and their windows share UNet calls.
    """

    def __init__(
        self,
        vae: AutoencoderKL,
        denoiser: Denoiser,
        audio: AudioFeatureExtractor,
        detectors: DetectorPool,
        config: dict[str, Any],
        windows_per_call: int | None = None,
        face_settings: FaceSettings | None = None,
        detect_threads: int = 4,
    ) -> None:
        self.vae = vae
        self.denoiser = denoiser
        self.audio = audio
        self.detectors = detectors
        self.windows_per_call = windows_per_call
        self.detect_threads = detect_threads
        """Frames of the analysis pass detected at once, each thread with a detector from the pool."""
        self.config = config
        self.resolution: int = config["data"]["resolution"]
        self.face_settings = face_settings or FaceSettings.load()
        self.mask = torch.from_numpy(load_mask(self.resolution, self.face_settings))

    @classmethod
    def from_weights(
        cls,
        paths: WeightPaths,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        detectors: DetectorPool | None = None,
        windows_per_call: int | None = None,
        batching: BatchingSettings | None = None,
        on_batch: BatchObserver | None = None,
        detect_threads: int = 4,
    ) -> LipSyncPipeline:
        """Load UNet, VAE and Whisper from a weight set; fp16 on CUDA (like official), fp32 on CPU.

        With ``batching``, concurrent :meth:`run` calls share UNet calls through a ``WindowBatcher``
        (``on_batch`` sees each call's size); without it, each job's windows run on their own.
        """
        device = torch.device(device)
        dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
        config = load_config(paths.unet_config)
        unet = load_unet(paths.unet_config, paths.unet, device, dtype)
        denoiser: Denoiser = (
            DirectDenoiser(unet, load_scheduler()) if batching is None
            else WindowBatcher(unet, load_scheduler(), batching, on_batch)
        )
        audio = AudioFeatureExtractor.from_checkpoint(paths.whisper, config, device)
        return cls(
            load_vae(paths.vae_dir, device, dtype), denoiser, audio, detectors or DetectorPool(MediaPipeFaceDetector),
            config, windows_per_call, detect_threads=detect_threads,
        )

    def close(self) -> None:
        """Stop a shared batcher's worker and free the face detectors."""
        if isinstance(self.denoiser, WindowBatcher):
            self.denoiser.close()
        self.detectors.close()

    def run(
        self,
        video: str | Path,
        audio: str | Path,
        output: str | Path,
        *,
        steps: int | None = None,
        guidance_scale: float | None = None,
        seed: int | None = None,
        loop_mode: LoopMode | str = LoopMode.PINGPONG,
        progress: ProgressCallback | None = None,
        should_cancel: CancelCheck | None = None,
    ) -> LipSyncResult:
        """Lip-sync ``video`` to ``audio`` and write an H.264/AAC mp4 to ``output``.

        Raises ``MediaError``/``AudioError`` for unreadable inputs, ``NoFaceError`` when no frame
        has a face, ``JobCancelled`` when ``should_cancel`` says so; ``output`` is then not written.
        """
        loop_mode = LoopMode.parse(loop_mode)
        settings = SamplingSettings.from_config(
            self.config, steps=steps, guidance_scale=guidance_scale, seed=seed,
            windows_per_call=self.windows_per_call,
        )
        timer = StageTimer(self.vae.device)
        report = _Progress(progress)

        report("audio", 0.0)
        with timer.stage("audio"):
            waveform = load_audio(audio, self.audio.settings.sample_rate)
            features = self.audio(waveform)
        fps = self.audio.settings.video_fps
        available = window_count(len(features), self.audio.settings.positions_per_frame)
        output_frames = min(available, max(1, round(len(waveform) / self.audio.settings.sample_rate * fps)))

        analysis, info = self._analyse(Path(video), output_frames, timer, report, should_cancel)
        order = source_frames(output_frames, len(analysis.affines), loop_mode)
        faceless = sum(not analysis.has_face[index] for index in order)

        generator = FaceGenerator(self.vae, self.denoiser, settings, timer)
        random = torch.Generator().manual_seed(settings.seed)
        noise = initial_noise(random, self.resolution // 8)
        aligner = FaceAligner(self.resolution, self.face_settings.alignment)
        paster = FacePaster(aligner.crop_size, self.face_settings.paste)
        batch = settings.num_frames * settings.windows_per_call
        total_windows = -(-output_frames // settings.num_frames)
        frames = _timed(frames_in_order(video, order), timer, "decode")

        def finish(originals: list[np.ndarray], sources: list[int], generated: np.ndarray) -> None:
            for frame, index, face in zip(originals, sources, generated):
                if analysis.has_face[index]:
                    with timer.stage("paste", sync=False):
                        frame = paster.paste(frame, face, analysis.affines[index])
                with timer.stage("encode", sync=False):
                    writer.write(frame)

        # Paste-back and encoding of one batch run on a second thread while the next batch is on
        # the GPU; waiting for the previous batch before queueing the next keeps the frame order and
        # holds at most two batches of frames.
        with VideoWriter(output, info.width, info.height, fps, audio=waveform) as writer, ThreadPoolExecutor(1) as finisher:
            finishing: Future | None = None
            for start in range(0, output_frames, batch):
                sources = order[start : start + batch]
                originals = list(islice(frames, len(sources)))
                with timer.stage("detect_align", sync=False):
                    faces = np.stack([aligner.warp(frame, analysis.affines[index]) for frame, index in zip(originals, sources)])
                done_before = start // settings.num_frames

                def on_window(done: int, _total: int) -> None:
                    _check_cancel(should_cancel)
                    report("generate", (done_before + done) / total_windows)

                generated = generator(
                    torch.from_numpy(faces).permute(0, 3, 1, 2).float() / 127.5 - 1,
                    self.audio.frame_windows(features, len(sources), first_frame=start),
                    self.mask,
                    noise,
                    random,
                    on_window=on_window,
                    should_cancel=should_cancel,
                )
                if finishing is not None:
                    finishing.result()
                finishing = finisher.submit(finish, originals, sources, generated.permute(0, 2, 3, 1).numpy())
            if finishing is not None:
                finishing.result()
            with timer.stage("encode", sync=False):
                writer.close()
        report("generate", 1.0)
        return LipSyncResult(Path(output), output_frames, faceless, timer.as_dict())

    def _analyse(
        self, video: Path, max_frames: int, timer: StageTimer, report: "_Progress", should_cancel: CancelCheck | None
    ) -> tuple[_Analysis, VideoInfo]:
        aligner = FaceAligner(self.resolution, self.face_settings.alignment)
        affines: list[np.ndarray | None] = []
        with VideoReader(video) as reader, ThreadPoolExecutor(self.detect_threads) as pool:
            expected = max(1, min(max_frames, reader.info.frames_at(self.audio.settings.video_fps)))
            frames = _timed(islice(iter(reader), max_frames), timer, "decode")
            while chunk := list(islice(frames, _ANALYSIS_CHUNK)):
                with timer.stage("detect_align", sync=False):
                    for face in pool.map(self._detect, chunk):
                        affines.append(None if face is None else aligner.transform(face.points))
                _check_cancel(should_cancel)
                report("analyse", min(1.0, len(affines) / expected))
            info = reader.info
        found = [index for index, affine in enumerate(affines) if affine is not None]
        if not found:
            raise NoFaceError(f"no face was found in any of the {len(affines)} frames of {video.name}")
        nearest = np.searchsorted(found, np.arange(len(affines)))
        filled = []
        for index, affine in enumerate(affines):
            if affine is None:
                candidates = [found[min(nearest[index], len(found) - 1)], found[max(nearest[index] - 1, 0)]]
                affine = affines[min(candidates, key=lambda candidate: abs(candidate - index))]
            filled.append(affine)
        return _Analysis(filled, [affine is not None for affine in affines]), info

    def _detect(self, frame: np.ndarray) -> FaceLandmarks | None:
        with self.detectors.borrow() as detector:
            return detector.detect(frame)


def check_inputs(video: str | Path, audio: str | Path, sample_rate: int) -> None:
    """Fail fast on unusable inputs before any model is loaded: raises ``MediaError``/``AudioError``.

    Opening a ``VideoReader`` probes the container and decodes the first frame; ``load_audio``
    decodes the speech track and rejects an empty one.
    """
    with VideoReader(video):
        pass
    load_audio(audio, sample_rate)


class _Progress:
    """Maps per-stage fractions onto one rising [0, 1] scale."""

    def __init__(self, callback: ProgressCallback | None) -> None:
        self.callback = callback

    def __call__(self, stage: str, fraction: float) -> None:
        if self.callback is not None:
            low, high = _PROGRESS_SPAN[stage]
            self.callback(low + (high - low) * min(max(fraction, 0.0), 1.0), stage)


def _check_cancel(should_cancel: CancelCheck | None) -> None:
    if should_cancel is not None and should_cancel():
        raise JobCancelled("the job was cancelled")


def _timed(frames: Iterator[np.ndarray], timer: StageTimer, stage: str) -> Iterator[np.ndarray]:
    iterator = iter(frames)
    while True:
        with timer.stage(stage, sync=False):
            frame = next(iterator, None)
        if frame is None:
            return
        yield frame
