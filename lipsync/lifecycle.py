"""What a pipeline's models go through outside any job: which replicas a job runs on, the warm-up a
server runs before it reports ready, and the UNet's compilation.

A job (``LipSyncPipeline.run``) only asks its pipeline's :class:`Placement` for replicas. Servers and
the CLI call :func:`warm_up`, :func:`compile_unet` or :func:`start_compiling` on the pipeline they
load, and :func:`is_compiled` says whether jobs run on the compiled UNet yet.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np
import torch

from lipsync.batching import WindowBatcher
from lipsync.generation import FaceGenerator, Replica, WindowGenerator
from lipsync.gpu_memory import release_failed_call
from lipsync.models.graphed import GraphedUNet
from lipsync.sampling import (
    DirectDenoiser,
    SamplingSettings,
    initial_noise,
    load_scheduler,
    sampling_modes,
)

if TYPE_CHECKING:
    from lipsync.pipeline import LipSyncPipeline

Log = Callable[[str], None]


class Placement:
    """Which of a pipeline's replicas each job runs on: the ones running the fewest jobs.

    ``replicas`` is the pipeline's own list (not a copy), so a replica replaced in it is the one placed.
    """

    def __init__(self, replicas: list[WindowGenerator], split_min_seconds: float) -> None:
        self.replicas, self.split_min_seconds = replicas, split_min_seconds
        self._jobs = [0] * len(replicas)
        self._lock = threading.Lock()

    def parts(self, seconds: float, devices: int | None) -> int:
        """How many replicas a job of ``seconds`` spreads its windows over: ``devices`` (at most all), or
        all for a job of at least ``split_min_seconds`` and one for a shorter job when it is ``None``."""
        if devices is None:
            return len(self.replicas) if seconds >= self.split_min_seconds else 1
        return min(devices, len(self.replicas))

    @contextmanager
    def placed(self, count: int) -> Iterator[list[WindowGenerator]]:
        """The ``count`` replicas running the fewest jobs (the first ones on a tie), held for one job."""
        with self._lock:
            chosen = sorted(range(len(self.replicas)), key=lambda index: (self._jobs[index], index))[:count]
            for index in chosen:
                self._jobs[index] += 1
        try:
            yield [self.replicas[index] for index in chosen]
        finally:
            with self._lock:
                for index in chosen:
                    self._jobs[index] -= 1


def limit_graph_memory(pipeline: LipSyncPipeline, cap_bytes: int) -> None:
    """Bound the CUDA graphs of every local replica's UNets to ``settings.graph_memory_share`` of what
    ``cap_bytes`` (the process's memory cap) leaves beside the memory allocated now (the weights)."""
    for replica in pipeline.local_replicas:
        budget = int(pipeline.settings.graph_memory_share * (cap_bytes - torch.cuda.memory_allocated(replica.device)))
        for unet in (replica.denoiser.unet, replica.compiled):
            if isinstance(unet, GraphedUNet):
                unet.pool_budget = max(0, budget)


def is_compiled(pipeline: LipSyncPipeline) -> bool:
    """Whether every replica that compiles runs its jobs on the compiled UNet."""
    return all(
        replica.compiled is None or replica.denoiser.unet is replica.compiled for replica in pipeline.local_replicas
    )


def warm_up(pipeline: LipSyncPipeline, mode: str = "exact", log: Log | None = None) -> None:
    """Generate from dummy inputs at the UNet call shapes a job of ``mode`` reaches most, with guidance.

    That is 1 window, ``windows_per_call`` windows (one job) and the batchers' ``max_windows`` (when
    calls mix windows of several jobs): ``GraphedUNet`` captures those shapes,
    cuDNN picks its algorithms and the VAE gets its first calls, on the UNet the denoisers use now
    (seconds; the compiled one is :func:`compile_unet`'s). A server calls this before it reports
    ready. Other shapes (other window counts, the shorter last window, no guidance) are captured on
    first use, safely beside running jobs (``GpuGuard``) and in well under a second. A shape that does
    not fit in GPU memory (a ``gpu_memory_gib`` cap) makes the batchers take smaller calls from then on
    instead of failing the start. ``log`` gets one line per shape with its seconds.
    """
    for replica in pipeline.local_replicas:
        _generate_dummy(pipeline, replica, mode, log)


def compile_unet(
    pipeline: LipSyncPipeline,
    modes: Sequence[str] | None = None,
    log: Log | None = None,
) -> None:
    """Compile each replica's UNet (``Replica.compiled``) for every UNet pass of ``modes`` (default: all
    sampling modes), switch the denoisers to it, then capture it at :func:`warm_up`'s shapes.

    Minutes of compilation for the full-size UNet (less with a warm ``TORCHINDUCTOR_CACHE_DIR``). Jobs
    may run meanwhile on the UNet they use now: this thread holds its GPU sections shared for as
    long as a compilation lasts, so their UNets capture no new shapes until it ends (those calls run
    uncaptured). A DDIM loop that started before the switch ends on the UNet it started with, so a
    job running across the switch mixes both: the same weights, within the dtype's rounding.

    GPU memory holds one set of CUDA graphs at a time: the compilation runs uncaptured on one window
    (a compilation serves every batch size), the uncompiled UNet's graphs are freed at the switch,
    and only then are the compiled UNet's graphs captured.
    """
    replicas = pipeline.local_replicas
    pending = [
        replica
        for replica in replicas
        if replica.compiled is not None and replica.denoiser.unet is not replica.compiled
    ]
    if not pending:
        return
    serving = [replica.denoiser.unet for replica in replicas if hasattr(replica.denoiser.unet, "capturing")]
    for unet in serving:
        unet.capturing = False
    try:
        for replica in pending:
            assert replica.compiled is not None  # pending holds replicas that compile
            if isinstance(replica.compiled, GraphedUNet):  # calls as the graphs will make them, uncaptured
                replica.compiled.capturing = False
            staging = Replica(
                replica.vae,
                DirectDenoiser(replica.compiled, load_scheduler()),
                vae_slots=replica.vae_slots,
                vae_frames=replica.vae_frames,
            )
            for mode in modes or sampling_modes():
                _generate_dummy(pipeline, staging, mode, log, what="compiling the UNet", counts=(1,))
        replaced = []
        for replica in pending:
            assert replica.compiled is not None
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
            capturing = Replica(
                replica.vae,
                DirectDenoiser(replica.compiled, load_scheduler()),
                vae_slots=replica.vae_slots,
                vae_frames=replica.vae_frames,
            )
            for mode in modes or sampling_modes():
                _generate_dummy(pipeline, capturing, mode, log, what="capturing the compiled UNet")


COMPILING_LINE = "lipsync: compiling the UNet in the background"
"""How :func:`start_compiling`'s log lines begin: it starts, it failed (jobs keep the eager UNet), the compiled
UNet serves. Each instance that compiles logs the first and then one of the others (``bench_triton`` counts them)."""
COMPILE_FAILED_LINE = "lipsync: compiling the UNet failed"
COMPILED_LINE = "lipsync: compiled UNet serving on"


def start_compiling(pipeline: LipSyncPipeline, log: Log | None = None) -> threading.Thread:
    """:func:`compile_unet` on a daemon thread, for a server that serves on the eager UNet meanwhile.

    ``log`` gets a line saying that it starts, its lines, then one saying when the compiled UNet serves, or
    why it does not (jobs then keep the eager one).
    """
    say = log or (lambda _line: None)
    devices = ", ".join(map(str, pipeline.devices))
    say(f"{COMPILING_LINE} on {devices}")

    def compile_all() -> None:
        started = time.monotonic()
        try:
            compile_unet(pipeline, log=log)
        except Exception as exc:  # noqa: BLE001 - the eager UNet keeps serving
            say(f"{COMPILE_FAILED_LINE}, jobs keep the uncompiled one: {exc!r}")
        else:
            say(f"{COMPILED_LINE} {devices} after {time.monotonic() - started:.1f} s")

    thread = threading.Thread(target=compile_all, name="compile-unet", daemon=True)
    thread.start()
    return thread


def _generate_dummy(
    pipeline: LipSyncPipeline,
    replica: Replica,
    mode: str,
    log: Log | None,
    what: str = "warm-up",
    counts: Sequence[int] | None = None,
) -> None:
    """Generate from zeros on ``replica`` at ``counts`` windows (default: 1, ``windows_per_call`` and the
    batchers' ``max_windows`` as it is now, less than configured once a shape ran out of memory), with
    guidance, with enough DDIM steps to reach every UNet pass of ``mode`` (fast: one caching and one
    shallow step)."""
    settings = SamplingSettings.from_config(pipeline.config, mode, windows_per_call=pipeline.windows_per_call)
    # Every replica's batcher: the replicas hold the same models under the same cap, and a compilation's
    # staging replica has no batcher of its own.
    batchers = [other.denoiser for other in pipeline.local_replicas if isinstance(other.denoiser, WindowBatcher)]
    largest = min((batcher.max_windows for batcher in batchers), default=settings.windows_per_call)
    # Largest first: a graph captured later reuses the blocks the larger capture freed (``GraphedUNet``).
    counts = sorted(counts or {1, settings.windows_per_call, largest}, reverse=True)
    audio = pipeline.audio
    sample_rate, fps = audio.settings.sample_rate, audio.settings.video_fps
    features = audio(np.zeros(sample_rate * (settings.num_frames * counts[0] // fps + 2), np.float32)).cpu()
    random = torch.Generator().manual_seed(settings.seed)
    noise = initial_noise(random, pipeline.resolution // 8)
    for windows in counts:
        started = time.monotonic()
        count = settings.num_frames * windows
        short = replace(settings, steps=min(settings.steps, settings.cache_interval + 1), windows_per_call=windows)
        faces = torch.zeros(count, 3, pipeline.resolution, pipeline.resolution)
        try:
            FaceGenerator([replica], short)(faces, audio.frame_windows(features, count), pipeline.mask, noise, random)
        except torch.OutOfMemoryError as exc:  # over a GPU memory cap: serve with smaller calls rather than not at all
            release_failed_call(exc)  # the larger call's activations, before the next shape's
            if windows == 1 or not batchers:
                raise
            for batcher in batchers:
                batcher.take_fewer_than(windows)
            if log is not None:
                log(
                    f"lipsync: {what} on {replica.device}, {mode}: {windows} window(s) per UNet call do not fit in "
                    f"GPU memory; calls take at most {batchers[0].max_windows}"
                )
            continue
        if log is not None:
            log(
                f"lipsync: {what} on {replica.device}, {mode}, {windows} window(s) per UNet call: "
                f"{time.monotonic() - started:.1f} s"
            )
