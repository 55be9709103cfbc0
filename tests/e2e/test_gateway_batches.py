"""Batches and estimates through the gateway process and a real Triton (CPU, tiny weights): a batch of five
items with an invalid one, its cancel and its one webhook; an estimate beside the measured time of the job."""

from __future__ import annotations

import base64
import time

import httpx2
import pytest
from support.clips import speech, write_wav
from support.gateway_process import KEYS
from support.webhook_receivers import Receiver

pytestmark = [pytest.mark.slow]

FINISHED = {"Succeed", "Failed", "Cancelled"}


@pytest.fixture(scope="module")
def http(gateway) -> httpx2.Client:
    return httpx2.Client(base_url=gateway.url, headers={"Authorization": f"Bearer {KEYS[0]}"}, timeout=120)


@pytest.fixture(scope="module")
def long_audio(tmp_path_factory) -> bytes:
    """8 s of speech: with 20 steps a job still running when the batch is cancelled."""
    return write_wav(tmp_path_factory.mktemp("batch-long") / "long.wav", speech(8.0)).read_bytes()


def encoded(video: bytes, audio: bytes, **options) -> dict:
    return {"video_source": base64.b64encode(video).decode(), "audio_source": base64.b64encode(audio).decode()} | options


def poll(http: httpx2.Client, path: str, until, timeout_s: float = 600) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        seen = http.get(path).json() if path.startswith("/v1/batches") else http.post(
            "/lipsync/status", json={"request_id": path}).json()
        if until(seen):
            return seen
        assert time.monotonic() < deadline, seen
        time.sleep(0.3)


def test_a_batch_of_five_runs_the_valid_items_refuses_the_invalid_one_and_cancels_the_rest(http, clip, long_audio) -> None:
    video, audio = clip
    receiver = Receiver()
    try:
        items = [encoded(video, audio, inference_steps=1, seed=seed) for seed in (1, 2, 3)]
        items.append(encoded(video, audio, inference_steps=1000))  # over the steps' range
        items.append(encoded(video, long_audio, inference_steps=20))
        response = http.post("/v1/batches", json={"items": items, "webhook_url": receiver.url})
        assert response.status_code == 202, response.text
        accepted = response.json()
        assert [item["request_id"] is None for item in accepted["items"]] == [False, False, False, True, False]
        assert "inference_steps" in accepted["items"][3]["error"]
        path = f"/v1/batches/{accepted['batch_id']}"
        poll(http, path, lambda view: all(item["status"] == "Succeed" for item in view["items"][:3]))
        cancelled = http.post(f"{path}/cancel")
        assert cancelled.status_code == 200, cancelled.text
        view = cancelled.json()
        assert [item["status"] for item in view["items"]] == ["Succeed"] * 3 + [None, "Cancelled"]
        assert view["finished"] and view["counts"]["Refused"] == 1
        for item in view["items"][:3]:
            download = httpx2.get(item["result_url"], timeout=60)
            assert download.status_code == 200 and download.headers["content-type"] == "video/mp4"
        call = receiver.wait_for(1, timeout_s=60)[0]
        assert call.json["batch_id"] == accepted["batch_id"] and call.json["counts"]["Cancelled"] == 1
        assert len(receiver.calls) == 1
    finally:
        receiver.close()


def test_an_estimate_stands_beside_the_measured_time_of_the_same_job(http, clip) -> None:
    video, audio = clip
    first = http.post("/lipsync/submit", json=encoded(video, audio, inference_steps=1)).json()["request_id"]
    assert poll(http, first, lambda status: status["status"] in FINISHED)["status"] == "Succeed"
    estimate = http.post("/v1/estimate/upload", files={"video": ("v.mp4", video), "audio": ("a.wav", audio)},
                         data={"inference_steps": "1"})
    assert estimate.status_code == 200, estimate.text
    expected = estimate.json()
    assert expected["basis"] == "same_options" and expected["basis_jobs"] >= 1 and expected["frames"] == 50
    assert expected["run_s"] > 0 and expected["gpu_s"] == 0.0  # a CPU deployment holds no GPU
    job = http.post("/lipsync/submit", json=encoded(video, audio, inference_steps=1)).json()["request_id"]
    measured = poll(http, job, lambda status: status["status"] in FINISHED)
    assert measured["status"] == "Succeed" and measured["results"]["timings"]["inference"] > 0
    by_numbers = http.post("/v1/estimate", json={"duration_s": 2.0, "width": 540, "height": 960, "inference_steps": 1})
    assert by_numbers.status_code == 200 and by_numbers.json()["run_s"] > 0
