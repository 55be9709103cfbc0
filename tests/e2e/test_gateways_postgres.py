"""Two gateway processes on one PostgreSQL table and one shared data dir, in front of one real Triton
(CPU, tiny weights): jobs submitted across both, one gateway killed mid-job, every job ends exactly once."""

from __future__ import annotations

import re
import signal
import time
from collections import Counter

import pytest
from support.clips import (
    DEMO_AUDIO,
    DEMO_VIDEO,
    demo_frames,
    speech,
    write_video,
    write_wav,
)
from support.gateway_process import LOAD_TEST_LIMITS, GatewayProcess
from test_gateway_api import FINISHED, Client

from gateway.launcher.ports import free_port

pytestmark = [
    pytest.mark.slow,
    pytest.mark.postgres,
    pytest.mark.skipif(not (DEMO_VIDEO.is_file() and DEMO_AUDIO.is_file()), reason="shared demo fixtures not found"),
]
JOBS = 30


def test_thirty_jobs_on_two_gateways_one_killed_each_end_exactly_once(triton, postgres, tmp_path) -> None:
    video = write_video(tmp_path / "clip.mp4", demo_frames(10, (270, 480))).read_bytes()  # short jobs: 30 of them
    audio = write_wav(tmp_path / "s.wav", speech(0.4)).read_bytes()
    shared = {"database_url": postgres.new_database("two_gateways"), "lease_s": 3, **LOAD_TEST_LIMITS}
    gateways = [
        GatewayProcess(tmp_path / "data", triton.settings.grpc_url, free_port(), concurrency=2).configure(**shared)
        for _ in range(2)
    ]
    gateways[1].log_path = tmp_path / "second-gateway.log"
    try:
        for gateway in gateways:
            gateway.start()
        doomed, survivor = (Client(gateway.url) for gateway in gateways)
        jobs = [(doomed if index % 2 else survivor).job(video, audio, inference_steps=1) for index in range(JOBS)]
        cancelled = {jobs[-1]: survivor, jobs[-2]: doomed}  # each cancelled through the gateway it was not sent to
        for job_id, client in cancelled.items():
            assert client.cancel(job_id).status_code == 200
        deadline = time.monotonic() + 120
        while not any(s["status"] == "InProgress" for s in map(doomed.status, jobs)):
            assert time.monotonic() < deadline
            time.sleep(0.2)
        gateways[0].process.send_signal(signal.SIGKILL)
        gateways[0].process.wait(30)
        endings = {job_id: survivor.wait(job_id, timeout_s=600)[-1] for job_id in jobs}
    finally:
        for gateway in gateways:
            gateway.stop()
    statuses = Counter(status["status"] for status in endings.values())
    assert set(statuses) <= FINISHED and sum(statuses.values()) == JOBS, endings  # none lost
    assert all(endings[job_id]["status"] == "Cancelled" for job_id in cancelled)
    assert statuses["Succeed"] == JOBS - len(cancelled), endings
    log = triton.log_path.read_text()
    done = Counter(re.findall(r"lipsync: job (\w+) done", log))
    assert all(done[job_id] <= 1 for job_id in jobs), done  # no job ran to success twice
    assert all(done[job_id] == 1 for job_id in jobs if endings[job_id]["status"] == "Succeed")
