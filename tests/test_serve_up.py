"""``lipsync-serve up``, the README's main command: Triton and the gateway start together, a key is made
when none is configured, and SIGTERM stops both."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx2
import pytest

from conftest import free_port

pytestmark = pytest.mark.slow


def test_up_starts_triton_and_the_gateway_and_sigterm_stops_both(tmp_path) -> None:
    port, grpc, http, metrics = free_port(), free_port(), free_port(), free_port()
    data = tmp_path / "data"
    command = [
        sys.executable, "-m", "gateway.cli", "up", "--device", "cpu", "--weights", "tiny", "--port", str(port),
        "--grpc-port", str(grpc), "--http-port", str(http), "--metrics-port", str(metrics),
        "--workdir", str(tmp_path / "serve"), "--checkpoints", str(tmp_path / "checkpoints"), "--data-dir", str(data),
    ]
    env = {name: value for name, value in os.environ.items() if name != "LIPSYNC_API_KEYS"}
    log = tmp_path / "up.log"
    with open(log, "wb") as output:
        process = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while True:
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            try:
                if httpx2.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                    break
            except httpx2.HTTPError:
                pass
            time.sleep(0.5)
        key = (data / "local_api_key").read_text().strip()
        assert key in log.read_text()  # printed for the user
        assert (data / "local_api_key").stat().st_mode & 0o777 == 0o600
        status = httpx2.post(
            f"http://127.0.0.1:{port}/lipsync/status", json={"request_id": "0" * 32},
            headers={"Authorization": f"Bearer {key}"}, timeout=10,
        )
        assert status.status_code == 404  # the key is accepted; the job is unknown
        assert httpx2.get(f"http://127.0.0.1:{http}/v2/health/ready", timeout=5).status_code == 200
        process.send_signal(signal.SIGTERM)
        assert process.wait(120) == 0
        with pytest.raises(httpx2.HTTPError):
            httpx2.get(f"http://127.0.0.1:{http}/v2/health/ready", timeout=5)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
