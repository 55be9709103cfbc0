"""The speed-table script runs end to end (tiny model, CPU), so a GPU run does not find it broken."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from support.clips import demo_frames, speech, write_video, write_wav

REPO = Path(__file__).resolve().parents[2]
SMALL = (270, 480)
"""(width, height) of the clip: the demo face at a quarter of its size, so decode, detection and encode stay cheap."""


@pytest.mark.slow
def test_bench_pipeline_writes_the_table_with_quality_checks(tmp_path) -> None:
    video = write_video(tmp_path / "face.mp4", demo_frames(16, SMALL))
    audio = write_wav(tmp_path / "speech.wav", speech(0.64))  # one 16-frame window
    report, table = tmp_path / "bench.json", tmp_path / "bench.md"
    subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench_pipeline.py"), "--tiny", "--video", str(video),
         "--audio", str(audio), "--check-frames", "16", "--variants", "exact-w4", "fast-w4-s10",
         "--json", str(report), "--markdown", str(table)],
        check=True, cwd=REPO, timeout=900,
    )
    rows = {row["variant"]: row for row in json.loads(report.read_text())["rows"]}
    assert set(rows) == {"exact-w4", "fast-w4-s10"}
    for row in rows.values():
        assert row["wall_s"] > 0 and {"denoise", "encode", "paste"} <= set(row["stages_s"])
    assert rows["exact-w4"]["quality"]["vs_fp32_latents_rel_l2"] < 1e-4  # fp32 on CPU: the reference itself
    fast = rows["fast-w4-s10"]["quality"]
    assert fast["vs_exact_psnr_db"] > 10 and 0 < fast["vs_exact_ssim"] <= 1
    assert "| tiny | fast-w4-s10 |" in table.read_text()
