"""Tiny random-weight models in the official file formats, for tests and the CPU demo."""

from __future__ import annotations

import json
import zlib
from dataclasses import asdict
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from torch import nn
from whisper.model import ModelDimensions, Whisper

from lipsync.config import CONFIG_DIR
from lipsync.models.loading import build_unet
from lipsync.vae import FULL_VAE_ARCHITECTURE
from lipsync.weights import WeightPaths, chosen_version, missing, present_weights, weight_paths

_NORM_TYPES = (nn.GroupNorm, nn.LayerNorm)


@torch.no_grad()
def random_parameters_(module: nn.Module, seed: int, std: float = 0.05) -> nn.Module:
    """Overwrite every parameter of ``module`` with seeded random values, in place.

    Each tensor's values depend only on ``seed``, its state-dict name and its shape, so two
    implementations with the same key set (ours and the official one) get identical weights.
    Norm-layer weights are drawn around 1, everything else around 0; buffers (e.g. positional
    tables) are left untouched. Zero-initialised layers (``conv_in``, ``conv_out``, motion-module
    ``proj_out``) become non-zero, so tests exercise every path.
    """
    norm_weights = {
        f"{prefix}.weight" if prefix else "weight"
        for prefix, child in module.named_modules()
        if isinstance(child, _NORM_TYPES) and getattr(child, "weight", None) is not None
    }
    for name, param in module.named_parameters():
        generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        values = torch.randn(param.shape, generator=generator, dtype=torch.float32) * std
        if name in norm_weights:
            values += 1.0
        param.copy_(values.to(param.dtype))
    return module


TINY_VAE_CONFIG = CONFIG_DIR / "tiny" / "vae_config.json"
"""Tiny AutoencoderKL: 4 blocks like sd-vae-ft-mse, so 8x downsampling and 4 latent channels."""


def write_tiny_vae(folder: str | Path, seed: int = 0) -> Path:
    """Write a seeded random tiny VAE as a diffusers folder (config.json + safetensors), like sd-vae-ft-mse."""
    vae = AutoencoderKL.from_config(json.loads(TINY_VAE_CONFIG.read_text(encoding="utf-8")))
    random_parameters_(vae, seed)
    folder = Path(folder)
    vae.save_pretrained(folder, safe_serialization=True)
    return folder


def write_tiny_weights(dest: str | Path | None = None, seed: int = 0) -> WeightPaths:
    """Write the tiny UNet, Whisper and VAE in the weights config's "tiny" layout below ``dest``.

    ``dest`` defaults to the tiny version's root in the weights config.
    """
    paths = weight_paths("tiny", dest)
    for path in (paths.unet, paths.whisper):
        path.parent.mkdir(parents=True, exist_ok=True)
    write_tiny_unet(paths.unet, paths.unet_config, seed)
    write_tiny_whisper(paths.whisper, seed)
    write_tiny_vae(paths.vae_dir, seed)
    return paths


TINY_WHISPER_DIMS = CONFIG_DIR / "tiny" / "whisper_dims.json"
"""Tiny Whisper: the real ``tiny`` layout (4 encoder blocks, 1500 positions, 80 mels) at width 64."""


def write_tiny_whisper(path: str | Path, seed: int = 0, dims_path: str | Path | None = None) -> Path:
    """Write a seeded random Whisper as an OpenAI checkpoint (``{"dims", "model_state_dict"}``) like ``tiny.pt``."""
    dims = ModelDimensions(**json.loads(Path(dims_path or TINY_WHISPER_DIMS).read_text(encoding="utf-8")))
    model = random_parameters_(Whisper(dims), seed)
    path = Path(path)
    torch.save({"dims": asdict(dims), "model_state_dict": model.state_dict()}, path)
    return path


def write_tiny_unet(path: str | Path, config_path: str | Path, seed: int = 0) -> Path:
    """Write a seeded random UNet as an official checkpoint (``{"state_dict", "global_step"}``)."""
    model = random_parameters_(build_unet(config_path), seed)
    path = Path(path)
    torch.save({"state_dict": model.state_dict(), "global_step": 0}, path)
    return path


def weights_for(choice: str, root: str | Path | None = None) -> tuple[str, WeightPaths]:
    """The weight set a server should load: ``(version name, paths)``.

    ``choice`` is a version name from the weights config ("1.5", "1.6", "tiny") or "auto": LatentSync
    1.5 when all its files are present below ``root``, the tiny demo weights otherwise. Tiny weights
    are written on first use; a named real version must be present (``WeightsError`` otherwise).
    """
    choice = chosen_version(choice, root)
    if choice != "tiny":
        return choice, present_weights(choice, root)
    tiny_root = root if root is None else Path(root) / "tiny"
    paths = weight_paths(choice, tiny_root)
    return choice, write_tiny_weights(tiny_root) if missing(paths) else paths


FULL_WHISPER_DIMS = CONFIG_DIR / "whisper" / "tiny_dims.json"


def write_random_weights(version: str, root: str | Path) -> WeightPaths:
    """Full-size default-initialised weights of ``version`` in the official layout and formats below ``root``.

    For benchmarks on machines without the real checkpoints: speed does not depend on the values.
    """
    paths = weight_paths(version, root)
    paths.unet.parent.mkdir(parents=True, exist_ok=True)
    paths.whisper.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": build_unet(paths.unet_config).state_dict(), "global_step": 0}, paths.unet)
    dims = json.loads(FULL_WHISPER_DIMS.read_text(encoding="utf-8"))
    torch.save({"dims": dims, "model_state_dict": Whisper(ModelDimensions(**dims)).state_dict()}, paths.whisper)
    AutoencoderKL.from_config(json.loads(FULL_VAE_ARCHITECTURE.read_text(encoding="utf-8"))).save_pretrained(paths.vae_dir)
    return paths
