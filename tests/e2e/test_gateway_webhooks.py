"""Webhooks: internal targets refused at submit, signed deliveries, a trickling receiver cut at the
deadline without delaying another key's webhook (the gateway app in this process on a stand-in
backend, :mod:`support.local_gateway`, served on loopback), and webhooks pending at SIGTERM sent after the
restart and checked again then (real gateway processes in front of a real Triton). A job's webhook
fires when it ends, cancelled ones included, so these tests cancel their jobs instead of waiting for
inference."""

from __future__ import annotations

import base64
import signal
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest
from standardwebhooks.webhooks import Webhook
from support.clips import demo_frames, speech, write_video, write_wav
from support.gateway_process import HOOK_HOST, KEYS, GatewayProcess
from support.local_gateway import LocalGateway
from support.webhook_receivers import TRICKLE, Receiver

from gateway.core.settings import GatewaySettings
from gateway.launcher.ports import free_port
from lipsync.testing import sample_sum

FINISHED = ("Succeed", "Failed", "Cancelled")

OTHER_HOOK_HOST = "127.0.0.3"
"""A second loopback receiver address: allowed in one run of a gateway, not in the next."""


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("webhook-media")
    video = write_video(folder / "clip.mp4", demo_frames(10)).read_bytes()
    audio = write_wav(folder / "speech.wav", speech(0.4)).read_bytes()
    return {"video_source": base64.b64encode(video).decode(), "audio_source": base64.b64encode(audio).decode()}


@pytest.fixture(scope="module")
def gateway(tmp_path_factory) -> Iterator[LocalGateway]:
    with LocalGateway(tmp_path_factory.mktemp("webhook-gateway") / "data") as local:
        yield local.serve()


def submit(url: str, key: str, media: dict[str, str], webhook_url: str) -> httpx2.Response:
    body = media | {"inference_steps": 1, "webhook_url": webhook_url}
    return httpx2.post(f"{url}/lipsync/submit", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60)


def ended_job(url: str, key: str, media: dict[str, str], webhook_url: str) -> str:
    """Submit a job with a webhook and cancel it at once: it ends, and its webhook is queued."""
    response = submit(url, key, media, webhook_url)
    assert response.status_code == 200, response.text
    request_id = response.json()["request_id"]
    cancel = httpx2.post(f"{url}/lipsync/cancel", json={"request_id": request_id},
                         headers={"Authorization": f"Bearer {key}"}, timeout=60)
    assert cancel.status_code in (200, 409), cancel.text  # 409: it already finished, the webhook is queued all the same
    return request_id


def verified(call, data_dir: Path) -> dict:
    """The body of a webhook call, checked against the deployment's signing secret like a receiver would."""
    secret = (data_dir / "webhook_secret").read_text().strip()
    return Webhook(secret).verify(call.body, call.headers)


def delivery(data_dir: Path, job_id: str) -> sqlite3.Row | None:
    with sqlite3.connect(f"file:{data_dir / 'jobs.db'}?mode=ro", uri=True) as db:
        db.row_factory = sqlite3.Row
        return db.execute("SELECT * FROM webhook_outbox WHERE job_id = ?", (job_id,)).fetchone()


INTERNAL = [
    "http://169.254.169.254/latest/meta-data/", "http://10.0.0.1/", "http://[fd00::1]/", "http://[::1]:8080/",
    "http://0.0.0.0:8080/", "http://2130706433/", "http://localhost:9000/", "http://127.0.0.1:8080/",
    "http://0x7f.1/", "http://[::ffff:169.254.169.254]/", "http://[64:ff9b::a9fe:a9fe]/",
    f"http://user:secret@{HOOK_HOST}:9/hook",  # an allowed host, but credentials are refused anywhere
]


def test_internal_and_credentialed_webhook_urls_get_400_and_create_no_job(gateway, media) -> None:
    before = sample_sum(httpx2.get(f"{gateway.url}/metrics", timeout=10).text, "lipsync_gateway_jobs")
    for url in INTERNAL:
        response = submit(gateway.url, KEYS[0], media, url)
        assert response.status_code == 400, (url, response.text)
        body = response.json()
        assert body["status"] == "Failed" and body["reason"].startswith("webhook_url"), body
    upload = httpx2.post(
        f"{gateway.url}/lipsync/upload", headers={"Authorization": f"Bearer {KEYS[0]}"},
        files={"video": ("v", base64.b64decode(media["video_source"])), "audio": ("a", base64.b64decode(media["audio_source"]))},
        data={"webhook_url": "http://169.254.169.254/"}, timeout=60,
    )
    assert upload.status_code == 400 and upload.json()["status"] == "Failed"
    assert sample_sum(httpx2.get(f"{gateway.url}/metrics", timeout=10).text, "lipsync_gateway_jobs") == before
    assert not any((gateway.data_dir / "incoming").iterdir())


def test_a_trickling_receiver_is_cut_at_the_deadline_and_does_not_delay_another_keys_webhook(gateway, media) -> None:
    per_owner = GatewaySettings.load().webhook_per_owner
    deadline_s = gateway.settings.webhook_timeout_s
    slow, fast = Receiver(then=TRICKLE), Receiver()
    try:
        for _ in range(per_owner + 1):  # one more than the key may have in flight
            ended_job(gateway.url, KEYS[0], media, slow.url)
        slow.wait_for(per_owner)
        queued = time.monotonic()
        other = ended_job(gateway.url, KEYS[1], media, fast.url)
        (call,) = fast.wait_for(1)
        assert call.received_at - queued < deadline_s, "another key's webhook waited behind the trickling receiver"
        body = verified(call, gateway.data_dir)
        assert body["request_id"] == other and body["status"] in FINISHED
        cut = slow.wait_for(per_owner, timeout_s=deadline_s + 10, where=lambda c: c.closed_at is not None)
        for stuck in cut:
            assert deadline_s - 0.2 <= stuck.closed_at - stuck.received_at < deadline_s + 2
        (waited,) = slow.wait_for(per_owner + 1, timeout_s=deadline_s + 10)[per_owner:]
        assert waited.received_at >= min(c.closed_at for c in cut) - 0.2  # the key's own extra delivery waited
    finally:
        slow.close()
        fast.close()


@pytest.mark.slow
def test_webhooks_pending_at_sigterm_are_sent_after_the_restart_and_checked_again(triton, media, tmp_path) -> None:
    data_dir = tmp_path / "data"
    kept, dropped = Receiver([TRICKLE]), Receiver([TRICKLE], host=OTHER_HOOK_HOST)
    first = GatewayProcess(data_dir, triton.settings.grpc_url, free_port(),
                           webhook_allow=f"{HOOK_HOST},{OTHER_HOOK_HOST}", webhook_timeout_s=120)
    second = GatewayProcess(data_dir, triton.settings.grpc_url, free_port(), webhook_allow=HOOK_HOST)
    try:
        first.start()
        kept_job = ended_job(first.url, KEYS[0], media, kept.url)
        dropped_job = ended_job(first.url, KEYS[1], media, dropped.url)
        kept.wait_for(1)
        dropped.wait_for(1)
        stopping = time.monotonic()
        first.process.send_signal(signal.SIGTERM)
        assert first.process.wait(60) == 0
        assert time.monotonic() - stopping < 10, "SIGTERM waited for webhook deliveries"
        for receiver in (kept, dropped):
            receiver.wait_for(1, timeout_s=5, where=lambda c: c.closed_at is not None)
            assert len(receiver.calls) == 1
        assert delivery(data_dir, kept_job)["state"] == delivery(data_dir, dropped_job)["state"] == "pending"

        second.start()  # OTHER_HOOK_HOST is no longer allowed
        trickled, sent = kept.wait_for(2)
        assert sent.behaviour == 200 and sent.headers["webhook-id"] == trickled.headers["webhook-id"]
        body = verified(sent, data_dir)
        assert body["request_id"] == kept_job and body["status"] in FINISHED
        deadline = time.monotonic() + 30
        while not (refused := delivery(data_dir, dropped_job))["last_error"]:
            assert time.monotonic() < deadline, "the pending webhook was not attempted after the restart"
            time.sleep(0.1)
        assert refused["last_error"].startswith(f"refused: webhook_url: {OTHER_HOOK_HOST}"), refused["last_error"]
        assert len(dropped.calls) == 1  # checked again at delivery: never connected to
    finally:
        first.stop()
        second.stop()
        kept.close()
        dropped.close()
