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


def test_bench_eta_replays_a_recorded_run_through_the_estimator_as_it_is(tmp_path: Path) -> None:
    def job() -> dict:
        """A job of 10 frames: 1 s of audio, 1 s of analysis, two generation moves 1 s apart, 0.5 s encoding."""
        reports = [[0.0, 0.0, "audio", None], [1.0, 0.05, "analyse", None], [2.0, 0.575, "generate", None],
                   [3.0, 0.95, "generate", None], [3.5, 0.95, "encode", None]]
        return {"frames": 10, "steps": 2, "speech_s": 0.4, "actual_s": 4.0, "reports": reports}

    recorded = tmp_path / "eta.json"
    recorded.write_text(json.dumps({"command": "python bench_eta.py", "date": "2026-12-06T00:00:00+00:00",
                                    "device": "CPU", "fresh_server": True, "jobs": [job(), job()]}))
    report = tmp_path / "replayed.json"
    subprocess.run([sys.executable, str(REPO / "scripts" / "bench_eta.py"), "--replay", str(recorded),
                    "--json", str(report)], check=True, cwd=REPO, timeout=300)
    replayed = json.loads(report.read_text())
    assert replayed["replayed"]["path"] == str(recorded)
    first, second = ([row[3] for row in job["reports"]] for job in replayed["jobs"])
    # the first job: nothing learned, an ETA once generation moved (its own pace: the stage is done; the
    # encoding at the job's pace over the scale, 3 s for 0.95 of it)
    assert first[:3] == [None, None, None] and first[3] == pytest.approx(3.0 / 0.95 * 0.05, abs=0.01)
    # the second: sized after its first response, then the first job's stage times (1 + 1.5 + 0.5 s)
    assert second[0] is None and second[1] == pytest.approx(3.0)
    assert replayed["jobs"][1]["worst_error_from_10pct_progress"] is not None
