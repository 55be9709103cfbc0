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


RESTART_JOBS = 8


def test_postgres_restarted_under_two_gateways_503_meanwhile_no_job_lost_or_run_twice(triton, postgres, tmp_path) -> None:
    """PostgreSQL shut down (sessions ended) and started again while two gateways hold queued and running
    jobs: meanwhile every request that needs the table is a 503 JSON with ``Retry-After`` (never a 500 or
    a traceback), the gateways stay up, and afterwards every job ends once, in success."""
    video = write_video(tmp_path / "clip.mp4", demo_frames(10, (270, 480))).read_bytes()
    audio = write_wav(tmp_path / "s.wav", speech(0.4)).read_bytes()
    shared = {"database_url": postgres.new_database("restarted"), "store_retry_s": 1, **LOAD_TEST_LIMITS}
    gateways = [
        GatewayProcess(tmp_path / "data", triton.settings.grpc_url, free_port()).configure(**shared) for _ in range(2)
    ]
    gateways[1].log_path = tmp_path / "second-gateway.log"
    try:
        for gateway in gateways:
            gateway.start()
        clients = [Client(gateway.url) for gateway in gateways]
        jobs = [clients[index % 2].job(video, audio, inference_steps=1) for index in range(RESTART_JOBS)]
        deadline = time.monotonic() + 120
        while not any(s["status"] == "InProgress" for s in map(clients[0].status, jobs)):
            assert time.monotonic() < deadline
            time.sleep(0.2)
        postgres.halt()
        try:
            for client in clients:
                refused = [
                    client.http.post("/lipsync/status", json={"request_id": jobs[0]}),
                    client.submit(video, audio, inference_steps=1),
                    client.http.get("/v1/jobs"),
                    client.cancel(jobs[-1]),
                ]
                for response in refused:
                    assert response.status_code == 503, response.text
                    assert response.headers["retry-after"] == "1"
                    assert response.json()["status"] == "Failed"
                    assert "job database is unavailable" in response.json()["reason"]
                assert client.http.get("/healthz").status_code == 200
        finally:
            postgres.resume()
        endings = {job_id: clients[index % 2].wait(job_id, timeout_s=600)[-1] for index, job_id in enumerate(jobs)}
        listed = {job["request_id"] for job in clients[0].http.get("/v1/jobs", params={"limit": 100}).json()["jobs"]}
    finally:
        for gateway in gateways:
            gateway.stop()
    assert all(gateway.process.returncode == 0 for gateway in gateways)
    assert Counter(ending["status"] for ending in endings.values()) == {"Succeed": RESTART_JOBS}, endings
    assert listed == set(jobs)  # the refused submit made no job
    done = Counter(re.findall(r"lipsync: job (\w+) done", triton.log_path.read_text()))
    assert all(done[job_id] == 1 for job_id in jobs), done  # none ran twice
    for gateway in gateways:
        log = gateway.log_path.read_text()
        assert "database is unavailable" in log and "Traceback" not in log, log[-3000:]
