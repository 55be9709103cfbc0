"""Jobs per hour through a real Triton server, 1 job alone vs N concurrent jobs sharing the GPU.

Starts ``tritonserver`` with our model repository through the launcher (``gateway.launcher.triton_server``),
full-size random weights of ``--version`` in the official formats (written to ``--checkpoints``
unless present), runs one job, then (``--stress``) the stress run below while the instances compile
their UNet on a thread of their own (they report ready first), waits until every instance serves the
compiled UNet, then for each concurrency level runs that many identical jobs
at once over gRPC streaming and reads the batcher's histograms from ``/metrics``: how many windows
and jobs shared each DDIM loop.

GPU busy and memory come from NVML in this process (every 0.25 s, the whole GPU: every process of the
server), so the peak is the server's, not one model's. Each level also reports the UNet's achieved
TFLOP/s (FLOPs counted with ``torch.utils.flop_counter`` per window and step, times the windows and steps
its jobs ran, over the level's wall time) beside the GPU's measured dense fp16 matrix-product rate.

``--job-processes`` and ``--gpu-memory-gib`` set the server's layout and memory cap
(``configs/serving.yaml``'s ``job_processes`` and ``gpu_memory_gib``).

``--stress JOBS ROUNDS`` runs ROUNDS rounds of JOBS concurrent jobs of mixed clip lengths
(the speech cut to several lengths, so most jobs end in a shorter window), step counts and sampling
modes, and counts the jobs that succeeded. ``--restart`` stops the server and starts it again on the
same work folder: the second ready time is the warm start (compiled kernels from the Inductor cache).
Both starts report when the server was ready and when the compiled UNet served.

    python scripts/bench_triton.py --video demo1_video.mp4 --audio demo1_audio.wav --concurrency 1 4 8 \
        --stress 8 3 --restart --json out.json
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import signal
import subprocess
import sys
import threading
import time
import wave
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx2
import numpy as np

from gateway.backends.triton_client import JobRequest, served_info, stream_job
from gateway.launcher.ports import free_port
from gateway.launcher.triton_server import TritonServer, TritonSettings
from lipsync.audio import load_audio
from lipsync.lifecycle import COMPILE_FAILED_LINE, COMPILED_LINE, COMPILING_LINE
from lipsync.testing import ensure_random_weights, sample_sum, unet_window_step_flops
from lipsync.weights import weight_paths


def scrape(url: str, *names: str) -> dict[str, float]:
    """Sum of each named sample over all label sets on ``/metrics``."""
    text = httpx2.get(url, timeout=10).text
    return {name: sample_sum(text, name) for name in names}


@dataclass(frozen=True)
class GpuSample:
    busy: float
    """GPU 0's busy fraction (NVML)."""
    used: int
    """Bytes in use on GPU 0, all processes."""
    processes: dict[str, int]
    """Bytes each process holds on GPU 0 (CUDA and graphics contexts), by :func:`process_label`."""


def process_label(pid: int) -> str:
    """A Python backend stub's model instance name (its argv holds it), else the program's name, else the pid
    (NVML may report pids of another pid namespace)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return f"pid {pid}"
    if "triton_python_backend_stub" in argv[0]:
        return next((arg for arg in argv if arg.startswith("lipsync")), f"stub {pid}")
    return f"{Path(argv[0]).name} {pid}"


def sample_gpu(jobs: list, interval_s: float = 0.25) -> list[GpuSample]:
    """GPU 0 from NVML every ``interval_s`` until all ``jobs`` are done; none without NVML (a CPU run). NVML needs
    no CUDA context in this process."""
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    except Exception:  # noqa: BLE001 - no NVIDIA driver: nothing to sample
        return []
    samples = []
    while not all(job.done() for job in jobs):
        running = [
            *pynvml.nvmlDeviceGetComputeRunningProcesses(handle),
            *pynvml.nvmlDeviceGetGraphicsRunningProcesses(handle),
        ]
        processes: dict[str, int] = {}
        for process in running:
            label = process_label(process.pid)
            processes[label] = processes.get(label, 0) + (process.usedGpuMemory or 0)
        samples.append(GpuSample(
            pynvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100, pynvml.nvmlDeviceGetMemoryInfo(handle).used, processes,
        ))
        time.sleep(interval_s)
    return samples


def memory_peaks(samples: list[GpuSample]) -> dict:
    """The peak of the whole GPU's memory and each process's own peak, in GiB (none without samples)."""
    if not samples:
        return {"gpu_memory_used_peak_gib": None}
    peaks: dict[str, int] = {}
    for sample in samples:
        for label, used in sample.processes.items():
            peaks[label] = max(peaks.get(label, 0), used)
    return {
        "gpu_memory_used_peak_gib": round(max(sample.used for sample in samples) / 2**30, 2),
        "gpu_memory_peak_gib_per_process": {label: round(used / 2**30, 2) for label, used in sorted(peaks.items())},
    }


class Peak:
    """NVML's memory peaks over a phase (the stress run), sampled on a thread."""

    def __init__(self) -> None:
        self._ended = threading.Event()
        self._pool = ThreadPoolExecutor(1)
        self._samples = self._pool.submit(sample_gpu, [self])

    def done(self) -> bool:
        """Whether the phase ended (``sample_gpu`` asks, as it asks its jobs)."""
        return self._ended.is_set()

    def __enter__(self) -> Peak:
        return self

    def __exit__(self, *_exc) -> None:
        self._ended.set()
        self._pool.shutdown()

    def peaks(self) -> dict:
        return memory_peaks(self._samples.result())


BATCH_SAMPLES = (
    "lipsync_unet_batch_windows_sum", "lipsync_unet_batch_windows_count",
    "lipsync_unet_batch_jobs_sum", "lipsync_unet_batch_jobs_count",
)


def run_level(settings: TritonSettings, job: JobRequest, concurrency: int, rates: dict | None = None) -> dict:
    before = scrape(settings.metrics_url, *BATCH_SAMPLES)
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency + 1) as pool:
        jobs = [pool.submit(stream_job, settings.grpc_url, job) for _ in range(concurrency)]
        utilization = pool.submit(sample_gpu, jobs)
        results = [future.result() for future in jobs]
    wall = time.perf_counter() - started
    samples = utilization.result()
    after = scrape(settings.metrics_url, *BATCH_SAMPLES)
    delta = {name: after[name] - before[name] for name in BATCH_SAMPLES}
    calls = delta["lipsync_unet_batch_windows_count"]
    frames = results[0].info["frames"]
    level = {
        "concurrency": concurrency,
        "wall_s": round(wall, 2),
        "jobs_per_hour": round(concurrency / wall * 3600, 1),
        "video_seconds_per_job": results[0].info["frames"] / 25,
        "ddim_loops": int(calls),
        "mean_windows_per_loop": round(delta["lipsync_unet_batch_windows_sum"] / calls, 2) if calls else 0,
        "mean_jobs_per_loop": round(delta["lipsync_unet_batch_jobs_sum"] / calls, 2) if calls else 0,
        "seconds_per_video_second": round(wall / (frames / 25), 3),
        "gpu_utilization_mean": round(sum(sample.busy for sample in samples) / len(samples), 3) if samples else None,
        **memory_peaks(samples),
        "stage_seconds_first_job": results[0].info["seconds"],
    }
    if rates is not None:  # exact mode: every step is a full UNet pass
        flops = concurrency * frames / 16 * job.inference_steps * rates["unet_window_step_tflop"]
        level["unet_tflops_achieved"] = round(flops / wall, 1)
        if rates.get("gemm_tflops"):
            level["unet_fraction_of_gemm"] = round(flops / wall / rates["gemm_tflops"], 3)
    return level


STRESS_SECONDS = (1.3, 2.9, 4.5, 9.6)
"""Speech lengths of the stress jobs (cut from the start of ``--audio``)."""
STRESS_OPTIONS = ((20, "exact"), (10, "exact"), (20, "fast"), (7, "exact"))
"""(steps, mode) of the stress jobs."""
SAMPLE_RATE = 16000


def wav_bytes(waveform: np.ndarray) -> bytes:
    """A 16-bit mono WAV file of a float waveform at 16 kHz."""
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as file:
        file.setnchannels(1)
        file.setsampwidth(2)
        file.setframerate(SAMPLE_RATE)
        file.writeframes((np.clip(waveform, -1, 1) * 32767).astype("<i2").tobytes())
    return buffer.getvalue()


def stress(
    settings: TritonSettings, video: bytes, audio: Path, jobs: int, rounds: int, on_round: Callable[[dict], None]
) -> dict:
    """``rounds`` rounds of ``jobs`` concurrent jobs, each with its own length, step count and mode; ``on_round``
    gets the summary so far after every round (a run cut short keeps its finished rounds)."""
    waveform = load_audio(audio, SAMPLE_RATE)
    cuts = [wav_bytes(waveform[: int(seconds * SAMPLE_RATE)]) for seconds in STRESS_SECONDS]
    mixes = itertools.cycle(itertools.product(range(len(cuts)), STRESS_OPTIONS))
    outcomes: list[dict] = []
    started = time.perf_counter()
    for round_index in range(rounds):
        batch = [next(mixes) for _ in range(jobs)]
        with ThreadPoolExecutor(jobs) as pool:
            futures = [
                pool.submit(stream_job, settings.grpc_url, JobRequest(video, cuts[cut], inference_steps=steps, mode=mode))
                for cut, (steps, mode) in batch
            ]
            for (cut, (steps, mode)), future in zip(batch, futures):
                try:
                    result = future.result()
                    outcome = {"status": "Succeed", "frames": result.info["frames"]}
                except Exception as exc:  # counted and reported; the stress run goes on
                    outcome = {"status": "Failed", "error": str(exc)[:300]}
                outcomes.append({"round": round_index, "seconds": STRESS_SECONDS[cut], "steps": steps, "mode": mode} | outcome)
        on_round(summary(outcomes, time.perf_counter() - started))
    return summary(outcomes, time.perf_counter() - started)


def summary(outcomes: list[dict], wall_s: float) -> dict:
    return {
        "jobs": len(outcomes), "succeeded": sum(outcome["status"] == "Succeed" for outcome in outcomes),
        "wall_s": round(wall_s, 1), "failures": [outcome for outcome in outcomes if outcome["status"] != "Succeed"],
    }


def compiled(server: TritonServer) -> bool:
    """Whether jobs run on the compiled UNet now, or on the only UNet there is (no instance compiles while
    serving), from the instances' log lines; a compilation that failed ends the benchmark with the server's log.
    Read from the log, not asked, so that the timed runs send jobs only."""
    log = server.log_path.read_text(errors="replace")
    if COMPILE_FAILED_LINE in log:
        raise SystemExit(f"an instance could not compile its UNet:\n{server.log_tail(20)}")
    return log.count(COMPILED_LINE) >= log.count(COMPILING_LINE)


def wait_until_compiled(server: TritonServer, timeout_s: float = 900.0) -> float:
    """Block until every GPU instance serves the compiled UNet (``triton.log``); seconds waited.

    Instances compile on a thread of their own after they report ready, serving uncompiled meanwhile:
    the timed runs wait for the steady state."""
    started = time.perf_counter()
    while time.perf_counter() - started < timeout_s:
        if compiled(server):
            return round(time.perf_counter() - started, 1)
        time.sleep(1.0)
    raise SystemExit(f"the UNet was not compiled within {timeout_s:.0f} s:\n{server.log_tail(20)}")


def cache_files(settings: TritonSettings) -> int:
    """Files in the server's Inductor cache (under its work folder)."""
    folder = Path(settings.workdir) / "inductor-cache"
    return sum(1 for path in folder.rglob("*") if path.is_file()) if folder.is_dir() else 0


def stop_servers_on_sigterm() -> None:
    """Turn SIGTERM (``timeout``, a job runner) into ``SystemExit``, so the ``TritonServer`` blocks stop their
    server (it runs in its own session and would outlive this process)."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--video", type=Path, required=True)
    parser.add_argument("--audio", type=Path, required=True)
    parser.add_argument("--version", choices=["1.5", "1.6", "tiny"], default="1.5")
    parser.add_argument("--checkpoints", type=Path, default=Path("/tmp/lipsync-bench-weights"))
    parser.add_argument("--device", choices=["cpu", "gpu"], default="gpu")
    parser.add_argument("--concurrency", type=int, nargs="*", default=[1, 4, 8], help="levels to time (none: skip)")
    parser.add_argument("--job-processes", type=lambda text: text if text == "auto" else int(text), default="auto",
                        help="the server's job processes (0: one process per GPU does everything)")
    parser.add_argument("--gpu-memory-gib", type=float, help="the generation process's GPU memory cap (default: the config's)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction,
                        help="whether the server compiles the UNet (default: the config's)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/lipsync-bench-serve"))
    parser.add_argument("--stress", type=int, nargs=2, metavar=("JOBS", "ROUNDS"), help="mixed-job stress run")
    parser.add_argument("--restart", action="store_true", help="restart on the same work folder; time the warm start")
    parser.add_argument("--stress-when", choices=["compiling", "compiled"], default="compiling",
                        help="run the stress while the UNet compiles (the riskiest time) or after the timed levels")
    parser.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True,
                        help="time one job on the uncompiled UNet first")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    stop_servers_on_sigterm()

    if ensure_random_weights(args.version, args.checkpoints):
        print(f"wrote full-size random {args.version} weights to {args.checkpoints}", file=sys.stderr)
    settings = TritonSettings.load(
        device=args.device, weights=args.version, checkpoints=str(args.checkpoints), dtype=args.dtype, workdir=args.workdir,
        job_processes=args.job_processes, gpu_memory_gib=args.gpu_memory_gib, compile_unet=args.compile,
        http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(),  # beside a running server
    )
    video = args.video.read_bytes()
    job = JobRequest(video, args.audio.read_bytes(), inference_steps=args.steps)
    report: dict = {
        "version": args.version, "dtype": args.dtype, "steps": args.steps, "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(sys.argv), "job_processes": settings.resolved_job_processes(),
        "gpu_memory_gib": settings.gpu_memory_gib, "compile_unet": settings.compile_unet, "levels": [],
    }
    rates = {"unet_window_step_tflop": round(unet_window_step_flops(weight_paths(args.version, args.checkpoints).unet_config) / 1e12, 3)}
    if args.device == "gpu":  # in a child process: this one must hold no CUDA context beside the server's
        probe = "import torch; from lipsync.testing import gemm_tflops; print(torch.cuda.get_device_name(), '|', gemm_tflops())"
        name, gemm = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip().split(" | ")
        report["device"], rates["gemm_tflops"] = name, round(float(gemm), 1)
    report["rates"] = rates

    def save() -> None:
        """Write what is measured so far: a run cut short still leaves its finished phases."""
        single = next((level for level in report["levels"] if level["concurrency"] == 1), None)
        for level in report["levels"]:
            if single is not None:
                level["wall_vs_one_job"] = round(level["wall_s"] / single["wall_s"], 2)
        if args.json:
            args.json.write_text(json.dumps(report, indent=2), encoding="utf-8")

    started = time.perf_counter()
    with TritonServer(settings) as server:
        report["server_ready_s"] = round(time.perf_counter() - started, 1)
        save()
        if args.warmup:
            report["warmup"] = run_level(settings, job, 1)  # on the uncompiled UNet, beside the compilation
            save()

        def run_stress() -> None:
            def so_far(summary: dict) -> None:
                report["stress"] = summary
                save()

            with Peak() as peak:
                report["stress"] = stress(settings, video, args.audio, *args.stress, on_round=so_far)
            report["stress"] |= peak.peaks()
            if args.compile is not False:
                report["stress"]["compiled_before_it_ended"] = compiled(server)
            save()

        if args.stress and args.stress_when == "compiling":
            run_stress()
        if args.compile is not False:  # nothing to wait for without a compilation
            wait_until_compiled(server)
            report["compiled_serving_s"] = round(time.perf_counter() - started, 1)
        save()
        for concurrency in args.concurrency:
            report["levels"].append(run_level(settings, job, concurrency, rates))
            save()
        if args.stress and args.stress_when == "compiled":
            run_stress()
        try:  # the describe request, last: what a client asking which weights are served gets
            report["describe"] = served_info(settings.grpc_url)
        except Exception as exc:  # noqa: BLE001 - recorded; the measurements above stand
            report["describe"] = {"error": str(exc)[:300]}
        save()
        print(server.log_tail(5), file=sys.stderr)
    report["inductor_cache_files"] = cache_files(settings)
    if args.restart:
        started = time.perf_counter()
        with TritonServer(settings) as server:
            report["server_ready_warm_s"] = round(time.perf_counter() - started, 1)
            wait_until_compiled(server)
            report["compiled_serving_warm_s"] = round(time.perf_counter() - started, 1)
            report["after_restart"] = run_level(settings, job, 1)
    save()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
