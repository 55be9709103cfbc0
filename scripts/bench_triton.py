"""Jobs per hour through a real Triton server, 1 job alone vs N concurrent jobs sharing the GPU.

Starts ``tritonserver`` with our model repository through the launcher (``gateway.triton_server``),
full-size random weights of ``--version`` in the official formats (written to ``--checkpoints``
unless present), warms up with one job, then for each concurrency level runs that many identical jobs
at once over gRPC streaming and reads the batcher's histograms from ``/metrics``: how many windows
and jobs shared each DDIM loop.

    python scripts/bench_triton.py --video demo1_video.mp4 --audio demo1_audio.wav --concurrency 1 4 --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx2

from gateway.metrics import sample_sum
from gateway.triton_client import JobRequest, run_job
from gateway.triton_server import TritonServer, TritonSettings
from lipsync.tiny import write_random_weights
from lipsync.weights import missing, weight_paths


def scrape(url: str, *names: str) -> dict[str, float]:
    """Sum of each named sample over all label sets on ``/metrics``."""
    text = httpx2.get(url, timeout=10).text
    return {name: sample_sum(text, name) for name in names}


GPU_GAUGES = ("lipsync_gpu_utilization_ratio", "lipsync_gpu_memory_used_bytes")


def sample_gpu(url: str, jobs: list, interval_s: float = 1.0) -> list[dict[str, float]]:
    """The model's GPU gauges, read every ``interval_s`` until all ``jobs`` are done."""
    samples = []
    while not all(job.done() for job in jobs):
        samples.append(scrape(url, *GPU_GAUGES))
        time.sleep(interval_s)
    return samples


BATCH_SAMPLES = (
    "lipsync_unet_batch_windows_sum", "lipsync_unet_batch_windows_count",
    "lipsync_unet_batch_jobs_sum", "lipsync_unet_batch_jobs_count",
)


def run_level(settings: TritonSettings, job: JobRequest, concurrency: int) -> dict:
    before = scrape(settings.metrics_url, *BATCH_SAMPLES)
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency + 1) as pool:
        jobs = [pool.submit(run_job, settings.grpc_url, job) for _ in range(concurrency)]
        utilization = pool.submit(sample_gpu, settings.metrics_url, jobs)
        results = [future.result() for future in jobs]
    wall = time.perf_counter() - started
    samples = utilization.result()
    after = scrape(settings.metrics_url, *BATCH_SAMPLES)
    delta = {name: after[name] - before[name] for name in BATCH_SAMPLES}
    calls = delta["lipsync_unet_batch_windows_count"]
    return {
        "concurrency": concurrency,
        "wall_s": round(wall, 2),
        "jobs_per_hour": round(concurrency / wall * 3600, 1),
        "video_seconds_per_job": results[0].info["frames"] / 25,
        "ddim_loops": int(calls),
        "mean_windows_per_loop": round(delta["lipsync_unet_batch_windows_sum"] / calls, 2) if calls else 0,
        "mean_jobs_per_loop": round(delta["lipsync_unet_batch_jobs_sum"] / calls, 2) if calls else 0,
        "gpu_utilization_mean": round(sum(s["lipsync_gpu_utilization_ratio"] for s in samples) / len(samples), 3) if samples else None,
        "gpu_memory_used_peak_gib": round(max(s["lipsync_gpu_memory_used_bytes"] for s in samples) / 2**30, 2) if samples else None,
        "stage_seconds_first_job": results[0].info["seconds"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--video", type=Path, required=True)
    parser.add_argument("--audio", type=Path, required=True)
    parser.add_argument("--version", choices=["1.5", "1.6", "tiny"], default="1.5")
    parser.add_argument("--checkpoints", type=Path, default=Path("/tmp/lipsync-bench-weights"))
    parser.add_argument("--device", choices=["cpu", "gpu"], default="gpu")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/lipsync-bench-serve"))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    if args.version != "tiny" and missing(weight_paths(args.version, args.checkpoints)):
        print(f"writing full-size random {args.version} weights to {args.checkpoints}", file=sys.stderr)
        write_random_weights(args.version, args.checkpoints)
    settings = TritonSettings.load(
        device=args.device, weights=args.version, checkpoints=str(args.checkpoints), dtype=args.dtype, workdir=args.workdir
    )
    job = JobRequest(args.video.read_bytes(), args.audio.read_bytes(), steps=args.steps)
    started = time.perf_counter()
    with TritonServer(settings) as server:
        ready_s = time.perf_counter() - started
        warmup = run_level(settings, job, 1)
        levels = [run_level(settings, job, concurrency) for concurrency in args.concurrency]
        print(server.log_tail(5), file=sys.stderr)
    single = next((level for level in levels if level["concurrency"] == 1), None)
    for level in levels:
        if single is not None:
            level["wall_vs_one_job"] = round(level["wall_s"] / single["wall_s"], 2)
    report = {"version": args.version, "dtype": args.dtype, "steps": args.steps, "server_ready_s": round(ready_s, 1), "warmup": warmup, "levels": levels}
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
