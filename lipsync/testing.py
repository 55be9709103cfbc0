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
from lipsync.weights import WeightPaths, weight_paths

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

    from lipsync.config import load_config

    settings = load_config(config)
    latent, frames = settings["data"]["resolution"] // 8, settings["data"]["num_frames"]
    unet = build_unet(config, "meta")
    sample = torch.zeros(2, settings["model"]["in_channels"], frames, latent, latent, device="meta")
    audio = torch.zeros(2 * frames, 50, settings["model"]["cross_attention_dim"], device="meta")
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet(sample, torch.tensor(500, device="meta"), audio)
    return counter.get_total_flops()


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
