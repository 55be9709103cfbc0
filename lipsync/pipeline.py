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
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from itertools import islice
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from av.video.frame import VideoFrame
from diffusers import AutoencoderKL
from pydantic import NonNegativeFloat, PositiveInt, StrictBool
from pydantic.dataclasses import dataclass as pydantic_dataclass

from lipsync.analysis import Choosing, FaceTrack, NoFaceError, analyse, probe, timed
from lipsync.audio import AudioFeatureExtractor, load_audio, window_count
from lipsync.batching import BatchingSettings, BatchObserver, WindowBatcher
from lipsync.config import CONFIG_DIR, SCHEMA, load_config, load_settings
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
from lipsync.media import MediaSettings, VideoReader, VideoWriter
from lipsync.media.colour import rgb_to_yuv420p
from lipsync.models import load_unet
from lipsync.models.compiled import CompiledUNet
from lipsync.models.graphed import GraphedUNet
from lipsync.progress import STAGE_SPANS, JobSize
from lipsync.sampling import (
    CancelCheck,
    Denoiser,
    DirectDenoiser,
    JobCancelled,
    NoisePredictor,
    SamplingSettings,
    initial_noise,
    load_scheduler,
    sampling_modes,
)
from lipsync.timeline import LoopMode, output_length, source_frames
from lipsync.timing import StageTimer
from lipsync.vae import load_vae
from lipsync.weights import WeightPaths

__all__ = ["DTYPES", "JobCancelled", "LipSyncPipeline", "LipSyncResult", "NoFaceError", "check_inputs"]

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
"""Precision names the CLI, the Triton model config and the benchmarks accept."""

ProgressCallback = Callable[[float, str], None]
"""Called with (fraction done in [0, 1], stage name)."""

PIPELINE_CONFIG = CONFIG_DIR / "pipeline.yaml"


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

    detect_threads: PositiveInt = 4
    finish_threads: PositiveInt = 4
    analysis_chunk: PositiveInt = 16
    colour_chunk: PositiveInt = 16
    """Frames converted to YUV on the GPU at a time."""
    compile_unet: StrictBool | Literal["auto"] = "auto"
    """Run the UNet through ``torch.compile`` (``CompiledUNet``): ``True``, ``False`` or ``"auto"`` (on CUDA only);
    compiles on first use or in :meth:`LipSyncPipeline.warm_up`."""
    split_min_seconds: NonNegativeFloat = 60.0
    """On a pipeline with several devices, a job whose output is at least this long spreads its windows over all
    of them (unless it asks for a number of devices); shorter jobs run on the least busy device."""
    eta_history_jobs: PositiveInt = 8
    """Finished jobs a server's ETA learns its stage times from (``lipsync.progress.StageRates``)."""

    def compiles_on(self, device: torch.device) -> bool:
        """Whether the UNet is compiled on ``device``."""
        return device.type == "cuda" if self.compile_unet == "auto" else bool(self.compile_unet)

    @classmethod
    def load(cls, path: str | Path = PIPELINE_CONFIG, **overrides: int | bool | str | None) -> PipelineSettings:
        """The settings at ``path`` (read once) with ``overrides`` (``None``: keep the file's); bad values raise :class:`ConfigError`."""
        return load_settings(cls, path, "pipeline config", **overrides)


class LipSyncPipeline:
    """Loaded models plus settings; :meth:`run` processes one job.

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
        self.windows_per_call = windows_per_call
        self.settings = settings or PipelineSettings.load()
        self.config = config
        self.resolution: int = config["data"]["resolution"]
        self.face_settings = face_settings or FaceSettings.load()
        self.mask = torch.from_numpy(load_mask(self.resolution, self.face_settings))
        self._jobs_per_replica = [0] * len(self.replicas)
        self._placing = threading.Lock()

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
        Whisper lives on the first. With ``batching``, concurrent :meth:`run` calls share UNet calls through a ``WindowBatcher``
        (``on_batch`` sees each call's size); without it, each job's windows run on their own.
        ``cuda_graphs`` (default: on for CUDA) replays the UNet from CUDA graphs (``GraphedUNet``). Where
        ``settings.compile_unet`` says so (by default on CUDA), each replica also holds the UNet compiled
        (``CompiledUNet``, graphed likewise); jobs use it after :meth:`compile_unet`. ``vae_slots`` bounds the
        window groups in VAE encode or decode at once per device (``None``: no bound).
        """
        devices = [torch.device(one) for one in ([device] if isinstance(device, (str, torch.device)) else device)]
        dtype = dtype or (torch.float16 if devices[0].type == "cuda" else torch.float32)
        settings = settings or PipelineSettings.load()
        config = load_config(paths.unet_config)

        # With a batcher, UNet calls come in its batch sizes (×2 rows with guidance): only those are captured.
        rows = None if batching is None else frozenset(copies * size for size in batching.batch_sizes for copies in (1, 2))

        def replica(device: torch.device) -> Replica:
            unet = load_unet(paths.unet_config, paths.unet, device, dtype)
            graphed = cuda_graphs if cuda_graphs is not None else device.type == "cuda"
            eager: NoisePredictor = GraphedUNet(unet, batch_rows=rows) if graphed else unet
            compiled: NoisePredictor | None = None
            if settings.compiles_on(device):
                compiled = CompiledUNet(unet, frames=config["data"]["num_frames"])
                compiled = GraphedUNet(compiled, batch_rows=rows) if graphed else compiled
            denoiser: Denoiser = (
                DirectDenoiser(eager, load_scheduler()) if batching is None
                else WindowBatcher(eager, load_scheduler(), batching, on_batch)
            )
            slots = None if vae_slots is None else threading.BoundedSemaphore(vae_slots)
            return Replica(load_vae(paths.vae_dir, device, dtype), denoiser, compiled, slots)

        audio = AudioFeatureExtractor.from_checkpoint(paths.whisper, config, devices[0])
        return cls(
            [replica(device) for device in devices], audio, detectors or DetectorPool(MediaPipeFaceDetector),
            config, windows_per_call, settings=settings,
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
        """A pipeline for the frame work of jobs whose windows ``generators`` generate elsewhere.

        Loads Whisper only, on the CPU (float32): this process needs no GPU.
        """
        config = load_config(paths.unet_config)
        audio = AudioFeatureExtractor.from_checkpoint(paths.whisper, config, torch.device("cpu"))
        return cls(
            generators, audio, detectors or DetectorPool(MediaPipeFaceDetector), config, windows_per_call,
            settings=settings,
        )

    def warm_up(
        self, mode: str = "exact", max_windows: int | None = None, log: Callable[[str], None] | None = None
    ) -> None:
        """Generate from dummy inputs at the UNet call shapes a job of ``mode`` reaches most, with guidance.

        That is 1 window, ``windows_per_call`` windows (one job) and ``max_windows`` windows (the
        batcher's cap, when calls mix windows of several jobs): ``GraphedUNet`` captures those shapes,
        cuDNN picks its algorithms and the VAE gets its first calls, on the UNet the denoisers use now
        (seconds; the compiled one is :meth:`compile_unet`'s). A server calls this before it reports
        ready. Other shapes (other window counts, the shorter last window, no guidance) are captured on
        first use, safely beside running jobs (``GpuGuard``) and in well under a second. ``log`` gets
        one line per shape with its seconds.
        """
        for replica in self.local_replicas:
            self._generate_dummy(replica, mode, max_windows, log)

    @property
    def compiled(self) -> bool:
        """Whether every replica that compiles runs its jobs on the compiled UNet."""
        return all(replica.compiled is None or replica.denoiser.unet is replica.compiled for replica in self.local_replicas)

    def compile_unet(
        self, modes: Sequence[str] | None = None, max_windows: int | None = None, log: Callable[[str], None] | None = None
    ) -> None:
        """Compile each replica's UNet (``Replica.compiled``) for every UNet pass of ``modes`` (default: all
        sampling modes), switch the denoisers to it, then capture it at :meth:`warm_up`'s shapes.

        Minutes of compilation for the full-size UNet (less with a warm ``TORCHINDUCTOR_CACHE_DIR``). Jobs
        may run meanwhile on the UNet they use now: this thread holds its GPU sections shared for as
        long as a compilation lasts, so their UNets capture no new shapes until it ends (those calls run
        uncaptured). A DDIM loop that started before the switch ends on the UNet it started with, so a
        job running across the switch mixes both: the same weights, within the dtype's rounding.

        GPU memory holds one set of CUDA graphs at a time: the compilation runs uncaptured on one window
        (a compilation serves every batch size), the uncompiled UNet's graphs are freed at the switch,
        and only then are the compiled UNet's graphs captured.
        """
        pending = [
            replica for replica in self.local_replicas
            if replica.compiled is not None and replica.denoiser.unet is not replica.compiled
        ]
        if not pending:
            return
        serving = [replica.denoiser.unet for replica in self.local_replicas if hasattr(replica.denoiser.unet, "capturing")]
        for unet in serving:
            unet.capturing = False
        try:
            for replica in pending:
                if isinstance(replica.compiled, GraphedUNet):  # calls as the graphs will make them, uncaptured
                    replica.compiled.capturing = False
                staging = Replica(replica.vae, DirectDenoiser(replica.compiled, load_scheduler()), vae_slots=replica.vae_slots)
                for mode in modes or sampling_modes():
                    self._generate_dummy(staging, mode, None, log, what="compiling the UNet", counts=(1,))
            replaced = []
            for replica in pending:
                replaced.append(replica.denoiser.unet)
                replica.denoiser.unet = replica.compiled
        finally:
            for unet in serving:
                unet.capturing = True
        for unet in replaced:  # a loop still running on it ends eagerly; its graphs' memory is freed
            if isinstance(unet, GraphedUNet):
                unet.release()
        for replica in pending:
            if isinstance(replica.compiled, GraphedUNet):
                replica.compiled.capturing = True
                capturing = Replica(replica.vae, DirectDenoiser(replica.compiled, load_scheduler()), vae_slots=replica.vae_slots)
                for mode in modes or sampling_modes():
                    self._generate_dummy(capturing, mode, max_windows, log, what="capturing the compiled UNet")

    def start_compiling(self, max_windows: int | None = None, log: Callable[[str], None] | None = None) -> threading.Thread:
        """:meth:`compile_unet` on a daemon thread, for a server that serves on the eager UNet meanwhile.

        ``log`` gets its lines, then one saying when the compiled UNet serves, or why it does not (jobs
        then keep the eager one).
        """
        say = log or (lambda _line: None)

        def compile_all() -> None:
            started = time.monotonic()
            try:
                self.compile_unet(max_windows=max_windows, log=log)
            except Exception as exc:  # noqa: BLE001 - the eager UNet keeps serving
                say(f"lipsync: compiling the UNet failed, jobs keep the uncompiled one: {exc!r}")
            else:
                say(f"lipsync: compiled UNet serving on {', '.join(map(str, self.devices))} after "
                    f"{time.monotonic() - started:.1f} s")

        thread = threading.Thread(target=compile_all, name="compile-unet", daemon=True)
        thread.start()
        return thread

    def _generate_dummy(
        self,
        replica: Replica,
        mode: str,
        max_windows: int | None,
        log: Callable[[str], None] | None,
        what: str = "warm-up",
        counts: Sequence[int] | None = None,
    ) -> None:
        """Generate from zeros on ``replica`` at ``counts`` windows (default: 1, ``windows_per_call`` and
        ``max_windows``), with guidance, with enough DDIM steps to reach every UNet pass of ``mode`` (fast:
        one caching and one shallow step)."""
        settings = SamplingSettings.from_config(self.config, mode, windows_per_call=self.windows_per_call)
        counts = sorted(counts or {1, settings.windows_per_call, max_windows or settings.windows_per_call})
        sample_rate, fps = self.audio.settings.sample_rate, self.audio.settings.video_fps
        features = self.audio(np.zeros(sample_rate * (settings.num_frames * counts[-1] // fps + 2), np.float32)).cpu()
        random = torch.Generator().manual_seed(settings.seed)
        noise = initial_noise(random, self.resolution // 8)
        for windows in counts:
            started = time.monotonic()
            count = settings.num_frames * windows
            short = replace(settings, steps=min(settings.steps, settings.cache_interval + 1), windows_per_call=windows)
            faces = torch.zeros(count, 3, self.resolution, self.resolution)
            FaceGenerator([replica], short)(faces, self.audio.frame_windows(features, count), self.mask, noise, random)
            if log is not None:
                log(f"lipsync: {what} on {replica.device}, {mode}, {windows} window(s) per UNet call: "
                    f"{time.monotonic() - started:.1f} s")

    def close(self) -> None:
        """Stop the shared batchers' workers and free the face detectors."""
        for replica in self.local_replicas:
            if isinstance(replica.denoiser, WindowBatcher):
                replica.denoiser.close()
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
        devices: int | None = None,
        crf: int | None = None,
        face: str = "largest",
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
        loop_mode = LoopMode.parse(loop_mode)
        settings = SamplingSettings.from_config(
            self.config, mode, steps=steps, guidance_scale=guidance_scale, seed=seed,
            windows_per_call=self.windows_per_call,
        )
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
        choosing = None if face == FaceChoice.LARGEST.value else Choosing(
            face, face_box, self._detect_all, self.face_settings.selection, self.audio.settings.sample_rate, fps,
        )
        output_frames = output_length(audio_frames, max(1, info.frames_at(fps)), loop_mode)
        parts = self._parts(output_frames / fps, devices)
        if on_plan is not None:
            on_plan(JobSize(output_frames, settings.steps))

        track = FaceTrack(Path(video).name)
        aligner = FaceAligner(self.resolution, self.face_settings.alignment)
        random = torch.Generator().manual_seed(settings.seed)
        noise = initial_noise(random, self.resolution // 8)
        paster = FacePaster(aligner.crop_size, self.face_settings.paste)
        batch = settings.num_frames * settings.windows_per_call * parts
        total_windows = -(-output_frames // settings.num_frames)
        frames = _generation_frames(Path(video), output_frames, track, loop_mode, timer)
        faceless = 0

        def prepare() -> _FrameBatch:
            """The next batch's frames, in output order, with final alignments and warped faces."""
            sources, originals = zip(*islice(frames, batch))
            track.wait_for(max(sources))
            placements = [track.alignment(index) for index in sources]
            with timer.stage("detect_align", sync=False):
                faces = np.stack([aligner.warp(frame, affine) for frame, (affine, _) in zip(originals, placements)])
            return _FrameBatch(sources, originals, placements, faces)

        def paste(frame: np.ndarray, placement: tuple[np.ndarray, bool], face: np.ndarray) -> np.ndarray:
            affine, has_face = placement
            if not has_face:
                return frame
            with timer.stage("paste", sync=False):
                return paster.paste(frame, face, affine)

        def paste_and_convert(frame: np.ndarray, placement: tuple[np.ndarray, bool], face: np.ndarray) -> VideoFrame:
            pasted = paste(frame, placement, face)
            with timer.stage("encode", sync=False):
                return writer.picture(pasted)

        def finish(prepared: _FrameBatch, generated: np.ndarray) -> None:
            """Paste on the finisher threads; YUV on the GPU in chunks, or per frame through swscale on the CPU."""
            if replicas[0].device.type == "cuda":
                pasted = finishers.map(paste, prepared.originals, prepared.placements, generated)
                pictures = yuv420p_pictures(writer, pasted, replicas[0].device, self.settings.colour_chunk, timer)
            else:
                pictures = finishers.map(paste_and_convert, prepared.originals, prepared.placements, generated)
            for picture in pictures:
                with timer.stage("encode", sync=False):
                    writer.write_picture(picture)

        # Four threads beside this one: the analysis detects faces ahead of generation
        # (lipsync.analysis); the prefetcher decodes and warps the next batch while this thread
        # generates the current one; the previous batch is pasted back on the finisher threads,
        # converted to YUV and encoded in order by the encoder thread. Waiting for the previous
        # batch before queueing the next keeps the frame order and holds at most three batches of
        # frames (next, current, previous), whatever the video's length.
        with (
            self._placed(parts) as replicas,
            ThreadPoolExecutor(1, thread_name_prefix="analysis") as analysis,
            VideoWriter(output, info.width, info.height, fps, audio=waveform, settings=self._media(crf)) as writer,
            ThreadPoolExecutor(1, thread_name_prefix="prefetch") as prefetch,
            ThreadPoolExecutor(1, thread_name_prefix="encoder") as encoder,
            ThreadPoolExecutor(self.settings.finish_threads, thread_name_prefix="finisher") as finishers,
        ):
            analysis.submit(
                analyse, Path(video), output_frames, self._detect, aligner, track, timer,
                threads=self.settings.detect_threads, chunk=self.settings.analysis_chunk,
                on_progress=lambda fraction: report("analyse", fraction), should_cancel=should_cancel,
                choosing=choosing,
            )
            generator = FaceGenerator(replicas, settings, timer)
            try:
                finishing: Future | None = None
                starts = range(0, output_frames, batch)
                upcoming = prefetch.submit(prepare)
                for start in starts:
                    prepared = upcoming.result()
                    if start + batch < output_frames:
                        upcoming = prefetch.submit(prepare)
                    faceless += sum(not has_face for _, has_face in prepared.placements)
                    done_before = start // settings.num_frames

                    def on_window(_done: int, _total: int) -> None:
                        _check_cancel(should_cancel)

                    def on_step(done: float) -> None:
                        report("generate", (done_before + done) / total_windows)

                    generated = generator(
                        torch.from_numpy(prepared.faces).permute(0, 3, 1, 2).float() / 127.5 - 1,
                        self.audio.frame_windows(features, len(prepared.sources), first_frame=start),
                        self.mask,
                        noise,
                        random,
                        on_window=on_window,
                        should_cancel=should_cancel,
                        on_step=on_step,
                    )
                    if finishing is not None:
                        finishing.result()
                    finishing = encoder.submit(finish, prepared, generated.permute(0, 2, 3, 1).numpy())
                report("encode", 0.0)
                if finishing is not None:
                    finishing.result()
            finally:
                track.stop()
            with timer.stage("encode", sync=False):
                writer.close()
        report("encode", 1.0)
        used = None if track.used is None else track.used.as_dict()
        return LipSyncResult(Path(output), output_frames, faceless, parts, timer.as_dict(), used)

    @staticmethod
    def _media(crf: int | None) -> MediaSettings | None:
        """The output's encoder settings: ``configs/media.yaml``'s, with the job's ``crf`` if it gave one."""
        return None if crf is None else replace(MediaSettings.load(), crf=crf)

    def _parts(self, seconds: float, devices: int | None) -> int:
        """How many devices a job of ``seconds`` spreads its windows over."""
        if devices is None:
            return len(self.replicas) if seconds >= self.settings.split_min_seconds else 1
        if devices < 1:
            raise BadInput(f"devices must be at least 1, got {devices}")
        return min(devices, len(self.replicas))

    @contextmanager
    def _placed(self, count: int) -> Iterator[list[Replica]]:
        """The ``count`` replicas running the fewest jobs (the first devices on a tie), held for one job."""
        with self._placing:
            chosen = sorted(range(len(self.replicas)), key=lambda index: (self._jobs_per_replica[index], index))[:count]
            for index in chosen:
                self._jobs_per_replica[index] += 1
        try:
            yield [self.replicas[index] for index in chosen]
        finally:
            with self._placing:
                for index in chosen:
                    self._jobs_per_replica[index] -= 1

    def _detect(self, frame: np.ndarray) -> FaceLandmarks | None:
        with self.detectors.borrow() as detector:
            return detector.detect(frame)

    def _detect_all(self, frame: np.ndarray) -> list[FaceLandmarks]:
        with self.detectors.borrow() as detector:
            return detector.detect_all(frame)


@dataclass(frozen=True)
class _FrameBatch:
    """One batch of output frames ready for generation."""

    sources: tuple[int, ...]
    """Source frame index of each output frame."""
    originals: tuple[np.ndarray, ...]
    placements: list[tuple[np.ndarray, bool]]
    """``(frame→crop affine, whether the frame has its own face)`` per frame."""
    faces: np.ndarray
    """``(N, R, R, 3)`` uint8 aligned faces."""


def yuv420p_pictures(
    writer: VideoWriter, frames: Iterator[np.ndarray], device: torch.device, chunk: int, timer: StageTimer | None = None
) -> Iterator[VideoFrame]:
    """RGB frames as encoder pictures, in order, converted to YUV 4:2:0 on ``device`` ``chunk`` frames at a time.

    What the pipeline does on a GPU (:func:`~lipsync.media.colour.rgb_to_yuv420p`); on the CPU, swscale
    (``VideoWriter.picture``) is faster than tensor arithmetic, so the pipeline uses that there.
    """
    timer = timer or StageTimer()
    width, height = writer.output_size
    while group := list(islice(frames, chunk)):
        with GPU_GUARD.shared(), timer.stage("encode", sync=False):
            rgb = torch.from_numpy(np.stack([frame[:height, :width] for frame in group])).to(device)
            planes = rgb_to_yuv420p(rgb).cpu().numpy()
        for picture_planes in planes:
            yield writer.picture_from_yuv420p(picture_planes)


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
