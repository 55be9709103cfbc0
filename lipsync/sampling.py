"""DDIM sampling with classifier-free guidance over 16-frame windows, and face generation.

The official pipeline denoises one window per UNet call. Here several windows of equal length
share one call: each window is its own batch element, so the frame-pooled ResNet GroupNorm keeps
per-window statistics and the result equals window-by-window denoising.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import AbstractContextManager, ExitStack, nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import torch
from diffusers import AutoencoderKL, DDIMScheduler
from pydantic import PositiveInt
from pydantic.dataclasses import dataclass as pydantic_dataclass

from lipsync.config import CONFIG_DIR, SCHEMA, load_settings, run_defaults
from lipsync.contract import BY_NAME as OPTIONS_BY_NAME
from lipsync.errors import BadInput, JobCancelled
from lipsync.gpu_guard import GPU_GUARD
from lipsync.timing import StageTimer
from lipsync.vae import decode_latents, encode_latents, sampling_noise

SCHEDULER_CONFIG = CONFIG_DIR / "scheduler_config.json"
SAMPLING_MODES = CONFIG_DIR / "sampling_modes.yaml"
LATENT_CHANNELS = 4


@pydantic_dataclass(frozen=True, config=SCHEMA)
class SamplingSettings:
    """Sampling knobs: a LatentSync config's ``data`` and ``run`` sections (the job options' only defaults),
    a sampling mode and a job's options (:meth:`from_config`)."""

    steps: int
    """DDIM steps: the ``inference_steps`` job option; its range is the job contract's (checked by :meth:`from_config`)."""
    guidance_scale: float
    seed: int
    num_frames: PositiveInt = 16
    windows_per_call: PositiveInt = 4
    """How many windows share one UNet call (×2 batch rows with guidance): a memory/speed knob."""
    cache_interval: PositiveInt = 1
    """1 = exact. ``n > 1``: fast mode's feature caching, a full UNet pass every ``n``-th step (see :func:`denoise`)."""

    @classmethod
    def from_config(cls, config: Mapping[str, Any], mode: str = "exact", **overrides: Any) -> SamplingSettings:
        """Defaults from ``config`` (:func:`run_defaults`), then the named mode (``configs/sampling_modes.yaml``),
        then ``overrides``."""
        run = run_defaults(config)
        values = {
            "num_frames": config.get("data", {}).get("num_frames", cls.num_frames), "steps": run["inference_steps"],
            "guidance_scale": run["guidance_scale"], "seed": run["seed"],
        }
        values.update(sampling_mode(mode))
        values.update({key: value for key, value in overrides.items() if value is not None})
        for name, field in (("inference_steps", "steps"), ("guidance_scale", "guidance_scale"), ("seed", "seed")):
            OPTIONS_BY_NAME[name].check(values[field])  # the job contract's ranges: a bad value is the job's fault
        return cls(**values)


@pydantic_dataclass(frozen=True, config=SCHEMA)
class SamplingMode:
    """The :class:`SamplingSettings` fields a named mode of ``configs/sampling_modes.yaml`` sets."""

    cache_interval: PositiveInt


def sampling_modes(path: str | Path = SAMPLING_MODES) -> dict[str, SamplingMode]:
    """The named sampling modes (read once): ``{"exact": ..., "fast": ...}``."""
    return load_settings(dict[str, SamplingMode], path, "sampling modes")


def sampling_mode(name: str) -> dict[str, Any]:
    """The :class:`SamplingSettings` fields mode ``name`` sets; an unknown name raises ``ValueError``."""
    modes = sampling_modes()
    if name not in modes:
        raise BadInput(f"mode must be one of {sorted(modes)}, got {name!r}")
    return asdict(modes[name])


def load_scheduler(path: str | Path = SCHEDULER_CONFIG) -> DDIMScheduler:
    """The DDIM scheduler from LatentSync's ``scheduler_config.json``."""
    return DDIMScheduler.from_config(DDIMScheduler.load_config(str(path)))


def initial_noise(generator: torch.Generator, latent_size: int) -> torch.Tensor:
    """One Gaussian latent ``(1, 4, 1, h, w)`` shared by every frame of a video (official behaviour)."""
    return torch.randn((1, LATENT_CHANNELS, 1, latent_size, latent_size), generator=generator, dtype=torch.float32)


class NoisePredictor(Protocol):
    """What :func:`denoise` calls: :class:`UNet3DConditionModel` or a wrapper that runs it faster."""

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def device(self) -> torch.device: ...

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor, audio: torch.Tensor) -> torch.Tensor: ...

    def forward_caching(
        self, sample: torch.Tensor, timestep: torch.Tensor, audio: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def forward_shallow(
        self, sample: torch.Tensor, timestep: torch.Tensor, audio: torch.Tensor, deep_features: torch.Tensor
    ) -> torch.Tensor: ...


@torch.no_grad()
def denoise(
    unet: NoisePredictor,
    scheduler: DDIMScheduler,
    latents: torch.Tensor,
    mask: torch.Tensor,
    masked_latents: torch.Tensor,
    reference_latents: torch.Tensor,
    audio: torch.Tensor,
    steps: int,
    guidance_scale: float | torch.Tensor,
    active: Callable[[], Sequence[bool]] | None = None,
    cache_interval: int = 1,
    on_step: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Run the DDIM loop on ``W`` windows of ``F`` frames at once.

    Args:
        latents: starting noise ``(W, 4, F, h, w)``.
        mask: ``(W, 1, F, h, w)``, 1 = keep, 0 = generate.
        masked_latents, reference_latents: ``(W, 4, F, h, w)`` scaled VAE latents.
        audio: per-frame audio tokens ``(W·F, tokens, dim)`` (window-major).
        guidance_scale: one scale, or one per window ``(W,)``; every window must agree on whether
            guidance is on (scale > 1), since that decides the UNet call's shape.
        active: asked before every step; windows it reports False for are dropped from the
            remaining UNet calls (a cancelled job stops costing GPU time within one step) and
            come back unfinished. A dropped window never comes back.
        cache_interval: 1 runs the full UNet every step (exact). ``n > 1`` is feature caching
            (DeepCache): every ``n``-th step runs the full UNet and keeps its deep features, the
            steps between run only the UNet's outer blocks around them (an approximation).
        on_step: called after every step with the number of steps done.
    Returns:
        denoised latents ``(W, 4, F, h, w)`` in fp32. Guidance follows the official order: the
        unconditional half (all-zero audio) comes first; guidance ≤ 1 runs the conditional half only.
    """
    if cache_interval < 1:
        raise ValueError(f"cache_interval must be at least 1, got {cache_interval}")
    device, dtype = unet.device, unet.dtype
    windows, frames = latents.shape[0], latents.shape[2]
    scales = torch.as_tensor(guidance_scale, dtype=torch.float32).expand(windows).to(device)
    guided = scales > 1.0
    use_guidance = bool(guided.all())
    if bool(guided.any()) != use_guidance:
        raise ValueError("windows sharing a UNet call must all use guidance or all skip it")
    copies = 2 if use_guidance else 1
    all_condition = torch.cat([mask, masked_latents, reference_latents], dim=1).to(device, dtype)
    all_audio = audio.to(device, dtype).unflatten(0, (windows, frames))
    result = latents.to(device, torch.float32).clone()
    rows = torch.arange(windows, device=device)
    condition = deep_features = None
    scheduler.set_timesteps(steps, device=device)
    for step, timestep in enumerate(scheduler.timesteps):
        keep = rows if active is None else rows[torch.tensor(list(active()), device=device)[rows]]
        if len(keep) == 0:
            break
        if condition is None or len(keep) != len(rows):
            if deep_features is not None:
                still = torch.isin(rows, keep)
                deep_features = deep_features.unflatten(0, (copies, len(rows), frames))[:, still].flatten(0, 2)
            rows = keep
            condition = all_condition[rows].repeat(copies, 1, 1, 1, 1)
            window_audio = all_audio[rows].flatten(0, 1)
            if use_guidance:
                window_audio = torch.cat([torch.zeros_like(window_audio), window_audio])
            row_scales = scales[rows].view(-1, 1, 1, 1, 1)
        current = result[rows]
        model_input = scheduler.scale_model_input(current, timestep).to(dtype).repeat(copies, 1, 1, 1, 1)
        sample = torch.cat([model_input, condition], dim=1)
        if cache_interval == 1:
            noise = unet(sample, timestep, window_audio)
        elif step % cache_interval == 0:
            noise, deep_features = unet.forward_caching(sample, timestep, window_audio)
        else:
            assert deep_features is not None  # step 0 is a full step, which caches them
            noise = unet.forward_shallow(sample, timestep, window_audio, deep_features)
        noise = noise.float()
        if use_guidance:
            unconditional, conditional = noise.chunk(2)
            noise = unconditional + row_scales * (conditional - unconditional)
        result[rows] = scheduler.step(noise, timestep, current).prev_sample
        if on_step is not None:
            on_step(step + 1)
    return result


CancelCheck = Callable[[], bool]


@dataclass(frozen=True)
class WindowBatch:
    """``W`` consecutive windows of one job, all ``F`` frames long, ready for one DDIM loop."""

    latents: torch.Tensor
    """Starting noise ``(W, 4, F, h, w)``."""
    mask: torch.Tensor
    """``(W, 1, F, h, w)``, 1 = keep, 0 = generate."""
    masked_latents: torch.Tensor
    reference_latents: torch.Tensor
    audio: torch.Tensor
    """``(W·F, tokens, dim)``, window-major."""
    steps: int
    guidance_scale: float
    cache_interval: int = 1
    on_step: Callable[[int], None] | None = None
    """Told the steps done after every DDIM step. It may run on a thread shared with other jobs'
    windows, so it must return quickly and never raise."""

    @property
    def windows(self) -> int:
        return self.latents.shape[0]

    @property
    def shape_key(self) -> tuple[int, bool, int, tuple[int, ...]]:
        """What windows must share to ride in one DDIM loop: steps, guidance on/off, caching, latent shape."""
        return self.steps, self.guidance_scale > 1.0, self.cache_interval, tuple(self.latents.shape[1:])


class Denoiser(Protocol):
    """Runs the DDIM loop for a job's windows; raises ``JobCancelled`` once ``should_cancel`` says so."""

    unet: NoisePredictor
    """The UNet its loops call (switched to the compiled one once it is ready)."""

    def __call__(self, batch: WindowBatch, should_cancel: CancelCheck | None = None) -> torch.Tensor: ...


class DirectDenoiser:
    """:class:`Denoiser` for one job at a time: each batch gets its own UNet calls."""

    def __init__(self, unet: NoisePredictor, scheduler: DDIMScheduler) -> None:
        self.unet, self.scheduler = unet, scheduler

    def __call__(self, batch: WindowBatch, should_cancel: CancelCheck | None = None) -> torch.Tensor:
        active = None if should_cancel is None else (lambda: [not should_cancel()] * batch.windows)
        with GPU_GUARD.shared():
            latents = denoise(
                self.unet, self.scheduler, batch.latents, batch.mask, batch.masked_latents, batch.reference_latents,
                batch.audio, batch.steps, batch.guidance_scale, active=active, cache_interval=batch.cache_interval,
                on_step=batch.on_step,
            )
        if should_cancel is not None and should_cancel():
            raise JobCancelled("the job was cancelled")
        return latents


@dataclass(frozen=True)
class Replica:
    """The models of one device. Replicas hold the same weights, so a window comes out the same on any of them."""

    vae: AutoencoderKL
    denoiser: Denoiser
    compiled: NoisePredictor | None = None
    """The same UNet compiled (``CompiledUNet``), which the denoiser switches to once it is compiled and
    captured (``LipSyncPipeline.compile_unet``); ``None``: this device does not compile."""

    @property
    def device(self) -> torch.device:
        return self.vae.device


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

    def __init__(self, replicas: Sequence[Replica], settings: SamplingSettings, timer: StageTimer | None = None) -> None:
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
        vae = self.replicas[0].vae
        sampling = {
            window.start: (  # masked, then reference: the official order of draws
                sampling_noise(vae, window.stop - window.start, size // 8, generator),
                sampling_noise(vae, window.stop - window.start, size // 8, generator),
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
            threads = [
                lanes.enter_context(ThreadPoolExecutor(1, f"replica-{lane}")) for lane in range(len(replicas))
            ]
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

    def _generate(self, replica: Replica, group: list[slice], inputs: _GenerationInputs) -> torch.Tensor:
        """Encode, denoise and decode one group of consecutive, equally long windows on ``replica``.

        Timed on a timer of ``replica``'s device (its syncs wait for that device's work), added to the job's.
        """
        timer = StageTimer(replica.device)
        try:
            with _current_device(replica.device):
                return self._generate_here(replica, group, inputs, timer)
        finally:
            self.timer.add(timer)

    def _generate_here(self, replica: Replica, group: list[slice], inputs: _GenerationInputs, timer: StageTimer) -> torch.Tensor:
        vae, mask = replica.vae, inputs.mask
        size = mask.shape[-1]
        latent_size = size // 8
        latent_mask = torch.nn.functional.interpolate(mask[None, None], size=(latent_size, latent_size), mode="nearest")[0]
        span, length = _span(group), group[0].stop - group[0].start
        with GPU_GUARD.shared(), timer.stage("vae_encode"):
            encoded = [
                (
                    encode_latents(vae, inputs.faces[window] * mask, noise=inputs.sampling[window.start][0]),
                    encode_latents(vae, inputs.faces[window], noise=inputs.sampling[window.start][1]),
                )
                for window in group
            ]
            masked = torch.stack([pair[0] for pair in encoded]).transpose(1, 2).float().cpu()
            reference = torch.stack([pair[1] for pair in encoded]).transpose(1, 2).float().cpu()
        batch = WindowBatch(
            inputs.noise.expand(len(group), -1, length, -1, -1),
            latent_mask[None, :, None].expand(len(group), -1, length, -1, -1),
            masked,
            reference,
            inputs.audio[span],
            self.settings.steps,
            self.settings.guidance_scale,
            self.settings.cache_interval,
            on_step=None if inputs.progress is None else inputs.progress.reporter(group[0].start, len(group)),
        )
        with timer.stage("denoise"):
            latents = replica.denoiser(batch, inputs.should_cancel)
        with GPU_GUARD.shared():
            generated = latents.transpose(1, 2).flatten(0, 1).cpu()
        with GPU_GUARD.shared(), timer.stage("vae_decode"):
            decoded = decode_latents(vae, generated, chunk_size=self.settings.num_frames).float().cpu().clamp(-1, 1)
        return decoded * (1 - mask) + inputs.faces[span] * mask


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
