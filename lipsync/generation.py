"""Face generation: aligned faces and their audio windows in, lip-synced faces out.

A job's frames are cut into 16-frame windows and the windows into groups (:class:`WindowGroup`); a
:class:`WindowGenerator` turns one group into faces: :class:`Replica` with the models of one device in
this process (VAE encode, the DDIM loop of :mod:`lipsync.sampling`, VAE decode), or
``lipsync.remote.RemoteGenerator`` in another process. :class:`FaceGenerator` spreads a job's groups
over its generators.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import AbstractContextManager, ExitStack, nullcontext
from dataclasses import dataclass, replace
from typing import Protocol

import torch
from diffusers import AutoencoderKL

from lipsync.gpu_guard import GPU_GUARD
from lipsync.sampling import (
    CancelCheck,
    Denoiser,
    NoisePredictor,
    SamplingSettings,
    WindowBatch,
)
from lipsync.timing import StageTimer
from lipsync.vae import decode_latents, encode_latents, sampling_noise


@dataclass(frozen=True)
class WindowGroup:
    """Consecutive, equally long windows of one job: what one :class:`WindowGenerator` call turns into faces."""

    faces: torch.Tensor
    """Aligned faces ``(N, 3, R, R)`` in [-1, 1], ``N`` = windows × ``window_frames``."""
    audio: torch.Tensor
    """Per-frame audio windows ``(N, tokens, dim)``."""
    mask: torch.Tensor
    """``(R, R)`` mouth mask, 1 = keep, 0 = generate."""
    noise: torch.Tensor
    """``(1, 4, 1, R/8, R/8)`` initial noise shared by the video."""
    masked_noise: torch.Tensor
    """VAE sampling noise of the masked faces ``(N, 4, R/8, R/8)``, drawn by the caller in official order."""
    reference_noise: torch.Tensor
    """VAE sampling noise of the unmasked faces, likewise."""
    window_frames: int
    steps: int
    guidance_scale: float
    cache_interval: int = 1
    on_step: Callable[[int], None] | None = None
    """Told the DDIM steps done after every step (see ``WindowBatch.on_step``)."""
    should_cancel: CancelCheck | None = None

    @property
    def windows(self) -> int:
        return self.faces.shape[0] // self.window_frames

    def window_slices(self) -> list[slice]:
        return [slice(start, start + self.window_frames) for start in range(0, self.faces.shape[0], self.window_frames)]


class WindowGenerator(Protocol):
    """Generates the faces of one :class:`WindowGroup`: in this process (:class:`Replica`) or in a
    model server's generation model (``lipsync.remote.RemoteGenerator``)."""

    @property
    def device(self) -> torch.device: ...

    @property
    def dtype(self) -> torch.dtype: ...

    def generate(self, group: WindowGroup, timer: StageTimer) -> torch.Tensor:
        """``(N, 3, R, R)`` in [-1, 1]: the decoded face where the mask is 0, the input face where it is 1."""
        ...


@dataclass(frozen=True)
class Replica:
    """The models of one device. Replicas hold the same weights, so a window comes out the same on any of them."""

    vae: AutoencoderKL
    denoiser: Denoiser
    compiled: NoisePredictor | None = None
    """The same UNet compiled (``CompiledUNet``), which the denoiser switches to once it is compiled and
    captured (``lipsync.lifecycle.compile_unet``); ``None``: this device does not compile."""
    vae_slots: threading.Semaphore | None = None
    """Bounds the groups in VAE encode or decode at once (their activations are most of a group's GPU
    memory); ``None``: no bound."""
    vae_frames: int | None = None
    """Frames per VAE encode or decode call (fewer for larger faces, so a call's activations stay the same
    size); ``None``: a window's."""

    @property
    def device(self) -> torch.device:
        return self.vae.device

    @property
    def dtype(self) -> torch.dtype:
        return self.vae.dtype

    def generate(self, group: WindowGroup, timer: StageTimer) -> torch.Tensor:
        """Encode, denoise and decode ``group`` on this device."""
        with _current_device(self.device):
            return self._generate(group, timer)

    def _generate(self, group: WindowGroup, timer: StageTimer) -> torch.Tensor:
        # One memory layout whatever the caller's: the VAE's convolutions round differently on channels-last
        # faces (a job's warped batch, permuted from NHWC) than on contiguous ones (a group off the wire), so
        # without it a split job's faces would differ from an unsplit job's in the last bits.
        vae, mask, faces = self.vae, group.mask.to(group.faces.dtype), group.faces.contiguous()
        latent_size = mask.shape[-1] // 8
        latent_mask = torch.nn.functional.interpolate(
            mask[None, None], size=(latent_size, latent_size), mode="nearest"
        )[0]
        windows, length = group.windows, group.window_frames
        chunk = min(length, self.vae_frames or length)
        with self._vae_slot(), GPU_GUARD.shared(), timer.stage("vae_encode"):
            encoded = [
                (
                    encode_latents(vae, faces[window] * mask, chunk_size=chunk, noise=group.masked_noise[window]),
                    encode_latents(vae, faces[window], chunk_size=chunk, noise=group.reference_noise[window]),
                )
                for window in group.window_slices()
            ]
            masked = torch.stack([pair[0] for pair in encoded]).transpose(1, 2).float().cpu()
            reference = torch.stack([pair[1] for pair in encoded]).transpose(1, 2).float().cpu()
        batch = WindowBatch(
            group.noise.expand(windows, -1, length, -1, -1),
            latent_mask[None, :, None].expand(windows, -1, length, -1, -1),
            masked,
            reference,
            group.audio,
            group.steps,
            group.guidance_scale,
            group.cache_interval,
            on_step=group.on_step,
        )
        with timer.stage("denoise"):
            latents = self.denoiser(batch, group.should_cancel)
        with GPU_GUARD.shared():
            generated = latents.transpose(1, 2).flatten(0, 1).cpu()
        with self._vae_slot(), GPU_GUARD.shared(), timer.stage("vae_decode"):
            decoded = decode_latents(vae, generated, chunk_size=chunk).float().cpu().clamp(-1, 1)
        return decoded * (1 - mask) + faces * mask

    def _vae_slot(self) -> AbstractContextManager:
        return nullcontext() if self.vae_slots is None else self.vae_slots


class FaceGenerator:
    """Turns aligned faces plus their audio windows into lip-synced faces (latent diffusion).

    Holds one :class:`Replica` per device it may use; call it with consecutive frames of one video,
    in order. The frames are cut into 16-frame windows, and the windows into groups of
    ``windows_per_call``; each group is encoded, denoised and decoded on one replica. With several
    replicas the groups run at once, group ``k`` on replica ``k mod n``, one thread per replica.

    The caller draws the video's shared ``noise`` once (``initial_noise``) and passes one CPU
    ``generator``. The VAE's sampling noise is drawn from it on the calling thread, window by window
    in official order, before any group starts: a window's result does not depend on which replica
    generates it nor on how windows are grouped.
    """

    def __init__(
        self, replicas: Sequence[WindowGenerator], settings: SamplingSettings, timer: StageTimer | None = None
    ) -> None:
        if not replicas:
            raise ValueError("a FaceGenerator needs at least one replica")
        self.replicas, self.settings = list(replicas), settings
        self.timer = timer or StageTimer()

    @torch.no_grad()
    def __call__(
        self,
        faces: torch.Tensor,
        audio: torch.Tensor,
        mask: torch.Tensor,
        noise: torch.Tensor,
        generator: torch.Generator,
        on_window: Callable[[int, int], None] | None = None,
        should_cancel: CancelCheck | None = None,
        on_step: Callable[[float], None] | None = None,
    ) -> torch.Tensor:
        """Generate faces for ``N`` frames.

        Args:
            faces: aligned faces ``(N, 3, R, R)`` in [-1, 1].
            audio: per-frame audio windows ``(N, tokens, dim)``.
            mask: ``(R, R)`` mouth mask, 1 = keep, 0 = generate.
            noise: ``(1, 4, 1, R/8, R/8)`` shared initial noise.
            generator: CPU generator for the VAE's latent sampling.
            on_window: called on the calling thread with (windows done, windows total) after each group.
            should_cancel: checked by the denoisers before every DDIM step.
            on_step: called with the windows done, fractions of running groups included, after every
                DDIM step of any group; it may run on a denoiser's thread (see ``WindowBatch.on_step``).
        Returns:
            ``(N, 3, R, R)`` in [-1, 1]: the decoded face where the mask is 0 (the mouth), the input
            face where it is 1, as the official pipeline composes them before paste-back.
        Raises:
            ``JobCancelled`` once ``should_cancel`` (or ``on_window``) says so; with several
            replicas, only after every group has stopped.
        """
        count, _, size, _ = faces.shape
        if audio.shape[0] != count:
            raise ValueError(f"{count} faces but {audio.shape[0]} audio windows")
        if mask.shape != (size, size):
            raise ValueError(f"mask must be ({size}, {size}), got {tuple(mask.shape)}")
        frames = self.settings.num_frames
        windows = [slice(start, min(start + frames, count)) for start in range(0, count, frames)]
        dtype = self.replicas[0].dtype
        sampling = {  # masked, then reference: the official order of draws
            window.start: (
                sampling_noise(dtype, window.stop - window.start, size // 8, generator),
                sampling_noise(dtype, window.stop - window.start, size // 8, generator),
            )
            for window in windows
        }
        progress = None if on_step is None else _StepProgress(on_step, self.settings.steps)
        inputs = _GenerationInputs(faces, audio, mask.to(faces.dtype), noise, sampling, should_cancel, progress)
        output = torch.empty_like(faces)
        groups = _equal_length_groups(windows, self.settings.windows_per_call)
        if len(self.replicas) == 1:
            for group in groups:
                output[_span(group)] = self._generate(self.replicas[0], group, inputs)
                if on_window is not None:
                    on_window(windows.index(group[-1]) + 1, len(windows))
        else:
            self._spread(groups, inputs, output, on_window, len(windows))
        return output

    def _spread(
        self,
        groups: list[list[slice]],
        inputs: _GenerationInputs,
        output: torch.Tensor,
        on_window: Callable[[int, int], None] | None,
        total: int,
    ) -> None:
        """Run the groups on all replicas at once; on any error (a cancel included), stop them all, then raise."""
        abandoned = threading.Event()
        asked = inputs.should_cancel
        inputs = replace(inputs, should_cancel=lambda: abandoned.is_set() or (asked is not None and asked()))
        replicas = self.replicas[: len(groups)]

        def generate(lane: int, group: list[slice]) -> None:
            output[_span(group)] = self._generate(replicas[lane], group, inputs)

        with ExitStack() as lanes:
            threads = [lanes.enter_context(ThreadPoolExecutor(1, f"replica-{lane}")) for lane in range(len(replicas))]
            futures = {
                threads[index % len(threads)].submit(generate, index % len(threads), group): len(group)
                for index, group in enumerate(groups)
            }
            try:
                done = 0
                for future in as_completed(futures):
                    future.result()
                    done += futures[future]
                    if on_window is not None:
                        on_window(done, total)
            except BaseException:
                abandoned.set()  # running groups leave their DDIM loops within one step
                for future in futures:
                    future.cancel()
                raise

    def _generate(self, replica: WindowGenerator, group: list[slice], inputs: _GenerationInputs) -> torch.Tensor:
        """Generate one group of consecutive, equally long windows on ``replica``.

        Timed on a timer of ``replica``'s device (its syncs wait for that device's work), added to the job's.
        """
        timer = StageTimer(replica.device)
        span = _span(group)
        try:
            return replica.generate(
                WindowGroup(
                    inputs.faces[span],
                    inputs.audio[span],
                    inputs.mask,
                    inputs.noise,
                    torch.cat([inputs.sampling[window.start][0] for window in group]),
                    torch.cat([inputs.sampling[window.start][1] for window in group]),
                    group[0].stop - group[0].start,
                    self.settings.steps,
                    self.settings.guidance_scale,
                    self.settings.cache_interval,
                    on_step=None if inputs.progress is None else inputs.progress.reporter(group[0].start, len(group)),
                    should_cancel=inputs.should_cancel,
                ),
                timer,
            )
        finally:
            self.timer.add(timer)


@dataclass(frozen=True)
class _GenerationInputs:
    """One :class:`FaceGenerator` call's inputs, shared by its groups."""

    faces: torch.Tensor
    audio: torch.Tensor
    mask: torch.Tensor
    noise: torch.Tensor
    sampling: dict[int, tuple[torch.Tensor, torch.Tensor]]
    """VAE sampling noise (masked faces, faces) per window, keyed by the window's first frame."""
    should_cancel: CancelCheck | None
    progress: _StepProgress | None = None


class _StepProgress:
    """Windows done over one call's groups, each running group counted by the DDIM steps it has done.

    Groups may run on several replicas' threads at once, so the sum is taken and reported under a lock.
    """

    def __init__(self, on_step: Callable[[float], None], steps: int) -> None:
        self._on_step, self._steps = on_step, steps
        self._done: dict[int, float] = {}
        self._lock = threading.Lock()

    def reporter(self, key: int, windows: int) -> Callable[[int], None]:
        """The ``on_step`` of the group starting at frame ``key`` with ``windows`` windows."""

        def report(step: int) -> None:
            with self._lock:  # reported in the order summed: never a smaller total after a larger one
                self._done[key] = windows * step / self._steps
                self._on_step(sum(self._done.values()))

        return report


def _span(group: list[slice]) -> slice:
    return slice(group[0].start, group[-1].stop)


def _current_device(device: torch.device) -> AbstractContextManager:
    """Make ``device`` the thread's current CUDA device meanwhile (CUDA graphs and streams use the current one)."""
    return torch.cuda.device(device) if device.type == "cuda" else nullcontext()


def _equal_length_groups(windows: list[slice], group_size: int) -> list[list[slice]]:
    """Consecutive windows in groups of at most ``group_size``, never mixing lengths."""
    groups: list[list[slice]] = []
    for window in windows:
        length = window.stop - window.start
        if groups and len(groups[-1]) < group_size and groups[-1][0].stop - groups[-1][0].start == length:
            groups[-1].append(window)
        else:
            groups.append([window])
    return groups
