"""DDIM sampling with classifier-free guidance over 16-frame windows, and face generation.

The official pipeline denoises one window per UNet call. Here several windows of equal length
share one call: each window is its own batch element, so the frame-pooled ResNet GroupNorm keeps
per-window statistics and the result equals window-by-window denoising.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from diffusers import DDIMScheduler
from pydantic import PositiveInt
from pydantic.dataclasses import dataclass as pydantic_dataclass

from lipsync.config import CONFIG_DIR, SCHEMA, load_settings, run_defaults
from lipsync.contract import BY_NAME as OPTIONS_BY_NAME
from lipsync.errors import BadInput, JobCancelled
from lipsync.gpu_guard import GPU_GUARD
from lipsync.vae import LATENT_CHANNELS

SCHEDULER_CONFIG = CONFIG_DIR / "scheduler_config.json"
SAMPLING_MODES = CONFIG_DIR / "sampling_modes.yaml"


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
            "num_frames": config.get("data", {}).get("num_frames", cls.num_frames),
            "steps": run["inference_steps"],
            "guidance_scale": run["guidance_scale"],
            "seed": run["seed"],
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
                self.unet,
                self.scheduler,
                batch.latents,
                batch.mask,
                batch.masked_latents,
                batch.reference_latents,
                batch.audio,
                batch.steps,
                batch.guidance_scale,
                active=active,
                cache_interval=batch.cache_interval,
                on_step=batch.on_step,
            )
        if should_cancel is not None and should_cancel():
            raise JobCancelled("the job was cancelled")
        return latents
