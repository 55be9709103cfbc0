"""Smoke test of ``scripts/bench_gateway_load.py``: a few seconds of Locust against a real gateway write
the report, every request answered without an error (speeds are the benchmark's, not asserted here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_gateway_load.py"


def test_the_load_bench_writes_its_report_with_no_errors(tmp_path: Path) -> None:
    out = tmp_path / "gateway-load.json"
    subprocess.run([sys.executable, str(SCRIPT), "--seconds", "3", "--users", "5", "--out", str(out)],
                   check=True, capture_output=True, timeout=300)
    report = json.loads(out.read_text())["runs"]["sqlite"]
    assert set(report["requests"]) == {"status", "jobs", "submit", "total"}
    assert report["requests"]["status"]["requests"] > 0 and report["requests"]["submit"]["requests"] >= 5
    assert all(figures["errors"] == 0 for figures in report["requests"].values()), report["requests"]
    assert report["gateway_rss_mb"]["before"] > 0 and report["gateway_rss_mb"]["after"] > 0
    assert report["store"] == "sqlite" and report["keys"] == 5 and "bench_gateway_load.py" in report["command"]
    assert report["uptime"]["before"] and report["uptime"]["after"]
