"""The REST gateway in front of a real Triton (CPU, tiny weights): jobs from submit to download,
cancel, idempotency, webhooks, restarts, many clients at once."""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import httpx2
import pytest
from support.clips import demo_frames, speech, write_video, write_wav
from support.gateway_process import HOOK_HOST, KEYS, GatewayProcess

from gateway.jobs.worker import INPUTS_GONE, WAITING_FOR_TRITON
from gateway.launcher.ports import free_port
from gateway.launcher.triton_server import TritonServer, TritonSettings
from lipsync.media import VideoReader
from lipsync.testing import sample_sum

pytestmark = [
    pytest.mark.slow,
]

FINISHED = {"Succeed", "Failed", "Cancelled"}


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> tuple[bytes, bytes]:
    """A 2 s half-size demo clip and 2 s of its speech, as file bytes."""
    folder = tmp_path_factory.mktemp("gateway-clip")
    return write_video(folder / "clip.mp4", demo_frames(50)).read_bytes(), write_wav(folder / "s.wav", speech(2.0)).read_bytes()


@pytest.fixture(scope="module")
def long_audio(tmp_path_factory) -> bytes:
    """8 s of speech: with 20 steps a job long enough to be cancelled midway."""
    return write_wav(tmp_path_factory.mktemp("gateway-long") / "long.wav", speech(8.0)).read_bytes()


@pytest.fixture(scope="module")
def restart_audio(tmp_path_factory) -> bytes:
    """4 s of speech: with 2 steps a job still running after its first progress, short to run again."""
    return write_wav(tmp_path_factory.mktemp("gateway-restart") / "restart.wav", speech(4.0)).read_bytes()


class Client:
    def __init__(self, url: str, key: str = KEYS[0]) -> None:
        self.url = url
        self.http = httpx2.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=120)

    def submit(self, video: bytes, audio: bytes, headers: dict | None = None, **options) -> httpx2.Response:
        body = {"video_source": base64.b64encode(video).decode(), "audio_source": base64.b64encode(audio).decode()}
        return self.http.post("/lipsync/submit", json=body | options, headers=headers or {})

    def job(self, video: bytes, audio: bytes, **options) -> str:
        response = self.submit(video, audio, **options)
        assert response.status_code == 200, response.text
        return response.json()["request_id"]

    def status(self, request_id: str) -> dict:
        response = self.http.post("/lipsync/status", json={"request_id": request_id})
        assert response.status_code == 200, response.text
        return response.json()

    def cancel(self, request_id: str) -> httpx2.Response:
        return self.http.post("/lipsync/cancel", json={"request_id": request_id})

    def wait(self, request_id: str, until=lambda status: status["status"] in FINISHED, timeout_s: float = 300) -> list[dict]:
        """Poll until ``until(status)``; every status seen."""
        seen = [self.status(request_id)]
        deadline = time.monotonic() + timeout_s
        while not until(seen[-1]):
            assert time.monotonic() < deadline, f"stuck at {seen[-1]}"
            time.sleep(0.2)
            seen.append(self.status(request_id))
        return seen


def triton_metric(triton, name: str, **labels: str) -> float:
    return sample_sum(httpx2.get(triton.settings.metrics_url, timeout=10).text, name, **labels)


def check_mp4(data: bytes, tmp_path: Path, frames: int) -> None:
    path = tmp_path / "result.mp4"
    path.write_bytes(data)
    with VideoReader(path) as reader:
        assert len(list(reader)) == frames
        assert reader.info.has_audio


class _Hook(BaseHTTPRequestHandler):
    """Answers 500 to the first POST, 200 after; keeps the bodies it accepted."""

    calls: list[dict] = []
    refused = 0

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if _Hook.refused == 0:
            _Hook.refused += 1
            self.send_response(500)
        else:
            _Hook.calls.append(body)
            self.send_response(200)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


def test_submit_poll_and_download_a_valid_mp4_with_a_retried_webhook(gateway, clip, tmp_path) -> None:
    hook = HTTPServer((HOOK_HOST, 0), _Hook)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    client = Client(gateway.url)
    try:
        request_id = client.job(*clip, inference_steps=3, webhook_url=f"http://{HOOK_HOST}:{hook.server_port}/done")
        seen = client.wait(request_id)
        final = seen[-1]
        assert final["status"] == "Succeed", final
        assert any(0 < s["progress"] < 1 and s["status"] == "InProgress" for s in seen)
        progress = [s["progress"] for s in seen]
        assert progress == sorted(progress) and final["progress"] == 1.0
        assert final["results"]["timings"]["inference"] > 0
        url = final["results"]["video"][0]["url"]
        download = httpx2.get(url, timeout=60)  # the URL alone is enough (a player sends no header)
        assert download.status_code == 200 and download.headers["content-type"] == "video/mp4"
        check_mp4(download.content, tmp_path, 50)
        bare = url.split("?")[0]
        assert httpx2.get(bare, timeout=10).status_code == 404  # no credential: as if there were no such job
        assert client.http.get(bare).status_code == 200  # the owner's key works without the token
        assert Client(gateway.url, KEYS[1]).http.get(bare).status_code == 404
        assert httpx2.get(bare + "?token=" + "A" * 43, timeout=10).status_code in (401, 404)
        deadline = time.monotonic() + 30
        while not _Hook.calls:
            assert time.monotonic() < deadline, "the webhook was not retried"
            time.sleep(0.2)
        assert _Hook.refused == 1 and _Hook.calls[0]["request_id"] == request_id
        assert _Hook.calls[0]["status"] == "Succeed" and _Hook.calls[0]["results"]["video"][0]["url"]
    finally:
        hook.shutdown()


def test_status_carries_weights_stage_and_eta_and_reaches_one_only_when_done(gateway, clip) -> None:
    assert httpx2.get(f"{gateway.url}/readyz", timeout=30).json() == {"status": "ready", "weights": "tiny-demo"}
    client = Client(gateway.url)
    request_id = client.job(*clip, inference_steps=4)
    seen = client.wait(request_id, timeout_s=300)
    assert all(status["weights"] == "tiny-demo" for status in seen)
    running = [status for status in seen if status["status"] == "InProgress"]
    assert running and all(status["progress"] < 1.0 for status in running)
    assert any(status["stage"] == "generate" and status["eta_s"] is not None for status in running)
    assert seen[-1]["status"] == "Succeed" and seen[-1]["progress"] == 1.0 and seen[-1]["eta_s"] is None


def test_the_page_info_names_weights_options_and_where_keys_are_but_no_key(gateway) -> None:
    info = httpx2.get(f"{gateway.url}/v1/info", timeout=10).json()
    assert info["weights"] == info["demo_weights"] == "tiny-demo"
    assert info["options"]["loop_mode"]["enum"] == ["pingpong", "loop", "cut"]
    assert info["options"]["inference_steps"] == {"type": "integer", "minimum": 1, "maximum": 999}
    assert info["defaults"]["inference_steps"] == 20
    assert info["api_keys"]["env"] == "LIPSYNC_API_KEYS"
    assert not any(key in json.dumps(info) for key in KEYS)
    assert str(gateway.data_dir) not in json.dumps(info)


def test_multipart_upload_runs_the_same_job(gateway, clip) -> None:
    client = Client(gateway.url)
    response = client.http.post(
        "/lipsync/upload", files={"video": ("x.bin", clip[0]), "audio": ("y.bin", clip[1])},
        data={"inference_steps": "1", "seed": "7", "mode": "fast"},
    )
    assert response.status_code == 200, response.text
    assert client.wait(response.json()["request_id"])[-1]["status"] == "Succeed"


def test_queue_positions_then_cancel_a_queued_and_a_running_job(gateway, triton, clip, long_audio) -> None:
    client = Client(gateway.url)
    cancelled_before = triton_metric(triton, "lipsync_jobs_total", outcome="cancelled")
    running = client.job(clip[0], long_audio, inference_steps=20)
    queued = [client.job(clip[0], long_audio, inference_steps=20) for _ in range(2)]
    client.wait(running, until=lambda s: s["status"] == "InProgress" and s["progress"] > 0)
    assert [client.status(job)["queue_position"] for job in queued] == [1, 2]
    assert client.status(running)["queue_position"] == 0

    first = client.cancel(queued[0])
    assert first.status_code == 200 and first.json()["status"] == "Cancelled"
    assert client.status(queued[1])["queue_position"] == 1

    stopped = client.cancel(running)
    assert stopped.status_code == 200 and stopped.json()["status"] == "Cancelled"
    deadline = time.monotonic() + 60
    while triton_metric(triton, "lipsync_jobs_total", outcome="cancelled") <= cancelled_before:
        assert time.monotonic() < deadline, "Triton never saw the running job cancelled"
        time.sleep(0.2)
    client.wait(queued[1], until=lambda s: s["status"] == "InProgress")  # the freed slot takes the next job
    assert client.cancel(queued[1]).json()["status"] == "Cancelled"
    for job in (running, *queued):
        assert client.status(job)["status"] == "Cancelled"
    again = client.cancel(running)
    assert again.status_code == 409 and again.json()["status"] == "Failed"


def test_an_idempotency_key_returns_the_first_job(gateway, clip) -> None:
    alpha, beta = Client(gateway.url, KEYS[0]), Client(gateway.url, KEYS[1])
    key = {"Idempotency-Key": f"order-{secrets.token_hex(4)}"}  # the gateway is shared: other tests use keys too
    first = alpha.submit(*clip, headers=key, inference_steps=1).json()["request_id"]
    second = alpha.submit(*clip, headers=key, inference_steps=1).json()["request_id"]
    other = beta.submit(*clip, headers=key, inference_steps=1).json()["request_id"]
    assert first == second != other
    for client, job in ((alpha, first), (beta, other)):
        client.cancel(job)
        assert client.wait(job)[-1]["status"] in FINISHED


@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGTERM], ids=["kill -9", "SIGTERM"])
def test_a_running_job_survives_a_gateway_restart(triton, clip, restart_audio, tmp_path, stop) -> None:
    # A short lease: after SIGKILL the job waits out its lease (and the next check, a third of it) before the re-queue.
    process = GatewayProcess(tmp_path / "data", triton.settings.grpc_url, free_port()).configure(lease_s=3).start()
    try:
        client = Client(process.url)
        request_id = client.job(clip[0], restart_audio, inference_steps=2)
        client.wait(request_id, until=lambda s: s["status"] == "InProgress" and s["progress"] > 0)
        process.process.send_signal(stop)
        assert process.process.wait(60) in (0, -signal.SIGKILL)
        process.start()
        seen = client.wait(request_id)
        assert seen[0]["status"] in ("InQueue", "InProgress"), seen[0]
        # After SIGTERM the job is re-queued at once; after SIGKILL once its lease runs out.
        assert any((status["reason"] or "").startswith("re-queued: the gateway") for status in seen), seen
        assert seen[-1]["status"] == "Succeed", seen[-1]
        assert httpx2.get(seen[-1]["results"]["video"][0]["url"], timeout=60).status_code == 200
    finally:
        process.stop()


def test_fifty_clients_submitting_and_polling_get_no_server_error(gateway, clip) -> None:
    def one_client(index: int) -> tuple[list[int], str]:
        client = Client(gateway.url, KEYS[index % 2])
        codes = []
        response = client.submit(*clip, inference_steps=1)
        codes.append(response.status_code)
        request_id = response.json()["request_id"]
        for _ in range(3):
            codes.append(client.http.post("/lipsync/status", json={"request_id": request_id}).status_code)
        codes.append(client.cancel(request_id).status_code)  # 409 when it already finished
        return codes, client.wait(request_id)[-1]["status"]

    with ThreadPoolExecutor(50) as pool:
        outcomes = list(pool.map(one_client, range(50)))
    codes = [code for client_codes, _ in outcomes for code in client_codes]
    assert all(code < 500 for code in codes), sorted(set(codes))
    assert {code for code in codes} <= {200, 409}
    assert {status for _, status in outcomes} <= {"Cancelled", "Succeed"}
    metrics = httpx2.get(f"{gateway.url}/metrics", timeout=10).text
    assert "lipsync_gateway_queue_depth 0.0" in metrics
    assert 'lipsync_gateway_jobs{state="InProgress"} 0.0' in metrics


def test_a_job_is_retried_once_when_triton_restarts(clip, restart_audio, tmp_path) -> None:
    settings = TritonSettings.load(
        device="cpu", weights="tiny", checkpoints=str(tmp_path / "checkpoints"), workdir=tmp_path / "serve",
        http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(), startup_timeout_s=300,
    )
    first = TritonServer(settings)
    with first:
        process = GatewayProcess(tmp_path / "data", settings.grpc_url, free_port()).start()
        client = Client(process.url)
        request_id = client.job(clip[0], restart_audio, inference_steps=2)
        client.wait(request_id, until=lambda s: s["status"] == "InProgress" and s["progress"] > 0)
        first.kill()  # Triton dies mid-job, with its model processes
    try:
        waiting = client.wait(request_id, until=lambda s: s["stage"] == "waiting for Triton" or s["status"] in FINISHED)
        assert waiting[-1]["status"] == "InProgress", waiting[-1]
        with TritonServer(settings):
            final = client.wait(request_id)[-1]
        assert final["status"] == "Succeed", final
    finally:
        process.stop()


# --- faults: what a user sees when a part fails under a job -------------------------------------------


def test_tritonserver_killed_mid_job_reruns_the_job_then_fails_it_cleanly_when_out_of_attempts(
    clip, restart_audio, tmp_path
) -> None:
    """The user sees the running job at stage ``waiting for Triton`` while no Triton answers; once one is
    back the job runs again (reason ``re-queued: Triton was unavailable``); when that server is killed too,
    on the job's last attempt (``max_attempts`` 2), the job ends ``Failed`` with ``Triton was unavailable``:
    never stuck, no 5xx."""
    settings = TritonSettings.load(
        device="cpu", weights="tiny", checkpoints=str(tmp_path / "checkpoints"), workdir=tmp_path / "serve",
        http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(), startup_timeout_s=300,
    )
    process = GatewayProcess(tmp_path / "data", settings.grpc_url, free_port()).configure(triton_wait_s=600)
    try:
        with TritonServer(settings) as first:
            client = Client(process.start().url)
            request_id = client.job(clip[0], restart_audio, inference_steps=2)
            client.wait(request_id, until=lambda s: s["status"] == "InProgress" and s["progress"] > 0)
            os.kill(first.process.pid, signal.SIGKILL)  # the server alone, as the kernel's OOM killer would
            waiting = client.wait(request_id, until=lambda s: s["stage"] == WAITING_FOR_TRITON or s["status"] in FINISHED)
            assert waiting[-1]["status"] == "InProgress", waiting[-1]
        with TritonServer(settings) as second:
            rerun = client.wait(request_id, until=lambda s: (s["status"] == "InProgress" and s["progress"] > 0
                                                            and s["stage"] != WAITING_FOR_TRITON) or s["status"] in FINISHED)
            assert rerun[-1]["status"] == "InProgress", rerun[-1]
            assert any((s["reason"] or "").startswith("re-queued: Triton was unavailable") for s in rerun), rerun
            os.kill(second.process.pid, signal.SIGKILL)
            final = client.wait(request_id)[-1]
        assert (final["status"], final["reason"]) == ("Failed", "Triton was unavailable"), final
        assert "results" not in final or not final["results"]
    finally:
        process.stop()


@pytest.fixture
def small_disk(tmp_path) -> Iterator[Path]:
    """A 64 MiB tmpfs (the test runs as root): a data folder that can fill up."""
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def test_a_full_data_folder_refuses_new_jobs_with_507_and_fails_the_running_one_with_its_reason(
    triton, clip, restart_audio, small_disk
) -> None:
    """The user sees new submits refused with 507 and a JSON reason naming ``min_free_mb`` (nothing is
    created), the running job ``Failed`` with ``the result could not be stored: …`` and no result to
    download (no partial file either); once space is back, submits are accepted again."""
    data = small_disk / "data"
    process = GatewayProcess(data, triton.settings.grpc_url, free_port()).configure(min_free_mb=16)
    try:
        client = Client(process.start().url)
        request_id = client.job(clip[0], restart_audio, inference_steps=2)
        client.wait(request_id, until=lambda s: s["status"] == "InProgress" and s["progress"] > 0)
        filler = small_disk / "filler"
        with open(filler, "wb") as file:  # leaves 8 MiB: under min_free_mb, room for the job table
            os.posix_fallocate(file.fileno(), 0, shutil.disk_usage(small_disk).free - 8 * 2**20)
        refused = client.submit(*clip, inference_steps=1)
        assert refused.status_code == 507, refused.text
        assert refused.json()["status"] == "Failed" and "(min_free_mb)" in refused.json()["reason"]
        assert not any((data / "incoming").iterdir())
        final = client.wait(request_id)[-1]
        assert final["status"] == "Failed" and final["reason"].startswith("the result could not be stored: "), final
        assert "(min_free_mb)" in final["reason"]
        assert not any((data / "results").iterdir())
        assert client.http.get(f"/lipsync/result/{request_id}").status_code == 404
        filler.unlink()
        accepted = client.submit(*clip, inference_steps=1)
        assert accepted.status_code == 200, accepted.text
        client.cancel(accepted.json()["request_id"])
    finally:
        process.stop()


def test_a_job_whose_inputs_were_deleted_fails_with_that_reason(triton, clip, restart_audio, tmp_path) -> None:
    """The user sees the job whose input files were deleted from the data folder while it was queued
    ``Failed`` with ``the job's input files are gone …; submit it again``; the job before it is unaffected."""
    data = tmp_path / "data"
    process = GatewayProcess(data, triton.settings.grpc_url, free_port()).start()  # one job at a time
    try:
        client = Client(process.url)
        running = client.job(clip[0], restart_audio, inference_steps=2)
        queued = client.job(*clip, inference_steps=1)
        assert client.status(queued)["status"] == "InQueue"
        shutil.rmtree(data / "inputs" / queued)
        final = client.wait(queued)[-1]
        assert (final["status"], final["reason"]) == ("Failed", INPUTS_GONE), final
        assert client.wait(running)[-1]["status"] == "Succeed"
    finally:
        process.stop()
