"""The SD VAE (``stabilityai/sd-vae-ft-mse``): loading from a local folder and latent encode/decode.

The latent scaling comes from the ``vae`` section of ``configs/weights.yaml`` (official inference forces
0.18215 and shift 0 whatever the folder's ``config.json`` says); :func:`load_vae` writes it into the
model's config, and the helpers read it from there.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from diffusers.utils.torch_utils import randn_tensor

from lipsync.config import CONFIG_DIR
from lipsync.errors import WeightsError
from lipsync.weights import WeightsConfig, load_weights_config

LATENT_CHANNELS = 4
"""Channels of the SD VAE's latents (``latent_channels`` of its config)."""

FULL_VAE_ARCHITECTURE = CONFIG_DIR / "vae" / "sd-vae-ft-mse.json"
"""``sd-vae-ft-mse``'s architecture (its ``config.json``), for random full-size stand-ins in benchmarks."""


def load_vae(
    folder: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    config: WeightsConfig | None = None,
) -> AutoencoderKL:
    """Load an ``AutoencoderKL`` from a local diffusers folder, never touching the network.

    The folder is checked first (files named in the weights config, a JSON ``config.json`` describing
    an ``AutoencoderKL``) so a bad checkpoint fails with a message naming the problem rather than a
    diffusers traceback.
    """
    spec = (config or load_weights_config()).vae
    folder = Path(folder)
    if not folder.is_dir():
        raise WeightsError(f"VAE folder not found: {folder}")
    absent = [file.filename for file in spec.files if not (folder / file.filename).is_file()]
    if absent:
        raise WeightsError(f"VAE folder {folder} lacks {', '.join(absent)}")
    config_path = folder / "config.json"
    try:
        class_name = json.loads(config_path.read_text(encoding="utf-8")).get("_class_name")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
        raise WeightsError(f"VAE config {config_path} is not a JSON object: {exc}") from None
    if class_name != "AutoencoderKL":
        raise WeightsError(f"VAE config {config_path} describes {class_name!r}, expected 'AutoencoderKL'")
    try:
        vae = AutoencoderKL.from_pretrained(folder, local_files_only=True, torch_dtype=dtype)
    except (OSError, ValueError, RuntimeError) as exc:
        raise WeightsError(f"cannot load the VAE from {folder}: {exc}") from exc
    vae.register_to_config(scaling_factor=spec.scaling_factor, shift_factor=spec.shift_factor)
    return vae.to(device).eval().requires_grad_(False)


def _chunks(count: int, chunk_size: int | None) -> list[slice]:
    step = count if chunk_size is None else chunk_size
    if step < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    return [slice(start, start + step) for start in range(0, count, step)]


@torch.no_grad()
def encode_latents(
    vae: AutoencoderKL,
    images: torch.Tensor,
    generator: torch.Generator | None = None,
    chunk_size: int | None = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Encode images ``(N, 3, R, R)`` in [-1, 1] to scaled latents ``(N, C, R/8, R/8)``.

    Like the official pipeline this samples the latent distribution (not its mean). The noise for all
    ``N`` images is drawn in one call before chunking, so the result depends only on ``generator``'s
    state, never on ``chunk_size``; with ``chunk_size=None`` it equals
    ``latent_dist.sample(generator)`` of a single VAE call. ``noise`` (from :func:`sampling_noise`)
    replaces the draw, so a caller can draw in a fixed order and encode on any device or thread.
    """
    images = images.to(device=vae.device, dtype=vae.dtype)
    moments = [vae.encode(images[part]).latent_dist for part in _chunks(len(images), chunk_size)]
    mean = torch.cat([dist.mean for dist in moments])
    std = torch.cat([dist.std for dist in moments])
    if noise is None:
        noise = randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    noise = noise.to(mean.device)
    return (mean + std * noise - vae.config.shift_factor) * vae.config.scaling_factor


def sampling_noise(dtype: torch.dtype, count: int, latent_size: int, generator: torch.Generator) -> torch.Tensor:
    """The noise :func:`encode_latents` would draw from a CPU ``generator`` for ``count`` images of a VAE
    of ``dtype``, on the CPU.

    The same values whichever device the VAE is on (diffusers draws on the generator's device, then copies).
    """
    shape = (count, LATENT_CHANNELS, latent_size, latent_size)
    return randn_tensor(shape, generator=generator, device=torch.device("cpu"), dtype=dtype)


@torch.no_grad()
def decode_latents(vae: AutoencoderKL, latents: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
    """Decode scaled latents ``(N, C, h, w)`` to images ``(N, 3, 8h, 8w)``, nominally in [-1, 1].

    Values are not clamped (the official pipeline clamps only when pasting back), and
    ``chunk_size=None`` decodes everything in one call as the official pipeline does.
    """
    latents = latents.to(device=vae.device, dtype=vae.dtype)
    latents = latents / vae.config.scaling_factor + vae.config.shift_factor
    return torch.cat([vae.decode(latents[part]).sample for part in _chunks(len(latents), chunk_size)])
