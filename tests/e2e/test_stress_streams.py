"""The stream stress script runs end to end against the session's Triton (CPU, tiny weights), briefly."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.launcher.triton_server import TritonServer

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_stress_streams_answers_every_request_and_reports_the_counts(triton: TritonServer, tmp_path: Path) -> None:
    report = tmp_path / "stress.json"
    subprocess.run(
        [sys.executable, str(REPO / "scripts" / "stress_streams.py"), "--url", triton.settings.grpc_url,
         "--seconds", "2", "--clients", "2", "--json", str(report)],
        check=True, cwd=REPO, timeout=300,
    )  # fmt: skip
    result = json.loads(report.read_text())
    assert result["failure"] is None
    assert result["unary_rejections"] >= 2 and result["describes"] == result["unary_rejections"]
    assert result["clients"] == 2 and result["job_processes"] is None
