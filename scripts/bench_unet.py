"""Baseline speed and memory of one 16-frame window: full-size UNet + VAE, random weights.

Measures, per config (1.5 = 256 px, 1.6 = 512 px) and dtype: the UNet step at the official call
shape (CFG batch 2 × 16 frames), one whole window (2 VAE encodes, 20 DDIM steps with CFG, 1 VAE
decode) through ``FaceGenerator``, and peak GPU memory. Random weights: speed does not depend on
their values. Prints a markdown table; ``--json`` also writes the numbers.

    python scripts/bench_unet.py --json $OUT/bench_unet.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL

from lipsync.config import CONFIG_DIR, load_config
from lipsync.models.loading import build_unet
from lipsync.weights import load_weights_config
from lipsync.sampling import DirectDenoiser, FaceGenerator, SamplingSettings, initial_noise, load_scheduler

VAE_ARCHITECTURE = CONFIG_DIR / "vae" / "sd-vae-ft-mse.json"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def timed(fn, repeats: int) -> list[float]:
    """Wall seconds of ``fn`` per call (CUDA-synchronised), after one warm-up call."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


@torch.no_grad()
def bench(config_path: Path, dtype: torch.dtype, steps: int, windows_per_call: int, repeats: int) -> dict:
    config = load_config(config_path)
    frames, size = config["data"]["num_frames"], config["data"]["resolution"]
    unet = build_unet(config_path, device="cuda").to(dtype).eval()
    vae = AutoencoderKL.from_config(json.loads(VAE_ARCHITECTURE.read_text())).to("cuda", dtype).eval()
    latent_scale = load_weights_config().vae
    vae.register_to_config(scaling_factor=latent_scale.scaling_factor, shift_factor=latent_scale.shift_factor)
    latent = size // 8
    cross_dim = config["model"]["cross_attention_dim"]

    sample = torch.randn(2, 13, frames, latent, latent, device="cuda", dtype=dtype)
    audio = torch.randn(2 * frames, 50, cross_dim, device="cuda", dtype=dtype)
    timestep = torch.tensor(951, device="cuda")
    step_times = timed(lambda: unet(sample, timestep, audio), repeats * 5)

    settings = SamplingSettings.from_config(config, steps=steps, windows_per_call=windows_per_call)
    generator_model = FaceGenerator(vae, DirectDenoiser(unet, load_scheduler()), settings)
    count = frames * windows_per_call
    faces = torch.rand(count, 3, size, size) * 2 - 1
    face_audio = torch.randn(count, 50, cross_dim)
    mask = torch.ones(size, size)
    mask[size // 2 :, size // 8 : -size // 8] = 0
    noise = initial_noise(torch.Generator().manual_seed(0), latent)

    def run() -> None:
        generator_model(faces, face_audio, mask, noise, torch.Generator().manual_seed(1))

    torch.cuda.reset_peak_memory_stats()
    window_times = timed(run, repeats)
    return {
        "config": config_path.name,
        "resolution": size,
        "dtype": str(dtype).removeprefix("torch."),
        "windows_per_call": windows_per_call,
        "unet_step_ms": 1000 * statistics.median(step_times),
        "window_s": statistics.median(window_times) / windows_per_call,
        "seconds_per_video_second": statistics.median(window_times) / windows_per_call / frames * config["data"]["video_fps"],
        "peak_vram_gib": torch.cuda.max_memory_allocated() / 2**30,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", type=Path, default=[CONFIG_DIR / "unet/stage2.yaml", CONFIG_DIR / "unet/stage2_512.yaml"])
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp16", "bf16"])
    parser.add_argument("--windows-per-call", nargs="+", type=int, default=[1, 4])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_unet.py needs a CUDA GPU")
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    rows = []
    for config_path in args.configs:
        for dtype_name in args.dtypes:
            for windows in args.windows_per_call:
                rows.append(bench(config_path, DTYPES[dtype_name], args.steps, windows, args.repeats))
                torch.cuda.empty_cache()
                print(rows[-1], flush=True)
    print("\n| config | px | dtype | windows/call | UNet step (ms, B=2×16) | s / window | s / video-second | peak VRAM (GiB) |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['config']} | {row['resolution']} | {row['dtype']} | {row['windows_per_call']} | {row['unet_step_ms']:.1f} "
            f"| {row['window_s']:.3f} | {row['seconds_per_video_second']:.3f} | {row['peak_vram_gib']:.2f} |"
        )
    if args.json:
        args.json.write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
