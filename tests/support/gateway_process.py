"""The gateway as its users run it: a ``lipsync-serve gateway`` process, here on a free port."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx2
import yaml

from gateway.launcher.triton_server import SERVING_CONFIG

KEYS = ("key-alpha-0123456789", "key-beta-9876543210")
"""Two accepted API keys (two owners)."""

HOOK_HOST = "127.0.0.2"
"""Where the tests' webhook receivers listen: a loopback address the test gateways allow (``webhook_allow``),
so that 127.0.0.1 and every other internal address stay refused as in production."""


class GatewayProcess:
    def __init__(
        self, data_dir: Path, triton_grpc: str, port: int, concurrency: int = 1, max_body_mb: float = 5,
        webhook_allow: str = HOOK_HOST, webhook_timeout_s: float = 3,
    ) -> None:
        self.data_dir = data_dir
        self.port = port
        self.webhook_timeout_s = webhook_timeout_s
        self.url = f"http://127.0.0.1:{port}"
        self.command = [
            sys.executable, "-m", "gateway.cli", "gateway", "--port", str(port), "--data-dir", str(data_dir),
            "--triton-grpc", triton_grpc, "--concurrency", str(concurrency), "--max-body-mb", str(max_body_mb),
            "--webhook-allow", webhook_allow, "--webhook-timeout-s", str(webhook_timeout_s),
        ]
        self.log_path = data_dir.parent / f"{data_dir.name}-gateway.log"
        self.process: subprocess.Popen | None = None

    def configure(self, **settings: object) -> GatewayProcess:
        """Run with ``settings`` in the ``gateway`` section of a copy of ``configs/serving.yaml`` (``--config``)."""
        config = yaml.safe_load(SERVING_CONFIG.read_text())
        config["gateway"].update(settings)
        path = self.data_dir.parent / f"{self.data_dir.name}-serving.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(config))
        self.command += ["--config", str(path)]
        return self

    def start(self, timeout_s: float = 60) -> GatewayProcess:
        env = dict(os.environ, LIPSYNC_API_KEYS=",".join(KEYS))
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.command, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if httpx2.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return self
            except httpx2.HTTPError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the gateway did not start:\n{self.log_path.read_text()[-3000:]}")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


LOAD_TEST_LIMITS = {
    "rate_limit": "100000/minute", "submit_rate_limit": "10000/minute", "max_active_jobs": 1000, "max_concurrent_submits": 1000,
}
"""Per-key limits that many clients at once stay under."""


def memory_mb(pid: int, field: str = "VmRSS") -> float:
    """``VmRSS`` (resident now) or ``VmHWM`` (peak since the last :func:`reset_peak_memory`) of ``pid``, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def reset_peak_memory(pid: int) -> None:
    """Start a new ``VmHWM`` peak at the current resident size (Linux ``clear_refs``)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
