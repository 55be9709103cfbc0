"""Locust users for ``scripts/bench_gateway_load.py``: each holds one API key (of ``$BENCH_KEYS``), submits one
job when it starts, then polls that job's status, lists its jobs and now and then submits another.

Run by the bench script (``locust -f scripts/gateway_locustfile.py --headless …``), not on its own.
"""

from __future__ import annotations

import base64
import itertools
import os
from pathlib import Path

from locust import FastHttpUser, constant, task

KEYS = os.environ["BENCH_KEYS"].split(",")
BODY = {
    "video_source": base64.b64encode(Path(os.environ["BENCH_VIDEO"]).read_bytes()).decode(),
    "audio_source": base64.b64encode(Path(os.environ["BENCH_AUDIO"]).read_bytes()).decode(),
    "inference_steps": 1,
}
_next_key = itertools.count()


class GatewayClient(FastHttpUser):
    wait_time = constant(0)  # as fast as the gateway answers: the figure is what it holds

    def on_start(self) -> None:
        self.headers = {"Authorization": f"Bearer {KEYS[next(_next_key) % len(KEYS)]}"}
        self.request_id = self._submit()

    def _submit(self) -> str:
        with self.client.post("/lipsync/submit", json=BODY, headers=self.headers, name="submit", catch_response=True) as answer:
            if answer.status_code != 200:
                answer.failure(f"{answer.status_code}: {answer.text[:200]}")
                return "0" * 32
            return answer.json()["request_id"]

    @task(20)
    def status(self) -> None:
        self.client.post("/lipsync/status", json={"request_id": self.request_id}, headers=self.headers, name="status")

    @task(4)
    def jobs(self) -> None:
        self.client.get("/v1/jobs", headers=self.headers, name="jobs")

    @task(1)
    def submit(self) -> None:
        self._submit()
