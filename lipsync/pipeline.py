"""``LipSyncPipeline``: one object that loads the models once and lip-syncs many videos.

A job runs in two passes over the video so that memory does not grow with its length, and the
passes overlap so the GPU starts early:

1. *analyse* (its own thread, ``lipsync.analysis``) — decode at 25 fps, detect the face and compute
   each frame's smoothed alignment (only the 2×3 affine is kept per frame);
2. *generate* — decode again in output order (looping when the audio is longer), wait until the
   batch's alignments are final, warp the faces, generate a batch of windows; paste-back and
   encoding of that batch run on a third thread while the next batch is generated.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
from av.video.frame import VideoFrame
from diffusers import AutoencoderKL

from lipsync.analysis import FaceTrack, NoFaceError, analyse, probe, timed
from lipsync.audio import AudioFeatureExtractor, load_audio, window_count
from lipsync.batching import BatchingSettings, BatchObserver, WindowBatcher
from lipsync.config import CONFIG_DIR, load_config, read_yaml
from lipsync.faces import DetectorPool, FaceAligner, FaceLandmarks, FacePaster, FaceSettings, MediaPipeFaceDetector, load_mask
from lipsync.frames import frames_in_order
from lipsync.media import VideoReader, VideoWriter
from lipsync.models import load_unet
from lipsync.models.compiled import CompiledUNet
from lipsync.models.graphed import GraphedUNet
from lipsync.sampling import (
    CancelCheck, Denoiser, DirectDenoiser, FaceGenerator, JobCancelled, NoisePredictor, SamplingSettings, initial_noise,
    load_scheduler,
)
from lipsync.timeline import LoopMode, source_frames
from lipsync.timing import StageTimer
from lipsync.vae import load_vae
from lipsync.weights import WeightPaths

__all__ = ["DTYPES", "JobCancelled", "LipSyncPipeline", "LipSyncResult", "NoFaceError", "check_inputs"]

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
"""Precision names the CLI, the Triton model config and the benchmarks accept."""

ProgressCallback = Callable[[float, str], None]
"""Called with (fraction done in [0, 1], stage name)."""

PIPELINE_CONFIG = CONFIG_DIR / "pipeline.yaml"
_PROGRESS_SPAN = {"audio": (0.0, 0.05), "analyse": (0.05, 0.2), "generate": (0.2, 1.0)}


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
class PipelineSettings:
    """CPU-side parallelism of one job and how the UNet runs; defaults in ``configs/pipeline.yaml``."""

    detect_threads: int = 4
    finish_threads: int = 4
    analysis_chunk: int = 16
    compile_unet: bool = False
    """Run the UNet through ``torch.compile`` (``CompiledUNet``); compiles on first use or in :meth:`LipSyncPipeline.warm_up`."""

    @classmethod
    def load(cls, path: str | Path = PIPELINE_CONFIG, **overrides: int | bool | None) -> PipelineSettings:
        values = read_yaml(path, "pipeline config") | {key: value for key, value in overrides.items() if value is not None}
        settings = cls(**values)
        if min(settings.detect_threads, settings.finish_threads, settings.analysis_chunk) < 1:
            raise ValueError(f"pipeline settings must be positive, got {settings}")
        if not isinstance(settings.compile_unet, bool):
            raise ValueError(f"compile_unet must be true or false, got {settings.compile_unet!r}")
        return settings


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
        settings: PipelineSettings | None = None,
    ) -> None:
        self.vae = vae
        self.denoiser = denoiser
        self.audio = audio
        self.detectors = detectors
        self.windows_per_call = windows_per_call
        self.settings = settings or PipelineSettings.load()
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
        settings: PipelineSettings | None = None,
        cuda_graphs: bool | None = None,
    ) -> LipSyncPipeline:
        """Load UNet, VAE and Whisper from a weight set; fp16 on CUDA (like official), fp32 on CPU.

        With ``batching``, concurrent :meth:`run` calls share UNet calls through a ``WindowBatcher``
        (``on_batch`` sees each call's size); without it, each job's windows run on their own.
        ``settings.compile_unet`` compiles the UNet (``CompiledUNet``); ``cuda_graphs`` (default: on
        for CUDA) replays it from CUDA graphs (``GraphedUNet``).
        """
        device = torch.device(device)
        dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
        settings = settings or PipelineSettings.load()
        config = load_config(paths.unet_config)
        unet: NoisePredictor = load_unet(paths.unet_config, paths.unet, device, dtype)
        if settings.compile_unet:
            unet = CompiledUNet(unet)
        if cuda_graphs is None:
            cuda_graphs = device.type == "cuda"
        if cuda_graphs:
            unet = GraphedUNet(unet)
        denoiser: Denoiser = (
            DirectDenoiser(unet, load_scheduler()) if batching is None
            else WindowBatcher(unet, load_scheduler(), batching, on_batch)
        )
        audio = AudioFeatureExtractor.from_checkpoint(paths.whisper, config, device)
        return cls(
            load_vae(paths.vae_dir, device, dtype), denoiser, audio, detectors or DetectorPool(MediaPipeFaceDetector),
            config, windows_per_call, settings=settings,
        )

    def warm_up(self, mode: str = "exact") -> None:
        """Generate from dummy inputs at each UNet batch-size range a job of ``mode`` can reach.

        That is one window and ``max(2, windows_per_call)`` windows per call, with guidance: the
        compiled UNet (``compile_unet``) has one compilation for 2–3 batch rows and one for 4 or more
        (see ``CompiledUNet``), and the CUDA graphs, cuDNN's algorithm search and the VAE get their
        first calls. A server calls this before it reports ready, so no job pays minutes of
        compilation; other shapes (no guidance, other modes) still compile on first use.
        """
        settings = SamplingSettings.from_config(self.config, mode, windows_per_call=self.windows_per_call)
        largest = max(2, settings.windows_per_call)
        sample_rate, fps = self.audio.settings.sample_rate, self.audio.settings.video_fps
        features = self.audio(np.zeros(sample_rate * (settings.num_frames * largest // fps + 2), np.float32))
        random = torch.Generator().manual_seed(settings.seed)
        noise = initial_noise(random, self.resolution // 8)
        for windows in (1, largest):
            count = settings.num_frames * windows
            # Enough steps to reach every UNet pass of the mode (fast: one caching and one shallow step).
            short = replace(settings, steps=min(settings.steps, settings.cache_interval + 1), windows_per_call=windows)
            faces = torch.zeros(count, 3, self.resolution, self.resolution)
            FaceGenerator(self.vae, self.denoiser, short)(faces, self.audio.frame_windows(features, count), self.mask, noise, random)

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
        mode: str = "exact",
        progress: ProgressCallback | None = None,
        should_cancel: CancelCheck | None = None,
    ) -> LipSyncResult:
        """Lip-sync ``video`` to ``audio`` and write an H.264/AAC mp4 to ``output``.

        ``mode`` names a sampling mode of ``configs/sampling_modes.yaml``: ``exact`` (official) or ``fast``.

        Raises ``MediaError``/``AudioError`` for unreadable inputs, ``NoFaceError`` when no frame
        has a face, ``JobCancelled`` when ``should_cancel`` says so; ``output`` is then not written.
        """
        loop_mode = LoopMode.parse(loop_mode)
        settings = SamplingSettings.from_config(
            self.config, mode, steps=steps, guidance_scale=guidance_scale, seed=seed,
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

        info = probe(Path(video))
        track = FaceTrack(Path(video).name)
        aligner = FaceAligner(self.resolution, self.face_settings.alignment)
        generator = FaceGenerator(self.vae, self.denoiser, settings, timer)
        random = torch.Generator().manual_seed(settings.seed)
        noise = initial_noise(random, self.resolution // 8)
        paster = FacePaster(aligner.crop_size, self.face_settings.paste)
        batch = settings.num_frames * settings.windows_per_call
        total_windows = -(-output_frames // settings.num_frames)
        frames = _generation_frames(Path(video), output_frames, track, loop_mode, timer)
        faceless = 0

        def prepare(frame: np.ndarray, placement: tuple[np.ndarray, bool], face: np.ndarray) -> VideoFrame:
            affine, has_face = placement
            if has_face:
                with timer.stage("paste", sync=False):
                    frame = paster.paste(frame, face, affine)
            with timer.stage("encode", sync=False):
                return writer.picture(frame)

        def finish(originals: list[np.ndarray], placements: list[tuple[np.ndarray, bool]], generated: np.ndarray) -> None:
            for picture in finishers.map(prepare, originals, placements, generated):
                with timer.stage("encode", sync=False):
                    writer.write_picture(picture)

        # The analysis thread detects faces ahead of generation (lipsync.analysis); this thread warps
        # and generates a batch; meanwhile the previous batch is pasted back and converted to YUV on
        # the finisher threads and encoded, in order, by the encoder thread. Waiting for the previous
        # batch before queueing the next keeps the frame order and holds at most two batches of frames.
        with (
            ThreadPoolExecutor(1, thread_name_prefix="analysis") as analysis,
            VideoWriter(output, info.width, info.height, fps, audio=waveform) as writer,
            ThreadPoolExecutor(1, thread_name_prefix="encoder") as encoder,
            ThreadPoolExecutor(self.settings.finish_threads, thread_name_prefix="finisher") as finishers,
        ):
            analysis.submit(
                analyse, Path(video), output_frames, self._detect, aligner, track, timer,
                threads=self.settings.detect_threads, chunk=self.settings.analysis_chunk,
                on_progress=lambda fraction: report("analyse", fraction), should_cancel=should_cancel,
            )
            try:
                finishing: Future | None = None
                for start in range(0, output_frames, batch):
                    sources, originals = zip(*islice(frames, batch))
                    track.wait_for(max(sources))
                    placements = [track.alignment(index) for index in sources]
                    faceless += sum(not has_face for _, has_face in placements)
                    with timer.stage("detect_align", sync=False):
                        faces = np.stack([aligner.warp(frame, affine) for frame, (affine, _) in zip(originals, placements)])
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
                    finishing = encoder.submit(finish, originals, placements, generated.permute(0, 2, 3, 1).numpy())
                if finishing is not None:
                    finishing.result()
            finally:
                track.stop()
            with timer.stage("encode", sync=False):
                writer.close()
        report("generate", 1.0)
        return LipSyncResult(Path(output), output_frames, faceless, timer.as_dict())

    def _detect(self, frame: np.ndarray) -> FaceLandmarks | None:
        with self.detectors.borrow() as detector:
            return detector.detect(frame)


def _generation_frames(
    video: Path, output_frames: int, track: FaceTrack, loop_mode: LoopMode, timer: StageTimer
) -> Iterator[tuple[int, np.ndarray]]:
    """``(source frame index, frame)`` for each output frame, decoded as generation needs them.

    The video plays forward first, before the analysis knows its length; once it ends, the output
    goes on with the looped order (:func:`lipsync.timeline.source_frames`) of the analysed frames.
    """
    with VideoReader(video) as reader:
        yield from enumerate(timed(islice(iter(reader), output_frames), timer, "decode"))
    video_frames = track.wait_until_done()
    rest = source_frames(output_frames, video_frames, loop_mode)[video_frames:]
    yield from zip(rest, timed(frames_in_order(video, rest), timer, "decode"))


def check_inputs(video: str | Path, audio: str | Path, sample_rate: int) -> None:
    """Fail fast on unusable inputs before any model is loaded: raises ``MediaError``/``AudioError``.

    Opening a ``VideoReader`` probes the container and decodes the first frame; ``load_audio``
    decodes the speech track and rejects an empty one.
    """
    with VideoReader(video):
        pass
    load_audio(audio, sample_rate)


class _Progress:
    """Maps per-stage fractions onto one rising [0, 1] scale.

    The analysis and generation threads both report; a value below one already reported (the
    analysis still running while generation is ahead) is dropped, so callers see progress only rise.
    """

    def __init__(self, callback: ProgressCallback | None) -> None:
        self.callback = callback
        self._reported = -1.0
        self._lock = threading.Lock()

    def __call__(self, stage: str, fraction: float) -> None:
        if self.callback is None:
            return
        low, high = _PROGRESS_SPAN[stage]
        value = low + (high - low) * min(max(fraction, 0.0), 1.0)
        with self._lock:
            if value < self._reported:
                return
            self._reported = value
            self.callback(value, stage)


def _check_cancel(should_cancel: CancelCheck | None) -> None:
    if should_cancel is not None and should_cancel():
        raise JobCancelled("the job was cancelled")
