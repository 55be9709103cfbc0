"""How much load the REST gateway holds: Locust drives a real ``lipsync-serve gateway`` (SQLite job table, or
PostgreSQL with ``--postgres``) with status polls, job lists and submits from 50 API keys, and the figures go
to a JSON file.

No Triton runs: submitted jobs are checked, stored and queued as always, then wait for a Triton that
does not come (the worker's ``waiting for Triton``), so the figures are the gateway's own cost (auth,
rate limits, validation, the job table), not the model's. Each Locust user holds one key, submits a
1 s 64×64 clip when it starts, then loops without pause over: its job's status (20 parts), its job
list (4 parts) and another submit (1 part). The gateway's resident memory and the machine's load average
(``uptime``) are read before and after. ``--postgres`` runs a throwaway PostgreSQL cluster for the job
table (``tests/support/postgres_server.py``; Debian's ``postgresql``); ``--profile`` samples the gateway
with py-spy (the ``bench`` extra) while Locust runs and reports the functions it was found in most,
in samples of the thread holding the GIL (where the gateway spends CPU, not where it waits).
The report of each store is one entry of ``--out`` (a run replaces the entry of its store).

    python scripts/bench_gateway_load.py [--postgres] [--profile] [--seconds 60] [--users 50] [--out docs/bench/gateway-load.json]

Goal: at least 500 status requests/s at a p99 of at most 100 ms on SQLite.
"""

from __future__ import annotations

import argparse
import collections
import csv
import datetime
import json
import os
import platform
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import av
import httpx2
import numpy as np
import yaml

from gateway.launcher.triton_server import SERVING_CONFIG

ROOT = Path(__file__).resolve().parents[1]
LOCUSTFILE = ROOT / "scripts" / "gateway_locustfile.py"
LIMITS = {"rate_limit": "1000000/minute", "submit_rate_limit": "100000/minute", "max_active_jobs": 100000,
          "max_concurrent_submits": 100}
"""Per-key limits out of the way: the bench measures throughput, not the limits (tested elsewhere)."""
GOAL = {"status_rps": 500, "status_p99_ms": 100}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def write_clip(folder: Path) -> tuple[Path, Path]:
    """A 1 s 64×64 grey H.264 clip and 1 s of a 440 Hz tone: the smallest inputs the submit check accepts."""
    video, audio = folder / "clip.mp4", folder / "tone.wav"
    with av.open(str(video), "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width = stream.height = 64
        stream.pix_fmt = "yuv420p"
        for index in range(25):
            frame = av.VideoFrame.from_ndarray(np.full((64, 64, 3), 128, np.uint8), format="rgb24")
            frame.pts = index
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    with av.open(str(audio), "w", format="wav") as container:
        stream = container.add_stream("pcm_s16le", rate=16000, layout="mono")
        samples = (np.sin(np.arange(16000) * 2 * np.pi * 440 / 16000) * 8000).astype(np.int16)[None]
        frame = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
        frame.sample_rate = 16000
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return video, audio


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    raise KeyError("VmRSS")


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def start_gateway(folder: Path, keys: list[str], database_url: str) -> tuple[subprocess.Popen, str]:
    config = yaml.safe_load(SERVING_CONFIG.read_text())
    config["gateway"].update(LIMITS, database_url=database_url)
    (folder / "serving.yaml").write_text(yaml.safe_dump(config))
    port = free_port()
    command = [sys.executable, "-m", "gateway.cli", "gateway", "--port", str(port), "--data-dir", str(folder / "data"),
               "--triton-grpc", f"127.0.0.1:{free_port()}", "--config", str(folder / "serving.yaml")]
    with open(folder / "gateway.log", "wb") as log:
        process = subprocess.Popen(command, env=dict(os.environ, LIPSYNC_API_KEYS=",".join(keys)), stdout=log,
                                   stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx2.get(f"{url}/healthz", timeout=2).status_code == 200:
                return process, url
        except httpx2.HTTPError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the gateway did not start:\n{(folder / 'gateway.log').read_text()[-3000:]}")
        time.sleep(0.2)


def read_stats(path: Path) -> dict[str, dict]:
    """Locust's ``*_stats.csv``: per request name (and ``total``), count, errors, requests/s, p50/p99 in ms."""
    stats = {}
    with open(path, newline="") as file:
        for row in csv.DictReader(file):
            name = "total" if row["Name"] == "Aggregated" else row["Name"]
            stats[name] = {
                "requests": int(row["Request Count"]), "errors": int(row["Failure Count"]),
                "requests_per_s": round(float(row["Requests/s"]), 1),
                "p50_ms": float(row["50%"]), "p99_ms": float(row["99%"]),
            }
    return stats


def uptime() -> str:
    """``uptime``'s line: how busy the (shared) machine is."""
    return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()


PROFILE_TOP = 15
PROFILE_PARTS = (  # (part, markers, counted when a marker is anywhere on the stack rather than in its innermost frame)
    ("job table (SQLAlchemy, the database driver, gateway/store)", ("sqlalchemy/", "(gateway/store/", "psycopg"), True),
    ("submit: media checks and staging (PyAV, gateway/jobs)",
     ("(lipsync/media/", "(gateway/jobs/validation", "(gateway/jobs/idempotency"), True),
    ("API keys and rate limits", ("(gateway/core/auth", "limits/"), True),
    ("thread-pool hand-offs (anyio, threading)", ("anyio/", "threading.py"), False),
    ("routing, validation, JSON (FastAPI, Starlette, pydantic)", ("fastapi/", "starlette/", "pydantic"), False),
    ("HTTP and the event loop (uvicorn, uvloop/asyncio)", ("uvicorn/", "asyncio/", "runners.py"), False),
)
"""What a sample of the gateway was doing: the first part that matches it, else ``other``."""


def _part(frames: list[str]) -> str:
    for name, markers, anywhere in PROFILE_PARTS:
        if any(marker in frame for frame in (frames if anywhere else frames[-1:]) for marker in markers):
            return name
    return "other"


def _frame_name(frame: str) -> str:
    """``func (path/file.py:123)`` without the line number, so a function's lines count as one."""
    name, _, place = frame.partition(" (")
    return f"{name} ({place.rsplit(':', 1)[0]})" if place else name


def profile_summary(raw: Path, top: int = PROFILE_TOP) -> dict:
    """From py-spy's collapsed stacks (``--format raw``), as shares of all samples: ``parts``, the samples
    by what the gateway was doing (:data:`PROFILE_PARTS`); ``self``, the functions sampled innermost;
    ``gateway``, the gateway's own functions anywhere on the stack."""
    own: collections.Counter[str] = collections.Counter()
    ours: collections.Counter[str] = collections.Counter()
    parts: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        frames = [_frame_name(frame.strip()) for frame in stack.split(";")]
        n = int(count)
        samples += n
        own[frames[-1]] += n
        for frame in set(frames):
            if "(gateway/" in frame and "(gateway/cli.py" not in frame:
                ours[frame] += n
        parts[_part(frames)] += n
    if not samples:
        return {"samples": 0}

    def share(counter: collections.Counter[str], limit: int) -> list[dict]:
        return [{"function": name, "share": round(n / samples, 3)} for name, n in counter.most_common(limit)]

    return {"samples": samples, "parts": {name: round(n / samples, 3) for name, n in parts.most_common()},
            "self": share(own, top), "gateway": share(ours, top)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--users", type=int, default=50, help="Locust users, one API key each")
    parser.add_argument("--postgres", action="store_true", help="the job table in a throwaway PostgreSQL cluster")
    parser.add_argument("--profile", action="store_true", help="sample the gateway with py-spy while Locust runs")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "bench" / "gateway-load.json")
    args = parser.parse_args()
    keys = [f"bench-{index:02d}-{secrets.token_urlsafe(16)}" for index in range(args.users)]
    postgres = None
    if args.postgres:
        sys.path.append(str(ROOT / "tests"))  # after the repository root: support is the tests' helper package
        from support.postgres_server import PostgresServer

        postgres = PostgresServer(free_port()).start()
    load_before = uptime()
    try:
        with tempfile.TemporaryDirectory() as temp:
            folder = Path(temp)
            video, audio = write_clip(folder)
            gateway, url = start_gateway(folder, keys, postgres.new_database("bench") if postgres else "")
            try:
                rss_before = rss_mb(gateway.pid)
                locust = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "-u", str(args.users),
                          "-r", str(args.users), "-t", f"{args.seconds}s", "--host", url, "--csv", str(folder / "locust"),
                          "--only-summary", "--loglevel", "WARNING", "--stop-timeout", "5"]
                env = dict(os.environ, BENCH_KEYS=",".join(keys), BENCH_VIDEO=str(video), BENCH_AUDIO=str(audio))
                spy = None
                if args.profile:
                    spy = subprocess.Popen(
                        [str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(gateway.pid), "--format",
                         "raw", "--output", str(folder / "profile.txt"), "--duration", str(args.seconds), "--rate", "50", "--gil",
                         "--nonblocking"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                    )
                run = subprocess.run(locust, env=env, capture_output=True, text=True, timeout=args.seconds + 120)
                if spy is not None:
                    spy.wait(60)
                stats_file = folder / "locust_stats.csv"
                if not stats_file.is_file():
                    raise SystemExit(f"locust wrote no statistics:\n{run.stdout[-2000:]}\n{run.stderr[-2000:]}")
                stats = read_stats(stats_file)
                rss_after = rss_mb(gateway.pid)
                profile = profile_summary(folder / "profile.txt") if spy is not None else None
            finally:
                gateway.terminate()
                gateway.wait(60)
    finally:
        if postgres is not None:
            postgres.stop()
    status = stats.get("status", {"requests_per_s": 0.0, "p99_ms": float("inf")})
    store = "postgresql" if postgres else "sqlite"
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device": f"{cpu_name()}, {os.cpu_count()} cores",
        "uptime": {"before": load_before, "after": uptime()},
        "command": " ".join(["python", "scripts/bench_gateway_load.py", *sys.argv[1:]]),
        "store": store, "seconds": args.seconds, "users": args.users, "keys": len(keys),
        "requests": stats, "gateway_rss_mb": {"before": rss_before, "after": rss_after},
        "goal": GOAL,
        "goal_met": status["requests_per_s"] >= GOAL["status_rps"] and status["p99_ms"] <= GOAL["status_p99_ms"],
    }
    if profile is not None:
        report["profile"] = profile
    runs = json.loads(args.out.read_text()) if args.out.is_file() else {}
    runs.setdefault("runs", {})[store] = report  # the other store's entry is kept
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(runs, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
