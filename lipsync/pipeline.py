"""``LipSyncPipeline``: one object that loads the models once and lip-syncs many videos.

A job is a sequence of named stages, each a method that can be read and tested on its own, as in
diffusers' pipelines: :meth:`~LipSyncPipeline.check_options` (the job's options),
:meth:`~LipSyncPipeline.plan` (audio, output length, devices, noise: a :class:`Job`),
:meth:`~LipSyncPipeline.analyse` (detection and alignment, :mod:`lipsync.analysis`),
:meth:`~LipSyncPipeline.prepare_batch` (the next frames in output order, their faces warped),
:meth:`~LipSyncPipeline.generate` (the batch's faces through the models) and
:meth:`~LipSyncPipeline.finish` (paste-back, YUV, encode). :meth:`~LipSyncPipeline.run` runs them
on threads of their own, so that memory does not grow with the video's length and the passes overlap:

1. *analyse* (its own thread) — decode at 25 fps, detect the face and compute each frame's smoothed
   alignment (only the 2×3 affine is kept per frame);
2. *prepare* (a prefetch thread) — decode again in output order (looping when the audio is longer),
   wait until the batch's alignments are final, warp the faces;
3. *generate* (the job's thread) — VAE encode, DDIM loop and VAE decode of the batch's windows, in
   this process or another;
4. *finish* (an encoder thread and its finishers) — paste-back and encoding of that batch while the
   next batch is generated.

What happens to the models outside a job (placing jobs on replicas, warm-up, compilation) is
:mod:`lipsync.lifecycle`'s.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import torch
from av.video.frame import VideoFrame
from diffusers import AutoencoderKL
from pydantic import Field, NonNegativeFloat, PositiveInt, StrictBool
from pydantic.dataclasses import dataclass as pydantic_dataclass

from lipsync import analysis
from lipsync.analysis import Choosing, FaceTrack, NoFaceError, probe, timed
from lipsync.audio import AudioFeatureExtractor, load_audio, window_count
from lipsync.batching import BatchingSettings, BatchObserver, WindowBatcher
from lipsync.config import PIPELINE_CONFIG, SCHEMA, load_config, load_settings
from lipsync.contract import FaceChoice, check_against_video
from lipsync.errors import BadInput
from lipsync.faces import (
    DetectorPool,
    FaceAligner,
    FaceLandmarks,
    FacePaster,
    FaceSettings,
    MediaPipeFaceDetector,
    load_mask,
)
from lipsync.frames import frames_in_order
from lipsync.generation import FaceGenerator, Replica, WindowGenerator
from lipsync.gpu_guard import GPU_GUARD
from lipsync.lifecycle import Placement
from lipsync.media import MediaSettings, VideoInfo, VideoReader, VideoWriter
from lipsync.media.colour import yuv420p_pictures
from lipsync.models import load_unet
from lipsync.models.compiled import CompiledUNet
from lipsync.models.graphed import GraphedUNet
from lipsync.progress import STAGE_SPANS, EtaSettings, JobSize
from lipsync.remote import pixels_to_faces
from lipsync.sampling import (
    CancelCheck,
    Denoiser,
    DirectDenoiser,
    JobCancelled,
    NoisePredictor,
    SamplingSettings,
    initial_noise,
    load_scheduler,
)
from lipsync.timeline import LoopMode, output_length, source_frames
from lipsync.timing import StageTimer
from lipsync.vae import load_vae
from lipsync.weights import WeightPaths

__all__ = [
    "DTYPES",
    "FrameBatch",
    "Job",
    "JobCancelled",
    "LipSyncPipeline",
    "LipSyncResult",
    "NoFaceError",
    "check_inputs",
]

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
"""Precision names the CLI, the Triton model config and the benchmarks accept."""

ProgressCallback = Callable[[float, str], None]
"""Called with (fraction done in [0, 1], stage name)."""


@dataclass
class LipSyncResult:
    """What a finished job produced."""

    output: Path
    frames: int
    faceless_frames: int
    """Output frames passed through unchanged because no face was found in their source frame."""
    devices: int = 1
    """Devices the job's windows were spread over."""
    seconds: dict[str, float] = field(default_factory=dict)
    """Wall time per stage: audio, decode, detect_align, vae_encode, denoise, vae_decode, paste, encode."""
    face: dict[str, Any] | None = None
    """Which face was synced: ``{"choice", "box", "confidence"}`` (:class:`lipsync.faces.selection.FaceUsed`)."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"output": str(self.output)}


@pydantic_dataclass(frozen=True, config=SCHEMA)
class PipelineSettings:
    """CPU-side parallelism of one job and how the UNet runs; defaults in ``configs/pipeline.yaml``."""

    eta: EtaSettings
    """How a server's ETA learns its stage times (``lipsync.progress.StageRates``)."""
    detect_threads: PositiveInt = 4
    finish_threads: PositiveInt = 4
    analysis_chunk: PositiveInt = 16
    colour_chunk: PositiveInt = 16
    """Frames converted to YUV on the GPU at a time."""
    compile_unet: StrictBool | Literal["auto"] = "auto"
    """Run the UNet through ``torch.compile`` (``CompiledUNet``): ``True``, ``False`` or ``"auto"`` (on CUDA only);
    compiles on first use or in :func:`lipsync.lifecycle.compile_unet`."""
    split_min_seconds: NonNegativeFloat = 60.0
    """On a pipeline with several devices, a job whose output is at least this long spreads its windows over all
    of them (unless it asks for a number of devices); shorter jobs run on the least busy device."""
    graph_memory_share: Annotated[float, Field(gt=0, le=1)] = 0.5
    """Under a GPU memory cap: the share of what the cap leaves beside the loaded weights that CUDA graphs may
    take (:func:`lipsync.lifecycle.limit_graph_memory`); the rest is for the eager work (VAE, uncaptured calls)."""
    window_resolution: PositiveInt = 256
    """The face resolution that window counts given to a pipeline (``windows_per_call``, a batcher's
    ``max_windows``) are meant for. A window of larger faces holds (resolution / window_resolution)² times the
    activations, so it counts that many times: at 1.6's 512 px a setting of 8 windows means 2, and one setting
    bounds the GPU memory of either version."""

    def count_at(self, count: int, resolution: int) -> int:
        """``count`` windows (or frames) of :attr:`window_resolution` faces as a count of ``resolution`` faces
        holding no more activations (at least one)."""
        return max(1, count * self.window_resolution**2 // max(resolution, self.window_resolution) ** 2)

    def compiles_on(self, device: torch.device) -> bool:
        """Whether the UNet is compiled on ``device``."""
        return device.type == "cuda" if self.compile_unet == "auto" else bool(self.compile_unet)

    @classmethod
    def load(cls, path: str | Path = PIPELINE_CONFIG, **overrides: int | bool | str | None) -> PipelineSettings:
        """The settings at ``path`` (read once) with ``overrides`` (``None``: keep the file's); bad values raise :class:`ConfigError`."""
        return load_settings(cls, path, "pipeline config", None, **overrides)


class LipSyncPipeline:
    """Loaded models plus settings; :meth:`run` processes one job through the stages of the module docstring.

    Several threads may call :meth:`run` at once when the denoisers are ``WindowBatcher`` objects: each job
    borrows its own face detector, and their windows share UNet calls.

    With one :class:`Replica` (UNet and VAE) per device, a job runs on the least busy device, or, when it
    is long (``split_min_seconds``) or asks for it, spreads its windows over several devices at once
    (:class:`FaceGenerator`). Whisper and the job's audio run on the first device. The generators may
    also be in another process (``lipsync.remote.RemoteGenerator``, :meth:`with_generators`): this
    pipeline then does the frame work only, on the CPU.
    """

    def __init__(
        self,
        replicas: Sequence[WindowGenerator],
        audio: AudioFeatureExtractor,
        detectors: DetectorPool,
        config: dict[str, Any],
        windows_per_call: int | None = None,
        face_settings: FaceSettings | None = None,
        settings: PipelineSettings | None = None,
    ) -> None:
        if not replicas:
            raise ValueError("a pipeline needs at least one replica")
        self.replicas = list(replicas)
        self.audio = audio
        self.detectors = detectors
        self.settings = settings or PipelineSettings.load()
        self.config = config
        self.resolution: int = config["data"]["resolution"]
        self.windows_per_call = windows_per_call
        self.face_settings = face_settings or FaceSettings.load()
        self.mask = torch.from_numpy(load_mask(self.resolution, self.face_settings))
        self.placement = Placement(self.replicas, self.settings.split_min_seconds)

    @property
    def local_replicas(self) -> list[Replica]:
        """The generators whose models live in this process."""
        return [replica for replica in self.replicas if isinstance(replica, Replica)]

    @property
    def vae(self) -> AutoencoderKL:
        """The first device's VAE."""
        return self.local_replicas[0].vae

    @property
    def denoiser(self) -> Denoiser:
        """The first device's denoiser."""
        return self.local_replicas[0].denoiser

    @property
    def devices(self) -> list[torch.device]:
        """The devices holding a replica, the first one first."""
        return [replica.device for replica in self.replicas]

    @classmethod
    def from_weights(
        cls,
        paths: WeightPaths,
        device: str | torch.device | Sequence[str | torch.device] = "cpu",
        dtype: torch.dtype | None = None,
        detectors: DetectorPool | None = None,
        windows_per_call: int | None = None,
        batching: BatchingSettings | None = None,
        on_batch: BatchObserver | None = None,
        settings: PipelineSettings | None = None,
        cuda_graphs: bool | None = None,
        vae_slots: int | None = None,
    ) -> LipSyncPipeline:
        """Load UNet, VAE and Whisper from a weight set; fp16 on CUDA (like official), fp32 on CPU.

        ``device`` may list several devices: each gets a replica of UNet and VAE (and its own batcher),
        Whisper lives on the first. ``windows_per_call`` and ``batching.max_windows`` count windows of
        ``settings.window_resolution`` faces (fewer of this config's, when its faces are larger), and the
        VAE takes as many frames per call as a window of such faces has. With ``batching``, concurrent :meth:`run` calls share UNet calls through a ``WindowBatcher``
        (``on_batch`` sees each call's size); without it, each job's windows run on their own.
        ``cuda_graphs`` (default: on for CUDA) replays the UNet from CUDA graphs (``GraphedUNet``). Where
        ``settings.compile_unet`` says so (by default on CUDA), each replica also holds the UNet compiled
        (``CompiledUNet``, graphed likewise); jobs use it after ``lipsync.lifecycle.compile_unet``. ``vae_slots`` bounds the
        window groups in VAE encode or decode at once per device (``None``: no bound).
        """
        devices = [torch.device(one) for one in ([device] if isinstance(device, (str, torch.device)) else device)]
        dtype = dtype or (torch.float16 if devices[0].type == "cuda" else torch.float32)
        settings = settings or PipelineSettings.load()
        config = load_config(paths.unet_config)
        resolution = config["data"]["resolution"]
        vae_frames = settings.count_at(config["data"]["num_frames"], resolution)
        if batching is not None:
            batching = batching.at_most(settings.count_at(batching.max_windows, resolution))

        # With a batcher, UNet calls come in its batch sizes (×2 rows with guidance): only those are captured.
        rows = (
            None if batching is None else frozenset(copies * size for size in batching.batch_sizes for copies in (1, 2))
        )

        def replica(device: torch.device) -> Replica:
            unet = load_unet(paths.unet_config, paths.unet, device, dtype)
            graphed = cuda_graphs if cuda_graphs is not None else device.type == "cuda"
            eager: NoisePredictor = GraphedUNet(unet, batch_rows=rows) if graphed else unet
            compiled: NoisePredictor | None = None
            if settings.compiles_on(device):
                compiled = CompiledUNet(unet, frames=config["data"]["num_frames"])
                compiled = GraphedUNet(compiled, batch_rows=rows) if graphed else compiled
            denoiser: Denoiser = (
                DirectDenoiser(eager, load_scheduler())
                if batching is None
                else WindowBatcher(eager, load_scheduler(), batching, on_batch)
            )
            slots = None if vae_slots is None else threading.BoundedSemaphore(vae_slots)
            return Replica(load_vae(paths.vae_dir, device, dtype), denoiser, compiled, slots, vae_frames)

        audio = AudioFeatureExtractor.from_checkpoint(paths.whisper, config, devices[0])
        return cls(
            [replica(device) for device in devices],
            audio,
            detectors or DetectorPool(MediaPipeFaceDetector),
            config,
            None if windows_per_call is None else settings.count_at(windows_per_call, resolution),
            settings=settings,
        )

    @classmethod
    def with_generators(
        cls,
        paths: WeightPaths,
        generators: Sequence[WindowGenerator],
        detectors: DetectorPool | None = None,
        windows_per_call: int | None = None,
        settings: PipelineSettings | None = None,
    ) -> LipSyncPipeline:
        """A pipeline for the frame work of jobs whose windows ``generators`` generate elsewhere
        (``windows_per_call`` counted as in :meth:`from_weights`).

        Loads Whisper only, on the CPU (float32): this process needs no GPU.
        """
        config = load_config(paths.unet_config)
        audio = AudioFeatureExtractor.from_checkpoint(paths.whisper, config, torch.device("cpu"))
        settings = settings or PipelineSettings.load()
        return cls(
            generators,
            audio,
            detectors or DetectorPool(MediaPipeFaceDetector),
            config,
            None if windows_per_call is None else settings.count_at(windows_per_call, config["data"]["resolution"]),
            settings=settings,
        )

    def close(self) -> None:
        """Stop the shared batchers' workers and free the face detectors."""
        for replica in self.local_replicas:
            if isinstance(replica.denoiser, WindowBatcher):
                replica.denoiser.close()
        self.detectors.close()

    def check_options(
        self,
        *,
        inference_steps: int | None = None,
        guidance_scale: float | None = None,
        seed: int | None = None,
        loop_mode: LoopMode | str = LoopMode.PINGPONG,
        mode: str = "exact",
        devices: int | None = None,
    ) -> tuple[SamplingSettings, LoopMode]:
        """A job's options checked against the job contract's ranges (``BadInput`` names the one out of
        range), as the sampling settings of the UNet config, ``mode`` and the overrides given."""
        if devices is not None and devices < 1:
            raise BadInput(f"devices must be at least 1, got {devices}")
        settings = SamplingSettings.from_config(
            self.config,
            mode,
            steps=inference_steps,
            guidance_scale=guidance_scale,
            seed=seed,
            windows_per_call=self.windows_per_call,
        )
        return settings, LoopMode.parse(loop_mode)

    def plan(
        self,
        video: str | Path,
        audio: str | Path,
        settings: SamplingSettings,
        loop_mode: LoopMode = LoopMode.PINGPONG,
        devices: int | None = None,
        progress: ProgressCallback | None = None,
        on_plan: Callable[[JobSize], None] | None = None,
        *,
        face: str = FaceChoice.LARGEST.value,
        face_box: str | None = None,
    ) -> Job:
        """Read the speech and the video's header and decide what the job makes: one output frame per
        audio window (the video looped or cut to them), spread over how many devices, with which noise,
        and how its face is chosen (``face``/``face_box``, checked against the video's frame and tracks).

        ``on_plan`` gets the job's size (what an ETA scales its learned rates by). Nothing is decoded
        from the video yet: its frames are read as :meth:`prepare_batch` asks for them.
        """
        timer = StageTimer(self.devices[0])
        report = _Progress(progress)
        report("audio", 0.0)
        with GPU_GUARD.shared(), timer.stage("audio"):
            waveform = load_audio(audio, self.audio.settings.sample_rate)
            # Per-frame windows are cut on the CPU: a few kilobytes per frame, and no GPU work outside the guard.
            features = self.audio(waveform).cpu()
        fps = self.audio.settings.video_fps
        available = window_count(len(features), self.audio.settings.positions_per_frame)
        audio_frames = min(available, max(1, round(len(waveform) / self.audio.settings.sample_rate * fps)))
        info = probe(Path(video))
        check_against_video(face, face_box, info.width, info.height, info.has_audio)
        choosing = (
            None
            if face == FaceChoice.LARGEST.value
            else Choosing(
                face,
                face_box,
                self._detect_all,
                self.face_settings.selection,
                self.audio.settings.sample_rate,
                fps,
            )
        )
        frames = output_length(audio_frames, max(1, info.frames_at(fps)), loop_mode)
        parts = self.placement.parts(frames / fps, devices)
        if on_plan is not None:
            on_plan(JobSize(frames, settings.steps))
        track = FaceTrack(Path(video).name)
        aligner = FaceAligner(self.resolution, self.face_settings.alignment)
        random = torch.Generator().manual_seed(settings.seed)
        return Job(
            video=Path(video),
            settings=settings,
            waveform=waveform,
            features=features,
            info=info,
            frames=frames,
            parts=parts,
            timer=timer,
            report=report,
            track=track,
            aligner=aligner,
            paster=FacePaster(aligner.crop_size, self.face_settings.paste),
            random=random,
            noise=initial_noise(random, self.resolution // 8),
            source=_generation_frames(Path(video), frames, track, loop_mode, timer),
            choosing=choosing,
        )

    def analyse(self, job: Job, should_cancel: CancelCheck | None = None) -> None:
        """Detect and align the face in every frame of the job's video, publishing the alignments to
        ``job.track`` as they become final (:func:`lipsync.analysis.analyse`; returns when the video ends)."""
        analysis.analyse(
            job.video,
            job.frames,
            self._detect,
            job.aligner,
            job.track,
            job.timer,
            threads=self.settings.detect_threads,
            chunk=self.settings.analysis_chunk,
            on_progress=lambda fraction: job.report("analyse", fraction),
            should_cancel=should_cancel,
            choosing=job.choosing,
        )

    def prepare_batch(self, job: Job) -> FrameBatch:
        """The job's next ``job.batch_frames`` output frames (fewer at the end), in output order, once their
        alignments are final, with their faces warped. Calls come one at a time, in order."""
        sources, originals = zip(*islice(job.source, job.batch_frames), strict=True)
        job.track.wait_for(max(sources))
        placements = [job.track.alignment(index) for index in sources]
        with job.timer.stage("detect_align", sync=False):
            faces = np.stack(
                [job.aligner.warp(frame, affine) for frame, (affine, _) in zip(originals, placements, strict=True)]
            )
        batch = FrameBatch(job.prepared, sources, originals, placements, faces)
        job.prepared += len(sources)
        return batch

    def generate(
        self, job: Job, generator: FaceGenerator, batch: FrameBatch, should_cancel: CancelCheck | None = None
    ) -> np.ndarray:
        """The batch's faces lip-synced to their audio windows: ``(N, R, R, 3)`` floats in [-1, 1].

        Progress is reported after every DDIM step; ``should_cancel`` is asked before each step and
        after each group of windows.
        """
        done_before = batch.start // job.settings.num_frames

        def on_window(_done: int, _total: int) -> None:
            _check_cancel(should_cancel)

        def on_step(done: float) -> None:
            job.report("generate", (done_before + done) / job.windows)

        generated = generator(
            pixels_to_faces(batch.faces).permute(0, 3, 1, 2),
            self.audio.frame_windows(job.features, len(batch.sources), first_frame=batch.start),
            self.mask,
            job.noise,
            job.random,
            on_window=on_window,
            should_cancel=should_cancel,
            on_step=on_step,
        )
        return generated.permute(0, 2, 3, 1).numpy()

    def finish(
        self,
        job: Job,
        batch: FrameBatch,
        faces: np.ndarray,
        writer: VideoWriter,
        finishers: Executor,
        device: torch.device,
    ) -> None:
        """Paste the generated ``faces`` back into the batch's frames on the ``finishers``, convert them to
        YUV 4:2:0 and encode them in order: on a GPU ``device`` the conversion runs there, ``colour_chunk``
        frames at a time; on the CPU per frame through swscale (faster there than tensor arithmetic)."""
        if device.type == "cuda":
            pasted = finishers.map(partial(self._paste, job), batch.originals, batch.placements, faces)
            pictures = yuv420p_pictures(writer, pasted, device, self.settings.colour_chunk, job.timer)
        else:

            def paste_and_convert(
                frame: np.ndarray, placement: tuple[np.ndarray, bool], face: np.ndarray
            ) -> VideoFrame:
                pasted = self._paste(job, frame, placement, face)
                with job.timer.stage("encode", sync=False):
                    return writer.picture(pasted)

            pictures = finishers.map(paste_and_convert, batch.originals, batch.placements, faces)
        for picture in pictures:
            with job.timer.stage("encode", sync=False):
                writer.write_picture(picture)

    def run(
        self,
        video: str | Path,
        audio: str | Path,
        output: str | Path,
        *,
        inference_steps: int | None = None,
        guidance_scale: float | None = None,
        seed: int | None = None,
        loop_mode: LoopMode | str = LoopMode.PINGPONG,
        mode: str = "exact",
        devices: int | None = None,
        crf: int | None = None,
        face: str = FaceChoice.LARGEST.value,
        face_box: str | None = None,
        progress: ProgressCallback | None = None,
        should_cancel: CancelCheck | None = None,
        on_plan: Callable[[JobSize], None] | None = None,
    ) -> LipSyncResult:
        """Lip-sync ``video`` to ``audio`` and write an H.264/AAC mp4 to ``output``.

        ``mode`` names a sampling mode of ``configs/sampling_modes.yaml``: ``exact`` (official) or ``fast``.
        ``devices``: how many of the pipeline's devices the job's windows are spread over (at most all of
        them); ``None``: all for a job of at least ``split_min_seconds``, else one. The output is the same.
        ``crf``: the H.264 quality of the output; ``None``: ``configs/media.yaml``'s.
        ``face``/``face_box``: which face to sync when several show (:mod:`lipsync.faces.selection`).
        ``on_plan`` gets the job's size once the audio is read (what an ETA scales its learned rates by).

        Raises ``MediaError``/``AudioError`` for unreadable inputs, ``NoFaceError`` when no frame
        has a face, ``JobCancelled`` when ``should_cancel`` says so; ``output`` is then not written.
        """
        settings, loop_mode = self.check_options(
            inference_steps=inference_steps,
            guidance_scale=guidance_scale,
            seed=seed,
            loop_mode=loop_mode,
            mode=mode,
            devices=devices,
        )
        job = self.plan(video, audio, settings, loop_mode, devices, progress, on_plan, face=face, face_box=face_box)
        faceless = 0
        # Four threads beside this one: the analysis detects faces ahead of generation; the prefetcher
        # prepares the next batch while this thread generates the current one; the previous batch is
        # pasted back on the finisher threads, converted to YUV and encoded in order by the encoder
        # thread. Waiting for the previous batch before queueing the next keeps the frame order and
        # holds at most three batches of frames (next, current, previous), whatever the video's length.
        with (
            self.placement.placed(job.parts) as replicas,
            ThreadPoolExecutor(1, thread_name_prefix="analysis") as analyser,
            VideoWriter(
                output,
                job.info.width,
                job.info.height,
                self.audio.settings.video_fps,
                audio=job.waveform,
                settings=self._media(crf),
            ) as writer,
            ThreadPoolExecutor(1, thread_name_prefix="prefetch") as prefetch,
            ThreadPoolExecutor(1, thread_name_prefix="encoder") as encoder,
            ThreadPoolExecutor(self.settings.finish_threads, thread_name_prefix="finisher") as finishers,
        ):
            analyser.submit(self.analyse, job, should_cancel)
            generator = FaceGenerator(replicas, job.settings, job.timer)
            try:
                finishing: Future | None = None
                upcoming = prefetch.submit(self.prepare_batch, job)
                for start in range(0, job.frames, job.batch_frames):
                    batch = upcoming.result()
                    if start + job.batch_frames < job.frames:
                        upcoming = prefetch.submit(self.prepare_batch, job)
                    faceless += batch.faceless
                    faces = self.generate(job, generator, batch, should_cancel)
                    if finishing is not None:
                        finishing.result()
                    finishing = encoder.submit(self.finish, job, batch, faces, writer, finishers, replicas[0].device)
                job.report("encode", 0.0)
                if finishing is not None:
                    finishing.result()
            finally:
                job.track.stop()
            with job.timer.stage("encode", sync=False):
                writer.close()
        job.report("encode", 1.0)
        used = None if job.track.used is None else job.track.used.as_dict()
        return LipSyncResult(Path(output), job.frames, faceless, job.parts, job.timer.as_dict(), used)

    @staticmethod
    def _media(crf: int | None) -> MediaSettings | None:
        """The output's encoder settings: ``configs/media.yaml``'s, with the job's ``crf`` if it gave one."""
        return None if crf is None else replace(MediaSettings.load(), crf=crf)

    def _paste(self, job: Job, frame: np.ndarray, placement: tuple[np.ndarray, bool], face: np.ndarray) -> np.ndarray:
        """``face`` pasted into ``frame``; a frame without a face of its own is passed through."""
        affine, has_face = placement
        if not has_face:
            return frame
        with job.timer.stage("paste", sync=False):
            return job.paster.paste(frame, face, affine)

    def _detect(self, frame: np.ndarray) -> FaceLandmarks | None:
        with self.detectors.borrow() as detector:
            return detector.detect(frame)

    def _detect_all(self, frame: np.ndarray) -> list[FaceLandmarks]:
        with self.detectors.borrow() as detector:
            return detector.detect_all(frame)


@dataclass(eq=False)
class Job:
    """One job's plan and what its stages share (made by :meth:`LipSyncPipeline.plan`)."""

    video: Path
    settings: SamplingSettings
    waveform: np.ndarray
    """The speech, mono float32 at the audio model's rate (muxed into the output)."""
    features: torch.Tensor
    """Whisper features of the whole speech, on the CPU."""
    info: VideoInfo
    frames: int
    """Output frames: one per audio window."""
    parts: int
    """Devices the job's windows are spread over."""
    timer: StageTimer
    report: _Progress
    track: FaceTrack
    """The analysis' alignments, published as they become final."""
    aligner: FaceAligner
    paster: FacePaster
    random: torch.Generator
    """The job's CPU generator: the shared noise first, then the VAE's sampling noise, window by window."""
    noise: torch.Tensor
    """``(1, 4, 1, R/8, R/8)`` initial noise shared by every frame."""
    source: Iterator[tuple[int, np.ndarray]]
    """``(source frame index, frame)`` per output frame, decoded as :meth:`LipSyncPipeline.prepare_batch` asks."""
    choosing: Choosing | None = None
    """How the analysis picks the face among several (``None``: the largest in each frame)."""
    prepared: int = 0
    """Output frames prepared so far."""

    @property
    def batch_frames(self) -> int:
        """Frames per :class:`FaceGenerator` call: ``windows_per_call`` windows per device."""
        return self.settings.num_frames * self.settings.windows_per_call * self.parts

    @property
    def windows(self) -> int:
        return -(-self.frames // self.settings.num_frames)


@dataclass(frozen=True)
class FrameBatch:
    """Consecutive output frames ready for generation."""

    start: int
    """Output index of the first frame."""
    sources: tuple[int, ...]
    """Source frame index of each output frame."""
    originals: tuple[np.ndarray, ...]
    placements: list[tuple[np.ndarray, bool]]
    """``(frame→crop affine, whether the frame has its own face)`` per frame."""
    faces: np.ndarray
    """``(N, R, R, 3)`` uint8 aligned faces."""

    @property
    def faceless(self) -> int:
        """Frames passed through unpasted: no face of their own."""
        return sum(not has_face for _, has_face in self.placements)


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
    yield from zip(rest, timed(frames_in_order(video, rest), timer, "decode"), strict=False)


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
        low, high = STAGE_SPANS[stage]
        value = low + (high - low) * min(max(fraction, 0.0), 1.0)
        with self._lock:
            if value < self._reported:
                return
            self._reported = value
            self.callback(value, stage)


def _check_cancel(should_cancel: CancelCheck | None) -> None:
    if should_cancel is not None and should_cancel():
        raise JobCancelled("the job was cancelled")
