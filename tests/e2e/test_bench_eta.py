"""The ETA benchmark runs end to end against the session's Triton (CPU, tiny weights), briefly."""

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
def test_bench_eta_records_predicted_and_actual_end_per_job(triton: TritonServer, tmp_path: Path) -> None:
    video = write_video(tmp_path / "face.mp4", demo_frames(16, (270, 480)))
    audio = write_wav(tmp_path / "speech.wav", speech(1.0))
    report, table = tmp_path / "eta.json", tmp_path / "eta.md"
    subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench_eta.py"), "--url", triton.settings.grpc_url, "--video", str(video),
         "--audio", str(audio), "--seconds", "0.64", "1", "--steps", "2", "--json", str(report), "--markdown", str(table)],
        check=True, cwd=REPO, timeout=600,
    )
    jobs = json.loads(report.read_text())["jobs"]
    assert [(job["speech_s"], job["frames"], job["steps"]) for job in jobs] == [(0.64, 16, 2), (1.0, 25, 2)]
    for job in jobs:
        assert job["actual_s"] > 0 and job["reports"]
        assert all(len(row) == 4 and 0 <= row[1] < 1 for row in job["reports"])
        assert [row[0] for row in job["reports"]] == sorted(row[0] for row in job["reports"])
    assert jobs[1]["worst_error_from_10pct_progress"] is not None  # the second job had a finished one to learn from
    assert table.read_text().count("\n") == 4
