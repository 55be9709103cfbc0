"""The estimate benchmark runs end to end against the session's Triton (CPU, tiny weights), briefly."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from support.clips import demo_frames, speech, write_video, write_wav

from gateway.launcher.triton_server import TritonServer

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_bench_estimate_records_the_estimate_beside_the_measured_time(triton: TritonServer, tmp_path: Path) -> None:
    video = write_video(tmp_path / "face.mp4", demo_frames(16, (270, 480)))
    audio = write_wav(tmp_path / "speech.wav", speech(1.0))
    report = tmp_path / "estimate.json"
    subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench_estimate.py"), "--triton-grpc", triton.settings.grpc_url,
         "--video", str(video), "--audio", str(audio), "--seconds", "0.64", "1", "--steps", "1", "--json", str(report)],
        check=True, cwd=REPO, timeout=600,
    )
    jobs = json.loads(report.read_text())["jobs"]
    assert [(job["speech_s"], job["frames"], job["steps"]) for job in jobs] == [(0.64, 16, 1), (1.0, 25, 1)]
    assert all(job["actual_s"] > 0 for job in jobs)
    assert jobs[1]["estimate"]["basis"] == "same_options" and jobs[1]["estimate"]["run_s"] > 0
    assert jobs[1]["error"] is not None
