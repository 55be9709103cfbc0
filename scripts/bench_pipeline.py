"""End-to-end pipeline timing with full-size random weights, split by stage.

Writes random weights of the real architectures in the official file formats (UNet from the
version's LatentSync config, Whisper tiny, sd-vae-ft-mse) with PyTorch's default initialisation,
loads them through the normal loaders, runs the whole job once to warm up and once timed, and
prints the per-stage wall time. Speed does not depend on the weights' values.

    python scripts/bench_pipeline.py --version 1.5 --video demo1_video.mp4 --audio demo1_audio.wav --json out.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from lipsync.pipeline import DTYPES, LipSyncPipeline
from lipsync.tiny import write_random_weights

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", choices=["1.5", "1.6"], default="1.5")
    parser.add_argument("--video", type=Path, required=True)
    parser.add_argument("--audio", type=Path, required=True)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp16")
    parser.add_argument("--windows-per-call", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"

    with tempfile.TemporaryDirectory() as scratch:
        started = time.perf_counter()
        paths = write_random_weights(args.version, Path(scratch) / "weights")
        written = time.perf_counter() - started
        pipeline = LipSyncPipeline.from_weights(paths, device, DTYPES[args.dtype], windows_per_call=args.windows_per_call)
        loaded = time.perf_counter() - started - written
        runs = []
        for _ in range(2):
            torch.cuda.reset_peak_memory_stats() if device == "cuda" else None
            begin = time.perf_counter()
            result = pipeline.run(args.video, args.audio, Path(scratch) / "out.mp4", steps=args.steps)
            runs.append({"wall_s": time.perf_counter() - begin, **result.as_dict()})
        peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None

    timed = runs[-1]
    video_seconds = timed["frames"] / 25
    report = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "version": args.version, "dtype": args.dtype, "windows_per_call": args.windows_per_call, "steps": args.steps,
        "weights_write_s": round(written, 1), "load_s": round(loaded, 1), "warmup_wall_s": round(runs[0]["wall_s"], 2),
        "wall_s": round(timed["wall_s"], 2), "frames": timed["frames"], "faceless_frames": timed["faceless_frames"],
        "seconds_per_video_second": round(timed["wall_s"] / video_seconds, 3), "stages_s": timed["seconds"],
        "peak_vram_gib": None if peak is None else round(peak, 2),
    }
    print(json.dumps(report, indent=2))
    print("\n| stage | seconds | share |\n|---|---|---|")
    for stage, seconds in timed["seconds"].items():
        print(f"| {stage} | {seconds:.2f} | {seconds / timed['wall_s']:.0%} |")
    print(f"| **total wall** | {timed['wall_s']:.2f} | {video_seconds:.2f} s of video |")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
