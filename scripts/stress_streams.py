"""Many short requests at once through both BLS streams of a server, to show that no model stub dies.

Starts ``tritonserver`` through the launcher (CPU, tiny demo weights, the split layout: ``--job-processes``
``lipsync`` processes and ``lipsync_generate``), or uses ``--url``, a running server's gRPC address. For
``--seconds``, each of ``--clients`` threads sends, in turn, a ``lipsync_unary`` request that fails at once
(an unknown ``LOOP_MODE``: a stream from ``lipsync`` to ``lipsync_unary``) and a describe request (in the
split layout, a stream from ``lipsync_generate`` to a job process). Every answer must be the expected one:
the first other answer, e.g. ``Stub process '…' is not healthy`` from a stub that died, ends the run with
exit status 1. The Python backend of Triton 2.51 frees a finished stream on a thread without the GIL when
the stub's reference is the last (``lipsync.serving.StreamReleases``); this is how that was shown.

    python scripts/stress_streams.py --seconds 120 --clients 4 --json docs/bench/stress-streams-cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
from bench_triton import stop_servers_on_sigterm
from tritonclient.utils import InferenceServerException

from gateway.backends.triton_client import served_info
from gateway.launcher.ports import free_port
from gateway.launcher.triton_server import TritonServer, TritonSettings

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
REJECTED_LOOP_MODE = "sideways"
ANSWER_TIMEOUT_S = 60.0
"""A request not answered in this time is a failure (a job process that died leaves its callers waiting)."""


def unary_rejection(client: grpcclient.InferenceServerClient, video: bytes, audio: bytes) -> None:
    """One ``lipsync_unary`` request that ``lipsync`` rejects at once; raises unless it is that rejection."""
    inputs = []
    for name, value in (("VIDEO", video), ("AUDIO", audio), ("LOOP_MODE", REJECTED_LOOP_MODE.encode())):
        tensor = grpcclient.InferInput(name, [1], "BYTES")
        tensor.set_data_from_numpy(np.array([value], dtype=np.object_))
        inputs.append(tensor)
    try:
        client.infer("lipsync_unary", inputs, client_timeout=ANSWER_TIMEOUT_S)
    except InferenceServerException as exc:
        if REJECTED_LOOP_MODE in str(exc):
            return
        raise
    raise RuntimeError("lipsync_unary accepted an unknown loop mode")


def stress(url: str, seconds: float, clients: int) -> dict:
    """Run the clients; counts of answered requests per kind, and the first failure (``None``: none)."""
    video = (FIXTURES / "demo1_video.mp4").read_bytes()
    audio = (FIXTURES / "demo1_audio.wav").read_bytes()
    counts = {"unary_rejections": 0, "describes": 0}
    failures: list[str] = []
    lock = threading.Lock()
    end = time.monotonic() + seconds

    def client_loop() -> None:
        client = grpcclient.InferenceServerClient(url)
        try:
            while time.monotonic() < end and not failures:
                unary_rejection(client, video, audio)
                served_info(url, timeout_s=ANSWER_TIMEOUT_S)
                with lock:
                    counts["unary_rejections"] += 1
                    counts["describes"] += 1
        except Exception as exc:  # noqa: BLE001 - the first failure is the result
            with lock:
                failures.append(f"{type(exc).__name__}: {exc}")
        finally:
            client.close()

    started = time.monotonic()
    threads = [threading.Thread(target=client_loop, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return counts | {"seconds": round(time.monotonic() - started, 1), "failure": failures[0] if failures else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--job-processes", type=int, default=2, help="0: one lipsync process does everything")
    parser.add_argument("--url", help="a running server's gRPC address (host:port); none: start one")
    parser.add_argument("--json", type=Path, help="write the result here")
    args = parser.parse_args()
    stop_servers_on_sigterm()
    if args.url:
        result = stress(args.url, args.seconds, args.clients)
    else:
        with tempfile.TemporaryDirectory(prefix="lipsync-stress-") as folder:
            root = Path(folder)
            settings = TritonSettings.load(
                device="cpu", weights="tiny", job_processes=args.job_processes,
                checkpoints=str(root / "checkpoints"), workdir=root / "serve", http_port=free_port(),
                grpc_port=free_port(), metrics_port=free_port(), startup_timeout_s=300, exit_timeout_s=5,
            )  # fmt: skip
            with TritonServer(settings) as server:
                result = stress(server.settings.grpc_url, args.seconds, args.clients)
    report = {
        "date": datetime.now(UTC).date().isoformat(),
        "host": f"{platform.node()} ({platform.processor() or platform.machine()})",
        "command": " ".join(["python", "scripts/stress_streams.py", *sys.argv[1:]]),
        "clients": args.clients,
        "job_processes": None if args.url else args.job_processes,
    } | result
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    sys.exit(1 if result["failure"] else 0)


if __name__ == "__main__":
    main()
