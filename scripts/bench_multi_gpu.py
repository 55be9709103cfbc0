"""Several GPUs of one host through a real Triton server: throughput per GPU count, and one long job split.

Two phases, each for N = 1, 2, … GPUs (``--counts``):

- ``throughput``: Triton with one ``lipsync`` instance per GPU on GPUs 0…N-1 (``--gpus``), restarted
  for each N; after one warm-up job and once every instance serves its compiled UNet,
  ``--jobs-per-gpu`` × N identical jobs at once; jobs per hour.
- ``split``: Triton once with one instance holding GPUs 0…max(N)-1 (``--split-jobs``); after one warm-up
  job, one long job (the speech looped to ``--long-seconds``, the video ping-ponged under it) with
  ``DEVICES`` = N, alone; its wall time.

The JSON (``--json``, default ``docs/bench/multi-gpu.json``) is rewritten after every measurement and
keeps what earlier calls measured, so a run cut short keeps its results and a later call (another
phase, another N) adds to them:

    python scripts/bench_multi_gpu.py --video demo1_video.mp4 --audio demo1_audio.wav --phase throughput --counts 1 2
    python scripts/bench_multi_gpu.py --video demo1_video.mp4 --audio demo1_audio.wav --phase split --counts 1 2

``--version tiny --device cpu --counts 1`` runs both phases on the CPU with tiny weights (a smoke test).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import date
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO_ROOT), str(REPO_ROOT / "scripts")]

import numpy as np
from bench_triton import SAMPLE_RATE, wait_until_compiled, wav_bytes

from gateway.backends.triton_client import JobRequest, stream_job
from gateway.launcher.ports import free_port
from gateway.launcher.triton_server import TritonServer, TritonSettings
from lipsync.audio import load_audio
from lipsync.testing import ensure_random_weights

DEFAULT_JSON = REPO_ROOT / "docs" / "bench" / "multi-gpu.json"


def device_name(device: str, gpus: int) -> str:
    if device == "cpu":
        return "cpu"
    import torch

    return f"{gpus}x {torch.cuda.get_device_name(0)}"


def looped_speech(audio: Path, seconds: float) -> bytes:
    """The speech repeated (and cut) to ``seconds``, as a WAV file."""
    waveform = load_audio(audio, SAMPLE_RATE)
    repeats = int(np.ceil(seconds * SAMPLE_RATE / len(waveform)))
    return wav_bytes(np.tile(waveform, repeats)[: int(seconds * SAMPLE_RATE)])


def settings_for(args: argparse.Namespace, gpus: int, split_jobs: bool) -> TritonSettings:
    return TritonSettings.load(
        device=args.device, gpus=tuple(range(gpus)) if args.device == "gpu" else (), split_jobs=split_jobs,
        weights=args.version, checkpoints=str(args.checkpoints), dtype=args.dtype, workdir=args.workdir,
        http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(),  # beside a running server
    )


def timed_jobs(settings: TritonSettings, jobs: list[JobRequest]) -> tuple[float, list]:
    """Run ``jobs`` at once; wall seconds and their results."""
    started = time.perf_counter()
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda job: stream_job(settings.grpc_url, job), jobs))
    return time.perf_counter() - started, results


def throughput(args: argparse.Namespace, gpus: int, job: JobRequest) -> dict:
    """Jobs per hour of ``jobs_per_gpu × gpus`` concurrent jobs on one instance per GPU."""
    settings = settings_for(args, gpus, split_jobs=False)
    started = time.perf_counter()
    with TritonServer(settings) as server:
        ready_s = time.perf_counter() - started
        timed_jobs(settings, [job] * gpus)  # warm-up: each instance's first job
        wait_until_compiled(server)
        compiled_s = time.perf_counter() - started
        jobs = args.jobs_per_gpu * gpus
        wall, results = timed_jobs(settings, [job] * jobs)
    return {"jobs": jobs, "wall_s": round(wall, 2), "jobs_per_hour": round(jobs / wall * 3600, 1),
            "video_seconds_per_job": results[0].info["frames"] / 25,
            "server_ready_s": round(ready_s, 1), "compiled_serving_s": round(compiled_s, 1)}


def split_walls(args: argparse.Namespace, counts: list[int], warmup: JobRequest, long_job: JobRequest) -> Iterator[tuple[int, dict]]:
    """Wall time of the long job spread over each count of devices, on one instance holding ``max(counts)`` GPUs."""
    settings = settings_for(args, max(counts), split_jobs=True)
    with TritonServer(settings) as server:
        timed_jobs(settings, [replace(warmup, devices=max(counts))])  # every replica's first job
        wait_until_compiled(server)
        for count in counts:
            wall, [result] = timed_jobs(settings, [replace(long_job, devices=count)])
            yield count, {"wall_s": round(wall, 2), "devices_used": result.info["devices"], "frames": result.info["frames"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--video", type=Path, required=True)
    parser.add_argument("--audio", type=Path, required=True, help="speech of the throughput jobs; looped for the long job")
    parser.add_argument("--version", choices=["1.5", "1.6", "tiny"], default="1.5")
    parser.add_argument("--checkpoints", type=Path, default=Path("/tmp/lipsync-bench-weights"))
    parser.add_argument("--device", choices=["cpu", "gpu"], default="gpu")
    parser.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16")
    parser.add_argument("--phase", choices=["throughput", "split", "all"], default="all")
    parser.add_argument("--counts", type=int, nargs="+", help="GPU counts to measure (default 1 … all visible)")
    parser.add_argument("--jobs-per-gpu", type=int, default=2, help="concurrent jobs per GPU in the throughput phase")
    parser.add_argument("--long-seconds", type=float, default=120.0, help="length of the split phase's job")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/lipsync-bench-serve"))
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = parser.parse_args()

    if args.device == "cpu":
        visible = 1
    else:
        import torch

        visible = torch.cuda.device_count()
    counts = sorted(set(args.counts or range(1, visible + 1)))
    if counts[0] < 1 or counts[-1] > visible:
        parser.error(f"--counts must be within 1 … {visible} (devices this machine has)")
    if ensure_random_weights(args.version, args.checkpoints):
        print(f"wrote full-size random {args.version} weights to {args.checkpoints}", file=sys.stderr)

    report = json.loads(args.json.read_text(encoding="utf-8")) if args.json.is_file() else {}
    report.update({"device": device_name(args.device, visible), "date": date.today().isoformat(), "version": args.version,
                   "dtype": args.dtype, "steps": args.steps})
    report.setdefault("jobs_per_hour", {})
    report.setdefault("split_job_wall_s", {})
    report.setdefault("details", {})

    def save() -> None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(json.dumps({key: report[key] for key in ("jobs_per_hour", "split_job_wall_s")}), file=sys.stderr)

    video = args.video.read_bytes()
    job = JobRequest(video, args.audio.read_bytes(), inference_steps=args.steps)
    if args.phase in ("throughput", "all"):
        for count in counts:
            result = throughput(args, count, job)
            report["jobs_per_hour"][str(count)] = result["jobs_per_hour"]
            report["details"][f"throughput_{count}"] = result
            save()
    if args.phase in ("split", "all"):
        long_job = JobRequest(video, looped_speech(args.audio, args.long_seconds), inference_steps=args.steps)
        for count, result in split_walls(args, counts, job, long_job):
            report["split_job_wall_s"][str(count)] = result["wall_s"]
            report["details"][f"split_{count}"] = result | {"long_seconds": args.long_seconds}
            save()


if __name__ == "__main__":
    main()
