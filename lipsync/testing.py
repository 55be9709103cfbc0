"""Helpers for the tests and benchmarks; nothing in the service imports this module."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from prometheus_client.parser import text_string_to_metric_families
from whisper.model import ModelDimensions, Whisper

from lipsync.config import CONFIG_DIR
from lipsync.models.loading import build_unet
from lipsync.vae import FULL_VAE_ARCHITECTURE
from lipsync.weights import WeightPaths, missing, weight_paths

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
    AutoencoderKL.from_config(json.loads(FULL_VAE_ARCHITECTURE.read_text(encoding="utf-8"))).save_pretrained(
        paths.vae_dir
    )
    return paths


def ensure_random_weights(version: str, root: str | Path) -> bool:
    """:func:`write_random_weights` unless every file of ``version`` is already below ``root`` (the tiny
    demo weights are the launcher's to write); whether it wrote them."""
    if version == "tiny" or not missing(weight_paths(version, root)):
        return False
    write_random_weights(version, root)
    return True


def sample_sum(text: str, name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` (e.g. ``x_total``, ``x_count``) in Prometheus text whose labels include ``labels``.

    The parser names every counter sample ``<family>_total``, also for exporters such as Triton that
    leave the suffix off (``nv_inference_request_success``), so a counter matches with or without it.
    """
    names = {name, f"{name}_total"}
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name in names and all(sample.labels.get(key) == value for key, value in labels.items())
    )


def unet_window_step_flops(config: str | Path) -> int:
    """Floating-point operations of one UNet call on one full window with guidance (2 batch rows), counted
    by ``torch.utils.flop_counter`` on the meta device (no memory, no device)."""
    from torch.utils.flop_counter import FlopCounterMode

    unet = build_unet(config, "meta")
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet(*unet_call_inputs(config, windows=1, device="meta"))
    return counter.get_total_flops()


def unet_call_inputs(
    config: str | Path, windows: int, device: str | torch.device, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Zero ``(sample, timestep, audio)`` of one guided UNet call on ``windows`` full windows (2 batch rows each)."""
    from lipsync.config import load_config

    settings = load_config(config)
    latent, frames, rows = settings["data"]["resolution"] // 8, settings["data"]["num_frames"], 2 * windows
    sample = torch.zeros(rows, settings["model"]["in_channels"], frames, latent, latent, device=device, dtype=dtype)
    audio = torch.zeros(rows * frames, 50, settings["model"]["cross_attention_dim"], device=device, dtype=dtype)
    return sample, torch.tensor([500], device=device), audio


def gemm_tflops(device: str = "cuda", size: int = 8192, dtype: torch.dtype = torch.float16, repeats: int = 50) -> float:
    """The device's measured dense matrix-product rate: ``size``³ products in ``dtype``, median of ``repeats``."""
    generator = torch.Generator(device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    for _ in range(5):
        a @ b
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return 2 * size**3 / sorted(times)[len(times) // 2] / 1e12
