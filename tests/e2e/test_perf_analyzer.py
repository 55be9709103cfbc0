"""``scripts/perf_analyzer.sh`` against the test server (CPU, tiny weights): Triton's perf_analyzer
measures ``lipsync_unary`` and the streaming ``lipsync`` from the inputs the script prepares."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import httpx2
import pytest
from support.clips import demo_frames, speech, write_video, write_wav

from lipsync.testing import sample_sum

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "perf_analyzer.sh"

pytestmark = pytest.mark.slow


def _succeeded(triton) -> float:
    text = httpx2.get(triton.settings.metrics_url, timeout=10).text
    return sample_sum(text, "lipsync_jobs_total", outcome="succeeded")


def test_perf_analyzer_measures_both_models(triton, tmp_path: Path) -> None:
    video = write_video(tmp_path / "face.mp4", demo_frames(25, (270, 480)))
    audio = write_wav(tmp_path / "speech.wav", speech(1.0))
    before = _succeeded(triton)
    environment = dict(os.environ, TRITON_GRPC=triton.settings.grpc_url, STEPS="1", REQUESTS="1", PYTHON=sys.executable)
    done = subprocess.run(
        # Any three windows count as stable: the point is that it runs, not a steady number on a shared CPU.
        ["bash", str(SCRIPT), str(video), str(audio), "--stability-percentage", "1000"],
        env=environment, capture_output=True, text=True, timeout=300,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert output.index("== lipsync_unary") < output.index("== lipsync (streaming)"), output
    assert len(re.findall(r"Concurrency: 1, throughput: [0-9.]+ infer/sec, latency [0-9]+ usec", output)) == 2, output
    assert _succeeded(triton) >= before + 2  # every measured request was a job that ran to its end
