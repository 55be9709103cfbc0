"""Batches and estimates against the gateway app in this process (real job table, media checks, webhooks and
body cap; stand-in backend: :mod:`support.local_gateway`): per-item errors, idempotency, cancel, the one
webhook, ownership, and the hostile inputs (too many items, a body over the batch cap, a 10-hour clip).
Through a real Triton: tests/e2e/test_gateway_batches.py."""

from __future__ import annotations

import base64
import time

import pytest
from support.bombs import sparse_video
from support.clips import demo_frames, speech, write_video, write_wav
from support.gateway_process import KEYS
from support.local_gateway import LocalGateway, StandInBackend
from support.webhook_receivers import Receiver

FINISHED = {"Succeed", "Failed", "Cancelled"}
MAX_ITEMS = 4


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> tuple[bytes, bytes]:
    folder = tmp_path_factory.mktemp("batch-files")
    return (write_video(folder / "clip.mp4", demo_frames(10)).read_bytes(),
            write_wav(folder / "speech.wav", speech(0.4)).read_bytes())


@pytest.fixture(scope="module")
def item(files) -> dict[str, object]:
    video, audio = files
    return {"video_source": base64.b64encode(video).decode(), "audio_source": base64.b64encode(audio).decode(),
            "inference_steps": 1}


@pytest.fixture
def held(tmp_path) -> LocalGateway:
    """A gateway whose jobs wait for ``backend.release`` (so that they can be cancelled), 2 MB batch cap."""
    with LocalGateway(tmp_path / "data", StandInBackend(hold=True), max_batch_items=MAX_ITEMS,
                      max_batch_body_mb=2, max_active_jobs=6) as local:
        yield local


def auth(key: str = KEYS[0]) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def wait_finished(gateway: LocalGateway, batch_id: str, timeout_s: float = 30) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        view = gateway.client.get(f"/v1/batches/{batch_id}", headers=auth()).json()
        if view["finished"]:
            return view
        assert time.monotonic() < deadline, view
        time.sleep(0.05)


def test_a_batch_runs_its_valid_items_refuses_the_invalid_one_and_calls_back_once(held, item) -> None:
    receiver = Receiver()
    try:
        bad = item | {"video_source": base64.b64encode(b"not a video").decode()}
        body = {"items": [item, bad, item | {"seed": 5}], "webhook_url": receiver.url}
        response = held.client.post("/v1/batches", headers=auth(), json=body)
        assert response.status_code == 202, response.text
        accepted = response.json()
        items = accepted["items"]
        assert [entry["index"] for entry in items] == [0, 1, 2]
        assert items[0]["request_id"] and items[2]["request_id"] and items[0]["error"] is None
        assert items[1]["request_id"] is None and items[1]["error"].startswith("video_source")
        view = held.client.get(f"/v1/batches/{accepted['batch_id']}", headers=auth()).json()
        assert view["counts"]["Refused"] == 1 and not view["finished"]
        job = held.client.post("/lipsync/status", headers=auth(), json={"request_id": items[0]["request_id"]})
        assert job.json()["status"] in ("InQueue", "InProgress")
        held.backend.release.set()
        done = wait_finished(held, accepted["batch_id"])
        assert [entry["status"] for entry in done["items"]] == ["Succeed", None, "Succeed"]
        assert done["items"][0]["result_url"].startswith(held.url) and done["finished_at"] is not None
        calls = receiver.wait_for(1)
        assert calls[0].json["batch_id"] == accepted["batch_id"] and calls[0].json["finished"]
        assert "webhook-signature" in {name.lower() for name in calls[0].headers}
        assert held.app.state.runtime.store.get_batch(accepted["batch_id"]).webhook_state is not None
        assert len(receiver.calls) == 1
    finally:
        receiver.close()


def test_cancelling_a_batch_cancels_its_queued_and_running_items(held, item) -> None:
    accepted = held.client.post("/v1/batches", headers=auth(), json={"items": [item] * 3}).json()
    cancelled = held.client.post(f"/v1/batches/{accepted['batch_id']}/cancel", headers=auth())
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["finished"] and cancelled.json()["counts"]["Cancelled"] == 3
    again = held.client.post(f"/v1/batches/{accepted['batch_id']}/cancel", headers=auth())
    assert again.status_code == 409 and "already finished" in again.json()["reason"]


def test_a_batch_is_idempotent_as_a_whole(held, item) -> None:
    headers = auth() | {"Idempotency-Key": "batch-1"}
    first = held.client.post("/v1/batches", headers=headers, json={"items": [item, item]})
    replay = held.client.post("/v1/batches", headers=headers, json={"items": [item, item]})
    assert first.status_code == replay.status_code == 202 and first.json() == replay.json()
    other = held.client.post("/v1/batches", headers=headers, json={"items": [item]})
    assert other.status_code == 409 and "Idempotency-Key" in other.json()["reason"]
    filler = held.client.post("/v1/batches", headers=auth(), json={"items": [item] * MAX_ITEMS})
    assert filler.status_code == 202  # the key is now at max_active_jobs (6) ...
    assert held.client.post("/v1/batches", headers=auth(), json={"items": [item]}).status_code == 429
    at_quota = held.client.post("/v1/batches", headers=headers, json={"items": [item, item]})
    assert at_quota.status_code == 202 and at_quota.json() == first.json()  # ... a replay creates nothing: let through
    for batch in (first, filler):
        held.client.post(f"/v1/batches/{batch.json()['batch_id']}/cancel", headers=auth())


def test_a_batch_is_its_owners_only(held, item) -> None:
    batch_id = held.client.post("/v1/batches", headers=auth(), json={"items": [item]}).json()["batch_id"]
    assert held.client.get(f"/v1/batches/{batch_id}", headers=auth(KEYS[1])).status_code == 404
    assert held.client.post(f"/v1/batches/{batch_id}/cancel", headers=auth(KEYS[1])).status_code == 404
    assert held.client.get(f"/v1/batches/{batch_id}").status_code == 401
    assert held.client.get("/v1/batches/..%2Fetc", headers=auth()).status_code in (400, 404)
    held.client.post(f"/v1/batches/{batch_id}/cancel", headers=auth())


def test_a_multipart_batch_names_its_parts_per_item(held, files) -> None:
    video, audio = files
    parts = [("items.0.video", ("a.mp4", video)), ("items.0.audio", ("a.wav", audio)),
             ("items.1.video", ("b.mp4", video))]
    response = held.client.post("/v1/batches/upload", headers=auth(), files=parts,
                                data={"items.0.inference_steps": "1", "items.1.inference_steps": "1"})
    assert response.status_code == 202, response.text
    items = response.json()["items"]
    assert items[0]["request_id"] and items[1]["error"].startswith("audio")
    held.client.post(f"/v1/batches/{response.json()['batch_id']}/cancel", headers=auth())


def count_jobs(gateway: LocalGateway) -> int:
    return len(gateway.app.state.runtime.store.all_ids())


def test_hostile_batches_get_a_4xx_naming_the_limit_and_create_nothing(held, item, files) -> None:
    before = count_jobs(held)
    over = held.client.post("/v1/batches", headers=auth(), json={"items": [item] * (MAX_ITEMS + 1)})
    assert over.status_code == 422 and "max_batch_items" in over.json()["reason"]
    big = held.client.post("/v1/batches", headers=auth() | {"Content-Type": "application/json"},
                           content=b" " * (3 * 1024 * 1024))
    assert big.status_code == 413 and "max_batch_body_mb" in big.json()["reason"]
    video, audio = files
    parts = [(f"items.{index}.{name}", ("f", data)) for index in range(MAX_ITEMS + 1)
             for name, data in (("video", video), ("audio", audio))]
    form = held.client.post("/v1/batches/upload", headers=auth(), files=parts)
    assert form.status_code == 422 and "max_batch_items" in form.json()["reason"]
    all_bad = held.client.post("/v1/batches", headers=auth(), json={"items": [{"video_source": "x"}, {}]})
    assert all_bad.status_code == 422 and "items[0]" in all_bad.json()["reason"] and "items[1]" in all_bad.json()["reason"]
    quota = held.client.post("/v1/batches", headers=auth(KEYS[1]), json={"items": [item] * MAX_ITEMS})
    assert quota.status_code == 202
    over_quota = held.client.post("/v1/batches", headers=auth(KEYS[1]), json={"items": [item] * 3})
    assert over_quota.status_code == 429 and "max_active_jobs" in over_quota.json()["reason"]
    held.client.post(f"/v1/batches/{quota.json()['batch_id']}/cancel", headers=auth(KEYS[1]))
    assert count_jobs(held) == before + MAX_ITEMS  # only the batch within the quota made jobs
    assert held.client.post("/v1/batches", json={"items": [item]}).status_code == 401


def test_an_estimate_before_any_job_says_it_has_no_basis(held) -> None:
    response = held.client.post("/v1/estimate", headers=auth(),
                                json={"duration_s": 4.0, "width": 640, "height": 360, "inference_steps": 2})
    assert response.status_code == 200, response.text
    estimate = response.json()
    assert estimate["basis"] == "none" and estimate["run_s"] is None and estimate["frames"] == 100
    assert estimate["inference_steps"] == 2 and estimate["start_in_s"] == 0.0


def test_hostile_estimates_get_a_4xx_naming_the_limit(held) -> None:
    ten_hours = held.client.post("/v1/estimate", headers=auth(), json={"duration_s": 36000.0, "width": 640, "height": 360})
    assert ten_hours.status_code == 422 and "max_video_s" in ten_hours.json()["reason"]
    huge = held.client.post("/v1/estimate", headers=auth(), json={"duration_s": 1.0, "width": 100000, "height": 2})
    assert huge.status_code == 422 and "max_side" in huge.json()["reason"]
    for bad in ({"duration_s": -1.0, "width": 1, "height": 1}, {"duration_s": "1", "width": 1, "height": 1},
                {"duration_s": 1.0, "width": 1, "height": 1, "inference_steps": 0}, {"width": 1, "height": 1}):
        assert held.client.post("/v1/estimate", headers=auth(), json=bad).status_code == 422, bad
    assert held.client.post("/v1/estimate", json={"duration_s": 1.0, "width": 1, "height": 1}).status_code == 401


def test_an_estimate_for_an_uploaded_ten_hour_clip_names_the_duration_limit(held, tmp_path) -> None:
    ten_hours = sparse_video(tmp_path / "ten-hours.mp4", 36000.0).read_bytes()
    response = held.client.post("/v1/estimate/upload", headers=auth(), files={"video": ("v", ten_hours)})
    assert response.status_code == 422 and "max_video_s" in response.json()["reason"]
    assert list((held.data_dir / "incoming").iterdir()) == []  # the upload was deleted


def test_an_estimate_from_an_uploaded_clip_counts_the_audio_frames(held, files) -> None:
    video, audio = files
    response = held.client.post("/v1/estimate/upload", headers=auth(), files={"video": ("v", video), "audio": ("a", audio)},
                                data={"inference_steps": "1"})
    assert response.status_code == 200, response.text
    assert response.json()["frames"] == 10  # 0.4 s of audio at 25 fps
    alone = held.client.post("/v1/estimate/upload", headers=auth(), files={"video": ("v", video)})
    assert alone.status_code == 200 and alone.json()["frames"] == 10  # the 10-frame video's own length
    junk = held.client.post("/v1/estimate/upload", headers=auth(), files={"video": ("v", b"junk")})
    assert junk.status_code == 422 and junk.json()["reason"].startswith("video")


def test_the_new_routes_have_typed_answers_in_the_openapi_document(held) -> None:
    schema = held.client.get("/openapi.json").json()
    paths = schema["paths"]
    assert paths["/v1/batches"]["post"]["responses"]["202"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "BatchAccepted")
    assert paths["/v1/estimate"]["post"]["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "Estimate")
    assert "BatchStatus" in schema["components"]["schemas"]
