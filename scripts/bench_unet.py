"""Baseline speed and memory of one 16-frame window: full-size UNet + VAE, random weights.

Measures, per config (1.5 = 256 px, 1.6 = 512 px), dtype, way of running the UNet and windows per
call: the UNet step at the official call shape (CFG batch 2 × 16 frames), the UNet step at that
call's shape (CFG batch 2·W × 16 frames) per window, one whole window (2 VAE encodes, 20 DDIM steps
with CFG, 1 VAE decode) through ``FaceGenerator``, peak GPU memory, the seconds of each shape's first
call (compilation, graph capture) and the official-shape output's error against fp32.

``--predictors`` picks the ways of running the UNet (``PREDICTORS``): ``eager``, ``graphs``
(``GraphedUNet``), ``compiled`` (``CompiledUNet``: one compilation, batch size symbolic) and
``compiled-graphs`` (the compiled kernels replayed from CUDA graphs) and ``compiled-graphs-channels-last``
(the same with the convolution weights in channels-last memory format, which cuDNN's kernels use natively:
the NCHW ↔ NHWC conversions around each convolution go away where the activations follow). ``--profile`` writes a
``torch.profiler`` table of one official-shape step each, and one per larger call shape (``_w<windows>``).
Each row gives the UNet's achieved TFLOP/s at its call shape (counted FLOPs over time) beside the
device's measured fp16 GEMM rate. Random weights: speed does not depend on
their values. Prints each row as it is measured and a markdown table at the end; ``--json`` writes
the numbers (after each config, predictor and dtype, so a run cut short keeps what it finished).

    python scripts/bench_unet.py --predictors graphs compiled-graphs --json $OUT/bench_unet.json
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
from lipsync.generation import FaceGenerator, Replica
from lipsync.models.compiled import CompiledUNet
from lipsync.models.graphed import GraphedUNet
from lipsync.models.loading import build_unet
from lipsync.models.unet import UNet3DConditionModel
from lipsync.sampling import (
    DirectDenoiser,
    NoisePredictor,
    SamplingSettings,
    initial_noise,
    load_scheduler,
)
from lipsync.testing import gemm_tflops, unet_window_step_flops
from lipsync.vae import FULL_VAE_ARCHITECTURE
from lipsync.weights import load_weights_config

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
PREDICTORS = {
    "eager": lambda unet, _frames: unet,
    "graphs": lambda unet, _frames: GraphedUNet(unet),
    "compiled": lambda unet, frames: CompiledUNet(unet, frames),
    "compiled-graphs": lambda unet, frames: GraphedUNet(CompiledUNet(unet, frames)),
    "compiled-graphs-channels-last": lambda unet, frames: GraphedUNet(
        CompiledUNet(unet.to(memory_format=torch.channels_last), frames)
    ),
}
"""Ways of running the UNet: name → wrapper of the loaded module and its window length."""


def profile_step(step, path: Path) -> None:
    """Write the top CUDA kernels and the launch count of one ``step()`` call to ``path``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    events = prof.key_averages()
    kernels = sum(event.count for event in events if event.device_type == torch.autograd.DeviceType.CUDA)
    table = events.table(sort_by="self_device_time_total", row_limit=30, max_name_column_width=70)
    path.write_text(f"CUDA kernel launches in one step: {kernels}\n{table}\n")


def timed(fn, repeats: int, warmup_s: float = 1.0) -> list[float]:
    """Wall seconds of ``fn`` per call (CUDA-synchronised), after ``warmup_s`` (one call at least) of warm-up.

    The warm-up also lets the GPU leave its idle clocks, which otherwise inflate the first timings.
    """
    start = time.perf_counter()
    while True:
        fn()
        torch.cuda.synchronize()
        if time.perf_counter() - start >= warmup_s:
            break
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def fp32_reference(unet: UNet3DConditionModel, sample: torch.Tensor, timestep: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
    """The fp32 model's output with TF32 off everywhere: what a fast path's error is measured against."""
    conv_tf32, matmul_tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        return unet(sample.float(), timestep, audio.float()).float()
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = conv_tf32, matmul_tf32


def first_call(fn) -> float:
    """Seconds of ``fn``'s first call (compilation of a new shape, cuDNN autotuning)."""
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


@torch.no_grad()
def bench(
    config_path: Path, dtype: torch.dtype, steps: int, windows_per_call: list[int], repeats: int,
    predictor: str = "eager", profile_path: Path | None = None,
) -> list[dict]:
    """One row per windows-per-call count, sharing one UNet run the ``predictor`` way."""
    config = load_config(config_path)
    frames, size = config["data"]["num_frames"], config["data"]["resolution"]
    unet = build_unet(config_path, device="cuda").eval()
    latent = size // 8
    cross_dim = config["model"]["cross_attention_dim"]
    timestep = torch.tensor(951, device="cuda")
    sample = torch.randn(2, 13, frames, latent, latent, device="cuda").to(dtype)
    audio = torch.randn(2 * frames, 50, cross_dim, device="cuda").to(dtype)
    reference = fp32_reference(unet, sample, timestep, audio)
    model: NoisePredictor = PREDICTORS[predictor](unet.to(dtype), frames)
    vae = AutoencoderKL.from_config(json.loads(FULL_VAE_ARCHITECTURE.read_text(encoding="utf-8"))).to("cuda", dtype).eval()
    latent_scale = load_weights_config().vae
    vae.register_to_config(scaling_factor=latent_scale.scaling_factor, shift_factor=latent_scale.shift_factor)

    def step_at(windows: int):
        sample = torch.randn(2 * windows, 13, frames, latent, latent, device="cuda", dtype=dtype)
        audio = torch.randn(2 * windows * frames, 50, cross_dim, device="cuda", dtype=dtype)
        return lambda: model(sample, timestep, audio)

    window_flops = unet_window_step_flops(config_path)
    official_step = step_at(1)
    official_first_s = first_call(official_step)
    output = model(sample, timestep, audio).float()
    relative_error = ((output - reference).norm() / reference.norm()).item()
    step_times = timed(official_step, repeats * 5)
    if profile_path is not None:
        try:
            profile_step(official_step, profile_path)
        except Exception as exc:  # a profiler problem must not lose the timings
            print(f"profiling failed: {type(exc).__name__}: {exc}", flush=True)
    del official_step

    rows = []
    for windows in windows_per_call:
        call_step = step_at(windows)
        first_s = official_first_s if windows == 1 else first_call(call_step)
        call_step_times = timed(call_step, repeats * 2)
        if profile_path is not None and windows > 1:
            try:
                profile_step(call_step, profile_path.with_name(f"{profile_path.stem}_w{windows}.txt"))
            except Exception as exc:  # a profiler problem must not lose the timings
                print(f"profiling failed: {type(exc).__name__}: {exc}", flush=True)
        del call_step

        settings = SamplingSettings.from_config(config, steps=steps, windows_per_call=windows)
        generator_model = FaceGenerator([Replica(vae, DirectDenoiser(model, load_scheduler()))], settings)
        count = frames * windows
        faces = torch.rand(count, 3, size, size) * 2 - 1
        face_audio = torch.randn(count, 50, cross_dim)
        mask = torch.ones(size, size)
        mask[size // 2 :, size // 8 : -size // 8] = 0
        noise = initial_noise(torch.Generator().manual_seed(0), latent)

        def run() -> None:
            generator_model(faces, face_audio, mask, noise, torch.Generator().manual_seed(1))

        torch.cuda.reset_peak_memory_stats()
        window_times = timed(run, repeats)
        rows.append({
            "config": config_path.name,
            "resolution": size,
            "dtype": str(dtype).removeprefix("torch."),
            "predictor": predictor,
            "windows_per_call": windows,
            "unet_step_ms": 1000 * statistics.median(step_times),
            "window_step_ms": 1000 * statistics.median(call_step_times) / windows,
            "achieved_tflops": window_flops * windows / statistics.median(call_step_times) / 1e12,
            "official_first_call_s": official_first_s,
            "first_call_s": first_s,
            "window_s": statistics.median(window_times) / windows,
            "seconds_per_video_second": statistics.median(window_times) / windows / frames * config["data"]["video_fps"],
            "peak_vram_gib": torch.cuda.max_memory_allocated() / 2**30,
            "rel_error_vs_fp32": relative_error,
        })
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", type=Path, default=[CONFIG_DIR / "unet/stage2.yaml", CONFIG_DIR / "unet/stage2_512.yaml"])
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp16", "bf16"])
    parser.add_argument("--windows-per-call", nargs="+", type=int, default=[1, 4])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--predictors", nargs="+", choices=sorted(PREDICTORS), default=["eager"], help="ways of running the UNet")
    parser.add_argument("--profile", type=Path, help="folder for one profiler table per config and dtype")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_unet.py needs a CUDA GPU")
    gemm = gemm_tflops()
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, fp16 GEMM {gemm:.1f} TFLOP/s")
    rows = []
    for config_path in args.configs:
        for predictor in args.predictors:
            for dtype_name in args.dtypes:
                profile_path = None
                if args.profile:
                    args.profile.mkdir(parents=True, exist_ok=True)
                    profile_path = args.profile / f"{config_path.stem}_{dtype_name}_{predictor}.txt"
                rows += bench(config_path, DTYPES[dtype_name], args.steps, args.windows_per_call, args.repeats, predictor, profile_path)
                if args.json:
                    args.json.write_text(json.dumps({"device": torch.cuda.get_device_name(), "gemm_tflops": gemm, "rows": rows}, indent=2))
                torch._dynamo.reset()
                torch.cuda.empty_cache()
    print(
        "\n| config | px | dtype | predictor | windows/call | UNet step (ms, B=2×16) | UNet step per window (ms, B=2W×16) "
        "| s / window | s / video-second | peak VRAM (GiB) | first call (s): B=2×16 / B=2W×16 | rel. error vs fp32 |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['config']} | {row['resolution']} | {row['dtype']} | {row['predictor']} | {row['windows_per_call']} "
            f"| {row['unet_step_ms']:.1f} | {row['window_step_ms']:.1f} | {row['window_s']:.3f} "
            f"| {row['seconds_per_video_second']:.3f} | {row['peak_vram_gib']:.2f} | {row['official_first_call_s']:.1f} / {row['first_call_s']:.1f} | {row['rel_error_vs_fp32']:.1e} |"
        )


if __name__ == "__main__":
    main()
