"""How well the streamed ETA predicts a job's end: predicted vs actual end over each of a series of jobs.

Starts ``tritonserver`` through the launcher (CPU, tiny demo weights by default; ``--device gpu`` with
full-size random weights of ``--version``, timed once the UNet is compiled; or uses ``--url``, a running
server's gRPC address), then runs one job after another, the speech cut to each of
``--seconds`` in turn, so the jobs differ in size. For every progress response it records the time
since the job was sent, the progress, the stage and the ETA; the predicted end is that time plus the
ETA, and its error is relative to when the result actually arrived. The first job of a server
started on a work folder without learned stage rates (``lipsync.progress.StageRates``' file; a new
temporary folder unless ``--workdir``) has none to go by, so it is reported apart from the others.

    python scripts/bench_eta.py --seconds 3 6 4 6 --steps 10 --json docs/bench/eta-cpu.json --markdown eta.md

``--replay`` starts no server: it feeds a recorded report's progress responses to the estimator as
it is now (:func:`replay`), to tell how a change to it does on the very same run, drift included.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from bench_triton import SAMPLE_RATE, stop_servers_on_sigterm, wait_until_compiled, wav_bytes

from gateway.backends.triton_client import JobRequest, TritonJobError, served_info, stream_job
from gateway.launcher.ports import free_port
from gateway.launcher.triton_server import TritonServer, TritonSettings
from lipsync.audio import load_audio
from lipsync.progress import EtaEstimate, EtaSettings, JobSize, StageRates
from lipsync.testing import ensure_random_weights

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
FROM = 0.1
"""Errors are summarised from this share of the job on (of its progress, and of its time)."""


def run_one(url: str, video: bytes, speech: np.ndarray, steps: int) -> dict:
    """One job; every progress response as ``[seconds since sent, progress, stage, eta_s]``."""
    reports: list[list] = []
    started = time.monotonic()

    def seen(fraction: float, stage: str, eta: float | None) -> None:
        reports.append([round(time.monotonic() - started, 2), round(fraction, 4), stage, None if eta is None else round(eta, 2)])

    result = stream_job(url, JobRequest(video, wav_bytes(speech), inference_steps=steps), on_progress=seen)
    actual = time.monotonic() - started
    return summarise(reports, actual) | {"frames": result.info["frames"], "steps": steps, "reports": reports}


def summarise(reports: list[list], actual: float) -> dict:
    """The largest relative error of the predicted end from ``FROM`` of the job's progress on and from
    ``FROM`` of its time on (signed: + predicted too late; and the stage and progress where it was),
    and when the first ETA came."""

    def error(row: list) -> float:
        at, _, _, eta = row
        return (at + eta - actual) / actual

    def worst_row(rows: list[list]) -> list | None:
        return max((row for row in rows if row[3] is not None), key=lambda row: abs(error(row)), default=None)

    def worst(rows: list[list]) -> float | None:
        row = worst_row(rows)
        return None if row is None else round(abs(error(row)), 3)

    def unknown(rows: list[list]) -> int:
        return sum(eta is None for *_, eta in rows)

    by_progress = [row for row in reports if row[1] >= FROM]
    by_time = [row for row in reports if row[0] >= FROM * actual]
    first = next((row for row in reports if row[3] is not None), None)
    at_worst = worst_row(by_progress)
    return {
        "actual_s": round(actual, 2),
        "worst_error_from_10pct_progress": worst(by_progress),
        "worst_from_10pct_progress_at": None
        if at_worst is None
        else {"progress": at_worst[1], "stage": at_worst[2], "signed_error": round(error(at_worst), 3)},
        "worst_error_from_10pct_time": worst(by_time),
        "reports_without_eta_from_10pct_progress": unknown(by_progress),
        "first_eta_at_progress": None if first is None else first[1],
    }


class _RecordedClock:
    """The recorded time of the progress response being replayed."""

    now = 0.0

    def __call__(self) -> float:
        return self.now


def replay(recorded: dict, source: Path) -> dict:
    """``recorded`` with every progress response's ETA recomputed by ``lipsync.progress`` as it is now.

    The estimator reads the recorded times as its clock (the client's receive times standing in for
    the server's), gets each job's size after the job's first response (the server plans once the
    audio is read) and learns each job's stage times when its result came, in order, from no learned
    rates, as a freshly started server with the ``eta`` settings of ``configs/pipeline.yaml`` would.
    """
    settings = EtaSettings.load()
    rates = StageRates(settings.history_jobs, settings.fixed_share)
    clock = _RecordedClock()
    jobs = []
    for job in recorded["jobs"]:
        clock.now = 0.0
        eta = EtaEstimate(rates, clock)
        reports = []
        for index, (at, fraction, stage, _) in enumerate(job["reports"]):
            clock.now = at
            seconds = eta(fraction, stage)
            reports.append([at, fraction, stage, None if seconds is None else round(seconds, 2)])
            if index == 0:
                eta.plan(JobSize(job["frames"], job["steps"]))
        clock.now = job["actual_s"]
        eta.finish()
        jobs.append(job | summarise(reports, job["actual_s"]) | {"reports": reports})
    return recorded | {
        "command": " ".join(["python", *sys.argv]),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "replayed": {"path": str(source), "command": recorded["command"], "date": recorded["date"]},
        "jobs": jobs,
    }


def markdown(report: dict) -> str:
    lines = [
        "| job | speech s | frames | steps | actual s | worst error from 10 % progress | where (stage, progress) "
        "| from 10 % time | first ETA at |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for index, job in enumerate(report["jobs"]):
        label = f"{index + 1}{' (cold)' if index == 0 and report['fresh_server'] else ''}"

        def pct(value: float | None, sign: str = "") -> str:
            return "—" if value is None else f"{100 * value:{sign}.0f} %"

        at = job["worst_from_10pct_progress_at"]
        where = "—" if at is None else f"{pct(at['signed_error'], '+')} in {at['stage']}, at {pct(at['progress'])}"
        lines.append(
            f"| {label} | {job['speech_s']} | {job['frames']} | {job['steps']} | {job['actual_s']:.0f} | "
            f"{pct(job['worst_error_from_10pct_progress'])} | {where} | {pct(job['worst_error_from_10pct_time'])} | "
            f"{pct(job['first_eta_at_progress'])} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--video", type=Path, default=FIXTURES / "demo1_video.mp4", help="input video (default: the demo clip)")
    parser.add_argument("--audio", type=Path, default=FIXTURES / "demo1_audio.wav", help="speech, cut to each --seconds")
    parser.add_argument("--seconds", type=float, nargs="+", default=[3, 6, 4, 6], help="speech length of each job, in order")
    parser.add_argument("--steps", type=int, default=10, help="DDIM steps of every job")
    parser.add_argument("--url", help="gRPC host:port of a running server (default: start one)")
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu", help="where the started server runs")
    parser.add_argument("--version", choices=["1.5", "1.6", "tiny"], default="tiny",
                        help="weights of the started server (full-size random weights unless in --checkpoints)")
    parser.add_argument("--checkpoints", type=Path, help="weights root of the started server (default: a temporary folder)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction,
                        help="whether the started server compiles the UNet (default: the config's)")
    parser.add_argument("--workdir", type=Path, help="the started server's work folder (default: a temporary folder)")
    parser.add_argument("--job-processes", type=int,
                        help="job processes of the started server (default: configs/serving.yaml's; 2+ on the CPU: a GPU server's layout)")
    parser.add_argument("--json", type=Path, help="write the report here")
    parser.add_argument("--markdown", type=Path, help="write the table here")
    parser.add_argument("--replay", type=Path, help="a report --json wrote: recompute its ETAs instead of running jobs")
    args = parser.parse_args()
    stop_servers_on_sigterm()

    waveform = load_audio(args.audio, SAMPLE_RATE)
    speeches = [np.tile(waveform, -(-round(s * SAMPLE_RATE) // waveform.size))[: round(s * SAMPLE_RATE)] for s in args.seconds]
    video = args.video.read_bytes()
    report: dict = {
        "command": " ".join(["python", *sys.argv]), "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "device": "as served at --url" if args.url else f"{args.device.upper()} ({platform.processor() or platform.machine()})",
        "weights": None if args.url else args.version,
        "fresh_server": False, "jobs": [],
    }

    def save() -> None:
        """Write what is measured so far: a run cut short still leaves its finished jobs."""
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
        if args.markdown:
            args.markdown.write_text(markdown(report), encoding="utf-8")

    if args.replay:
        report = replay(json.loads(args.replay.read_text(encoding="utf-8")), args.replay)
        save()
        print(markdown(report))
        return

    def run_all(url: str) -> None:
        for seconds, speech in zip(args.seconds, speeches, strict=True):
            job = run_one(url, video, speech, args.steps) | {"speech_s": seconds}
            report["jobs"].append(job)
            save()
            print(f"job of {seconds} s: {job['actual_s']} s, worst error from 10 % progress "
                  f"{job['worst_error_from_10pct_progress']}", file=sys.stderr)
        try:  # what the jobs ran on, asked after them (a failed answer is recorded, not fatal)
            report["served"] = served_info(url)
        except TritonJobError as exc:
            report["served"] = {"error": str(exc)}
        save()

    if args.url:
        run_all(args.url)
    else:
        with tempfile.TemporaryDirectory(prefix="lipsync-bench-eta-") as root:
            checkpoints = args.checkpoints or Path(root, "checkpoints")
            ensure_random_weights(args.version, checkpoints)
            settings = TritonSettings.load(
                device=args.device, weights=args.version, checkpoints=str(checkpoints),
                workdir=args.workdir or Path(root, "serve"), compile_unet=args.compile, job_processes=args.job_processes,
                http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(),
            )
            report["fresh_server"] = not settings.stage_rates_file().exists()  # nothing learned yet
            report["job_processes"] = settings.resolved_job_processes()
            with TritonServer(settings) as server:
                if args.device == "gpu" and args.compile is not False:
                    report["waited_for_compiled_unet_s"] = wait_until_compiled(server)
                run_all(settings.grpc_url)
    print(markdown(report))


if __name__ == "__main__":
    main()
