"""How far ``POST /v1/estimate`` is from the truth: estimated vs measured run time over a series of jobs.

Starts ``tritonserver`` through the launcher (CPU, tiny demo weights by default; or uses ``--triton-grpc``,
a running server's gRPC address) and the gateway app in this process on a fresh job table, then for
each of ``--seconds`` in turn (the speech cut to that length, so the jobs differ in size) asks
``/v1/estimate/upload`` for the clip and the options, submits the same job, waits for it and records
the estimate (run seconds, its basis) beside the measured inference time the status reports. The
first job has no earlier job to go by (``basis: none``); the error is reported for the others.

    python scripts/bench_estimate.py --seconds 2 4 3 5 --steps 2 --json docs/bench/estimate-cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import secrets
import sys
import tempfile
import time
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from bench_triton import SAMPLE_RATE, wav_bytes
from fastapi.testclient import TestClient

from gateway.api.app import create_app
from gateway.core.auth import ApiKeys
from gateway.core.settings import GatewaySettings
from gateway.launcher.ports import free_port
from gateway.launcher.triton_server import TritonServer, TritonSettings
from lipsync.audio import load_audio

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
FINISHED = {"Succeed", "Failed", "Cancelled"}


def run_one(client: TestClient, video: bytes, audio: bytes, steps: int) -> dict:
    """Estimate the job, run it, and both figures side by side."""
    files = {"video": ("video.mp4", video), "audio": ("speech.wav", audio)}
    options = {"inference_steps": str(steps)}
    estimate = client.post("/v1/estimate/upload", files=files, data=options)
    estimate.raise_for_status()
    submitted = client.post("/lipsync/upload", files=files, data=options)
    submitted.raise_for_status()
    request_id = submitted.json()["request_id"]
    while (status := client.post("/lipsync/status", json={"request_id": request_id}).json())["status"] not in FINISHED:
        time.sleep(0.5)
    if status["status"] != "Succeed":
        raise RuntimeError(f"job {request_id}: {status['status']}: {status['reason']}")
    expected, actual = estimate.json(), status["results"]["timings"]["inference"]
    error = None if expected["run_s"] is None else round((expected["run_s"] - actual) / actual, 3)
    return {"frames": expected["frames"], "steps": steps, "estimate": expected, "actual_s": actual, "error": error}


def markdown(report: dict) -> str:
    lines = ["| job | speech s | frames | steps | estimated s | basis | measured s | error |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for index, job in enumerate(report["jobs"]):
        estimate = job["estimate"]
        run_s = "—" if estimate["run_s"] is None else f"{estimate['run_s']:.1f}"
        error = "—" if job["error"] is None else f"{100 * job['error']:+.0f} %"
        lines.append(f"| {index + 1} | {job['speech_s']} | {job['frames']} | {job['steps']} | {run_s} | "
                     f"{estimate['basis']} ({estimate['basis_jobs']}) | {job['actual_s']:.1f} | {error} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--video", type=Path, default=FIXTURES / "demo1_video.mp4", help="input video (default: the demo clip)")
    parser.add_argument("--audio", type=Path, default=FIXTURES / "demo1_audio.wav", help="speech, cut to each --seconds")
    parser.add_argument("--seconds", type=float, nargs="+", default=[2, 4, 3, 5], help="speech length of each job, in order")
    parser.add_argument("--steps", type=int, default=2, help="DDIM steps of every job")
    parser.add_argument("--triton-grpc", help="gRPC host:port of a running server (default: start one on CPU with tiny weights)")
    parser.add_argument("--json", type=Path, help="write the report here")
    args = parser.parse_args()

    waveform = load_audio(args.audio, SAMPLE_RATE)
    video = args.video.read_bytes()
    report: dict = {
        "command": " ".join(["python", *sys.argv]), "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "device": f"CPU ({platform.processor() or platform.machine()}), tiny demo weights" if not args.triton_grpc
        else "as served at --triton-grpc", "jobs": [],
    }
    key = secrets.token_urlsafe(24)
    with ExitStack() as stack:
        root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="lipsync-bench-estimate-")))
        grpc = args.triton_grpc
        if grpc is None:
            settings = TritonSettings.load(
                device="cpu", weights="tiny", checkpoints=str(root / "checkpoints"), workdir=root / "serve",
                http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(),
            )
            stack.enter_context(TritonServer(settings))
            grpc = settings.grpc_url
        gateway = GatewaySettings.load(data_dir=root / "gateway", port=free_port(), triton_grpc=grpc, concurrency=1)
        app = create_app(gateway, ApiKeys.load(gateway.api_keys_env, None, extra=[key]))
        client = stack.enter_context(TestClient(app, base_url=gateway.base_url, headers={"Authorization": f"Bearer {key}"}))
        for seconds in args.seconds:
            samples = round(seconds * SAMPLE_RATE)
            speech = np.tile(waveform, -(-samples // waveform.size))[:samples]
            job = run_one(client, video, wav_bytes(speech), args.steps) | {"speech_s": seconds}
            report["jobs"].append(job)
            print(f"job of {seconds} s: estimated {job['estimate']['run_s']} s ({job['estimate']['basis']}), "
                  f"measured {job['actual_s']} s", file=sys.stderr)
    errors = [abs(job["error"]) for job in report["jobs"] if job["error"] is not None]
    report["mean_abs_error"] = round(float(np.mean(errors)), 3) if errors else None
    report["max_abs_error"] = round(max(errors), 3) if errors else None
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    print(markdown(report))


if __name__ == "__main__":
    main()
