"""The multi-GPU benchmark runs end to end (tiny model, CPU, one device), so a GPU run does not find it broken."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from support.clips import demo_frames, speech, write_video, write_wav

REPO = Path(__file__).resolve().parents[2]
SMALL = (270, 480)


@pytest.mark.slow
def test_bench_multi_gpu_writes_both_phases(tmp_path: Path) -> None:
    video = write_video(tmp_path / "face.mp4", demo_frames(12, SMALL))
    audio = write_wav(tmp_path / "speech.wav", speech(0.5))
    report = tmp_path / "multi-gpu.json"
    command = [
        sys.executable, str(REPO / "scripts" / "bench_multi_gpu.py"), "--version", "tiny", "--device", "cpu", "--dtype", "fp32",
        "--video", str(video), "--audio", str(audio), "--steps", "1", "--jobs-per-gpu", "1", "--long-seconds", "1.3",
        "--workdir", str(tmp_path / "serve"), "--checkpoints", str(tmp_path / "weights"), "--json", str(report),
    ]
    subprocess.run([*command, "--phase", "throughput"], check=True, cwd=REPO, timeout=900)
    assert set(json.loads(report.read_text())["jobs_per_hour"]) == {"1"}
    subprocess.run([*command, "--phase", "split", "--counts", "1"], check=True, cwd=REPO, timeout=900)
    result = json.loads(report.read_text())
    assert result["device"] == "cpu" and result["date"]
    assert result["jobs_per_hour"]["1"] > 0 and result["split_job_wall_s"]["1"] > 0  # the second call kept the first's
    assert result["details"]["split_1"]["frames"] == round(1.3 * 25) and result["details"]["split_1"]["devices_used"] == 1
