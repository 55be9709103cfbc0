"""The speed table of docs/benchmarks.md in one run: official call shape vs ours, per stage, 256 and 512 px.

For each LatentSync version (1.5 = 256 px, 1.6 = 512 px) the script writes full-size random weights
in the official formats (speed does not depend on their values), loads them once, and runs the
whole job (decode, detect/align, audio, VAE, denoise, paste-back, encode) on the given clip for
each variant:

- ``official`` (with ``--official-root``): the official LatentSync UNet module (loaded from a local
  export of the public repository, never part of this one; see ``scripts/official_baseline.py``)
  at the official call shape: one 16-frame window per UNet call (CFG batch 2 × 16), eager.
- ``eager-w1``: our UNet at the same call shape, eager.
- ``exact-wN``: our UNet replayed from CUDA graphs (``GraphedUNet``), N windows per call.
- ``compiled-wN`` (GPU, unless ``--no-compiled``): as exact, the UNet compiled first (``CompiledUNet``):
  the pipeline's default on a GPU (``compile_unet: auto``); its warm-up includes the compilation (a
  minute or two per batch-size range).
- ``fast-wN[-sK]``: the fast sampling mode (feature caching), K DDIM steps, on the compiled UNet
  where ``compiled-wN`` runs (CUDA graphs only with ``--no-compiled``).

Every variant runs once untimed on its own call shapes first (CUDA-graph capture, cuDNN algorithm
choice), then the job is timed. Stage seconds come from ``lipsync.timing.StageTimer``: stages on
different threads overlap, so they can add up to more than the wall time. "GPU busy" is NVML's
kernel-activity percentage sampled every 50 ms during the job.

Quality, on the first ``--check-frames`` aligned faces of the clip with the clip's audio:

- exact variants against an fp32 eager reference (same weights, seeds and inputs): relative L2
  error of the generated mouth region (mask = 0), printed next to the official-shape fp16 run's;
- fast variants against the exact variant with the same windows per call (the compiled one where it
  ran, as fast mode then is): PSNR and SSIM of the
  mouth region's bounding box. Random weights make the UNet's output noise-like, so these say how
  far caching moves the result, not how a trained model's lips look.

    python scripts/bench_pipeline.py --video demo1_video.mp4 --audio demo1_audio.wav \\
        --official-root .official --json out.json --markdown out.md

``--tiny`` uses the tiny random model instead (CPU smoke test; CUDA graphs need a GPU).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO_ROOT), str(REPO_ROOT / "scripts")]

from lipsync.audio import AudioFeatureExtractor, load_audio  # noqa: E402
from lipsync.config import load_config  # noqa: E402
from lipsync.faces import DetectorPool, FaceAligner, MediaPipeFaceDetector  # noqa: E402
from lipsync.generation import FaceGenerator, Replica  # noqa: E402
from lipsync.media import VideoReader  # noqa: E402
from lipsync.models import load_unet  # noqa: E402
from lipsync.models.compiled import CompiledUNet  # noqa: E402
from lipsync.models.graphed import GraphedUNet  # noqa: E402
from lipsync.pipeline import DTYPES, LipSyncPipeline  # noqa: E402
from lipsync.sampling import (  # noqa: E402
    Denoiser,
    DirectDenoiser,
    NoisePredictor,
    SamplingSettings,
    WindowBatch,
    initial_noise,
    load_scheduler,
)
from lipsync.testing import write_random_weights  # noqa: E402
from lipsync.tiny import write_tiny_weights  # noqa: E402
from lipsync.vae import load_vae  # noqa: E402
from lipsync.weights import WeightPaths  # noqa: E402

WINDOWS = {"1.5": [1, 2, 4], "1.6": [1, 2], "tiny": [1, 4]}
"""Windows per UNet call tried for the exact mode; fast mode uses the largest."""
FAST_STEPS = [20, 10]
"""DDIM step counts of the fast variants (20 = official's; fewer = a few-step run of the same solver)."""
FPS = 25


@dataclass
class Variant:
    name: str
    unet: str
    """official, eager or graphs."""
    windows_per_call: int
    mode: str = "exact"
    steps: int = 20


@dataclass
class Row:
    version: str
    variant: str
    wall_s: float
    s_per_video_s: float
    stages_s: dict[str, float]
    peak_vram_gib: float | None
    gpu_busy_pct: float | None
    quality: dict[str, float] = field(default_factory=dict)


class GpuBusySampler:
    """Mean NVML utilisation (percent of time a kernel ran) while the ``with`` block runs."""

    def __init__(self, interval_s: float = 0.05) -> None:
        self.interval_s, self.samples = interval_s, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> GpuBusySampler:
        if torch.cuda.is_available():
            self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.samples.append(torch.cuda.utilization())

    @property
    def mean(self) -> float | None:
        return round(statistics.fmean(self.samples), 1) if self.samples else None


def variants(version: str, device: torch.device, official: bool, compiled: bool = False) -> list[Variant]:
    graphs = "graphs" if device.type == "cuda" else "eager"
    windows = WINDOWS[version]
    chosen = [Variant("official", "official", 1)] if official else []
    chosen.append(Variant("eager-w1", "eager", 1))
    chosen += [Variant(f"exact-w{count}", graphs, count) for count in windows]
    fastest = graphs
    if compiled and device.type == "cuda":
        chosen.append(Variant(f"compiled-w{windows[-1]}", "compiled-graphs", windows[-1]))
        fastest = "compiled-graphs"
    chosen += [
        Variant(f"fast-w{windows[-1]}" + ("" if steps == 20 else f"-s{steps}"), fastest, windows[-1], "fast", steps)
        for steps in FAST_STEPS
    ]
    return chosen


def aligned_faces(video: Path, count: int, detectors: DetectorPool, resolution: int) -> torch.Tensor:
    """The clip's first ``count`` faces, aligned as the pipeline does, ``(N, 3, R, R)`` in [-1, 1]."""
    aligner = FaceAligner(resolution)
    faces = []
    with VideoReader(video) as reader, detectors.borrow() as detector:
        for frame in islice(iter(reader), count):
            landmarks = detector.detect(frame)
            if landmarks is None:
                raise SystemExit("the check frames need a face in every frame")
            faces.append(aligner.warp(frame, aligner.transform(landmarks.points)))
    return torch.from_numpy(np.stack(faces)).permute(0, 3, 1, 2).float() / 127.5 - 1


class RecordingDenoiser:
    """A :class:`~lipsync.sampling.Denoiser` that keeps every denoised latent batch it returns."""

    def __init__(self, inner: Denoiser) -> None:
        self.inner, self.latents = inner, []

    def __call__(self, batch: WindowBatch, should_cancel=None) -> torch.Tensor:
        latents = self.inner(batch, should_cancel)
        self.latents.append(latents.float().cpu())
        return latents


def generate(pipeline: LipSyncPipeline, faces: torch.Tensor, audio: torch.Tensor, variant: Variant) -> tuple[torch.Tensor, torch.Tensor]:
    """``FaceGenerator`` over ``faces`` in the pipeline's batches, with the job's seed.

    Returns the generated faces and the denoised latents (windows × 4 × frames × h × w) before decoding.
    """
    settings = SamplingSettings.from_config(
        pipeline.config, variant.mode, steps=variant.steps, windows_per_call=variant.windows_per_call
    )
    recorder = RecordingDenoiser(pipeline.denoiser)
    generator = FaceGenerator([Replica(pipeline.vae, recorder)], settings)
    random = torch.Generator().manual_seed(settings.seed)
    noise = initial_noise(random, pipeline.resolution // 8)
    batch = settings.num_frames * settings.windows_per_call
    faces = torch.cat([
        generator(faces[start : start + batch], audio[start : start + batch], pipeline.mask, noise, random)
        for start in range(0, len(faces), batch)
    ])
    return faces, torch.cat([latents.transpose(1, 2).flatten(0, 1) for latents in recorder.latents])


def warm_up(pipeline: LipSyncPipeline, frames: int, audio: torch.Tensor, variant: Variant) -> None:
    """Run every call shape the job will use once, with as few steps as reach each UNet method."""
    cache_interval = SamplingSettings.from_config(pipeline.config, variant.mode).cache_interval
    short = Variant(variant.name, variant.unet, variant.windows_per_call, variant.mode, min(variant.steps, cache_interval + 1))
    faces = torch.zeros(frames, 3, pipeline.resolution, pipeline.resolution)
    generate(pipeline, faces, audio[:frames], short)


def mouth_metrics(candidate: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """Relative L2 error over the mouth pixels, and PSNR/SSIM over the mouth's bounding box."""
    from pytorch_msssim import ssim

    mouth = mask == 0
    rows, cols = torch.nonzero(mouth, as_tuple=True)
    box = (slice(None), slice(None), slice(int(rows.min()), int(rows.max()) + 1), slice(int(cols.min()), int(cols.max()) + 1))
    difference = (candidate - reference)[:, :, mouth]
    relative = float(difference.norm() / reference[:, :, mouth].norm())
    a, b = (candidate[box] + 1) / 2, (reference[box] + 1) / 2
    psnr = float(10 * torch.log10(1 / (a - b).pow(2).mean()))
    return {"rel_l2": relative, "psnr_db": psnr, "ssim": float(ssim(a, b, data_range=1.0))}


def step_ms(model: NoisePredictor, windows: int, config: dict[str, Any], method: str = "forward") -> float:
    """Median milliseconds of one UNet call with guidance (2·windows × 16 frames), inputs random."""
    frames, latent = config["data"].get("num_frames", 16), config["data"]["resolution"] // 8
    tokens, dim = 50, config["model"]["cross_attention_dim"]
    sample = torch.randn(2 * windows, config["model"]["in_channels"], frames, latent, latent, device=model.device, dtype=model.dtype)
    audio = torch.randn(2 * windows * frames, tokens, dim, device=model.device, dtype=model.dtype)
    timestep = torch.tensor(500, device=model.device)
    if method == "forward_shallow":
        _, deep = model.forward_caching(sample, timestep, audio)
        call = lambda: model.forward_shallow(sample, timestep, audio, deep)  # noqa: E731
    else:
        call = lambda: model(sample, timestep, audio)  # noqa: E731
    times = []
    for repeat in range(13):
        torch.cuda.synchronize()
        start = time.perf_counter()
        call()
        torch.cuda.synchronize()
        if repeat >= 3:
            times.append((time.perf_counter() - start) * 1000)
    return round(statistics.median(times), 2)


def bench_version(
    version: str, args: argparse.Namespace, device: torch.device, scratch: Path, save: Callable[[list[Row]], None]
) -> tuple[list[Row], dict[str, Any]]:
    """Time the version's variants, then check their quality; ``save`` gets the rows after each phase."""
    dtype = DTYPES[args.dtype]
    started = time.perf_counter()
    paths: WeightPaths = (
        write_tiny_weights(scratch / version) if version == "tiny" else write_random_weights(version, scratch / version)
    )
    config = load_config(paths.unet_config)
    unet = load_unet(paths.unet_config, paths.unet, device, dtype)
    models: dict[str, NoisePredictor] = {"eager": unet}
    if device.type == "cuda":
        models["graphs"] = GraphedUNet(unet)
        if args.compiled:
            models["compiled-graphs"] = GraphedUNet(CompiledUNet(unet, frames=config["data"]["num_frames"]))
    if args.official_root:
        from official_baseline import OfficialUNet, load_official_unet

        state = torch.load(paths.unet, map_location="cpu", weights_only=True)
        models["official"] = OfficialUNet(load_official_unet(args.official_root, paths.unet_config, state, device, dtype))
    vae = load_vae(paths.vae_dir, device, dtype)
    audio = AudioFeatureExtractor.from_checkpoint(paths.whisper, config, device)
    detectors = DetectorPool(MediaPipeFaceDetector)
    setup_s = time.perf_counter() - started

    def pipeline_for(variant: Variant, model: NoisePredictor | None = None, model_vae=None) -> LipSyncPipeline:
        denoiser = DirectDenoiser(model or models[variant.unet], load_scheduler())
        return LipSyncPipeline([Replica(vae if model_vae is None else model_vae, denoiser)], audio, detectors, config,
                               variant.windows_per_call)

    waveform = load_audio(args.audio, audio.settings.sample_rate)
    features = audio(waveform)
    all_windows = audio.frame_windows(features)
    job_audio = all_windows[: max(1, round(len(waveform) / audio.settings.sample_rate * FPS))]
    check_faces = aligned_faces(args.video, args.check_frames, detectors, config["data"]["resolution"])
    check_audio = job_audio[: args.check_frames]

    rows, generated, ran = [], {}, []
    output = scratch / f"{version}.mp4"
    for variant in variants(version, device, bool(args.official_root), args.compiled):
        if args.variants and variant.name not in args.variants:
            continue
        ran.append(variant)
        pipeline = pipeline_for(variant)
        warm_up(pipeline, len(job_audio), job_audio, variant)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        with GpuBusySampler() as busy:
            begin = time.perf_counter()
            result = pipeline.run(args.video, args.audio, output, mode=variant.mode, inference_steps=variant.steps)
            wall = time.perf_counter() - begin
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
        generated[variant.name] = generate(pipeline, check_faces, check_audio, variant)
        rows.append(Row(version, variant.name, round(wall, 2), round(wall / (result.frames / FPS), 3),
                        result.seconds, None if peak is None else round(peak, 2), busy.mean))
        print(json.dumps(asdict(rows[-1])), flush=True)
        save(rows)

    reference_unet = load_unet(paths.unet_config, paths.unet, device, torch.float32)
    reference_vae = load_vae(paths.vae_dir, device, torch.float32)
    reference_variant = Variant("fp32", "eager", 1)
    reference_faces, reference_latents = generate(
        pipeline_for(reference_variant, reference_unet, reference_vae), check_faces, check_audio, reference_variant
    )
    mask = pipeline.mask
    for row in rows:
        faces, latents = generated[row.variant]
        if row.variant.startswith("fast"):
            windows = row.variant.split("-w")[1].split("-")[0]
            # Against the exact variant on the same UNet path as fast mode's (compiled where it ran).
            exact = generated.get(f"compiled-w{windows}") or generated.get(f"exact-w{windows}")
            if exact is not None:
                row.quality = {f"vs_exact_{key}": round(value, 4) for key, value in mouth_metrics(faces, exact[0], mask).items()}
        row.quality["vs_fp32_rel_l2"] = round(mouth_metrics(faces, reference_faces, mask)["rel_l2"], 5)
        row.quality["vs_fp32_latents_rel_l2"] = round(float((latents - reference_latents).norm() / reference_latents.norm()), 5)
        print(json.dumps({"variant": row.variant, "quality": row.quality}), flush=True)
    save(rows)

    micro = {}
    if device.type == "cuda":
        # Only the models the timed variants used: any other would compile or capture a new shape here.
        used = {variant.unet for variant in ran}
        for name in used & models.keys():
            micro[f"{name} step, official shape (ms)"] = step_ms(models[name], 1, config)
        windows = WINDOWS[version][-1]
        if "graphs" in used:
            micro[f"graphs step, {windows} windows (ms per window)"] = round(step_ms(models["graphs"], windows, config) / windows, 2)
            micro[f"graphs shallow step, {windows} windows (ms per window)"] = round(
                step_ms(models["graphs"], windows, config, "forward_shallow") / windows, 2
            )
    detectors.close()
    return rows, {"setup_s": round(setup_s, 1), "video_frames": len(job_audio), **micro}


def markdown(rows: list[Row], extras: dict[str, dict[str, Any]]) -> str:
    stages = ["decode", "detect_align", "audio", "vae_encode", "denoise", "vae_decode", "paste", "encode"]
    lines = [
        "| version | variant | " + " | ".join(stages) + " | wall s | s / video-s | peak VRAM GiB | GPU busy % | "
        "rel. err. vs fp32: latents / mouth pixels | PSNR / SSIM vs exact |",
        "|---" * (len(stages) + 8) + "|",
    ]
    for row in rows:
        versus = (f"{row.quality['vs_exact_psnr_db']:.1f} dB / {row.quality['vs_exact_ssim']:.3f}"
                  if "vs_exact_psnr_db" in row.quality else "")
        lines.append(
            f"| {row.version} | {row.variant} | "
            + " | ".join(f"{row.stages_s.get(stage, 0.0):.2f}" for stage in stages)
            + f" | **{row.wall_s:.2f}** | **{row.s_per_video_s:.3f}** | {row.peak_vram_gib} | {row.gpu_busy_pct} | "
            f"{row.quality['vs_fp32_latents_rel_l2']:.2e} / {row.quality['vs_fp32_rel_l2']:.2e} | {versus} |"
        )
    for version, extra in extras.items():
        lines.append(f"\n{version}: " + ", ".join(f"{key}: {value}" for key, value in extra.items()))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--video", type=Path, required=True)
    parser.add_argument("--audio", type=Path, required=True)
    parser.add_argument("--versions", nargs="+", choices=sorted(WINDOWS), default=["1.5", "1.6"])
    parser.add_argument("--tiny", action="store_true", help="same as --versions tiny")
    parser.add_argument("--official-root", type=Path, help="local export of the official LatentSync package")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp16")
    parser.add_argument("--check-frames", type=int, default=32, help="frames of the fp32 / exact-vs-fast checks")
    parser.add_argument("--variants", nargs="+", help="run only these variants (names as in the table)")
    parser.add_argument("--compiled", action=argparse.BooleanOptionalAction, default=True,
                        help="the compiled UNet's variant, the GPU default (compiles for a minute or two per batch range)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()
    versions = ["tiny"] if args.tiny else args.versions
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and args.dtype != "fp32":
        args.dtype = "fp32"

    rows: list[Row] = []
    extras: dict[str, dict[str, Any]] = {}

    def save(pending: Sequence[Row] = ()) -> None:
        """Write what is measured so far: a run cut short still leaves its finished variants."""
        if args.json:
            report = {
                "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                "torch": torch.__version__, "dtype": args.dtype, "date": time.strftime("%Y-%m-%d"),
                "rows": [asdict(row) for row in [*rows, *pending]], "extras": extras,
            }
            args.json.write_text(json.dumps(report, indent=2))

    with tempfile.TemporaryDirectory() as scratch:
        for version in versions:
            version_rows, extras[version] = bench_version(version, args, device, Path(scratch), save)
            rows += version_rows
            save()
            if device.type == "cuda":
                torch.cuda.empty_cache()  # the version's models are gone with bench_version's frame
    table = markdown(rows, extras)
    print(table)
    if args.markdown:
        args.markdown.write_text(table + "\n")


if __name__ == "__main__":
    main()
